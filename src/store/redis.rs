//! [`RedisStore`]: the coordination protocol on Redis.
//!
//! Keys, all with the fingerprint as a hash tag so that one key's lock, result, generation
//! and channel map to one cluster slot (every script touches one slot only), and all with a
//! TTL:
//!
//! | name | value | life |
//! |---|---|---|
//! | `{prefix}:{fp}:lock` | the leader's random fence | the lease (longer than the hard cap) |
//! | `{prefix}:{fp}:res` | the sealed replay | the replay TTL |
//! | `{prefix}:{fp}:out:{fence}` | the sealed outcome of one flight (not a replay), or `revoked` if its result was revoked | the wait timeout (`revoked`: the replay TTL) |
//! | `{prefix}:{fp}:gen` | the key's generation (`INCR` by each invalidation) | at least the replay TTL + lease + 5 s from the invalidation; kept at least the lease by each election and the replay TTL by each stored replay |
//! | `{prefix}:{group}:members` | fingerprints of a group's replays | the replay TTL |
//! | `{prefix}:{group}:gen` | the group's generation (`INCR` by each group invalidation) | as the key's; kept that long by each flight that reads it |
//!
//! A missing generation is 0. An invalidation of a key bumps `gen` and deletes `res` in one
//! script; the election reads `gen` in the script that takes the lock, and the completion
//! stores only if it is unchanged (else it leaves `revoked` in `out`, releases the lock and
//! announces it). A group's keys live in other slots than the group, so its generation is
//! read with a separate command: at the start of the flight, again after a replay is stored
//! and added to `members` (withdrawing it if the group moved), and after every value read.
//! Sealed values bind their absolute expiry and both generations (see `seal.rs`), and are
//! refused once either generation moved or the expiry passed, whatever Redis still holds.
//!
//! Completion is announced on `{prefix}:{fp}:done` (the message is the fence and the kind,
//! never a token; an invalidation of the key announces itself there too, so that followers
//! learn at once), invalidations on `{prefix}:invalidate`. Each instance holds **one**
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
    Completed, Election, Fence, Generations, Invalidation, Keep, Listener, Store, StoreError,
    StoreFuture, Stored, Waited,
    seal::{Bound, Sealer},
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
    ///
    /// A secret shorter than [`MIN_SECRET_LEN`](crate::MIN_SECRET_LEN) (32) bytes is refused.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        crate::key::check_secret(&self.secret).map_err(StoreError::new)?;
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
/// let store = RedisStore::builder(client, b"a deployment secret of 32 bytes!").build()?;
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
    /// KEYS: res, gen. Returns `{value, pttl, key generation}` or nil.
    load: Script,
    /// KEYS: gen (of a group). ARGV: life ms. Returns the generation (0 if none), keeping an
    /// existing one at least `life`.
    generation: Script,
    /// KEYS: lock, gen. ARGV: fence, lease ms. Returns `{1, '', generation}` when won,
    /// `{0, holder, generation}` when lost, and keeps an existing generation at least the
    /// lease (it must not expire under the flight). Idempotent for one fence: if an earlier
    /// attempt with this fence timed out on the way back but took the lock, a retry reports
    /// it won.
    elect: Script,
    /// KEYS: res, gen, out, lock. ARGV: value, ttl ms, channel, fence, generation at the
    /// election. If the key's generation moved, stores nothing but the revoked mark in `out`,
    /// releases the lock and announces it: `{2, '', 0}`. Otherwise stores the replay unless
    /// one exists (keeping the generation as long) and announces it; returns `{0, '', 0}`,
    /// or `{1, value, pttl}` of the existing replay.
    complete_replay: Script,
    /// KEYS: out, lock, gen. ARGV: value, ttl ms, channel, fence, generation at the
    /// election. Stores the flight's outcome (or the revoked mark, returning 2, if the key's
    /// generation moved), announces it, and releases the lock if the fence still holds it: a
    /// request that comes after the outcome elects a new leader instead of following a
    /// flight that has ended (and receiving an outcome that was never meant to be replayed).
    complete_flight: Script,
    /// KEYS: res, out, lock. ARGV: value, ttl ms, channel, fence. Withdraws a replay whose
    /// group was invalidated while it was stored: deletes `res` if it still holds this
    /// value, leaves the revoked mark for the followers, releases the lock, announces it.
    withdraw: Script,
    /// KEYS: lock. ARGV: fence. Deletes the lock if the fence still holds it.
    release: Script,
    /// KEYS: res, out, gen. Returns `{1, value, pttl, generation}` for a replay,
    /// `{0, value, pttl, generation}` for the flight's outcome (`value` may be the revoked
    /// mark), or `{-1, '', 0, generation}`.
    outcome: Script,
    /// KEYS: gen, res. ARGV: life ms, completion channel, invalidation channel (empty: none),
    /// message.
    /// Bumps the key's generation (kept at least `life`) and deletes its replay, in one
    /// step: a flight running now can no longer store its result. Wakes its followers (who
    /// see the generation move) and tells every instance.
    invalidate: Script,
    /// KEYS: gen, members (of a group). ARGV: life ms. Bumps the group's generation, then
    /// returns its members.
    invalidate_group: Script,
}

