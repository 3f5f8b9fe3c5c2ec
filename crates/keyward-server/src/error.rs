//! The one place where errors become HTTP responses.
//!
//! Handlers return [`ApiError`]. Its response carries the status and a safe message in a
//! response extension; the `finish` middleware in [`crate::api`] turns it into the JSON body
//! `{"error": {"code", "message", "request_id"}}` and logs the failure once, with the request id.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyward_core::KmsError;

/// An API error: status, stable code and a message safe to show the caller.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Message for the caller: says what to fix, never contains secret material.
    pub message: String,
    /// Detail for the server log only.
    pub internal: Option<String>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), internal: None }
    }

    /// 400 invalid_argument.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 500 internal; `detail` goes to the server log only.
    pub fn internal(detail: String) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error".into(),
            internal: Some(detail),
        }
    }
}

/// Map a service error to status, code and safe message (the only such mapping).
impl From<KmsError> for ApiError {
    fn from(e: KmsError) -> Self {
        let status = match &e {
            KmsError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            KmsError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            KmsError::NotFound { .. } => StatusCode::NOT_FOUND,
            KmsError::AlreadyExists { .. } | KmsError::Conflict(_) => StatusCode::CONFLICT,
            // The key exists and the request is well formed, but the key's state or type does
            // not allow the operation.
            KmsError::KeyDisabled(_) | KmsError::KeyPendingDeletion(_) | KmsError::WrongKeyType { .. } => {
                StatusCode::CONFLICT
            }
            KmsError::InvalidArgument(_) | KmsError::DecryptionFailed => StatusCode::BAD_REQUEST,
            KmsError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let internal = e.internal_detail();
        let message = match &e {
            KmsError::Unavailable(_) => "storage is unavailable; retry shortly".to_string(),
            KmsError::Internal(_) | KmsError::Store(_) | KmsError::Crypto(_) => {
                "internal error; the server log has details under this request id".to_string()
            }
            other => other.to_string(),
        };
        Self { status, code: e.code(), message, internal }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = self.status.into_response();
        r.extensions_mut().insert(self);
        r
    }
}

/// Map a seal ceremony error.
impl From<keyward_seal::SealingError> for ApiError {
    fn from(e: keyward_seal::SealingError) -> Self {
        use keyward_seal::SealingError as E;
        match e {
            E::Kms(k) => k.into(),
            E::Invalid(m) => Self::invalid(m),
            E::WrongShares => Self::new(StatusCode::BAD_REQUEST, "wrong_shares", e.to_string()),
            E::NotInitialized => Self::new(StatusCode::CONFLICT, "not_initialized", e.to_string()),
            E::AlreadyInitialized => Self::new(StatusCode::CONFLICT, "already_initialized", e.to_string()),
            E::WrongState(_) => Self::new(StatusCode::CONFLICT, "wrong_state", e.to_string()),
            E::MigrationRequired(m) => Self::new(StatusCode::CONFLICT, "seal_migration_required", m),
            E::Device(m) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "seal_device_unavailable", m),
            E::Audit(a) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "audit_unavailable",
                message: "the audit log cannot be opened; the operator must fix the audit file".into(),
                internal: Some(a.to_string()),
            },
            other => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "internal",
                message: "internal error; the server log has details under this request id".into(),
                internal: Some(other.to_string()),
            },
        }
    }
}

/// Map a Kubernetes auth error: verification failures are 401 with the reason (never the
/// token), role mismatches 403, an unreachable JWKS 503.
impl From<crate::k8s_auth::K8sAuthError> for ApiError {
    fn from(e: crate::k8s_auth::K8sAuthError) -> Self {
        use crate::k8s_auth::K8sAuthError as E;
        use keyward_authn::kubernetes::AuthnError as A;
        match e {
            E::Kms(k) => k.into(),
            E::NotConfigured => Self::new(StatusCode::CONFLICT, "not_configured", e.to_string()),
            E::NoRole(_) => Self::new(StatusCode::NOT_FOUND, "no_such_role", e.to_string()),
            E::Authn(a @ A::Config(_)) => Self::invalid(a.to_string()),
            E::Authn(a @ A::RoleMismatch(_)) => Self::new(StatusCode::FORBIDDEN, "permission_denied", a.to_string()),
            E::Authn(A::JwksUnavailable(detail)) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "jwks_unavailable",
                message: "the issuer's signing keys could not be fetched; retry shortly".into(),
                internal: Some(detail),
            },
            E::Authn(A::ReviewUnavailable(detail)) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "unavailable",
                message: "the Kubernetes API server could not confirm the token (TokenReview); retry shortly".into(),
                internal: Some(detail),
            },
            E::Authn(a) => Self::new(StatusCode::UNAUTHORIZED, "invalid_identity", a.to_string()),
        }
    }
}
