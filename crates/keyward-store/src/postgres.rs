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

/// Advisory lock id that serialises migrations ("keyward" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x006b_6579_7761_7264;

/// Schema migrations, applied in order; `keyward_schema.version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (k TEXT COLLATE "C" PRIMARY KEY, v BYTEA NOT NULL);
CREATE TABLE keys (
    id BYTEA PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    algorithm TEXT NOT NULL,
    state TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    current_version BIGINT NOT NULL,
    rotate_every_secs BIGINT,
    next_rotation_at BIGINT,
    deletion_at BIGINT,
    revision BIGINT NOT NULL
);
CREATE INDEX keys_next_rotation ON keys(next_rotation_at) WHERE next_rotation_at IS NOT NULL;
CREATE INDEX keys_deletion ON keys(deletion_at) WHERE deletion_at IS NOT NULL;
CREATE TABLE key_versions (
    key_id BYTEA NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    wrapped_material BYTEA NOT NULL,
    public_key BYTEA,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE secrets (
    path TEXT COLLATE "C" PRIMARY KEY,
    current_version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE secret_versions (
    path TEXT COLLATE "C" NOT NULL REFERENCES secrets(path) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    wrapped_value BYTEA,
    created_at BIGINT NOT NULL,
    deleted_at BIGINT,
    PRIMARY KEY (path, version)
);
CREATE TABLE tokens (
    hash BYTEA PRIMARY KEY,
    accessor TEXT COLLATE "C" NOT NULL UNIQUE,
    policies TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    parent TEXT,
    ttl_secs BIGINT,
    max_uses BIGINT,
    uses BIGINT NOT NULL DEFAULT 0,
    display_name TEXT NOT NULL DEFAULT '',
    selectors TEXT NOT NULL DEFAULT '',
    max_expires_at BIGINT
);
CREATE TABLE policies (
    name TEXT COLLATE "C" PRIMARY KEY,
    document TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
"#,
    CHANGE_FEED,
    r#"
CREATE TABLE keyward_instance_holds (
    scope TEXT COLLATE "C" NOT NULL,
    instance TEXT COLLATE "C" NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, instance)
);
"#,
];

/// Leases, and the change feed: statement-level triggers record which keys, policies and metadata
/// entries a statement changed (and which tokens were revoked or renewed) under one sequence
/// number. The number comes from a one-row counter whose row lock is held until commit, so
/// numbers become visible in order and without gaps: a reader that has seen `n` has seen every
/// change up to `n`. Each change also sends a NOTIFY so servers look at once.
const CHANGE_FEED: &str = r#"
CREATE TABLE keyward_leases (
    name TEXT COLLATE "C" PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE keyward_change_seq (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    n BIGINT NOT NULL
);
INSERT INTO keyward_change_seq (n) VALUES (0);
CREATE TABLE keyward_changes (
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    ref BYTEA NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX keyward_changes_seq ON keyward_changes (seq);
CREATE INDEX keyward_changes_at ON keyward_changes (at);

CREATE FUNCTION keyward_next_change() RETURNS BIGINT LANGUAGE plpgsql AS $fn$
DECLARE s BIGINT;
BEGIN
    UPDATE keyward_change_seq SET n = n + 1 RETURNING n INTO s;
    PERFORM pg_notify('keyward_changes', s::text);
    RETURN s;
END
$fn$;
CREATE FUNCTION keyward_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref) SELECT s.n, 'key', c.id FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_tokens_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref) SELECT s.n, 'token', c.hash FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_token_renewed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO keyward_changes (seq, kind, ref) VALUES (keyward_next_change(), 'token', NEW.hash);
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_policies_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref)
            SELECT s.n, 'policy', convert_to(c.name, 'UTF8') FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION keyward_meta_changed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        WITH s AS (SELECT keyward_next_change() AS n)
        INSERT INTO keyward_changes (seq, kind, ref) SELECT s.n, 'meta', convert_to(c.k, 'UTF8') FROM s, changed c;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER keys_inserted AFTER INSERT ON keys REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_keys_changed();
