//! The service on its own, over the in-memory store: key lifecycle and crypto, tokens and their
//! limits, authorization, secrets, the scheduler and root rotation, with no HTTP and no disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use keyward_core::model::{KeyState, TokenRecord};
use keyward_core::policy::Policy;
use keyward_core::secretdata::SecretData;
use keyward_core::service::{CreateKey, TokenRequest};
use keyward_core::store::Store;
use keyward_core::{Kms, KmsError, now_unix};
use keyward_crypto::SecretBytes;
use keyward_crypto::keys::KeyAlgorithm;
use keyward_store::MemoryStore;

async fn open(store: &Arc<dyn Store>, roots: &[&SecretBytes]) -> (Kms, Option<SecretBytes>) {
    let keyring = roots.iter().map(|r| SecretBytes::copy_from(r.expose())).collect();
    Kms::open(store.clone(), keyring).await.unwrap()
}

async fn fresh() -> (Kms, Arc<TokenRecord>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let root = SecretBytes::random(32).unwrap();
    let (kms, token) = open(&store, &[&root]).await;
    let token = token.expect("a new store gives a root token");
    let who = kms.authenticate(std::str::from_utf8(token.expose()).unwrap()).await.unwrap();
    (kms, who)
}

fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn aes(name: &str) -> CreateKey {
    CreateKey {
        name: name.into(),
        algorithm: KeyAlgorithm::Aes256Gcm,
        description: String::new(),
        rotate_every_secs: None,
    }
}

fn token_request(policies: &[&str], max_uses: Option<u32>) -> TokenRequest {
    TokenRequest {
        policies: policies.iter().map(|p| p.to_string()).collect(),
        ttl_secs: Some(3600),
        max_uses,
        display_name: "test".into(),
        orphan: false,
        selectors: vec![],
        max_ttl_secs: None,
    }
}

#[tokio::test]
async fn the_root_token_is_given_once_and_only_its_holder_authenticates() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let root = SecretBytes::random(32).unwrap();
    let (kms, token) = open(&store, &[&root]).await;
    let token = token.unwrap();
    let who = kms.authenticate(std::str::from_utf8(token.expose()).unwrap()).await.unwrap();
    assert!(who.is_root());
    drop(kms);
    // Opening the same store again gives no second root token, and the first still works.
    let (kms, again) = open(&store, &[&root]).await;
    assert!(again.is_none());
    kms.authenticate(std::str::from_utf8(token.expose()).unwrap()).await.unwrap();
    assert!(matches!(kms.authenticate("kw_not-a-token").await, Err(KmsError::Unauthenticated(_))));
    // Another root key does not open the store.
    let other = SecretBytes::random(32).unwrap();
    assert!(Kms::open(store.clone(), vec![other]).await.is_err());
}

#[tokio::test]
async fn keys_encrypt_under_their_context_and_follow_their_lifecycle() {
    let (kms, _) = fresh().await;
    kms.create_key(aes("payments")).await.unwrap();
    assert!(matches!(kms.create_key(aes("payments")).await, Err(KmsError::AlreadyExists { .. })));

    let c = ctx(&[("tenant", "acme")]);
    let e = kms.encrypt("payments", b"card 4111", &c).await.unwrap();
    assert_eq!(e.key_version, 1);
    assert_eq!(kms.decrypt(&e.ciphertext, &c).await.unwrap().plaintext.expose(), b"card 4111");
    // The context is bound: another context, or none, does not open it; neither do changed bytes.
    assert!(matches!(kms.decrypt(&e.ciphertext, &ctx(&[("tenant", "evil")])).await, Err(KmsError::DecryptionFailed)));
    assert!(matches!(kms.decrypt(&e.ciphertext, &BTreeMap::new()).await, Err(KmsError::DecryptionFailed)));
    let mut flipped = e.ciphertext.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(matches!(kms.decrypt(&flipped, &c).await, Err(KmsError::DecryptionFailed)));

    // Rotation: new encryptions use version 2; version 1's ciphertexts still open.
    let d = kms.rotate_key("payments").await.unwrap();
    assert_eq!(d.record.current_version, 2);
    assert_eq!(kms.encrypt("payments", b"x", &c).await.unwrap().key_version, 2);
    assert_eq!(kms.decrypt(&e.ciphertext, &c).await.unwrap().key_version, 1);

    // Disabled: no operation; enabled again: all of them.
    kms.disable_key("payments").await.unwrap();
    assert!(matches!(kms.encrypt("payments", b"x", &c).await, Err(KmsError::KeyDisabled(_))));
    assert!(matches!(kms.decrypt(&e.ciphertext, &c).await, Err(KmsError::KeyDisabled(_))));
    kms.enable_key("payments").await.unwrap();
    kms.decrypt(&e.ciphertext, &c).await.unwrap();

    // A key of another type refuses what it cannot do.
    kms.create_key(CreateKey { algorithm: KeyAlgorithm::Ed25519, ..aes("signer") }).await.unwrap();
    assert!(matches!(kms.encrypt("signer", b"x", &c).await, Err(KmsError::WrongKeyType { .. })));
    let (sig, _) = kms.sign("signer", b"release").await.unwrap();
    assert!(kms.verify("signer", b"release", &sig).await.unwrap());
    assert!(!kms.verify("signer", b"other", &sig).await.unwrap());
}

