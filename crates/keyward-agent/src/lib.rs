//! The Keyward node agent: serves the Workload API (HTTP/JSON) on a Unix socket and decides
//! who a caller is by measuring it, never by what it says.
//!
//! Every connection is pinned at accept and every byte read from it is checked to come from
//! the pinned process under unchanged credentials (`keyward_attest::conn`). A caller first opens
//! a session (`POST /v1/session`): the agent measures it and answers a secret that only the
//! measured image can have learnt; each release carries that secret and is answered only if the
//! process is still that image, with the same credentials and cgroup, when the request has been
//! read and again when the answer is back (see [`session`]). Any failure refuses the request
//! with 403 and says why, and the agent's own hash-chained audit log records it.
//!
//! The socket is world-connectable on purpose (mode 0666): authorization is by measurement,
//! not by file mode. Connections are capped per uid ([`listener::ConnLimits`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod attest;
pub mod kubelet;
pub mod launcher;
pub mod listener;
pub mod metrics;
mod outage;
mod relay;
pub mod session;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use attest::Shared;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use keyward_attest::{AttestError, Measurer, Pinned};
use serde_json::{Value, json};
use tokio::net::UnixListener;
use upstream::Upstream;

pub use listener::{Caller, ConnLimits, CredListener};

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/keyward/agent.sock";
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
    /// Where the kubelet puts pods in the cgroup tree (`--cgroup-root`).
    pub kubelet_roots: keyward_attest::cgroup::KubeletRoots,
    /// Connection caps.
    pub limits: ConnLimits,
    /// Serve the agent's metrics at `GET /metrics` here (no authentication: a private address).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            hash_limit: keyward_attest::process::DEFAULT_HASH_LIMIT,
            outage_window: DEFAULT_OUTAGE_WINDOW,
            launchers: Vec::new(),
            kubelet_roots: keyward_attest::cgroup::KubeletRoots::default(),
            limits: ConnLimits::default(),
            metrics_listen: None,
        }
    }
}

/// The selector prefix a trusted launcher's requests carry for the program it will exec:
/// `exec:uid:UID:sha256:HEX` (and `exec:uid:UID:interpreter-sha256:HEX` for a script's
/// interpreter). It always names the launcher's uid: anyone may run the launcher.
pub const EXEC_SELECTOR: &str = "exec:uid:";

/// Default outage window.
pub const DEFAULT_OUTAGE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

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

impl Connected<IncomingStream<'_, CredListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, CredListener>) -> Self {
        stream.io().caller().clone()
    }
}

/// A refused Workload API request: `{"error": {"code", "message", "reason"}}`. `reason` is the
/// short, stable reason the agent's audit log records.
#[derive(Debug)]
pub struct AgentError {
    status: StatusCode,
    code: &'static str,
    message: String,
    reason: &'static str,
}

impl AgentError {
    fn unattested(e: AttestError) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "not_attested",
            reason: e.reason(),
            message: format!("the caller could not be attested: {e}"),
        }
    }

    fn internal(message: &str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: message.into(),
            reason: "internal",
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: message.into(),
            reason: "bad request",
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message, "reason": self.reason}});
        (self.status, Json(body)).into_response()
    }
}

/// The agent's own audit log: what the agent decides alone (sessions it opens, requests it
/// refuses, answers it replays from its outage cache, connections over a cap). Releases the
/// server decides are in the server's log.
///
/// Refusals are recorded one by one up to [`REFUSALS_PER_SEC`] per uid (bursts of
/// [`REFUSAL_BURST`]); past that, a uid's refusals are counted and one record says how many
/// were not recorded singly, so a local user sending refused requests without end cannot fill
/// the disk (and so stop the agent for everyone).
#[derive(Debug, Clone, Default)]
pub struct AgentLog(
    Option<Arc<keyward_audit::AuditLog>>,
    Arc<std::sync::Mutex<RefusalBudget>>,
    Arc<metrics::AgentMetrics>,
);

