//! Model checks of the table with loom: every interleaving (up to `LOOM_MAX_PREEMPTIONS`
//! preemptions) of a few threads calling it. A flight's task is a thread that completes or
//! drops its [`FlightGuard`]; nothing is polled, so no runtime is needed.
//!
//! `RUSTFLAGS="--cfg refresh_coalesce_loom" LOOM_MAX_PREEMPTIONS=2
//! CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_ -- --nocapture`

use super::*;
use crate::{error::Limit, key::Admission};
use futures_util::FutureExt;
use loom::thread;

const TTL: Duration = Duration::from_secs(60);

/// Runs `body` under loom and reports how many interleavings it explored.
fn model(name: &str, body: impl Fn() + Send + Sync + 'static) {
    let iterations = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = iterations.clone();
    let start = std::time::Instant::now();
    loom::model(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        body();
    });
    eprintln!(
        "{name}: {} iterations in {:.2?}",
        iterations.load(std::sync::atomic::Ordering::Relaxed),
        start.elapsed()
    );
}

fn table(max_waiters: usize) -> Arc<Table> {
    Arc::new(Table::new(Limits {
        ttl: TTL,
        max_entries: 64,
        max_waiters,
        max_replays: None,
        max_per_group: u32::MAX,
    }))
}

/// Key `n` in shard `shard` (the last byte picks the shard).
fn key(n: u8, shard: u8) -> Fingerprint {
    // Byte 15 is the last byte of the slot key, which picks the shard.
    let mut bytes = [n; 32];
    bytes[15] = shard;
    Fingerprint::from_bytes(bytes)
}

fn value(n: u64) -> Value {
    Arc::new(n)
}

fn read(value: &Value) -> u64 {
    *value.downcast_ref::<u64>().expect("a u64 value")
}

/// A flight future that is already resolved (never polled under loom).
fn resolved(n: u64) -> FlightFuture {
    let future: Pin<Box<dyn Future<Output = FlightResult> + Send>> =
        Box::pin(async move { Ok(value(n)) });
    future.shared()
}

/// What one request got.
enum Got {
    Led(Waiter, FlightGuard),
    Joined(Waiter),
    Replayed(Value),
    Refused(Refused),
}

/// One request as `future::begin` makes it: find, then lead if the key was vacant. The
/// leader gets the guard its task would hold.
fn request(table: &Arc<Table>, key: Fingerprint, admission: Admission) -> Got {
    let found = match table.find(&key) {
        Ok(Found::Vacant) => match table.lead(key, admission, resolved) {
            Ok((Lead::Started(waiter), _)) => {
                let guard = FlightGuard::new(table.clone(), key, waiter.id);
                return Got::Led(waiter, guard);
            }
            Ok((Lead::Found(found), _)) => Ok(found),
            Err(error) => Err(error),
        },
        other => other,
    };
    match found {
        Ok(Found::Replay(value)) => Got::Replayed(value),
        Ok(Found::Join(waiter)) => Got::Joined(waiter),
        Ok(Found::Vacant) => unreachable!("lead never reports a vacant key"),
        Err(error) => Got::Refused(error),
    }
}

/// What any thread may see at any time: at most `flights` running, `entries` stored.
fn observe(table: &Table, flights: u64, entries: u64) {
    let stats = table.gauges();
    assert!(stats.in_flight <= flights, "{} in flight", stats.in_flight);
    assert!(stats.entries <= entries, "{} entries", stats.entries);
}

fn in_flight(table: &Table) -> u64 {
    table.gauges().in_flight
}

/// No entry, no flight, and the counts agree.
fn assert_empty(table: &Table) {
    assert_eq!(table.len(), 0);
    assert_eq!(in_flight(table), 0);
    table.check_consistency();
}

