//! SQLite backend: the embedded default store.
//!
//! One writer connection (SQLite serialises writers anyway) and a few reader connections; WAL
//! mode lets readers proceed while a write commits. `synchronous=FULL` makes every committed
//! transaction durable before the call returns. Blocking calls run on tokio's blocking pool.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::model::*;
use keyward_core::store::{InstanceHold, SecretRead, Store, StoreError};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

const READERS: usize = 4;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE keys (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    algorithm TEXT NOT NULL,
    state TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    current_version INTEGER NOT NULL,
    rotate_every_secs INTEGER,
    next_rotation_at INTEGER,
    deletion_at INTEGER,
    revision INTEGER NOT NULL
);
CREATE INDEX keys_next_rotation ON keys(next_rotation_at) WHERE next_rotation_at IS NOT NULL;
CREATE INDEX keys_deletion ON keys(deletion_at) WHERE deletion_at IS NOT NULL;
CREATE TABLE key_versions (
    key_id BLOB NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    wrapped_material BLOB NOT NULL,
    public_key BLOB,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE secrets (
    path TEXT PRIMARY KEY,
    current_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE secret_versions (
    path TEXT NOT NULL REFERENCES secrets(path) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    wrapped_value BLOB,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER,
    PRIMARY KEY (path, version)
);
CREATE TABLE tokens (
    hash BLOB PRIMARY KEY,
    accessor TEXT NOT NULL UNIQUE,
    policies TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
"#,
    r#"
ALTER TABLE tokens ADD COLUMN parent TEXT;
ALTER TABLE tokens ADD COLUMN ttl_secs INTEGER;
ALTER TABLE tokens ADD COLUMN max_uses INTEGER;
ALTER TABLE tokens ADD COLUMN uses INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    document TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE tokens ADD COLUMN selectors TEXT NOT NULL DEFAULT '';
ALTER TABLE tokens ADD COLUMN max_expires_at INTEGER;
"#,
    r#"
CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL);
"#,
    r#"
CREATE TABLE instance_holds (
    scope TEXT NOT NULL,
    instance TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, instance)
);
"#,
];

struct Inner {
    path: std::path::PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

/// `query_row` through the connection's statement cache: the hot reads (secrets, keys, meta,
/// policies) are parsed and planned once per connection instead of on every call.
fn cached_row<T, P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    params: P,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(params, f)
}

fn backend(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(ref f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        rusqlite::Error::SqliteFailure(ref f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::AlreadyExists
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// [`SqliteStore::open`] as a shared [`Store`] (what an embedding component takes).
    pub fn open_shared(path: &Path) -> Result<std::sync::Arc<dyn Store>, StoreError> {
        Ok(std::sync::Arc::new(Self::open(path)?))
    }

    /// Open (creating if needed) the database at `path` and apply pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // Create the file owner-only before SQLite does; its -wal and -shm files take the same mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        }
        let mut writer = open_conn(path)?;
        migrate(&mut writer)?;
        let readers = (0..READERS).map(|_| open_conn(path).map(Mutex::new)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().map_err(|_| StoreError::Backend("writer lock poisoned".into()))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("blocking task failed: {e}")))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let i = inner.next_reader.fetch_add(1, Ordering::Relaxed) % inner.readers.len().max(1);
            let slot = inner.readers.get(i).ok_or_else(|| StoreError::Backend("no reader".into()))?;
            let conn = slot.lock().map_err(|_| StoreError::Backend("reader lock poisoned".into()))?;
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("blocking task failed: {e}")))?
    }
}

