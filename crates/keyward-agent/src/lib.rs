//! The Keyward node agent: serves the Workload API (HTTP/JSON) on a Unix socket and decides
//! who a caller is by measuring it, never by what it says.
//!
//! Every connection is pinned at accept ([`keyward_attest::Pinned::from_socket`]); every
//! request measures the pinned process again (it may have `exec`ed since the last request on
//! the same connection), then checks the process is still the same live one before the
//! selectors are used. Any failure refuses the request with 403 and says why.
//!
//! The socket is world-connectable on purpose (mode 0666): authorization is by measurement,
//! not by file mode.
#![forbid(unsafe_code)]

mod conn;
pub mod kubelet;
pub mod launcher;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use keyward_attest::{AttestError, Measurer, Pinned};
use serde_json::{Map, Value, json};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use upstream::Upstream;

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/keyward/agent.sock";
/// Measurements run at once (each may hash an executable on a cache miss).
const MEASURE_CONCURRENCY: usize = 4;
/// Largest Workload API request body.
const MAX_REQUEST: usize = 256 * 1024;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Unix socket path of the Workload API.
    pub socket: PathBuf,
    /// Largest executable hashed for `unix:sha256` (bytes).
    pub hash_limit: u64,
    /// While the server is unreachable, answer repeated requests from the cache of sealed
    /// answers for this long after they were obtained (zero: never).
    pub outage_window: std::time::Duration,
    /// SHA-256 digests of launchers trusted to claim the program they will exec
    /// (`keyward run`), besides the agent's own executable (the same `keyward` binary).
    pub launchers: Vec<[u8; 32]>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            hash_limit: keyward_attest::process::DEFAULT_HASH_LIMIT,
            outage_window: DEFAULT_OUTAGE_WINDOW,
            launchers: Vec::new(),
        }
    }
}

/// The selector a trusted launcher's requests carry for the program it will exec.
pub const EXEC_SELECTOR: &str = "exec:sha256:";

/// Default outage window.
pub const DEFAULT_OUTAGE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
/// Most sealed answers kept for outages.
const OUTAGE_CACHE_ENTRIES: usize = 4096;

/// A sealed answer and when it was obtained, by cache key.
type SealedAnswers = std::collections::HashMap<[u8; 32], (std::time::Instant, Vec<u8>)>;

/// Sealed answers (never plaintext: they are sealed to the workload's key) kept in memory for
/// outages, by (recipient key, operation, caller's selectors).
#[derive(Debug, Default)]
struct OutageCache {
    entries: std::sync::Mutex<SealedAnswers>,
    unreachable_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl OutageCache {
    fn key(recipient: &str, op: &Value, selectors: &[String]) -> [u8; 32] {
        let mut h = keyward_crypto::hash::Sha256Stream::default();
        for part in [recipient, &op.to_string(), &selectors.join("\n")] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finish()
    }

    fn put(&self, key: [u8; 32], sealed: &[u8], window: std::time::Duration) {
        if window.is_zero() {
            return;
        }
        if let Ok(mut m) = self.entries.lock() {
            if m.len() >= OUTAGE_CACHE_ENTRIES {
                m.retain(|_, (at, _)| at.elapsed() < window);
                if m.len() >= OUTAGE_CACHE_ENTRIES
                    && let Some(oldest) = m.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k)
                {
                    m.remove(&oldest);
                }
            }
            m.insert(key, (std::time::Instant::now(), sealed.to_vec()));
        }
    }

    fn get(&self, key: &[u8; 32], window: std::time::Duration) -> Option<(u64, Vec<u8>)> {
        let m = self.entries.lock().ok()?;
        let (at, body) = m.get(key)?;
        (at.elapsed() < window).then(|| (at.elapsed().as_secs(), body.clone()))
    }

