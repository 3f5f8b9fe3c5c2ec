//! The conformance suite every [`Store`] backend must pass.
//!
//! Call [`run_all`] from a backend's tests with a fresh, empty store. Each check panics with a
//! message naming the violated rule; the suite is deliberately part of the library so that an
//! out-of-tree backend can run it too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use keyward_core::model::*;
use keyward_core::store::{Change, InstanceHold, SecretRead, Store, StoreError};

/// Run every check against `store`, which must be empty.
pub async fn run_all(store: Arc<dyn Store>) {
    meta(&*store).await;
    keys(&*store).await;
    key_cas(&*store).await;
    due_and_delete(&*store).await;
    secrets(&*store).await;
    secret_concurrency(store.clone()).await;
    tokens(&*store).await;
    token_use_race(store.clone()).await;
    policies(&*store).await;
    leases(&*store).await;
    instance_holds(store.clone()).await;
}

/// The change feed of a shared backend, seen from a second handle on the same database
/// (`other`, as another server would): every change to keys, policies, revoked or renewed tokens
/// and metadata appears, in commit order, and a cursor past pruned entries is reported lost.
pub async fn change_feed(store: Arc<dyn Store>, other: Arc<dyn Store>) {
    assert!(store.is_shared() && other.is_shared());
    let start = other.changes_since(None, 100).await.unwrap();
    assert!(start.changes.is_empty());
    let k = key("feed", 0xfe);
    store.create_key(&k, &version(0xfe, 1)).await.unwrap();
    let mut k2 = k.clone();
    k2.revision = 2;
    k2.state = KeyState::Disabled;
    store.update_key(&k2, 1).await.unwrap();
    assert!(matches!(store.update_key(&k2, 1).await, Err(StoreError::Conflict)));
    store.put_policy("feed-policy", "{}", 1).await.unwrap();
    let t = token("acc_feed", [0xfe; 32], None);
    store.put_token(&t).await.unwrap();
    assert_eq!(store.use_token(&t.hash).await.unwrap(), Some(1));
    store.set_token_expiry("acc_feed", Some(1234)).await.unwrap();
    store.delete_tokens(&["acc_feed".into()]).await.unwrap();
    assert!(store.delete_policy("feed-policy").await.unwrap());
    store.put_meta_if_absent("feed-meta", b"x").await.unwrap();

    let got = other.changes_since(Some(start.cursor), 100).await.unwrap();
    assert!(!got.lost && !got.more, "{got:?}");
    assert_eq!(
        got.changes,
        vec![
            Change::Key(k.id),
            Change::Key(k.id),
            Change::Policy("feed-policy".into()),
            Change::Token(t.hash),
            Change::Token(t.hash),
            Change::Policy("feed-policy".into()),
            Change::Meta("feed-meta".into()),
        ],
        "creations, updates, renewals, revocations and deletions, in order; failed CAS, token creation and \
         use counting leave no entry"
    );
    assert_eq!(got.cursor, start.cursor + 7);
    let again = other.changes_since(Some(got.cursor), 100).await.unwrap();
    assert!(again.changes.is_empty() && !again.lost);
    // Paging.
    let page = other.changes_since(Some(start.cursor), 3).await.unwrap();
    assert_eq!(page.changes.len(), 3);
    assert!(page.more);
    // Pruned entries: a reader behind them must reload everything.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(store.prune_changes(std::time::Duration::ZERO).await.unwrap() >= 7);
    let lost = other.changes_since(Some(start.cursor), 100).await.unwrap();
    assert!(lost.lost, "{lost:?}");
    assert_eq!(lost.cursor, got.cursor);
    let _ = store.delete_key(&k.id, 2).await;
}

fn token(accessor: &str, hash: [u8; 32], max_uses: Option<u32>) -> TokenRecord {
    TokenRecord {
        hash,
        accessor: accessor.into(),
        policies: vec!["p".into()],
        created_at: 1,
        expires_at: None,
        parent: None,
        ttl_secs: None,
        max_uses,
        uses: 0,
        display_name: String::new(),
        selectors: vec![],
        max_expires_at: None,
    }
}

