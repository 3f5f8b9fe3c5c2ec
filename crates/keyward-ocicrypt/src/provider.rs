//! Key providers: the `org.opencontainers.image.enc.keys.provider.<name>` annotations.
//!
//! A provider wraps a layer's private options into opaque bytes at encryption time and turns
//! those bytes back into the private options at decryption time, by whatever means it has (for
//! Keyward: a key in the Keyward server, unwrapped through the node agent). The image code calls
//! it from worker threads, so implementations block.

use keyward_crypto::SecretBytes;

/// Annotation prefix of key-provider recipients.
pub const ANNOTATION_PROVIDER_PREFIX: &str = "org.opencontainers.image.enc.keys.provider.";

/// A key provider.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// The provider's name (`keys.provider.<name>`).
    fn name(&self) -> &str;
    /// Wrap the private-options JSON of a layer. The bytes are stored base64-encoded in the
    /// annotation, as ocicrypt stores what a key provider returns.
    fn wrap(&self, private_options: &[u8]) -> Result<Vec<u8>, String>;
    /// Unwrap bytes this provider returned at wrap time into the private-options JSON.
    fn unwrap(&self, wrapped: &[u8]) -> Result<SecretBytes, String>;
}
