//! Attested releases: a joined agent's signed request (one, or a batch) runs one operation as the
//! workload it attested, through the same typed operation as that operation's HTTP route, and
//! the answer goes back sealed to the workload's HPKE key.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Workload {
    pub(crate) selectors: Vec<String>,
    #[serde(default)]
    pub(crate) pid: Option<u32>,
}

/// The operations a workload can ask for through its agent.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub(super) enum ReleaseOp {
    ReadSecret { path: String, version: Option<u32> },
    GenerateDataKey { key: String, body: Value },
    Decrypt { body: Value },
    Sign { key: String, body: Value },
    Randomized { name: String },
}

impl ReleaseOp {
    /// Refuse names a secret path or key name cannot have (the same rules as the routes these
    /// operations also have: no empty, `.` or `..` segment; keys and randomized secrets are one
    /// segment).
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 512
                && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
        };
        let bad = |what: &str| Err(ApiError::invalid(format!("{what} contains characters a name cannot have")));
        match self {
            Self::ReadSecret { path, .. } if !name_ok(path) => bad("path"),
            Self::GenerateDataKey { key, .. } | Self::Sign { key, .. } if !name_ok(key) || key.contains('/') => {
                bad("key")
            }
            Self::Randomized { name } if !name_ok(name) || name.contains('/') => bad("name"),
            _ => Ok(()),
        }
    }

    /// Run the operation as `c` (the workload), through the same typed operation its HTTP
    /// route runs: same authorization, same audit facts, same answer, encoded as that route's
    /// JSON answer (wiped on drop: it holds what is released).
    pub(crate) async fn run(&self, st: &AppState, c: &Caller) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
        self.check()?;
        // Bodies are read as strictly, and within the same size, as a request's body is.
        fn body<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
            let bytes = serde_json::to_vec(v).map_err(|e| ApiError::internal(e.to_string()))?;
            if bytes.len() > MAX_BODY {
                return Err(crate::extract::body_too_large());
            }
            crate::extract::parse_json(&bytes)
        }
        fn encode<T: serde::Serialize>(answer: T) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
            serde_json::to_vec(&answer)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| ApiError::internal(format!("encoding the released answer: {e}")))
        }
        match self {
            Self::ReadSecret { path, version } => encode(crate::api::read_secret_as(st, c, path, *version).await?),
            // `check` refused a `/` in key names, so an alias (`alias/NAME`) never gets here.
            Self::GenerateDataKey { key, body: b } => {
                encode(crate::api::generate_data_key_as(st, c, key, body(b)?, true).await?)
            }
            Self::Sign { key, body: b } => encode(crate::api::sign_as(st, c, key, body(b)?).await?),
            Self::Decrypt { body: b } => encode(crate::api::decrypt_as(st, c, body(b)?).await?),
            Self::Randomized { name } => encode(crate::api::randomized_value_as(st, c, name).await?),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleaseReq {
    pub(crate) nonce: String,
    pub(crate) public_key: String,
    pub(crate) workload: Workload,
    /// The workload's ephemeral X25519 public key, base64.
    pub(crate) recipient: String,
    pub(crate) op: ReleaseOp,
}

/// One release of a batch: a single release without the agent's key (given once per batch).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleaseItem {
    pub(crate) nonce: String,
    pub(crate) workload: Workload,
    pub(crate) recipient: String,
    pub(crate) op: ReleaseOp,
}

/// `POST /v1/agent/releases`: up to [`MAX_BATCH`] releases, signed once.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleaseBatchReq {
    pub(crate) public_key: String,
    pub(crate) releases: Vec<ReleaseItem>,
}

/// Largest batch body: a full batch of the largest single releases.
pub(super) const MAX_BATCH_BODY: usize = MAX_BODY * 4;

