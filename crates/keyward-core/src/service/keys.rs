//! Key lifecycle: create, describe, list, enable and disable, rotation policy and rotation,
//! scheduled deletion, and the scheduler that applies them.

use super::*;

impl Kms {
    /// Create a key with its first version.
    pub async fn create_key(&self, req: CreateKey) -> Result<KeyDescription, KmsError> {
        validate::key_name(&req.name)?;
        check_len("description", req.description.len(), MAX_DESCRIPTION)?;
        check_period(req.rotate_every_secs)?;
        let now = now_unix();
        let id = KeyId::random()?;
        let _wrapping = self.wrap_guard.read().await;
        let first = self.new_version(&id, req.algorithm, 1, now)?;
        let rec = KeyRecord {
            id,
            name: req.name.clone(),
            algorithm: req.algorithm,
            state: KeyState::Enabled,
            description: req.description,
            created_at: now,
            updated_at: now,
            current_version: 1,
            rotate_every_secs: req.rotate_every_secs,
            next_rotation_at: req.rotate_every_secs.map(|p| now.saturating_add(p as i64)),
            deletion_at: None,
            revision: 1,
        };
        match self.store.create_key(&rec, &first).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => return Err(KmsError::AlreadyExists { what: "key", name: req.name }),
            Err(e) => return Err(e.into()),
        }
        self.describe_key(&rec.name).await
    }

    /// A key's metadata and versions.
    pub async fn describe_key(&self, name: &str) -> Result<KeyDescription, KmsError> {
        let ck = self.key(name).await?;
        Ok(describe(&ck))
    }

    /// Keys ordered by name after `after`; returns the page and the cursor for the next one.
    pub async fn list_keys(
        &self,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<KeyRecord>, Option<String>), KmsError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(KmsError::invalid(format!("limit must be between 1 and {MAX_PAGE}")));
        }
        let page = self.store.list_keys(after, limit).await?;
        let next = (page.len() == limit as usize).then(|| page.last().map(|k| k.name.clone())).flatten();
        Ok((page, next))
    }

    pub(super) async fn update_key_with(
        &self,
        name: &str,
        f: impl Fn(&mut KeyRecord, i64) -> Result<(), KmsError>,
    ) -> Result<KeyDescription, KmsError> {
        if name.starts_with(ALIAS_PREFIX) {
            return Err(not_found("alias", name));
        }
        validate::key_name(name)?;
        for _ in 0..CAS_RETRIES {
            let mut rec = self.store.get_key(name).await?.ok_or_else(|| not_found("key", name))?;
            let expected = rec.revision;
            let now = now_unix();
            f(&mut rec, now)?;
            rec.revision = expected + 1;
            rec.updated_at = now;
            match self.store.update_key(&rec, expected).await {
                Ok(()) => {
                    self.invalidate(&rec);
                    return self.describe_key(name).await;
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KmsError::Conflict(format!("key {name:?} is being changed concurrently; retry")))
    }

    /// Set a key's description.
    pub async fn set_key_description(&self, name: &str, description: &str) -> Result<KeyDescription, KmsError> {
        check_len("description", description.len(), MAX_DESCRIPTION)?;
        self.update_key_with(name, |r, _| {
            r.description = description.to_string();
            Ok(())
        })
        .await
    }

    // ----- aliases --------------------------------------------------------------------------

    /// Enable a disabled key.
    pub async fn enable_key(&self, name: &str) -> Result<KeyDescription, KmsError> {
        self.update_key_with(name, |r, _| match r.state {
            KeyState::PendingDeletion => Err(KmsError::KeyPendingDeletion(r.name.clone())),
            _ => {
                r.state = KeyState::Enabled;
                Ok(())
            }
        })
        .await
    }

    /// Disable a key: every cryptographic operation is refused until it is enabled again.
    pub async fn disable_key(&self, name: &str) -> Result<KeyDescription, KmsError> {
        self.update_key_with(name, |r, _| match r.state {
            KeyState::PendingDeletion => Err(KmsError::KeyPendingDeletion(r.name.clone())),
            _ => {
                r.state = KeyState::Disabled;
                Ok(())
            }
        })
        .await
    }

    /// Set or clear the automatic rotation period.
    pub async fn set_rotation(&self, name: &str, rotate_every_secs: Option<u64>) -> Result<KeyDescription, KmsError> {
        check_period(rotate_every_secs)?;
        self.update_key_with(name, |r, now| {
            r.rotate_every_secs = rotate_every_secs;
            r.next_rotation_at = rotate_every_secs.map(|p| now.saturating_add(p as i64));
            Ok(())
        })
        .await
    }

    /// Schedule deletion after `pending_days` (1 to 30, default 7). The key refuses use meanwhile.
    pub async fn schedule_deletion(&self, name: &str, pending_days: Option<u32>) -> Result<KeyDescription, KmsError> {
        let days = pending_days.unwrap_or(DEFAULT_PENDING_DAYS);
        if !(MIN_PENDING_DAYS..=MAX_PENDING_DAYS).contains(&days) {
            return Err(KmsError::invalid(format!(
                "pending window must be between {MIN_PENDING_DAYS} and {MAX_PENDING_DAYS} days"
            )));
        }
        self.update_key_with(name, |r, now| {
            if r.state == KeyState::PendingDeletion {
                return Err(KmsError::KeyPendingDeletion(r.name.clone()));
            }
            r.state = KeyState::PendingDeletion;
            r.deletion_at = Some(now.saturating_add(i64::from(days) * 86400));
            Ok(())
        })
        .await
    }

    /// Cancel a pending deletion. As in AWS KMS the key comes back *disabled*.
    pub async fn cancel_deletion(&self, name: &str) -> Result<KeyDescription, KmsError> {
        self.update_key_with(name, |r, _| {
            if r.state != KeyState::PendingDeletion {
                return Err(KmsError::Conflict(format!("key {:?} is not pending deletion", r.name)));
            }
            r.state = KeyState::Disabled;
            r.deletion_at = None;
            Ok(())
        })
        .await
    }

    /// Add a new version; it becomes current. Older versions keep decrypting and verifying.
    pub async fn rotate_key(&self, name: &str) -> Result<KeyDescription, KmsError> {
        validate::key_name(name)?;
        self.rotate_at(name, now_unix()).await
    }

    pub(super) async fn rotate_at(&self, name: &str, now: i64) -> Result<KeyDescription, KmsError> {
        for _ in 0..CAS_RETRIES {
            let mut rec = self.store.get_key(name).await?.ok_or_else(|| not_found("key", name))?;
            if rec.state == KeyState::PendingDeletion {
                return Err(KmsError::KeyPendingDeletion(rec.name));
            }
            let expected = rec.revision;
            let version = rec
                .current_version
                .checked_add(1)
                .ok_or_else(|| KmsError::invalid("key has reached the maximum number of versions"))?;
            let _wrapping = self.wrap_guard.read().await;
            let v = self.new_version(&rec.id, rec.algorithm, version, now)?;
            rec.current_version = version;
            rec.revision = expected + 1;
            rec.updated_at = now;
            rec.next_rotation_at = rec.rotate_every_secs.map(|p| now.saturating_add(p as i64));
            match self.store.add_key_version(&rec, &v, expected).await {
                Ok(()) => {
                    self.invalidate(&rec);
                    return self.describe_key(name).await;
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KmsError::Conflict(format!("key {name:?} is being changed concurrently; retry")))
    }

    /// Run due work: automatic rotations and purges of keys whose pending window ended.
    pub async fn run_scheduled(&self, now: i64) -> Result<ScheduledReport, KmsError> {
        let mut report = ScheduledReport::default();
        for rec in self.store.keys_due(now, 1000).await? {
            match rec.state {
                KeyState::PendingDeletion if rec.deletion_at.is_some_and(|d| d <= now) => {
                    match self.store.delete_key(&rec.id, rec.revision).await {
                        Ok(()) => {
                            self.invalidate(&rec);
                            report.purged.push(rec.name);
                        }
                        Err(StoreError::Conflict | StoreError::NotFound) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                KeyState::Enabled if rec.next_rotation_at.is_some_and(|t| t <= now) => {
                    self.rotate_at(&rec.name, now).await?;
                    report.rotated.push(rec.name);
                }
                _ => {}
            }
        }
        report.randomized_rotated = self.rotate_due_random_values(now).await?;
        Ok(report)
    }
}
