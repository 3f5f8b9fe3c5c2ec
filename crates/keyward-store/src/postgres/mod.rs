//! PostgreSQL backend: one database shared by several Keyward servers.
//!
//! - Connections come from a pool (deadpool-postgres); a connection that fails is replaced, and a
//!   request that finds the database unreachable gets [`StoreError::Unavailable`] (503), never a
//!   hang: connecting and every statement are bounded by timeouts.
//! - Compare-and-set operations are single conditional statements (`UPDATE … WHERE revision = $n`)
//!   or unique constraints, so they hold across servers under READ COMMITTED.
//! - Migrations run in one transaction holding a transaction-scoped advisory lock, so servers
//!   starting together apply each migration exactly once; a schema newer than this build is
//!   refused.
//! - Text columns that are ordered or compared (`keys.name`, `secrets.path`) use the `C`
//!   collation: byte order, the same as SQLite, whatever the database's locale.
//! - With a CA file configured, every connection uses TLS (rustls on aws-lc-rs) and verifies the
//!   database server's certificate and name; without one, connections follow `sslmode` without
//!   TLS, and `sslmode=require` is refused as a configuration error rather than left unverified.
//! - A change feed (triggers into `keyward_changes`, plus NOTIFY) tells every server which keys,
//!   tokens, policies and metadata entries others changed; see [`Store::changes_since`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use keyward_core::model::*;
use keyward_core::store::{Change, Changes, InstanceHold, SecretRead, Store, StoreError};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls, Row};

mod rows;
mod store;

use self::rows::*;

/// Advisory lock id that serialises migrations ("keyward" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x006b_6579_7761_7264;

/// Schema migrations, applied in order; `keyward_schema.version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_schema.sql"),
    // Leases, and the change feed: statement-level triggers record which keys, policies and metadata
    // entries a statement changed (and which tokens were revoked or renewed) under one sequence
    // number. The number comes from a one-row counter whose row lock is held until commit, so
    // numbers become visible in order and without gaps: a reader that has seen `n` has seen every
    // change up to `n`. Each change also sends a NOTIFY so servers look at once.
    include_str!("../../migrations/postgres/0002_leases_and_change_feed.sql"),
    include_str!("../../migrations/postgres/0003_instance_holds.sql"),
];

/// Connection settings. `Debug` does not show the connection string (it may hold a password).
#[derive(Clone)]
pub struct PostgresConfig {
    /// A libpq-style connection string or URL (`postgresql://user@host:port/db`, or
    /// `host=/run/postgresql user=keyward dbname=keyward`). A password in it stays in memory only.
    pub url: String,
    /// Most connections this server opens.
    pub max_connections: usize,
    /// How long to wait to connect, or for a free pooled connection.
    pub connect_timeout: Duration,
    /// Upper bound on any one statement (`statement_timeout`).
    pub statement_timeout: Duration,
    /// PEM file of the CA certificate(s) that sign the database server's certificate. When set,
    /// every connection uses TLS (whatever `sslmode` says) and the server's certificate must
    /// chain to one of them and name the host connected to; there is no fall-back to plain text.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl PostgresConfig {
    /// Defaults for `url`: 16 connections, 5 s to connect, 10 s per statement.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }
}

/// TLS to the database, or not.
#[derive(Clone)]
enum Tls {
    Off(NoTls),
    On(tokio_postgres_rustls::MakeRustlsConnect),
}

