//! The writer thread: takes queued records, chains them, writes and syncs them in groups, and
//! answers each request once its record is durable.

use super::*;

pub(super) struct Job {
    pub(crate) record: AuditRecord,
    pub(crate) done: oneshot::Sender<Result<(), AuditError>>,
}

pub(super) struct Writer {
    pub(crate) cfg: AuditConfig,
    pub(crate) mac_key: hash::HmacKey,
    /// `cfg.server` as a JSON string.
    pub(crate) server: Option<String>,
    pub(crate) head: Arc<Mutex<Head>>,
    pub(crate) file: Option<LogFile>,
    pub(crate) healthy: Arc<AtomicBool>,
    pub(crate) stats: Arc<AuditStats>,
    /// Why the next new file continues the chain (the first record of an empty file says so).
    pub(crate) continues: Option<String>,
}

impl Writer {
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Job>) {
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

    pub(crate) fn write_batch(&mut self, batch: &[Job]) -> Result<(), AuditError> {
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
    pub(crate) fn rotate(&mut self, last_seq: u64) {
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
