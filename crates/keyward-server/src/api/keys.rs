//! Keys: create, list, describe, update, aliases, and the lifecycle (enable, disable, rotate,
//! rotation policy, scheduled deletion).

use super::*;

pub(super) async fn create_key(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<CreateKeyReq>,
) -> ApiResult {
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
    Ok((StatusCode::CREATED, Json(key_described(&d))).into_response())
}

pub(super) async fn list_keys(
    State(st): State<AppState>,
    c: Caller,
    StrictQuery(q): StrictQuery<PageQuery>,
) -> ApiResult {
    allow(&st, &c, "list", "keys/")?;
    let (page, next) = st.kms()?.list_keys(q.after.as_deref(), q.limit).await?;
    ok(KeyList { keys: page.iter().map(key_out).collect(), next })
}

pub(super) async fn describe_key(State(st): State<AppState>, c: Caller, KeyName(name): KeyName) -> ApiResult {
    allow(&st, &c, "read", &format!("keys/{name}"))?;
    ok(key_described(&st.kms()?.describe_key(&name).await?))
}

/// `PATCH /v1/keys/{name}`: change what can change in place (the description).
pub(super) async fn update_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<UpdateKeyReq>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.set_key_description(&name, &r.description).await?)
}

pub(super) async fn list_aliases(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "list", "keys/")?;
    let aliases = st.kms()?.aliases().await?.into_iter().map(|(alias, key)| AliasEntry { alias, key }).collect();
    ok(AliasList { aliases })
}

/// `PUT /v1/aliases/{name}`: point `alias/NAME` at a key (`admin` on that key, and on the key
/// it named before).
pub(super) async fn set_alias(
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
    ok(AliasSet { alias, key: r.key, previous })
}

/// `DELETE /v1/aliases/{name}` (`admin` on the key it names).
pub(super) async fn delete_alias(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
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
    ok(AliasDeleted { alias, deleted: true, key })
}

pub(super) async fn key_admin(st: &AppState, c: &Caller, name: &str) -> Result<(), ApiError> {
    allow(st, c, "admin", &format!("keys/{name}"))
}

pub(super) fn key_json(d: &keyward_core::service::KeyDescription) -> ApiResult {
    ok(key_described(d))
}

pub(super) async fn enable_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.enable_key(&name).await?)
}

pub(super) async fn disable_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.disable_key(&name).await?)
}

pub(super) async fn rotate_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.rotate_key(&name).await?)
}

pub(super) async fn rotation_policy(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<RotationPolicyReq>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    let secs = r.rotate_every.as_deref().map(|s| parse_period("rotate_every", s)).transpose()?;
    key_json(&st.kms()?.set_rotation(&name, secs).await?)
}

pub(super) async fn schedule_deletion(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<ScheduleDeletionReq>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.schedule_deletion(&name, r.pending_days).await?)
}

pub(super) async fn cancel_deletion(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(_): StrictJson<Empty>,
) -> ApiResult {
    key_admin(&st, &c, &name).await?;
    key_json(&st.kms()?.cancel_deletion(&name).await?)
}
