//! # keyward-client
//!
//! The Rust SDK for Keyward's `/v1` HTTP API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyward_client::Error> {
//! use std::collections::BTreeMap;
//! let client = keyward_client::Client::builder("http://127.0.0.1:8270").token("kwt_...").build()?;
//! let ctx = BTreeMap::from([("tenant".to_string(), "acme".to_string())]);
//! let ct = client.encrypt("payments", b"4111 1111 1111 1111", &ctx).await?;
//! let pt = client.decrypt(&ct.ciphertext, &ctx).await?;
//! assert_eq!(&pt.plaintext[..], b"4111 1111 1111 1111");
//! # Ok(()) }
//! ```
//!
//! Plaintexts and secret values come back in [`zeroize::Zeroizing`] buffers, wiped on drop.
//! The token is held in a wiping buffer and never printed by `Debug`.
//!
//! **Several servers.** The address may list several servers separated by commas
//! (`https://kw-0:8270,https://kw-1:8270`). Requests go to the server that last answered; when
//! it cannot be reached or answers 503 (sealed, or cut off from its database) the request moves
//! on to the next. A request that may have reached a server before the connection failed is
//! retried elsewhere only if repeating it is harmless (reads and cryptographic operations, which
//! change nothing); a write is then reported as failed, since it may or may not have happened.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use zeroize::Zeroizing;

mod builder;
mod error;
mod methods;
pub mod workload;

pub use self::builder::ClientBuilder;
use self::error::*;
pub use self::error::{Error, ErrorKind};
/// The request and answer types and the route paths of the API, as the server has them.
pub use keyward_api as api;
use keyward_api::routes::{self, fill};

/// Environment variable naming the server address.
pub const ENV_ADDR: &str = "KEYWARD_ADDR";
/// Environment variable holding the token.
pub const ENV_TOKEN: &str = "KEYWARD_TOKEN";
/// Environment variable naming a PEM CA certificate file to trust.
pub const ENV_CACERT: &str = "KEYWARD_CACERT";

/// Whether repeating a request on another server is harmless even if the first server may have
/// carried it out: reads, and operations that change no state.
fn repeatable(method: &reqwest::Method, path: &str) -> bool {
    if *method == reqwest::Method::GET {
        return true;
    }
    const STATELESS: &[&str] = &[
        "/encrypt",
        "/generate-data-key",
        "/generate-data-key-without-plaintext",
        "/sign",
        "/verify",
        "/mac",
        "/verify-mac",
    ];
    *method == reqwest::Method::POST
        && ([routes::DECRYPT, routes::REENCRYPT, routes::RANDOM, routes::HEALTH, routes::SYS_AUTHORIZE].contains(&path)
            || (path.starts_with("/v1/keys/") && STATELESS.iter().any(|s| path.ends_with(s))))
}

/// A Keyward API client. Cheap to clone (connections are pooled and shared).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Every server, in the order given.
    addrs: Arc<[String]>,
    /// Index of the server that answered last (shared by clones).
    current: Arc<AtomicUsize>,
    token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addrs", &self.addrs)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

/// Result of encrypt and re-encrypt.
#[derive(Debug, Clone)]
pub struct Encrypted {
    /// Ciphertext envelope.
    pub ciphertext: Vec<u8>,
    /// Key name.
    pub key: String,
    /// Key version used.
    pub key_version: u32,
}

/// Result of reencrypt.
#[derive(Debug)]
pub struct Reencrypted {
    /// The new ciphertext envelope.
    pub ciphertext: Vec<u8>,
    /// Key it is made with.
    pub key: String,
    /// That key's version.
    pub key_version: u32,
    /// Key of the ciphertext given.
    pub source_key: String,
    /// Its version.
    pub source_key_version: u32,
}

/// Result of decrypt.
#[derive(Debug)]
pub struct Decrypted {
    /// Plaintext, wiped on drop.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Key name.
    pub key: String,
    /// Key version the ciphertext was made with.
    pub key_version: u32,
}

