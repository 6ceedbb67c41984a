//! The instance's one pub/sub connection, and the local waiters it wakes.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::sync::Notify;

use super::Inner;
use crate::{key::Fingerprint, store::Invalidation};

impl Inner {
    /// The local waiters' wake-up of `key`, created on first use.
    pub(super) fn waiter(&self, key: &Fingerprint) -> Arc<Notify> {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*key)
            .or_default()
            .clone()
    }

    /// Drops the wake-up of `key` once its last waiter is gone.
    pub(super) fn forget_waiter(&self, key: &Fingerprint, notify: Arc<Notify>) {
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

/// The instance's one pub/sub connection: pattern-subscribed to every completion channel and
/// subscribed to invalidations; reconnects with a growing delay while Redis is away. Exits
/// when the store is dropped.
pub(super) async fn subscribe_loop(store: Weak<Inner>) {
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
                    Some(("key", hex)) => Fingerprint::from_hex(hex).map(Invalidation::Key),
                    Some(("group", hex)) => Fingerprint::from_hex(hex).map(Invalidation::Group),
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