fn tls_config(cfg: &PostgresConfig, pg: &mut tokio_postgres::Config) -> Result<Tls, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio_postgres::config::SslMode;
    let Some(path) = &cfg.ca_file else {
        if pg.get_ssl_mode() == SslMode::Require {
            return Err(StoreError::Backend(
                "sslmode=require needs the CA certificate that signs the database's certificate \
                 (--postgres-ca FILE)"
                    .into(),
            ));
        }
        return Ok(Tls::Off(NoTls));
    };
    let bad = |e: String| StoreError::Backend(format!("PostgreSQL CA file {}: {e}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    pg.ssl_mode(SslMode::Require);
    Ok(Tls::On(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Woken by the listener task on every NOTIFY of the change feed.
    changed: Arc<Notify>,
    _listener: Arc<Listener>,
}

/// The task that LISTENs for change notifications; stopped when the last store handle goes.
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection's stream of asynchronous messages, whatever its transport.
trait Messages: Send {
    fn poll_message(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>>;
}

impl<S, T> Messages for tokio_postgres::Connection<S, T>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    fn poll_message(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>> {
        tokio_postgres::Connection::poll_message(self, cx)
    }
}

/// Keep one connection LISTENing on the change channel, reconnecting after failures. Every
/// notification (and every reconnection, since notifications may have been missed) wakes the
/// waiter in [`Store::wait_for_changes`]; the feed itself is read from the table.
async fn listen(pg: tokio_postgres::Config, tls: Tls, changed: Arc<Notify>) {
    loop {
        let connected = match &tls {
            Tls::Off(t) => pg.connect(*t).await.map(|(c, conn)| (c, Box::new(conn) as Box<dyn Messages>)),
            Tls::On(t) => pg.connect(t.clone()).await.map(|(c, conn)| (c, Box::new(conn) as Box<dyn Messages>)),
        };
        match connected {
            Ok((client, mut conn)) => {
                let wake = changed.clone();
                let driver = tokio::spawn(async move {
                    while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        match m {
                            Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                match client.batch_execute("LISTEN keyward_changes").await {
                    Ok(()) => {
                        changed.notify_one();
                        let _ = driver.await;
                        tracing::warn!("lost the PostgreSQL change listener; reconnecting");
                    }
                    Err(e) => {
                        driver.abort();
                        tracing::warn!(error = %e, "cannot LISTEN for changes; retrying");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect the PostgreSQL change listener; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

fn db(e: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::AlreadyExists,
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED => {
            StoreError::Conflict
        }
        Some(c) if *c == SqlState::QUERY_CANCELED || c.code().starts_with("08") || c.code().starts_with("57") => {
            StoreError::Unavailable(e.to_string())
        }
        Some(_) => StoreError::Backend(e.to_string()),
        // No SQLSTATE: the connection itself failed (closed, refused, timed out, TLS refused);
        // the causes say which (e.g. the certificate problem).
        None => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            StoreError::Unavailable(msg)
        }
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        other => StoreError::Unavailable(format!("database connection: {other}")),
    }
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend("value out of range".into()))
}

/// Version numbers as a PostgreSQL `BIGINT[]` parameter.
fn versions_param(versions: &[u32]) -> Vec<i64> {
    versions.iter().map(|v| i64::from(*v)).collect()
}

/// A row count as the trait reports it.
fn count(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn to_u32(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range")))
}

impl PostgresStore {
    /// Connect, and apply pending migrations (safely, if several servers start at once).
    pub async fn connect(cfg: &PostgresConfig) -> Result<Self, StoreError> {
        let mut pg: tokio_postgres::Config =
            cfg.url.parse().map_err(|e| StoreError::Backend(format!("bad PostgreSQL connection string: {e}")))?;
        pg.connect_timeout(cfg.connect_timeout);
        pg.options(format!("-c statement_timeout={}", cfg.statement_timeout.as_millis()));
        pg.application_name("keyward");
        let tls = tls_config(cfg, &mut pg)?;
        let mc = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let mgr = match &tls {
            Tls::Off(t) => Manager::from_config(pg.clone(), *t, mc),
            Tls::On(t) => Manager::from_config(pg.clone(), t.clone(), mc),
        };
        let pool = Pool::builder(mgr)
            .max_size(cfg.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(cfg.connect_timeout),
                create: Some(cfg.connect_timeout),
                recycle: Some(cfg.connect_timeout),
            })
            .build()
            .map_err(|e| StoreError::Backend(format!("database pool: {e}")))?;
        let changed = Arc::new(Notify::new());
        let store = Self {
            pool,
            changed: changed.clone(),
            _listener: Arc::new(Listener(tokio::spawn(listen(pg, tls, changed)))),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Whether this server's database sessions are encrypted (TLS), as the database reports it.
    pub async fn ssl_in_use(&self) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let r = c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.map_err(db)?;
        Ok(r.get(0))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS keyward_schema (version BIGINT NOT NULL)").await.map_err(db)?;
        let current: Option<i64> =
            tx.query_opt("SELECT version FROM keyward_schema", &[]).await.map_err(db)?.map(|r| r.get(0));
        let current = match current {
            Some(v) => usize::try_from(v).map_err(|_| StoreError::Corrupt("negative schema version".into()))?,
            None => {
                tx.execute("INSERT INTO keyward_schema (version) VALUES (0)", &[]).await.map_err(db)?;
                0
            }
        };
        if current > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {current} is newer than this Keyward ({}); upgrade Keyward",
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(current) {
            tx.batch_execute(m).await.map_err(db)?;
            tx.execute("UPDATE keyward_schema SET version=$1", &[&((i + 1) as i64)]).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_connection_string() {
        let cfg = PostgresConfig::new("postgresql://keyward:s3cret@db/keyward");
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }
}
