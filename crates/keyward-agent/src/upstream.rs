//! The agent's connection to the Keyward server: join with a one-time token and a key pair
//! generated in memory, keep the agent token renewed, and send signed releases.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_client::{Client, Method};
use keyward_core::release::{PROOF_CONTEXT, SIGNATURE_HEADER};
use keyward_crypto::keys::{KeyAlgorithm, LoadedKey};
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// How the agent proves which node it runs on.
#[derive(Clone)]
pub enum JoinCredential {
    /// A one-time join token (`keyward node join-token`).
    Token(Zeroizing<String>),
    /// A projected ServiceAccount token bound to the agent's pod (and so to its node), checked
    /// by the server's Kubernetes auth method with this role.
    Kubernetes {
        /// Kubernetes auth role.
        role: String,
        /// The token.
        jwt: Zeroizing<String>,
    },
}

impl std::fmt::Debug for JoinCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(_) => f.write_str("JoinCredential::Token([REDACTED])"),
            Self::Kubernetes { role, .. } => {
                write!(f, "JoinCredential::Kubernetes {{ role: {role:?}, jwt: [REDACTED] }}")
            }
        }
    }
}

/// Where the server is and how to join it.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// Server address (`https://…`; `http://` only for a dev server on loopback).
    pub addr: String,
    /// PEM CA bundle to verify the server with (default: system roots).
    pub ca_pem: Option<Vec<u8>>,
    /// The node credential.
    pub join: JoinCredential,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Why the agent could not talk to the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The server refused or could not be reached.
    #[error(transparent)]
    Client(#[from] keyward_client::Error),
    /// Key generation or signing failed.
    #[error("agent key: {0}")]
    Crypto(#[from] keyward_crypto::CryptoError),
    /// The server answered something unexpected.
    #[error("unexpected answer from the server: {0}")]
    Protocol(&'static str),
}

/// Nonces fetched in one call.
const NONCE_BATCH: u32 = 16;
/// A nonce is used only while younger than this (the server accepts it for 10 s; the rest is
/// margin for measuring and sending).
const NONCE_USABLE: Duration = Duration::from_secs(7);

/// A joined agent.
pub struct Upstream {
    client: Client,
    key: LoadedKey,
    public_b64: String,
    node: String,
    accessor: String,
    ttl: Duration,
    /// Ready nonces, with the time their batch was *requested* (so their age is never
    /// underestimated).
    nonces: Mutex<VecDeque<(String, Instant)>>,
    refilling: AtomicBool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("node", &self.node).field("accessor", &self.accessor).finish_non_exhaustive()
    }
}

fn builder(cfg: &UpstreamConfig) -> keyward_client::ClientBuilder {
    let b = Client::builder(cfg.addr.clone()).timeout(Duration::from_secs(15));
    match &cfg.ca_pem {
        Some(pem) => b.ca_cert_pem(pem.clone()),
        None => b,
    }
}

impl Upstream {
    /// Join: generate the agent key (memory only) and trade the join token for an agent token
    /// bound to it.
    pub async fn join(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let key = LoadedKey::load(KeyAlgorithm::Ed25519, &KeyAlgorithm::Ed25519.generate()?)?;
        let public = key.ed25519_public_raw().ok_or(UpstreamError::Protocol("agent key is not Ed25519"))?;
        let public_b64 = STANDARD.encode(public);
        let anon = builder(cfg).build()?;
        let body = match &cfg.join {
            JoinCredential::Token(t) => json!({"join_token": t.as_str(), "public_key": public_b64}),
            JoinCredential::Kubernetes { role, jwt } => {
                json!({"kubernetes": {"role": role, "jwt": jwt.as_str()}, "public_key": public_b64})
            }
        };
        let v = anon.request(Method::POST, "/v1/auth/agent/join", Some(&body)).await?;
        let token = Zeroizing::new(v["token"].as_str().ok_or(UpstreamError::Protocol("no token"))?.to_string());
        let node = v["node"].as_str().ok_or(UpstreamError::Protocol("no node"))?.to_string();
        let accessor = v["accessor"].as_str().unwrap_or_default().to_string();
        let ttl = Duration::from_secs(v["ttl_secs"].as_u64().unwrap_or(3600).max(60));
        let client = builder(cfg).token(token.as_str()).build()?;
        tracing::info!(node = %node, accessor = %accessor, "joined the Keyward server");
        Ok(Self {
            client,
            key,
            public_b64,
            node,
            accessor,
            ttl,
            nonces: Mutex::new(VecDeque::new()),
            refilling: AtomicBool::new(false),
        })
    }

    /// The node this agent proved it is.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Renew the agent token at half its TTL, forever; retries every 10 s after a failure.
    pub async fn keep_renewed(&self) {
        let mut wait = self.ttl / 2;
        loop {
            tokio::time::sleep(wait).await;
            match self.client.request(Method::POST, "/v1/auth/token/renew-self", Some(&json!({}))).await {
                Ok(_) => {
                    tracing::debug!("agent token renewed");
                    wait = self.ttl / 2;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the agent token failed; retrying");
                    wait = Duration::from_secs(10);
                }
            }
        }
    }

    async fn fetch_nonces(&self) -> Result<(), UpstreamError> {
        let asked = Instant::now();
        let v = self.client.request(Method::POST, "/v1/agent/nonce", Some(&json!({"count": NONCE_BATCH}))).await?;
        let batch = v["nonces"].as_array().ok_or(UpstreamError::Protocol("no nonces"))?;
        if let Ok(mut pool) = self.nonces.lock() {
            pool.extend(batch.iter().filter_map(|n| n.as_str()).map(|n| (n.to_string(), asked)));
        }
        Ok(())
    }

    fn take_nonce(&self) -> Option<(String, usize)> {
        let mut pool = self.nonces.lock().ok()?;
        while let Some((n, at)) = pool.pop_front() {
            if at.elapsed() < NONCE_USABLE {
                return Some((n, pool.len()));
            }
        }
        None
    }

    /// A fresh single-use nonce from the server. Get it *before* measuring the workload, so
    /// the measurement is provably newer than the nonce, which the server accepts for 10 s.
    /// Nonces come in batches and are kept ready; the pool is refilled in the background when
    /// it runs low, so a release normally costs one round trip to the server.
    pub async fn nonce(self: &Arc<Self>) -> Result<String, UpstreamError> {
        for _ in 0..2 {
            if let Some((n, left)) = self.take_nonce() {
                if left < (NONCE_BATCH / 2) as usize && !self.refilling.swap(true, Ordering::AcqRel) {
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        if let Err(e) = me.fetch_nonces().await {
                            tracing::warn!(error = %e, "fetching release nonces failed");
                        }
                        me.refilling.store(false, Ordering::Release);
                    });
                }
                return Ok(n);
            }
            self.fetch_nonces().await?;
        }
        Err(UpstreamError::Protocol("the server handed out no usable nonce"))
    }

    /// Ask the server to run `op` as the measured workload and seal the answer to
    /// `recipient`. Returns the server's status and body, unchanged (sealed on success).
    pub async fn release(
        &self,
        nonce: &str,
        pid: u32,
        selectors: &[String],
        recipient: &str,
        op: Value,
    ) -> Result<(u16, Vec<u8>), UpstreamError> {
        let body = serde_json::to_vec(&json!({
            "nonce": nonce,
            "public_key": self.public_b64,
            "workload": {"selectors": selectors, "pid": pid},
            "recipient": recipient,
            "op": op,
        }))
        .map_err(|_| UpstreamError::Protocol("request encoding"))?;
        let mut signed = PROOF_CONTEXT.to_vec();
        signed.extend_from_slice(&body);
        let sig = STANDARD.encode(self.key.sign(&signed)?);
        Ok(self.client.request_raw(Method::POST, "/v1/agent/release", body, &[(SIGNATURE_HEADER, sig)]).await?)
    }
}
