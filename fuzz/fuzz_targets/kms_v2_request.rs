//! KMS v2 gRPC messages as the plugin decodes them (prost, then the plugin's checks): never a
//! panic; whatever `check_decrypt` accepts names a key_id that round-trips and matches the
//! ciphertext's header, within the apiserver's limits.
#![no_main]
use keyward_kms_plugin::plugin::{MAX_CIPHERTEXT, check_decrypt, check_encrypt};
use keyward_kms_plugin::{KeyRef, proto};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = proto::DecryptRequest::decode(data) {
        if let Ok(key) = check_decrypt(&r) {
            assert_eq!(key.key_id(), r.key_id);
            assert!(!r.ciphertext.is_empty() && r.ciphertext.len() <= MAX_CIPHERTEXT);
            assert!(r.annotations.is_empty());
            assert_eq!(KeyRef::of_ciphertext(&key.name, &r.ciphertext), Some(key));
        }
    }
    if let Ok(r) = proto::EncryptRequest::decode(data) {
        if check_encrypt(&r).is_ok() {
            assert_eq!(r.plaintext.len(), 32);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(k) = KeyRef::parse(s) {
            assert_eq!(k.key_id(), s);
        }
    }
});
