//! # keyward-api
//!
//! Keyward's `/v1` HTTP API as one set of types: the request bodies and query strings the
//! server parses (strictly: unknown fields are refused) and the Rust client and the CLI send,
//! the answers the server serializes and the client reads back (such as [`Key`]), and
//! the route paths ([`routes`]), so the contract is written once. `crates/keyward-server/openapi.json` describes the same
//! shapes for other languages, and a test checks it against the server's router.
//!
//! Durations are strings of one number and one unit (`90s`, `15m`, `24h`, `90d`); binary
//! values are standard base64. Optional fields left `None` are not sent.
#![forbid(unsafe_code)]
// Each field is described, route by route, in openapi.json (the contract other languages read).
#![allow(missing_docs)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Debug for request types that carry a secret (a share, a token, a plaintext, secret values):
/// the type's name and nothing of its content.
macro_rules! redacted_debug {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t)).finish_non_exhaustive()
            }
        }
    )*};
}

redacted_debug!(ShareReq, RekeyShareReq, K8sLoginReq, EncryptReq, PutSecretReq);

mod answers;
pub mod routes;

pub use answers::*;

/// An encryption context: string pairs bound into a ciphertext, given again to decrypt it.
pub type Context = BTreeMap<String, String>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyReq {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: String,
    #[serde(default)]
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotate_every: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationPolicyReq {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotate_every: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDeletionReq {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_days: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `keyward operator init` and rekey parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitReq {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shares: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
}

/// One unseal share (base64, as printed by init or rekey).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareReq {
    pub share: zeroize::Zeroizing<String>,
    /// Convert a keyring sealed with another seal kind to this server's.
    #[serde(default)]
    pub migrate: bool,
}

/// Kubernetes auth configuration; exactly one of `jwks`, `jwks_url`, `discovery`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sConfigReq {
    pub issuer: String,
    pub audience: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub discovery: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leeway_secs: Option<u64>,
    /// Confirm each login with this API server's TokenReview API (with `token_reviewer_secret`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_review_url: Option<String>,
    /// `PATH#FIELD` of the Keyward secret holding the reviewer's ServiceAccount token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_reviewer_secret: Option<String>,
}

/// A Kubernetes auth role.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sRoleReq {
    pub bound_namespaces: Vec<String>,
    pub bound_service_accounts: Vec<String>,
    pub policies: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<String>,
    #[serde(default)]
    pub allow_unbound_tokens: bool,
}

/// Kubernetes login: a role and the projected ServiceAccount token.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sLoginReq {
    pub role: String,
    pub jwt: zeroize::Zeroizing<String>,
}

/// One current share toward a rekey.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeyShareReq {
    pub nonce: String,
    pub share: zeroize::Zeroizing<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretListQuery {
    #[serde(default)]
    pub prefix: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// `GET /v1/health` options.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthQuery {
    /// Answer 503 unless this server can serve (unsealed and caught up).
    #[serde(default)]
    pub ready: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptReq {
    pub plaintext: zeroize::Zeroizing<String>,
    #[serde(default)]
    pub context: Context,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecryptReq {
    pub ciphertext: String,
    #[serde(default)]
    pub context: Context,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReencryptReq {
    pub ciphertext: String,
    #[serde(default)]
    pub context: Context,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_key: Option<String>,
    #[serde(default)]
    pub destination_context: Context,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataKeyReq {
    #[serde(default)]
    pub context: Context,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageReq {
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyReq {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// SHA-256 of the message, instead of the message (ECDSA keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub signature: String,
}

/// A message to sign, or its SHA-256 digest (ECDSA keys; for messages of any size).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignReq {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyMacReq {
    pub message: String,
    pub mac: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomReq {
    pub bytes: usize,
}

/// A randomized secret's definition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomizedReq {
    /// `password`, `api-key` or `bytes`.
    pub kind: String,
    /// Characters, or bytes for `bytes` (default 32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub length: Option<u16>,
    /// Characters to draw from (password and api-key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alphabet: Option<String>,
    /// Rotation period, e.g. `24h`.
    pub ttl: String,
    /// How long the previous value is still returned after a rotation, e.g. `1h` (default 0s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSecretReq {
    pub data: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cas: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionsReq {
    #[serde(default)]
    pub versions: Vec<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreateReq {
    pub policies: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default)]
    pub orphan: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessorReq {
    pub accessor: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DryRunReq {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accessor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selectors: Option<Vec<String>>,
    pub operation: String,
    pub resource: String,
}

/// `PUT /v1/policies/{name}`: a policy's description, identity sets and rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyReq {
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Vec<String>>,
    pub rules: Vec<PolicyRule>,
}

/// `PATCH /v1/keys/{name}`: what can change in place.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyReq {
    pub description: String,
}

/// `PUT /v1/aliases/{name}`: the key the alias names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasReq {
    pub key: String,
}

/// `POST /v1/auth/agent/join-token`: a one-time token for a node's agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenReq {
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_carry_secrets_print_nothing_of_them() {
        let put = PutSecretReq { data: BTreeMap::from([("password".into(), "hunter2".into())]), cas: None };
        let share = ShareReq { share: zeroize::Zeroizing::new("c2hhcmU=".into()), migrate: false };
        let enc = EncryptReq { plaintext: zeroize::Zeroizing::new("cGxhaW4=".into()), context: Context::new() };
        for printed in [format!("{put:?}"), format!("{share:?}"), format!("{enc:?}")] {
            assert!(
                !printed.contains("hunter2") && !printed.contains("c2hhcmU") && !printed.contains("cGxhaW4"),
                "{printed}"
            );
        }
    }
}
