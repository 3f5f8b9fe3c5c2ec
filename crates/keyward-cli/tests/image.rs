//! `keyward image encrypt|decrypt|inspect`, run as the binary, with openssl-made keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_test_support::oci;

use std::process::{Command, Output};

use oci::{layer_blobs, make_image, manifest, openssl_key};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

fn keyward(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn encrypt_inspect_decrypt_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let original = make_image(&t.join("src"), "v1", &[200_000, -(1 << 20)]);
    let (rsa, rsa_pub) = openssl_key(t, "rsa", "rsa2048");
    let (_, ec_pub) = openssl_key(t, "ec", "p521");
    let oci = |name: &str| format!("oci:{}:v1", t.join(name).display());

    let out = keyward(&[
        "image",
        "encrypt",
        "--recipient",
        &format!("jwe:{}", rsa_pub.display()),
        "--recipient",
        &format!("jwe:{}", ec_pub.display()),
        "--layer",
        "-1",
        &oci("src"),
        &oci("enc"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("layers_changed    1"), "{}", text(&out.stdout));
    assert!(out.stderr.is_empty(), "no progress display when stderr is not a terminal: {}", text(&out.stderr));
    let m = manifest(&t.join("enc"), "v1");
    assert_eq!(m["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    assert_eq!(m["layers"][1]["mediaType"], "application/vnd.oci.image.layer.v1.tar+encrypted");

    let out = keyward(&["-o", "json", "image", "inspect", &oci("enc")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info[0]["encrypted"], false);
    assert_eq!(info[1]["encrypted"], true);
    assert_eq!(info[1]["cipher"], "AES_256_CTR_HMAC_SHA256");
    let recipients = info[1]["jwe_recipients"].as_array().unwrap();
    assert_eq!(recipients.len(), 2);
    assert_eq!(recipients[0]["alg"], "RSA-OAEP-256");
    assert_eq!(recipients[1]["alg"], "ECDH-ES+A256KW");
    assert_eq!(recipients[1]["curve"], "P-521");
    assert!(recipients.iter().all(|r| r["kid"].as_str().is_some_and(|k| k.len() == 43)));

    let out = keyward(&["image", "decrypt", "--key", rsa.to_str().unwrap(), &oci("enc"), &oci("dec")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("unwrap_attempts   1"), "{}", text(&out.stdout));
    assert!(layer_blobs(&t.join("dec"), "v1") == original, "layers differ");

    // Errors: each says what to fix, and fails.
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec![
                "image".into(),
                "encrypt".into(),
                "--recipient".into(),
                rsa_pub.display().to_string(),
                oci("src"),
                oci("x"),
            ],
            "expected jwe:PUBLIC_KEY_FILE",
        ),
        (
            vec![
                "image".into(),
                "encrypt".into(),
                "--recipient".into(),
                format!("jwe:{}", rsa.display()),
                oci("src"),
                oci("x"),
            ],
            "is not a public key",
        ),
        (
            vec!["image".into(), "decrypt".into(), "--key".into(), rsa_pub.display().to_string(), oci("enc"), oci("x")],
            "PEM block is not a private key",
        ),
        (vec!["image".into(), "inspect".into(), "docker://alpine".into()], "expected oci:DIR[:TAG]"),
        (
            vec![
                "image".into(),
                "encrypt".into(),
                "--recipient".into(),
                format!("jwe:{}", ec_pub.display()),
                "--layer".into(),
                "5".into(),
                oci("src"),
                oci("x"),
            ],
            "layer 5 does not exist: the image has 2 layers",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = keyward(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(text(&out.stderr).contains(expected), "{args:?}: {}", text(&out.stderr));
    }
    let (stranger, _) = openssl_key(t, "stranger", "p256");
    let out = keyward(&["image", "decrypt", "--key", stranger.to_str().unwrap(), &oci("enc"), &oci("y")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("none of the 1 private key(s) given matches any of its 2 recipient(s)"),
        "{}",
        text(&out.stderr)
    );
    assert!(!t.join("y/index.json").exists());
}
