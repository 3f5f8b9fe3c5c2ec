//! The gRPC `v2.KeyManagementService`: request validation, caller checks, status probing,
//! auditing and the outage cache around a [`Kek`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward_audit::{AuditLog, AuditRecord};
use tonic::{Request, Response, Status};

use crate::caller::Caller;
use crate::kek::{Kek, KekError, OutageCache, Unwrapped};
use crate::keyid::KeyRef;
use crate::proto;
use crate::proto::key_management_service_server::KeyManagementService;

/// The API version reported by `Status`.
pub const API_VERSION: &str = "v2";
/// The largest ciphertext and `key_id` the apiserver accepts (bytes).
pub const MAX_CIPHERTEXT: usize = 1024;
/// The largest `key_id` (bytes).
pub const MAX_KEY_ID: usize = 1024;
/// Annotation keys plus values, at most (bytes).
pub const MAX_ANNOTATIONS: usize = 32 * 1024;
/// The plaintext `Encrypt` accepts: the apiserver's 32-byte seed (or, before 1.29, DEK).
pub const SEED_LEN: usize = 32;
/// The largest `uid` kept in audit records (longer ones are cut).
const MAX_UID: usize = 128;
/// How long a failed status probe is remembered.
const FAILED_PROBE_TTL: Duration = Duration::from_secs(1);

/// Plugin settings.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    /// How long a successful status probe is remembered.
    pub status_cache: Duration,
    /// Service mode: keep answering Decrypt from memory through an outage, for this long after
    /// a seed was last obtained from the server (zero: never).
    pub outage_window: Duration,
    /// Most seeds remembered for outages.
    pub outage_max_entries: usize,
}

impl Default for PluginSettings {
    fn default() -> Self {
        Self {
            status_cache: Duration::from_secs(5),
            outage_window: Duration::from_secs(600),
            outage_max_entries: 100_000,
        }
    }
}

#[derive(Debug)]
struct Probe {
    at: Instant,
    result: Result<KeyRef, String>,
}

/// The plugin service.
#[derive(Debug)]
pub struct Plugin {
    kek: Kek,
    audit: Arc<AuditLog>,
    settings: PluginSettings,
    outage: Option<OutageCache>,
    probe: tokio::sync::Mutex<Option<Probe>>,
    /// The last key_id a successful probe reported.
    last_key: std::sync::Mutex<Option<KeyRef>>,
    metrics: Arc<keyward_metrics::Calls>,
}

fn status_of(e: &KekError) -> Status {
    match e {
        KekError::Unavailable(m) => Status::unavailable(m.clone()),
        KekError::DecryptionFailed => Status::invalid_argument("decryption failed"),
        KekError::Refused { kind, message } => Status::new(kind.grpc_code(), message.clone()),
        KekError::Internal(_) => Status::internal("internal error; see the plugin's log"),
    }
}

fn short(reason: &str) -> String {
    let mut s: String = reason.chars().take(200).collect();
    if s.len() < reason.len() {
        s.push('…');
    }
    s
}

/// Check the annotations of a `Decrypt` (or of what we would return): keys are fully qualified
/// domain names (RFC 1123, two labels or more), keys plus values at most 32 KiB.
pub fn validate_annotations(a: &HashMap<String, Vec<u8>>) -> Result<(), String> {
    let mut total = 0usize;
    for (k, v) in a {
        total = total.saturating_add(k.len()).saturating_add(v.len());
        if !is_fqdn(k) {
            return Err(format!(
                "annotation key {:?} is not a fully qualified domain name",
                k.chars().take(64).collect::<String>()
            ));
        }
    }
    if total > MAX_ANNOTATIONS {
        return Err(format!("annotations total {total} bytes; the limit is {MAX_ANNOTATIONS}"));
    }
    Ok(())
}

fn is_fqdn(s: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    s.len() <= 253 && s.split('.').count() >= 2 && s.split('.').all(label)
}

