//! The operations the Workload API relays to the server as signed releases, and how each one is
//! bound to the session of the process that asks.

use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::attest::Shared;
use crate::listener::Caller;
use crate::outage::OutageCache;
use crate::session::Session;
use crate::{AgentError, EXEC_SELECTOR, session_of, still_the_session, who};

/// The operations the Workload API relays, and how each becomes a release operation.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
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

    fn path(self) -> &'static str {
        match self {
            Self::Secret => "/v1/secret",
            Self::DataKey => "/v1/data-key",
            Self::Decrypt => "/v1/decrypt",
            Self::Sign => "/v1/sign",
            Self::Randomized => "/v1/randomized",
        }
    }

    /// Split a request into the recipient key and the server-side operation.
    fn parse(self, body: Value) -> Result<(String, Value), AgentError> {
        let Value::Object(mut m) = body else {
            return Err(AgentError::bad_request("the request body must be a JSON object"));
        };
        let take_str = |m: &mut Map<String, Value>, k: &str| match m.remove(k) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(AgentError::bad_request(format!("{k} (a string) is required"))),
        };
        let recipient = take_str(&mut m, "recipient")?;
        let op = match self {
            Self::Secret => {
                let path = take_str(&mut m, "path")?;
                let version = match m.remove("version") {
                    None | Some(Value::Null) => None,
                    Some(v) => {
                        Some(v.as_u64().ok_or_else(|| AgentError::bad_request("version must be a positive integer"))?)
                    }
                };
                if let Some(k) = m.keys().next() {
                    return Err(AgentError::bad_request(format!("unknown field {k:?}")));
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
                    return Err(AgentError::bad_request(format!("unknown field {k:?}")));
                }
                json!({"kind": self.name(), "name": name})
            }
        };
        Ok((recipient, op))
    }
}

/// A 64-digit lower-case hex value, if `v` is one.
pub(crate) fn hex64(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(h))
            if h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Some(h.clone())
        }
        _ => None,
    }
}

/// What a launcher claims about the program it will exec: its SHA-256 and, for a script, its
/// interpreter's.
#[derive(Debug, Default)]
struct ExecClaim {
    program: Option<String>,
    interpreter: Option<String>,
}

/// Take the optional `exec_sha256` and `exec_interpreter_sha256` claims out of a request body.
fn take_exec_claim(body: &mut Value) -> Result<ExecClaim, AgentError> {
    let Some(m) = body.as_object_mut() else { return Ok(ExecClaim::default()) };
    let mut take = |k: &str| match m.remove(k) {
        None | Some(Value::Null) => Ok(None),
        v @ Some(_) => hex64(v.as_ref())
            .map(Some)
            .ok_or_else(|| AgentError::bad_request(format!("{k} must be 64 lower-case hex digits"))),
    };
    let claim = ExecClaim { program: take("exec_sha256")?, interpreter: take("exec_interpreter_sha256")? };
    if claim.interpreter.is_some() && claim.program.is_none() {
        return Err(AgentError::bad_request("exec_interpreter_sha256 needs exec_sha256 (the script's)"));
    }
    Ok(claim)
}

/// Refuse unless the session's process runs a trusted launcher (`keyward run`).
pub(crate) fn require_launcher(s: &Session) -> Result<(), AgentError> {
    if s.launcher {
        return Ok(());
    }
    Err(AgentError {
        status: StatusCode::FORBIDDEN,
        code: "not_a_launcher",
        message: "only a trusted launcher (`keyward run`, the same binary as this agent) may name the program \
                  it will exec (exec_sha256)"
            .into(),
        reason: "not a launcher",
    })
}

/// A refusal from the server, with what the caller was measured as: the selectors a policy
/// would have to name (the server's audit record, by its request id, has the decision).
fn explain_refusal(body: &[u8], selectors: &[String], node: &str) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else { return body.to_vec() };
    let mut all: Vec<String> = selectors.to_vec();
    all.push(format!("{}{node}", keyward_core::release::NODE_SELECTOR));
    all.sort();
    if let Some(m) = v["error"]["message"].as_str() {
        let rid = v["error"]["request_id"].as_str().unwrap_or("-");
        v["error"]["message"] = Value::String(format!(
            "{m}; this process was measured as [{}] (`keyward workload whoami` shows them; the server's audit \
             record {rid} has the decision)",
            all.join(" ")
        ));
        v["error"]["selectors"] = json!(all);
    }
    serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec())
}

