//! The Kubernetes ServiceAccount auth method: its configuration, roles, and login.

use super::*;

pub(super) fn role_json(name: &str, r: &keyward_authn::kubernetes::Role) -> K8sRole {
    K8sRole {
        name: name.to_string(),
        bound_namespaces: r.bound_namespaces.clone(),
        bound_service_accounts: r.bound_service_accounts.clone(),
        policies: r.policies.clone(),
        ttl: format_period(r.ttl_secs),
        max_ttl: format_period(r.max_ttl()),
        allow_unbound_tokens: r.allow_unbound_tokens,
    }
}

pub(super) fn check_role_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(ApiError::invalid("a role name is 1 to 64 characters of A-Z a-z 0-9 - _ ."));
    }
    Ok(())
}

pub(super) async fn k8s_configure(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<K8sConfigReq>,
) -> ApiResult {
    use keyward_authn::kubernetes::{Config, DEFAULT_LEEWAY_SECS, JwksSource};
    // Logins send the reviewer's secret to the review URL: only a caller who may read that
    // secret may name it (else configuring would be a way to read any secret). Checked first,
    // so that an allowed configuration is audited as what it is.
    if let Some((path, _)) = r.token_reviewer_secret.as_deref().and_then(|s| s.split_once('#')) {
        allow(&st, &c, "read", &format!("secrets/{path}"))?;
    }
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
        token_review_url: r.token_review_url,
        token_reviewer_secret: r.token_reviewer_secret,
    };
    let (keys, warning) = st.k8s.configure(config).await?;
    let warning =
        warning.map(|w| format!("the signing keys could not be fetched yet ({w}); logins fail until they can be"));
    ok(K8sConfigured { configured: true, keys, warning })
}

pub(super) async fn k8s_get_config(State(st): State<AppState>, c: Caller) -> ApiResult {
    use keyward_authn::kubernetes::JwksSource;
    allow(&st, &c, "read", "auth/kubernetes/config")?;
    let doc = st.k8s.doc().await?;
    let cfg = doc.config.ok_or(crate::k8s_auth::K8sAuthError::NotConfigured)?;
    let jwks = match &cfg.jwks {
        JwksSource::Static(_) => keyward_api::JwksSource::Kind("static".into()),
        JwksSource::Url(u) => keyward_api::JwksSource::Url { url: u.clone() },
        JwksSource::Discovery => keyward_api::JwksSource::Kind("discovery".into()),
    };
    ok(K8sConfig {
        issuer: cfg.issuer.clone(),
        audience: cfg.audience.clone(),
        jwks,
        leeway_secs: cfg.leeway_secs,
        custom_ca: cfg.ca_pem.is_some(),
        token_review_url: cfg.token_review_url.clone(),
        token_reviewer_secret: cfg.token_reviewer_secret.clone(),
    })
}

pub(super) async fn k8s_list_roles(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "auth/kubernetes/roles/")?;
    ok(K8sRoleList { roles: st.k8s.doc().await?.roles.keys().cloned().collect() })
}

pub(super) async fn k8s_get_role(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "read", &format!("auth/kubernetes/roles/{name}"))?;
    let doc = st.k8s.doc().await?;
    let r = doc.roles.get(&name).ok_or_else(|| crate::k8s_auth::K8sAuthError::NoRole(name.clone()))?;
    ok(role_json(&name, r))
}

pub(super) async fn k8s_put_role(
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

pub(super) async fn k8s_delete_role(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "admin", &format!("auth/kubernetes/roles/{name}"))?;
    if !st.k8s.delete_role(&name).await? {
        return Err(crate::k8s_auth::K8sAuthError::NoRole(name).into());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Exchange a projected ServiceAccount token for a short-lived Keyward token (anonymous: the
/// JWT is the credential). Every outcome is audited with the identity the token claimed to be
/// (once verified) and the reason.
pub(super) async fn k8s_login(
    State(st): State<AppState>,
    axum::Extension(ctx): axum::Extension<Arc<AuditCtx>>,
    StrictJson(r): StrictJson<K8sLoginReq>,
) -> ApiResult {
    let resource = format!("auth/kubernetes/roles/{}", r.role);
    let (id, role) = match st.k8s.login_verbose(&*st.kms()?, &r.role, &r.jwt).await {
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
    v.token = Some(secret_text(token.expose()));
    v.identity = Some(K8sIdentity {
        namespace: id.namespace.clone(),
        service_account: id.service_account.clone(),
        pod: id.pod.as_ref().map(|p| p.0.clone()),
        pod_uid: id.pod.as_ref().map(|p| p.1.clone()),
        node: id.node.clone(),
    });
    ok(v)
}
