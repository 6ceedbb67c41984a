//! Audit events: the layer's security-relevant decisions, handed to a hook as they happen.

use std::{fmt, sync::Arc};

use crate::outcome::Outcome;

/// A security-relevant decision of the layer, for an audit log; see
/// [`Builder::audit`](crate::Builder::audit).
///
/// The subject is included where the layer knows it from a verified token; a token, or any
/// part of one, never is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditEvent<'a> {
    /// A flight started for a token whose subject already had a live entry for another token:
    /// a second token of one account, which can be an old, already rotated token replayed
    /// by someone else. The inner service decides; this reports that it was asked.
    ReuseSuspected {
        /// The token's subject.
        subject: Option<&'a str>,
        /// The flight that was started (the `flight` field of its span).
        flight: u64,
    },
    /// Entries were invalidated through a [`Handle`](crate::Handle): their replays are gone
    /// and their running flights' results revoked, on every instance when a store is set.
    Invalidated {
        /// What was named.
        scope: InvalidationScope,
        /// The subject, for [`InvalidationScope::Subject`].
        subject: Option<&'a str>,
        /// How many entries of this instance's table it removed.
        entries: usize,
    },
    /// The layer refused a request: before any coalescing (rejected) or because a limit was
    /// reached (overloaded).
    Refused {
        /// [`Outcome::Rejected`] or [`Outcome::Overloaded`].
        outcome: Outcome,
        /// Why, as [`Coalesced::reason`](crate::Coalesced::reason) names it.
        reason: &'static str,
        /// The subject, when the request was verified before it was refused.
        subject: Option<&'a str>,
    },
    /// One subject holds as many live entries as
    /// [`Builder::max_entries_per_group`](crate::Builder::max_entries_per_group) allows: its
    /// next token was refused.
    SubjectCapReached {
        /// The subject.
        subject: Option<&'a str>,
    },
    /// The coordination store failed repeatedly: flights coalesce per instance for the cool
    /// down (or are refused, with [`Builder::require_store`](crate::Builder::require_store)).
    BreakerOpened,
    /// The coordination store answered again after the breaker opened.
    BreakerClosed,
}

impl AuditEvent<'_> {
    /// The event's name in snake case (`reuse_suspected`, `invalidated`, `refused`,
    /// `subject_cap_reached`, `breaker_opened`, `breaker_closed`).
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::ReuseSuspected { .. } => "reuse_suspected",
            AuditEvent::Invalidated { .. } => "invalidated",
            AuditEvent::Refused { .. } => "refused",
            AuditEvent::SubjectCapReached { .. } => "subject_cap_reached",
            AuditEvent::BreakerOpened => "breaker_opened",
            AuditEvent::BreakerClosed => "breaker_closed",
        }
    }

    /// The subject the event concerns, if known.
    pub fn subject(&self) -> Option<&str> {
        match *self {
            AuditEvent::ReuseSuspected { subject, .. }
            | AuditEvent::Invalidated { subject, .. }
            | AuditEvent::Refused { subject, .. }
            | AuditEvent::SubjectCapReached { subject } => subject,
            AuditEvent::BreakerOpened | AuditEvent::BreakerClosed => None,
        }
    }
}

/// What an invalidation named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InvalidationScope {
    /// One key ([`Handle::invalidate`](crate::Handle::invalidate)).
    Key,
    /// A group ([`Handle::invalidate_group`](crate::Handle::invalidate_group)).
    Group,
    /// Every entry of one token
    /// ([`Handle::invalidate_token`](crate::Handle::invalidate_token)).
    Token,
    /// Every entry of one subject
    /// ([`Handle::invalidate_subject`](crate::Handle::invalidate_subject)).
    Subject,
}

impl InvalidationScope {
    /// `key`, `group`, `token` or `subject`.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidationScope::Key => "key",
            InvalidationScope::Group => "group",
            InvalidationScope::Token => "token",
            InvalidationScope::Subject => "subject",
        }
    }
}

type Hook = dyn Fn(&AuditEvent<'_>) + Send + Sync;

/// The audit hook of a layer, if one is set; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Audit(Option<Arc<Hook>>);

impl Audit {
    pub(crate) fn new(hook: impl Fn(&AuditEvent<'_>) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(hook)))
    }

    /// Whether a hook is set: events whose making costs anything are made only then.
    pub(crate) fn is_set(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn emit(&self, event: AuditEvent<'_>) {
        if let Some(hook) = &self.0 {
            hook(&event);
        }
    }
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() {
            "Audit(hook)"
        } else {
            "Audit(none)"
        })
    }
}
