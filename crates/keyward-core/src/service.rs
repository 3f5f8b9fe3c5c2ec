//! The KMS service: key lifecycle, cryptographic operations, secrets and tokens.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use keyward_crypto::aead::AeadKey;
use keyward_crypto::format::{self, EnvelopeKind};
use keyward_crypto::keys::{KeyAlgorithm, LoadedKey};
use keyward_crypto::{SecretBytes, hash};

use crate::limits::*;
use crate::model::*;
use crate::policy::{DEFAULT_INSTANCE_HOLD_SECS, Policy, ROOT_POLICY};
use crate::secretdata::SecretData;
use crate::store::{Change, InstanceHold, Store, StoreError};
use crate::{KmsError, now_unix, validate};

const META_ROOT_CHECK: &str = "root_check";
const META_SECRETS_KEY: &str = "secrets_key";
const AAD_ROOT_CHECK: &[u8] = b"keyward/root-check/v1";
const AAD_SECRETS_KEY: &[u8] = b"keyward/secrets-key/v1";
const META_TOKEN_KEY: &str = "token_key";
const AAD_TOKEN_KEY: &[u8] = b"keyward/token-key/v1";
const META_AUDIT_KEY: &str = "audit_key";
const AAD_AUDIT_KEY: &[u8] = b"keyward/audit-key/v1";
/// Every meta entry wrapped directly under the root key, with its associated data.
const ROOT_WRAPPED_META: &[(&str, &[u8])] = &[
    (META_ROOT_CHECK, AAD_ROOT_CHECK),
    (META_SECRETS_KEY, AAD_SECRETS_KEY),
    (META_TOKEN_KEY, AAD_TOKEN_KEY),
    (META_AUDIT_KEY, AAD_AUDIT_KEY),
];
const ROOT_CHECK_PLAINTEXT: &[u8] = b"keyward root key check";
const CAS_RETRIES: usize = 8;
/// Aliases name keys: `alias/NAME`, usable wherever a key name is (as in AWS KMS).
pub const ALIAS_PREFIX: &str = "alias/";
/// Where the alias table is kept (one document, changed with compare-and-set).
const ALIASES_META: &str = "key-aliases";
/// Most aliases a store holds.
const MAX_ALIASES: usize = 10_000;

/// A key as held in memory: metadata and every version unwrapped.
#[derive(Debug)]
pub struct CachedKey {
    /// Metadata at load time.
    pub record: KeyRecord,
    versions: BTreeMap<u32, LoadedVersion>,
}

#[derive(Debug)]
struct LoadedVersion {
    key: LoadedKey,
    public_key: Option<Vec<u8>>,
    created_at: i64,
}

/// Public information about one key version.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    /// Version number.
    pub version: u32,
    /// Creation time.
    pub created_at: i64,
    /// DER SubjectPublicKeyInfo of signing keys.
    pub public_key: Option<Vec<u8>>,
}

/// A key's metadata plus its versions.
#[derive(Debug, Clone)]
pub struct KeyDescription {
    /// Metadata.
    pub record: KeyRecord,
    /// Versions, ascending.
    pub versions: Vec<VersionInfo>,
}

/// What a root rotation re-wrapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapReport {
    /// Service keys (secrets key, token key, audit key, root check).
    pub service_keys: u32,
    /// Key versions.
    pub key_versions: u32,
}

/// Parameters of a new key.
#[derive(Debug, Clone)]
pub struct CreateKey {
    /// Unique name.
    pub name: String,
    /// Key type.
    pub algorithm: KeyAlgorithm,
    /// Free text.
    pub description: String,
    /// Automatic rotation period in seconds.
    pub rotate_every_secs: Option<u64>,
}

/// Result of an encryption.
#[derive(Debug)]
pub struct Encrypted {
    /// The ciphertext envelope.
    pub ciphertext: Vec<u8>,
    /// Key name.
    pub key_name: String,
    /// Key version used.
    pub key_version: u32,
}

/// The operation named when a key cannot sign digests.
const DIGEST_SIGNING: &str = "signing a SHA-256 digest (ed25519 signs whole messages, up to 64 KiB: sign the message \
                              itself, or use an ecdsa-p256 key for larger ones)";

/// Result of a re-encryption: the new ciphertext, and what the old one was made with.
#[derive(Debug)]
pub struct Reencrypted {
    /// The new ciphertext.
    pub encrypted: Encrypted,
    /// Key of the ciphertext given.
    pub source_key: String,
    /// Its key version.
    pub source_key_version: u32,
}

/// Result of a decryption.
#[derive(Debug)]
pub struct Decrypted {
    /// The plaintext.
    pub plaintext: SecretBytes,
    /// Key name.
    pub key_name: String,
    /// Key version the ciphertext was made with.
    pub key_version: u32,
}

/// Result of generating a data key.
#[derive(Debug)]
pub struct DataKey {
    /// The data key in the clear (absent for the without-plaintext variant).
    pub plaintext: Option<SecretBytes>,
    /// The data key encrypted under the named key.
    pub ciphertext: Vec<u8>,
    /// Key version used.
    pub key_version: u32,
}

/// A secret version as read.
#[derive(Debug)]
pub struct SecretValue {
    /// Fields.
    pub data: SecretData,
    /// Version number.
    pub version: u32,
    /// Creation time.
    pub created_at: i64,
}

/// Metadata of one secret version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersionInfo {
    /// Version number.
    pub version: u32,
    /// Creation time.
    pub created_at: i64,
    /// Soft-deletion time.
    pub deleted_at: Option<i64>,
    /// Whether the value was destroyed.
    pub destroyed: bool,
}

/// Parameters of a new token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Policies attached.
    pub policies: Vec<String>,
    /// Lifetime in seconds (renewable by the same amount); `None`: no expiry.
    pub ttl_secs: Option<u64>,
    /// Use limit.
    pub max_uses: Option<u32>,
    /// Free text naming the holder.
    pub display_name: String,
    /// Create without a parent, so revoking the creator does not revoke it (root tokens only).
    pub orphan: bool,
    /// Identity selectors; only auth methods set them ([`Kms::issue_login_token`]).
    pub selectors: Vec<String>,
    /// Renewals never extend the token beyond this many seconds after its creation.
    pub max_ttl_secs: Option<u64>,
}

/// What the scheduler did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScheduledReport {
    /// Keys rotated.
    pub rotated: Vec<String>,
    /// Keys purged after their pending window.
    pub purged: Vec<String>,
    /// Randomized secret values replaced because they reached their TTL.
    pub randomized_rotated: u32,
}

#[derive(Default)]
struct KeyCache {
    by_name: HashMap<String, Arc<CachedKey>>,
    by_id: HashMap<KeyId, Arc<CachedKey>>,
}

/// What an authorization decision granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Which grant allowed it (`policy NAME rule N`), for the audit record.
    pub reason: String,
    /// The granting rule's live-instance cap, if it has one.
    pub cap: Option<InstanceCap>,
}

/// A rule's `max_instances` as it applies to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCap {
    /// What places are counted in: `POLICY#RULE:RESOURCE`.
    pub scope: String,
    /// Most live instances at once.
    pub max: u32,
    /// How long a place lasts after its instance's last use.
    pub hold: Duration,
}

/// The KMS service. Cheap to share behind an `Arc`.
pub struct Kms {
    store: Arc<dyn Store>,
    /// Root keys, newest first; older ones only during a root rotation.
    roots: RwLock<Vec<Arc<AeadKey>>>,
    /// Held (shared) from wrapping material under the newest root until it is stored, and
    /// (exclusively) while a new root is installed, so no write under an old root lands unseen.
    wrap_guard: tokio::sync::RwLock<()>,
    secrets_key: AeadKey,
    audit_key: SecretBytes,
    keys: RwLock<KeyCache>,
    tokens: RwLock<HashMap<[u8; 32], Arc<TokenRecord>>>,
    token_key: SecretBytes,
    policies: RwLock<HashMap<String, Arc<Policy>>>,
    /// Following a shared store's change feed.
    feed: Feed,
    /// Key lookups answered from the cache, and from the store.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// Where this server is in a shared store's change feed, and when it last caught up.
struct Feed {
    cursor: tokio::sync::Mutex<u64>,
    /// Reference point for `synced_at_ms`.
    epoch: Instant,
    /// When the last successful catch-up *started* (ms after `epoch`): every change committed
    /// before then is applied.
    synced_at_ms: AtomicU64,
    /// Cached keys, tokens and policies are refused once the last catch-up is older than this.
    max_staleness_ms: AtomicU64,
}

/// What one catch-up with the change feed did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries applied.
    pub applied: usize,
    /// The feed had lost entries, so every cache was reloaded.
    pub reloaded: bool,
    /// Metadata entries that changed (e.g. `seal` after another server rotated the root key).
    pub meta: Vec<String>,
}

