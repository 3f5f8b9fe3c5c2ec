//! The seal state: uninitialised, sealed (collecting unseal shares) or unsealed (a
//! running [`Kms`] and its audit log), and the operator ceremonies that move between them:
//! init, unseal, seal, rekey and root rotation.
//!
//! The root keyring lives in the store, wrapped under an *unseal key* that never rests in the
//! clear outside dev mode: it is split into Shamir shares at init and exists in memory only
//! while unsealed (in wiping types, in locked memory, excluded from core dumps).

use std::sync::{Arc, RwLock};

use base64::Engine;
use keyward_core::seal::{HsmWrapped, KeyWrapper, META_SEAL, Seal, SealConfig, SealError, SealKind, UNSEAL_KEY_LEN};
use keyward_core::service::RewrapReport;
use keyward_core::store::Store;
use keyward_core::{Kms, KmsError};
use keyward_crypto::SecretBytes;
use keyward_crypto::shamir::{self, Share};
use tokio::sync::Mutex;

use keyward_audit::{AuditConfig, AuditLog};

mod rekey;
mod rotation;

/// Errors of the seal ceremonies, each with a message saying what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealingError {
    /// The server has not been initialised.
    #[error("keyward is not initialised: run `keyward operator init`")]
    NotInitialized,
    /// Init was called twice.
    #[error("keyward is already initialised")]
    AlreadyInitialized,
    /// The operation needs the server sealed or unsealed.
    #[error("{0}")]
    WrongState(&'static str),
    /// A submitted share or parameter is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The submitted shares do not reconstruct the unseal key.
    #[error(
        "unseal failed: the shares do not reconstruct the unseal key (one is wrong or forged); progress was reset, \
         submit the shares again"
    )]
    WrongShares,
    /// The seal or the service failed.
    #[error("{0}")]
    Kms(#[from] KmsError),
    /// The audit log could not be opened.
    #[error("audit: {0}")]
    Audit(#[from] keyward_audit::AuditError),
    /// The stored seal is damaged.
    #[error("{0}")]
    Seal(#[from] SealError),
    /// The stored seal is of another kind than this server's: submit shares with `migrate`.
    #[error("{0}")]
    MigrationRequired(String),
    /// The HSM could not be reached or refused (the root keyring stays sealed).
    #[error("{0}")]
    Device(String),
}

/// A running, unsealed service and its audit log.
#[derive(Debug)]
pub struct Unsealed {
    /// The service.
    pub kms: Arc<Kms>,
    /// The audit log; `None` only when started with the insecure no-audit option.
    pub audit: Option<Arc<AuditLog>>,
}

/// Seal status as shown by `keyward status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SealStatus {
    /// Whether init has run.
    pub initialized: bool,
    /// Whether the service is sealed.
    pub sealed: bool,
    /// This server's seal kind ("shamir", "pkcs11", "insecure-file").
    pub seal: &'static str,
    /// The kind the stored keyring is sealed with; differs from `seal` until a migration.
    pub stored_seal: Option<&'static str>,
    /// The stored seal is of another kind: unseal with `migrate` to convert it.
    pub migration_required: bool,
    /// The HSM key wrapping the unseal key (PKCS#11 seal).
    pub hsm_key: Option<String>,
    /// Whether the unseal key rests in the clear.
    pub insecure_seal: bool,
    /// Shares issued at init or the last rekey (recovery shares with the PKCS#11 seal).
    pub shares: u8,
    /// Shares needed to unseal.
    pub threshold: u8,
    /// Distinct shares submitted so far while sealed.
    pub progress: u8,
    /// Whether a rekey is collecting shares.
    pub rekey_in_progress: bool,
}

/// What init hands out, exactly once.
#[derive(Debug)]
pub struct InitResult {
    /// The unseal key shares (base64).
    pub shares: Vec<SecretBytes>,
    /// The initial root token.
    pub root_token: SecretBytes,
}

/// Progress of an unseal or rekey submission.
#[derive(Debug)]
pub enum Progress {
    /// More shares are needed.
    Need {
        /// Distinct shares held.
        have: u8,
        /// Shares needed.
        threshold: u8,
    },
    /// Unsealed.
    Unsealed,
    /// Rekey finished: the new shares (base64), replacing the old ones.
    Rekeyed(Vec<SecretBytes>),
}

struct Rekey {
    nonce: String,
    shares: u8,
    threshold: u8,
    collected: Vec<Share>,
}

struct Ceremony {
    /// The unseal key, only while unsealed.
    unseal_key: Option<SecretBytes>,
    /// Shares submitted toward unsealing.
    collected: Vec<Share>,
    rekey: Option<Rekey>,
    /// The root keyring this server holds, newest first (empty while sealed): how it follows
    /// the stored keyring when its unseal key is out of date.
    roots: Vec<SecretBytes>,
}

fn copies(keys: &[SecretBytes]) -> Vec<SecretBytes> {
    keys.iter().map(|k| SecretBytes::copy_from(k.expose())).collect()
}

/// How often the store's anchor of the audit log is brought up to date.
const ANCHOR_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Ceremonies on a server whose unseal key no longer opens the stored keyring.
const REKEYED_ELSEWHERE: &str = "the seal was rekeyed on another server, so this server's unseal key is out of date: run \
     the ceremony on that server, or seal this one and unseal it with the new shares";

/// The seal state machine around the store.
pub struct Sealing {
    store: Arc<dyn Store>,
    kind: SealKind,
    hsm: Option<Arc<dyn KeyWrapper>>,
    audit: Option<AuditConfig>,
    current: RwLock<Option<Arc<Unsealed>>>,
    ceremony: Mutex<Ceremony>,
    /// An operator sealed the server: nothing unseals it by itself (the HSM's start-up retries
    /// stop) until an operator unseals it with shares, or the server restarts.
    sealed_by_operator: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing").field("kind", &self.kind).finish_non_exhaustive()
    }
}

