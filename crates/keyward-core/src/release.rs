//! Constants of the agent release protocol, shared by the server and the node agent.
//!
//! An agent joins with a one-time token and an Ed25519 public key, then signs every release
//! request: the signature covers [`PROOF_CONTEXT`] (one release) or [`BATCH_PROOF_CONTEXT`] (a
//! batch of up to [`MAX_BATCH`] releases) followed by the exact request body, and travels in the
//! [`SIGNATURE_HEADER`] header. Released responses are sealed with HPKE (`info` =
//! `keyward release v1`, associated data = the release nonce).

/// Selector on a join token naming the node it admits.
pub const JOIN_SELECTOR: &str = "keyward:join:";
/// Selector naming an agent's node (on its token, and added to every workload it attests).
pub const NODE_SELECTOR: &str = "node:name:";
/// Selector binding an agent token to the SHA-256 (hex) of its Ed25519 public key.
pub const AGENT_KEY_SELECTOR: &str = "keyward:agent-key:";
/// HTTP header carrying the agent's signature (base64) over the release body.
pub const SIGNATURE_HEADER: &str = "keyward-agent-signature";
/// What the agent signs: this prefix, then the exact request body.
pub const PROOF_CONTEXT: &[u8] = b"keyward-agent-release-v1\0";
/// What the agent signs for a batch: this prefix, then the exact request body. Distinct from
/// [`PROOF_CONTEXT`], so a signature over one form is never accepted for the other.
pub const BATCH_PROOF_CONTEXT: &[u8] = b"keyward-agent-release-batch-v1\0";
/// Most releases in one batch.
pub const MAX_BATCH: usize = 64;
