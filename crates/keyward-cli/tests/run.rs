//! `keyward run` against `keyward dev` and its agent: secrets reach the program as environment
//! variables or memory-only files, bound to the program's executable (`exec:sha256:`); nothing
//! lands on disk (the test's directory, holding the server's data, and /dev/shm are searched); a file secret is not in the program's environment as another process sees
//! it; a changed secret is rewritten and the program signalled; another program is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PYTHON: &str = "/usr/bin/python3";

fn sha256_file(path: &str) -> String {
    let bytes = std::fs::read(std::fs::canonicalize(path).unwrap()).unwrap();
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes))
}

fn setup(dir: &Path) -> Dev {
    let dev = start_dev(&dir.join("dev"));
    assert!(dev.agent_socket.is_some(), "keyward dev runs an agent");
    let policy = serde_json::json!({
        "identities": [[format!("exec:sha256:{}", sha256_file(PYTHON))]],
        "rules": [{"resources": ["secrets/app/*"], "operations": ["read"]}]
    });
    std::fs::write(dir.join("policy.json"), policy.to_string()).unwrap();
    ok(&dev, &["policy", "put", "app-run", dir.join("policy.json").to_str().unwrap()], b"");
    ok(&dev, &["secret", "put", "app/db", "user=app", "password=hunter2-on-no-disk"], b"");
    dev
}

fn run_cmd(dev: &Dev, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("run").arg("--agent-socket").arg(dev.agent_socket.as_ref().unwrap()).args(args);
    c.env_remove("KEYWARD_TOKEN").env_remove("KEYWARD_ADDR");
    c
}

/// Every file under `dir` (recursively) that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return hits };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if ft.is_file()
            && let Ok(b) = std::fs::read(&p)
            && b.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(p.display().to_string());
        }
    }
    hits
}

const PROGRAM: &str = r#"
import json, os, signal, sys
def show(tag):
    with open(os.environ["DB_PASSWORD_FILE"]) as f:
        print(json.dumps({"tag": tag, "pid": os.getpid(), "user": os.environ.get("DB_USER"),
                          "password": f.read(), "file": os.environ["DB_PASSWORD_FILE"]}), flush=True)
signal.signal(signal.SIGHUP, lambda *_: show("reloaded"))
show("start")
sys.stdin.read()
"#;

#[test]
fn secrets_reach_the_program_in_memory_only_and_follow_changes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = setup(dir.path());
    let mut child = run_cmd(
        &dev,
        &[
            "--secret",
            "DB_USER=app/db#user",
            "--file",
            "DB_PASSWORD_FILE=app/db#password",
            "--refresh",
            "1s",
            "--",
            PYTHON,
            "-c",
            PROGRAM,
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().expect("the program printed").unwrap()).unwrap();
    assert_eq!(first["user"], "app");
    assert_eq!(first["password"], "hunter2-on-no-disk");
    let file = first["file"].as_str().unwrap();
    assert!(file.starts_with("/dev/fd/"), "{file}");

    // As another process sees the program: the file secret is not in its environment, and
    // the file is a memfd, not a path on any disk.
    let pid = first["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!environ.windows(7).any(|w| w == b"hunter2"), "the file secret leaked into the environment");
    assert!(environ.windows(11).any(|w| w == b"DB_USER=app"), "the env secret is there, as asked");
    let fd = file.trim_start_matches("/dev/fd/");
    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
    assert!(target.to_string_lossy().starts_with("/memfd:DB_PASSWORD_FILE"), "{target:?}");
    assert!(files_containing(dir.path(), b"hunter2-on-no-disk").is_empty(), "a secret was written to disk");
    assert!(
        files_containing(Path::new("/dev/shm"), b"hunter2-on-no-disk").is_empty(),
        "a secret was written to /dev/shm"
    );

    // The secret changes: the file is rewritten and the program gets SIGHUP.
    ok(&dev, &["secret", "put", "app/db", "user=app", "password=rotated-pw"], b"");
    let deadline = Instant::now() + Duration::from_secs(20);
    let reloaded = loop {
        let line = lines.next().expect("the program printed again").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["tag"] == "reloaded" {
            break v;
        }
        assert!(Instant::now() < deadline);
    };
    assert_eq!(reloaded["password"], "rotated-pw");

    // The program's exit status is keyward run's.
    child.stdin.take().unwrap().write_all(b"").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn other_programs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dev = setup(dir.path());
    // Another binary: its digest is not in the policy.
    let out = run_cmd(&dev, &["--secret", "X=app/db#user", "--", "/usr/bin/env"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    // A script is refused before anything is asked: its running executable would be the interpreter.
    let script = dir.path().join("app.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_cmd(&dev, &["--secret", "X=app/db#user", "--", script.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a script"), "{}", String::from_utf8_lossy(&out.stderr));
    // The same program started directly (not through the launcher) gets nothing: the policy
    // grants only the exec: selector, which only keyward run can obtain.
    let out = Command::new(BIN)
        .args(["workload", "--agent-socket", dev.agent_socket.as_ref().unwrap(), "secret", "app/db"])
        .env_remove("KEYWARD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Randomized secrets reach attested workloads through the agent: the same program (same uid
/// and executable) gets the same value each time, with no token.
#[test]
fn randomized_values_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let dev = setup(dir.path());
    ok(&dev, &["randomized", "define", "svc-password", "--ttl", "1h", "--length", "28"], b"");
    let policy = serde_json::json!({
        "identities": [[format!("unix:sha256:{}", sha256_file(BIN))]],
        "rules": [{"resources": ["randomized/svc-password"], "operations": ["read"]}]
    });
    std::fs::write(dir.path().join("rnd.json"), policy.to_string()).unwrap();
    ok(&dev, &["policy", "put", "svc", dir.path().join("rnd.json").to_str().unwrap()], b"");
    let get = || {
        let out = Command::new(BIN)
            .args(["workload", "--agent-socket", dev.agent_socket.as_ref().unwrap(), "randomized", "svc-password"])
            .env_remove("KEYWARD_TOKEN")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (a, b) = (get(), get());
    assert_eq!(a.len(), 28);
    assert_eq!(a, b, "the same workload gets the same value");
}
