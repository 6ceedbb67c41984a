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
//! pub/sub connection and dispatches messages to its local waiters; waiters also poll, so a
//! lost message costs at most one poll interval. On a standalone server and with Sentinel,
//! the connection is pattern-subscribed to every completion channel and completions are
//! classic `PUBLISH`es. In a cluster, where a classic message crosses the cluster bus to
//! every node and reaches every instance whether it waits or not, completions are sharded
//! (`SPUBLISH`, within the key's shard), and an instance subscribes (`SSUBSCRIBE`) to the
//! channel of each key it waits for, before its first read, until its last waiter of the
//! key leaves: the messages then grow with the instances that wait, not with all of them
//! (`docs/pubsub-cluster.md` has the measurement).

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{
    AsyncCommands, Client, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisError,
    aio::ConnectionManagerConfig,
    cluster::ClusterClientBuilder,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};
use tokio::sync::Notify;

use self::{
    connection::Connection,
    names::Names,
    pubsub::Source,
    scripts::{Announce, Scripts},
};
use super::{Fence, Generations, Listener, StoreError, StoreErrorKind, Stored, seal::Sealer};
use crate::key::Fingerprint;

#[cfg(feature = "client")]
mod access;
mod connection;
mod names;
mod protocol;
mod pubsub;
mod scripts;

const KIND_REPLAY: u8 = 1;
const KIND_FLIGHT: u8 = 0;

/// Builds a [`RedisStore`]; start with [`RedisStore::standalone`], [`RedisStore::sentinel`]
/// or [`RedisStore::cluster`].
pub struct RedisStoreBuilder {
    topology: Topology,
    secret: Vec<u8>,
    prefix: String,
    command_timeout: Duration,
    poll_interval: Duration,
    min_replicas: Option<u32>,
}

/// Where the store's Redis is, as the builder received it.
enum Topology {
    Standalone(Client),
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
        node: Option<SentinelNodeConnectionInfo>,
    },
    Cluster(Vec<ConnectionInfo>),
    /// The addresses did not parse: `build` reports it.
    Invalid(RedisError),
}

impl Topology {
    fn name(&self) -> &'static str {
        match self {
            Topology::Standalone(_) => "standalone",
            Topology::Sentinel { .. } => "sentinel",
            Topology::Cluster(_) => "cluster",
            Topology::Invalid(_) => "invalid",
        }
    }
}

impl RedisStoreBuilder {
    fn new(topology: Topology, secret: &[u8]) -> Self {
        Self {
            topology,
            secret: secret.to_vec(),
            prefix: "rc".to_owned(),
            command_timeout: Duration::from_millis(100),
            poll_interval: Duration::from_millis(250),
            min_replicas: None,
        }
    }

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

    /// How many replicas must acknowledge an election before its leader calls the inner
    /// service (`WAIT replicas timeout`, right after the lock is taken, waiting at most half
    /// the command budget). Replication
    /// is asynchronous: a master that fails before its replica received the lock hands the
    /// next election to a second leader, whose refresh presents a token the first one is
    /// rotating. Waiting closes that window as far as the replicas acknowledge in time; a
    /// leader whose replicas do not acknowledge within the budget goes on, and is counted
    /// in [`Stats::store_unreplicated`](crate::Stats::store_unreplicated).
    ///
    /// Default: 0 standalone, 1 with Sentinel and in a cluster (set 0 for a cluster without
    /// replicas, where every election would otherwise wait out the budget).
    #[must_use]
    pub fn min_replicas(mut self, replicas: u32) -> Self {
        self.min_replicas = Some(replicas);
        self
    }

    /// For Sentinel: how to connect to the master and replicas the sentinels name (their
    /// credentials, TLS). Default: as the sentinels' own addresses say. No effect on other
    /// topologies.
    #[must_use]
    pub fn sentinel_node(mut self, node: SentinelNodeConnectionInfo) -> Self {
        if let Topology::Sentinel { node: slot, .. } = &mut self.topology {
            *slot = Some(node);
        }
        self
    }

