//! The seal: how the root key is obtained at start.

use keyward_crypto::SecretBytes;

/// Errors from a seal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The sealed root key could not be read or written.
    #[error("seal storage: {0}")]
    Io(#[from] std::io::Error),
    /// The sealed data is malformed or has unsafe permissions.
    #[error("seal: {0}")]
    Invalid(String),
    /// The unseal key does not open the root keyring (a wrong or forged share, or another
    /// installation's key).
    #[error("the unseal key does not open the root keyring")]
    WrongUnsealKey,
    /// The seal device (an HSM) failed or refused; the message says what to check.
    #[error("seal device: {0}")]
    Device(String),
    /// The seal device could not open the wrapped unseal key (wrong HSM key or tampered data).
    #[error("decryption failed")]
    DecryptionFailed,
}

/// Provides a 256-bit key kept outside the store. The insecure file seal of `keyward dev` (in
/// `keyward-server`) provides the unseal key this way; Shamir shares are submitted by operators
/// instead, and a PKCS#11 seal will come behind this trait.
pub trait Seal: Send + Sync + std::fmt::Debug {
    /// Short name for status output ("insecure-file", ...).
    fn kind(&self) -> &'static str;
    /// Whether this seal leaves the root key at rest in the clear.
    fn is_insecure(&self) -> bool;
    /// Return the root key, creating and sealing a new one if none exists yet.
    /// The boolean is true when a new root key was created.
    fn load_or_create(&self) -> Result<(SecretBytes, bool), SealError>;
}

/// Wraps the unseal key under a key that never leaves a device (an HSM through PKCS#11), so a
/// server can unseal itself at start. Implementations block (device I/O): call them from a
/// blocking context.
pub trait KeyWrapper: Send + Sync + std::fmt::Debug {
    /// Where the wrapping key lives, for status and logs (no secrets), e.g. `token "t" key "k"`.
    fn describe(&self) -> String;
    /// Make sure the wrapping key exists and is fit for the job (non-extractable, sensitive),
    /// creating it if it does not exist. Returns true when it was created.
    fn prepare(&self) -> Result<bool, SealError>;
    /// Wrap `key` (authenticated encryption inside the device).
    fn wrap(&self, key: &SecretBytes) -> Result<Vec<u8>, SealError>;
    /// Unwrap what [`KeyWrapper::wrap`] returned; [`SealError::DecryptionFailed`] if it does not
    /// open.
    fn unwrap(&self, wrapped: &[u8]) -> Result<SecretBytes, SealError>;
}

/// Meta entry holding the [`SealConfig`].
pub const META_SEAL: &str = "seal";
const AAD_KEYRING: &[u8] = b"keyward/root-keyring/v1";
const AAD_MEMBER_KEYRING: &[u8] = b"keyward/member-keyring/v1";
/// Length of a root key.
const ROOT_LEN: usize = 32;

/// The key sealing the member keyring, from one root key.
fn member_key(root: &SecretBytes) -> Result<keyward_crypto::aead::AeadKey, SealError> {
    let k = keyward_crypto::kdf::hkdf_sha256(root.expose(), b"", b"keyward/member-keyring-key/v1", 32)
        .map_err(|e| SealError::Invalid(e.to_string()))?;
    keyward_crypto::aead::AeadKey::new(&k).map_err(|e| SealError::Invalid(e.to_string()))
}
/// Length of the unseal key (the key-encryption key of the root keyring).
pub const UNSEAL_KEY_LEN: usize = 32;

/// How the root keyring is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SealKind {
    /// The unseal key is split into Shamir shares held by operators.
    Shamir,
    /// The unseal key rests in a local file in the clear (`keyward dev`).
    InsecureFile,
    /// The unseal key is wrapped by a non-extractable key in an HSM (PKCS#11): the server
    /// unseals itself; the Shamir shares of the same unseal key are recovery shares.
    Pkcs11,
}

impl SealKind {
    /// Name for status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shamir => "shamir",
            Self::InsecureFile => "insecure-file",
            Self::Pkcs11 => "pkcs11",
        }
    }
}

