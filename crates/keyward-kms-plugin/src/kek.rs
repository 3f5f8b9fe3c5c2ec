//! Where the key-encryption key lives: in a Keyward server (service mode; the KEK never leaves
//! it) or in a local store sealed like a server's (local mode).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward_audit::{AuditConfig, AuditLog};
use keyward_client::ErrorKind;
use keyward_core::seal::SealKind;
use keyward_core::service::CreateKey;
use keyward_core::store::{Store, StoreError};
use keyward_core::{Kms, KmsError};
use keyward_crypto::keys::KeyAlgorithm;
use keyward_seal::Sealing;
use keyward_seal::file::InsecureFileSeal;
use zeroize::Zeroizing;

use crate::keyid::KeyRef;

/// The encryption context bound into every ciphertext the plugin makes, so a ciphertext made
/// through the general API for other purposes is not accepted as a KMS v2 seed.
pub const CONTEXT_KEY: &str = "purpose";
/// Its value.
pub const CONTEXT_VALUE: &str = "kubernetes-kms-v2";

fn context() -> BTreeMap<String, String> {
    BTreeMap::from([(CONTEXT_KEY.to_string(), CONTEXT_VALUE.to_string())])
}

/// Why a wrap or unwrap failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KekError {
    /// The Keyward server could not be reached (or is sealed or overloaded).
    #[error("Keyward is unavailable: {0}")]
    Unavailable(String),
    /// The ciphertext does not open. Says nothing more.
    #[error("decryption failed")]
    DecryptionFailed,
    /// Keyward refused (key disabled or missing, permission denied, ...), and what kind of
    /// refusal it is: the gRPC code comes from the kind ([`ErrorKind::grpc_code`]).
    #[error("{message}")]
    Refused {
        /// The kind of refusal.
        kind: ErrorKind,
        /// What Keyward said.
        message: String,
    },
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

impl KekError {
    /// The kind of this failure, as the client names the server's (one mapping for every adapter).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::DecryptionFailed => ErrorKind::DecryptionFailed,
            Self::Refused { kind, .. } => *kind,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    fn of_kind(kind: ErrorKind, message: String) -> Self {
        match kind {
            ErrorKind::Unavailable => Self::Unavailable(message),
            ErrorKind::DecryptionFailed => Self::DecryptionFailed,
            ErrorKind::Internal => Self::Internal(message),
            kind => Self::Refused { kind, message },
        }
    }
}

/// The embedded service's errors (local mode) by the same codes the server answers with.
impl From<KmsError> for KekError {
    fn from(e: KmsError) -> Self {
        match e {
            e @ (KmsError::Internal(_) | KmsError::Store(_) | KmsError::Crypto(_)) => {
                Self::Internal(e.internal_detail().unwrap_or_default())
            }
            e => Self::of_kind(ErrorKind::of_code(e.code()).unwrap_or(ErrorKind::Internal), e.to_string()),
        }
    }
}

impl From<keyward_client::Error> for KekError {
    fn from(e: keyward_client::Error) -> Self {
        Self::of_kind(e.kind(), e.to_string())
    }
}

/// A wrapped seed.
#[derive(Debug)]
pub struct Wrapped {
    /// Keyward ciphertext (a few dozen bytes; the apiserver allows 1 KiB).
    pub ciphertext: Vec<u8>,
    /// The key version it was made with.
    pub key: KeyRef,
}

/// An unwrapped seed.
#[derive(Debug)]
pub struct Unwrapped {
    /// The plaintext, wiped on drop.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The key version it was made with.
    pub key: KeyRef,
}

/// Local mode: an embedded Keyward service over SQLite in a data directory.
#[derive(Debug)]
pub struct Local {
    kms: Arc<Kms>,
    key: String,
}

/// Service mode: a Keyward server, through the HTTP API.
#[derive(Debug)]
pub struct Service {
    client: keyward_client::Client,
    key: String,
}

/// The KEK backend.
#[derive(Debug)]
pub enum Kek {
    /// Local mode.
    Local(Local),
    /// Service mode.
    Service(Service),
}

/// Opens (creating if absent) the database of a local store at a path. The binary picks the
/// backend (`keyward` passes SQLite's), so this crate depends on no store implementation.
pub type OpenStore = fn(&Path) -> Result<Arc<dyn Store>, StoreError>;

/// Data directory file names.
const DB_FILE: &str = "keyward.db";
const ROOT_KEY_FILE: &str = "root-key.insecure";
const AUDIT_FILE: &str = "audit.log";

fn create_dir(dir: &Path) -> Result<(), KekError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| KekError::Internal(format!("creating {}: {e}", dir.display())))
}

fn audit_config(dir: &Path) -> AuditConfig {
    AuditConfig { file: dir.join(AUDIT_FILE), stdout: false, max_file_bytes: 256 * 1024 * 1024, server: None }
}

