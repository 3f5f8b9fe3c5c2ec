//! Keyward's hash-chained audit log, as every daemon writes it (the server, the node agent, the
//! KMS plugin, the CSI provider) and `keyward audit verify` checks it. A record is written
//! *before* the decision it records takes effect, and if it cannot be made durable the request
//! fails.
//!
//! Records are JSON lines. Each line carries `seq` (1, 2, ...) and `prev` (the previous line's
//! MAC) and ends with `"hmac"`: HMAC-SHA256, under an audit key derived from the root key, of the
//! line's bytes up to that field (with the closing brace). Editing, deleting, reordering or
//! inserting a record breaks the chain; truncating the tail is detected by comparing with the
//! head the server reports (`GET /v1/sys/audit`).
//!
//! Writes are group-committed: one writer thread takes every pending record, appends them,
//! calls `fdatasync` once and then releases all the waiting requests. Files rotate by size
//! (`audit.log` becomes `audit.log.<first seq>`); the chain continues across files.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use keyward_crypto::{SecretBytes, hash};
use serde::Serialize;
use tokio::sync::oneshot;

pub mod key_file;

/// The current time as audit records show it (RFC 3339, milliseconds, UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Open (or continue) a component's own audit log, `DIR/audit.log`, whose chain key is kept
/// beside it in `DIR/audit-key` (32 raw bytes, mode 0600, created on first use; the directory
/// is created 0700). For components without a store of their own (the node agent, the KMS
/// plugin in service mode, the CSI provider): the chain shows tampering by anyone who cannot
/// read that key. `keyward audit verify --key-file DIR/audit-key` checks it.
pub fn open_with_key_file(dir: &Path) -> Result<AuditLog, AuditError> {
    use std::os::unix::fs::DirBuilderExt;
    let unavailable = |e: String| AuditError::Unavailable(format!("{}: {e}", dir.display()));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| unavailable(e.to_string()))?;
    let key = key_file::load_or_create(&dir.join("audit-key")).map_err(|e| unavailable(format!("audit key: {e}")))?;
    AuditLog::open(
        AuditConfig { file: dir.join("audit.log"), stdout: false, max_file_bytes: 256 * 1024 * 1024, server: None },
        key,
    )
}

/// Audit configuration.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The audit file.
    pub file: PathBuf,
    /// Also write each record to stdout (JSON lines, not fsync'd).
    pub stdout: bool,
    /// Rotate when the file reaches this size.
    pub max_file_bytes: u64,
    /// This server's id, written into every record (as `server`) when several servers share
    /// one store, so records shipped together (`--audit-stdout`) say which chain they are in.
    pub server: Option<String>,
}

/// Audit failures.
#[derive(Debug, thiserror::Error, Clone)]
#[non_exhaustive]
pub enum AuditError {
    /// The log cannot be written; requests fail until it can.
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// The existing log's last record is not intact; the server refuses to extend it.
    #[error("audit log {path} is damaged at its end ({reason}); run `keyward audit verify` and move the file aside")]
    DamagedTail {
        /// File.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// One audit record, before chaining. Holds no secret values, tokens or plaintext.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 time with milliseconds.
    pub time: String,
    /// Request id (also in the response header `x-request-id`).
    pub request_id: String,
    /// Token accessor, or `anonymous`.
    pub identity: String,
    /// HTTP method.
    pub method: String,
    /// Request path (names keys and secret paths, never values).
    pub path: String,
    /// Operation checked (`encrypt`, `read`, ...), if authorization was reached.
    pub operation: Option<String>,
    /// Resource checked (`keys/NAME`, `secrets/PATH`), if authorization was reached.
    pub resource: Option<String>,
    /// `allow`, `deny`, or `none` (refused before authorization, e.g. bad token).
    pub decision: &'static str,
    /// The grant or the reason for the decision.
    pub reason: Option<String>,
    /// HTTP status of the response.
    pub status: u16,
    /// Error code of the response, if it failed.
    pub error: Option<String>,
    /// The encryption context of a cryptographic operation (not secret, and what says which
    /// object a key was used for, as AWS KMS logs it); absent for other requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<std::collections::BTreeMap<String, String>>,
    /// Where the request came from: the TCP peer (`ip:port`), or the Unix socket peer
    /// (`unix:pid=P,uid=U`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Set on the first record of each file only, by the writer: `begins` (the chain's first
    /// record) or `continues` (a file that carries the chain on after a rotation, or after the
    /// previous file was moved away while the log was open). A log whose first record is not
    /// one of these lost records from its start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<&'static str>,
}

/// The `chain` value of a chain's first record.
pub const CHAIN_BEGINS: &str = "begins";
/// The `chain` value of the first record of a file that continues a chain.
pub const CHAIN_CONTINUES: &str = "continues";

/// The record that opens a file: `begins` the chain, or `continues` it for `why`.
fn marker(continues: Option<String>) -> AuditRecord {
    let (chain, reason) = match continues {
        None => (CHAIN_BEGINS, "audit log begins".to_string()),
        Some(why) => (CHAIN_CONTINUES, why),
    };
    AuditRecord {
        time: now_rfc3339(),
        request_id: "-".into(),
        identity: "keyward".into(),
        method: "-".into(),
        path: "-".into(),
        operation: Some("system".into()),
        resource: None,
        decision: "none",
        reason: Some(reason),
        status: 0,
        error: None,
        context: None,
        client: None,
        chain: Some(chain),
    }
}

struct Job {
    record: AuditRecord,
    done: oneshot::Sender<Result<(), AuditError>>,
}

/// The head of the chain: last sequence number and MAC written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Last sequence number (0 for an empty log).
    pub seq: u64,
    /// Last MAC, hex (64 zeros for an empty log).
    pub hmac: String,
}

