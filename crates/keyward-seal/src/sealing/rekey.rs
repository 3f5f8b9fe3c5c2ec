//! Rekey: a threshold of the current shares replaces the unseal key, and the old shares stop
//! unsealing.

use super::*;

impl Sealing {
    /// Start a rekey: new shares for the same root keyring, once `threshold` current shares are
    /// submitted. Returns the nonce every submission must quote.
    pub async fn rekey_start(&self, shares: u8, threshold: u8) -> Result<String, SealingError> {
        if self.kind == SealKind::InsecureFile {
            return Err(SealingError::WrongState("the insecure file seal has no shares to rekey"));
        }
        check_params(shares, threshold)?;
        let mut c = self.ceremony.lock().await;
        let Some(unseal_key) = c.unseal_key.as_ref() else {
            return Err(SealingError::WrongState("unseal keyward before rekeying"));
        };
        let (cfg, _) = self.config().await?.ok_or(SealingError::NotInitialized)?;
        if let Err(SealError::WrongUnsealKey) = cfg.open_keyring(unseal_key) {
            return Err(SealingError::WrongState(REKEYED_ELSEWHERE));
        }
        if c.rekey.is_some() {
            return Err(SealingError::WrongState(
                "a rekey is already in progress; finish it or cancel it with `keyward operator rekey --cancel`",
            ));
        }
        let mut raw = [0u8; 16];
        keyward_crypto::fill_random(&mut raw).map_err(KmsError::from)?;
        let nonce = hex::encode(raw);
        c.rekey = Some(Rekey { nonce: nonce.clone(), shares, threshold, collected: Vec::new() });
        Ok(nonce)
    }

    /// Cancel a rekey in progress.
    pub async fn rekey_cancel(&self) -> bool {
        self.ceremony.lock().await.rekey.take().is_some()
    }

    /// The nonce and parameters of the rekey in progress.
    pub async fn rekey_status(&self) -> Option<(String, u8, u8, u8)> {
        let c = self.ceremony.lock().await;
        c.rekey.as_ref().map(|r| (r.nonce.clone(), r.shares, r.threshold, u8::try_from(r.collected.len()).unwrap_or(0)))
    }

    /// Submit one current share toward the rekey `nonce`.
    pub async fn rekey_submit(&self, nonce: &str, text: &str) -> Result<Progress, SealingError> {
        let share = parse_share(text)?;
        let (mut cfg, raw) = self.config().await?.ok_or(SealingError::NotInitialized)?;
        let mut c = self.ceremony.lock().await;
        let c = &mut *c;
        let rk = c.rekey.as_mut().ok_or(SealingError::WrongState("no rekey is in progress; start one first"))?;
        if !keyward_crypto::ct_eq(rk.nonce.as_bytes(), nonce.as_bytes()) {
            return Err(SealingError::Invalid("the nonce does not match the rekey in progress".into()));
        }
        if !add_share(&mut rk.collected, share) {
            return Err(SealingError::Invalid("this share was already submitted for this rekey".into()));
        }
        if rk.collected.len() < usize::from(cfg.threshold) {
            return Ok(Progress::Need {
                have: u8::try_from(rk.collected.len()).unwrap_or(0),
                threshold: cfg.threshold,
            });
        }
        let rk = c.rekey.take().ok_or(SealingError::WrongState("rekey vanished"))?;
        let old_key = shamir::combine(&rk.collected).map_err(KmsError::from)?;
        let current = c.unseal_key.as_ref().ok_or(SealingError::WrongState("keyward was sealed during the rekey"))?;
        if !old_key.ct_eq(current.expose()) {
            tracing::warn!("rekey attempt with a wrong or forged share; rekey cancelled");
            return Err(SealingError::WrongShares);
        }
        let roots = cfg.open_keyring(&old_key)?;
        let new_key = SecretBytes::random(UNSEAL_KEY_LEN).map_err(KmsError::from)?;
        cfg.shares = rk.shares;
        cfg.threshold = rk.threshold;
        cfg.set_keyring(&new_key, &roots.iter().collect::<Vec<_>>())?;
        if cfg.hsm.is_some() {
            cfg.hsm = Some(self.hsm_wrap(&new_key).await?);
        }
        let split = shamir::split(new_key.expose(), rk.shares, rk.threshold).map_err(KmsError::from)?;
        if !self.store.replace_meta(META_SEAL, &raw, &cfg.to_bytes()).await.map_err(KmsError::from)? {
            return Err(SealingError::WrongState("the seal changed concurrently; start the rekey again"));
        }
        c.unseal_key = Some(new_key);
        tracing::info!(shares = rk.shares, threshold = rk.threshold, "rekeyed: the old shares no longer unseal");
        Ok(Progress::Rekeyed(split.iter().map(|s| b64(s.to_bytes().expose())).collect()))
    }
}
