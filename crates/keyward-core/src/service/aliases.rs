//! Key aliases (`alias/NAME`): one table, changed with compare-and-set.

use super::*;

impl Kms {
    /// The key an alias names (`alias/NAME`), or the name itself if it is not an alias.
    /// Aliases are read from the store at each use, so every server sees a change at once.
    pub async fn resolve_key_name(&self, name: &str) -> Result<String, KmsError> {
        if !name.starts_with(ALIAS_PREFIX) {
            return Ok(name.to_string());
        }
        validate::alias_name(name)?;
        self.aliases().await?.remove(name).ok_or_else(|| not_found("alias", name))
    }

    pub(super) async fn aliases_raw(&self) -> Result<(Option<Vec<u8>>, BTreeMap<String, String>), KmsError> {
        let raw = self.store.get_meta(ALIASES_META).await?;
        let map = match &raw {
            Some(b) => serde_json::from_slice(b).map_err(|e| KmsError::Internal(format!("alias table: {e}")))?,
            None => BTreeMap::new(),
        };
        Ok((raw, map))
    }

    /// Every alias and the key it names.
    pub async fn aliases(&self) -> Result<BTreeMap<String, String>, KmsError> {
        Ok(self.aliases_raw().await?.1)
    }

    /// Point `alias` at `key` (an existing key, not an alias); returns the key it named before.
    pub async fn set_alias(&self, alias: &str, key: &str) -> Result<Option<String>, KmsError> {
        validate::alias_name(alias)?;
        validate::key_name(key)?;
        self.store.get_key(key).await?.ok_or_else(|| not_found("key", key))?;
        self.change_aliases(|m| {
            if !m.contains_key(alias) && m.len() >= MAX_ALIASES {
                return Err(KmsError::invalid(format!("at most {MAX_ALIASES} aliases")));
            }
            Ok(m.insert(alias.to_string(), key.to_string()))
        })
        .await
    }

    /// Remove an alias; returns the key it named.
    pub async fn delete_alias(&self, alias: &str) -> Result<String, KmsError> {
        validate::alias_name(alias)?;
        self.change_aliases(|m| m.remove(alias).ok_or_else(|| not_found("alias", alias))).await
    }

    pub(super) async fn change_aliases<T>(
        &self,
        f: impl Fn(&mut BTreeMap<String, String>) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        self.require_fresh()?;
        for _ in 0..CAS_RETRIES {
            let (raw, mut map) = self.aliases_raw().await?;
            let out = f(&mut map)?;
            let next = serde_json::to_vec(&map).map_err(|e| KmsError::Internal(e.to_string()))?;
            let done = match &raw {
                None => self.store.put_meta_if_absent(ALIASES_META, &next).await?,
                Some(old) => self.store.replace_meta(ALIASES_META, old, &next).await?,
            };
            if done {
                return Ok(out);
            }
        }
        Err(KmsError::Conflict("the aliases are being changed concurrently; retry".into()))
    }
}
