//! [`RedisCredentialStore`]: one credential on the Redis of a [`RedisStore`], sealed under
//! its secret, locked with its election.
//!
//! Keys, all with the credential's fingerprint (a hash of its name) as hash tag, so that a
//! script over them touches one cluster slot:
//!
//! | name | value |
//! |---|---|
//! | `{prefix}:{fp}:cgen` | the generation (plain, for the compare-and-swap) |
//! | `{prefix}:{fp}:cred` | the session (tokens with their expiry, or how it ended), sealed (XChaCha20-Poly1305) under the store's secret, binding the generation |
//! | `{prefix}:{fp}:lock` | the refresh lock: the store's election (`SET NX PX` with a fence) |
//!
//! A swap announces itself on `{prefix}:{fp}:done` as the store's own completions are
//! announced (`PUBLISH`, or `SPUBLISH` in a cluster), which the store's pub/sub turns into a
//! wake-up of this process's waiters; waiters also poll.

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::Script;
use tokio::time::Instant;

use super::{CredentialStore, Swapped};
use crate::{
    client::{
        error::Reason,
        session::{Session, Snapshot, Tokens},
    },
    key::Fingerprint,
    store::{Election, Fence, RedisStore, Store, StoreError, StoreFuture},
};

/// The kind byte sealed credentials are bound to (the protocol's own values use 0 and 1).
const KIND_CREDENTIALS: u8 = 0x43;
/// The version of the plaintext format.
const FORMAT: u8 = 1;

/// A [`CredentialStore`] on Redis: processes that build it over the same Redis, prefix,
/// secret and name share one credential, and refresh it once between them.
///
/// It reuses a [`RedisStore`]'s connection (standalone, Sentinel or Cluster), command budget,
/// sealing and election lock; build that store as for the server side (the secret of at
/// least 32 bytes must be the same in every process). Tokens are never stored in the clear.
///
/// ```no_run
/// use tower_refresh_coalesce::{client::{Credentials, store::RedisCredentialStore}, store::RedisStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let store = RedisStore::standalone(redis, b"a deployment secret of 32 bytes!").build()?;
/// let credentials = Credentials::shared(RedisCredentialStore::new(&store, "billing-service"));
/// # let _ = credentials;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisCredentialStore {
    store: RedisStore,
    key: Fingerprint,
    name: String,
    life: Duration,
    scripts: std::sync::Arc<Scripts>,
}

impl RedisCredentialStore {
    /// The credential `name` in `store`'s Redis.
    pub fn new(store: &RedisStore, name: &str) -> Self {
        let mut input = b"tower-refresh-coalesce client credential\0".to_vec();
        input.extend_from_slice(name.as_bytes());
        Self {
            store: store.clone(),
            key: Fingerprint::of(input),
            name: name.to_owned(),
            life: Duration::from_secs(30 * 86_400),
            scripts: std::sync::Arc::new(Scripts::new(store.announce_command())),
        }
    }

    /// How long the stored credential lives after its last change: a refresh token that is
    /// not used for this long is forgotten. Default: 30 days.
    #[must_use]
    pub fn life(mut self, life: Duration) -> Self {
        self.life = life.max(Duration::from_millis(1));
        self
    }

    fn name_of(&self, suffix: &str) -> String {
        self.store.key_name(&self.key, suffix)
    }

    /// The snapshot `sealed` holds at `generation`, if any.
    fn open(&self, generation: u64, sealed: &[u8]) -> Result<Option<Snapshot>, StoreError> {
        if sealed.is_empty() {
            return Ok(None);
        }
        let Some((bound, expires_ms, plain)) =
            self.store.open_value(&self.key, KIND_CREDENTIALS, sealed)
        else {
            return Err(StoreError::new(
                "the stored credential does not open with this store's secret",
            ));
        };
        if bound != generation || expires_ms <= unix_ms() {
            return Err(StoreError::new(
                "the stored credential does not match its generation",
            ));
        }
        let session =
            decode(&plain).ok_or_else(|| StoreError::new("the stored credential is malformed"))?;
        Ok(Some(Snapshot::new(generation, session)))
    }

