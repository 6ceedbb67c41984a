//! The [`Store`] protocol on Redis: load, elect, complete, wait, invalidate.

use std::time::Duration;

use redis::AsyncCommands;
use tokio::time::Instant;

use super::{Inner, KIND_FLIGHT, KIND_REPLAY, Opened, Read, RedisStore, scripts::REVOKED, unix_ms};
use crate::store::seal::Bound;
use crate::{
    key::Fingerprint,
    store::{
        Completed, Election, Fence, Generations, Keep, Listener, Store, StoreError, StoreFuture,
        Stored, Waited,
    },
};

impl Store for RedisStore {
    fn load<'a>(
        &'a self,
        key: &'a Fingerprint,
        seal: &'a [u8; 32],
        group: Option<&'a Fingerprint>,
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let found: Option<(Vec<u8>, i64, u64)> = inner
                .run(
                    inner
                        .scripts
                        .load
                        .key(inner.names.key(key, "res"))
                        .key(inner.names.key(key, "gen"))
                        .invoke_async(&mut connection),
                )
                .await?;
            let Some((value, pttl, key_generation)) = found else {
                return Ok(None);
            };
            // Read after the value: a group invalidation that came before this read is seen.
            let group_generation = match group {
                Some(group) => Some(inner.current_group_generation(group).await?),
                None => None,
            };
            let read = Read {
                value,
                pttl,
                key_generation,
                group_generation,
            };
            Ok(match inner.open(key, seal, KIND_REPLAY, read) {
                Opened::Live(stored) => Some(stored),
                Opened::Revoked | Opened::Nothing => None,
            })
        })
    }

    fn group_generation<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            inner
                .run(
                    inner
                        .scripts
                        .generation
                        .key(inner.names.key(group, "gen"))
                        .arg(life.as_millis().max(1) as u64)
                        .invoke_async(&mut connection),
                )
                .await
        })
    }

    fn elect<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        lease: Duration,
    ) -> StoreFuture<'a, Election> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let result: (i64, Option<String>, u64) = inner
                .run(
                    inner
                        .scripts
                        .elect
                        .key(inner.names.key(key, "lock"))
                        .key(inner.names.key(key, "gen"))
                        .key(inner.names.key(key, "res"))
                        .arg(fence.as_str())
                        .arg(lease.as_millis() as u64)
                        .invoke_async(&mut connection),
                )
                .await?;
            Ok(match result {
                (1, _, generation) => Election::Won { generation },
                (2, _, _) => Election::Replay,
                (_, holder, generation) => Election::Lost {
                    leader: Fence::from_string(holder.unwrap_or_default()),
                    generation,
                },
            })
        })
    }

    fn replicate<'a>(&'a self, key: &'a Fingerprint) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let inner = &*self.inner;
            if inner.min_replicas == 0 {
                return Ok(true);
            }
            let acknowledged = inner.acknowledged(&inner.names.key(key, "lock")).await?;
            Ok(acknowledged >= inner.min_replicas)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        seal: &'a [u8; 32],
        value: Vec<u8>,
        keep: Keep,
        started: &'a Generations,
    ) -> StoreFuture<'a, Completed> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let channel = inner.names.key(key, "done");
            let (ttl, kind) = match keep {
                Keep::Replay { ttl } => (ttl, KIND_REPLAY),
                Keep::Flight { ttl } => (ttl, KIND_FLIGHT),
            };
            let ttl_ms = ttl.as_millis().max(1) as u64;
            let bound = Bound {
                expires_ms: unix_ms() + ttl_ms,
                key_generation: started.key,
                group_generation: started.group.map_or(0, |(_, generation)| generation),
            };
            let sealed = inner.sealer.seal(key, seal, kind, bound, &value);
            if kind == KIND_FLIGHT {
                let done: i64 = inner
                    .run(
                        inner
                            .scripts
                            .complete_flight
                            .key(inner.names.outcome(key, fence))
                            .key(inner.names.key(key, "lock"))
                            .key(inner.names.key(key, "gen"))
                            .arg(sealed)
                            .arg(ttl_ms)
                            .arg(&channel)
                            .arg(fence.as_str())
                            .arg(started.key)
                            .invoke_async(&mut connection),
                    )
                    .await?;
                return Ok(if done == 2 {
                    Completed::Revoked
                } else {
                    Completed::Stored
                });
            }
            let mut script_connection = connection.clone();
            let mut invocation = inner
                .scripts
                .complete_replay
                .key(inner.names.key(key, "res"));
            invocation
                .key(inner.names.key(key, "gen"))
                .key(inner.names.outcome(key, fence))
                .key(inner.names.key(key, "lock"))
                .arg(&sealed)
                .arg(ttl_ms)
                .arg(&channel)
                .arg(fence.as_str())
                .arg(started.key);
            let store =
                inner.run(invocation.invoke_async::<(i64, Vec<u8>, i64)>(&mut script_connection));
            // The group's member set lives in another slot than the result, so it is a
            // separate command, not part of the script; it is sent alongside, on the same
            // multiplexed connection, and costs no extra round trip.
            let remember = async {
                let Some((group, _)) = &started.group else {
                    return Ok(());
                };
                let members = inner.names.key(group, "members");
                let mut pipe = redis::pipe();
                pipe.sadd(&members, key.to_hex()).ignore();
                pipe.pexpire(&members, ttl_ms as i64).ignore();
                inner.run(pipe.query_async::<()>(&mut connection)).await
            };
            let (stored, remembered) = futures_util::future::join(store, remember).await;
            remembered?;
            let (done, existing, pttl) = stored?;
            if done == 2 {
                return Ok(Completed::Revoked);
            }
            // The group's generation is read again only now, after the member was added.
            // `invalidate_group` bumps the generation, then reads the members, then deletes
            // their replays. If its bump comes before this read, the read sees it and the
            // replay is withdrawn here. If it comes after, its member read comes after the
            // SADD above, so it deletes the replay itself. Either way the replay is gone once
            // the invalidation completes, and anyone opening it after the bump refuses it,
            // as its sealed group generation is no longer current.
            let group_generation = inner.group_generation_of(started).await?;
            let moved = started
                .group
                .zip(group_generation)
                .is_some_and(|((_, at_start), now)| at_start != now);
            if done == 0 {
                if moved {
                    inner.withdraw(key, fence, &sealed, ttl).await?;
                    return Ok(Completed::Revoked);
                }
                return Ok(Completed::Stored);
            }
            let read = Read {
                value: existing,
                pttl,
                key_generation: started.key,
                group_generation,
            };
            Ok(match inner.open(key, seal, KIND_REPLAY, read) {
                Opened::Live(stored) => Completed::Existing(stored),
                Opened::Revoked => {
                    inner.withdraw(key, fence, &sealed, ttl).await?;
                    Completed::Revoked
                }
                // Another token's replay (a key collision): nothing opens it, so this
                // flight's callers keep their own result.
                Opened::Nothing => Completed::Stored,
            })
        })
    }

    fn release<'a>(&'a self, key: &'a Fingerprint, fence: &'a Fence) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            inner
                .run(
                    inner
                        .scripts
                        .release
                        .key(inner.names.key(key, "lock"))
                        .arg(fence.as_str())
                        .invoke_async::<i64>(&mut connection),
                )
                .await?;
            Ok(())
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a Fingerprint,
        leader: &'a Fence,
        seal: &'a [u8; 32],
        started: &'a Generations,
        deadline: Instant,
    ) -> StoreFuture<'a, Waited> {
        Box::pin(async move {
            let inner = &self.inner;
            let notify = inner.waiter(key).await;
            let result = loop {
                // Register for the wake-up before reading the keys: a completion between the
                // read and the wait still wakes us.
                let woken = notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                match read_outcome(inner, key, leader, seal, started).await {
                    Ok(Some(waited)) => break waited,
                    Ok(None) => {}
                    // Keep waiting: this flight must never call the inner service itself.
                    Err(error) => tracing::debug!(%error, "redis read failed while waiting"),
                }
                let poll = (Instant::now() + inner.poll_interval).min(deadline);
                let sleep = std::pin::pin!(tokio::time::sleep_until(poll));
                futures_util::future::select(woken, sleep).await;
                if Instant::now() >= deadline {
                    break Waited::Elapsed;
                }
            };
            inner.forget_waiter(key, notify);
            Ok(result)
        })
    }

    fn invalidate<'a>(&'a self, key: &'a Fingerprint, life: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            inner.invalidate_key(key, life, true).await?;
            inner.replicated(&[inner.names.key(key, "gen")]).await
        })
    }

    fn invalidate_group<'a>(
        &'a self,
        group: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let members_key = inner.names.key(group, "members");
            // First the generation, then the members: see `complete` for why this order
            // leaves no replay of the group behind.
            let members: Vec<String> = inner
                .run(
                    inner
                        .scripts
                        .invalidate_group
                        .key(inner.names.key(group, "gen"))
                        .key(&members_key)
                        .arg(life.as_millis().max(1) as u64)
                        .invoke_async(&mut connection),
                )
                .await?;
            // Each member as `invalidate` does, one script per key (the members live in other
            // slots than the group): a flight of a remembered key that runs now can no longer
            // store its result.
            let members: Vec<Fingerprint> = members
                .iter()
                .filter_map(|hex| Fingerprint::from_hex(hex))
                .collect();
            let invalidated = futures_util::future::join_all(
                members
                    .iter()
                    .map(|member| inner.invalidate_key(member, life, false)),
            )
            .await;
            invalidated
                .into_iter()
                .collect::<Result<(), StoreError>>()?;
            let touched: Vec<String> = std::iter::once(inner.names.key(group, "gen"))
                .chain(members.iter().map(|member| inner.names.key(member, "gen")))
                .collect();
            inner.replicated(&touched).await?;
            // Two commands, not a pipeline: in a cluster the channel is no key of the
            // members' slot. Both go out at once on the multiplexed connection.
            let mut announce = connection.clone();
            let channel = inner.names.invalidate_channel();
            let message = format!("group {}", group.to_hex());
            let (deleted, announced) = futures_util::future::join(
                inner.run(connection.del::<_, ()>(&members_key)),
                inner.run(announce.publish::<_, _, ()>(&channel, &message)),
            )
            .await;
            deleted.and(announced)
        })
    }

    fn remember<'a>(
        &'a self,
        group: &'a Fingerprint,
        key: &'a Fingerprint,
        life: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let members = inner.names.key(group, "members");
            let mut pipe = redis::pipe();
            pipe.sadd(&members, key.to_hex()).ignore();
            // Every remembering sets the same life from now: it only ever extends.
            pipe.pexpire(&members, life.as_millis().max(1) as i64)
                .ignore();
            inner.run(pipe.query_async::<()>(&mut connection)).await
        })
    }

    fn listen(&self, listener: Listener) {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }
}