CREATE TRIGGER keys_updated AFTER UPDATE ON keys REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_keys_changed();
CREATE TRIGGER keys_deleted AFTER DELETE ON keys REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_keys_changed();
CREATE TRIGGER tokens_deleted AFTER DELETE ON tokens REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_tokens_changed();
CREATE TRIGGER tokens_renewed AFTER UPDATE ON tokens FOR EACH ROW
    WHEN (OLD.expires_at IS DISTINCT FROM NEW.expires_at) EXECUTE FUNCTION keyward_token_renewed();
CREATE TRIGGER policies_inserted AFTER INSERT ON policies REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_policies_changed();
CREATE TRIGGER policies_updated AFTER UPDATE ON policies REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_policies_changed();
CREATE TRIGGER policies_deleted AFTER DELETE ON policies REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_policies_changed();
CREATE TRIGGER meta_inserted AFTER INSERT ON meta REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_meta_changed();
CREATE TRIGGER meta_updated AFTER UPDATE ON meta REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_meta_changed();
"#;

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

const TOKEN_COLS: &str = "hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, \
                          display_name, selectors, max_expires_at";

fn token_from_row(r: &Row) -> Result<TokenRecord, StoreError> {
    let bad = || StoreError::Corrupt("token row".into());
    let hash: Vec<u8> = r.try_get(0).map_err(|_| bad())?;
    let policies: String = r.try_get(2).map_err(|_| bad())?;
    let selectors: String = r.try_get(10).map_err(|_| bad())?;
    let ttl: Option<i64> = r.try_get(6).map_err(|_| bad())?;
    let max_uses: Option<i64> = r.try_get(7).map_err(|_| bad())?;
    Ok(TokenRecord {
        hash: hash.try_into().map_err(|_| bad())?,
        accessor: r.try_get(1).map_err(|_| bad())?,
        policies: policies.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        created_at: r.try_get(3).map_err(|_| bad())?,
        expires_at: r.try_get(4).map_err(|_| bad())?,
        parent: r.try_get(5).map_err(|_| bad())?,
        ttl_secs: ttl.and_then(|t| u64::try_from(t).ok()),
        max_uses: max_uses.map(|m| to_u32(m, "max uses")).transpose()?,
        uses: to_u32(r.try_get(8).map_err(|_| bad())?, "uses")?,
        display_name: r.try_get(9).map_err(|_| bad())?,
        selectors: selectors.split('\n').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        max_expires_at: r.try_get(11).map_err(|_| bad())?,
    })
}

fn change_from_row(kind: &str, r: Vec<u8>) -> Result<Change, StoreError> {
    let bad = || StoreError::Corrupt(format!("change feed entry of kind {kind:?}"));
    Ok(match kind {
        "key" => Change::Key(KeyId(r.try_into().map_err(|_| bad())?)),
        "token" => Change::Token(r.try_into().map_err(|_| bad())?),
        "policy" => Change::Policy(String::from_utf8(r).map_err(|_| bad())?),
        "meta" => Change::Meta(String::from_utf8(r).map_err(|_| bad())?),
        _ => return Err(bad()),
    })
}

const KEY_COLS: &str = "id, name, algorithm, state, description, created_at, updated_at, current_version, \
                        rotate_every_secs, next_rotation_at, deletion_at, revision";