/// Result of generate-data-key.
#[derive(Debug)]
pub struct DataKey {
    /// The data key in the clear (absent for the without-plaintext variant).
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
    /// The data key encrypted under the named key.
    pub ciphertext: Vec<u8>,
    /// Key version used.
    pub key_version: u32,
}

/// A secret version.
pub struct Secret {
    /// Version number.
    pub version: u32,
    /// Fields, wiped on drop.
    pub data: BTreeMap<String, Zeroizing<String>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("version", &self.version)
            .field("fields", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

pub(crate) fn unb64(s: &str) -> Result<Vec<u8>, Error> {
    STANDARD.decode(s).map_err(|_| Error::Decode("invalid base64 in response".into()))
}

/// Refuse secret paths that URL normalisation would rewrite (`.`/`..`/empty segments), so the
/// server always sees the path the caller meant.
pub(crate) fn check_path(path: &str) -> Result<(), Error> {
    if path.is_empty() || path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(Error::InvalidArgument(format!("secret path {path:?} has an empty, '.' or '..' segment")));
    }
    Ok(())
}

/// A key name or alias (`alias/NAME`) as one path segment.
pub fn key_segment(name: &str) -> String {
    seg(name).replace('/', "%2F")
}

/// A name (key, alias, policy, role, node, randomized secret) as one path segment, refused
/// when URL resolution would move it to another route (empty, `.` or `..`: their encoded forms
/// are resolved too).
pub(crate) fn name_segment(name: &str) -> Result<String, Error> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(Error::InvalidArgument(format!("{name:?} is not a name")));
    }
    Ok(key_segment(name))
}

