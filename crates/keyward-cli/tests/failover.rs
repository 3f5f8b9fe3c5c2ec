//! Fail-over with real processes: three `keyward server` processes share one PostgreSQL (a real
//! one, started by the test). Two `keyward bench --verify` runs (secret writes and encryptions)
//! are given all three addresses; one server is killed with SIGKILL, then another. The load goes
//! on through the survivor, every acknowledged write is still there with the value written,
//! every acknowledged ciphertext decrypts to its plaintext, and the reports count the errors
//! seen while failing over. The scheduler lease moves to the survivor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyward_test_support::postgres as pg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{BIN, is_root, self_signed, server_address};

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `keyward server` on PostgreSQL; returns it and, on a new store, the root token.
fn start(dir: &Path, data: &Path, url: &str) -> (Server, Option<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--insecure-file-seal", "--scheduler-lease", "2s", "--data"])
        .arg(data)
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"));
    if !is_root() {
        cmd.arg("--insecure-no-mlock");
    }
    let mut child = cmd
        .env("KEYWARD_POSTGRES_URL", url)
        .env_remove("KEYWARD_ADDR")
        .env_remove("KEYWARD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward server");
    let addr = server_address(&mut child);
    // A new store prints its root token at once; an existing one prints nothing.
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.by_ref().map_while(Result::ok) {
            if let Some(t) = l.strip_prefix("export KEYWARD_TOKEN=") {
                let _ = tx.send(t.to_string());
            }
        }
    });
    let token = rx.recv_timeout(Duration::from_secs(2)).ok();
    (Server { child, addr }, token)
}

fn health(s: &Server, cacert: &Path) -> Option<Value> {
    let o = Command::new(BIN)
        .args(["status", "-o", "json"])
        .env("KEYWARD_ADDR", &s.addr)
        .env("KEYWARD_CACERT", cacert)
        .env_remove("KEYWARD_TOKEN")
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).ok()
}

fn bench(op: &str, addrs: &str, token: &str, cacert: &Path) -> Child {
    Command::new(BIN)
        .args(["bench", "--op", op, "--verify", "--json", "-c", "8", "-d", "12s", "--warmup", "0s", "--size", "64"])
        .args(["--secret-path", &format!("failover/{op}"), "--key", "failover"])
        .env("KEYWARD_ADDR", addrs)
        .env("KEYWARD_TOKEN", token)
        .env("KEYWARD_CACERT", cacert)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward bench")
}

fn sigkill(s: &mut Server) {
    let ok = Command::new("kill").args(["-9", &s.child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -9 failed");
    let _ = s.child.wait();
}

#[test]
fn load_survives_two_of_three_servers_killed() {
    let cluster = pg::Cluster::start();
    cluster.create_db("keyward");
    let url = cluster.url("keyward");
    let dir = tempfile::tempdir().unwrap();
    let cacert = self_signed(dir.path());

    let data: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("data{i}"))).collect();
    let (first, token) = start(dir.path(), &data[0], &url);
    let token = token.expect("the first server initialises the store and prints the root token");
    // The other servers share the (insecure, test-only) unseal key file.
    for d in &data[1..] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(data[0].join("root-key.insecure"), d.join("root-key.insecure")).unwrap();
    }
    let mut servers = vec![first];
    for d in &data[1..] {
        let (s, t) = start(dir.path(), d, &url);
        assert!(t.is_none(), "later servers find the store initialised");
        servers.push(s);
    }
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let all = addrs.join(",");

    let t0 = Instant::now();
    let writes = bench("secret-put", &all, &token, &cacert);
    let crypto = bench("encrypt", &all, &token, &cacert);
    std::thread::sleep(Duration::from_secs(3));
    sigkill(&mut servers[0]);
    println!("killed server 0 at {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_secs(4));
    sigkill(&mut servers[1]);
    println!("killed server 1 at {:?}", t0.elapsed());

    for (name, child) in [("secret-put", writes), ("encrypt", crypto)] {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let report: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: no JSON report ({e}): {stderr}"));
        println!("{name}: {report}");
        assert!(out.status.success(), "{name} failed: {stderr}");
        let ops = report["ops"].as_u64().unwrap();
        assert!(ops > 100, "{name}: the load went on ({ops} operations)");
        assert_eq!(report["wrong"], 0, "{name}: no acknowledged write lost, no wrong answer: {report}");
        assert_eq!(report["unverifiable"], 0, "{name}: everything acknowledged reads back: {report}");
        assert!(report["verified"].as_u64().unwrap() >= ops, "{name}: every acknowledged operation checked");
    }

    // The survivor holds the scheduler lease (whoever held it before was killed, or it was
    // already the holder).
    let survivor = &servers[2];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = health(survivor, &cacert).expect("survivor answers");
        if h["scheduler"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the scheduler lease did not move to the survivor: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