async fn token_use_race(s: Arc<dyn Store>) {
    let t = token("acc_race", [0x77; 32], Some(5));
    s.put_token(&t).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.use_token(&[0x77; 32]).await.unwrap() })
        })
        .collect();
    let mut granted = Vec::new();
    for t in tasks {
        if let Some(n) = t.await.unwrap() {
            granted.push(n);
        }
    }
    granted.sort_unstable();
    assert_eq!(granted, vec![1, 2, 3, 4, 5], "concurrent uses never exceed max_uses");
    assert_eq!(s.get_token(&[0x77; 32]).await.unwrap().unwrap().uses, 5);
    s.delete_tokens(&["acc_race".into()]).await.unwrap();
}

async fn leases(s: &dyn Store) {
    use std::time::Duration;
    let long = Duration::from_secs(30);
    assert!(s.acquire_lease("scheduler", "a", long).await.unwrap());
    assert!(!s.acquire_lease("scheduler", "b", long).await.unwrap(), "held by a");
    assert!(s.acquire_lease("scheduler", "a", long).await.unwrap(), "a renews");
    assert!(s.acquire_lease("other", "b", long).await.unwrap(), "leases are independent");
    s.release_lease("scheduler", "b").await.unwrap();
    assert!(!s.acquire_lease("scheduler", "b", long).await.unwrap(), "only the holder releases");
    s.release_lease("scheduler", "a").await.unwrap();
    assert!(s.acquire_lease("scheduler", "b", Duration::from_millis(200)).await.unwrap(), "released");
    assert!(!s.acquire_lease("scheduler", "a", long).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(s.acquire_lease("scheduler", "a", long).await.unwrap(), "an expired lease is taken over");
    assert!(!s.acquire_lease("scheduler", "b", long).await.unwrap());
}

/// Live-instance places: at most `max` per scope, renewals keep a place, expired places free
/// up, and instances racing for the last place never exceed the cap.
async fn instance_holds(store: Arc<dyn Store>) {
    use std::time::Duration;
    let s = &*store;
    let long = Duration::from_secs(30);
    assert_eq!(s.hold_instance("p#0:secrets/db", "pod-a", 2, long).await.unwrap(), InstanceHold::Held);
    assert_eq!(s.hold_instance("p#0:secrets/db", "pod-b", 2, long).await.unwrap(), InstanceHold::Held);
    assert_eq!(s.hold_instance("p#0:secrets/db", "pod-c", 2, long).await.unwrap(), InstanceHold::Full { holders: 2 });
    assert_eq!(s.hold_instance("p#0:secrets/db", "pod-a", 2, long).await.unwrap(), InstanceHold::Held, "renewal");
    assert_eq!(s.hold_instance("p#0:secrets/other", "pod-c", 2, long).await.unwrap(), InstanceHold::Held, "per scope");
    // Short places expire and free their slot.
    let short = Duration::from_millis(300);
    assert_eq!(s.hold_instance("q#1:keys/k", "pod-a", 1, short).await.unwrap(), InstanceHold::Held);
    assert_eq!(s.hold_instance("q#1:keys/k", "pod-b", 1, short).await.unwrap(), InstanceHold::Full { holders: 1 });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.hold_instance("q#1:keys/k", "pod-b", 1, short).await.unwrap(),
        InstanceHold::Held,
        "expired place taken"
    );
    // Twenty instances race for three places.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let st = store.clone();
            tokio::spawn(async move { st.hold_instance("race#0:keys/k", &format!("pod-{i}"), 3, long).await.unwrap() })
        })
        .collect();
    let mut held = 0;
    for t in tasks {
        if t.await.unwrap() == InstanceHold::Held {
            held += 1;
        }
    }
    assert_eq!(held, 3, "exactly the cap is admitted");
}

