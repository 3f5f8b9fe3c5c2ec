//! A server on PostgreSQL (a real one, started by the test): keys, encryption, secrets and
//! tokens live in the database, survive a restart, and a second server on the same database
//! decrypts what the first encrypted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_test_support::postgres as pg;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyward_client::{Client, Method};
use keyward_server::{ServerConfig, Storage, start};
use keyward_store::PostgresConfig;
use serde_json::json;

fn config(dir: &std::path::Path, url: &str) -> ServerConfig {
    let mut cfg = ServerConfig::dev("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    cfg.storage = Storage::Postgres(PostgresConfig::new(url));
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgres_keeps_everything_in_the_database() {
    let cluster = pg::Cluster::start();
    cluster.create_db("keyward");
    let url = cluster.url("keyward");
    let dir = tempfile::tempdir().unwrap();
    // Both servers read the dev seal's unseal key from the same data directory.
    let data = dir.path().join("data");

    let a = start(config(&data, &url)).await.expect("server A starts on PostgreSQL");
    let token = std::fs::read_to_string(a.root_token_file.as_ref().unwrap()).unwrap().trim().to_string();
    let ca = Client::builder(format!("http://{}", a.addr)).token(token.clone()).build().unwrap();
    ca.create_key("payments", "aes256-gcm", "", None).await.unwrap();
    let ctx = BTreeMap::from([("tenant".to_string(), "a".to_string())]);
    let ct = ca.encrypt("payments", b"card 4111", &ctx).await.unwrap();
    ca.put_secret("db/main", &BTreeMap::from([("password".to_string(), "hunter2".to_string())]), None).await.unwrap();

    // A second server on the same database, running at the same time.
    let b = start(config(&data, &url)).await.expect("server B starts on the same database");
    assert!(b.new_root_token.is_none(), "B finds the store initialised by A");
    let cb = Client::builder(format!("http://{}", b.addr)).token(token.clone()).build().unwrap();
    assert_eq!(cb.decrypt(&ct.ciphertext, &ctx).await.unwrap().plaintext.as_slice(), b"card 4111");
    assert_eq!(cb.get_secret("db/main", None).await.unwrap().data["password"].as_str(), "hunter2");
    let ct_b = cb.encrypt("payments", b"from B", &ctx).await.unwrap();
    assert_eq!(ca.decrypt(&ct_b.ciphertext, &ctx).await.unwrap().plaintext.as_slice(), b"from B");

    // Both stop; a fresh server finds everything.
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let c = start(config(&data, &url)).await.unwrap();
    let cc = Client::builder(format!("http://{}", c.addr)).token(token).build().unwrap();
    assert_eq!(cc.decrypt(&ct.ciphertext, &ctx).await.unwrap().plaintext.as_slice(), b"card 4111");
    let status = cc.health().await.unwrap();
    assert_eq!(status.storage, "postgres", "{status:?}");
    c.shutdown().await.unwrap();
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    loop {
        if check().await {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status(r: Result<impl Sized, keyward_client::Error>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(e) => e.status().unwrap_or(0),
    }
}

/// Changes made through one server take effect on the other within a second: a token created
/// on A works on B at once, and a revoked token, a disabled key, a rotated key and a changed
/// policy are honoured by B within the bound. Scheduled work runs on exactly one server and
/// moves when that server stops. When the database goes away, requests fail cleanly (503) once
/// the bound passes, and the servers recover by themselves when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_follow_each_others_changes_within_a_second() {
    let cluster = pg::Cluster::start();
    cluster.create_db("keyward");
    let url = cluster.url("keyward");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cfg = config(&data, &url);
    cfg.cluster.lease_ttl = Duration::from_secs(2);
    cfg.scheduler_interval = Duration::from_millis(200);
    let mut cfg_b = cfg.clone();
    cfg_b.audit.file = Some(dir.path().join("audit-b.log"));
    let a = start(cfg.clone()).await.unwrap();
    let b = start(cfg_b).await.unwrap();
    let root = std::fs::read_to_string(a.root_token_file.as_ref().unwrap()).unwrap().trim().to_string();
    let ra = Client::builder(format!("http://{}", a.addr)).token(root.clone()).build().unwrap();
    let rb = Client::builder(format!("http://{}", b.addr)).token(root.clone()).build().unwrap();
    let ctx = BTreeMap::new();
    let bound = Duration::from_millis(1500); // 1 s, plus the test's own polling and scheduling

    // A policy and a token made on A are usable on B at once.
    ra.create_key("payments", "aes256-gcm", "", None).await.unwrap();
    ra.request(
        Method::PUT,
        "/v1/policies/payments",
        Some(&json!({"rules": [{"resources": ["keys/payments"], "operations": ["encrypt", "decrypt"]}]})),
    )
    .await
    .unwrap();
    let v = ra.request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["payments"]}))).await.unwrap();
    let (app_token, accessor) = (v["token"].as_str().unwrap().to_string(), v["accessor"].as_str().unwrap().to_string());
    let app_b = Client::builder(format!("http://{}", b.addr)).token(app_token.clone()).build().unwrap();
    let ct = app_b.encrypt("payments", b"x", &ctx).await.expect("a token created on A works on B at once");
    assert_eq!(ct.key_version, 1);
    // Each server keeps its own audit chain, and every record names the server it is from.
    let audit_key = |r: &keyward_server::Running| {
        let u = r.sealing().unsealed().unwrap();
        keyward_crypto::SecretBytes::copy_from(u.audit.as_ref().unwrap().key().expose())
    };
    for (server, file) in [(&a, data.join("audit.log")), (&b, dir.path().join("audit-b.log"))] {
        // (The file is preallocated: zeros follow the last record.)
        let text = std::fs::read_to_string(&file).unwrap().trim_end_matches('\0').to_string();
        let tag = format!("\"server\":{}", serde_json::Value::from(server.member.id.as_str()));
        assert!(
            text.lines().count() > 1 && text.lines().all(|l| l.contains(&tag)),
            "{tag} in every record of {file:?}"
        );
        let report = keyward_server::audit::verify_files(audit_key(server).expose(), &[file], None).unwrap();
        assert!(report.records > 1);
    }
    // A use-limited token: uses are counted in the database, not per server.
    let v = ra
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["payments"], "max_uses": 2})))
        .await
        .unwrap();
    let limited = v["token"].as_str().unwrap().to_string();
    let la = Client::builder(format!("http://{}", a.addr)).token(limited.clone()).build().unwrap();
    let lb = Client::builder(format!("http://{}", b.addr)).token(limited).build().unwrap();
    la.encrypt("payments", b"1", &ctx).await.unwrap();
    lb.encrypt("payments", b"2", &ctx).await.unwrap();
    assert_eq!(status(la.encrypt("payments", b"3", &ctx).await), 401, "two uses in all, across servers");
    assert_eq!(status(lb.encrypt("payments", b"3", &ctx).await), 401);

    // Rotated on A: B encrypts under the new version within the bound.
    ra.key_action("payments", "rotate").await.unwrap();
    let took = wait_until("B uses the rotated version", bound, || async {
        app_b.encrypt("payments", b"x", &ctx).await.unwrap().key_version == 2
    })
    .await;
    println!("rotation seen by B after {took:?}");
    assert_eq!(app_b.decrypt(&ct.ciphertext, &ctx).await.unwrap().plaintext.as_slice(), b"x");

    // Disabled on A: B refuses within the bound; enabled again: B serves again.
    ra.key_action("payments", "disable").await.unwrap();
    let took = wait_until("B refuses the disabled key", bound, || async {
        status(app_b.encrypt("payments", b"x", &ctx).await) == 409
    })
    .await;
    println!("disable seen by B after {took:?}");
    ra.key_action("payments", "enable").await.unwrap();
    wait_until("B serves the enabled key", bound, || async { app_b.encrypt("payments", b"x", &ctx).await.is_ok() })
        .await;

    // Policy narrowed on A: B denies within the bound.
    ra.request(
        Method::PUT,
        "/v1/policies/payments",
        Some(&json!({"rules": [{"resources": ["keys/payments"], "operations": ["decrypt"]}]})),
    )
    .await
    .unwrap();
    let took = wait_until("B applies the narrowed policy", bound, || async {
        status(app_b.encrypt("payments", b"x", &ctx).await) == 403
    })
    .await;
    println!("policy change seen by B after {took:?}");
    assert!(app_b.decrypt(&ct.ciphertext, &ctx).await.is_ok());

    // Revoked on A: B refuses within the bound.
    ra.request(Method::POST, "/v1/auth/token/revoke", Some(&json!({"accessor": accessor}))).await.unwrap();
    let took = wait_until("B refuses the revoked token", bound, || async {
        status(app_b.decrypt(&ct.ciphertext, &ctx).await) == 401
    })
    .await;
    println!("revocation seen by B after {took:?}");

    // Exactly one server runs scheduled work; it moves when that server stops without handing
    // the lease over (as if killed).
    let leader = wait_until("one server takes the scheduler lease", Duration::from_secs(5), || async {
        let (ha, hb) = (ra.health().await.unwrap(), rb.health().await.unwrap());
        ha.scheduler ^ hb.scheduler
    })
    .await;
    println!("scheduler lease taken after {leader:?}");
    let a_leads = ra.health().await.unwrap().scheduler;
    let (mut gone, stays, stays_client) = if a_leads { (a, b, rb.clone()) } else { (b, a, ra.clone()) };
    gone.begin_shutdown();
    gone.wait().await.unwrap();
    let took = wait_until("the other server takes the lease over", Duration::from_secs(6), || async {
        stays_client.health().await.unwrap().scheduler
    })
    .await;
    println!("scheduler lease moved after {took:?}");
    // ... and runs the work: a key whose deletion is due is purged by the survivor.
    stays_client.create_key("short-lived", "aes256-gcm", "", None).await.unwrap();
    tokio_postgres_exec(
        &url,
        "UPDATE keys SET state='pending_deletion', deletion_at=1, revision=revision+1 WHERE name='short-lived'",
    )
    .await;
    wait_until("the survivor purges the due key", Duration::from_secs(5), || async {
        status(stays_client.describe_key("short-lived").await) == 404
    })
    .await;

    // The database goes away: requests fail with 503 (none hangs), and succeed again once it is
    // back, without restarting the server.
    cluster.stop();
    let t = Instant::now();
    let took = wait_until("503 while the database is down", Duration::from_secs(15), || async {
        let r = tokio::time::timeout(Duration::from_secs(12), stays_client.describe_key("payments")).await;
        status(r.expect("a request hung while the database was down")) == 503
    })
    .await;
    println!("503 after {took:?} of outage");
    let ready = |q: &'static str| {
        let c = stays_client.clone();
        async move { status(c.request(reqwest::Method::GET, &format!("/v1/health{q}"), None).await) }
    };
    assert_eq!(ready("?ready=true").await, 503, "a stale server is not ready (its readiness probe fails)");
    assert_eq!(ready("").await, 200, "but it is alive");
    let r = tokio::time::timeout(Duration::from_secs(12), stays_client.encrypt("payments", b"x", &ctx)).await;
    assert_eq!(status(r.expect("encrypt hung")), 503, "cached keys are not used once the cache may be stale");
    assert!(t.elapsed() < Duration::from_secs(30));
    cluster.start_again();
    let took = wait_until("recovered after the database returned", Duration::from_secs(20), || async {
        stays_client.encrypt("payments", b"x", &ctx).await.is_ok()
    })
    .await;
    println!("recovered {took:?} after the database returned");
    assert_eq!(ready("?ready=true").await, 200);
    stays.shutdown().await.unwrap();
}