    fn reachable(&self, yes: bool) {
        if let Ok(mut u) = self.unreachable_since.lock() {
            match (yes, u.is_some()) {
                (true, true) => {
                    tracing::info!("the Keyward server is reachable again");
                    *u = None;
                }
                (false, false) => {
                    tracing::warn!("the Keyward server is unreachable; answering from the outage cache");
                    *u = Some(std::time::Instant::now());
                }
                _ => {}
            }
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Another agent answers on the socket.
    #[error("another agent is already serving on {0}")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; remove it or choose another --socket")]
    NotASocket(PathBuf),
    /// The socket could not be created.
    #[error("creating the Workload API socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

pub use conn::{Caller, CredListener};

impl Connected<IncomingStream<'_, CredListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, CredListener>) -> Self {
        stream.io().caller().clone()
    }
}

/// A refused Workload API request: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct AgentError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl AgentError {
    fn unattested(e: &AttestError) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "not_attested",
            message: format!("the caller could not be attested: {e}"),
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

struct Shared {
    measurer: Measurer,
    permits: Semaphore,
    outage: OutageCache,
    outage_window: std::time::Duration,
    upstream: Option<Arc<Upstream>>,
    kubelet: Option<Arc<kubelet::Kubelet>>,
    /// Configured launcher digests, as `unix:sha256:HEX` selectors.
    extra_launchers: Vec<String>,
    /// Those plus the agent's own executable, measured on first use (hashing a large binary
    /// must not delay start-up or signal handling).
    launchers: tokio::sync::OnceCell<Vec<String>>,
}

/// A caller's identity: its pid and every selector measured for it.
#[derive(Debug)]
struct Attested {
    pid: u32,
    selectors: Vec<String>,
}

impl Shared {
    /// Measure the connection's caller now (and ask the kubelet about its container), and check
    /// it is still the process that connected.
    async fn attest(self: &Arc<Self>, caller: &Caller) -> Result<Attested, AgentError> {
        if let Err(e) = caller.pinned.as_ref() {
            return Err(AgentError::unattested(e));
        }
        let _permit = self.permits.acquire().await.map_err(|_| AgentError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "shutting_down",
            message: "the agent is shutting down".into(),
        })?;
        // A known executable is measured here (a few small /proc reads); a new one is hashed on
        // a blocking thread.
        let pinned = Arc::clone(&caller.pinned);
        let cached = pinned.as_ref().as_ref().map_err(|_| AttestError::Gone).and_then(|p| {
            let m = self.measurer.measure_if_cached(p)?;
            if m.is_some() {
                p.still_alive()?;
            }
            Ok(m)
        });
        let result = match cached {
            Ok(Some(m)) => Ok(m),
            Err(e) => Err(e),
            Ok(None) => {
                let me = Arc::clone(self);
                tokio::task::spawn_blocking(move || {
                    let p = pinned.as_ref().as_ref().map_err(|_| AttestError::Gone)?;
                    let m = me.measurer.measure(p)?;
                    p.still_alive()?;
                    Ok::<_, AttestError>(m)
                })
                .await
                .map_err(|_| AgentError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal",
                    message: "measurement failed unexpectedly".into(),
                })?
            }
        };
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(error = %e, "workload attestation refused");
                return Err(AgentError::unattested(&e));
            }
        };
        let mut selectors = m.selectors();
        if let (Some(k), Some(cid)) = (&self.kubelet, &m.cgroup.container_id) {
            match k.selectors(cid, m.cgroup.pod_uid.as_deref()).await {
                Ok(more) => selectors.extend(more),
                Err(e) => {
                    tracing::info!(pid = m.pid, error = %e, "workload attestation refused");
                    return Err(AgentError {
                        status: StatusCode::FORBIDDEN,
                        code: "not_attested",
                        message: format!("the caller could not be attested: {e}"),
                    });
                }
            }
            // The kubelet lookup may have taken a while: the process must still be there.
            if let Err(e) = caller.pinned.as_ref().as_ref().map_err(|_| AttestError::Gone).and_then(Pinned::still_alive)
            {
                return Err(AgentError::unattested(&e));
            }
        }
        // Every byte of the request must have come from the process that was measured.
        if caller.foreign_writer.load(std::sync::atomic::Ordering::Acquire) {
            return Err(AgentError {
                status: StatusCode::FORBIDDEN,
                code: "not_attested",
                message: "the request was written by another process than the one that connected \
                          (a passed or inherited socket); each process must open its own connection"
                    .into(),
            });
        }
        selectors.sort();
        selectors.dedup();
        Ok(Attested { pid: m.pid, selectors })
    }

    /// The trusted launchers: the configured ones and the agent's own executable (`keyward run`
    /// is the same binary).
    async fn launchers(self: &Arc<Self>) -> &[String] {
        self.launchers
            .get_or_init(|| async {
                let mut all = self.extra_launchers.clone();
                let me = Arc::clone(self);
                let own = tokio::task::spawn_blocking(move || {
                    Pinned::from_pid(std::process::id()).and_then(|p| me.measurer.measure(&p))
                })
                .await;
                match own {
                    Ok(Ok(m)) => all.extend(m.exe_sha256.map(|h| format!("unix:sha256:{}", hex::encode(h)))),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot measure the agent's own executable; `keyward run` is not trusted"),
                    Err(e) => tracing::warn!(error = %e, "cannot measure the agent's own executable"),
                }
                all
            })
            .await
    }

    /// Refuse unless the caller runs a trusted launcher (`keyward run`).
    async fn check_launcher(self: &Arc<Self>, a: &Attested) -> Result<(), AgentError> {
        let launchers = self.launchers().await;
        if a.selectors.iter().any(|s| launchers.contains(s)) {
            return Ok(());
        }
        Err(AgentError {
            status: StatusCode::FORBIDDEN,
            code: "not_a_launcher",
            message: "only a trusted launcher (`keyward run`, the same binary as this agent) may name the program \
                      it will exec (exec_sha256)"
                .into(),
        })
    }
}