/// What `out` holds for the followers of a flight whose result was revoked. A sealed value
/// starts with its version byte (2), never with this.
const REVOKED: &str = "revoked";

/// Keeps `KEYS[n]` at least `ARGV[m]` ms (Lua, spliced into the scripts).
macro_rules! keep_at_least {
    ($key:literal, $ms:literal) => {
        concat!(
            "if redis.call('PTTL', KEYS[",
            $key,
            "]) < tonumber(ARGV[",
            $ms,
            "]) then ",
            "redis.call('PEXPIRE', KEYS[",
            $key,
            "], ARGV[",
            $ms,
            "]) end\n"
        )
    };
}

impl Scripts {
    fn new() -> Self {
        Self {
            load: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if not v then return nil end
                  return {v, redis.call('PTTL', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0')}",
            ),
            generation: Script::new(concat!(
                "local g = redis.call('GET', KEYS[1])\n",
                "if not g then return 0 end\n",
                keep_at_least!(1, 1),
                "return tonumber(g)",
            )),
            elect: Script::new(concat!(
                "local gen = redis.call('GET', KEYS[2])\n",
                "if gen then\n",
                keep_at_least!(2, 2),
                "end\n",
                "gen = tonumber(gen or '0')\n",
                "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, '', gen} end\n",
                "local holder = redis.call('GET', KEYS[1]) or ''\n",
                "if holder == ARGV[1] then return {1, '', gen} end\n",
                "return {0, holder, gen}",
            )),
            complete_replay: Script::new(concat!(
                "local gen = redis.call('GET', KEYS[2])\n",
                "if tonumber(gen or '0') ~= tonumber(ARGV[5]) then\n",
                "  redis.call('SET', KEYS[3], 'revoked', 'PX', ARGV[2])\n",
                "  if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end\n",
                "  redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' revoked')\n",
                "  return {2, '', 0}\n",
                "end\n",
                "local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])\n",
                "if gen then\n",
                keep_at_least!(2, 2),
                "end\n",
                "redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' replay')\n",
                "if stored then return {0, '', 0} end\n",
                "return {1, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}",
            )),
            complete_flight: Script::new(
                r"local revoked = tonumber(redis.call('GET', KEYS[3]) or '0') ~= tonumber(ARGV[5])
                  if revoked then
                    redis.call('SET', KEYS[1], 'revoked', 'PX', ARGV[2])
                  else
                    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                  end
                  redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' flight')
                  if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
                  if revoked then return 2 end
                  return 1",
            ),
            withdraw: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
                  redis.call('SET', KEYS[2], 'revoked', 'PX', ARGV[2])
                  if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
                  redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' revoked')
                  return 1",
            ),
            release: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
                  return 0",
            ),
            outcome: Script::new(
                r"local gen = tonumber(redis.call('GET', KEYS[3]) or '0')
                  local v = redis.call('GET', KEYS[1])
                  if v then return {1, v, redis.call('PTTL', KEYS[1]), gen} end
                  v = redis.call('GET', KEYS[2])
                  if v then return {0, v, redis.call('PTTL', KEYS[2]), gen} end
                  return {-1, '', 0, gen}",
            ),
            invalidate: Script::new(concat!(
                "redis.call('INCR', KEYS[1])\n",
                keep_at_least!(1, 1),
                "redis.call('DEL', KEYS[2])\n",
                "redis.call('PUBLISH', ARGV[2], 'invalidated')\n",
                "if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end\n",
                "return 1",
            )),
            invalidate_group: Script::new(concat!(
                "redis.call('INCR', KEYS[1])\n",
                keep_at_least!(1, 1),
                "return redis.call('SMEMBERS', KEYS[2])",
            )),
        }
    }
}

