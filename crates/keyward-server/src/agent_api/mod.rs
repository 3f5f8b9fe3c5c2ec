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

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use keyward_core::model::TokenRecord;
use keyward_core::policy::selector_ok;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::AppState;
use crate::audit::AuditCtx;
use crate::error::ApiError;
use crate::extract::{Caller, MAX_BODY, RequestId, StrictJson};
use crate::wire::{JoinTokenReq, b64, parse_period, time, unb64};

mod release;

#[cfg(test)]
use self::release::*;
pub(crate) use self::release::{parse_agent_requests, release, release_batch};

pub use keyward_core::release::{
    AGENT_KEY_SELECTOR, BATCH_PROOF_CONTEXT, JOIN_SELECTOR, MAX_BATCH, NODE_SELECTOR, PROOF_CONTEXT, SIGNATURE_HEADER,
};
/// HPKE `info` of sealed releases; the nonce is the associated data.
pub use keyward_crypto::hpke::RELEASE_INFO;

const NONCE_TTL: Duration = Duration::from_secs(10);
const MAX_NONCES: usize = 100_000;
/// Outstanding nonces one agent may hold: far more than a busy node uses (nonces are spent
/// within milliseconds), and few enough that no agent can fill the table for the others.
const MAX_NONCES_PER_AGENT: usize = 8_192;
const DEFAULT_JOIN_TTL: u64 = 3600;
const MAX_JOIN_TTL: u64 = 7 * 86400;
const AGENT_TTL: u64 = 3600;
const AGENT_MAX_TTL: u64 = 30 * 86400;
const MAX_WORKLOAD_SELECTORS: usize = 128;
/// Largest inner response sealed (a secret is at most 64 KiB of data, plus JSON).
const MAX_RELEASE_RESPONSE: usize = 512 * 1024;

/// Outstanding nonces, by value: (agent token accessor, issued at), and how many each agent
/// holds.
#[derive(Debug, Default)]
pub struct Agents {
    nonces: Mutex<Nonces>,
}

#[derive(Debug, Default)]
struct Nonces {
    by_value: HashMap<[u8; 32], (String, Instant)>,
    held: HashMap<String, usize>,
}

impl Nonces {
    fn forget(&mut self, accessor: &str) {
        if let Some(n) = self.held.get_mut(accessor) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(accessor);
            }
        }
    }

    fn expire(&mut self) {
        let expired: Vec<[u8; 32]> =
            self.by_value.iter().filter(|(_, (_, at))| at.elapsed() >= NONCE_TTL).map(|(k, _)| *k).collect();
        for k in expired {
            if let Some((owner, _)) = self.by_value.remove(&k) {
                self.forget(&owner);
            }
        }
    }
}

impl Agents {
    fn issue(&self, accessor: &str) -> Result<[u8; 32], ApiError> {
        let mut n = [0u8; 32];
        keyward_crypto::fill_random(&mut n).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut t = self.nonces.lock().map_err(|_| ApiError::internal("nonce table poisoned".into()))?;
        let mine = t.held.get(accessor).copied().unwrap_or(0);
        if t.by_value.len() >= MAX_NONCES / 2 || mine >= MAX_NONCES_PER_AGENT {
            t.expire();
        }
        let mine = t.held.get(accessor).copied().unwrap_or(0);
        if t.by_value.len() >= MAX_NONCES || mine >= MAX_NONCES_PER_AGENT {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many outstanding release nonces; retry shortly",
            ));
        }
        t.by_value.insert(n, (accessor.to_string(), Instant::now()));
        *t.held.entry(accessor.to_string()).or_default() += 1;
        Ok(n)
    }

    /// Take a nonce: it must exist, belong to this agent and be fresh. Single use either way.
    fn take(&self, nonce: &[u8], accessor: &str) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(nonce) else { return false };
        let Ok(mut t) = self.nonces.lock() else { return false };
        match t.by_value.remove(&key) {
            Some((owner, at)) => {
                t.forget(&owner);
                owner == accessor && at.elapsed() < NONCE_TTL
            }
            None => false,
        }
    }
}

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
    let body = keyward_api::AgentJoinToken {
        join_token: crate::wire::secret_text(token.expose()),
        accessor: rec.accessor.clone(),
        node: r.node,
        expires_at: rec.expires_at.map(time),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A node's live credentials: agent tokens (with the SHA-256 of the agent's public key) and