/// Take the optional `exec_sha256` claim (64 lower-case hex digits) out of a request body.
fn take_exec_claim(body: &mut Value) -> Result<Option<String>, AgentError> {
    let Some(m) = body.as_object_mut() else { return Ok(None) };
    match m.remove("exec_sha256") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(h))
            if h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(Some(h))
        }
        Some(_) => Err(bad_request("exec_sha256 must be 64 lower-case hex digits")),
    }
}

/// `POST /v1/verify-child` `{pid, exec_sha256}`: a launcher asks whether its child now runs the
/// program it claimed. The child must be the caller's own child, alive, and its running
/// executable (through `/proc/PID/exe`) must hash to the claim.
async fn verify_child(
    State(st): State<Arc<Shared>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, AgentError> {
    let mut v = json_body(body).await?;
    let claim = take_exec_claim(&mut v)?.ok_or_else(|| bad_request("exec_sha256 is required"))?;
    let pid = v.get("pid").and_then(Value::as_u64).and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0);
    let pid = pid.ok_or_else(|| bad_request("pid (a positive integer) is required"))?;
    let a = st.attest(&caller).await?;
    st.check_launcher(&a).await?;
    let me = Arc::clone(&st);
    let launcher = a.pid;
    let measured = tokio::task::spawn_blocking(move || {
        let child = Pinned::from_pid(pid)?;
        // Only the launcher's own child, and before anything is read of it.
        let parent = child.parent_pid()?;
        if parent != launcher {
            return Ok(Err(parent));
        }
        let m = me.measurer.measure(&child)?;
        child.still_alive()?;
        Ok::<_, AttestError>(Ok(m))
    })
    .await
    .map_err(|_| AgentError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal",
        message: "measurement failed unexpectedly".into(),
    })?;
    let refuse = |message: String| AgentError { status: StatusCode::FORBIDDEN, code: "exec_mismatch", message };
    let m = measured
        .map_err(|e| refuse(format!("the child could not be measured: {e}")))?
        .map_err(|_| refuse(format!("process {pid} is not the caller's child")))?;
    let running = m.exe_sha256.map(hex::encode).unwrap_or_default();
    if running != claim {
        tracing::warn!(pid, launcher, claimed = %claim, running = %running, "launched program is not the one claimed");
        return Err(refuse(format!(
            "process {pid} runs an executable with SHA-256 {running}, not the claimed {claim}"
        )));
    }
    tracing::info!(pid, launcher, "launched program verified");
    Ok(Json(json!({"pid": pid, "selectors": m.selectors()})).into_response())
}

