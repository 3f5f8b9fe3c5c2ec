//! Rows to records and records to parameters: the column lists, conversions that refuse what
//! does not fit (a negative version, a malformed id), and the compare-and-set update of a key.

use super::*;

pub(super) const TOKEN_COLS: &str = "hash, accessor, policies, created_at, expires_at, parent, ttl_secs, max_uses, uses, \
                          display_name, selectors, max_expires_at";

pub(super) fn token_from_row(r: &Row) -> Result<TokenRecord, StoreError> {
    let bad = || StoreError::Corrupt("token row".into());
    let hash: Vec<u8> = r.try_get(0).map_err(|_| bad())?;
    let policies: String = r.try_get(2).map_err(|_| bad())?;
    let selectors: String = r.try_get(10).map_err(|_| bad())?;
    let ttl: Option<i64> = r.try_get(6).map_err(|_| bad())?;
    let max_uses: Option<i64> = r.try_get(7).map_err(|_| bad())?;
    Ok(TokenRecord {
        hash: hash.try_into().map_err(|_| bad())?,
        accessor: r.try_get(1).map_err(|_| bad())?,
        policies: policies.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        created_at: r.try_get(3).map_err(|_| bad())?,
        expires_at: r.try_get(4).map_err(|_| bad())?,
        parent: r.try_get(5).map_err(|_| bad())?,
        ttl_secs: ttl.and_then(|t| u64::try_from(t).ok()),
        max_uses: max_uses.map(|m| to_u32(m, "max uses")).transpose()?,
        uses: to_u32(r.try_get(8).map_err(|_| bad())?, "uses")?,
        display_name: r.try_get(9).map_err(|_| bad())?,
        selectors: selectors.split('\n').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        max_expires_at: r.try_get(11).map_err(|_| bad())?,
    })
}

pub(super) fn change_from_row(kind: &str, r: Vec<u8>) -> Result<Change, StoreError> {
    let bad = || StoreError::Corrupt(format!("change feed entry of kind {kind:?}"));
    Ok(match kind {
        "key" => Change::Key(KeyId(r.try_into().map_err(|_| bad())?)),
        "token" => Change::Token(r.try_into().map_err(|_| bad())?),
        "policy" => Change::Policy(String::from_utf8(r).map_err(|_| bad())?),
        "meta" => Change::Meta(String::from_utf8(r).map_err(|_| bad())?),
        _ => return Err(bad()),
    })
}

pub(super) const KEY_COLS: &str = "id, name, algorithm, state, description, created_at, updated_at, current_version, \
                        rotate_every_secs, next_rotation_at, deletion_at, revision";

pub(super) fn key_from_row(r: &Row) -> Result<KeyRecord, StoreError> {
    let bad = || StoreError::Corrupt("key row".into());
    let id: Vec<u8> = r.try_get(0).map_err(|_| bad())?;
    let alg: String = r.try_get(2).map_err(|_| bad())?;
    let state: String = r.try_get(3).map_err(|_| bad())?;
    let rotate: Option<i64> = r.try_get(8).map_err(|_| bad())?;
    Ok(KeyRecord {
        id: KeyId(id.try_into().map_err(|_| bad())?),
        name: r.try_get(1).map_err(|_| bad())?,
        algorithm: KeyAlgorithm::parse(&alg).ok_or_else(bad)?,
        state: KeyState::parse(&state).ok_or_else(bad)?,
        description: r.try_get(4).map_err(|_| bad())?,
        created_at: r.try_get(5).map_err(|_| bad())?,
        updated_at: r.try_get(6).map_err(|_| bad())?,
        current_version: to_u32(r.try_get(7).map_err(|_| bad())?, "key version")?,
        rotate_every_secs: rotate.map(|v| u64::try_from(v).map_err(|_| bad())).transpose()?,
        next_rotation_at: r.try_get(9).map_err(|_| bad())?,
        deletion_at: r.try_get(10).map_err(|_| bad())?,
        revision: u64::try_from(r.try_get::<_, i64>(11).map_err(|_| bad())?).map_err(|_| bad())?,
    })
}

