//! Routes and handlers of the /v1 API.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post, put};
use axum::{Json, Router};
use keyward_core::policy::INSTANCE_SELECTOR;
use keyward_core::secretdata::SecretData;
use keyward_core::service::CreateKey;
use keyward_core::{Kms, KmsError};
use keyward_crypto::keys::KeyAlgorithm;
use serde_json::{Value, json};

use crate::audit::AuditCtx;
use crate::error::ApiError;
use crate::extract::{Caller, KeyName, RequestId, StrictJson, StrictQuery};
use crate::k8s_auth::K8sAuth;
use crate::wire::*;
use keyward_seal::Sealing;

/// The OpenAPI document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The server's metrics.
    pub metrics: Arc<crate::metrics::ServerMetrics>,
    /// The seal state and, while unsealed, the service and its audit log.
    pub sealing: Arc<Sealing>,
    /// The Kubernetes ServiceAccount auth method.
    pub k8s: Arc<K8sAuth>,
    /// Node agents' outstanding release nonces.
    pub agents: Arc<crate::agent_api::Agents>,
    /// This server among those sharing the store.
    pub member: Arc<crate::cluster::Member>,
    /// The router a release's inner operation runs through, built on first use
    /// ([`release_router`]).
    pub(crate) release: Arc<std::sync::OnceLock<Router>>,
}

impl AppState {
    /// The service, or 503 while sealed.
    pub(crate) fn kms(&self) -> Result<Arc<Kms>, ApiError> {
        self.sealing.unsealed().map(|u| u.kms.clone()).ok_or_else(sealed_error)
    }
}

/// Routes a sealed server still answers.
const SEALED_ROUTES: &[&str] = &["/v1/health", "/v1/sys/init", "/v1/sys/unseal"];

pub(crate) fn sealed_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "sealed",
        "keyward is sealed: operators must unseal it with `keyward operator unseal` (see `keyward status`)",
    )
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

/// Every route: (method, path, anonymous?, handler). The OpenAPI test checks this table against
/// the document in both directions.
pub fn route_table() -> Vec<(&'static str, &'static str, bool, MethodRouter<AppState>)> {
    vec![
        ("get", "/v1/health", true, get(health)),
        ("post", "/v1/sys/init", true, post(sys_init)),
        ("post", "/v1/sys/unseal", true, post(sys_unseal)),
        ("post", "/v1/sys/seal", false, post(sys_seal)),
        ("get", "/v1/sys/rekey", false, get(rekey_status)),
        ("post", "/v1/sys/rekey", false, post(rekey_start)),
        ("delete", "/v1/sys/rekey", false, axum::routing::delete(rekey_cancel)),
        ("post", "/v1/sys/rekey/update", false, post(rekey_update)),
        ("post", "/v1/sys/rotate-root", false, post(rotate_root)),
        ("get", "/v1/openapi.json", false, get(openapi)),
        ("get", "/v1/sys/audit", false, get(audit_info)),
        ("get", "/v1/sys/snapshot", false, get(snapshot)),
        ("get", "/v1/metrics", false, get(metrics)),
        ("post", "/v1/sys/authorize", false, post(dry_run)),
        ("get", "/v1/auth/whoami", false, get(whoami)),
        ("post", "/v1/auth/kubernetes/login", true, post(k8s_login)),
        ("get", "/v1/auth/kubernetes/config", false, get(k8s_get_config)),
        ("put", "/v1/auth/kubernetes/config", false, put(k8s_configure)),
        ("get", "/v1/auth/kubernetes/roles", false, get(k8s_list_roles)),
        ("get", "/v1/auth/kubernetes/roles/{name}", false, get(k8s_get_role)),
        ("put", "/v1/auth/kubernetes/roles/{name}", false, put(k8s_put_role)),
        ("delete", "/v1/auth/kubernetes/roles/{name}", false, axum::routing::delete(k8s_delete_role)),
        ("post", "/v1/auth/agent/join-token", false, post(crate::agent_api::join_token)),
        ("post", "/v1/auth/agent/join", true, post(crate::agent_api::join)),
        ("get", "/v1/agents", false, get(crate::agent_api::list_nodes)),
        ("post", "/v1/agents/{node}/revoke", false, post(crate::agent_api::revoke_node)),
        ("post", "/v1/agent/nonce", false, post(crate::agent_api::nonce)),
        ("post", "/v1/agent/release", false, post(crate::agent_api::release)),
        ("post", "/v1/agent/releases", false, post(crate::agent_api::release_batch)),
        ("post", "/v1/auth/token/create", false, post(token_create)),
        ("post", "/v1/auth/token/lookup", false, post(token_lookup)),
        ("get", "/v1/auth/token/accessors", false, get(token_list)),
        ("post", "/v1/auth/token/renew", false, post(token_renew)),
        ("post", "/v1/auth/token/renew-self", false, post(token_renew_self)),
        ("post", "/v1/auth/token/revoke", false, post(token_revoke)),
        ("post", "/v1/auth/token/revoke-self", false, post(token_revoke_self)),
        ("get", "/v1/policies", false, get(list_policies)),
        ("get", "/v1/policies/{name}", false, get(get_policy)),
        ("put", "/v1/policies/{name}", false, put(put_policy)),
        ("delete", "/v1/policies/{name}", false, axum::routing::delete(delete_policy)),
        ("post", "/v1/keys", false, post(create_key)),
        ("get", "/v1/keys", false, get(list_keys)),
        ("get", "/v1/keys/{name}", false, get(describe_key)),
        ("patch", "/v1/keys/{name}", false, axum::routing::patch(update_key)),
        ("get", "/v1/aliases", false, get(list_aliases)),
        ("put", "/v1/aliases/{name}", false, put(set_alias)),
        ("delete", "/v1/aliases/{name}", false, axum::routing::delete(delete_alias)),
        ("post", "/v1/keys/{name}/enable", false, post(enable_key)),
        ("post", "/v1/keys/{name}/disable", false, post(disable_key)),
        ("post", "/v1/keys/{name}/rotate", false, post(rotate_key)),
        ("put", "/v1/keys/{name}/rotation-policy", false, put(rotation_policy)),
        ("post", "/v1/keys/{name}/schedule-deletion", false, post(schedule_deletion)),
        ("post", "/v1/keys/{name}/cancel-deletion", false, post(cancel_deletion)),
        ("post", "/v1/keys/{name}/encrypt", false, post(encrypt)),
        ("post", "/v1/keys/{name}/generate-data-key", false, post(data_key)),
        ("post", "/v1/keys/{name}/generate-data-key-without-plaintext", false, post(data_key_without_plaintext)),
        ("post", "/v1/keys/{name}/sign", false, post(sign)),
        ("post", "/v1/keys/{name}/verify", false, post(verify)),
        ("post", "/v1/keys/{name}/mac", false, post(mac)),
        ("post", "/v1/keys/{name}/verify-mac", false, post(verify_mac)),
        ("post", "/v1/decrypt", false, post(decrypt)),
        ("post", "/v1/reencrypt", false, post(reencrypt)),
        ("post", "/v1/random", false, post(random)),
        ("get", "/v1/randomized/{name}", false, get(randomized_value)),
        ("put", "/v1/randomized/{name}", false, put(randomized_define)),
        ("get", "/v1/randomized/{name}/definition", false, get(randomized_definition)),
        ("get", "/v1/secrets", false, get(list_secrets)),
        ("get", "/v1/secrets/data/{*path}", false, get(get_secret)),
        ("put", "/v1/secrets/data/{*path}", false, put(put_secret)),
        ("get", "/v1/secrets/metadata/{*path}", false, get(secret_metadata)),
        ("post", "/v1/secrets/delete/{*path}", false, post(delete_secret)),
        ("post", "/v1/secrets/undelete/{*path}", false, post(undelete_secret)),
        ("post", "/v1/secrets/destroy/{*path}", false, post(destroy_secret)),
    ]
}