/// Put a snapshot (from [`Store::snapshot`]) in place as the database of `data_dir`, which must
/// be empty or absent: the file is checked to be an intact Keyward database first, and appears
/// under its final name only once it is whole. The server then starts sealed on it, and the
/// same unseal shares (or HSM key) open it.
pub fn restore_snapshot(snapshot: &Path, data_dir: &Path) -> Result<std::path::PathBuf, StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| StoreError::Backend(format!("{what}: {e}"))
    };
    if let Ok(mut entries) = std::fs::read_dir(data_dir)
        && entries.next().is_some()
    {
        return Err(StoreError::Backend(format!(
            "{} is not empty: restore into a new, empty data directory (nothing there is overwritten)",
            data_dir.display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(io(&format!("creating {}", data_dir.display())))?;
    let tmp = data_dir.join(".restore.db");
    let final_path = data_dir.join("keyward.db");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut src = std::fs::File::open(snapshot).map_err(io(&format!("reading {}", snapshot.display())))?;
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&format!("creating {}", tmp.display())))?;
        std::io::copy(&mut src, &mut dst).map_err(io("copying the snapshot"))?;
        dst.sync_all().map_err(io("copying the snapshot"))?;
    }
    let checked = (|| {
        let conn = Connection::open_with_flags(&tmp, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|_| StoreError::Corrupt("the file is not an SQLite database".into()))?;
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|_| StoreError::Corrupt("the file is not an SQLite database".into()))?;
        if ok != "ok" {
            return Err(StoreError::Corrupt(format!("the snapshot is damaged: {ok}")));
        }
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(backend)?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE type='table' AND name IN ('keys','meta')", [], |r| {
                r.get(0)
            })
            .map_err(backend)?;
        if version < 1 || tables != 2 {
            return Err(StoreError::Corrupt("the file is an SQLite database but not a Keyward snapshot".into()));
        }
        if usize::try_from(version).unwrap_or(usize::MAX) > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "the snapshot's schema ({version}) is newer than this Keyward ({}); restore it with a newer Keyward",
                MIGRATIONS.len()
            )));
        }
        Ok(())
    })();
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &final_path).map_err(io("putting the database in place"))?;
    Ok(final_path)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
    let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(backend)?;
    let current = usize::try_from(current).map_err(|_| StoreError::Corrupt("negative schema version".into()))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this Keyward ({}); upgrade Keyward",
            MIGRATIONS.len()
        )));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(m).map_err(backend)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(backend)?;
    }
    tx.commit().map_err(backend)
}

const KEY_COLS: &str = "id, name, algorithm, state, description, created_at, updated_at, current_version, \
                        rotate_every_secs, next_rotation_at, deletion_at, revision";

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<Result<KeyRecord, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let alg: String = r.get(2)?;
    let state: String = r.get(3)?;
    let rotate: Option<i64> = r.get(8)?;
    let cur: i64 = r.get(7)?;
    let rev: i64 = r.get(11)?;
    let rec = (|| {
        Some(KeyRecord {
            id: KeyId(id.try_into().ok()?),
            name: r.get(1).ok()?,
            algorithm: KeyAlgorithm::parse(&alg)?,
            state: KeyState::parse(&state)?,
            description: r.get(4).ok()?,
            created_at: r.get(5).ok()?,
            updated_at: r.get(6).ok()?,
            current_version: u32::try_from(cur).ok()?,
            rotate_every_secs: match rotate {
                Some(v) => Some(u64::try_from(v).ok()?),
                None => None,
            },
            next_rotation_at: r.get(9).ok()?,
            deletion_at: r.get(10).ok()?,
            revision: u64::try_from(rev).ok()?,
        })
    })();
    Ok(rec.ok_or_else(|| StoreError::Corrupt("key row".into())))
}

fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend("value out of range".into()))
}

fn key_params(k: &KeyRecord) -> Result<[Box<dyn rusqlite::ToSql + Send>; 12], StoreError> {
    Ok([
        Box::new(k.id.0.to_vec()),
        Box::new(k.name.clone()),
        Box::new(k.algorithm.as_str()),
        Box::new(k.state.as_str()),
        Box::new(k.description.clone()),
        Box::new(k.created_at),
        Box::new(k.updated_at),
        Box::new(i64::from(k.current_version)),
        Box::new(k.rotate_every_secs.map(i64_of).transpose()?),
        Box::new(k.next_rotation_at),
        Box::new(k.deletion_at),
        Box::new(i64_of(k.revision)?),
    ])
}