fn key(name: &str, id: u8) -> KeyRecord {
    KeyRecord {
        id: KeyId([id; 16]),
        name: name.into(),
        algorithm: KeyAlgorithm::Aes256Gcm,
        state: KeyState::Enabled,
        description: "d".into(),
        created_at: 100,
        updated_at: 100,
        current_version: 1,
        rotate_every_secs: None,
        next_rotation_at: None,
        deletion_at: None,
        revision: 1,
    }
}

fn version(id: u8, v: u32) -> KeyVersionRecord {
    KeyVersionRecord {
        key_id: KeyId([id; 16]),
        version: v,
        wrapped_material: vec![id, v as u8, 0xAA],
        public_key: v.is_multiple_of(2).then(|| vec![1, 2, 3]),
        created_at: 100 + i64::from(v),
    }
}

async fn meta(s: &dyn Store) {
    assert_eq!(s.get_meta("m").await.unwrap(), None, "absent meta reads as None");
    assert!(s.put_meta_if_absent("m", b"one").await.unwrap(), "first insert wins");
    assert!(!s.put_meta_if_absent("m", b"two").await.unwrap(), "second insert is refused");
    assert_eq!(s.get_meta("m").await.unwrap().as_deref(), Some(&b"one"[..]), "first value kept");
    assert!(!s.replace_meta("m", b"two", b"three").await.unwrap(), "replace with a stale value is refused");
    assert!(!s.replace_meta("absent", b"", b"x").await.unwrap(), "replace of an absent value is refused");
    assert_eq!(s.get_meta("absent").await.unwrap(), None);
    assert!(s.replace_meta("m", b"one", b"three").await.unwrap(), "replace with the current value works");
    assert_eq!(s.get_meta("m").await.unwrap().as_deref(), Some(&b"three"[..]));
}

async fn keys(s: &dyn Store) {
    let a = key("alpha", 1);
    s.create_key(&a, &version(1, 1)).await.unwrap();
    assert!(
        matches!(s.create_key(&key("alpha", 2), &version(2, 1)).await, Err(StoreError::AlreadyExists)),
        "duplicate name is AlreadyExists"
    );
    assert!(s.get_key_by_id(&KeyId([2; 16])).await.unwrap().is_none(), "failed create leaves nothing behind");
    assert!(s.get_key_versions(&KeyId([2; 16])).await.unwrap().is_empty(), "failed create leaves no version");
    assert_eq!(s.get_key("alpha").await.unwrap(), Some(a.clone()), "get by name round-trips every field");
    assert_eq!(s.get_key_by_id(&a.id).await.unwrap(), Some(a.clone()), "get by id");
    assert_eq!(s.get_key("nope").await.unwrap(), None);
    for (i, n) in ["delta", "bravo", "charlie"].iter().enumerate() {
        let id = 10 + i as u8;
        let mut k = key(n, id);
        k.algorithm = KeyAlgorithm::Ed25519;
        k.rotate_every_secs = Some(3600);
        k.next_rotation_at = Some(5000);
        s.create_key(&k, &version(id, 1)).await.unwrap();
    }
    let names = |v: Vec<KeyRecord>| v.into_iter().map(|k| k.name).collect::<Vec<_>>();
    assert_eq!(names(s.list_keys(None, 2).await.unwrap()), ["alpha", "bravo"], "first page in name order");
    assert_eq!(names(s.list_keys(Some("bravo"), 2).await.unwrap()), ["charlie", "delta"], "cursor is exclusive");
    assert!(s.list_keys(Some("delta"), 2).await.unwrap().is_empty(), "past the end is empty");
}