/// The routes an attested release may run, with authentication (which takes the workload
/// identity the release established) but without the `finish` layer: the release's own request
/// carries the one audit record, with the workload's identity, selectors and decision.
pub(crate) fn release_router(state: &AppState) -> Router {
    // Built once per server, not per release. The router holds a copy of the state whose own
    // cache is a fresh, never-filled cell, so the cached router does not keep itself alive.
    state
        .release
        .get_or_init(|| {
            let mut copy = state.clone();
            copy.release = Arc::default();
            build_release_router(copy)
        })
        .clone()
}

fn build_release_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/secrets/data/{*path}", get(get_secret))
        .route("/v1/keys/{name}/generate-data-key", post(data_key))
        .route("/v1/keys/{name}/sign", post(sign))
        .route("/v1/decrypt", post(decrypt))
        .route("/v1/randomized/{name}", get(randomized_value))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Build the router with its middleware.
pub fn router(state: AppState) -> Router {
    let mut public = Router::new();
    let mut protected = Router::new();
    for (_, path, anonymous, handler) in route_table() {
        if anonymous {
            public = public.route(path, handler);
        } else {
            protected = protected.route(path, handler);
        }
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    public
        .merge(protected)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no_such_route", "no such API route; see /v1/openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route; see /v1/openapi.json",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), finish))
        .with_state(state)
}

/// Assign a request id; render [`ApiError`]s as JSON with it; log failures once; write the
/// audit record and wait for it to be durable before the response leaves (fail closed).
async fn finish(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    // The route's template, never the names in a path (they may be secret paths).
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let mut raw = [0u8; 8];
    let id = match keyward_crypto::fill_random(&mut raw) {
        Ok(()) => hex::encode(raw),
        Err(_) => "unknown".to_string(),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let ctx = Arc::new(AuditCtx::default());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::tls::PeerInfo>>()
        .map(|c| c.0.addr)
        .or_else(|| req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0));
    if let Some(p) = peer {
        ctx.set_client(p.to_string());
    }
    req.extensions_mut().insert(RequestId(id.clone()));
    req.extensions_mut().insert(ctx.clone());
    // The service and audit log as of the request's start: a request that seals the server
    // still gets its own record written.
    let unsealed = st.sealing.unsealed();
    let audited = unsealed.as_ref().and_then(|u| u.audit.as_ref()).filter(|_| path != "/v1/health");
    // Fail closed: while sealed, or while the audit log cannot be written, nothing runs.
    let resp = match audited {
        _ if unsealed.is_none() && !SEALED_ROUTES.contains(&path.as_str()) => sealed_error().into_response(),
        Some(a) if !a.is_healthy() => audit_unavailable(),
        _ => next.run(req).await,
    };
    let mut resp =
        conclude(unsealed.as_deref(), audited.map(Arc::as_ref), &ctx, &id, method.as_str(), &path, resp).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    st.metrics.request(&route, method.as_str(), resp.status().as_u16(), started.elapsed());
    resp
}

/// What happens to a request's answer after its handler ran, before it may leave: places under
/// live-instance caps are taken (or the answer, never sent, becomes the refusal), errors are
/// rendered, and the audit record is made durable (or the answer becomes a 503). Each release
/// of an agent's batch goes through this on its own, as a request of its own would.
pub(crate) async fn conclude(
    unsealed: Option<&keyward_seal::Unsealed>,
    audited: Option<&crate::audit::AuditLog>,
    ctx: &AuditCtx,
    id: &str,
    method: &str,
    path: &str,
    mut resp: Response,
) -> Response {
    // A grant that caps live instances: the caller takes its place now, or its answer (already
    // computed, never sent) is replaced by the refusal. Failing to ask the store refuses too.
    if let Some(u) = unsealed
        && resp.status().is_success()
    {
        for (cap, instance) in ctx.instance_caps() {
            if let Err(e) = u.kms.hold_instance(&cap, &instance).await {
                if let Some((op, resource)) = ctx.operation_and_resource() {
                    ctx.set_decision(&op, &resource, false, e.to_string());
                }
                resp = ApiError::from(e).into_response();
                break;
            }
        }
    }
    if unsealed.is_none() {
        // No audit key exists while sealed: seal ceremonies are logged here instead, and the
        // unseal itself is the first record of the reopened chain.
        tracing::info!(request_id = %id, %method, %path, status = resp.status().as_u16(), "request while sealed");
    }
    let mut error_code = None;
    if let Some(err) = resp.extensions_mut().remove::<ApiError>() {
        if err.status.is_server_error() {
            tracing::error!(request_id = %id, %method, %path, status = err.status.as_u16(), code = err.code, detail = ?err.internal, "request failed");
        } else {
            tracing::debug!(request_id = %id, %method, %path, status = err.status.as_u16(), code = err.code, "request refused");
        }
        error_code = Some(err.code);
        resp = error_response(&err, id);
    }
    if let Some(audit) = audited.filter(|_| !(ctx.is_recorded() && resp.status().is_success())) {
        let record = ctx.record(id, method, path, resp.status().as_u16(), error_code);
        if let Err(e) = audit.append(record).await {
            tracing::error!(request_id = %id, error = %e, "audit record not written; refusing the request");
            resp = audit_unavailable();
        }
    }
    if let Some(err) = resp.extensions_mut().remove::<ApiError>() {
        resp = error_response(&err, id);
    }
    resp
}

fn audit_unavailable() -> Response {
    audit_unavailable_error().into_response()
}

/// 503: the audit log cannot be written.
pub(crate) fn audit_unavailable_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit_unavailable",
        "the audit log cannot be written, so no request is served; the operator must fix the audit file",
    )
}

fn error_response(err: &ApiError, request_id: &str) -> Response {
    let body = json!({"error": {"code": err.code, "message": err.message, "request_id": request_id}});
    (err.status, Json(body)).into_response()
}

