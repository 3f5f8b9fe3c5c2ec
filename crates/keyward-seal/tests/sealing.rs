//! The seal state machine on its own, over the in-memory store: init, unseal with a threshold
//! of shares, wrong and repeated shares, seal, rekey, root rotation, and the dev file seal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use keyward_core::seal::SealKind;
use keyward_core::store::Store;
use keyward_seal::file::InsecureFileSeal;
use keyward_seal::{Progress, Sealing, SealingError};
use keyward_store::MemoryStore;

fn text(s: &keyward_crypto::SecretBytes) -> String {
    String::from_utf8(s.expose().to_vec()).unwrap()
}

async fn unseal(s: &Sealing, shares: &[String]) -> Result<Progress, SealingError> {
    let mut last = None;
    for sh in shares {
        last = Some(s.submit_unseal_share(sh, false).await?);
    }
    Ok(last.unwrap())
}

#[tokio::test]
async fn shamir_init_unseal_seal_and_wrong_shares() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let s = Sealing::new(store.clone(), SealKind::Shamir, None);
    assert!(matches!(
        s.submit_unseal_share("AAAA", false).await,
        Err(SealingError::Invalid(_) | SealingError::NotInitialized)
    ));
    assert!(!s.status().await.unwrap().initialized);

    let init = s.init(5, 3).await.unwrap();
    assert_eq!(init.shares.len(), 5);
    assert!(matches!(s.init(5, 3).await, Err(SealingError::AlreadyInitialized)));
    let shares: Vec<String> = init.shares.iter().map(text).collect();
    assert!(s.unsealed().is_none(), "a Shamir server stays sealed after init");

    // Two shares are not enough; the same share twice does not count twice.
    assert!(matches!(
        s.submit_unseal_share(&shares[0], false).await.unwrap(),
        Progress::Need { have: 1, threshold: 3 }
    ));
    assert!(matches!(s.submit_unseal_share(&shares[0], false).await, Err(SealingError::Invalid(_))));
    assert!(matches!(s.submit_unseal_share(&shares[1], false).await.unwrap(), Progress::Need { have: 2, .. }));
    // Any three distinct shares unseal; the root token works.
    assert!(matches!(s.submit_unseal_share(&shares[4], false).await.unwrap(), Progress::Unsealed));
    let kms = s.unsealed().unwrap().kms.clone();
    kms.authenticate(&text(&init.root_token)).await.unwrap();

    s.seal().await.unwrap();
    assert!(s.unsealed().is_none() && s.operator_sealed());
    assert!(matches!(s.seal().await, Err(SealingError::WrongState(_))));

    // A share of another init (at an index not yet given) makes the set wrong: refused, and
    // progress starts over.
    let other = Sealing::new(Arc::new(MemoryStore::new()), SealKind::Shamir, None).init(3, 2).await.unwrap();
    s.submit_unseal_share(&shares[0], false).await.unwrap();
    s.submit_unseal_share(&shares[1], false).await.unwrap();
    let forged = text(&other.shares[2]);
    match s.submit_unseal_share(&forged, false).await {
        Err(SealingError::WrongShares) => {}
        other => panic!("a foreign share must not unseal: {other:?}"),
    }
    assert_eq!(s.status().await.unwrap().progress, 0, "progress was reset");
    assert!(matches!(unseal(&s, &shares[2..5]).await.unwrap(), Progress::Unsealed));
    assert!(!s.operator_sealed());
}

#[tokio::test]
async fn a_rekey_replaces_the_shares_and_a_root_rotation_keeps_every_key() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let s = Sealing::new(store.clone(), SealKind::Shamir, None);
    let init = s.init(3, 2).await.unwrap();
    let old: Vec<String> = init.shares.iter().map(text).collect();
    unseal(&s, &old[..2]).await.unwrap();
    let kms = s.unsealed().unwrap().kms.clone();
    kms.create_key(keyward_core::service::CreateKey {
        name: "k".into(),
        algorithm: keyward_crypto::keys::KeyAlgorithm::Aes256Gcm,
        description: String::new(),
        rotate_every_secs: None,
    })
    .await
    .unwrap();
    let ct = kms.encrypt("k", b"kept", &BTreeMap::new()).await.unwrap().ciphertext;
    drop(kms);

    let nonce = s.rekey_start(4, 3).await.unwrap();
    s.rekey_submit(&nonce, &old[0]).await.unwrap();
    let new = match s.rekey_submit(&nonce, &old[2]).await.unwrap() {
        Progress::Rekeyed(shares) => shares.iter().map(text).collect::<Vec<_>>(),
        other => panic!("expected the new shares: {other:?}"),
    };
    assert_eq!(new.len(), 4);
    s.rotate_root().await.unwrap();
    s.seal().await.unwrap();

    // The old shares no longer unseal; three of the new ones do, and the key still decrypts.
    let fresh = Sealing::new(store.clone(), SealKind::Shamir, None);
    assert!(matches!(unseal(&fresh, &old).await, Err(SealingError::WrongShares)));
    assert!(matches!(unseal(&fresh, &new[1..4]).await.unwrap(), Progress::Unsealed));
    let kms = fresh.unsealed().unwrap().kms.clone();
    assert_eq!(kms.decrypt(&ct, &BTreeMap::new()).await.unwrap().plaintext.expose(), b"kept");
}

#[tokio::test]
async fn the_file_seal_opens_its_own_store_only() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let s = Sealing::new(store.clone(), SealKind::InsecureFile, None);
    let seal = InsecureFileSeal::new(dir.path().join("root-key.insecure"));
    let token = s.open_with_file_seal(&seal).await.unwrap().expect("a new store gives a root token");
    assert!(s.unsealed().is_some());
    assert!(matches!(s.init(3, 2).await, Err(SealingError::WrongState(_))));
    assert!(matches!(s.seal().await, Err(SealingError::WrongState(_))));

    // The same file opens the same store again (no new token); another file does not.
    let again = Sealing::new(store.clone(), SealKind::InsecureFile, None);
    assert!(again.open_with_file_seal(&seal).await.unwrap().is_none());
    again.unsealed().unwrap().kms.authenticate(&text(&token)).await.unwrap();
    let other = InsecureFileSeal::new(dir.path().join("other.insecure"));
    assert!(Sealing::new(store.clone(), SealKind::InsecureFile, None).open_with_file_seal(&other).await.is_err());

    // A Shamir server refuses this store's data instead of initialising over it.
    let shamir = Sealing::new(store, SealKind::Shamir, None);
    assert!(matches!(shamir.init(3, 2).await, Err(SealingError::AlreadyInitialized)));
    assert!(matches!(
        shamir.submit_unseal_share("AAAA", false).await,
        Err(SealingError::Invalid(_) | SealingError::WrongState(_))
    ));
}
