//! The seal ceremonies on a real `keyward server` process over HTTPS: init, unseal with 3 of 5
//! shares (and failure with 2, a repeated share or a forged one), seal/unseal, rekey, root
//! rotation with existing data still readable, restart, and the audit chain across all of it.
//! Certificates come from the `openssl` command (Debian `openssl`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use base64::Engine;
use serde_json::Value;

mod common;

use common::{BIN, is_root, self_signed};

struct Server {
    child: Child,
    addr: String,
    cacert: PathBuf,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Server {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"))
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"));
    if !is_root() {
        // Locking all memory needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK; as root (CI) the
        // real check runs below.
        cmd.arg("--insecure-no-mlock");
    }
    let mut child = cmd
        .env_remove("KEYWARD_ADDR")
        .env_remove("KEYWARD_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward server");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some(rest) = line.strip_prefix("Keyward server on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr, cacert: dir.join("server.pem"), token: String::new() }
}

fn kw(s: &Server, args: &[&str], stdin: &[u8]) -> Output {
    let mut c = Command::new(BIN)
        .args(args)
        .env("KEYWARD_ADDR", &s.addr)
        .env("KEYWARD_TOKEN", &s.token)
        .env("KEYWARD_CACERT", &s.cacert)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin).unwrap();
    c.wait_with_output().unwrap()
}

fn ok(s: &Server, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let o = kw(s, args, stdin);
    assert!(o.status.success(), "keyward {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn json(s: &Server, args: &[&str], stdin: &[u8]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_slice(&ok(s, &a, stdin)).unwrap()
}

fn fails(s: &Server, args: &[&str], stdin: &[u8], expect: &str) {
    let o = kw(s, args, stdin);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "keyward {args:?} should fail");
    assert!(err.contains(expect), "keyward {args:?}: expected {expect:?} in {err}");
}

fn unseal(s: &Server, share: &str) -> Value {
    json(s, &["operator", "unseal"], format!("{share}\n").as_bytes())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn init_unseal_seal_rekey_rotate_root_on_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    self_signed(dir.path());
    let mut s = start(dir.path());

    // Hardening of the real process: no core dumps, memory locked (when allowed).
    let pid = s.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "core dumps disabled: {core}");
    if is_root() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.lines().any(|l| l.starts_with("VmLck:") && !l.contains(" 0 kB")), "memory locked");
    }

    let st = json(&s, &["status"], b"");
    assert_eq!((st["initialized"].as_bool(), st["sealed"].as_bool()), (Some(false), Some(true)), "{st}");
    assert_eq!(st["seal"], "shamir");
    fails(&s, &["key", "list"], b"", "sealed");

    let init = json(&s, &["operator", "init", "--shares", "5", "--threshold", "3"], b"");
    let shares = strings(&init["shares"]);
    assert_eq!(shares.len(), 5);
    s.token = init["root_token"].as_str().unwrap().to_string();
    fails(&s, &["operator", "init"], b"", "already initialised");
    fails(&s, &["key", "list"], b"", "sealed");
    fails(&s, &["operator", "unseal"], b"not-base64!\n", "base64");

    // Two shares (one repeated) are not enough.
    assert_eq!(unseal(&s, &shares[0])["progress"], 1);
    fails(&s, &["operator", "unseal"], format!("{}\n", shares[0]).as_bytes(), "already submitted");
    assert_eq!(unseal(&s, &shares[1])["progress"], 2);
    let st = json(&s, &["status"], b"");
    assert_eq!((st["sealed"].as_bool(), st["progress"].as_u64()), (Some(true), Some(2)));
    fails(&s, &["key", "list"], b"", "sealed");

    // A forged third share: the set fails as a whole and progress resets.
    let mut forged = base64::engine::general_purpose::STANDARD.decode(&shares[2]).unwrap();
    forged[0] ^= 1;
    let forged = base64::engine::general_purpose::STANDARD.encode(forged);
    fails(&s, &["operator", "unseal"], format!("{forged}\n").as_bytes(), "forged");
    assert_eq!(json(&s, &["status"], b"")["progress"], 0);
    fails(&s, &["key", "list"], b"", "sealed");

    // Any three distinct shares unseal.
    unseal(&s, &shares[4]);
    unseal(&s, &shares[2]);
    assert_eq!(unseal(&s, &shares[0])["complete"], true);
    assert_eq!(json(&s, &["status"], b"")["sealed"], false);
    ok(&s, &["key", "create", "payments"], b"");
    let ct = ok(&s, &["encrypt", "--key", "payments"], b"card data");
    ok(&s, &["secret", "put", "app/db", "password=hunter2"], b"");

    // Seal: everything but status and unseal answers 503; unseal with another three shares.
    ok(&s, &["operator", "seal"], b"");
    assert_eq!(json(&s, &["status"], b"")["sealed"], true);
    fails(&s, &["decrypt"], &ct, "sealed");
    for sh in &shares[1..4] {
        unseal(&s, sh);
    }
    assert_eq!(ok(&s, &["decrypt"], &ct), b"card data");

    // Rekey to 3 shares / threshold 2 with three current shares; old shares stop working.
    assert_eq!(
        json(&s, &["operator", "rekey", "--shares", "3", "--threshold", "2"], format!("{}\n", shares[3]).as_bytes())["progress"],
        1
    );
    fails(&s, &["operator", "rekey"], format!("{}\n", shares[3]).as_bytes(), "already submitted");
    json(&s, &["operator", "rekey"], format!("{}\n", shares[1]).as_bytes());
    let rekeyed = json(&s, &["operator", "rekey"], format!("{}\n", shares[4]).as_bytes());
    let new_shares = strings(&rekeyed["shares"]);
    assert_eq!(new_shares.len(), 3);
    let st = json(&s, &["status"], b"");
    assert_eq!((st["shares"].as_u64(), st["threshold"].as_u64()), (Some(3), Some(2)));
    ok(&s, &["operator", "seal"], b"");
    unseal(&s, &shares[0]);
    fails(&s, &["operator", "unseal"], format!("{}\n", shares[1]).as_bytes(), "forged");
    unseal(&s, &new_shares[2]);
    assert_eq!(unseal(&s, &new_shares[0])["complete"], true);
    assert_eq!(ok(&s, &["decrypt"], &ct), b"card data");

    // Root rotation while serving; old data stays readable, new data works.
    ok(&s, &["key", "rotate", "payments"], b"");
    let r = json(&s, &["operator", "rotate-root"], b"");
    assert_eq!(r["key_versions_rewrapped"], 2, "{r}");
    assert_eq!(r["service_keys_rewrapped"], 4, "{r}");
    assert_eq!(ok(&s, &["decrypt"], &ct), b"card data");
    assert_eq!(ok(&s, &["secret", "get", "app/db", "--field", "password"], b""), b"hunter2\n");

    // Restart the process: sealed again, the new shares unseal, everything is there.
    let token = s.token.clone();
    drop(s);
    let mut s = start(dir.path());
    s.token = token;
    assert_eq!(json(&s, &["status"], b"")["sealed"], true);
    unseal(&s, &new_shares[1]);
    unseal(&s, &new_shares[2]);
    assert_eq!(ok(&s, &["decrypt"], &ct), b"card data");
    assert_eq!(ok(&s, &["secret", "get", "app/db", "--field", "password"], b""), b"hunter2\n");
    let ct2 = ok(&s, &["encrypt", "--key", "payments"], b"after rotation");
    assert_eq!(ok(&s, &["decrypt"], &ct2), b"after rotation");

    // One audit chain across seals, rekey, rotation and restart.
    let out = String::from_utf8(ok(&s, &["audit", "verify"], b"")).unwrap();
    assert!(out.starts_with("ok: "), "{out}");
    let log = std::fs::read_to_string(dir.path().join("data/audit.log")).unwrap();
    assert!(log.contains("unsealed (seal shamir)"));
    assert!(log.contains("sys/rotate-root") && log.contains("sys/seal"));
    for secret in shares.iter().chain(&new_shares) {
        assert!(!log.contains(secret.as_str()), "no share in the audit log");
    }
}