/// Counters of the writer since the log was opened.
#[derive(Debug)]
pub struct AuditStats {
    /// Records made durable.
    pub records: AtomicU64,
    /// Group commits (one write and one `fdatasync` each).
    pub batches: AtomicU64,
    /// Time spent writing and syncing, microseconds.
    pub write_micros: AtomicU64,
    /// Records offered and not yet durable (requests waiting for the log).
    pub pending: AtomicU64,
    /// Writes with their `fdatasync`, by how long they took.
    pub sync_seconds: keyward_metrics::prometheus_client::metrics::histogram::Histogram,
}

impl Default for AuditStats {
    fn default() -> Self {
        Self {
            records: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            write_micros: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            sync_seconds: keyward_metrics::latency_histogram(),
        }
    }
}

/// The audit log handle.
pub struct AuditLog {
    /// No earlier record was found when the log was opened (no file, or only empty ones).
    fresh: bool,
    stats: Arc<AuditStats>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    healthy: Arc<AtomicBool>,
    head: Arc<Mutex<Head>>,
    key: Arc<SecretBytes>,
    file: PathBuf,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("file", &self.file).finish_non_exhaustive()
    }
}

const ZERO_MAC: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const MAC_SUFFIX_LEN: usize = r#","hmac":""#.len() + 64 + 2;