/// Refusal records per second, per uid, in the long run.
pub const REFUSALS_PER_SEC: f64 = 20.0;
/// Refusal records a uid may have in a burst.
pub const REFUSAL_BURST: f64 = 200.0;

/// Per uid: records it may still have now, when that was computed, refusals not recorded singly.
#[derive(Debug, Default)]
struct RefusalBudget(std::collections::HashMap<u32, (f64, std::time::Instant, u64)>);

impl RefusalBudget {
    /// Whether a refusal of `uid` is recorded singly now, and how many before it were not.
    fn take(&mut self, uid: u32) -> (bool, u64) {
        let now = std::time::Instant::now();
        if self.0.len() > 65_536 {
            self.0.retain(|_, (_, at, n)| *n > 0 || now.duration_since(*at).as_secs() < 60);
        }
        let (left, at, skipped) = self.0.entry(uid).or_insert((REFUSAL_BURST, now, 0));
        *left = (*left + now.duration_since(*at).as_secs_f64() * REFUSALS_PER_SEC).min(REFUSAL_BURST);
        *at = now;
        if *left >= 1.0 {
            *left -= 1.0;
            (true, std::mem::take(skipped))
        } else {
            *skipped += 1;
            (false, 0)
        }
    }
}

impl AgentLog {
    /// Record into `log`.
    pub fn new(log: Arc<keyward_audit::AuditLog>) -> Self {
        Self(Some(log), Arc::default(), Arc::default())
    }

    /// Open (or continue) `DIR/audit.log`, chained under the key in `DIR/audit-key`.
    pub fn open(dir: &Path) -> Result<Self, keyward_audit::AuditError> {
        Ok(Self::new(Arc::new(keyward_audit::open_with_key_file(dir)?)))
    }

    /// No log (tests and embedders that audit elsewhere).
    pub fn none() -> Self {
        Self(None, Arc::default(), Arc::default())
    }

    /// Write one record and wait until it is durable.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        (identity, client): Who,
        path: &str,
        operation: &str,
        resource: Option<String>,
        allowed: Option<bool>,
        reason: String,
        status: u16,
        error: Option<&str>,
    ) -> Result<(), AgentError> {
        let Some(log) = &self.0 else { return Ok(()) };
        let mut raw = [0u8; 8];
        let request_id = match keyward_crypto::fill_random(&mut raw) {
            Ok(()) => format!("agent-{}", hex::encode(raw)),
            Err(_) => "agent".into(),
        };
        let rec = keyward_audit::AuditRecord {
            time: keyward_audit::now_rfc3339(),
            request_id,
            identity,
            method: "POST".into(),
            path: path.into(),
            operation: Some(operation.into()),
            resource,
            decision: match allowed {
                Some(true) => "allow",
                Some(false) => "deny",
                None => "none",
            },
            reason: Some(reason),
            status,
            error: error.map(str::to_string),
            context: None,
            client: client.map(|(pid, uid)| format!("unix:pid={pid},uid={uid}")),
            chain: None,
        };
        log.append(rec).await.map_err(|e| {
            tracing::error!(error = %e, "the agent's audit record could not be written");
            AgentError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "audit_unavailable",
                message: "the agent's audit log cannot be written, so it answers nothing".into(),
                reason: "audit unavailable",
            }
        })
    }

    /// The agent's metrics (counted as records are made).
    pub fn metrics(&self) -> Arc<metrics::AgentMetrics> {
        self.2.clone()
    }

    /// Record a refusal (best effort: the refusal stands either way), within the uid's budget.
    async fn refusal(&self, who: Who, path: &str, operation: &str, e: &AgentError) {
        self.2.refusal(e.reason);
        tracing::debug!(who = who.0, path, reason = e.reason, message = %e.message, "Workload API request refused");
        let uid = who.1.map_or(u32::MAX, |(_, uid)| uid);
        let (single, skipped) = match self.1.lock() {
            Ok(mut b) => b.take(uid),
            Err(_) => (true, 0),
        };
        if skipped > 0 {
            let reason = format!(
                "refusals rate-limited: {skipped} refusals of uid {uid} were not recorded one by one (over \
                 {REFUSALS_PER_SEC} per second)"
            );
            let _ =
                self.record((format!("uid {uid}"), who.1), "-", "refusals", None, Some(false), reason, 0, None).await;
        }
        if single {
            let _ = self
                .record(who, path, operation, None, Some(false), e.reason.into(), e.status.as_u16(), Some(e.code))
                .await;
        }
    }
}

