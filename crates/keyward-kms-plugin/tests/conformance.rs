//! Conformance: this test plays kube-apiserver's part exactly, through a client generated from
//! the upstream proto: Status polling, Encrypt of a 32-byte seed, Decrypt with the recorded
//! key_id and annotations, the rotation flow where key_id changes, a restart, unknown key ids,
//! oversize and malformed input, refused callers, and (service mode) a Keyward outage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use keyward_kms_plugin::plugin::{MAX_CIPHERTEXT, MAX_KEY_ID};
use keyward_kms_plugin::{CallerPolicy, Kek, kek};
use tonic::Code;

fn is_fqdn(k: &str) -> bool {
    k.split('.').count() >= 2 && k.split('.').all(|l| !l.is_empty())
}

/// What the apiserver checks of an Encrypt response before it adopts it.
fn apiserver_accepts(e: &apiserver::EncryptResponse, status_key_id: &str) {
    assert!(
        !e.ciphertext.is_empty() && e.ciphertext.len() <= MAX_CIPHERTEXT,
        "ciphertext {} bytes",
        e.ciphertext.len()
    );
    assert!(!e.key_id.is_empty() && e.key_id.len() <= MAX_KEY_ID);
    assert_eq!(e.key_id, status_key_id, "Encrypt's key_id must equal the latest Status key_id");
    let total: usize = e.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(total <= 32 * 1024 && e.annotations.keys().all(|k| is_fqdn(k)));
}

#[tokio::test]
async fn local_mode_apiserver_flow_rotation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kms");
    let socket = dir.path().join("kms.sock");
    let served = local(&data, &socket).await;
    let mut c = connect(&socket).await;

    // Startup: Status, then Encrypt of a fresh seed under the reported key_id.
    let s = status(&mut c).await;
    assert_eq!((s.version.as_str(), s.healthz.as_str()), ("v2", "ok"));
    let k1 = s.key_id.clone();
    assert!(k1.starts_with("keyward:k8s-secrets:") && k1.ends_with(":v1"), "{k1}");
    let seed1 = seed();
    let e1 = encrypt(&mut c, &seed1).await;
    apiserver_accepts(&e1, &k1);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), seed1);

    // Distinct plaintexts give distinct ciphertexts; the same plaintext too (random nonces).
    let e1b = encrypt(&mut c, &seed1).await;
    assert_ne!(e1.ciphertext, e1b.ciphertext);
    assert_ne!(encrypt(&mut c, &seed()).await.ciphertext, e1.ciphertext);

    // Rotation by the operator, from another process: Status reports a new key_id, Encrypt uses
    // it, data written before still decrypts.
    let rotated = kek::Local::rotate(&data, keyward_store::SqliteStore::open_shared, "k8s-secrets").await.unwrap();
    let k2 = wait_new_key_id(&mut c, &k1).await;
    assert_eq!(k2, rotated.key_id());
    assert!(k2.ends_with(":v2"));
    let seed2 = seed();
    let e2 = encrypt(&mut c, &seed2).await;
    apiserver_accepts(&e2, &k2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), seed1, "old key_id still decrypts");
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), seed2);

    // A ciphertext presented under another key_id is refused.
    let mut swapped = e1.clone();
    swapped.key_id = k2.clone();
    let err = decrypt(&mut c, &swapped).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "decryption failed"));

    // Restart: the same key_id, and everything decrypts.
    drop(c);
    served.stop().await;
    let served = local(&data, &socket).await;
    let mut c = connect(&socket).await;
    assert_eq!(status(&mut c).await.key_id, k2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), seed1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), seed2);

    // Every Encrypt and Decrypt was audited, and the rotation observed.
    let records = audit_records(&data);
    assert!(records.iter().any(|r| r["path"] == "/v2.KeyManagementService/Decrypt" && r["decision"] == "allow"));
    assert!(records.iter().any(|r| r["reason"].as_str().is_some_and(|s| s.contains("key_id changed"))));
    served.stop().await;
}