pub(super) fn version_from_row(r: &Row) -> Result<KeyVersionRecord, StoreError> {
    let bad = || StoreError::Corrupt("key version row".into());
    let id: Vec<u8> = r.try_get(0).map_err(|_| bad())?;
    Ok(KeyVersionRecord {
        key_id: KeyId(id.try_into().map_err(|_| bad())?),
        version: to_u32(r.try_get(1).map_err(|_| bad())?, "key version")?,
        wrapped_material: r.try_get(2).map_err(|_| bad())?,
        public_key: r.try_get(3).map_err(|_| bad())?,
        created_at: r.try_get(4).map_err(|_| bad())?,
    })
}

pub(super) fn secret_version_from_row(r: &Row) -> Result<SecretVersionRecord, StoreError> {
    let bad = || StoreError::Corrupt("secret version row".into());
    Ok(SecretVersionRecord {
        path: r.try_get(0).map_err(|_| bad())?,
        version: to_u32(r.try_get(1).map_err(|_| bad())?, "secret version")?,
        wrapped_value: r.try_get(2).map_err(|_| bad())?,
        created_at: r.try_get(3).map_err(|_| bad())?,
        deleted_at: r.try_get(4).map_err(|_| bad())?,
    })
}

/// The key columns as statement parameters, in `KEY_COLS` order.
pub(super) struct KeyParams {
    id: Vec<u8>,
    name: String,
    algorithm: &'static str,
    state: &'static str,
    description: String,
    created_at: i64,
    updated_at: i64,
    current_version: i64,
    rotate: Option<i64>,
    next_rotation_at: Option<i64>,
    deletion_at: Option<i64>,
    revision: i64,
}

impl KeyParams {
    pub(super) fn of(k: &KeyRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: k.id.0.to_vec(),
            name: k.name.clone(),
            algorithm: k.algorithm.as_str(),
            state: k.state.as_str(),
            description: k.description.clone(),
            created_at: k.created_at,
            updated_at: k.updated_at,
            current_version: i64::from(k.current_version),
            rotate: k.rotate_every_secs.map(to_i64).transpose()?,
            next_rotation_at: k.next_rotation_at,
            deletion_at: k.deletion_at,
            revision: to_i64(k.revision)?,
        })
    }

    pub(super) fn refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 12] {
        [
            &self.id,
            &self.name,
            &self.algorithm,
            &self.state,
            &self.description,
            &self.created_at,
            &self.updated_at,
            &self.current_version,
            &self.rotate,
            &self.next_rotation_at,
            &self.deletion_at,
            &self.revision,
        ]
    }
}

pub(super) async fn update_key_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    k: &KeyRecord,
    expected: u64,
) -> Result<(), StoreError> {
    let p = KeyParams::of(k)?;
    let expected = to_i64(expected)?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = p.refs().to_vec();
    params.push(&expected);
    let n = tx
        .execute(
            "UPDATE keys SET name=$2, algorithm=$3, state=$4, description=$5, created_at=$6, updated_at=$7, \
             current_version=$8, rotate_every_secs=$9, next_rotation_at=$10, deletion_at=$11, revision=$12 \
             WHERE id=$1 AND revision=$13",
            &params,
        )
        .await
        .map_err(db)?;
    if n == 1 {
        return Ok(());
    }
    let exists = tx.query_opt("SELECT 1 FROM keys WHERE id=$1", &[&p.id]).await.map_err(db)?;
    Err(if exists.is_some() { StoreError::Conflict } else { StoreError::NotFound })
}

pub(super) const INSERT_VERSION: &str =
    "INSERT INTO key_versions (key_id, version, wrapped_material, public_key, created_at) VALUES ($1,$2,$3,$4,$5)";
