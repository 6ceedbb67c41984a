//! The operations, applied to the layer and to the model: requests, dropped callers,
//! completions, the clock, invalidations.

use super::*;

impl<F: Front> Harness<F> {
    pub(super) async fn request(&mut self, token: usize) {
        let now = Self::now();
        let index = self.callers.len();
        let expect = if !self.front.valid(token) {
            self.counts.rejected += 1;
            Expect::Answer(Plan::Now(Outcome::Rejected))
        } else {
            match self.slots[token] {
                Slot::Replay { flight, until } if until > now => {
                    self.counts.replayed += 1;
                    Expect::Answer(Plan::Now(Outcome::Ok(name(&self.flights, flight))))
                }
                Slot::Flight(flight) if self.waiters(flight) >= MAX_WAITERS => {
                    self.counts.overloaded += 1;
                    Expect::Answer(Plan::Now(Outcome::OverWaiters))
                }
                Slot::Flight(flight) => {
                    self.counts.joined += 1;
                    Expect::Answer(Plan::Wait {
                        flight,
                        deadline: now + WAIT,
                    })
                }
                _ => {
                    // An expired replay of this key is removed by the lookup.
                    self.slots[token] = Slot::Vacant;
                    let others = (0..VALID).filter(|t| *t != token);
                    let live = others
                        .clone()
                        .filter(|t| self.slot_is_live(self.slots[*t], now))
                        .count();
                    let expired = others
                        .filter(|t| matches!(self.slots[*t], Slot::Replay { until, .. } if until <= now))
                        .count();
                    if live + 1 > self.max_entries {
                        self.counts.overloaded += 1;
                        Expect::Answer(Plan::Now(Outcome::OverEntries))
                    } else if live + expired < self.max_entries {
                        Expect::Lead
                    } else {
                        Expect::LeadOrFull
                    }
                }
            }
        };
        self.trace
            .push(format!("{:?} caller {index} t{token}: {expect:?}", now));
        let before = self.registry.lock().len();
        let handle = self.front.spawn(token, index);
        self.callers.push(Caller {
            token,
            start: now,
            plan: Plan::Now(Outcome::Other("undecided".into())),
            handle,
            aborted: false,
            result: None,
        });
        self.settle().await;
        let new: Vec<(usize, usize, Instant)> = self.registry.lock()[before..]
            .iter()
            .map(|c| (c.token, c.caller, c.started))
            .collect();
        let led = match (&expect, &new[..]) {
            (Expect::Lead | Expect::LeadOrFull, [(t, c, at)]) => {
                self.check((*t, *c, *at) == (token, index, now), || {
                    format!("the inner call {new:?} is not caller {index}'s request for t{token}")
                });
                true
            }
            (Expect::LeadOrFull, []) => false,
            (Expect::Answer(plan), []) => {
                cover(match plan {
                    Plan::Wait { .. } => "request: joined",
                    Plan::Now(Outcome::Ok(_)) => "request: replayed",
                    Plan::Now(Outcome::OverWaiters) => "request: over max_waiters",
                    Plan::Now(Outcome::OverEntries) => "request: over max_entries",
                    Plan::Now(_) => "request: rejected",
                });
                false
            }
            _ => self.fail(format!(
                "caller {index} for t{token} ({expect:?}) made inner calls {new:?}"
            )),
        };
        cover(match (&expect, led) {
            (Expect::Lead, _) => "request: led",
            (Expect::LeadOrFull, true) => "request: led past expired replays",
            (Expect::LeadOrFull, false) => "request: full of expired replays",
            _ => "request: answered",
        });
        let plan = if led {
            // One inner call per token at a time, one per TTL window.
            if let Some(other) = self
                .flights
                .iter()
                .position(|f| f.token == token && f.resolution.is_none() && !f.invalidated)
            {
                self.fail(format!(
                    "a second inner call for t{token} while {} runs",
                    other + 1
                ));
            }
            self.counts.leader += 1;
            self.flights.push(Flight {
                token,
                start: now,
                invalidated: false,
                resolution: None,
            });
            let flight = self.flights.len() - 1;
            self.slots[token] = Slot::Flight(flight);
            Plan::Wait {
                flight,
                deadline: now + WAIT,
            }
        } else {
            match expect {
                Expect::Answer(plan) => plan,
                _ => {
                    self.counts.overloaded += 1;
                    Plan::Now(Outcome::OverEntries)
                }
            }
        };
        self.callers[index].plan = plan;
        self.observe();
    }

    pub(super) async fn drop_caller(&mut self, i: usize) {
        if self.callers.is_empty() {
            return;
        }
        let i = i % self.callers.len();
        self.trace
            .push(format!("{:?} drop caller {i}", Self::now()));
        let caller = &mut self.callers[i];
        if caller.result.is_none() && !caller.aborted {
            caller.aborted = true;
            caller.handle.abort();
        }
        self.settle().await;
        self.observe();
    }

    pub(super) fn resolve(&mut self, f: usize, outcome: Outcome, by_timer: bool) {
        let now = Self::now();
        let token = self.flights[f].token;
        // A result (a response or the inner service's error) of a flight invalidated while it
        // ran is revoked for every caller; a panic or the hard cap stays what it was.
        let outcome = match outcome {
            Outcome::Ok(_) | Outcome::InnerErr(_) if self.flights[f].invalidated => {
                Outcome::Revoked
            }
            outcome => outcome,
        };
        let replay = matches!(outcome, Outcome::Ok(_));
        self.flights[f].resolution = Some((now, outcome, by_timer));
        if self.slots[token] == Slot::Flight(f) {
            self.slots[token] = if replay {
                Slot::Replay {
                    flight: f,
                    until: now + TTL,
                }
            } else {
                Slot::Vacant
            };
        }
    }

