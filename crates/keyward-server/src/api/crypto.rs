//! Cryptographic operations: encrypt, decrypt, re-encrypt, data keys, sign and verify, MACs,
//! random bytes.

use super::*;

pub(super) async fn encrypt(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<EncryptReq>,
) -> ApiResult {
    c.1.set_context(&r.context);
    allow(&st, &c, "encrypt", &format!("keys/{name}"))?;
    let pt = zeroize::Zeroizing::new(unb64("plaintext", &r.plaintext)?);
    let e = st.kms()?.encrypt(&name, &pt, &r.context).await?;
    ok(Ciphertext { ciphertext: b64(&e.ciphertext), key: e.key_name, key_version: e.key_version })
}

pub(super) async fn decrypt(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<DecryptReq>) -> ApiResult {
    decrypt_as(&st, &c, r).await.and_then(ok)
}

/// Decrypt as `c`: the operation the HTTP handler and attested releases share.
pub(crate) async fn decrypt_as(st: &AppState, c: &Caller, r: DecryptReq) -> Result<Plaintext, ApiError> {
    c.1.set_context(&r.context);
    let ct = unb64("ciphertext", &r.ciphertext)?;
    // Authorization is by the key named in the ciphertext header; the service re-checks it.
    let resource = key_resource_of(st, &ct).await?;
    allow(st, c, "decrypt", &resource)?;
    let d = st.kms()?.decrypt(&ct, &r.context).await?;
    Ok(Plaintext { plaintext: secret_b64(d.plaintext.expose()), key: d.key_name, key_version: d.key_version })
}

/// The resource a ciphertext is authorized against: the key named by its header. An unknown or
/// malformed header is `keys/?` (only a caller allowed to decrypt with every key gets past the
/// check, to then learn "decryption failed").
pub(super) async fn key_resource_of(st: &AppState, ciphertext: &[u8]) -> Result<String, ApiError> {
    Ok(match st.kms()?.key_name_of_ciphertext(ciphertext).await? {
        Some(name) => format!("keys/{name}"),
        None => "keys/?".to_string(),
    })
}

pub(super) async fn reencrypt(
    State(st): State<AppState>,
    c: Caller,
    StrictJson(r): StrictJson<ReencryptReq>,
) -> ApiResult {
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
    ok(Reencrypted {
        ciphertext: b64(&e.ciphertext),
        key: e.key_name.clone(),
        key_version: e.key_version,
        source_key: r.source_key,
        source_key_version: r.source_key_version,
    })
}

/// Generate a data key under `name` as `c`: the operation the HTTP handlers and attested
/// releases share.
pub(crate) async fn generate_data_key_as(
    st: &AppState,
    c: &Caller,
    name: &str,
    r: DataKeyReq,
    with_plaintext: bool,
) -> Result<DataKey, ApiError> {
    c.1.set_context(&r.context);
    allow(st, c, "generate-data-key", &format!("keys/{name}"))?;
    let dk = st.kms()?.generate_data_key(name, r.bytes, &r.context, with_plaintext).await?;
    Ok(DataKey {
        plaintext: dk.plaintext.as_ref().map(|p| secret_b64(p.expose())),
        ciphertext: b64(&dk.ciphertext),
        key: name.to_string(),
        key_version: dk.key_version,
    })
}

pub(super) async fn data_key(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<DataKeyReq>,
) -> ApiResult {
    generate_data_key_as(&st, &c, &name, r, true).await.and_then(ok)
}

pub(super) async fn data_key_without_plaintext(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<DataKeyReq>,
) -> ApiResult {
    generate_data_key_as(&st, &c, &name, r, false).await.and_then(ok)
}

pub(super) async fn sign(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<SignReq>,
) -> ApiResult {
    sign_as(&st, &c, &name, r).await.and_then(ok)
}

/// Sign with `name` as `c`: the operation the HTTP handler and attested releases share.
pub(crate) async fn sign_as(st: &AppState, c: &Caller, name: &str, r: SignReq) -> Result<Signature, ApiError> {
    allow(st, c, "sign", &format!("keys/{name}"))?;
    let (sig, v) = match (&r.message, &r.digest) {
        (Some(m), None) => st.kms()?.sign(name, &unb64("message", m)?).await?,
        (None, Some(d)) => st.kms()?.sign_digest(name, &unb64("digest", d)?).await?,
        _ => return Err(ApiError::invalid("give exactly one of message and digest (the message's SHA-256)")),
    };
    Ok(Signature { signature: b64(&sig), key: name.to_string(), key_version: v })
}

pub(super) async fn verify(
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
    ok(Validity { valid })
}

pub(super) async fn mac(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<MessageReq>,
) -> ApiResult {
    allow(&st, &c, "mac", &format!("keys/{name}"))?;
    let (m, v) = st.kms()?.mac(&name, &unb64("message", &r.message)?).await?;
    ok(Mac { mac: b64(&m), key: name, key_version: v })
}

pub(super) async fn verify_mac(
    State(st): State<AppState>,
    c: Caller,
    KeyName(name): KeyName,
    StrictJson(r): StrictJson<VerifyMacReq>,
) -> ApiResult {
    allow(&st, &c, "verify-mac", &format!("keys/{name}"))?;
    let valid = st.kms()?.verify_mac(&name, &unb64("message", &r.message)?, &unb64("mac", &r.mac)?).await?;
    ok(Validity { valid })
}

pub(super) async fn random(State(st): State<AppState>, c: Caller, StrictJson(r): StrictJson<RandomReq>) -> ApiResult {
    allow(&st, &c, "random", "sys/random")?;
    let b = st.kms()?.random(r.bytes)?;
    ok(Random { bytes: secret_b64(b.expose()) })
}
