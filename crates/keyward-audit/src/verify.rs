//! Verifying a log: every record's MAC and sequence, the marker each file begins with, the
//! continuations and gaps between files, the head a live writer or the store's anchor vouches for.

use super::*;

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
pub(super) struct Line {
    pub(crate) seq: u64,
    pub(crate) mac: String,
    pub(crate) prev: String,
    pub(crate) chain: Option<String>,
    pub(crate) reason: Option<String>,
}

/// Verify one line given the expected sequence number and previous MAC; returns its seq and MAC.
pub(super) fn verify_line(key: &[u8], line: &[u8], expect: Option<(u64, &str)>) -> Result<(u64, String), String> {
    verify_line_full(key, line, expect).map(|l| (l.seq, l.mac))
}

pub(super) fn verify_line_full(key: &[u8], line: &[u8], expect: Option<(u64, &str)>) -> Result<Line, String> {
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
pub(super) fn verify_after(
    key: &[u8],
    files: &[PathBuf],
    head: Option<&Head>,
    after: Option<&Head>,
) -> Result<VerifyReport, VerifyError> {
    let ordered = order_by_first_seq(files)?;
    let mut walk = Walk {
        key,
        head,
        after,
        expect: None,
        report: VerifyReport {
            records: 0,
            first_seq: 0,
            last_seq: 0,
            last_hmac: ZERO_MAC.into(),
            continues_after: None,
            note: None,
            gaps: Vec::new(),
        },
        saw_head: head.is_none_or(|h| h.seq == 0),
    };
    for (_, f) in &ordered {
        walk.file(f)?;
    }
    if !walk.saw_head {
        return Err(tail_removed(head, &ordered, &walk.report));
    }
    Ok(walk.report)
}

/// A [`VerifyError`] at `line` of `file`.
fn verify_err(file: &Path, line: u64, reason: String) -> VerifyError {
    VerifyError { file: file.display().to_string(), line, reason }
}

/// The files paired with the sequence number of their first record (0 if unreadable as a
/// record), sorted by it.
fn order_by_first_seq(files: &[PathBuf]) -> Result<Vec<(u64, PathBuf)>, VerifyError> {
    let mut ordered = Vec::new();
    for f in files {
        let first = BufReader::new(File::open(f).map_err(|e| verify_err(f, 0, e.to_string()))?)
            .split(b'\n')
            .next()
            .transpose()
            .map_err(|e| verify_err(f, 0, e.to_string()))?
            .and_then(|l| serde_json::from_slice::<serde_json::Value>(&l).ok())
            .and_then(|v| v["seq"].as_u64())
            .unwrap_or(0);
        ordered.push((first, f.clone()));
    }
    ordered.sort();
    Ok(ordered)
}

/// The error for a log that ends before the record `head` says was written.
fn tail_removed(head: Option<&Head>, ordered: &[(u64, PathBuf)], report: &VerifyReport) -> VerifyError {
    let h = head.map_or(0, |h| h.seq);
    let last = ordered.last().map(|(_, f)| f.clone()).unwrap_or_default();
    verify_err(
        &last,
        report.records,
        format!(
            "log ends at record {} but the server has written record {h}: records were removed from the end",
            report.last_seq
        ),
    )
}

/// The state of a verification walking the files in order.
struct Walk<'a> {
    key: &'a [u8],
    head: Option<&'a Head>,
    after: Option<&'a Head>,
    /// The sequence number and previous MAC the next record must have (none before the first).
    expect: Option<(u64, String)>,
    report: VerifyReport,
    saw_head: bool,
}

impl Walk<'_> {
    /// Verify every record of file `f`, and that only zeros follow the last one.
    fn file(&mut self, f: &Path) -> Result<(), VerifyError> {
        let rd = BufReader::new(File::open(f).map_err(|e| verify_err(f, 0, e.to_string()))?);
        let mut in_tail = false;
        for (i, line) in rd.split(b'\n').enumerate() {
            let n = i as u64 + 1;
            let line = line.map_err(|e| verify_err(f, n, e.to_string()))?;
            // Preallocated space after the last record is all zeros.
            if in_tail || line.first() == Some(&0) {
                if line.iter().any(|b| *b != 0) {
                    return Err(verify_err(f, n, "data after the end of the records".into()));
                }
                in_tail = true;
                continue;
            }
            self.record(f, n, &line)?;
        }
        Ok(())
    }

    /// Verify one record (line `n` of `f`) against the chain so far and the head, and add it.
    fn record(&mut self, f: &Path, n: u64, line: &[u8]) -> Result<(), VerifyError> {
        let l = verify_line_full(self.key, line, self.expect.as_ref().map(|(s, m)| (*s, m.as_str())))
            .map_err(|r| verify_err(f, n, r))?;
        let (seq, mac) = (l.seq, l.mac.clone());
        if self.expect.is_none() {
            self.first_record(f, n, &l)?;
        } else if l.chain.as_deref() == Some(CHAIN_CONTINUES) {
            self.report.gaps.push(format!("record {seq}: {}", l.reason.clone().unwrap_or_default()));
        }
        if let Some(h) = self.head
            && h.seq == seq
        {
            if h.hmac != mac {
                return Err(verify_err(f, n, "record differs from the one the server reports as written".into()));
            }
            self.saw_head = true;
        }
        self.report.records += 1;
        self.report.last_seq = seq;
        self.report.last_hmac.clone_from(&mac);
        self.expect = Some((seq + 1, mac));
        Ok(())
    }

    /// Check that the log's first record `l` (line `n` of `f`) begins a chain or a file, and
    /// note where it begins.
    fn first_record(&mut self, f: &Path, n: u64, l: &Line) -> Result<(), VerifyError> {
        let seq = l.seq;
        // The log must begin where a chain or a file begins: anything else lost its
        // first records (the markers are MACed, so they cannot be made up).
        let genesis = l.seq == 1 && l.prev == ZERO_MAC;
        let follows = self.after.is_some_and(|a| l.seq == a.seq + 1 && l.prev == a.hmac);
        match l.chain.as_deref() {
            Some(CHAIN_CONTINUES) => {
                self.report.continues_after = Some(l.seq - 1);
                self.report.note = l.reason.clone();
            }
            Some(CHAIN_BEGINS) => {}
            _ if genesis || follows => {}
            _ => {
                return Err(verify_err(
                    f,
                    n,
                    format!(
                        "the log begins with record {seq}, which does not begin a chain or a file: the records \
                         before it were removed"
                    ),
                ));
            }
        }
        self.report.first_seq = seq;
        Ok(())
    }
}

/// Read the chain head from the end of an existing file (verifying its last record).
pub(super) fn read_tail(key: &[u8], path: &Path) -> Result<Option<Head>, AuditError> {
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

pub(super) fn anchor_mac(key: &[u8], name: &str, head: &Head) -> String {
    let msg = format!("keyward-audit-anchor/v1\0{name}\0{}\0{}", head.seq, head.hmac);
    hex::encode(hash::hmac_sha256(key, msg.as_bytes()))
}
