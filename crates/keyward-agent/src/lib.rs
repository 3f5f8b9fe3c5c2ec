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

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::{Json, Router};
use keyward_attest::{AttestError, Measurement, Measurer, Pinned};
use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/keyward/agent.sock";
/// Measurements run at once (each may hash an executable on a cache miss).
const MEASURE_CONCURRENCY: usize = 4;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Unix socket path of the Workload API.
    pub socket: PathBuf,
    /// Largest executable hashed for `unix:sha256` (bytes).
    pub hash_limit: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self { socket: PathBuf::from(DEFAULT_SOCKET), hash_limit: keyward_attest::process::DEFAULT_HASH_LIMIT }
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

/// The caller of one connection, pinned at accept.
#[derive(Clone, Debug)]
pub struct Caller(Arc<Result<Pinned, AttestError>>);

impl Connected<IncomingStream<'_, UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Self(Arc::new(Pinned::from_socket(stream.io())))
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
}

impl Shared {
    /// Measure the connection's caller now, and check it is still the process that connected.
    async fn attest(self: &Arc<Self>, caller: &Caller) -> Result<Measurement, AgentError> {
        if let Err(e) = caller.0.as_ref() {
            return Err(AgentError::unattested(e));
        }
        let _permit = self.permits.acquire().await.map_err(|_| AgentError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "shutting_down",
            message: "the agent is shutting down".into(),
        })?;
        let me = Arc::clone(self);
        let pinned = Arc::clone(&caller.0);
        let result = tokio::task::spawn_blocking(move || {
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
        })?;
        match result {
            Ok(m) => Ok(m),
            Err(e) => {
                tracing::info!(error = %e, "workload attestation refused");
                Err(AgentError::unattested(&e))
            }
        }
    }
}

async fn whoami(
    State(st): State<Arc<Shared>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Response, AgentError> {
    let m = st.attest(&caller).await?;
    tracing::debug!(pid = m.pid, "whoami");
    Ok(Json(json!({"pid": m.pid, "selectors": m.selectors()})).into_response())
}

async fn not_found() -> AgentError {
    AgentError { status: StatusCode::NOT_FOUND, code: "not_found", message: "no such Workload API operation".into() }
}

/// The Workload API routes.
fn router(shared: Arc<Shared>) -> Router {
    Router::new().route("/v1/whoami", get(whoami)).fallback(not_found).with_state(shared)
}

/// Bind the socket: remove a stale one left by a dead agent, refuse to replace anything else.
pub fn bind(path: &Path) -> Result<UnixListener, StartError> {
    let io = |source| StartError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(StartError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(StartError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(listener)
}

/// Serve the Workload API on `listener` until `shutdown` completes; removes the socket after.
pub async fn serve(
    config: &AgentConfig,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shared =
        Arc::new(Shared { measurer: Measurer::new(config.hash_limit), permits: Semaphore::new(MEASURE_CONCURRENCY) });
    tracing::info!(socket = %config.socket.display(), "Workload API listening");
    let app = router(shared).into_make_service_with_connect_info::<Caller>();
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    let _ = std::fs::remove_file(&config.socket);
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bind_replaces_only_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let live = bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
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