/// 1. Two requests lead one key: one starts the flight, the other joins it; a late
///    arrival finds nothing, the flight or its replay, and the replay stays.
#[test]
fn loom_leader_joiner_late_arrival() {
    model("loom_leader_joiner_late_arrival", || {
        let table = table(8);
        let k = key(1, 5);
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let table = table.clone();
                thread::spawn(move || {
                    let got = request(&table, k, Admission::new());
                    observe(&table, 1, 1);
                    got
                })
            })
            .collect();
        let late = {
            let table = table.clone();
            thread::spawn(move || {
                let seen = match table.find(&k) {
                    Ok(Found::Vacant) => None,
                    Ok(Found::Join(waiter)) => Some(Err(waiter.id)),
                    Ok(Found::Replay(value)) => Some(Ok(read(&value))),
                    Err(error) => panic!("late arrival refused: {error:?}"),
                };
                observe(&table, 1, 1);
                seen
            })
        };
        let (mut leader, mut joiner) = (None, None);
        for racer in racers {
            match racer.join().unwrap() {
                Got::Led(waiter, guard) => {
                    assert!(leader.replace((waiter, guard)).is_none(), "two leaders")
                }
                Got::Joined(waiter) => joiner = Some(waiter),
                Got::Replayed(v) => {
                    panic!("replay of {} before the flight completed", read(&v))
                }
                Got::Refused(error) => panic!("refused: {error:?}"),
            }
        }
        let (waiter, guard) = leader.expect("one leader");
        let joiner = joiner.expect("one joiner");
        assert_eq!(
            joiner.id, waiter.id,
            "the joiner joined the leader's flight"
        );
        // The task completes while the late arrival may still be looking.
        guard.complete(&value(42), Some(TTL));
        match late.join().unwrap() {
            None => {}
            Some(Err(id)) => assert_eq!(id, waiter.id),
            Some(Ok(replayed)) => assert_eq!(replayed, 42),
        }
        assert_eq!(table.len(), 1);
        assert_eq!(in_flight(&table), 0);
        assert!(matches!(table.find(&k), Ok(Found::Replay(v)) if read(&v) == 42));
        table.check_consistency();
    });
}

/// 1b. The flight's task is spawned under the shard lock and may finish before `lead`
///     returns: nobody ever sees more flights than run (the count never wraps below 0).
#[test]
fn loom_task_finishes_while_leader_holds_the_lock() {
    model("loom_task_finishes_while_leader_holds_the_lock", || {
        let table = table(8);
        let k = key(1, 5);
        let observer = {
            let table = table.clone();
            thread::spawn(move || observe(&table, 1, 1))
        };
        let mut task = None;
        let (lead, _) = table
            .lead(k, Admission::new(), |id| {
                let guard = FlightGuard::new(table.clone(), k, id);
                task = Some(thread::spawn(move || {
                    guard.complete(&value(id), Some(TTL));
                }));
                resolved(id)
            })
            .unwrap();
        let Lead::Started(waiter) = lead else {
            panic!("the key was vacant")
        };
        observe(&table, 1, 1);
        task.unwrap().join().unwrap();
        observer.join().unwrap();
        assert_eq!(in_flight(&table), 0);
        assert_eq!(table.len(), 1);
        assert!(matches!(table.find(&k), Ok(Found::Replay(v)) if read(&v) == waiter.id));
        table.check_consistency();
    });
}

/// 2. A flight completes while its key is invalidated: once invalidated, the key never
///    holds the flight's replay; nothing is counted twice.
#[test]
fn loom_completion_races_invalidation() {
    for (name, replay) in [
        ("loom_completion_races_invalidation (replay)", Some(TTL)),
        ("loom_completion_races_invalidation (no replay)", None),
    ] {
        model(name, move || {
            let table = table(8);
            let (k, group) = (key(1, 5), key(0xEE, 3));
            let Got::Led(waiter, guard) = request(&table, k, Admission::new().group(group)) else {
                panic!("the key was vacant")
            };
            let task = thread::spawn(move || guard.complete(&value(7), replay));
            let invalidator = {
                let table = table.clone();
                thread::spawn(move || {
                    // Without a replay, the completion may remove the entry first.
                    let removed = table.invalidate(&k);
                    assert!(removed || replay.is_none());
                    assert!(matches!(table.find(&k), Ok(Found::Vacant)));
                    observe(&table, 1, 1);
                    removed
                })
            };
            let own = task.join().unwrap();
            let removed = invalidator.join().unwrap();
            // A flight that found its entry gone was removed by the invalidation (and
            // refuses its callers); one that completed first kept its entry.
            assert!(
                own || removed,
                "only an invalidation takes a flight's entry"
            );
            assert!(matches!(table.find(&k), Ok(Found::Vacant)));
            assert_empty(&table);
            drop(waiter);
        });
    }
}