/// One read of a follower: the leader's result, word that it was revoked, or `None` to
/// keep waiting.
async fn read_outcome(
    inner: &Inner,
    key: &Fingerprint,
    leader: &Fence,
    seal: &[u8; 32],
    started: &Generations,
) -> Result<Option<Waited>, StoreError> {
    let mut connection = inner.connection.clone();
    let (kind, value, pttl, key_generation): (i64, Vec<u8>, i64, u64) = inner
        .run(
            inner
                .scripts
                .outcome
                .key(inner.names.key(key, "res"))
                .key(inner.names.outcome(key, leader))
                .key(inner.names.key(key, "gen"))
                .invoke_async(&mut connection),
        )
        .await?;
    if key_generation != started.key || (kind == 0 && value == REVOKED.as_bytes()) {
        return Ok(Some(Waited::Revoked));
    }
    if kind < 0 {
        return Ok(None);
    }
    let read = Read {
        value,
        pttl,
        key_generation,
        group_generation: inner.group_generation_of(started).await?,
    };
    let kind = if kind == 1 { KIND_REPLAY } else { KIND_FLIGHT };
    Ok(match inner.open(key, seal, kind, read) {
        Opened::Live(stored) => Some(Waited::Arrived(stored)),
        Opened::Revoked => Some(Waited::Revoked),
        Opened::Nothing => None,
    })
}
