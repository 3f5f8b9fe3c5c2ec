//! The PostgreSQL backend against a real PostgreSQL: the same conformance suite as SQLite,
//! migrations from several servers at once, a newer schema refused, and an unreachable database
//! answering `Unavailable` promptly instead of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward_core::store::{Store, StoreError};
use keyward_store::{PostgresConfig, PostgresStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_conformance_and_migrates_safely() {
    let pg = keyward_test_support::postgres::Cluster::start();

    pg.create_db("conformance");
    let store = PostgresStore::connect(&PostgresConfig::new(pg.url("conformance"))).await.unwrap();
    assert_eq!(store.backend_name(), "postgres");
    keyward_store::conformance::run_all(Arc::new(store)).await;

    // The change feed, written through one handle and read through another (two servers).
    pg.create_db("feed");
    let a = PostgresStore::connect(&PostgresConfig::new(pg.url("feed"))).await.unwrap();
    let b = PostgresStore::connect(&PostgresConfig::new(pg.url("feed"))).await.unwrap();
    // A NOTIFY wakes the other handle's waiter well before its timeout.
    b.wait_for_changes(Duration::from_millis(1)).await; // consume the listener's start-up wake-up
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.wait_for_changes(Duration::from_millis(1)).await;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            b.wait_for_changes(Duration::from_secs(20)).await;
            t.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.put_policy("wake", "{}", 1).await.unwrap();
    let waited = waiter.await.unwrap();
    assert!(waited < Duration::from_secs(5), "NOTIFY woke the other server after {waited:?}");
    assert!(a.delete_policy("wake").await.unwrap());
    keyward_store::conformance::change_feed(Arc::new(a), Arc::new(b)).await;

    // Eight servers starting at once on an empty database: each migration runs once.
    pg.create_db("racing");
    let url = pg.url("racing");
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::connect(&PostgresConfig::new(url)).await })
        })
        .collect();
    let mut stores = Vec::new();
    for s in starts {
        stores.push(s.await.unwrap().unwrap());
    }
    assert!(stores[0].put_meta_if_absent("m", b"1").await.unwrap());
    assert_eq!(stores[7].get_meta("m").await.unwrap().as_deref(), Some(&b"1"[..]), "one database, seen by all");

    // A schema newer than this build is refused.
    pg.create_db("newer");
    let newer = PostgresStore::connect(&PostgresConfig::new(pg.url("newer"))).await.unwrap();
    drop(newer);
    let c = tokio_postgres_exec(&pg.url("newer"), "UPDATE keyward_schema SET version = 99").await;
    assert_eq!(c, 1);
    let err = PostgresStore::connect(&PostgresConfig::new(pg.url("newer"))).await.unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");

    // The database goes away: calls fail with Unavailable within the timeouts, and work again
    // once it is back.
    let mut cfg = PostgresConfig::new(pg.url("conformance"));
    cfg.connect_timeout = Duration::from_secs(2);
    let store = PostgresStore::connect(&cfg).await.unwrap();
    pg.stop();
    let t = Instant::now();
    let err = store.get_meta("m").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "failed in {:?}", t.elapsed());
}

async fn tokio_postgres_exec(url: &str, sql: &str) -> u64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.execute(sql, &[]).await.unwrap()
}

/// TLS to the database: with the CA configured, connections are encrypted and the server's
/// certificate is checked (a different CA is refused); `sslmode=require` without a CA is a
/// configuration error rather than an unverified connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified() {
    let pg = keyward_test_support::postgres::Cluster::start_tls();
    pg.create_db("tls");
    let mut cfg = PostgresConfig::new(pg.url("tls"));
    cfg.ca_file = pg.ca_file.clone();
    let store = PostgresStore::connect(&cfg).await.expect("TLS connection with the right CA");
    assert!(store.put_meta_if_absent("m", b"1").await.unwrap());
    assert!(store.ssl_in_use().await.unwrap(), "the session is encrypted");

    // A CA that did not sign the server's certificate: refused, not downgraded.
    let other = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-keyout", "k.pem", "-out", "ca.pem", "-days", "1", "-subj", "/CN=other CA"])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut wrong = cfg.clone();
    wrong.ca_file = Some(other.path().join("ca.pem"));
    wrong.connect_timeout = Duration::from_secs(3);
    let err = PostgresStore::connect(&wrong).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");

    let mut no_ca = PostgresConfig::new(format!("{}?sslmode=require", pg.url("tls")));
    no_ca.ca_file = None;
    let err = PostgresStore::connect(&no_ca).await.unwrap_err();
    assert!(err.to_string().contains("--postgres-ca"), "{err}");

    // Without a CA and without sslmode=require the connection is plain, as configured.
    let plain =
        PostgresStore::connect(&PostgresConfig::new(format!("{}?sslmode=disable", pg.url("tls")))).await.unwrap();
    assert!(!plain.ssl_in_use().await.unwrap());
}
