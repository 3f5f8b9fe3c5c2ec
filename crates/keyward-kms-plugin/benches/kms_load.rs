//! Load generator for the KMS v2 plugin, over real gRPC on a Unix socket with the client
//! generated from the upstream proto, audit on. Prints throughput and latency percentiles:
//! - local mode: Decrypt at concurrency 1 and 16, Encrypt at concurrency 1;
//! - local mode cold start: a fresh plugin gets a burst of 10,000 Decrypts of distinct seeds
//!   (what an apiserver filling its watch cache sends), 64 in flight;
//! - service mode (through an in-process `keyward dev` server): Decrypt at concurrency 1 and 16.
//!
//! Run: `cargo bench -p keyward-kms-plugin --bench kms_load` (KMS_BENCH_OPS=N to change the
//! number of measured calls per row, default 5000).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keyward_kms_plugin::{Kek, kek};

type Client = KeyManagementServiceClient<tonic::transport::Channel>;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{name:<40} {:>7} calls {:>9.0}/s  p50 {:>6.3} ms  p99 {:>6.3} ms  max {:>7.3} ms",
        lat.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
}

/// `ops` Decrypts of the given ciphertexts (cycled), `concurrency` in flight.
async fn decrypts(
    c: &Client,
    items: Arc<Vec<apiserver::EncryptResponse>>,
    ops: usize,
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (mut c, items) = (c.clone(), items.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            while i < ops {
                let e = &items[i % items.len()];
                let t = Instant::now();
                decrypt(&mut c, e).await.unwrap();
                lat.push(t.elapsed());
                i += concurrency;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, start.elapsed())
}

async fn encrypt_n(
    c: &Client,
    n: usize,
    concurrency: usize,
) -> (Vec<apiserver::EncryptResponse>, Vec<Duration>, Duration) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = w;
            while i < n {
                let t = Instant::now();
                let e = encrypt(&mut c, &seed()).await;
                out.push((e, t.elapsed()));
                i += concurrency;
            }
            out
        }));
    }
    let (mut items, mut lat) = (Vec::new(), Vec::new());
    for t in tasks {
        for (e, l) in t.await.unwrap() {
            items.push(e);
            lat.push(l);
        }
    }
    (items, lat, start.elapsed())
}

#[tokio::main]
async fn main() {
    let ops: usize = std::env::var("KMS_BENCH_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "KMS v2 plugin load ({} CPUs), audit on",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    // ---- local mode
    let data = dir.path().join("local");
    let socket = dir.path().join("local.sock");
    let served = local(&data, &socket).await;
    let c = connect(&socket).await;
    let (items, lat, wall) = encrypt_n(&c, 200, 1).await;
    report("local Encrypt c=1", lat, wall);
    let items = Arc::new(items);
    decrypts(&c, items.clone(), 500, 4).await; // warm-up
    let (lat, wall) = decrypts(&c, items.clone(), ops, 1).await;
    report("local Decrypt c=1", lat, wall);
    let (lat, wall) = decrypts(&c, items.clone(), ops * 2, 16).await;
    report("local Decrypt c=16", lat, wall);

    // Cold start: 10,000 distinct seeds, then a fresh plugin process state.
    let (burst, _, _) = encrypt_n(&c, 10_000, 16).await;
    drop(c);
    served.stop().await;
    let served = local(&data, &socket).await;
    let c = connect(&socket).await;
    let (lat, wall) = decrypts(&c, Arc::new(burst), 10_000, 64).await;
    report("local cold burst 10,000 distinct, c=64", lat, wall);
    println!("  -> burst completed in {:.2} s", wall.as_secs_f64());
    drop(c);
    served.stop().await;

    // ---- service mode
    let running = keyward_test_support::server::dev_server(&dir.path().join("server"), "127.0.0.1:0").await;
    let addr = format!("http://{}", running.addr);
    let root = std::fs::read_to_string(running.root_token_file.as_ref().unwrap()).unwrap();
    let client = keyward_client::Client::builder(addr).token(root.trim()).build().unwrap();
    client.create_key("k8s-secrets", "aes256-gcm", "", None).await.unwrap();
    let (s, audit) = kek::Service::open(client, "k8s-secrets", &dir.path().join("plugin")).unwrap();
    let socket = dir.path().join("service.sock");
    let served = serve(Kek::Service(s), audit, &socket, allow_me()).await;
    let c = connect(&socket).await;
    let (items, lat, wall) = encrypt_n(&c, 200, 1).await;
    report("service Encrypt c=1", lat, wall);
    let items = Arc::new(items);
    decrypts(&c, items.clone(), 500, 4).await;
    let (lat, wall) = decrypts(&c, items.clone(), ops, 1).await;
    report("service Decrypt c=1", lat, wall);
    let (lat, wall) = decrypts(&c, items, ops * 2, 16).await;
    report("service Decrypt c=16", lat, wall);
    drop(c);
    served.stop().await;
    running.shutdown().await.unwrap();
}