    pub(super) async fn complete(&mut self, i: usize, end: End) {
        let running: Vec<usize> = (0..self.flights.len())
            .filter(|f| self.flights[*f].resolution.is_none())
            .collect();
        if running.is_empty() {
            return;
        }
        let f = running[i % running.len()];
        self.trace
            .push(format!("{:?} complete call {} {end:?}", Self::now(), f + 1));
        cover(match end {
            End::Ok => "inner call: Ok",
            End::Err => "inner call: Err",
            End::Panic => "inner call: panic",
        });
        self.registry.release(f, end);
        let call = name(&self.flights, f);
        self.resolve(
            f,
            match end {
                End::Ok => Outcome::Ok(call),
                End::Err => Outcome::InnerErr(format!("error {call}")),
                End::Panic => Outcome::Panicked,
            },
            false,
        );
        self.settle().await;
        self.observe();
    }

    /// Advances the clock to `now + ms`, stopping at every instant the model expects a timer
    /// to fire (wait timeouts, hard caps, replay expiries and the sweep after them), so
    /// that timers fire in their order.
    pub(super) async fn advance(&mut self, ms: u64) {
        let start = Self::now();
        let target = start + Duration::from_millis(ms);
        self.trace.push(format!("{start:?} advance {ms} ms"));
        loop {
            let now = Self::now();
            let next = self
                .next_timer(now)
                .filter(|t| *t <= target)
                .unwrap_or(target);
            if next > now {
                tokio::time::advance(next - now).await;
            }
            self.settle().await;
            let now = Self::now();
            self.check(now == next, || {
                format!("the clock is at {now:?}, not {next:?}")
            });
            for f in 0..self.flights.len() {
                let flight = &self.flights[f];
                if flight.resolution.is_none() && flight.start + HARD_CAP <= now {
                    cover("inner call: hard cap");
                    self.resolve(f, Outcome::HardCap, true);
                }
            }
            self.observe();
            if now >= target {
                return;
            }
        }
    }

    /// The next instant after `now` at which the model expects a timer to fire.
    pub(super) fn next_timer(&self, now: Instant) -> Option<Instant> {
        let mut times: Vec<Instant> = Vec::new();
        for caller in &self.callers {
            if let Plan::Wait { deadline, .. } = caller.plan
                && caller.result.is_none()
                && !caller.aborted
            {
                times.push(deadline);
            }
        }
        for flight in &self.flights {
            if flight.resolution.is_none() {
                times.push(flight.start + HARD_CAP);
            }
        }
        for slot in &self.slots {
            if let Slot::Replay { until, .. } = slot {
                times.push(*until);
                times.push(*until + SWEEP);
            }
        }
        times.into_iter().filter(|t| *t > now).min()
    }

    pub(super) async fn tick(&mut self) {
        let now = Self::now();
        let next = self
            .next_timer(now)
            .unwrap_or(now + Duration::from_millis(1));
        self.advance((next - now).as_millis() as u64).await;
    }

    pub(super) async fn invalidate(&mut self, token: usize) {
        let now = Self::now();
        let expected = match self.slots[token] {
            Slot::Vacant => Some(false),
            Slot::Flight(f) => {
                self.flights[f].invalidated = true;
                Some(true)
            }
            Slot::Replay { until, .. } if until > now => Some(true),
            // Expired: removed if the sweeper has not been there yet.
            Slot::Replay { .. } => None,
        };
        self.trace
            .push(format!("{now:?} invalidate t{token}: {expected:?}"));
        self.slots[token] = Slot::Vacant;
        let removed = self.front.invalidate(token);
        cover(
            match (
                self.flights
                    .iter()
                    .any(|f| f.token == token && f.invalidated && f.resolution.is_none()),
                removed,
            ) {
                (true, true) => "invalidate: a running flight",
                (_, true) => "invalidate: a replay",
                (_, false) => "invalidate: nothing",
            },
        );
        self.check(expected.is_none_or(|e| e == removed), || {
            format!("invalidate(t{token}) returned {removed}, expected {expected:?}")
        });
        self.settle().await;
        self.observe();
    }

    pub(super) async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Request(token) => self.request(token % self.front.kinds()).await,
            Op::Abort(i) => self.drop_caller(i).await,
            Op::Complete(i, end) => self.complete(i, end).await,
            Op::Advance(ms) => self.advance(ms).await,
            Op::Tick => self.tick().await,
            Op::Invalidate(token) => self.invalidate(token % VALID).await,
        }
    }

    /// Releases every inner call, lets every timer fire, and checks that nothing is left.
    pub(super) async fn quiesce(&mut self) {
        self.trace.push("quiesce".into());
        while self.flights.iter().any(|f| f.resolution.is_none()) {
            self.complete(0, End::Ok).await;
        }
        let long = HARD_CAP + TTL + 2 * SWEEP;
        self.advance(long.as_millis() as u64).await;
        for (i, caller) in self.callers.iter().enumerate() {
            self.check(caller.result.is_some(), || {
                format!("caller {i} never finished")
            });
        }
        let stats = self.front.handle().stats();
        self.check((stats.entries, stats.in_flight) == (0, 0), || {
            format!("not empty at quiescence: {stats:?}")
        });
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        self.check(tasks == 0, || format!("{tasks} tasks left at quiescence"));
    }
}
