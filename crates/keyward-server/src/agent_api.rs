//! Node agents: joining with a one-time token, single-use nonces, and attested release.
//!
//! - An operator creates a **join token** for a node (`admin` on `agents/NODE`): one use, short
//!   TTL, carrying the selector `keyward:join:NODE`.
//! - The agent **joins** with it and an Ed25519 public key it generated; it gets an agent token
//!   whose selectors are `node:name:NODE` and `keyward:agent-key:SHA256(public key)`. The token
//!   alone is not enough to release anything: every release is signed with the key.
//! - A **release** carries a server nonce (single use, 10 s), the workload's measured selectors,
//!   the workload's ephemeral X25519 public key, and one operation. The server runs that
//!   operation through the normal API *as the workload* (selectors plus the node's, no token
//!   policies: only policies attached by identity can grant it), audits it with the selectors,
//!   and seals a successful response to the workload's key with HPKE, so neither the agent nor
//!   the network sees the secret.
//! - A **batch** (`POST /v1/agent/releases`) carries up to [`MAX_BATCH`] releases under one
//!   signature; each is otherwise handled, audited and answered as a release of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use keyward_core::model::TokenRecord;
use keyward_core::policy::selector_ok;
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::api::AppState;
use crate::audit::AuditCtx;
use crate::error::ApiError;
use crate::extract::{Caller, MAX_BODY, RequestId, StrictJson};
use crate::wire::{b64, parse_period, time, unb64};

pub use keyward_core::release::{
    AGENT_KEY_SELECTOR, BATCH_PROOF_CONTEXT, JOIN_SELECTOR, MAX_BATCH, NODE_SELECTOR, PROOF_CONTEXT, SIGNATURE_HEADER,
};
/// HPKE `info` of sealed releases; the nonce is the associated data.
pub use keyward_crypto::hpke::RELEASE_INFO;

const NONCE_TTL: Duration = Duration::from_secs(10);
const MAX_NONCES: usize = 100_000;
const DEFAULT_JOIN_TTL: u64 = 3600;
const MAX_JOIN_TTL: u64 = 7 * 86400;
const AGENT_TTL: u64 = 3600;
const AGENT_MAX_TTL: u64 = 30 * 86400;
const MAX_WORKLOAD_SELECTORS: usize = 128;
/// Largest inner response sealed (a secret is at most 64 KiB of data, plus JSON).
const MAX_RELEASE_RESPONSE: usize = 512 * 1024;

/// Outstanding nonces, by value: (agent token accessor, issued at).
#[derive(Debug, Default)]
pub struct Agents {
    nonces: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl Agents {
    fn issue(&self, accessor: &str) -> Result<[u8; 32], ApiError> {
        let mut n = [0u8; 32];
        keyward_crypto::fill_random(&mut n).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut map = self.nonces.lock().map_err(|_| ApiError::internal("nonce table poisoned".into()))?;
        if map.len() >= MAX_NONCES / 2 {
            map.retain(|_, (_, at)| at.elapsed() < NONCE_TTL);
        }
        if map.len() >= MAX_NONCES {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many outstanding release nonces; retry shortly",
            ));
        }
        map.insert(n, (accessor.to_string(), Instant::now()));
        Ok(n)
    }

    /// Take a nonce: it must exist, belong to this agent and be fresh. Single use either way.
    fn take(&self, nonce: &[u8], accessor: &str) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(nonce) else { return false };
        let Ok(mut map) = self.nonces.lock() else { return false };
        match map.remove(&key) {
            Some((owner, at)) => owner == accessor && at.elapsed() < NONCE_TTL,
            None => false,
        }
    }
}

/// A workload identity handed from a release to the inner request. Only this module creates
/// it; nothing from the network can.
#[derive(Debug, Clone)]
pub(crate) struct InternalWorkload(pub Arc<TokenRecord>);

fn node_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !n.starts_with(['-', '.'])
}