/// unspent join tokens.
fn node_credentials(tokens: &[Arc<TokenRecord>]) -> Vec<keyward_api::NodeCredential> {
    let mut out = Vec::new();
    for t in tokens {
        let (node, kind) = match (selector_value(t, NODE_SELECTOR), selector_value(t, JOIN_SELECTOR)) {
            (Some(n), None) if selector_value(t, AGENT_KEY_SELECTOR).is_some() => (n, "agent"),
            (None, Some(n)) => (n, "join-token"),
            _ => continue,
        };
        out.push(keyward_api::NodeCredential {
            node: node.to_string(),
            kind: kind.to_string(),
            accessor: t.accessor.clone(),
            agent_key_sha256: selector_value(t, AGENT_KEY_SELECTOR).map(str::to_string),
            created_at: time(t.created_at),
            expires_at: t.expires_at.map(time),
        });
    }
    out
}

/// `GET /v1/agents`: every node's live agent and join tokens (`list` on `agents/`).
pub(crate) async fn list_nodes(State(st): State<AppState>, c: Caller) -> Result<Response, ApiError> {
    crate::api::allow(&st, &c, "list", "agents/")?;
    let tokens = st.kms()?.list_tokens(&c.0, true).await?;
    let mut nodes = node_credentials(&tokens);
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(Json(keyward_api::NodeList { nodes }).into_response())
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
    for cred in node_credentials(&tokens) {
        if cred.node == node {
            revoked.extend(kms.revoke_token(&cred.accessor).await?);
        }
    }
    if revoked.is_empty() {
        return Err(keyward_core::KmsError::NotFound { what: "node with live credentials", name: node }.into());
    }
    Ok(Json(keyward_api::NodeRevoked { node, revoked }).into_response())
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
    let (id, role) = match st.k8s.login_verbose(kms, &k.role, &k.jwt).await {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_agent_cannot_take_every_nonce() {
        let a = Agents::default();
        for _ in 0..MAX_NONCES_PER_AGENT {
            a.issue("greedy").unwrap();
        }
        assert_eq!(a.issue("greedy").unwrap_err().code, "busy");
        // Another agent still gets nonces, and spending one frees a place.
        let n = a.issue("other").unwrap();
        assert!(a.take(&n, "other"));
        assert_eq!(a.nonces.lock().unwrap().held.get("other"), None);
    }

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
        fn any_name_is_a_route_name_or_is_refused(name in "[ -~]{0,40}", version in proptest::option::of(0u32..5)) {
            let read = ReleaseOp::ReadSecret { path: name.clone(), version };
            if read.check().is_ok() {
                proptest::prop_assert!(!name.is_empty() && !name.split('/').any(|p| p.is_empty() || p == "." || p == ".."));
                let uri = format!("/v1/secrets/data/{name}");
                proptest::prop_assert!(uri.parse::<axum::http::Uri>().is_ok());
            }
            let sign = ReleaseOp::Sign { key: name.clone(), body: json!({}) };
            if sign.check().is_ok() {
                proptest::prop_assert!(!name.contains('/') && name != "." && name != "..");
            }
        }

        #[test]
        fn agent_request_parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_agent_requests(&bytes);
        }
    }

    #[test]
    fn release_ops_take_only_route_names() {
        let op = |v: Value| {
            serde_json::from_value::<ReleaseOp>(v)
                .map_err(|e| e.to_string())
                .and_then(|o| o.check().map_err(|e| e.message))
        };
        for good in [
            json!({"kind": "read-secret", "path": "app/db", "version": 2}),
            json!({"kind": "sign", "key": "k1", "body": {}}),
            json!({"kind": "decrypt", "body": {}}),
            json!({"kind": "randomized", "name": "db"}),
            json!({"kind": "generate-data-key", "key": "k.1-x_y", "body": {}}),
        ] {
            assert!(op(good.clone()).is_ok(), "{good}");
        }
        for bad in [
            json!({"kind": "read-secret", "path": "../sys/seal"}),
            json!({"kind": "read-secret", "path": "a?b"}),
            json!({"kind": "read-secret", "path": "a//b"}),
            json!({"kind": "read-secret", "path": "a%2fb"}),
            json!({"kind": "sign", "key": "a/b", "body": {}}),
            json!({"kind": "sign", "key": "alias/a", "body": {}}),
            json!({"kind": "randomized", "name": "a/b"}),
            json!({"kind": "delete-secret", "path": "x"}),
            json!({"kind": "read-secret", "path": "x", "extra": 1}),
        ] {
            assert!(op(bad.clone()).is_err(), "{bad}");
        }
    }
}