/// Validate a `Decrypt` request and return the key version it names.
pub fn check_decrypt(r: &proto::DecryptRequest) -> Result<KeyRef, Status> {
    if r.ciphertext.is_empty() || r.ciphertext.len() > MAX_CIPHERTEXT {
        return Err(Status::invalid_argument(format!(
            "ciphertext must be 1 to {MAX_CIPHERTEXT} bytes, got {}",
            r.ciphertext.len()
        )));
    }
    if r.key_id.is_empty() || r.key_id.len() > MAX_KEY_ID {
        return Err(Status::invalid_argument(format!("key_id must be 1 to {MAX_KEY_ID} bytes")));
    }
    validate_annotations(&r.annotations).map_err(Status::invalid_argument)?;
    if !r.annotations.is_empty() {
        return Err(Status::invalid_argument("annotations were not issued by this plugin (it issues none)"));
    }
    let key = KeyRef::parse(&r.key_id).ok_or_else(|| {
        Status::not_found("key_id was not issued by this plugin; it decrypts only keyward:NAME:ID:vN key ids")
    })?;
    if KeyRef::of_ciphertext(&key.name, &r.ciphertext).as_ref() != Some(&key) {
        return Err(Status::invalid_argument("decryption failed"));
    }
    Ok(key)
}

/// Validate an `Encrypt` request.
pub fn check_encrypt(r: &proto::EncryptRequest) -> Result<(), Status> {
    if r.plaintext.len() != SEED_LEN {
        return Err(Status::invalid_argument(format!(
            "plaintext must be the apiserver's {SEED_LEN}-byte seed, got {} bytes",
            r.plaintext.len()
        )));
    }
    Ok(())
}

fn uid_of(uid: &str) -> String {
    let u: String = uid.chars().filter(|c| c.is_ascii_graphic()).take(MAX_UID).collect();
    if u.is_empty() { "-".into() } else { u }
}

impl Plugin {
    /// A plugin over `kek`, auditing to `audit`.
    pub fn new(kek: Kek, audit: Arc<AuditLog>, settings: PluginSettings) -> Self {
        let outage = matches!(kek, Kek::Service(_))
            .then(|| OutageCache::new(settings.outage_window, settings.outage_max_entries));
        Self {
            kek,
            audit,
            settings,
            outage,
            probe: tokio::sync::Mutex::new(None),
            last_key: std::sync::Mutex::new(None),
            metrics: Arc::new(keyward_metrics::Calls::new(
                "keyward_kms_plugin",
                "KMS v2 calls from kube-apiserver, by method and gRPC status (PermissionDenied: a caller refused)",
            )),
        }
    }

    /// The plugin's metrics.
    pub fn metrics(&self) -> Arc<keyward_metrics::Calls> {
        self.metrics.clone()
    }

    /// The backend.
    pub fn kek(&self) -> &Kek {
        &self.kek
    }

    /// A real wrap/unwrap round trip with the current key version.
    async fn round_trip(&self) -> Result<KeyRef, String> {
        self.kek.refresh().await.map_err(|e| e.to_string())?;
        let seed = keyward_crypto::SecretBytes::random(SEED_LEN).map_err(|e| e.to_string())?;
        let w = self.kek.wrap(seed.expose()).await.map_err(|e| e.to_string())?;
        if w.ciphertext.len() > MAX_CIPHERTEXT {
            return Err(format!("ciphertext of {} bytes exceeds the apiserver's limit", w.ciphertext.len()));
        }
        let u = self.kek.unwrap(&w.ciphertext, &w.key).await.map_err(|e| e.to_string())?;
        if !seed.ct_eq(&u.plaintext) {
            return Err("round trip returned a different plaintext".into());
        }
        Ok(w.key)
    }

    /// The current key version, probed at most once per cache period (concurrent callers
    /// share one probe).
    pub async fn status(&self) -> Result<KeyRef, String> {
        let mut p = self.probe.lock().await;
        if let Some(p) = p.as_ref() {
            let ttl = if p.result.is_ok() { self.settings.status_cache } else { FAILED_PROBE_TTL };
            if p.at.elapsed() < ttl {
                return p.result.clone();
            }
        }
        let result = self.round_trip().await;
        match &result {
            Ok(k) => {
                let previous = self.last_key.lock().ok().and_then(|mut l| l.replace(k.clone()));
                if previous.as_ref() != Some(k) {
                    let what = match previous {
                        Some(old) => format!("kms-plugin key_id changed from {} to {}", old.key_id(), k.key_id()),
                        None => format!("kms-plugin ({} mode) serving key_id {}", self.kek.mode(), k.key_id()),
                    };
                    tracing::info!("{what}");
                    if let Err(e) = self.audit.system_event(&what).await {
                        tracing::error!(error = %e, "audit write failed");
                    }
                }
                if let Some(o) = &self.outage {
                    o.prune();
                }
            }
            Err(e) => tracing::warn!(reason = %e, "KMS plugin status check failed"),
        }
        *p = Some(Probe { at: Instant::now(), result: result.clone() });
        result
    }

