//! The ciphertext/MAC/signature envelope parser and AEAD open must never panic, and must never
//! accept anything under a fixed key that it did not produce.
#![no_main]
use std::collections::BTreeMap;

use keyward_crypto::aead::AeadKey;
use keyward_crypto::format::{self, EnvelopeKind};
use keyward_crypto::SecretBytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [EnvelopeKind::CiphertextV1, EnvelopeKind::MacV1, EnvelopeKind::SignatureV1] {
        let _ = format::parse(data, kind);
    }
    if let Ok((h, body)) = format::parse(data, EnvelopeKind::CiphertextV1) {
        let key = AeadKey::new(&SecretBytes::copy_from(&[0x42; 32])).unwrap();
        assert!(format::open_ciphertext(&key, &h, body, &BTreeMap::new()).is_err());
    }
});