/// `POST` route relaying one operation.
pub(crate) fn route(op: Op) -> axum::routing::MethodRouter<Arc<Shared>> {
    axum::routing::post(
        move |State(st): State<Arc<Shared>>,
              ConnectInfo(c): ConnectInfo<Caller>,
              headers: HeaderMap,
              body: axum::body::Bytes| async move {
            let result = relay(&st, &c, op, &headers, &body).await;
            match &result {
                Ok(r) => st.log.metrics().release(op.name(), r.status().as_u16()),
                Err(e) => st.log.refusal(who(&c), op.path(), op.name(), e).await,
            }
            result
        },
    )
}

/// Parse a Workload API body from untrusted bytes as every operation would (fuzzing and
/// property tests): never a panic.
pub(crate) fn parse_workload_request(data: &[u8]) -> usize {
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else { return 0 };
    let _ = take_exec_claim(&mut v);
    [Op::Secret, Op::DataKey, Op::Decrypt, Op::Sign, Op::Randomized]
        .into_iter()
        .filter(|op| op.parse(v.clone()).is_ok())
        .count()
}

/// Relay one Workload API operation to the server as a signed release bound to the caller's
/// session, and hand its answer (or, in an outage, a cached one) only to that session's process.
async fn relay(
    st: &Arc<Shared>,
    caller: &Caller,
    op: Op,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, AgentError> {
    let Some(up) = st.upstream.clone() else {
        return Err(AgentError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "no_server",
            message: "this agent is not joined to a Keyward server (start it with --server and --join-token-file)"
                .into(),
            reason: "not joined",
        });
    };
    let mut body: Value =
        serde_json::from_slice(body).map_err(|_| AgentError::bad_request("the request body is not valid JSON"))?;
    let claim = take_exec_claim(&mut body)?;
    let (recipient, release_op) = op.parse(body)?;
    let s = session_of(st, caller, headers).await?;
    let selectors = claimed_selectors(&s, &claim)?;
    // Nonce first, then the stamp: the evidence is newer than the nonce the server checks.
    let nonce = up.nonce().await;
    still_the_session(caller, &s)?;
    // Answers that are the same each time may be replayed during an outage; a data key must
    // be new each time, so it is never cached.
    let cacheable = !matches!(op, Op::DataKey);
    let cache_key = OutageCache::key(&recipient, &release_op, &selectors);
    let pid = s.process.0;
    let result = match nonce {
        Ok(n) => up.release(&n, pid, &selectors, &recipient, release_op).await,
        Err(e) => Err(e),
    };
    // The answer is handed only to the image that asked: the process must still be it.
    still_the_session(caller, &s)?;
    let relayed = Relayed { st, op, session: &s, selectors: &selectors, cacheable, cache_key };
    match result {
        Ok((status, bytes)) => Ok(relayed.answered(status, bytes, up.node())),
        Err(e) => relayed.failed(&e).await,
    }
}

/// The session's selectors, with the program (and interpreter) a trusted launcher claims it will
/// exec added; a claim from any other process is refused.
fn claimed_selectors(s: &Session, claim: &ExecClaim) -> Result<Vec<String>, AgentError> {
    let mut selectors = s.selectors.clone();
    if let Some(h) = &claim.program {
        require_launcher(s)?;
        selectors.push(format!("{EXEC_SELECTOR}{}:sha256:{h}", s.uid));
        if let Some(i) = &claim.interpreter {
            selectors.push(format!("{EXEC_SELECTOR}{}:interpreter-sha256:{i}", s.uid));
        }
        selectors.sort();
    }
    Ok(selectors)
}

/// A release the server was asked for, as its answer is handled.
struct Relayed<'a> {
    st: &'a Shared,
    op: Op,
    session: &'a Session,
    selectors: &'a [String],
    /// Whether its answer may be replayed during an outage.
    cacheable: bool,
    cache_key: [u8; 32],
}

