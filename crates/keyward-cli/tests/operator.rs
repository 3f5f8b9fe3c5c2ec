//! The seal ceremonies on a real `keyward server` process over HTTPS: init, unseal with 3 of 5
//! shares (and failure with 2, a repeated share or a forged one), seal/unseal, rekey, root
//! rotation with existing data still readable, restart, and the audit chain across all of it.
//! Certificates come from the `openssl` command (Debian `openssl`). The PKCS#11 seal runs against
//! a real SoftHSM2 token (Debian `softhsm2`) made by the test in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use base64::Engine;
use serde_json::Value;

mod common;
use keyward_test_support::softhsm;

use common::{BIN, is_root, self_signed, server_address};
use softhsm::{SOFTHSM_LIB, softhsm_token};

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
    start_with(dir, &[], None)
}

/// `keyward server` on `dir` with more arguments, and SoftHSM2's configuration if given.
fn server_command(dir: &Path, extra: &[&str], softhsm_conf: Option<&Path>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"))
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .args(extra);
    if let Some(conf) = softhsm_conf {
        cmd.env("SOFTHSM2_CONF", conf);
    }
    if !is_root() {
        // Locking all memory needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK; as root (CI) the
        // real check runs below.
        cmd.arg("--insecure-no-mlock");
    }
    cmd
}

