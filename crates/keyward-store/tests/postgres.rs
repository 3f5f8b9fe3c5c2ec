//! The PostgreSQL backend against a real PostgreSQL: the same conformance suite as SQLite,
//! migrations from several servers at once, a newer schema refused, and an unreachable database
//! answering `Unavailable` promptly instead of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward_core::store::{Store, StoreError};
use keyward_store::{PostgresConfig, PostgresStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_conformance_and_migrates_safely() {
    let pg = common::Cluster::start();

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
