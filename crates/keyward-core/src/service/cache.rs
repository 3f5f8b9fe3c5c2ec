//! The key cache: keys held unwrapped in memory, loaded on first use and invalidated by changes.

use super::*;

impl Kms {
    /// The key name a ciphertext was made with (for authorizing decrypt), if the key exists.
    pub async fn key_name_of_ciphertext(&self, ciphertext: &[u8]) -> Result<Option<String>, KmsError> {
        let Ok((h, _)) = format::parse(ciphertext, EnvelopeKind::CiphertextV1) else {
            return Ok(None);
        };
        Ok(self.key_by_id(&KeyId(h.key_id)).await?.map(|k| k.record.name.clone()))
    }

    // ----- key cache ------------------------------------------------------------------------

    pub(super) fn cached_by_name(&self, name: &str) -> Option<Arc<CachedKey>> {
        let k = self.keys.read().ok()?.by_name.get(name).cloned();
        let counter = if k.is_some() { &self.cache_hits } else { &self.cache_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        k
    }

    /// Key lookups answered from the in-memory cache, and those that went to the store.
    pub fn key_cache_stats(&self) -> (u64, u64) {
        (self.cache_hits.load(Ordering::Relaxed), self.cache_misses.load(Ordering::Relaxed))
    }

    pub(super) fn cached_by_id(&self, id: &KeyId) -> Option<Arc<CachedKey>> {
        self.keys.read().ok()?.by_id.get(id).cloned()
    }

    pub(super) fn invalidate(&self, rec: &KeyRecord) {
        if let Ok(mut c) = self.keys.write() {
            c.by_name.remove(&rec.name);
            c.by_id.remove(&rec.id);
        }
    }

    pub(super) async fn load(&self, rec: KeyRecord) -> Result<Arc<CachedKey>, KmsError> {
        let mut versions = BTreeMap::new();
        for v in self.store.get_key_versions(&rec.id).await? {
            let material =
                self.unwrap_root(&version_aad(&rec.id, v.version), &v.wrapped_material)?.0.ok_or_else(|| {
                    KmsError::Internal(format!("key {} version {} cannot be unwrapped", rec.name, v.version))
                })?;
            let key = LoadedKey::load(rec.algorithm, &material)?;
            versions.insert(v.version, LoadedVersion { key, public_key: v.public_key, created_at: v.created_at });
        }
        if !versions.contains_key(&rec.current_version) {
            return Err(KmsError::Internal(format!("key {} lacks its current version", rec.name)));
        }
        let ck = Arc::new(CachedKey { record: rec, versions });
        if let Ok(mut c) = self.keys.write() {
            // Do not overwrite a newer entry loaded concurrently.
            let newer = c.by_id.get(&ck.record.id).is_some_and(|old| old.record.revision > ck.record.revision);
            if !newer {
                c.by_name.insert(ck.record.name.clone(), ck.clone());
                c.by_id.insert(ck.record.id, ck.clone());
            }
        }
        Ok(ck)
    }

    pub(super) async fn key(&self, name: &str) -> Result<Arc<CachedKey>, KmsError> {
        self.require_fresh()?;
        if let Some(k) = self.cached_by_name(name) {
            return Ok(k);
        }
        if name.starts_with(ALIAS_PREFIX) {
            // Callers resolve aliases first: one that reaches here names nothing.
            return Err(not_found("alias", name));
        }
        validate::key_name(name)?;
        let rec = self.store.get_key(name).await?.ok_or_else(|| not_found("key", name))?;
        self.load(rec).await
    }

    /// Re-read a key's record from the store and reload it if another process changed it
    /// (rotated, disabled, deleted and re-created) since it was cached. Costs one store read
    /// when nothing changed. Returns the current version.
    pub async fn refresh_key(&self, name: &str) -> Result<u32, KmsError> {
        validate::key_name(name)?;
        let rec = self.store.get_key(name).await?.ok_or_else(|| not_found("key", name))?;
        if let Some(cached) = self.cached_by_name(name) {
            if cached.record.id == rec.id && cached.record.revision == rec.revision {
                return Ok(rec.current_version);
            }
            self.invalidate(&cached.record);
        }
        Ok(self.load(rec).await?.record.current_version)
    }

    pub(super) async fn key_by_id(&self, id: &KeyId) -> Result<Option<Arc<CachedKey>>, KmsError> {
        self.require_fresh()?;
        if let Some(k) = self.cached_by_id(id) {
            return Ok(Some(k));
        }
        match self.store.get_key_by_id(id).await? {
            Some(rec) => Ok(Some(self.load(rec).await?)),
            None => Ok(None),
        }
    }

    pub(super) fn usable(
        ck: &CachedKey,
        operation: &'static str,
        ok_type: fn(KeyAlgorithm) -> bool,
    ) -> Result<(), KmsError> {
        let r = &ck.record;
        match r.state {
            KeyState::Enabled => {}
            KeyState::Disabled => return Err(KmsError::KeyDisabled(r.name.clone())),
            KeyState::PendingDeletion => return Err(KmsError::KeyPendingDeletion(r.name.clone())),
        }
        if !ok_type(r.algorithm) {
            return Err(KmsError::WrongKeyType { name: r.name.clone(), algorithm: r.algorithm.as_str(), operation });
        }
        Ok(())
    }

    // ----- key lifecycle --------------------------------------------------------------------

    pub(super) fn new_version(
        &self,
        id: &KeyId,
        alg: KeyAlgorithm,
        version: u32,
        now: i64,
    ) -> Result<KeyVersionRecord, KmsError> {
        self.require_fresh()?;
        let material = alg.generate()?;
        let public_key = LoadedKey::load(alg, &material)?.public_key_der();
        let wrapped_material = self.current_root()?.seal(&version_aad(id, version), material.expose())?;
        Ok(KeyVersionRecord { key_id: *id, version, wrapped_material, public_key, created_at: now })
    }
}
