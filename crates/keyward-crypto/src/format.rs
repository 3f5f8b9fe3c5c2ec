//! Keyward's self-describing envelopes for ciphertexts, MACs and signatures.
//!
//! Every envelope starts with the same 23-byte header (all integers big-endian):
//!
//! | offset | size | field                                                    |
//! |-------:|-----:|----------------------------------------------------------|
//! | 0      | 2    | magic `"KW"`                                             |
//! | 2      | 1    | kind and format: `0x01` ciphertext v1, `0x02` MAC v1, `0x03` signature v1 |
//! | 3      | 16   | key id (random, assigned at key creation)                |
//! | 19     | 4    | key version (u32, starting at 1)                         |
//! | 23     | ...  | body                                                     |
//!
//! Ciphertext v1 body: `nonce (12) || AES-256-GCM ciphertext || tag (16)`; the associated data is
//! the 23 header bytes followed by the canonical encoding of the encryption context (see
//! [`context_aad`]), so the key id, version and context cannot be swapped. MAC v1 body: the
//! 32-byte HMAC-SHA256 tag. Signature v1 body: the signature (Ed25519: 64 bytes, ECDSA P-256: ASN.1
//! DER). `docs/formats.md` documents the same.

use std::collections::BTreeMap;

use crate::aead::{AeadKey, NONCE_SIZE, TAG_SIZE};
use crate::{CryptoError, SecretBytes};

/// Magic bytes at the start of every envelope.
pub const MAGIC: [u8; 2] = *b"KW";
/// Length of a key id.
pub const KEY_ID_LEN: usize = 16;
/// Length of the common header.
pub const HEADER_LEN: usize = 2 + 1 + KEY_ID_LEN + 4;
/// Maximum length of a signature body.
pub const MAX_SIGNATURE_LEN: usize = 512;

/// Which kind of envelope (and which format version of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeKind {
    /// AES-256-GCM ciphertext, format 1.
    CiphertextV1 = 1,
    /// HMAC-SHA256 tag, format 1.
    MacV1 = 2,
    /// Signature, format 1.
    SignatureV1 = 3,
}

impl EnvelopeKind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::CiphertextV1),
            2 => Some(Self::MacV1),
            3 => Some(Self::SignatureV1),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::CiphertextV1 => "ciphertext",
            Self::MacV1 => "MAC",
            Self::SignatureV1 => "signature",
        }
    }
}

/// The parsed common header of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Envelope kind.
    pub kind: EnvelopeKind,
    /// Key id the envelope was made with.
    pub key_id: [u8; KEY_ID_LEN],
    /// Key version the envelope was made with.
    pub version: u32,
}

impl Header {
    /// Encode the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..2].copy_from_slice(&MAGIC);
        h[2] = self.kind as u8;
        h[3..3 + KEY_ID_LEN].copy_from_slice(&self.key_id);
        h[3 + KEY_ID_LEN..].copy_from_slice(&self.version.to_be_bytes());
        h
    }
}

/// Parse an envelope of the expected kind into its header and body. Checks structure only; it
/// authenticates nothing.
pub fn parse(bytes: &[u8], expected: EnvelopeKind) -> Result<(Header, &[u8]), CryptoError> {
    let what = expected.name();
    let (head, body) = bytes.split_at_checked(HEADER_LEN).ok_or(CryptoError::Malformed(what))?;
    if head[..2] != MAGIC {
        return Err(CryptoError::Malformed(what));
    }
    let kind = EnvelopeKind::from_byte(head[2]).ok_or(CryptoError::Malformed(what))?;
    if kind != expected {
        return Err(CryptoError::Malformed(what));
    }
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&head[3..3 + KEY_ID_LEN]);
    let mut v = [0u8; 4];
    v.copy_from_slice(&head[3 + KEY_ID_LEN..]);
    let version = u32::from_be_bytes(v);
    if version == 0 {
        return Err(CryptoError::Malformed(what));
    }
    let ok_len = match kind {
        EnvelopeKind::CiphertextV1 => body.len() >= NONCE_SIZE + TAG_SIZE,
        EnvelopeKind::MacV1 => body.len() == 32,
        EnvelopeKind::SignatureV1 => !body.is_empty() && body.len() <= MAX_SIGNATURE_LEN,
    };
    if !ok_len {
        return Err(CryptoError::Malformed(what));
    }
    Ok((Header { kind, key_id, version }, body))
}

