//! The root keyring: the keys the service unwraps everything else with, and root rotation
//! (begin under a new root, re-wrap every record, finish).

use super::*;

impl Kms {
    /// The key of the audit log's hash chain (stored under the root key).
    pub fn audit_key(&self) -> &SecretBytes {
        &self.audit_key
    }

    // ----- root keys ------------------------------------------------------------------------

    pub(super) fn current_root(&self) -> Result<Arc<AeadKey>, KmsError> {
        let roots = self.roots.read().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
        roots.first().cloned().ok_or_else(|| KmsError::Internal("empty root keyring".into()))
    }

    /// Open data wrapped under any root key; the flag says whether it was the newest.
    pub(super) fn unwrap_root(&self, aad: &[u8], sealed: &[u8]) -> Result<(Option<SecretBytes>, bool), KmsError> {
        let roots = self.roots.read().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?.clone();
        for (i, r) in roots.iter().enumerate() {
            if let Ok(p) = r.open(aad, sealed) {
                return Ok((Some(p), i == 0));
            }
        }
        Ok((None, false))
    }

    /// Install `new` as the newest root key. Everything wrapped from now on uses it; data under
    /// the older roots stays readable until [`Kms::finish_root_rotation`].
    pub async fn begin_root_rotation(&self, new: &SecretBytes) -> Result<(), KmsError> {
        let key = Arc::new(AeadKey::new(new)?);
        let _exclusive = self.wrap_guard.write().await;
        let mut roots = self.roots.write().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
        roots.insert(0, key);
        Ok(())
    }

    /// Make `keyring` (newest first, as stored in the seal by another server) the root keys in
    /// use. Returns whether anything changed.
    pub async fn adopt_roots(&self, keyring: Vec<SecretBytes>) -> Result<bool, KmsError> {
        let keys = keyring.iter().map(|k| AeadKey::new(k).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KmsError::Internal("empty root keyring".into()));
        }
        let same = {
            let roots = self.roots.read().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
            // Same key if what one seals the other opens.
            let same_key = |a: &AeadKey, b: &AeadKey| {
                b.seal(b"keyward/root-probe", b"probe").is_ok_and(|s| a.open(b"keyward/root-probe", &s).is_ok())
            };
            roots.len() == keys.len() && roots.iter().zip(&keys).all(|(a, b)| same_key(a, b))
        };
        if same {
            return Ok(false);
        }
        let _exclusive = self.wrap_guard.write().await;
        *self.roots.write().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))? = keys;
        Ok(true)
    }

    /// Re-wrap every root-wrapped record (service keys and all key versions) under the newest
    /// root key. Idempotent and safe to run while serving.
    pub async fn rewrap_under_newest_root(&self) -> Result<RewrapReport, KmsError> {
        let mut report = RewrapReport::default();
        let root = self.current_root()?;
        for (name, aad) in ROOT_WRAPPED_META {
            let Some(old) = self.store.get_meta(name).await? else { continue };
            match self.unwrap_root(aad, &old)? {
                (Some(_), true) => {}
                (Some(p), false) => {
                    if !self.store.replace_meta(name, &old, &root.seal(aad, p.expose())?).await? {
                        return Err(KmsError::Conflict(format!("{name} changed during root rotation; run it again")));
                    }
                    report.service_keys += 1;
                }
                (None, _) => return Err(KmsError::Internal(format!("{name} cannot be unwrapped by any root key"))),
            }
        }
        let mut after: Option<String> = None;
        loop {
            let page = self.store.list_keys(after.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.name.clone());
            for rec in &page {
                for v in self.store.get_key_versions(&rec.id).await? {
                    let aad = version_aad(&rec.id, v.version);
                    match self.unwrap_root(&aad, &v.wrapped_material)? {
                        (Some(_), true) => {}
                        (Some(p), false) => {
                            let new = root.seal(&aad, p.expose())?;
                            // A version purged meanwhile needs nothing; nothing else rewrites material.
                            if self.store.rewrap_key_version(&rec.id, v.version, &v.wrapped_material, &new).await? {
                                report.key_versions += 1;
                            }
                        }
                        (None, _) => {
                            return Err(KmsError::Internal(format!(
                                "key {} version {} cannot be unwrapped by any root key",
                                rec.name, v.version
                            )));
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Drop (and wipe) every root key but the newest. Call after a successful
    /// [`Kms::rewrap_under_newest_root`] and after the seal stores only the newest key.
    pub fn finish_root_rotation(&self) -> Result<(), KmsError> {
        let mut roots = self.roots.write().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
        roots.truncate(1);
        Ok(())
    }

    /// How many root keys are in use (more than one while a rotation is unfinished).
    pub fn root_keys(&self) -> usize {
        self.roots.read().map(|r| r.len()).unwrap_or(0)
    }
}
