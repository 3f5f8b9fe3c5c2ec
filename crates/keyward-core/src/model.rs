//! Stored records. These are what a [`crate::store::Store`] persists; wrapped (encrypted) fields
//! are opaque to the store.

pub use keyward_crypto::keys::KeyAlgorithm;

/// A key's stable, random identifier (carried in every ciphertext header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// A fresh random id.
    pub fn random() -> Result<Self, keyward_crypto::CryptoError> {
        let mut b = [0u8; 16];
        keyward_crypto::fill_random(&mut b)?;
        Ok(Self(b))
    }

    /// Lower-case hex form (32 characters).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse the hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Lifecycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Usable for every operation of its type.
    Enabled,
    /// Refuses every cryptographic operation until enabled again.
    Disabled,
    /// Refuses every cryptographic operation; purged at `deletion_at` unless cancelled.
    PendingDeletion,
}

impl KeyState {
    /// API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::PendingDeletion => "pending_deletion",
        }
    }

    /// Parse an API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enabled" => Some(Self::Enabled),
            "disabled" => Some(Self::Disabled),
            "pending_deletion" => Some(Self::PendingDeletion),
            _ => None,
        }
    }
}

/// A named key's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Stable id.
    pub id: KeyId,
    /// Unique name.
    pub name: String,
    /// Key type.
    pub algorithm: KeyAlgorithm,
    /// Lifecycle state.
    pub state: KeyState,
    /// Free text.
    pub description: String,
    /// Creation time (Unix seconds).
    pub created_at: i64,
    /// Last change (Unix seconds).
    pub updated_at: i64,
    /// Newest version; new encryptions and signatures use it.
    pub current_version: u32,
    /// Automatic rotation period in seconds, if any.
    pub rotate_every_secs: Option<u64>,
    /// When the scheduler rotates next.
    pub next_rotation_at: Option<i64>,
    /// When a pending deletion takes effect.
    pub deletion_at: Option<i64>,
    /// Incremented on every change; used for compare-and-set updates.
    pub revision: u64,
}

/// One version of a key. `wrapped_material` is sealed under the root key with the key id and
/// version as associated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionRecord {
    /// Owning key.
    pub key_id: KeyId,
    /// Version number, from 1.
    pub version: u32,
    /// Material sealed under the root key.
    pub wrapped_material: Vec<u8>,
    /// DER SubjectPublicKeyInfo for signing keys.
    pub public_key: Option<Vec<u8>>,
    /// Creation time.
    pub created_at: i64,
}

/// A secret path's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    /// Path.
    pub path: String,
    /// Newest version number.
    pub current_version: u32,
    /// First write.
    pub created_at: i64,
    /// Last write.
    pub updated_at: i64,
}

/// One version of a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersionRecord {
    /// Path.
    pub path: String,
    /// Version number, from 1.
    pub version: u32,
    /// Value sealed under the secrets key; `None` once destroyed.
    pub wrapped_value: Option<Vec<u8>>,
    /// Creation time.
    pub created_at: i64,
    /// Soft-deletion time, if deleted.
    pub deleted_at: Option<i64>,
}

/// An API token. Only a keyed hash of the token is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// HMAC-SHA256 of the token string under a key derived from the root key.
    pub hash: [u8; 32],
    /// Non-secret handle for the token (safe to log).
    pub accessor: String,
    /// Policies attached; `root` grants everything.
    pub policies: Vec<String>,
    /// Creation time.
    pub created_at: i64,
    /// Expiry, if any.
    pub expires_at: Option<i64>,
    /// Accessor of the token that created this one (revoking it revokes this one).
    pub parent: Option<String>,
    /// Lifetime granted at creation and on each renewal.
    pub ttl_secs: Option<u64>,
    /// Maximum number of uses, if limited.
    pub max_uses: Option<u32>,
    /// Uses so far (tracked for tokens with `max_uses`).
    pub uses: u32,
    /// Free text naming the holder.
    pub display_name: String,
    /// Identity selectors set by the auth method that issued the token (e.g. `k8s:ns:X`),
    /// sorted; policies can be attached by them and rules can require them.
    pub selectors: Vec<String>,
    /// Hard limit on expiry: renewals never extend beyond it.
    pub max_expires_at: Option<i64>,
}

impl TokenRecord {
    /// Whether this token carries the root policy.
    pub fn is_root(&self) -> bool {
        self.policies.iter().any(|p| p == "root")
    }

    /// An identity established per request (e.g. from a TLS client certificate) rather than a
    /// stored token: no policies of its own, only `selectors`. Its `hash` is all zeros, which
    /// no stored token has.
    pub fn ephemeral(accessor: String, display_name: String, selectors: Vec<String>) -> Self {
        Self {
            hash: [0; 32],
            accessor,
            policies: vec![],
            created_at: crate::now_unix(),
            expires_at: None,
            parent: None,
            ttl_secs: None,
            max_uses: None,
            uses: 0,
            display_name,
            selectors,
            max_expires_at: None,
        }
    }

    /// Whether this is a stored token (as opposed to an [`TokenRecord::ephemeral`] identity).
    pub fn is_stored(&self) -> bool {
        self.hash != [0; 32]
    }
}
