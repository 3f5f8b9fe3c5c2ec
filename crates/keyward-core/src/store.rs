//! The storage port.
//!
//! A backend stores opaque records and enforces the few invariants that must hold under
//! concurrency (unique names, compare-and-set on revisions and version numbers), so that several
//! servers can share one backend. It never sees key material or secret values in the clear.

use std::time::Duration;

use async_trait::async_trait;

use crate::model::{KeyId, KeyRecord, KeyVersionRecord, SecretRecord, SecretVersionRecord, TokenRecord};

/// A secret read: its current version number and the version asked for, if it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRead {
    /// The secret's newest version number.
    pub current_version: u32,
    /// The version read (value included), `None` when the secret has no such version.
    pub version: Option<SecretVersionRecord>,
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A unique constraint was violated (e.g. key name taken).
    #[error("already exists")]
    AlreadyExists,
    /// A compare-and-set precondition did not hold.
    #[error("conflict")]
    Conflict,
    /// The record to change does not exist.
    #[error("not found")]
    NotFound,
    /// The backend cannot be reached or is overloaded; retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data is not what the backend expects.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// Any other backend failure.
    #[error("storage backend error: {0}")]
    Backend(String),
}

/// The storage interface. All methods are atomic.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name for status output ("sqlite", ...).
    fn backend_name(&self) -> &'static str;

    /// Read a metadata value.
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Insert a metadata value unless present; returns whether it was inserted.
    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError>;
    /// Replace a metadata value if it currently equals `expected`; returns whether it was replaced.
    async fn replace_meta(&self, key: &str, expected: &[u8], value: &[u8]) -> Result<bool, StoreError>;

    /// Create a key with its first version. [`StoreError::AlreadyExists`] if the name is taken.
    async fn create_key(&self, key: &KeyRecord, first: &KeyVersionRecord) -> Result<(), StoreError>;
    /// Look a key up by name.
    async fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Look a key up by id.
    async fn get_key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Keys ordered by name, strictly after `after`, at most `limit`.
    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError>;
    /// Replace a key's metadata if its stored revision is `expected_revision`
    /// ([`StoreError::Conflict`] otherwise). `key.revision` must be `expected_revision + 1`.
    async fn update_key(&self, key: &KeyRecord, expected_revision: u64) -> Result<(), StoreError>;
    /// Add a version and update the key (compare-and-set on the revision, as [`Store::update_key`]).
    async fn add_key_version(
        &self,
        key: &KeyRecord,
        version: &KeyVersionRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError>;
    /// All versions of a key, ascending.
    async fn get_key_versions(&self, id: &KeyId) -> Result<Vec<KeyVersionRecord>, StoreError>;
    /// Replace one version's wrapped material if it currently equals `expected` (root key
    /// rotation); returns whether it was replaced.
    async fn rewrap_key_version(
        &self,
        id: &KeyId,
        version: u32,
        expected: &[u8],
        wrapped: &[u8],
    ) -> Result<bool, StoreError>;
    /// Keys whose automatic rotation or pending deletion is due at `now`.
    async fn keys_due(&self, now: i64, limit: u32) -> Result<Vec<KeyRecord>, StoreError>;
    /// Delete a key and all its versions if its revision is `expected_revision`.
    async fn delete_key(&self, id: &KeyId, expected_revision: u64) -> Result<(), StoreError>;

    /// Add a secret version. The secret's stored current version must be
    /// `expected_current` (0 for a new path), else [`StoreError::Conflict`];
    /// `version.version` must be `expected_current + 1`.
    async fn put_secret_version(&self, version: &SecretVersionRecord, expected_current: u32) -> Result<(), StoreError>;
    /// A secret's metadata.
    async fn get_secret(&self, path: &str) -> Result<Option<SecretRecord>, StoreError>;
    /// One secret version (value included).
    async fn get_secret_version(&self, path: &str, version: u32) -> Result<Option<SecretVersionRecord>, StoreError>;
    /// What a read of a secret sees, in one query (one snapshot, one round trip): the secret's
    /// current version number and `version` of it (the current one when `None`, value
    /// included). `None` when there is no secret at `path`.
    async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Option<SecretRead>, StoreError>;
    /// All versions of a secret, ascending, without values (`wrapped_value` is `Some(vec![])`
    /// for a live version and `None` for a destroyed one).
    async fn list_secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError>;
    /// Secret paths starting with `prefix`, ordered, strictly after `after`, at most `limit`.
    async fn list_secrets(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError>;
    /// Set or clear (`None`) the deletion time of the given versions; returns how many changed.
    async fn set_secret_versions_deleted(
        &self,
        path: &str,
        versions: &[u32],
        deleted_at: Option<i64>,
    ) -> Result<u32, StoreError>;
    /// Erase the values of the given versions for good; returns how many were erased.
    async fn destroy_secret_versions(&self, path: &str, versions: &[u32]) -> Result<u32, StoreError>;

    /// Store a new token record (by hash); [`StoreError::AlreadyExists`] if the hash is known.
    async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// One token by hash.
    async fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError>;
    /// Set a token's expiry (renewal); [`StoreError::NotFound`] if revoked.
    async fn set_token_expiry(&self, accessor: &str, expires_at: Option<i64>) -> Result<(), StoreError>;
    /// Count one use of a token atomically: returns its new use count, or `None` if the token
    /// is gone or its `max_uses` are used up (then nothing changes). Several servers counting
    /// uses of one token never grant more than `max_uses` together.
    async fn use_token(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError>;
    /// Delete tokens by accessor; returns how many existed.
    async fn delete_tokens(&self, accessors: &[String]) -> Result<u32, StoreError>;
    /// All token records.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Create or replace a policy document.
    async fn put_policy(&self, name: &str, document: &str, now: i64) -> Result<(), StoreError>;
    /// Delete a policy; returns whether it existed.
    async fn delete_policy(&self, name: &str) -> Result<bool, StoreError>;
    /// All policies as (name, document), by name.
    async fn list_policies(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// One policy document.
    async fn get_policy(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Take the lease `name` for `holder` for `ttl` (measured by the backend's clock) if it is
    /// free, expired or already held by `holder` (then it is renewed). Returns whether `holder`
    /// holds it now. Work that must run on one server at a time runs under a lease.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError>;
    /// Give up the lease `name` if `holder` holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Give `instance` a place among those holding `scope` for `ttl` (by the backend's clock),
    /// or renew its place, unless `max` other instances hold unexpired places: then nothing
    /// changes and the answer says how many hold one. Expired places are forgotten. Servers
    /// sharing the store never admit more than `max` together.
    async fn hold_instance(
        &self,
        scope: &str,
        instance: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<InstanceHold, StoreError>;

    /// Whether other processes may change this store (so cached records can go stale and
    /// [`Store::changes_since`] must be followed). `false` for an embedded database.
    fn is_shared(&self) -> bool {
        false
    }
    /// Changes to keys, tokens and policies committed after `cursor` (any server's), oldest
    /// first, at most `limit`. `None` asks for the current position only. Backends that are not
    /// shared report nothing.
    async fn changes_since(&self, cursor: Option<u64>, limit: u32) -> Result<Changes, StoreError> {
        let _ = (cursor, limit);
        Ok(Changes::default())
    }
    /// Wait until a change may have been committed, or at most `max`.
    async fn wait_for_changes(&self, max: Duration) {
        tokio::time::sleep(max).await;
    }
    /// Forget change entries older than `age`; returns how many were removed.
    async fn prune_changes(&self, age: Duration) -> Result<u64, StoreError> {
        let _ = age;
        Ok(0)
    }

    /// A consistent copy of the whole store, taken while it serves (what is encrypted stays
    /// encrypted): an open, already unlinked file to stream. Backends shared with other
    /// processes are saved with their own tools instead.
    async fn snapshot(&self) -> Result<std::fs::File, StoreError> {
        Err(StoreError::Backend(format!(
            "the {} backend is saved with its own tools (see docs/operations.md), not through Keyward",
            self.backend_name()
        )))
    }
}

/// The answer of [`Store::hold_instance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceHold {
    /// The instance holds a place now.
    Held,
    /// Every place is taken (by this many instances); nothing changed.
    Full {
        /// Instances holding places.
        holders: u32,
    },
}

/// A record that changed in a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key's record (state, versions, rotation, deletion) by id.
    Key(KeyId),
    /// A token (created, renewed, revoked) by hash.
    Token([u8; 32]),
    /// A policy (created, replaced, deleted) by name.
    Policy(String),
    /// A metadata entry (the seal configuration, service keys) by name.
    Meta(String),
}

/// A page of the change feed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Position after the last change returned; pass it to the next call.
    pub cursor: u64,
    /// The changes, oldest first.
    pub changes: Vec<Change>,
    /// Entries between the given cursor and these were already pruned: everything cached
    /// must be reloaded.
    pub lost: bool,
    /// More changes follow this page.
    pub more: bool,
}