#[tokio::test]
async fn the_scheduler_rotates_due_keys_and_purges_deleted_ones_only_when_due() {
    let (kms, _) = fresh().await;
    kms.create_key(CreateKey { rotate_every_secs: Some(86_400), ..aes("rotating") }).await.unwrap();
    kms.create_key(aes("doomed")).await.unwrap();
    let c = BTreeMap::new();
    let old = kms.encrypt("doomed", b"x", &c).await.unwrap();
    let d = kms.schedule_deletion("doomed", Some(7)).await.unwrap();
    assert_eq!(d.record.state, KeyState::PendingDeletion);
    let deletion_at = d.record.deletion_at.unwrap();

    let now = now_unix();
    let report = kms.run_scheduled(now).await.unwrap();
    assert!(report.rotated.is_empty() && report.purged.is_empty(), "{report:?}");

    let report = kms.run_scheduled(now + 86_400 + 1).await.unwrap();
    assert_eq!(report.rotated, vec!["rotating".to_string()]);
    assert!(report.purged.is_empty());
    assert_eq!(kms.describe_key("rotating").await.unwrap().record.current_version, 2);

    let report = kms.run_scheduled(deletion_at).await.unwrap();
    assert_eq!(report.purged, vec!["doomed".to_string()]);
    assert!(matches!(kms.describe_key("doomed").await, Err(KmsError::NotFound { .. })));
    assert!(matches!(kms.decrypt(&old.ciphertext, &c).await, Err(KmsError::DecryptionFailed)));
}

#[tokio::test]
async fn child_tokens_stay_within_their_parent_and_die_with_it() {
    let (kms, root) = fresh().await;
    let (parent_secret, parent) = kms.create_token(&root, token_request(&["root"], Some(3))).await.unwrap();
    let parent_str = std::str::from_utf8(parent_secret.expose()).unwrap().to_string();
    let parent_rec = kms.authenticate(&parent_str).await.unwrap(); // use 1 of 3
    // A child gets at most the parent's remaining uses, whatever it asks for.
    let (_, child) = kms.create_token(&parent_rec, token_request(&["root"], Some(100))).await.unwrap();
    assert!(child.max_uses.unwrap() <= 2, "child max_uses {:?}", child.max_uses);
    kms.authenticate(&parent_str).await.unwrap(); // 2
    kms.authenticate(&parent_str).await.unwrap(); // 3
    assert!(matches!(kms.authenticate(&parent_str).await, Err(KmsError::Unauthenticated(_))), "use limit");

    // Revoking the parent revokes its children.
    let revoked = kms.revoke_token(&parent.accessor).await.unwrap();
    assert!(revoked.contains(&child.accessor), "{revoked:?}");
    assert!(matches!(kms.lookup_token(&child.accessor).await, Err(KmsError::NotFound { .. })));
}

