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
}

/// Provides the 256-bit root key. Implementations: the insecure file seal of `keyward dev`
/// (in `keyward-server`); Shamir and PKCS#11 seals come later behind the same trait.
pub trait Seal: Send + Sync + std::fmt::Debug {
    /// Short name for status output ("insecure-file", ...).
    fn kind(&self) -> &'static str;
    /// Whether this seal leaves the root key at rest in the clear.
    fn is_insecure(&self) -> bool;
    /// Return the root key, creating and sealing a new one if none exists yet.
    /// The boolean is true when a new root key was created.
    fn load_or_create(&self) -> Result<(SecretBytes, bool), SealError>;
}