/// 3. The task of an invalidated flight ends without completing (panic, hard cap) while
///    a new request leads the key: the old guard never removes the new flight.
#[test]
fn loom_dropped_guard_races_new_lead() {
    for (name, invalidate) in [
        ("loom_dropped_guard_races_new_lead (invalidated)", true),
        ("loom_dropped_guard_races_new_lead (not invalidated)", false),
    ] {
        model(name, move || {
            let table = table(8);
            let (k, group) = (key(1, 5), key(0xEE, 3));
            let admission = Admission::new().group(group);
            let Got::Led(old, old_guard) = request(&table, k, admission.clone()) else {
                panic!("the key was vacant")
            };
            if invalidate {
                assert!(table.invalidate(&k));
            }
            let task = thread::spawn(move || drop(old_guard));
            let newcomer = {
                let table = table.clone();
                thread::spawn(move || {
                    let got = request(&table, k, admission);
                    observe(&table, 2, 1);
                    got
                })
            };
            task.join().unwrap();
            let new = match newcomer.join().unwrap() {
                Got::Led(new, guard) => Some((new, guard)),
                Got::Joined(waiter) if !invalidate => {
                    assert_eq!(waiter.id, old.id);
                    None
                }
                _ => panic!("the newcomer neither led nor joined the old flight"),
            };
            assert_eq!(in_flight(&table), u64::from(new.is_some()));
            table.check_consistency();
            match new {
                Some((new, guard)) => {
                    assert_ne!(new.id, old.id);
                    // The old guard left the new flight alone.
                    assert!(matches!(table.find(&k), Ok(Found::Join(w)) if w.id == new.id));
                    assert_eq!(table.len(), 1);
                    guard.complete(&value(2), Some(TTL));
                    assert!(matches!(table.find(&k), Ok(Found::Replay(v)) if read(&v) == 2));
                }
                None => assert!(matches!(table.find(&k), Ok(Found::Vacant))),
            }
            assert_eq!(in_flight(&table), 0);
            table.check_consistency();
        });
    }
}

/// 4. A group is invalidated while a request leads a new key into it and a member's
///    flight completes: no deadlock, and at quiescence the group counts count exactly
///    the grouped entries.
#[test]
fn loom_invalidate_group_races_lead_and_completion() {
    for (name, replay, same_shard) in [
        (
            "loom_invalidate_group_races_lead_and_completion (replay, one shard)",
            Some(TTL),
            true,
        ),
        (
            "loom_invalidate_group_races_lead_and_completion (no replay, one shard)",
            None,
            true,
        ),
        (
            "loom_invalidate_group_races_lead_and_completion (replay, two shards)",
            Some(TTL),
            false,
        ),
    ] {
        model(name, move || {
            let table = table(8);
            let group = key(0xEE, 3);
            let (a, b) = (key(1, 5), key(2, if same_shard { 5 } else { 6 }));
            let Got::Led(a_waiter, a_guard) = request(&table, a, Admission::new().group(group))
            else {
                panic!("a was vacant")
            };
            let invalidator = {
                let table = table.clone();
                thread::spawn(move || table.invalidate_group(&group))
            };
            let newcomer = {
                let table = table.clone();
                thread::spawn(move || {
                    let got = request(&table, b, Admission::new().group(group));
                    observe(&table, 2, 2);
                    got
                })
            };
            let task = thread::spawn(move || a_guard.complete(&value(1), replay));
            let removed = invalidator.join().unwrap();
            let Got::Led(_b_waiter, b_guard) = newcomer.join().unwrap() else {
                panic!("b was vacant")
            };
            task.join().unwrap();
            // a was a member before the invalidation started: it is gone either way.
            assert!(matches!(table.find(&a), Ok(Found::Vacant)));
            let b_alive = matches!(table.find(&b), Ok(Found::Join(_)));
            let a_removed = removed
                .checked_sub(usize::from(!b_alive))
                .expect("b was removed by the invalidation, and counted");
            match replay {
                Some(_) => assert_eq!(a_removed, 1, "a's replay was invalidated"),
                None => assert!(a_removed <= 1),
            }
            assert_eq!(table.len(), usize::from(b_alive));
            assert_eq!(in_flight(&table), 1);
            table.check_consistency();
            drop(b_guard);
            assert_empty(&table);
            drop(a_waiter);
        });
    }
}

/// 4b. Leaders of keys in two shards race for the table's last place: exactly one
///     leads, the other is turned away, and `len` never exceeds `max_entries`.
#[test]
fn loom_leaders_race_for_the_last_place() {
    model("loom_leaders_race_for_the_last_place", || {
        let table = Arc::new(Table::new(Limits {
            ttl: TTL,
            max_entries: 1,
            max_waiters: 8,
            max_replays: None,
            max_per_group: u32::MAX,
        }));
        let leaders: Vec<_> = [key(1, 5), key(2, 6)]
            .into_iter()
            .map(|k| {
                let table = table.clone();
                thread::spawn(move || {
                    let got = request(&table, k, Admission::new());
                    observe(&table, 1, 1);
                    got
                })
            })
            .collect();
        let mut got: Vec<_> = leaders.into_iter().map(|l| l.join().unwrap()).collect();
        got.sort_by_key(|got| matches!(got, Got::Refused(_)));
        let [Got::Led(..), Got::Refused(error)] = &got[..] else {
            panic!("not exactly one leader")
        };
        assert_eq!(*error, Refused::Full(Limit::Entries));
        assert_eq!(table.len(), 1);
        table.check_consistency();
    });
}