fn update_key_tx(tx: &rusqlite::Transaction<'_>, k: &KeyRecord, expected: u64) -> Result<(), StoreError> {
    let p = key_params(k)?;
    let n = tx
        .execute(
            "UPDATE keys SET name=?2, algorithm=?3, state=?4, description=?5, created_at=?6, updated_at=?7, \
             current_version=?8, rotate_every_secs=?9, next_rotation_at=?10, deletion_at=?11, revision=?12 \
             WHERE id=?1 AND revision=?13",
            rusqlite::params_from_iter(
                p.iter()
                    .map(|b| b.as_ref() as &dyn rusqlite::ToSql)
                    .chain([&i64_of(expected)? as &dyn rusqlite::ToSql]),
            ),
        )
        .map_err(backend)?;
    if n == 1 {
        return Ok(());
    }
    let exists: Option<i64> =
        tx.query_row("SELECT 1 FROM keys WHERE id=?1", [k.id.0.to_vec()], |r| r.get(0)).optional().map_err(backend)?;
    Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound })
}

fn version_from_row(r: &Row<'_>) -> rusqlite::Result<Result<KeyVersionRecord, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let v: i64 = r.get(1)?;
    Ok((|| {
        Some(KeyVersionRecord {
            key_id: KeyId(id.try_into().ok()?),
            version: u32::try_from(v).ok()?,
            wrapped_material: r.get(2).ok()?,
            public_key: r.get(3).ok()?,
            created_at: r.get(4).ok()?,
        })
    })()
    .ok_or_else(|| StoreError::Corrupt("key version row".into())))
}

fn secret_version_from_row(r: &Row<'_>) -> rusqlite::Result<Result<SecretVersionRecord, StoreError>> {
    secret_version_from_row_at(r, 0)
}

/// A secret version from the five columns starting at `at` (path, version, wrapped_value,
/// created_at, deleted_at).
fn secret_version_from_row_at(r: &Row<'_>, at: usize) -> rusqlite::Result<Result<SecretVersionRecord, StoreError>> {
    let v: i64 = r.get(at + 1)?;
    Ok(match u32::try_from(v) {
        Ok(version) => Ok(SecretVersionRecord {
            path: r.get(at)?,
            version,
            wrapped_value: r.get(at + 2)?,
            created_at: r.get(at + 3)?,
            deleted_at: r.get(at + 4)?,
        }),
        Err(_) => Err(StoreError::Corrupt("secret version row".into())),
    })
}

/// A secret's current version and one of its versions (the current one when `?2` is NULL), in
/// one statement and so one snapshot.
const READ_SECRET: &str = "SELECT s.current_version, v.path, v.version, v.wrapped_value, v.created_at, v.deleted_at \
     FROM secrets s LEFT JOIN secret_versions v ON v.path = s.path AND v.version = COALESCE(?2, s.current_version) \
     WHERE s.path = ?1";

