//! Versioned secrets: put (with check-and-set), get, versions, list, delete, undelete, destroy.

use super::*;

impl Kms {
    /// Write a new version of a secret. With `cas`, the write only succeeds if the current
    /// version is `cas` (0: the secret must not exist yet). Returns the new version.
    pub async fn put_secret(&self, path: &str, data: SecretData, cas: Option<u32>) -> Result<u32, KmsError> {
        validate::secret_path(path)?;
        self.put_secret_at(path, data, cas, now_unix()).await
    }

    pub(super) async fn put_secret_at(
        &self,
        path: &str,
        data: SecretData,
        cas: Option<u32>,
        now: i64,
    ) -> Result<u32, KmsError> {
        validate::internal_secret_path(path)?;
        let encoded = data.encode();
        for _ in 0..CAS_RETRIES {
            let current = self.store.get_secret(path).await?.map_or(0, |s| s.current_version);
            if let Some(c) = cas
                && c != current
            {
                return Err(KmsError::Conflict(format!(
                    "check-and-set failed: current version of {path:?} is {current}, not {c}"
                )));
            }
            let version = current.checked_add(1).ok_or_else(|| KmsError::invalid("too many versions"))?;
            let wrapped = self.secrets_key.seal(&secret_aad(path, version), encoded.expose())?;
            let rec = SecretVersionRecord {
                path: path.to_string(),
                version,
                wrapped_value: Some(wrapped),
                created_at: now,
                deleted_at: None,
            };
            match self.store.put_secret_version(&rec, current).await {
                Ok(()) => return Ok(version),
                Err(StoreError::Conflict) if cas.is_none() => continue,
                Err(StoreError::Conflict) => {
                    return Err(KmsError::Conflict(format!("check-and-set failed: {path:?} changed concurrently")));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(KmsError::Conflict(format!("secret {path:?} is being written concurrently; retry")))
    }

    // ----- randomized secrets ---------------------------------------------------------------

    /// Read a secret version (latest if `version` is `None`).
    pub async fn get_secret(&self, path: &str, version: Option<u32>) -> Result<SecretValue, KmsError> {
        validate::secret_path(path)?;
        self.get_secret_at(path, version).await
    }

    pub(super) async fn get_secret_at(&self, path: &str, version: Option<u32>) -> Result<SecretValue, KmsError> {
        validate::internal_secret_path(path)?;
        let read = self.store.read_secret(path, version).await?.ok_or_else(|| not_found("secret", path))?;
        let v = version.unwrap_or(read.current_version);
        let rec = read.version.ok_or_else(|| not_found("secret version", &format!("{path}@{v}")))?;
        if rec.deleted_at.is_some() {
            return Err(KmsError::NotFound {
                what: "secret version (deleted; undelete it to read)",
                name: format!("{path}@{v}"),
            });
        }
        let wrapped = rec
            .wrapped_value
            .ok_or_else(|| KmsError::NotFound { what: "secret version (destroyed)", name: format!("{path}@{v}") })?;
        let plain = self
            .secrets_key
            .open(&secret_aad(path, v), &wrapped)
            .map_err(|_| KmsError::Internal(format!("secret {path}@{v} cannot be unwrapped")))?;
        let data =
            SecretData::decode(plain.expose()).ok_or_else(|| KmsError::Internal("corrupt secret encoding".into()))?;
        Ok(SecretValue { data, version: v, created_at: rec.created_at })
    }

    /// Version history of a secret.
    pub async fn secret_versions(&self, path: &str) -> Result<(SecretRecord, Vec<SecretVersionInfo>), KmsError> {
        validate::secret_path(path)?;
        let meta = self.store.get_secret(path).await?.ok_or_else(|| not_found("secret", path))?;
        let versions = self
            .store
            .list_secret_versions(path)
            .await?
            .into_iter()
            .map(|v| SecretVersionInfo {
                version: v.version,
                created_at: v.created_at,
                deleted_at: v.deleted_at,
                destroyed: v.wrapped_value.is_none(),
            })
            .collect();
        Ok((meta, versions))
    }

    /// Secret paths under `prefix`; returns the page and the cursor for the next one.
    pub async fn list_secrets(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<String>, Option<String>), KmsError> {
        validate::secret_prefix(prefix)?;
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(KmsError::invalid(format!("limit must be between 1 and {MAX_PAGE}")));
        }
        let page = self.store.list_secrets(prefix, after, limit).await?;
        let next = (page.len() == limit as usize).then(|| page.last().cloned()).flatten();
        // Keyward's own secrets (randomized values) are never listed.
        let page = page.into_iter().filter(|p| !p.starts_with(validate::RESERVED_SECRET_PREFIX)).collect();
        Ok((page, next))
    }

    pub(super) async fn resolve_versions(
        &self,
        path: &str,
        versions: &[u32],
        default_latest: bool,
    ) -> Result<Vec<u32>, KmsError> {
        validate::secret_path(path)?;
        let meta = self.store.get_secret(path).await?.ok_or_else(|| not_found("secret", path))?;
        if versions.is_empty() {
            if default_latest {
                return Ok(vec![meta.current_version]);
            }
            return Err(KmsError::invalid("name the versions to act on"));
        }
        if versions.len() > 1000 {
            return Err(KmsError::invalid("at most 1000 versions per request"));
        }
        if let Some(bad) = versions.iter().find(|v| **v == 0 || **v > meta.current_version) {
            return Err(not_found("secret version", &format!("{path}@{bad}")));
        }
        Ok(versions.to_vec())
    }

    /// Soft-delete versions (default: the latest). Deleted versions can be undeleted.
    pub async fn delete_secret(&self, path: &str, versions: &[u32]) -> Result<u32, KmsError> {
        let vs = self.resolve_versions(path, versions, true).await?;
        Ok(self.store.set_secret_versions_deleted(path, &vs, Some(now_unix())).await?)
    }

    /// Undo a soft delete (default: the latest version).
    pub async fn undelete_secret(&self, path: &str, versions: &[u32]) -> Result<u32, KmsError> {
        let vs = self.resolve_versions(path, versions, true).await?;
        Ok(self.store.set_secret_versions_deleted(path, &vs, None).await?)
    }

    /// Erase the values of the given versions for good.
    pub async fn destroy_secret(&self, path: &str, versions: &[u32]) -> Result<u32, KmsError> {
        let vs = self.resolve_versions(path, versions, false).await?;
        Ok(self.store.destroy_secret_versions(path, &vs).await?)
    }
}
