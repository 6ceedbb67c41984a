//! [`Connection`]: the store's command connection, over a standalone Redis, a Sentinel-managed
//! master or a Redis Cluster.
//!
//! Every topology speaks the same protocol (the same scripts on the same keys); only how a
//! command reaches the node that owns its key differs:
//!
//! - **standalone**: one [`ConnectionManager`], which reconnects in the background;
//! - **Sentinel**: a connection manager to the master the sentinels name, asked again when
//!   the master stops answering as one (refused, gone, `READONLY` after a failover);
//! - **Cluster**: a [`ClusterConnection`] (RESP3), which routes each command to its slot's
//!   master and follows `MOVED` and failovers itself.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::{
    Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
    sentinel::SentinelClient,
};

use crate::store::{StoreError, StoreErrorKind};

/// The store's command connection; cheap to clone, clones share it.
#[derive(Clone)]
pub(super) struct Connection(Arc<Link>);

// One per store, behind an `Arc`: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Link {
    Standalone(ConnectionManager),
    Sentinel(SentinelLink),
    Cluster(ClusterLink),
}

/// The master the sentinels named last, and how to ask them again.
pub(super) struct SentinelLink {
    sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
    config: ConnectionManagerConfig,
    /// The manager of the current master, and a number that changes with each new one.
    current: Mutex<Option<(ConnectionManager, u64)>>,
    next: Mutex<u64>,
}

/// A cluster connection, made on first use (the store starts while the cluster is down).
pub(super) struct ClusterLink {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

impl Connection {
    /// A connection to the standalone Redis of `client`.
    pub(super) fn standalone(client: Client, config: ConnectionManagerConfig) -> RedisResult<Self> {
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self(Arc::new(Link::Standalone(manager))))
    }

    /// A connection to the master that `sentinels` name.
    pub(super) fn sentinel(
        sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
        config: ConnectionManagerConfig,
    ) -> Self {
        Self(Arc::new(Link::Sentinel(SentinelLink {
            sentinels,
            config,
            current: Mutex::new(None),
            next: Mutex::new(0),
        })))
    }

    /// A connection to the cluster of `client`.
    pub(super) fn cluster(client: ClusterClient) -> Self {
        Self(Arc::new(Link::Cluster(ClusterLink {
            client,
            connection: tokio::sync::OnceCell::new(),
        })))
    }

    /// Whether the store runs on a cluster (its keys live on several masters).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(&*self.0, Link::Cluster(_))
    }

    /// The cluster connection, when the store runs on a cluster (for subscriptions).
    pub(super) async fn cluster_connection(&self) -> Option<RedisResult<ClusterConnection>> {
        match &*self.0 {
            Link::Cluster(link) => Some(link.connection().await),
            _ => None,
        }
    }

    /// Runs `WAIT replicas timeout` on the node that holds `key` (the master its slot lives
    /// on, in a cluster), on the connection that wrote it: how many replicas acknowledged
    /// every write made through this connection so far.
    pub(super) async fn wait_for_replicas(
        &self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<u32> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout.as_millis().max(1) as u64);
        match &*self.0 {
            Link::Cluster(link) => {
                let mut connection = link.connection().await?;
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let value = connection.route_command(wait, routing).await?;
                redis::from_redis_value(value).map_err(RedisError::from)
            }
            _ => wait.query_async(&mut self.clone()).await,
        }
    }
}

impl ClusterLink {
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl SentinelLink {
    /// The current master's manager, asking the sentinels when there is none.
    async fn manager(&self) -> RedisResult<(ConnectionManager, u64)> {
        if let Some(current) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(current);
        }
        let mut sentinels = self.sentinels.lock().await;
        // Another command may have asked while this one waited for the lock.
        if let Some(current) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(current);
        }
        let client = sentinels.async_get_client().await?;
        drop(sentinels);
        let manager = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        let id = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Ok(current.get_or_insert((manager, id)).clone())
    }

    /// Forgets master `id` after an error that says it is no master any more, so that the
    /// next command asks the sentinels.
    fn forget(&self, id: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|(_, current)| *current == id) {
            *current = None;
        }
    }

    /// Sends one command or pipeline to the master; after a failover (the old master refuses
    /// connections, or answers `READONLY` as a replica), asks the sentinels for the new one
    /// and sends it once more. Both errors mean the command did not run, so it never runs
    /// twice.
    async fn send<'a, T>(
        &self,
        send: impl Fn(ConnectionManager) -> RedisFuture<'a, T>,
    ) -> RedisResult<T> {
        let (manager, id) = self.manager().await?;
        match send(manager).await {
            Err(error) if not_sent(&error) || moved_master(&error) => {
                self.forget(id);
                let (manager, _) = self.manager().await?;
                send(manager).await
            }
            Err(error) => {
                if error.is_io_error() || error.is_connection_dropped() {
                    // Perhaps sent: not again; the next command asks the sentinels.
                    self.forget(id);
                }
                Err(error)
            }
            ok => ok,
        }
    }
}

/// The command was never sent: no connection could be made.
fn not_sent(error: &RedisError) -> bool {
    error.is_connection_refusal()
}

/// The node answered as a replica, or as a master that cannot take writes: the master moved.
fn moved_master(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

/// A store error of the kind `error` is: unreachable when no connection or master answered.
pub(super) fn store_error(error: RedisError) -> StoreError {
    let kind = if error.is_timeout() {
        StoreErrorKind::Timeout
    } else if error.is_connection_refusal()
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_cluster_error()
        || moved_master(&error)
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::EmptySentinelList
        )
    {
        StoreErrorKind::Unreachable
    } else {
        StoreErrorKind::Backend
    };
    StoreError::with_kind(kind, error)
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match &*self.0 {
                // The manager reconnects only after a command failed, so while Redis was away
                // its connection is a stored refusal: without one retry the first command
                // after Redis came back fails too (and the breaker's one trial after its
                // cool-down is wasted). A refused connection sent nothing.
                Link::Standalone(manager) => {
                    let mut manager = manager.clone();
                    match manager.req_packed_command(cmd).await {
                        Err(error) if not_sent(&error) => manager.req_packed_command(cmd).await,
                        result => result,
                    }
                }
                Link::Sentinel(link) => {
                    link.send(|mut manager| {
                        Box::pin(async move { manager.req_packed_command(cmd).await })
                    })
                    .await
                }
                Link::Cluster(link) => link.connection().await?.req_packed_command(cmd).await,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match &*self.0 {
                Link::Standalone(manager) => {
                    let mut manager = manager.clone();
                    match manager.req_packed_commands(pipeline, offset, count).await {
                        Err(error) if not_sent(&error) => {
                            manager.req_packed_commands(pipeline, offset, count).await
                        }
                        result => result,
                    }
                }
                Link::Sentinel(link) => {
                    link.send(|mut manager| {
                        Box::pin(async move {
                            manager.req_packed_commands(pipeline, offset, count).await
                        })
                    })
                    .await
                }
                Link::Cluster(link) => {
                    link.connection()
                        .await?
                        .req_packed_commands(pipeline, offset, count)
                        .await
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        match &*self.0 {
            Link::Standalone(manager) => manager.get_db(),
            Link::Sentinel(_) | Link::Cluster(_) => 0,
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topology = match &*self.0 {
            Link::Standalone(_) => "standalone",
            Link::Sentinel(_) => "sentinel",
            Link::Cluster(_) => "cluster",
        };
        f.debug_tuple("Connection").field(&topology).finish()
    }
}
