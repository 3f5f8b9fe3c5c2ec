//! The service error type.

use crate::store::StoreError;

/// Why a request did not authenticate. The messages say what to do; none reveals more than
/// the token's own holder knows (a revoked token and one never issued look alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token (and no client certificate) was presented.
    Missing,
    /// The value is not shaped like a Keyward token.
    Malformed,
    /// A well-formed token this server does not hold: revoked, or never issued.
    Invalid,
    /// The token's lifetime is over.
    Expired,
    /// The token's use limit is spent.
    UsedUp,
}

impl AuthFailure {
    /// A short reason for the audit log.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "no token or client certificate presented",
            Self::Malformed => "malformed token",
            Self::Invalid => "unknown or revoked token",
            Self::Expired => "expired token",
            Self::UsedUp => "token use limit reached",
        }
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Missing => {
                "no token given: send `Authorization: Bearer <token>` (the CLI and SDKs read KEYWARD_TOKEN)"
            }
            Self::Malformed => "the token is malformed: a Keyward token is `kwt_` followed by 64 hex digits",
            Self::Invalid => {
                "the token is not valid: it was revoked (itself, or with the token that created it) or was never \
                 issued by this server"
            }
            Self::Expired => "the token has expired: log in again, or ask for a new token",
            Self::UsedUp => "the token has reached its use limit: ask for a new token",
        })
    }
}

/// Errors of the KMS service. Transports map each variant to a status code with
/// [`KmsError::code`]; messages never contain secret material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// The caller presented no credential, or one that does not authenticate; says which.
    #[error("{0}")]
    Unauthenticated(AuthFailure),
    /// The caller is authenticated but not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A named object does not exist.
    #[error("{what} {name:?} not found")]
    NotFound {
        /// Kind of object ("key", "secret", ...).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An object with that name already exists.
    #[error("{what} {name:?} already exists")]
    AlreadyExists {
        /// Kind of object.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A request field is invalid; the message says which and why.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The key is disabled.
    #[error("key {0:?} is disabled: enable it to use it again")]
    KeyDisabled(String),
    /// The key is scheduled for deletion.
    #[error("key {0:?} is pending deletion: cancel the deletion to keep it (it stays disabled), then enable it")]
    KeyPendingDeletion(String),
    /// The operation does not apply to this key type.
    #[error("key {name:?} is of type {algorithm}, which does not support {operation}")]
    WrongKeyType {
        /// Key name.
        name: String,
        /// Key type.
        algorithm: &'static str,
        /// Refused operation.
        operation: &'static str,
    },
    /// Decryption failed: tampered, truncated, unknown key or wrong context. Deliberately vague.
    #[error("decryption failed")]
    DecryptionFailed,
    /// A concurrent change or a check-and-set mismatch.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Storage is unavailable; the request may be retried.
    #[error("storage unavailable")]
    Unavailable(#[source] StoreError),
    /// An internal error (a bug, an impossible state). Details are logged, not returned.
    #[error("internal error")]
    Internal(String),
    /// The store failed in a way a retry does not fix (a corrupt record, a backend error).
    /// Details (the source) are logged, not returned.
    #[error("internal error")]
    Store(#[source] StoreError),
    /// A cryptographic primitive failed (not a failed decryption: that is
    /// [`KmsError::DecryptionFailed`]). Details (the source) are logged, not returned.
    #[error("internal error")]
    Crypto(#[source] keyward_crypto::CryptoError),
}

impl KmsError {
    /// What the server log gets for an internal error: the error and each of its sources.
    pub fn internal_detail(&self) -> Option<String> {
        match self {
            Self::Internal(d) => Some(d.clone()),
            Self::Store(e) => Some(format!("storage: {e}")),
            Self::Crypto(e) => Some(format!("crypto: {e}")),
            Self::Unavailable(e) => Some(e.to_string()),
            _ => None,
        }
    }

    /// A stable machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::NotFound { .. } => "not_found",
            Self::AlreadyExists { .. } => "already_exists",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::KeyDisabled(_) => "key_disabled",
            Self::KeyPendingDeletion(_) => "key_pending_deletion",
            Self::WrongKeyType { .. } => "wrong_key_type",
            Self::DecryptionFailed => "decryption_failed",
            Self::Conflict(_) => "conflict",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) | Self::Store(_) | Self::Crypto(_) => "internal",
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
}

impl From<StoreError> for KmsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Self::Unavailable(e),
            other => Self::Store(other),
        }
    }
}

impl From<keyward_crypto::CryptoError> for KmsError {
    fn from(e: keyward_crypto::CryptoError) -> Self {
        match e {
            keyward_crypto::CryptoError::DecryptionFailed => Self::DecryptionFailed,
            other => Self::Crypto(other),
        }
    }
}
