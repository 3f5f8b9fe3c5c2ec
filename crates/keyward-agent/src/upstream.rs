//! The agent's connection to the Keyward server: join with a one-time token or a projected
//! ServiceAccount token and a key pair generated in memory, keep the agent token renewed (and
//! join again, with a new key, before the token reaches its maximum lifetime or after it was
//! revoked, when the credential allows it), and send signed releases.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_client::{Client, Method};
use keyward_core::release::{BATCH_PROOF_CONTEXT, MAX_BATCH, PROOF_CONTEXT, SIGNATURE_HEADER};
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
    /// As `Kubernetes`, with the token read from this file at every join (the kubelet
    /// refreshes a projected token in place), so the agent can join again on its own.
    KubernetesFile {
        /// Kubernetes auth role.
        role: String,
        /// The projected token's file.
        path: PathBuf,
    },
}

impl JoinCredential {
    /// Whether the credential can be presented again (a join token is single-use).
    pub fn reusable(&self) -> bool {
        !matches!(self, Self::Token(_))
    }
}

impl std::fmt::Debug for JoinCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(_) => f.write_str("JoinCredential::Token([REDACTED])"),
            Self::Kubernetes { role, .. } => {
                write!(f, "JoinCredential::Kubernetes {{ role: {role:?}, jwt: [REDACTED] }}")
            }
            Self::KubernetesFile { role, path } => {
                write!(f, "JoinCredential::KubernetesFile {{ role: {role:?}, path: {path:?} }}")
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
    /// The join credential could not be read.
    #[error("join credential: {0}")]
    Credential(String),
    /// The batch this release travelled in failed as a whole (each of its releases gets this).
    #[error(transparent)]
    Batch(Arc<UpstreamError>),
}

impl UpstreamError {
    /// The server's HTTP status, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Client(c) => c.status(),
            Self::Batch(e) => e.status(),
            _ => None,
        }
    }

    /// The server's error code, when it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Client(c) => c.code(),
            Self::Batch(e) => e.code(),
            _ => None,
        }
    }

    /// The kind of failure, when the client saw one (the server answered, or could not be reached).
    pub fn kind(&self) -> Option<keyward_client::ErrorKind> {
        match self {
            Self::Client(c) => Some(c.kind()),
            Self::Batch(e) => e.kind(),
            _ => None,
        }
    }

    /// Whether the server could not be reached at all (as opposed to answering).
    pub fn unreachable(&self) -> bool {
        match self {
            Self::Client(keyward_client::Error::Transport { .. }) => true,
            Self::Batch(e) => e.unreachable(),
            _ => false,
        }
    }
}

/// Whether the server refused the agent's credential itself (so joining again may help).
fn refused_credential(e: &UpstreamError) -> bool {
    use keyward_client::ErrorKind as K;
    matches!(e.kind(), Some(K::Unauthenticated | K::PermissionDenied))
}

/// What one renewal round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The agent token was renewed.
    Renewed,
    /// The agent joined again: a new key and token (the old token had been revoked, had
    /// expired, or was close to its maximum lifetime).
    Rejoined,
}

/// Whether the token, `elapsed` into a life of at most `max_ttl`, can no longer be renewed for
/// a whole `ttl`: then join again now, while the old token still works.
pub fn due_for_rejoin(elapsed: Duration, ttl: Duration, max_ttl: Duration) -> bool {
    elapsed + ttl > max_ttl
}

/// Nonces fetched in one call.
const NONCE_BATCH: u32 = 16;
/// A nonce is used only while younger than this (the server accepts it for 10 s; the rest is
/// margin for measuring and sending).
const NONCE_USABLE: Duration = Duration::from_secs(7);

/// One join: the agent key, the token bound to it, and its lifetime.
struct Session {
    client: Client,
    key: LoadedKey,
    public_b64: String,
    accessor: String,
    ttl: Duration,
    max_ttl: Duration,
    joined: Instant,
}

/// A joined agent.
pub struct Upstream {
    cfg: UpstreamConfig,
    node: String,
    session: RwLock<Arc<Session>>,
    /// Ready nonces, with the time their batch was *requested* (so their age is never
    /// underestimated) and the session (accessor) they were issued to.
    nonces: Mutex<VecDeque<(String, Instant, String)>>,
    refilling: AtomicBool,
    batches: Mutex<Batches>,
}

/// What a release comes back as: the server's status and body, unchanged.
type ReleaseResult = Result<(u16, Vec<u8>), UpstreamError>;

/// A release waiting for its batch.
struct Pending {
    /// The release, as JSON (`{"nonce", "workload", "recipient", "op"}`).
    item: Vec<u8>,
    done: tokio::sync::oneshot::Sender<ReleaseResult>,
}

