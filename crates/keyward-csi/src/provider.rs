//! The `v1alpha1.CSIDriverProvider` service: each Mount logs in to Keyward *as the pod* (its own
//! ServiceAccount token, Kubernetes auth role from the SecretProviderClass), fetches the objects
//! with the pod's Keyward token and returns them as files. The provider holds no identity of its
//! own that could read anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use keyward_audit::{AuditLog, AuditRecord};
use keyward_client::Client;
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use crate::params::{self, Invalid, MountSpec, Object, Source};
use crate::proto;
use crate::proto::csi_driver_provider_server::CsiDriverProvider;

/// The provider's name (also its socket's name: `<dir>/keyward.sock`).
pub const PROVIDER_NAME: &str = "keyward";
/// The most file contents one Mount returns (the driver receives up to 4 MiB per message).
pub const MAX_RESPONSE: usize = 3 * 1024 * 1024;
/// A cached pod token is used until this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);
/// One object's contents and version, or why not.
type Fetched = Result<(Zeroizing<Vec<u8>>, String), Failure>;

/// Objects of one Mount fetched at once.
const FETCH_CONCURRENCY: usize = 16;
/// Pods whose Keyward token is cached, at most.
const MAX_CACHED_PODS: usize = 10_000;

/// Provider settings.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The Keyward server.
    pub addr: String,
    /// Other addresses a SecretProviderClass may name with `keywardAddress`.
    pub allowed_addresses: Vec<String>,
    /// Default audience of the ServiceAccount token presented to Keyward.
    pub audience: String,
    /// CA for HTTPS to Keyward.
    pub ca_pem: Option<Vec<u8>>,
    /// Per-request timeout to Keyward.
    pub timeout: Duration,
    /// Also take the pod's token from the Mount's `secrets` (the volume's
    /// `nodePublishSecretRef` data, which the pod's author chooses) when the driver's attribute
    /// has none. Weaker: off by default.
    pub allow_secret_tokens: bool,
}

/// What a cached login answers for: this token (by its SHA-256), for this pod, on this role and
/// server. A Mount with another token (or none that verifies) never gets a cached login.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LoginKey {
    address: String,
    role: String,
    pod: params::Pod,
    token: [u8; 32],
}

#[derive(Debug)]
struct Cached {
    client: Client,
    usable_until: Instant,
}

/// The provider.
#[derive(Debug)]
pub struct Provider {
    cfg: ProviderConfig,
    audit: Arc<AuditLog>,
    metrics: Arc<keyward_metrics::Calls>,
    anonymous: Mutex<HashMap<String, Client>>,
    logins: Mutex<HashMap<LoginKey, Cached>>,
}

/// A failed Mount: gRPC code, the stable error code, and what to fix.
#[derive(Debug)]
struct Failure {
    grpc: Code,
    code: &'static str,
    message: String,
    denied: bool,
}

impl From<Invalid> for Failure {
    fn from(i: Invalid) -> Self {
        let grpc = match i.code {
            "MissingToken" | "MissingPodInfo" => Code::FailedPrecondition,
            _ => Code::InvalidArgument,
        };
        Self { grpc, code: i.code, message: i.message, denied: false }
    }
}

fn from_keyward(what: &str, e: keyward_client::Error) -> Failure {
    use keyward_client::ErrorKind as K;
    let kind = e.kind();
    let (code, denied) = match kind {
        K::Unauthenticated => ("LoginFailed", true),
        K::PermissionDenied => ("PermissionDenied", true),
        K::NotFound => ("NotFound", false),
        K::InvalidArgument => ("InvalidObject", false),
        K::FailedPrecondition => ("FailedPrecondition", false),
        K::ResourceExhausted => ("ResourceExhausted", false),
        K::Unavailable => ("KeywardUnavailable", false),
        _ => ("Internal", false),
    };
    Failure { grpc: kind.grpc_code(), code, message: format!("{what}: {e}"), denied }
}