/// Require a valid token (`Authorization: Bearer TOKEN` or `X-Keyward-Token: TOKEN`).
async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    // A release running an operation as the workload its agent attested: the identity was
    // established by `agent_api::release`, the only place this extension is created.
    if let Some(w) = req.extensions_mut().remove::<crate::agent_api::InternalWorkload>() {
        let ctx = req.extensions().get::<Arc<AuditCtx>>().cloned().unwrap_or_default();
        ctx.set_identity(&format!("{} [{}]", w.0.display_name, w.0.selectors.join(" ")));
        req.extensions_mut().insert(Caller(w.0, ctx));
        return next.run(req).await;
    }
    let h = req.headers();
    let token = h
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-keyward-token").and_then(|v| v.to_str().ok()));
    let ctx = req.extensions().get::<Arc<AuditCtx>>().cloned().unwrap_or_default();
    let Some(token) = token else {
        // No token: a verified TLS client certificate is the identity, if there is one.
        let cert = req
            .extensions()
            .get::<axum::extract::ConnectInfo<crate::tls::PeerInfo>>()
            .and_then(|c| c.0.client_cert.clone());
        if let Some(cert) = cert {
            if st.kms().is_err() {
                return sealed_error().into_response();
            }
            ctx.set_identity(&format!("{} [{}]", cert.display(), cert.selectors.join(" ")));
            let rec = keyward_core::model::TokenRecord::ephemeral(
                format!("cert_{}", &cert.fingerprint[..24]),
                cert.display(),
                cert.selectors.clone(),
            );
            req.extensions_mut().insert(Caller(Arc::new(rec), ctx));
            return next.run(req).await;
        }
        let why = keyward_core::AuthFailure::Missing;
        ctx.set_reason(why.reason());
        return ApiError::from(keyward_core::KmsError::Unauthenticated(why)).into_response();
    };
    let kms = match st.kms() {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    match kms.authenticate(token.trim()).await {
        Ok(rec) => {
            if let Some(kind) = agent_credential(&rec)
                && !AGENT_ROUTES.contains(&req.uri().path())
            {
                // An agent's token (or a join token) is not a bearer credential for the
                // ordinary API: whatever it could read there, it may read only through signed
                // releases. Refused before any handler runs, whatever the policies say.
                ctx.set_identity(&format!("{} ({kind})", rec.accessor));
                ctx.set_reason(&format!("{kind} outside agent routes"));
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_denied",
                    format!(
                        "an {kind} is only accepted on the agent routes (/v1/agent/*, renew-self, revoke-self); \
                         releases must be signed by the agent's key"
                    ),
                )
                .into_response();
            }
            if rec.display_name.starts_with("k8s:") {
                ctx.set_identity(&format!("{} ({})", rec.accessor, rec.display_name));
            } else {
                ctx.set_identity(&rec.accessor);
            }
            req.extensions_mut().insert(Caller(rec, ctx));
            next.run(req).await
        }
        Err(e) => {
            match &e {
                keyward_core::KmsError::Unauthenticated(why) => ctx.set_reason(why.reason()),
                other => ctx.set_reason(&other.to_string()),
            }
            ApiError::from(e).into_response()
        }
    }
}

/// The only routes a node agent's token (or a join token) may be presented on.
const AGENT_ROUTES: &[&str] = &[
    "/v1/agent/nonce",
    "/v1/agent/release",
    "/v1/agent/releases",
    "/v1/auth/token/renew-self",
    "/v1/auth/token/revoke-self",
];

/// Whether a token is a node agent's (bound to its key) or a join token, and which.
fn agent_credential(rec: &keyward_core::model::TokenRecord) -> Option<&'static str> {
    use keyward_core::release::{AGENT_KEY_SELECTOR, JOIN_SELECTOR};
    rec.selectors.iter().find_map(|s| {
        if s.starts_with(AGENT_KEY_SELECTOR) {
            Some("agent token")
        } else if s.starts_with(JOIN_SELECTOR) {
            Some("agent join token")
        } else {
            None
        }
    })
}

pub(crate) fn allow(st: &AppState, c: &Caller, op: &str, resource: &str) -> Result<(), ApiError> {
    // A grant that caps live instances counts the caller by its pod UID; the place is taken
    // (or refused) in `finish`, before the answer leaves. Without a pod UID it cannot be used.
    let decision = st.kms()?.authorize(&c.0, op, resource).and_then(|grant| {
        if let Some(cap) = grant.cap {
            let Some(uid) = c.0.selectors.iter().find_map(|s| s.strip_prefix(INSTANCE_SELECTOR)) else {
                return Err(KmsError::PermissionDenied(format!(
                    "{} caps live instances by pod UID, and this caller has no {INSTANCE_SELECTOR} selector \
                     (only workloads in pods, through the node agent, can use it)",
                    grant.reason
                )));
            };
            c.1.add_instance_cap(cap, uid.to_string());
        }
        Ok(grant.reason)
    });
    match decision {
        Ok(reason) => {
            c.1.set_decision(op, resource, true, reason);
            Ok(())
        }
        Err(e) => {
            c.1.set_decision(op, resource, false, e.to_string());
            Err(ApiError::from(e))
        }
    }
}

/// `GET /v1/health`: always 200 (liveness) unless `?ready=true` is asked, which answers 503
/// while this server cannot serve: sealed, or behind other servers' changes for longer than its
/// staleness bound (a readiness probe then takes it out of the Service).
/// `GET /v1/sys/snapshot` (`admin` on `sys/snapshot`): the whole store as one consistent file,
/// taken while the server serves. What is encrypted in the store stays encrypted: restoring it
/// needs the same unseal shares (or HSM key).
async fn snapshot(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "admin", "sys/snapshot")?;
    st.kms()?;
    let file = st.sealing.snapshot().await.map_err(|e| match e {
        keyward_core::store::StoreError::Backend(m) if m.contains("its own tools") => ApiError::invalid(m),
        other => ApiError::from(keyward_core::KmsError::from(other)),
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/vnd.keyward.snapshot".to_string()),
            (axum::http::header::CONTENT_LENGTH, len.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// `GET /v1/metrics` (`read` on `sys/metrics`): the server's metrics in the OpenMetrics text
/// format. `--metrics-listen` serves the same without a token, for a private network.
async fn metrics(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "read", "sys/metrics")?;
    Ok(([(axum::http::header::CONTENT_TYPE, keyward_metrics::CONTENT_TYPE)], st.metrics.text()).into_response())
}

async fn health(State(st): State<AppState>, StrictQuery(q): StrictQuery<HealthQuery>) -> ApiResult {
    let unsealed = st.sealing.unsealed();
    let ready = unsealed.as_ref().is_some_and(|u| u.kms.require_fresh().is_ok());
    let sealed = unsealed.is_none();
    let mut body = json!({
        "status": if sealed { "sealed" } else if ready { "ok" } else { "stale" },
        "ready": ready,
        "sealed": sealed,
        "seal": st.sealing.kind().as_str(),
        "storage": st.sealing.storage_backend(),
        "server_id": st.member.id,
        "scheduler": st.member.runs_scheduler(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    // The seal details come from the store; while it is unreachable the process is still alive
    // (a restart would not help), so liveness stays 200 and only those details are missing.
    match st.sealing.status().await {
        Ok(s) => {
            let details = json!({
                "storage_available": true,
                "initialized": s.initialized,
                "stored_seal": s.stored_seal,
                "migration_required": s.migration_required,
                "hsm_key": s.hsm_key,
                "insecure_seal": s.insecure_seal,
                "shares": s.shares,
                "threshold": s.threshold,
                "progress": s.progress,
                "rekey_in_progress": s.rekey_in_progress,
            });
            if let (Some(b), Some(d)) = (body.as_object_mut(), details.as_object()) {
                b.extend(d.clone());
            }
            if !s.initialized {
                body["status"] = json!("uninitialized");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "health: the seal state cannot be read from the store");
            body["storage_available"] = Value::Bool(false);
        }
    }
    if q.ready && !ready {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response());
    }
    ok(body)
}

// ----- seal ceremonies -----------------------------------------------------------------------

fn shares_json(shares: &[keyward_crypto::SecretBytes]) -> Value {
    Value::Array(shares.iter().map(|s| Value::String(String::from_utf8_lossy(s.expose()).into_owned())).collect())
}

async fn sys_init(State(st): State<AppState>, StrictJson(r): StrictJson<InitReq>) -> ApiResult {
    let res = st.sealing.init(r.shares.unwrap_or(5), r.threshold.unwrap_or(3)).await?;
    tracing::warn!("initialised: the unseal (or recovery) shares and root token were returned once to the caller");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "shares": shares_json(&res.shares),
            "root_token": String::from_utf8_lossy(res.root_token.expose()),
            "seal": st.sealing.kind().as_str(),
            "sealed": st.sealing.unsealed().is_none(),
        })),
    )
        .into_response())
}

