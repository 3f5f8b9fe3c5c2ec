//! # keyward-crypto
//!
//! The one cryptographic stack of Keyward (AWS-LC through `aws-lc-rs`), wrapped in types that are
//! hard to misuse:
//!
//! - [`SecretBytes`]: key material and plaintext. Wiped on drop, prints nothing, compares in
//!   constant time, has no `Clone`, `Display` or `Serialize`.
//! - [`aead::AeadKey`]: AES-256-GCM with random 96-bit nonces; any failure to open is the single
//!   [`CryptoError::DecryptionFailed`].
//! - [`format`]: the self-describing, versioned Keyward ciphertext and signature/MAC envelopes.
//! - [`keys`]: generation and use of key material for every key type Keyward supports.
//!
//! ```
//! use keyward_crypto::{aead::AeadKey, SecretBytes};
//! let key = AeadKey::new(&SecretBytes::random(32).unwrap()).unwrap();
//! let sealed = key.seal(b"aad", b"hello").unwrap();
//! assert_eq!(key.open(b"aad", &sealed).unwrap().expose(), b"hello");
//! assert!(key.open(b"other aad", &sealed).is_err());
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aead;
pub mod format;
pub mod hash;
pub mod hpke;
pub mod kdf;
pub mod keys;
mod secret;
pub mod shamir;

pub use secret::SecretBytes;

/// Errors from cryptographic operations.
///
/// Failures to authenticate or decrypt data deliberately carry no detail: every such failure is
/// [`CryptoError::DecryptionFailed`], so that callers cannot be used as a decryption oracle.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// Authentication or decryption failed (tampered, truncated, wrong key or wrong context).
    #[error("decryption failed")]
    DecryptionFailed,
    /// A signature or MAC did not verify.
    #[error("verification failed")]
    VerificationFailed,
    /// Stored key material could not be loaded (corrupt, or of another key type).
    #[error("invalid key material")]
    InvalidKeyMaterial,
    /// The encoded ciphertext, signature or MAC envelope is not well formed.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The system random number generator failed.
    #[error("random number generator failure")]
    Rng,
    /// An input was outside the limits of the primitive (e.g. too long).
    #[error("input out of range: {0}")]
    OutOfRange(&'static str),
}

/// Fill `buf` with cryptographically secure random bytes.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| CryptoError::Rng)
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}