async fn whoami(
    State(st): State<Arc<Shared>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Response, AgentError> {
    let a = st.attest(&caller).await?;
    tracing::debug!(pid = a.pid, "whoami");
    Ok(Json(json!({"pid": a.pid, "selectors": a.selectors})).into_response())
}

fn bad_request(message: impl Into<String>) -> AgentError {
    AgentError { status: StatusCode::BAD_REQUEST, code: "invalid_argument", message: message.into() }
}

/// The operations the Workload API relays, and how each becomes a release operation.
#[derive(Clone, Copy, Debug)]
enum Op {
    Secret,
    DataKey,
    Decrypt,
    Sign,
    Randomized,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Secret => "read-secret",
            Self::DataKey => "generate-data-key",
            Self::Decrypt => "decrypt",
            Self::Sign => "sign",
            Self::Randomized => "randomized",
        }
    }

    /// Split a request into the recipient key and the server-side operation.
    fn parse(self, body: Value) -> Result<(String, Value), AgentError> {
        let Value::Object(mut m) = body else { return Err(bad_request("the request body must be a JSON object")) };
        let take_str = |m: &mut Map<String, Value>, k: &str| match m.remove(k) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(bad_request(format!("{k} (a string) is required"))),
        };
        let recipient = take_str(&mut m, "recipient")?;
        let op = match self {
            Self::Secret => {
                let path = take_str(&mut m, "path")?;
                let version = match m.remove("version") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().ok_or_else(|| bad_request("version must be a positive integer"))?),
                };
                if let Some(k) = m.keys().next() {
                    return Err(bad_request(format!("unknown field {k:?}")));
                }
                json!({"kind": self.name(), "path": path, "version": version})
            }
            Self::DataKey | Self::Sign => {
                let key = take_str(&mut m, "key")?;
                json!({"kind": self.name(), "key": key, "body": Value::Object(m)})
            }
            Self::Decrypt => json!({"kind": self.name(), "body": Value::Object(m)}),
            Self::Randomized => {
                let name = take_str(&mut m, "name")?;
                if let Some(k) = m.keys().next() {
                    return Err(bad_request(format!("unknown field {k:?}")));
                }
                json!({"kind": self.name(), "name": name})
            }
        };
        Ok((recipient, op))
    }
}

async fn relay(st: Arc<Shared>, caller: Caller, op: Op, body: Value) -> Result<Response, AgentError> {
    let Some(up) = st.upstream.clone() else {
        return Err(AgentError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "no_server",
            message: "this agent is not joined to a Keyward server (start it with --server and --join-token-file)"
                .into(),
        });
    };
    let mut body = body;
    let exec = take_exec_claim(&mut body)?;
    let (recipient, release_op) = op.parse(body)?;
    // Nonce first, then measure: the evidence is newer than the nonce the server checks.
    let nonce = up.nonce().await;
    let mut a = st.attest(&caller).await?;
    if let Some(h) = exec {
        st.check_launcher(&a).await?;
        a.selectors.push(format!("{EXEC_SELECTOR}{h}"));
        a.selectors.sort();
    }
    // Answers that are the same each time may be replayed during an outage; a data key must
    // be new each time, so it is never cached.
    let cacheable = !matches!(op, Op::DataKey);
    let cache_key = OutageCache::key(&recipient, &release_op, &a.selectors);
    let result = match nonce {
        Ok(n) => up.release(&n, a.pid, &a.selectors, &recipient, release_op).await,
        Err(e) => Err(e),
    };
    let json = (axum::http::header::CONTENT_TYPE, "application/json");
    match result {
        Ok((status, bytes)) => {
            st.outage.reachable(true);
            tracing::info!(pid = a.pid, op = op.name(), status, "release");
            if cacheable && (200..300).contains(&status) {
                st.outage.put(cache_key, &bytes, st.outage_window);
            }
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            Ok((status, [json], bytes).into_response())
        }
        Err(e) => {
            let status = e.status();
            // Unreachable (or sealed, 503): an outage.
            if e.unreachable() || status == Some(503) {
                st.outage.reachable(false);
                if cacheable && let Some((age, bytes)) = st.outage.get(&cache_key, st.outage_window) {
                    tracing::info!(pid = a.pid, op = op.name(), age, "release answered from the outage cache");
                    let age = axum::http::HeaderValue::from(age);
                    return Ok((StatusCode::OK, [json], [("keyward-cached-age-secs", age)], bytes).into_response());
                }
                tracing::warn!(pid = a.pid, op = op.name(), error = %e, "release failed: server unreachable");
                return Err(AgentError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "server_unavailable",
                    message: format!(
                        "the Keyward server cannot be reached and no earlier answer to this request is cached: {e}"
                    ),
                });
            }
            tracing::warn!(pid = a.pid, op = op.name(), error = %e, "release failed");
            Err(AgentError {
                status: status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::BAD_GATEWAY),
                code: "server_unavailable",
                message: format!("the Keyward server could not be asked: {e}"),
            })
        }
    }
}

