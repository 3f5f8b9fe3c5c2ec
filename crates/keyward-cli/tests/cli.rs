//! The README's tour, run against the real `keyward` binary: dev server, keys, encrypt/decrypt
//! through stdin/stdout, rotation, restart on the same data directory, secrets, errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

mod common;

use common::{BIN, Dev, json, kw, ok, start_dev};

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn readme_tour_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let dev = start_dev(&data);
    assert!(dev.token.starts_with("kwt_"));
    assert_eq!(
        std::fs::read_to_string(data.join("root-token")).unwrap().trim(),
        dev.token,
        "root token written to DIR/root-token"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(data.join("root-token")).unwrap().permissions().mode() & 0o777, 0o600);

    // The key-holding process cannot dump core and has its memory locked.
    let pid = dev.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    if nix_is_root() {
        assert!(locked_kb > 0, "memory is locked (VmLck {locked_kb} kB)");
    }

    let k = json(&dev, &["key", "create", "payments"]);
    assert_eq!(k["type"], "aes256-gcm");
    let secret = b"card 4111-1111-1111-1111\x00\xff binary ok";
    let ct = ok(&dev, &["encrypt", "--key", "payments", "--context", "tenant=acme"], secret);
    assert_eq!(&ct[..2], b"KW", "raw ciphertext envelope on stdout");
    assert_eq!(ok(&dev, &["decrypt", "--context", "tenant=acme"], &ct), secret);
    let o = kw(&dev, &["decrypt", "--context", "tenant=evil"], &ct);
    assert!(!o.status.success());
    assert!(o.stdout.is_empty(), "no output on failure");
    assert!(String::from_utf8_lossy(&o.stderr).contains("decryption failed"));

    let b64 = ok(&dev, &["encrypt", "--key", "payments", "--base64"], b"text");
    assert_eq!(ok(&dev, &["decrypt", "--base64"], &b64), b"dGV4dA==\n");

    let k = json(&dev, &["key", "rotate", "payments"]);
    assert_eq!(k["current_version"], 2);
    assert_eq!(ok(&dev, &["decrypt", "--context", "tenant=acme"], &ct), secret, "old ciphertext after rotation");
    let table = String::from_utf8(ok(&dev, &["key", "list"], b"")).unwrap();
    assert!(table.contains("payments") && table.to_uppercase().contains("NAME"), "{table}");

    ok(&dev, &["secret", "put", "app/db", "user=app", "password=-"], b"s3cret");
    assert_eq!(ok(&dev, &["secret", "get", "app/db", "--field", "password"], b""), b"s3cret\n");
    for p in ["app/cache", "app/db2", "other/x"] {
        ok(&dev, &["secret", "put", p, "v=1"], b"");
    }
    // The prefix and cursor travel percent-encoded in the query string.
    assert_eq!(ok(&dev, &["secret", "list", "app/"], b""), b"app/cache\napp/db\napp/db2\n");
    assert_eq!(ok(&dev, &["secret", "list", "app/", "--after", "app/cache"], b""), b"app/db\napp/db2\n");
    assert_eq!(ok(&dev, &["secret", "list", "app/", "--limit", "1"], b""), b"app/cache\n");
    ok(&dev, &["key", "create", "signer", "--type", "ed25519"], b"");
    let sig = ok(&dev, &["sign", "--key", "signer"], b"release-1.0.tar.gz");
    let sig = String::from_utf8(sig).unwrap();
    ok(&dev, &["verify", "--key", "signer", "--signature", sig.trim()], b"release-1.0.tar.gz");
    assert_eq!(kw(&dev, &["verify", "--key", "signer", "--signature", sig.trim()], b"tampered").status.code(), Some(3));
    assert_eq!(ok(&dev, &["random", "--bytes", "16", "--encoding", "hex"], b"").len(), 33);
    let dk = json(&dev, &["datakey", "--key", "payments"]);
    assert!(dk["plaintext"].is_string() && dk["ciphertext"].is_string());

    // Policies and scoped tokens.
    let pol = dir.path().join("pol.json");
    std::fs::write(&pol, r#"{"rules":[{"resources":["keys/payments"],"operations":["encrypt","decrypt"]}]}"#).unwrap();
    ok(&dev, &["policy", "put", "payments-app", pol.to_str().unwrap()], b"");
    assert!(String::from_utf8(ok(&dev, &["policy", "list"], b"")).unwrap().contains("payments-app"));
    let t = json(&dev, &["token", "create", "--policy", "payments-app", "--ttl", "1h"]);
    let scoped = Dev {
        child: Command::new("true").spawn().unwrap(),
        addr: dev.addr.clone(),
        token: t["token"].as_str().unwrap().into(),
        agent_socket: None,
    };
    assert_eq!(ok(&scoped, &["decrypt", "--context", "tenant=acme"], &ct), secret, "scoped token may decrypt");
    let o = kw(&scoped, &["secret", "get", "app/db"], b"");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission denied"), "{}", String::from_utf8_lossy(&o.stderr));
    let out =
        String::from_utf8(ok(&dev, &["policy", "check", "--policy", "payments-app", "encrypt", "keys/payments"], b""))
            .unwrap();
    assert!(out.starts_with("allowed by policy payments-app rule 0"), "{out}");
    assert_eq!(
        kw(&dev, &["policy", "check", "--policy", "payments-app", "sign", "keys/payments"], b"").status.code(),
        Some(3)
    );
    let who = json(&scoped, &["auth", "whoami"]);
    assert_eq!(who["policies"], serde_json::json!(["payments-app"]));
    ok(&dev, &["token", "revoke", t["accessor"].as_str().unwrap()], b"");
    assert!(!kw(&scoped, &["auth", "whoami"], b"").status.success(), "revoked");
    drop(scoped);

    // Errors go to stderr with a non-zero exit and say what to do.
    let o = kw(&dev, &["key", "show", "nope"], b"");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
    let mut bad = Command::new(BIN);
    let o = bad.args(["key", "list"]).env("KEYWARD_ADDR", &dev.addr).env("KEYWARD_TOKEN", "kwt_bad").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("token"), "{}", String::from_utf8_lossy(&o.stderr));

    // Restart on the same data directory: same token, keys, versions and secrets.
    let token = dev.token.clone();
    drop(dev);
    let dev = start_dev(&data);
    assert_eq!(dev.token, token);
    assert_eq!(ok(&dev, &["decrypt", "--context", "tenant=acme"], &ct), secret);
    assert_eq!(json(&dev, &["key", "show", "payments"])["current_version"], 2);
    assert_eq!(ok(&dev, &["secret", "get", "app/db", "--field", "user"], b""), b"app\n");

    // The audit chain spans both runs and verifies; an edited record is found.
    let out = String::from_utf8(ok(&dev, &["audit", "verify"], b"")).unwrap();
    assert!(out.starts_with("ok: "), "{out}");
    let log = data.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let tampered = text.replacen("\"status\":200", "\"status\":201", 1);
    assert_ne!(text, tampered);
    std::fs::write(&log, tampered).unwrap();
    let o = kw(&dev, &["audit", "verify"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("BROKEN"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn dev_refuses_non_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN).args(["dev", "--listen", "0.0.0.0:0", "--data"]).arg(dir.path()).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("loopback"));
}