async fn open_sealed(dir: &Path, open: OpenStore, audit: bool) -> Result<Arc<keyward_seal::Unsealed>, KekError> {
    create_dir(dir)?;
    let store = open(&dir.join(DB_FILE)).map_err(|e| KekError::Internal(e.to_string()))?;
    let sealing = Sealing::new(store, SealKind::InsecureFile, audit.then(|| audit_config(dir)));
    let seal = InsecureFileSeal::new(dir.join(ROOT_KEY_FILE));
    // A new store's root token is of no use to the plugin; it is dropped (and wiped) here.
    drop(sealing.open_with_file_seal(&seal).await.map_err(|e| KekError::Internal(e.to_string()))?);
    sealing.unsealed().ok_or_else(|| KekError::Internal("the local store did not unseal".into()))
}

impl Local {
    /// Open (creating on first start) the local store in `dir` with `open` and the key `key` in
    /// it (AES-256-GCM, rotated every `rotate_every` if given). Returns the backend and the
    /// store's audit log.
    pub async fn open(
        dir: &Path,
        open: OpenStore,
        key: &str,
        rotate_every: Option<Duration>,
    ) -> Result<(Self, Arc<AuditLog>), KekError> {
        let unsealed = open_sealed(dir, open, true).await?;
        let kms = unsealed.kms.clone();
        let audit = unsealed.audit.clone().ok_or_else(|| KekError::Internal("audit log not open".into()))?;
        match kms.describe_key(key).await {
            Ok(_) => {}
            Err(KmsError::NotFound { .. }) => {
                kms.create_key(CreateKey {
                    name: key.to_string(),
                    algorithm: KeyAlgorithm::Aes256Gcm,
                    description: "Kubernetes KMS v2 key-encryption key".into(),
                    rotate_every_secs: rotate_every.map(|d| d.as_secs()),
                })
                .await?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok((Self { kms, key: key.to_string() }, audit))
    }

    /// The chain key of the local store's audit log in `dir` (to verify it while the plugin
    /// runs: this opens the store read-only as far as the log goes and writes nothing to it).
    pub async fn audit_key(dir: &Path, open: OpenStore) -> Result<keyward_crypto::SecretBytes, KekError> {
        if !dir.join(DB_FILE).exists() {
            return Err(KekError::Refused {
                kind: ErrorKind::NotFound,
                message: format!("{} holds no local KMS plugin store", dir.display()),
            });
        }
        let unsealed = open_sealed(dir, open, false).await?;
        Ok(keyward_crypto::SecretBytes::copy_from(unsealed.kms.audit_key().expose()))
    }

    /// Rotate `key` in the local store in `dir`, from another process than the running plugin
    /// (which reports the new `key_id` at its next status check). Returns the new version.
    pub async fn rotate(dir: &Path, open: OpenStore, key: &str) -> Result<KeyRef, KekError> {
        if !dir.join(DB_FILE).exists() {
            return Err(KekError::Refused {
                kind: ErrorKind::NotFound,
                message: format!("{} holds no local KMS plugin store", dir.display()),
            });
        }
        let unsealed = open_sealed(dir, open, false).await?;
        let d = unsealed.kms.rotate_key(key).await?;
        Ok(KeyRef { name: d.record.name, id: d.record.id.0, version: d.record.current_version })
    }
}

impl Service {
    /// A backend wrapping under `key` through `client`, and the plugin's own audit log in `dir`
    /// (for what never reaches the server: refused callers and answers from the outage cache).
    pub fn open(client: keyward_client::Client, key: &str, dir: &Path) -> Result<(Self, Arc<AuditLog>), KekError> {
        let audit = keyward_audit::open_with_key_file(dir).map_err(|e| KekError::Internal(e.to_string()))?;
        Ok((Self { client, key: key.to_string() }, Arc::new(audit)))
    }
}

impl Kek {
    /// The key new seeds are wrapped under.
    pub fn key_name(&self) -> &str {
        match self {
            Self::Local(l) => &l.key,
            Self::Service(s) => &s.key,
        }
    }

    /// `local` or `service`.
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Local(_) => "local",
            Self::Service(_) => "service",
        }
    }

    /// Pick up changes made by others: in local mode, a rotation by `keyward kms-plugin rotate`
    /// or a due scheduled rotation. (A server's own cache is always current.)
    pub async fn refresh(&self) -> Result<(), KekError> {
        if let Self::Local(l) = self {
            l.kms.run_scheduled(keyward_core::now_unix()).await?;
            l.kms.refresh_key(&l.key).await?;
        }
        Ok(())
    }

