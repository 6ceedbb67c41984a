//! [`RedisStore`]: the coordination protocol on Redis.
//!
//! Keys, all with the fingerprint as a hash tag so that one key's lock, result and channel
//! map to one cluster slot, and all with a TTL:
//!
//! | name | value | life |
//! |---|---|---|
//! | `{prefix}:{fp}:lock` | the leader's random fence | the lease (longer than the hard cap) |
//! | `{prefix}:{fp}:res` | the sealed replay | the replay TTL |
//! | `{prefix}:{fp}:out:{fence}` | the sealed outcome of one flight (not a replay) | the wait timeout |
//! | `{prefix}:{group}:members` | fingerprints of a group's replays | the replay TTL |
//!
//! Completion is announced on `{prefix}:{fp}:done` (the message is the fence and the kind,
//! never a token), invalidations on `{prefix}:invalidate`. Each instance holds **one**
//! pub/sub connection, pattern-subscribed to every completion channel, and dispatches
//! messages to its local waiters; waiters also poll, so a lost message costs at most one
//! poll interval.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use redis::{
    AsyncCommands, Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::{sync::Notify, time::Instant};

use super::{
    Election, Fence, Invalidation, Keep, Listener, Store, StoreError, StoreFuture, Stored,
    seal::Sealer,
};
use crate::key::Fingerprint;

const KIND_REPLAY: u8 = 1;
const KIND_FLIGHT: u8 = 0;

/// Builds a [`RedisStore`]; start with [`RedisStore::builder`].
pub struct RedisStoreBuilder {
    client: Client,
    secret: Vec<u8>,
    prefix: String,
    command_timeout: Duration,
    poll_interval: Duration,
}