/// Parse the agent request bodies from untrusted bytes (fuzzing and property tests); for a
/// release that parses, also form its inner request. Returns how many parsed.
pub(crate) fn parse_agent_requests(data: &[u8]) -> usize {
    let mut n = usize::from(serde_json::from_slice::<JoinTokenReq>(data).is_ok())
        + usize::from(serde_json::from_slice::<NonceReq>(data).is_ok())
        + usize::from(serde_json::from_slice::<JoinReq>(data).is_ok());
    let check = |op: &ReleaseOp| {
        // Whatever passes the check is a name the routes also accept: no segment that
        // normalisation would rewrite, nothing outside the name alphabet.
        if op.check().is_ok() {
            let name = match op {
                ReleaseOp::ReadSecret { path, .. } => path.as_str(),
                ReleaseOp::GenerateDataKey { key, .. } | ReleaseOp::Sign { key, .. } => key.as_str(),
                ReleaseOp::Randomized { name } => name.as_str(),
                ReleaseOp::Decrypt { .. } => "",
            };
            assert!(!name.split('/').any(|p| p == ".." || p == "."), "{name}");
        }
    };
    if let Ok(r) = serde_json::from_slice::<ReleaseReq>(data) {
        n += 1;
        check(&r.op);
    }
    if let Ok(b) = serde_json::from_slice::<ReleaseBatchReq>(data) {
        n += 1;
        b.releases.iter().for_each(|r| check(&r.op));
    }
    n
}

pub(super) fn unauthenticated(msg: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", msg.to_string())
}

/// A joined agent's node and its request body (at most `limit` bytes, strict JSON). The
/// signature is checked over the raw body afterwards ([`check_proof`]).
pub(super) fn agent_body<T: serde::de::DeserializeOwned>(
    c: &Caller,
    body: &[u8],
    limit: usize,
) -> Result<(String, T), ApiError> {
    let node = agent_node(c)?;
    if body.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("release request larger than {limit} bytes"),
        ));
    }
    Ok((node, crate::extract::parse_json(body)?))
}

/// The agent's proof of possession: `context || body` signed with the key its token is bound to.
pub(super) fn check_proof(
    c: &Caller,
    headers: &HeaderMap,
    public_key: &str,
    context: &[u8],
    body: &[u8],
) -> Result<(), ApiError> {
    let pk = unb64("public_key", public_key)?;
    let bound = selector_value(&c.0, AGENT_KEY_SELECTOR).unwrap_or_default();
    if hex::encode(keyward_crypto::hash::sha256(&pk)) != bound {
        c.1.set_decision("release", "agents", false, "public key is not the one this agent joined with".into());
        return Err(unauthenticated("the agent key does not match the agent token"));
    }
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| unb64(SIGNATURE_HEADER, s))
        .transpose()?
        .ok_or_else(|| unauthenticated("a release must be signed (keyward-agent-signature header)"))?;
    let mut signed = context.to_vec();
    signed.extend_from_slice(body);
    if keyward_crypto::keys::verify_ed25519_raw(&pk, &signed, &sig).is_err() {
        c.1.set_decision("release", "agents", false, "bad agent signature".into());
        return Err(unauthenticated("the release signature does not verify"));
    }
    Ok(())
}

/// What a release produced: the answer sealed to the workload (a refusal is an [`ApiError`]).
pub(super) struct Released(keyward_api::SealedRelease);