/// Canonical associated data: header bytes, then the context as a count and length-prefixed
/// (u32 big-endian) key/value pairs in byte order of the keys.
pub fn context_aad(header: &[u8; HEADER_LEN], context: &BTreeMap<String, String>) -> Vec<u8> {
    let size: usize = context.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut aad = Vec::with_capacity(HEADER_LEN + 4 + size);
    aad.extend_from_slice(header);
    aad.extend_from_slice(&len_u32(context.len()).to_be_bytes());
    for (k, v) in context {
        aad.extend_from_slice(&len_u32(k.len()).to_be_bytes());
        aad.extend_from_slice(k.as_bytes());
        aad.extend_from_slice(&len_u32(v.len()).to_be_bytes());
        aad.extend_from_slice(v.as_bytes());
    }
    aad
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Encrypt `plaintext` into a ciphertext v1 envelope.
pub fn seal_ciphertext(
    key: &AeadKey,
    key_id: [u8; KEY_ID_LEN],
    version: u32,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let header = Header { kind: EnvelopeKind::CiphertextV1, key_id, version }.encode();
    let aad = context_aad(&header, context);
    let mut out = Vec::with_capacity(HEADER_LEN + NONCE_SIZE + plaintext.len() + TAG_SIZE);
    out.extend_from_slice(&header);
    key.seal_into(&aad, plaintext, &mut out)?;
    Ok(out)
}

/// Decrypt a ciphertext v1 envelope whose header has been parsed with [`parse`] and whose key was
/// looked up by `header.key_id`/`header.version`.
pub fn open_ciphertext(
    key: &AeadKey,
    header: &Header,
    body: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<SecretBytes, CryptoError> {
    let aad = context_aad(&header.encode(), context);
    key.open(&aad, body)
}

/// Build a MAC or signature envelope around `body`.
pub fn wrap_tag(kind: EnvelopeKind, key_id: [u8; KEY_ID_LEN], version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&Header { kind, key_id, version }.encode());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn golden_header() {
        let h = Header { kind: EnvelopeKind::CiphertextV1, key_id: [0xAB; 16], version: 0x0102_0304 };
        assert_eq!(hex::encode(h.encode()), "4b5701abababababababababababababababab01020304");
    }

    #[test]
    fn golden_context_encoding() {
        let h = [0u8; HEADER_LEN];
        let aad = context_aad(&h, &ctx(&[("b", "2"), ("a", "1")]));
        assert_eq!(hex::encode(&aad[HEADER_LEN..]), "000000020000000161000000013100000001620000000132");
    }

    #[test]
    fn roundtrip_tamper_truncate_wrong_context() {
        let key = AeadKey::new(&SecretBytes::random(32).unwrap()).unwrap();
        let c = ctx(&[("tenant", "acme")]);
        let ct = seal_ciphertext(&key, [7; 16], 3, &c, b"payload").unwrap();
        let (h, body) = parse(&ct, EnvelopeKind::CiphertextV1).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.key_id, [7; 16]);
        assert_eq!(open_ciphertext(&key, &h, body, &c).unwrap().expose(), b"payload");
        assert!(open_ciphertext(&key, &h, body, &ctx(&[("tenant", "evil")])).is_err());
        assert!(open_ciphertext(&key, &h, body, &BTreeMap::new()).is_err());
        for i in 0..ct.len() {
            let mut t = ct.clone();
            t[i] ^= 1;
            let ok = parse(&t, EnvelopeKind::CiphertextV1)
                .ok()
                .and_then(|(h2, b2)| {
                    // A flipped key id or version would select another key in the service; here
                    // we still try the same key, which must fail because the header is bound.
                    open_ciphertext(&key, &h2, b2, &c).ok()
                })
                .is_some();
            assert!(!ok, "flip at byte {i} was accepted");
        }
        for n in 0..ct.len() {
            let ok = parse(&ct[..n], EnvelopeKind::CiphertextV1)
                .ok()
                .and_then(|(h2, b2)| open_ciphertext(&key, &h2, b2, &c).ok())
                .is_some();
            assert!(!ok, "truncation to {n} bytes was accepted");
        }
    }

    #[test]
    fn wrong_kind_and_version_zero_rejected() {
        let mac = wrap_tag(EnvelopeKind::MacV1, [1; 16], 1, &[0; 32]);
        assert!(parse(&mac, EnvelopeKind::MacV1).is_ok());
        assert!(parse(&mac, EnvelopeKind::SignatureV1).is_err());
        let zero = wrap_tag(EnvelopeKind::MacV1, [1; 16], 0, &[0; 32]);
        assert!(parse(&zero, EnvelopeKind::MacV1).is_err());
        let short = wrap_tag(EnvelopeKind::MacV1, [1; 16], 1, &[0; 31]);
        assert!(parse(&short, EnvelopeKind::MacV1).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse(&bytes, EnvelopeKind::CiphertextV1);
            let _ = parse(&bytes, EnvelopeKind::MacV1);
            let _ = parse(&bytes, EnvelopeKind::SignatureV1);
        }

        #[test]
        fn header_roundtrip(id in any::<[u8; 16]>(), version in 1u32.., body in proptest::collection::vec(any::<u8>(), 28..64)) {
            let env = wrap_tag(EnvelopeKind::CiphertextV1, id, version, &body);
            let (h, b) = parse(&env, EnvelopeKind::CiphertextV1).unwrap();
            prop_assert_eq!(h.key_id, id);
            prop_assert_eq!(h.version, version);
            prop_assert_eq!(b, &body[..]);
        }

        #[test]
        fn distinct_contexts_give_distinct_aad(
            a in proptest::collection::btree_map("[a-z]{0,4}", "[a-z]{0,4}", 0..4),
            b in proptest::collection::btree_map("[a-z]{0,4}", "[a-z]{0,4}", 0..4),
        ) {
            let h = [0u8; HEADER_LEN];
            prop_assert_eq!(a == b, context_aad(&h, &a) == context_aad(&h, &b));
        }
    }
}
