//! # keyward-bench
//!
//! The load generator behind `keyward bench`: N concurrent clients run one operation against a
//! server for a fixed time after a warm-up, and the report gives throughput, latency percentiles
//! (p50/p90/p99/p99.9/max) and the errors by kind.
//!
//! With `verify`, every acknowledged `encrypt` or `secret-put` carries a unique payload and is
//! remembered; after the run each one is read back (decrypted, or the written secret version
//! fetched) and compared, so the report says whether any acknowledged write was lost or any
//! answer was wrong (used by the fail-over tests, where servers are killed under load).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward_client::Client;
use keyward_client::workload::WorkloadClient;
use serde::Serialize;

/// The operation under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// `POST /v1/keys/{key}/encrypt` of `size` bytes.
    Encrypt,
    /// `POST /v1/decrypt` of a ciphertext of `size` bytes.
    Decrypt,
    /// `POST /v1/keys/{key}/generate-data-key`.
    GenerateDataKey,
    /// `GET /v1/secrets/data/{path}` of a secret of `size` bytes.
    SecretGet,
    /// `PUT /v1/secrets/data/{path}/{worker}`: each call adds a version (durable write).
    SecretPut,
    /// `POST /v1/keys`: creates `{key}-{worker}-{n}` (durable write, key generation).
    KeyCreate,
    /// Attested release of a secret of `size` bytes through the node agent at
    /// `agent_socket`: nonce, measurement, signed release, HPKE seal and open.
    WorkloadSecret,
}

impl Op {
    /// Parse a CLI name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "encrypt" => Some(Self::Encrypt),
            "decrypt" => Some(Self::Decrypt),
            "generate-data-key" | "datakey" => Some(Self::GenerateDataKey),
            "secret-get" => Some(Self::SecretGet),
            "secret-put" => Some(Self::SecretPut),
            "key-create" => Some(Self::KeyCreate),
            "workload-secret" => Some(Self::WorkloadSecret),
            _ => None,
        }
    }
}

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Operation.
    pub op: Op,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Warm-up before measuring (not counted).
    pub warmup: Duration,
    /// Payload size in bytes.
    pub size: usize,
    /// Key to use (created as aes256-gcm if missing).
    pub key: String,
    /// Secret path for `secret-get` (and prefix for `secret-put`).
    pub secret_path: String,
    /// Stop after this many operations in total (measured ones), if set.
    pub max_ops: Option<u64>,
    /// The node agent's socket, for `workload-secret`.
    pub agent_socket: Option<std::path::PathBuf>,
    /// Remember acknowledged encryptions and secret writes and check them all after the run.
    pub verify: bool,
}

/// At most this many acknowledged operations are remembered for verification.
pub const MAX_VERIFIED: usize = 1_000_000;

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Operation.
    pub op: Op,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Payload size.
    pub size: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful operations measured.
    pub ops: u64,
    /// Failed operations measured.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Failed operations by kind (`http 503`, `transport`, ...).
    pub error_kinds: BTreeMap<String, u64>,
    /// With `verify`: acknowledged operations read back and found correct.
    pub verified: u64,
    /// With `verify`: acknowledged operations whose read-back was missing or different (lost
    /// writes, wrong answers). Anything but 0 is a failure.
    pub wrong: u64,
    /// With `verify`: acknowledged operations that could not be read back (an error).
    pub unverifiable: u64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "op={:?} concurrency={} size={}B duration={:.1}s",
            self.op, self.concurrency, self.size, self.seconds
        )?;
        writeln!(f, "throughput: {:.0} ops/s  ({} ok, {} errors)", self.ops_per_sec, self.ops, self.errors)?;
        write!(
            f,
            "latency us: p50={} p90={} p99={} p99.9={} max={}",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )?;
        if !self.error_kinds.is_empty() {
            let kinds: Vec<String> = self.error_kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            write!(f, "\nerrors: {}", kinds.join(", "))?;
        }
        if let Some(e) = &self.first_error {
            write!(f, "\nfirst error: {e}")?;
        }
        if self.verified + self.wrong + self.unverifiable > 0 {
            write!(
                f,
                "\nverified: {} correct, {} lost or wrong, {} unreadable",
                self.verified, self.wrong, self.unverifiable
            )?;
        }
        Ok(())
    }
}