/// How a caller appears in the agent's audit records: its identity, and its pid and uid as the
/// kernel names them (the record's `client`).
type Who = (String, Option<(u32, u32)>);

fn who(caller: &Caller) -> Who {
    match caller.peer.check() {
        Ok(p) => (format!("pid {} uid {}", p.pid(), caller.uid), Some((p.pid(), caller.uid))),
        Err(_) => match caller.peer.pin_error() {
            Some(_) => (format!("unidentified uid {}", caller.uid), Some((0, caller.uid))),
            None => (format!("uid {}", caller.uid), Some((0, caller.uid))),
        },
    }
}

/// `POST /v1/session`: measure the caller and open a session for it.
async fn open_session(
    State(st): State<Arc<Shared>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Response, AgentError> {
    let a = match st.attest(&caller, true).await {
        Ok(a) => a,
        Err(e) => {
            st.log.refusal(who(&caller), "/v1/session", "session", &e).await;
            return Err(e);
        }
    };
    let s = session::Session::new(a.process, a.stamp, a.selectors.clone(), a.launcher, a.uid);
    let identity = format!("pid {} uid {} [{}]", a.pid, a.uid, a.selectors.join(" "));
    // The attestation is a decision of the agent's own: recorded before it can be used.
    st.log
        .record(
            (identity, Some((a.pid, a.uid))),
            "/v1/session",
            "session",
            None,
            Some(true),
            "measured".into(),
            200,
            None,
        )
        .await?;
    st.log.2.session();
    let secret = st.sessions.create(s).map_err(|_| AgentError::internal("no random secret"))?;
    tracing::debug!(pid = a.pid, "session opened");
    Ok(Json(json!({
        "session": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret),
        "expires_in_secs": session::SESSION_TTL.as_secs(),
        "pid": a.pid,
        "selectors": a.selectors,
    }))
    .into_response())
}

async fn whoami(
    State(st): State<Arc<Shared>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Response, AgentError> {
    match st.attest(&caller, false).await {
        Ok(a) => {
            // What a policy sees: the measurement, and the node the server adds to each release.
            let mut selectors = a.selectors;
            let node = st.upstream.as_ref().map(|u| u.node().to_string());
            if let Some(n) = &node {
                selectors.push(format!("{}{n}", keyward_core::release::NODE_SELECTOR));
                selectors.sort();
            }
            Ok(Json(json!({"pid": a.pid, "selectors": selectors, "node": node})).into_response())
        }
        Err(e) => {
            st.log.refusal(who(&caller), "/v1/whoami", "whoami", &e).await;
            Err(e)
        }
    }
}

/// `GET /v1/health`: whether the server is reachable, and what the outage cache holds.
async fn health(State(st): State<Arc<Shared>>) -> Response {
    let unreachable = st.outage.unreachable_since();
    let server = match (&st.upstream, unreachable) {
        (None, _) => "not joined",
        (Some(_), None) => "reachable",
        (Some(_), Some(_)) => "unreachable",
    };
    Json(json!({
        "server": server,
        "unreachable_for_secs": unreachable.map(|u| u.elapsed().as_secs()),
        "outage_window_secs": st.outage_window.as_secs(),
        "cached_answers": st.outage.len(),
        "sessions": st.sessions.len(),
    }))
    .into_response()
}

/// The session a request names, checked against the connection's process and stamp now.
async fn session_of(st: &Shared, caller: &Caller, headers: &HeaderMap) -> Result<session::Session, AgentError> {
    let required = |message: &str, reason: &'static str| AgentError {
        status: StatusCode::UNAUTHORIZED,
        code: "session_required",
        message: message.into(),
        reason,
    };
    let secret = headers
        .get(session::SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, v).ok())
        .ok_or_else(|| {
            required(
                "open a session first (POST /v1/session) and send its secret in the keyward-session header",
                "no session",
            )
        })?;
    let pinned = caller.peer.check().map_err(AgentError::unattested)?;
    st.sessions.get(&secret, pinned.identity()).map_err(|r| match r {
        session::Refused::Unknown => required("the session is unknown or expired; open a new one", "no session"),
        session::Refused::OtherProcess => {
            required("the session belongs to another process; each process opens its own", "session of another process")
        }
    })
}