    fn last_key_id(&self) -> String {
        self.last_key.lock().ok().and_then(|k| k.as_ref().map(KeyRef::key_id)).unwrap_or_else(|| "unknown".into())
    }

    /// Write the audit record of one call; a call whose record cannot be written fails.
    async fn audit(
        &self,
        caller: &Caller,
        uid: &str,
        method: &str,
        resource: &str,
        outcome: &Result<&'static str, Status>,
    ) -> Result<(), Status> {
        let verdict = caller.verdict();
        let (decision, reason, status, error) = match (outcome, verdict.as_ref().err()) {
            (_, Some((r, short))) => {
                ("deny", Some(format!("{short}: {r}")), tonic::Code::PermissionDenied, Some("permission_denied".into()))
            }
            (Ok(how), None) => ("allow", Some((*how).to_string()), tonic::Code::Ok, None),
            (Err(s), None) => ("allow", None, s.code(), Some(format!("{:?}", s.code()))),
        };
        self.metrics.record(method, &format!("{status:?}"));
        let record = AuditRecord {
            time: humantime_now(),
            request_id: uid_of(uid),
            identity: caller.identity(),
            method: "grpc".into(),
            path: format!("/v2.KeyManagementService/{method}"),
            operation: Some(method.to_ascii_lowercase()),
            resource: Some(resource.to_string()),
            decision,
            reason,
            status: status as u16,
            error,
            context: None,
            client: Some(format!("unix:pid={},uid={}", caller.pid, caller.uid)),
            chain: None,
        };
        self.audit.append(record).await.map_err(|e| {
            tracing::error!(error = %e, "audit write failed; refusing the call");
            Status::unavailable("the audit log cannot be written; the call was refused")
        })
    }

    fn caller<T>(req: &Request<T>) -> Caller {
        req.extensions().get::<Caller>().cloned().unwrap_or_else(|| Caller::unidentified("unidentified connection"))
    }

    async fn unwrap(&self, ciphertext: &[u8], key: &KeyRef) -> Result<(Unwrapped, &'static str), KekError> {
        match self.kek.unwrap(ciphertext, key).await {
            Ok(u) => {
                if let Some(o) = &self.outage {
                    o.put(ciphertext, &u.plaintext, key);
                }
                Ok((u, "unwrapped"))
            }
            Err(KekError::Unavailable(m)) => match self.outage.as_ref().and_then(|o| o.get(ciphertext, key)) {
                Some(u) => {
                    tracing::warn!(reason = %m, "Keyward unavailable; Decrypt answered from the outage cache");
                    Ok((u, "answered from the outage cache: Keyward unavailable"))
                }
                None => Err(KekError::Unavailable(m)),
            },
            Err(e) => Err(e),
        }
    }
}

fn humantime_now() -> String {
    keyward_audit::now_rfc3339()
}

#[tonic::async_trait]
impl KeyManagementService for Plugin {
    async fn status(&self, _req: Request<proto::StatusRequest>) -> Result<Response<proto::StatusResponse>, Status> {
        let (healthz, key_id) = match self.status().await {
            Ok(k) => ("ok".to_string(), k.key_id()),
            Err(e) => (short(&e), self.last_key_id()),
        };
        Ok(Response::new(proto::StatusResponse { version: API_VERSION.into(), healthz, key_id }))
    }

    async fn decrypt(&self, req: Request<proto::DecryptRequest>) -> Result<Response<proto::DecryptResponse>, Status> {
        let caller = Self::caller(&req);
        let r = req.into_inner();
        let key = check_decrypt(&r);
        let resource = match &key {
            Ok(k) => format!("keys/{}", k.name),
            Err(_) => "keys/-".into(),
        };
        if let Err((reason, _)) = caller.verdict() {
            self.audit(&caller, &r.uid, "Decrypt", &resource, &Err(Status::permission_denied(""))).await?;
            return Err(Status::permission_denied(format!("this caller may not use Decrypt: {reason}")));
        }
        let result = match key {
            Ok(k) => self.unwrap(&r.ciphertext, &k).await.map_err(|e| status_of(&e)),
            Err(s) => Err(s),
        };
        let outcome = result.as_ref().map(|(_, how)| *how).map_err(Clone::clone);
        self.audit(&caller, &r.uid, "Decrypt", &resource, &outcome).await?;
        let (u, _) = result?;
        Ok(Response::new(proto::DecryptResponse { plaintext: u.plaintext.to_vec() }))
    }

