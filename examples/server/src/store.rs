//! The SQLite token store: users, token families and hashed refresh tokens.
//!
//! One [`rusqlite::Connection`] sits behind a [`std::sync::Mutex`]; every method blocks, so
//! async code calls them inside [`tokio::task::spawn_blocking`]. Writes that must be atomic
//! across processes sharing one database file run in `BEGIN IMMEDIATE` transactions, which
//! take SQLite's write lock up front (waiting up to the busy timeout for other writers).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::crypto;

/// How long a connection waits for another connection's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    name          TEXT PRIMARY KEY,
    salt          BLOB NOT NULL,
    iterations    INTEGER NOT NULL,
    password_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    id          TEXT PRIMARY KEY,
    salt        BLOB NOT NULL,
    iterations  INTEGER NOT NULL,
    secret_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS families (
    id         TEXT PRIMARY KEY,
    subject    TEXT NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    client_id  TEXT
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    family_id  TEXT NOT NULL REFERENCES families(id),
    subject    TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('active', 'rotated', 'revoked')),
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_by_family ON refresh_tokens(family_id);
";

/// Columns added after the first release, as `(table, column, definition)`: a database
/// created before them gets them with `ALTER TABLE ... ADD COLUMN` when it is opened.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // The confidential client a family is bound to; NULL for a public client.
    ("families", "client_id", "TEXT"),
];

/// A database error, with SQLite's "busy"/"locked" (another writer held the lock past the
/// busy timeout) told apart so it can be answered with `503` instead of `500`.
#[derive(Debug)]
pub struct StoreError(rusqlite::Error);

impl StoreError {
    /// True when the error is a lock timeout rather than a real failure.
    pub fn is_busy(&self) -> bool {
        matches!(
            self.0.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database error: {}", self.0)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self(e)
    }
}

/// The result of presenting a refresh token for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The token was active; it is now `rotated` and the new token is stored.
    Rotated,
    /// No such token (never issued here, or purged).
    Unknown,
    /// The stored token has expired.
    Expired,
    /// The token's family was revoked (logout or earlier reuse detection).
    FamilyRevoked,
    /// The token was already used: its whole family has just been revoked.
    ReuseDetected,
    /// The stored row disagrees with the token's claims, or another writer won the
    /// compare-and-swap (impossible under `BEGIN IMMEDIATE`, checked anyway).
    Conflict,
    /// The family belongs to another client than the one presenting the token. Nothing was
    /// written: the token is not consumed and the family not revoked.
    WrongClient,
    /// The family belongs to a confidential client and the request authenticated no
    /// client. Nothing was written.
    ClientRequired,
}

/// Who presents a token, as far as client authentication could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presenter {
    /// The request named no client.
    Anonymous,
    /// The request named a client that is not registered (a public client: its id is only
    /// a claim, so it binds nothing).
    Public,
    /// A confidential client that authenticated with its secret.
    Confidential(String),
}

impl Presenter {
    /// The client a family started by this presenter is bound to.
    pub fn bound_client(&self) -> Option<&str> {
        match self {
            Presenter::Confidential(id) => Some(id),
            Presenter::Anonymous | Presenter::Public => None,
        }
    }

    /// Whether this presenter may use a token of a family bound to `family_client`:
    /// `Ok` when it may, otherwise what to answer.
    fn check(&self, family_client: Option<&str>) -> Result<(), ClientMismatch> {
        match (family_client, self) {
            (None, Presenter::Anonymous | Presenter::Public) => Ok(()),
            (Some(bound), Presenter::Confidential(id)) if bound == id => Ok(()),
            (Some(_), Presenter::Anonymous) => Err(ClientMismatch::Required),
            _ => Err(ClientMismatch::Wrong),
        }
    }
}

/// Why a presenter may not use a family's token.
#[derive(Debug)]
enum ClientMismatch {
    Wrong,
    Required,
}

/// The result of checking a client's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCheck {
    /// No client of that id is registered: a public client.
    Public,
    /// A confidential client, and the secret is right.
    Authenticated,
    /// A confidential client, and the secret is wrong or missing.
    Refused,
}

/// The result of a logout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The family is revoked now (it may have been revoked before: logout is idempotent).
    Revoked,
    /// No such token, or the stored row disagrees with the token's claims.
    Unknown,
    /// The family belongs to another client (nothing was written).
    WrongClient,
    /// The family belongs to a confidential client and the request authenticated no
    /// client (nothing was written).
    ClientRequired,
}

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

