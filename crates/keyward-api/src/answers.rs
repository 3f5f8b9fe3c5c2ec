//! The answers of the `/v1` API: what the server serializes and the client reads back, so the
//! contract is written once. Times are RFC 3339 strings (`2026-12-07T10:00:00Z`), periods are
//! strings such as `90d`, binary values standard base64. A field that is `None` is sent as
//! `null` unless it is marked to be left out.
//!
//! Answers are read leniently (unknown fields are ignored), so a newer server that adds a field
//! does not break an older client. Answers that carry a secret (a plaintext, a token, a share, a
//! secret's values) hold it in `Zeroizing` and print nothing of it in `Debug`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// A secret string: wiped on drop, never printed.
pub type SecretString = Zeroizing<String>;

redacted_debug!(Plaintext, DataKey, Random, Secret, RandomizedValue, PreviousValue, InitResult, AgentJoinToken);

// ---- keys ----

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: u32,
    pub created_at: String,
    /// The public key (SubjectPublicKeyInfo DER, base64) of an asymmetric key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// A key's metadata; `versions` only when one key is described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: String,
    /// `enabled`, `disabled` or `pending-deletion`.
    pub state: String,
    pub description: String,
    pub created_at: String,
    pub updated_at: String,
    pub current_version: u32,
    pub rotate_every: Option<String>,
    pub next_rotation_at: Option<String>,
    pub deletion_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<KeyVersion>>,
}

/// A page of keys; `next` is the `after` of the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<Key>,
    pub next: Option<String>,
}

/// An alias and the key it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasEntry {
    pub alias: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasList {
    pub aliases: Vec<AliasEntry>,
}

/// An alias set: the key it names now, and the one it named before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasSet {
    pub alias: String,
    pub key: String,
    pub previous: Option<String>,
}

/// An alias deleted, and the key it named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasDeleted {
    pub alias: String,
    pub deleted: bool,
    pub key: String,
}

// ---- cryptographic operations ----

/// A ciphertext and the key version that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ciphertext {
    pub ciphertext: String,
    pub key: String,
    pub key_version: u32,
}

/// A plaintext and the key version that decrypted it.
#[derive(Clone, Serialize, Deserialize)]
pub struct Plaintext {
    pub plaintext: SecretString,
    pub key: String,
    pub key_version: u32,
}

/// A ciphertext re-encrypted, with the key it was under before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reencrypted {
    pub ciphertext: String,
    pub key: String,
    pub key_version: u32,
    pub source_key: String,
    pub source_key_version: u32,
}

/// A data key: encrypted under the named key, and in the clear unless asked without.
#[derive(Clone, Serialize, Deserialize)]
pub struct DataKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<SecretString>,
    pub ciphertext: String,
    pub key: String,
    pub key_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub signature: String,
    pub key: String,
    pub key_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mac {
    pub mac: String,
    pub key: String,
    pub key_version: u32,
}

/// Whether a signature or MAC verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validity {
    pub valid: bool,
}

/// Random bytes (base64).
#[derive(Clone, Serialize, Deserialize)]
pub struct Random {
    pub bytes: SecretString,
}

// ---- secrets ----

/// A page of secret paths; `next` is the `after` of the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretList {
    pub paths: Vec<String>,
    pub next: Option<String>,
}

/// One version of a secret, with its values.
#[derive(Clone, Serialize, Deserialize)]
pub struct Secret {
    pub path: String,
    pub version: u32,
    pub created_at: String,
    pub data: BTreeMap<String, SecretString>,
}

/// The version a write made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretWritten {
    pub path: String,
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    pub version: u32,
    pub created_at: String,
    pub deleted_at: Option<String>,
    pub destroyed: bool,
}

/// A secret's versions, without their values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMetadata {
    pub path: String,
    pub current_version: u32,
    pub created_at: String,
    pub updated_at: String,
    pub versions: Vec<SecretVersion>,
}

/// How many versions a delete, undelete or destroy changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    pub changed: u32,
}

/// A randomized secret's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandomizedDefinition {
    pub name: String,
    /// `password`, `api-key` or `bytes`.
    pub kind: String,
    pub length: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alphabet: Option<String>,
    pub ttl: String,
    pub grace: String,
}

/// The value a randomized secret has now for the caller's workload identity.
#[derive(Clone, Serialize, Deserialize)]
pub struct RandomizedValue {
    pub name: String,
    pub identity: String,
    pub value: SecretString,
    pub version: u32,
    pub created_at: String,
    pub rotates_at: String,
    /// The value before the last rotation, during its grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousValue>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct PreviousValue {
    pub value: SecretString,
    pub valid_until: String,
}

// ---- tokens, policies, authorization ----

/// A token's metadata (never the token itself, except once: when it is created or a login
/// issues it).
#[derive(Clone, Serialize, Deserialize)]
pub struct Token {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretString>,
    pub accessor: String,
    pub policies: Vec<String>,
    pub display_name: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub ttl: Option<String>,
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub parent: Option<String>,
    pub selectors: Vec<String>,
    pub max_expires_at: Option<String>,
    /// `token`, or `certificate` for a client certificate's identity.
    pub kind: String,
    /// `whoami`: the policies in effect and what each grants this caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<Vec<EffectivePolicy>>,
    /// A Kubernetes login: the ServiceAccount (and pod) the token was issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<K8sIdentity>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("accessor", &self.accessor)
            .field("policies", &self.policies)
            .field("display_name", &self.display_name)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A policy in effect for a caller, how it applies, and what it grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectivePolicy {
    pub policy: String,
    pub via: PolicyVia,
    pub grants: Vec<String>,
    /// The policy is named but does not exist (it grants nothing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub missing: bool,
}

/// How a policy applies: named by the token (`"token"`), or attached by one of its identity
/// sets matching the caller's selectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PolicyVia {
    Token(String),
    IdentitySet { identity_set: usize },
}