/// Default bound on how stale cached records may be when the store is shared.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms").field("store", &self.store.backend_name()).finish_non_exhaustive()
    }
}

fn version_aad(id: &KeyId, version: u32) -> Vec<u8> {
    let mut aad = b"keyward/key-version/v1\0".to_vec();
    aad.extend_from_slice(&id.0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn secret_aad(path: &str, version: u32) -> Vec<u8> {
    let mut aad = b"keyward/secret/v1\0".to_vec();
    aad.extend_from_slice(path.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn check_len(what: &str, n: usize, max: usize) -> Result<(), KmsError> {
    if n > max {
        return Err(KmsError::invalid(format!("{what} is {n} bytes; the limit is {max}")));
    }
    Ok(())
}

fn check_period(p: Option<u64>) -> Result<(), KmsError> {
    match p {
        Some(p) if !(MIN_ROTATION_PERIOD..=MAX_ROTATION_PERIOD).contains(&p) => Err(KmsError::invalid(format!(
            "rotation period must be between {MIN_ROTATION_PERIOD} seconds and {} days",
            MAX_ROTATION_PERIOD / 86400
        ))),
        _ => Ok(()),
    }
}

fn not_found(what: &'static str, name: &str) -> KmsError {
    KmsError::NotFound { what, name: name.to_string() }
}

impl Kms {
    /// Open the service over `store` with the unsealed root keyring (newest first; more than one
    /// only while a root rotation is unfinished). On a new store this initialises it and returns
    /// the root token, which is shown once and stored only as a hash.
    pub async fn open(
        store: Arc<dyn Store>,
        keyring: Vec<SecretBytes>,
    ) -> Result<(Self, Option<SecretBytes>), KmsError> {
        let newest = keyring.first().ok_or_else(|| KmsError::Internal("empty root keyring".into()))?;
        // Stores created before these keys were stored derived them from the root key itself;
        // deriving the same way keeps their tokens and audit chain valid.
        let legacy_token_key = keyward_crypto::kdf::hkdf_sha256(newest.expose(), b"", b"keyward/token-hash/v1", 32)?;
        let legacy_audit_key = keyward_crypto::kdf::hkdf_sha256(newest.expose(), b"", b"keyward/audit-key/v1", 32)?;
        let roots = keyring.iter().map(AeadKey::new).collect::<Result<Vec<_>, _>>()?;
        let roots: Vec<Arc<AeadKey>> = roots.into_iter().map(Arc::new).collect();
        let open_any = |aad: &[u8], sealed: &[u8]| roots.iter().find_map(|r| r.open(aad, sealed).ok());
        match store.get_meta(META_ROOT_CHECK).await? {
            Some(check) => {
                open_any(AAD_ROOT_CHECK, &check).ok_or_else(|| {
                    KmsError::Internal(
                        "the root key does not match this store (wrong seal for this data directory)".into(),
                    )
                })?;
            }
            None => {
                let check = roots[0].seal(AAD_ROOT_CHECK, ROOT_CHECK_PLAINTEXT)?;
                if !store.put_meta_if_absent(META_ROOT_CHECK, &check).await? {
                    // Another server initialised concurrently: verify against theirs.
                    let theirs = store
                        .get_meta(META_ROOT_CHECK)
                        .await?
                        .ok_or_else(|| KmsError::Internal("root check vanished".into()))?;
                    open_any(AAD_ROOT_CHECK, &theirs).ok_or_else(|| KmsError::Internal("root key mismatch".into()))?;
                }
            }
        }
        let stored_key = async |name: &str, aad: &[u8], initial: SecretBytes| -> Result<SecretBytes, KmsError> {
            let wrapped = roots[0].seal(aad, initial.expose())?;
            store.put_meta_if_absent(name, &wrapped).await?;
            let wrapped = store.get_meta(name).await?.ok_or_else(|| KmsError::Internal(format!("{name} missing")))?;
            open_any(aad, &wrapped).ok_or_else(|| KmsError::Internal(format!("{name} cannot be unwrapped")))
        };
        let secrets_key =
            AeadKey::new(&stored_key(META_SECRETS_KEY, AAD_SECRETS_KEY, SecretBytes::random(32)?).await?)?;
        let token_key = stored_key(META_TOKEN_KEY, AAD_TOKEN_KEY, legacy_token_key).await?;
        let audit_key = stored_key(META_AUDIT_KEY, AAD_AUDIT_KEY, legacy_audit_key).await?;

        // Take the feed position before loading anything, so nothing committed meanwhile is missed.
        let cursor = store.changes_since(None, 1).await?.cursor;
        let epoch = Instant::now();
        let kms = Self {
            feed: Feed {
                cursor: tokio::sync::Mutex::new(cursor),
                epoch,
                synced_at_ms: AtomicU64::new(0),
                max_staleness_ms: AtomicU64::new(DEFAULT_MAX_STALENESS.as_millis() as u64),
            },
            store,
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            roots: RwLock::new(roots),
            wrap_guard: tokio::sync::RwLock::new(()),
            secrets_key,
            audit_key,
            keys: RwLock::new(KeyCache::default()),
            tokens: RwLock::new(HashMap::new()),
            token_key,
            policies: RwLock::new(HashMap::new()),
        };
        let tokens = kms.store.list_tokens().await?;
        let root_token = if tokens.is_empty() {
            let req = TokenRequest {
                policies: vec![ROOT_POLICY.into()],
                ttl_secs: None,
                max_uses: None,
                display_name: "root".into(),
                orphan: true,
                selectors: vec![],
                max_ttl_secs: None,
            };
            Some(kms.insert_token(None, req).await?.0)
        } else {
            None
        };
        kms.reload_tokens().await?;
        kms.reload_policies().await?;
        kms.sync_changes().await?;
        Ok((kms, root_token))
    }

    /// The key of the audit log's hash chain (stored under the root key).
    pub fn audit_key(&self) -> &SecretBytes {
        &self.audit_key
    }

    // ----- root keys ------------------------------------------------------------------------

    fn current_root(&self) -> Result<Arc<AeadKey>, KmsError> {
        let roots = self.roots.read().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
        roots.first().cloned().ok_or_else(|| KmsError::Internal("empty root keyring".into()))
    }

    /// Open data wrapped under any root key; the flag says whether it was the newest.
    fn unwrap_root(&self, aad: &[u8], sealed: &[u8]) -> Result<(Option<SecretBytes>, bool), KmsError> {
        let roots = self.roots.read().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?.clone();
        for (i, r) in roots.iter().enumerate() {
            if let Ok(p) = r.open(aad, sealed) {
                return Ok((Some(p), i == 0));
            }
        }
        Ok((None, false))
    }

    /// Install `new` as the newest root key. Everything wrapped from now on uses it; data under
    /// the older roots stays readable until [`Kms::finish_root_rotation`].
    pub async fn begin_root_rotation(&self, new: &SecretBytes) -> Result<(), KmsError> {
        let key = Arc::new(AeadKey::new(new)?);
        let _exclusive = self.wrap_guard.write().await;
        let mut roots = self.roots.write().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
        roots.insert(0, key);
        Ok(())
    }

    /// Make `keyring` (newest first, as stored in the seal by another server) the root keys in
    /// use. Returns whether anything changed.
    pub async fn adopt_roots(&self, keyring: Vec<SecretBytes>) -> Result<bool, KmsError> {
        let keys = keyring.iter().map(|k| AeadKey::new(k).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KmsError::Internal("empty root keyring".into()));
        }
        let same = {
            let roots = self.roots.read().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
            // Same key if what one seals the other opens.
            let same_key = |a: &AeadKey, b: &AeadKey| {
                b.seal(b"keyward/root-probe", b"probe").is_ok_and(|s| a.open(b"keyward/root-probe", &s).is_ok())
            };
            roots.len() == keys.len() && roots.iter().zip(&keys).all(|(a, b)| same_key(a, b))
        };
        if same {
            return Ok(false);
        }
        let _exclusive = self.wrap_guard.write().await;
        *self.roots.write().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))? = keys;
        Ok(true)
    }

    /// The bound set by [`Kms::set_max_staleness`].
    pub fn max_staleness(&self) -> Duration {
        Duration::from_millis(self.feed.max_staleness_ms.load(Ordering::Relaxed))
    }

    /// Re-wrap every root-wrapped record (service keys and all key versions) under the newest
    /// root key. Idempotent and safe to run while serving.
    pub async fn rewrap_under_newest_root(&self) -> Result<RewrapReport, KmsError> {
        let mut report = RewrapReport::default();
        let root = self.current_root()?;
        for (name, aad) in ROOT_WRAPPED_META {
            let Some(old) = self.store.get_meta(name).await? else { continue };
            match self.unwrap_root(aad, &old)? {
                (Some(_), true) => {}
                (Some(p), false) => {
                    if !self.store.replace_meta(name, &old, &root.seal(aad, p.expose())?).await? {
                        return Err(KmsError::Conflict(format!("{name} changed during root rotation; run it again")));
                    }
                    report.service_keys += 1;
                }
                (None, _) => return Err(KmsError::Internal(format!("{name} cannot be unwrapped by any root key"))),
            }
        }
        let mut after: Option<String> = None;
        loop {
            let page = self.store.list_keys(after.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.name.clone());
            for rec in &page {
                for v in self.store.get_key_versions(&rec.id).await? {
                    let aad = version_aad(&rec.id, v.version);
                    match self.unwrap_root(&aad, &v.wrapped_material)? {
                        (Some(_), true) => {}
                        (Some(p), false) => {
                            let new = root.seal(&aad, p.expose())?;
                            // A version purged meanwhile needs nothing; nothing else rewrites material.
                            if self.store.rewrap_key_version(&rec.id, v.version, &v.wrapped_material, &new).await? {
                                report.key_versions += 1;
                            }
                        }
                        (None, _) => {
                            return Err(KmsError::Internal(format!(
                                "key {} version {} cannot be unwrapped by any root key",
                                rec.name, v.version
                            )));
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Drop (and wipe) every root key but the newest. Call after a successful
    /// [`Kms::rewrap_under_newest_root`] and after the seal stores only the newest key.
    pub fn finish_root_rotation(&self) -> Result<(), KmsError> {
        let mut roots = self.roots.write().map_err(|_| KmsError::Internal("root keyring lock poisoned".into()))?;
        roots.truncate(1);
        Ok(())
    }

    /// How many root keys are in use (more than one while a rotation is unfinished).
    pub fn root_keys(&self) -> usize {
        self.roots.read().map(|r| r.len()).unwrap_or(0)
    }

    /// The store backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.store.backend_name()
    }

    // ----- following other servers ----------------------------------------------------------

    /// Whether other servers share this store (so [`Kms::sync_changes`] must run).
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// Set how stale cached keys, tokens and policies may get, on a shared store, before this
    /// server refuses requests (503) rather than risk honouring a revoked token or a disabled key.
    pub fn set_max_staleness(&self, d: Duration) {
        self.feed.max_staleness_ms.store(u64::try_from(d.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Fail (503) when this server may have missed other servers' changes for longer than its
    /// staleness bound; always fine on a store no other server shares.
    pub fn require_fresh(&self) -> Result<(), KmsError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let now = u64::try_from(self.feed.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let synced = self.feed.synced_at_ms.load(Ordering::Acquire);
        let max = self.feed.max_staleness_ms.load(Ordering::Relaxed);
        // `synced_at_ms` is 0 until the first catch-up (at the end of `Kms::open`).
        if synced == 0 || now.saturating_sub(synced) > max {
            return Err(KmsError::Unavailable(StoreError::Unavailable(format!(
                "this server has not caught up with changes from other servers for over {max} ms (is the \
                 database reachable?); it refuses to use cached keys, tokens and policies until it has"
            ))));
        }
        Ok(())
    }

    /// Wait until the store may have changed, or at most `max`.
    pub async fn wait_for_changes(&self, max: Duration) {
        self.store.wait_for_changes(max).await;
    }

    /// Apply every change other servers committed since the last call: changed keys are dropped
    /// from the cache (and reloaded on next use), tokens and policies are re-read. Marks this
    /// server fresh on success. A no-op on a store that is not shared.
    pub async fn sync_changes(&self) -> Result<SyncReport, KmsError> {
        let mut report = SyncReport::default();
        if !self.store.is_shared() {
            return Ok(report);
        }
        let started = u64::try_from(self.feed.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cursor = self.feed.cursor.lock().await;
        loop {
            let page = self.store.changes_since(Some(*cursor), 1000).await?;
            if page.lost {
                self.reload_all().await?;
                report.reloaded = true;
            } else {
                for c in &page.changes {
                    self.apply_change(c, &mut report).await?;
                }
            }
            report.applied += page.changes.len();
            *cursor = page.cursor;
            if !page.more {
                break;
            }
        }
        self.feed.synced_at_ms.fetch_max(started, Ordering::AcqRel);
        Ok(report)
    }

    async fn apply_change(&self, change: &Change, report: &mut SyncReport) -> Result<(), KmsError> {
        match change {
            Change::Key(id) => {
                if let Ok(mut c) = self.keys.write()
                    && let Some(old) = c.by_id.remove(id)
                    && c.by_name.get(&old.record.name).is_some_and(|k| k.record.id == *id)
                {
                    c.by_name.remove(&old.record.name);
                }
            }
            Change::Token(hash) => {
                let fresh = self.store.get_token(hash).await?;
                let mut m = self.tokens.write().map_err(|_| KmsError::Internal("token cache poisoned".into()))?;
                match fresh {
                    Some(t) => m.insert(*hash, Arc::new(t)),
                    None => m.remove(hash),
                };
            }
            Change::Policy(name) => {
                let fresh = match self.store.get_policy(name).await? {
                    Some(doc) => Some(Arc::new(
                        serde_json::from_str::<Policy>(&doc)
                            .map_err(|e| KmsError::Internal(format!("stored policy {name}: {e}")))?,
                    )),
                    None => None,
                };
                let mut m = self.policies.write().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
                match fresh {
                    Some(p) => m.insert(name.clone(), p),
                    None => m.remove(name),
                };
            }
            Change::Meta(name) => report.meta.push(name.clone()),
        }
        Ok(())
    }

    async fn reload_all(&self) -> Result<(), KmsError> {
        if let Ok(mut c) = self.keys.write() {
            *c = KeyCache::default();
        }
        self.reload_tokens().await?;
        self.reload_policies().await
    }

    /// Take or renew the store lease `name` for `holder` (see [`Store::acquire_lease`]).
    pub async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, KmsError> {
        Ok(self.store.acquire_lease(name, holder, ttl).await?)
    }

    /// Give up the store lease `name` if `holder` holds it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), KmsError> {
        Ok(self.store.release_lease(name, holder).await?)
    }

    /// Forget change-feed entries older than `age` (run by one server, under a lease).
    pub async fn prune_changes(&self, age: Duration) -> Result<u64, KmsError> {
        Ok(self.store.prune_changes(age).await?)
    }

    // ----- tokens ---------------------------------------------------------------------------

    fn token_hash(&self, token: &[u8]) -> [u8; 32] {
        hash::hmac_sha256(self.token_key.expose(), token)
    }

    async fn insert_token(
        &self,
        parent: Option<&TokenRecord>,
        req: TokenRequest,
    ) -> Result<(SecretBytes, TokenRecord), KmsError> {
        let raw = SecretBytes::random(32)?;
        let token = SecretBytes::from_vec(format!("kwt_{}", hex::encode(raw.expose())).into_bytes());
        let mut acc = [0u8; 12];
        keyward_crypto::fill_random(&mut acc)?;
        let now = now_unix();
        let after = |t: u64| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX));
        let mut expires_at = req.ttl_secs.map(after);
        let max_expires_at = req.max_ttl_secs.map(after);
        if let Some(m) = max_expires_at {
            expires_at = Some(expires_at.map_or(m, |e| e.min(m)));
        }
        // A child never outlives its parent.
        if let Some(pe) = parent.and_then(|p| p.expires_at) {
            expires_at = Some(expires_at.map_or(pe, |e| e.min(pe)));
        }
        let mut selectors = req.selectors;
        selectors.sort();
        selectors.dedup();
        let rec = TokenRecord {
            hash: self.token_hash(token.expose()),
            accessor: format!("acc_{}", hex::encode(acc)),
            policies: req.policies,
            created_at: now,
            expires_at,
            parent: parent.map(|p| p.accessor.clone()),
            ttl_secs: req.ttl_secs,
            max_uses: req.max_uses,
            uses: 0,
            display_name: req.display_name,
            selectors,
            max_expires_at,
        };
        self.store.put_token(&rec).await?;
        if let Ok(mut m) = self.tokens.write() {
            m.insert(rec.hash, Arc::new(rec.clone()));
        }
        Ok((token, rec))
    }

    async fn reload_tokens(&self) -> Result<(), KmsError> {
        let all = self.store.list_tokens().await?;
        let map = all.into_iter().map(|t| (t.hash, Arc::new(t))).collect();
        *self.tokens.write().map_err(|_| KmsError::Internal("token cache poisoned".into()))? = map;
        Ok(())
    }

    /// Every token: from the store when it is shared (other servers create tokens this one has
    /// not seen), else from the cache.
    async fn all_tokens(&self) -> Result<Vec<Arc<TokenRecord>>, KmsError> {
        if self.store.is_shared() {
            return Ok(self.store.list_tokens().await?.into_iter().map(Arc::new).collect());
        }
        let m = self.tokens.read().map_err(|_| KmsError::Internal("token cache poisoned".into()))?;
        Ok(m.values().cloned().collect())
    }

    async fn token_by_accessor(&self, accessor: &str) -> Result<Arc<TokenRecord>, KmsError> {
        self.all_tokens()
            .await?
            .into_iter()
            .find(|t| t.accessor == accessor)
            .ok_or_else(|| not_found("token", accessor))
    }

    /// Authenticate a bearer token. Counts a use for tokens with a use limit (and revokes the
    /// token when it is used up).
    pub async fn authenticate(&self, token: &str) -> Result<Arc<TokenRecord>, KmsError> {
        use crate::error::AuthFailure;
        if token.is_empty() {
            return Err(KmsError::Unauthenticated(AuthFailure::Missing));
        }
        if token.len() > 256 || !token.starts_with("kwt_") {
            return Err(KmsError::Unauthenticated(AuthFailure::Malformed));
        }
        self.require_fresh()?;
        let h = self.token_hash(token.as_bytes());
        let cached = {
            let map = self.tokens.read().map_err(|_| KmsError::Internal("token cache poisoned".into()))?;
            map.get(&h).cloned()
        };
        let invalid = KmsError::Unauthenticated(AuthFailure::Invalid);
        let rec = match cached {
            Some(r) => r,
            // Created by another server since this one last caught up with the feed.
            None if self.store.is_shared() => {
                let rec = Arc::new(self.store.get_token(&h).await?.ok_or(invalid)?);
                if let Ok(mut m) = self.tokens.write() {
                    m.insert(h, rec.clone());
                }
                rec
            }
            None => return Err(invalid),
        };
        if !keyward_crypto::ct_eq(&rec.hash, &h) {
            return Err(KmsError::Unauthenticated(AuthFailure::Invalid));
        }
        if rec.expires_at.is_some_and(|e| e <= now_unix()) {
            return Err(KmsError::Unauthenticated(AuthFailure::Expired));
        }
        if rec.max_uses.is_some() {
            // Counted in the store, atomically, before use: neither a restart nor several
            // servers can grant extra uses.
            let Some(uses) = self.store.use_token(&h).await? else {
                return Err(KmsError::Unauthenticated(AuthFailure::UsedUp));
            };
            let mut next = (*rec).clone();
            next.uses = uses;
            let next = Arc::new(next);
            if let Ok(mut m) = self.tokens.write() {
                m.insert(h, next.clone());
            }
            return Ok(next);
        }
        Ok(rec)
    }

    /// Create a token for `parent`. A non-root parent can only hand out policies it holds.
    pub async fn create_token(
        &self,
        parent: &TokenRecord,
        req: TokenRequest,
    ) -> Result<(SecretBytes, TokenRecord), KmsError> {
        if req.policies.is_empty() || req.policies.len() > 64 {
            return Err(KmsError::invalid("a token needs 1 to 64 policies"));
        }
        if req.display_name.len() > 128 {
            return Err(KmsError::invalid("display name is at most 128 bytes"));
        }
        if let Some(t) = req.ttl_secs
            && (t == 0 || t > MAX_ROTATION_PERIOD)
        {
            return Err(KmsError::invalid("ttl must be between 1 second and 10 years"));
        }
        if req.max_uses == Some(0) {
            return Err(KmsError::invalid("max_uses must be at least 1"));
        }
        if req.max_ttl_secs.is_some_and(|t| t == 0 || t > MAX_ROTATION_PERIOD) {
            return Err(KmsError::invalid("max_ttl must be between 1 second and 10 years"));
        }
        if !req.selectors.is_empty() {
            return Err(KmsError::invalid("selectors are set by auth methods, not by token creation"));
        }
        if !parent.is_stored() {
            return Err(KmsError::PermissionDenied(
                "only token holders can create tokens; this identity (a client certificate) has no token".into(),
            ));
        }
        if req.orphan && !parent.is_root() {
            return Err(KmsError::PermissionDenied("only a root token can create orphan tokens".into()));
        }
        {
            let known = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
            for p in &req.policies {
                if p != ROOT_POLICY && !known.contains_key(p) {
                    return Err(not_found("policy", p));
                }
                if !parent.is_root() && !parent.policies.contains(p) {
                    return Err(KmsError::PermissionDenied(format!(
                        "a token can only create tokens with policies it holds itself, and it does not hold {p:?}"
                    )));
                }
            }
        }
        let parent = if req.orphan { None } else { Some(parent) };
        // A child never has more uses than its parent has left (its creation used one).
        let mut req = req;
        if let Some(p) = parent
            && let Some(max) = p.max_uses
        {
            let left = max.saturating_sub(p.uses);
            if left == 0 {
                return Err(KmsError::PermissionDenied(
                    "this token has no uses left to give a child token (creating it used the last one)".into(),
                ));
            }
            req.max_uses = Some(req.max_uses.map_or(left, |m| m.min(left)));
        }
        self.insert_token(parent, req).await
    }

    /// Whether the token `accessor` is `caller` or was created from it (directly or through
    /// other tokens): the tokens a holder may look up, renew and revoke without `admin` on
    /// `auth/token`. An unknown accessor is in nobody's subtree.
    pub async fn in_subtree(&self, caller: &TokenRecord, accessor: &str) -> Result<bool, KmsError> {
        let all = self.all_tokens().await?;
        let mut at = accessor.to_string();
        for _ in 0..=all.len() {
            if at == caller.accessor {
                return Ok(caller.is_stored());
            }
            match all.iter().find(|t| t.accessor == at).and_then(|t| t.parent.clone()) {
                Some(p) => at = p,
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// The live tokens (not expired, uses left) of `caller`'s subtree: itself and every token
    /// created from it, at any depth; with `all`, every live token. Oldest first.
    pub async fn list_tokens(&self, caller: &TokenRecord, all: bool) -> Result<Vec<Arc<TokenRecord>>, KmsError> {
        let tokens = self.all_tokens().await?;
        let now = now_unix();
        let live = |t: &TokenRecord| t.expires_at.is_none_or(|e| e > now) && t.max_uses.is_none_or(|m| t.uses < m);
        let mut keep: std::collections::HashSet<String> = std::collections::HashSet::new();
        if !all && caller.is_stored() {
            let mut queue = vec![caller.accessor.clone()];
            while let Some(a) = queue.pop() {
                if keep.insert(a.clone()) {
                    queue.extend(
                        tokens.iter().filter(|t| t.parent.as_deref() == Some(a.as_str())).map(|t| t.accessor.clone()),
                    );
                }
            }
        }
        let mut out: Vec<Arc<TokenRecord>> =
            tokens.into_iter().filter(|t| live(t) && (all || keep.contains(&t.accessor))).collect();
        out.sort_by(|a, b| (a.created_at, &a.accessor).cmp(&(b.created_at, &b.accessor)));
        Ok(out)
    }

    /// Issue an orphan token to an identity an auth method has verified (e.g. a Kubernetes
    /// ServiceAccount). The method's configuration, set by an administrator, chose the policies;
    /// they must exist.
    pub async fn issue_login_token(&self, req: TokenRequest) -> Result<(SecretBytes, TokenRecord), KmsError> {
        if (req.policies.is_empty() && req.selectors.is_empty())
            || req.policies.len() > 64
            || req.display_name.len() > 128
        {
            return Err(KmsError::invalid(
                "a login token needs up to 64 policies (or identity selectors) and a short display name",
            ));
        }
        if req.ttl_secs.is_none_or(|t| t == 0) || req.max_ttl_secs.is_none_or(|t| t == 0) {
            return Err(KmsError::invalid("a login token needs a ttl and a max ttl"));
        }
        if req.selectors.len() > 64 || req.selectors.iter().any(|s| !crate::policy::selector_ok(s)) {
            return Err(KmsError::Internal("auth method produced an invalid selector".into()));
        }
        {
            let known = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
            if let Some(p) = req.policies.iter().find(|p| *p == ROOT_POLICY || !known.contains_key(*p)) {
                return Err(KmsError::PermissionDenied(format!(
                    "the login role names policy {p:?}, which does not exist or cannot be given by a login"
                )));
            }
        }
        self.insert_token(None, TokenRequest { orphan: true, ..req }).await
    }

    /// Look a token up by accessor.
    pub async fn lookup_token(&self, accessor: &str) -> Result<Arc<TokenRecord>, KmsError> {
        let t = self.token_by_accessor(accessor).await?;
        if t.expires_at.is_some_and(|e| e <= now_unix()) {
            return Err(not_found("token (expired)", accessor));
        }
        Ok(t)
    }

    /// Extend a token's expiry by its TTL from now (never beyond its parent's expiry or its own
    /// max TTL).
    pub async fn renew_token(&self, accessor: &str) -> Result<Arc<TokenRecord>, KmsError> {
        let t = self.lookup_token(accessor).await?;
        let Some(ttl) = t.ttl_secs else {
            return Err(KmsError::Conflict("this token has no TTL and does not expire; nothing to renew".into()));
        };
        let mut next = (*t).clone();
        let mut exp = now_unix().saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX));
        if let Some(p) = t.parent.as_deref()
            && let Some(pe) = self.token_by_accessor(p).await.ok().and_then(|p| p.expires_at)
        {
            exp = exp.min(pe);
        }
        if let Some(m) = t.max_expires_at {
            exp = exp.min(m);
        }
        next.expires_at = Some(exp);
        self.store.set_token_expiry(&next.accessor, next.expires_at).await?;
        let next = Arc::new(next);
        if let Ok(mut m) = self.tokens.write() {
            m.insert(next.hash, next.clone());
        }
        Ok(next)
    }

    /// Revoke a token and every token created from it; returns the accessors revoked. The last
    /// token holding the root policy cannot be revoked.
    pub async fn revoke_token(&self, accessor: &str) -> Result<Vec<String>, KmsError> {
        let all = self.all_tokens().await?;
        if !all.iter().any(|t| t.accessor == accessor) {
            return Err(not_found("token", accessor));
        }
        let mut doomed = vec![accessor.to_string()];
        let mut i = 0;
        while let Some(a) = doomed.get(i).cloned() {
            doomed.extend(all.iter().filter(|t| t.parent.as_deref() == Some(a.as_str())).map(|t| t.accessor.clone()));
            i += 1;
        }
        let now = now_unix();
        let roots_left = all
            .iter()
            .filter(|t| t.is_root() && !doomed.contains(&t.accessor) && t.expires_at.is_none_or(|e| e > now))
            .count();
        if roots_left == 0 && all.iter().any(|t| t.is_root() && doomed.contains(&t.accessor)) {
            return Err(KmsError::Conflict(
                "this would revoke the last root token: first create another with `{\"policies\": [\"root\"], \"orphan\": true}`".into(),
            ));
        }
        self.store.delete_tokens(&doomed).await?;
        if let Ok(mut m) = self.tokens.write() {
            m.retain(|_, t| !doomed.contains(&t.accessor));
        }
        Ok(doomed)
    }

    // ----- policies -------------------------------------------------------------------------

    async fn reload_policies(&self) -> Result<(), KmsError> {
        let mut map = HashMap::new();
        for (name, doc) in self.store.list_policies().await? {
            let p: Policy =
                serde_json::from_str(&doc).map_err(|e| KmsError::Internal(format!("stored policy {name}: {e}")))?;
            map.insert(name, Arc::new(p));
        }
        *self.policies.write().map_err(|_| KmsError::Internal("policy cache poisoned".into()))? = map;
        Ok(())
    }

    /// Create or replace a policy.
    pub async fn put_policy(&self, policy: Policy) -> Result<(), KmsError> {
        policy.validate()?;
        let doc = serde_json::to_string(&policy).map_err(|e| KmsError::Internal(e.to_string()))?;
        self.store.put_policy(&policy.name, &doc, now_unix()).await?;
        if let Ok(mut m) = self.policies.write() {
            m.insert(policy.name.clone(), Arc::new(policy));
        }
        Ok(())
    }

    /// A policy by name.
    pub fn get_policy(&self, name: &str) -> Result<Arc<Policy>, KmsError> {
        self.policies.read().ok().and_then(|m| m.get(name).cloned()).ok_or_else(|| not_found("policy", name))
    }

    /// All policy names (the built-in `root` first).
    pub fn list_policies(&self) -> Vec<String> {
        let mut v: Vec<String> = self.policies.read().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        v.sort();
        v.insert(0, ROOT_POLICY.into());
        v
    }

    /// Delete a policy. Tokens naming it lose what it granted.
    pub async fn delete_policy(&self, name: &str) -> Result<(), KmsError> {
        if name == ROOT_POLICY {
            return Err(KmsError::invalid("the root policy is built in and cannot be deleted"));
        }
        if !self.store.delete_policy(name).await? {
            return Err(not_found("policy", name));
        }
        if let Ok(mut m) = self.policies.write() {
            m.remove(name);
        }
        Ok(())
    }

    /// Decide whether a holder of `policies` may do `operation` on `resource`. Returns the grant
    /// (`policy NAME rule N`) or [`KmsError::PermissionDenied`] with the reason. Deny by default.
    pub fn decide(
        &self,
        policies: &[String],
        selectors: &[String],
        operation: &str,
        resource: &str,
    ) -> Result<String, KmsError> {
        self.decide_grant(policies, selectors, operation, resource).map(|g| g.reason)
    }

    /// [`Kms::decide`], with the granting rule's live-instance cap if it has one: the caller
    /// must then take a place with [`Kms::hold_instance`] before the answer leaves.
    pub fn decide_grant(
        &self,
        policies: &[String],
        selectors: &[String],
        operation: &str,
        resource: &str,
    ) -> Result<Grant, KmsError> {
        self.require_fresh()?;
        if policies.iter().any(|p| p == ROOT_POLICY) {
            return Ok(Grant { reason: "policy root".into(), cap: None });
        }
        let map = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
        let grant = |name: &str, p: &Policy, i: usize, reason: String| {
            let rule = &p.rules[i];
            let cap = rule.max_instances.map(|max| InstanceCap {
                scope: format!("{name}#{i}:{resource}"),
                max,
                hold: Duration::from_secs(rule.instance_hold_secs.unwrap_or(DEFAULT_INSTANCE_HOLD_SECS)),
            });
            Grant { reason, cap }
        };
        for name in policies {
            if let Some((p, i)) = map.get(name).and_then(|p| p.grants(operation, resource, selectors).map(|i| (p, i))) {
                return Ok(grant(name, p, i, format!("policy {name} rule {i}")));
            }
        }
        if !selectors.is_empty() {
            // Policies attached by identity; sorted by name so the reported grant is stable.
            let mut attached: Vec<(&String, &Arc<Policy>, usize)> = map
                .iter()
                .filter(|(n, _)| !policies.contains(n))
                .filter_map(|(n, p)| p.attached_by(selectors).map(|set| (n, p, set)))
                .collect();
            attached.sort_by(|a, b| a.0.cmp(b.0));
            for (name, p, set) in attached {
                if let Some(i) = p.grants(operation, resource, selectors) {
                    return Ok(grant(name, p, i, format!("policy {name} (identity set {set}) rule {i}")));
                }
            }
        }
        Err(KmsError::PermissionDenied(format!("no policy of this identity grants {operation} on {resource}")))
    }

    /// Authorize `operation` on `resource` for `who`: [`Kms::decide_grant`] with its token's
    /// policies and selectors.
    pub fn authorize(&self, who: &TokenRecord, operation: &str, resource: &str) -> Result<Grant, KmsError> {
        self.decide_grant(&who.policies, &who.selectors, operation, resource)
    }

    /// Take (or renew) `instance`'s place under `cap`. Refused when `cap.max` other live
    /// instances hold places; several servers sharing a store never admit more together.
    pub async fn hold_instance(&self, cap: &InstanceCap, instance: &str) -> Result<(), KmsError> {
        match self.store.hold_instance(&cap.scope, instance, cap.max, cap.hold).await? {
            InstanceHold::Held => Ok(()),
            InstanceHold::Full { holders } => Err(KmsError::PermissionDenied(format!(
                "{holders} live instances already use this grant ({}, at most {}); a place frees up when one \
                 has not used it for {} s",
                cap.scope,
                cap.max,
                cap.hold.as_secs()
            ))),
        }
    }

    /// The policies that apply to a caller: those named on its token, then those attached by
    /// its selectors (with the index of the identity set that matched).
    pub fn effective_policies(&self, who: &TokenRecord) -> Result<Vec<(String, Option<usize>)>, KmsError> {
        let map = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
        let mut out: Vec<(String, Option<usize>)> = who.policies.iter().map(|p| (p.clone(), None)).collect();
        let mut attached: Vec<(String, Option<usize>)> = map
            .iter()
            .filter(|(n, _)| !who.policies.contains(n))
            .filter_map(|(n, p)| p.attached_by(&who.selectors).map(|set| (n.clone(), Some(set))))
            .collect();
        attached.sort();
        out.extend(attached);
        Ok(out)
    }

    /// The key name a ciphertext was made with (for authorizing decrypt), if the key exists.
    pub async fn key_name_of_ciphertext(&self, ciphertext: &[u8]) -> Result<Option<String>, KmsError> {
        let Ok((h, _)) = format::parse(ciphertext, EnvelopeKind::CiphertextV1) else {
            return Ok(None);
        };
        Ok(self.key_by_id(&KeyId(h.key_id)).await?.map(|k| k.record.name.clone()))
    }

    // ----- key cache ------------------------------------------------------------------------

    fn cached_by_name(&self, name: &str) -> Option<Arc<CachedKey>> {
        let k = self.keys.read().ok()?.by_name.get(name).cloned();
        let counter = if k.is_some() { &self.cache_hits } else { &self.cache_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        k
    }

    /// Key lookups answered from the in-memory cache, and those that went to the store.
    pub fn key_cache_stats(&self) -> (u64, u64) {
        (self.cache_hits.load(Ordering::Relaxed), self.cache_misses.load(Ordering::Relaxed))
    }

    fn cached_by_id(&self, id: &KeyId) -> Option<Arc<CachedKey>> {
        self.keys.read().ok()?.by_id.get(id).cloned()
    }

    fn invalidate(&self, rec: &KeyRecord) {
        if let Ok(mut c) = self.keys.write() {
            c.by_name.remove(&rec.name);
            c.by_id.remove(&rec.id);
        }
    }

    async fn load(&self, rec: KeyRecord) -> Result<Arc<CachedKey>, KmsError> {
        let mut versions = BTreeMap::new();
        for v in self.store.get_key_versions(&rec.id).await? {
            let material =
                self.unwrap_root(&version_aad(&rec.id, v.version), &v.wrapped_material)?.0.ok_or_else(|| {
                    KmsError::Internal(format!("key {} version {} cannot be unwrapped", rec.name, v.version))
                })?;
            let key = LoadedKey::load(rec.algorithm, &material)?;
            versions.insert(v.version, LoadedVersion { key, public_key: v.public_key, created_at: v.created_at });
        }
        if !versions.contains_key(&rec.current_version) {
            return Err(KmsError::Internal(format!("key {} lacks its current version", rec.name)));
        }
        let ck = Arc::new(CachedKey { record: rec, versions });
        if let Ok(mut c) = self.keys.write() {
            // Do not overwrite a newer entry loaded concurrently.
            let newer = c.by_id.get(&ck.record.id).is_some_and(|old| old.record.revision > ck.record.revision);
            if !newer {
                c.by_name.insert(ck.record.name.clone(), ck.clone());
                c.by_id.insert(ck.record.id, ck.clone());
            }
        }
        Ok(ck)
    }

    async fn key(&self, name: &str) -> Result<Arc<CachedKey>, KmsError> {
        self.require_fresh()?;
        if let Some(k) = self.cached_by_name(name) {
            return Ok(k);
        }
        if name.starts_with(ALIAS_PREFIX) {
            // Callers resolve aliases first: one that reaches here names nothing.
            return Err(not_found("alias", name));
        }
        validate::key_name(name)?;
        let rec = self.store.get_key(name).await?.ok_or_else(|| not_found("key", name))?;
        self.load(rec).await
    }

    /// Re-read a key's record from the store and reload it if another process changed it
    /// (rotated, disabled, deleted and re-created) since it was cached. Costs one store read
    /// when nothing changed. Returns the current version.
    pub async fn refresh_key(&self, name: &str) -> Result<u32, KmsError> {
        validate::key_name(name)?;
        let rec = self.store.get_key(name).await?.ok_or_else(|| not_found("key", name))?;
        if let Some(cached) = self.cached_by_name(name) {
            if cached.record.id == rec.id && cached.record.revision == rec.revision {
                return Ok(rec.current_version);
            }
            self.invalidate(&cached.record);
        }
        Ok(self.load(rec).await?.record.current_version)
    }

    async fn key_by_id(&self, id: &KeyId) -> Result<Option<Arc<CachedKey>>, KmsError> {
        self.require_fresh()?;
        if let Some(k) = self.cached_by_id(id) {
            return Ok(Some(k));
        }
        match self.store.get_key_by_id(id).await? {
            Some(rec) => Ok(Some(self.load(rec).await?)),
            None => Ok(None),
        }
    }

    fn usable(ck: &CachedKey, operation: &'static str, ok_type: fn(KeyAlgorithm) -> bool) -> Result<(), KmsError> {
        let r = &ck.record;
        match r.state {
            KeyState::Enabled => {}
            KeyState::Disabled => return Err(KmsError::KeyDisabled(r.name.clone())),
            KeyState::PendingDeletion => return Err(KmsError::KeyPendingDeletion(r.name.clone())),
        }
        if !ok_type(r.algorithm) {
            return Err(KmsError::WrongKeyType { name: r.name.clone(), algorithm: r.algorithm.as_str(), operation });
        }
        Ok(())
    }

    // ----- key lifecycle --------------------------------------------------------------------

    fn new_version(&self, id: &KeyId, alg: KeyAlgorithm, version: u32, now: i64) -> Result<KeyVersionRecord, KmsError> {
        self.require_fresh()?;
        let material = alg.generate()?;
        let public_key = LoadedKey::load(alg, &material)?.public_key_der();
        let wrapped_material = self.current_root()?.seal(&version_aad(id, version), material.expose())?;
        Ok(KeyVersionRecord { key_id: *id, version, wrapped_material, public_key, created_at: now })
    }

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

    async fn update_key_with(
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

    /// The key an alias names (`alias/NAME`), or the name itself if it is not an alias.
    /// Aliases are read from the store at each use, so every server sees a change at once.
    pub async fn resolve_key_name(&self, name: &str) -> Result<String, KmsError> {
        if !name.starts_with(ALIAS_PREFIX) {
            return Ok(name.to_string());
        }
        validate::alias_name(name)?;
        self.aliases().await?.remove(name).ok_or_else(|| not_found("alias", name))
    }

    async fn aliases_raw(&self) -> Result<(Option<Vec<u8>>, BTreeMap<String, String>), KmsError> {
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

    async fn change_aliases<T>(
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

    async fn rotate_at(&self, name: &str, now: i64) -> Result<KeyDescription, KmsError> {
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

    /// Replace every randomized value older than its TTL (so values rotate on schedule even
    /// when nobody reads them). Returns how many were replaced.
    async fn rotate_due_random_values(&self, now: i64) -> Result<u32, KmsError> {
        let prefix = format!("{}random/", validate::RESERVED_SECRET_PREFIX);
        let mut specs: HashMap<String, Option<crate::random::RandomSpec>> = HashMap::new();
        let mut rotated = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self.store.list_secrets(&prefix, after.as_deref(), MAX_PAGE).await?;
            for path in &page {
                let Some(name) = path.strip_prefix(&prefix).and_then(|r| r.split('/').next()) else { continue };
                if !specs.contains_key(name) {
                    let spec = match self.random_definition(name).await {
                        Ok(s) => Some(s),
                        Err(KmsError::NotFound { .. }) => None,
                        Err(e) => return Err(e),
                    };
                    specs.insert(name.to_string(), spec);
                }
                let Some(Some(spec)) = specs.get(name) else { continue };
                let current = match self.get_secret_at(path, None).await {
                    Ok(c) => c,
                    Err(KmsError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                if now < current.created_at.saturating_add(i64::try_from(spec.ttl_secs).unwrap_or(i64::MAX)) {
                    continue;
                }
                let value = spec.generate()?;
                let data = SecretData::new([("value".to_string(), value.to_string())].into())?;
                match self.put_secret_at(path, data, Some(current.version), now).await {
                    Ok(_) => rotated += 1,
                    Err(KmsError::Conflict(_)) => {} // a reader rotated it first
                    Err(e) => return Err(e),
                }
            }
            if page.len() < MAX_PAGE as usize {
                return Ok(rotated);
            }
            after = page.last().cloned();
        }
    }

    // ----- cryptographic operations ---------------------------------------------------------

    /// Encrypt up to 64 KiB under the key's current version, binding `context`.
    pub async fn encrypt(
        &self,
        name: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<Encrypted, KmsError> {
        check_len("plaintext", plaintext.len(), MAX_PLAINTEXT)?;
        validate::context(context)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "encrypt", |a| a == KeyAlgorithm::Aes256Gcm)?;
        let (version, key) = current_aead(&ck)?;
        let ciphertext = format::seal_ciphertext(key, ck.record.id.0, version, context, plaintext)?;
        Ok(Encrypted { ciphertext, key_name: ck.record.name.clone(), key_version: version })
    }

    /// Decrypt a ciphertext envelope; the key is found from its header.
    pub async fn decrypt(&self, ciphertext: &[u8], context: &BTreeMap<String, String>) -> Result<Decrypted, KmsError> {
        check_len("ciphertext", ciphertext.len(), MAX_CIPHERTEXT)?;
        validate::context(context)?;
        let (header, body) =
            format::parse(ciphertext, EnvelopeKind::CiphertextV1).map_err(|_| KmsError::DecryptionFailed)?;
        let ck = self.key_by_id(&KeyId(header.key_id)).await?.ok_or(KmsError::DecryptionFailed)?;
        Self::usable(&ck, "decrypt", |a| a == KeyAlgorithm::Aes256Gcm)?;
        let key = ck.versions.get(&header.version).and_then(|v| v.key.aead()).ok_or(KmsError::DecryptionFailed)?;
        let plaintext = format::open_ciphertext(key, &header, body, context).map_err(|_| KmsError::DecryptionFailed)?;
        Ok(Decrypted { plaintext, key_name: ck.record.name.clone(), key_version: header.version })
    }

    /// Decrypt and encrypt again under `destination` (default: the same key's current version)
    /// with `destination_context`; the plaintext never leaves the service.
    pub async fn reencrypt(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        destination: Option<&str>,
        destination_context: &BTreeMap<String, String>,
    ) -> Result<Reencrypted, KmsError> {
        let d = self.decrypt(ciphertext, context).await?;
        let dest = destination.unwrap_or(&d.key_name).to_string();
        let encrypted = self.encrypt(&dest, d.plaintext.expose(), destination_context).await?;
        Ok(Reencrypted { encrypted, source_key: d.key_name, source_key_version: d.key_version })
    }

    /// Generate a data key of `bytes` (16 to 64, default 32) bytes, returned in the clear (unless
    /// `with_plaintext` is false) and encrypted under the named key.
    pub async fn generate_data_key(
        &self,
        name: &str,
        bytes: Option<usize>,
        context: &BTreeMap<String, String>,
        with_plaintext: bool,
    ) -> Result<DataKey, KmsError> {
        let n = bytes.unwrap_or(32);
        if !(16..=64).contains(&n) {
            return Err(KmsError::invalid("data key size must be between 16 and 64 bytes"));
        }
        let dk = SecretBytes::random(n)?;
        let enc = self.encrypt(name, dk.expose(), context).await?;
        Ok(DataKey {
            plaintext: with_plaintext.then_some(dk),
            ciphertext: enc.ciphertext,
            key_version: enc.key_version,
        })
    }

    /// Sign `message` with the key's current version; returns a signature envelope.
    pub async fn sign(&self, name: &str, message: &[u8]) -> Result<(Vec<u8>, u32), KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "sign", KeyAlgorithm::is_signing)?;
        let v = current(&ck)?;
        let sig = v.1.key.sign(message)?;
        Ok((format::wrap_tag(EnvelopeKind::SignatureV1, ck.record.id.0, v.0, &sig), v.0))
    }

    /// Sign the SHA-256 `digest` of a message the caller hashed (a message of any size); the
    /// signature verifies against the message itself. ECDSA keys only: Ed25519 signs whole
    /// messages.
    pub async fn sign_digest(&self, name: &str, digest: &[u8]) -> Result<(Vec<u8>, u32), KmsError> {
        if digest.len() != 32 {
            return Err(KmsError::invalid("digest must be a SHA-256 digest: 32 bytes, base64"));
        }
        let ck = self.key(name).await?;
        Self::usable(&ck, DIGEST_SIGNING, |a| a == KeyAlgorithm::EcdsaP256)?;
        let v = current(&ck)?;
        let sig = v.1.key.sign_digest_sha256(digest)?;
        Ok((format::wrap_tag(EnvelopeKind::SignatureV1, ck.record.id.0, v.0, &sig), v.0))
    }

    /// Verify a signature envelope over the message whose SHA-256 digest is `digest`.
    pub async fn verify_digest(&self, name: &str, digest: &[u8], signature: &[u8]) -> Result<bool, KmsError> {
        if digest.len() != 32 {
            return Err(KmsError::invalid("digest must be a SHA-256 digest: 32 bytes, base64"));
        }
        let ck = self.key(name).await?;
        Self::usable(&ck, DIGEST_SIGNING, |a| a == KeyAlgorithm::EcdsaP256)?;
        // Bytes that are not a signature envelope do not verify.
        let Ok((h, sig)) = format::parse(signature, EnvelopeKind::SignatureV1) else { return Ok(false) };
        if h.key_id != ck.record.id.0 {
            return Ok(false);
        }
        Ok(ck.versions.get(&h.version).is_some_and(|v| v.key.verify_digest_sha256(digest, sig).is_ok()))
    }

    /// Verify a signature envelope made by this key (any version).
    pub async fn verify(&self, name: &str, message: &[u8], signature: &[u8]) -> Result<bool, KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "verify", KeyAlgorithm::is_signing)?;
        // Bytes that are not a signature envelope do not verify.
        let Ok((h, sig)) = format::parse(signature, EnvelopeKind::SignatureV1) else { return Ok(false) };
        if h.key_id != ck.record.id.0 {
            return Ok(false);
        }
        Ok(ck.versions.get(&h.version).is_some_and(|v| v.key.verify(message, sig).is_ok()))
    }

    /// HMAC-SHA256 of `message` with the key's current version; returns a MAC envelope.
    pub async fn mac(&self, name: &str, message: &[u8]) -> Result<(Vec<u8>, u32), KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "mac", |a| a == KeyAlgorithm::HmacSha256)?;
        let v = current(&ck)?;
        let tag = v.1.key.mac(message)?;
        Ok((format::wrap_tag(EnvelopeKind::MacV1, ck.record.id.0, v.0, &tag), v.0))
    }

    /// Verify a MAC envelope made by this key (any version), in constant time.
    pub async fn verify_mac(&self, name: &str, message: &[u8], mac: &[u8]) -> Result<bool, KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "verify-mac", |a| a == KeyAlgorithm::HmacSha256)?;
        // Bytes that are not a MAC envelope do not verify.
        let Ok((h, tag)) = format::parse(mac, EnvelopeKind::MacV1) else { return Ok(false) };
        if h.key_id != ck.record.id.0 {
            return Ok(false);
        }
        Ok(ck.versions.get(&h.version).is_some_and(|v| v.key.verify_mac(message, tag).is_ok()))
    }

    /// `n` random bytes (1 to 1024) from the CSPRNG.
    pub fn random(&self, n: usize) -> Result<SecretBytes, KmsError> {
        if n == 0 || n > MAX_RANDOM_BYTES {
            return Err(KmsError::invalid(format!("bytes must be between 1 and {MAX_RANDOM_BYTES}")));
        }
        Ok(SecretBytes::random(n)?)
    }

    // ----- secrets --------------------------------------------------------------------------

    /// Write a new version of a secret. With `cas`, the write only succeeds if the current
    /// version is `cas` (0: the secret must not exist yet). Returns the new version.
    pub async fn put_secret(&self, path: &str, data: SecretData, cas: Option<u32>) -> Result<u32, KmsError> {
        validate::secret_path(path)?;
        self.put_secret_at(path, data, cas, now_unix()).await
    }

    async fn put_secret_at(&self, path: &str, data: SecretData, cas: Option<u32>, now: i64) -> Result<u32, KmsError> {
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

    /// Create or replace the definition of randomized secret `name`. Existing values keep
    /// their age; the new TTL and grace apply at the next read.
    pub async fn define_random(&self, name: &str, spec: &crate::random::RandomSpec) -> Result<(), KmsError> {
        validate::key_name(name)?;
        spec.validate()?;
        let key = format!("random-def/{name}");
        let doc = serde_json::to_vec(spec).map_err(|e| KmsError::Internal(e.to_string()))?;
        for _ in 0..CAS_RETRIES {
            match self.store.get_meta(&key).await? {
                None if self.store.put_meta_if_absent(&key, &doc).await? => return Ok(()),
                Some(old) if self.store.replace_meta(&key, &old, &doc).await? => return Ok(()),
                _ => continue,
            }
        }
        Err(KmsError::Conflict(format!("randomized secret {name:?} is being changed concurrently; retry")))
    }

    /// The definition of randomized secret `name`.
    pub async fn random_definition(&self, name: &str) -> Result<crate::random::RandomSpec, KmsError> {
        validate::key_name(name)?;
        let doc = self
            .store
            .get_meta(&format!("random-def/{name}"))
            .await?
            .ok_or_else(|| not_found("randomized secret", name))?;
        serde_json::from_slice(&doc).map_err(|e| KmsError::Internal(format!("stored randomized secret {name}: {e}")))
    }

    /// The value of randomized secret `name` for `identity` (e.g. `k8s:payments/api`): created
    /// on first use, replaced once older than the TTL (concurrent readers agree on one value),
    /// with the previous value during the grace period.
    pub async fn random_value(
        &self,
        name: &str,
        identity: &str,
        now: i64,
    ) -> Result<crate::random::RandomValue, KmsError> {
        let spec = self.random_definition(name).await?;
        let path = format!(
            "{}random/{name}/{}",
            validate::RESERVED_SECRET_PREFIX,
            hex::encode(keyward_crypto::hash::sha256(identity.as_bytes()))
        );
        let ttl = i64::try_from(spec.ttl_secs).unwrap_or(i64::MAX);
        let grace = i64::try_from(spec.grace_secs).unwrap_or(i64::MAX);
        for _ in 0..CAS_RETRIES {
            let current = match self.get_secret_at(&path, None).await {
                Ok(v) => Some(v),
                Err(KmsError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            let due = current.as_ref().is_none_or(|c| now >= c.created_at.saturating_add(ttl));
            if due {
                let value = spec.generate()?;
                let data = SecretData::new([("value".to_string(), value.to_string())].into())?;
                let cas = current.as_ref().map_or(0, |c| c.version);
                match self.put_secret_at(&path, data, Some(cas), now).await {
                    Ok(_) | Err(KmsError::Conflict(_)) => continue, // re-read: ours, or a concurrent writer's
                    Err(e) => return Err(e),
                }
            }
            let Some(c) = current else { continue };
            let field = |v: &SecretValue| {
                v.data
                    .expose()
                    .get("value")
                    .map(|s| zeroize::Zeroizing::new(s.clone()))
                    .ok_or_else(|| KmsError::Internal("randomized value without a value".into()))
            };
            let previous = if c.version > 1 && now < c.created_at.saturating_add(grace) {
                match self.get_secret_at(&path, Some(c.version - 1)).await {
                    Ok(p) => Some((field(&p)?, c.created_at.saturating_add(grace))),
                    Err(KmsError::NotFound { .. }) => None,
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            return Ok(crate::random::RandomValue {
                value: field(&c)?,
                version: c.version,
                created_at: c.created_at,
                rotates_at: c.created_at.saturating_add(ttl),
                previous,
            });
        }
        Err(KmsError::Conflict(format!("randomized secret {name:?} is being rotated concurrently; retry")))
    }

    /// Read a secret version (latest if `version` is `None`).
    pub async fn get_secret(&self, path: &str, version: Option<u32>) -> Result<SecretValue, KmsError> {
        validate::secret_path(path)?;
        self.get_secret_at(path, version).await
    }

    async fn get_secret_at(&self, path: &str, version: Option<u32>) -> Result<SecretValue, KmsError> {
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

    async fn resolve_versions(&self, path: &str, versions: &[u32], default_latest: bool) -> Result<Vec<u32>, KmsError> {
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

fn current(ck: &CachedKey) -> Result<(u32, &LoadedVersion), KmsError> {
    let v = ck.record.current_version;
    ck.versions.get(&v).map(|l| (v, l)).ok_or_else(|| KmsError::Internal("current version not loaded".into()))
}

fn current_aead(ck: &CachedKey) -> Result<(u32, &AeadKey), KmsError> {
    let (v, l) = current(ck)?;
    l.key.aead().map(|k| (v, k)).ok_or_else(|| KmsError::Internal("not an AEAD key".into()))
}

fn describe(ck: &CachedKey) -> KeyDescription {
    KeyDescription {
        record: ck.record.clone(),
        versions: ck
            .versions
            .iter()
            .map(|(v, l)| VersionInfo { version: *v, created_at: l.created_at, public_key: l.public_key.clone() })
            .collect(),
    }
}
