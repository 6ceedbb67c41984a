//! Unit tests of the table's layout and limits.

use super::*;
use futures_util::FutureExt;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A table slot stays one cache line: memory per entry is a benchmark target
/// (BENCHMARKS.md §6).
#[test]
fn a_table_slot_is_64_bytes() {
    assert_eq!(std::mem::size_of::<(Slot, Entry)>(), 64);
}

/// The out-of-line part of an HTTP entry (group, tag, expiry) is one 40-byte allocation, in
/// the allocator's 48-byte class: memory per entry under a flood (BENCHMARKS.md §10).
#[test]
fn the_cold_part_of_an_entry_is_40_bytes() {
    assert_eq!(std::mem::size_of::<entry::Cold>(), 40);
}

/// An entry keeps its group and tag by their first 128 bits, which `invalidate_group`
/// matches: the group's other bytes do not count, as for keys.
#[test]
fn invalidating_a_group_matches_its_first_128_bits() {
    let table = Arc::new(Table::new(Limits {
        ttl: Duration::from_secs(30),
        max_entries: 10,
        max_waiters: 10,
        max_replays: None,
        max_per_group: 10,
    }));
    let group = Fingerprint::of("subject");
    let mut same_half = *group.as_bytes();
    same_half[31] ^= 1;
    let other = Fingerprint::of("another subject");
    let future = async { Err(LeaderFailed::new(crate::error::Failure::Panicked)) }
        .boxed()
        .shared();
    for (n, name) in [group, other].into_iter().enumerate() {
        let admission = Admission::new().group(name);
        let key = Fingerprint::from(n as u64);
        let (lead, _) = table
            .lead(key, admission, |_| future.clone())
            .unwrap_or_else(|_| panic!("room for two"));
        assert!(matches!(lead, Lead::Started(_)));
    }
    assert_eq!(table.invalidate_group(&Fingerprint::of("nobody")), 0);
    assert_eq!(
        table.invalidate_group(&Fingerprint::from_bytes(same_half)),
        1
    );
    assert_eq!(table.len(), 1, "the other group's entry stays");
    assert_eq!(table.invalidate_group(&other), 1);
    assert_eq!(table.len(), 0);
}

/// A shard refilled as its entries expire keeps its size: without `make_room` the
/// tombstones of removed entries make the map double (1,792 -> 3,584 here).
#[test]
fn a_refilled_map_keeps_its_size() {
    let mut map: HashMap<u64, u64, KeyedFold> = HashMap::with_hasher(KeyedFold::random());
    for key in 0..1_500 {
        make_room(&mut map);
        map.insert(key, key);
    }
    let full = map.capacity();
    assert_eq!(full, 1_792);
    for round in 1..10u64 {
        for key in 0..1_500 {
            map.remove(&((round - 1) * 1_500 + key));
            make_room(&mut map);
            map.insert(round * 1_500 + key, key);
        }
    }
    assert_eq!(map.len(), 1_500);
    assert!(map.capacity() <= full, "{} > {full}", map.capacity());
}

/// A leader whose spawn panics (no runtime) leaves no entry and gives its place back.
#[test]
fn a_panicking_start_gives_its_place_back() {
    let table = Arc::new(Table::new(Limits {
        ttl: Duration::from_secs(60),
        max_entries: 1,
        max_waiters: 8,
        max_replays: None,
        max_per_group: u32::MAX,
    }));
    let key = Fingerprint::from("k");
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        table.lead(key, Admission::new(), |_| -> FlightFuture {
            panic!("no runtime to spawn on")
        })
    }));
    assert!(panicked.is_err());
    assert_eq!(table.len(), 0);
    let future: Pin<Box<dyn Future<Output = FlightResult> + Send>> =
        Box::pin(async { Ok(Arc::new(()) as Value) });
    let (lead, _) = table
        .lead(key, Admission::new(), |_| future.shared())
        .expect("the place was given back");
    assert!(matches!(lead, Lead::Started(_)));
    assert_eq!(table.len(), 1);
}