/// Releases waiting to be sent, and how many batches are at the server.
#[derive(Default)]
struct Batches {
    queue: Vec<Pending>,
    in_flight: usize,
}

impl Batches {
    /// The next batch to send, counted as out: when none is out, or when a full batch waits
    /// and fewer than [`MAX_IN_FLIGHT`] are out.
    fn take_batch(&mut self) -> Option<Vec<Pending>> {
        let full = self.queue.len() >= MAX_BATCH && self.in_flight < MAX_IN_FLIGHT;
        if self.queue.is_empty() || !(self.in_flight == 0 || full) {
            return None;
        }
        self.in_flight += 1;
        let n = self.queue.len().min(MAX_BATCH);
        Some(self.queue.drain(..n).collect())
    }
}

/// Batches at the server at once. While one is out, releases wait and leave together in the
/// next, so one signature, one request and one round trip serve many; a second (up to this
/// many) leaves early only when a full batch is waiting.
const MAX_IN_FLIGHT: usize = 4;

/// `{"results": [{"status", "body"}]}` of `POST /v1/agent/releases`.
#[derive(serde::Deserialize)]
struct BatchAnswer<'a> {
    #[serde(borrow)]
    results: Vec<BatchResult<'a>>,
}

#[derive(serde::Deserialize)]
struct BatchResult<'a> {
    status: u16,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("node", &self.node).field("accessor", &self.accessor()).finish_non_exhaustive()
    }
}

fn builder(cfg: &UpstreamConfig) -> keyward_client::ClientBuilder {
    let b = Client::builder(cfg.addr.clone()).timeout(Duration::from_secs(15));
    match &cfg.ca_pem {
        Some(pem) => b.ca_cert_pem(pem.clone()),
        None => b,
    }
}

/// Generate a key (memory only) and trade the credential for an agent token bound to it.
async fn open_session(cfg: &UpstreamConfig) -> Result<(Session, String), UpstreamError> {
    let key = LoadedKey::load(KeyAlgorithm::Ed25519, &KeyAlgorithm::Ed25519.generate()?)?;
    let public = key.ed25519_public_raw().ok_or(UpstreamError::Protocol("agent key is not Ed25519"))?;
    let public_b64 = STANDARD.encode(public);
    let anon = builder(cfg).build()?;
    let body = match &cfg.join {
        JoinCredential::Token(t) => json!({"join_token": t.as_str(), "public_key": public_b64}),
        JoinCredential::Kubernetes { role, jwt } => {
            json!({"kubernetes": {"role": role, "jwt": jwt.as_str()}, "public_key": public_b64})
        }
        JoinCredential::KubernetesFile { role, path } => {
            let jwt = Zeroizing::new(tokio::fs::read_to_string(path).await.map_err(|e| {
                UpstreamError::Credential(format!("reading the ServiceAccount token {}: {e}", path.display()))
            })?);
            json!({"kubernetes": {"role": role, "jwt": jwt.trim()}, "public_key": public_b64})
        }
    };
    let v = anon.request(Method::POST, "/v1/auth/agent/join", Some(&body)).await?;
    let token = Zeroizing::new(v["token"].as_str().ok_or(UpstreamError::Protocol("no token"))?.to_string());
    let node = v["node"].as_str().ok_or(UpstreamError::Protocol("no node"))?.to_string();
    let accessor = v["accessor"].as_str().unwrap_or_default().to_string();
    let ttl = Duration::from_secs(v["ttl_secs"].as_u64().unwrap_or(3600).max(60));
    let max_ttl = Duration::from_secs(v["max_ttl_secs"].as_u64().unwrap_or(30 * 86400)).max(ttl);
    let client = builder(cfg).token(token.as_str()).build()?;
    tracing::info!(node = %node, accessor = %accessor, "joined the Keyward server");
    Ok((Session { client, key, public_b64, accessor, ttl, max_ttl, joined: Instant::now() }, node))
}

impl Upstream {
    /// Join: generate the agent key (memory only) and trade the join credential for an agent
    /// token bound to it.
    pub async fn join(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let (session, node) = open_session(cfg).await?;
        Ok(Self {
            cfg: cfg.clone(),
            node,
            session: RwLock::new(Arc::new(session)),
            nonces: Mutex::new(VecDeque::new()),
            refilling: AtomicBool::new(false),
            batches: Mutex::default(),
        })
    }