fn progress_json(p: keyward_seal::Progress) -> Value {
    use keyward_seal::Progress;
    match p {
        Progress::Need { have, threshold } => json!({"complete": false, "progress": have, "threshold": threshold}),
        Progress::Unsealed => json!({"complete": true, "sealed": false}),
        Progress::Rekeyed(shares) => json!({"complete": true, "shares": shares_json(&shares)}),
    }
}

async fn sys_unseal(State(st): State<AppState>, StrictJson(r): StrictJson<ShareReq>) -> ApiResult {
    ok(progress_json(st.sealing.submit_unseal_share(&r.share, r.migrate).await?))
}

async fn sys_seal(State(st): State<AppState>, c: Caller, StrictJson(_): StrictJson<Empty>) -> ApiResult {
    allow(&st, &c, "admin", "sys/seal")?;
    st.sealing.seal().await?;
    ok(json!({"sealed": true}))
}

async fn rekey_status(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    match st.sealing.rekey_status().await {
        Some((nonce, shares, threshold, progress)) => ok(json!({
            "in_progress": true, "nonce": nonce, "shares": shares, "threshold": threshold, "progress": progress,
        })),
        None => ok(json!({"in_progress": false})),
    }
}

async fn rekey_start(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<InitReq>) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    let nonce = st.sealing.rekey_start(r.shares.unwrap_or(5), r.threshold.unwrap_or(3)).await?;
    ok(json!({"nonce": nonce}))
}

async fn rekey_cancel(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    ok(json!({"cancelled": st.sealing.rekey_cancel().await}))
}

async fn rekey_update(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<RekeyShareReq>) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    ok(progress_json(st.sealing.rekey_submit(&r.nonce, &r.share).await?))
}

async fn rotate_root(State(st): State<AppState>, c: Caller, StrictJson(_): StrictJson<Empty>) -> ApiResult {
    allow(&st, &c, "admin", "sys/rotate-root")?;
    let r = st.sealing.rotate_root().await?;
    ok(json!({"rotated": true, "key_versions_rewrapped": r.key_versions, "service_keys_rewrapped": r.service_keys}))
}

async fn audit_info(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "audit", "sys/audit")?;
    match st.sealing.unsealed().and_then(|u| u.audit.clone()) {
        Some(a) => {
            let h = a.head();
            let s = a.stats();
            let load = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
            let (records, batches, micros) = (load(&s.records), load(&s.batches), load(&s.write_micros));
            ok(json!({
                "enabled": true,
                "file": a.file().display().to_string(),
                "head": {"seq": h.seq, "hmac": h.hmac},
                "stats": {
                    "records": records,
                    "batches": batches,
                    "records_per_batch": if batches == 0 { 0.0 } else { records as f64 / batches as f64 },
                    "write_and_sync_us_per_batch": micros.checked_div(batches).unwrap_or(0),
                },
                "key": b64(a.key().expose()),
            }))
        }
        None => ok(json!({"enabled": false})),
    }
}

// ----- tokens, policies, authorization -------------------------------------------------------

fn token_json(t: &keyward_core::model::TokenRecord) -> Value {
    json!({
        "accessor": t.accessor,
        "policies": t.policies,
        "display_name": t.display_name,
        "created_at": time(t.created_at),
        "expires_at": t.expires_at.map(time),
        "ttl": t.ttl_secs.map(format_period),
        "max_uses": t.max_uses,
        "uses": t.uses,
        "parent": t.parent,
        "selectors": t.selectors,
        "max_expires_at": t.max_expires_at.map(time),
        "kind": if t.is_stored() { "token" } else { "certificate" },
    })
}

/// Refuse token self-service to identities that have no token (client certificates).
fn stored_token(c: &Caller) -> Result<(), ApiError> {
    if c.0.is_stored() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "this identity is a client certificate, not a token: there is nothing to renew or revoke",
        ))
    }
}

async fn whoami(State(st): State<AppState>, c: Caller) -> ApiResult {
    c.1.set_decision("whoami", "auth/self", true, "every identity may see itself".into());
    let kms = st.kms()?;
    let grants: Vec<Value> = kms
        .effective_policies(&c.0)?
        .into_iter()
        .map(|(p, set)| {
            let via = match set {
                None => json!("token"),
                Some(i) => json!({"identity_set": i}),
            };
            match kms.get_policy(&p) {
                Ok(pol) => json!({"policy": p, "via": via, "grants": pol.summary(&c.0.selectors)}),
                Err(_) if p == keyward_core::policy::ROOT_POLICY => {
                    json!({"policy": p, "via": via, "grants": ["* on *"]})
                }
                Err(_) => json!({"policy": p, "via": via, "grants": [], "missing": true}),
            }
        })
        .collect();
    let mut v = token_json(&c.0);
    v["effective"] = Value::Array(grants);
    ok(v)
}

async fn token_create(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<TokenCreateReq>) -> ApiResult {
    allow(&st, &c, "write", "auth/token")?;
    let ttl_secs = r.ttl.as_deref().map(|s| parse_period("ttl", s)).transpose()?;
    let max_ttl_secs = r.max_ttl.as_deref().map(|s| parse_period("max_ttl", s)).transpose()?;
    let req = keyward_core::service::TokenRequest {
        policies: r.policies,
        ttl_secs,
        max_uses: r.max_uses,
        display_name: r.display_name.unwrap_or_default(),
        orphan: r.orphan,
        selectors: vec![],
        max_ttl_secs,
    };
    let (token, rec) = st.kms()?.create_token(&c.0, req).await?;
    let mut v = token_json(&rec);
    v["token"] = Value::String(String::from_utf8_lossy(token.expose()).into_owned());
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Authorize `op` on another token: `op` on `auth/token`, and for a token outside the caller's
/// subtree (not created from it), also `admin` on `auth/token`.
async fn allow_on_token(st: &AppState, c: &Caller, op: &str, accessor: &str) -> Result<(), ApiError> {
    allow(st, c, op, "auth/token")?;
    if st.kms()?.in_subtree(&c.0, accessor).await? {
        return Ok(());
    }
    allow(st, c, "admin", "auth/token").map_err(|_| {
        c.1.set_decision(
            op,
            "auth/token",
            false,
            format!("{accessor} is outside the caller's token subtree and no policy grants admin on auth/token"),
        );
        ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "that token is not this token or one created from it: acting on another token needs `admin` on \
             `auth/token`",
        )
    })
}

