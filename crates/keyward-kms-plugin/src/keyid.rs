//! The `key_id` the plugin reports: `keyward:<key name>:<key id hex>:v<version>`.
//!
//! It names one version of one Keyward key. The key's random id makes a key deleted and created
//! again under the same name a different `key_id`, so an id is never reused (interop trap 2).
//! The ciphertext header carries the same key id and version, and `Decrypt` refuses a `key_id`
//! that does not match the ciphertext it came with.

use keyward_crypto::format::{self, EnvelopeKind};

/// One version of one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    /// Key name.
    pub name: String,
    /// The key's random id.
    pub id: [u8; 16],
    /// Version.
    pub version: u32,
}

const PREFIX: &str = "keyward:";

impl KeyRef {
    /// The `key_id` text.
    pub fn key_id(&self) -> String {
        format!("{PREFIX}{}:{}:v{}", self.name, hex::encode(self.id), self.version)
    }

    /// Parse a `key_id`; `None` for anything this plugin did not issue.
    pub fn parse(key_id: &str) -> Option<Self> {
        let rest = key_id.strip_prefix(PREFIX)?;
        let mut parts = rest.split(':');
        let (name, id, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || keyward_core::validate::key_name(name).is_err() {
            return None;
        }
        let id: [u8; 16] = hex::decode(id).ok()?.try_into().ok()?;
        let version = version.strip_prefix('v')?;
        // Canonical decimal only, so one version has exactly one key_id.
        if version.is_empty() || version.starts_with('0') || !version.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let r = Self { name: name.to_string(), id, version: version.parse().ok()? };
        (r.key_id() == key_id).then_some(r)
    }

    /// The key id and version in a Keyward ciphertext's header.
    pub fn of_ciphertext(name: &str, ciphertext: &[u8]) -> Option<Self> {
        let (h, _) = format::parse(ciphertext, EnvelopeKind::CiphertextV1).ok()?;
        Some(Self { name: name.to_string(), id: h.key_id, version: h.version })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_rejects() {
        let r = KeyRef { name: "k8s-secrets".into(), id: [0xab; 16], version: 7 };
        let id = r.key_id();
        assert_eq!(id, format!("keyward:k8s-secrets:{}:v7", "ab".repeat(16)));
        assert_eq!(KeyRef::parse(&id), Some(r));
        let hexid = "ab".repeat(16);
        for bad in [
            String::new(),
            "keyward:".into(),
            format!("keyward:k:{hexid}:v0"),
            format!("keyward:k:{hexid}:v07"),
            format!("keyward:k:{hexid}:7"),
            format!("keyward:k:{hexid}:v7:x"),
            format!("keyward:k/x:{hexid}:v7"),
            format!("keyward:k:{}:v7", "AB".repeat(16)),
            format!("keyward:k:{}:v7", "ab".repeat(15)),
            format!("keyward:k:{hexid}:v99999999999"),
            format!("other:k:{hexid}:v1"),
        ] {
            assert_eq!(KeyRef::parse(&bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_is_canonical(s in "\\PC{0,200}") {
            if let Some(r) = KeyRef::parse(&s) {
                prop_assert_eq!(r.key_id(), s);
            }
        }
    }
}