/// Whether the identity Keyward verified in a login (`identity` of its answer) is the Mount's
/// pod: namespace and ServiceAccount, and the pod's name and UID when the token is bound to a
/// pod. `Err` says both identities.
fn token_matches_pod(identity: Option<&keyward_client::api::K8sIdentity>, pod: &params::Pod) -> Result<(), String> {
    // A login answer without the identity it verified proves nothing about the pod.
    let Some(identity) = identity else {
        return Err("the login answer names no Kubernetes identity: the token cannot be matched to the pod".into());
    };
    let (ns, sa) = (identity.namespace.as_str(), identity.service_account.as_str());
    let bound_pod = identity.pod.as_deref().map(|name| (name, identity.pod_uid.as_deref().unwrap_or_default()));
    let same = ns == pod.namespace
        && sa == pod.service_account
        && bound_pod.is_none_or(|(name, uid)| name == pod.name && uid == pod.uid);
    if same {
        return Ok(());
    }
    let token_pod = bound_pod.map(|(n, u)| format!(" pod {n} ({u})")).unwrap_or_default();
    Err(format!(
        "the ServiceAccount token is {ns}/{sa}{token_pod}'s, but the Mount is for {}/{} pod {} ({}): a pod may \
         only mount with its own token",
        pod.namespace, pod.service_account, pod.name, pod.uid
    ))
}

fn rfc3339_to_instant(s: &str) -> Option<Instant> {
    let at = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()?;
    let left = at.duration_since(SystemTime::now()).ok()?;
    Instant::now().checked_add(left)
}

impl Provider {
    /// A provider auditing to `audit`.
    pub fn new(cfg: ProviderConfig, audit: Arc<AuditLog>) -> Self {
        let metrics = Arc::new(keyward_metrics::Calls::new(
            "keyward_csi",
            "Mount calls from the Secrets Store CSI driver, by outcome (OK or the error code)",
        ));
        Self { cfg, audit, metrics, anonymous: Mutex::new(HashMap::new()), logins: Mutex::new(HashMap::new()) }
    }

    /// The provider's metrics.
    pub fn metrics(&self) -> Arc<keyward_metrics::Calls> {
        self.metrics.clone()
    }

    fn builder(&self, addr: &str) -> keyward_client::ClientBuilder {
        let mut b = Client::builder(addr.to_string()).timeout(self.cfg.timeout);
        if let Some(ca) = &self.cfg.ca_pem {
            b = b.ca_cert_pem(ca.clone());
        }
        b
    }

    fn address(&self, spec: &MountSpec) -> Result<String, Failure> {
        match &spec.address {
            None => Ok(self.cfg.addr.clone()),
            Some(a) if *a == self.cfg.addr || self.cfg.allowed_addresses.contains(a) => Ok(a.clone()),
            Some(a) => Err(Failure {
                grpc: Code::InvalidArgument,
                code: "AddressNotAllowed",
                message: format!(
                    "keywardAddress {a:?} is not one this provider may send pod tokens to (start it with --allowed-address)"
                ),
                denied: true,
            }),
        }
    }

    /// The pod's Keyward client: cached until shortly before its token expires, else a login
    /// with the pod's ServiceAccount token.
    async fn pod_client(&self, key: &LoginKey, jwt: &str) -> Result<Client, Failure> {
        if let Ok(m) = self.logins.lock()
            && let Some(c) = m.get(key)
            && c.usable_until > Instant::now()
        {
            return Ok(c.client.clone());
        }
        let anon = {
            let mut m = self.anonymous.lock().map_err(|_| internal("client cache poisoned"))?;
            match m.get(&key.address) {
                Some(c) => c.clone(),
                None => {
                    let c = self.builder(&key.address).build().map_err(|e| from_keyward("client", e))?;
                    m.insert(key.address.clone(), c.clone());
                    c
                }
            }
        };
        let login = keyward_client::api::K8sLoginReq { role: key.role.clone(), jwt: Zeroizing::new(jwt.to_string()) };
        let v = anon.k8s_login(&login).await.map_err(|e| {
            from_keyward(
                &format!("logging in as {}/{} with role {}", key.pod.namespace, key.pod.service_account, key.role),
                e,
            )
        })?;
        let token = v.token.ok_or_else(|| internal("login answer without a token"))?;
        let expires = v.expires_at.as_deref().and_then(rfc3339_to_instant).unwrap_or_else(Instant::now);
        let client = self.builder(&key.address).token(token.as_str()).build().map_err(|e| from_keyward("client", e))?;
        // The token must be the Mount's pod's own: the identity Keyward verified in it must be
        // the pod the kubelet names. A token copied from another pod or namespace is refused,
        // and the Keyward token just issued for it is revoked.
        if let Err(mismatch) = token_matches_pod(v.identity.as_ref(), &key.pod) {
            let _ = client.revoke_self().await;
            return Err(Failure {
                grpc: Code::PermissionDenied,
                code: "TokenPodMismatch",
                message: mismatch,
                denied: true,
            });
        }
        if let Ok(mut m) = self.logins.lock() {
            let now = Instant::now();
            if m.len() >= MAX_CACHED_PODS {
                m.retain(|_, c| c.usable_until > now);
            }
            if m.len() < MAX_CACHED_PODS {
                m.insert(
                    key.clone(),
                    Cached { client: client.clone(), usable_until: expires.checked_sub(TOKEN_MARGIN).unwrap_or(now) },
                );
            }
        }
        Ok(client)
    }

