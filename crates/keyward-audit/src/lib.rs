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

mod files;
pub mod key_file;
mod record;
mod verify;
mod writer;

pub use self::files::log_files;
use self::files::*;
use self::record::*;
pub use self::record::{AuditRecord, CHAIN_BEGINS, CHAIN_CONTINUES, now_rfc3339};
use self::verify::*;
pub use self::verify::{VerifyError, VerifyReport, anchor_name, verify_files};
use self::writer::*;

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