fn b64(b: &[u8]) -> SecretBytes {
    SecretBytes::from_vec(base64::engine::general_purpose::STANDARD.encode(b).into_bytes())
}

fn parse_share(text: &str) -> Result<Share, SealingError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map(SecretBytes::from_vec)
        .map_err(|_| SealingError::Invalid("the share is not valid base64; paste it exactly as printed".into()))?;
    Share::from_bytes(raw.expose(), UNSEAL_KEY_LEN).map_err(|_| {
        SealingError::Invalid(format!(
            "the share must decode to {} bytes; paste it exactly as printed by init or rekey",
            UNSEAL_KEY_LEN + 1
        ))
    })
}

fn check_params(shares: u8, threshold: u8) -> Result<(), SealingError> {
    if threshold < 2 || threshold > shares {
        return Err(SealingError::Invalid(format!(
            "need 2 <= threshold <= shares <= 255 (got shares {shares}, threshold {threshold})"
        )));
    }
    Ok(())
}

/// Add a share unless one with the same x is already held; true if added.
fn add_share(held: &mut Vec<Share>, share: Share) -> bool {
    if held.iter().any(|s| s.x() == share.x()) {
        return false;
    }
    held.push(share);
    true
}

impl Sealing {
    /// The storage backend's name ("sqlite", "postgres").
    pub fn storage_backend(&self) -> &'static str {
        self.store.backend_name()
    }

    /// A consistent copy of the store (see [`Store::snapshot`]).
    pub async fn snapshot(&self) -> Result<std::fs::File, keyward_core::store::StoreError> {
        self.store.snapshot().await
    }

    /// A sealing state over `store`. `audit` is where the audit log is opened on unseal (`None`
    /// only with the insecure no-audit option).
    pub fn new(store: Arc<dyn Store>, kind: SealKind, audit: Option<AuditConfig>) -> Self {
        Self {
            store,
            kind,
            hsm: None,
            audit,
            current: RwLock::new(None),
            ceremony: Mutex::new(Ceremony { unseal_key: None, collected: Vec::new(), rekey: None, roots: Vec::new() }),
            sealed_by_operator: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A PKCS#11-sealed state: the unseal key is wrapped by `hsm`.
    pub fn with_hsm(store: Arc<dyn Store>, hsm: Arc<dyn KeyWrapper>, audit: Option<AuditConfig>) -> Self {
        Self { hsm: Some(hsm), ..Self::new(store, SealKind::Pkcs11, audit) }
    }

    /// Run `f` on the HSM in a blocking thread.
    async fn on_hsm<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn KeyWrapper) -> Result<T, SealError> + Send + 'static,
    ) -> Result<T, SealingError> {
        let hsm = self.hsm.clone().ok_or(SealingError::WrongState("this server has no HSM configured"))?;
        match tokio::task::spawn_blocking(move || f(hsm.as_ref())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(SealError::Device(m))) => Err(SealingError::Device(m)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SealingError::Device("the HSM call panicked".into())),
        }
    }

    /// Wrap `unseal_key` with the HSM.
    async fn hsm_wrap(&self, unseal_key: &SecretBytes) -> Result<HsmWrapped, SealingError> {
        let k = SecretBytes::copy_from(unseal_key.expose());
        self.on_hsm(move |h| {
            h.prepare()?;
            HsmWrapped::wrap(h, &k)
        })
        .await
    }

    /// The seal kind this server runs with.
    pub fn kind(&self) -> SealKind {
        self.kind
    }

    /// The running service, or `None` while sealed.
    pub fn unsealed(&self) -> Option<Arc<Unsealed>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    async fn config(&self) -> Result<Option<(SealConfig, Vec<u8>)>, SealingError> {
        match self.store.get_meta(META_SEAL).await.map_err(KmsError::from)? {
            Some(raw) => Ok(Some((SealConfig::from_bytes(&raw)?, raw))),
            None => Ok(None),
        }
    }

    /// Current status.
    pub async fn status(&self) -> Result<SealStatus, SealingError> {
        let cfg = self.config().await?.map(|c| c.0);
        let c = self.ceremony.lock().await;
        Ok(SealStatus {
            initialized: cfg.is_some(),
            sealed: self.unsealed().is_none(),
            seal: self.kind.as_str(),
            stored_seal: cfg.as_ref().map(|c| c.kind.as_str()),
            migration_required: cfg.as_ref().is_some_and(|c| c.kind != self.kind),
            hsm_key: cfg.as_ref().and_then(|c| c.hsm.as_ref()).map(|h| h.key.clone()),
            insecure_seal: self.kind == SealKind::InsecureFile,
            shares: cfg.as_ref().map_or(0, |c| c.shares),
            threshold: cfg.as_ref().map_or(0, |c| c.threshold),
            progress: u8::try_from(c.collected.len()).unwrap_or(u8::MAX),
            rekey_in_progress: c.rekey.is_some(),
        })
    }

    /// Initialise: a new root key, an unseal key split into `shares` shares of which
    /// `threshold` unseal, and the initial root token. A Shamir-sealed server stays sealed; a
    /// PKCS#11-sealed one also has the HSM wrap the unseal key (creating its key if needed),
    /// unseals itself, and the shares are recovery shares.
    pub async fn init(&self, shares: u8, threshold: u8) -> Result<InitResult, SealingError> {
        if self.kind == SealKind::InsecureFile {
            return Err(SealingError::WrongState("this server uses the insecure file seal and needs no init"));
        }
        check_params(shares, threshold)?;
        let mut c = self.ceremony.lock().await;
        if self.config().await?.is_some() {
            return Err(SealingError::AlreadyInitialized);
        }
        if self.store.get_meta("root_check").await.map_err(KmsError::from)?.is_some() {
            return Err(SealingError::WrongState(
                "this data directory holds data from an insecure-file-sealed server; start it with \
                 --insecure-file-seal, or use an empty data directory",
            ));
        }
        let unseal_key = SecretBytes::random(UNSEAL_KEY_LEN).map_err(KmsError::from)?;
        let root = SecretBytes::random(32).map_err(KmsError::from)?;
        let mut cfg = SealConfig::new(self.kind, shares, threshold, &unseal_key, &[&root])?;
        if self.kind == SealKind::Pkcs11 {
            cfg.hsm = Some(self.hsm_wrap(&unseal_key).await?);
        }
        let split = shamir::split(unseal_key.expose(), shares, threshold).map_err(KmsError::from)?;
        if !self.store.put_meta_if_absent(META_SEAL, &cfg.to_bytes()).await.map_err(KmsError::from)? {
            return Err(SealingError::AlreadyInitialized);
        }
        let (kms, token) = Kms::open(self.store.clone(), vec![SecretBytes::copy_from(root.expose())]).await?;
        drop(kms);
        let root_token = token.ok_or(SealingError::WrongState("the store already had tokens"))?;
        if self.kind == SealKind::Pkcs11 {
            self.finish_unseal(&mut c, unseal_key, vec![root]).await?;
            tracing::info!("initialised and unsealed by the HSM; the shares are recovery shares");
        }
        Ok(InitResult { shares: split.iter().map(|s| b64(s.to_bytes().expose())).collect(), root_token })
    }

    /// Start a server sealed by `seal` (the insecure file seal): unseal with the key it holds,
    /// creating the seal configuration on first start. Returns the root token of a new store.
    pub async fn open_with_file_seal(&self, seal: &dyn Seal) -> Result<Option<SecretBytes>, SealingError> {
        let (file_key, _created) = seal.load_or_create()?;
        let roots = match self.config().await? {
            Some((cfg, _)) => cfg.open_keyring(&file_key).map_err(|_| {
                SealingError::Seal(SealError::Invalid(
                    "the root key file does not open this data directory's keyring; restore root-key.insecure".into(),
                ))
            })?,
            None => {
                let has_data = self.store.get_meta("root_check").await.map_err(KmsError::from)?.is_some();
                // A store created before the keyring existed used the file key as its root key.
                let root = if has_data {
                    SecretBytes::copy_from(file_key.expose())
                } else {
                    SecretBytes::random(32).map_err(KmsError::from)?
                };
                let cfg = SealConfig::new(SealKind::InsecureFile, 0, 0, &file_key, &[&root])?;
                self.store.put_meta_if_absent(META_SEAL, &cfg.to_bytes()).await.map_err(KmsError::from)?;
                let (cfg, _) = self.config().await?.ok_or(SealingError::NotInitialized)?;
                cfg.open_keyring(&file_key)?
            }
        };
        let mut c = self.ceremony.lock().await;
        self.finish_unseal(&mut c, file_key, roots).await
    }

    async fn finish_unseal(
        &self,
        c: &mut Ceremony,
        unseal_key: SecretBytes,
        roots: Vec<SecretBytes>,
    ) -> Result<Option<SecretBytes>, SealingError> {
        let rotating = roots.len() > 1;
        let held = copies(&roots);
        let (kms, token) = Kms::open(self.store.clone(), roots).await?;
        let audit = match &self.audit {
            Some(ac) => {
                let log = AuditLog::open(ac.clone(), SecretBytes::copy_from(kms.audit_key().expose()))?;
                let anchor = keyward_audit::anchor_name(&ac.file);
                let stored = self.store.get_meta(&anchor).await.map_err(KmsError::from)?;
                let restarted = log.check_anchor(&anchor, stored.as_deref())?;
                log.system_event(&format!(
                    "keyward {} unsealed (seal {})",
                    env!("CARGO_PKG_VERSION"),
                    self.kind.as_str()
                ))
                .await?;
                if let Some(ended) = restarted {
                    tracing::warn!(ended, "none of the audit log's earlier records is here; a new chain starts");
                    log.system_event(&format!(
                        "a new audit chain starts: the previous chain of this log reached record {ended}, and none \
                         of its records is here (its files were moved away, emptied or deleted)"
                    ))
                    .await?;
                }
                let log = Arc::new(log);
                tokio::spawn(crate::anchor::keep_anchored(
                    Arc::downgrade(&log),
                    self.store.clone(),
                    anchor,
                    stored,
                    ANCHOR_EVERY,
                ));
                Some(log)
            }
            None => None,
        };
        let unsealed = Arc::new(Unsealed { kms: Arc::new(kms), audit });
        c.unseal_key = Some(unseal_key);
        c.roots = held;
        c.collected.clear();
        if let Ok(mut cur) = self.current.write() {
            *cur = Some(unsealed);
        }
        if rotating {
            tracing::warn!("a root key rotation was interrupted; finishing it now");
            self.rotate_locked(c, None).await?;
        }
        Ok(token)
    }

    /// PKCS#11 seal: have the HSM unwrap the unseal key and unseal. `Ok(false)` when there is
    /// nothing to do here (another seal kind, not initialised yet, a migration pending, or
    /// already unsealed); an error when the HSM cannot be used or its key does not fit.
    pub async fn auto_unseal(&self) -> Result<bool, SealingError> {
        if self.kind != SealKind::Pkcs11 {
            return Ok(false);
        }
        let Some((cfg, _)) = self.config().await? else { return Ok(false) };
        let Some(wrapped) = cfg.hsm.clone().filter(|_| cfg.kind == SealKind::Pkcs11) else { return Ok(false) };
        let mut c = self.ceremony.lock().await;
        if self.unsealed().is_some() || self.operator_sealed() {
            return Ok(false);
        }
        let unseal_key = self.on_hsm(move |h| wrapped.unwrap(h)).await.map_err(|e| match e {
            SealingError::Seal(SealError::DecryptionFailed) => SealingError::Device(format!(
                "the HSM key ({}) does not open the stored unseal key (decryption failed): check the token and key \
                 labels, or unseal with the recovery shares",
                cfg.hsm.as_ref().map_or("", |h| h.key.as_str())
            )),
            other => other,
        })?;
        let roots = cfg.open_keyring(&unseal_key).map_err(|e| match e {
            SealError::WrongUnsealKey => {
                SealingError::Device("the key the HSM unwrapped does not open the root keyring".into())
            }
            other => other.into(),
        })?;
        self.finish_unseal(&mut c, unseal_key, roots).await?;
        tracing::info!("unsealed by the HSM");
        Ok(true)
    }

    /// Convert `cfg` (opened by `unseal_key`) to this server's seal kind. The keyring itself
    /// is untouched: no stored key is re-encrypted, only how the unseal key is protected
    /// changes (the shares stay valid: unseal shares for Shamir, recovery shares for PKCS#11).
    async fn migrate(&self, mut cfg: SealConfig, raw: &[u8], unseal_key: &SecretBytes) -> Result<(), SealingError> {
        let from = cfg.kind;
        cfg.hsm = match self.kind {
            SealKind::Pkcs11 => Some(self.hsm_wrap(unseal_key).await?),
            SealKind::Shamir => None,
            SealKind::InsecureFile => return Err(SealingError::WrongState("cannot migrate to the insecure file seal")),
        };
        cfg.kind = self.kind;
        cfg.generation += 1;
        if !self.store.replace_meta(META_SEAL, raw, &cfg.to_bytes()).await.map_err(KmsError::from)? {
            return Err(SealingError::WrongState("the seal changed concurrently; submit the shares again"));
        }
        tracing::warn!(
            from = from.as_str(),
            to = self.kind.as_str(),
            "seal migrated; the root keyring and stored keys were not re-encrypted"
        );
        Ok(())
    }

    /// Submit one unseal share (a recovery share with the PKCS#11 seal). The share is checked
    /// for form at once; the set is checked when the threshold is reached, and a set that does
    /// not open the keyring resets the progress. With `migrate`, a keyring stored under another
    /// seal kind is converted to this server's kind once the shares open it.
    pub async fn submit_unseal_share(&self, text: &str, migrate: bool) -> Result<Progress, SealingError> {
        let share = parse_share(text)?;
        let (cfg, raw) = self.config().await?.ok_or(SealingError::NotInitialized)?;
        if cfg.kind == SealKind::InsecureFile || self.kind == SealKind::InsecureFile {
            return Err(SealingError::WrongState("this server uses the insecure file seal; there are no shares"));
        }
        let mismatch = cfg.kind != self.kind;
        if mismatch && !migrate {
            return Err(SealingError::MigrationRequired(format!(
                "the keyring is sealed with {} but this server runs the {} seal: to convert it, submit the shares \
                 with `keyward operator unseal --migrate` (or restart with the {} seal)",
                cfg.kind.as_str(),
                self.kind.as_str(),
                cfg.kind.as_str()
            )));
        }
        if !mismatch && migrate {
            return Err(SealingError::Invalid(format!(
                "nothing to migrate: the keyring is already sealed with {}; unseal without --migrate",
                cfg.kind.as_str()
            )));
        }
        let mut c = self.ceremony.lock().await;
        if self.unsealed().is_some() {
            return Err(SealingError::WrongState("keyward is already unsealed"));
        }
        if !add_share(&mut c.collected, share) {
            return Err(SealingError::Invalid(
                "this share was already submitted; each of the threshold shares must be a different one".into(),
            ));
        }
        if c.collected.len() < usize::from(cfg.threshold) {
            return Ok(Progress::Need { have: u8::try_from(c.collected.len()).unwrap_or(0), threshold: cfg.threshold });
        }
        let collected = std::mem::take(&mut c.collected);
        let unseal_key = shamir::combine(&collected).map_err(KmsError::from)?;
        let roots = match cfg.open_keyring(&unseal_key) {
            Ok(r) => r,
            Err(SealError::WrongUnsealKey) => {
                tracing::warn!("unseal attempt with a wrong or forged share; progress reset");
                return Err(SealingError::WrongShares);
            }
            Err(e) => return Err(e.into()),
        };
        if mismatch {
            self.migrate(cfg, &raw, &unseal_key).await?;
        }
        self.finish_unseal(&mut c, unseal_key, roots).await?;
        self.sealed_by_operator.store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("unsealed");
        Ok(Progress::Unsealed)
    }

    /// Seal: stop serving, drop the service (its keys are wiped once in-flight requests finish)
    /// and forget the unseal key.
    pub async fn seal(&self) -> Result<(), SealingError> {
        if self.kind == SealKind::InsecureFile {
            return Err(SealingError::WrongState(
                "the insecure file seal cannot seal: its key is on disk. Stop the server instead",
            ));
        }
        let mut c = self.ceremony.lock().await;
        // Under the ceremony lock, so an HSM unseal cannot slip in between.
        self.sealed_by_operator.store(true, std::sync::atomic::Ordering::SeqCst);
        if !self.seal_locked(&mut c) {
            return Err(SealingError::WrongState("keyward is already sealed"));
        }
        tracing::info!("sealed by an operator; nothing unseals it by itself until an operator unseals it");
        Ok(())
    }

    /// Whether an operator sealed the server (and no operator has unsealed it since).
    pub fn operator_sealed(&self) -> bool {
        self.sealed_by_operator.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stop serving and forget the keys; false if already sealed.
    fn seal_locked(&self, c: &mut Ceremony) -> bool {
        let prev = self.current.write().ok().and_then(|mut cur| cur.take());
        c.unseal_key = None;
        c.roots.clear();
        c.collected.clear();
        c.rekey = None;
        prev.is_some()
    }
}