/// A value as a script read it, with the generations to check it against.
struct Read {
    value: Vec<u8>,
    pttl: i64,
    key_generation: u64,
    group_generation: Option<u64>,
}

/// What a read value turned out to be.
enum Opened {
    Live(Stored),
    Revoked,
    Nothing,
}

/// Milliseconds since the Unix epoch, the clock of sealed expiries.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
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

    /// A sealed value read with `pttl` left, if it opens with `seal` and is live; revoked
    /// if it was stored under another generation than the key's current one or (when
    /// given) the group's.
    fn open(&self, key: &Fingerprint, seal: &[u8; 32], kind: u8, read: Read) -> Opened {
        let Some((bound, value)) = self.sealer.open(key, seal, kind, &read.value) else {
            return Opened::Nothing;
        };
        let now = unix_ms();
        if bound.expires_ms <= now {
            return Opened::Nothing;
        }
        if bound.key_generation != read.key_generation
            || read
                .group_generation
                .is_some_and(|current| bound.group_generation != current)
        {
            return Opened::Revoked;
        }
        let ttl = (read.pttl.max(0) as u64).min(bound.expires_ms - now);
        Opened::Live(Stored {
            value,
            ttl: Duration::from_millis(ttl),
            replay: kind == KIND_REPLAY,
        })
    }

    /// The current generation of `group` (a plain read: the group lives in another slot
    /// than the key whose value it checks).
    async fn current_group_generation(&self, group: &Fingerprint) -> Result<u64, StoreError> {
        let mut connection = self.connection.clone();
        let generation: Option<u64> = self
            .run(connection.get(self.names.key(group, "gen")))
            .await?;
        Ok(generation.unwrap_or(0))
    }

    /// The current generation of the group in `started`, if it has one.
    async fn group_generation_of(&self, started: &Generations) -> Result<Option<u64>, StoreError> {
        match &started.group {
            Some((group, _)) => self.current_group_generation(group).await.map(Some),
            None => Ok(None),
        }
    }

    /// Deletes the replay `sealed` of `key` if it is still stored, and leaves the followers
    /// of `fence` the revoked mark.
    async fn withdraw(
        &self,
        key: &Fingerprint,
        fence: &Fence,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        self.run(
            self.scripts
                .withdraw
                .key(self.names.key(key, "res"))
                .key(self.names.outcome(key, fence))
                .key(self.names.key(key, "lock"))
                .arg(sealed)
                .arg(ttl.as_millis().max(1) as u64)
                .arg(self.names.key(key, "done"))
                .arg(fence.as_str())
                .invoke_async::<i64>(&mut connection),
        )
        .await?;
        Ok(())
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

impl Inner {
    /// Bumps the generation of `key` and deletes its replay in one step, waking its
    /// followers; `announce`: tells every instance too (a group invalidation announces the
    /// group instead, once).
    async fn invalidate_key(
        &self,
        key: &Fingerprint,
        life: Duration,
        announce: bool,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let (channel, message) = if announce {
            (
                self.names.invalidate_channel(),
                format!("key {}", key.to_hex()),
            )
        } else {
            (String::new(), String::new())
        };
        self.run(
            self.scripts
                .invalidate
                .key(self.names.key(key, "gen"))
                .key(self.names.key(key, "res"))
                .arg(life.as_millis().max(1) as u64)
                .arg(self.names.key(key, "done"))
                .arg(channel)
                .arg(message)
                .invoke_async::<i64>(&mut connection),
        )
        .await?;
        Ok(())
    }
}

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
                        .arg(fence.as_str())
                        .arg(lease.as_millis() as u64)
                        .invoke_async(&mut connection),
                )
                .await?;
            Ok(match result {
                (1, _, generation) => Election::Won { generation },
                (_, holder, generation) => Election::Lost {
                    leader: Fence::from_string(holder.unwrap_or_default()),
                    generation,
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
            let inner = &*self.inner;
            let notify = inner.waiter(key);
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
        Box::pin(self.inner.invalidate_key(key, life, true))
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
                .filter_map(|hex| parse_fingerprint(hex))
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
            let mut pipe = redis::pipe();
            pipe.del(&members_key).ignore();
            pipe.publish(
                inner.names.invalidate_channel(),
                format!("group {}", group.to_hex()),
            )
            .ignore();
            inner.run(pipe.query_async::<()>(&mut connection)).await
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