/// The caller's own token subtree, or with `admin` on `auth/token` every token. Never the
/// tokens themselves: accessors and what they carry.
async fn token_list(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "auth/token")?;
    // Seeing every token needs what acting on every token needs (not audited as a decision of
    // its own: the request's decision is `list`).
    let all = st.kms()?.authorize(&c.0, "admin", "auth/token").is_ok();
    let tokens = st.kms()?.list_tokens(&c.0, all).await?;
    let tokens: Vec<Value> = tokens.iter().map(|t| token_json(t)).collect();
    ok(json!({"tokens": tokens, "scope": if all { "all" } else { "subtree" }}))
}

async fn token_lookup(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<AccessorReq>) -> ApiResult {
    allow_on_token(&st, &c, "read", &r.accessor).await?;
    let t = st.kms()?.lookup_token(&r.accessor).await?;
    ok(token_json(&t))
}

async fn token_renew(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<AccessorReq>) -> ApiResult {
    allow_on_token(&st, &c, "write", &r.accessor).await?;
    let t = st.kms()?.renew_token(&r.accessor).await?;
    ok(token_json(&t))
}

async fn token_renew_self(State(st): State<AppState>, c: Caller, StrictJson(_): StrictJson<Empty>) -> ApiResult {
    stored_token(&c)?;
    c.1.set_decision("renew", "auth/self", true, "every token may renew itself".into());
    let t = st.kms()?.renew_token(&c.0.accessor).await?;
    ok(token_json(&t))
}

async fn token_revoke(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<AccessorReq>) -> ApiResult {
    allow_on_token(&st, &c, "write", &r.accessor).await?;
    ok(json!({"revoked": st.kms()?.revoke_token(&r.accessor).await?}))
}

async fn token_revoke_self(State(st): State<AppState>, c: Caller, StrictJson(_): StrictJson<Empty>) -> ApiResult {
    stored_token(&c)?;
    c.1.set_decision("revoke", "auth/self", true, "every token may revoke itself".into());
    ok(json!({"revoked": st.kms()?.revoke_token(&c.0.accessor).await?}))
}

async fn list_policies(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "policies/")?;
    ok(json!({"policies": st.kms()?.list_policies()}))
}

async fn get_policy(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "read", &format!("policies/{name}"))?;
    if name == keyward_core::policy::ROOT_POLICY {
        return ok(
            json!({"name": "root", "description": "built in: every operation on every resource", "rules": [{"resources": ["*"], "operations": ["*"]}]}),
        );
    }
    ok(serde_json::to_value(&*st.kms()?.get_policy(&name)?).unwrap_or_default())
}

async fn put_policy(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    StrictJson(r): StrictJson<PolicyReq>,
) -> ApiResult {
    allow(&st, &c, "admin", &format!("policies/{name}"))?;
    let p = keyward_core::policy::Policy {
        name: name.clone(),
        description: r.description,
        identities: r.identities,
        rules: r.rules,
    };
    st.kms()?.put_policy(p).await?;
    ok(serde_json::to_value(&*st.kms()?.get_policy(&name)?).unwrap_or_default())
}

async fn delete_policy(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "admin", &format!("policies/{name}"))?;
    st.kms()?.delete_policy(&name).await?;
    ok(json!({"deleted": name}))
}

// ----- Kubernetes ServiceAccount auth ---------------------------------------------------------

fn role_json(name: &str, r: &keyward_authn::kubernetes::Role) -> Value {
    json!({
        "name": name,
        "bound_namespaces": r.bound_namespaces,
        "bound_service_accounts": r.bound_service_accounts,
        "policies": r.policies,
        "ttl": format_period(r.ttl_secs),
        "max_ttl": format_period(r.max_ttl()),
        "allow_unbound_tokens": r.allow_unbound_tokens,
    })
}

fn check_role_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(ApiError::invalid("a role name is 1 to 64 characters of A-Z a-z 0-9 - _ ."));
    }
    Ok(())
}

async fn k8s_configure(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<K8sConfigReq>) -> ApiResult {
    use keyward_authn::kubernetes::{Config, DEFAULT_LEEWAY_SECS, JwksSource};
    allow(&st, &c, "admin", "auth/kubernetes/config")?;
    let jwks = match (r.jwks, r.jwks_url, r.discovery) {
        (Some(doc), None, false) => JwksSource::Static(doc),
        (None, Some(url), false) => JwksSource::Url(url),
        (None, None, true) => JwksSource::Discovery,
        _ => return Err(ApiError::invalid("give exactly one of jwks, jwks_url or discovery: true")),
    };
    let config = Config {
        issuer: r.issuer,
        audience: r.audience,
        jwks,
        ca_pem: r.ca_pem,
        leeway_secs: r.leeway_secs.unwrap_or(DEFAULT_LEEWAY_SECS),
    };
    let (keys, warning) = st.k8s.configure(config).await?;
    let mut v = json!({"configured": true, "keys": keys});
    if let Some(w) = warning {
        v["warning"] = json!(format!("the signing keys could not be fetched yet ({w}); logins fail until they can be"));
    }
    ok(v)
}

async fn k8s_get_config(State(st): State<AppState>, c: Caller) -> ApiResult {
    use keyward_authn::kubernetes::JwksSource;
    allow(&st, &c, "read", "auth/kubernetes/config")?;
    let doc = st.k8s.doc().await?;
    let cfg = doc.config.ok_or(crate::k8s_auth::K8sAuthError::NotConfigured)?;
    let jwks = match &cfg.jwks {
        JwksSource::Static(_) => json!("static"),
        JwksSource::Url(u) => json!({"url": u}),
        JwksSource::Discovery => json!("discovery"),
    };
    ok(
        json!({"issuer": cfg.issuer, "audience": cfg.audience, "jwks": jwks, "leeway_secs": cfg.leeway_secs, "custom_ca": cfg.ca_pem.is_some()}),
    )
}

async fn k8s_list_roles(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "auth/kubernetes/roles/")?;
    ok(json!({"roles": st.k8s.doc().await?.roles.keys().collect::<Vec<_>>()}))
}

async fn k8s_get_role(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "read", &format!("auth/kubernetes/roles/{name}"))?;
    let doc = st.k8s.doc().await?;
    let r = doc.roles.get(&name).ok_or_else(|| crate::k8s_auth::K8sAuthError::NoRole(name.clone()))?;
    ok(role_json(&name, r))
}