impl IntoResponse for Released {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

/// One release, after the agent's proof was checked: the nonce, the workload's selectors, the
/// operation run as the workload (its decision lands in `ctx`), and the seal.
pub(super) async fn run_release(
    st: &AppState,
    node: &str,
    agent: &str,
    item: ReleaseItem,
    ctx: Arc<AuditCtx>,
) -> Result<Released, ApiError> {
    let nonce = unb64("nonce", &item.nonce)?;
    if !st.agents.take(&nonce, agent) {
        ctx.set_decision("release", "agents", false, "nonce unknown, used, expired or another agent's".into());
        return Err(unauthenticated("the nonce is unknown, already used or expired; get a fresh one"));
    }
    let recipient = unb64("recipient", &item.recipient)?;
    if recipient.len() != keyward_crypto::hpke::KEY_LEN {
        return Err(ApiError::invalid("recipient must be a raw 32-byte X25519 public key, base64"));
    }

    // The workload's identity: what the agent measured (only `unix:` and `k8s:` selectors, and
    // `exec:` for the program a trusted launcher will exec), plus the node this agent proved it is.
    let w = &item.workload;
    if w.selectors.len() > MAX_WORKLOAD_SELECTORS {
        return Err(ApiError::invalid(format!("at most {MAX_WORKLOAD_SELECTORS} workload selectors")));
    }
    if let Some(bad) =
        w.selectors.iter().find(|s| !selector_ok(s) || !["unix:", "k8s:", "exec:"].iter().any(|p| s.starts_with(p)))
    {
        return Err(ApiError::invalid(format!(
            "workload selector {bad:?} is not a well-formed unix:, k8s: or exec: selector"
        )));
    }
    let mut selectors = w.selectors.clone();
    selectors.push(format!("{NODE_SELECTOR}{node}"));
    selectors.sort();
    selectors.dedup();
    item.op.check()?;
    let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
    let display = format!("workload pid {pid} on {node} via {agent}");
    let record = TokenRecord::ephemeral(format!("workload_{node}_{pid}"), display, selectors);

    // The operation runs as the workload, through the same typed operation as its route. Its
    // authorization decision lands in this release's audit context, so one record says who
    // the workload was, on which node, through which agent, and what was decided. Errors
    // carry no secret: they go to the caller's error rendering and audit as they are.
    ctx.set_identity(&format!("{} [{}]", record.display_name, record.selectors.join(" ")));
    let caller = Caller(Arc::new(record), ctx);
    let bytes = item.op.run(st, &caller).await?;
    if bytes.len() > MAX_RELEASE_RESPONSE {
        return Err(ApiError::internal("the released response is too large to seal".into()));
    }
    let sealed = keyward_crypto::hpke::seal(&recipient, RELEASE_INFO, &nonce, &bytes)
        .map_err(|_| ApiError::invalid("recipient is not a usable X25519 public key"))?;
    Ok(Released(keyward_api::SealedRelease {
        status: 200,
        suite: keyward_crypto::hpke::SUITE.to_string(),
        nonce: item.nonce.clone(),
        enc: b64(&sealed.enc),
        ciphertext: b64(&sealed.ciphertext),
    }))
}

/// `POST /v1/agent/release`: one release, signed on its own (agents before batching).
pub(crate) async fn release(
    State(st): State<AppState>,
    c: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (node, r) = agent_body::<ReleaseReq>(&c, &body, MAX_BODY)?;
    check_proof(&c, &headers, &r.public_key, PROOF_CONTEXT, &body)?;
    let item = ReleaseItem { nonce: r.nonce, workload: r.workload, recipient: r.recipient, op: r.op };
    let resp = match run_release(&st, &node, &c.0.accessor, item, c.1.clone()).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    st.metrics.release(resp.status().as_u16());
    Ok(resp)
}

/// `POST /v1/agent/releases`: a batch of releases, signed once. Each release is a request of
/// its own in every other respect: its own nonce, decision, live-instance places and audit
/// record (durable before the batch's answer leaves), and its own status in the answer,
/// `{"results": [{"status": N, "body": {...}}, ...]}` in the order asked. The batch itself
/// leaves one more record, for the agent.
pub(crate) async fn release_batch(
    State(st): State<AppState>,
    c: Caller,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (node, r) = agent_body::<ReleaseBatchReq>(&c, &body, MAX_BATCH_BODY)?;
    if r.releases.is_empty() || r.releases.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!("a batch holds from 1 to {MAX_BATCH} releases")));
    }
    check_proof(&c, &headers, &r.public_key, BATCH_PROOF_CONTEXT, &body)?;
    let unsealed = st.sealing.unsealed().ok_or_else(crate::api::sealed_error)?;
    let n = r.releases.len();
    c.1.set_decision(
        "release-batch",
        &format!("agents/{node}"),
        true,
        format!("{n} release{}", if n == 1 { "" } else { "s" }),
    );
    let agent = c.0.accessor.clone();
    // The first release runs in this task, the others as tasks of their own (in parallel).
    let mut items = r.releases.into_iter().enumerate();
    let first = items.next();
    let rest: Vec<_> = items
        .map(|(i, item)| {
            let (st, node, agent, unsealed) = (st.clone(), node.clone(), agent.clone(), unsealed.clone());
            let (ctx, id) = (c.1.part(), format!("{}.{i}", id.0));
            tokio::spawn(async move { batch_part(&st, &node, &agent, &unsealed, item, ctx, &id).await })
        })
        .collect();
    // The batch's own record goes to the log beside its releases' records (one group commit,
    // not one after the other). Its answer is 200 whatever each release's status is.
    let own_record = async {
        match unsealed.audit.as_deref() {
            Some(audit) => audit.append(c.1.record(&id.0, "POST", BATCH_ITEM_PATH, 200, None)).await,
            None => Ok(()),
        }
    };
    let releases = async {
        let mut answers = Vec::with_capacity(n);
        if let Some((i, item)) = first {
            let ctx = c.1.part();
            answers.push(Some(batch_part(&st, &node, &agent, &unsealed, item, ctx, &format!("{}.{i}", id.0)).await));
        }
        for t in rest {
            // A release that panicked: nothing of it leaves.
            answers.push(t.await.ok());
        }
        answers
    };
    let (own_record, answers) = tokio::join!(own_record, releases);
    if let Err(e) = own_record {
        tracing::error!(request_id = %id.0, error = %e, "audit record of a release batch not written; refusing it");
        return Err(crate::api::audit_unavailable_error());
    }
    c.1.mark_recorded();
    let out = batch_answer(answers);
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// The batch's answer body, `{"results": [{"status": N, "body": {...}}, ...]}`, from each
/// release's status and body in the order asked (a release that failed to run or to encode: a
/// 500 of its own).
fn batch_answer(answers: Vec<Option<(u16, Result<Bytes, axum::Error>)>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(answers.len() * 512);
    out.extend_from_slice(br#"{"results":["#);
    for (i, answer) in answers.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match answer {
            Some((status, Ok(bytes))) => {
                out.extend_from_slice(format!(r#"{{"status":{status},"body":"#).as_bytes());
                out.extend_from_slice(&bytes);
                out.push(b'}');
            }
            _ => out.extend_from_slice(
                br#"{"status":500,"body":{"error":{"code":"internal","message":"the release failed"}}}"#,
            ),
        }
    }
    out.extend_from_slice(b"]}");
    out
}

/// One release of a batch, run and concluded (instance places, audit record) as a request of
/// its own: its status and answer body.
pub(super) async fn batch_part(
    st: &AppState,
    node: &str,
    agent: &str,
    unsealed: &keyward_seal::Unsealed,
    item: ReleaseItem,
    ctx: AuditCtx,
    id: &str,
) -> (u16, Result<Bytes, axum::Error>) {
    let ctx = Arc::new(ctx);
    let resp = match run_release(st, node, agent, item, ctx.clone()).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    let resp =
        crate::api::conclude(Some(unsealed), unsealed.audit.as_deref(), &ctx, id, "POST", BATCH_ITEM_PATH, resp).await;
    let status = resp.status().as_u16();
    st.metrics.release(status);
    (status, axum::body::to_bytes(resp.into_body(), MAX_RELEASE_RESPONSE).await)
}

/// The path each release of a batch is audited under.
pub(super) const BATCH_ITEM_PATH: &str = keyward_api::routes::AGENT_RELEASES;
