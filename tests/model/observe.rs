//! The model's side: the harness that drives one layer and compares it with the model
//! after every operation.

use super::*;

impl<F: Front> Harness<F> {
    pub(super) fn new(front: F, registry: Registry, max_entries: usize) -> Self {
        Self {
            front,
            registry,
            max_entries,
            callers: Vec::new(),
            flights: Vec::new(),
            slots: [Slot::Vacant; VALID],
            counts: Counts::default(),
            trace: Vec::new(),
        }
    }

    pub(super) fn fail(&self, what: String) -> ! {
        panic!(
            "{what}\n  trace:\n    {}\n  model: {:?}\n  stats: {:?}",
            self.trace.join("\n    "),
            self.slots,
            self.front.handle().stats()
        );
    }

    pub(super) fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(what());
        }
    }

    pub(super) fn now() -> Instant {
        Instant::now()
    }

    /// Yields until nothing observable changes for a while: every runnable task has run.
    pub(super) async fn settle(&self) {
        let snapshot = || {
            let calls = self.registry.lock();
            let ended = calls.iter().filter(|c| c.ended).count();
            let finished = self
                .callers
                .iter()
                .filter(|c| c.handle.is_finished())
                .count();
            (self.front.handle().stats(), calls.len(), ended, finished)
        };
        let mut last = snapshot();
        let mut stable = 0;
        for _ in 0..100_000 {
            tokio::task::yield_now().await;
            let now = snapshot();
            if now == last {
                stable += 1;
                // More than the sweeper's yields in one sweep (one per shard), so that a sweep
                // in progress is never taken for idleness.
                if stable == 256 {
                    return;
                }
            } else {
                stable = 0;
                last = now;
            }
        }
        self.fail("the runtime never went idle".into());
    }

    /// Callers waiting on flight `f` now: their waiter slots are taken.
    pub(super) fn waiters(&self, f: usize) -> usize {
        self.callers
            .iter()
            .filter(|c| {
                !c.aborted
                    && c.result.is_none()
                    && matches!(c.plan, Plan::Wait { flight, .. } if flight == f)
            })
            .count()
    }

    /// When caller `c` is due to finish, and with what.
    pub(super) fn expected(&self, caller: &Caller) -> (Instant, Vec<Outcome>) {
        match &caller.plan {
            Plan::Now(outcome) => (caller.start, vec![outcome.clone()]),
            Plan::Wait { flight, deadline } => match &self.flights[*flight].resolution {
                Some((at, outcome, _)) if at < deadline => (*at, vec![outcome.clone()]),
                // The hard cap and the wait timer fire in the same instant: either wins.
                Some((at, outcome, true)) if at == deadline => {
                    (*at, vec![outcome.clone(), Outcome::Elapsed])
                }
                // Completions (not timers) at the deadline come after the wait timer fired.
                _ => (*deadline, vec![Outcome::Elapsed]),
            },
        }
    }

    pub(super) fn slot_is_live(&self, slot: Slot, now: Instant) -> bool {
        match slot {
            Slot::Vacant => false,
            Slot::Flight(_) => true,
            Slot::Replay { until, .. } => until > now,
        }
    }

    /// Compares the layer with the model after an operation has settled.
    pub(super) fn observe(&mut self) {
        let now = Self::now();
        let violations = self.registry.violations.lock().unwrap().clone();
        self.check(violations.is_empty(), || format!("{violations:?}"));

        // Callers: finished exactly when due, with an allowed result naming their token.
        for i in 0..self.callers.len() {
            let caller = &self.callers[i];
            if caller.result.is_some() {
                continue;
            }
            let finished = caller.handle.is_finished();
            if caller.aborted {
                self.check(finished, || format!("aborted caller {i} still runs"));
            } else {
                let (due, _) = self.expected(caller);
                self.check(finished == (due <= now), || {
                    format!(
                        "caller {i} (token {}, started {:?} ago, {:?}): finished {finished}, \
                         due {:?} from now",
                        caller.token,
                        now - caller.start,
                        caller.plan,
                        due.checked_duration_since(now)
                    )
                });
            }
            if !finished {
                continue;
            }
            let result = match (&mut self.callers[i].handle).now_or_never() {
                Some(Ok(outcome)) => outcome,
                Some(Err(error)) if error.is_cancelled() => Outcome::Cancelled,
                Some(Err(error)) => Outcome::Other(format!("caller task failed: {error}")),
                None => self.fail(format!("caller {i} finished without a result")),
            };
            let caller = &self.callers[i];
            if caller.aborted {
                self.check(result == Outcome::Cancelled, || {
                    format!("aborted caller {i} got {result:?}")
                });
            } else {
                if let Outcome::Ok(response) | Outcome::InnerErr(response) = &result {
                    let mine = format!("t{}#", caller.token);
                    self.check(
                        response.trim_start_matches("error ").starts_with(&mine),
                        || format!("caller {i} of token {} got {response:?}", caller.token),
                    );
                }
                let (_, allowed) = self.expected(caller);
                self.check(allowed.contains(&result), || {
                    format!(
                        "caller {i} ({:?}) got {result:?}, expected one of {allowed:?}",
                        caller.plan
                    )
                });
            }
            cover(match &result {
                Outcome::Ok(_) => "result: Ok",
                Outcome::InnerErr(_) => "result: InnerErr",
                Outcome::Panicked => "result: Panicked",
                Outcome::HardCap => "result: HardCap",
                Outcome::Elapsed => "result: Elapsed",
                Outcome::OverWaiters => "result: OverWaiters",
                Outcome::OverEntries => "result: OverEntries",
                Outcome::Rejected => "result: Rejected",
                Outcome::Revoked => "result: Revoked",
                Outcome::Cancelled => "result: Cancelled (aborted)",
                Outcome::Other(_) => "result: Other",
            });
            if !caller.aborted && self.expected(caller).1.len() > 1 {
                cover("hard cap and wait timeout in one instant");
            }
            self.callers[i].result = Some(result);
        }

        // Inner calls: exactly the model's, ended exactly when the model ended them.
        {
            let calls = self.registry.lock();
            self.check(calls.len() == self.flights.len(), || {
                format!(
                    "{} inner calls, the model has {}",
                    calls.len(),
                    self.flights.len()
                )
            });
            for (f, (call, flight)) in calls.iter().zip(&self.flights).enumerate() {
                self.check(call.ended == flight.resolution.is_some(), || {
                    format!(
                        "inner call {} ended: {}, model: {:?}",
                        f + 1,
                        call.ended,
                        flight.resolution
                    )
                });
            }
            // At most one inner call per token running, but for invalidated ones (whose
            // entry is gone: the next request leads anew, by design of `invalidate`).
            for t in 0..VALID {
                let running = self
                    .flights
                    .iter()
                    .filter(|f| f.token == t && f.resolution.is_none() && !f.invalidated)
                    .count();
                self.check(running <= 1, || {
                    format!("{running} inner calls of t{t} run")
                });
            }
        }

        // Entries: the flights and live replays, and expired replays not yet swept.
        let stats = self.front.handle().stats();
        let live = self
            .slots
            .iter()
            .filter(|slot| self.slot_is_live(**slot, now))
            .count() as u64;
        let mut unswept = 0;
        for slot in &mut self.slots {
            if let Slot::Replay { until, .. } = *slot
                && until <= now
            {
                if until + SWEEP <= now {
                    // The sweeper has run since it expired: it is gone.
                    *slot = Slot::Vacant;
                } else {
                    unswept += 1;
                }
            }
        }
        self.check((live..=live + unswept).contains(&stats.entries), || {
            format!(
                "{} entries; the model has {live} live and {unswept} unswept",
                stats.entries
            )
        });
        if stats.entries == live {
            for slot in &mut self.slots {
                if matches!(*slot, Slot::Replay { until, .. } if until <= now) {
                    *slot = Slot::Vacant;
                }
            }
        }
        let entries_ok = stats.entries <= self.max_entries as u64;
        self.check(entries_ok, || {
            format!("{} entries > max_entries", stats.entries)
        });

        // Counters: consistent with what the callers and the inner service saw.
        let results = |f: fn(&Outcome) -> bool| {
            self.callers
                .iter()
                .filter(|c| !c.aborted && c.result.as_ref().is_some_and(f))
                .count() as u64
        };
        let running = self
            .flights
            .iter()
            .filter(|f| f.resolution.is_none())
            .count() as u64;
        let expected = (
            self.counts.leader,
            self.counts.joined,
            self.counts.replayed,
            self.counts.overloaded,
            self.counts.rejected,
            results(|o| *o == Outcome::Elapsed),
            results(|o| matches!(o, Outcome::Panicked | Outcome::HardCap | Outcome::Revoked)),
            running,
        );
        let actual = (
            stats.leader,
            stats.joined,
            stats.replayed,
            stats.overloaded,
            stats.rejected,
            stats.timed_out,
            stats.leader_failed,
            stats.in_flight,
        );
        self.check(expected == actual, || {
            format!(
                "counters (leader, joined, replayed, overloaded, rejected, timed_out, \
                 leader_failed, in_flight): layer {actual:?}, model {expected:?}"
            )
        });
        self.check(stats.leader == self.flights.len() as u64, || {
            "leaders != inner calls".into()
        });
    }
}
