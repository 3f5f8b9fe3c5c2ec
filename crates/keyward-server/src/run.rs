//! Server start-up: configuration checks, seal, store, service, listener, scheduler.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyward_core::KmsError;
use keyward_core::seal::{SealError, SealKind};
use keyward_core::store::{Store, StoreError};
use keyward_crypto::SecretBytes;
use keyward_store::SqliteStore;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{AppState, router};
use crate::audit::{AuditConfig, AuditError};
use crate::cluster::Member;
use crate::tls::{TlsError, TlsFiles, TlsListener, reloading_server_config};
use keyward_seal::file::InsecureFileSeal;
use keyward_seal::{Sealing, SealingError};

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory (database, and in dev mode the insecure root key and root token).
    pub data_dir: PathBuf,
    /// Dev mode: insecure file seal, plain HTTP on loopback only.
    pub dev: bool,
    /// How often the scheduler looks for due rotations and purges.
    pub scheduler_interval: Duration,
    /// HTTPS certificate and key; required outside dev mode.
    pub tls: Option<TlsFiles>,
    /// Outside dev mode, keep the unseal key in an unencrypted file instead of Shamir shares.
    pub insecure_file_seal: bool,
    /// Seal with a key in an HSM (PKCS#11) instead of Shamir shares: the server unseals itself.
    pub pkcs11: Option<keyward_hsm::Pkcs11Config>,
    /// Audit settings.
    pub audit: AuditSettings,
    /// Where keys, secrets, tokens and policies are stored.
    pub storage: Storage,
    /// Following other servers on a shared store, and the scheduler lease.
    pub cluster: crate::cluster::ClusterConfig,
    /// Header-read and idle timeouts, connection cap.
    pub http: crate::serve::HttpLimits,
    /// Also serve `GET /metrics` here, without authentication (for a private network).
    pub metrics_listen: Option<SocketAddr>,
}

/// The storage backend.
#[derive(Debug, Clone, Default)]
pub enum Storage {
    /// SQLite in the data directory (`keyward.db`): the embedded default.
    #[default]
    Sqlite,
    /// PostgreSQL, which several servers can share.
    Postgres(keyward_store::PostgresConfig),
}

impl ServerConfig {
    /// Dev mode (insecure file seal, plain HTTP on loopback) listening on `listen` with its data
    /// in `data_dir`, audit on, scheduler hourly: what tests, benchmarks and embedders start.
    pub fn dev(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            dev: true,
            scheduler_interval: Duration::from_secs(3600),
            tls: None,
            insecure_file_seal: false,
            pkcs11: None,
            audit: AuditSettings::default(),
            storage: Storage::Sqlite,
            cluster: crate::cluster::ClusterConfig::default(),
            http: crate::serve::HttpLimits::default(),
            metrics_listen: None,
        }
    }
}

/// Audit settings. Auditing is on unless explicitly switched off (for benchmarks only).
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Audit file (default `DATA/audit.log`).
    pub file: Option<PathBuf>,
    /// Also write records to stdout as JSON lines.
    pub stdout: bool,
    /// Rotate the file at this size.
    pub max_file_bytes: u64,
    /// Run without an audit log. Only for measuring the audit's cost; logged loudly.
    pub insecure_disable: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self { file: None, stdout: false, max_file_bytes: 256 * 1024 * 1024, insecure_disable: false }
    }
}