struct TokenRow {
    family_id: String,
    subject: String,
    status: String,
    expires_at: i64,
    family_revoked: bool,
    family_client: Option<String>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, or a private in-memory database,
    /// and creates the schema.
    ///
    /// A file database is switched to WAL mode with a busy timeout of [`BUSY_TIMEOUT`], so
    /// several processes can share it.
    pub fn open(path: Option<&Path>) -> Result<Self, StoreError> {
        let conn = match path {
            Some(path) => {
                let conn = Connection::open(path)?;
                conn.busy_timeout(BUSY_TIMEOUT)?;
                // Returns the resulting mode as a row, hence `query_row`.
                let _mode: String =
                    conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                conn
            }
            None => Connection::open_in_memory()?,
        };
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Self {
            conn: Mutex::new(conn),
        };
        store.with_immediate(|tx| {
            tx.execute_batch(SCHEMA)?;
            add_missing_columns(tx)
        })?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the transaction rolls
        // back on drop), so a poisoned lock is still usable.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with_immediate<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Returns the deployment secret kept in the database, creating a random 32-byte one
    /// on first use. Processes sharing one database file therefore agree on it.
    pub fn load_or_create_secret(&self) -> Result<Vec<u8>, StoreError> {
        let candidate = crypto::random_bytes::<32>();
        self.with_immediate(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO settings (key, value) VALUES ('secret', ?1)",
                params![&candidate[..]],
            )?;
            tx.query_row(
                "SELECT value FROM settings WHERE key = 'secret'",
                [],
                |row| row.get(0),
            )
        })
    }

    /// True when a user of that name exists.
    pub fn user_exists(&self, name: &str) -> Result<bool, StoreError> {
        let conn = self.lock();
        let found = conn
            .query_row("SELECT 1 FROM users WHERE name = ?1", [name], |_| Ok(()))
            .optional()?;
        Ok(found.is_some())
    }

    /// Creates a user, or replaces its password when it exists and `replace` is set.
    pub fn put_user(&self, name: &str, password: &str, replace: bool) -> Result<(), StoreError> {
        let salt = crypto::random_bytes::<{ crypto::SALT_LEN }>();
        let iterations = crypto::PASSWORD_ITERATIONS;
        let hash = crypto::pbkdf2_sha256(password.as_bytes(), &salt, iterations);
        let sql = if replace {
            "INSERT INTO users (name, salt, iterations, password_hash) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET salt = excluded.salt,
                 iterations = excluded.iterations, password_hash = excluded.password_hash"
        } else {
            "INSERT OR IGNORE INTO users (name, salt, iterations, password_hash)
             VALUES (?1, ?2, ?3, ?4)"
        };
        self.with_immediate(|tx| {
            tx.execute(sql, params![name, &salt[..], iterations, &hash[..]])
                .map(drop)
        })
    }

    /// Registers a confidential client, or replaces its secret when it exists. The secret
    /// is kept only as a salted PBKDF2-HMAC-SHA256 hash, as passwords are.
    pub fn put_client(&self, id: &str, secret: &str) -> Result<(), StoreError> {
        let salt = crypto::random_bytes::<{ crypto::SALT_LEN }>();
        let iterations = crypto::PASSWORD_ITERATIONS;
        let hash = crypto::pbkdf2_sha256(secret.as_bytes(), &salt, iterations);
        self.with_immediate(|tx| {
            tx.execute(
                "INSERT INTO clients (id, salt, iterations, secret_hash) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET salt = excluded.salt,
                     iterations = excluded.iterations, secret_hash = excluded.secret_hash",
                params![id, &salt[..], iterations, &hash[..]],
            )
            .map(drop)
        })
    }

    /// Checks a client's credentials: an id that is not registered is a public client
    /// (any secret it sends is ignored); a registered one must present its secret, compared
    /// in constant time.
    pub fn verify_client(&self, id: &str, secret: Option<&str>) -> Result<ClientCheck, StoreError> {
        let row: Option<(Vec<u8>, u32, Vec<u8>)> = {
            let conn = self.lock();
            conn.query_row(
                "SELECT salt, iterations, secret_hash FROM clients WHERE id = ?1",
                [id],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?
        };
        let Some((salt, iterations, stored)) = row else {
            return Ok(ClientCheck::Public);
        };
        // Hash outside the lock: it is the slow part. A missing secret costs the same.
        let computed =
            crypto::pbkdf2_sha256(secret.unwrap_or_default().as_bytes(), &salt, iterations);
        Ok(
            if crypto::constant_time_eq(&computed, &stored) && secret.is_some() {
                ClientCheck::Authenticated
            } else {
                ClientCheck::Refused
            },
        )
    }

    /// Checks a password. Unknown users cost the same hashing work as known ones, so the
    /// answer time does not reveal which user names exist.
    pub fn verify_password(&self, name: &str, password: &str) -> Result<bool, StoreError> {
        let row: Option<(Vec<u8>, u32, Vec<u8>)> = {
            let conn = self.lock();
            conn.query_row(
                "SELECT salt, iterations, password_hash FROM users WHERE name = ?1",
                [name],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?
        };
        // Hash outside the lock: it is the slow part.
        Ok(match row {
            Some((salt, iterations, stored)) => {
                let computed = crypto::pbkdf2_sha256(password.as_bytes(), &salt, iterations);
                crypto::constant_time_eq(&computed, &stored)
            }
            None => {
                let _ = crypto::pbkdf2_sha256(
                    password.as_bytes(),
                    &[0u8; crypto::SALT_LEN],
                    crypto::PASSWORD_ITERATIONS,
                );
                false
            }
        })
    }

    /// Starts a new token family (a login) with its first refresh token, bound to the
    /// confidential client `client_id` (`None` for a public client).
    pub fn create_family(
        &self,
        family_id: &str,
        subject: &str,
        client_id: Option<&str>,
        token_hash: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        self.with_immediate(|tx| {
            tx.execute(
                "INSERT INTO families (id, subject, revoked, created_at, client_id)
                 VALUES (?1, ?2, 0, ?3, ?4)",
                params![family_id, subject, to_i64(now), client_id],
            )?;
            insert_token(tx, token_hash, family_id, subject, expires_at, now)
        })
    }

    /// Rotates a refresh token in one `BEGIN IMMEDIATE` transaction.
    ///
    /// `presented_hash` is the hash of the presented (already signature-checked) token,
    /// `family_id` and `subject` its claims, and `new_hash` / `new_expires_at` describe the
    /// replacement token, which is stored only when the rotation succeeds. A token that was
    /// already rotated revokes its whole family, and that revocation is committed.
    ///
    /// The client binding is checked first: a `presenter` that is not the family's client
    /// changes nothing (the token stays active, a used one does not revoke its family), so
    /// whoever holds a stolen token without the client's credentials cannot end the
    /// session.
    #[allow(
        clippy::too_many_arguments,
        reason = "one atomic operation: the token, its claims, who presents it and its successor"
    )]
    pub fn rotate(
        &self,
        presented_hash: &str,
        family_id: &str,
        subject: &str,
        presenter: &Presenter,
        new_hash: &str,
        new_expires_at: u64,
        now: u64,
    ) -> Result<Rotation, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Every early return drops `tx`, which rolls back (nothing was written).
        let Some(row) = find_token(&tx, presented_hash)? else {
            return Ok(Rotation::Unknown);
        };
        if row.family_id != family_id || row.subject != subject {
            return Ok(Rotation::Conflict);
        }
        match presenter.check(row.family_client.as_deref()) {
            Ok(()) => {}
            Err(ClientMismatch::Wrong) => return Ok(Rotation::WrongClient),
            Err(ClientMismatch::Required) => return Ok(Rotation::ClientRequired),
        }
        if row.expires_at <= to_i64(now) {
            return Ok(Rotation::Expired);
        }
        if row.family_revoked {
            return Ok(Rotation::FamilyRevoked);
        }
        match row.status.as_str() {
            "active" => {
                let changed = tx.execute(
                    "UPDATE refresh_tokens SET status = 'rotated'
                     WHERE token_hash = ?1 AND status = 'active'",
                    [presented_hash],
                )?;
                if changed != 1 {
                    return Ok(Rotation::Conflict);
                }
                insert_token(&tx, new_hash, family_id, subject, new_expires_at, now)?;
                tx.commit()?;
                Ok(Rotation::Rotated)
            }
            "rotated" => {
                revoke_family(&tx, family_id, now)?;
                tx.commit()?;
                Ok(Rotation::ReuseDetected)
            }
            _ => Ok(Rotation::FamilyRevoked),
        }
    }

    /// Revokes the family of a presented token (logout). Idempotent. As in [`Store::rotate`]
    /// (and RFC 7009 §2.1), only the family's client may do it.
    pub fn revoke_family_of(
        &self,
        presented_hash: &str,
        family_id: &str,
        subject: &str,
        presenter: &Presenter,
        now: u64,
    ) -> Result<Revocation, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(row) = find_token(&tx, presented_hash)? else {
            return Ok(Revocation::Unknown);
        };
        if row.family_id != family_id || row.subject != subject {
            return Ok(Revocation::Unknown);
        }
        match presenter.check(row.family_client.as_deref()) {
            Ok(()) => {}
            Err(ClientMismatch::Wrong) => return Ok(Revocation::WrongClient),
            Err(ClientMismatch::Required) => return Ok(Revocation::ClientRequired),
        }
        if !row.family_revoked {
            revoke_family(&tx, family_id, now)?;
        }
        tx.commit()?;
        Ok(Revocation::Revoked)
    }

    /// True when the family exists and is revoked (for tests and diagnostics).
    pub fn family_revoked(&self, family_id: &str) -> Result<Option<bool>, StoreError> {
        let conn = self.lock();
        let revoked = conn
            .query_row(
                "SELECT revoked FROM families WHERE id = ?1",
                [family_id],
                |row| row.get::<_, bool>(0),
            )
            .optional()?;
        Ok(revoked)
    }
}