impl RedisStoreBuilder {
    /// The prefix of every key and channel. Default: `rc`.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The budget of each Redis command; a command that takes longer counts as a failure.
    /// Default: 100 ms.
    #[must_use]
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How often a waiting flight polls for the leader's result, besides being woken by
    /// pub/sub. Default: 250 ms.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Builds the store. It does not wait for Redis: connections are made in the background
    /// and the layer starts even when Redis is down. Must be called inside a Tokio runtime.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.command_timeout))
            .set_connection_timeout(Some(self.command_timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map(Connection)
            .map_err(StoreError::new)?;
        let inner = Arc::new(Inner {
            client: self.client,
            connection,
            sealer: Sealer::new(&self.secret),
            names: Names {
                prefix: self.prefix,
            },
            command_timeout: self.command_timeout,
            poll_interval: self.poll_interval,
            waiters: Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            scripts: Scripts::new(),
        });
        tokio::spawn(subscribe_loop(Arc::downgrade(&inner)));
        Ok(RedisStore { inner })
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// A [`Store`] on Redis (standalone, or a cluster through the hash-tagged key names).
///
/// Every instance of a deployment must use the same Redis, prefix and `secret`. The secret
/// keys the encryption of stored values, together with a per-token key from the layer, so a
/// Redis dump reveals no token.
///
/// ```no_run
/// use tower_refresh_coalesce::store::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let store = RedisStore::builder(client, b"deployment secret").build()?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// The connection manager, retrying a command once when it failed because a connection was
/// refused: the manager reconnects only after a command failed, so while Redis was away its
/// connection is a stored refusal, and without the retry the first command after Redis comes
/// back fails too (and the breaker's one trial after its cool-down is wasted). A refused
/// connection sent nothing, so the retry cannot run a command twice.
#[derive(Clone)]
struct Connection(ConnectionManager);

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            match self.0.req_packed_command(cmd).await {
                Err(error) if error.is_connection_refusal() => self.0.req_packed_command(cmd).await,
                result => result,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            match self.0.req_packed_commands(pipeline, offset, count).await {
                Err(error) if error.is_connection_refusal() => {
                    self.0.req_packed_commands(pipeline, offset, count).await
                }
                result => result,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

struct Inner {
    client: Client,
    connection: Connection,
    sealer: Sealer,
    names: Names,
    command_timeout: Duration,
    poll_interval: Duration,
    /// Local waiters by key: the pub/sub task wakes them.
    waiters: Mutex<HashMap<Fingerprint, Arc<Notify>>>,
    subscribed: AtomicBool,
    listeners: Mutex<Vec<Listener>>,
    scripts: Scripts,
}

struct Names {
    prefix: String,
}

impl Names {
    fn key(&self, key: &Fingerprint, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.prefix, key.to_hex())
    }

    fn outcome(&self, key: &Fingerprint, fence: &Fence) -> String {
        self.key(key, &format!("out:{}", fence.as_str()))
    }

    fn done_pattern(&self) -> String {
        format!("{}:{{*}}:done", self.prefix)
    }

    fn invalidate_channel(&self) -> String {
        format!("{}:invalidate", self.prefix)
    }

    /// The fingerprint of a completion channel `{prefix}:{hex}:done`.
    fn parse_done(&self, channel: &str) -> Option<Fingerprint> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let hex = rest.strip_suffix("}:done")?;
        parse_fingerprint(hex)
    }
}

fn parse_fingerprint(hex: &str) -> Option<Fingerprint> {
    if hex.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Fingerprint::from_bytes(bytes))
}

struct Scripts {
    /// KEYS: res. Returns `{value, pttl}` or nil.
    load: Script,
    /// KEYS: lock. ARGV: fence, lease ms. Returns `{1, ''}` when won, `{0, holder}` when lost.
    /// Idempotent for one fence: if an earlier attempt with this fence timed out on the way
    /// back but took the lock, a retry reports it won.
    elect: Script,
    /// KEYS: res. ARGV: value, ttl ms, channel, message. Stores the replay unless one exists
    /// and announces it; returns nil, or the existing `{value, pttl}`.
    complete_replay: Script,
    /// KEYS: out, lock. ARGV: value, ttl ms, channel, message, fence. Stores the flight's
    /// outcome, announces it, and releases the lock if the fence still holds it: a request
    /// that comes after the outcome elects a new leader instead of following a flight that
    /// has ended (and receiving an outcome that was never meant to be replayed).
    complete_flight: Script,
    /// KEYS: lock. ARGV: fence. Deletes the lock if the fence still holds it.
    release: Script,
    /// KEYS: res, out. Returns `{1, value, pttl}` for a replay, `{0, value, pttl}` for the
    /// flight's outcome, or nil.
    outcome: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            load: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if not v then return nil end
                  return {v, redis.call('PTTL', KEYS[1])}",
            ),
            elect: Script::new(
                r"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ''} end
                  local holder = redis.call('GET', KEYS[1]) or ''
                  if holder == ARGV[1] then return {1, ''} end
                  return {0, holder}",
            ),
            complete_replay: Script::new(
                r"local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
                  redis.call('PUBLISH', ARGV[3], ARGV[4])
                  if stored then return nil end
                  return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}",
            ),
            complete_flight: Script::new(
                r"redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                  redis.call('PUBLISH', ARGV[3], ARGV[4])
                  if redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
                  return 1",
            ),
            release: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
                  return 0",
            ),
            outcome: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if v then return {1, v, redis.call('PTTL', KEYS[1])} end
                  v = redis.call('GET', KEYS[2])
                  if v then return {0, v, redis.call('PTTL', KEYS[2])} end
                  return nil",
            ),
        }
    }
}

impl RedisStore {
    /// A builder for a store on `client`'s Redis, sealing values with `secret`.
    pub fn builder(client: Client, secret: impl AsRef<[u8]>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            client,
            secret: secret.as_ref().to_vec(),
            prefix: "rc".to_owned(),
            command_timeout: Duration::from_millis(100),
            poll_interval: Duration::from_millis(250),
        }
    }

    /// Whether the pub/sub connection is subscribed now (waiters poll either way).
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Acquire)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.names.prefix)
            .field("subscribed", &self.is_subscribed())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Runs one command under the command budget.
    async fn run<T>(
        &self,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.command_timeout, command).await {
            Ok(result) => result.map_err(StoreError::new),
            Err(_) => Err(StoreError::timeout(self.command_timeout)),
        }
    }

    fn open(
        &self,
        key: &Fingerprint,
        seal: &[u8; 32],
        kind: u8,
        value: &[u8],
        ttl: i64,
    ) -> Option<Stored> {
        let value = self.sealer.open(key, seal, kind, value)?;
        Some(Stored {
            value,
            ttl: Duration::from_millis(ttl.max(0) as u64),
            replay: kind == KIND_REPLAY,
        })
    }

    /// The local waiters' wake-up of `key`, created on first use.
    fn waiter(&self, key: &Fingerprint) -> Arc<Notify> {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*key)
            .or_default()
            .clone()
    }

    /// Drops the wake-up of `key` once its last waiter is gone.
    fn forget_waiter(&self, key: &Fingerprint, notify: Arc<Notify>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: ours and the map's.
        if Arc::strong_count(&notify) <= 2 {
            waiters.remove(key);
        }
    }

    fn wake(&self, key: &Fingerprint) {
        let notify = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let all: Vec<_> = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for notify in all {
            notify.notify_waiters();
        }
    }
}