/// Unseal with the HSM; while the HSM cannot be used, keep trying in the background (backing
/// off to a minute) until this or an operator with recovery shares unseals the server.
async fn auto_unseal_at_start(sealing: &Arc<Sealing>) {
    match sealing.auto_unseal().await {
        Ok(true) => return,
        Ok(false) => {
            match sealing.status().await {
                Ok(st) if st.migration_required => tracing::warn!(
                    "the keyring is sealed with {}: run `keyward operator unseal --migrate` with {} shares to move it \
                     to the HSM",
                    st.stored_seal.unwrap_or("?"),
                    st.threshold
                ),
                Ok(st) if !st.initialized => tracing::warn!("not initialised: run `keyward operator init` once"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "reading the seal"),
            }
            return;
        }
        Err(e) => tracing::error!(error = %e, "the HSM could not unseal; retrying (recovery shares also unseal)"),
    }
    let sealing = sealing.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(2);
        loop {
            tokio::time::sleep(wait).await;
            if sealing.unsealed().is_some() || sealing.operator_sealed() {
                return;
            }
            match sealing.auto_unseal().await {
                Ok(_) => return,
                Err(e) => tracing::error!(error = %e, "the HSM could not unseal; retrying"),
            }
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    });
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is not acceptable; the message says what to change.
    #[error("{0}")]
    Config(String),
    /// File system or socket error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The seal could not provide the root key.
    #[error("seal: {0}")]
    Seal(#[from] SealError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The service could not be opened.
    #[error("service: {0}")]
    Kms(#[from] KmsError),
    /// TLS could not be configured.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The audit log could not be opened.
    #[error("{0}")]
    Audit(#[from] AuditError),
    /// The seal could not be opened.
    #[error("{0}")]
    Sealing(#[from] SealingError),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Bound address.
    pub addr: SocketAddr,
    /// The root token, when this start initialised a new store (shown once).
    pub new_root_token: Option<SecretBytes>,
    /// In dev mode, the file holding the root token.
    pub root_token_file: Option<PathBuf>,
    /// Seal kind in use.
    pub seal: &'static str,
    /// Whether the API is served over HTTPS.
    pub tls: bool,
    /// This server's identity among the servers sharing its store.
    pub member: Arc<Member>,
    /// Where `GET /metrics` is served without authentication, if asked.
    pub metrics_addr: Option<SocketAddr>,
    sealing: Arc<Sealing>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    scheduler: JoinHandle<()>,
    follower: JoinHandle<()>,
    cert_watcher: Option<JoinHandle<()>>,
}

/// How often the certificate files are checked for changes.
pub const TLS_RELOAD_POLL: Duration = Duration::from_secs(2);

impl Running {
    /// The seal state (and, while unsealed, the service and its audit log).
    pub fn sealing(&self) -> &Arc<Sealing> {
        &self.sealing
    }

    /// Stop accepting requests, finish in-flight ones and return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.begin_shutdown();
        let r = self.wait().await;
        self.leave().await;
        r
    }

    /// Give up this server's leases (after it stopped serving), so another takes over at once.
    pub async fn leave(&self) {
        crate::cluster::release(&self.sealing, &self.member).await;
    }

    /// Ask the server to stop accepting requests; [`Running::wait`] returns once in-flight
    /// requests are done.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.scheduler.abort();
        self.follower.abort();
        if let Some(w) = &self.cert_watcher {
            w.abort();
        }
    }

    /// Wait until the server stops by itself (it normally runs until shut down).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Validate the configuration, open everything and start serving.
pub async fn start(cfg: ServerConfig) -> Result<Running, StartError> {
    check_mode(&cfg)?;
    let (tls_config, tls_cert) = match cfg.tls.as_ref().map(reloading_server_config).transpose()? {
        Some((c, r)) => (Some(c), Some(r)),
        None => (None, None),
    };
    // The port first: a server that cannot listen creates no data directory and no root token.
    // Connections that arrive before the store is open wait in the backlog.
    let (listener, addr) = bind(&cfg).await?;
    own_data_dir(&cfg.data_dir)?;
    if tls_config.is_none() {
        tracing::warn!("plain HTTP on loopback (dev mode)");
    }
    let store = open_store(&cfg).await?;
    let member = Arc::new(Member::new());
    let kind = seal_kind(&cfg)?;
    let mut metrics = crate::metrics::ServerMetrics::new();
    let store = crate::metrics::Metered::wrap(store, metrics.store.clone());
    let sealing = open_sealing(&cfg, kind, store.clone(), audit_config(&cfg, &*store, &member)).await?;
    let k8s = Arc::new(crate::k8s_auth::K8sAuth::new(store));
    let new_root_token = unseal_at_start(&cfg, kind, &sealing).await?;
    let token_file = cfg.data_dir.join("root-token");
    if let (true, Some(t)) = (cfg.dev, &new_root_token) {
        write_root_token(&token_file, t)?;
    }

    metrics.watch(sealing.clone());
    let metrics = Arc::new(metrics);
    let metrics_addr = match cfg.metrics_listen {
        Some(a) => Some(serve_metrics(a, metrics.clone()).await?),
        None => None,
    };
    let state = AppState {
        metrics,
        sealing: sealing.clone(),
        k8s: k8s.clone(),
        agents: Default::default(),
        member: member.clone(),
    };
    let (task, shutdown) = spawn_serving(listener, tls_config, router(state), cfg.http)?;
    let scheduler = tokio::spawn(crate::cluster::scheduler(
        sealing.clone(),
        member.clone(),
        cfg.scheduler_interval,
        cfg.cluster.clone(),
    ));
    let follower = tokio::spawn(crate::cluster::follow_changes(sealing.clone(), k8s, cfg.cluster.clone()));
    let cert_watcher = tls_cert.map(|c| c.watch(TLS_RELOAD_POLL));
    tracing::info!(%addr, "keyward listening");
    Ok(Running {
        addr,
        new_root_token,
        root_token_file: cfg.dev.then_some(token_file),
        tls: cfg.tls.is_some(),
        seal: kind.as_str(),
        member,
        metrics_addr,
        sealing,
        shutdown: Some(shutdown),
        task,
        scheduler,
        follower,
        cert_watcher,
    })
}

/// Bind the listening port; a port another process holds is a configuration error that says so.
async fn bind(cfg: &ServerConfig) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => StartError::Config(format!(
            "cannot listen on {}: another process already does (stop it, or choose another address with --listen)",
            cfg.listen
        )),
        _ => io(format!("binding {}", cfg.listen))(e),
    })?;
    let addr = listener.local_addr().map_err(io("reading bound address"))?;
    Ok((listener, addr))
}