fn key_from_row(r: &Row) -> Result<KeyRecord, StoreError> {
    let bad = || StoreError::Corrupt("key row".into());
    let id: Vec<u8> = r.try_get(0).map_err(|_| bad())?;
    let alg: String = r.try_get(2).map_err(|_| bad())?;
    let state: String = r.try_get(3).map_err(|_| bad())?;
    let rotate: Option<i64> = r.try_get(8).map_err(|_| bad())?;
    Ok(KeyRecord {
        id: KeyId(id.try_into().map_err(|_| bad())?),
        name: r.try_get(1).map_err(|_| bad())?,
        algorithm: KeyAlgorithm::parse(&alg).ok_or_else(bad)?,
        state: KeyState::parse(&state).ok_or_else(bad)?,
        description: r.try_get(4).map_err(|_| bad())?,
        created_at: r.try_get(5).map_err(|_| bad())?,
        updated_at: r.try_get(6).map_err(|_| bad())?,
        current_version: to_u32(r.try_get(7).map_err(|_| bad())?, "key version")?,
        rotate_every_secs: rotate.map(|v| u64::try_from(v).map_err(|_| bad())).transpose()?,
        next_rotation_at: r.try_get(9).map_err(|_| bad())?,
        deletion_at: r.try_get(10).map_err(|_| bad())?,
        revision: u64::try_from(r.try_get::<_, i64>(11).map_err(|_| bad())?).map_err(|_| bad())?,
    })
}

fn version_from_row(r: &Row) -> Result<KeyVersionRecord, StoreError> {
    let bad = || StoreError::Corrupt("key version row".into());
    let id: Vec<u8> = r.try_get(0).map_err(|_| bad())?;
    Ok(KeyVersionRecord {
        key_id: KeyId(id.try_into().map_err(|_| bad())?),
        version: to_u32(r.try_get(1).map_err(|_| bad())?, "key version")?,
        wrapped_material: r.try_get(2).map_err(|_| bad())?,
        public_key: r.try_get(3).map_err(|_| bad())?,
        created_at: r.try_get(4).map_err(|_| bad())?,
    })
}

fn secret_version_from_row(r: &Row) -> Result<SecretVersionRecord, StoreError> {
    let bad = || StoreError::Corrupt("secret version row".into());
    Ok(SecretVersionRecord {
        path: r.try_get(0).map_err(|_| bad())?,
        version: to_u32(r.try_get(1).map_err(|_| bad())?, "secret version")?,
        wrapped_value: r.try_get(2).map_err(|_| bad())?,
        created_at: r.try_get(3).map_err(|_| bad())?,
        deleted_at: r.try_get(4).map_err(|_| bad())?,
    })
}

/// The key columns as statement parameters, in `KEY_COLS` order.
struct KeyParams {
    id: Vec<u8>,
    name: String,
    algorithm: &'static str,
    state: &'static str,
    description: String,
    created_at: i64,
    updated_at: i64,
    current_version: i64,
    rotate: Option<i64>,
    next_rotation_at: Option<i64>,
    deletion_at: Option<i64>,
    revision: i64,
}

impl KeyParams {
    fn of(k: &KeyRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: k.id.0.to_vec(),
            name: k.name.clone(),
            algorithm: k.algorithm.as_str(),
            state: k.state.as_str(),
            description: k.description.clone(),
            created_at: k.created_at,
            updated_at: k.updated_at,
            current_version: i64::from(k.current_version),
            rotate: k.rotate_every_secs.map(to_i64).transpose()?,
            next_rotation_at: k.next_rotation_at,
            deletion_at: k.deletion_at,
            revision: to_i64(k.revision)?,
        })
    }

    fn refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 12] {
        [
            &self.id,
            &self.name,
            &self.algorithm,
            &self.state,
            &self.description,
            &self.created_at,
            &self.updated_at,
            &self.current_version,
            &self.rotate,
            &self.next_rotation_at,
            &self.deletion_at,
            &self.revision,
        ]
    }
}

async fn update_key_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    k: &KeyRecord,
    expected: u64,
) -> Result<(), StoreError> {
    let p = KeyParams::of(k)?;
    let expected = to_i64(expected)?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = p.refs().to_vec();
    params.push(&expected);
    let n = tx
        .execute(
            "UPDATE keys SET name=$2, algorithm=$3, state=$4, description=$5, created_at=$6, updated_at=$7, \
             current_version=$8, rotate_every_secs=$9, next_rotation_at=$10, deletion_at=$11, revision=$12 \
             WHERE id=$1 AND revision=$13",
            &params,
        )
        .await
        .map_err(db)?;
    if n == 1 {
        return Ok(());
    }
    let exists = tx.query_opt("SELECT 1 FROM keys WHERE id=$1", &[&p.id]).await.map_err(db)?;
    Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound })
}

