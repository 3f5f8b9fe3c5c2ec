//! Kubernetes ServiceAccount token login.
//!
//! A workload presents its projected ServiceAccount token (a JWT minted by the API server for
//! Keyward's audience). [`Verifier::verify`] checks it offline against the issuer's JWKS:
//!
//! - the header's `alg` must be an asymmetric algorithm (RS256/384/512, PS256/384/512,
//!   ES256/384); `none` and HMAC are refused outright, and the key's type must fit the `alg`;
//! - the key is chosen by `kid`; an unknown `kid` triggers one JWKS refetch (rate limited), since
//!   the issuer rotates keys;
//! - `iss` must equal the configured issuer, `aud` must contain Keyward's audience, `exp` and
//!   `nbf` are enforced with a small leeway, and `sub` must agree with the
//!   `kubernetes.io` namespace and service account claims;
//! - [`Role::check`] then requires the namespace and service account to be bound by the role,
//!   and a pod binding (`kubernetes.io.pod`) unless the role explicitly allows unbound tokens.
//!
//! Offline validation cannot see whether the pod or service account still exists (the API
//! server's TokenReview can): keep the token TTLs Keyward issues short.

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};

/// Largest accepted ServiceAccount token.
pub const MAX_JWT_BYTES: usize = 16 * 1024;
/// Largest accepted JWKS or discovery document.
pub const MAX_JWKS_BYTES: usize = 512 * 1024;
/// The selector kind of identities proven by a ServiceAccount token (a bearer JWT), apart from
/// the `k8s:` kind the node agent attests.
pub const JWT_SELECTOR_KIND: &str = "k8s-jwt";

/// Clock skew tolerated on `exp` and `nbf`.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// Minimum time between two JWKS fetches triggered by unknown `kid`s.
const REFETCH_INTERVAL: Duration = Duration::from_secs(5);

/// Why a token or configuration was refused. Messages say what is wrong without echoing the
/// token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthnError {
    /// The token is not a well-formed JWT, or is too large.
    #[error("the ServiceAccount token is malformed: {0}")]
    Malformed(&'static str),
    /// The `alg` is not one Keyward accepts.
    #[error(
        "the ServiceAccount token uses an unsupported algorithm (accepted: RS256/384/512, PS256/384/512, ES256/384)"
    )]
    UnsupportedAlgorithm,
    /// No JWKS key has the token's `kid` (even after a refetch).
    #[error("the ServiceAccount token was signed by a key the issuer's JWKS does not contain")]
    UnknownKey,
    /// Signature invalid.
    #[error("the ServiceAccount token signature is invalid")]
    BadSignature,
    /// Expired.
    #[error("the ServiceAccount token has expired")]
    Expired,
    /// Not valid yet.
    #[error("the ServiceAccount token is not valid yet (nbf in the future)")]
    NotYetValid,
    /// Wrong issuer.
    #[error("the ServiceAccount token was issued by another issuer")]
    WrongIssuer,
    /// Keyward's audience missing.
    #[error("the ServiceAccount token is not for Keyward's audience; project a token with audience {0:?}")]
    WrongAudience(String),
    /// Claims are not those of a ServiceAccount token.
    #[error("the token is not a Kubernetes ServiceAccount token: {0}")]
    NotServiceAccount(&'static str),
    /// The role refuses this identity.
    #[error("{0}")]
    RoleMismatch(String),
    /// The JWKS could not be fetched or parsed.
    #[error("the issuer's JWKS is unavailable: {0}")]
    JwksUnavailable(String),
    /// The configuration is invalid.
    #[error("invalid Kubernetes auth configuration: {0}")]
    Config(String),
    /// The API server's TokenReview no longer accepts the token (its pod or ServiceAccount was
    /// deleted, or it names someone else), although its signature verifies.
    #[error("the Kubernetes API server does not accept this ServiceAccount token: {0}")]
    Revoked(String),
    /// The API server could not be asked (TokenReview): the login is refused, not let through.
    #[error("the Kubernetes API server could not confirm the token: {0}")]
    ReviewUnavailable(String),
}

/// Where the issuer's signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JwksSource {
    /// A JWKS document given at configuration time (e.g. from `kubectl get --raw /openid/v1/jwks`).
    /// Cannot be refetched: reconfigure when the issuer rotates keys.
    Static(String),
    /// An https URL serving the JWKS.
    Url(String),
    /// OIDC discovery: `ISSUER/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery,
}