async fn k8s_put_role(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    StrictJson(r): StrictJson<K8sRoleReq>,
) -> ApiResult {
    allow(&st, &c, "admin", &format!("auth/kubernetes/roles/{name}"))?;
    check_role_name(&name)?;
    let kms = st.kms()?;
    for p in &r.policies {
        if p == keyward_core::policy::ROOT_POLICY {
            return Err(ApiError::invalid("a login role cannot give the root policy"));
        }
        kms.get_policy(p)?;
    }
    let max_ttl_secs = r.max_ttl.as_deref().map(|t| parse_period("max_ttl", t)).transpose()?;
    let ttl_secs = r.ttl.as_deref().map(|t| parse_period("ttl", t)).transpose()?.unwrap_or(15 * 60);
    let role = keyward_authn::kubernetes::Role {
        bound_namespaces: r.bound_namespaces,
        bound_service_accounts: r.bound_service_accounts,
        policies: r.policies,
        // An issued token never lives longer than the role's max TTL allows.
        ttl_secs: max_ttl_secs.map_or(ttl_secs, |m| ttl_secs.min(m)),
        max_ttl_secs,
        allow_unbound_tokens: r.allow_unbound_tokens,
    };
    st.k8s.put_role(&name, role.clone()).await?;
    ok(role_json(&name, &role))
}

async fn k8s_delete_role(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "admin", &format!("auth/kubernetes/roles/{name}"))?;
    if !st.k8s.delete_role(&name).await? {
        return Err(crate::k8s_auth::K8sAuthError::NoRole(name).into());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Exchange a projected ServiceAccount token for a short-lived Keyward token (anonymous: the
/// JWT is the credential). Every outcome is audited with the identity the token claimed to be
/// (once verified) and the reason.
async fn k8s_login(
    State(st): State<AppState>,
    axum::Extension(ctx): axum::Extension<Arc<AuditCtx>>,
    StrictJson(r): StrictJson<K8sLoginReq>,
) -> ApiResult {
    let resource = format!("auth/kubernetes/roles/{}", r.role);
    let (id, role) = match st.k8s.login_verbose(&r.role, &r.jwt).await {
        Ok(v) => v,
        Err((verified, e)) => {
            // A token that verified but was refused (role bindings) is audited as who it is.
            if let Some(id) = verified {
                ctx.set_identity(&format!("{} [{}]", id.display(), id.selectors().join(" ")));
            }
            ctx.set_decision("login", &resource, false, e.to_string());
            return Err(e.into());
        }
    };
    let selectors = id.selectors();
    ctx.set_identity(&format!("{} [{}]", id.display(), selectors.join(" ")));
    if let Some(bad) = selectors.iter().find(|s| !keyward_core::policy::selector_ok(s)) {
        let reason = format!("the token's identity yields an unusable selector {bad:?}");
        ctx.set_decision("login", &resource, false, reason.clone());
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", reason));
    }
    // The token never outlives the ServiceAccount token it was issued for, renewed or not.
    let left = u64::try_from(id.expires_at.saturating_sub(keyward_core::now_unix())).unwrap_or(0).max(1);
    let req = keyward_core::service::TokenRequest {
        policies: role.policies.clone(),
        ttl_secs: Some(role.ttl_secs.min(left)),
        max_uses: None,
        display_name: id.display(),
        orphan: true,
        selectors,
        max_ttl_secs: Some(role.max_ttl().min(left)),
    };
    let (token, rec) = match st.kms()?.issue_login_token(req).await {
        Ok(v) => v,
        Err(e) => {
            ctx.set_decision("login", &resource, false, e.to_string());
            return Err(e.into());
        }
    };
    ctx.set_decision("login", &resource, true, format!("role {} (token {})", r.role, rec.accessor));
    let mut v = token_json(&rec);
    v["token"] = Value::String(String::from_utf8_lossy(token.expose()).into_owned());
    v["identity"] = json!({
        "namespace": id.namespace,
        "service_account": id.service_account,
        "pod": id.pod.as_ref().map(|p| &p.0),
        "pod_uid": id.pod.as_ref().map(|p| &p.1),
        "node": id.node,
    });
    ok(v)
}

/// Dry run: would a token (by accessor) or a set of policies be allowed `operation` on `resource`?
async fn dry_run(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<DryRunReq>) -> ApiResult {
    allow(&st, &c, "admin", "sys/authorize")?;
    let (policies, selectors) = match (&r.accessor, &r.policies, &r.selectors) {
        (Some(a), None, None) => {
            let t = st.kms()?.lookup_token(a).await?;
            (t.policies.clone(), t.selectors.clone())
        }
        (None, p, s) if p.is_some() || s.is_some() => {
            let s = s.clone().unwrap_or_default();
            if let Some(bad) = s.iter().find(|x| !keyward_core::policy::selector_ok(x)) {
                return Err(ApiError::invalid(format!("selector {bad:?} is invalid: use kind:name:value")));
            }
            (p.clone().unwrap_or_default(), s)
        }
        _ => return Err(ApiError::invalid("give an accessor, or policies and/or selectors")),
    };
    ok(match st.kms()?.decide(&policies, &selectors, &r.operation, &r.resource) {
        Ok(grant) => json!({"allowed": true, "grant": grant, "policies": policies, "selectors": selectors}),
        Err(e) => json!({"allowed": false, "reason": e.to_string(), "policies": policies, "selectors": selectors}),
    })
}

async fn openapi(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "read", "sys/openapi")?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
}

// ----- keys --------------------------------------------------------------------------------

async fn create_key(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<CreateKeyReq>) -> ApiResult {
    allow(&st, &c, "admin", &format!("keys/{}", r.name))?;
    let algorithm = KeyAlgorithm::parse(&r.key_type).ok_or_else(|| {
        ApiError::invalid(format!(
            "unknown key type {:?}: use one of {}",
            r.key_type,
            KeyAlgorithm::ALL.map(|a| a.as_str()).join(", ")
        ))
    })?;
    let rotate_every_secs = r.rotate_every.as_deref().map(|s| parse_period("rotate_every", s)).transpose()?;
    let d = st
        .kms()?
        .create_key(CreateKey { name: r.name, algorithm, description: r.description, rotate_every_secs })
        .await?;
    Ok((StatusCode::CREATED, Json(KeyOut::from_description(&d))).into_response())
}

async fn list_keys(State(st): State<AppState>, c: Caller, StrictQuery(q): StrictQuery<PageQuery>) -> ApiResult {
    allow(&st, &c, "list", "keys/")?;
    let (page, next) = st.kms()?.list_keys(q.after.as_deref(), q.limit).await?;
    let keys: Vec<KeyOut> = page.iter().map(KeyOut::from_record).collect();
    ok(json!({"keys": keys, "next": next}))
}

async fn describe_key(State(st): State<AppState>, c: Caller, KeyName(name): KeyName) -> ApiResult {
    allow(&st, &c, "read", &format!("keys/{name}"))?;
    ok(serde_json::to_value(KeyOut::from_description(&st.kms()?.describe_key(&name).await?)).unwrap_or_default())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKeyReq {
    description: String,
}

/// `PATCH /v1/keys/{name}`: change what can change in place (the description).
async fn update_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<UpdateKeyReq>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.set_key_description(&name, &r.description).await?)
}

async fn list_aliases(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "keys/")?;
    let aliases: Vec<Value> =
        st.kms()?.aliases().await?.into_iter().map(|(a, k)| json!({"alias": a, "key": k})).collect();
    ok(json!({"aliases": aliases}))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasReq {
    key: String,
}

