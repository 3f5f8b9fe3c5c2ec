//! The PKCS#11 seal against a real SoftHSM2 token (Debian `softhsm2`), created by the test in
//! a temporary directory. SoftHSM2 finds its tokens through `SOFTHSM2_CONF`, read when the
//! library loads, so the test runs its body in a child process of this test binary that has
//! the variable set (the parent sets nothing in its own environment).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::process::Command;

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use keyward_crypto::SecretBytes;
use keyward_crypto::aead::AeadKey;
use keyward_hsm::{AAD, HsmError, Pkcs11Config, Pkcs11Seal};

const LIB: &str = keyward_test_support::softhsm::SOFTHSM_LIB;
const TOKEN: &str = "keyward-test";
const PIN: &str = "5678";
const CHILD: &str = "KEYWARD_HSM_TEST_CHILD";

/// In the parent: make a token and run `name` again in a child that sees it. True in the child.
fn in_child_with_token(name: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = keyward_test_support::softhsm::softhsm_token(dir.path(), TOKEN, PIN);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the test body failed in the child process");
    assert!(stdout.contains("1 passed"), "the child did not run the test body");
    false
}

fn config(key: &str, pin: &str) -> Pkcs11Config {
    Pkcs11Config {
        library: LIB.into(),
        token_label: TOKEN.into(),
        key_label: key.into(),
        pin: SecretBytes::copy_from(pin.as_bytes()),
    }
}

/// Put an AES key of known value into the token (as a test fixture only).
fn import_key(label: &str, value: &[u8], extractable: bool) {
    let ctx = Pkcs11::new(LIB).unwrap();
    let _ = ctx.initialize(CInitializeArgs::OsThreads);
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
        .unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    let _ = s.login(UserType::User, Some(&AuthPin::new(PIN.into())));
    s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Value(value.to_vec()),
        Attribute::Sensitive(!extractable),
        Attribute::Extractable(extractable),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ])
    .unwrap();
}

#[test]
fn wraps_the_unseal_key_with_a_non_extractable_key_in_softhsm() {
    if !in_child_with_token("wraps_the_unseal_key_with_a_non_extractable_key_in_softhsm") {
        return;
    }
    // Configuration and login problems are named.
    let e = Pkcs11Seal::open(&config("keyward-seal", "0000")).unwrap_err();
    assert!(matches!(e, HsmError::Login { .. }), "{e}");
    assert!(e.to_string().contains("PIN"), "{e}");
    let e = Pkcs11Seal::open(&Pkcs11Config { token_label: "nope".into(), ..config("k", PIN) }).unwrap_err();
    assert!(matches!(e, HsmError::NoToken(_)), "{e}");
    let e = Pkcs11Seal::open(&Pkcs11Config { library: "/nonexistent/lib.so".into(), ..config("k", PIN) }).unwrap_err();
    assert!(matches!(e, HsmError::Library { .. }), "{e}");
    assert!(!format!("{:?}", config("k", PIN)).contains(PIN), "the PIN is never printed");

    let seal = Pkcs11Seal::open(&config("keyward-seal", PIN)).unwrap();
    let key = SecretBytes::random(32).unwrap();
    assert!(matches!(seal.wrap_key(key.expose()), Err(HsmError::NoKey { .. })), "no key is made behind one's back");
    assert!(seal.ensure_key().unwrap(), "created");
    assert!(!seal.ensure_key().unwrap(), "found the second time");

    // The generated key can never leave the token.
    let ctx = Pkcs11::new(LIB).unwrap();
    let _ = ctx.initialize(CInitializeArgs::OsThreads);
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let s = ctx.open_ro_session(slot).unwrap();
    let _ = s.login(UserType::User, Some(&AuthPin::new(PIN.into())));
    let k = s.find_objects(&[Attribute::Label(b"keyward-seal".to_vec())]).unwrap();
    assert_eq!(k.len(), 1);
    let attrs = s
        .get_attributes(
            k[0],
            &[
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Sensitive,
                AttributeType::Token,
            ],
        )
        .unwrap();
    for a in &attrs {
        match a {
            Attribute::Extractable(b) => assert!(!b),
            Attribute::NeverExtractable(b) | Attribute::Sensitive(b) | Attribute::Token(b) => assert!(b),
            _ => {}
        }
    }
    assert_eq!(attrs.len(), 4);
    let value = s.get_attributes(k[0], &[AttributeType::Value]).unwrap_or_default();
    assert!(!value.iter().any(|a| matches!(a, Attribute::Value(_))), "the key's value cannot be read");

    // Round trip; every wrap has its own IV.
    let w1 = seal.wrap_key(key.expose()).unwrap();
    let w2 = seal.wrap_key(key.expose()).unwrap();
    assert_ne!(w1, w2);
    assert_eq!(w1.len(), 1 + 12 + 32 + 16);
    assert!(seal.unwrap_key(&w1).unwrap().ct_eq(key.expose()));
    assert!(seal.unwrap_key(&w2).unwrap().ct_eq(key.expose()));

    // Any change, truncation or extension fails with nothing more than "decryption failed".
    for i in 0..w1.len() {
        let mut bad = w1.clone();
        bad[i] ^= 0x01;
        let e = seal.unwrap_key(&bad).unwrap_err();
        assert!(matches!(e, HsmError::DecryptionFailed), "byte {i}: {e}");
        assert_eq!(e.to_string(), "decryption failed");
    }
    for bad in [&w1[..w1.len() - 1], &w1[..13], &[][..], &[w1.as_slice(), &[0u8; 64]].concat()[..]] {
        assert!(matches!(seal.unwrap_key(bad), Err(HsmError::DecryptionFailed)));
    }

    // Another HSM key does not open it.
    let other = Pkcs11Seal::open(&config("another-seal", PIN)).unwrap();
    other.ensure_key().unwrap();
    assert!(matches!(other.unwrap_key(&w1), Err(HsmError::DecryptionFailed)));

    // A key that could be exported is refused.
    import_key("leaky", &[7u8; 32], true);
    let leaky = Pkcs11Seal::open(&config("leaky", PIN)).unwrap();
    let e = leaky.wrap_key(key.expose()).unwrap_err();
    assert!(matches!(e, HsmError::UnfitKey { .. }) && e.to_string().contains("extractable"), "{e}");
    assert!(matches!(leaky.ensure_key(), Err(HsmError::UnfitKey { .. })));

    // The format is plain AES-256-GCM with the documented AAD: a key of known value in the
    // token and aws-lc's AES-GCM agree in both directions.
    let known = SecretBytes::copy_from(&[0x42u8; 32]);
    import_key("known", known.expose(), false);
    let known_seal = Pkcs11Seal::open(&config("known", PIN)).unwrap();
    let w = known_seal.wrap_key(key.expose()).unwrap();
    let aead = AeadKey::new(&known).unwrap();
    assert!(aead.open(AAD, &w[1..]).unwrap().ct_eq(key.expose()));
    assert!(aead.open(b"other purpose", &w[1..]).is_err());
    let mut theirs = vec![1u8];
    theirs.extend(aead.seal(AAD, key.expose()).unwrap());
    assert!(known_seal.unwrap_key(&theirs).unwrap().ct_eq(key.expose()));
}