    async fn read(&self) -> Result<Option<Snapshot>, StoreError> {
        let mut connection = self.store.commands();
        let (generation, sealed): (u64, Vec<u8>) = self
            .store
            .run_command(
                self.scripts
                    .load
                    .key(self.name_of("cgen"))
                    .key(self.name_of("cred"))
                    .invoke_async(&mut connection),
            )
            .await?;
        self.open(generation, &sealed)
    }
}

struct Scripts {
    /// KEYS: cgen, cred. Returns `{generation, sealed or ''}`.
    load: Script,
    /// KEYS: cgen, cred. ARGV: expected, next generation, sealed, life ms, channel. Stores
    /// and announces if the generation is the expected one: `{1, next, ''}`; else
    /// `{0, generation, sealed or ''}`.
    swap: Script,
}

impl Scripts {
    /// The scripts, announcing a swap with `announce` (`PUBLISH`, or `SPUBLISH` in a
    /// cluster), as the store's own scripts do.
    fn new(announce: &str) -> Self {
        Self {
            load: Script::new(
                r"return {tonumber(redis.call('GET', KEYS[1]) or '0'), redis.call('GET', KEYS[2]) or ''}",
            ),
            swap: Script::new(&format!(
                r"local g = tonumber(redis.call('GET', KEYS[1]) or '0')
                  if g ~= tonumber(ARGV[1]) then return {{0, g, redis.call('GET', KEYS[2]) or ''}} end
                  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
                  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
                  redis.call('{announce}', ARGV[5], 'credentials')
                  return {{1, tonumber(ARGV[2]), ''}}"
            )),
        }
    }
}

impl CredentialStore for RedisCredentialStore {
    fn load(&self) -> StoreFuture<'_, Option<Snapshot>> {
        Box::pin(self.read())
    }

    fn swap<'a>(&'a self, expected: u64, next: &'a Snapshot) -> StoreFuture<'a, Swapped> {
        Box::pin(async move {
            let life_ms = self.life.as_millis().max(1) as u64;
            let sealed = self.store.seal_value(
                &self.key,
                KIND_CREDENTIALS,
                next.generation,
                unix_ms().saturating_add(life_ms),
                &encode(&next.session),
            );
            let mut connection = self.store.commands();
            let (done, generation, current): (i64, u64, Vec<u8>) = self
                .store
                .run_command(
                    self.scripts
                        .swap
                        .key(self.name_of("cgen"))
                        .key(self.name_of("cred"))
                        .arg(expected)
                        .arg(next.generation)
                        .arg(sealed)
                        .arg(life_ms)
                        .arg(self.name_of("done"))
                        .invoke_async(&mut connection),
                )
                .await?;
            if done == 1 {
                return Ok(Swapped::Done);
            }
            Ok(Swapped::Conflict(self.open(generation, &current)?))
        })
    }

    fn lock<'a>(&'a self, fence: &'a Fence, lease: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            match self.store.elect(&self.key, fence, lease).await? {
                Election::Won { .. } => {
                    // As a leader of the server side does: wait for the replicas, so that a
                    // failover keeps the lock. A lock they did not acknowledge in time goes
                    // on.
                    if !self.store.replicate(&self.key).await.unwrap_or(false) {
                        tracing::debug!("the credential lock was not replicated in time");
                    }
                    Ok(true)
                }
                // Held by another process (`Replay` is for the keys of refresh results, which
                // this one is not: it counts as held).
                _ => Ok(false),
            }
        })
    }

    fn unlock<'a>(&'a self, fence: &'a Fence) -> StoreFuture<'a, ()> {
        self.store.release(&self.key, fence)
    }

    fn wait(&self, after: u64, deadline: Instant) -> StoreFuture<'_, Option<Snapshot>> {
        Box::pin(async move {
            let notify = self.store.wake_up(&self.key).await;
            let result = loop {
                // Registered before the read: a swap between the read and the wait wakes us.
                let woken = notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                match self.read().await {
                    Ok(Some(snapshot)) if snapshot.generation > after => break Ok(Some(snapshot)),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!(%error, "reading the credential store failed while waiting")
                    }
                }
                if Instant::now() >= deadline {
                    break Ok(None);
                }
                let poll = (Instant::now() + self.store.poll_interval()).min(deadline);
                let sleep = std::pin::pin!(tokio::time::sleep_until(poll));
                futures_util::future::select(woken, sleep).await;
            };
            self.store.forget_wake_up(&self.key, notify);
            result
        })
    }
}