/// `PUT /v1/aliases/{name}`: point `alias/NAME` at a key (`admin` on that key, and on the key
/// it named before).
async fn set_alias(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    StrictJson(r): StrictJson<AliasReq>,
) -> ApiResult {
    let alias = format!("{}{name}", keyward_core::service::ALIAS_PREFIX);
    keyward_core::validate::alias_name(&alias)?;
    key_admin(&st, &c, &r.key).await?;
    let kms = st.kms()?;
    if let Ok(before) = kms.resolve_key_name(&alias).await
        && before != r.key
    {
        key_admin(&st, &c, &before).await?;
    }
    let previous = kms.set_alias(&alias, &r.key).await?;
    ok(json!({"alias": alias, "key": r.key, "previous": previous}))
}

/// `DELETE /v1/aliases/{name}` (`admin` on the key it names).
async fn delete_alias(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    let alias = format!("{}{name}", keyward_core::service::ALIAS_PREFIX);
    keyward_core::validate::alias_name(&alias)?;
    let kms = st.kms()?;
    match kms.resolve_key_name(&alias).await {
        Ok(key) => key_admin(&st, &c, &key).await?,
        // Nothing to say about an alias to a caller who could not manage keys at all.
        Err(e) => {
            allow(&st, &c, "admin", "keys/")?;
            return Err(e.into());
        }
    }
    let key = kms.delete_alias(&alias).await?;
    ok(json!({"alias": alias, "deleted": true, "key": key}))
}

async fn key_admin(st: &AppState, c: &Caller, name: &str) -> Result<(), ApiError> {
    allow(st, c, "admin", &format!("keys/{name}"))
}

fn key_json(d: &keyward_core::service::KeyDescription) -> ApiResult {
    ok(serde_json::to_value(KeyOut::from_description(d)).unwrap_or_default())
}

async fn enable_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.enable_key(&name).await?)
}

async fn disable_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.disable_key(&name).await?)
}

async fn rotate_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.rotate_key(&name).await?)
}

async fn rotation_policy(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<RotationPolicyReq>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    let secs = r.rotate_every.as_deref().map(|s| parse_period("rotate_every", s)).transpose()?;
    key_json(&st.kms()?.set_rotation(&name, secs).await?)
}

async fn schedule_deletion(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<ScheduleDeletionReq>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.schedule_deletion(&name, r.pending_days).await?)
}

async fn cancel_deletion(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.cancel_deletion(&name).await?)
}

// ----- cryptographic operations --------------------------------------------------------------

async fn encrypt(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<EncryptReq>,
) -> ApiResult {
    c.1.set_context(&r.context);
    allow(&st, &c, "encrypt", &format!("keys/{name}"))?;
    let pt = zeroize::Zeroizing::new(unb64("plaintext", &r.plaintext)?);
    let e = st.kms()?.encrypt(&name, &pt, &r.context).await?;
    ok(json!({"ciphertext": b64(&e.ciphertext), "key": e.key_name, "key_version": e.key_version}))
}

async fn decrypt(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<DecryptReq>) -> ApiResult {
    c.1.set_context(&r.context);
    let ct = unb64("ciphertext", &r.ciphertext)?;
    // Authorization is by the key named in the ciphertext header; the service re-checks it.
    let resource = key_resource_of(&st, &ct).await?;
    allow(&st, &c, "decrypt", &resource)?;
    let d = st.kms()?.decrypt(&ct, &r.context).await?;
    ok(json!({"plaintext": b64(d.plaintext.expose()), "key": d.key_name, "key_version": d.key_version}))
}

/// The resource a ciphertext is authorized against: the key named by its header. An unknown or
/// malformed header is `keys/?` (only a caller allowed to decrypt with every key gets past the
/// check, to then learn "decryption failed").
async fn key_resource_of(st: &AppState, ciphertext: &[u8]) -> Result<String, ApiError> {
    Ok(match st.kms()?.key_name_of_ciphertext(ciphertext).await? {
        Some(name) => format!("keys/{name}"),
        None => "keys/?".to_string(),
    })
}

async fn reencrypt(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<ReencryptReq>) -> ApiResult {
    c.1.set_context(&r.context);
    let ct = unb64("ciphertext", &r.ciphertext)?;
    allow(&st, &c, "decrypt", &key_resource_of(&st, &ct).await?)?;
    let dest = match &r.destination_key {
        Some(d) => {
            let d = st.kms()?.resolve_key_name(d).await.unwrap_or_else(|_| d.clone());
            allow(&st, &c, "encrypt", &format!("keys/{d}"))?;
            Some(d)
        }
        None => None,
    };
    let r = st.kms()?.reencrypt(&ct, &r.context, dest.as_deref(), &r.destination_context).await?;
    let e = &r.encrypted;
    ok(json!({
        "ciphertext": b64(&e.ciphertext), "key": e.key_name, "key_version": e.key_version,
        "source_key": r.source_key, "source_key_version": r.source_key_version,
    }))
}

async fn data_key_common(st: &AppState, c: &Caller, name: &str, r: DataKeyReq, with_plaintext: bool) -> ApiResult {
    c.1.set_context(&r.context);
    allow(st, c, "generate-data-key", &format!("keys/{name}"))?;
    let dk = st.kms()?.generate_data_key(name, r.bytes, &r.context, with_plaintext).await?;
    let mut v = json!({"ciphertext": b64(&dk.ciphertext), "key": name, "key_version": dk.key_version});
    if let Some(p) = &dk.plaintext {
        v["plaintext"] = Value::String(b64(p.expose()));
    }
    ok(v)
}

async fn data_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<DataKeyReq>,
) -> ApiResult {
    data_key_common(&st, &c, &name, r, true).await
}

async fn data_key_without_plaintext(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<DataKeyReq>,
) -> ApiResult {
    data_key_common(&st, &c, &name, r, false).await
}

async fn sign(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<SignReq>,
) -> ApiResult {
    allow(&st, &c, "sign", &format!("keys/{name}"))?;
    let (sig, v) = match (&r.message, &r.digest) {
        (Some(m), None) => st.kms()?.sign(&name, &unb64("message", m)?).await?,
        (None, Some(d)) => st.kms()?.sign_digest(&name, &unb64("digest", d)?).await?,
        _ => return Err(ApiError::invalid("give exactly one of message and digest (the message's SHA-256)")),
    };
    ok(json!({"signature": b64(&sig), "key": name, "key_version": v}))
}

async fn verify(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<VerifyReq>,
) -> ApiResult {
    allow(&st, &c, "verify", &format!("keys/{name}"))?;
    let signature = unb64("signature", &r.signature)?;
    let valid = match (&r.message, &r.digest) {
        (Some(m), None) => st.kms()?.verify(&name, &unb64("message", m)?, &signature).await?,
        (None, Some(d)) => st.kms()?.verify_digest(&name, &unb64("digest", d)?, &signature).await?,
        _ => return Err(ApiError::invalid("give exactly one of message and digest (the message's SHA-256)")),
    };
    ok(json!({"valid": valid}))
}

async fn mac(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<MessageReq>,
) -> ApiResult {
    allow(&st, &c, "mac", &format!("keys/{name}"))?;
    let (m, v) = st.kms()?.mac(&name, &unb64("message", &r.message)?).await?;
    ok(json!({"mac": b64(&m), "key": name, "key_version": v}))
}

