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
    Kms::open(Arc::new(store), vec![SecretBytes::copy_from(root)]).await
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

async fn open_ring(dir: &std::path::Path, roots: &[&[u8]]) -> Result<Kms, KmsError> {
    let store = SqliteStore::open(&dir.join("kw.db")).unwrap();
    Kms::open(Arc::new(store), roots.iter().map(|r| SecretBytes::copy_from(r)).collect()).await.map(|k| k.0)
}

fn aes(name: &str) -> CreateKey {
    CreateKey {
        name: name.into(),
        algorithm: KeyAlgorithm::Aes256Gcm,
        description: String::new(),
        rotate_every_secs: None,
    }
}

/// Root rotation re-wraps every key version and service key; an interrupted rotation (both
/// roots in the keyring, some records under each) resumes; afterwards only the new root opens
/// the store, and tokens, ciphertexts and secrets all survive.
#[tokio::test]
async fn root_rotation_rewraps_everything_and_resumes_after_interruption() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = ([7u8; 32], [8u8; 32]);
    let (kms, token) = open(dir.path(), &old).await.unwrap();
    let token = String::from_utf8(token.unwrap().expose().to_vec()).unwrap();
    kms.create_key(aes("a")).await.unwrap();
    kms.rotate_key("a").await.unwrap();
    let ctx = BTreeMap::new();
    let ct = kms.encrypt("a", b"before", &ctx).await.unwrap().ciphertext;
    let audit_key = kms.audit_key().expose().to_vec();
    let data = keyward_core::secretdata::SecretData::new(BTreeMap::from([("k".into(), "v".into())])).unwrap();
    kms.put_secret("s", data, None).await.unwrap();

    // Interrupted: the new root is installed, one key created under it, nothing re-wrapped.
    kms.begin_root_rotation(&SecretBytes::copy_from(&new)).await.unwrap();
    kms.create_key(aes("b")).await.unwrap();
    drop(kms);
    assert!(open_ring(dir.path(), &[&new]).await.is_err(), "old records still need the old root");

    // Resume with both roots, as the seal does after a crash.
    let kms = open_ring(dir.path(), &[&new, &old]).await.unwrap();
    assert_eq!(kms.root_keys(), 2);
    let r = kms.rewrap_under_newest_root().await.unwrap();
    assert_eq!((r.key_versions, r.service_keys), (2, 4), "a's two versions and the four service keys");
    let again = kms.rewrap_under_newest_root().await.unwrap();
    assert_eq!((again.key_versions, again.service_keys), (0, 0), "idempotent");
    kms.finish_root_rotation().unwrap();
    assert_eq!(kms.root_keys(), 1);
    drop(kms);

    let kms = open_ring(dir.path(), &[&new]).await.unwrap();
    assert!(open_ring(dir.path(), &[&old]).await.is_err(), "the old root opens nothing any more");
    assert_eq!(kms.decrypt(&ct, &ctx).await.unwrap().plaintext.expose(), b"before");
    kms.encrypt("b", b"x", &ctx).await.unwrap();
    assert!(kms.authenticate(&token).await.is_ok(), "tokens survive: the token key was re-wrapped, not changed");
    assert_eq!(kms.audit_key().expose(), &audit_key[..], "the audit chain key is unchanged");
    assert!(kms.get_secret("s", None).await.is_ok());
}

/// Two processes over one database (the KMS plugin and `keyward kms-plugin rotate` in local mode):
/// a rotation by one is seen by the other after `refresh_key`, and a key deleted and created
/// again under the same name is a different key.
#[tokio::test]
async fn refresh_key_sees_changes_made_by_another_service() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = open(dir.path(), &[3; 32]).await.unwrap();
    let (b, _) = open(dir.path(), &[3; 32]).await.unwrap();
    a.create_key(aes("k")).await.unwrap();
    let ctx = BTreeMap::new();
    assert_eq!(b.encrypt("k", b"x", &ctx).await.unwrap().key_version, 1);
    a.rotate_key("k").await.unwrap();
    assert_eq!(b.encrypt("k", b"x", &ctx).await.unwrap().key_version, 1, "cached until refreshed");
    assert_eq!(b.refresh_key("k").await.unwrap(), 2);
    let ct = b.encrypt("k", b"x", &ctx).await.unwrap();
    assert_eq!(ct.key_version, 2);
    assert_eq!(b.refresh_key("k").await.unwrap(), 2, "no change, no reload");
    assert_eq!(a.decrypt(&ct.ciphertext, &ctx).await.unwrap().plaintext.expose(), b"x");
    a.disable_key("k").await.unwrap();
    b.refresh_key("k").await.unwrap();
    assert!(matches!(b.encrypt("k", b"x", &ctx).await, Err(KmsError::KeyDisabled(_))));
    assert!(matches!(b.refresh_key("missing").await, Err(KmsError::NotFound { .. })));
}

/// Randomized values belong to an identity string: the same identity (two replicas of one
/// ServiceAccount) gets the same value, another identity a different one.
#[tokio::test]
async fn randomized_values_are_per_identity() {
    use keyward_core::random::{RandomKind, RandomSpec};
    let dir = tempfile::tempdir().unwrap();
    let (kms, _) = open(dir.path(), &[5; 32]).await.unwrap();
    let spec = RandomSpec { kind: RandomKind::ApiKey, length: 40, alphabet: None, ttl_secs: 3600, grace_secs: 60 };
    kms.define_random("api-key", &spec).await.unwrap();
    let now = now_unix();
    let a = kms.random_value("api-key", "k8s:payments/api", now).await.unwrap();
    let a2 = kms.random_value("api-key", "k8s:payments/api", now + 10).await.unwrap();
    let b = kms.random_value("api-key", "k8s:payments/worker", now).await.unwrap();
    assert_eq!(*a.value, *a2.value);
    assert_ne!(*a.value, *b.value);
    // An hour later the scheduler replaces both values, read or not.
    assert_eq!(kms.run_scheduled(now + 1800).await.unwrap().randomized_rotated, 0);
    assert_eq!(kms.run_scheduled(now + 3600).await.unwrap().randomized_rotated, 2);
    assert_eq!(kms.run_scheduled(now + 3601).await.unwrap().randomized_rotated, 0, "not twice");
    // Read then: the new value, and the previous one for one more minute.
    let r = kms.random_value("api-key", "k8s:payments/api", now + 3600).await.unwrap();
    assert_eq!(r.version, 2);
    assert_ne!(*r.value, *a.value);
    let (prev, until) = r.previous.unwrap();
    assert_eq!(*prev, *a.value);
    assert!(until > now + 3600);
    // The values are not readable through the secrets API.
    assert!(matches!(kms.list_secrets("", None, None).await.unwrap().0.as_slice(), []));
}