/// Open the configured storage backend.
async fn open_store(cfg: &ServerConfig) -> Result<Arc<dyn Store>, StartError> {
    let store: Arc<dyn Store> = match &cfg.storage {
        Storage::Sqlite => Arc::new(SqliteStore::open(&cfg.data_dir.join("keyward.db"))?),
        Storage::Postgres(pg) => Arc::new(keyward_store::PostgresStore::connect(pg).await?),
    };
    tracing::info!(backend = store.backend_name(), "storage ready");
    Ok(store)
}

/// Start serving `app` on `listener` (over TLS when `tls_config` is given); returns the serving
/// task and the sender that stops it.
fn spawn_serving(
    listener: tokio::net::TcpListener,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    app: axum::Router,
    limits: crate::serve::HttpLimits,
) -> Result<(JoinHandle<std::io::Result<()>>, oneshot::Sender<()>), StartError> {
    let (tx, rx) = oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    let task = match tls_config {
        Some(tc) => {
            let listener = TlsListener::new(listener, tc).map_err(io("starting TLS listener"))?;
            tokio::spawn(crate::serve::serve(listener, app, limits, stop))
        }
        None => tokio::spawn(crate::serve::serve(listener, app, limits, stop)),
    };
    Ok((task, tx))
}

/// Dev mode is plain HTTP on loopback only; a server serves HTTPS only.
fn check_mode(cfg: &ServerConfig) -> Result<(), StartError> {
    if cfg.dev && !cfg.listen.ip().is_loopback() {
        return Err(StartError::Config(format!(
            "dev mode serves plain HTTP and may only listen on a loopback address, not {}; use 127.0.0.1",
            cfg.listen
        )));
    }
    if !cfg.dev && cfg.tls.is_none() {
        return Err(StartError::Config(
            "keyward server serves HTTPS only: pass --tls-cert and --tls-key (plain HTTP exists only in `keyward dev`)"
                .into(),
        ));
    }
    Ok(())
}

