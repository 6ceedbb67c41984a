//! Fixed scenarios: the model's edge cases, spelled out.

use super::{End, Op::*, core};

#[test]
fn a_storm_over_the_waiter_cap_then_a_replay_then_expiry() {
    let stats = core(
        &[
            Request(0),
            Request(0),
            Request(0),
            Request(0),
            Request(0), // the fifth: over max_waiters
            Complete(0, End::Ok),
            Request(0), // replayed
            Advance(30_000),
            Request(0), // the replay expired: a new flight
            Complete(0, End::Ok),
        ],
        1_000,
    );
    assert_eq!(
        (stats.leader, stats.joined, stats.overloaded, stats.replayed),
        (2, 3, 1, 1)
    );
}

/// A replay ends at exactly `completion + ttl`, between two sweeps (the sweeper ticks
/// on whole seconds from the first lead, the replay expires half a second after one):
/// the request of that instant leads.
#[test]
fn a_replay_ends_at_exactly_its_ttl() {
    let stats = core(
        &[
            Request(0),
            Advance(500),
            Complete(0, End::Ok),
            Advance(29_999),
            Request(0), // the last replayed millisecond
            Advance(1),
            Request(0), // expired, not yet swept: leads
            Complete(0, End::Ok),
        ],
        1_000,
    );
    assert_eq!((stats.leader, stats.replayed), (2, 1));
}

#[test]
fn the_hard_cap_and_a_wait_timeout_of_the_same_instant() {
    // Caller 1 joins 10 s after the leader: its wait ends when the hard cap fires.
    let stats = core(
        &[Request(1), Advance(10_000), Request(1), Advance(10_000)],
        1_000,
    );
    assert_eq!(stats.leader, 1);
}

#[test]
fn a_dropped_leader_frees_its_waiter_slot() {
    let stats = core(
        &[
            Request(2),
            Request(2),
            Request(2),
            Request(2),
            Abort(0),
            Request(2), // admitted: the leader's slot is free
            Complete(0, End::Err),
            Request(2), // errors are not replayed: leads anew
            Complete(0, End::Panic),
        ],
        1_000,
    );
    assert_eq!((stats.leader, stats.joined, stats.overloaded), (2, 4, 0));
}

#[test]
fn the_entry_cap_with_expired_replays_not_yet_swept() {
    core(
        &[
            Request(0),
            Complete(0, End::Ok),
            Request(1),
            Complete(0, End::Ok),
            Advance(30_000), // both replays expire now; the sweeper has not run yet
            Request(2),      // led if the sweep of its shard found one, else overloaded
            Advance(1_000),
            Request(2),
        ],
        2,
    );
}

/// Invariant 1 of ARCHITECTURE.md ("one inner call per key per process at a time") does not
/// hold across `Handle::invalidate` of a running flight: the entry is removed, so the next
/// request leads a second inner call while the first still runs. That is what `invalidate`
/// documents (the next request reaches the inner service); the model allows it for
/// invalidated flights only.
#[test]
fn invalidating_a_running_flight_lets_the_next_request_lead_alongside_it() {
    let stats = core(
        &[
            Request(0),
            Invalidate(0),
            Request(0),
            Complete(0, End::Ok), // the invalidated flight: refuses its caller, not replayed
            Request(0),           // joins the second flight
            Complete(0, End::Ok),
            Request(0), // the second flight's replay
        ],
        1_000,
    );
    assert_eq!((stats.leader, stats.joined, stats.replayed), (2, 1, 1));
}