async fn key_cas(s: &dyn Store) {
    let mut k = s.get_key("alpha").await.unwrap().unwrap();
    let expected = k.revision;
    k.revision += 1;
    k.state = KeyState::Disabled;
    k.description = "changed".into();
    s.update_key(&k, expected).await.unwrap();
    assert_eq!(s.get_key("alpha").await.unwrap().unwrap(), k, "update persisted");
    assert!(matches!(s.update_key(&k, expected).await, Err(StoreError::Conflict)), "stale revision is Conflict");
    let mut ghost = key("ghost", 99);
    ghost.revision = 2;
    assert!(matches!(s.update_key(&ghost, 1).await, Err(StoreError::NotFound)), "unknown key is NotFound");

    // Rotation: add version 2 under CAS.
    let expected = k.revision;
    k.revision += 1;
    k.current_version = 2;
    s.add_key_version(&k, &version(1, 2), expected).await.unwrap();
    let vs = s.get_key_versions(&k.id).await.unwrap();
    assert_eq!(vs, vec![version(1, 1), version(1, 2)], "versions ascending, fields round-trip");
    // A concurrent rotation with the same expected revision must fail and add nothing.
    let mut k2 = k.clone();
    k2.current_version = 3;
    assert!(
        matches!(s.add_key_version(&k2, &version(1, 3), expected).await, Err(StoreError::Conflict)),
        "stale rotation is Conflict"
    );
    assert_eq!(s.get_key_versions(&k.id).await.unwrap().len(), 2, "failed rotation added no version");
    assert_eq!(s.get_key("alpha").await.unwrap().unwrap().current_version, 2);

    // Root rotation re-wraps a version only if it still holds what the caller read.
    let old = version(1, 1).wrapped_material;
    assert!(!s.rewrap_key_version(&k.id, 1, b"stale", b"new").await.unwrap(), "stale rewrap refused");
    assert!(!s.rewrap_key_version(&k.id, 9, &old, b"new").await.unwrap(), "rewrap of a missing version refused");
    assert!(s.rewrap_key_version(&k.id, 1, &old, b"new").await.unwrap(), "rewrap applies");
    let vs = s.get_key_versions(&k.id).await.unwrap();
    assert_eq!(vs[0].wrapped_material, b"new", "rewrap persisted");
    assert_eq!(vs[1], version(1, 2), "other versions untouched");
    assert!(s.rewrap_key_version(&k.id, 1, b"new", &old).await.unwrap());
}

async fn due_and_delete(s: &dyn Store) {
    // bravo/charlie/delta: enabled with next_rotation_at = 5000.
    assert!(s.keys_due(4999, 10).await.unwrap().is_empty(), "nothing due before its time");
    assert_eq!(s.keys_due(5000, 10).await.unwrap().len(), 3, "due at its time");
    assert_eq!(s.keys_due(5000, 2).await.unwrap().len(), 2, "limit respected");
    let mut d = s.get_key("delta").await.unwrap().unwrap();
    let exp = d.revision;
    d.revision += 1;
    d.state = KeyState::Disabled;
    s.update_key(&d, exp).await.unwrap();
    assert_eq!(s.keys_due(5000, 10).await.unwrap().len(), 2, "disabled keys do not rotate");
    let exp = d.revision;
    d.revision += 1;
    d.state = KeyState::PendingDeletion;
    d.deletion_at = Some(9000);
    d.next_rotation_at = None;
    s.update_key(&d, exp).await.unwrap();
    let due: Vec<_> = s.keys_due(9000, 10).await.unwrap().into_iter().map(|k| k.name).collect();
    assert!(due.contains(&"delta".to_string()), "pending deletion is due at deletion_at");
    assert!(matches!(s.delete_key(&d.id, exp).await, Err(StoreError::Conflict)), "delete is CAS");
    s.delete_key(&d.id, d.revision).await.unwrap();
    assert!(s.get_key("delta").await.unwrap().is_none(), "deleted");
    assert!(s.get_key_versions(&d.id).await.unwrap().is_empty(), "versions deleted with the key");
    assert!(matches!(s.delete_key(&d.id, d.revision).await, Err(StoreError::NotFound)));
    // The name can be reused by a new key.
    s.create_key(&key("delta", 77), &version(77, 1)).await.unwrap();
}

