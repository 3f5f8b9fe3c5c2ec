//! Size limits on every input. Documented in the OpenAPI document and `docs/formats.md`.

/// Maximum plaintext for encrypt (64 KiB).
pub const MAX_PLAINTEXT: usize = 64 * 1024;
/// Maximum ciphertext accepted by decrypt/re-encrypt (plaintext limit plus envelope overhead).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 128;
/// Maximum message for sign/verify and MAC.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Maximum entries in an encryption context.
pub const MAX_CONTEXT_ENTRIES: usize = 32;
/// Maximum length of one context key.
pub const MAX_CONTEXT_KEY: usize = 128;
/// Maximum length of one context value.
pub const MAX_CONTEXT_VALUE: usize = 1024;
/// Maximum length of a key name.
pub const MAX_KEY_NAME: usize = 128;
/// Maximum length of a key description.
pub const MAX_DESCRIPTION: usize = 1024;
/// Maximum length of a secret path.
pub const MAX_SECRET_PATH: usize = 512;
/// Maximum number of fields in one secret version.
pub const MAX_SECRET_FIELDS: usize = 128;
/// Maximum length of a secret field name.
pub const MAX_SECRET_FIELD_NAME: usize = 256;
/// Maximum total size (names plus values) of one secret version.
pub const MAX_SECRET_SIZE: usize = 128 * 1024;
/// Maximum bytes for a random request.
pub const MAX_RANDOM_BYTES: usize = 1024;
/// Maximum page size for list operations.
pub const MAX_PAGE: u32 = 1000;
/// Default page size for list operations.
pub const DEFAULT_PAGE: u32 = 100;
/// Minimum automatic rotation period (seconds).
pub const MIN_ROTATION_PERIOD: u64 = 60;
/// Maximum automatic rotation period (seconds, ~10 years).
pub const MAX_ROTATION_PERIOD: u64 = 3650 * 86400;
/// Deletion pending window bounds (days).
pub const MIN_PENDING_DAYS: u32 = 1;
/// Maximum deletion pending window (days).
pub const MAX_PENDING_DAYS: u32 = 30;
/// Default deletion pending window (days).
pub const DEFAULT_PENDING_DAYS: u32 = 7;