/// A joiner of `k`'s running flight: its place, or the limit that turned it away.
fn join(table: &Table, k: &Fingerprint) -> Result<Waiter, Limit> {
    match table.find(k) {
        Ok(Found::Join(waiter)) => Ok(waiter),
        Err(Refused::Full(limit)) => Err(limit),
        Err(Refused::Expired) => panic!("no entry expires here"),
        Ok(_) => panic!("the flight is running"),
    }
}

/// How many more callers `k`'s flight admits (counted by joining until turned away).
fn places_left(table: &Table, k: &Fingerprint) -> usize {
    let mut held = Vec::new();
    loop {
        match join(table, k) {
            Ok(waiter) => held.push(waiter),
            Err(limit) => {
                assert_eq!(limit, Limit::Waiters);
                return held.len();
            }
        }
    }
}

/// 5. Two joiners race for the last waiter slot (the leader holds one of two): exactly
///    one is admitted; its slot is freed when it goes.
#[test]
fn loom_joiners_race_for_the_last_waiter_slot() {
    model("loom_joiners_race_for_the_last_waiter_slot", || {
        let table = table(2);
        let k = key(1, 5);
        let Got::Led(leader, guard) = request(&table, k, Admission::new()) else {
            panic!("the key was vacant")
        };
        let joiners: Vec<_> = (0..2)
            .map(|_| {
                let table = table.clone();
                thread::spawn(move || join(&table, &k))
            })
            .collect();
        let mut results: Vec<_> = joiners.into_iter().map(|j| j.join().unwrap()).collect();
        results.sort_by_key(|result| result.is_err());
        let [Ok(admitted), Err(Limit::Waiters)] = &results[..] else {
            panic!("not exactly one joiner admitted")
        };
        assert_eq!(admitted.id, leader.id);
        assert_eq!(places_left(&table, &k), 0);
        drop(results);
        // The admitted joiner's place is back.
        assert_eq!(places_left(&table, &k), 1);
        guard.complete(&value(5), Some(TTL));
        table.check_consistency();
    });
}

/// 5b. A joiner gives up (its wait timed out) while another arrives at the full flight:
///     the newcomer gets the freed place or is turned away, and no place is lost.
#[test]
fn loom_joiner_times_out_while_another_arrives() {
    model("loom_joiner_times_out_while_another_arrives", || {
        let table = table(2);
        let k = key(1, 5);
        let Got::Led(_leader, guard) = request(&table, k, Admission::new()) else {
            panic!("the key was vacant")
        };
        let first = join(&table, &k).expect("the second place is free");
        let timed_out = thread::spawn(move || drop(first));
        let newcomer = {
            let table = table.clone();
            thread::spawn(move || join(&table, &k))
        };
        timed_out.join().unwrap();
        let newcomer = newcomer.join().unwrap();
        let expected = usize::from(newcomer.is_err());
        assert_eq!(places_left(&table, &k), expected);
        drop(newcomer);
        assert_eq!(places_left(&table, &k), 1);
        drop(guard);
        table.check_consistency();
    });
}

impl Table {
    /// Asserts the table's invariants at quiescence: `len` counts the entries, no more
    /// entries are flights than flights run, and the group counts count exactly the grouped
    /// entries.
    pub(crate) fn check_consistency(&self) {
        let (mut entries, mut flights) = (0, 0);
        let mut grouped: HashMap<u64, u32> = HashMap::new();
        for shard in self.shards.iter() {
            let shard = lock(&shard.map);
            entries += shard.len();
            for entry in shard.values() {
                flights += usize::from(matches!(entry.state, State::Flight(_)));
                let names = entry
                    .cold
                    .as_ref()
                    .map_or([None, None], |c| [c.group, c.tag]);
                for name in names.iter().flatten() {
                    *grouped.entry(self.group_counts(name).1).or_default() += 1;
                }
            }
        }
        assert_eq!(self.len(), entries, "len counts the entries");
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        assert!(
            in_flight >= flights,
            "{flights} flight entries, {in_flight} in flight"
        );
        let mut counted: HashMap<u64, u32> = HashMap::new();
        for counts in self.groups.iter() {
            for (tag, count) in lock(counts).iter() {
                assert!(*count > 0, "a group without entries is removed");
                counted.insert(*tag, *count);
            }
        }
        assert_eq!(
            grouped, counted,
            "the group counts count exactly the grouped entries"
        );
    }
}
