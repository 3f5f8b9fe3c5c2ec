//! Interoperability with an independent ocicrypt implementation: skopeo (Go ocicrypt + go-jose),
//! with keys made by openssl. Both directions, RSA and EC recipients, several recipients, and
//! the failures that must leave no plaintext behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use keyward_ocicrypt::{DecryptOptions, ImageRef, OcicryptError, PrivateKey, PublicKey, decrypt_image, inspect_image};
use keyward_test_support::oci::*;

fn private(path: &Path) -> PrivateKey {
    PrivateKey::from_bytes(&std::fs::read(path).unwrap(), &path.display().to_string()).unwrap()
}

fn public(path: &Path) -> PublicKey {
    PublicKey::from_bytes(&std::fs::read(path).unwrap(), &path.display().to_string()).unwrap()
}

fn oci(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

fn decrypt_with(src: &str, dst: &str, keys: &[PrivateKey]) -> keyward_ocicrypt::Result<keyward_ocicrypt::Report> {
    decrypt_image(
        &ImageRef::parse(src).unwrap(),
        &ImageRef::parse(dst).unwrap(),
        &DecryptOptions { keys, providers: &[], parallelism: 0, durable: false, progress: None },
    )
}

/// Files (blobs, index) in a layout, for "nothing was left behind" checks.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("blobs/sha256")) {
        for e in entries {
            out.push(e.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    if dir.join("index.json").exists() {
        out.push("index.json".into());
    }
    out.sort();
    out
}

#[test]
fn skopeo_encrypts_keyward_decrypts() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let skopeo = Skopeo::new(t);
    let src = t.join("src");
    // The last layer is uncompressed: skopeo compresses it before encrypting, and records the
    // uncompressed digest in the private options (see cipher.rs).
    let original = make_image(&src, "v1", &[1, 70_000, 1 << 20, -(3 * (1 << 20) + 17)]);
    let keys: Vec<_> =
        ["rsa2048", "rsa3072", "p256", "p384", "p521"].iter().map(|k| (k.to_string(), openssl_key(t, k, k))).collect();

    // One RSA recipient.
    let (ok, err) = skopeo.copy(
        &["--encryption-key".into(), format!("jwe:{}", keys[0].1.1.display())],
        &oci(&src, "v1"),
        &oci(&t.join("one"), "v1"),
    );
    assert!(ok, "skopeo encrypt: {err}");
    let r = decrypt_with(&oci(&t.join("one"), "v1"), &oci(&t.join("one-dec"), "v1"), &[private(&keys[0].1.0)]).unwrap();
    assert_eq!(r.layers_changed, 4);
    let ours = layer_blobs(&t.join("one-dec"), "v1");
    assert!(ours[..3] == original[..3], "the gzip layers come back byte for byte");
    let (ok, err) = skopeo.copy(
        &["--decryption-key".into(), keys[0].1.0.display().to_string()],
        &oci(&t.join("one"), "v1"),
        &oci(&t.join("one-skdec"), "v1"),
    );
    assert!(ok, "skopeo decrypt: {err}");
    assert!(layer_blobs(&t.join("one-skdec"), "v1") == ours, "same layers as skopeo's own decryption");
    assert_eq!(manifest(&t.join("one-skdec"), "v1"), manifest(&t.join("one-dec"), "v1"));

    // Every key type as a recipient at once; each private key alone decrypts.
    let mut flags = Vec::new();
    for (_, (_, public)) in &keys {
        flags.push("--encryption-key".to_string());
        flags.push(format!("jwe:{}", public.display()));
    }
    let (ok, err) = skopeo.copy(&flags, &oci(&src, "v1"), &oci(&t.join("many"), "v1"));
    assert!(ok, "skopeo encrypt: {err}");
    let info = inspect_image(&ImageRef::parse(&oci(&t.join("many"), "v1")).unwrap()).unwrap();
    assert!(info.iter().all(|l| l.encrypted && l.jwe_recipients.len() == 5 && l.problems.is_empty()), "{info:?}");
    for (name, (private_path, _)) in &keys {
        let dst = t.join(format!("many-dec-{name}"));
        let r = decrypt_with(&oci(&t.join("many"), "v1"), &oci(&dst, "v1"), &[private(private_path)])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(layer_blobs(&dst, "v1") == ours, "{name}: layers differ");
        // Trial decryption (skopeo writes no kid) is remembered across layers: after the first
        // layer, each layer costs one unwrap.
        assert!(r.unwrap_attempts.unwrap() <= 5 + 3, "{name}: {:?} unwraps", r.unwrap_attempts);
        // The decrypted manifest is the one skopeo itself produces when decrypting.
        let sk = t.join(format!("many-skdec-{name}"));
        let (ok, err) = skopeo.copy(
            &["--decryption-key".into(), private_path.display().to_string()],
            &oci(&t.join("many"), "v1"),
            &oci(&sk, "v1"),
        );
        assert!(ok, "skopeo decrypt {name}: {err}");
        assert_eq!(manifest(&sk, "v1"), manifest(&dst, "v1"), "{name}");
    }
}

#[test]
fn keyward_encrypts_skopeo_decrypts() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let skopeo = Skopeo::new(t);
    let src = t.join("src");
    let original = make_image(&src, "v1", &[10, 2 * (1 << 20) + 5, -300_000]);
    let keys: Vec<_> = ["rsa2048", "p256", "p384", "p521"].iter().map(|k| openssl_key(t, k, k)).collect();
    let recipients: Vec<PublicKey> = keys.iter().map(|(_, p)| public(p)).collect();
    let enc = t.join("enc");
    encrypt_to(&oci(&src, "v1"), &oci(&enc, "v1"), &recipients, &[0, -1]).unwrap();
    let m = manifest(&enc, "v1");
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip+encrypted");
    assert_eq!(layers[1]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip", "layer 1 was not selected");
    assert_eq!(layers[2]["mediaType"], "application/vnd.oci.image.layer.v1.tar+encrypted");
    // The untouched layer and the config are the same files.
    assert!(std::fs::read(blob_path(&enc, layers[1]["digest"].as_str().unwrap())).unwrap() == original[1]);
    assert!(std::fs::read(blob_path(&enc, layers[0]["digest"].as_str().unwrap())).unwrap() != original[0]);

    for (i, (private_path, _)) in keys.iter().enumerate() {
        let dst = t.join(format!("dec{i}"));
        let (ok, err) = skopeo.copy(
            &["--decryption-key".into(), private_path.display().to_string()],
            &oci(&enc, "v1"),
            &oci(&dst, "v1"),
        );
        assert!(ok, "skopeo decrypt with {}: {err}", private_path.display());
        assert!(layer_blobs(&dst, "v1") == original, "{}: layers differ", private_path.display());
    }
    // Our own decryption uses the kid hints: exactly one unwrap per encrypted layer even with
    // several keys offered, whichever comes first.
    let all: Vec<PrivateKey> = keys.iter().rev().map(|(p, _)| private(p)).collect();
    let r = decrypt_with(&oci(&enc, "v1"), &oci(&t.join("kdec"), "v1"), &all).unwrap();
    assert_eq!(r.unwrap_attempts, Some(2));
    assert!(layer_blobs(&t.join("kdec"), "v1") == original, "layers differ");

    // A key that is not a recipient: skopeo refuses too.
    let (stranger, _) = openssl_key(t, "stranger", "p256");
    let (ok, _) = skopeo.copy(
        &["--decryption-key".into(), stranger.display().to_string()],
        &oci(&enc, "v1"),
        &oci(&t.join("nope"), "v1"),
    );
    assert!(!ok);
}

#[test]
fn failures_leave_no_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    make_image(&src, "v1", &[3 * (1 << 20), 4096]);
    let (private_path, public_path) = openssl_key(t, "k", "p256");
    let enc = t.join("enc");
    encrypt_to(&oci(&src, "v1"), &oci(&enc, "v1"), &[public(&public_path)], &[]).unwrap();
    let key = private(&private_path);
    let m = manifest(&enc, "v1");
    let layer0 = blob_path(&enc, m["layers"][0]["digest"].as_str().unwrap());
    let pristine = std::fs::read(&layer0).unwrap();

    let check_nothing_left = |dst: &Path| {
        assert!(files(dst).is_empty(), "left behind in {}: {:?}", dst.display(), files(dst));
    };

    // A flipped byte in the middle of a layer.
    let mut flipped = pristine.clone();
    flipped[(1 << 20) + 12345] ^= 0x40;
    std::fs::write(&layer0, &flipped).unwrap();
    let dst = t.join("out-flipped");
    let e = decrypt_with(&oci(&enc, "v1"), &oci(&dst, "v1"), std::slice::from_ref(&key)).unwrap_err();
    assert!(matches!(e, OcicryptError::DecryptionFailed { .. }), "{e}");
    assert!(e.to_string().ends_with("decryption failed"), "{e}");
    check_nothing_left(&dst);

    // A truncated blob.
    std::fs::write(&layer0, &pristine[..pristine.len() - 100]).unwrap();
    let dst = t.join("out-truncated");
    let e = decrypt_with(&oci(&enc, "v1"), &oci(&dst, "v1"), std::slice::from_ref(&key)).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    check_nothing_left(&dst);
    std::fs::write(&layer0, &pristine).unwrap();

    // A wrong key.
    let (other, _) = openssl_key(t, "other", "rsa2048");
    let dst = t.join("out-wrong-key");
    let e = decrypt_with(&oci(&enc, "v1"), &oci(&dst, "v1"), &[private(&other)]).unwrap_err();
    assert!(matches!(e, OcicryptError::NoMatchingKey { keys: 1, recipients: 1, .. }), "{e}");
    check_nothing_left(&dst);

    // Malformed annotations: rewrite the manifest (and the index pointing at it).
    let cases: [(&str, &str, &str); 4] = [
        ("org.opencontainers.image.enc.pubopts", "%%%", "not base64"),
        ("org.opencontainers.image.enc.pubopts", "e30=", "no cipher type"),
        ("org.opencontainers.image.enc.keys.jwe", "bm90IGEgandl", "invalid JWE"),
        ("org.opencontainers.image.enc.keys.jwe", "", "has no recipient for the keys"),
    ];
    for (i, (annotation, value, expected)) in cases.iter().enumerate() {
        let bad = t.join(format!("bad{i}"));
        copy_dir(&enc, &bad);
        let mut m = manifest(&bad, "v1");
        if value.is_empty() {
            m["layers"][1]["annotations"].as_object_mut().unwrap().remove(*annotation);
        } else {
            m["layers"][1]["annotations"][*annotation] = serde_json::Value::String(value.to_string());
        }
        let bytes = serde_json::to_vec(&m).unwrap();
        let digest = put_blob(&bad, &bytes);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
        std::fs::write(bad.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        let dst = t.join(format!("out-bad{i}"));
        let e = decrypt_with(&oci(&bad, "v1"), &oci(&dst, "v1"), std::slice::from_ref(&key)).unwrap_err();
        assert!(e.to_string().contains(expected), "{annotation}={value}: {e}");
        check_nothing_left(&dst);
    }

    // And the pristine image still decrypts.
    decrypt_with(&oci(&enc, "v1"), &oci(&t.join("ok"), "v1"), &[key]).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("blobs/sha256")).unwrap();
    for f in ["index.json", "oci-layout"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    for e in std::fs::read_dir(from.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join("blobs/sha256").join(e.file_name())).unwrap();
    }
}

