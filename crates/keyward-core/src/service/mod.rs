//! The KMS service: key lifecycle, cryptographic operations, secrets and tokens. [`Kms`] and the
//! types of its answers are here; its operations are in one file per domain.

mod aliases;
mod authz;
mod cache;
mod crypto_ops;
mod keys;
mod randomized;
mod roots;
mod secrets;
mod sync;
mod tokens;

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
        check_root(store.as_ref(), &roots).await?;
        let secrets_key = AeadKey::new(
            &stored_key(store.as_ref(), &roots, META_SECRETS_KEY, AAD_SECRETS_KEY, SecretBytes::random(32)?).await?,
        )?;
        let token_key = stored_key(store.as_ref(), &roots, META_TOKEN_KEY, AAD_TOKEN_KEY, legacy_token_key).await?;
        let audit_key = stored_key(store.as_ref(), &roots, META_AUDIT_KEY, AAD_AUDIT_KEY, legacy_audit_key).await?;

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
        let root_token = kms.initial_root_token().await?;
        kms.reload_tokens().await?;
        kms.reload_policies().await?;
        kms.sync_changes().await?;
        Ok((kms, root_token))
    }

    /// On a store without tokens, create the root token and return it (shown once); otherwise none.
    async fn initial_root_token(&self) -> Result<Option<SecretBytes>, KmsError> {
        let tokens = self.store.list_tokens().await?;
        if !tokens.is_empty() {
            return Ok(None);
        }
        let req = TokenRequest {
            policies: vec![ROOT_POLICY.into()],
            ttl_secs: None,
            max_uses: None,
            display_name: "root".into(),
            orphan: true,
            selectors: vec![],
            max_ttl_secs: None,
        };
        Ok(Some(self.insert_token(None, req).await?.0))
    }
}

/// Open `sealed` under whichever key of the root keyring `roots` sealed it.
fn open_any(roots: &[Arc<AeadKey>], aad: &[u8], sealed: &[u8]) -> Option<SecretBytes> {
    roots.iter().find_map(|r| r.open(aad, sealed).ok())
}

/// Check that the root keyring opens the store's root check, writing the check first on a new
/// store (or verifying against the one another server wrote concurrently).
async fn check_root(store: &dyn Store, roots: &[Arc<AeadKey>]) -> Result<(), KmsError> {
    match store.get_meta(META_ROOT_CHECK).await? {
        Some(check) => {
            open_any(roots, AAD_ROOT_CHECK, &check).ok_or_else(|| {
                KmsError::Internal("the root key does not match this store (wrong seal for this data directory)".into())
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
                open_any(roots, AAD_ROOT_CHECK, &theirs)
                    .ok_or_else(|| KmsError::Internal("root key mismatch".into()))?;
            }
        }
    }
    Ok(())
}

/// The key stored in meta entry `name` wrapped under the root key: `initial`, stored first unless
/// the entry exists, then read back and unwrapped (so concurrent servers agree on one key).
async fn stored_key(
    store: &dyn Store,
    roots: &[Arc<AeadKey>],
    name: &str,
    aad: &[u8],
    initial: SecretBytes,
) -> Result<SecretBytes, KmsError> {
    let wrapped = roots[0].seal(aad, initial.expose())?;
    store.put_meta_if_absent(name, &wrapped).await?;
    let wrapped = store.get_meta(name).await?.ok_or_else(|| KmsError::Internal(format!("{name} missing")))?;
    open_any(roots, aad, &wrapped).ok_or_else(|| KmsError::Internal(format!("{name} cannot be unwrapped")))
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
