//! Keyward's PKCS#11 seal: the unseal key is wrapped (AES-256-GCM, inside the device) by a
//! non-extractable, sensitive AES key that lives in an HSM token, so a server can unseal
//! itself at start without operators and without the key ever resting in the clear.
//!
//! The device is reached through its PKCS#11 library with `cryptoki`. One session is kept
//! open and logged in; it is reopened after a device error (a restarted HSM daemon, a token
//! removed and put back). Every call blocks on the device: call from a blocking context.
//!
//! Wrapped form: `0x01 || IV (12) || ciphertext || tag (16)`, with the additional data
//! [`AAD`] binding it to its use.
#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use keyward_core::seal::{KeyWrapper, SealError};
use keyward_crypto::SecretBytes;

/// Additional authenticated data of every wrap: a blob wrapped for another purpose with the
/// same HSM key does not open here.
pub const AAD: &[u8] = b"keyward/unseal-key/v1";
const VERSION: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Largest key this seal wraps (the unseal key is 32 bytes).
pub const MAX_KEY_LEN: usize = 64;
/// Longest PIN accepted.
pub const MAX_PIN_LEN: usize = 256;

/// Errors of the PKCS#11 seal, each saying what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The PKCS#11 library could not be loaded or initialised.
    #[error("PKCS#11 library {path}: {source}")]
    Library {
        /// The library path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: CkError,
    },
    /// No slot holds a token with the configured label.
    #[error("no PKCS#11 token labelled {0:?} (check the token label and the library's configuration)")]
    NoToken(String),
    /// The PIN was refused.
    #[error("PKCS#11 login to token {token:?} failed: {reason}")]
    Login {
        /// The token label.
        token: String,
        /// Why (PIN incorrect, PIN locked, ...).
        reason: String,
    },
    /// The wrapping key is missing.
    #[error(
        "PKCS#11 token {token:?} holds no AES key labelled {key:?}; it is created by `keyward operator init` or a seal migration"
    )]
    NoKey {
        /// The token label.
        token: String,
        /// The key label.
        key: String,
    },
    /// Several keys carry the label.
    #[error("PKCS#11 token {token:?} holds {count} AES keys labelled {key:?}; labels must be unique")]
    Ambiguous {
        /// The token label.
        token: String,
        /// The key label.
        key: String,
        /// How many.
        count: usize,
    },
    /// The key could leave the device, or is not a usable AES-256 key.
    #[error("PKCS#11 key {key:?} is not fit to seal with: {why}")]
    UnfitKey {
        /// The key label.
        key: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The device failed an operation.
    #[error("PKCS#11 {op}: {source}")]
    Device {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: CkError,
    },
    /// The wrapped key did not open (wrong key, tampered or truncated data).
    #[error("decryption failed")]
    DecryptionFailed,
}

impl From<HsmError> for SealError {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::DecryptionFailed => SealError::DecryptionFailed,
            other => SealError::Device(other.to_string()),
        }
    }
}

/// Where the wrapping key is.
pub struct Pkcs11Config {
    /// The vendor's PKCS#11 library (`/usr/lib/softhsm/libsofthsm2.so` for SoftHSM2).
    pub library: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The AES key's label (default `keyward-seal`).
    pub key_label: String,
    /// The user PIN.
    pub pin: SecretBytes,
}

impl Clone for Pkcs11Config {
    fn clone(&self) -> Self {
        Self {
            library: self.library.clone(),
            token_label: self.token_label.clone(),
            key_label: self.key_label.clone(),
            pin: SecretBytes::copy_from(self.pin.expose()),
        }
    }
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("library", &self.library)
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .field("pin", &"<redacted>")
            .finish()
    }
}

/// Default label of the wrapping key.
pub const DEFAULT_KEY_LABEL: &str = "keyward-seal";

/// An open PKCS#11 token holding (or about to hold) the wrapping key.
pub struct Pkcs11Seal {
    ctx: Pkcs11,
    slot: Slot,
    token: String,
    key: String,
    pin: AuthPin,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for Pkcs11Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Seal").field("token", &self.token).field("key", &self.key).finish_non_exhaustive()
    }
}

fn device(op: &'static str) -> impl Fn(CkError) -> HsmError {
    move |source| HsmError::Device { op, source }
}

