//! The instance's one pub/sub connection, and the local waiters it wakes.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use futures_util::{StreamExt, future::Either};
use redis::{Client, PushInfo, PushKind, Value, sentinel::SentinelClient};
use tokio::sync::{Notify, mpsc::UnboundedReceiver};

use super::{Inner, scripts::Announce};
use crate::{key::Fingerprint, store::Invalidation};

impl Inner {
    /// The local waiters' wake-up of `key`, created on first use. With sharded completions,
    /// the first waiter of a key subscribes to its channel before it returns, so that the
    /// caller's first read comes after the subscription (no wake-up is lost); a failed
    /// subscription leaves the waiters to their polling.
    pub(super) async fn waiter(&self, key: &Fingerprint) -> Arc<Notify> {
        let (notify, first) = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let first = !waiters.contains_key(key);
            (waiters.entry(*key).or_default().clone(), first)
        };
        if first && self.announce == Announce::Sharded {
            let channel = self.names.key(key, "done");
            let subscribe = async {
                match self.connection.cluster_connection().await {
                    Some(connection) => connection?.ssubscribe(&channel).await,
                    None => Ok(()),
                }
            };
            if let Err(error) = self.run(subscribe).await {
                tracing::debug!(%error, "subscribing to a completion channel failed: polling");
            }
        }
        notify
    }

    /// Drops the wake-up of `key` once its last waiter is gone (and, with sharded
    /// completions, its subscription, in the background).
    pub(super) fn forget_waiter(self: &Arc<Self>, key: &Fingerprint, notify: Arc<Notify>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: ours and the map's.
        if Arc::strong_count(&notify) > 2 {
            return;
        }
        waiters.remove(key);
        drop(waiters);
        if self.announce == Announce::Sharded {
            let (inner, channel) = (self.clone(), self.names.key(key, "done"));
            tokio::spawn(async move {
                let unsubscribe = async {
                    match inner.connection.cluster_connection().await {
                        Some(connection) => connection?.sunsubscribe(&channel).await,
                        None => Ok(()),
                    }
                };
                if let Err(error) = inner.run(unsubscribe).await {
                    tracing::debug!(%error, "unsubscribing from a completion channel failed");
                }
            });
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

/// Where the pub/sub connection comes from.
pub(super) enum Source {
    Standalone(Client),
    /// The master the sentinels name when the connection is made (after a failover, the
    /// new one; messages published on a master reach its replicas' subscribers too).
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
    /// The push messages of the store's cluster connection (RESP3), which subscribes again
    /// by itself after reconnections and topology changes.
    Cluster(UnboundedReceiver<PushInfo>),
}

/// The instance's one pub/sub connection: pattern-subscribed to every completion channel and
/// subscribed to invalidations; reconnects with a growing delay while Redis is away. Exits
/// when the store is dropped.
pub(super) async fn subscribe_loop(store: Weak<Inner>, source: Source) {
    let client = match source {
        Source::Standalone(client) => Either::Left(client),
        Source::Sentinel(sentinels) => Either::Right(sentinels),
        Source::Cluster(pushes) => return cluster_loop(store, pushes).await,
    };
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(inner) = store.upgrade() else {
            return;
        };
        let connect = async {
            let client = match &client {
                Either::Left(client) => client.clone(),
                Either::Right(sentinels) => sentinels.lock().await.async_get_client().await?,
            };
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(inner.names.done_pattern()).await?;
            pubsub.subscribe(inner.names.invalidate_channel()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let connected = tokio::time::timeout(Duration::from_secs(1), connect).await;
        let mut pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                if let Ok(Err(error)) = failed {
                    tracing::debug!(%error, "redis pub/sub connection failed");
                }
                drop(inner);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        inner.subscribed(true);
        let weak = Arc::downgrade(&inner);
        drop(inner);
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            inner.dispatch(message.get_channel_name(), message.get_payload_bytes());
        }
        drop(messages);
        if let Some(inner) = weak.upgrade() {
            inner.subscribed(false);
        }
    }
}

/// The cluster's pub/sub: subscribes to invalidations through the store's cluster connection
/// (retrying until the cluster answers), then dispatches its push messages, the sharded
/// completion messages of the keys that waiters subscribed to included.
async fn cluster_loop(store: Weak<Inner>, mut pushes: UnboundedReceiver<PushInfo>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(inner) = store.upgrade() else {
            return;
        };
        let subscribe = async {
            let Some(connection) = inner.connection.cluster_connection().await else {
                unreachable!("a cluster source comes with a cluster connection")
            };
            let mut connection = connection?;
            connection.psubscribe(inner.names.done_pattern()).await?;
            connection
                .subscribe(inner.names.invalidate_channel())
                .await?;
            Ok::<_, redis::RedisError>(())
        };
        match tokio::time::timeout(Duration::from_secs(1), subscribe).await {
            Ok(Ok(())) => break,
            failed => {
                if let Ok(Err(error)) = failed {
                    tracing::debug!(%error, "redis cluster subscription failed");
                }
                drop(inner);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    if let Some(inner) = store.upgrade() {
        inner.subscribed(true);
    }
    while let Some(push) = pushes.recv().await {
        let Some(inner) = store.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::PMessage => {
                // pattern, channel, payload
                if let [_, channel, payload] = &push.data[..] {
                    inner.dispatch(text(channel), bytes(payload));
                }
            }
            PushKind::Message | PushKind::SMessage => {
                if let [channel, payload] = &push.data[..] {
                    inner.dispatch(text(channel), bytes(payload));
                }
            }
            // A node connection dropped: messages may be lost until the cluster connection
            // has subscribed again, which it confirms.
            PushKind::Disconnection => inner.subscribed(false),
            PushKind::Subscribe => inner.subscribed(true),
            _ => {}
        }
    }
}

fn bytes(value: &Value) -> &[u8] {
    match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(text) => text.as_bytes(),
        _ => &[],
    }
}

fn text(value: &Value) -> &str {
    std::str::from_utf8(bytes(value)).unwrap_or_default()
}

impl Inner {
    /// Records whether messages arrive; on (re)subscription, lets every waiter read again,
    /// since messages sent while unsubscribed are lost.
    fn subscribed(&self, subscribed: bool) {
        let was = self.subscribed.swap(subscribed, Ordering::AcqRel);
        if subscribed {
            tracing::debug!(topology = self.topology, "redis pub/sub subscribed");
            self.wake_all();
        } else if was {
            tracing::debug!(topology = self.topology, "redis pub/sub connection lost");
        }
    }

    /// Wakes the waiters of a completion channel, or applies an invalidation.
    fn dispatch(&self, channel: &str, payload: &[u8]) {
        if let Some(key) = self.names.parse_done(channel) {
            self.wake(&key);
        } else if channel == self.names.invalidate_channel() {
            let payload = String::from_utf8_lossy(payload);
            let invalidation = match payload.split_once(' ') {
                Some(("key", hex)) => Fingerprint::from_hex(hex).map(Invalidation::Key),
                Some(("group", hex)) => Fingerprint::from_hex(hex).map(Invalidation::Group),
                _ => None,
            };
            if let Some(invalidation) = invalidation {
                let listeners = self
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
}
