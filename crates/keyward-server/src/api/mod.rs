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

mod auth;
mod crypto;
mod k8s;
mod keys;
mod layers;
mod secrets;
mod sys;

use self::auth::*;
use self::crypto::*;
/// The operations attested releases run, typed: the same code as their HTTP handlers.
pub(crate) use self::crypto::{decrypt_as, generate_data_key_as, sign_as};
use self::k8s::*;
use self::keys::*;
use self::layers::*;
pub(crate) use self::layers::{audit_unavailable_error, conclude};
use self::secrets::*;
pub(crate) use self::secrets::{randomized_value_as, read_secret_as};
use self::sys::*;

/// The OpenAPI document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

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
