//! What a table slot holds: a running flight or a live replay, and the rarely used parts out
//! of line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{FlightFuture, Value};
use crate::{
    key::{Admission, Fingerprint},
    sync::{self, AtomicUsize},
};

pub(super) struct Entry {
    pub(super) id: u64,
    pub(super) state: State,
    /// What only the HTTP front sets, out of line so that a table slot stays small.
    pub(super) cold: Option<Box<Cold>>,
}

/// The first 128 bits of a group's or tag's fingerprint: what an entry keeps of its names.
///
/// Like the table's own keys ([`Slot`](super::slot::Slot)), 128 bits of a keyed hash keep
/// groups apart as well as the whole digest would, in half the room. (Two names that share
/// their first 128 bits would only make `invalidate_group` remove the entries of both.)
pub(super) type Name = [u8; 16];

/// The name of `group`.
pub(super) fn name(group: &Fingerprint) -> Name {
    let mut name = [0u8; 16];
    name.copy_from_slice(&group.as_bytes()[..16]);
    name
}

/// 40 bytes, allocated only for entries that have one of these parts.
pub(super) struct Cold {
    pub(super) group: Option<Name>,
    /// A second name of the entry that `invalidate_group` matches (the HTTP front's token
    /// tag, shared by every party presenting one token); not counted.
    pub(super) tag: Option<Name>,
    /// Whole seconds since the Unix epoch, rounded down (refusing up to a second early,
    /// never late), at most `u32::MAX` (in 2106); 0 for none.
    pub(super) not_after: u32,
}

impl Cold {
    pub(super) fn new(admission: &Admission) -> Option<Box<Self>> {
        let not_after = admission.expires().map_or(0, |at| {
            let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            u32::try_from(since.as_secs()).unwrap_or(u32::MAX).max(1)
        });
        let group = admission.group_key().map(name);
        let tag = admission.tag_key().map(name);
        (group.is_some() || tag.is_some() || not_after != 0).then(|| {
            Box::new(Self {
                group,
                tag,
                not_after,
            })
        })
    }
}

impl Entry {
    /// Whether `invalidate_group(group)` reaches this entry: by its group or its tag.
    pub(super) fn named(&self, group: &Name) -> bool {
        self.cold.as_ref().is_some_and(|cold| {
            cold.group.as_ref() == Some(group) || cold.tag.as_ref() == Some(group)
        })
    }

    pub(super) fn not_after(&self) -> Option<SystemTime> {
        let secs = self.cold.as_ref().map_or(0, |cold| cold.not_after);
        (secs != 0).then(|| UNIX_EPOCH + Duration::from_secs(u64::from(secs)))
    }
}

pub(super) enum State {
    /// Boxed: a flight lasts one inner call, a replay the whole TTL.
    Flight(Box<Running>),
    Replay {
        value: Value,
        /// Nanoseconds since the table's epoch.
        expires: u64,
        replays: u32,
    },
}

pub(super) struct Running {
    pub(super) future: FlightFuture,
    pub(super) waiters: sync::Arc<AtomicUsize>,
    /// The span the flight's task runs in, when a subscriber records it: callers who join
    /// link to it. Boxed, so that a flight without one costs a word, not a span.
    pub(super) span: Option<Box<tracing::Span>>,
}