#[tokio::test]
async fn bad_requests_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let served = local(&dir.path().join("kms"), &socket).await;
    let mut c = connect(&socket).await;
    let key_id = status(&mut c).await.key_id;
    let good = encrypt(&mut c, &seed()).await;
    let code = |r: Result<Vec<u8>, tonic::Status>| r.unwrap_err().code();

    // Encrypt accepts only the 32-byte seed.
    for n in [0, 16, 31, 33, 4096] {
        let e = c.encrypt(apiserver::EncryptRequest { plaintext: vec![1; n], uid: uuid() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{n} bytes");
        assert!(e.message().contains("32-byte"), "{}", e.message());
    }
    // Unknown and malformed key ids.
    for bad in ["", "A_001", "keyward:k8s-secrets:00:v1", &format!("{key_id}0"), &"k".repeat(MAX_KEY_ID + 1)] {
        let mut e = good.clone();
        e.key_id = bad.to_string();
        let got = code(decrypt(&mut c, &e).await);
        assert!(matches!(got, Code::NotFound | Code::InvalidArgument), "{bad}: {got:?}");
    }
    let mut e = good.clone();
    e.key_id = "A_001".into();
    assert_eq!(code(decrypt(&mut c, &e).await), Code::NotFound);
    // Oversize, empty, truncated and tampered ciphertexts.
    for ct in [vec![], vec![0; MAX_CIPHERTEXT + 1], good.ciphertext[..good.ciphertext.len() - 1].to_vec(), {
        let mut t = good.ciphertext.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        t
    }] {
        let mut e = good.clone();
        e.ciphertext = ct;
        assert_eq!(code(decrypt(&mut c, &e).await), Code::InvalidArgument);
    }
    // Annotations the plugin never issued, malformed or too large.
    for ann in [
        HashMap::from([("injected.example.com".to_string(), b"x".to_vec())]),
        HashMap::from([("not-a-domain".to_string(), vec![])]),
        HashMap::from([("big.example.com".to_string(), vec![0; 33 * 1024])]),
    ] {
        let mut e = good.clone();
        e.annotations = ann;
        assert_eq!(code(decrypt(&mut c, &e).await), Code::InvalidArgument);
    }
    // A message over the decoder's limit is refused by gRPC itself.
    let huge = c.encrypt(apiserver::EncryptRequest { plaintext: vec![0; 200 * 1024], uid: uuid() }).await.unwrap_err();
    assert_eq!(huge.code(), Code::OutOfRange);
    // The good one still works: nothing above left the plugin in a bad state.
    assert_eq!(decrypt(&mut c, &good).await.unwrap().len(), 32);
    served.stop().await;
}

#[tokio::test]
async fn refused_callers_get_permission_denied_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kms");
    let socket = dir.path().join("kms.sock");
    // First write something as an allowed caller.
    let served = local(&data, &socket).await;
    let mut c = connect(&socket).await;
    let e = encrypt(&mut c, &seed()).await;
    drop(c);
    served.stop().await;

    // Now only another uid is allowed; then only another executable.
    let others = [
        CallerPolicy { uids: [my_uid().wrapping_add(4242)].into(), exe_sha256: vec![] },
        CallerPolicy { uids: [my_uid()].into(), exe_sha256: vec![[0x11; 32]] },
    ];
    for policy in others {
        let (l, audit) =
            kek::Local::open(&data, keyward_store::SqliteStore::open_shared, "k8s-secrets", None).await.unwrap();
        let served = serve(Kek::Local(l), audit, &socket, policy).await;
        let mut c = connect(&socket).await;
        assert_eq!(status(&mut c).await.healthz, "ok", "Status stays available for health checks");
        let err = decrypt(&mut c, &e).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(!err.message().contains("kms"), "{}", err.message());
        let err = c.encrypt(apiserver::EncryptRequest { plaintext: seed(), uid: uuid() }).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        served.stop().await;
    }
    let denied: Vec<_> = audit_records(&data).into_iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denied.len(), 4, "{denied:#?}");
    assert!(denied[0]["identity"].as_str().unwrap().starts_with(&format!("unix:uid:{} ", my_uid())));
    assert!(denied[2]["identity"].as_str().unwrap().contains("unix:sha256:"), "the executable was measured");
    assert!(denied[2]["reason"].as_str().unwrap().contains("executable is not allowed"));
}

