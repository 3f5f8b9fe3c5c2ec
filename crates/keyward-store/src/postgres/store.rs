//! The [`Store`] operations, each one statement or one short transaction.

use super::*;

#[async_trait]
impl Store for PostgresStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt("SELECT v FROM meta WHERE k=$1", &[&key]).await.map_err(db)?.map(|r| r.get(0)))
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute("INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING", &[&key, &value])
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    async fn replace_meta(&self, key: &str, expected: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c.execute("UPDATE meta SET v=$3 WHERE k=$1 AND v=$2", &[&key, &expected, &value]).await.map_err(db)?;
        Ok(n == 1)
    }

    async fn create_key(&self, key: &KeyRecord, first: &KeyVersionRecord) -> Result<(), StoreError> {
        let p = KeyParams::of(key)?;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute(
            &format!("INSERT INTO keys ({KEY_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"),
            &p.refs(),
        )
        .await
        .map_err(db)?;
        tx.execute(
            INSERT_VERSION,
            &[
                &first.key_id.0.to_vec(),
                &i64::from(first.version),
                &first.wrapped_material,
                &first.public_key,
                &first.created_at,
            ],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt(&format!("SELECT {KEY_COLS} FROM keys WHERE name=$1"), &[&name])
            .await
            .map_err(db)?
            .map(|r| key_from_row(&r))
            .transpose()
    }

    async fn get_key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt(&format!("SELECT {KEY_COLS} FROM keys WHERE id=$1"), &[&id.0.to_vec()])
            .await
            .map_err(db)?
            .map(|r| key_from_row(&r))
            .transpose()
    }

    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {KEY_COLS} FROM keys WHERE name > $1 ORDER BY name LIMIT $2"),
                &[&after.unwrap_or(""), &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn update_key(&self, key: &KeyRecord, expected_revision: u64) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        update_key_tx(&tx, key, expected_revision).await?;
        tx.commit().await.map_err(db)
    }

    async fn add_key_version(
        &self,
        key: &KeyRecord,
        version: &KeyVersionRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        update_key_tx(&tx, key, expected_revision).await?;
        tx.execute(
            INSERT_VERSION,
            &[
                &version.key_id.0.to_vec(),
                &i64::from(version.version),
                &version.wrapped_material,
                &version.public_key,
                &version.created_at,
            ],
        )
        .await
        .map_err(|e| match db(e) {
            StoreError::AlreadyExists => StoreError::Conflict,
            other => other,
        })?;
        tx.commit().await.map_err(db)
    }

    async fn get_key_versions(&self, id: &KeyId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT key_id, version, wrapped_material, public_key, created_at FROM key_versions \
                 WHERE key_id=$1 ORDER BY version",
                &[&id.0.to_vec()],
            )
            .await
            .map_err(db)?;
        rows.iter().map(version_from_row).collect()
    }

    async fn rewrap_key_version(
        &self,
        id: &KeyId,
        version: u32,
        expected: &[u8],
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE key_versions SET wrapped_material=$4 WHERE key_id=$1 AND version=$2 AND wrapped_material=$3",
                &[&id.0.to_vec(), &i64::from(version), &expected, &wrapped],
            )
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    async fn keys_due(&self, now: i64, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {KEY_COLS} FROM keys WHERE (state='enabled' AND next_rotation_at <= $1) \
                     OR (state='pending_deletion' AND deletion_at <= $1) ORDER BY name LIMIT $2"
                ),
                &[&now, &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn delete_key(&self, id: &KeyId, expected_revision: u64) -> Result<(), StoreError> {
        let (id, rev) = (id.0.to_vec(), to_i64(expected_revision)?);
        let c = self.client().await?;
        let n = c.execute("DELETE FROM keys WHERE id=$1 AND revision=$2", &[&id, &rev]).await.map_err(db)?;
        if n == 1 {
            return Ok(());
        }
        let exists = c.query_opt("SELECT 1 FROM keys WHERE id=$1", &[&id]).await.map_err(db)?;
        Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound })
    }

    async fn put_secret_version(&self, v: &SecretVersionRecord, expected_current: u32) -> Result<(), StoreError> {
        if v.version != expected_current.wrapping_add(1) {
            return Err(StoreError::Conflict);
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let version = i64::from(v.version);
        // One conditional statement each way, so two writers racing on the same path cannot both
        // succeed: the loser of an insert hits the primary key, the loser of an update changes no row.
        let n = if expected_current == 0 {
            tx.execute(
                "INSERT INTO secrets (path, current_version, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (path) DO NOTHING",
                &[&v.path, &version, &v.created_at],
            )
            .await
            .map_err(db)?
        } else {
            tx.execute(
                "UPDATE secrets SET current_version=$2, updated_at=$3 WHERE path=$1 AND current_version=$4",
                &[&v.path, &version, &v.created_at, &i64::from(expected_current)],
            )
            .await
            .map_err(db)?
        };
        if n != 1 {
            return Err(StoreError::Conflict);
        }
        tx.execute(
            "INSERT INTO secret_versions (path, version, wrapped_value, created_at, deleted_at) VALUES ($1,$2,$3,$4,$5)",
            &[&v.path, &version, &v.wrapped_value, &v.created_at, &v.deleted_at],
        )
        .await
        .map_err(|e| match db(e) {
            StoreError::AlreadyExists => StoreError::Conflict,
            other => other,
        })?;
        tx.commit().await.map_err(db)
    }

    async fn get_secret(&self, path: &str) -> Result<Option<SecretRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt("SELECT path, current_version, created_at, updated_at FROM secrets WHERE path=$1", &[&path])
            .await
            .map_err(db)?
            .map(|r| {
                Ok(SecretRecord {
                    path: r.get(0),
                    current_version: to_u32(r.get(1), "secret version")?,
                    created_at: r.get(2),
                    updated_at: r.get(3),
                })
            })
            .transpose()
    }

    async fn get_secret_version(&self, path: &str, version: u32) -> Result<Option<SecretVersionRecord>, StoreError> {
        let c = self.client().await?;
        c.query_opt(
            "SELECT path, version, wrapped_value, created_at, deleted_at FROM secret_versions WHERE path=$1 AND version=$2",
            &[&path, &i64::from(version)],
        )
        .await
        .map_err(db)?
        .map(|r| secret_version_from_row(&r))
        .transpose()
    }

    async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Option<SecretRead>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT s.current_version, v.path, v.version, v.wrapped_value, v.created_at, v.deleted_at \
                 FROM secrets s LEFT JOIN secret_versions v \
                 ON v.path = s.path AND v.version = COALESCE($2::BIGINT, s.current_version) WHERE s.path = $1",
                &[&path, &version.map(i64::from)],
            )
            .await
            .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let bad = || StoreError::Corrupt("secret row".into());
        let current_version = to_u32(r.try_get(0).map_err(|_| bad())?, "secret version")?;
        let found: Option<String> = r.try_get(1).map_err(|_| bad())?;
        let version = match found {
            Some(path) => Some(SecretVersionRecord {
                path,
                version: to_u32(r.try_get(2).map_err(|_| bad())?, "secret version")?,
                wrapped_value: r.try_get(3).map_err(|_| bad())?,
                created_at: r.try_get(4).map_err(|_| bad())?,
                deleted_at: r.try_get(5).map_err(|_| bad())?,
            }),
            None => None,
        };
        Ok(Some(SecretRead { current_version, version }))
    }

    async fn list_secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT path, version, CASE WHEN wrapped_value IS NULL THEN NULL ELSE ''::bytea END, created_at, deleted_at \
                 FROM secret_versions WHERE path=$1 ORDER BY version",
                &[&path],
            )
            .await
            .map_err(db)?;
        rows.iter().map(secret_version_from_row).collect()
    }

    async fn list_secrets(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT path FROM secrets WHERE starts_with(path, $1) AND path > $2 ORDER BY path LIMIT $3",
                &[&prefix, &after.unwrap_or(""), &i64::from(limit)],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn set_secret_versions_deleted(
        &self,
        path: &str,
        versions: &[u32],
        deleted_at: Option<i64>,
    ) -> Result<u32, StoreError> {
        let versions = versions_param(versions);
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE secret_versions SET deleted_at=$3 WHERE path=$1 AND version = ANY($2) \
                 AND wrapped_value IS NOT NULL AND deleted_at IS DISTINCT FROM $3",
                &[&path, &versions, &deleted_at],
            )
            .await
            .map_err(db)?;
        Ok(count(n))
    }

    async fn destroy_secret_versions(&self, path: &str, versions: &[u32]) -> Result<u32, StoreError> {
        let versions = versions_param(versions);
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE secret_versions SET wrapped_value=NULL WHERE path=$1 AND version = ANY($2) AND wrapped_value IS NOT NULL",
                &[&path, &versions],
            )
            .await
            .map_err(db)?;
        Ok(count(n))
    }

    async fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO tokens (hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, \
             display_name, selectors, max_expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
            &[
                &t.hash.to_vec(),
                &t.accessor,
                &t.policies.join(","),
                &t.created_at,
                &t.expires_at,
                &t.parent,
                &t.ttl_secs.map(to_i64).transpose()?,
                &t.max_uses.map(i64::from),
                &i64::from(t.uses),
                &t.display_name,
                &t.selectors.join("\n"),
                &t.max_expires_at,
            ],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash=$1"), &[&hash.as_slice()])
            .await
            .map_err(db)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn set_token_expiry(&self, accessor: &str, expires_at: Option<i64>) -> Result<(), StoreError> {
        let c = self.client().await?;
        let n = c
            .execute("UPDATE tokens SET expires_at=$2 WHERE accessor=$1", &[&accessor, &expires_at])
            .await
            .map_err(db)?;
        if n == 1 { Ok(()) } else { Err(StoreError::NotFound) }
    }

    async fn use_token(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "UPDATE tokens SET uses = uses + 1 WHERE hash=$1 AND (max_uses IS NULL OR uses < max_uses) RETURNING uses",
                &[&hash.as_slice()],
            )
            .await
            .map_err(db)?;
        row.map(|r| to_u32(r.get(0), "uses")).transpose()
    }

    async fn delete_tokens(&self, accessors: &[String]) -> Result<u32, StoreError> {
        let c = self.client().await?;
        let n = c.execute("DELETE FROM tokens WHERE accessor = ANY($1)", &[&accessors]).await.map_err(db)?;
        Ok(count(n))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c.query(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY accessor"), &[]).await.map_err(db)?;
        rows.iter().map(token_from_row).collect()
    }

    async fn put_policy(&self, name: &str, document: &str, now: i64) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO policies (name, document, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET document=excluded.document, updated_at=excluded.updated_at",
            &[&name, &document, &now],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(c.execute("DELETE FROM policies WHERE name=$1", &[&name]).await.map_err(db)? == 1)
    }

    async fn list_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        let c = self.client().await?;
        let rows = c.query("SELECT name, document FROM policies ORDER BY name", &[]).await.map_err(db)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn get_policy(&self, name: &str) -> Result<Option<String>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_opt("SELECT document FROM policies WHERE name=$1", &[&name]).await.map_err(db)?.map(|r| r.get(0)))
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let c = self.client().await?;
        // The database's clock decides expiry, so servers' clocks need not agree.
        let n = c
            .execute(
                "INSERT INTO keyward_leases (name, holder, expires_at) \
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, expires_at=excluded.expires_at \
                 WHERE keyward_leases.holder=excluded.holder OR keyward_leases.expires_at <= clock_timestamp()",
                &[&name, &holder, &ttl.as_secs_f64()],
            )
            .await
            .map_err(db)?;
        Ok(n == 1)
    }

    async fn hold_instance(
        &self,
        scope: &str,
        instance: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<InstanceHold, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        // One scope's places are decided one transaction at a time (across servers), so a
        // count and the insert after it cannot interleave with another server's.
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", &[&scope]).await.map_err(db)?;
        tx.execute("DELETE FROM keyward_instance_holds WHERE scope=$1 AND expires_at <= clock_timestamp()", &[&scope])
            .await
            .map_err(db)?;
        let secs = ttl.as_secs_f64();
        let renewed = tx
            .execute(
                "UPDATE keyward_instance_holds SET expires_at = clock_timestamp() + make_interval(secs => $3) \
                 WHERE scope=$1 AND instance=$2",
                &[&scope, &instance, &secs],
            )
            .await
            .map_err(db)?;
        if renewed == 0 {
            let holders: i64 = tx
                .query_one("SELECT COUNT(*) FROM keyward_instance_holds WHERE scope=$1", &[&scope])
                .await
                .map_err(db)?
                .get(0);
            let holders = u32::try_from(holders).unwrap_or(u32::MAX);
            if holders >= max {
                tx.commit().await.map_err(db)?;
                return Ok(InstanceHold::Full { holders });
            }
            tx.execute(
                "INSERT INTO keyward_instance_holds (scope, instance, expires_at) \
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))",
                &[&scope, &instance, &secs],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(InstanceHold::Held)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute("DELETE FROM keyward_leases WHERE name=$1 AND holder=$2", &[&name, &holder]).await.map_err(db)?;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn changes_since(&self, cursor: Option<u64>, limit: u32) -> Result<Changes, StoreError> {
        let c = self.client().await?;
        let Some(from) = cursor else {
            let n: i64 = c.query_one("SELECT n FROM keyward_change_seq", &[]).await.map_err(db)?.get(0);
            return Ok(Changes { cursor: u64::try_from(n).unwrap_or(0), ..Changes::default() });
        };
        let from_i = to_i64(from)?;
        // One statement, one snapshot: the counter and the entries after `from` agree.
        let rows = c
            .query(
                "SELECT s.n, c.seq, c.kind, c.ref FROM keyward_change_seq s \
                 LEFT JOIN keyward_changes c ON c.seq > $1 AND c.seq <= $1 + $2 ORDER BY c.seq",
                &[&from_i, &i64::from(limit.max(1))],
            )
            .await
            .map_err(db)?;
        let n = rows.first().map_or(0, |r| r.get::<_, i64>(0));
        let n = u64::try_from(n).unwrap_or(0);
        let mut out = Changes { cursor: from, ..Changes::default() };
        if n < from {
            // The counter went backwards: a different (restored or recreated) database.
            out.lost = true;
            out.cursor = n;
            return Ok(out);
        }
        for r in &rows {
            let Some(seq) = r.get::<_, Option<i64>>(1) else { continue };
            let seq = u64::try_from(seq).unwrap_or(0);
            if seq > out.cursor + 1 {
                out.lost = true; // entries in between were pruned
            }
            out.cursor = out.cursor.max(seq);
            out.changes.push(change_from_row(r.get(2), r.get(3))?);
        }
        if out.cursor < n && out.changes.is_empty() {
            out.lost = true;
            out.cursor = n;
        }
        out.more = out.cursor < n;
        Ok(out)
    }

    async fn wait_for_changes(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.changed.notified()).await;
    }

    async fn prune_changes(&self, age: Duration) -> Result<u64, StoreError> {
        let c = self.client().await?;
        c.execute("DELETE FROM keyward_changes WHERE at < now() - make_interval(secs => $1)", &[&age.as_secs_f64()])
            .await
            .map_err(db)
    }
}
