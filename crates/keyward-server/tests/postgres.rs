//! A server on PostgreSQL (a real one, started by the test): keys, encryption, secrets and
//! tokens live in the database, survive a restart, and a second server on the same database
//! decrypts what the first encrypted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../keyward-store/tests/common/mod.rs"]
mod pg;

use std::collections::BTreeMap;

use keyward_client::Client;
use keyward_server::{ServerConfig, Storage, start};
use keyward_store::PostgresConfig;

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
    assert_eq!(status["storage"], "postgres", "{status}");
    c.shutdown().await.unwrap();
}