/// True for errors after which a fresh session may succeed.
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::DeviceError,
            _
        )
    )
}

impl Pkcs11Seal {
    /// Load the library, find the token and log in (checking the PIN at once).
    pub fn open(cfg: &Pkcs11Config) -> Result<Self, HsmError> {
        if cfg.token_label.is_empty() || cfg.key_label.is_empty() {
            return Err(HsmError::Config("the PKCS#11 seal needs a token label and a key label".into()));
        }
        if cfg.pin.is_empty() || cfg.pin.len() > MAX_PIN_LEN {
            return Err(HsmError::Config(format!("the PKCS#11 PIN must be 1 to {MAX_PIN_LEN} bytes")));
        }
        let pin = std::str::from_utf8(cfg.pin.expose())
            .map_err(|_| HsmError::Config("the PKCS#11 PIN must be UTF-8 text".into()))?;
        let lib = |source| HsmError::Library { path: cfg.library.clone(), source };
        let ctx = Pkcs11::new(&cfg.library).map_err(lib)?;
        match ctx.initialize(CInitializeArgs::OsThreads) {
            Ok(()) | Err(CkError::AlreadyInitialized) => {}
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(lib(e)),
        }
        let mut found = None;
        for slot in ctx.get_slots_with_token().map_err(device("listing slots"))? {
            let info = ctx.get_token_info(slot).map_err(device("reading token information"))?;
            if info.label().trim_end() == cfg.token_label {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| HsmError::NoToken(cfg.token_label.clone()))?;
        let seal = Self {
            ctx,
            slot,
            token: cfg.token_label.clone(),
            key: cfg.key_label.clone(),
            pin: AuthPin::new(pin.to_string()),
            session: Mutex::new(None),
        };
        seal.with_session(|_| Ok(()))?;
        Ok(seal)
    }

    fn login(&self) -> Result<Session, HsmError> {
        let s = self.ctx.open_rw_session(self.slot).map_err(device("opening a session"))?;
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(s),
            Err(CkError::Pkcs11(rv, _))
                if matches!(
                    rv,
                    RvError::PinIncorrect
                        | RvError::PinLocked
                        | RvError::PinExpired
                        | RvError::PinInvalid
                        | RvError::PinLenRange
                ) =>
            {
                Err(HsmError::Login { token: self.token.clone(), reason: rv.to_string() })
            }
            Err(e) => Err(HsmError::Device { op: "logging in", source: e }),
        }
    }

