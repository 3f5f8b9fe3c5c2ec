//! What an encrypted image carries and Keyward parses before any key is used: the JWE of
//! `org.opencontainers.image.enc.keys.jwe` (parsed and unwrapped with real keys), the private
//! options it unwraps to, the `pubopts` annotation, layer descriptors and key files. Never a
//! panic, and nothing is accepted that cannot be used.
#![no_main]
use std::sync::OnceLock;

use keyward_ocicrypt::jwe::{Jwe, MatchHint};
use keyward_ocicrypt::layout::Descriptor;
use keyward_ocicrypt::options::{PrivateOptions, PublicOptions};
use keyward_ocicrypt::{PrivateKey, PublicKey};
use libfuzzer_sys::fuzz_target;

/// An EC P-256 key (PKCS#8) fixed for the run.
const EC_KEY: &[u8] = include_bytes!("../seeds/ocicrypt_ec_p256.pk8");

fn keys() -> &'static [PrivateKey] {
    static KEYS: OnceLock<Vec<PrivateKey>> = OnceLock::new();
    KEYS.get_or_init(|| vec![PrivateKey::from_bytes(EC_KEY, "fuzz").expect("fuzz key")])
}

fuzz_target!(|data: &[u8]| {
    if let Ok(jwe) = Jwe::parse(data) {
        assert!(!jwe.recipients().is_empty());
        let _ = jwe.decrypt(keys(), &MatchHint::default());
    }
    if let Ok(p) = PrivateOptions::from_json(data) {
        assert_eq!(p.symkey.len(), 32);
    }
    let _ = PublicOptions::from_json(data);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(d) = Descriptor::from_json(&v, "fuzz") {
            assert_eq!(d.digest.hex().len(), 64);
        }
    }
    let _ = PublicKey::from_bytes(data, "fuzz");
    let _ = PrivateKey::from_bytes(data, "fuzz");
});
