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

mod rows;
mod store;

use self::rows::*;

const READERS: usize = 4;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_schema.sql"),
    include_str!("../../migrations/sqlite/0002_tokens_and_policies.sql"),
    include_str!("../../migrations/sqlite/0003_token_selectors.sql"),
    include_str!("../../migrations/sqlite/0004_leases.sql"),
    include_str!("../../migrations/sqlite/0005_instance_holds.sql"),
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