/// The stored seal: parameters and the root keyring (newest first) wrapped under the unseal key.
/// More than one root key only while a root rotation is unfinished.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealConfig {
    /// Seal kind.
    pub kind: SealKind,
    /// Number of shares (Shamir).
    pub shares: u8,
    /// Shares needed to unseal (Shamir).
    pub threshold: u8,
    /// Root keys, newest first, each AES-256-GCM sealed under the unseal key (hex).
    pub keyring: Vec<String>,
    /// Incremented on every change (rekey, root rotation, seal migration).
    pub generation: u64,
    /// With the PKCS#11 seal: the unseal key wrapped by the HSM key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm: Option<HsmWrapped>,
    /// The same keyring for the other servers on the store (hex): sealed under a key derived
    /// from its oldest root, which every server that followed the previous keyring holds. A
    /// server whose unseal key is out of date (the seal was rekeyed elsewhere) follows root
    /// rotations through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_keyring: Option<String>,
}

/// The unseal key as wrapped by an HSM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmWrapped {
    /// Which HSM key wrapped it ([`KeyWrapper::describe`]), for messages.
    pub key: String,
    /// The wrapped unseal key (hex).
    pub wrapped: String,
}

impl HsmWrapped {
    /// Wrap `unseal_key` with `wrapper`.
    pub fn wrap(wrapper: &dyn KeyWrapper, unseal_key: &SecretBytes) -> Result<Self, SealError> {
        Ok(Self { key: wrapper.describe(), wrapped: hex::encode(wrapper.wrap(unseal_key)?) })
    }

    /// Unwrap the unseal key with `wrapper`.
    pub fn unwrap(&self, wrapper: &dyn KeyWrapper) -> Result<SecretBytes, SealError> {
        let raw =
            hex::decode(&self.wrapped).map_err(|_| SealError::Invalid("stored HSM-wrapped key is not hex".into()))?;
        wrapper.unwrap(&raw)
    }
}

impl SealConfig {
    /// A config whose keyring holds `roots` wrapped under `unseal_key`.
    pub fn new(
        kind: SealKind,
        shares: u8,
        threshold: u8,
        unseal_key: &SecretBytes,
        roots: &[&SecretBytes],
    ) -> Result<Self, SealError> {
        let mut c =
            Self { kind, shares, threshold, keyring: Vec::new(), generation: 0, hsm: None, member_keyring: None };
        c.set_keyring(unseal_key, roots)?;
        Ok(c)
    }

    /// Replace the keyring (and bump the generation).
    pub fn set_keyring(&mut self, unseal_key: &SecretBytes, roots: &[&SecretBytes]) -> Result<(), SealError> {
        let kek = keyward_crypto::aead::AeadKey::new(unseal_key).map_err(|e| SealError::Invalid(e.to_string()))?;
        self.keyring = roots
            .iter()
            .map(|r| kek.seal(AAD_KEYRING, r.expose()).map(hex::encode))
            .collect::<Result<_, _>>()
            .map_err(|e| SealError::Invalid(e.to_string()))?;
        let oldest = roots.last().ok_or_else(|| SealError::Invalid("an empty root keyring".into()))?;
        let mut all = zeroize::Zeroizing::new(Vec::with_capacity(roots.len() * ROOT_LEN));
        for r in roots {
            if r.expose().len() != ROOT_LEN {
                return Err(SealError::Invalid("a root key is not 32 bytes".into()));
            }
            all.extend_from_slice(r.expose());
        }
        self.member_keyring = Some(hex::encode(
            member_key(oldest)?.seal(AAD_MEMBER_KEYRING, &all).map_err(|e| SealError::Invalid(e.to_string()))?,
        ));
        self.generation += 1;
        Ok(())
    }