async fn verify_mac(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<VerifyMacReq>,
) -> ApiResult {
    allow(&st, &c, "verify-mac", &format!("keys/{name}"))?;
    let valid = st.kms()?.verify_mac(&name, &unb64("message", &r.message)?, &unb64("mac", &r.mac)?).await?;
    ok(json!({"valid": valid}))
}

async fn random(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<RandomReq>) -> ApiResult {
    allow(&st, &c, "random", "sys/random")?;
    let b = st.kms()?.random(r.bytes)?;
    ok(json!({"bytes": b64(b.expose())}))
}

// ----- secrets -------------------------------------------------------------------------------

async fn list_secrets(
    State(st): State<AppState>,
    c: Caller,
    StrictQuery(q): StrictQuery<SecretListQuery>,
) -> ApiResult {
    allow(&st, &c, "list", &format!("secrets/{}", q.prefix))?;
    let (paths, next) = st.kms()?.list_secrets(&q.prefix, q.after.as_deref(), q.limit).await?;
    ok(json!({"paths": paths, "next": next}))
}

/// The workload identity a randomized value belongs to, most general first: a Kubernetes
/// ServiceAccount (all its pods share it, however they authenticate), a client certificate, the
/// program a launcher started (`exec:sha256`), an attested process (uid and executable digest),
/// or else a stored token itself.
fn randomized_identity(t: &keyward_core::model::TokenRecord) -> Result<String, ApiError> {
    let sel = |p: &str| t.selectors.iter().find_map(|s| s.strip_prefix(p));
    // The same ServiceAccount, attested or logged in: the same value (policies decide who may
    // read it).
    let ns = sel("k8s:ns:").or_else(|| sel("k8s-jwt:ns:"));
    let sa = sel("k8s:sa:").or_else(|| sel("k8s-jwt:sa:"));
    if let (Some(ns), Some(sa)) = (ns, sa) {
        return Ok(format!("k8s:{ns}/{sa}"));
    }
    if let Some(fp) = sel("cert:sha256:") {
        return Ok(format!("cert:{fp}"));
    }
    // `exec:uid:UID:sha256:HEX` (a program started by `keyward run`).
    if let Some(e) = t.selectors.iter().find_map(|s| s.strip_prefix("exec:uid:")).filter(|e| e.contains(":sha256:")) {
        return Ok(format!("exec:{e}"));
    }
    if t.selectors.iter().any(|s| s.starts_with("unix:")) {
        return match (sel("unix:uid:"), sel("unix:sha256:"), sel("unix:cgroup:")) {
            (Some(uid), Some(h), _) => Ok(format!("unix:{uid}:{h}")),
            // A generic binary (`keyward` itself) has no hash identity: its uid and cgroup.
            (Some(uid), None, Some(cg)) => Ok(format!("unix:{uid}:cgroup:{cg}")),
            _ => Err(ApiError::invalid(
                "this workload has no stable identity for a randomized secret (its executable was not hashed: \
                 raise the agent's --hash-limit)",
            )),
        };
    }
    if t.is_stored() {
        return Ok(format!("token:{}", t.accessor));
    }
    Err(ApiError::invalid("this caller has no stable identity for a randomized secret"))
}

async fn randomized_define(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    StrictJson(r): StrictJson<RandomizedReq>,
) -> ApiResult {
    use keyward_core::random::{RandomKind, RandomSpec};
    allow(&st, &c, "write", &format!("randomized/{name}"))?;
    let kind = match r.kind.as_str() {
        "password" => RandomKind::Password,
        "api-key" => RandomKind::ApiKey,
        "bytes" => RandomKind::Bytes,
        other => return Err(ApiError::invalid(format!("kind {other:?} is not password, api-key or bytes"))),
    };
    let ttl_secs = parse_period("ttl", &r.ttl)?;
    let spec = RandomSpec {
        kind,
        length: r.length.unwrap_or(32),
        alphabet: r.alphabet,
        ttl_secs,
        // The previous value is kept for at most one period.
        grace_secs: r.grace.as_deref().map(|g| parse_period("grace", g)).transpose()?.unwrap_or(0).min(ttl_secs),
    };
    st.kms()?.define_random(&name, &spec).await?;
    ok(randomized_json(&name, &spec))
}

fn randomized_json(name: &str, spec: &keyward_core::random::RandomSpec) -> Value {
    json!({"name": name, "kind": spec.kind, "length": spec.length, "alphabet": spec.alphabet,
           "ttl": format_period(spec.ttl_secs), "grace": format_period(spec.grace_secs)})
}

async fn randomized_definition(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "list", &format!("randomized/{name}"))?;
    let spec = st.kms()?.random_definition(&name).await?;
    ok(randomized_json(&name, &spec))
}

async fn randomized_value(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "read", &format!("randomized/{name}"))?;
    let identity = randomized_identity(&c.0)?;
    let v = st.kms()?.random_value(&name, &identity, keyward_core::now_unix()).await?;
    let mut out = json!({
        "name": name,
        "identity": identity,
        "value": v.value.as_str(),
        "version": v.version,
        "created_at": time(v.created_at),
        "rotates_at": time(v.rotates_at),
    });
    if let Some((prev, until)) = &v.previous {
        out["previous"] = json!({"value": prev.as_str(), "valid_until": time(*until)});
    }
    ok(out)
}

async fn get_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictQuery(q): StrictQuery<VersionQuery>,
) -> ApiResult {
    allow(&st, &c, "read", &format!("secrets/{path}"))?;
    let s = st.kms()?.get_secret(&path, q.version).await?;
    ok(json!({"path": path, "version": s.version, "created_at": time(s.created_at), "data": s.data.expose()}))
}

async fn put_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<PutSecretReq>,
) -> ApiResult {
    allow(&st, &c, "write", &format!("secrets/{path}"))?;
    let data = SecretData::new(r.data)?;
    let version = st.kms()?.put_secret(&path, data, r.cas).await?;
    ok(json!({"path": path, "version": version}))
}

async fn secret_metadata(State(st): State<AppState>, c: Caller, Path(path): Path<String>) -> ApiResult {
    allow(&st, &c, "read", &format!("secrets/{path}"))?;
    let (meta, versions) = st.kms()?.secret_versions(&path).await?;
    let versions: Vec<SecretVersionOut> = versions.iter().map(SecretVersionOut::from).collect();
    ok(json!({
        "path": meta.path,
        "current_version": meta.current_version,
        "created_at": time(meta.created_at),
        "updated_at": time(meta.updated_at),
        "versions": versions,
    }))
}

async fn delete_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<VersionsReq>,
) -> ApiResult {
    allow(&st, &c, "write", &format!("secrets/{path}"))?;
    ok(json!({"changed": st.kms()?.delete_secret(&path, &r.versions).await?}))
}

async fn undelete_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<VersionsReq>,
) -> ApiResult {
    allow(&st, &c, "write", &format!("secrets/{path}"))?;
    ok(json!({"changed": st.kms()?.undelete_secret(&path, &r.versions).await?}))
}

async fn destroy_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<VersionsReq>,
) -> ApiResult {
    allow(&st, &c, "destroy", &format!("secrets/{path}"))?;
    ok(json!({"changed": st.kms()?.destroy_secret(&path, &r.versions).await?}))
}
