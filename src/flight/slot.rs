//! The key of a map slot ([`Slot`]), the maps' hasher ([`KeyedFold`]), and how a map makes
//! room for one more entry ([`make_room`]).

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, Hasher},
};

use super::SHARDS;
use crate::key::Fingerprint;

/// Hashes fingerprints (which feed the hasher one `u64`) with a folded multiply under a
/// per-table random key: one multiplication instead of SipHash, and still unpredictable to
/// a client that chooses tokens to collide (unkeyed `Fingerprint::of` digests).
#[derive(Clone, Copy)]
pub(super) struct KeyedFold {
    k0: u64,
    k1: u64,
}

impl KeyedFold {
    pub(super) fn random() -> Self {
        // A model check must be deterministic: the same keys, so the same iteration orders.
        #[cfg(all(test, refresh_coalesce_loom))]
        let bytes = [7u8; 16];
        #[cfg(not(all(test, refresh_coalesce_loom)))]
        let bytes = crate::key::random_bytes::<16>();
        let (a, b) = bytes.split_at(8);
        Self {
            k0: u64::from_le_bytes(a.try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(b.try_into().expect("8 bytes")) | 1,
        }
    }
}

impl BuildHasher for KeyedFold {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher {
            keys: *self,
            state: 0,
        }
    }
}

pub(super) struct FoldHasher {
    keys: KeyedFold,
    state: u64,
}

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        let product = u128::from(value ^ self.state ^ self.keys.k0) * u128::from(self.keys.k1);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

/// The key of a table slot: the first 16 bytes of the fingerprint.
///
/// 128 bits of a keyed hash (or of SHA-256) keep the table's keys apart as well as the whole
/// digest would (a second key with the same half is a 2^-128 chance, and a keyed hash gives
/// no way to aim for one), and save 16 bytes in every slot.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) struct Slot(u128);

impl Slot {
    pub(super) fn of(key: &Fingerprint) -> Self {
        let mut half = [0u8; 16];
        half.copy_from_slice(&key.as_bytes()[..16]);
        Self(u128::from_le_bytes(half))
    }

    /// The shard of this slot: its last byte, independent of the bits the hash uses.
    pub(super) fn shard(self) -> usize {
        (self.0 >> 120) as usize % SHARDS
    }
}

impl std::hash::Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Digest bytes are uniformly distributed: 64 of them are hash enough.
        state.write_u64(self.0 as u64);
    }
}

/// Prepares `map` for one more insert. When it has no room left, the standard map grows to
/// twice its buckets unless at most half of its capacity is live, even when the rest is
/// tombstones of removed entries: a table refilled after its entries expired (a flood at
/// the limit, every TTL) would double each time. Rebuilt here at the size its live entries
/// need, it keeps its size when the room was tombstones and doubles only when it is full.
pub(super) fn make_room<K: Hash + Eq, V, S: BuildHasher + Clone>(map: &mut HashMap<K, V, S>) {
    if map.len() < map.capacity() || map.is_empty() {
        return;
    }
    let mut rebuilt = HashMap::with_capacity_and_hasher(map.len() + 1, map.hasher().clone());
    rebuilt.extend(map.drain());
    *map = rebuilt;
}