    /// Wrap a seed under the key's current version.
    pub async fn wrap(&self, plaintext: &[u8]) -> Result<Wrapped, KekError> {
        let ciphertext = match self {
            Self::Local(l) => l.kms.encrypt(&l.key, plaintext, &context()).await?.ciphertext,
            Self::Service(s) => s.client.encrypt(&s.key, plaintext, &context()).await?.ciphertext,
        };
        let key = KeyRef::of_ciphertext(self.key_name(), &ciphertext)
            .ok_or_else(|| KekError::Internal("Keyward returned a ciphertext without a header".into()))?;
        Ok(Wrapped { ciphertext, key })
    }

    /// Unwrap a ciphertext made by [`Kek::wrap`] with the key version `expected`.
    pub async fn unwrap(&self, ciphertext: &[u8], expected: &KeyRef) -> Result<Unwrapped, KekError> {
        let (plaintext, name, version) = match self {
            Self::Local(l) => {
                let d = l.kms.decrypt(ciphertext, &context()).await?;
                (Zeroizing::new(d.plaintext.expose().to_vec()), d.key_name, d.key_version)
            }
            Self::Service(s) => {
                let d = s.client.decrypt(ciphertext, &context()).await?;
                (d.plaintext, d.key, d.key_version)
            }
        };
        if name != expected.name || version != expected.version {
            return Err(KekError::DecryptionFailed);
        }
        Ok(Unwrapped { plaintext, key: expected.clone() })
    }
}

/// Service mode's memory of seeds it unwrapped, to keep answering `Decrypt` through a Keyward
/// outage. In memory only; each entry lasts `window` after it was last obtained from the server,
/// and is used only while the server is unavailable.
#[derive(Debug)]
pub struct OutageCache {
    window: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
}

#[derive(Debug)]
struct Entry {
    plaintext: Zeroizing<Vec<u8>>,
    key: KeyRef,
    obtained: Instant,
}

impl OutageCache {
    /// A cache keeping entries for `window` (zero: nothing is kept), at most `max_entries`.
    pub fn new(window: Duration, max_entries: usize) -> Self {
        Self { window, max_entries, entries: Mutex::new(HashMap::new()) }
    }

    /// Remember what the server answered for `ciphertext`.
    pub fn put(&self, ciphertext: &[u8], plaintext: &[u8], key: &KeyRef) {
        if self.window.is_zero() || self.max_entries == 0 {
            return;
        }
        let Ok(mut m) = self.entries.lock() else { return };
        if m.len() >= self.max_entries && !m.contains_key(ciphertext) {
            let window = self.window;
            m.retain(|_, e| e.obtained.elapsed() < window);
            if m.len() >= self.max_entries
                && let Some(oldest) = m.iter().min_by_key(|(_, e)| e.obtained).map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        }
        let entry = Entry { plaintext: Zeroizing::new(plaintext.to_vec()), key: key.clone(), obtained: Instant::now() };
        m.insert(ciphertext.to_vec(), entry);
    }

    /// The remembered answer for `ciphertext` made with `key`, if obtained within the window.
    pub fn get(&self, ciphertext: &[u8], key: &KeyRef) -> Option<Unwrapped> {
        let mut m = self.entries.lock().ok()?;
        let e = m.get(ciphertext)?;
        if e.obtained.elapsed() >= self.window {
            m.remove(ciphertext);
            return None;
        }
        (e.key == *key).then(|| Unwrapped { plaintext: e.plaintext.clone(), key: e.key.clone() })
    }

    /// Drop expired entries (wiping them).
    pub fn prune(&self) {
        if let Ok(mut m) = self.entries.lock() {
            let window = self.window;
            m.retain(|_, e| e.obtained.elapsed() < window);
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(v: u32) -> KeyRef {
        KeyRef { name: "k".into(), id: [1; 16], version: v }
    }

    #[test]
    fn outage_cache_expires_matches_the_key_and_is_bounded() {
        let c = OutageCache::new(Duration::from_millis(200), 2);
        c.put(b"ct1", b"seed1", &key(1));
        assert_eq!(c.get(b"ct1", &key(1)).unwrap().plaintext.as_slice(), b"seed1");
        assert!(c.get(b"ct1", &key(2)).is_none(), "another key_id does not match");
        c.put(b"ct2", b"seed2", &key(1));
        c.put(b"ct3", b"seed3", &key(1));
        assert_eq!(c.len(), 2, "bounded");
        assert!(c.get(b"ct1", &key(1)).is_none(), "the oldest went first");
        std::thread::sleep(Duration::from_millis(250));
        assert!(c.get(b"ct3", &key(1)).is_none(), "expired");
        c.prune();
        assert!(c.is_empty());
        let off = OutageCache::new(Duration::ZERO, 10);
        off.put(b"ct", b"seed", &key(1));
        assert!(off.is_empty());
    }
}