impl fmt::Debug for RedisCredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCredentialStore")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("life", &self.life)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The plaintext of a session: `FORMAT`, a tag, then for active tokens the access token,
/// the refresh token (flag and bytes), the expiry in Unix milliseconds and the lifetime in
/// milliseconds (0 and 0 for no known expiry); strings are length-prefixed (`u32`, big
/// endian).
fn encode(session: &Session) -> Vec<u8> {
    let mut out = vec![FORMAT];
    match session {
        Session::Empty => out.push(0),
        Session::Ended(Reason::Refused) => out.push(3),
        Session::Ended(_) => out.push(2),
        Session::Active(tokens) => {
            out.push(1);
            put(&mut out, tokens.access_token().as_bytes());
            match tokens.refresh_token() {
                Some(refresh) => {
                    out.push(1);
                    put(&mut out, refresh.as_bytes());
                }
                None => out.push(0),
            }
            let (expires_ms, lifetime_ms) = match tokens.expires_at() {
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now()).as_millis() as u64;
                    (
                        unix_ms().saturating_add(left).max(1),
                        tokens.lifetime().as_millis() as u64,
                    )
                }
                None => (0, 0),
            };
            out.extend_from_slice(&expires_ms.to_be_bytes());
            out.extend_from_slice(&lifetime_ms.to_be_bytes());
        }
    }
    out
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn decode(mut plain: &[u8]) -> Option<Session> {
    fn take<'a>(plain: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = plain.split_at_checked(n)?;
        *plain = rest;
        Some(head)
    }
    fn word(plain: &mut &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(take(plain, 8)?.try_into().ok()?))
    }
    fn text(plain: &mut &[u8]) -> Option<String> {
        let len = u32::from_be_bytes(take(plain, 4)?.try_into().ok()?) as usize;
        String::from_utf8(take(plain, len)?.to_vec()).ok()
    }
    let [FORMAT, tag] = take(&mut plain, 2)? else {
        return None;
    };
    let session = match tag {
        0 => Session::Empty,
        2 => Session::Ended(Reason::Cleared),
        3 => Session::Ended(Reason::Refused),
        1 => {
            let access = text(&mut plain)?;
            let refresh = match take(&mut plain, 1)? {
                [0] => None,
                [1] => Some(text(&mut plain)?),
                _ => return None,
            };
            let (expires_ms, lifetime_ms) = (word(&mut plain)?, word(&mut plain)?);
            let mut tokens = Tokens::new(access).ok()?;
            if let Some(refresh) = refresh {
                tokens = tokens.with_refresh_token(refresh);
            }
            if expires_ms != 0 {
                let left = Duration::from_millis(expires_ms.saturating_sub(unix_ms()));
                tokens = tokens
                    .restore_expiry(Instant::now() + left, Duration::from_millis(lifetime_ms));
            }
            Session::Active(tokens)
        }
        _ => return None,
    };
    plain.is_empty().then_some(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_session_survives_its_encoding() {
        let tokens = Tokens::new("access")
            .unwrap()
            .with_refresh_token("refresh")
            .expires_in(Duration::from_secs(600));
        let Some(Session::Active(back)) = decode(&encode(&Session::Active(tokens))) else {
            panic!("active tokens decode");
        };
        assert_eq!(back.access_token(), "access");
        assert_eq!(back.refresh_token(), Some("refresh"));
        assert_eq!(back.lifetime(), Duration::from_secs(600));
        let left = back.expires_at().unwrap() - Instant::now();
        assert!(
            left > Duration::from_secs(598) && left <= Duration::from_secs(600),
            "{left:?}"
        );
        for session in [
            Session::Empty,
            Session::Ended(Reason::Cleared),
            Session::Ended(Reason::Refused),
        ] {
            let back = decode(&encode(&session)).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{session:?}"));
        }
        let mut bad = encode(&Session::Ended(Reason::Cleared));
        bad.push(0);
        assert!(decode(&bad).is_none(), "trailing bytes");
        assert!(
            decode(&[FORMAT, 1, 0, 0, 0, 9, b'x']).is_none(),
            "truncated"
        );
    }
}