/// Check that the connection's process is still the session's image: no exec, no credential
/// change, no move, and every byte written by it under the session's ids.
fn still_the_session(caller: &Caller, s: &session::Session) -> Result<(), AgentError> {
    let pinned = caller.peer.check().map_err(AgentError::unattested)?;
    let now = pinned.stamp().map_err(AgentError::unattested)?;
    now.same_as(&s.stamp).map_err(AgentError::unattested)?;
    caller.peer.check_stamp(&now).map_err(AgentError::unattested)
}

/// `POST /v1/verify-child` `{pid, exec_sha256}`: a launcher asks whether its child now runs the
/// program it claimed (for a script, its interpreter). The child must be the caller's own
/// child, alive, with the launcher's credentials, and its running executable (through
/// `/proc/PID/exe`) must hash to the claim.
async fn verify_child(
    State(st): State<Arc<Shared>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, AgentError> {
    let result = verify_child_inner(&st, &caller, &headers, &body).await;
    if let Err(e) = &result {
        st.log.refusal(who(&caller), "/v1/verify-child", "verify-child", e).await;
    }
    result
}

async fn verify_child_inner(
    st: &Arc<Shared>,
    caller: &Caller,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, AgentError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| AgentError::bad_request("the request body is not valid JSON"))?;
    let claim = relay::hex64(v.get("exec_sha256"))
        .ok_or_else(|| AgentError::bad_request("exec_sha256 (64 hex digits) is required"))?;
    let pid = v.get("pid").and_then(Value::as_u64).and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0);
    let pid = pid.ok_or_else(|| AgentError::bad_request("pid (a positive integer) is required"))?;
    let s = session_of(st, caller, headers).await?;
    relay::require_launcher(&s)?;
    still_the_session(caller, &s)?;
    let launcher = s.process.0;
    let measurer = st.measurer.clone();
    let peer = caller.peer.clone();
    let measured = tokio::task::spawn_blocking(move || {
        // The launcher names its child by its pid in its own pid namespace (a container's):
        // find which of the launcher's children that is, as this agent sees it.
        let own = peer.check()?;
        let mut found = None;
        for host_pid in own.children()? {
            let Ok(c) = Pinned::from_pid(host_pid) else { continue };
            if c.innermost_pid().is_ok_and(|p| p == pid) {
                found = Some(c);
                break;
            }
        }
        let Some(child) = found else { return Ok(Err(0)) };
        // Only the launcher's own child, and before anything is read of it.
        let parent = child.parent_pid()?;
        if parent != launcher {
            return Ok(Err(parent));
        }
        let m = measurer.measure(&child)?;
        child.still_alive()?;
        Ok::<_, AttestError>(Ok(m))
    })
    .await
    .map_err(|_| AgentError::internal("measurement failed unexpectedly"))?;
    let refuse =
        |message: String, reason| AgentError { status: StatusCode::FORBIDDEN, code: "exec_mismatch", message, reason };
    let m = measured
        .map_err(|e| refuse(format!("the child could not be measured: {e}"), e.reason()))?
        .map_err(|_| refuse(format!("process {pid} is not the caller's child"), "not the launcher's child"))?;
    if m.stamp.uniform_credentials().is_err() || m.uid != s.uid {
        return Err(refuse(
            format!("process {pid} does not run with the launcher's credentials"),
            "credentials changed",
        ));
    }
    let running = m.exe_sha256.map(hex::encode).unwrap_or_default();
    if running != claim {
        tracing::warn!(pid, launcher, claimed = %claim, running = %running, "launched program is not the one claimed");
        return Err(refuse(
            format!("process {pid} runs an executable with SHA-256 {running}, not the claimed {claim}"),
            "exec mismatch",
        ));
    }
    tracing::info!(pid, launcher, "launched program verified");
    Ok(Json(json!({"pid": pid, "selectors": m.selectors()})).into_response())
}

