//! Tokens, policies and authorization: who am I, create, list, look up, renew and revoke tokens;
//! put, get, list and delete policies; dry runs of a decision.

use super::*;

pub(super) fn token_json(t: &keyward_core::model::TokenRecord) -> Token {
    Token {
        token: None,
        accessor: t.accessor.clone(),
        policies: t.policies.clone(),
        display_name: t.display_name.clone(),
        created_at: time(t.created_at),
        expires_at: t.expires_at.map(time),
        ttl: t.ttl_secs.map(format_period),
        max_uses: t.max_uses,
        uses: t.uses,
        parent: t.parent.clone(),
        selectors: t.selectors.clone(),
        max_expires_at: t.max_expires_at.map(time),
        kind: if t.is_stored() { "token" } else { "certificate" }.to_string(),
        effective: None,
        identity: None,
    }
}

/// Refuse token self-service to identities that have no token (client certificates).
pub(super) fn stored_token(c: &Caller) -> Result<(), ApiError> {
    if c.0.is_stored() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "this identity is a client certificate, not a token: there is nothing to renew or revoke",
        ))
    }
}

pub(super) async fn whoami(State(st): State<AppState>, c: Caller) -> ApiResult {
    c.1.set_decision("whoami", "auth/self", true, "every identity may see itself".into());
    let kms = st.kms()?;
    let grants = kms
        .effective_policies(&c.0)?
        .into_iter()
        .map(|(policy, set)| {
            let via = match set {
                None => PolicyVia::Token("token".into()),
                Some(identity_set) => PolicyVia::IdentitySet { identity_set },
            };
            let (grants, missing) = match kms.get_policy(&policy) {
                Ok(pol) => (pol.summary(&c.0.selectors).into_iter().collect(), false),
                Err(_) if policy == keyward_core::policy::ROOT_POLICY => (vec!["* on *".to_string()], false),
                Err(_) => (vec![], true),
            };
            EffectivePolicy { policy, via, grants, missing }
        })
        .collect();
    let mut v = token_json(&c.0);
    v.effective = Some(grants);
    ok(v)
}

pub(super) async fn token_create(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<TokenCreateReq>,
) -> ApiResult {
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
    v.token = Some(secret_text(token.expose()));
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Authorize `op` on another token: `op` on `auth/token`, and for a token outside the caller's
/// subtree (not created from it), also `admin` on `auth/token`.
pub(super) async fn allow_on_token(st: &AppState, c: &Caller, op: &str, accessor: &str) -> Result<(), ApiError> {
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
pub(super) async fn token_list(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "auth/token")?;
    // Seeing every token needs what acting on every token needs (not audited as a decision of
    // its own: the request's decision is `list`).
    let all = st.kms()?.authorize(&c.0, "admin", "auth/token").is_ok();
    let tokens = st.kms()?.list_tokens(&c.0, all).await?;
    let tokens = tokens.iter().map(|t| token_json(t)).collect();
    ok(TokenList { tokens, scope: if all { "all" } else { "subtree" }.to_string() })
}

pub(super) async fn token_lookup(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<AccessorReq>,
) -> ApiResult {
    allow_on_token(&st, &c, "read", &r.accessor).await?;
    let t = st.kms()?.lookup_token(&r.accessor).await?;
    ok(token_json(&t))
}

pub(super) async fn token_renew(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<AccessorReq>,
) -> ApiResult {
    allow_on_token(&st, &c, "write", &r.accessor).await?;
    let t = st.kms()?.renew_token(&r.accessor).await?;
    ok(token_json(&t))
}

pub(super) async fn token_renew_self(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    stored_token(&c)?;
    c.1.set_decision("renew", "auth/self", true, "every token may renew itself".into());
    let t = st.kms()?.renew_token(&c.0.accessor).await?;
    ok(token_json(&t))
}

pub(super) async fn token_revoke(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<AccessorReq>,
) -> ApiResult {
    allow_on_token(&st, &c, "write", &r.accessor).await?;
    ok(Revoked { revoked: st.kms()?.revoke_token(&r.accessor).await? })
}

pub(super) async fn token_revoke_self(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    stored_token(&c)?;
    c.1.set_decision("revoke", "auth/self", true, "every token may revoke itself".into());
    ok(Revoked { revoked: st.kms()?.revoke_token(&c.0.accessor).await? })
}

pub(super) async fn list_policies(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "policies/")?;
    ok(PolicyList { policies: st.kms()?.list_policies() })
}

pub(super) async fn get_policy(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "read", &format!("policies/{name}"))?;
    if name == keyward_core::policy::ROOT_POLICY {
        return ok(Policy {
            name: name.clone(),
            description: "built in: every operation on every resource".into(),
            identities: vec![],
            rules: vec![PolicyRule {
                resources: vec!["*".into()],
                operations: vec!["*".into()],
                require: vec![],
                max_instances: None,
                instance_hold_secs: None,
            }],
        });
    }
    ok(policy_out(&*st.kms()?.get_policy(&name)?))
}

pub(super) async fn put_policy(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    StrictJson(r): StrictJson<PolicyReq>,
) -> ApiResult {
    allow(&st, &c, "admin", &format!("policies/{name}"))?;
    st.kms()?.put_policy(policy_in(&name, r)).await?;
    ok(policy_out(&*st.kms()?.get_policy(&name)?))
}

pub(super) async fn delete_policy(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    allow(&st, &c, "admin", &format!("policies/{name}"))?;
    st.kms()?.delete_policy(&name).await?;
    ok(PolicyDeleted { deleted: name })
}

/// Dry run: would a token (by accessor) or a set of policies be allowed `operation` on `resource`?
pub(super) async fn dry_run(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<DryRunReq>) -> ApiResult {
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
        Ok(grant) => Decision { allowed: true, grant: Some(grant), reason: None, policies, selectors },
        Err(e) => Decision { allowed: false, grant: None, reason: Some(e.to_string()), policies, selectors },
    })
}