fn sv(path: &str, v: u32) -> SecretVersionRecord {
    SecretVersionRecord {
        path: path.into(),
        version: v,
        wrapped_value: Some(vec![v as u8; 4]),
        created_at: 1000 + i64::from(v),
        deleted_at: None,
    }
}

async fn secrets(s: &dyn Store) {
    assert!(s.get_secret("app/db").await.unwrap().is_none());
    s.put_secret_version(&sv("app/db", 1), 0).await.unwrap();
    assert!(matches!(s.put_secret_version(&sv("app/db", 1), 0).await, Err(StoreError::Conflict)), "version CAS");
    s.put_secret_version(&sv("app/db", 2), 1).await.unwrap();
    assert!(
        matches!(s.put_secret_version(&sv("app/db", 4), 3).await, Err(StoreError::Conflict)),
        "skipping is Conflict"
    );
    let meta = s.get_secret("app/db").await.unwrap().unwrap();
    assert_eq!((meta.current_version, meta.created_at, meta.updated_at), (2, 1001, 1002));
    assert_eq!(s.get_secret_version("app/db", 1).await.unwrap(), Some(sv("app/db", 1)));
    assert_eq!(s.get_secret_version("app/db", 3).await.unwrap(), None);
    let read = |v| async move { s.read_secret("app/db", v).await.unwrap().unwrap() };
    assert_eq!(read(None).await, SecretRead { current_version: 2, version: Some(sv("app/db", 2)) }, "current");
    assert_eq!(read(Some(1)).await, SecretRead { current_version: 2, version: Some(sv("app/db", 1)) }, "older");
    assert_eq!(read(Some(3)).await, SecretRead { current_version: 2, version: None }, "no such version");
    assert_eq!(s.read_secret("app/none", None).await.unwrap(), None, "no such secret");
    assert_eq!(s.read_secret("app/d", None).await.unwrap(), None, "paths match exactly");

    assert_eq!(s.set_secret_versions_deleted("app/db", &[1], Some(5)).await.unwrap(), 1);
    assert_eq!(s.set_secret_versions_deleted("app/db", &[1], Some(5)).await.unwrap(), 0, "idempotent");
    assert_eq!(s.get_secret_version("app/db", 1).await.unwrap().unwrap().deleted_at, Some(5));
    assert_eq!(s.set_secret_versions_deleted("app/db", &[1], None).await.unwrap(), 1, "undelete");
    assert_eq!(s.destroy_secret_versions("app/db", &[1, 9]).await.unwrap(), 1);
    assert_eq!(s.get_secret_version("app/db", 1).await.unwrap().unwrap().wrapped_value, None, "destroyed");
    assert_eq!(read(Some(1)).await.version.unwrap().wrapped_value, None, "a destroyed version reads as destroyed");
    assert_eq!(s.set_secret_versions_deleted("app/db", &[1], Some(6)).await.unwrap(), 0, "destroyed stays destroyed");
    let hist = s.list_secret_versions("app/db").await.unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[0].wrapped_value, None, "history marks destroyed versions");
    assert_eq!(hist[1].wrapped_value, Some(vec![]), "history carries no values");

    for p in ["app/api", "app/zz", "apple", "other/x"] {
        s.put_secret_version(&sv(p, 1), 0).await.unwrap();
    }
    assert_eq!(s.list_secrets("app/", None, 10).await.unwrap(), ["app/api", "app/db", "app/zz"], "prefix");
    assert_eq!(s.list_secrets("app", None, 10).await.unwrap(), ["app/api", "app/db", "app/zz", "apple"]);
    assert_eq!(s.list_secrets("app/", Some("app/api"), 1).await.unwrap(), ["app/db"], "cursor and limit");
    assert_eq!(s.list_secrets("", None, 100).await.unwrap().len(), 5, "empty prefix lists all");
    assert!(s.list_secrets("app%", None, 10).await.unwrap().is_empty(), "LIKE wildcards are literal");
}