    /// Builds the store. It does not wait for Redis: connections are made in the background
    /// and the layer starts even when Redis is down. Must be called inside a Tokio runtime.
    ///
    /// A secret shorter than [`MIN_SECRET_LEN`](crate::MIN_SECRET_LEN) (32) bytes is refused,
    /// and so are addresses that do not parse.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        crate::key::check_secret(&self.secret).map_err(StoreError::new)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.command_timeout))
            .set_connection_timeout(Some(self.connect_timeout()))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let topology = self.topology.name();
        let connect_timeout = self.connect_timeout();
        let (connection, source, min_replicas, announce) = match self.topology {
            Topology::Invalid(error) => return Err(StoreError::new(error)),
            Topology::Standalone(client) => {
                let connection =
                    Connection::standalone(client.clone(), config).map_err(StoreError::new)?;
                (connection, Source::Standalone(client), 0, Announce::Classic)
            }
            Topology::Sentinel {
                sentinels,
                master,
                node,
            } => {
                let sentinels =
                    SentinelClient::build(sentinels, master, node, SentinelServerType::Master)
                        .map_err(StoreError::new)?;
                let sentinels = Arc::new(tokio::sync::Mutex::new(sentinels));
                let connection = Connection::sentinel(sentinels.clone(), config);
                (
                    connection,
                    Source::Sentinel(sentinels),
                    1,
                    Announce::Classic,
                )
            }
            Topology::Cluster(nodes) => {
                let (pushes, received) = tokio::sync::mpsc::unbounded_channel();
                let client = ClusterClientBuilder::new(nodes)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .connection_timeout(connect_timeout)
                    .response_timeout(self.command_timeout)
                    .build()
                    .map_err(StoreError::new)?;
                let source = Source::Cluster(received);
                (Connection::cluster(client), source, 1, Announce::Sharded)
            }
        };
        let inner = Arc::new(Inner {
            connection,
            sealer: Sealer::new(&self.secret),
            names: Names {
                prefix: self.prefix,
            },
            command_timeout: self.command_timeout,
            poll_interval: self.poll_interval,
            min_replicas: self.min_replicas.unwrap_or(min_replicas),
            topology,
            waiters: Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            announce,
            scripts: Scripts::new(announce),
        });
        tokio::spawn(pubsub::subscribe_loop(Arc::downgrade(&inner), source));
        Ok(RedisStore { inner })
    }

    /// How long making a connection may take: the command budget, at least 250 ms.
    fn connect_timeout(&self) -> Duration {
        self.command_timeout.max(Duration::from_millis(250))
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("topology", &self.topology.name())
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("min_replicas", &self.min_replicas)
            .finish_non_exhaustive()
    }
}

/// A [`Store`](super::Store) on Redis: a standalone server ([`standalone`](Self::standalone)), the master a
/// Sentinel group names ([`sentinel`](Self::sentinel)) or a Redis Cluster
/// ([`cluster`](Self::cluster)), with one protocol: every script touches the keys of one
/// token, which share a hash tag and so one cluster slot.
///
/// Every instance of a deployment must use the same Redis, prefix and `secret`. The secret
/// keys the encryption of stored values, together with a per-token key from the layer, so a
/// Redis dump reveals no token. What each topology keeps through a failover is in the
/// crate docs ("What a failover of the store keeps, and what it does not").
///
/// ```no_run
/// use tower_refresh_coalesce::store::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// const SECRET: &[u8] = b"a deployment secret of 32 bytes!";
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let standalone = RedisStore::standalone(client, SECRET).build()?;
///
/// let sentinels = ["redis://127.0.0.1:26379/", "redis://127.0.0.1:26380/"];
/// let sentinel = RedisStore::sentinel(sentinels, "refresh", SECRET).build()?;
///
/// let cluster = RedisStore::cluster(["redis://127.0.0.1:7000/"], SECRET)
///     .min_replicas(1)
///     .build()?;
/// # let _ = (standalone, sentinel, cluster);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    sealer: Sealer,
    names: Names,
    command_timeout: Duration,
    poll_interval: Duration,
    /// Replicas that must acknowledge an election.
    min_replicas: u32,
    topology: &'static str,
    /// Local waiters by key: the pub/sub task wakes them.
    waiters: Mutex<HashMap<Fingerprint, Arc<Notify>>>,
    subscribed: AtomicBool,
    listeners: Mutex<Vec<Listener>>,
    /// How completions are announced, and so how waiters subscribe: to the pattern of every
    /// completion channel once, or to the channel of each key they wait for.
    announce: Announce,
    scripts: Scripts,
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