const INSERT_VERSION: &str =
    "INSERT INTO key_versions (key_id, version, wrapped_material, public_key, created_at) VALUES ($1,$2,$3,$4,$5)";

#[async_trait]
impl Store for PostgresStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt("SELECT v FROM meta WHERE k=$1", &[&key]).await.map_err(db)?.map(|r| r.get(0)))
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute("INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING", &[&key, &value])
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    async fn replace_meta(&self, key: &str, expected: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c.execute("UPDATE meta SET v=$3 WHERE k=$1 AND v=$2", &[&key, &expected, &value]).await.map_err(db)?;
        Ok(n == 1)
    }

    async fn create_key(&self, key: &KeyRecord, first: &KeyVersionRecord) -> Result<(), StoreError> {
        let p = KeyParams::of(key)?;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute(
            &format!("INSERT INTO keys ({KEY_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"),
            &p.refs(),
        )
        .await
        .map_err(db)?;
        tx.execute(
            INSERT_VERSION,
            &[
                &first.key_id.0.to_vec(),
                &i64::from(first.version),
                &first.wrapped_material,
                &first.public_key,
                &first.created_at,
            ],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt(&format!("SELECT {KEY_COLS} FROM keys WHERE name=$1"), &[&name])
            .await
            .map_err(db)?
            .map(|r| key_from_row(&r))
            .transpose()
    }

    async fn get_key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt(&format!("SELECT {KEY_COLS} FROM keys WHERE id=$1"), &[&id.0.to_vec()])
            .await
            .map_err(db)?
            .map(|r| key_from_row(&r))
            .transpose()
    }

    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {KEY_COLS} FROM keys WHERE name > $1 ORDER BY name LIMIT $2"),
                &[&after.unwrap_or(""), &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn update_key(&self, key: &KeyRecord, expected_revision: u64) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        update_key_tx(&tx, key, expected_revision).await?;
        tx.commit().await.map_err(db)
    }

    async fn add_key_version(
        &self,
        key: &KeyRecord,
        version: &KeyVersionRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        update_key_tx(&tx, key, expected_revision).await?;
        tx.execute(
            INSERT_VERSION,
            &[
                &version.key_id.0.to_vec(),
                &i64::from(version.version),
                &version.wrapped_material,
                &version.public_key,
                &version.created_at,
            ],
        )
        .await
        .map_err(|e| match db(e) {
            StoreError::AlreadyExists => StoreError::Conflict,
            other => other,
        })?;
        tx.commit().await.map_err(db)
    }

    async fn get_key_versions(&self, id: &KeyId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT key_id, version, wrapped_material, public_key, created_at FROM key_versions \
                 WHERE key_id=$1 ORDER BY version",
                &[&id.0.to_vec()],
            )
            .await
            .map_err(db)?;
        rows.iter().map(version_from_row).collect()
    }

    async fn rewrap_key_version(
        &self,
        id: &KeyId,
        version: u32,
        expected: &[u8],
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE key_versions SET wrapped_material=$4 WHERE key_id=$1 AND version=$2 AND wrapped_material=$3",
                &[&id.0.to_vec(), &i64::from(version), &expected, &wrapped],
            )
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    async fn keys_due(&self, now: i64, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {KEY_COLS} FROM keys WHERE (state='enabled' AND next_rotation_at <= $1) \
                     OR (state='pending_deletion' AND deletion_at <= $1) ORDER BY name LIMIT $2"
                ),
                &[&now, &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn delete_key(&self, id: &KeyId, expected_revision: u64) -> Result<(), StoreError> {
        let (id, rev) = (id.0.to_vec(), to_i64(expected_revision)?);
        let c = self.client().await?;
        let n = c.execute("DELETE FROM keys WHERE id=$1 AND revision=$2", &[&id, &rev]).await.map_err(db)?;
        if n == 1 {
            return Ok(());
        }
        let exists = c.query_opt("SELECT 1 FROM keys WHERE id=$1", &[&id]).await.map_err(db)?;
        Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound })
    }

    async fn put_secret_version(&self, v: &SecretVersionRecord, expected_current: u32) -> Result<(), StoreError> {
        if v.version != expected_current.wrapping_add(1) {
            return Err(StoreError::Conflict);
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let version = i64::from(v.version);
        // One conditional statement each way, so two writers racing on the same path cannot both
        // succeed: the loser of an insert hits the primary key, the loser of an update changes no row.
        let n = if expected_current == 0 {
            tx.execute(
                "INSERT INTO secrets (path, current_version, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (path) DO NOTHING",
                &[&v.path, &version, &v.created_at],
            )
            .await
            .map_err(db)?
        } else {
            tx.execute(
                "UPDATE secrets SET current_version=$2, updated_at=$3 WHERE path=$1 AND current_version=$4",
                &[&v.path, &version, &v.created_at, &i64::from(expected_current)],
            )
            .await
            .map_err(db)?
        };
        if n != 1 {
            return Err(StoreError::Conflict);
        }
        tx.execute(
            "INSERT INTO secret_versions (path, version, wrapped_value, created_at, deleted_at) VALUES ($1,$2,$3,$4,$5)",
            &[&v.path, &version, &v.wrapped_value, &v.created_at, &v.deleted_at],
        )
        .await
        .map_err(|e| match db(e) {
            StoreError::AlreadyExists => StoreError::Conflict,
            other => other,
        })?;
        tx.commit().await.map_err(db)
    }

    async fn get_secret(&self, path: &str) -> Result<Option<SecretRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt("SELECT path, current_version, created_at, updated_at FROM secrets WHERE path=$1", &[&path])
            .await
            .map_err(db)?
            .map(|r| {
                Ok(SecretRecord {
                    path: r.get(0),
                    current_version: to_u32(r.get(1), "secret version")?,
                    created_at: r.get(2),
                    updated_at: r.get(3),
                })
            })
            .transpose()
    }

    async fn get_secret_version(&self, path: &str, version: u32) -> Result<Option<SecretVersionRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt(
            "SELECT path, version, wrapped_value, created_at, deleted_at FROM secret_versions WHERE path=$1 AND version=$2",
            &[&path, &i64::from(version)],
        )
        .await
        .map_err(db)?
        .map(|r| secret_version_from_row(&r))
        .transpose()
    }

    async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Option<SecretRead>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT s.current_version, v.path, v.version, v.wrapped_value, v.created_at, v.deleted_at \
                 FROM secrets s LEFT JOIN secret_versions v \
                 ON v.path = s.path AND v.version = COALESCE($2::BIGINT, s.current_version) WHERE s.path = $1",
                &[&path, &version.map(i64::from)],
            )
            .await
            .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let bad = || StoreError::Corrupt("secret row".into());
        let current_version = to_u32(r.try_get(0).map_err(|_| bad())?, "secret version")?;
        let found: Option<String> = r.try_get(1).map_err(|_| bad())?;
        let version = match found {
            Some(path) => Some(SecretVersionRecord {
                path,
                version: to_u32(r.try_get(2).map_err(|_| bad())?, "secret version")?,
                wrapped_value: r.try_get(3).map_err(|_| bad())?,
                created_at: r.try_get(4).map_err(|_| bad())?,
                deleted_at: r.try_get(5).map_err(|_| bad())?,
            }),
            None => None,
        };
        Ok(Some(SecretRead { current_version, version }))
    }

    async fn list_secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT path, version, CASE WHEN wrapped_value IS NULL THEN NULL ELSE ''::bytea END, created_at, deleted_at \
                 FROM secret_versions WHERE path=$1 ORDER BY version",
                &[&path],
            )
            .await
            .map_err(db)?;
        rows.iter().map(secret_version_from_row).collect()
    }

    async fn list_secrets(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT path FROM secrets WHERE starts_with(path, $1) AND path > $2 ORDER BY path LIMIT $3",
                &[&prefix, &after.unwrap_or(""), &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn set_secret_versions_deleted(
        &self,
        path: &str,
        versions: &[u32],
        deleted_at: Option<i64>,
    ) -> Result<u32, StoreError> {
        let versions = versions_param(versions);
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE secret_versions SET deleted_at=$3 WHERE path=$1 AND version = ANY($2) \
                 AND wrapped_value IS NOT NULL AND deleted_at IS DISTINCT FROM $3",
                &[&path, &versions, &deleted_at],
            )
            .await
            .map_err(db)?;
        Ok(count(n))
    }

    async fn destroy_secret_versions(&self, path: &str, versions: &[u32]) -> Result<u32, StoreError> {
        let versions = versions_param(versions);
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE secret_versions SET wrapped_value=NULL WHERE path=$1 AND version = ANY($2) AND wrapped_value IS NOT NULL",
                &[&path, &versions],
            )
            .await
            .map_err(db)?;
        Ok(count(n))
    }

    async fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO tokens (hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, \
             display_name, selectors, max_expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
            &[
                &t.hash.to_vec(),
                &t.accessor,
                &t.policies.join(","),
                &t.created_at,
                &t.expires_at,
                &t.parent,
                &t.ttl_secs.map(to_i64).transpose()?,
                &t.max_uses.map(i64::from),
                &i64::from(t.uses),
                &t.display_name,
                &t.selectors.join("\n"),
                &t.max_expires_at,
            ],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash=$1"), &[&hash.as_slice()])
            .await
            .map_err(db)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn set_token_expiry(&self, accessor: &str, expires_at: Option<i64>) -> Result<(), StoreError> {
        let c = self.client().await?;
        let n = c
            .execute("UPDATE tokens SET expires_at=$2 WHERE accessor=$1", &[&accessor, &expires_at])
            .await
            .map_err(db)?;
        if n == 1 { Ok(()) } else { Err(StoreError::NotFound) }
    }

    async fn use_token(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "UPDATE tokens SET uses = uses + 1 WHERE hash=$1 AND (max_uses IS NULL OR uses < max_uses) RETURNING uses",
                &[&hash.as_slice()],
            )
            .await
            .map_err(db)?;
        row.map(|r| to_u32(r.get(0), "uses")).transpose()
    }

    async fn delete_tokens(&self, accessors: &[String]) -> Result<u32, StoreError> {
        let c = self.client().await?;
        let n = c.execute("DELETE FROM tokens WHERE accessor = ANY($1)", &[&accessors]).await.map_err(db)?;
        Ok(count(n))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c.query(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY accessor"), &[]).await.map_err(db)?;
        rows.iter().map(token_from_row).collect()
    }

    async fn put_policy(&self, name: &str, document: &str, now: i64) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO policies (name, document, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET document=excluded.document, updated_at=excluded.updated_at",
            &[&name, &document, &now],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(c.execute("DELETE FROM policies WHERE name=$1", &[&name]).await.map_err(db)? == 1)
    }

    async fn list_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        let c = self.client().await?;
        let rows = c.query("SELECT name, document FROM policies ORDER BY name", &[]).await.map_err(db)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn get_policy(&self, name: &str) -> Result<Option<String>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt("SELECT document FROM policies WHERE name=$1", &[&name]).await.map_err(db)?.map(|r| r.get(0)))
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let c = self.client().await?;
        // The database's clock decides expiry, so servers' clocks need not agree.
        let n = c
            .execute(
                "INSERT INTO keyward_leases (name, holder, expires_at) \
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, expires_at=excluded.expires_at \
                 WHERE keyward_leases.holder=excluded.holder OR keyward_leases.expires_at <= clock_timestamp()",
                &[&name, &holder, &ttl.as_secs_f64()],
            )
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    async fn hold_instance(
        &self,
        scope: &str,
        instance: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<InstanceHold, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        // One scope's places are decided one transaction at a time (across servers), so a
        // count and the insert after it cannot interleave with another server's.
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", &[&scope]).await.map_err(db)?;
        tx.execute("DELETE FROM keyward_instance_holds WHERE scope=$1 AND expires_at <= clock_timestamp()", &[&scope])
            .await
            .map_err(db)?;
        let secs = ttl.as_secs_f64();
        let renewed = tx
            .execute(
                "UPDATE keyward_instance_holds SET expires_at = clock_timestamp() + make_interval(secs => $3) \
                 WHERE scope=$1 AND instance=$2",
                &[&scope, &instance, &secs],
            )
            .await
            .map_err(db)?;
        if renewed == 0 {
            let holders: i64 = tx
                .query_one("SELECT COUNT(*) FROM keyward_instance_holds WHERE scope=$1", &[&scope])
                .await
                .map_err(db)?
                .get(0);
            let holders = u32::try_from(holders).unwrap_or(u32::MAX);
            if holders >= max {
                tx.commit().await.map_err(db)?;
                return Ok(InstanceHold::Full { holders });
            }
            tx.execute(
                "INSERT INTO keyward_instance_holds (scope, instance, expires_at) \
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))",
                &[&scope, &instance, &secs],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(InstanceHold::Held)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute("DELETE FROM keyward_leases WHERE name=$1 AND holder=$2", &[&name, &holder]).await.map_err(db)?;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn changes_since(&self, cursor: Option<u64>, limit: u32) -> Result<Changes, StoreError> {
        let c = self.client().await?;
        let Some(from) = cursor else {
            let n: i64 = c.query_one("SELECT n FROM keyward_change_seq", &[]).await.map_err(db)?.get(0);
            return Ok(Changes { cursor: u64::try_from(n).unwrap_or(0), ..Changes::default() });
        };
        let from_i = to_i64(from)?;
        // One statement, one snapshot: the counter and the entries after `from` agree.
        let rows = c
            .query(
                "SELECT s.n, c.seq, c.kind, c.ref FROM keyward_change_seq s \
                 LEFT JOIN keyward_changes c ON c.seq > $1 AND c.seq <= $1 + $2 ORDER BY c.seq",
                &[&from_i, &i64::from(limit.max(1))],
            )
            .await
            .map_err(db)?;
        let n = rows.first().map_or(0, |r| r.get::<_, i64>(0));
        let n = u64::try_from(n).unwrap_or(0);
        let mut out = Changes { cursor: from, ..Changes::default() };
        if n < from {
            // The counter went backwards: a different (restored or recreated) database.
            out.lost = true;
            out.cursor = n;
            return Ok(out);
        }
        for r in &rows {
            let Some(seq) = r.get::<_, Option<i64>>(1) else { continue };
            let seq = u64::try_from(seq).unwrap_or(0);
            if seq > out.cursor + 1 {
                out.lost = true; // entries in between were pruned
            }
            out.cursor = out.cursor.max(seq);
            out.changes.push(change_from_row(r.get(2), r.get(3))?);
        }
        if out.cursor < n && out.changes.is_empty() {
            out.lost = true;
            out.cursor = n;
        }
        out.more = out.cursor < n;
        Ok(out)
    }

    async fn wait_for_changes(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.changed.notified()).await;
    }

    async fn prune_changes(&self, age: Duration) -> Result<u64, StoreError> {
        let c = self.client().await?;
        c.execute("DELETE FROM keyward_changes WHERE at < now() - make_interval(secs => $1)", &[&age.as_secs_f64()])
            .await
            .map_err(db)
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