/// Create the data directory (0700) and refuse one that is not this user's alone: it holds the
/// database (and in dev mode the root key and root token), and one that someone else owns, or
/// may write, could hand this server their key or take its token.
fn own_data_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating data directory {}", dir.display())))?;
    let md = std::fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
    let me = rustix::process::geteuid().as_raw();
    if md.uid() != me || md.mode() & 0o022 != 0 {
        return Err(StartError::Config(format!(
            "the data directory {} belongs to uid {} with mode {:o}: it must be this user's (uid {me}) and writable \
             by nobody else; use a directory of your own",
            dir.display(),
            md.uid(),
            md.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Where the audit log goes (none only with `--insecure-no-audit`).
fn audit_config(cfg: &ServerConfig, store: &dyn Store, member: &Member) -> Option<AuditConfig> {
    if cfg.audit.insecure_disable {
        tracing::warn!("AUDIT DISABLED (--insecure-no-audit): requests leave no record");
        return None;
    }
    Some(AuditConfig {
        file: cfg.audit.file.clone().unwrap_or_else(|| cfg.data_dir.join("audit.log")),
        stdout: cfg.audit.stdout,
        max_file_bytes: cfg.audit.max_file_bytes,
        server: store.is_shared().then(|| member.id.clone()),
    })
}

/// The seal this configuration asks for.
fn seal_kind(cfg: &ServerConfig) -> Result<SealKind, StartError> {
    Ok(match (&cfg.pkcs11, cfg.dev || cfg.insecure_file_seal) {
        (Some(_), true) => {
            return Err(StartError::Config(
                "the PKCS#11 seal cannot be combined with dev mode or --insecure-file-seal".into(),
            ));
        }
        (Some(_), false) => SealKind::Pkcs11,
        (None, true) => SealKind::InsecureFile,
        (None, false) => SealKind::Shamir,
    })
}

/// The seal state machine over `store`, with the HSM opened and logged in for the PKCS#11 seal.
async fn open_sealing(
    cfg: &ServerConfig,
    kind: SealKind,
    store: Arc<dyn Store>,
    audit: Option<AuditConfig>,
) -> Result<Arc<Sealing>, StartError> {
    Ok(match &cfg.pkcs11 {
        Some(p) => {
            let p = p.clone();
            let hsm = tokio::task::spawn_blocking(move || keyward_hsm::Pkcs11Seal::open(&p))
                .await
                .map_err(|e| StartError::Config(format!("opening the PKCS#11 library: {e}")))?
                .map_err(SealError::from)?;
            tracing::info!(hsm = ?hsm, "PKCS#11 seal ready (logged in)");
            Arc::new(Sealing::with_hsm(store, Arc::new(hsm), audit))
        }
        None => Arc::new(Sealing::new(store, kind, audit)),
    })
}

/// Unseal what unseals itself (the dev file seal; the HSM, retried in the background) and say
/// what an operator must do otherwise. Returns the root token of a new dev store.
async fn unseal_at_start(
    cfg: &ServerConfig,
    kind: SealKind,
    sealing: &Arc<Sealing>,
) -> Result<Option<keyward_crypto::SecretBytes>, StartError> {
    match kind {
        SealKind::InsecureFile => {
            let path = cfg.data_dir.join("root-key.insecure");
            tracing::warn!(
                seal = kind.as_str(),
                "INSECURE SEAL: the unseal key is stored UNENCRYPTED in {}; anyone who can read it has every key",
                path.display()
            );
            Ok(sealing.open_with_file_seal(&InsecureFileSeal::new(path)).await?)
        }
        SealKind::Pkcs11 => {
            auto_unseal_at_start(sealing).await;
            Ok(None)
        }
        SealKind::Shamir => {
            let st = sealing.status().await?;
            if st.migration_required {
                tracing::warn!(
                    "the keyring is sealed with {}: run `keyward operator unseal --migrate` with {} shares to move it \
                     to the Shamir seal",
                    st.stored_seal.unwrap_or("?"),
                    st.threshold
                );
            } else if st.initialized {
                tracing::warn!(
                    threshold = st.threshold,
                    "sealed: run `keyward operator unseal` with {} shares",
                    st.threshold
                );
            } else {
                tracing::warn!("not initialised: run `keyward operator init` once");
            }
            Ok(None)
        }
    }
}

/// Dev mode's root token, 0600, for the local tools.
fn write_root_token(path: &std::path::Path, token: &keyward_crypto::SecretBytes) -> Result<(), StartError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("writing {}", path.display())))?;
    f.write_all(token.expose()).map_err(io("writing root token"))?;
    f.sync_all().map_err(io("writing root token"))
}

/// The metrics on a separate address, without authentication (for a private network).
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: Arc<crate::metrics::ServerMetrics>,
) -> Result<std::net::SocketAddr, StartError> {
    let l = tokio::net::TcpListener::bind(addr).await.map_err(io(format!("binding the metrics address {addr}")))?;
    let bound = l.local_addr().map_err(io("reading the metrics address"))?;
    tokio::spawn(keyward_metrics::serve(l, Arc::new(move || metrics.text()), std::future::pending()));
    tracing::info!(addr = %bound, "metrics on GET /metrics (no authentication)");
    Ok(bound)
}
