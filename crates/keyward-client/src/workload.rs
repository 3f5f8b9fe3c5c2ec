//! The workload side of attested release: ask the node agent, over its Unix socket, for a
//! secret or a key operation. No token is involved: the agent identifies this process by what
//! it runs. Requests carry the client's X25519 public key (generated when the client is made,
//! kept only in this process's memory); the server seals each answer to it with HPKE, so only
//! this process can open it. Keeping one key per client also lets the agent replay an earlier
//! sealed answer to this same client while the server is unreachable (its outage window).
//!
//! Before its first release the client opens a *session* (`POST /v1/session`): the agent
//! measures this process and answers a secret, which every release then carries. The agent
//! answers a release only while this process is still the image it measured (no `exec`, no
//! credential change), so the secret is worthless to any other process or program. Sessions are
//! renewed by themselves when they expire.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyward_client::Error> {
//! let agent = keyward_client::workload::WorkloadClient::from_env()?;
//! let db = agent.get_secret("payments/db", None).await?;
//! let password = db.data.get("password");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_crypto::hpke::{RELEASE_INFO, RecipientKey};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::{DataKey, Decrypted, Error, Secret, api, unb64};

/// Environment variable naming the agent socket.
pub const ENV_AGENT_SOCKET: &str = "KEYWARD_AGENT_SOCKET";
/// The agent's default socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/keyward/agent.sock";
/// Largest agent response read.
const MAX_RESPONSE: usize = 1024 * 1024;
const AGENT: &str = "the node agent";

/// A client of the node agent's Workload API.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    http: reqwest::Client,
    socket: PathBuf,
    key: std::sync::Arc<RecipientKey>,
    /// For a launcher: the SHA-256 (hex) of the program it will exec, claimed on every request.
    exec_sha256: Option<String>,
    /// For a launcher starting a script: its interpreter's SHA-256 (hex).
    exec_interpreter_sha256: Option<String>,
    /// The session secret (base64) and when it must be renewed.
    session: std::sync::Arc<tokio::sync::Mutex<Option<(String, std::time::Instant)>>>,
}

/// The header carrying the session secret.
const SESSION_HEADER: &str = "keyward-session";

/// A randomized secret's value for this workload.
pub struct Randomized {
    /// The current value.
    pub value: Zeroizing<String>,
    /// Its version.
    pub version: u32,
    /// The value it replaced, during the grace period.
    pub previous: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Randomized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Randomized").field("version", &self.version).finish_non_exhaustive()
    }
}

