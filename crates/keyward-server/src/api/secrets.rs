//! Secrets (versioned key/value, check-and-set) and randomized secrets.

use super::*;

pub(super) async fn list_secrets(
    State(st): State<AppState>,
    c: Caller,
    StrictQuery(q): StrictQuery<SecretListQuery>,
) -> ApiResult {
    allow(&st, &c, "list", &format!("secrets/{}", q.prefix))?;
    let (paths, next) = st.kms()?.list_secrets(&q.prefix, q.after.as_deref(), q.limit).await?;
    ok(SecretList { paths, next })
}

/// The workload identity a randomized value belongs to, most general first: a Kubernetes
/// ServiceAccount (all its pods share it, however they authenticate), a client certificate, the
/// program a launcher started (`exec:sha256`), an attested process (uid and executable digest),
/// or else a stored token itself.
pub(super) fn randomized_identity(t: &keyward_core::model::TokenRecord) -> Result<String, ApiError> {
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

pub(super) async fn randomized_define(
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

pub(super) fn randomized_json(name: &str, spec: &keyward_core::random::RandomSpec) -> RandomizedDefinition {
    use keyward_core::random::RandomKind;
    RandomizedDefinition {
        name: name.to_string(),
        kind: match spec.kind {
            RandomKind::Password => "password",
            RandomKind::ApiKey => "api-key",
            RandomKind::Bytes => "bytes",
        }
        .to_string(),
        length: spec.length,
        alphabet: spec.alphabet.clone(),
        ttl: format_period(spec.ttl_secs),
        grace: format_period(spec.grace_secs),
    }
}

pub(super) async fn randomized_definition(
    State(st): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult {
    allow(&st, &c, "list", &format!("randomized/{name}"))?;
    let spec = st.kms()?.random_definition(&name).await?;
    ok(randomized_json(&name, &spec))
}

pub(super) async fn randomized_value(State(st): State<AppState>, c: Caller, Path(name): Path<String>) -> ApiResult {
    randomized_value_as(&st, &c, &name).await.and_then(ok)
}

/// The randomized secret `name` of `c`'s workload identity: the operation the HTTP handler and
/// attested releases share.
pub(crate) async fn randomized_value_as(st: &AppState, c: &Caller, name: &str) -> Result<RandomizedValue, ApiError> {
    allow(st, c, "read", &format!("randomized/{name}"))?;
    let identity = randomized_identity(&c.0)?;
    let v = st.kms()?.random_value(name, &identity, keyward_core::now_unix()).await?;
    Ok(RandomizedValue {
        name: name.to_string(),
        identity,
        value: zeroize::Zeroizing::new(v.value.as_str().to_string()),
        version: v.version,
        created_at: time(v.created_at),
        rotates_at: time(v.rotates_at),
        previous: v.previous.as_ref().map(|(prev, until)| PreviousValue {
            value: zeroize::Zeroizing::new(prev.as_str().to_string()),
            valid_until: time(*until),
        }),
    })
}

pub(super) async fn get_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictQuery(q): StrictQuery<VersionQuery>,
) -> ApiResult {
    read_secret_as(&st, &c, &path, q.version).await.and_then(ok)
}

/// Read a secret as `c`: the operation the HTTP handler and attested releases share.
pub(crate) async fn read_secret_as(
    st: &AppState,
    c: &Caller,
    path: &str,
    version: Option<u32>,
) -> Result<Secret, ApiError> {
    allow(st, c, "read", &format!("secrets/{path}"))?;
    let s = st.kms()?.get_secret(path, version).await?;
    Ok(Secret {
        path: path.to_string(),
        version: s.version,
        created_at: time(s.created_at),
        data: s.data.expose().iter().map(|(k, v)| (k.clone(), zeroize::Zeroizing::new(v.clone()))).collect(),
    })
}

pub(super) async fn put_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<PutSecretReq>,
) -> ApiResult {
    allow(&st, &c, "write", &format!("secrets/{path}"))?;
    let data = SecretData::new(r.data)?;
    let version = st.kms()?.put_secret(&path, data, r.cas).await?;
    ok(SecretWritten { path, version })
}

pub(super) async fn secret_metadata(State(st): State<AppState>, c: Caller, Path(path): Path<String>) -> ApiResult {
    allow(&st, &c, "read", &format!("secrets/{path}"))?;
    let (meta, versions) = st.kms()?.secret_versions(&path).await?;
    ok(SecretMetadata {
        path: meta.path,
        current_version: meta.current_version,
        created_at: time(meta.created_at),
        updated_at: time(meta.updated_at),
        versions: versions.iter().map(secret_version_out).collect(),
    })
}

pub(super) async fn delete_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<VersionsReq>,
) -> ApiResult {
    allow(&st, &c, "write", &format!("secrets/{path}"))?;
    ok(Changed { changed: st.kms()?.delete_secret(&path, &r.versions).await? })
}

pub(super) async fn undelete_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<VersionsReq>,
) -> ApiResult {
    allow(&st, &c, "write", &format!("secrets/{path}"))?;
    ok(Changed { changed: st.kms()?.undelete_secret(&path, &r.versions).await? })
}

pub(super) async fn destroy_secret(
    State(st): State<AppState>,
    c: Caller,
    Path(path): Path<String>,
    StrictJson(r): StrictJson<VersionsReq>,
) -> ApiResult {
    allow(&st, &c, "destroy", &format!("secrets/{path}"))?;
    ok(Changed { changed: st.kms()?.destroy_secret(&path, &r.versions).await? })
}