fn start_with(dir: &Path, extra: &[&str], softhsm_conf: Option<&Path>) -> Server {
    let mut child = server_command(dir, extra, softhsm_conf)
        .env_remove("KEYWARD_ADDR")
        .env_remove("KEYWARD_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward server");
    let addr = server_address(&mut child);
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

/// What a seal migration must leave alone: every wrapped key version and secret version, and
/// (unless rekeyed) the wrapped root keyring.
fn stored_material(dir: &Path) -> (Vec<Vec<u8>>, Vec<String>) {
    let db =
        rusqlite::Connection::open_with_flags(dir.join("data/keyward.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut wrapped: Vec<Vec<u8>> = Vec::new();
    for q in [
        "SELECT wrapped_material FROM key_versions ORDER BY key_id, version",
        "SELECT wrapped_value FROM secret_versions WHERE wrapped_value IS NOT NULL ORDER BY path, version",
    ] {
        let mut st = db.prepare(q).unwrap();
        wrapped.extend(st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap().map(Result::unwrap));
    }
    let seal: Vec<u8> = db.query_row("SELECT v FROM meta WHERE k = 'seal'", [], |r| r.get(0)).unwrap();
    let seal: Value = serde_json::from_slice(&seal).unwrap();
    (wrapped, strings(&seal["keyring"]))
}

fn seal_record(dir: &Path) -> Value {
    let db =
        rusqlite::Connection::open_with_flags(dir.join("data/keyward.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let seal: Vec<u8> = db.query_row("SELECT v FROM meta WHERE k = 'seal'", [], |r| r.get(0)).unwrap();
    serde_json::from_slice(&seal).unwrap()
}

#[test]
fn hsm_seal_unseals_itself_and_migrates_from_and_back_to_shamir() {
    let dir = tempfile::tempdir().unwrap();
    self_signed(dir.path());
    let hsm_dir = dir.path().join("hsm");
    let conf = softhsm_token(&hsm_dir, "keyward", "246810");
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, "246810\n").unwrap();
    let pin_arg = pin_file.to_str().unwrap();
    let hsm = ["--pkcs11-lib", SOFTHSM_LIB, "--pkcs11-token", "keyward", "--pkcs11-pin-file", pin_arg];

    // A Shamir-sealed server with data.
    let mut s = start(dir.path());
    let init = json(&s, &["operator", "init", "--shares", "3", "--threshold", "2"], b"");
    let shares = strings(&init["shares"]);
    s.token = init["root_token"].as_str().unwrap().to_string();
    unseal(&s, &shares[0]);
    assert_eq!(unseal(&s, &shares[1])["complete"], true);
    ok(&s, &["key", "create", "payments"], b"");
    let ct = ok(&s, &["encrypt", "--key", "payments"], b"card data");
    ok(&s, &["secret", "put", "app/db", "password=hunter2"], b"");
    let token = s.token.clone();
    drop(s);
    let before = stored_material(dir.path());

    // Shamir -> HSM: the server with the PKCS#11 seal says a migration is needed, refuses a
    // plain unseal, and migrates with the shares and --migrate.
    let mut s = start_with(dir.path(), &hsm, Some(&conf));
    s.token = token.clone();
    let st = json(&s, &["status"], b"");
    assert_eq!(st["sealed"], true, "{st}");
    assert_eq!((st["seal"].as_str(), st["stored_seal"].as_str()), (Some("pkcs11"), Some("shamir")));
    assert_eq!(st["migration_required"], true);
    fails(&s, &["operator", "unseal"], format!("{}\n", shares[0]).as_bytes(), "--migrate");
    assert_eq!(json(&s, &["operator", "unseal", "--migrate"], format!("{}\n", shares[0]).as_bytes())["progress"], 1);
    let done = json(&s, &["operator", "unseal", "--migrate"], format!("{}\n", shares[2]).as_bytes());
    assert_eq!(done["complete"], true);
    let st = json(&s, &["status"], b"");
    assert_eq!((st["sealed"].as_bool(), st["stored_seal"].as_str()), (Some(false), Some("pkcs11")), "{st}");
    assert_eq!(st["migration_required"], false);
    assert!(st["hsm_key"].as_str().unwrap().contains("keyward-seal"), "{st}");
    assert_eq!(ok(&s, &["decrypt"], &ct), b"card data");
    assert_eq!(ok(&s, &["secret", "get", "app/db", "--field", "password"], b""), b"hunter2\n");
    drop(s);
    assert_eq!(stored_material(dir.path()), before, "nothing was re-encrypted, not even the root keyring");
    let rec = seal_record(dir.path());
    assert_eq!(rec["kind"], "pkcs11");
    assert!(rec["hsm"]["wrapped"].as_str().unwrap().len() == 2 * (1 + 12 + 32 + 16), "{rec}");

    // Restarted with the HSM: unsealed at start with no operator at all.
    let mut s = start_with(dir.path(), &hsm, Some(&conf));
    s.token = token.clone();
    assert_eq!(json(&s, &["status"], b"")["sealed"], false);
    assert_eq!(ok(&s, &["decrypt"], &ct), b"card data");
    // Sealed by an operator, the recovery shares unseal it (no migration involved).
    ok(&s, &["operator", "seal"], b"");
    fails(&s, &["decrypt"], &ct, "sealed");
    fails(&s, &["operator", "unseal", "--migrate"], format!("{}\n", shares[1]).as_bytes(), "nothing to migrate");
    unseal(&s, &shares[1]);
    assert_eq!(unseal(&s, &shares[2])["complete"], true);
    // Rekey the recovery shares: the HSM wraps the new unseal key, the old shares stop working.
    json(&s, &["operator", "rekey", "--shares", "2", "--threshold", "2"], format!("{}\n", shares[0]).as_bytes());
    let rekeyed = json(&s, &["operator", "rekey"], format!("{}\n", shares[2]).as_bytes());
    let recovery = strings(&rekeyed["shares"]);
    assert_eq!(recovery.len(), 2);
    drop(s);
    let mut s = start_with(dir.path(), &hsm, Some(&conf));
    s.token = token.clone();
    assert_eq!(json(&s, &["status"], b"")["sealed"], false, "the HSM unwraps the rekeyed unseal key");
    ok(&s, &["operator", "seal"], b"");
    unseal(&s, &shares[0]);
    fails(&s, &["operator", "unseal"], format!("{}\n", shares[1]).as_bytes(), "forged");
    unseal(&s, &recovery[0]);
    assert_eq!(unseal(&s, &recovery[1])["complete"], true);
    let ct2 = ok(&s, &["encrypt", "--key", "payments"], b"sealed by the HSM");
    drop(s);

    // A wrong PIN stops the server at start with a message naming the problem (and no PIN).
    let bad_pin = dir.path().join("bad-pin");
    std::fs::write(&bad_pin, "000000\n").unwrap();
    let bad =
        ["--pkcs11-lib", SOFTHSM_LIB, "--pkcs11-token", "keyward", "--pkcs11-pin-file", bad_pin.to_str().unwrap()];
    let out = server_command(dir.path(), &bad, Some(&conf)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong PIN must stop the server");
    assert!(err.contains("login") && err.contains("PIN"), "{err}");
    assert!(!err.contains("246810") && !err.contains("000000"), "no PIN in the output: {err}");
    // An unknown token is named too.
    let nope = ["--pkcs11-lib", SOFTHSM_LIB, "--pkcs11-token", "nope", "--pkcs11-pin-file", pin_arg];
    let out = server_command(dir.path(), &nope, Some(&conf)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PKCS#11 token labelled \"nope\""));

    // The HSM key lost (a new token with the same label and PIN): the server stays sealed and
    // says so; the recovery shares still unseal it.
    let other_conf = softhsm_token(&dir.path().join("hsm2"), "keyward", "246810");
    let mut s = start_with(dir.path(), &hsm, Some(&other_conf));
    s.token = token.clone();
    let st = json(&s, &["status"], b"");
    assert_eq!((st["sealed"].as_bool(), st["migration_required"].as_bool()), (Some(true), Some(false)), "{st}");
    fails(&s, &["decrypt"], &ct, "sealed");
    unseal(&s, &recovery[1]);
    assert_eq!(unseal(&s, &recovery[0])["complete"], true);
    assert_eq!(ok(&s, &["decrypt"], &ct2), b"sealed by the HSM");
    drop(s);

    // HSM -> Shamir: a server without the HSM migrates back with the recovery shares, which
    // are the unseal shares from then on. Stored keys and secrets are still not re-encrypted.
    let before = stored_material(dir.path());
    let mut s = start(dir.path());
    s.token = token.clone();
    let st = json(&s, &["status"], b"");
    assert_eq!((st["seal"].as_str(), st["stored_seal"].as_str()), (Some("shamir"), Some("pkcs11")), "{st}");
    fails(&s, &["operator", "unseal"], format!("{}\n", recovery[0]).as_bytes(), "--migrate");
    json(&s, &["operator", "unseal", "--migrate"], format!("{}\n", recovery[0]).as_bytes());
    assert_eq!(
        json(&s, &["operator", "unseal", "--migrate"], format!("{}\n", recovery[1]).as_bytes())["complete"],
        true
    );
    let st = json(&s, &["status"], b"");
    assert_eq!((st["sealed"].as_bool(), st["stored_seal"].as_str()), (Some(false), Some("shamir")), "{st}");
    assert!(st["hsm_key"].is_null());
    assert_eq!(ok(&s, &["decrypt"], &ct), b"card data");
    assert_eq!(ok(&s, &["decrypt"], &ct2), b"sealed by the HSM");
    drop(s);
    assert_eq!(stored_material(dir.path()), before);
    assert!(seal_record(dir.path()).get("hsm").is_none(), "the HSM-wrapped unseal key is gone");

    // Shamir again: sealed at start until the shares are given; the audit chain held throughout.
    let mut s = start(dir.path());
    s.token = token;
    assert_eq!(json(&s, &["status"], b"")["sealed"], true);
    unseal(&s, &recovery[0]);
    unseal(&s, &recovery[1]);
    assert_eq!(ok(&s, &["secret", "get", "app/db", "--field", "password"], b""), b"hunter2\n");
    let out = String::from_utf8(ok(&s, &["audit", "verify"], b"")).unwrap();
    assert!(out.starts_with("ok: "), "{out}");
    let log = std::fs::read_to_string(dir.path().join("data/audit.log")).unwrap();
    assert!(log.contains("unsealed (seal pkcs11)") && log.contains("unsealed (seal shamir)"));
    assert!(!log.contains("246810"), "no PIN in the audit log");
}

#[test]
fn a_snapshot_saved_under_load_restores_on_a_fresh_server_with_the_same_shares() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    self_signed(dir.path());
    let mut s = start(dir.path());
    let init = json(&s, &["operator", "init", "--shares", "3", "--threshold", "2"], b"");
    let shares = strings(&init["shares"]);
    s.token = init["root_token"].as_str().unwrap().to_string();
    unseal(&s, &shares[0]);
    unseal(&s, &shares[1]);

    let mut sealed = Vec::new();
    for (i, t) in ["aes256-gcm", "ecdsa-p256", "hmac-sha256"].iter().enumerate() {
        ok(&s, &["key", "create", &format!("k{i}"), "--type", t], b"");
    }
    ok(&s, &["key", "rotate", "k0"], b"");
    for i in 0..5 {
        sealed.push(ok(&s, &["encrypt", "--key", "k0", "--context", "n=1"], format!("message {i}").as_bytes()));
    }
    for i in 0..20 {
        ok(&s, &["secret", "put", &format!("app/s{i}"), &format!("v={i}")], b"");
    }
    ok(&s, &["secret", "put", "app/s0", "v=second"], b"");
    ok(&s, &["policy", "put", "p", "-"], br#"{"rules": [{"resources": ["keys/k0"], "operations": ["encrypt"]}]}"#);

    // Writers keep going while the snapshot is taken.
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, token, ca) = (s.addr.clone(), s.token.clone(), s.cacert.clone());
    let load = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let o = Command::new(BIN)
                    .args(["secret", "put", &format!("load/{i}"), "v=x"])
                    .env("KEYWARD_ADDR", &addr)
                    .env("KEYWARD_TOKEN", &token)
                    .env("KEYWARD_CACERT", &ca)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                i += 1;
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    while acked.load(Ordering::SeqCst) < 3 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = acked.load(Ordering::SeqCst);
    let file = dir.path().join("keyward.snapshot");
    let saved = json(&s, &["operator", "snapshot", "save", file.to_str().unwrap()], b"");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert!(saved["bytes"].as_u64().unwrap() > 4096, "{saved}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    fails(&s, &["operator", "snapshot", "save", file.to_str().unwrap()], b"", "never written over");
    // What is in it stays encrypted: no secret value or message in the clear.
    let raw = std::fs::read(&file).unwrap();
    assert!(!raw.windows(7).any(|w| w == b"v=second" || w == b"second"), "secret values are encrypted");
    drop(s);

    // A fresh server on the restored directory: sealed, and the same shares open it.
    let dir2 = tempfile::tempdir().unwrap();
    for f in ["server.pem", "server.key"] {
        std::fs::copy(dir.path().join(f), dir2.path().join(f)).unwrap();
    }
    let restore = Command::new(BIN)
        .args(["operator", "snapshot", "restore"])
        .arg(&file)
        .arg("--data")
        .arg(dir2.path().join("data"))
        .output()
        .unwrap();
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
    let mut r = start(dir2.path());
    r.token = init["root_token"].as_str().unwrap().to_string();
    assert_eq!(json(&r, &["status"], b"")["sealed"], true);
    unseal(&r, &shares[2]);
    assert_eq!(unseal(&r, &shares[0])["complete"], true);
    for (i, ct) in sealed.iter().enumerate() {
        assert_eq!(ok(&r, &["decrypt", "--context", "n=1"], ct), format!("message {i}").as_bytes());
    }
    assert_eq!(json(&r, &["key", "show", "k0"], b"")["current_version"], 2);
    assert_eq!(json(&r, &["key", "show", "k1"], b"")["type"], "ecdsa-p256");
    for i in 1..20 {
        assert_eq!(ok(&r, &["secret", "get", &format!("app/s{i}"), "--field", "v"], b""), format!("{i}\n").as_bytes());
    }
    assert_eq!(ok(&r, &["secret", "get", "app/s0", "--field", "v"], b""), b"second\n");
    for i in 0..before {
        ok(&r, &["secret", "get", &format!("load/{i}")], b"");
    }
    assert_eq!(json(&r, &["policy", "show", "p"], b"")["name"], "p");
    // Restoring over an existing data directory is refused.
    let again = Command::new(BIN)
        .args(["operator", "snapshot", "restore"])
        .arg(&file)
        .arg("--data")
        .arg(dir2.path().join("data"))
        .output()
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
