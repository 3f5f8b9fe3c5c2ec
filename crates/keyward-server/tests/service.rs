//! Service-level tests over the real SQLite store: scheduled rotation and purge (with an
//! injected clock), root key checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use keyward_core::service::CreateKey;
use keyward_core::{Kms, KmsError, now_unix};
use keyward_crypto::SecretBytes;
use keyward_crypto::keys::KeyAlgorithm;
use keyward_store::SqliteStore;

async fn open(dir: &std::path::Path, root: &[u8]) -> Result<(Kms, Option<SecretBytes>), KmsError> {
    let store = SqliteStore::open(&dir.join("kw.db")).unwrap();
    Kms::open(Arc::new(store), SecretBytes::copy_from(root)).await
}

#[tokio::test]
async fn scheduled_rotation_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let (kms, token) = open(dir.path(), &[1; 32]).await.unwrap();
    assert!(token.is_some(), "first open creates the root token");
    let day = 86400;
    kms.create_key(CreateKey {
        name: "auto".into(),
        algorithm: KeyAlgorithm::Aes256Gcm,
        description: String::new(),
        rotate_every_secs: Some(90 * day as u64),
    })
    .await
    .unwrap();
    kms.create_key(CreateKey {
        name: "doomed".into(),
        algorithm: KeyAlgorithm::Ed25519,
        description: String::new(),
        rotate_every_secs: None,
    })
    .await
    .unwrap();
    let ct = kms.encrypt("auto", b"old", &BTreeMap::new()).await.unwrap();
    kms.schedule_deletion("doomed", Some(1)).await.unwrap();

    let now = now_unix();
    let r = kms.run_scheduled(now + day / 2).await.unwrap();
    assert!(r.rotated.is_empty() && r.purged.is_empty(), "nothing due yet: {r:?}");

    let r = kms.run_scheduled(now + 2 * day).await.unwrap();
    assert_eq!(r.purged, vec!["doomed".to_string()]);
    assert!(r.rotated.is_empty());
    assert!(matches!(kms.describe_key("doomed").await, Err(KmsError::NotFound { .. })));
    assert!(kms.run_scheduled(now + 89 * day).await.unwrap().rotated.is_empty(), "rotation not due before 90 days");

    let r = kms.run_scheduled(now + 91 * day).await.unwrap();
    assert_eq!(r.rotated, vec!["auto".to_string()]);
    let d = kms.describe_key("auto").await.unwrap();
    assert_eq!(d.record.current_version, 2);
    assert_eq!(d.record.next_rotation_at, Some(now + 91 * day + 90 * day), "next rotation one period later");
    assert_eq!(kms.run_scheduled(now + 92 * day).await.unwrap(), Default::default(), "not rotated twice");
    assert_eq!(kms.decrypt(&ct.ciphertext, &BTreeMap::new()).await.unwrap().plaintext.expose(), b"old");
    assert_eq!(kms.encrypt("auto", b"new", &BTreeMap::new()).await.unwrap().key_version, 2);

    // Disabled keys are not rotated while disabled.
    kms.disable_key("auto").await.unwrap();
    assert!(kms.run_scheduled(now + 400 * day).await.unwrap().rotated.is_empty());
}

#[tokio::test]
async fn wrong_root_key_is_refused_and_reopen_keeps_token() {
    let dir = tempfile::tempdir().unwrap();
    let (kms, token) = open(dir.path(), &[7; 32]).await.unwrap();
    let token = String::from_utf8(token.unwrap().expose().to_vec()).unwrap();
    assert!(kms.authenticate(&token).await.unwrap().is_root());
    assert!(kms.authenticate("kwt_nope").await.is_err());
    drop(kms);
    let err = open(dir.path(), &[8; 32]).await.unwrap_err();
    assert!(err.to_string().contains("internal") || matches!(err, KmsError::Internal(_)));
    let (kms, again) = open(dir.path(), &[7; 32]).await.unwrap();
    assert!(again.is_none(), "root token is created once");
    assert!(kms.authenticate(&token).await.is_ok());
}