/// `--audit-stdout`: every record also goes to stdout as a JSON line, identical to the file's,
/// so a log collector gets a copy whose chain verifies on its own.
#[test]
fn audit_stdout_mirrors_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(BIN)
        .args(["dev", "--audit-stdout", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env_remove("KEYWARD_ADDR")
        .env_remove("KEYWARD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keyward dev");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let (mut addr, mut token, mut records) = (None, None, Vec::new());
    while addr.is_none() || token.is_none() {
        let line = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("dev printed its exports");
        if let Some(a) = line.strip_prefix("export KEYWARD_ADDR=") {
            addr = Some(a.to_string());
        } else if let Some(t) = line.strip_prefix("export KEYWARD_TOKEN=") {
            token = Some(t.to_string());
        } else if line.starts_with('{') {
            records.push(line);
        }
    }
    let dev = Dev { child, addr: addr.unwrap(), token: token.unwrap(), agent_socket: None };
    ok(&dev, &["key", "create", "mirrored"], b"");
    let ct = ok(&dev, &["encrypt", "--key", "mirrored"], b"do not log me");
    assert!(!kw(&dev, &["key", "show", "missing"], b"").status.success());
    let info = json(&dev, &["audit", "info"]);
    // The head as of before the info request; its own record follows it.
    let want = info["head"]["seq"].as_u64().unwrap() + 1;
    while records.len() < usize::try_from(want).unwrap() {
        let line = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("every record reaches stdout");
        if line.starts_with('{') {
            records.push(line);
        }
    }
    let file: Vec<String> = std::fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| l.trim_matches('\0').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(records, file[..records.len()], "stdout carries exactly the file's records, in order");
    let all = records.join("\n");
    assert!(all.contains("\"status\":404"), "failures are mirrored too");
    assert!(!all.contains("do not log me") && !all.contains(&dev.token), "no plaintext or token");
    assert!(!all.contains(&String::from_utf8_lossy(&ct).trim().to_string()), "no ciphertext");
    let copy = dir.path().join("collected.log");
    std::fs::write(&copy, format!("{all}\n")).unwrap();
    let o = kw(&dev, &["audit", "verify", copy.to_str().unwrap()], b"");
    assert!(o.status.success(), "the collected copy verifies: {}", String::from_utf8_lossy(&o.stderr));
    drop(dev);
    reader.join().unwrap();
}

/// The README's tour, line by line, as written: in bash, with `keyward` on the PATH and the
/// dev server's variables exported (what `keyward dev` tells the reader to paste). A line
/// marked `# fails:` must fail; every other line must succeed.
#[test]
fn the_readme_tour_runs_as_written() {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let tour = readme.split("## A short tour").nth(1).unwrap();
    let block = tour.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    let lines: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 20, "the tour has its commands: {lines:?}");

    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("keyward")).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    for line in lines {
        let out = Command::new("bash")
            .args(["-o", "pipefail", "-c", line])
            .current_dir(&work)
            .env("PATH", &path)
            .env("KEYWARD_ADDR", &dev.addr)
            .env("KEYWARD_TOKEN", &dev.token)
            .env_remove("KEYWARD_CACERT")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let fails = line.contains("# fails:");
        assert_eq!(
            !out.status.success(),
            fails,
            "README line `{line}`: exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{line}");
    }
    // What the tour made is there.
    assert!(work.join("card2.kw").exists() && work.join("app.sig").exists());
}