impl Store for RedisStore {
    fn load<'a>(
        &'a self,
        key: &'a Fingerprint,
        seal: &'a [u8; 32],
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let found: Option<(Vec<u8>, i64)> = inner
                .run(
                    inner
                        .scripts
                        .load
                        .key(inner.names.key(key, "res"))
                        .invoke_async(&mut connection),
                )
                .await?;
            Ok(found.and_then(|(value, ttl)| inner.open(key, seal, KIND_REPLAY, &value, ttl)))
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
            let result: (i64, Option<String>) = inner
                .run(
                    inner
                        .scripts
                        .elect
                        .key(inner.names.key(key, "lock"))
                        .arg(fence.as_str())
                        .arg(lease.as_millis() as u64)
                        .invoke_async(&mut connection),
                )
                .await?;
            Ok(match result {
                (1, _) => Election::Won,
                (_, holder) => Election::Lost {
                    leader: Fence::from_string(holder.unwrap_or_default()),
                },
            })
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a Fingerprint,
        fence: &'a Fence,
        seal: &'a [u8; 32],
        value: Vec<u8>,
        keep: Keep,
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let channel = inner.names.key(key, "done");
            match keep {
                Keep::Replay { ttl, group } => {
                    let sealed = inner.sealer.seal(key, seal, KIND_REPLAY, &value);
                    let message = format!("{} replay", fence.as_str());
                    let mut script_connection = connection.clone();
                    let mut invocation = inner
                        .scripts
                        .complete_replay
                        .key(inner.names.key(key, "res"));
                    invocation
                        .arg(sealed)
                        .arg(ttl.as_millis().max(1) as u64)
                        .arg(&channel)
                        .arg(message);
                    let store = inner.run(
                        invocation.invoke_async::<Option<(Vec<u8>, i64)>>(&mut script_connection),
                    );
                    // The group's member set lives in another slot than the result, so it is
                    // a separate command, not part of the script; it is sent alongside, on the
                    // same multiplexed connection, and costs no extra round trip.
                    let remember = async {
                        let Some(group) = group else {
                            return Ok(());
                        };
                        let members = inner.names.key(&group, "members");
                        let mut pipe = redis::pipe();
                        pipe.sadd(&members, key.to_hex()).ignore();
                        pipe.pexpire(&members, ttl.as_millis().max(1) as i64)
                            .ignore();
                        inner.run(pipe.query_async::<()>(&mut connection)).await
                    };
                    let (existing, remembered) = futures_util::future::join(store, remember).await;
                    remembered?;
                    Ok(existing?
                        .and_then(|(value, ttl)| inner.open(key, seal, KIND_REPLAY, &value, ttl)))
                }
                Keep::Flight { ttl } => {
                    let sealed = inner.sealer.seal(key, seal, KIND_FLIGHT, &value);
                    let message = format!("{} flight", fence.as_str());
                    inner
                        .run(
                            inner
                                .scripts
                                .complete_flight
                                .key(inner.names.outcome(key, fence))
                                .key(inner.names.key(key, "lock"))
                                .arg(sealed)
                                .arg(ttl.as_millis().max(1) as u64)
                                .arg(&channel)
                                .arg(message)
                                .arg(fence.as_str())
                                .invoke_async::<i64>(&mut connection),
                        )
                        .await?;
                    Ok(None)
                }
            }
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
        deadline: Instant,
    ) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move {
            let inner = &*self.inner;
            let notify = inner.waiter(key);
            let result = loop {
                // Register for the wake-up before reading the keys: a completion between the
                // read and the wait still wakes us.
                let woken = notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let mut connection = inner.connection.clone();
                let read: Result<Option<(i64, Vec<u8>, i64)>, StoreError> = inner
                    .run(
                        inner
                            .scripts
                            .outcome
                            .key(inner.names.key(key, "res"))
                            .key(inner.names.outcome(key, leader))
                            .invoke_async(&mut connection),
                    )
                    .await;
                match read {
                    Ok(Some((kind, value, ttl))) => {
                        let kind = if kind == 1 { KIND_REPLAY } else { KIND_FLIGHT };
                        if let Some(stored) = inner.open(key, seal, kind, &value, ttl) {
                            break Some(stored);
                        }
                    }
                    Ok(None) => {}
                    // Keep waiting: this flight must never call the inner service itself.
                    Err(error) => tracing::debug!(%error, "redis read failed while waiting"),
                }
                let poll = (Instant::now() + inner.poll_interval).min(deadline);
                let sleep = std::pin::pin!(tokio::time::sleep_until(poll));
                futures_util::future::select(woken, sleep).await;
                if Instant::now() >= deadline {
                    break None;
                }
            };
            inner.forget_waiter(key, notify);
            Ok(result)
        })
    }

    fn invalidate<'a>(&'a self, key: &'a Fingerprint) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let mut pipe = redis::pipe();
            pipe.del(inner.names.key(key, "res")).ignore();
            pipe.publish(
                inner.names.invalidate_channel(),
                format!("key {}", key.to_hex()),
            )
            .ignore();
            inner.run(pipe.query_async::<()>(&mut connection)).await
        })
    }

    fn invalidate_group<'a>(&'a self, group: &'a Fingerprint) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let inner = &*self.inner;
            let mut connection = inner.connection.clone();
            let members_key = inner.names.key(group, "members");
            let members: Vec<String> = inner.run(connection.smembers(&members_key)).await?;
            let mut pipe = redis::pipe();
            for member in members.iter().filter_map(|hex| parse_fingerprint(hex)) {
                // One command per key: the members live in other slots than the group.
                pipe.del(inner.names.key(&member, "res")).ignore();
            }
            pipe.del(&members_key).ignore();
            pipe.publish(
                inner.names.invalidate_channel(),
                format!("group {}", group.to_hex()),
            )
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

