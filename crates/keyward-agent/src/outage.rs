//! Sealed answers (never plaintext: they are sealed to the workload's key) kept in memory so
//! that, while the server cannot be reached, a client that asked the same thing before gets the
//! same answer again, for the outage window.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Most sealed answers kept for outages.
const OUTAGE_CACHE_ENTRIES: usize = 4096;

/// A sealed answer and when it was obtained, by cache key.
type SealedAnswers = HashMap<[u8; 32], (Instant, Vec<u8>)>;

/// The cache, by (recipient key, operation, caller's selectors).
#[derive(Debug, Default)]
pub(crate) struct OutageCache {
    entries: Mutex<SealedAnswers>,
    unreachable_since: Mutex<Option<Instant>>,
}

impl OutageCache {
    pub(crate) fn key(recipient: &str, op: &Value, selectors: &[String]) -> [u8; 32] {
        let mut h = keyward_crypto::hash::Sha256Stream::default();
        for part in [recipient, &op.to_string(), &selectors.join("\n")] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finish()
    }

    pub(crate) fn put(&self, key: [u8; 32], sealed: &[u8], window: Duration) {
        if window.is_zero() {
            return;
        }
        if let Ok(mut m) = self.entries.lock() {
            if m.len() >= OUTAGE_CACHE_ENTRIES {
                m.retain(|_, (at, _)| at.elapsed() < window);
                if m.len() >= OUTAGE_CACHE_ENTRIES
                    && let Some(oldest) = m.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k)
                {
                    m.remove(&oldest);
                }
            }
            m.insert(key, (Instant::now(), sealed.to_vec()));
        }
    }

    pub(crate) fn get(&self, key: &[u8; 32], window: Duration) -> Option<(u64, Vec<u8>)> {
        let m = self.entries.lock().ok()?;
        let (at, body) = m.get(key)?;
        (at.elapsed() < window).then(|| (at.elapsed().as_secs(), body.clone()))
    }

    pub(crate) fn reachable(&self, yes: bool) {
        if let Ok(mut u) = self.unreachable_since.lock() {
            match (yes, u.is_some()) {
                (true, true) => {
                    tracing::info!("the Keyward server is reachable again");
                    *u = None;
                }
                (false, false) => {
                    tracing::warn!("the Keyward server is unreachable; answering from the outage cache");
                    *u = Some(Instant::now());
                }
                _ => {}
            }
        }
    }

    pub(crate) fn unreachable_since(&self) -> Option<Instant> {
        self.unreachable_since.lock().ok().and_then(|u| *u)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }
}