async fn secret_concurrency(s: Arc<dyn Store>) {
    // 8 writers race to add version 1 of the same path: exactly one wins.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move { s.put_secret_version(&sv("race/x", 1), 0).await }));
    }
    let mut wins = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(()) => wins += 1,
            Err(StoreError::Conflict) | Err(StoreError::AlreadyExists) => {}
            Err(e) => panic!("unexpected error in race: {e}"),
        }
    }
    assert_eq!(wins, 1, "exactly one concurrent writer wins a version");
}

async fn tokens(s: &dyn Store) {
    assert!(s.list_tokens().await.unwrap().is_empty());
    let t = TokenRecord {
        hash: [9; 32],
        accessor: "acc_1".into(),
        policies: vec!["root".into(), "ops".into()],
        created_at: 1,
        expires_at: Some(99),
        parent: None,
        ttl_secs: Some(98),
        max_uses: Some(3),
        uses: 0,
        display_name: "ops".into(),
        selectors: vec!["cert:uri:spiffe://bank/ops".into(), "k8s:ns:payments".into()],
        max_expires_at: Some(1000),
    };
    s.put_token(&t).await.unwrap();
    assert_eq!(s.list_tokens().await.unwrap(), vec![t.clone()]);
    assert!(s.put_token(&t).await.is_err(), "duplicate token hash refused");
    let mut child = t.clone();
    child.hash = [8; 32];
    child.accessor = "acc_2".into();
    child.parent = Some("acc_1".into());
    child.max_uses = None;
    child.ttl_secs = None;
    child.selectors = vec![];
    child.max_expires_at = None;
    s.put_token(&child).await.unwrap();
    assert_eq!(s.get_token(&[9; 32]).await.unwrap(), Some(t.clone()));
    assert_eq!(s.get_token(&[7; 32]).await.unwrap(), None);
    let mut renewed = t.clone();
    renewed.expires_at = Some(500);
    renewed.uses = 3;
    s.set_token_expiry("acc_1", Some(500)).await.unwrap();
    assert_eq!(s.use_token(&[9; 32]).await.unwrap(), Some(1));
    assert_eq!(s.use_token(&[9; 32]).await.unwrap(), Some(2));
    assert_eq!(s.use_token(&[9; 32]).await.unwrap(), Some(3));
    assert_eq!(s.use_token(&[9; 32]).await.unwrap(), None, "max_uses (3) used up");
    assert_eq!(s.use_token(&[8; 32]).await.unwrap(), Some(1), "no limit");
    child.uses = 1;
    assert_eq!(
        s.list_tokens().await.unwrap(),
        vec![renewed.clone(), child.clone()],
        "update persisted; ordered by accessor"
    );
    assert_eq!(s.delete_tokens(&["acc_1".into(), "acc_2".into(), "acc_9".into()]).await.unwrap(), 2);
    assert!(s.list_tokens().await.unwrap().is_empty());
    assert!(
        matches!(s.set_token_expiry("acc_1", None).await, Err(StoreError::NotFound)),
        "revoked tokens stay revoked"
    );
    assert_eq!(s.use_token(&[9; 32]).await.unwrap(), None);
}

async fn policies(s: &dyn Store) {
    assert!(s.list_policies().await.unwrap().is_empty());
    s.put_policy("b", "{doc b}", 1).await.unwrap();
    s.put_policy("a", "{doc a}", 1).await.unwrap();
    s.put_policy("b", "{doc b2}", 2).await.unwrap();
    assert_eq!(
        s.list_policies().await.unwrap(),
        vec![("a".to_string(), "{doc a}".to_string()), ("b".to_string(), "{doc b2}".to_string())],
        "upsert, ordered by name"
    );
    assert!(s.delete_policy("a").await.unwrap());
    assert!(!s.delete_policy("a").await.unwrap());
    assert_eq!(s.list_policies().await.unwrap().len(), 1);
    assert_eq!(s.get_policy("b").await.unwrap().as_deref(), Some("{doc b2}"));
    assert_eq!(s.get_policy("a").await.unwrap(), None);
}
