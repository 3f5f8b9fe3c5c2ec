//! Rows to records and records to parameters: the column lists, conversions that refuse what
//! does not fit, and the compare-and-set update of a key.

use super::*;

pub(super) const KEY_COLS: &str = "id, name, algorithm, state, description, created_at, updated_at, current_version, \
                        rotate_every_secs, next_rotation_at, deletion_at, revision";

pub(super) fn key_from_row(r: &Row<'_>) -> rusqlite::Result<Result<KeyRecord, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let alg: String = r.get(2)?;
    let state: String = r.get(3)?;
    let rotate: Option<i64> = r.get(8)?;
    let cur: i64 = r.get(7)?;
    let rev: i64 = r.get(11)?;
    let rec = (|| {
        Some(KeyRecord {
            id: KeyId(id.try_into().ok()?),
            name: r.get(1).ok()?,
            algorithm: KeyAlgorithm::parse(&alg)?,
            state: KeyState::parse(&state)?,
            description: r.get(4).ok()?,
            created_at: r.get(5).ok()?,
            updated_at: r.get(6).ok()?,
            current_version: u32::try_from(cur).ok()?,
            rotate_every_secs: match rotate {
                Some(v) => Some(u64::try_from(v).ok()?),
                None => None,
            },
            next_rotation_at: r.get(9).ok()?,
            deletion_at: r.get(10).ok()?,
            revision: u64::try_from(rev).ok()?,
        })
    })();
    Ok(rec.ok_or_else(|| StoreError::Corrupt("key row".into())))
}

pub(super) fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend("value out of range".into()))
}

pub(super) fn key_params(k: &KeyRecord) -> Result<[Box<dyn rusqlite::ToSql + Send>; 12], StoreError> {
    Ok([
        Box::new(k.id.0.to_vec()),
        Box::new(k.name.clone()),
        Box::new(k.algorithm.as_str()),
        Box::new(k.state.as_str()),
        Box::new(k.description.clone()),
        Box::new(k.created_at),
        Box::new(k.updated_at),
        Box::new(i64::from(k.current_version)),
        Box::new(k.rotate_every_secs.map(i64_of).transpose()?),
        Box::new(k.next_rotation_at),
        Box::new(k.deletion_at),
        Box::new(i64_of(k.revision)?),
    ])
}

pub(super) fn update_key_tx(tx: &rusqlite::Transaction<'_>, k: &KeyRecord, expected: u64) -> Result<(), StoreError> {
    let p = key_params(k)?;
    let n = tx
        .execute(
            "UPDATE keys SET name=?2, algorithm=?3, state=?4, description=?5, created_at=?6, updated_at=?7, \
             current_version=?8, rotate_every_secs=?9, next_rotation_at=?10, deletion_at=?11, revision=?12 \
             WHERE id=?1 AND revision=?13",
            rusqlite::params_from_iter(
                p.iter()
                    .map(|b| b.as_ref() as &dyn rusqlite::ToSql)
                    .chain([&i64_of(expected)? as &dyn rusqlite::ToSql]),
            ),
        )
        .map_err(backend)?;
    if n == 1 {
        return Ok(());
    }
    let exists: Option<i64> =
        tx.query_row("SELECT 1 FROM keys WHERE id=?1", [k.id.0.to_vec()], |r| r.get(0)).optional().map_err(backend)?;
    Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound })
}

pub(super) fn version_from_row(r: &Row<'_>) -> rusqlite::Result<Result<KeyVersionRecord, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let v: i64 = r.get(1)?;
    Ok((|| {
        Some(KeyVersionRecord {
            key_id: KeyId(id.try_into().ok()?),
            version: u32::try_from(v).ok()?,
            wrapped_material: r.get(2).ok()?,
            public_key: r.get(3).ok()?,
            created_at: r.get(4).ok()?,
        })
    })()
    .ok_or_else(|| StoreError::Corrupt("key version row".into())))
}

pub(super) fn secret_version_from_row(r: &Row<'_>) -> rusqlite::Result<Result<SecretVersionRecord, StoreError>> {
    secret_version_from_row_at(r, 0)
}

/// A secret version from the five columns starting at `at` (path, version, wrapped_value,
/// created_at, deleted_at).
pub(super) fn secret_version_from_row_at(
    r: &Row<'_>,
    at: usize,
) -> rusqlite::Result<Result<SecretVersionRecord, StoreError>> {
    let v: i64 = r.get(at + 1)?;
    Ok(match u32::try_from(v) {
        Ok(version) => Ok(SecretVersionRecord {
            path: r.get(at)?,
            version,
            wrapped_value: r.get(at + 2)?,
            created_at: r.get(at + 3)?,
            deleted_at: r.get(at + 4)?,
        }),
        Err(_) => Err(StoreError::Corrupt("secret version row".into())),
    })
}

/// A secret's current version and one of its versions (the current one when `?2` is NULL), in
/// one statement and so one snapshot.
pub(super) const READ_SECRET: &str = "SELECT s.current_version, v.path, v.version, v.wrapped_value, v.created_at, v.deleted_at \
     FROM secrets s LEFT JOIN secret_versions v ON v.path = s.path AND v.version = COALESCE(?2, s.current_version) \
     WHERE s.path = ?1";

pub(super) const TOKEN_COLUMNS: &str = "hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, display_name, selectors, max_expires_at";

pub(super) fn token_from_row(r: &Row<'_>) -> rusqlite::Result<Result<TokenRecord, StoreError>> {
    let hash: Vec<u8> = r.get(0)?;
    let policies: String = r.get(2)?;
    let ttl: Option<i64> = r.get(6)?;
    let selectors: String = r.get(10)?;
    Ok(match <[u8; 32]>::try_from(hash) {
        Ok(hash) => Ok(TokenRecord {
            hash,
            accessor: r.get(1)?,
            policies: policies.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            created_at: r.get(3)?,
            expires_at: r.get(4)?,
            parent: r.get(5)?,
            ttl_secs: ttl.and_then(|t| u64::try_from(t).ok()),
            max_uses: r.get(7)?,
            uses: r.get(8)?,
            display_name: r.get(9)?,
            selectors: selectors.split('\n').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            max_expires_at: r.get(11)?,
        }),
        Err(_) => Err(StoreError::Corrupt("token row".into())),
    })
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(super) fn collect<T>(
    rows: impl Iterator<Item = rusqlite::Result<Result<T, StoreError>>>,
) -> Result<Vec<T>, StoreError> {
    rows.map(|r| r.map_err(backend).and_then(|x| x)).collect()
}
