//! Root rotation (a new root key, every record re-wrapped under it, the old one forgotten), and
//! following a seal that another server on the same store changed.

use super::*;

impl Sealing {
    /// Another server changed the stored seal: adopt its root keyring (a root rotation started
    /// or finished there), so keys wrapped there can be unwrapped here and nothing new is wrapped
    /// here under a root key being retired. After a rekey elsewhere this server's unseal key no
    /// longer opens the keyring: it follows through the member keyring with the roots it holds
    /// (and refuses ceremonies until unsealed with the new shares). If it cannot follow either
    /// way, it seals itself.
    pub async fn follow_seal_change(&self) -> Result<(), SealingError> {
        let mut c = self.ceremony.lock().await;
        let (Some(u), Some(unseal_key)) = (self.unsealed(), c.unseal_key.as_ref()) else { return Ok(()) };
        let (cfg, _) = self.config().await?.ok_or(SealingError::NotInitialized)?;
        let roots = match cfg.open_keyring(unseal_key) {
            Ok(roots) => roots,
            // Rekeyed elsewhere: follow with the root keys this server holds.
            Err(SealError::WrongUnsealKey) => match cfg.open_member_keyring(&c.roots) {
                Ok(roots) => {
                    tracing::warn!(
                        "another server rekeyed the seal: this server follows the root keyring, but seal ceremonies \
                         here need an unseal with the new shares"
                    );
                    roots
                }
                Err(SealError::WrongUnsealKey) => {
                    // Serving on would wrap new keys under a root the others have retired.
                    self.seal_locked(&mut c);
                    tracing::error!(
                        "the root keyring was changed by another server in a way this server cannot follow (it missed \
                         a step of a root rotation); sealed it: unseal it again"
                    );
                    return Err(SealingError::WrongState(
                        "sealed: the root keyring changed beyond what this server holds",
                    ));
                }
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        let held = copies(&roots);
        if u.kms.adopt_roots(roots).await? {
            tracing::info!(generation = cfg.generation, "adopted the root keyring changed by another server");
        }
        c.roots = held;
        Ok(())
    }

    /// Move every stored key to a new root key while serving.
    pub async fn rotate_root(&self) -> Result<RewrapReport, SealingError> {
        let mut c = self.ceremony.lock().await;
        let new = SecretBytes::random(32).map_err(KmsError::from)?;
        self.rotate_locked(&mut c, Some(new)).await
    }

    /// With `new`, add it as the newest root; without, finish an interrupted rotation. The seal
    /// records the new key before anything is wrapped under it, and forgets the old ones only
    /// after everything has been re-wrapped, so a crash at any point loses nothing.
    pub(super) async fn rotate_locked(
        &self,
        c: &mut Ceremony,
        new: Option<SecretBytes>,
    ) -> Result<RewrapReport, SealingError> {
        let u = self.unsealed().ok_or(SealingError::WrongState("keyward is sealed"))?;
        // A copy: `c.roots` changes below while the key is in use.
        let unseal_key = &SecretBytes::copy_from(
            c.unseal_key.as_ref().ok_or(SealingError::WrongState("keyward is sealed"))?.expose(),
        );
        let (mut cfg, raw) = self.config().await?.ok_or(SealingError::NotInitialized)?;
        let mut roots = match cfg.open_keyring(unseal_key) {
            Err(SealError::WrongUnsealKey) => return Err(SealingError::WrongState(REKEYED_ELSEWHERE)),
            other => other?,
        };
        if let Some(new) = new {
            if roots.len() > 1 {
                return Err(SealingError::WrongState("a root rotation is already in progress"));
            }
            roots.insert(0, new);
            cfg.set_keyring(unseal_key, &roots.iter().collect::<Vec<_>>())?;
            let next = cfg.to_bytes();
            if !self.store.replace_meta(META_SEAL, &raw, &next).await.map_err(KmsError::from)? {
                return Err(SealingError::WrongState("the seal changed concurrently; run the rotation again"));
            }
            u.kms.begin_root_rotation(&roots[0]).await?;
            c.roots = copies(&roots);
            if u.kms.is_shared() {
                // Other servers adopt the new root within their staleness bound (or stop
                // serving); wait that long so nothing they wrap under the old root is missed.
                tokio::time::sleep(u.kms.max_staleness() * 2).await;
            }
            let report = self.complete_rotation(&u, unseal_key, cfg, next, &roots).await?;
            c.roots.truncate(1);
            return Ok(report);
        }
        let report = self.complete_rotation(&u, unseal_key, cfg, raw, &roots).await?;
        c.roots.truncate(1);
        Ok(report)
    }

    pub(super) async fn complete_rotation(
        &self,
        u: &Unsealed,
        unseal_key: &SecretBytes,
        mut cfg: SealConfig,
        raw: Vec<u8>,
        roots: &[SecretBytes],
    ) -> Result<RewrapReport, SealingError> {
        let report = u.kms.rewrap_under_newest_root().await?;
        cfg.set_keyring(unseal_key, &roots[..1].iter().collect::<Vec<_>>())?;
        if !self.store.replace_meta(META_SEAL, &raw, &cfg.to_bytes()).await.map_err(KmsError::from)? {
            return Err(SealingError::WrongState("the seal changed concurrently; run the rotation again"));
        }
        u.kms.finish_root_rotation()?;
        tracing::info!(key_versions = report.key_versions, service_keys = report.service_keys, "root key rotated");
        Ok(report)
    }
}