    /// Open the keyring as another server on the store does, with the root keys it already
    /// holds: one of them must be the keyring's oldest. [`SealError::WrongUnsealKey`] when none
    /// is (this server missed a step of a rotation) or there is no member keyring.
    pub fn open_member_keyring(&self, held: &[SecretBytes]) -> Result<Vec<SecretBytes>, SealError> {
        let sealed = self
            .member_keyring
            .as_deref()
            .map(hex::decode)
            .transpose()
            .map_err(|_| SealError::Invalid("stored member keyring is not hex".into()))?
            .ok_or(SealError::WrongUnsealKey)?;
        for root in held {
            if let Ok(all) = member_key(root)?.open(AAD_MEMBER_KEYRING, &sealed) {
                let all = all.expose();
                if all.is_empty() || all.len() % ROOT_LEN != 0 {
                    return Err(SealError::Invalid("stored member keyring has a bad length".into()));
                }
                return Ok(all.chunks(ROOT_LEN).map(SecretBytes::copy_from).collect());
            }
        }
        Err(SealError::WrongUnsealKey)
    }

    /// Open the keyring with `unseal_key`; [`SealError::WrongUnsealKey`] if it does not fit.
    pub fn open_keyring(&self, unseal_key: &SecretBytes) -> Result<Vec<SecretBytes>, SealError> {
        let kek = keyward_crypto::aead::AeadKey::new(unseal_key).map_err(|_| SealError::WrongUnsealKey)?;
        if self.keyring.is_empty() {
            return Err(SealError::Invalid("the stored root keyring is empty".into()));
        }
        self.keyring
            .iter()
            .map(|h| {
                let sealed = hex::decode(h).map_err(|_| SealError::Invalid("stored root keyring is not hex".into()))?;
                kek.open(AAD_KEYRING, &sealed).map_err(|_| SealError::WrongUnsealKey)
            })
            .collect()
    }

    /// Serialized form for the store.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse the stored form.
    pub fn from_bytes(b: &[u8]) -> Result<Self, SealError> {
        serde_json::from_slice(b).map_err(|e| SealError::Invalid(format!("stored seal configuration: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyring_opens_only_with_its_unseal_key() {
        let kek = SecretBytes::random(32).unwrap();
        let (r1, r2) = (SecretBytes::random(32).unwrap(), SecretBytes::random(32).unwrap());
        let mut c = SealConfig::new(SealKind::Shamir, 5, 3, &kek, &[&r1]).unwrap();
        let parsed = SealConfig::from_bytes(&c.to_bytes()).unwrap();
        assert_eq!(parsed, c);
        let ring = parsed.open_keyring(&kek).unwrap();
        assert!(ring[0].ct_eq(r1.expose()));
        assert!(matches!(c.open_keyring(&SecretBytes::random(32).unwrap()), Err(SealError::WrongUnsealKey)));
        let g = c.generation;
        c.set_keyring(&kek, &[&r2, &r1]).unwrap();
        assert_eq!(c.generation, g + 1);
        let ring = c.open_keyring(&kek).unwrap();
        assert!(ring[0].ct_eq(r2.expose()) && ring[1].ct_eq(r1.expose()));
        assert!(SealConfig::from_bytes(b"{\"kind\":\"shamir\"}").is_err());
        // Another server that holds the oldest root opens the keyring without the unseal key.
        let ring =
            c.open_member_keyring(&[SecretBytes::random(32).unwrap(), SecretBytes::copy_from(r1.expose())]).unwrap();
        assert!(ring.len() == 2 && ring[0].ct_eq(r2.expose()) && ring[1].ct_eq(r1.expose()));
        assert!(
            matches!(c.open_member_keyring(std::slice::from_ref(&r2)), Err(SealError::WrongUnsealKey)),
            "newest only"
        );
        c.set_keyring(&kek, &[&r2]).unwrap();
        assert!(c.open_member_keyring(std::slice::from_ref(&r2)).unwrap()[0].ct_eq(r2.expose()), "after the rotation");
        assert!(
            matches!(c.open_member_keyring(std::slice::from_ref(&r1)), Err(SealError::WrongUnsealKey)),
            "retired root"
        );
        c.member_keyring = None;
        assert!(matches!(c.open_member_keyring(std::slice::from_ref(&r2)), Err(SealError::WrongUnsealKey)));
        assert!(!format!("{c:?}").contains(&hex::encode(r1.expose())), "debug shows only wrapped keys");
    }
}