impl WorkloadClient {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Result<Self, Error> {
        let socket = socket.as_ref().to_path_buf();
        let http = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(format!("agent client: {e}")))?;
        let key = std::sync::Arc::new(RecipientKey::generate().map_err(|e| Error::Config(e.to_string()))?);
        Ok(Self { http, socket, key, exec_sha256: None, exec_interpreter_sha256: None, session: Default::default() })
    }

    /// The agent at `$KEYWARD_AGENT_SOCKET`, or the default socket.
    pub fn from_env() -> Result<Self, Error> {
        Self::new(std::env::var_os(ENV_AGENT_SOCKET).map(PathBuf::from).unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into()))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        session: Option<&str>,
    ) -> Result<Vec<u8>, Error> {
        let addr = self.socket.display().to_string();
        let mut rb = self.http.request(method, format!("http://agent{path}"));
        if let Some(b) = body {
            let bytes = Zeroizing::new(serde_json::to_vec(b).map_err(|e| Error::Decode(e.to_string()))?);
            rb = rb.header("content-type", "application/json").body(bytes.to_vec());
        }
        if let Some(s) = session {
            rb = rb.header(SESSION_HEADER, s);
        }
        let resp = rb.send().await.map_err(|source| Error::transport(AGENT, &addr, source))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|source| Error::transport(AGENT, &addr, source))?;
        if bytes.len() > MAX_RESPONSE {
            return Err(Error::Decode("agent response too large".into()));
        }
        if (200..300).contains(&status) {
            return Ok(bytes.to_vec());
        }
        Err(crate::api_error(status, &bytes))
    }

    /// This process's session secret: the current one, or a new one (`renew`, or none yet, or
    /// about to expire).
    async fn session(&self, renew: bool) -> Result<String, Error> {
        let mut held = self.session.lock().await;
        if let Some((s, until)) = held.as_ref()
            && !renew
            && std::time::Instant::now() < *until
        {
            return Ok(s.clone());
        }
        let v: Value = serde_json::from_slice(&self.send(reqwest::Method::POST, "/v1/session", None, None).await?)
            .map_err(|e| Error::Decode(e.to_string()))?;
        let secret = v["session"].as_str().ok_or_else(|| Error::Decode("no session in the agent's answer".into()))?;
        // Renewed a little before the agent forgets it.
        let ttl = v["expires_in_secs"].as_u64().unwrap_or(60).saturating_sub(5).max(1);
        *held = Some((secret.to_string(), std::time::Instant::now() + Duration::from_secs(ttl)));
        Ok(secret.to_string())
    }

    /// Send a request that needs the session; if the agent no longer knows it (expired, or this
    /// is a forked child of the process that opened it), open a new one and try once more.
    async fn send_in_session(&self, path: &str, body: &Value) -> Result<Vec<u8>, Error> {
        let s = self.session(false).await?;
        match self.send(reqwest::Method::POST, path, Some(body), Some(&s)).await {
            Err(e) if e.code() == Some("session_required") => {
                let s = self.session(true).await?;
                self.send(reqwest::Method::POST, path, Some(body), Some(&s)).await
            }
            other => other,
        }
    }

    /// The selectors the agent measures for this process (to write and debug policies).
    pub async fn whoami(&self) -> Result<Vec<String>, Error> {
        let v: Value = serde_json::from_slice(&self.send(reqwest::Method::GET, "/v1/whoami", None, None).await?)
            .map_err(|e| Error::Decode(e.to_string()))?;
        Ok(v["selectors"].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect())
    }

    /// For a launcher (`keyward run`): claim on every request that the secrets are for the
    /// program with this SHA-256 (hex), which the launcher will exec. The agent honours the claim
    /// only from a trusted launcher and adds the selector `exec:uid:UID:sha256:HEX`, UID being
    /// the launcher's; afterwards [`WorkloadClient::verify_child`] checks the child really runs it.
    pub fn for_exec(mut self, sha256_hex: &str) -> Self {
        self.exec_sha256 = Some(sha256_hex.to_ascii_lowercase());
        self
    }

    /// For a launcher starting a script: the script's SHA-256 is the program claimed with
    /// [`WorkloadClient::for_exec`]; this is its interpreter's (the executable the child will
    /// run, which [`WorkloadClient::verify_child`] checks). The agent adds
    /// `exec:uid:UID:interpreter-sha256:HEX`.
    pub fn with_interpreter(mut self, sha256_hex: &str) -> Self {
        self.exec_interpreter_sha256 = Some(sha256_hex.to_ascii_lowercase());
        self
    }

    /// Ask the agent whether child process `pid` of this process runs the program claimed with
    /// [`WorkloadClient::for_exec`]; returns the child's selectors.
    pub async fn verify_child(&self, pid: u32) -> Result<Vec<String>, Error> {
        let claim = self
            .exec_interpreter_sha256
            .as_deref()
            .or(self.exec_sha256.as_deref())
            .ok_or_else(|| Error::Config("no exec claim (for_exec) to verify".into()))?;
        let body = json!({"pid": pid, "exec_sha256": claim});
        let v: Value = serde_json::from_slice(&self.send_in_session("/v1/verify-child", &body).await?)
            .map_err(|e| Error::Decode(e.to_string()))?;
        Ok(v["selectors"].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect())
    }

    /// Send `body` plus this client's recipient key; open the sealed answer.
    async fn release(&self, path: &str, mut body: Value) -> Result<Zeroizing<Vec<u8>>, Error> {
        let key = &self.key;
        body["recipient"] = Value::String(STANDARD.encode(key.public()));
        if let Some(h) = &self.exec_sha256 {
            body["exec_sha256"] = Value::String(h.clone());
        }
        if let Some(h) = &self.exec_interpreter_sha256 {
            body["exec_interpreter_sha256"] = Value::String(h.clone());
        }
        let bytes = self.send_in_session(path, &body).await?;
        let sealed: api::SealedRelease = serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))?;
        let pt = key
            .open(&unb64(&sealed.enc)?, &unb64(&sealed.ciphertext)?, RELEASE_INFO, &unb64(&sealed.nonce)?)
            .map_err(|_| Error::Decode("the sealed response does not open with this request's key".into()))?;
        Ok(Zeroizing::new(pt.expose().to_vec()))
    }

    /// This workload's value of randomized secret `name` (see the server's `/v1/randomized`):
    /// the current value, its version, and the previous value during the grace period.
    pub async fn randomized(&self, name: &str) -> Result<Randomized, Error> {
        let pt = self.release("/v1/randomized", json!({"name": name})).await?;
        let v: api::RandomizedValue = serde_json::from_slice(&pt).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(Randomized { value: v.value, version: v.version, previous: v.previous.map(|p| p.value) })
    }

    /// Read a secret (latest version if `version` is `None`).
    pub async fn get_secret(&self, path: &str, version: Option<u32>) -> Result<Secret, Error> {
        crate::check_path(path)?;
        let pt = self.release("/v1/secret", json!({"path": path, "version": version})).await?;
        let o: api::Secret = serde_json::from_slice(&pt).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(Secret { version: o.version, data: o.data })
    }

    /// Generate a data key under `key`: its plaintext (only this process sees it) and its
    /// ciphertext to store.
    pub async fn generate_data_key(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
        bytes: Option<usize>,
    ) -> Result<DataKey, Error> {
        let pt = self.release("/v1/data-key", json!({"key": key, "context": context, "bytes": bytes})).await?;
        let o: api::DataKey = serde_json::from_slice(&pt).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(DataKey {
            plaintext: o.plaintext.as_deref().map(|p| unb64(p).map(Zeroizing::new)).transpose()?,
            ciphertext: unb64(&o.ciphertext)?,
            key_version: o.key_version,
        })
    }

    /// Decrypt a ciphertext.
    pub async fn decrypt(&self, ciphertext: &[u8], context: &BTreeMap<String, String>) -> Result<Decrypted, Error> {
        let pt =
            self.release("/v1/decrypt", json!({"ciphertext": STANDARD.encode(ciphertext), "context": context})).await?;
        let o: api::Plaintext = serde_json::from_slice(&pt).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(Decrypted { plaintext: Zeroizing::new(unb64(&o.plaintext)?), key: o.key, key_version: o.key_version })
    }

    /// Sign `message` with `key`; returns the signature.
    pub async fn sign(&self, key: &str, message: &[u8]) -> Result<Vec<u8>, Error> {
        let pt = self.release("/v1/sign", json!({"key": key, "message": STANDARD.encode(message)})).await?;
        let o: api::Signature = serde_json::from_slice(&pt).map_err(|e| Error::Decode(e.to_string()))?;
        unb64(&o.signature)
    }
}
