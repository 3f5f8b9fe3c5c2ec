//! Who a caller is: measure the pinned process, check that it may be attested at all, and turn
//! what was measured into selectors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use keyward_attest::{AttestError, Measurement, Measurer, Stamp};
use tokio::sync::Semaphore;

use crate::listener::Caller;
use crate::outage::OutageCache;
use crate::session::Sessions;
use crate::upstream::Upstream;
use crate::{AgentError, AgentLog, kubelet};

/// Executables one uid may have hashed at once (a new executable is hashed once; a caller
/// naming many large files only waits for its own).
const HASHES_PER_UID: usize = 2;

/// The agent's state, shared by its handlers.
pub(crate) struct Shared {
    pub(crate) measurer: Arc<Measurer>,
    /// Hashing places, by uid.
    hashing: Mutex<HashMap<u32, Arc<Semaphore>>>,
    pub(crate) sessions: Sessions,
    pub(crate) outage: OutageCache,
    pub(crate) outage_window: std::time::Duration,
    pub(crate) upstream: Option<Arc<Upstream>>,
    pub(crate) kubelet: Option<Arc<kubelet::Kubelet>>,
    /// Configured launcher digests.
    extra_launchers: Vec<[u8; 32]>,
    /// Those plus the agent's own executable, measured on first use (hashing a large binary
    /// must not delay start-up or signal handling).
    launchers: tokio::sync::OnceCell<Vec<[u8; 32]>>,
    pub(crate) log: AgentLog,
}

/// A caller's identity: its process, the stamp it was measured with, and its selectors.
#[derive(Debug)]
pub(crate) struct Attested {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) process: (u32, u64),
    pub(crate) stamp: Stamp,
    pub(crate) selectors: Vec<String>,
    /// It runs a trusted launcher (a `keyward` binary): its executable is no identity.
    pub(crate) launcher: bool,
}

impl Shared {
    pub(crate) fn new(
        measurer: Measurer,
        outage_window: std::time::Duration,
        upstream: Option<Arc<Upstream>>,
        kubelet: Option<Arc<kubelet::Kubelet>>,
        extra_launchers: Vec<[u8; 32]>,
        log: AgentLog,
    ) -> Self {
        Self {
            measurer: Arc::new(measurer),
            hashing: Mutex::default(),
            sessions: Sessions::default(),
            outage: OutageCache::default(),
            outage_window,
            upstream,
            kubelet,
            extra_launchers,
            launchers: tokio::sync::OnceCell::new(),
            log,
        }
    }

    /// Measure the pinned process: on this thread when its executable's hash is known, else on
    /// a blocking thread, holding one of its uid's hashing places (never anyone else's).
    async fn measure(&self, caller: &Caller) -> Result<Measurement, AttestError> {
        let pinned = caller.peer.check()?;
        if let Some(m) = self.measurer.measure_if_cached(pinned)? {
            return Ok(m);
        }
        let sem = {
            let mut h = self.hashing.lock().map_err(|_| AttestError::Gone)?;
            h.entry(caller.uid).or_insert_with(|| Arc::new(Semaphore::new(HASHES_PER_UID))).clone()
        };
        let _place = sem.acquire_owned().await.map_err(|_| AttestError::Gone)?;
        let (peer, measurer) = (caller.peer.clone(), self.measurer.clone());
        tokio::task::spawn_blocking(move || measurer.measure(peer.check()?)).await.map_err(|_| AttestError::Gone)?
    }

    /// Measure the connection's caller now, check it may be attested (uniform credentials,
    /// not traced, the connection clean, and with `check_code` no code it could have written
    /// mapped), ask the kubelet about its container, and check it is still the same image.
    pub(crate) async fn attest(self: &Arc<Self>, caller: &Caller, check_code: bool) -> Result<Attested, AgentError> {
        let m = self.measure(caller).await.map_err(AgentError::unattested)?;
        m.stamp.uniform_credentials().map_err(AgentError::unattested)?;
        caller.peer.check_stamp(&m.stamp).map_err(AgentError::unattested)?;
        let pinned = caller.peer.check().map_err(AgentError::unattested)?;
        let process = pinned.identity();
        let m = if check_code {
            let (peer, measurer) = (caller.peer.clone(), self.measurer.clone());
            tokio::task::spawn_blocking(move || {
                let p = peer.check()?;
                measurer.check_code(p, &m).map(|()| m)
            })
            .await
            .map_err(|_| AgentError::internal("the code check failed unexpectedly"))?
            .map_err(AgentError::unattested)?
        } else {
            m
        };
        let launcher = self.is_launcher(&m).await;
        let mut selectors = m.credential_selectors();
        if !launcher {
            selectors.extend(m.executable_selectors());
        }
        if let (Some(k), Some(cid)) = (&self.kubelet, &m.cgroup.container_id) {
            let more = k.selectors(cid, m.cgroup.pod_uid.as_deref()).await.map_err(|e| AgentError {
                status: StatusCode::FORBIDDEN,
                code: "not_attested",
                message: format!("the caller could not be attested: {e}"),
                reason: "container unknown to the kubelet",
            })?;
            selectors.extend(more);
            // The kubelet lookup may have taken a while: still the same process and image.
            let now = caller.peer.check().and_then(|p| p.stamp()).map_err(AgentError::unattested)?;
            now.same_as(&m.stamp).map_err(AgentError::unattested)?;
        }
        selectors.sort();
        selectors.dedup();
        Ok(Attested { pid: m.pid, uid: m.uid, process, stamp: m.stamp, selectors, launcher })
    }

    /// Whether the caller runs a trusted launcher: the agent's own binary (`keyward run` is the
    /// same binary) or a configured one. Such a generic binary is never an identity by its
    /// hash: anyone may run it.
    async fn is_launcher(self: &Arc<Self>, m: &Measurement) -> bool {
        let Some(h) = m.exe_sha256 else { return false };
        self.launchers().await.iter().any(|l| keyward_crypto::ct_eq(l, &h))
    }

    async fn launchers(self: &Arc<Self>) -> &[[u8; 32]] {
        self.launchers
            .get_or_init(|| async {
                let mut all = self.extra_launchers.clone();
                let me = Arc::clone(self);
                let own = tokio::task::spawn_blocking(move || {
                    keyward_attest::Pinned::from_pid(std::process::id()).and_then(|p| me.measurer.measure(&p))
                })
                .await;
                match own {
                    Ok(Ok(m)) => all.extend(m.exe_sha256),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot measure the agent's own executable; `keyward run` is not trusted")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot measure the agent's own executable"),
                }
                all
            })
            .await
    }
}