/// Percent-encode one path segment (key names are already restricted; this is belt and braces).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@' | b'+') {
            out.push(b as char);
        } else if b == b'/' {
            out.push('/');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// Start building a client for `addr` (e.g. `http://127.0.0.1:8270`).
    pub fn builder(addr: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            addr: addr.into(),
            token: None,
            ca_pem: None,
            identity_pem: None,
            timeout: Duration::from_secs(30),
            pool_max_idle: 64,
        }
    }

    /// A client configured from `KEYWARD_ADDR`, `KEYWARD_TOKEN` and `KEYWARD_CACERT`.
    pub fn from_env() -> Result<Self, Error> {
        let addr = std::env::var(ENV_ADDR).map_err(|_| {
            Error::Config(format!("{ENV_ADDR} is not set: export the address printed by `keyward dev`"))
        })?;
        let mut b = Self::builder(addr);
        if let Ok(t) = std::env::var(ENV_TOKEN) {
            b = b.token(t);
        }
        if let Ok(p) = std::env::var(ENV_CACERT) {
            let pem = std::fs::read(&p).map_err(|e| Error::Config(format!("reading {ENV_CACERT} file {p}: {e}")))?;
            b = b.ca_cert_pem(pem);
        }
        b.build()
    }

    /// The address of the server requests go to now (the one that answered last).
    pub fn addr(&self) -> &str {
        &self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()]
    }

    /// Every server address, in the order given.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Send a request to the current server, failing over to the others (see the crate docs).
    /// Returns the status and body of the first answer that is not a 503, or the last failure.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, String)],
    ) -> Result<(u16, Vec<u8>), Error> {
        let n = self.addrs.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last: Option<Result<(u16, Vec<u8>), Error>> = None;
        for k in 0..n {
            let i = (first + k) % n;
            let addr = &self.addrs[i];
            let mut rb = self.http.request(method.clone(), format!("{addr}{path}"));
            if let Some(t) = &self.token {
                rb = rb.bearer_auth(t.as_str());
            }
            for (k, v) in headers {
                rb = rb.header(*k, v);
            }
            if let Some(b) = body {
                rb = rb.header("content-type", "application/json").body(b.to_vec());
            }
            let outcome = match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match resp.bytes().await {
                        Ok(bytes) => Ok((status, bytes.to_vec())),
                        Err(source) => Err((true, Error::transport(SERVER, addr, source))),
                    }
                }
                Err(source) => Err((!source.is_connect(), Error::transport(SERVER, addr, source))),
            };
            match outcome {
                Ok((503, bytes)) => last = Some(Ok((503, bytes))),
                Ok(answer) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(answer);
                }
                // The request may have been carried out: only repeat what is harmless to repeat.
                Err((true, e)) if !repeatable(&method, path) => return Err(e),
                Err((_, e)) => last = Some(Err(e)),
            }
        }
        last.unwrap_or_else(|| Err(Error::Config("no server address".into())))
    }

    /// Send a request and return the JSON response. `path` starts with `/v1/`.
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, Error> {
        self.call(method, path, body).await
    }

    /// `GET path` and stream the answer into `dest` (a store snapshot, which may be large);
    /// returns the number of bytes written.
    pub async fn download(&self, path: &str, dest: &mut (dyn std::io::Write + Send)) -> Result<u64, Error> {
        let n = self.addrs.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let addr = &self.addrs[(first + k) % n];
            let mut rb = self.http.get(format!("{addr}{path}"));
            if let Some(t) = &self.token {
                rb = rb.bearer_auth(t.as_str());
            }
            let mut resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = Some(Error::transport(SERVER, addr, e));
                    continue;
                }
            };
            let status = resp.status().as_u16();
            if status == 503 && k + 1 < n {
                continue;
            }
            if !(200..300).contains(&status) {
                let body = resp.bytes().await.map_err(|e| Error::transport(SERVER, addr, e))?;
                return Err(api_error(status, &body));
            }
            let mut total = 0u64;
            while let Some(chunk) = resp.chunk().await.map_err(|e| Error::transport(SERVER, addr, e))? {
                dest.write_all(&chunk).map_err(Error::Write)?;
                total += chunk.len() as u64;
            }
            dest.flush().map_err(Error::Write)?;
            return Ok(total);
        }
        Err(last.unwrap_or_else(|| Error::Config("no server address".into())))
    }

    /// Send `body` as JSON with extra headers; return the status and the raw response body,
    /// whatever the status (for relaying responses unchanged).
    pub async fn request_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> Result<(u16, Vec<u8>), Error> {
        let body = Zeroizing::new(body);
        self.send(method, path, Some(&body), headers).await
    }

    /// Send a request with a typed body and decode a typed response.
    async fn call<B: serde::Serialize + ?Sized, R: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, Error> {
        let bytes = body
            .map(|b| serde_json::to_vec(b).map(Zeroizing::new).map_err(|e| Error::Decode(e.to_string())))
            .transpose()?;
        let (status, bytes) = self.send(method, path, bytes.as_deref().map(Vec::as_slice), &[]).await?;
        let bytes = Zeroizing::new(bytes);
        if status == 204 {
            // No content: an answer of `()`.
            return serde_json::from_slice(b"null").map_err(|e| Error::Decode(e.to_string()));
        }
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()));
        }
        Err(api_error(status, &bytes))
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<api::Health, Error> {
        self.call(reqwest::Method::GET, routes::HEALTH, None::<&api::Empty>).await
    }

    /// `POST /v1/keys`: create a key of `key_type` (e.g. `aes256-gcm`), rotated every
    /// `rotate_every` (e.g. `90d`) if given.
    pub async fn create_key(
        &self,
        name: &str,
        key_type: &str,
        description: &str,
        rotate_every: Option<&str>,
    ) -> Result<api::Key, Error> {
        let r = api::CreateKeyReq {
            name: name.into(),
            key_type: key_type.into(),
            description: description.into(),
            rotate_every: rotate_every.map(str::to_string),
        };
        self.call(reqwest::Method::POST, routes::KEYS, Some(&r)).await
    }

    /// `GET /v1/keys/{name}`: a key and its versions.
    pub async fn describe_key(&self, name: &str) -> Result<api::Key, Error> {
        self.call(reqwest::Method::GET, &fill(routes::KEY, &[&name_segment(name)?]), None::<&api::Empty>).await
    }

    /// A key lifecycle action: `enable`, `disable`, `rotate`, `cancel-deletion`.
    pub async fn key_action(&self, name: &str, action: &str) -> Result<api::Key, Error> {
        let route = match action {
            "enable" => routes::KEY_ENABLE,
            "disable" => routes::KEY_DISABLE,
            "rotate" => routes::KEY_ROTATE,
            "cancel-deletion" => routes::KEY_CANCEL_DELETION,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "no key action {action:?}: enable, disable, rotate or cancel-deletion"
                )));
            }
        };
        self.call(reqwest::Method::POST, &fill(route, &[&name_segment(name)?]), Some(&api::Empty {})).await
    }

    /// Schedule deletion after `pending_days` (server default 7).
    pub async fn schedule_deletion(&self, name: &str, pending_days: Option<u32>) -> Result<api::Key, Error> {
        let path = fill(routes::KEY_SCHEDULE_DELETION, &[&name_segment(name)?]);
        self.call(reqwest::Method::POST, &path, Some(&api::ScheduleDeletionReq { pending_days })).await
    }

    /// Encrypt under a key.
    pub async fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<Encrypted, Error> {
        let body = api::EncryptReq { plaintext: Zeroizing::new(STANDARD.encode(plaintext)), context: context.clone() };
        let path = fill(routes::KEY_ENCRYPT, &[&name_segment(key)?]);
        let o: api::Ciphertext = self.call(reqwest::Method::POST, &path, Some(&body)).await?;
        Ok(Encrypted { ciphertext: unb64(&o.ciphertext)?, key: o.key, key_version: o.key_version })
    }

    /// Decrypt a ciphertext (the key is named inside it).
    pub async fn decrypt(&self, ciphertext: &[u8], context: &BTreeMap<String, String>) -> Result<Decrypted, Error> {
        let body = api::DecryptReq { ciphertext: STANDARD.encode(ciphertext), context: context.clone() };
        let o: api::Plaintext = self.call(reqwest::Method::POST, routes::DECRYPT, Some(&body)).await?;
        Ok(Decrypted { plaintext: Zeroizing::new(unb64(&o.plaintext)?), key: o.key, key_version: o.key_version })
    }

    /// Re-encrypt under `destination` (default: same key, newest version).
    pub async fn reencrypt(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        destination: Option<&str>,
        destination_context: &BTreeMap<String, String>,
    ) -> Result<Reencrypted, Error> {
        let body = api::ReencryptReq {
            ciphertext: STANDARD.encode(ciphertext),
            context: context.clone(),
            destination_key: destination.map(str::to_string),
            destination_context: destination_context.clone(),
        };
        let o: api::Reencrypted = self.call(reqwest::Method::POST, routes::REENCRYPT, Some(&body)).await?;
        Ok(Reencrypted {
            ciphertext: unb64(&o.ciphertext)?,
            key: o.key,
            key_version: o.key_version,
            source_key: o.source_key,
            source_key_version: o.source_key_version,
        })
    }

    /// Generate a data key (`with_plaintext` false: the without-plaintext variant).
    pub async fn generate_data_key(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
        bytes: Option<usize>,
        with_plaintext: bool,
    ) -> Result<DataKey, Error> {
        let route = if with_plaintext { routes::KEY_DATA_KEY } else { routes::KEY_DATA_KEY_WITHOUT_PLAINTEXT };
        let body = api::DataKeyReq { context: context.clone(), bytes };
        let o: api::DataKey =
            self.call(reqwest::Method::POST, &fill(route, &[&name_segment(key)?]), Some(&body)).await?;
        Ok(DataKey {
            plaintext: o.plaintext.as_deref().map(|p| unb64(p).map(Zeroizing::new)).transpose()?,
            ciphertext: unb64(&o.ciphertext)?,
            key_version: o.key_version,
        })
    }

    /// Write a secret version; returns the new version number.
    pub async fn put_secret(
        &self,
        path: &str,
        data: &BTreeMap<String, String>,
        cas: Option<u32>,
    ) -> Result<u32, Error> {
        check_path(path)?;
        let body = api::PutSecretReq { data: data.clone(), cas };
        let o: api::SecretWritten =
            self.call(reqwest::Method::PUT, &fill(routes::SECRET_DATA, &[&seg(path)]), Some(&body)).await?;
        Ok(o.version)
    }

    /// Read a secret (latest version if `version` is `None`).
    pub async fn get_secret(&self, path: &str, version: Option<u32>) -> Result<Secret, Error> {
        let s = self.read_secret(path, version).await?;
        Ok(Secret { version: s.version, data: s.data })
    }
}