const TOKEN_COLUMNS: &str = "hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, display_name, selectors, max_expires_at";

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<Result<TokenRecord, StoreError>> {
    let hash: Vec<u8> = r.get(0)?;
    let policies: String = r.get(2)?;
    let ttl: Option<i64> = r.get(6)?;
    let selectors: String = r.get(10)?;
    Ok(match <[u8; 32]>::try_from(hash) {
        Ok(hash) => Ok(TokenRecord {
            hash,
            accessor: r.get(1)?,
            policies: policies.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            created_at: r.get(3)?,
            expires_at: r.get(4)?,
            parent: r.get(5)?,
            ttl_secs: ttl.and_then(|t| u64::try_from(t).ok()),
            max_uses: r.get(7)?,
            uses: r.get(8)?,
            display_name: r.get(9)?,
            selectors: selectors.split('\n').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            max_expires_at: r.get(11)?,
        }),
        Err(_) => Err(StoreError::Corrupt("token row".into())),
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn collect<T>(rows: impl Iterator<Item = rusqlite::Result<Result<T, StoreError>>>) -> Result<Vec<T>, StoreError> {
    rows.map(|r| r.map_err(backend).and_then(|x| x)).collect()
}

#[async_trait]
impl Store for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    async fn snapshot(&self) -> Result<std::fs::File, StoreError> {
        // Written beside the database (in the owner-only data directory), opened, and unlinked
        // before anything is read from it: nothing is left behind, whatever happens next.
        let dir = self.inner.path.parent().map(Path::to_path_buf).unwrap_or_default();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dest = dir.join(format!(".snapshot-{}-{}.db", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&dest);
        let target = dest.clone();
        // One read transaction: a consistent copy while writes go on.
        let copied = self
            .read(move |c| {
                c.execute("VACUUM INTO ?1", [target.to_string_lossy().as_ref()]).map_err(backend)?;
                Ok(())
            })
            .await;
        let opened = copied.and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))
                .and_then(|()| std::fs::File::open(&dest))
                .map_err(|e| StoreError::Backend(format!("reading the snapshot: {e}")))
        });
        let _ = std::fs::remove_file(&dest);
        opened
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.read(move |c| {
            cached_row(c, "SELECT v FROM meta WHERE k=?1", [key], |r| r.get(0)).optional().map_err(backend)
        })
        .await
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(move |c| {
            let n =
                c.execute("INSERT OR IGNORE INTO meta (k, v) VALUES (?1, ?2)", params![key, value]).map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn replace_meta(&self, key: &str, expected: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let (key, expected, value) = (key.to_string(), expected.to_vec(), value.to_vec());
        self.write(move |c| {
            let n = c
                .execute("UPDATE meta SET v=?3 WHERE k=?1 AND v=?2", params![key, expected, value])
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn rewrap_key_version(
        &self,
        id: &KeyId,
        version: u32,
        expected: &[u8],
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let (id, expected, wrapped) = (id.0.to_vec(), expected.to_vec(), wrapped.to_vec());
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE key_versions SET wrapped_material=?4 WHERE key_id=?1 AND version=?2 AND wrapped_material=?3",
                    params![id, version, expected, wrapped],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn create_key(&self, key: &KeyRecord, first: &KeyVersionRecord) -> Result<(), StoreError> {
        let (key, first) = (key.clone(), first.clone());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let p = key_params(&key)?;
            tx.execute(
                &format!("INSERT INTO keys ({KEY_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"),
                rusqlite::params_from_iter(p.iter().map(|b| b.as_ref() as &dyn rusqlite::ToSql)),
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO key_versions (key_id, version, wrapped_material, public_key, created_at) VALUES (?1,?2,?3,?4,?5)",
                params![first.key_id.0.to_vec(), first.version, first.wrapped_material, first.public_key, first.created_at],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            cached_row(c, &format!("SELECT {KEY_COLS} FROM keys WHERE name=?1"), [name], key_from_row)
                .optional()
                .map_err(backend)?
                .transpose()
        })
        .await
    }

    async fn get_key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.0.to_vec();
        self.read(move |c| {
            cached_row(c, &format!("SELECT {KEY_COLS} FROM keys WHERE id=?1"), [id], key_from_row)
                .optional()
                .map_err(backend)?
                .transpose()
        })
        .await
    }

    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let after = after.unwrap_or("").to_string();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!("SELECT {KEY_COLS} FROM keys WHERE name > ?1 ORDER BY name LIMIT ?2"))
                .map_err(backend)?;
            let rows = st.query_map(params![after, limit], key_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn update_key(&self, key: &KeyRecord, expected_revision: u64) -> Result<(), StoreError> {
        let key = key.clone();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            update_key_tx(&tx, &key, expected_revision)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn add_key_version(
        &self,
        key: &KeyRecord,
        version: &KeyVersionRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let (key, v) = (key.clone(), version.clone());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            update_key_tx(&tx, &key, expected_revision)?;
            tx.execute(
                "INSERT INTO key_versions (key_id, version, wrapped_material, public_key, created_at) VALUES (?1,?2,?3,?4,?5)",
                params![v.key_id.0.to_vec(), v.version, v.wrapped_material, v.public_key, v.created_at],
            )
            .map_err(|e| match backend(e) {
                StoreError::AlreadyExists => StoreError::Conflict,
                other => other,
            })?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_key_versions(&self, id: &KeyId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        let id = id.0.to_vec();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT key_id, version, wrapped_material, public_key, created_at FROM key_versions \
                     WHERE key_id=?1 ORDER BY version",
                )
                .map_err(backend)?;
            let rows = st.query_map([id], version_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn keys_due(&self, now: i64, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLS} FROM keys WHERE (state='enabled' AND next_rotation_at <= ?1) \
                     OR (state='pending_deletion' AND deletion_at <= ?1) ORDER BY name LIMIT ?2"
                ))
                .map_err(backend)?;
            let rows = st.query_map(params![now, limit], key_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn delete_key(&self, id: &KeyId, expected_revision: u64) -> Result<(), StoreError> {
        let id = id.0.to_vec();
        let rev = i64_of(expected_revision)?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let n = tx.execute("DELETE FROM keys WHERE id=?1 AND revision=?2", params![id, rev]).map_err(backend)?;
            if n == 0 {
                let exists: Option<i64> =
                    tx.query_row("SELECT 1 FROM keys WHERE id=?1", [&id], |r| r.get(0)).optional().map_err(backend)?;
                return Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound });
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn put_secret_version(&self, v: &SecretVersionRecord, expected_current: u32) -> Result<(), StoreError> {
        let v = v.clone();
        self.write(move |c| {
            if v.version != expected_current.wrapping_add(1) {
                return Err(StoreError::Conflict);
            }
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let cur: Option<i64> = tx
                .query_row("SELECT current_version FROM secrets WHERE path=?1", [&v.path], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            match cur {
                None if expected_current == 0 => {
                    tx.execute(
                        "INSERT INTO secrets (path, current_version, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
                        params![v.path, v.version, v.created_at],
                    )
                    .map_err(backend)?;
                }
                Some(c) if c == i64::from(expected_current) => {
                    tx.execute(
                        "UPDATE secrets SET current_version=?2, updated_at=?3 WHERE path=?1",
                        params![v.path, v.version, v.created_at],
                    )
                    .map_err(backend)?;
                }
                _ => return Err(StoreError::Conflict),
            }
            tx.execute(
                "INSERT INTO secret_versions (path, version, wrapped_value, created_at, deleted_at) VALUES (?1,?2,?3,?4,?5)",
                params![v.path, v.version, v.wrapped_value, v.created_at, v.deleted_at],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_secret(&self, path: &str) -> Result<Option<SecretRecord>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            cached_row(
                c,
                "SELECT path, current_version, created_at, updated_at FROM secrets WHERE path=?1",
                [path],
                |r| {
                    let v: i64 = r.get(1)?;
                    Ok(u32::try_from(v).map(|current_version| SecretRecord {
                        path: r.get(0).unwrap_or_default(),
                        current_version,
                        created_at: r.get(2).unwrap_or_default(),
                        updated_at: r.get(3).unwrap_or_default(),
                    }))
                },
            )
            .optional()
            .map_err(backend)?
            .map(|r| r.map_err(|_| StoreError::Corrupt("secret row".into())))
            .transpose()
        })
        .await
    }

    async fn get_secret_version(&self, path: &str, version: u32) -> Result<Option<SecretVersionRecord>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            cached_row(c,
                "SELECT path, version, wrapped_value, created_at, deleted_at FROM secret_versions WHERE path=?1 AND version=?2",
                params![path, version],
                secret_version_from_row,
            )
            .optional()
            .map_err(backend)?
            .transpose()
        })
        .await
    }

    async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Option<SecretRead>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            let row = cached_row(c, READ_SECRET, params![path, version], |r| {
                let current: i64 = r.get(0)?;
                let found: Option<String> = r.get(1)?;
                let version = match found {
                    Some(_) => Some(secret_version_from_row_at(r, 1)?),
                    None => None,
                };
                Ok((current, version))
            })
            .optional()
            .map_err(backend)?;
            let Some((current, version)) = row else { return Ok(None) };
            let current_version = u32::try_from(current).map_err(|_| StoreError::Corrupt("secret row".into()))?;
            Ok(Some(SecretRead { current_version, version: version.transpose()? }))
        })
        .await
    }

    async fn list_secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT path, version, CASE WHEN wrapped_value IS NULL THEN NULL ELSE x'' END, created_at, deleted_at \
                     FROM secret_versions WHERE path=?1 ORDER BY version",
                )
                .map_err(backend)?;
            let rows = st.query_map([path], secret_version_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn list_secrets(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError> {
        let (prefix, after) = (prefix.to_string(), after.unwrap_or("").to_string());
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT path FROM secrets WHERE path >= ?1 AND substr(path, 1, length(?1)) = ?1 AND path > ?2 \
                     ORDER BY path LIMIT ?3",
                )
                .map_err(backend)?;
            let rows =
                st.query_map(params![prefix, after, limit], |r| r.get::<_, String>(0).map(Ok)).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn set_secret_versions_deleted(
        &self,
        path: &str,
        versions: &[u32],
        deleted_at: Option<i64>,
    ) -> Result<u32, StoreError> {
        let (path, versions) = (path.to_string(), versions.to_vec());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut n = 0u32;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE secret_versions SET deleted_at=?3 WHERE path=?1 AND version=?2 \
                         AND wrapped_value IS NOT NULL AND deleted_at IS NOT ?3",
                    )
                    .map_err(backend)?;
                for v in versions {
                    n += u32::try_from(st.execute(params![path, v, deleted_at]).map_err(backend)?).unwrap_or(0);
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn destroy_secret_versions(&self, path: &str, versions: &[u32]) -> Result<u32, StoreError> {
        let (path, versions) = (path.to_string(), versions.to_vec());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut n = 0u32;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE secret_versions SET wrapped_value=NULL WHERE path=?1 AND version=?2 AND wrapped_value IS NOT NULL",
                    )
                    .map_err(backend)?;
                for v in versions {
                    n += u32::try_from(st.execute(params![path, v]).map_err(backend)?).unwrap_or(0);
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO tokens (hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, display_name, selectors, max_expires_at) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
                params![
                    t.hash.to_vec(),
                    t.accessor,
                    t.policies.join(","),
                    t.created_at,
                    t.expires_at,
                    t.parent,
                    t.ttl_secs.map(i64_of).transpose()?,
                    t.max_uses,
                    t.uses,
                    t.display_name,
                    t.selectors.join("\n"),
                    t.max_expires_at
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let hash = hash.to_vec();
        self.read(move |c| {
            let mut st =
                c.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash=?1")).map_err(backend)?;
            st.query_row([hash], token_from_row).optional().map_err(backend)?.transpose()
        })
        .await
    }

    async fn set_token_expiry(&self, accessor: &str, expires_at: Option<i64>) -> Result<(), StoreError> {
        let accessor = accessor.to_string();
        self.write(move |c| {
            let n = c
                .execute("UPDATE tokens SET expires_at=?2 WHERE accessor=?1", params![accessor, expires_at])
                .map_err(backend)?;
            if n == 1 { Ok(()) } else { Err(StoreError::NotFound) }
        })
        .await
    }

    async fn use_token(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError> {
        let hash = hash.to_vec();
        self.write(move |c| {
            c.query_row(
                "UPDATE tokens SET uses = uses + 1 WHERE hash=?1 AND (max_uses IS NULL OR uses < max_uses) RETURNING uses",
                [hash],
                |r| r.get::<_, u32>(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn delete_tokens(&self, accessors: &[String]) -> Result<u32, StoreError> {
        let accessors = accessors.to_vec();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut n = 0u32;
            {
                let mut st = tx.prepare_cached("DELETE FROM tokens WHERE accessor=?1").map_err(backend)?;
                for a in &accessors {
                    n += u32::try_from(st.execute([a]).map_err(backend)?).unwrap_or(0);
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(move |c| {
            let mut st =
                c.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY accessor")).map_err(backend)?;
            let rows = st.query_map([], token_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn put_policy(&self, name: &str, document: &str, now: i64) -> Result<(), StoreError> {
        let (name, document) = (name.to_string(), document.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT INTO policies (name, document, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(name) DO UPDATE SET document=excluded.document, updated_at=excluded.updated_at",
                params![name, document, now],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(move |c| Ok(c.execute("DELETE FROM policies WHERE name=?1", [name]).map_err(backend)? == 1)).await
    }

    async fn list_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT name, document FROM policies ORDER BY name").map_err(backend)?;
            let rows = st.query_map([], |r| Ok(Ok((r.get(0)?, r.get(1)?)))).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn get_policy(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            cached_row(c, "SELECT document FROM policies WHERE name=?1", [name], |r| r.get(0))
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.write(move |c| {
            let now = now_ms();
            let n = c
                .execute(
                    "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, expires_ms=excluded.expires_ms \
                     WHERE leases.holder=excluded.holder OR leases.expires_ms <= ?4",
                    params![name, holder, now.saturating_add(ttl), now],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn hold_instance(
        &self,
        scope: &str,
        instance: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<InstanceHold, StoreError> {
        let (scope, instance) = (scope.to_string(), instance.to_string());
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.write(move |c| {
            let now = now_ms();
            let tx = c.transaction().map_err(backend)?;
            tx.execute("DELETE FROM instance_holds WHERE scope=?1 AND expires_ms <= ?2", params![scope, now])
                .map_err(backend)?;
            let renewed = tx
                .execute(
                    "UPDATE instance_holds SET expires_ms=?3 WHERE scope=?1 AND instance=?2",
                    params![scope, instance, now.saturating_add(ttl)],
                )
                .map_err(backend)?;
            if renewed == 0 {
                let holders: u32 = tx
                    .query_row("SELECT COUNT(*) FROM instance_holds WHERE scope=?1", [&scope], |r| r.get(0))
                    .map_err(backend)?;
                if holders >= max {
                    tx.commit().map_err(backend)?;
                    return Ok(InstanceHold::Full { holders });
                }
                tx.execute(
                    "INSERT INTO instance_holds (scope, instance, expires_ms) VALUES (?1, ?2, ?3)",
                    params![scope, instance, now.saturating_add(ttl)],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(InstanceHold::Held)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(move |c| {
            c.execute("DELETE FROM leases WHERE name=?1 AND holder=?2", params![name, holder]).map_err(backend)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kw.db")).unwrap();
        crate::conformance::run_all(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_migrations_are_idempotent() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kw.db");
        {
            let s = SqliteStore::open(&p).unwrap();
            assert!(s.put_meta_if_absent("x", b"1").await.unwrap());
            for f in ["kw.db", "kw.db-wal", "kw.db-shm"] {
                let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{f} is owner-only");
            }
        }
        let s = SqliteStore::open(&p).unwrap();
        assert_eq!(s.get_meta("x").await.unwrap().as_deref(), Some(&b"1"[..]));
    }

    #[tokio::test]
    async fn a_snapshot_taken_while_writing_restores_whole_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("keyward.db")).unwrap());
        for i in 0..200 {
            assert!(store.put_meta_if_absent(&format!("before-{i}"), b"v").await.unwrap());
        }
        // Writes go on while the copy is taken.
        let w = store.clone();
        let writer = tokio::spawn(async move {
            for i in 0..200 {
                w.put_meta_if_absent(&format!("during-{i}"), b"v").await.unwrap();
            }
        });
        let mut snap = store.snapshot().await.unwrap();
        writer.await.unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().contains("snapshot")), "unlinked: {names:?}");
        let saved = dir.path().join("saved.db");
        std::io::copy(&mut snap, &mut std::fs::File::create(&saved).unwrap()).unwrap();

        let target = dir.path().join("restored");
        let db = restore_snapshot(&saved, &target).unwrap();
        let restored = SqliteStore::open(&db).unwrap();
        for i in 0..200 {
            assert!(restored.get_meta(&format!("before-{i}")).await.unwrap().is_some());
        }
        // A non-empty directory, a file that is not a database, and a damaged one are refused.
        let e = restore_snapshot(&saved, &target).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        std::fs::write(dir.path().join("junk"), b"not sqlite at all").unwrap();
        let e = restore_snapshot(&dir.path().join("junk"), &dir.path().join("r2")).unwrap_err();
        assert!(e.to_string().contains("not an SQLite database"), "{e}");
        assert!(!dir.path().join("r2/keyward.db").exists() && !dir.path().join("r2/.restore.db").exists());
        let mut bytes = std::fs::read(&saved).unwrap();
        let n = bytes.len();
        bytes[n / 2..n / 2 + 4096].fill(0x5a);
        std::fs::write(dir.path().join("damaged"), &bytes).unwrap();
        assert!(restore_snapshot(&dir.path().join("damaged"), &dir.path().join("r3")).is_err());
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kw.db");
        {
            let c = Connection::open(&p).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = SqliteStore::open(&p).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
