//! Randomized secrets: definitions, a value per workload identity created on first read, and
//! their replacement at the end of the TTL.

use super::*;

impl Kms {
    /// Replace every randomized value older than its TTL (so values rotate on schedule even
    /// when nobody reads them). Returns how many were replaced.
    pub(super) async fn rotate_due_random_values(&self, now: i64) -> Result<u32, KmsError> {
        let prefix = format!("{}random/", validate::RESERVED_SECRET_PREFIX);
        let mut specs: HashMap<String, Option<crate::random::RandomSpec>> = HashMap::new();
        let mut rotated = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self.store.list_secrets(&prefix, after.as_deref(), MAX_PAGE).await?;
            for path in &page {
                let Some(name) = path.strip_prefix(&prefix).and_then(|r| r.split('/').next()) else { continue };
                if !specs.contains_key(name) {
                    let spec = match self.random_definition(name).await {
                        Ok(s) => Some(s),
                        Err(KmsError::NotFound { .. }) => None,
                        Err(e) => return Err(e),
                    };
                    specs.insert(name.to_string(), spec);
                }
                let Some(Some(spec)) = specs.get(name) else { continue };
                let current = match self.get_secret_at(path, None).await {
                    Ok(c) => c,
                    Err(KmsError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                if now < current.created_at.saturating_add(i64::try_from(spec.ttl_secs).unwrap_or(i64::MAX)) {
                    continue;
                }
                let value = spec.generate()?;
                let data = SecretData::new([("value".to_string(), value.to_string())].into())?;
                match self.put_secret_at(path, data, Some(current.version), now).await {
                    Ok(_) => rotated += 1,
                    Err(KmsError::Conflict(_)) => {} // a reader rotated it first
                    Err(e) => return Err(e),
                }
            }
            if page.len() < MAX_PAGE as usize {
                return Ok(rotated);
            }
            after = page.last().cloned();
        }
    }

    // ----- cryptographic operations ---------------------------------------------------------

    /// Create or replace the definition of randomized secret `name`. Existing values keep
    /// their age; the new TTL and grace apply at the next read.
    pub async fn define_random(&self, name: &str, spec: &crate::random::RandomSpec) -> Result<(), KmsError> {
        validate::key_name(name)?;
        spec.validate()?;
        let key = format!("random-def/{name}");
        let doc = serde_json::to_vec(spec).map_err(|e| KmsError::Internal(e.to_string()))?;
        for _ in 0..CAS_RETRIES {
            match self.store.get_meta(&key).await? {
                None if self.store.put_meta_if_absent(&key, &doc).await? => return Ok(()),
                Some(old) if self.store.replace_meta(&key, &old, &doc).await? => return Ok(()),
                _ => continue,
            }
        }
        Err(KmsError::Conflict(format!("randomized secret {name:?} is being changed concurrently; retry")))
    }

    /// The definition of randomized secret `name`.
    pub async fn random_definition(&self, name: &str) -> Result<crate::random::RandomSpec, KmsError> {
        validate::key_name(name)?;
        let doc = self
            .store
            .get_meta(&format!("random-def/{name}"))
            .await?
            .ok_or_else(|| not_found("randomized secret", name))?;
        serde_json::from_slice(&doc).map_err(|e| KmsError::Internal(format!("stored randomized secret {name}: {e}")))
    }

    /// The value of randomized secret `name` for `identity` (e.g. `k8s:payments/api`): created
    /// on first use, replaced once older than the TTL (concurrent readers agree on one value),
    /// with the previous value during the grace period.
    pub async fn random_value(
        &self,
        name: &str,
        identity: &str,
        now: i64,
    ) -> Result<crate::random::RandomValue, KmsError> {
        let spec = self.random_definition(name).await?;
        let path = format!(
            "{}random/{name}/{}",
            validate::RESERVED_SECRET_PREFIX,
            hex::encode(keyward_crypto::hash::sha256(identity.as_bytes()))
        );
        let ttl = i64::try_from(spec.ttl_secs).unwrap_or(i64::MAX);
        let grace = i64::try_from(spec.grace_secs).unwrap_or(i64::MAX);
        for _ in 0..CAS_RETRIES {
            let current = match self.get_secret_at(&path, None).await {
                Ok(v) => Some(v),
                Err(KmsError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            let due = current.as_ref().is_none_or(|c| now >= c.created_at.saturating_add(ttl));
            if due {
                let value = spec.generate()?;
                let data = SecretData::new([("value".to_string(), value.to_string())].into())?;
                let cas = current.as_ref().map_or(0, |c| c.version);
                match self.put_secret_at(&path, data, Some(cas), now).await {
                    Ok(_) | Err(KmsError::Conflict(_)) => continue, // re-read: ours, or a concurrent writer's
                    Err(e) => return Err(e),
                }
            }
            let Some(c) = current else { continue };
            let field = |v: &SecretValue| {
                v.data
                    .expose()
                    .get("value")
                    .map(|s| zeroize::Zeroizing::new(s.clone()))
                    .ok_or_else(|| KmsError::Internal("randomized value without a value".into()))
            };
            let previous = if c.version > 1 && now < c.created_at.saturating_add(grace) {
                match self.get_secret_at(&path, Some(c.version - 1)).await {
                    Ok(p) => Some((field(&p)?, c.created_at.saturating_add(grace))),
                    Err(KmsError::NotFound { .. }) => None,
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            return Ok(crate::random::RandomValue {
                value: field(&c)?,
                version: c.version,
                created_at: c.created_at,
                rotates_at: c.created_at.saturating_add(ttl),
                previous,
            });
        }
        Err(KmsError::Conflict(format!("randomized secret {name:?} is being rotated concurrently; retry")))
    }
}
