//! Life on a shared store: following the change feed, bounded staleness, leases.

use super::*;

impl Kms {
    /// The bound set by [`Kms::set_max_staleness`].
    pub fn max_staleness(&self) -> Duration {
        Duration::from_millis(self.feed.max_staleness_ms.load(Ordering::Relaxed))
    }

    /// The store backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.store.backend_name()
    }

    // ----- following other servers ----------------------------------------------------------

    /// Whether other servers share this store (so [`Kms::sync_changes`] must run).
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// Set how stale cached keys, tokens and policies may get, on a shared store, before this
    /// server refuses requests (503) rather than risk honouring a revoked token or a disabled key.
    pub fn set_max_staleness(&self, d: Duration) {
        self.feed.max_staleness_ms.store(u64::try_from(d.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Fail (503) when this server may have missed other servers' changes for longer than its
    /// staleness bound; always fine on a store no other server shares.
    pub fn require_fresh(&self) -> Result<(), KmsError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let now = u64::try_from(self.feed.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let synced = self.feed.synced_at_ms.load(Ordering::Acquire);
        let max = self.feed.max_staleness_ms.load(Ordering::Relaxed);
        // `synced_at_ms` is 0 until the first catch-up (at the end of `Kms::open`).
        if synced == 0 || now.saturating_sub(synced) > max {
            return Err(KmsError::Unavailable(StoreError::Unavailable(format!(
                "this server has not caught up with changes from other servers for over {max} ms (is the \
                 database reachable?); it refuses to use cached keys, tokens and policies until it has"
            ))));
        }
        Ok(())
    }

    /// Wait until the store may have changed, or at most `max`.
    pub async fn wait_for_changes(&self, max: Duration) {
        self.store.wait_for_changes(max).await;
    }

    /// Apply every change other servers committed since the last call: changed keys are dropped
    /// from the cache (and reloaded on next use), tokens and policies are re-read. Marks this
    /// server fresh on success. A no-op on a store that is not shared.
    pub async fn sync_changes(&self) -> Result<SyncReport, KmsError> {
        let mut report = SyncReport::default();
        if !self.store.is_shared() {
            return Ok(report);
        }
        let started = u64::try_from(self.feed.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cursor = self.feed.cursor.lock().await;
        loop {
            let page = self.store.changes_since(Some(*cursor), 1000).await?;
            if page.lost {
                self.reload_all().await?;
                report.reloaded = true;
            } else {
                for c in &page.changes {
                    self.apply_change(c, &mut report).await?;
                }
            }
            report.applied += page.changes.len();
            *cursor = page.cursor;
            if !page.more {
                break;
            }
        }
        self.feed.synced_at_ms.fetch_max(started, Ordering::AcqRel);
        Ok(report)
    }

    pub(super) async fn apply_change(&self, change: &Change, report: &mut SyncReport) -> Result<(), KmsError> {
        match change {
            Change::Key(id) => {
                if let Ok(mut c) = self.keys.write()
                    && let Some(old) = c.by_id.remove(id)
                    && c.by_name.get(&old.record.name).is_some_and(|k| k.record.id == *id)
                {
                    c.by_name.remove(&old.record.name);
                }
            }
            Change::Token(hash) => {
                let fresh = self.store.get_token(hash).await?;
                let mut m = self.tokens.write().map_err(|_| KmsError::Internal("token cache poisoned".into()))?;
                match fresh {
                    Some(t) => m.insert(*hash, Arc::new(t)),
                    None => m.remove(hash),
                };
            }
            Change::Policy(name) => {
                let fresh = match self.store.get_policy(name).await? {
                    Some(doc) => Some(Arc::new(
                        serde_json::from_str::<Policy>(&doc)
                            .map_err(|e| KmsError::Internal(format!("stored policy {name}: {e}")))?,
                    )),
                    None => None,
                };
                let mut m = self.policies.write().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
                match fresh {
                    Some(p) => m.insert(name.clone(), p),
                    None => m.remove(name),
                };
            }
            Change::Meta(name) => report.meta.push(name.clone()),
        }
        Ok(())
    }

    pub(super) async fn reload_all(&self) -> Result<(), KmsError> {
        if let Ok(mut c) = self.keys.write() {
            *c = KeyCache::default();
        }
        self.reload_tokens().await?;
        self.reload_policies().await
    }

    /// Take or renew the store lease `name` for `holder` (see [`Store::acquire_lease`]).
    pub async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, KmsError> {
        Ok(self.store.acquire_lease(name, holder, ttl).await?)
    }

    /// Give up the store lease `name` if `holder` holds it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), KmsError> {
        Ok(self.store.release_lease(name, holder).await?)
    }

    /// Forget change-feed entries older than `age` (run by one server, under a lease).
    pub async fn prune_changes(&self, age: Duration) -> Result<u64, KmsError> {
        Ok(self.store.prune_changes(age).await?)
    }

    // ----- tokens ---------------------------------------------------------------------------
}