    fn session(&self) -> Arc<Session> {
        self.session.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The node this agent proved it is.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The accessor of the current agent token.
    pub fn accessor(&self) -> String {
        self.session().accessor.clone()
    }

    /// Join again with a new key; the node must be the same.
    async fn rejoin(&self) -> Result<Renewal, UpstreamError> {
        let (session, node) = open_session(&self.cfg).await?;
        if node != self.node {
            return Err(UpstreamError::Protocol("joining again named another node"));
        }
        let old = std::mem::replace(
            &mut *self.session.write().unwrap_or_else(std::sync::PoisonError::into_inner),
            Arc::new(session),
        );
        if let Ok(mut pool) = self.nonces.lock() {
            pool.clear();
        }
        tracing::info!(node = %self.node, previous = %old.accessor, accessor = %self.accessor(), "joined again");
        // Best effort: the old token is of no further use.
        let _ = old.client.request(Method::POST, "/v1/auth/token/revoke-self", Some(&json!({}))).await;
        Ok(Renewal::Rejoined)
    }

    /// One renewal round: renew the agent token, or join again when it can no longer be
    /// renewed for a whole TTL (its maximum lifetime is near) or the server refuses it
    /// (revoked, expired) and the credential can be presented again.
    pub async fn renew_once(&self) -> Result<Renewal, UpstreamError> {
        let s = self.session();
        if self.cfg.join.reusable() && due_for_rejoin(s.joined.elapsed(), s.ttl, s.max_ttl) {
            return self.rejoin().await;
        }
        match s.client.request(Method::POST, "/v1/auth/token/renew-self", Some(&json!({}))).await {
            Ok(_) => Ok(Renewal::Renewed),
            Err(e)
                if matches!(
                    e.kind(),
                    keyward_client::ErrorKind::Unauthenticated | keyward_client::ErrorKind::PermissionDenied
                ) && self.cfg.join.reusable() =>
            {
                tracing::warn!(error = %e, "the server refused the agent token; joining again");
                self.rejoin().await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Renew at half the TTL, forever (joining again when needed); retries every 10 s after a
    /// failure. With a single-use join token the agent cannot join again by itself: it says so.
    pub async fn keep_renewed(&self) {
        let mut wait = self.session().ttl / 2;
        loop {
            tokio::time::sleep(wait).await;
            match self.renew_once().await {
                Ok(r) => {
                    tracing::debug!(?r, "agent token renewed");
                    wait = self.session().ttl / 2;
                }
                Err(e) => {
                    if !self.cfg.join.reusable() && refused_credential(&e) {
                        tracing::error!(
                            error = %e,
                            "the server refused the agent token and a join token cannot be used again: give the \
                             agent a new join token (or join with --k8s-join-role) and restart it"
                        );
                    } else {
                        tracing::warn!(error = %e, "renewing the agent token failed; retrying");
                    }
                    wait = Duration::from_secs(10);
                }
            }
        }
    }

    async fn fetch_nonces(&self) -> Result<(), UpstreamError> {
        let asked = Instant::now();
        let s = self.session();
        let v = s.client.request(Method::POST, "/v1/agent/nonce", Some(&json!({"count": NONCE_BATCH}))).await?;
        let batch = v["nonces"].as_array().ok_or(UpstreamError::Protocol("no nonces"))?;
        if let Ok(mut pool) = self.nonces.lock() {
            pool.extend(batch.iter().filter_map(|n| n.as_str()).map(|n| (n.to_string(), asked, s.accessor.clone())));
        }
        Ok(())
    }

    fn take_nonce(&self) -> Option<(String, usize)> {
        let current = self.session().accessor.clone();
        let mut pool = self.nonces.lock().ok()?;
        while let Some((n, at, issued_to)) = pool.pop_front() {
            if at.elapsed() < NONCE_USABLE && issued_to == current {
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
    ///
    /// Releases are sent in signed batches (`POST /v1/agent/releases`; a batch of one as a
    /// single release): one leaves at once when no batch is at the server; otherwise it waits
    /// for the next batch.
    pub async fn release(
        self: &Arc<Self>,
        nonce: &str,
        pid: u32,
        selectors: &[String],
        recipient: &str,
        op: Value,
    ) -> ReleaseResult {
        let item = serde_json::to_vec(&json!({
            "nonce": nonce,
            "workload": {"selectors": selectors, "pid": pid},
            "recipient": recipient,
            "op": op,
        }))
        .map_err(|_| UpstreamError::Protocol("request encoding"))?;
        let (done, answer) = tokio::sync::oneshot::channel();
        self.lock_batches().queue.push(Pending { item, done });
        // Batches run in tasks of their own: a workload that hangs up does not cancel the
        // others' releases.
        self.dispatch();
        answer.await.map_err(|_| UpstreamError::Protocol("the release's batch was dropped"))?
    }

    fn lock_batches(&self) -> std::sync::MutexGuard<'_, Batches> {
        self.batches.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Send a batch, hand each release its answer, then send what queued meanwhile.
    async fn run_batch(self: &Arc<Self>, batch: Vec<Pending>) {
        let (items, waiting): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.item, p.done)).unzip();
        match self.send_batch(&items).await {
            Ok(results) => {
                for (done, r) in waiting.into_iter().zip(results) {
                    let _ = done.send(Ok(r));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for done in waiting {
                    let _ = done.send(Err(UpstreamError::Batch(e.clone())));
                }
            }
        }
        self.lock_batches().in_flight -= 1;
        self.dispatch();
    }

    /// Send what is queued, in tasks of their own, while [`Batches::take_batch`] allows.
    fn dispatch(self: &Arc<Self>) {
        while let Some(batch) = self.lock_batches().take_batch() {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.run_batch(batch).await });
        }
    }

    /// One signed batch; a status and body per release, in order. A batch the server refuses
    /// as a whole (bad signature, sealed, audit down) gives every release that refusal.
    async fn send_batch(&self, items: &[Vec<u8>]) -> Result<Vec<(u16, Vec<u8>)>, UpstreamError> {
        let s = self.session();
        let mut body = Vec::with_capacity(64 + items.iter().map(|i| i.len() + 1).sum::<usize>());
        body.extend_from_slice(br#"{"public_key":""#);
        body.extend_from_slice(s.public_b64.as_bytes());
        // A lone release goes as one (`POST /v1/agent/release`): the same checks, and the
        // server writes one audit record instead of two.
        let (path, context) = if let [item] = items {
            body.extend_from_slice(b"\",");
            body.extend_from_slice(item.strip_prefix(b"{").ok_or(UpstreamError::Protocol("request encoding"))?);
            ("/v1/agent/release", PROOF_CONTEXT)
        } else {
            body.extend_from_slice(br#"","releases":["#);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(item);
            }
            body.extend_from_slice(b"]}");
            ("/v1/agent/releases", BATCH_PROOF_CONTEXT)
        };
        let mut signed = context.to_vec();
        signed.extend_from_slice(&body);
        let sig = STANDARD.encode(s.key.sign(&signed)?);
        let (status, bytes) = s.client.request_raw(Method::POST, path, body, &[(SIGNATURE_HEADER, sig)]).await?;
        if items.len() == 1 || !(200..300).contains(&status) {
            return Ok(vec![(status, bytes); items.len()]);
        }
        let answer: BatchAnswer<'_> =
            serde_json::from_slice(&bytes).map_err(|_| UpstreamError::Protocol("the batch answer is not JSON"))?;
        if answer.results.len() != items.len() {
            return Err(UpstreamError::Protocol("the batch answer has the wrong number of results"));
        }
        Ok(answer.results.into_iter().map(|r| (r.status, r.body.get().as_bytes().to_vec())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_batch_out_at_a_time_unless_a_full_one_waits() {
        let mut b = Batches::default();
        let push = |b: &mut Batches, n: usize| {
            for _ in 0..n {
                b.queue.push(Pending { item: b"{}".to_vec(), done: tokio::sync::oneshot::channel().0 });
            }
        };
        assert!(b.take_batch().is_none(), "nothing queued");
        push(&mut b, 1);
        assert_eq!(b.take_batch().map(|v| v.len()), Some(1), "a lone release leaves at once");
        push(&mut b, 5);
        assert!(b.take_batch().is_none(), "waits while a batch is out");
        b.in_flight -= 1;
        assert_eq!(b.take_batch().map(|v| v.len()), Some(5), "leaves together when it is back");
        push(&mut b, MAX_BATCH + 10);
        assert_eq!(b.take_batch().map(|v| v.len()), Some(MAX_BATCH), "a full batch leaves early");
        assert!(b.take_batch().is_none(), "the rest waits");
        push(&mut b, 3 * MAX_BATCH);
        while b.in_flight < MAX_IN_FLIGHT {
            assert_eq!(b.take_batch().map(|v| v.len()), Some(MAX_BATCH));
        }
        assert!(b.take_batch().is_none(), "at most MAX_IN_FLIGHT out");
    }

    #[test]
    fn joins_again_before_the_maximum_lifetime() {
        let (ttl, max) = (Duration::from_secs(3600), Duration::from_secs(30 * 86400));
        assert!(!due_for_rejoin(Duration::ZERO, ttl, max));
        assert!(!due_for_rejoin(max - ttl, ttl, max), "a renewal can still give a whole TTL");
        assert!(due_for_rejoin(max - ttl + Duration::from_secs(1), ttl, max));
        // Renewals come every ttl/2, so the last one before the maximum always joins again
        // while the token is still valid.
        let mut t = Duration::ZERO;
        while !due_for_rejoin(t, ttl, max) {
            t += ttl / 2;
        }
        assert!(t < max, "joined again at {t:?}, before the token's end at {max:?}");
        assert!(!JoinCredential::Token(Zeroizing::new("t".into())).reusable());
        assert!(JoinCredential::KubernetesFile { role: "r".into(), path: "/p".into() }.reusable());
    }
}
