//! The [`Store`] operations, each one statement or one short transaction on the writer or a reader.

use super::*;

#[async_trait]
impl Store for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    async fn snapshot(&self) -> Result<std::fs::File, StoreError> {
        // Written beside the database (in the owner-only data directory), opened, and unlinked
        // before anything is read from it: nothing is left behind, whatever happens next.
        let dir = self.inner.path.parent().map(Path::to_path_buf).unwrap_or_default();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dest = dir.join(format!(".snapshot-{}-{}.db", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&dest);
        let target = dest.clone();
        // One read transaction: a consistent copy while writes go on.
        let copied = self
            .read(move |c| {
                c.execute("VACUUM INTO ?1", [target.to_string_lossy().as_ref()]).map_err(backend)?;
                Ok(())
            })
            .await;
        let opened = copied.and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))
                .and_then(|()| std::fs::File::open(&dest))
                .map_err(|e| StoreError::Backend(format!("reading the snapshot: {e}")))
        });
        let _ = std::fs::remove_file(&dest);
        opened
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.read(move |c| {
            cached_row(c, "SELECT v FROM meta WHERE k=?1", [key], |r| r.get(0)).optional().map_err(backend)
        })
        .await
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(move |c| {
            let n =
                c.execute("INSERT OR IGNORE INTO meta (k, v) VALUES (?1, ?2)", params![key, value]).map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn replace_meta(&self, key: &str, expected: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let (key, expected, value) = (key.to_string(), expected.to_vec(), value.to_vec());
        self.write(move |c| {
            let n = c
                .execute("UPDATE meta SET v=?3 WHERE k=?1 AND v=?2", params![key, expected, value])
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn rewrap_key_version(
        &self,
        id: &KeyId,
        version: u32,
        expected: &[u8],
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let (id, expected, wrapped) = (id.0.to_vec(), expected.to_vec(), wrapped.to_vec());
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE key_versions SET wrapped_material=?4 WHERE key_id=?1 AND version=?2 AND wrapped_material=?3",
                    params![id, version, expected, wrapped],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn create_key(&self, key: &KeyRecord, first: &KeyVersionRecord) -> Result<(), StoreError> {
        let (key, first) = (key.clone(), first.clone());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let p = key_params(&key)?;
            tx.execute(
                &format!("INSERT INTO keys ({KEY_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"),
                rusqlite::params_from_iter(p.iter().map(|b| b.as_ref() as &dyn rusqlite::ToSql)),
            )
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO key_versions (key_id, version, wrapped_material, public_key, created_at) VALUES (?1,?2,?3,?4,?5)",
                params![first.key_id.0.to_vec(), first.version, first.wrapped_material, first.public_key, first.created_at],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            cached_row(c, &format!("SELECT {KEY_COLS} FROM keys WHERE name=?1"), [name], key_from_row)
                .optional()
                .map_err(backend)?
                .transpose()
        })
        .await
    }

    async fn get_key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.0.to_vec();
        self.read(move |c| {
            cached_row(c, &format!("SELECT {KEY_COLS} FROM keys WHERE id=?1"), [id], key_from_row)
                .optional()
                .map_err(backend)?
                .transpose()
        })
        .await
    }

    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let after = after.unwrap_or("").to_string();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!("SELECT {KEY_COLS} FROM keys WHERE name > ?1 ORDER BY name LIMIT ?2"))
                .map_err(backend)?;
            let rows = st.query_map(params![after, limit], key_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn update_key(&self, key: &KeyRecord, expected_revision: u64) -> Result<(), StoreError> {
        let key = key.clone();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            update_key_tx(&tx, &key, expected_revision)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn add_key_version(
        &self,
        key: &KeyRecord,
        version: &KeyVersionRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let (key, v) = (key.clone(), version.clone());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            update_key_tx(&tx, &key, expected_revision)?;
            tx.execute(
                "INSERT INTO key_versions (key_id, version, wrapped_material, public_key, created_at) VALUES (?1,?2,?3,?4,?5)",
                params![v.key_id.0.to_vec(), v.version, v.wrapped_material, v.public_key, v.created_at],
            )
            .map_err(|e| match backend(e) {
                StoreError::AlreadyExists => StoreError::Conflict,
                other => other,
            })?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_key_versions(&self, id: &KeyId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        let id = id.0.to_vec();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT key_id, version, wrapped_material, public_key, created_at FROM key_versions \
                     WHERE key_id=?1 ORDER BY version",
                )
                .map_err(backend)?;
            let rows = st.query_map([id], version_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn keys_due(&self, now: i64, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLS} FROM keys WHERE (state='enabled' AND next_rotation_at <= ?1) \
                     OR (state='pending_deletion' AND deletion_at <= ?1) ORDER BY name LIMIT ?2"
                ))
                .map_err(backend)?;
            let rows = st.query_map(params![now, limit], key_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn delete_key(&self, id: &KeyId, expected_revision: u64) -> Result<(), StoreError> {
        let id = id.0.to_vec();
        let rev = i64_of(expected_revision)?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let n = tx.execute("DELETE FROM keys WHERE id=?1 AND revision=?2", params![id, rev]).map_err(backend)?;
            if n == 0 {
                let exists: Option<i64> =
                    tx.query_row("SELECT 1 FROM keys WHERE id=?1", [&id], |r| r.get(0)).optional().map_err(backend)?;
                return Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound });
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn put_secret_version(&self, v: &SecretVersionRecord, expected_current: u32) -> Result<(), StoreError> {
        let v = v.clone();
        self.write(move |c| {
            if v.version != expected_current.wrapping_add(1) {
                return Err(StoreError::Conflict);
            }
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let cur: Option<i64> = tx
                .query_row("SELECT current_version FROM secrets WHERE path=?1", [&v.path], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            match cur {
                None if expected_current == 0 => {
                    tx.execute(
                        "INSERT INTO secrets (path, current_version, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
                        params![v.path, v.version, v.created_at],
                    )
                    .map_err(backend)?;
                }
                Some(c) if c == i64::from(expected_current) => {
                    tx.execute(
                        "UPDATE secrets SET current_version=?2, updated_at=?3 WHERE path=?1",
                        params![v.path, v.version, v.created_at],
                    )
                    .map_err(backend)?;
                }
                _ => return Err(StoreError::Conflict),
            }
            tx.execute(
                "INSERT INTO secret_versions (path, version, wrapped_value, created_at, deleted_at) VALUES (?1,?2,?3,?4,?5)",
                params![v.path, v.version, v.wrapped_value, v.created_at, v.deleted_at],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_secret(&self, path: &str) -> Result<Option<SecretRecord>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            cached_row(
                c,
                "SELECT path, current_version, created_at, updated_at FROM secrets WHERE path=?1",
                [path],
                |r| {
                    let v: i64 = r.get(1)?;
                    Ok(u32::try_from(v).map(|current_version| SecretRecord {
                        path: r.get(0).unwrap_or_default(),
                        current_version,
                        created_at: r.get(2).unwrap_or_default(),
                        updated_at: r.get(3).unwrap_or_default(),
                    }))
                },
            )
            .optional()
            .map_err(backend)?
            .map(|r| r.map_err(|_| StoreError::Corrupt("secret row".into())))
            .transpose()
        })
        .await
    }

    async fn get_secret_version(&self, path: &str, version: u32) -> Result<Option<SecretVersionRecord>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            cached_row(c,
                "SELECT path, version, wrapped_value, created_at, deleted_at FROM secret_versions WHERE path=?1 AND version=?2",
                params![path, version],
                secret_version_from_row,
            )
            .optional()
            .map_err(backend)?
            .transpose()
        })
        .await
    }

    async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Option<SecretRead>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            let row = cached_row(c, READ_SECRET, params![path, version], |r| {
                let current: i64 = r.get(0)?;
                let found: Option<String> = r.get(1)?;
                let version = match found {
                    Some(_) => Some(secret_version_from_row_at(r, 1)?),
                    None => None,
                };
                Ok((current, version))
            })
            .optional()
            .map_err(backend)?;
            let Some((current, version)) = row else { return Ok(None) };
            let current_version = u32::try_from(current).map_err(|_| StoreError::Corrupt("secret row".into()))?;
            Ok(Some(SecretRead { current_version, version: version.transpose()? }))
        })
        .await
    }

    async fn list_secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError> {
        let path = path.to_string();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT path, version, CASE WHEN wrapped_value IS NULL THEN NULL ELSE x'' END, created_at, deleted_at \
                     FROM secret_versions WHERE path=?1 ORDER BY version",
                )
                .map_err(backend)?;
            let rows = st.query_map([path], secret_version_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn list_secrets(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError> {
        let (prefix, after) = (prefix.to_string(), after.unwrap_or("").to_string());
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT path FROM secrets WHERE path >= ?1 AND substr(path, 1, length(?1)) = ?1 AND path > ?2 \
                     ORDER BY path LIMIT ?3",
                )
                .map_err(backend)?;
            let rows =
                st.query_map(params![prefix, after, limit], |r| r.get::<_, String>(0).map(Ok)).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn set_secret_versions_deleted(
        &self,
        path: &str,
        versions: &[u32],
        deleted_at: Option<i64>,
    ) -> Result<u32, StoreError> {
        let (path, versions) = (path.to_string(), versions.to_vec());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut n = 0u32;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE secret_versions SET deleted_at=?3 WHERE path=?1 AND version=?2 \
                         AND wrapped_value IS NOT NULL AND deleted_at IS NOT ?3",
                    )
                    .map_err(backend)?;
                for v in versions {
                    n += u32::try_from(st.execute(params![path, v, deleted_at]).map_err(backend)?).unwrap_or(0);
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn destroy_secret_versions(&self, path: &str, versions: &[u32]) -> Result<u32, StoreError> {
        let (path, versions) = (path.to_string(), versions.to_vec());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut n = 0u32;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE secret_versions SET wrapped_value=NULL WHERE path=?1 AND version=?2 AND wrapped_value IS NOT NULL",
                    )
                    .map_err(backend)?;
                for v in versions {
                    n += u32::try_from(st.execute(params![path, v]).map_err(backend)?).unwrap_or(0);
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO tokens (hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, display_name, selectors, max_expires_at) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
                params![
                    t.hash.to_vec(),
                    t.accessor,
                    t.policies.join(","),
                    t.created_at,
                    t.expires_at,
                    t.parent,
                    t.ttl_secs.map(i64_of).transpose()?,
                    t.max_uses,
                    t.uses,
                    t.display_name,
                    t.selectors.join("\n"),
                    t.max_expires_at
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let hash = hash.to_vec();
        self.read(move |c| {
            let mut st =
                c.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash=?1")).map_err(backend)?;
            st.query_row([hash], token_from_row).optional().map_err(backend)?.transpose()
        })
        .await
    }

    async fn set_token_expiry(&self, accessor: &str, expires_at: Option<i64>) -> Result<(), StoreError> {
        let accessor = accessor.to_string();
        self.write(move |c| {
            let n = c
                .execute("UPDATE tokens SET expires_at=?2 WHERE accessor=?1", params![accessor, expires_at])
                .map_err(backend)?;
            if n == 1 { Ok(()) } else { Err(StoreError::NotFound) }
        })
        .await
    }

    async fn use_token(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError> {
        let hash = hash.to_vec();
        self.write(move |c| {
            c.query_row(
                "UPDATE tokens SET uses = uses + 1 WHERE hash=?1 AND (max_uses IS NULL OR uses < max_uses) RETURNING uses",
                [hash],
                |r| r.get::<_, u32>(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn delete_tokens(&self, accessors: &[String]) -> Result<u32, StoreError> {
        let accessors = accessors.to_vec();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let mut n = 0u32;
            {
                let mut st = tx.prepare_cached("DELETE FROM tokens WHERE accessor=?1").map_err(backend)?;
                for a in &accessors {
                    n += u32::try_from(st.execute([a]).map_err(backend)?).unwrap_or(0);
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(move |c| {
            let mut st =
                c.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY accessor")).map_err(backend)?;
            let rows = st.query_map([], token_from_row).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn put_policy(&self, name: &str, document: &str, now: i64) -> Result<(), StoreError> {
        let (name, document) = (name.to_string(), document.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT INTO policies (name, document, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(name) DO UPDATE SET document=excluded.document, updated_at=excluded.updated_at",
                params![name, document, now],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(move |c| Ok(c.execute("DELETE FROM policies WHERE name=?1", [name]).map_err(backend)? == 1)).await
    }

    async fn list_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT name, document FROM policies ORDER BY name").map_err(backend)?;
            let rows = st.query_map([], |r| Ok(Ok((r.get(0)?, r.get(1)?)))).map_err(backend)?;
            collect(rows)
        })
        .await
    }

    async fn get_policy(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            cached_row(c, "SELECT document FROM policies WHERE name=?1", [name], |r| r.get(0))
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.write(move |c| {
            let now = now_ms();
            let n = c
                .execute(
                    "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, expires_ms=excluded.expires_ms \
                     WHERE leases.holder=excluded.holder OR leases.expires_ms <= ?4",
                    params![name, holder, now.saturating_add(ttl), now],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn hold_instance(
        &self,
        scope: &str,
        instance: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<InstanceHold, StoreError> {
        let (scope, instance) = (scope.to_string(), instance.to_string());
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.write(move |c| {
            let now = now_ms();
            let tx = c.transaction().map_err(backend)?;
            tx.execute("DELETE FROM instance_holds WHERE scope=?1 AND expires_ms <= ?2", params![scope, now])
                .map_err(backend)?;
            let renewed = tx
                .execute(
                    "UPDATE instance_holds SET expires_ms=?3 WHERE scope=?1 AND instance=?2",
                    params![scope, instance, now.saturating_add(ttl)],
                )
                .map_err(backend)?;
            if renewed == 0 {
                let holders: u32 = tx
                    .query_row("SELECT COUNT(*) FROM instance_holds WHERE scope=?1", [&scope], |r| r.get(0))
                    .map_err(backend)?;
                if holders >= max {
                    tx.commit().map_err(backend)?;
                    return Ok(InstanceHold::Full { holders });
                }
                tx.execute(
                    "INSERT INTO instance_holds (scope, instance, expires_ms) VALUES (?1, ?2, ?3)",
                    params![scope, instance, now.saturating_add(ttl)],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(InstanceHold::Held)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(move |c| {
            c.execute("DELETE FROM leases WHERE name=?1 AND holder=?2", params![name, holder]).map_err(backend)?;
            Ok(())
        })
        .await
    }
}