async fn tokio_postgres_exec(url: &str, sql: &str) -> u64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let task = tokio::spawn(conn);
    let n = client.execute(sql, &[]).await.unwrap();
    drop(client);
    let _ = task.await;
    n
}

/// Follow the store as `cluster::follow_changes` does (without the Kubernetes part), until
/// `stop` is set or the server is sealed.
fn follow(
    s: std::sync::Arc<keyward_seal::Sealing>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Some(u) = s.unsealed() else { return };
            let report = u.kms.sync_changes().await.unwrap();
            if report.meta.iter().any(|m| m == keyward_core::seal::META_SEAL) {
                let _ = s.follow_seal_change().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// A rekey on server A leaves server B with an out-of-date unseal key. A then rotates the root
/// key: B follows the rotation with the root keys it holds, keeps serving, and what B wraps
/// afterwards opens on a server unsealed later with the new shares (before, B kept wrapping
/// under the retired root, and those keys were lost with it). B refuses ceremonies with a
/// message that says why; a server that missed a whole rotation seals itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_elsewhere_does_not_stop_a_server_following_root_rotations() {
    use keyward_core::model::KeyAlgorithm;
    use keyward_core::seal::SealKind;
    use keyward_core::service::CreateKey;
    use keyward_seal::{Progress, Sealing};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let cluster = pg::Cluster::start();
    cluster.create_db("keyward");
    let url = cluster.url("keyward");
    let server = || async {
        let store = keyward_store::PostgresStore::connect(&PostgresConfig::new(url.clone())).await.unwrap();
        Arc::new(Sealing::new(Arc::new(store), SealKind::Shamir, None))
    };
    let text = |s: &keyward_crypto::SecretBytes| String::from_utf8(s.expose().to_vec()).unwrap();
    let key = |name: &str| CreateKey {
        name: name.into(),
        algorithm: KeyAlgorithm::Aes256Gcm,
        description: String::new(),
        rotate_every_secs: None,
    };
    let ctx = BTreeMap::new();
    let (a, b) = (server().await, server().await);
    let old: Vec<String> = a.init(5, 3).await.unwrap().shares.iter().map(text).collect();
    for s in &old[..3] {
        a.submit_unseal_share(s, false).await.unwrap();
        b.submit_unseal_share(s, false).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (fa, fb) = (follow(a.clone(), stop.clone()), follow(b.clone(), stop.clone()));
    let kms = |s: &Sealing| s.unsealed().expect("unsealed").kms.clone();
    kms(&a).create_key(key("before")).await.unwrap();
    let before = kms(&a).encrypt("before", b"written before", &ctx).await.unwrap().ciphertext;

    // Rekey on A.
    let nonce = a.rekey_start(3, 2).await.unwrap();
    let mut new = Vec::new();
    for s in &old[1..4] {
        if let Progress::Rekeyed(shares) = a.rekey_submit(&nonce, s).await.unwrap() {
            new = shares.iter().map(text).collect();
        }
    }
    assert_eq!(new.len(), 3, "rekeyed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = b.rotate_root().await.unwrap_err().to_string();
    assert!(e.contains("rekeyed on another server"), "{e}");
    let e = b.rekey_start(3, 2).await.unwrap_err().to_string();
    assert!(e.contains("rekeyed on another server"), "{e}");

    // Root rotation on A (it waits for B to follow), while B keeps serving.
    let report = a.rotate_root().await.unwrap();
    assert!(report.key_versions >= 1, "{report:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.unsealed().is_some(), "B followed the rotation and still serves");
    kms(&b).create_key(key("after-on-b")).await.unwrap();
    let on_b = kms(&b).encrypt("after-on-b", b"written on B", &ctx).await.unwrap().ciphertext;
    kms(&a).create_key(key("after-on-a")).await.unwrap();
    let on_a = kms(&a).encrypt("after-on-a", b"written on A", &ctx).await.unwrap().ciphertext;
    assert_eq!(kms(&b).decrypt(&on_a, &ctx).await.unwrap().plaintext.expose(), b"written on A");

    // A server unsealed now with the new shares reads everything, whoever wrapped it.
    let c = server().await;
    assert!(c.submit_unseal_share(&old[0], false).await.is_ok(), "a share is only checked at the threshold");
    c.submit_unseal_share(&old[1], false).await.unwrap_err();
    for s in &new[..2] {
        c.submit_unseal_share(s, false).await.unwrap();
    }
    for (ct, plain) in [(&before, &b"written before"[..]), (&on_b, b"written on B"), (&on_a, b"written on A")] {
        assert_eq!(kms(&c).decrypt(ct, &ctx).await.unwrap().plaintext.expose(), plain);
    }

    // A server that misses a whole rotation (it does not follow while it runs) seals itself
    // rather than wrap anything under the root the others retire.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    fa.await.unwrap();
    fb.await.unwrap();
    let sc = Arc::new(AtomicBool::new(false));
    let fc = follow(c.clone(), sc.clone());
    a.rotate_root().await.unwrap();
    assert!(b.follow_seal_change().await.is_err(), "B missed the rotation");
    assert!(b.unsealed().is_none(), "and sealed itself");
    sc.store(true, std::sync::atomic::Ordering::Relaxed);
    fc.await.unwrap();
}
