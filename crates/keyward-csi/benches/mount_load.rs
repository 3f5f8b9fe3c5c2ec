//! Load generator for the CSI provider: Mount of 10 objects (secret fields) for one pod, over
//! real gRPC on the Unix socket with the client generated from the upstream proto, against an
//! in-process `keyward dev` server (audit on in both). The pod's Keyward token is cached after
//! the first Mount, as during rotation polling. Prints throughput and latency percentiles.
//!
//! Run: `cargo bench -p keyward-csi --bench mount_load` (CSI_BENCH_OPS=N, default 1000).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let ops: usize = std::env::var("CSI_BENCH_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    for i in 0..10 {
        put_secret(&w.admin, &format!("payments/s{i}"), &[("password", &format!("secret-{i}")), ("user", "app")]).await;
    }
    let (_p, _task) = provider(&dir.path().join("providers"), &w.addr).await;
    let c = connect(&dir.path().join("providers/keyward.sock")).await;
    let objects: String =
        (0..10).map(|i| format!("- path: payments/s{i}\n  field: password\n  fileName: s{i}\n")).collect();
    let attrs = w.attributes("payments", "api", "api-0", "uid-api-0", "payments", &objects);
    println!(
        "CSI provider Mount load ({} CPUs), 10 objects per Mount, audit on",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    let t = Instant::now();
    let first = c.clone().mount(mount_request(attrs.clone())).await.unwrap().into_inner();
    assert_eq!(first.files.len(), 10);
    println!("first Mount (login as the pod + 10 reads): {:.3} ms", t.elapsed().as_secs_f64() * 1000.0);

    for concurrency in [1usize, 4] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for wkr in 0..concurrency {
            let (mut c, attrs) = (c.clone(), attrs.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = wkr;
                while i < ops {
                    let t = Instant::now();
                    let r = c.mount(mount_request(attrs.clone())).await.unwrap().into_inner();
                    assert_eq!(r.files.len(), 10);
                    lat.push(t.elapsed());
                    i += concurrency;
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let wall = start.elapsed();
        lat.sort();
        println!(
            "Mount 10 objects, cached pod token, c={concurrency:<2} {:>6} mounts {:>8.0}/s  p50 {:>6.3} ms  p99 {:>6.3} ms  max {:>7.3} ms",
            lat.len(),
            lat.len() as f64 / wall.as_secs_f64(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
    }
    let logins = w.server_audit(dir.path()).into_iter().filter(|r| r["operation"] == "login").count();
    println!("logins to Keyward during the run: {logins}");
}
