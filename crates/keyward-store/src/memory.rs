//! An in-memory [`Store`]: every record in ordered maps behind one lock, nothing on disk.
//!
//! It keeps the same invariants as the SQLite backend (unique key names and token accessors,
//! compare-and-set on revisions, secret versions and metadata, use limits, leases and
//! instance holds by its own clock) and passes the same conformance suite, so the service can be
//! tested without a database. Not shared: a second process never sees it. It is for tests and
//! throwaway servers; whatever it holds is gone when it is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyward_core::model::{
    KeyId, KeyRecord, KeyState, KeyVersionRecord, SecretRecord, SecretVersionRecord, TokenRecord,
};
use keyward_core::store::{InstanceHold, SecretRead, Store, StoreError};

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    meta: HashMap<String, Vec<u8>>,
    /// Keys by id; `names` indexes them by name.
    keys: HashMap<[u8; 16], KeyRecord>,
    names: BTreeMap<String, [u8; 16]>,
    versions: HashMap<[u8; 16], BTreeMap<u32, KeyVersionRecord>>,
    secrets: BTreeMap<String, SecretRecord>,
    secret_versions: HashMap<String, BTreeMap<u32, SecretVersionRecord>>,
    /// Tokens by hash; `accessors` indexes them by accessor.
    tokens: HashMap<[u8; 32], TokenRecord>,
    accessors: BTreeMap<String, [u8; 32]>,
    policies: BTreeMap<String, String>,
    leases: HashMap<String, (String, Instant)>,
    holds: HashMap<String, HashMap<String, Instant>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        // A panic while holding the lock leaves no half-made change (every change is computed
        // before it is applied), but the store refuses to go on rather than guess.
        self.inner.lock().map_err(|_| StoreError::Backend("the in-memory store was poisoned by a panic".into()))
    }
}

impl Inner {
    fn key_mut(&mut self, id: &KeyId, expected: u64) -> Result<&mut KeyRecord, StoreError> {
        match self.keys.get_mut(&id.0) {
            Some(k) if k.revision == expected => Ok(k),
            Some(_) => Err(StoreError::Conflict),
            None => Err(StoreError::NotFound),
        }
    }