async fn not_found() -> AgentError {
    AgentError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such Workload API operation".into(),
        reason: "no such route",
    }
}

/// The Workload API routes.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/health", get(health))
        .route("/v1/session", post(open_session))
        .route("/v1/secret", relay::route(relay::Op::Secret))
        .route("/v1/data-key", relay::route(relay::Op::DataKey))
        .route("/v1/decrypt", relay::route(relay::Op::Decrypt))
        .route("/v1/sign", relay::route(relay::Op::Sign))
        .route("/v1/randomized", relay::route(relay::Op::Randomized))
        .route("/v1/verify-child", post(verify_child))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_REQUEST))
        .with_state(shared)
}

/// Parse a Workload API body from untrusted bytes as every operation would (fuzzing and
/// property tests): never a panic.
#[doc(hidden)]
pub fn parse_workload_request(data: &[u8]) -> usize {
    relay::parse_workload_request(data)
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
    keyward_attest::conn::pass_credentials(&listener).map_err(io)?;
    Ok(CredListener::new(listener))
}

/// Serve the Workload API on `listener` until `shutdown` completes; removes the socket after.
/// `upstream` is the joined server connection (without one, only `whoami` and sessions work);
/// its token is renewed in the background while serving. With `kubelet`, callers in containers
/// also get the `k8s:` selectors of their pod and container. `log` records what the agent
/// decides alone.
pub async fn serve(
    config: &AgentConfig,
    listener: CredListener,
    upstream: Option<Arc<Upstream>>,
    kubelet: Option<Arc<kubelet::Kubelet>>,
    log: AgentLog,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let renew = upstream.clone().map(|u| tokio::spawn(async move { u.keep_renewed().await }));
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(addr = %l.local_addr()?, "agent metrics on GET /metrics (no authentication)");
            let m = log.metrics();
            Some(tokio::spawn(keyward_metrics::serve(l, Arc::new(move || m.text()), std::future::pending())))
        }
        None => None,
    };
    let measurer = Measurer::new(config.hash_limit).with_kubelet_roots(config.kubelet_roots.clone());
    let shared =
        Arc::new(Shared::new(measurer, config.outage_window, upstream, kubelet, config.launchers.clone(), log.clone()));
    let mut listener = listener.with_limits(config.limits);
    // Connections refused at accept are recorded too.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u32, u32, &'static str)>(1024);
    listener.report_refusals_to(tx);
    let refusals = tokio::spawn(async move {
        while let Some((uid, pid, reason)) = rx.recv().await {
            let e = AgentError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "too_many_connections",
                message: reason.into(),
                reason,
            };
            log.refusal((format!("pid {pid} uid {uid}"), Some((pid, uid))), "-", "connect", &e).await;
        }
    });
    tracing::info!(socket = %config.socket.display(), "Workload API listening");
    let app = router(shared).into_make_service_with_connect_info::<Caller>();
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    if let Some(r) = renew {
        r.abort();
    }
    refusals.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn refusal_records_are_rate_limited_per_uid() {
        let mut b = RefusalBudget::default();
        let burst = REFUSAL_BURST as usize;
        assert!((0..burst).all(|_| b.take(7) == (true, 0)));
        assert_eq!(b.take(7), (false, 0));
        assert_eq!(b.take(7), (false, 0));
        assert_eq!(b.take(8), (true, 0), "another uid has its own budget");
        std::thread::sleep(std::time::Duration::from_millis(120));
        assert_eq!(b.take(7), (true, 2), "the next record says how many were not recorded singly");
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