/// This test's own executable, allowed by its SHA-256: Encrypt and Decrypt work.
#[tokio::test]
async fn an_allowed_executable_may_call() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::fs::read("/proc/self/exe").unwrap();
    let digest: [u8; 32] = keyward_crypto::hash::sha256(&exe);
    let (l, audit) =
        kek::Local::open(&dir.path().join("kms"), keyward_store::SqliteStore::open_shared, "k8s-secrets", None)
            .await
            .unwrap();
    let socket = dir.path().join("kms.sock");
    let served =
        serve(Kek::Local(l), audit, &socket, CallerPolicy { uids: [my_uid()].into(), exe_sha256: vec![digest] }).await;
    let mut c = connect(&socket).await;
    let s = seed();
    let e = encrypt(&mut c, &s).await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), s);
    served.stop().await;
}

use keyward_test_support::server::dev_server;

#[tokio::test]
async fn service_mode_rotation_outage_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let server_data = dir.path().join("server");
    let running = dev_server(&server_data, "127.0.0.1:0").await;
    let listen = running.addr.to_string();
    let addr = format!("http://{listen}");
    let root = std::fs::read_to_string(running.root_token_file.as_ref().unwrap()).unwrap();
    let admin = keyward_client::Client::builder(addr.clone()).token(root.trim()).build().unwrap();
    admin.create_key("k8s-secrets", "aes256-gcm", "", None).await.unwrap();
    let client = keyward_client::Client::builder(addr.clone())
        .token(root.trim())
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (s, audit) = kek::Service::open(client, "k8s-secrets", &dir.path().join("plugin")).unwrap();
    let socket = dir.path().join("kms.sock");
    let served = serve(Kek::Service(s), audit, &socket, allow_me()).await;
    let mut c = connect(&socket).await;

    let k1 = status(&mut c).await;
    assert_eq!(k1.healthz, "ok");
    let seed1 = seed();
    let e1 = encrypt(&mut c, &seed1).await;
    apiserver_accepts(&e1, &k1.key_id);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), seed1);

    // Rotating the Keyward key is all the operator does.
    admin.key_action("k8s-secrets", "rotate").await.unwrap();
    let k2 = wait_new_key_id(&mut c, &k1.key_id).await;
    let seed2 = seed();
    let e2 = encrypt(&mut c, &seed2).await;
    apiserver_accepts(&e2, &k2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), seed1);

    // Outage: Status says so; seeds already unwrapped still decrypt; others cannot.
    running.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let s = status(&mut c).await;
    assert_ne!(s.healthz, "ok");
    assert!(s.healthz.len() <= 201 && s.healthz.contains("unavailable"), "{}", s.healthz);
    assert_eq!(s.key_id, k2, "the last key_id is still reported");
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), seed1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), seed2, "a seed wrapped here is remembered too");
    let never_seen = apiserver::EncryptResponse {
        ciphertext: {
            let mut t = e2.ciphertext.clone();
            t[40] ^= 1;
            t
        },
        ..e2.clone()
    };
    assert_eq!(decrypt(&mut c, &never_seen).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(
        c.encrypt(apiserver::EncryptRequest { plaintext: seed(), uid: uuid() }).await.unwrap_err().code(),
        Code::Unavailable
    );
    let records = audit_records(&dir.path().join("plugin"));
    assert!(records.iter().any(|r| r["reason"].as_str().is_some_and(|s| s.contains("outage cache"))));

    // Keyward returns on the same address: the plugin recovers by itself.
    let running = dev_server(&server_data, &listen).await;
    let mut healthy = false;
    for _ in 0..100 {
        if status(&mut c).await.healthz == "ok" {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "the plugin did not recover");
    assert_eq!(decrypt(&mut c, &never_seen).await.unwrap_err().code(), Code::InvalidArgument);

    // Revoking the plugin's access is never papered over by the cache.
    admin.key_action("k8s-secrets", "disable").await.unwrap();
    assert_eq!(decrypt(&mut c, &e1).await.unwrap_err().code(), Code::FailedPrecondition);
    served.stop().await;
    running.shutdown().await.unwrap();
}