#[tokio::test]
async fn policies_deny_by_default_and_grant_only_what_they_name() {
    let (kms, root) = fresh().await;
    let policy: Policy = serde_json::from_value(serde_json::json!({
        "name": "app",
        "rules": [{"resources": ["secrets/app/*"], "operations": ["read"]}]
    }))
    .unwrap();
    kms.put_policy(policy).await.unwrap();
    let (_, app) = kms.create_token(&root, token_request(&["app"], None)).await.unwrap();
    kms.authorize(&app, "read", "secrets/app/db").unwrap();
    assert!(matches!(kms.authorize(&app, "write", "secrets/app/db"), Err(KmsError::PermissionDenied(_))));
    assert!(matches!(kms.authorize(&app, "read", "secrets/other/db"), Err(KmsError::PermissionDenied(_))));
    // A policy that names nothing here grants nothing here; a token needs at least one policy.
    assert!(matches!(kms.create_token(&root, token_request(&[], None)).await, Err(KmsError::InvalidArgument(_))));
    let unknown = kms.create_token(&root, token_request(&["no-such-policy"], None)).await;
    if let Ok((_, t)) = unknown {
        assert!(matches!(kms.authorize(&t, "read", "secrets/app/db"), Err(KmsError::PermissionDenied(_))));
    }
    kms.authorize(&root, "write", "anything/at/all").unwrap();
}

#[tokio::test]
async fn secrets_keep_versions_with_check_and_set() {
    let (kms, _) = fresh().await;
    let data = |v: &str| SecretData::new(BTreeMap::from([("password".to_string(), v.to_string())])).unwrap();
    assert_eq!(kms.put_secret("app/db", data("one"), Some(0)).await.unwrap(), 1);
    assert_eq!(kms.put_secret("app/db", data("two"), None).await.unwrap(), 2);
    assert!(matches!(kms.put_secret("app/db", data("lost"), Some(1)).await, Err(KmsError::Conflict(_))));
    assert_eq!(kms.get_secret("app/db", None).await.unwrap().data.expose()["password"], "two");
    assert_eq!(kms.get_secret("app/db", Some(1)).await.unwrap().data.expose()["password"], "one");

    kms.delete_secret("app/db", &[2]).await.unwrap();
    assert!(kms.get_secret("app/db", None).await.is_err(), "a deleted version is not read");
    kms.undelete_secret("app/db", &[2]).await.unwrap();
    kms.get_secret("app/db", None).await.unwrap();
    kms.destroy_secret("app/db", &[1]).await.unwrap();
    assert!(kms.get_secret("app/db", Some(1)).await.is_err(), "a destroyed version is gone");
    let (meta, versions) = kms.secret_versions("app/db").await.unwrap();
    assert_eq!((meta.current_version, versions.len()), (2, 2));
}

#[tokio::test]
async fn a_root_rotation_rewraps_everything_under_the_new_root() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let old = SecretBytes::random(32).unwrap();
    let (kms, token) = open(&store, &[&old]).await;
    kms.create_key(aes("k")).await.unwrap();
    let c = BTreeMap::new();
    let ct = kms.encrypt("k", b"before", &c).await.unwrap().ciphertext;
    let data = SecretData::new(BTreeMap::from([("v".to_string(), "s".to_string())])).unwrap();
    kms.put_secret("app/s", data, None).await.unwrap();

    let new = SecretBytes::random(32).unwrap();
    kms.begin_root_rotation(&new).await.unwrap();
    kms.rewrap_under_newest_root().await.unwrap();
    kms.finish_root_rotation().unwrap();
    assert_eq!(kms.root_keys(), 1);
    drop(kms);

    // The new root alone opens everything; the old one opens nothing.
    let (kms, _) = open(&store, &[&new]).await;
    assert_eq!(kms.decrypt(&ct, &c).await.unwrap().plaintext.expose(), b"before");
    assert_eq!(kms.get_secret("app/s", None).await.unwrap().data.expose()["v"], "s");
    kms.authenticate(std::str::from_utf8(token.unwrap().expose()).unwrap()).await.unwrap();
    assert!(Kms::open(store.clone(), vec![old]).await.is_err());
}
