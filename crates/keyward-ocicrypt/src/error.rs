//! Errors.

/// Everything that can go wrong reading, encrypting or decrypting an image.
///
/// Cryptographic failures (a wrong key, a modified ciphertext, a bad MAC) are all reported as
/// [`OcicryptError::DecryptionFailed`], with the layer they concern and nothing more.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OcicryptError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image reference is not `oci:DIR[:TAG]`.
    #[error("bad image reference {0:?}: expected oci:DIR[:TAG]")]
    BadReference(String),
    /// The OCI layout, an index, a manifest or a descriptor is malformed.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// An encryption annotation (`org.opencontainers.image.enc.*`) is malformed.
    #[error("layer {layer}: malformed annotation {annotation}: {reason}")]
    BadAnnotation {
        /// Digest of the layer.
        layer: String,
        /// The annotation key.
        annotation: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A JWE is malformed or uses an algorithm this implementation does not accept.
    #[error("invalid JWE: {0}")]
    InvalidJwe(String),
    /// A key file is not a usable key.
    #[error("{path}: {reason}")]
    BadKey {
        /// The key file (or a description of the key's origin).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No recipient of the layer could be unwrapped with the keys given.
    #[error("layer {layer}: none of the {keys} private key(s) given matches any of its {recipients} recipient(s)")]
    NoMatchingKey {
        /// Digest of the layer.
        layer: String,
        /// Number of private keys tried.
        keys: usize,
        /// Number of JWE recipients found.
        recipients: usize,
    },
    /// A key provider could not wrap or unwrap a layer's key.
    #[error("layer {layer}: key provider {provider}: {reason}")]
    Provider {
        /// Digest of the layer.
        layer: String,
        /// The provider's name.
        provider: String,
        /// What the provider said.
        reason: String,
    },
    /// Decryption of a layer failed: wrong key, modified or truncated ciphertext, bad MAC.
    #[error("layer {layer}: decryption failed")]
    DecryptionFailed {
        /// Digest of the layer.
        layer: String,
    },
    /// The request cannot be carried out as asked (bad layer index, nothing to do, ...).
    #[error("{0}")]
    Usage(String),
    /// A cryptographic primitive failed where it should not (e.g. the random generator).
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}

impl OcicryptError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io { path: path.as_ref().display().to_string(), source }
    }

    pub(crate) fn image(msg: impl Into<String>) -> Self {
        Self::InvalidImage(msg.into())
    }

    pub(crate) fn jwe(msg: impl Into<String>) -> Self {
        Self::InvalidJwe(msg.into())
    }
}

/// Result alias.
pub type Result<T, E = OcicryptError> = std::result::Result<T, E>;