/// `GET /v1/health`: whether the server is reachable, and what the outage cache holds.
async fn health(State(st): State<Arc<Shared>>) -> Response {
    let unreachable = st.outage.unreachable_since.lock().ok().and_then(|u| *u);
    let cached = st.outage.entries.lock().map(|m| m.len()).unwrap_or(0);
    let server = match (&st.upstream, unreachable) {
        (None, _) => "not joined",
        (Some(_), None) => "reachable",
        (Some(_), Some(_)) => "unreachable",
    };
    Json(json!({
        "server": server,
        "unreachable_for_secs": unreachable.map(|u| u.elapsed().as_secs()),
        "outage_window_secs": st.outage_window.as_secs(),
        "cached_answers": cached,
    }))
    .into_response()
}

async fn json_body(body: axum::body::Bytes) -> Result<Value, AgentError> {
    serde_json::from_slice(&body).map_err(|_| bad_request("the request body is not valid JSON"))
}

/// `POST` route relaying one operation.
fn relay_route(op: Op) -> axum::routing::MethodRouter<Arc<Shared>> {
    post(
        move |State(st): State<Arc<Shared>>, ConnectInfo(c): ConnectInfo<Caller>, body: axum::body::Bytes| async move {
            relay(st, c, op, json_body(body).await?).await
        },
    )
}

/// Parse a Workload API body from untrusted bytes as every operation would (fuzzing and
/// property tests): never a panic.
#[doc(hidden)]
pub fn parse_workload_request(data: &[u8]) -> usize {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return 0 };
    [Op::Secret, Op::DataKey, Op::Decrypt, Op::Sign, Op::Randomized]
        .into_iter()
        .filter(|op| op.parse(v.clone()).is_ok())
        .count()
}

async fn not_found() -> AgentError {
    AgentError { status: StatusCode::NOT_FOUND, code: "not_found", message: "no such Workload API operation".into() }
}

/// The Workload API routes.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/health", get(health))
        .route("/v1/secret", relay_route(Op::Secret))
        .route("/v1/data-key", relay_route(Op::DataKey))
        .route("/v1/decrypt", relay_route(Op::Decrypt))
        .route("/v1/sign", relay_route(Op::Sign))
        .route("/v1/randomized", relay_route(Op::Randomized))
        .route("/v1/verify-child", post(verify_child))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_REQUEST))
        .with_state(shared)
}

/// Bind the socket (mode 0666: callers are authorized by measurement, not by file mode):
/// remove a stale one left by a dead agent, refuse to replace anything else.
pub fn bind(path: &Path) -> Result<CredListener, StartError> {
    use keyward_attest::socket::BindError;
    let listener = keyward_attest::socket::bind(path, 0o666).map_err(|e| match e {
        BindError::InUse(p) => StartError::InUse(p),
        BindError::NotASocket(p) => StartError::NotASocket(p),
        BindError::Io { path, source } => StartError::Io { path, source },
        other => StartError::Io { path: path.to_path_buf(), source: std::io::Error::other(other.to_string()) },
    })?;
    let io = |source| StartError::Io { path: path.to_path_buf(), source };
    let listener = UnixListener::from_std(listener).map_err(io)?;
    conn::pass_credentials(&listener).map_err(io)?;
    Ok(CredListener(listener))
}