fn chain_line(
    key: &hash::HmacKey,
    record: &AuditRecord,
    seq: u64,
    prev: &str,
    server: Option<&str>,
) -> Result<(Vec<u8>, String), AuditError> {
    let mut body = serde_json::to_vec(record).map_err(|e| AuditError::Unavailable(e.to_string()))?;
    // `{...}` -> `{...[,"server":"ID"],"seq":N,"prev":"HEX"}` (`server` already JSON-encoded)
    body.pop();
    if let Some(id) = server {
        body.extend_from_slice(br#","server":"#);
        body.extend_from_slice(id.as_bytes());
    }
    body.extend_from_slice(format!(r#","seq":{seq},"prev":"{prev}"}}"#).as_bytes());
    let mac = hex::encode(key.sign(&body));
    body.pop();
    body.extend_from_slice(format!(r#","hmac":"{mac}"}}"#).as_bytes());
    body.push(b'\n');
    Ok((body, mac))
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// First and last sequence numbers seen.
    pub first_seq: u64,
    /// Last sequence number seen.
    pub last_seq: u64,
    /// MAC of the last record.
    pub last_hmac: String,
    /// The files given begin by continuing a chain after this record (its earlier records are
    /// in other files: rotated ones not given, or a file moved away while the log was open).
    pub continues_after: Option<u64>,
    /// What the first record says about where the chain was before it.
    pub note: Option<String>,
    /// Files within the given ones that continue the chain after a file was moved away or
    /// rotated (each: where, and what its first record says).
    pub gaps: Vec<String>,
}

/// Where and why verification failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct VerifyError {
    /// File.
    pub file: String,
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with that record.
    pub reason: String,
}

/// What one verified line says about the chain.
struct Line {
    seq: u64,
    mac: String,
    prev: String,
    chain: Option<String>,
    reason: Option<String>,
}

/// Verify one line given the expected sequence number and previous MAC; returns its seq and MAC.
fn verify_line(key: &[u8], line: &[u8], expect: Option<(u64, &str)>) -> Result<(u64, String), String> {
    verify_line_full(key, line, expect).map(|l| (l.seq, l.mac))
}

fn verify_line_full(key: &[u8], line: &[u8], expect: Option<(u64, &str)>) -> Result<Line, String> {
    if line.len() < MAC_SUFFIX_LEN + 2 || !line.ends_with(b"\"}") {
        return Err("record is truncated or not a Keyward audit record".into());
    }
    let (head, tail) = line.split_at(line.len() - MAC_SUFFIX_LEN);
    let mac = tail
        .strip_prefix(br#","hmac":""#)
        .and_then(|t| t.strip_suffix(br#""}"#))
        .and_then(|m| std::str::from_utf8(m).ok())
        .ok_or("record has no hmac field at its end")?;
    let mut body = head.to_vec();
    body.push(b'}');
    let want = hex::encode(hash::hmac_sha256(key, &body));
    if !keyward_crypto::ct_eq(want.as_bytes(), mac.as_bytes()) {
        return Err("MAC mismatch: the record was modified (or the key is wrong)".into());
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| "record is not JSON")?;
    let seq = v["seq"].as_u64().ok_or("record has no seq")?;
    let prev = v["prev"].as_str().ok_or("record has no prev")?;
    if let Some((want_seq, want_prev)) = expect {
        if seq != want_seq {
            return Err(format!("expected record {want_seq}, found {seq}: records were deleted or reordered"));
        }
        if prev != want_prev {
            return Err("chain broken: prev does not match the previous record's MAC".into());
        }
    }
    Ok(Line {
        seq,
        mac: mac.to_string(),
        prev: prev.to_string(),
        chain: v["chain"].as_str().map(str::to_string),
        reason: v["reason"].as_str().map(str::to_string),
    })
}

/// Verify audit files (any order; sorted by their first sequence number) with `key`. If `head`
/// is given, the log must contain that record (detects truncation of the tail).
pub fn verify_files(key: &[u8], files: &[PathBuf], head: Option<&Head>) -> Result<VerifyReport, VerifyError> {
    verify_after(key, files, head, None)
}

/// [`verify_files`], where the first file may also begin with the record that follows `after`
/// (the tail of the file rotated before it, already verified): files rotated by versions that
/// wrote no marker at the start of each file.
fn verify_after(
    key: &[u8],
    files: &[PathBuf],
    head: Option<&Head>,
    after: Option<&Head>,
) -> Result<VerifyReport, VerifyError> {
    let err = |file: &Path, line: u64, reason: String| VerifyError { file: file.display().to_string(), line, reason };
    let mut ordered = Vec::new();
    for f in files {
        let first = BufReader::new(File::open(f).map_err(|e| err(f, 0, e.to_string()))?)
            .split(b'\n')
            .next()
            .transpose()
            .map_err(|e| err(f, 0, e.to_string()))?
            .and_then(|l| serde_json::from_slice::<serde_json::Value>(&l).ok())
            .and_then(|v| v["seq"].as_u64())
            .unwrap_or(0);
        ordered.push((first, f.clone()));
    }
    ordered.sort();
    let mut expect: Option<(u64, String)> = None;
    let mut report = VerifyReport {
        records: 0,
        first_seq: 0,
        last_seq: 0,
        last_hmac: ZERO_MAC.into(),
        continues_after: None,
        note: None,
        gaps: Vec::new(),
    };
    let mut saw_head = head.is_none_or(|h| h.seq == 0);
    for (_, f) in &ordered {
        let rd = BufReader::new(File::open(f).map_err(|e| err(f, 0, e.to_string()))?);
        let mut in_tail = false;
        for (i, line) in rd.split(b'\n').enumerate() {
            let n = i as u64 + 1;
            let line = line.map_err(|e| err(f, n, e.to_string()))?;
            // Preallocated space after the last record is all zeros.
            if in_tail || line.first() == Some(&0) {
                if line.iter().any(|b| *b != 0) {
                    return Err(err(f, n, "data after the end of the records".into()));
                }
                in_tail = true;
                continue;
            }
            let l = verify_line_full(key, &line, expect.as_ref().map(|(s, m)| (*s, m.as_str())))
                .map_err(|r| err(f, n, r))?;
            let (seq, mac) = (l.seq, l.mac.clone());
            if expect.is_none() {
                // The log must begin where a chain or a file begins: anything else lost its
                // first records (the markers are MACed, so they cannot be made up).
                let genesis = l.seq == 1 && l.prev == ZERO_MAC;
                let follows = after.is_some_and(|a| l.seq == a.seq + 1 && l.prev == a.hmac);
                match l.chain.as_deref() {
                    Some(CHAIN_CONTINUES) => {
                        report.continues_after = Some(l.seq - 1);
                        report.note = l.reason.clone();
                    }
                    Some(CHAIN_BEGINS) => {}
                    _ if genesis || follows => {}
                    _ => {
                        return Err(err(
                            f,
                            n,
                            format!(
                                "the log begins with record {seq}, which does not begin a chain or a file: the records \
                                 before it were removed"
                            ),
                        ));
                    }
                }
                report.first_seq = seq;
            } else if l.chain.as_deref() == Some(CHAIN_CONTINUES) {
                report.gaps.push(format!("record {seq}: {}", l.reason.clone().unwrap_or_default()));
            }
            if let Some(h) = head
                && h.seq == seq
            {
                if h.hmac != mac {
                    return Err(err(f, n, "record differs from the one the server reports as written".into()));
                }
                saw_head = true;
            }
            report.records += 1;
            report.last_seq = seq;
            report.last_hmac.clone_from(&mac);
            expect = Some((seq + 1, mac));
        }
    }
    if !saw_head {
        let h = head.map_or(0, |h| h.seq);
        let last = ordered.last().map(|(_, f)| f.clone()).unwrap_or_default();
        return Err(err(
            &last,
            report.records,
            format!(
                "log ends at record {} but the server has written record {h}: records were removed from the end",
                report.last_seq
            ),
        ));
    }
    Ok(report)
}

/// Read the chain head from the end of an existing file (verifying its last record).
fn read_tail(key: &[u8], path: &Path) -> Result<Option<Head>, AuditError> {
    let damaged = |reason: String| AuditError::DamagedTail { path: path.display().to_string(), reason };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuditError::Unavailable(e.to_string())),
    };
    let len = f.metadata().map_err(|e| AuditError::Unavailable(e.to_string()))?.len();
    if len == 0 {
        return Ok(None);
    }
    let end = logical_end(&mut f).map_err(|e| AuditError::Unavailable(e.to_string()))?;
    if end == 0 {
        return Ok(None);
    }
    let window = end.min(64 * 1024);
    f.seek(SeekFrom::Start(end - window)).map_err(|e| AuditError::Unavailable(e.to_string()))?;
    let mut buf = vec![0u8; usize::try_from(window).unwrap_or(0)];
    f.read_exact(&mut buf).map_err(|e| AuditError::Unavailable(e.to_string()))?;
    if buf.last() != Some(&b'\n') {
        return Err(damaged("the last record is incomplete".into()));
    }
    buf.pop();
    let start = buf.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let (seq, hmac) = verify_line(key, &buf[start..], None).map_err(damaged)?;
    Ok(Some(Head { seq, hmac }))
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).read(true).write(true).truncate(false).mode(0o600).open(path)
}

/// Bytes added ahead of the records, written as zeros and synced once, so that appending a
/// batch and `fdatasync` touch only data blocks, not the file size (much cheaper on ext4/xfs).
const PREALLOC: u64 = 4 * 1024 * 1024;

/// Where the records end: the file size less any zero-filled preallocated tail.
fn logical_end(f: &mut File) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        match chunk.iter().rposition(|b| *b != 0) {
            Some(i) => return Ok(start + i as u64 + 1),
            None => end = start,
        }
    }
    Ok(0)
}

/// An open audit file with its write position and preallocated end.
struct LogFile {
    file: File,
    pos: u64,
    alloc: u64,
    id: FileId,
}

/// Which file a path or descriptor is: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u32, u32, u64);

impl FileId {
    /// Asks for the inode number only. A `stat` that asks for times marks them as read, and
    /// with multigrain timestamps the next write then takes a fine-grained time and dirties the
    /// inode, which costs every following `fdatasync` an extra synchronous inode write.
    fn of(stx: std::io::Result<rustix::fs::Statx>) -> std::io::Result<Self> {
        let s = stx?;
        Ok(Self(s.stx_dev_major, s.stx_dev_minor, s.stx_ino))
    }

    fn of_path(path: &Path) -> std::io::Result<Self> {
        use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
        Self::of(statx(CWD, path, AtFlags::empty(), StatxFlags::INO).map_err(std::io::Error::from))
    }

    fn of_file(file: &File) -> std::io::Result<Self> {
        use rustix::fs::{AtFlags, StatxFlags, statx};
        Self::of(statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::INO).map_err(std::io::Error::from))
    }
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = open_append(path)?;
        let pos = logical_end(&mut file)?;
        let alloc = file.metadata()?.len();
        let id = FileId::of_file(&file)?;
        Ok(Self { file, pos, alloc, id })
    }

    /// Write `buf` at the end of the records and make it durable.
    fn append_durable(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let need = self.pos + buf.len() as u64;
        if need > self.alloc {
            let new_alloc = need + PREALLOC;
            let zeros = vec![0u8; usize::try_from(new_alloc - self.alloc).unwrap_or(0)];
            self.file.write_all_at(&zeros, self.alloc)?;
            self.file.sync_all()?;
            self.alloc = new_alloc;
        }
        if let Err(e) = self.file.write_all_at(buf, self.pos).and_then(|()| self.file.sync_data()) {
            // Best effort: leave zeros where the failed batch went, so the tail stays clean.
            let _ = self.file.write_all_at(&vec![0u8; buf.len()], self.pos);
            return Err(e);
        }
        self.pos = need;
        Ok(())
    }

    /// Drop the preallocated tail (before rotation or shutdown).
    fn trim(&self) -> std::io::Result<()> {
        self.file.set_len(self.pos)?;
        self.file.sync_all()
    }
}

