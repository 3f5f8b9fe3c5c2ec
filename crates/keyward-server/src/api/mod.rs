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
use serde_json::json;

use crate::audit::AuditCtx;
use crate::error::ApiError;
use crate::extract::{Caller, KeyName, RequestId, StrictJson, StrictQuery};
use crate::k8s_auth::K8sAuth;
use crate::wire::*;
use keyward_api::routes;
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
const SEALED_ROUTES: &[&str] = &[routes::HEALTH, routes::SYS_INIT, routes::SYS_UNSEAL];

pub(crate) fn sealed_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "sealed",
        "keyward is sealed: operators must unseal it with `keyward operator unseal` (see `keyward status`)",
    )
}

type ApiResult = Result<Response, ApiError>;

fn ok<T: serde::Serialize>(v: T) -> ApiResult {
    Ok(Json(v).into_response())
}

/// Every route: (method, path, anonymous?, handler). The OpenAPI test checks this table against
/// the document in both directions.
pub fn route_table() -> Vec<(&'static str, &'static str, bool, MethodRouter<AppState>)> {
    vec![
        ("get", routes::HEALTH, true, get(health)),
        ("post", routes::SYS_INIT, true, post(sys_init)),
        ("post", routes::SYS_UNSEAL, true, post(sys_unseal)),
        ("post", routes::SYS_SEAL, false, post(sys_seal)),
        ("get", routes::SYS_REKEY, false, get(rekey_status)),
        ("post", routes::SYS_REKEY, false, post(rekey_start)),
        ("delete", routes::SYS_REKEY, false, axum::routing::delete(rekey_cancel)),
        ("post", routes::SYS_REKEY_UPDATE, false, post(rekey_update)),
        ("post", routes::SYS_ROTATE_ROOT, false, post(rotate_root)),
        ("get", routes::OPENAPI, false, get(openapi)),
        ("get", routes::SYS_AUDIT, false, get(audit_info)),
        ("get", routes::SYS_SNAPSHOT, false, get(snapshot)),
        ("get", routes::METRICS, false, get(metrics)),
        ("post", routes::SYS_AUTHORIZE, false, post(dry_run)),
        ("get", routes::WHOAMI, false, get(whoami)),
        ("post", routes::K8S_LOGIN, true, post(k8s_login)),
        ("get", routes::K8S_CONFIG, false, get(k8s_get_config)),
        ("put", routes::K8S_CONFIG, false, put(k8s_configure)),
        ("get", routes::K8S_ROLES, false, get(k8s_list_roles)),
        ("get", routes::K8S_ROLE, false, get(k8s_get_role)),
        ("put", routes::K8S_ROLE, false, put(k8s_put_role)),
        ("delete", routes::K8S_ROLE, false, axum::routing::delete(k8s_delete_role)),
        ("post", routes::AGENT_JOIN_TOKEN, false, post(crate::agent_api::join_token)),
        ("post", routes::AGENT_JOIN, true, post(crate::agent_api::join)),
        ("get", routes::AGENTS, false, get(crate::agent_api::list_nodes)),
        ("post", routes::AGENT_REVOKE, false, post(crate::agent_api::revoke_node)),
        ("post", routes::AGENT_NONCE, false, post(crate::agent_api::nonce)),
        ("post", routes::AGENT_RELEASE, false, post(crate::agent_api::release)),
        ("post", routes::AGENT_RELEASES, false, post(crate::agent_api::release_batch)),
        ("post", routes::TOKEN_CREATE, false, post(token_create)),
        ("post", routes::TOKEN_LOOKUP, false, post(token_lookup)),
        ("get", routes::TOKEN_ACCESSORS, false, get(token_list)),
        ("post", routes::TOKEN_RENEW, false, post(token_renew)),
        ("post", routes::TOKEN_RENEW_SELF, false, post(token_renew_self)),
        ("post", routes::TOKEN_REVOKE, false, post(token_revoke)),
        ("post", routes::TOKEN_REVOKE_SELF, false, post(token_revoke_self)),
        ("get", routes::POLICIES, false, get(list_policies)),
        ("get", routes::POLICY, false, get(get_policy)),
        ("put", routes::POLICY, false, put(put_policy)),
        ("delete", routes::POLICY, false, axum::routing::delete(delete_policy)),
        ("post", routes::KEYS, false, post(create_key)),
        ("get", routes::KEYS, false, get(list_keys)),
        ("get", routes::KEY, false, get(describe_key)),
        ("patch", routes::KEY, false, axum::routing::patch(update_key)),
        ("get", routes::ALIASES, false, get(list_aliases)),
        ("put", routes::ALIAS, false, put(set_alias)),
        ("delete", routes::ALIAS, false, axum::routing::delete(delete_alias)),
        ("post", routes::KEY_ENABLE, false, post(enable_key)),
        ("post", routes::KEY_DISABLE, false, post(disable_key)),
        ("post", routes::KEY_ROTATE, false, post(rotate_key)),
        ("put", routes::KEY_ROTATION_POLICY, false, put(rotation_policy)),
        ("post", routes::KEY_SCHEDULE_DELETION, false, post(schedule_deletion)),
        ("post", routes::KEY_CANCEL_DELETION, false, post(cancel_deletion)),
        ("post", routes::KEY_ENCRYPT, false, post(encrypt)),
        ("post", routes::KEY_DATA_KEY, false, post(data_key)),
        ("post", routes::KEY_DATA_KEY_WITHOUT_PLAINTEXT, false, post(data_key_without_plaintext)),
        ("post", routes::KEY_SIGN, false, post(sign)),
        ("post", routes::KEY_VERIFY, false, post(verify)),
        ("post", routes::KEY_MAC, false, post(mac)),
        ("post", routes::KEY_VERIFY_MAC, false, post(verify_mac)),
        ("post", routes::DECRYPT, false, post(decrypt)),
        ("post", routes::REENCRYPT, false, post(reencrypt)),
        ("post", routes::RANDOM, false, post(random)),
        ("get", routes::RANDOMIZED, false, get(randomized_value)),
        ("put", routes::RANDOMIZED, false, put(randomized_define)),
        ("get", routes::RANDOMIZED_DEFINITION, false, get(randomized_definition)),
        ("get", routes::SECRETS, false, get(list_secrets)),
        ("get", routes::SECRET_DATA, false, get(get_secret)),
        ("put", routes::SECRET_DATA, false, put(put_secret)),
        ("get", routes::SECRET_METADATA, false, get(secret_metadata)),
        ("post", routes::SECRET_DELETE, false, post(delete_secret)),
        ("post", routes::SECRET_UNDELETE, false, post(undelete_secret)),
        ("post", routes::SECRET_DESTROY, false, post(destroy_secret)),
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