fn find_token(
    tx: &rusqlite::Transaction<'_>,
    token_hash: &str,
) -> rusqlite::Result<Option<TokenRow>> {
    tx.query_row(
        "SELECT t.family_id, t.subject, t.status, t.expires_at, f.revoked, f.client_id
         FROM refresh_tokens t JOIN families f ON f.id = t.family_id
         WHERE t.token_hash = ?1",
        [token_hash],
        |row| {
            Ok(TokenRow {
                family_id: row.get(0)?,
                subject: row.get(1)?,
                status: row.get(2)?,
                expires_at: row.get(3)?,
                family_revoked: row.get(4)?,
                family_client: row.get(5)?,
            })
        },
    )
    .optional()
}

/// Brings a database created by an earlier version up to [`SCHEMA`]. Runs inside the
/// opening `BEGIN IMMEDIATE` transaction, so processes opening one file at once add each
/// column once.
fn add_missing_columns(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    for (table, column, definition) in ADDED_COLUMNS {
        let present: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
            [table, column],
            |row| row.get(0),
        )?;
        if !present {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    Ok(())
}

fn insert_token(
    tx: &rusqlite::Transaction<'_>,
    token_hash: &str,
    family_id: &str,
    subject: &str,
    expires_at: u64,
    now: u64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO refresh_tokens (token_hash, family_id, subject, status, expires_at, created_at)
         VALUES (?1, ?2, ?3, 'active', ?4, ?5)",
        params![token_hash, family_id, subject, to_i64(expires_at), to_i64(now)],
    )
    .map(drop)
}