impl AuditLog {
    /// Open (or continue) the log and start its writer thread.
    pub fn open(cfg: AuditConfig, key: SecretBytes) -> Result<Self, AuditError> {
        let key = Arc::new(key);
        // Continue the chain from the current file, or from the newest rotated file.
        let mut head = read_tail(key.expose(), &cfg.file)?;
        let mut continues = None;
        if head.is_some() {
            // The whole current file must verify and begin where a chain or a file begins (or,
            // for a file rotated by an older version, right after the rotated file's last
            // record): records removed from its start, middle or end, or reordered, refuse to
            // continue it.
            let before = match newest_rotated(&cfg.file) {
                Some(p) => read_tail(key.expose(), &p)?,
                None => None,
            };
            verify_after(key.expose(), std::slice::from_ref(&cfg.file), None, before.as_ref())
                .map_err(|e| AuditError::DamagedTail { path: cfg.file.display().to_string(), reason: e.to_string() })?;
        } else if let Some(p) = newest_rotated(&cfg.file) {
            head = read_tail(key.expose(), &p)?;
            if let Some(h) = &head {
                continues = Some(format!("continues the chain after record {} of {}", h.seq, p.display()));
            }
        }
        let fresh = head.is_none();
        let head = Arc::new(Mutex::new(head.unwrap_or(Head { seq: 0, hmac: ZERO_MAC.into() })));
        let file =
            LogFile::open(&cfg.file).map_err(|e| AuditError::Unavailable(format!("{}: {e}", cfg.file.display())))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let healthy = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(AuditStats::default());
        let writer = Writer {
            cfg: cfg.clone(),
            mac_key: hash::HmacKey::new(key.expose()),
            server: cfg.server.as_deref().map(|s| serde_json::Value::from(s).to_string()),
            head: head.clone(),
            file: Some(file),
            healthy: healthy.clone(),
            stats: stats.clone(),
            continues,
        };
        let thread = std::thread::Builder::new()
            .name("keyward-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        Ok(Self {
            fresh,
            stats,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            healthy,
            head,
            key,
            file: cfg.file,
        })
    }

    /// Whether the last write succeeded. While false, the server refuses requests *before*
    /// running them (their refusal is still offered to the log, which is how it recovers).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A record about the server itself (start-up), written and made durable now.
    pub async fn system_event(&self, what: &str) -> Result<(), AuditError> {
        self.append(AuditRecord {
            time: now_rfc3339(),
            request_id: "-".into(),
            identity: "keyward".into(),
            method: "-".into(),
            path: "-".into(),
            operation: Some("system".into()),
            resource: None,
            decision: "none",
            reason: Some(what.to_string()),
            status: 0,
            error: None,
            context: None,
            client: None,
            chain: None,
        })
        .await
    }

    /// Append a record and wait until it is durable.
    pub async fn append(&self, record: AuditRecord) -> Result<(), AuditError> {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        let r = self.append_inner(record).await;
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
        r
    }

    async fn append_inner(&self, record: AuditRecord) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .lock()
            .map_err(|_| AuditError::Unavailable("writer lock poisoned".into()))?
            .as_ref()
            .ok_or_else(|| AuditError::Unavailable("audit log closed".into()))?
            .send(Job { record, done })
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?;
        wait.await.map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// This log's anchor for the store: its head, MACed under the audit key with the anchor's
    /// name, so that the store cannot be made to vouch for another log or a forged head.
    pub fn anchor_bytes(&self, name: &str, head: &Head) -> Vec<u8> {
        serde_json::json!({"seq": head.seq, "hmac": head.hmac, "mac": anchor_mac(self.key.expose(), name, head)})
            .to_string()
            .into_bytes()
    }

    /// Check the log against its anchor (`stored`, from the store). Records removed from the end
    /// while the server was stopped are an error. A log with no earlier records at all (its files
    /// moved away, emptied or deleted) starts a new chain: returns the record the old one had reached,
    /// for a system record that says so.
    pub fn check_anchor(&self, name: &str, stored: Option<&[u8]>) -> Result<Option<u64>, AuditError> {
        let Some(stored) = stored else { return Ok(None) };
        let damaged = |reason: String| AuditError::DamagedTail { path: self.file.display().to_string(), reason };
        let v: serde_json::Value = serde_json::from_slice(stored)
            .map_err(|_| damaged("the store's anchor of this log is not readable".into()))?;
        let anchored =
            Head { seq: v["seq"].as_u64().unwrap_or(0), hmac: v["hmac"].as_str().unwrap_or_default().to_string() };
        let mac = v["mac"].as_str().unwrap_or_default();
        if !keyward_crypto::ct_eq(mac.as_bytes(), anchor_mac(self.key.expose(), name, &anchored).as_bytes()) {
            return Err(damaged("the store's anchor of this log does not verify under the audit key".into()));
        }
        let head = self.head();
        if self.fresh {
            return Ok((anchored.seq > 0).then_some(anchored.seq));
        }
        if head.seq < anchored.seq {
            return Err(damaged(format!(
                "the log ends at record {} but the store's anchor says record {} was written: records were removed \
                 from the end (keep the files for investigation; moving every file of this log away starts a new \
                 chain)",
                head.seq, anchored.seq
            )));
        }
        if head.seq == anchored.seq && !keyward_crypto::ct_eq(head.hmac.as_bytes(), anchored.hmac.as_bytes()) {
            return Err(damaged(format!("record {} differs from the one the store's anchor names", head.seq)));
        }
        Ok(None)
    }

    /// The last record written.
    pub fn head(&self) -> Head {
        self.head.lock().map(|h| h.clone()).unwrap_or(Head { seq: 0, hmac: ZERO_MAC.into() })
    }

    /// The HMAC key, for `keyward audit verify` (root only).
    pub fn key(&self) -> &SecretBytes {
        &self.key
    }

    /// The current file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Writer counters.
    pub fn stats(&self) -> &AuditStats {
        &self.stats
    }
}