    fn forget(&self, key: &LoginKey) {
        if let Ok(mut m) = self.logins.lock() {
            m.remove(key);
        }
    }

    /// Fetch every object, up to [`FETCH_CONCURRENCY`] at a time; results in object order.
    async fn fetch_all(client: &Client, objects: &[Object]) -> Vec<Fetched> {
        let permits = Arc::new(tokio::sync::Semaphore::new(FETCH_CONCURRENCY));
        let mut set = tokio::task::JoinSet::new();
        for (i, o) in objects.iter().enumerate() {
            let (client, o, permits) = (client.clone(), o.clone(), permits.clone());
            set.spawn(async move {
                let _permit = permits.acquire_owned().await;
                (i, Self::fetch(&client, &o).await)
            });
        }
        let mut out: Vec<Option<Fetched>> = objects.iter().map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, r)) = joined
                && let Some(slot) = out.get_mut(i)
            {
                *slot = Some(r);
            }
        }
        out.into_iter().map(|r| r.unwrap_or_else(|| Err(internal("an object fetch was lost")))).collect()
    }

    async fn fetch(client: &Client, o: &Object) -> Fetched {
        match &o.source {
            Source::Secret { path, field, version } => {
                let s =
                    client.get_secret(path, *version).await.map_err(|e| from_keyward(&format!("secret {path}"), e))?;
                let contents = match field {
                    Some(f) => Zeroizing::new(
                        s.data
                            .get(f)
                            .ok_or_else(|| Failure {
                                grpc: Code::NotFound,
                                code: "NotFound",
                                message: format!("secret {path} version {} has no field {f:?}", s.version),
                                denied: false,
                            })?
                            .as_bytes()
                            .to_vec(),
                    ),
                    None => {
                        let fields: BTreeMap<&str, &str> =
                            s.data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        Zeroizing::new(serde_json::to_vec(&fields).map_err(|e| internal(&e.to_string()))?)
                    }
                };
                Ok((contents, s.version.to_string()))
            }
            Source::DataKey { ciphertext, context } => {
                let d = client
                    .decrypt(ciphertext, context)
                    .await
                    .map_err(|e| from_keyward(&format!("data key {}", o.file_name), e))?;
                Ok((Zeroizing::new(d.plaintext.to_vec()), format!("{}:v{}", d.key, d.key_version)))
            }
        }
    }

    async fn mount(
        &self,
        r: &proto::MountRequest,
    ) -> Result<(MountSpec, proto::MountResponse), (Option<MountSpec>, Failure)> {
        let spec = params::parse_mount(
            &r.attributes,
            &r.secrets,
            &r.permission,
            &self.cfg.audience,
            self.cfg.allow_secret_tokens,
        )
        .map_err(|e| (None, e.into()))?;
        let address = match self.address(&spec) {
            Ok(a) => a,
            Err(f) => return Err((Some(spec), f)),
        };
        let token = keyward_crypto::hash::sha256(spec.token.as_bytes());
        let key = LoginKey { address, role: spec.role.clone(), pod: spec.pod.clone(), token };
        let mut retried = false;
        'login: loop {
            let client = match self.pod_client(&key, &spec.token).await {
                Ok(c) => c,
                Err(f) => return Err((Some(spec), f)),
            };
            let mut resp = proto::MountResponse::default();
            let mut total = 0usize;
            for (o, fetched) in spec.objects.iter().zip(Self::fetch_all(&client, &spec.objects).await) {
                let (contents, version) = match fetched {
                    Ok(v) => v,
                    // A cached token revoked or expired early: log in once more.
                    Err(f) if f.code == "LoginFailed" && !retried => {
                        self.forget(&key);
                        retried = true;
                        continue 'login;
                    }
                    Err(f) => return Err((Some(spec), f)),
                };
                total = total.saturating_add(contents.len());
                if total > MAX_RESPONSE {
                    let f = Failure {
                        grpc: Code::ResourceExhausted,
                        code: "ResponseTooLarge",
                        message: format!(
                            "the objects total more than {MAX_RESPONSE} bytes; split them over several volumes"
                        ),
                        denied: false,
                    };
                    return Err((Some(spec), f));
                }
                resp.object_version.push(proto::ObjectVersion { id: o.id(), version });
                resp.files.push(proto::File {
                    path: o.file_name.clone(),
                    mode: o.mode as i32,
                    contents: contents.to_vec(),
                });
            }
            return Ok((spec, resp));
        }
    }

    async fn audit(
        &self,
        spec: Option<&MountSpec>,
        outcome: Result<usize, &Failure>,
        client: Option<String>,
    ) -> Result<(), Status> {
        let (identity, request_id, resource) = match spec {
            Some(s) => (
                format!("k8s:{}/{} pod {}", s.pod.namespace, s.pod.service_account, s.pod.name),
                s.pod.uid.clone(),
                format!("spc/{}/{} role {}", s.pod.namespace, s.class, s.role),
            ),
            None => ("driver".into(), "-".into(), "-".into()),
        };
        let (decision, reason, status, error) = match outcome {
            Ok(n) => ("allow", format!("{n} objects"), 0u16, None),
            Err(f) => {
                (if f.denied { "deny" } else { "none" }, f.message.clone(), f.grpc as u16, Some(f.code.to_string()))
            }
        };
        self.metrics.record("Mount", error.as_deref().unwrap_or("OK"));
        let record = AuditRecord {
            time: keyward_audit::now_rfc3339(),
            request_id,
            identity,
            method: "grpc".into(),
            path: "/v1alpha1.CSIDriverProvider/Mount".into(),
            operation: Some("mount".into()),
            resource: Some(resource),
            decision,
            reason: Some(reason.chars().take(512).collect()),
            status,
            error,
            context: None,
            client,
            chain: None,
        };
        self.audit.append(record).await.map_err(|e| {
            tracing::error!(error = %e, "audit write failed; refusing the mount");
            Status::unavailable("AuditUnavailable: the audit log cannot be written; the mount was refused")
        })
    }
}