/// The Kubernetes auth method's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The `iss` every token must carry (`--service-account-issuer`).
    pub issuer: String,
    /// The audience every token must include (the projected volume's `audience`).
    pub audience: String,
    /// Where the keys come from.
    pub jwks: JwksSource,
    /// PEM CA certificates to trust when fetching the JWKS (default: the system roots).
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Confirm every login with this API server's TokenReview API (an https URL, trusted with
    /// `ca_pem`): a token whose pod or ServiceAccount was deleted is refused, although its
    /// signature still verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_review_url: Option<String>,
    /// The Keyward secret, `PATH#FIELD`, holding the reviewer's credential: a ServiceAccount
    /// token bound to `system:auth-delegator`. It stays encrypted in Keyward's store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_reviewer_secret: Option<String>,
}

fn default_leeway() -> u64 {
    DEFAULT_LEEWAY_SECS
}

fn https_url(what: &str, u: &str) -> Result<(), AuthnError> {
    let ok = u.starts_with("https://") && !u.contains('#') && !u.contains('?') && u.len() > "https://".len();
    if !ok {
        return Err(AuthnError::Config(format!("{what} must be an https URL without query or fragment, got {u:?}")));
    }
    Ok(())
}

impl Config {
    /// Check the configuration (and a static JWKS) before it is stored.
    pub fn validate(&self) -> Result<(), AuthnError> {
        https_url("issuer", &self.issuer)?;
        if self.audience.is_empty() || self.audience.chars().count() > 256 {
            return Err(AuthnError::Config("audience must be 1 to 256 characters".into()));
        }
        if self.leeway_secs > 300 {
            return Err(AuthnError::Config("leeway must be at most 300 seconds".into()));
        }
        if let Some(pem) = &self.ca_pem {
            reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| AuthnError::Config(format!("CA certificate: {e}")))?;
        }
        match &self.jwks {
            JwksSource::Static(doc) => {
                // A document given here that does not parse is a configuration error.
                let keys = parse_jwks(doc.as_bytes()).map_err(|e| match e {
                    AuthnError::JwksUnavailable(why) => AuthnError::Config(why),
                    other => other,
                })?;
                if keys.is_empty() {
                    return Err(AuthnError::Config("the JWKS holds no usable RSA or EC signing key".into()));
                }
            }
            JwksSource::Url(u) => https_url("jwks URL", u)?,
            JwksSource::Discovery => {}
        }
        match (&self.token_review_url, &self.token_reviewer_secret) {
            (None, None) => {}
            (Some(url), Some(secret)) => {
                https_url("token review URL", url)?;
                let ok =
                    secret.split_once('#').is_some_and(|(p, f)| !p.is_empty() && !f.is_empty() && !f.contains('#'));
                if !ok {
                    return Err(AuthnError::Config(
                        "the token reviewer secret is PATH#FIELD, a Keyward secret and its field".into(),
                    ));
                }
            }
            _ => {
                return Err(AuthnError::Config(
                    "give both the token review URL and the reviewer's secret, or neither".into(),
                ));
            }
        }
        Ok(())
    }
}

/// A role: which ServiceAccounts may log in, and what they get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Namespaces allowed (`*` for any).
    pub bound_namespaces: Vec<String>,
    /// ServiceAccount names allowed (`*` for any).
    pub bound_service_accounts: Vec<String>,
    /// Policies of the issued token (policies attached by identity apply as well).
    pub policies: Vec<String>,
    /// TTL of the issued token, seconds.
    pub ttl_secs: u64,
    /// Renewals never extend the issued token beyond this many seconds after login
    /// (default [`DEFAULT_ROLE_MAX_TTL_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl_secs: Option<u64>,
    /// Accept tokens not bound to a pod (e.g. from the TokenRequest API without a pod).
    #[serde(default)]
    pub allow_unbound_tokens: bool,
}

/// Longest TTL a role may give.
pub const MAX_ROLE_TTL_SECS: u64 = 24 * 3600;
/// Longest max TTL a role may give.
pub const MAX_ROLE_MAX_TTL_SECS: u64 = 31 * 24 * 3600;
/// Max TTL of a role that does not set one.
pub const DEFAULT_ROLE_MAX_TTL_SECS: u64 = 24 * 3600;