/// The ServiceAccount (and pod, for a pod-bound token) a Kubernetes login verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8sIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub node: Option<String>,
}

/// The tokens a caller may see: its own subtree (`scope: "subtree"`) or every one (`"all"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<Token>,
    pub scope: String,
}

/// The accessors of the tokens revoked (the token and every token created from it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub revoked: Vec<String>,
}

/// One rule of a policy: operations granted on resources, to callers with every `require`d
/// selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    pub resources: Vec<String>,
    pub operations: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_hold_secs: Option<u64>,
}

/// A named policy, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Vec<String>>,
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyList {
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDeleted {
    pub deleted: String,
}

/// A dry run's decision: the rule that grants it, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub policies: Vec<String>,
    pub selectors: Vec<String>,
}

// ---- sys ----

/// `GET /v1/health`. The seal details are present while the store can be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, `sealed`, `stale` or `uninitialized`.
    pub status: String,
    pub ready: bool,
    pub sealed: bool,
    /// This server's seal kind.
    pub seal: String,
    pub storage: String,
    pub server_id: String,
    pub scheduler: bool,
    pub version: String,
    pub storage_available: bool,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub seal_state: Option<SealState>,
}

/// The stored seal's state, part of [`Health`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealState {
    pub initialized: bool,
    /// The kind the stored keyring is sealed with (differs from `seal` until a migration).
    pub stored_seal: Option<String>,
    pub migration_required: bool,
    /// The HSM key wrapping the unseal key (PKCS#11 seal).
    pub hsm_key: Option<String>,
    pub insecure_seal: bool,
    pub shares: u8,
    pub threshold: u8,
    pub progress: u8,
    pub rekey_in_progress: bool,
}

/// What init hands out, once: the shares (recovery shares with an HSM seal) and the root token.
#[derive(Clone, Serialize, Deserialize)]
pub struct InitResult {
    pub shares: Vec<SecretString>,
    pub root_token: SecretString,
    pub seal: String,
    pub sealed: bool,
}

/// Progress of an unseal or a rekey: shares still needed, or done (with the new shares of a
/// rekey).
#[derive(Clone, Serialize, Deserialize)]
pub struct Progress {
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<Vec<SecretString>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("complete", &self.complete)
            .field("progress", &self.progress)
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub sealed: bool,
}

/// A rekey in progress (its nonce and progress), or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeyStatus {
    pub in_progress: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeyStarted {
    pub nonce: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    pub cancelled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRotated {
    pub rotated: bool,
    pub key_versions_rewrapped: u32,
    pub service_keys_rewrapped: u32,
}

/// The audit log: where it is, its head, its write statistics and its MAC key (base64), for
/// `keyward audit verify`; or `enabled: false`.
#[derive(Clone, Serialize, Deserialize)]
pub struct AuditInfo {
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<AuditHead>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<AuditStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<SecretString>,
}

impl std::fmt::Debug for AuditInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditInfo")
            .field("enabled", &self.enabled)
            .field("file", &self.file)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    pub hmac: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditStats {
    pub records: u64,
    pub batches: u64,
    pub records_per_batch: f64,
    pub write_and_sync_us_per_batch: u64,
}

// ---- Kubernetes auth ----

/// The Kubernetes auth method configured, with the number of signing keys fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8sConfigured {
    pub configured: bool,
    pub keys: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The Kubernetes auth configuration (never the key documents or CA themselves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8sConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub leeway_secs: u64,
    pub custom_ca: bool,
    /// The API server each login is confirmed with (TokenReview), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_review_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_reviewer_secret: Option<String>,
}

/// Where the signing keys come from: `"static"`, `"discovery"` or `{"url": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JwksSource {
    Kind(String),
    Url { url: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8sRoleList {
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8sRole {
    pub name: String,
    pub bound_namespaces: Vec<String>,
    pub bound_service_accounts: Vec<String>,
    pub policies: Vec<String>,
    pub ttl: String,
    pub max_ttl: String,
    pub allow_unbound_tokens: bool,
}

// ---- agents ----

/// An attested release's answer, sealed (HPKE) to the workload's key: `status` and the route's
/// JSON answer inside `ciphertext`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRelease {
    pub status: u16,
    /// The HPKE suite (`X25519-HKDF-SHA256/HKDF-SHA256/ChaCha20Poly1305`).
    pub suite: String,
    /// The release nonce the sealed answer is bound to (base64).
    pub nonce: String,
    /// The HPKE encapsulated key (base64).
    pub enc: String,
    pub ciphertext: String,
}

/// A one-time token for a node's agent.
#[derive(Clone, Serialize, Deserialize)]
pub struct AgentJoinToken {
    pub join_token: SecretString,
    pub accessor: String,
    pub node: String,
    pub expires_at: Option<String>,
}

/// A node's live credential: an agent token or an unspent join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredential {
    pub node: String,
    /// `agent` or `join-token`.
    pub kind: String,
    pub accessor: String,
    /// SHA-256 of the agent's public key (agent tokens).
    pub agent_key_sha256: Option<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeCredential>,
}

/// A node's credentials revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRevoked {
    pub node: String,
    pub revoked: Vec<String>,
}