/// Errors preparing a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Parameters are invalid.
    #[error("invalid benchmark parameters: {0}")]
    Config(String),
    /// Setup against the server failed.
    #[error("benchmark setup failed: {0}")]
    Setup(#[from] keyward_client::Error),
}

enum Prepared {
    Encrypt(Vec<u8>),
    Decrypt(Vec<u8>),
    DataKey,
    SecretGet,
    SecretPut(String),
    KeyCreate,
    WorkloadSecret(WorkloadClient),
}

async fn prepare(client: &Client, cfg: &BenchConfig) -> Result<Prepared, BenchError> {
    if matches!(cfg.op, Op::Encrypt | Op::Decrypt | Op::GenerateDataKey) {
        match client.describe_key(&cfg.key).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {
                client.create_key(&cfg.key, "aes256-gcm", "created by keyward bench", None).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let payload: Vec<u8> = (0..cfg.size).map(|i| (i % 251) as u8).collect();
    Ok(match cfg.op {
        Op::Encrypt => Prepared::Encrypt(payload),
        Op::Decrypt => Prepared::Decrypt(client.encrypt(&cfg.key, &payload, &BTreeMap::new()).await?.ciphertext),
        Op::GenerateDataKey => Prepared::DataKey,
        Op::SecretGet => {
            let value: String = "x".repeat(cfg.size.max(1));
            client.put_secret(&cfg.secret_path, &BTreeMap::from([("value".to_string(), value)]), None).await?;
            Prepared::SecretGet
        }
        Op::WorkloadSecret => {
            let socket = cfg
                .agent_socket
                .as_ref()
                .ok_or_else(|| BenchError::Config("workload-secret needs --agent-socket".into()))?;
            let value: String = "x".repeat(cfg.size.max(1));
            client.put_secret(&cfg.secret_path, &BTreeMap::from([("value".to_string(), value)]), None).await?;
            // This very program is the workload. It is the generic `keyward` binary, which is no
            // identity by its hash (anyone may run it): the policy names the uid the agent
            // measures for it.
            let workload = WorkloadClient::new(socket)?;
            let uid = workload
                .whoami()
                .await?
                .into_iter()
                .find(|s| s.starts_with("unix:uid:"))
                .ok_or_else(|| BenchError::Config("the agent measured no uid for this program".into()))?;
            let policy = keyward_client::api::PolicyReq {
                description: "created by keyward bench: the benchmark's uid may read its secret".into(),
                identities: vec![vec![uid]],
                rules: vec![keyward_client::api::PolicyRule {
                    resources: vec![format!("secrets/{}", cfg.secret_path)],
                    operations: vec!["read".into()],
                    require: vec![],
                    max_instances: None,
                    instance_hold_secs: None,
                }],
            };
            client.put_policy("keyward-bench-workload", &policy).await?;
            Prepared::WorkloadSecret(workload)
        }
        Op::SecretPut => Prepared::SecretPut("x".repeat(cfg.size.max(1))),
        Op::KeyCreate => Prepared::KeyCreate,
    })
}

/// An acknowledged operation to check after the run.
enum Acked {
    /// A ciphertext and the plaintext it must decrypt to.
    Ciphertext(Vec<u8>, Vec<u8>),
    /// A secret version and the value it must hold.
    SecretVersion(String, u32, String),
}

/// `base` with its start replaced by a marker unique to this operation.
fn unique(base: &[u8], worker: usize, n: u64) -> Vec<u8> {
    let tag = format!("w{worker}n{n}.");
    let mut v = base.to_vec();
    if v.len() < tag.len() {
        v.resize(tag.len(), b'.');
    }
    v[..tag.len()].copy_from_slice(tag.as_bytes());
    v
}

async fn one(
    client: &Client,
    cfg: &BenchConfig,
    p: &Prepared,
    worker: usize,
    n: u64,
) -> Result<Option<Acked>, keyward_client::Error> {
    let ctx = BTreeMap::new();
    if cfg.verify {
        match p {
            Prepared::Encrypt(pt) => {
                let pt = unique(pt, worker, n);
                let ct = client.encrypt(&cfg.key, &pt, &ctx).await?;
                return Ok(Some(Acked::Ciphertext(ct.ciphertext, pt)));
            }
            Prepared::SecretPut(v) => {
                let v = String::from_utf8_lossy(&unique(v.as_bytes(), worker, n)).into_owned();
                let path = format!("{}/w{worker}", cfg.secret_path);
                let data = BTreeMap::from([("value".to_string(), v.clone())]);
                let version = client.put_secret(&path, &data, None).await?;
                return Ok(Some(Acked::SecretVersion(path, version, v)));
            }
            _ => {}
        }
    }
    match p {
        Prepared::SecretPut(v) => {
            let data = BTreeMap::from([("value".to_string(), v.clone())]);
            client.put_secret(&format!("{}/w{worker}", cfg.secret_path), &data, None).await.map(|_| ())
        }
        Prepared::KeyCreate => {
            client.create_key(&format!("{}-{worker}-{n}", cfg.key), "aes256-gcm", "", None).await.map(|_| ())
        }
        Prepared::Encrypt(pt) => client.encrypt(&cfg.key, pt, &ctx).await.map(|_| ()),
        Prepared::Decrypt(ct) => client.decrypt(ct, &ctx).await.map(|_| ()),
        Prepared::DataKey => client.generate_data_key(&cfg.key, &ctx, None, true).await.map(|_| ()),
        Prepared::SecretGet => client.get_secret(&cfg.secret_path, None).await.map(|_| ()),
        Prepared::WorkloadSecret(w) => w.get_secret(&cfg.secret_path, None).await.map(|_| ()),
    }
    .map(|()| None)
}

fn error_kind(e: &keyward_client::Error) -> String {
    match e {
        keyward_client::Error::Api { status, .. } => format!("http {status}"),
        keyward_client::Error::Transport { .. } => "transport".into(),
        _ => "other".into(),
    }
}

/// Read every acknowledged operation back: (correct, lost or wrong, unreadable).
async fn verify(client: &Client, acked: &[Acked]) -> (u64, u64, u64) {
    let (mut ok, mut wrong, mut unreadable) = (0, 0, 0);
    let ctx = BTreeMap::new();
    for a in acked {
        let verdict = match a {
            Acked::Ciphertext(ct, pt) => {
                client.decrypt(ct, &ctx).await.map(|d| d.plaintext.as_slice() == pt.as_slice())
            }
            Acked::SecretVersion(path, version, value) => client
                .get_secret(path, Some(*version))
                .await
                .map(|s| s.version == *version && s.data.get("value").is_some_and(|v| v.as_str() == value)),
            // A version that is not there was lost.
        };
        match verdict {
            Ok(true) => ok += 1,
            Ok(false) => wrong += 1,
            Err(e) if e.status() == Some(404) => wrong += 1,
            Err(_) => unreadable += 1,
        }
    }
    (ok, wrong, unreadable)
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    u64::from(sorted.get(idx.min(sorted.len() - 1)).copied().unwrap_or(0))
}

/// Run the benchmark.
pub async fn run(client: Client, cfg: BenchConfig) -> Result<BenchReport, BenchError> {
    if cfg.concurrency == 0 || cfg.concurrency > 4096 {
        return Err(BenchError::Config("concurrency must be between 1 and 4096".into()));
    }
    if cfg.duration.is_zero() {
        return Err(BenchError::Config("duration must be positive".into()));
    }
    let prepared = Arc::new(prepare(&client, &cfg).await?);
    let cfg = Arc::new(cfg);
    let start = Instant::now() + cfg.warmup;
    let end = start + cfg.duration;
    let mut tasks = Vec::with_capacity(cfg.concurrency);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    for w in 0..cfg.concurrency {
        let (client, cfg, prepared, done) = (client.clone(), cfg.clone(), prepared.clone(), done.clone());
        tasks.push(tokio::spawn(run_worker(client, cfg, prepared, done, w, start, end)));
    }
    let mut total = Tally::default();
    for t in tasks {
        if let Ok(tally) = t.await {
            total.merge(tally);
        }
    }
    let Tally { lat: mut all, errors, first_error, kinds: error_kinds, acked } = total;
    all.sort_unstable();
    let elapsed = started.elapsed().saturating_sub(cfg.warmup);
    let seconds = elapsed.as_secs_f64().min(cfg.duration.as_secs_f64()).max(1e-9);
    let (verified, wrong, unverifiable) = verify(&client, &acked).await;
    Ok(BenchReport {
        op: cfg.op,
        concurrency: cfg.concurrency,
        size: cfg.size,
        seconds,
        ops: all.len() as u64,
        errors,
        first_error,
        error_kinds,
        verified,
        wrong,
        unverifiable,
        ops_per_sec: all.len() as f64 / seconds,
        p50_us: percentile(&all, 50.0),
        p90_us: percentile(&all, 90.0),
        p99_us: percentile(&all, 99.0),
        p999_us: percentile(&all, 99.9),
        max_us: all.last().copied().map_or(0, u64::from),
    })
}

/// What one worker measured, or all of them merged.
#[derive(Default)]
struct Tally {
    /// Latencies of the measured operations that succeeded, in microseconds.
    lat: Vec<u32>,
    /// Measured operations that failed.
    errors: u64,
    /// The first failure's message.
    first_error: Option<String>,
    /// Failures by kind.
    kinds: BTreeMap<String, u64>,
    /// Acknowledged operations to check after the run (warm-up ones too).
    acked: Vec<Acked>,
}

impl Tally {
    /// Add another worker's tally (its first error counts only if none was seen yet).
    fn merge(&mut self, other: Tally) {
        self.lat.extend(other.lat);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        for (k, n) in other.kinds {
            *self.kinds.entry(k).or_default() += n;
        }
        self.acked.extend(other.acked);
    }
}

/// One worker: operations one after another until `end`, or until `max_ops` measured ones were
/// started by all workers together; those before `start` are warm-up, not measured.
async fn run_worker(
    client: Client,
    cfg: Arc<BenchConfig>,
    prepared: Arc<Prepared>,
    done: Arc<std::sync::atomic::AtomicU64>,
    worker: usize,
    start: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally { lat: Vec::with_capacity(1 << 16), ..Tally::default() };
    let mut n = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        if t0 >= start
            && let Some(max) = cfg.max_ops
            && done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= max
        {
            break;
        }
        n += 1;
        let r = one(&client, &cfg, &prepared, worker, n).await;
        let t1 = Instant::now();
        // Warm-up writes are remembered too: every acknowledged write must survive.
        let r = match r {
            Ok(Some(a)) => {
                if tally.acked.len() < MAX_VERIFIED / cfg.concurrency {
                    tally.acked.push(a);
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if t0 < start {
            continue;
        }
        match r {
            Ok(()) => tally.lat.push(u32::try_from((t1 - t0).as_micros()).unwrap_or(u32::MAX)),
            Err(e) => {
                tally.errors += 1;
                *tally.kinds.entry(error_kind(&e)).or_default() += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(e.to_string());
                }
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 501);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