    /// Run `f` on the logged-in session, opening a new one once if the device lost it.
    fn with_session<T>(&self, f: impl Fn(&Session) -> Result<T, HsmError>) -> Result<T, HsmError> {
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.login()?);
            }
            let Some(s) = guard.as_ref() else { continue };
            match f(s) {
                Err(HsmError::Device { source, .. }) if attempt == 0 && session_lost(&source) => {
                    tracing::warn!(error = %source, "PKCS#11 session lost; opening a new one");
                    *guard = None;
                }
                other => return other,
            }
        }
        Err(HsmError::Config("the PKCS#11 session could not be reopened".into()))
    }

    fn template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(self.key.as_bytes().to_vec()),
            Attribute::Token(true),
        ]
    }

    fn find_key(&self, s: &Session) -> Result<Option<ObjectHandle>, HsmError> {
        let found = s.find_objects(&self.template()).map_err(device("finding the key"))?;
        match found.len() {
            0 => Ok(None),
            1 => {
                let k = found[0];
                self.check_key(s, k)?;
                Ok(Some(k))
            }
            count => Err(HsmError::Ambiguous { token: self.token.clone(), key: self.key.clone(), count }),
        }
    }

    /// Refuse a key that could leave the device or cannot do the job.
    fn check_key(&self, s: &Session, k: ObjectHandle) -> Result<(), HsmError> {
        let attrs = s
            .get_attributes(
                k,
                &[
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::ValueLen,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
            )
            .map_err(device("reading the key's attributes"))?;
        let unfit = |why| Err(HsmError::UnfitKey { key: self.key.clone(), why });
        let (mut extractable, mut sensitive, mut len, mut enc, mut dec) = (true, false, 0u64, false, false);
        for a in attrs {
            match a {
                Attribute::Extractable(b) => extractable = b,
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::ValueLen(n) => len = n.into(),
                Attribute::Encrypt(b) => enc = b,
                Attribute::Decrypt(b) => dec = b,
                _ => {}
            }
        }
        if extractable {
            return unfit("it is extractable (CKA_EXTRACTABLE must be false)");
        }
        if !sensitive {
            return unfit("it is not sensitive (CKA_SENSITIVE must be true)");
        }
        if len != 32 {
            return unfit("it is not a 256-bit AES key");
        }
        if !(enc && dec) {
            return unfit("it may not encrypt and decrypt (CKA_ENCRYPT and CKA_DECRYPT must be true)");
        }
        Ok(())
    }

    fn key_handle(&self, s: &Session) -> Result<ObjectHandle, HsmError> {
        self.find_key(s)?.ok_or_else(|| HsmError::NoKey { token: self.token.clone(), key: self.key.clone() })
    }

    /// Make sure the wrapping key exists, generating it inside the device (AES-256, token
    /// object, private, sensitive, never extractable) if it does not. True when created.
    pub fn ensure_key(&self) -> Result<bool, HsmError> {
        self.with_session(|s| {
            if self.find_key(s)?.is_some() {
                return Ok(false);
            }
            let mut t = self.template();
            t.extend([
                Attribute::ValueLen(32.into()),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
            ]);
            s.generate_key(&Mechanism::AesKeyGen, &t).map_err(device("generating the key"))?;
            tracing::info!(token = %self.token, key = %self.key, "generated the HSM seal key (non-extractable AES-256)");
            Ok(true)
        })
    }

    /// Wrap `key` under the HSM key.
    pub fn wrap_key(&self, key: &[u8]) -> Result<Vec<u8>, HsmError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(HsmError::Config(format!("a key to wrap must be 1 to {MAX_KEY_LEN} bytes")));
        }
        let mut iv = [0u8; IV_LEN];
        keyward_crypto::fill_random(&mut iv).map_err(|e| HsmError::Config(format!("random IV: {e}")))?;
        let ct = self.with_session(|s| {
            let k = self.key_handle(s)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, AAD, 128.into()).map_err(device("GCM parameters"))?;
            s.encrypt(&Mechanism::AesGcm(params), k, key).map_err(device("wrapping"))
        })?;
        if ct.len() != key.len() + TAG_LEN {
            return Err(HsmError::Config("the device returned a wrapped key of an unexpected length".into()));
        }
        let mut out = Vec::with_capacity(1 + IV_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Unwrap what [`Pkcs11Seal::wrap_key`] returned.
    pub fn unwrap_key(&self, wrapped: &[u8]) -> Result<SecretBytes, HsmError> {
        if wrapped.len() < 1 + IV_LEN + TAG_LEN + 1 || wrapped.len() > 1 + IV_LEN + MAX_KEY_LEN + TAG_LEN {
            return Err(HsmError::DecryptionFailed);
        }
        if wrapped[0] != VERSION {
            return Err(HsmError::DecryptionFailed);
        }
        let (iv_in, ct) = wrapped[1..].split_at(IV_LEN);
        self.with_session(|s| {
            let k = self.key_handle(s)?;
            let mut iv = [0u8; IV_LEN];
            iv.copy_from_slice(iv_in);
            let params = GcmParams::new(&mut iv, AAD, 128.into()).map_err(device("GCM parameters"))?;
            match s.decrypt(&Mechanism::AesGcm(params), k, ct) {
                Ok(pt) => Ok(SecretBytes::from_vec(pt)),
                Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange | RvError::GeneralError,
                    _,
                )) => Err(HsmError::DecryptionFailed),
                Err(e) => Err(HsmError::Device { op: "unwrapping", source: e }),
            }
        })
    }
}

impl KeyWrapper for Pkcs11Seal {
    fn describe(&self) -> String {
        format!("pkcs11 token {:?} key {:?}", self.token, self.key)
    }

    fn prepare(&self) -> Result<bool, SealError> {
        Ok(self.ensure_key()?)
    }

    fn wrap(&self, key: &SecretBytes) -> Result<Vec<u8>, SealError> {
        Ok(self.wrap_key(key.expose())?)
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<SecretBytes, SealError> {
        Ok(self.unwrap_key(wrapped)?)
    }
}
