//! The two layers every request passes: `authenticate` (the token, and which routes it may be
//! presented on) and `finish` (request id, error rendering, the audit record written and durable
//! before the answer leaves).

use super::*;

/// Assign a request id; render [`ApiError`]s as JSON with it; log failures once; write the
/// audit record and wait for it to be durable before the response leaves (fail closed).
pub(super) async fn finish(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
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
    let audited = unsealed.as_ref().and_then(|u| u.audit.as_ref()).filter(|_| path != keyward_api::routes::HEALTH);
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

pub(super) fn audit_unavailable() -> Response {
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

pub(super) fn error_response(err: &ApiError, request_id: &str) -> Response {
    let body = json!({"error": {"code": err.code, "message": err.message, "request_id": request_id}});
    (err.status, Json(body)).into_response()
}

/// Require a valid token (`Authorization: Bearer TOKEN` or `X-Keyward-Token: TOKEN`).
pub(super) async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
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
pub(super) const AGENT_ROUTES: &[&str] = &[
    keyward_api::routes::AGENT_NONCE,
    keyward_api::routes::AGENT_RELEASE,
    keyward_api::routes::AGENT_RELEASES,
    keyward_api::routes::TOKEN_RENEW_SELF,
    keyward_api::routes::TOKEN_REVOKE_SELF,
];

/// Whether a token is a node agent's (bound to its key) or a join token, and which.
pub(super) fn agent_credential(rec: &keyward_core::model::TokenRecord) -> Option<&'static str> {
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