    async fn encrypt(&self, req: Request<proto::EncryptRequest>) -> Result<Response<proto::EncryptResponse>, Status> {
        let caller = Self::caller(&req);
        let r = req.into_inner();
        let resource = format!("keys/{}", self.kek.key_name());
        if let Err((reason, _)) = caller.verdict() {
            self.audit(&caller, &r.uid, "Encrypt", &resource, &Err(Status::permission_denied(""))).await?;
            return Err(Status::permission_denied(format!("this caller may not use Encrypt: {reason}")));
        }
        let result = match check_encrypt(&r) {
            Ok(()) => self.kek.wrap(&r.plaintext).await.map_err(|e| status_of(&e)).and_then(|w| {
                if w.ciphertext.len() > MAX_CIPHERTEXT {
                    Err(Status::internal("ciphertext exceeds the apiserver's 1 KiB limit"))
                } else {
                    Ok(w)
                }
            }),
            Err(s) => Err(s),
        };
        let outcome = result.as_ref().map(|_| "wrapped").map_err(Clone::clone);
        self.audit(&caller, &r.uid, "Encrypt", &resource, &outcome).await?;
        let w = result?;
        if let Some(o) = &self.outage {
            o.put(&w.ciphertext, &r.plaintext, &w.key);
        }
        let mut plaintext = r.plaintext;
        zeroize::Zeroize::zeroize(&mut plaintext);
        Ok(Response::new(proto::EncryptResponse {
            ciphertext: w.ciphertext,
            key_id: w.key.key_id(),
            annotations: HashMap::new(),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    proptest! {
        /// Any bytes as a Decrypt or Encrypt message: decoding and checking never panic, and
        /// what is accepted is within the apiserver's limits.
        #[test]
        fn arbitrary_messages_are_checked_without_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(r) = proto::DecryptRequest::decode(data.as_slice())
                && let Ok(k) = check_decrypt(&r)
            {
                prop_assert_eq!(k.key_id(), r.key_id);
                prop_assert!(r.ciphertext.len() <= MAX_CIPHERTEXT);
            }
            if let Ok(r) = proto::EncryptRequest::decode(data.as_slice()) {
                prop_assert_eq!(check_encrypt(&r).is_ok(), r.plaintext.len() == SEED_LEN);
            }
        }

        /// Well-formed requests with random fields: key ids that were never issued are NotFound
        /// or InvalidArgument, never anything else.
        #[test]
        fn random_fields_get_typed_errors(ct in proptest::collection::vec(any::<u8>(), 0..1100), key_id in "\\PC{0,80}") {
            let r = proto::DecryptRequest { ciphertext: ct, uid: String::new(), key_id, annotations: HashMap::new() };
            if let Err(s) = check_decrypt(&r) {
                prop_assert!(matches!(s.code(), tonic::Code::NotFound | tonic::Code::InvalidArgument));
            }
        }
    }

    #[test]
    fn annotation_keys_must_be_fqdns_and_small() {
        let ok = HashMap::from([("version.encryption.example.com".to_string(), b"1".to_vec())]);
        assert!(validate_annotations(&ok).is_ok());
        for bad in ["nodot", "Upper.example", "-a.b", "a-.b", "a..b", ".a.b", "a_b.c"] {
            let m = HashMap::from([(bad.to_string(), vec![])]);
            assert!(validate_annotations(&m).is_err(), "{bad}");
        }
        let big = HashMap::from([("a.b".to_string(), vec![0; MAX_ANNOTATIONS])]);
        assert!(validate_annotations(&big).is_err());
    }

    #[test]
    fn decrypt_requests_are_checked_before_any_work() {
        let key = KeyRef { name: "k".into(), id: [7; 16], version: 2 };
        let req = |ct: Vec<u8>, key_id: String| proto::DecryptRequest {
            ciphertext: ct,
            uid: "u".into(),
            key_id,
            annotations: HashMap::new(),
        };
        assert_eq!(check_decrypt(&req(vec![], key.key_id())).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(check_decrypt(&req(vec![1; 1025], key.key_id())).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(check_decrypt(&req(vec![1; 40], String::new())).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(check_decrypt(&req(vec![1; 40], "other".into())).unwrap_err().code(), tonic::Code::NotFound);
        // A well-formed key_id that does not match the ciphertext's header.
        let e = check_decrypt(&req(vec![1; 40], key.key_id())).unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "decryption failed"));
        let mut r = req(vec![1; 40], key.key_id());
        r.annotations.insert("a.b".into(), vec![]);
        assert_eq!(check_decrypt(&r).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