impl Relayed<'_> {
    /// The server's answer, relayed (cached for an outage if it may be; a refusal explained).
    fn answered(&self, status: u16, bytes: Vec<u8>, node: &str) -> Response {
        let (st, pid) = (self.st, self.session.process.0);
        let json = (axum::http::header::CONTENT_TYPE, "application/json");
        st.outage.reachable(true);
        tracing::info!(pid, op = self.op.name(), status, "release");
        if self.cacheable && (200..300).contains(&status) {
            st.outage.put(self.cache_key, &bytes, st.outage_window);
        }
        let bytes = if status == 403 { explain_refusal(&bytes, self.selectors, node) } else { bytes };
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        (status, [json], bytes).into_response()
    }

    /// The server could not be asked: in an outage, the cached answer or a 503; otherwise the
    /// server's error.
    async fn failed(&self, e: &crate::upstream::UpstreamError) -> Result<Response, AgentError> {
        let status = e.status();
        if let Some(why) = outage(e) {
            return self.during_outage(e, why).await;
        }
        tracing::warn!(pid = self.session.process.0, op = self.op.name(), error = %e, "release failed");
        Err(AgentError {
            status: status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::BAD_GATEWAY),
            code: "server_unavailable",
            message: format!("the Keyward server could not be asked: {e}"),
            reason: "server error",
        })
    }

    /// In an outage (`why`): the same client's cached answer, recorded before it leaves, or a 503.
    async fn during_outage(
        &self,
        e: &crate::upstream::UpstreamError,
        why: &'static str,
    ) -> Result<Response, AgentError> {
        let (st, s, op) = (self.st, self.session, self.op);
        let pid = s.process.0;
        let json = (axum::http::header::CONTENT_TYPE, "application/json");
        st.outage.reachable(false);
        if self.cacheable
            && let Some((age, bytes)) = st.outage.get(&self.cache_key, st.outage_window)
        {
            // A release the agent decides alone: recorded before it leaves.
            let identity = format!("pid {pid} uid {} [{}]", s.uid, self.selectors.join(" "));
            st.log
                .record(
                    (identity, Some((pid, s.uid))),
                    op.path(),
                    op.name(),
                    None,
                    Some(true),
                    format!("outage cache: the same client's answer of {age} s ago, {why}"),
                    200,
                    None,
                )
                .await?;
            tracing::info!(pid, op = op.name(), age, "release answered from the outage cache");
            st.log.metrics().replay();
            let age = axum::http::HeaderValue::from(age);
            return Ok((StatusCode::OK, [json], [("keyward-cached-age-secs", age)], bytes).into_response());
        }
        tracing::warn!(pid, op = op.name(), error = %e, "release failed: {why}");
        Err(AgentError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "server_unavailable",
            message: format!(
                "the Keyward server cannot be reached and no earlier answer to this request is cached: {e}"
            ),
            reason: why,
        })
    }
}

/// Whether a failure is an outage the cache may answer through, and which: the server cannot be
/// reached, a proxy in front of it says so (502/504 without a Keyward error code), or its
/// storage is unavailable. A server that answers with a refusal of its own is not an outage:
/// sealed by an operator (an emergency stop), its audit log unwritable (it refuses to act
/// unrecorded), too busy (a load another agent can cause): those get no replay.
fn outage(e: &crate::upstream::UpstreamError) -> Option<&'static str> {
    if e.unreachable() {
        return Some("server unreachable");
    }
    match (e.status(), e.code()) {
        (_, Some("unavailable")) => Some("server storage unavailable"),
        (Some(502 | 504), code) if code.is_none_or(|c| keyward_client::ErrorKind::of_code(c).is_none()) => {
            Some("no answer through the proxy")
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_an_outage_is_answered_from_the_cache() {
        let api = |status: u16, code: &str| {
            crate::upstream::UpstreamError::Client(keyward_client::Error::Api {
                status,
                code: code.into(),
                message: String::new(),
                request_id: String::new(),
            })
        };
        assert!(outage(&api(503, "unavailable")).is_some(), "the server's storage is down");
        assert!(outage(&api(502, "unknown")).is_some(), "a proxy cannot reach the server");
        // The server answered and refused: an operator's seal, an unwritable audit log, a
        // nonce table another agent may have filled, a permission refusal.
        for (status, code) in [(503, "sealed"), (503, "audit_unavailable"), (503, "busy"), (403, "permission_denied")] {
            assert!(outage(&api(status, code)).is_none(), "{code}");
        }
    }

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

    #[test]
    fn exec_claims() {
        let h = "ab".repeat(32);
        let mut v = json!({"exec_sha256": h, "exec_interpreter_sha256": "cd".repeat(32), "path": "x"});
        let c = take_exec_claim(&mut v).unwrap();
        assert_eq!(c.program.as_deref(), Some(h.as_str()));
        assert_eq!(v, json!({"path": "x"}));
        assert!(take_exec_claim(&mut json!({"exec_interpreter_sha256": h})).is_err());
        assert!(take_exec_claim(&mut json!({"exec_sha256": "AB".repeat(32)})).is_err());
        assert!(take_exec_claim(&mut json!({"exec_sha256": 1})).is_err());
    }

    proptest::proptest! {
        #[test]
        fn workload_parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_workload_request(&bytes);
        }

        #[test]
        fn json_shaped_workload_requests_never_panic(
            s in r#"\{("(path|key|recipient|version|message|context|exec_sha256|x)":(-?[0-9]{0,12}|"[ -~]{0,16}"|null|true|\[\]|\{\}),?){0,6}\}"#
        ) {
            let _ = parse_workload_request(s.as_bytes());
        }
    }
}