/// Serve the Workload API on `listener` until `shutdown` completes; removes the socket after.
/// `upstream` is the joined server connection (without one, only `whoami` works); its token
/// is renewed in the background while serving. With `kubelet`, callers in containers also get
/// the `k8s:` selectors of their pod and container.
pub async fn serve(
    config: &AgentConfig,
    listener: CredListener,
    upstream: Option<Arc<Upstream>>,
    kubelet: Option<Arc<kubelet::Kubelet>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let renew = upstream.clone().map(|u| tokio::spawn(async move { u.keep_renewed().await }));
    let measurer = Measurer::new(config.hash_limit);
    // The agent's own executable is the trusted launcher (`keyward run` is the same binary).
    let mut launchers: Vec<String> =
        config.launchers.iter().map(|h| format!("unix:sha256:{}", hex::encode(h))).collect();
    match Pinned::from_pid(std::process::id()).and_then(|me| measurer.measure(&me)) {
        Ok(m) => launchers.extend(m.exe_sha256.map(|h| format!("unix:sha256:{}", hex::encode(h)))),
        Err(e) => tracing::warn!(error = %e, "cannot measure the agent's own executable; `keyward run` is not trusted"),
    }
    let shared = Arc::new(Shared {
        measurer,
        permits: Semaphore::new(MEASURE_CONCURRENCY),
        outage: OutageCache::default(),
        outage_window: config.outage_window,
        upstream,
        kubelet,
        extra_launchers: config.launchers.iter().map(|h| format!("unix:sha256:{}", hex::encode(h))).collect(),
        launchers: tokio::sync::OnceCell::new(),
    });
    tracing::info!(socket = %config.socket.display(), "Workload API listening");
    let app = router(shared).into_make_service_with_connect_info::<Caller>();
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    if let Some(r) = renew {
        r.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn workload_requests_become_release_ops() {
        let (r, op) = Op::Secret.parse(json!({"path": "a/b", "version": 2, "recipient": "AA=="})).unwrap();
        assert_eq!(r, "AA==");
        assert_eq!(op, json!({"kind": "read-secret", "path": "a/b", "version": 2}));
        let (_, op) = Op::Sign.parse(json!({"key": "k", "message": "eA==", "recipient": "AA=="})).unwrap();
        assert_eq!(op, json!({"kind": "sign", "key": "k", "body": {"message": "eA=="}}));
        for bad in [
            json!({"path": "a"}),
            json!({"path": "a", "recipient": 1}),
            json!({"path": "a", "recipient": "x", "extra": 1}),
            json!({"path": "a", "recipient": "x", "version": -1}),
            json!([1]),
        ] {
            assert!(Op::Secret.parse(bad.clone()).is_err(), "{bad}");
        }
        assert!(Op::Sign.parse(json!({"recipient": "x"})).is_err());
    }

    proptest::proptest! {
        #[test]
        fn workload_parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_workload_request(&bytes);
        }

        #[test]
        fn json_shaped_workload_requests_never_panic(
            s in r#"\{("(path|key|recipient|version|message|context|x)":(-?[0-9]{0,12}|"[ -~]{0,16}"|null|true|\[\]|\{\}),?){0,6}\}"#
        ) {
            let _ = parse_workload_request(s.as_bytes());
        }
    }

    #[test]
    fn bind_replaces_only_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let live = bind(&path).unwrap();
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777;
            assert_eq!(mode, 0o666);
            assert!(matches!(bind(&path), Err(StartError::InUse(_))));
            drop(live); // the socket file stays behind, nobody listens: stale
            bind(&path).unwrap();
        });
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(StartError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