fn revoke_family(
    tx: &rusqlite::Transaction<'_>,
    family_id: &str,
    now: u64,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE families SET revoked = 1, revoked_at = ?2 WHERE id = ?1",
        params![family_id, to_i64(now)],
    )?;
    tx.execute(
        "UPDATE refresh_tokens SET status = 'revoked' WHERE family_id = ?1 AND status = 'active'",
        [family_id],
    )?;
    Ok(())
}

/// SQLite integers are signed; timestamps past `i64::MAX` saturate.
fn to_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_before_client_binding_gains_the_column_and_keeps_its_families() {
        let path = std::env::temp_dir().join(format!("server-store-{}.db", crypto::random_id()));
        {
            // The families table as the first release created it.
            let conn = Connection::open(&path).expect("create the file");
            conn.execute_batch(
                "CREATE TABLE families (id TEXT PRIMARY KEY, subject TEXT NOT NULL,
                     revoked INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL,
                     revoked_at INTEGER);
                 INSERT INTO families (id, subject, created_at) VALUES ('old', 'demo', 1);",
            )
            .expect("the old schema");
        }
        for _ in 0..2 {
            // Opening twice: the migration runs once and is then a no-op.
            let store = Store::open(Some(&path)).expect("the old database opens");
            assert_eq!(store.family_revoked("old").expect("query"), Some(false));
            let bound: Option<String> = store
                .lock()
                .query_row(
                    "SELECT client_id FROM families WHERE id = 'old'",
                    [],
                    |row| row.get(0),
                )
                .expect("the new column");
            assert_eq!(bound, None, "an old family is a public client's");
        }
        let store = Store::open(Some(&path)).expect("reopens");
        store
            .create_family("new", "demo", Some("app"), "hash", u64::MAX / 2, 1)
            .expect("a bound family");
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }

    #[test]
    fn a_client_secret_is_checked_in_full_and_unknown_clients_are_public() {
        let store = Store::open(None).expect("in memory");
        store.put_client("app", "s3cret").expect("stored");
        let check =
            |id: &str, secret: Option<&str>| store.verify_client(id, secret).expect("query");
        assert_eq!(check("app", Some("s3cret")), ClientCheck::Authenticated);
        for wrong in [Some("s3cre"), Some("s3cret "), Some(""), None] {
            assert_eq!(check("app", wrong), ClientCheck::Refused, "{wrong:?}");
        }
        assert_eq!(check("someone", None), ClientCheck::Public);
        assert_eq!(check("someone", Some("anything")), ClientCheck::Public);
        let stored: Vec<u8> = store
            .lock()
            .query_row(
                "SELECT secret_hash FROM clients WHERE id = 'app'",
                [],
                |row| row.get(0),
            )
            .expect("a row");
        assert_ne!(stored, b"s3cret", "kept hashed");
    }
}