    /// Replace a key's record (compare-and-set on the revision), keeping the name index true.
    fn update_key(&mut self, key: &KeyRecord, expected: u64) -> Result<(), StoreError> {
        let old_name = self.key_mut(&key.id, expected)?.name.clone();
        if old_name != key.name {
            if self.names.contains_key(&key.name) {
                return Err(StoreError::AlreadyExists);
            }
            self.names.remove(&old_name);
            self.names.insert(key.name.clone(), key.id.0);
        }
        self.keys.insert(key.id.0, key.clone());
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend_name(&self) -> &'static str {
        "memory"
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.meta.get(key).cloned())
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        if g.meta.contains_key(key) {
            return Ok(false);
        }
        g.meta.insert(key.to_string(), value.to_vec());
        Ok(true)
    }

    async fn replace_meta(&self, key: &str, expected: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        match g.meta.get_mut(key) {
            Some(v) if v.as_slice() == expected => {
                *v = value.to_vec();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn create_key(&self, key: &KeyRecord, first: &KeyVersionRecord) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        if g.keys.contains_key(&key.id.0) || g.names.contains_key(&key.name) {
            return Err(StoreError::AlreadyExists);
        }
        g.keys.insert(key.id.0, key.clone());
        g.names.insert(key.name.clone(), key.id.0);
        g.versions.insert(key.id.0, BTreeMap::from([(first.version, first.clone())]));
        Ok(())
    }

    async fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        let g = self.lock()?;
        Ok(g.names.get(name).and_then(|id| g.keys.get(id)).cloned())
    }

    async fn get_key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.lock()?.keys.get(&id.0).cloned())
    }

    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let g = self.lock()?;
        let after = after.unwrap_or("");
        Ok(g.names
            .iter()
            .filter(|(name, _)| name.as_str() > after)
            .filter_map(|(_, id)| g.keys.get(id).cloned())
            .take(limit as usize)
            .collect())
    }

    async fn update_key(&self, key: &KeyRecord, expected_revision: u64) -> Result<(), StoreError> {
        self.lock()?.update_key(key, expected_revision)
    }

    async fn add_key_version(
        &self,
        key: &KeyRecord,
        version: &KeyVersionRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        g.key_mut(&key.id, expected_revision)?;
        if g.versions.get(&key.id.0).is_some_and(|v| v.contains_key(&version.version)) {
            return Err(StoreError::Conflict);
        }
        g.update_key(key, expected_revision)?;
        g.versions.entry(key.id.0).or_default().insert(version.version, version.clone());
        Ok(())
    }

    async fn get_key_versions(&self, id: &KeyId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        Ok(self.lock()?.versions.get(&id.0).map(|v| v.values().cloned().collect()).unwrap_or_default())
    }

    async fn rewrap_key_version(
        &self,
        id: &KeyId,
        version: u32,
        expected: &[u8],
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        match g.versions.get_mut(&id.0).and_then(|v| v.get_mut(&version)) {
            Some(v) if v.wrapped_material == expected => {
                v.wrapped_material = wrapped.to_vec();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn keys_due(&self, now: i64, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let g = self.lock()?;
        let due = |k: &KeyRecord| match k.state {
            KeyState::Enabled => k.next_rotation_at.is_some_and(|t| t <= now),
            KeyState::PendingDeletion => k.deletion_at.is_some_and(|t| t <= now),
            KeyState::Disabled => false,
        };
        Ok(g.names.values().filter_map(|id| g.keys.get(id)).filter(|k| due(k)).take(limit as usize).cloned().collect())
    }

    async fn delete_key(&self, id: &KeyId, expected_revision: u64) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        let name = g.key_mut(id, expected_revision)?.name.clone();
        g.keys.remove(&id.0);
        g.names.remove(&name);
        g.versions.remove(&id.0);
        Ok(())
    }

    async fn put_secret_version(&self, v: &SecretVersionRecord, expected_current: u32) -> Result<(), StoreError> {
        if v.version != expected_current.wrapping_add(1) {
            return Err(StoreError::Conflict);
        }
        let mut g = self.lock()?;
        match g.secrets.get_mut(&v.path) {
            None if expected_current == 0 => {
                let record = SecretRecord {
                    path: v.path.clone(),
                    current_version: v.version,
                    created_at: v.created_at,
                    updated_at: v.created_at,
                };
                g.secrets.insert(v.path.clone(), record);
            }
            Some(s) if s.current_version == expected_current => {
                s.current_version = v.version;
                s.updated_at = v.created_at;
            }
            _ => return Err(StoreError::Conflict),
        }
        g.secret_versions.entry(v.path.clone()).or_default().insert(v.version, v.clone());
        Ok(())
    }

    async fn get_secret(&self, path: &str) -> Result<Option<SecretRecord>, StoreError> {
        Ok(self.lock()?.secrets.get(path).cloned())
    }

    async fn get_secret_version(&self, path: &str, version: u32) -> Result<Option<SecretVersionRecord>, StoreError> {
        Ok(self.lock()?.secret_versions.get(path).and_then(|v| v.get(&version)).cloned())
    }

    async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Option<SecretRead>, StoreError> {
        let g = self.lock()?;
        let Some(s) = g.secrets.get(path) else { return Ok(None) };
        let wanted = version.unwrap_or(s.current_version);
        let version = g.secret_versions.get(path).and_then(|v| v.get(&wanted)).cloned();
        Ok(Some(SecretRead { current_version: s.current_version, version }))
    }

    async fn list_secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError> {
        let g = self.lock()?;
        Ok(g.secret_versions
            .get(path)
            .map(|vs| {
                vs.values()
                    .map(|v| SecretVersionRecord {
                        wrapped_value: v.wrapped_value.as_ref().map(|_| vec![]),
                        ..v.clone()
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn list_secrets(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError> {
        let g = self.lock()?;
        let after = after.unwrap_or("");
        Ok(g.secrets
            .range(prefix.to_string()..)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(prefix))
            .filter(|p| p.as_str() > after)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn set_secret_versions_deleted(
        &self,
        path: &str,
        versions: &[u32],
        deleted_at: Option<i64>,
    ) -> Result<u32, StoreError> {
        let mut g = self.lock()?;
        let Some(vs) = g.secret_versions.get_mut(path) else { return Ok(0) };
        let mut n = 0;
        for v in versions {
            if let Some(r) = vs.get_mut(v).filter(|r| r.wrapped_value.is_some() && r.deleted_at != deleted_at) {
                r.deleted_at = deleted_at;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn destroy_secret_versions(&self, path: &str, versions: &[u32]) -> Result<u32, StoreError> {
        let mut g = self.lock()?;
        let Some(vs) = g.secret_versions.get_mut(path) else { return Ok(0) };
        let mut n = 0;
        for v in versions {
            if let Some(r) = vs.get_mut(v).filter(|r| r.wrapped_value.is_some()) {
                // The sealed value is dropped; nothing in the clear was ever here.
                r.wrapped_value = None;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        if g.tokens.contains_key(&token.hash) || g.accessors.contains_key(&token.accessor) {
            return Err(StoreError::AlreadyExists);
        }
        g.accessors.insert(token.accessor.clone(), token.hash);
        g.tokens.insert(token.hash, token.clone());
        Ok(())
    }

    async fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.lock()?.tokens.get(hash).cloned())
    }

    async fn set_token_expiry(&self, accessor: &str, expires_at: Option<i64>) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        let hash = *g.accessors.get(accessor).ok_or(StoreError::NotFound)?;
        let t = g.tokens.get_mut(&hash).ok_or(StoreError::NotFound)?;
        t.expires_at = expires_at;
        Ok(())
    }

    async fn use_token(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError> {
        let mut g = self.lock()?;
        let Some(t) = g.tokens.get_mut(hash) else { return Ok(None) };
        if t.max_uses.is_some_and(|max| t.uses >= max) {
            return Ok(None);
        }
        t.uses += 1;
        Ok(Some(t.uses))
    }

    async fn delete_tokens(&self, accessors: &[String]) -> Result<u32, StoreError> {
        let mut g = self.lock()?;
        let mut n = 0;
        for a in accessors {
            if let Some(hash) = g.accessors.remove(a) {
                g.tokens.remove(&hash);
                n += 1;
            }
        }
        Ok(n)
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let g = self.lock()?;
        Ok(g.accessors.values().filter_map(|h| g.tokens.get(h)).cloned().collect())
    }

    async fn put_policy(&self, name: &str, document: &str, _now: i64) -> Result<(), StoreError> {
        self.lock()?.policies.insert(name.to_string(), document.to_string());
        Ok(())
    }

    async fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.policies.remove(name).is_some())
    }

    async fn list_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self.lock()?.policies.iter().map(|(n, d)| (n.clone(), d.clone())).collect())
    }

    async fn get_policy(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.policies.get(name).cloned())
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        let now = Instant::now();
        let free = match g.leases.get(name) {
            Some((h, expires)) => h == holder || *expires <= now,
            None => true,
        };
        if free {
            g.leases.insert(name.to_string(), (holder.to_string(), now + ttl));
        }
        Ok(free)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        if g.leases.get(name).is_some_and(|(h, _)| h == holder) {
            g.leases.remove(name);
        }
        Ok(())
    }

    async fn hold_instance(
        &self,
        scope: &str,
        instance: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<InstanceHold, StoreError> {
        let mut g = self.lock()?;
        let now = Instant::now();
        let holders = g.holds.entry(scope.to_string()).or_default();
        holders.retain(|_, expires| *expires > now);
        if !holders.contains_key(instance) {
            let held = u32::try_from(holders.len()).unwrap_or(u32::MAX);
            if held >= max {
                return Ok(InstanceHold::Full { holders: held });
            }
        }
        holders.insert(instance.to_string(), now + ttl);
        Ok(InstanceHold::Held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        crate::conformance::run_all(std::sync::Arc::new(MemoryStore::new())).await;
    }
}
