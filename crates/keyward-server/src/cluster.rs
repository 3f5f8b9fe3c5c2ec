//! Running as one of several servers on a shared store.
//!
//! - **Following changes.** Keys, tokens and policies are cached in memory. A task follows the
//!   store's change feed (woken by PostgreSQL NOTIFY, and polling every [`ClusterConfig::poll`]
//!   in case a notification is lost) and drops or re-reads what other servers changed. If the
//!   feed cannot be read for longer than [`ClusterConfig::max_staleness`], the service refuses
//!   requests (503) instead of trusting its cache: a revoked token or a disabled key is never
//!   honoured after that bound.
//! - **Work done once.** Scheduled rotations, deletion purges, randomized-secret rotation and
//!   pruning of the change feed run only on the server holding the `scheduler` lease in the
//!   store. The holder renews it every third of its TTL; when it dies, the lease expires and
//!   another server takes it over and runs the work at once.
//!
//! With the embedded SQLite store nothing is shared: the feed is empty, the cache is always
//! fresh and the lease is always this server's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyward_core::seal::META_SEAL;

use crate::k8s_auth::K8sAuth;
use keyward_seal::Sealing;

/// The store lease that elects the server running scheduled work.
pub const SCHEDULER_LEASE: &str = "scheduler";
/// How long change-feed entries are kept (a server further behind reloads everything).
pub const CHANGE_RETENTION: Duration = Duration::from_secs(600);

/// Timing of cluster behaviour.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How often the change feed is read when no notification arrives.
    pub poll: Duration,
    /// Cached records are refused when the feed was last read longer ago than this.
    pub max_staleness: Duration,
    /// Lifetime of the scheduler lease (renewed every third of it).
    pub lease_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(250),
            max_staleness: keyward_core::service::DEFAULT_MAX_STALENESS,
            lease_ttl: Duration::from_secs(15),
        }
    }
}

/// This server's place among the servers sharing the store.
#[derive(Debug)]
pub struct Member {
    /// A name unique to this process: host, process id and a random suffix.
    pub id: String,
    scheduler: AtomicBool,
}

impl Member {
    /// A new member identity.
    pub fn new() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut r = [0u8; 4];
        let _ = keyward_crypto::fill_random(&mut r);
        Self {
            id: format!("{}/{}/{}", host.trim(), std::process::id(), hex::encode(r)),
            scheduler: AtomicBool::new(false),
        }
    }

    /// Whether this server holds the scheduler lease (runs scheduled work).
    pub fn runs_scheduler(&self) -> bool {
        self.scheduler.load(Ordering::Relaxed)
    }
}

impl Default for Member {
    fn default() -> Self {
        Self::new()
    }
}

/// Follow the change feed for as long as the server runs.
pub async fn follow_changes(sealing: Arc<Sealing>, k8s: Arc<K8sAuth>, cfg: ClusterConfig) {
    let mut failing_since: Option<Instant> = None;
    loop {
        let Some(u) = sealing.unsealed() else {
            tokio::time::sleep(cfg.poll).await;
            continue;
        };
        if !u.kms.is_shared() {
            return;
        }
        u.kms.set_max_staleness(cfg.max_staleness);
        match u.kms.sync_changes().await {
            Ok(report) => {
                if let Some(t) = failing_since.take() {
                    tracing::info!(after = ?t.elapsed(), "caught up with the change feed again");
                }
                if report.reloaded {
                    tracing::warn!("fell behind the change feed; reloaded every cached record");
                }
                if report.meta.iter().any(|m| m == crate::k8s_auth::META) {
                    k8s.invalidate().await;
                }
                if report.meta.iter().any(|m| m == META_SEAL)
                    && let Err(e) = sealing.follow_seal_change().await
                {
                    tracing::error!(error = %e, "the seal was changed by another server and cannot be followed");
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!(error = %e, "cannot read the change feed; requests are refused once the cache is \
                        older than the staleness bound");
                    failing_since = Some(Instant::now());
                }
            }
        }
        u.kms.wait_for_changes(cfg.poll).await;
    }
}

/// Hold (or wait for) the scheduler lease, and while holding it run scheduled work every
/// `every`, starting at once.
pub async fn scheduler(sealing: Arc<Sealing>, member: Arc<Member>, every: Duration, cfg: ClusterConfig) {
    let renew = (cfg.lease_ttl / 3).max(Duration::from_millis(50));
    let mut last_run: Option<Instant> = None;
    loop {
        let Some(u) = sealing.unsealed() else {
            member.scheduler.store(false, Ordering::Relaxed);
            last_run = None;
            tokio::time::sleep(renew).await;
            continue;
        };
        let held = match u.kms.acquire_lease(SCHEDULER_LEASE, &member.id, cfg.lease_ttl).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the scheduler lease; not running scheduled work");
                false
            }
        };
        if held != member.scheduler.swap(held, Ordering::Relaxed) {
            if held {
                tracing::info!(server = %member.id, "took the scheduler lease: this server runs scheduled work");
            } else {
                tracing::info!("lost the scheduler lease: another server runs scheduled work");
            }
        }
        if !held {
            last_run = None;
        } else if last_run.is_none_or(|t| t.elapsed() >= every) {
            last_run = Some(Instant::now());
            run_once(&u.kms).await;
        }
        tokio::time::sleep(renew.min(every)).await;
    }
}

async fn run_once(kms: &keyward_core::Kms) {
    match kms.run_scheduled(keyward_core::now_unix()).await {
        Ok(r) => {
            for k in &r.rotated {
                tracing::info!(key = %k, "rotated on schedule");
            }
            for k in &r.purged {
                tracing::info!(key = %k, "purged after pending deletion window");
            }
            if r.randomized_rotated > 0 {
                tracing::info!(count = r.randomized_rotated, "randomized secret values rotated on schedule");
            }
        }
        Err(e) => tracing::error!(error = %e, "scheduled work failed; will retry"),
    }
    if kms.is_shared()
        && let Err(e) = kms.prune_changes(CHANGE_RETENTION).await
    {
        tracing::warn!(error = %e, "cannot prune the change feed");
    }
}

/// Give up the scheduler lease (at shutdown), so another server takes over at once.
pub async fn release(sealing: &Sealing, member: &Member) {
    if member.scheduler.swap(false, Ordering::Relaxed)
        && let Some(u) = sealing.unsealed()
        && let Err(e) = u.kms.release_lease(SCHEDULER_LEASE, &member.id).await
    {
        tracing::warn!(error = %e, "cannot release the scheduler lease; it expires by itself");
    }
}