/// A multi-platform image (an index of two platforms sharing a layer, plus a build
/// attestation): Keyward encrypts every platform and skopeo (`--all`) decrypts them; skopeo
/// encrypts every platform and Keyward decrypts them.
#[test]
fn multi_platform_images_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let skopeo = Skopeo::new(t);
    let (amd, arm) = make_index(&t.join("src"), "v1", true);
    let (private_path, public_path) = openssl_key(t, "k", "p384");

    let r = encrypt_to(&oci(&t.join("src"), "v1"), &oci(&t.join("enc"), "v1"), &[public(&public_path)], &[]).unwrap();
    assert_eq!(r.layers_changed, 3, "the shared layer is encrypted once");
    assert_eq!(r.layers_unchanged, 1, "the attestation's statement is copied");
    let info = inspect_image(&ImageRef::parse(&oci(&t.join("enc"), "v1")).unwrap()).unwrap();
    let platforms: Vec<_> = info.iter().map(|l| (l.platform.clone().unwrap(), l.encrypted)).collect();
    assert_eq!(
        platforms,
        [
            ("linux/amd64", true),
            ("linux/amd64", true),
            ("linux/arm64", true),
            ("linux/arm64", true),
            ("unknown/unknown", false)
        ]
        .map(|(p, e)| (p.to_string(), e))
    );
    assert_eq!(info[0].digest, info[2].digest, "both platforms point at the one encrypted shared layer");

    let (ok, err) = skopeo.copy(
        &["--all".into(), "--decryption-key".into(), private_path.display().to_string()],
        &oci(&t.join("enc"), "v1"),
        &oci(&t.join("skdec"), "v1"),
    );
    assert!(ok, "skopeo decrypt --all: {err}");
    let layers = platform_layers(&t.join("skdec"), "v1");
    assert!(layers["linux/amd64"] == amd && layers["linux/arm64"] == arm, "platform layers differ");

    // skopeo cannot encrypt an index holding an attestation ("no counterpart for mediatype
    // application/vnd.in-toto+json"), so it gets one without.
    make_index(&t.join("src-plain"), "v1", false);
    let (ok, err) = skopeo.copy(
        &["--all".into(), "--encryption-key".into(), format!("jwe:{}", public_path.display())],
        &oci(&t.join("src-plain"), "v1"),
        &oci(&t.join("skenc"), "v1"),
    );
    assert!(ok, "skopeo encrypt --all: {err}");
    decrypt_with(&oci(&t.join("skenc"), "v1"), &oci(&t.join("kdec"), "v1"), &[private(&private_path)]).unwrap();
    let layers = platform_layers(&t.join("kdec"), "v1");
    assert!(layers["linux/amd64"] == amd && layers["linux/arm64"] == arm, "platform layers differ");
}
