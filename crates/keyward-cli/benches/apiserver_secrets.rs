//! Secret create and get latency against the real kube-apiserver, with and without Keyward's
//! KMS v2 plugin (local mode, pinned to the API server), side by side in one run: two control
//! planes, the operations alternating between them so both see the same machine noise.
//!
//! `cargo bench -p keyward-cli --bench apiserver_secrets [-- N]` (N operations of each kind per
//! control plane, default 1,000). Prints p50 and p99 per row; the figures are in
//! docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward_test_support::control_plane::{ControlPlane, Encryption, binaries};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_plugin(dir: &Path) -> Plugin {
    let socket = dir.join("kms.sock");
    let apiserver = std::fs::read(binaries().join("kube-apiserver")).unwrap();
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
    let mut child = Command::new(BIN)
        .args(["kms-plugin", "--local", "--key", "k8s-secrets", "--data-dir"])
        .arg(dir.join("kms"))
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg(format!("--allow-uid={uid}"))
        .arg(format!("--allow-exe-sha256={}", hex::encode(keyward_crypto::hash::sha256(&apiserver))))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Plugin(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("kms-plugin never listened");
}

/// Send `req`, read the whole answer; how long it took. A failed call ends the run.
async fn timed(req: reqwest::RequestBuilder, what: &str) -> Duration {
    let t = Instant::now();
    let r = req.send().await.unwrap();
    let status = r.status();
    let body = r.bytes().await.unwrap();
    let took = t.elapsed();
    assert!(status.is_success(), "{what}: {status} {}", String::from_utf8_lossy(&body));
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let _plugin = start_plugin(dir.path());
    let plain = ControlPlane::start(&dir.path().join("plain"), &Encryption::None);
    let kms = ControlPlane::start(
        &dir.path().join("kms-cp"),
        &Encryption::KmsV2 { name: "keyward".into(), socket: dir.path().join("kms.sock") },
    );
    let planes = [("identity (no encryption)", &plain), ("KMS v2, keyward kms-plugin --local", &kms)];
    let clients: Vec<reqwest::Client> = planes.iter().map(|(_, cp)| cp.http_client()).collect();
    let mut create: [Vec<Duration>; 2] = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut get: [Vec<Duration>; 2] = [Vec::with_capacity(n), Vec::with_capacity(n)];
    // Warm up each (connections, the KMS DEK).
    for (i, (_, cp)) in planes.iter().enumerate() {
        let body = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "warm-up"}, "stringData": {"password": "x"}});
        let url = format!("{}/api/v1/namespaces/default/secrets", cp.url);
        let r = clients[i]
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
    for k in 0..n {
        for (i, (_, cp)) in planes.iter().enumerate() {
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("s-{k}")}, "stringData": {"password": format!("hunter2-{k}")}});
            let req = clients[i]
                .post(format!("{}/api/v1/namespaces/default/secrets", cp.url))
                .header("content-type", "application/json")
                .body(body.to_string());
            create[i].push(timed(req, "create").await);
        }
    }
    for k in 0..n {
        for (i, (_, cp)) in planes.iter().enumerate() {
            let req = clients[i].get(format!("{}/api/v1/namespaces/default/secrets/s-{k}", cp.url));
            get[i].push(timed(req, "get").await);
        }
    }
    println!("kube-apiserver Secrets, {n} of each operation per row, the rows alternating");
    println!("| storage | create p50 | create p99 | get p50 | get p99 |");
    println!("|---|---|---|---|---|");
    for (i, (label, _)) in planes.iter().enumerate() {
        create[i].sort();
        get[i].sort();
        println!(
            "| {label} | {} | {} | {} | {} |",
            ms(percentile(&create[i], 0.5)),
            ms(percentile(&create[i], 0.99)),
            ms(percentile(&get[i], 0.5)),
            ms(percentile(&get[i], 0.99))
        );
    }
}