fn selector_value<'a>(rec: &'a TokenRecord, prefix: &str) -> Option<&'a str> {
    rec.selectors.iter().find_map(|s| s.strip_prefix(prefix))
}

/// The node of a joined agent, or 403.
fn agent_node(c: &Caller) -> Result<String, ApiError> {
    match (selector_value(&c.0, NODE_SELECTOR), selector_value(&c.0, AGENT_KEY_SELECTOR)) {
        (Some(node), Some(_)) => Ok(node.to_string()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "only a joined node agent can do this (see `keyward agent join-token`)",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JoinTokenReq {
    node: String,
    ttl: Option<String>,
}

pub(crate) async fn join_token(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<JoinTokenReq>,
) -> Result<Response, ApiError> {
    if !node_name_ok(&r.node) {
        return Err(ApiError::invalid("node must be a DNS name: lowercase letters, digits, '-' and '.'"));
    }
    crate::api::allow(&st, &c, "admin", &format!("agents/{}", r.node))?;
    let ttl = r.ttl.as_deref().map(|s| parse_period("ttl", s)).transpose()?.unwrap_or(DEFAULT_JOIN_TTL);
    if ttl == 0 || ttl > MAX_JOIN_TTL {
        return Err(ApiError::invalid("ttl of a join token must be between 1s and 7d"));
    }
    let req = keyward_core::service::TokenRequest {
        policies: vec![],
        ttl_secs: Some(ttl),
        max_uses: Some(1),
        display_name: format!("join:{}", r.node),
        orphan: true,
        selectors: vec![format!("{JOIN_SELECTOR}{}", r.node)],
        max_ttl_secs: Some(ttl),
    };
    let (token, rec) = st.kms()?.issue_login_token(req).await?;
    let body = json!({
        "join_token": String::from_utf8_lossy(token.expose()),
        "accessor": rec.accessor,
        "node": r.node,
        "expires_at": rec.expires_at.map(time),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A node's live credentials: agent tokens (with the SHA-256 of the agent's public key) and
/// unspent join tokens.
fn node_credentials(tokens: &[Arc<TokenRecord>]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for t in tokens {
        let (node, kind) = match (selector_value(t, NODE_SELECTOR), selector_value(t, JOIN_SELECTOR)) {
            (Some(n), None) if selector_value(t, AGENT_KEY_SELECTOR).is_some() => (n, "agent"),
            (None, Some(n)) => (n, "join-token"),
            _ => continue,
        };
        out.push((
            node.to_string(),
            json!({
                "node": node,
                "kind": kind,
                "accessor": t.accessor,
                "agent_key_sha256": selector_value(t, AGENT_KEY_SELECTOR),
                "created_at": time(t.created_at),
                "expires_at": t.expires_at.map(time),
            }),
        ));
    }
    out
}

/// `GET /v1/agents`: every node's live agent and join tokens (`list` on `agents/`).
pub(crate) async fn list_nodes(State(st): State<AppState>, c: Caller) -> Result<Response, ApiError> {
    crate::api::allow(&st, &c, "list", "agents/")?;
    let tokens = st.kms()?.list_tokens(&c.0, true).await?;
    let mut nodes: Vec<(String, Value)> = node_credentials(&tokens);
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Json(json!({"nodes": nodes.into_iter().map(|(_, v)| v).collect::<Vec<_>>()})).into_response())
}

/// `POST /v1/agents/{node}/revoke`: revoke the node's agent tokens and unspent join tokens
/// (`admin` on `agents/NODE`). Its agent is refused from its next request on; an agent that
/// joins with a ServiceAccount joins again unless that grant is removed too.
pub(crate) async fn revoke_node(
    State(st): State<AppState>,
    c: Caller,
    axum::extract::Path(node): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    if !node_name_ok(&node) {
        return Err(ApiError::invalid("node must be a DNS name: lowercase letters, digits, '-' and '.'"));
    }
    crate::api::allow(&st, &c, "admin", &format!("agents/{node}"))?;
    let kms = st.kms()?;
    let tokens = kms.list_tokens(&c.0, true).await?;
    let mut revoked = Vec::new();
    for (n, v) in node_credentials(&tokens) {
        if n == node
            && let Some(a) = v["accessor"].as_str()
        {
            revoked.extend(kms.revoke_token(a).await?);
        }
    }
    if revoked.is_empty() {
        return Err(keyward_core::KmsError::NotFound { what: "node with live credentials", name: node }.into());
    }
    Ok(Json(json!({"node": node, "revoked": revoked})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct K8sJoin {
    role: String,
    jwt: String,
}

/// One of `join_token` or `kubernetes` (a projected ServiceAccount token bound to the agent's
/// pod and node, checked by the Kubernetes auth method).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JoinReq {
    join_token: Option<String>,
    kubernetes: Option<K8sJoin>,
    /// Raw Ed25519 public key, base64.
    public_key: String,
}

/// The node a joining agent proves, from a one-time join token.
async fn node_from_join_token(kms: &keyward_core::Kms, ctx: &AuditCtx, token: &str) -> Result<String, ApiError> {
    let deny = |reason: &str| {
        ctx.set_decision("join", "agents", false, reason.to_string());
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "invalid, used or expired join token")
    };
    let rec = kms.authenticate(token.trim()).await.map_err(|_| deny("invalid, used or expired join token"))?;
    let Some(node) = selector_value(&rec, JOIN_SELECTOR).map(str::to_string) else {
        return Err(deny("the token presented is not a join token"));
    };
    ctx.set_identity(&format!("{} (join:{node})", rec.accessor));
    Ok(node)
}

/// The node a joining agent proves, from its ServiceAccount token: the token must name a node,
/// and the ServiceAccount must be granted `join` on `agents/NODE`.
async fn node_from_service_account(
    st: &AppState,
    kms: &keyward_core::Kms,
    ctx: &AuditCtx,
    k: &K8sJoin,
) -> Result<String, ApiError> {
    let (id, role) = match st.k8s.login_verbose(&k.role, &k.jwt).await {
        Ok(v) => v,
        Err((verified, e)) => {
            if let Some(id) = verified {
                ctx.set_identity(&format!("{} [{}]", id.display(), id.selectors().join(" ")));
            }
            ctx.set_decision("join", "agents", false, e.to_string());
            return Err(e.into());
        }
    };
    let selectors = id.selectors();
    ctx.set_identity(&format!("{} [{}]", id.display(), selectors.join(" ")));
    let Some(node) = id.node.clone().filter(|n| node_name_ok(n)) else {
        let reason = "the ServiceAccount token names no node: use a projected token bound to the agent's pod \
                      (Kubernetes adds the node to pod-bound tokens since 1.30)";
        ctx.set_decision("join", "agents", false, reason.into());
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", reason));
    };
    let resource = format!("agents/{node}");
    match kms.decide(&role.policies, &selectors, "join", &resource) {
        Ok(_) => Ok(node),
        Err(e) => {
            ctx.set_decision("join", &resource, false, e.to_string());
            Err(e.into())
        }
    }
}

pub(crate) async fn join(
    State(st): State<AppState>,
    Extension(ctx): Extension<Arc<AuditCtx>>,
    StrictJson(r): StrictJson<JoinReq>,
) -> Result<Response, ApiError> {
    let kms = st.kms()?;
    let (node, how) = match (&r.join_token, &r.kubernetes) {
        (Some(t), None) => (node_from_join_token(&kms, &ctx, t).await?, "join token".to_string()),
        (None, Some(k)) => {
            (node_from_service_account(&st, &kms, &ctx, k).await?, format!("kubernetes role {}", k.role))
        }
        _ => return Err(ApiError::invalid("give exactly one of join_token and kubernetes {role, jwt}")),
    };
    let pk = unb64("public_key", &r.public_key)?;
    if pk.len() != 32 {
        return Err(ApiError::invalid("public_key must be a raw 32-byte Ed25519 public key, base64"));
    }
    let req = keyward_core::service::TokenRequest {
        policies: vec![],
        ttl_secs: Some(AGENT_TTL),
        max_uses: None,
        display_name: format!("agent:{node}"),
        orphan: true,
        selectors: vec![
            format!("{AGENT_KEY_SELECTOR}{}", hex::encode(keyward_crypto::hash::sha256(&pk))),
            format!("{NODE_SELECTOR}{node}"),
        ],
        max_ttl_secs: Some(AGENT_MAX_TTL),
    };
    let (token, agent) = kms.issue_login_token(req).await?;
    ctx.set_decision("join", &format!("agents/{node}"), true, format!("{how} -> agent token {}", agent.accessor));
    let body = json!({
        "token": String::from_utf8_lossy(token.expose()),
        "accessor": agent.accessor,
        "node": node,
        "expires_at": agent.expires_at.map(time),
        "ttl_secs": AGENT_TTL,
        "max_ttl_secs": AGENT_MAX_TTL,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Most nonces handed out in one call (an agent keeps a few ready).
const MAX_NONCE_BATCH: u32 = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NonceReq {
    #[serde(default)]
    count: Option<u32>,
}

/// `{"nonce", "nonces": [...], "expires_in_secs"}`; an empty body asks for one, `{"count": N}`
/// for up to 64 (one round trip and one audit record for a batch).
pub(crate) async fn nonce(State(st): State<AppState>, c: Caller, body: Bytes) -> Result<Response, ApiError> {
    agent_node(&c)?;
    let count = if body.iter().all(crate::extract::is_json_whitespace) {
        1
    } else {
        let r: NonceReq = crate::extract::parse_json(&body)
            .map_err(|_| ApiError::invalid("the body must be empty or {\"count\": N} with N from 1 to 64"))?;
        let count = r.count.unwrap_or(1);
        if count == 0 || count > MAX_NONCE_BATCH {
            return Err(ApiError::invalid("count must be from 1 to 64"));
        }
        count
    };
    let nonces = (0..count).map(|_| st.agents.issue(&c.0.accessor).map(|n| b64(&n))).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({"nonce": nonces[0], "nonces": nonces, "expires_in_secs": NONCE_TTL.as_secs()})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Workload {
    selectors: Vec<String>,
    #[serde(default)]
    pid: Option<u32>,
}

/// The operations a workload can ask for through its agent.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum ReleaseOp {
    ReadSecret { path: String, version: Option<u32> },
    GenerateDataKey { key: String, body: Value },
    Decrypt { body: Value },
    Sign { key: String, body: Value },
    Randomized { name: String },
}

impl ReleaseOp {
    /// Method, URI and body of the inner API request.
    fn inner(&self) -> Result<(Method, String, Option<&Value>), ApiError> {
        // Names go into a URI: allow only what secret paths and key names may contain.
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 512
                && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
        };
        let bad = |what: &str| ApiError::invalid(format!("{what} contains characters a name cannot have"));
        Ok(match self {
            Self::ReadSecret { path, version } => {
                if !name_ok(path) {
                    return Err(bad("path"));
                }
                let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
                (Method::GET, format!("/v1/secrets/data/{path}{q}"), None)
            }
            Self::GenerateDataKey { key, body } | Self::Sign { key, body } => {
                if !name_ok(key) || key.contains('/') {
                    return Err(bad("key"));
                }
                let action = if matches!(self, Self::Sign { .. }) { "sign" } else { "generate-data-key" };
                (Method::POST, format!("/v1/keys/{key}/{action}"), Some(body))
            }
            Self::Decrypt { body } => (Method::POST, "/v1/decrypt".to_string(), Some(body)),
            Self::Randomized { name } => {
                if !name_ok(name) || name.contains('/') {
                    return Err(bad("name"));
                }
                (Method::GET, format!("/v1/randomized/{name}"), None)
            }
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseReq {
    nonce: String,
    public_key: String,
    workload: Workload,
    /// The workload's ephemeral X25519 public key, base64.
    recipient: String,
    op: ReleaseOp,
}

/// One release of a batch: a single release without the agent's key (given once per batch).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseItem {
    nonce: String,
    workload: Workload,
    recipient: String,
    op: ReleaseOp,
}

/// `POST /v1/agent/releases`: up to [`MAX_BATCH`] releases, signed once.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBatchReq {
    public_key: String,
    releases: Vec<ReleaseItem>,
}

/// Largest batch body: a full batch of the largest single releases.
const MAX_BATCH_BODY: usize = MAX_BODY * 4;

/// Parse the agent request bodies from untrusted bytes (fuzzing and property tests); for a
/// release that parses, also form its inner request. Returns how many parsed.
pub(crate) fn parse_agent_requests(data: &[u8]) -> usize {
    let mut n = usize::from(serde_json::from_slice::<JoinTokenReq>(data).is_ok())
        + usize::from(serde_json::from_slice::<NonceReq>(data).is_ok())
        + usize::from(serde_json::from_slice::<JoinReq>(data).is_ok());
    let check = |op: &ReleaseOp| {
        if let Ok((_, uri, _)) = op.inner() {
            // Whatever forms must be a URI axum accepts, under /v1/.
            assert!(uri.starts_with("/v1/") && uri.parse::<axum::http::Uri>().is_ok(), "{uri}");
        }
    };
    if let Ok(r) = serde_json::from_slice::<ReleaseReq>(data) {
        n += 1;
        check(&r.op);
    }
    if let Ok(b) = serde_json::from_slice::<ReleaseBatchReq>(data) {
        n += 1;
        b.releases.iter().for_each(|r| check(&r.op));
    }
    n
}

fn unauthenticated(msg: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", msg.to_string())
}

/// A joined agent's node and its request body (at most `limit` bytes, strict JSON). The
/// signature is checked over the raw body afterwards ([`check_proof`]).
fn agent_body<T: serde::de::DeserializeOwned>(c: &Caller, body: &[u8], limit: usize) -> Result<(String, T), ApiError> {
    let node = agent_node(c)?;
    if body.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("release request larger than {limit} bytes"),
        ));
    }
    Ok((node, crate::extract::parse_json(body)?))
}

/// The agent's proof of possession: `context || body` signed with the key its token is bound to.
fn check_proof(c: &Caller, headers: &HeaderMap, public_key: &str, context: &[u8], body: &[u8]) -> Result<(), ApiError> {
    let pk = unb64("public_key", public_key)?;
    let bound = selector_value(&c.0, AGENT_KEY_SELECTOR).unwrap_or_default();
    if hex::encode(keyward_crypto::hash::sha256(&pk)) != bound {
        c.1.set_decision("release", "agents", false, "public key is not the one this agent joined with".into());
        return Err(unauthenticated("the agent key does not match the agent token"));
    }
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| unb64(SIGNATURE_HEADER, s))
        .transpose()?
        .ok_or_else(|| unauthenticated("a release must be signed (keyward-agent-signature header)"))?;
    let mut signed = context.to_vec();
    signed.extend_from_slice(body);
    if keyward_crypto::keys::verify_ed25519_raw(&pk, &signed, &sig).is_err() {
        c.1.set_decision("release", "agents", false, "bad agent signature".into());
        return Err(unauthenticated("the release signature does not verify"));
    }
    Ok(())
}

/// What a release produced: the answer sealed to the workload, or a refusal passed on as it is
/// (errors carry no secret).
enum Released {
    Sealed(Value),
    Refused(StatusCode, Bytes),
}

impl IntoResponse for Released {
    fn into_response(self) -> Response {
        match self {
            Self::Sealed(v) => Json(v).into_response(),
            Self::Refused(status, bytes) => {
                (status, [(axum::http::header::CONTENT_TYPE, "application/json")], bytes).into_response()
            }
        }
    }
}

/// One release, after the agent's proof was checked: the nonce, the workload's selectors, the
/// operation run as the workload (its decision lands in `ctx`), and the seal.
async fn run_release(
    st: &AppState,
    node: &str,
    agent: &str,
    item: ReleaseItem,
    ctx: Arc<AuditCtx>,
) -> Result<Released, ApiError> {
    let nonce = unb64("nonce", &item.nonce)?;
    if !st.agents.take(&nonce, agent) {
        ctx.set_decision("release", "agents", false, "nonce unknown, used, expired or another agent's".into());
        return Err(unauthenticated("the nonce is unknown, already used or expired; get a fresh one"));
    }
    let recipient = unb64("recipient", &item.recipient)?;
    if recipient.len() != keyward_crypto::hpke::KEY_LEN {
        return Err(ApiError::invalid("recipient must be a raw 32-byte X25519 public key, base64"));
    }

    // The workload's identity: what the agent measured (only `unix:` and `k8s:` selectors, and
    // `exec:` for the program a trusted launcher will exec), plus the node this agent proved it is.
    let w = &item.workload;
    if w.selectors.len() > MAX_WORKLOAD_SELECTORS {
        return Err(ApiError::invalid(format!("at most {MAX_WORKLOAD_SELECTORS} workload selectors")));
    }
    if let Some(bad) =
        w.selectors.iter().find(|s| !selector_ok(s) || !["unix:", "k8s:", "exec:"].iter().any(|p| s.starts_with(p)))
    {
        return Err(ApiError::invalid(format!(
            "workload selector {bad:?} is not a well-formed unix:, k8s: or exec: selector"
        )));
    }
    let mut selectors = w.selectors.clone();
    selectors.push(format!("{NODE_SELECTOR}{node}"));
    selectors.sort();
    selectors.dedup();
    let (method, uri, inner_body) = item.op.inner()?;
    let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
    let display = format!("workload pid {pid} on {node} via {agent}");
    let record = TokenRecord::ephemeral(format!("workload_{node}_{pid}"), display, selectors);

    // The operation runs through the normal handler as the workload. Its authorization
    // decision lands in this release's audit context, so one record says who the workload
    // was, on which node, through which agent, and what was decided.
    let inner = Request::builder()
        .method(method)
        .uri(&uri)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .extension(InternalWorkload(Arc::new(record)))
        .extension(ctx)
        .body(inner_body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty))
        .map_err(|_| ApiError::invalid("the operation does not form a valid request"))?;
    let mut resp = crate::api::release_router(st).oneshot(inner).await.unwrap_or_else(|e| match e {});
    // Errors carry no secret: hand them to the caller's error rendering and audit as they are.
    if let Some(e) = resp.extensions_mut().remove::<ApiError>() {
        return Err(e);
    }
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), MAX_RELEASE_RESPONSE)
        .await
        .map_err(|_| ApiError::internal("the released response is too large to seal".into()))?;
    if !status.is_success() {
        return Ok(Released::Refused(status, bytes));
    }
    let sealed = keyward_crypto::hpke::seal(&recipient, RELEASE_INFO, &nonce, &bytes)
        .map_err(|_| ApiError::invalid("recipient is not a usable X25519 public key"))?;
    Ok(Released::Sealed(json!({
        "status": status.as_u16(),
        "suite": keyward_crypto::hpke::SUITE,
        "nonce": item.nonce,
        "enc": b64(&sealed.enc),
        "ciphertext": b64(&sealed.ciphertext),
    })))
}

/// `POST /v1/agent/release`: one release, signed on its own (agents before batching).
pub(crate) async fn release(
    State(st): State<AppState>,
    c: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (node, r) = agent_body::<ReleaseReq>(&c, &body, MAX_BODY)?;
    check_proof(&c, &headers, &r.public_key, PROOF_CONTEXT, &body)?;
    let item = ReleaseItem { nonce: r.nonce, workload: r.workload, recipient: r.recipient, op: r.op };
    let resp = match run_release(&st, &node, &c.0.accessor, item, c.1.clone()).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    st.metrics.release(resp.status().as_u16());
    Ok(resp)
}

/// `POST /v1/agent/releases`: a batch of releases, signed once. Each release is a request of
/// its own in every other respect: its own nonce, decision, live-instance places and audit
/// record (durable before the batch's answer leaves), and its own status in the answer,
/// `{"results": [{"status": N, "body": {...}}, ...]}` in the order asked. The batch itself
/// leaves one more record, for the agent.
pub(crate) async fn release_batch(
    State(st): State<AppState>,
    c: Caller,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (node, r) = agent_body::<ReleaseBatchReq>(&c, &body, MAX_BATCH_BODY)?;
    if r.releases.is_empty() || r.releases.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!("a batch holds from 1 to {MAX_BATCH} releases")));
    }
    check_proof(&c, &headers, &r.public_key, BATCH_PROOF_CONTEXT, &body)?;
    let unsealed = st.sealing.unsealed().ok_or_else(crate::api::sealed_error)?;
    let n = r.releases.len();
    c.1.set_decision(
        "release-batch",
        &format!("agents/{node}"),
        true,
        format!("{n} release{}", if n == 1 { "" } else { "s" }),
    );
    let agent = c.0.accessor.clone();
    // The first release runs in this task, the others as tasks of their own (in parallel).
    let mut items = r.releases.into_iter().enumerate();
    let first = items.next();
    let rest: Vec<_> = items
        .map(|(i, item)| {
            let (st, node, agent, unsealed) = (st.clone(), node.clone(), agent.clone(), unsealed.clone());
            let (ctx, id) = (c.1.part(), format!("{}.{i}", id.0));
            tokio::spawn(async move { batch_part(&st, &node, &agent, &unsealed, item, ctx, &id).await })
        })
        .collect();
    // The batch's own record goes to the log beside its releases' records (one group commit,
    // not one after the other). Its answer is 200 whatever each release's status is.
    let own_record = async {
        match unsealed.audit.as_deref() {
            Some(audit) => audit.append(c.1.record(&id.0, "POST", BATCH_ITEM_PATH, 200, None)).await,
            None => Ok(()),
        }
    };
    let releases = async {
        let mut answers = Vec::with_capacity(n);
        if let Some((i, item)) = first {
            let ctx = c.1.part();
            answers.push(Some(batch_part(&st, &node, &agent, &unsealed, item, ctx, &format!("{}.{i}", id.0)).await));
        }
        for t in rest {
            // A release that panicked: nothing of it leaves.
            answers.push(t.await.ok());
        }
        answers
    };
    let (own_record, answers) = tokio::join!(own_record, releases);
    if let Err(e) = own_record {
        tracing::error!(request_id = %id.0, error = %e, "audit record of a release batch not written; refusing it");
        return Err(crate::api::audit_unavailable_error());
    }
    c.1.mark_recorded();
    let mut out = Vec::with_capacity(n * 512);
    out.extend_from_slice(br#"{"results":["#);
    for (i, answer) in answers.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match answer {
            Some((status, Ok(bytes))) => {
                out.extend_from_slice(format!(r#"{{"status":{status},"body":"#).as_bytes());
                out.extend_from_slice(&bytes);
                out.push(b'}');
            }
            _ => out.extend_from_slice(
                br#"{"status":500,"body":{"error":{"code":"internal","message":"the release failed"}}}"#,
            ),
        }
    }
    out.extend_from_slice(b"]}");
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// One release of a batch, run and concluded (instance places, audit record) as a request of
/// its own: its status and answer body.
async fn batch_part(
    st: &AppState,
    node: &str,
    agent: &str,
    unsealed: &keyward_seal::Unsealed,
    item: ReleaseItem,
    ctx: AuditCtx,
    id: &str,
) -> (u16, Result<Bytes, axum::Error>) {
    let ctx = Arc::new(ctx);
    let resp = match run_release(st, node, agent, item, ctx.clone()).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    let resp =
        crate::api::conclude(Some(unsealed), unsealed.audit.as_deref(), &ctx, id, "POST", BATCH_ITEM_PATH, resp).await;
    let status = resp.status().as_u16();
    st.metrics.release(status);
    (status, axum::body::to_bytes(resp.into_body(), MAX_RELEASE_RESPONSE).await)
}

/// The path each release of a batch is audited under.
const BATCH_ITEM_PATH: &str = "/v1/agent/releases";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_single_use_and_bound_to_their_agent() {
        let a = Agents::default();
        let n = a.issue("agent-1").unwrap();
        assert!(!a.take(&n, "agent-2"));
        assert!(!a.take(&n, "agent-1"), "a nonce presented by another agent is burnt");
        let n = a.issue("agent-1").unwrap();
        assert!(a.take(&n, "agent-1"));
        assert!(!a.take(&n, "agent-1"));
        assert!(!a.take(&n[..31], "agent-1"));
    }

    proptest::proptest! {
        #[test]
        fn any_name_forms_a_safe_uri_or_is_refused(name in "[ -~]{0,40}", version in proptest::option::of(0u32..5)) {
            let read = ReleaseOp::ReadSecret { path: name.clone(), version };
            if let Ok((m, uri, _)) = read.inner() {
                proptest::prop_assert_eq!(m, Method::GET);
                let (path, query) = uri.split_once('?').map_or((uri.as_str(), None), |(p, q)| (p, Some(q)));
                proptest::prop_assert!(path.starts_with("/v1/secrets/data/") && !path.contains(".."));
                proptest::prop_assert!(query.is_none_or(|q| q.starts_with("version=")));
                proptest::prop_assert!(uri.parse::<axum::http::Uri>().is_ok());
            }
            let sign = ReleaseOp::Sign { key: name, body: json!({}) };
            if let Ok((_, uri, _)) = sign.inner() {
                proptest::prop_assert!(uri.starts_with("/v1/keys/") && uri.ends_with("/sign"));
                proptest::prop_assert_eq!(uri.matches('/').count(), 4);
            }
        }

        #[test]
        fn agent_request_parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_agent_requests(&bytes);
        }
    }

    #[test]
    fn release_ops_form_only_safe_uris() {
        let op = |v: Value| {
            serde_json::from_value::<ReleaseOp>(v)
                .map_err(|e| e.to_string())
                .and_then(|o| o.inner().map(|(m, u, _)| format!("{m} {u}")).map_err(|e| e.message))
        };
        assert_eq!(
            op(json!({"kind": "read-secret", "path": "app/db", "version": 2})).unwrap(),
            "GET /v1/secrets/data/app/db?version=2"
        );
        assert_eq!(op(json!({"kind": "sign", "key": "k1", "body": {}})).unwrap(), "POST /v1/keys/k1/sign");
        assert_eq!(op(json!({"kind": "decrypt", "body": {}})).unwrap(), "POST /v1/decrypt");
        assert_eq!(op(json!({"kind": "randomized", "name": "db"})).unwrap(), "GET /v1/randomized/db");
        for bad in [
            json!({"kind": "read-secret", "path": "../sys/seal"}),
            json!({"kind": "read-secret", "path": "a?b"}),
            json!({"kind": "read-secret", "path": "a//b"}),
            json!({"kind": "read-secret", "path": "a%2fb"}),
            json!({"kind": "sign", "key": "a/b", "body": {}}),
            json!({"kind": "randomized", "name": "a/b"}),
            json!({"kind": "delete-secret", "path": "x"}),
            json!({"kind": "read-secret", "path": "x", "extra": 1}),
        ] {
            assert!(op(bad.clone()).is_err(), "{bad}");
        }
    }
}