/// HTTP method type used by [`Client::request`].
pub use reqwest::Method;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn api(status: u16, code: &str) -> Error {
        Error::Api { status, code: code.into(), message: String::new(), request_id: String::new() }
    }

    /// The attack: a name that URL resolution would turn into another route (a script deleting
    /// a role whose name a tenant chose must not delete a policy).
    #[test]
    fn a_name_stays_in_its_route() {
        for bad in ["", ".", ".."] {
            assert!(name_segment(bad).is_err(), "{bad:?}");
        }
        let path = fill(routes::K8S_ROLE, &[&name_segment("../../../policies/prod").unwrap()]);
        let url = reqwest::Url::parse("http://h").unwrap().join(&path).unwrap();
        assert_eq!(url.path(), "/v1/auth/kubernetes/roles/..%2F..%2F..%2Fpolicies%2Fprod");
        let url = reqwest::Url::parse("http://h").unwrap().join(&fill(routes::KEY, &[&name_segment("a?b#c").unwrap()]));
        assert_eq!(url.unwrap().path(), "/v1/keys/a%3Fb%23c");
    }

    #[test]
    fn the_kind_follows_the_code_and_the_status_only_for_unknown_codes() {
        use ErrorKind as K;
        assert_eq!(api(409, "wrong_key_type").kind(), K::FailedPrecondition);
        assert_eq!(api(400, "decryption_failed").kind(), K::DecryptionFailed);
        assert_eq!(api(503, "sealed").kind(), K::Unavailable);
        // The node agent's refusals and outages.
        assert_eq!(api(403, "not_attested").kind(), K::PermissionDenied);
        assert_eq!(api(401, "session_required").kind(), K::Unauthenticated);
        assert_eq!(api(502, "server_unavailable").kind(), K::Unavailable);
        // A server error is not an outage; a code this client does not know falls back on the status.
        assert_eq!(api(500, "internal").kind(), K::Internal);
        assert_eq!(api(404, "some_future_code").kind(), K::NotFound);
        assert_eq!(api(418, "some_future_code").kind(), K::Internal);
        assert_eq!(Error::InvalidArgument("x".into()).kind(), K::InvalidArgument);
        assert_eq!(Error::Decode("x".into()).kind(), K::Internal);
    }

    #[test]
    fn several_addresses_are_parsed_and_checked() {
        let c = Client::builder(" https://a:1/, https://b:2 ,").build().unwrap();
        assert_eq!(c.addrs(), ["https://a:1", "https://b:2"]);
        assert_eq!(c.addr(), "https://a:1");
        assert!(Client::builder("https://a:1,b:2").build().is_err(), "every address needs a scheme");
        assert!(Client::builder(" , ").build().is_err());
        let many = vec!["http://x:1"; 33].join(",");
        assert!(Client::builder(many).build().is_err());
    }

    #[test]
    fn only_harmless_requests_are_repeated_after_an_ambiguous_failure() {
        use reqwest::Method;
        for (m, p) in [
            (Method::GET, "/v1/secrets/data/a"),
            (Method::POST, "/v1/keys/k/encrypt"),
            (Method::POST, "/v1/keys/k/generate-data-key-without-plaintext"),
            (Method::POST, "/v1/keys/k/verify-mac"),
            (Method::POST, "/v1/decrypt"),
            (Method::POST, "/v1/reencrypt"),
        ] {
            assert!(repeatable(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::PUT, "/v1/secrets/data/a"),
            (Method::POST, "/v1/keys"),
            (Method::POST, "/v1/keys/k/rotate"),
            (Method::POST, "/v1/auth/token/create"),
            (Method::DELETE, "/v1/policies/p"),
            (Method::POST, "/v1/secrets/data/encrypt"),
        ] {
            assert!(!repeatable(&m, p), "{m} {p}");
        }
    }
}
