//! The `sys` routes: health, snapshot, metrics, the seal ceremonies (init, unseal, seal, rekey,
//! root rotation), audit information, the OpenAPI document.

use super::*;

/// `GET /v1/sys/snapshot` (`admin` on `sys/snapshot`): the whole store as one consistent file,
/// taken while the server serves. What is encrypted in the store stays encrypted: restoring it
/// needs the same unseal shares (or HSM key).
pub(super) async fn snapshot(State(st): State<AppState>, c: Caller) -> ApiResult {
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
pub(super) async fn metrics(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "read", "sys/metrics")?;
    Ok(([(axum::http::header::CONTENT_TYPE, keyward_metrics::CONTENT_TYPE)], st.metrics.text()).into_response())
}

/// `GET /v1/health`: always 200 (liveness) unless `?ready=true` is asked, which answers 503
/// while this server cannot serve: sealed, or behind other servers' changes for longer than its
/// staleness bound (a readiness probe then takes it out of the Service).
pub(super) async fn health(State(st): State<AppState>, StrictQuery(q): StrictQuery<HealthQuery>) -> ApiResult {
    let unsealed = st.sealing.unsealed();
    let ready = unsealed.as_ref().is_some_and(|u| u.kms.require_fresh().is_ok());
    let sealed = unsealed.is_none();
    // The seal details come from the store; while it is unreachable the process is still alive
    // (a restart would not help), so liveness stays 200 and only those details are missing.
    let seal_state = match st.sealing.status().await {
        Ok(s) => Some(SealState {
            initialized: s.initialized,
            stored_seal: s.stored_seal.map(str::to_string),
            migration_required: s.migration_required,
            hsm_key: s.hsm_key,
            insecure_seal: s.insecure_seal,
            shares: s.shares,
            threshold: s.threshold,
            progress: s.progress,
            rekey_in_progress: s.rekey_in_progress,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "health: the seal state cannot be read from the store");
            None
        }
    };
    let status = match &seal_state {
        Some(s) if !s.initialized => "uninitialized",
        _ if sealed => "sealed",
        _ if ready => "ok",
        _ => "stale",
    };
    let body = Health {
        status: status.to_string(),
        ready,
        sealed,
        seal: st.sealing.kind().as_str().to_string(),
        storage: st.sealing.storage_backend().to_string(),
        server_id: st.member.id.clone(),
        scheduler: st.member.runs_scheduler(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        storage_available: seal_state.is_some(),
        seal_state,
    };
    if q.ready && !ready {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response());
    }
    ok(body)
}

pub(super) fn shares_json(shares: &[keyward_crypto::SecretBytes]) -> Vec<SecretString> {
    shares.iter().map(|s| secret_text(s.expose())).collect()
}

pub(super) async fn sys_init(State(st): State<AppState>, StrictJson(r): StrictJson<InitReq>) -> ApiResult {
    let res = st.sealing.init(r.shares.unwrap_or(5), r.threshold.unwrap_or(3)).await?;
    tracing::warn!("initialised: the unseal (or recovery) shares and root token were returned once to the caller");
    Ok((
        StatusCode::CREATED,
        Json(InitResult {
            shares: shares_json(&res.shares),
            root_token: secret_text(res.root_token.expose()),
            seal: st.sealing.kind().as_str().to_string(),
            sealed: st.sealing.unsealed().is_none(),
        }),
    )
        .into_response())
}

pub(super) fn progress_json(p: keyward_seal::Progress) -> Progress {
    let done = Progress { complete: true, progress: None, threshold: None, sealed: None, shares: None };
    match p {
        keyward_seal::Progress::Need { have, threshold } => {
            Progress { complete: false, progress: Some(have), threshold: Some(threshold), ..done }
        }
        keyward_seal::Progress::Unsealed => Progress { sealed: Some(false), ..done },
        keyward_seal::Progress::Rekeyed(shares) => Progress { shares: Some(shares_json(&shares)), ..done },
    }
}

pub(super) async fn sys_unseal(State(st): State<AppState>, StrictJson(r): StrictJson<ShareReq>) -> ApiResult {
    ok(progress_json(st.sealing.submit_unseal_share(&r.share, r.migrate).await?))
}

pub(super) async fn sys_seal(State(st): State<AppState>, c: Caller, StrictJson(_): StrictJson<Empty>) -> ApiResult {
    allow(&st, &c, "admin", "sys/seal")?;
    st.sealing.seal().await?;
    ok(Sealed { sealed: true })
}

pub(super) async fn rekey_status(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    match st.sealing.rekey_status().await {
        Some((nonce, shares, threshold, progress)) => ok(RekeyStatus {
            in_progress: true,
            nonce: Some(nonce),
            shares: Some(shares),
            threshold: Some(threshold),
            progress: Some(progress),
        }),
        None => ok(RekeyStatus { in_progress: false, nonce: None, shares: None, threshold: None, progress: None }),
    }
}

pub(super) async fn rekey_start(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<InitReq>,
) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    let nonce = st.sealing.rekey_start(r.shares.unwrap_or(5), r.threshold.unwrap_or(3)).await?;
    ok(RekeyStarted { nonce })
}

pub(super) async fn rekey_cancel(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    ok(Cancelled { cancelled: st.sealing.rekey_cancel().await })
}

pub(super) async fn rekey_update(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<RekeyShareReq>,
) -> ApiResult {
    allow(&st, &c, "admin", "sys/rekey")?;
    ok(progress_json(st.sealing.rekey_submit(&r.nonce, &r.share).await?))
}

pub(super) async fn rotate_root(State(st): State<AppState>, c: Caller, StrictJson(_): StrictJson<Empty>) -> ApiResult {
    allow(&st, &c, "admin", "sys/rotate-root")?;
    let r = st.sealing.rotate_root().await?;
    ok(RootRotated { rotated: true, key_versions_rewrapped: r.key_versions, service_keys_rewrapped: r.service_keys })
}

pub(super) async fn audit_info(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "audit", "sys/audit")?;
    match st.sealing.unsealed().and_then(|u| u.audit.clone()) {
        Some(a) => {
            let h = a.head();
            let s = a.stats();
            let load = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
            let (records, batches, micros) = (load(&s.records), load(&s.batches), load(&s.write_micros));
            ok(AuditInfo {
                enabled: true,
                file: Some(a.file().display().to_string()),
                head: Some(AuditHead { seq: h.seq, hmac: h.hmac }),
                stats: Some(AuditStats {
                    records,
                    batches,
                    records_per_batch: if batches == 0 { 0.0 } else { records as f64 / batches as f64 },
                    write_and_sync_us_per_batch: micros.checked_div(batches).unwrap_or(0),
                }),
                key: Some(secret_b64(a.key().expose())),
            })
        }
        None => ok(AuditInfo { enabled: false, file: None, head: None, stats: None, key: None }),
    }
}

pub(super) async fn openapi(State(st): State<AppState>, c: Caller) -> ApiResult {
    allow(&st, &c, "read", "sys/openapi")?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
}