fn internal(m: &str) -> Failure {
    Failure { grpc: Code::Internal, code: "Internal", message: m.to_string(), denied: false }
}

#[tonic::async_trait]
impl CsiDriverProvider for Provider {
    async fn version(&self, _req: Request<proto::VersionRequest>) -> Result<Response<proto::VersionResponse>, Status> {
        Ok(Response::new(proto::VersionResponse {
            version: "v1alpha1".into(),
            runtime_name: PROVIDER_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn mount(&self, req: Request<proto::MountRequest>) -> Result<Response<proto::MountResponse>, Status> {
        // The driver, as the kernel names it.
        let client = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|c| c.peer_cred)
            .map(|c| format!("unix:pid={},uid={}", c.pid().unwrap_or(0), c.uid()));
        let r = req.into_inner();
        match Provider::mount(self, &r).await {
            Ok((spec, resp)) => {
                self.audit(Some(&spec), Ok(resp.files.len()), client).await?;
                Ok(Response::new(resp))
            }
            Err((spec, f)) => {
                tracing::warn!(code = f.code, reason = %f.message, "mount refused");
                self.audit(spec.as_ref(), Err(&f), client).await?;
                // The code leads the message (shown in the pod's events) and is also in the
                // status details, as a MountResponse whose error.code is set.
                let details = prost::Message::encode_to_vec(&proto::MountResponse {
                    error: Some(proto::Error { code: f.code.to_string() }),
                    ..Default::default()
                });
                Err(Status::with_details(f.grpc, format!("{}: {}", f.code, f.message), details.into()))
            }
        }
    }
}