impl Role {
    /// Check the role's own fields.
    pub fn validate(&self) -> Result<(), AuthnError> {
        if self.bound_namespaces.is_empty() || self.bound_service_accounts.is_empty() {
            return Err(AuthnError::Config(
                "a role needs at least one bound namespace and one bound service account (use \"*\" for any)".into(),
            ));
        }
        if self.ttl_secs == 0 || self.ttl_secs > MAX_ROLE_TTL_SECS {
            return Err(AuthnError::Config(format!("ttl must be between 1 second and {MAX_ROLE_TTL_SECS} seconds")));
        }
        if self.policies.len() > 64 {
            return Err(AuthnError::Config("a role gives at most 64 policies".into()));
        }
        let max = self.max_ttl();
        if max < self.ttl_secs || max > MAX_ROLE_MAX_TTL_SECS {
            return Err(AuthnError::Config(format!(
                "max_ttl must be at least the ttl and at most {MAX_ROLE_MAX_TTL_SECS} seconds"
            )));
        }
        Ok(())
    }

    /// The max TTL in force.
    pub fn max_ttl(&self) -> u64 {
        self.max_ttl_secs.unwrap_or(DEFAULT_ROLE_MAX_TTL_SECS.max(self.ttl_secs))
    }

    /// Whether `id` may log in with this role.
    pub fn check(&self, id: &ServiceAccountIdentity) -> Result<(), AuthnError> {
        let bound = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        if !bound(&self.bound_namespaces, &id.namespace) {
            return Err(AuthnError::RoleMismatch(format!("namespace {:?} is not bound to this role", id.namespace)));
        }
        if !bound(&self.bound_service_accounts, &id.service_account) {
            return Err(AuthnError::RoleMismatch(format!(
                "service account {:?} is not bound to this role",
                id.service_account
            )));
        }
        if id.pod.is_none() && !self.allow_unbound_tokens {
            return Err(AuthnError::RoleMismatch(
                "the token is not bound to a pod; use a projected volume token, or allow unbound tokens on the role"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Who a verified token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountIdentity {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub service_account: String,
    /// ServiceAccount UID.
    pub service_account_uid: String,
    /// Pod (name, uid) for pod-bound tokens.
    pub pod: Option<(String, String)>,
    /// Node name, when the token names one.
    pub node: Option<String>,
    /// Token expiry (Unix seconds).
    pub expires_at: i64,
}

impl ServiceAccountIdentity {
    /// `k8s:NAMESPACE/SERVICEACCOUNT`, for token display names and audit records.
    pub fn display(&self) -> String {
        format!("k8s:{}/{}", self.namespace, self.service_account)
    }

    /// Selectors, as policies and audit records use them; sorted. They are in a namespace of
    /// their own, [`JWT_SELECTOR_KIND`] (`k8s-jwt:ns:NAMESPACE`, `k8s-jwt:sa:NAME`,
    /// `k8s-jwt:pod-name:`, `k8s-jwt:pod-uid:`, `k8s-jwt:node-name:`): a token is a bearer
    /// credential that can be replayed from anywhere, so a login must never match a policy
    /// written for the `k8s:` selectors the node agent attests from a running pod.
    pub fn selectors(&self) -> Vec<String> {
        let k = JWT_SELECTOR_KIND;
        let mut v = vec![format!("{k}:ns:{}", self.namespace), format!("{k}:sa:{}", self.service_account)];
        if let Some((name, uid)) = &self.pod {
            v.push(format!("{k}:pod-name:{name}"));
            v.push(format!("{k}:pod-uid:{uid}"));
        }
        if let Some(n) = &self.node {
            v.push(format!("{k}:node-name:{n}"));
        }
        v.sort();
        v
    }
}

#[derive(Deserialize)]
struct NameUid {
    name: String,
    #[serde(default)]
    uid: String,
}

#[derive(Deserialize)]
struct K8sClaims {
    namespace: String,
    serviceaccount: NameUid,
    pod: Option<NameUid>,
    node: Option<NameUid>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(rename = "kubernetes.io")]
    k8s: Option<K8sClaims>,
}

const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

struct Key {
    kid: Option<String>,
    jwk: Jwk,
    key: DecodingKey,
}

/// Parse a JWKS, keeping the RSA and EC signing keys (others, e.g. `oct`, are dropped: an HMAC
/// "public" key would let anyone sign).
fn parse_jwks(doc: &[u8]) -> Result<Vec<Key>, AuthnError> {
    if doc.len() > MAX_JWKS_BYTES {
        return Err(AuthnError::JwksUnavailable(format!("JWKS larger than {MAX_JWKS_BYTES} bytes")));
    }
    let set: JwkSet =
        serde_json::from_slice(doc).map_err(|e| AuthnError::JwksUnavailable(format!("JWKS is not valid: {e}")))?;
    let mut keys = Vec::new();
    for jwk in set.keys {
        if !matches!(jwk.algorithm, AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)) {
            continue;
        }
        if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature) {
            continue;
        }
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => keys.push(Key { kid: jwk.common.key_id.clone(), jwk, key }),
            Err(e) => tracing::warn!(error = %e, "skipping an unusable JWKS key"),
        }
    }
    Ok(keys)
}

/// Whether a JWK can verify `alg` (key type, and the JWK's own `alg` when it names one).
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::jwk::EllipticCurve;
    let family = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), a) => {
            matches!(
                a,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            )
        }
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        _ => false,
    };
    let named = jwk.common.key_algorithm.map(|ka| format!("{ka:?}")).is_none_or(|n| n == format!("{alg:?}"));
    family && named
}

