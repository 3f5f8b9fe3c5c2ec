//! Sessions: how a request is bound to the image that was measured.
//!
//! Every byte of a request is checked to come from the process that connected (`conn`), but a
//! process keeps its pid, pidfd and start time across `exec`: bytes written by one program can
//! be followed by the `exec` of another, measured in its place. Comparing the process before and
//! after reading is not enough either, because the bytes may have been written before the agent
//! ever saw the process. What proves that the *measured* image wrote a request is a secret it
//! could only have learnt after it was measured:
//!
//! 1. `POST /v1/session`: the agent measures the caller (executable, credentials, cgroup, pod,
//!    code it maps) and records its [`keyward_attest::Stamp`]. It answers a random session
//!    secret, which nobody had before this moment.
//! 2. Each release carries the secret (`keyward-session` header). The agent accepts it only on a
//!    connection pinned to the same process (pid and start time), with every byte written by that
//!    process under the session's real ids, and only if the process's stamp is still the
//!    session's: taken again once the request is read and once more after the answer came back.
//!
//! Whoever wrote the request knew the secret, so wrote it after step 1; between step 1 and the
//! last stamp the image and credentials did not change; so the measured image wrote it. The
//! answer is sealed to the recipient key in that request, which only that image could have
//! chosen. A child reading the session answer over an inherited connection learns the secret
//! but cannot use it: it is another process, on any connection.
//!
//! Secrets are kept as SHA-256 digests; a session lives [`SESSION_TTL`] (the SDK makes a new
//! one when told `session_required`), and each uid holds at most [`MAX_SESSIONS_PER_UID`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyward_attest::Stamp;

/// How long a session is accepted.
pub const SESSION_TTL: Duration = Duration::from_secs(60);
/// Sessions one uid may hold at once (its oldest are dropped first).
pub const MAX_SESSIONS_PER_UID: usize = 256;
/// Sessions held in all.
const MAX_SESSIONS: usize = 65_536;
/// The request header carrying the session secret.
pub const SESSION_HEADER: &str = "keyward-session";

/// What a session binds: one process (pid and start time), its stamp, and what it was measured
/// as.
#[derive(Debug, Clone)]
pub struct Session {
    /// The process: pid and start time.
    pub process: (u32, u64),
    /// What must not have changed.
    pub stamp: Stamp,
    /// The selectors measured at the session's start (the agent's own additions included).
    pub selectors: Vec<String>,
    /// The process runs a trusted launcher (`keyward run`), which may claim the program it will
    /// exec.
    pub launcher: bool,
    /// Effective uid (the launcher's `exec:` selectors name it).
    pub uid: u32,
    created: Instant,
}

impl Session {
    /// A session of `process`.
    pub fn new(process: (u32, u64), stamp: Stamp, selectors: Vec<String>, launcher: bool, uid: u32) -> Self {
        Self { process, stamp, selectors, launcher, uid, created: Instant::now() }
    }
}

/// Why a session was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No such session (never issued, expired or dropped).
    Unknown,
    /// A session of another process.
    OtherProcess,
}

/// The table of live sessions, by SHA-256 of the secret.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

impl Sessions {
    /// Start a session; returns its secret.
    pub fn create(&self, s: Session) -> Result<[u8; 32], keyward_crypto::CryptoError> {
        let mut secret = [0u8; 32];
        keyward_crypto::fill_random(&mut secret)?;
        let key = keyward_crypto::hash::sha256(&secret);
        if let Ok(mut m) = self.map.lock() {
            let uid = s.uid;
            let mine = m.values().filter(|v| v.uid == uid).count();
            if mine >= MAX_SESSIONS_PER_UID || m.len() >= MAX_SESSIONS {
                m.retain(|_, v| v.created.elapsed() < SESSION_TTL);
            }
            while m.values().filter(|v| v.uid == uid).count() >= MAX_SESSIONS_PER_UID || m.len() >= MAX_SESSIONS {
                let oldest = m
                    .iter()
                    .filter(|(_, v)| v.uid == uid || m.len() >= MAX_SESSIONS)
                    .min_by_key(|(_, v)| v.created)
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => {
                        m.remove(&k);
                    }
                    None => break,
                }
            }
            m.insert(key, s);
        }
        Ok(secret)
    }

    /// The session of `secret`, if it is live and belongs to `process`.
    pub fn get(&self, secret: &[u8], process: (u32, u64)) -> Result<Session, Refused> {
        let key = keyward_crypto::hash::sha256(secret);
        let m = self.map.lock().map_err(|_| Refused::Unknown)?;
        let s = m.get(&key).filter(|s| s.created.elapsed() < SESSION_TTL).ok_or(Refused::Unknown)?;
        if s.process != process {
            return Err(Refused::OtherProcess);
        }
        Ok(s.clone())
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
