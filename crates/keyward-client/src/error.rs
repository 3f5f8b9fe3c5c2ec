//! Errors: what failed ([`Error`]), what kind of failure it is ([`ErrorKind`], from the server's
//! stable codes), and transport failures named in words a person can act on.

use super::*;

/// Client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an error.
    #[error("{message} (HTTP {status}, code {code}, request {request_id})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: String,
        /// Message from the server.
        message: String,
        /// Request id, to find the request in server logs.
        request_id: String,
    },
    /// The server (or the node agent) could not be reached or the connection failed.
    #[error("cannot reach {peer} at {addr}: {cause}")]
    Transport {
        /// What was being reached: "the Keyward server" or "the node agent".
        peer: &'static str,
        /// Address used.
        addr: String,
        /// What went wrong, and what to do about it.
        cause: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The response was not what the API documents.
    #[error("unexpected response from server: {0}")]
    Decode(String),
    /// An argument was refused before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The client is misconfigured.
    #[error("client configuration: {0}")]
    Config(String),
    /// A download could not be written where it was asked to go.
    #[error("writing the download: {0}")]
    Write(#[source] std::io::Error),
}

pub(super) const SERVER: &str = "the Keyward server";

impl Error {
    pub(crate) fn transport(peer: &'static str, addr: &str, source: reqwest::Error) -> Self {
        Self::Transport { peer, addr: addr.to_string(), cause: transport_cause(peer, &source), source }
    }

    /// The API error code, if this is an API error.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, if this is an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What kind of failure this is: from the server's (or agent's) stable error `code`, the
    /// HTTP status only for a code this client does not know. Adapters map the kind, never the
    /// status, onto their own protocol's codes ([`ErrorKind::grpc_code`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Api { status, code, .. } => ErrorKind::of_code(code).unwrap_or_else(|| ErrorKind::of_status(*status)),
            Self::Transport { .. } => ErrorKind::Unavailable,
            Self::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Self::Decode(_) | Self::Config(_) | Self::Write(_) => ErrorKind::Internal,
        }
    }
}

/// The kind of an [`Error`], one per way a caller must react.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed or a value is out of range: fix the request.
    InvalidArgument,
    /// No credential, or one that is malformed, unknown, revoked, expired or used up.
    Unauthenticated,
    /// The credential is valid, and its policies (or the caller's measurement) do not allow it.
    PermissionDenied,
    /// The key, secret, policy, role, token or route does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The request is valid, and the state does not allow it: a disabled key, a key of another
    /// type, a lost compare-and-set, a server not initialised or needing a seal migration.
    FailedPrecondition,
    /// The ciphertext does not open (wrong key, context or bytes). Says nothing more.
    DecryptionFailed,
    /// Too large or too many: a body over the limit, a connection or instance cap.
    ResourceExhausted,
    /// Try again later: the server is sealed, unreachable, or its storage, audit log, HSM or
    /// identity provider is.
    Unavailable,
    /// A fault on the other side, or an answer this client cannot read.
    Internal,
}

impl ErrorKind {
    /// The kind of a stable error code, if this client knows the code.
    pub fn of_code(code: &str) -> Option<Self> {
        Some(match code {
            "invalid_argument" | "invalid_json" | "unsupported_media_type" | "method_not_allowed" | "wrong_shares" => {
                Self::InvalidArgument
            }
            "unauthenticated" | "invalid_identity" | "session_required" => Self::Unauthenticated,
            // The node agent's refusals of a caller it measured.
            "permission_denied" | "not_attested" | "exec_mismatch" | "not_a_launcher" => Self::PermissionDenied,
            "not_found" | "no_such_route" | "no_such_role" => Self::NotFound,
            "already_exists" | "already_initialized" => Self::AlreadyExists,
            "conflict"
            | "key_disabled"
            | "key_pending_deletion"
            | "wrong_key_type"
            | "wrong_state"
            | "not_initialized"
            | "not_configured"
            | "seal_migration_required" => Self::FailedPrecondition,
            "decryption_failed" => Self::DecryptionFailed,
            "payload_too_large" | "too_many_connections" => Self::ResourceExhausted,
            "unavailable"
            | "sealed"
            | "busy"
            | "audit_unavailable"
            | "seal_device_unavailable"
            | "jwks_unavailable"
            | "no_server"
            | "server_unavailable" => Self::Unavailable,
            "internal" => Self::Internal,
            _ => return None,
        })
    }