struct Cache {
    keys: Vec<Key>,
}

/// The largest TokenReview answer read.
const MAX_REVIEW_BYTES: usize = 64 * 1024;

/// Verifies ServiceAccount tokens for one configuration. Cheap to share; keeps the JWKS in
/// memory and refetches on unknown `kid`s.
pub struct Verifier {
    config: Config,
    http: reqwest::Client,
    cache: RwLock<Cache>,
    last_fetch: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("issuer", &self.config.issuer).finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `config` (validated). Keys are fetched on first use.
    pub fn new(config: Config) -> Result<Self, AuthnError> {
        config.validate()?;
        let mut b =
            reqwest::Client::builder().timeout(Duration::from_secs(10)).redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| AuthnError::Config(format!("CA certificate: {e}")))?;
            b = b.tls_certs_only(certs);
        }
        let http = b.build().map_err(|e| AuthnError::Config(e.to_string()))?;
        let keys = match &config.jwks {
            JwksSource::Static(doc) => parse_jwks(doc.as_bytes())?,
            _ => Vec::new(),
        };
        Ok(Self { config, http, cache: RwLock::new(Cache { keys }), last_fetch: Mutex::new(None) })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    async fn get_limited(&self, url: &str) -> Result<Vec<u8>, AuthnError> {
        https_url("fetched URL", url)?;
        let fail = |e: String| AuthnError::JwksUnavailable(e);
        let mut resp = self.http.get(url).send().await.map_err(|e| fail(format!("GET {url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(fail(format!("GET {url}: HTTP {}", resp.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(format!("GET {url}: {e}")))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(fail(format!("{url} returned more than {MAX_JWKS_BYTES} bytes")));
            }
        }
        Ok(body)
    }

    /// Fetch the JWKS now (URL or discovery). Returns how many keys it holds.
    pub async fn refresh(&self) -> Result<usize, AuthnError> {
        let url = match &self.config.jwks {
            JwksSource::Static(_) => return Ok(self.cache.read().await.keys.len()),
            JwksSource::Url(u) => u.clone(),
            JwksSource::Discovery => {
                let base = self.config.issuer.trim_end_matches('/');
                let doc = self.get_limited(&format!("{base}/.well-known/openid-configuration")).await?;
                #[derive(Deserialize)]
                struct Discovery {
                    issuer: String,
                    jwks_uri: String,
                }
                let d: Discovery = serde_json::from_slice(&doc)
                    .map_err(|e| AuthnError::JwksUnavailable(format!("discovery document: {e}")))?;
                if d.issuer != self.config.issuer {
                    return Err(AuthnError::JwksUnavailable(format!(
                        "discovery names issuer {:?}, not the configured {:?}",
                        d.issuer, self.config.issuer
                    )));
                }
                d.jwks_uri
            }
        };
        let keys = parse_jwks(&self.get_limited(&url).await?)?;
        let n = keys.len();
        self.cache.write().await.keys = keys;
        Ok(n)
    }

    /// Refetch unless one happened within [`REFETCH_INTERVAL`]; true if it fetched.
    async fn refetch_limited(&self) -> Result<bool, AuthnError> {
        if matches!(self.config.jwks, JwksSource::Static(_)) {
            return Ok(false);
        }
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFETCH_INTERVAL) {
            return Ok(false);
        }
        *last = Some(Instant::now());
        self.refresh().await?;
        Ok(true)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = self.config.leeway_secs;
        v.validate_nbf = true;
        v
    }

    /// Verify a ServiceAccount token and return whose it is.
    pub async fn verify(&self, jwt: &str) -> Result<ServiceAccountIdentity, AuthnError> {
        if jwt.len() > MAX_JWT_BYTES {
            return Err(AuthnError::Malformed("longer than 16 KiB"));
        }
        let header = jsonwebtoken::decode_header(jwt).map_err(|_| AuthnError::Malformed("not a signed JWT"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(AuthnError::UnsupportedAlgorithm);
        }
        let mut result = self.try_keys(jwt, header.alg, header.kid.as_deref()).await;
        if matches!(result, Err(AuthnError::UnknownKey)) && self.refetch_limited().await? {
            result = self.try_keys(jwt, header.alg, header.kid.as_deref()).await;
        }
        let claims = result?;
        let k = claims.k8s.ok_or(AuthnError::NotServiceAccount("no kubernetes.io claims"))?;
        let expected_sub = format!("system:serviceaccount:{}:{}", k.namespace, k.serviceaccount.name);
        if claims.sub != expected_sub {
            return Err(AuthnError::NotServiceAccount("sub does not match the namespace and service account claims"));
        }
        Ok(ServiceAccountIdentity {
            namespace: k.namespace,
            service_account: k.serviceaccount.name,
            service_account_uid: k.serviceaccount.uid,
            pod: k.pod.map(|p| (p.name, p.uid)),
            node: k.node.map(|n| n.name),
            expires_at: claims.exp,
        })
    }

    /// Ask the API server (`token_review_url`) whether it still accepts `jwt`, verified as `id`,
    /// with the reviewer's credential: `POST /apis/authentication.k8s.io/v1/tokenreviews` for
    /// this configuration's audience. It must authenticate the token as the same
    /// ServiceAccount, and for a pod-bound token the same pod. Anything else refuses.
    pub async fn review(&self, jwt: &str, reviewer: &str, id: &ServiceAccountIdentity) -> Result<(), AuthnError> {
        let Some(base) = &self.config.token_review_url else { return Ok(()) };
        let url = format!("{}/apis/authentication.k8s.io/v1/tokenreviews", base.trim_end_matches('/'));
        let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": jwt, "audiences": [self.config.audience]}});
        let unavailable = |e: String| AuthnError::ReviewUnavailable(e);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(reviewer)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| unavailable(format!("POST {url}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(unavailable(format!(
                "POST {url}: HTTP {status} (is the reviewer bound to system:auth-delegator?)"
            )));
        }
        // A TokenReview answer is small; a server that streams more is not one.
        let mut resp = resp;
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| unavailable(format!("POST {url}: {e}")))? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_REVIEW_BYTES {
                return Err(unavailable(format!("{url} answered more than {MAX_REVIEW_BYTES} bytes")));
            }
        }
        let review: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|_| unavailable("the TokenReview answer is not JSON".into()))?;
        let st = &review["status"];
        if st["authenticated"] != true {
            let why = st["error"].as_str().filter(|e| !e.is_empty()).unwrap_or("not authenticated");
            return Err(AuthnError::Revoked(why.chars().take(200).collect()));
        }
        let want = format!("system:serviceaccount:{}:{}", id.namespace, id.service_account);
        if st["user"]["username"] != want.as_str() {
            return Err(AuthnError::Revoked(format!("it authenticates as another user than {want}")));
        }
        if let Some((_, pod_uid)) = &id.pod {
            let uids = &st["user"]["extra"]["authentication.kubernetes.io/pod-uid"];
            if !uids.as_array().is_some_and(|a| a.iter().any(|u| u == pod_uid.as_str())) {
                return Err(AuthnError::Revoked("it is not bound to the pod it names".into()));
            }
        }
        Ok(())
    }

    async fn try_keys(&self, jwt: &str, alg: Algorithm, kid: Option<&str>) -> Result<Claims, AuthnError> {
        use jsonwebtoken::errors::ErrorKind as E;
        let cache = self.cache.read().await;
        let candidates: Vec<&Key> = cache
            .keys
            .iter()
            .filter(|k| kid.is_none_or(|want| k.kid.as_deref() == Some(want)))
            .filter(|k| key_fits(&k.jwk, alg))
            .collect();
        if candidates.is_empty() {
            return Err(AuthnError::UnknownKey);
        }
        let validation = self.validation(alg);
        let mut last = AuthnError::BadSignature;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(jwt, &k.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        E::InvalidSignature | E::InvalidAlgorithm | E::InvalidEcdsaKey | E::InvalidRsaKey(_) => {
                            AuthnError::BadSignature
                        }
                        E::ExpiredSignature => return Err(AuthnError::Expired),
                        E::ImmatureSignature => return Err(AuthnError::NotYetValid),
                        E::InvalidIssuer => return Err(AuthnError::WrongIssuer),
                        E::InvalidAudience => return Err(AuthnError::WrongAudience(self.config.audience.clone())),
                        E::MissingRequiredClaim(_) | E::InvalidClaimFormat(_) | E::Json(_) => {
                            return Err(AuthnError::NotServiceAccount("required claims are missing or malformed"));
                        }
                        _ => return Err(AuthnError::Malformed("not a valid JWT")),
                    }
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests;
