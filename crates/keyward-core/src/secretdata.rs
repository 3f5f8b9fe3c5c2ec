//! Secret values: a map of field names to string values, wiped on drop, never printed.

use std::collections::BTreeMap;

use zeroize::Zeroize;

use crate::KmsError;
use crate::limits::{MAX_SECRET_FIELD_NAME, MAX_SECRET_FIELDS, MAX_SECRET_SIZE};

/// The fields of one secret version.
#[derive(Default)]
pub struct SecretData {
    fields: BTreeMap<String, String>,
}

impl std::fmt::Debug for SecretData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretData").field("fields", &self.fields.keys().collect::<Vec<_>>()).finish()
    }
}

impl Drop for SecretData {
    fn drop(&mut self) {
        for v in self.fields.values_mut() {
            v.zeroize();
        }
    }
}

impl SecretData {
    /// Build from fields, checking the limits.
    pub fn new(fields: BTreeMap<String, String>) -> Result<Self, KmsError> {
        let data = Self { fields };
        if data.fields.len() > MAX_SECRET_FIELDS {
            return Err(KmsError::invalid(format!("a secret has at most {MAX_SECRET_FIELDS} fields")));
        }
        let mut total = 0usize;
        for (k, v) in &data.fields {
            if k.is_empty() || k.chars().count() > MAX_SECRET_FIELD_NAME || k.chars().any(char::is_control) {
                return Err(KmsError::invalid(format!(
                    "secret field names must be 1 to {MAX_SECRET_FIELD_NAME} characters without control characters"
                )));
            }
            total += k.len() + v.len();
        }
        if total > MAX_SECRET_SIZE {
            return Err(KmsError::invalid(format!("a secret version is at most {MAX_SECRET_SIZE} bytes")));
        }
        Ok(data)
    }

    /// The fields. Every call site exposes secret values.
    pub fn expose(&self) -> &BTreeMap<String, String> {
        &self.fields
    }

    /// Canonical encoding: u32 count, then u32-length-prefixed name and value, big-endian.
    pub(crate) fn encode(&self) -> keyward_crypto::SecretBytes {
        let size: usize = self.fields.iter().map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>() + 4;
        let mut out = Vec::with_capacity(size);
        push_u32(&mut out, self.fields.len());
        for (k, v) in &self.fields {
            push_u32(&mut out, k.len());
            out.extend_from_slice(k.as_bytes());
            push_u32(&mut out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        keyward_crypto::SecretBytes::from_vec(out)
    }

    /// Decode [`SecretData::encode`] output.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = bytes;
        let n = take_u32(&mut r)?;
        let mut data = Self::default();
        for _ in 0..n {
            let k = take_str(&mut r)?;
            let v = take_str(&mut r)?;
            data.fields.insert(k, v);
        }
        r.is_empty().then_some(data)
    }
}

/// Decode untrusted bytes as a stored secret encoding; if they decode, re-encoding must give the
/// same bytes (the encoding is canonical). For fuzzing and property tests; never panics on input.
pub fn fuzz_roundtrip(data: &[u8]) -> bool {
    match SecretData::decode(data) {
        Some(d) => {
            let again = d.encode();
            // Duplicate names collapse in the map, so only canonical inputs round-trip exactly.
            if again.expose() != data {
                return SecretData::decode(again.expose()).is_some_and(|d2| d2.fields == d.fields);
            }
            true
        }
        None => true,
    }
}

fn push_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn take_u32(r: &mut &[u8]) -> Option<usize> {
    let (head, rest) = r.split_at_checked(4)?;
    *r = rest;
    Some(u32::from_be_bytes(head.try_into().ok()?) as usize)
}

fn take_str(r: &mut &[u8]) -> Option<String> {
    let n = take_u32(r)?;
    let (s, rest) = r.split_at_checked(n)?;
    *r = rest;
    String::from_utf8(s.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_redaction() {
        let mut m = BTreeMap::new();
        m.insert("password".to_string(), "s3cr3t-value".to_string());
        m.insert("user".to_string(), "app".to_string());
        let d = SecretData::new(m).unwrap();
        assert!(!format!("{d:?}").contains("s3cr3t"));
        let enc = d.encode();
        let back = SecretData::decode(enc.expose()).unwrap();
        assert_eq!(back.expose(), d.expose());
        for n in 0..enc.len() {
            assert!(SecretData::decode(&enc.expose()[..n]).is_none());
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics_and_is_canonical(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            proptest::prop_assert!(fuzz_roundtrip(&bytes));
        }

        #[test]
        fn encode_decode_roundtrip(m in proptest::collection::btree_map("[a-z]{1,8}", ".{0,16}", 0..8)) {
            let d = SecretData::new(m.clone()).unwrap();
            let back = SecretData::decode(d.encode().expose()).unwrap();
            proptest::prop_assert_eq!(back.expose(), &m);
        }
    }

    #[test]
    fn limits() {
        let mut m = BTreeMap::new();
        m.insert(String::new(), "x".to_string());
        assert!(SecretData::new(m).is_err());
        let mut m = BTreeMap::new();
        m.insert("big".to_string(), "x".repeat(MAX_SECRET_SIZE));
        assert!(SecretData::new(m).is_err());
    }
}