impl Drop for AuditLog {
    /// Stop the writer after it has written everything queued, and wait for it, so that a new
    /// log opened on the same file (a restart) never races with this one.
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// Where the store keeps the anchor of the log in `file` on this host: one per host and file,
/// so the servers sharing a store each keep their own.
pub fn anchor_name(file: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut id = host.trim().as_bytes().to_vec();
    id.push(0);
    id.extend_from_slice(abs.as_os_str().as_bytes());
    format!("audit-anchor/{}", hex::encode(&hash::sha256(&id)[..16]))
}

fn anchor_mac(key: &[u8], name: &str, head: &Head) -> String {
    let msg = format!("keyward-audit-anchor/v1\0{name}\0{}\0{}", head.seq, head.hmac);
    hex::encode(hash::hmac_sha256(key, msg.as_bytes()))
}

fn rotated_files(current: &Path) -> Vec<(u64, PathBuf)> {
    let (Some(dir), Some(name)) = (current.parent(), current.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
        for e in rd.flatten() {
            let fname = e.file_name();
            if let Some(n) = fname.to_str().and_then(|s| s.strip_prefix(&prefix)).and_then(|s| s.parse::<u64>().ok()) {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    out
}

fn newest_rotated(current: &Path) -> Option<PathBuf> {
    rotated_files(current).pop().map(|(_, p)| p)
}

/// All files of a log (rotated ones first), for verification.
pub fn log_files(current: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = rotated_files(current).into_iter().map(|(_, p)| p).collect();
    if current.exists() {
        v.push(current.to_path_buf());
    }
    v
}

struct Writer {
    cfg: AuditConfig,
    mac_key: hash::HmacKey,
    /// `cfg.server` as a JSON string.
    server: Option<String>,
    head: Arc<Mutex<Head>>,
    file: Option<LogFile>,
    healthy: Arc<AtomicBool>,
    stats: Arc<AuditStats>,
    /// Why the next new file continues the chain (the first record of an empty file says so).
    continues: Option<String>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut failed: Option<String> = None;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            let result = match &failed {
                Some(reason) => Err(AuditError::Unavailable(reason.clone())),
                None => self.write_batch(&batch),
            };
            if let Err(AuditError::Unavailable(r)) = &result
                && r.starts_with("unrecoverable")
            {
                failed = Some(r.clone());
            }
            if result.is_err() {
                tracing::error!(error = ?result, "audit write failed; failing requests until it succeeds");
            }
            self.healthy.store(result.is_ok(), Ordering::Relaxed);
            for j in batch {
                let _ = j.done.send(result.clone());
            }
        }
        // Every sender is gone: the server is stopping. Leave a file without the zero tail.
        if let Some(f) = self.file.take() {
            let _ = f.trim();
        }
    }

    fn write_batch(&mut self, batch: &[Job]) -> Result<(), AuditError> {
        let unavailable = |e: std::io::Error| AuditError::Unavailable(e.to_string());
        let (mut seq, mut prev) = {
            let h = self.head.lock().map_err(|_| AuditError::Unavailable("head lock poisoned".into()))?;
            (h.seq, h.hmac.clone())
        };
        // If the file was moved or replaced (external rotation, operator action), reopen the path.
        if let Some(f) = &self.file
            && FileId::of_path(&self.cfg.file).ok() != Some(f.id)
        {
            self.file = None;
            self.continues = Some(format!(
                "continues the chain after record {seq}: the previous file was moved away or replaced while the log \
                 was open"
            ));
        }
        if self.file.is_none() {
            self.file = Some(LogFile::open(&self.cfg.file).map_err(unavailable)?);
        }
        let mut buf = Vec::with_capacity((batch.len() + 1) * 400);
        // A new file opens with a record that says what it is: the chain's beginning, or where
        // the chain was before it.
        let opening = match &self.file {
            Some(f) if f.pos == 0 => Some(marker(if seq == 0 { None } else { self.continues.clone() })),
            _ => None,
        };
        for record in opening.iter().chain(batch.iter().map(|j| &j.record)) {
            seq += 1;
            let (line, mac) = chain_line(&self.mac_key, record, seq, &prev, self.server.as_deref())?;
            buf.extend_from_slice(&line);
            prev = mac;
        }
        let file = self.file.as_mut().ok_or_else(|| AuditError::Unavailable("no audit file".into()))?;
        let started = std::time::Instant::now();
        file.append_durable(&buf).map_err(unavailable)?;
        let took = started.elapsed();
        self.stats.sync_seconds.observe(took.as_secs_f64());
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.stats.write_micros.fetch_add(micros, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.records.fetch_add(batch.len() as u64, Ordering::Relaxed);
        if opening.is_some() {
            self.continues = None;
        }
        let written = file.pos;
        if let Ok(mut h) = self.head.lock() {
            *h = Head { seq, hmac: prev };
        }
        if self.cfg.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&buf).and_then(|()| out.flush());
        }
        if written >= self.cfg.max_file_bytes {
            self.rotate(seq);
        }
        Ok(())
    }

    /// Move the full file aside as `FILE.<last seq + 1>`-ordered name and start a new one.
    fn rotate(&mut self, last_seq: u64) {
        if let Some(f) = self.file.take()
            && let Err(e) = f.trim()
        {
            tracing::warn!(error = %e, "could not trim the audit file before rotation");
        }
        let target = PathBuf::from(format!("{}.{}", self.cfg.file.display(), last_seq));
        match std::fs::rename(&self.cfg.file, &target) {
            Ok(()) => {
                tracing::info!(file = %target.display(), "audit log rotated");
                self.continues =
                    Some(format!("continues the chain after record {last_seq} of {} (rotated)", target.display()));
            }
            Err(e) => tracing::warn!(error = %e, "audit log rotation failed; continuing in the same file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> AuditRecord {
        AuditRecord {
            time: "t".into(),
            request_id: format!("r{i}"),
            identity: "acc".into(),
            method: "POST".into(),
            path: "/v1/x".into(),
            operation: Some("encrypt".into()),
            resource: Some("keys/k".into()),
            decision: "allow",
            reason: None,
            status: 200,
            error: None,
            context: None,
            client: None,
            chain: None,
        }
    }

    fn write_log(dir: &Path, n: u32, max: u64) -> (AuditLog, PathBuf) {
        let file = dir.join("audit.log");
        let log = AuditLog::open(
            AuditConfig { file: file.clone(), stdout: false, max_file_bytes: max, server: None },
            SecretBytes::copy_from(&[5; 32]),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for i in 0..n {
            rt.block_on(log.append(rec(i))).unwrap();
        }
        (log, file)
    }

    /// The records of a live file (without the preallocated zero tail).
    fn records(p: &Path) -> Vec<u8> {
        let mut b = std::fs::read(p).unwrap();
        while b.last() == Some(&0) {
            b.pop();
        }
        b
    }

    fn lines(p: &Path) -> Vec<String> {
        String::from_utf8(records(p)).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn chain_verifies_and_detects_edit_delete_reorder_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let (log, file) = write_log(dir.path(), 6, u64::MAX);
        let key = [5u8; 32];
        let head = log.head();
        assert_eq!(head.seq, 7, "the file opens with its marker, then the 6 records");
        let r = verify_files(&key, std::slice::from_ref(&file), Some(&head)).unwrap();
        assert_eq!((r.records, r.first_seq, r.last_seq), (7, 1, 7));
        assert_eq!(r.continues_after, None);
        assert!(verify_files(&[6u8; 32], std::slice::from_ref(&file), None).is_err(), "wrong key");

        let orig = lines(&file);
        let check = |ls: Vec<String>, want_line: u64| {
            let p = dir.path().join("tampered.log");
            std::fs::write(&p, ls.join("\n") + "\n").unwrap();
            let e = verify_files(&key, &[p], Some(&head)).unwrap_err();
            assert_eq!(e.line, want_line, "{e}");
        };
        let mut edited = orig.clone();
        edited[2] = edited[2].replace("keys/k", "keys/K");
        check(edited, 3);
        let mut deleted = orig.clone();
        deleted.remove(3);
        check(deleted, 4);
        let mut reordered = orig.clone();
        reordered.swap(1, 2);
        check(reordered, 2);
        // Records removed from the start: the first one left does not begin a chain or a file.
        for cut in [1, 3] {
            let p = dir.path().join("headless.log");
            std::fs::write(&p, orig[cut..].join("\n") + "\n").unwrap();
            let e = verify_files(&key, &[p], Some(&head)).unwrap_err();
            assert!(e.reason.contains("does not begin a chain"), "{e}");
        }
        let truncated = orig[..4].to_vec();
        let p = dir.path().join("truncated.log");
        std::fs::write(&p, truncated.join("\n") + "\n").unwrap();
        let e = verify_files(&key, &[p], Some(&head)).unwrap_err();
        assert!(e.reason.contains("removed from the end"), "{e}");
        let mut partial = orig.join("\n");
        partial.truncate(partial.len() - 10);
        let p = dir.path().join("partial.log");
        std::fs::write(&p, partial).unwrap();
        assert!(verify_files(&key, &[p], Some(&head)).is_err());
    }

    #[test]
    fn reopen_continues_chain_and_rotation_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, file) = write_log(dir.path(), 3, 1500);
        drop(log);
        let (log, _) = write_log(dir.path(), 10, 1500);
        let head = log.head();
        let files = log_files(&file);
        assert!(files.len() > 2, "rotated by size: {files:?}");
        // One marker for the chain's start, one opening each file after a rotation.
        assert_eq!(head.seq, 13 + files.len() as u64, "chain continued after reopen");
        let r = verify_files(&[5; 32], &files, Some(&head)).unwrap();
        assert_eq!((r.records, r.first_seq, r.last_seq), (head.seq, 1, head.seq));
        assert_eq!(r.gaps.len(), files.len() - 1, "{r:?}");
        // Dropping a whole rotated file in the middle is detected.
        let mut missing = files.clone();
        missing.remove(1);
        assert!(verify_files(&[5; 32], &missing, Some(&head)).is_err());
        // The newest files alone verify, and say where they continue from.
        let newest = files[files.len() - 1..].to_vec();
        let r = verify_files(&[5; 32], &newest, Some(&head)).unwrap();
        assert!(r.continues_after.is_some() && r.note.as_deref().unwrap().contains("rotated"), "{r:?}");
    }

    #[test]
    fn a_file_moved_away_while_open_leaves_a_marked_gap() {
        let dir = tempfile::tempdir().unwrap();
        let (log, file) = write_log(dir.path(), 4, u64::MAX);
        std::fs::rename(&file, dir.path().join("hidden.log")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(log.append(rec(9))).unwrap();
        let head = log.head();
        // The new file alone: it says it continues after record 5, and that the file before it
        // was moved away.
        let r = verify_files(&[5; 32], std::slice::from_ref(&file), Some(&head)).unwrap();
        assert_eq!(r.continues_after, Some(5));
        assert!(r.note.as_deref().unwrap().contains("moved away"), "{r:?}");
        // With the moved file: one chain, with the gap named.
        let r = verify_files(&[5; 32], &[dir.path().join("hidden.log"), file.clone()], Some(&head)).unwrap();
        assert_eq!((r.first_seq, r.continues_after, r.gaps.len()), (1, None, 1));
        drop(log);
        // A file whose first records are cut is refused at the next open.
        let keep: Vec<String> = lines(&dir.path().join("hidden.log"))[2..].to_vec();
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, keep.join("\n") + "\n").unwrap();
        let e = AuditLog::open(
            AuditConfig { file: file.clone(), stdout: false, max_file_bytes: u64::MAX, server: None },
            SecretBytes::copy_from(&[5; 32]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not begin a chain"), "{e}");
    }

    #[test]
    fn a_file_rotated_without_a_marker_opens_only_if_it_follows_the_rotated_one() {
        // Versions before the markers rotated without one: the new file began with the record
        // after the rotated file's last. Such a log still opens, and a cut still refuses it.
        let dir = tempfile::tempdir().unwrap();
        let (log, file) = write_log(dir.path(), 6, u64::MAX);
        let head = log.head();
        drop(log);
        let all = lines(&file);
        let open = || {
            AuditLog::open(
                AuditConfig { file: file.clone(), stdout: false, max_file_bytes: u64::MAX, server: None },
                SecretBytes::copy_from(&[5; 32]),
            )
        };
        let rotated = dir.path().join("audit.log.1");
        std::fs::write(&rotated, all[..3].join("\n") + "\n").unwrap();
        std::fs::write(&file, all[3..].join("\n") + "\n").unwrap();
        let log = open().unwrap();
        assert_eq!(log.head(), head, "continues the legacy chain");
        drop(log);
        let r = verify_files(&[5; 32], &log_files(&file), None).unwrap();
        assert_eq!((r.first_seq, r.last_seq), (1, head.seq));
        // Its first record removed: refused.
        std::fs::write(&file, all[4..].join("\n") + "\n").unwrap();
        assert!(open().unwrap_err().to_string().contains("does not begin a chain"));
        // The rotated file removed: nothing vouches for where it begins.
        std::fs::write(&file, all[3..].join("\n") + "\n").unwrap();
        std::fs::remove_file(&rotated).unwrap();
        assert!(open().unwrap_err().to_string().contains("does not begin a chain"));
    }

    #[test]
    fn damaged_tail_refuses_to_open_and_unwritable_sink_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (log, file) = write_log(dir.path(), 2, u64::MAX);
        drop(log);
        let mut s = records(&file);
        s.truncate(s.len() - 5);
        std::fs::write(&file, s).unwrap();
        let e = AuditLog::open(
            AuditConfig { file: file.clone(), stdout: false, max_file_bytes: u64::MAX, server: None },
            SecretBytes::copy_from(&[5; 32]),
        )
        .unwrap_err();
        assert!(matches!(e, AuditError::DamagedTail { .. }), "{e}");

        let full = AuditLog::open(
            AuditConfig { file: PathBuf::from("/dev/full"), stdout: false, max_file_bytes: u64::MAX, server: None },
            SecretBytes::copy_from(&[5; 32]),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(full.append(rec(1))).is_err(), "a sink that cannot write fails the request");
    }

    #[test]
    fn records_hold_no_values() {
        let (line, _) = chain_line(&hash::HmacKey::new(&[1; 32]), &rec(1), 1, ZERO_MAC, None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in keys {
            assert!(
                [
                    "time",
                    "request_id",
                    "identity",
                    "method",
                    "path",
                    "operation",
                    "resource",
                    "decision",
                    "reason",
                    "status",
                    "error",
                    "seq",
                    "prev",
                    "hmac"
                ]
                .contains(&k),
                "unexpected field {k}"
            );
        }
    }
}