/// Fewer replicas acknowledged a write than the store requires.
#[derive(Debug)]
struct Unreplicated {
    acknowledged: u32,
    required: u32,
}

impl fmt::Display for Unreplicated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} replicas acknowledged the write",
            self.acknowledged, self.required
        )
    }
}

impl std::error::Error for Unreplicated {}

/// Addresses, parsed.
fn parse<T: IntoConnectionInfo>(
    addresses: impl IntoIterator<Item = T>,
) -> Result<Vec<ConnectionInfo>, RedisError> {
    addresses
        .into_iter()
        .map(IntoConnectionInfo::into_connection_info)
        .collect()
}

/// Milliseconds since the Unix epoch, the clock of sealed expiries.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl RedisStore {
    /// A builder for a store on the standalone Redis of `client`, sealing values with
    /// `secret`.
    pub fn standalone(client: Client, secret: impl AsRef<[u8]>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Topology::Standalone(client), secret.as_ref())
    }

    /// The same as [`standalone`](Self::standalone).
    pub fn builder(client: Client, secret: impl AsRef<[u8]>) -> RedisStoreBuilder {
        Self::standalone(client, secret)
    }

    /// A builder for a store on the master that the `sentinels` (their addresses, such as
    /// `redis://10.0.0.5:26379/`) name `master`, following it through failovers.
    pub fn sentinel<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master: impl Into<String>,
        secret: impl AsRef<[u8]>,
    ) -> RedisStoreBuilder {
        let topology = match parse(sentinels) {
            Ok(sentinels) => Topology::Sentinel {
                sentinels,
                master: master.into(),
                node: None,
            },
            Err(error) => Topology::Invalid(error),
        };
        RedisStoreBuilder::new(topology, secret.as_ref())
    }

    /// A builder for a store on the Redis Cluster that `seeds` (some of its nodes, such as
    /// `redis://10.0.0.7:6379/`) belong to. Commands go to their slot's master over RESP3
    /// and follow `MOVED` and failovers.
    pub fn cluster<T: IntoConnectionInfo>(
        seeds: impl IntoIterator<Item = T>,
        secret: impl AsRef<[u8]>,
    ) -> RedisStoreBuilder {
        let topology = match parse(seeds) {
            Ok(seeds) => Topology::Cluster(seeds),
            Err(error) => Topology::Invalid(error),
        };
        RedisStoreBuilder::new(topology, secret.as_ref())
    }

    /// Whether the pub/sub connection is subscribed now (waiters poll either way).
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Acquire)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.inner.topology)
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
            Ok(result) => result.map_err(connection::store_error),
            Err(_) => Err(StoreError::timeout(self.command_timeout)),
        }
    }

    /// How many replicas acknowledged the writes made through this store's connection to the
    /// node that holds `key`, waiting for `min_replicas` of them at most half the command
    /// budget: `WAIT` blocks on the server for its own timeout, and its answer must still
    /// arrive within the budget (the connection's response timeout).
    async fn acknowledged(&self, key: &str) -> Result<u32, StoreError> {
        let wait =
            self.connection
                .wait_for_replicas(key, self.min_replicas, self.command_timeout / 2);
        self.run(wait).await
    }

    /// Succeeds once `min_replicas` replicas acknowledged the writes to the nodes of `keys`
    /// (an invalidation's generations), so that a failover does not undo them; fails as
    /// unreachable otherwise, for the caller to send the invalidation again.
    async fn replicated(&self, keys: &[String]) -> Result<(), StoreError> {
        if self.min_replicas == 0 {
            return Ok(());
        }
        // Outside a cluster every key lives on the one master.
        let nodes = if self.connection.is_cluster() {
            keys.len()
        } else {
            1
        };
        for key in &keys[..nodes.min(keys.len())] {
            let acknowledged = self.acknowledged(key).await?;
            if acknowledged < self.min_replicas {
                return Err(StoreError::with_kind(
                    StoreErrorKind::Unreachable,
                    Unreplicated {
                        acknowledged,
                        required: self.min_replicas,
                    },
                ));
            }
        }
        Ok(())
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