    /// The kind an HTTP status stands for (for codes this client does not know).
    pub fn of_status(status: u16) -> Self {
        match status {
            400 | 405 | 415 | 422 => Self::InvalidArgument,
            401 => Self::Unauthenticated,
            403 => Self::PermissionDenied,
            404 => Self::NotFound,
            409 | 412 => Self::FailedPrecondition,
            413 | 429 => Self::ResourceExhausted,
            502..=504 => Self::Unavailable,
            _ => Self::Internal,
        }
    }

    /// The gRPC status code of this kind: the one mapping every gRPC adapter (KMS plugin, CSI
    /// provider, key provider) uses. A failed decryption is `InvalidArgument` (the input does
    /// not open), as cloud KMS gRPC APIs answer it.
    #[cfg(feature = "grpc")]
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument | Self::DecryptionFailed => Code::InvalidArgument,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::Internal => Code::Internal,
        }
    }
}

/// Name a transport failure in words a person can act on, from the error's causes.
pub(super) fn transport_cause(peer: &str, e: &reqwest::Error) -> String {
    use std::io::ErrorKind;
    let agent = peer != SERVER;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut last = e.to_string();
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return tls_cause(t);
        }
        // I/O errors wrap one another (`Other` around `InvalidData` around the TLS error), and
        // their `source()` skips the wrapped error itself: unwrap them by hand.
        let mut io = err.downcast_ref::<std::io::Error>();
        while let Some(i) = io {
            let inner = i.get_ref();
            if let Some(t) = inner.and_then(|x| x.downcast_ref::<rustls::Error>()) {
                return tls_cause(t);
            }
            match i.kind() {
                ErrorKind::ConnectionRefused if agent => {
                    return "nothing listens on the socket (is the node agent running?)".into();
                }
                ErrorKind::ConnectionRefused => {
                    return "connection refused: nothing listens there (is the server running, and is the \
                            address right? set KEYWARD_ADDR)"
                        .into();
                }
                ErrorKind::NotFound if agent => {
                    return "no such socket: is the node agent running on this node? (set KEYWARD_AGENT_SOCKET \
                            or --agent-socket)"
                        .into();
                }
                ErrorKind::PermissionDenied => return "permission denied by the operating system".into(),
                ErrorKind::TimedOut => return "the connection timed out".into(),
                _ => {}
            }
            io = inner.and_then(|x| x.downcast_ref::<std::io::Error>());
        }
        last = err.to_string();
        cur = err.source();
    }
    if last.contains("invalid HTTP version") {
        return "the server speaks HTTPS: use an https:// address (and KEYWARD_CACERT if its CA is private)".into();
    }
    if e.is_timeout() {
        return "no answer within the client's timeout".into();
    }
    last
}

pub(super) fn tls_cause(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidMessage(_) => {
            "the server did not answer in TLS: it speaks plain HTTP, so use an http:// address".into()
        }
        rustls::Error::InvalidCertificate(c) => match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server's certificate does not name this host: connect with a name in its subjectAltName".into()
            }
            C::Expired | C::ExpiredContext { .. } => "the server's certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (check the clocks)".into()
            }
            C::Revoked => "the server's certificate is revoked".into(),
            C::UnknownIssuer => "the server's certificate is not trusted (a CA this client does not trust signed \
                                 it): set KEYWARD_CACERT (or --cacert) to the PEM file of that CA"
                .into(),
            other => format!(
                "the server's certificate is not trusted ({other:?}): set KEYWARD_CACERT (or --cacert) to the PEM \
                 file of the CA that signed it"
            ),
        },
        rustls::Error::NoCertificatesPresented => {
            "the server asked for a client certificate and none was given (set KEYWARD_CLIENT_CERT and \
             KEYWARD_CLIENT_KEY)"
                .into()
        }
        rustls::Error::AlertReceived(a) => {
            format!("the server ended the TLS handshake ({a:?}): it may require a client certificate it trusts")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The `{"error": {code, message, request_id}}` body of a failed response as an [`Error`].
pub(crate) fn api_error(status: u16, body: &[u8]) -> Error {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    Error::Api {
        status,
        code: e["code"].as_str().unwrap_or("unknown").to_string(),
        message: e["message"].as_str().unwrap_or("no error message in response").to_string(),
        request_id: e["request_id"].as_str().unwrap_or("-").to_string(),
    }
}