/// The instance's one pub/sub connection: pattern-subscribed to every completion channel and
/// subscribed to invalidations; reconnects with a growing delay while Redis is away. Exits
/// when the store is dropped.
async fn subscribe_loop(store: Weak<Inner>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(inner) = store.upgrade() else {
            return;
        };
        let connect = async {
            let mut pubsub = inner.client.get_async_pubsub().await?;
            pubsub.psubscribe(inner.names.done_pattern()).await?;
            pubsub.subscribe(inner.names.invalidate_channel()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let connected = tokio::time::timeout(Duration::from_secs(1), connect).await;
        let mut pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => {
                tracing::debug!(%error, "redis pub/sub connection failed");
                drop(inner);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => {
                drop(inner);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        inner.subscribed.store(true, Ordering::Release);
        tracing::debug!("redis pub/sub subscribed");
        // Messages sent while we were away are lost: let every waiter read again.
        inner.wake_all();
        let weak = Arc::downgrade(&inner);
        drop(inner);
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let channel = message.get_channel_name();
            if let Some(key) = inner.names.parse_done(channel) {
                inner.wake(&key);
            } else if channel == inner.names.invalidate_channel() {
                let payload = String::from_utf8_lossy(message.get_payload_bytes());
                let invalidation = match payload.split_once(' ') {
                    Some(("key", hex)) => parse_fingerprint(hex).map(Invalidation::Key),
                    Some(("group", hex)) => parse_fingerprint(hex).map(Invalidation::Group),
                    _ => None,
                };
                if let Some(invalidation) = invalidation {
                    let listeners = inner
                        .listeners
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    for listener in listeners {
                        listener(&invalidation);
                    }
                }
            }
        }
        drop(messages);
        if let Some(inner) = weak.upgrade() {
            inner.subscribed.store(false, Ordering::Release);
            tracing::debug!("redis pub/sub connection lost");
        }
    }
}
