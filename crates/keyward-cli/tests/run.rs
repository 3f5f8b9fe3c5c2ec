//! `keyward run` against `keyward dev` and its agent: secrets reach the program as environment
//! variables or memory-only files, bound to the program by its bytes and the launcher's uid
//! (`exec:uid:UID:sha256:`; a script by the script's own bytes); nothing lands on disk (the
//! test's directory, holding the server's data, and /dev/shm are searched); a file secret is
//! not in the program's environment as another process sees it; the loader's and interpreters'
//! variables and the caller's token do not reach it; a changed secret is rewritten and the
//! program signalled; another program, another script of the same interpreter, another uid and
//! a launcher with code preloaded from the caller's files are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn sha256_file(path: &str) -> String {
    let bytes = std::fs::read(std::fs::canonicalize(path).unwrap()).unwrap();
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes))
}

/// The program, as a python script of its own (bound by its bytes, not by python's).
fn write_script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!{PYTHON}\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn euid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}

fn setup(dir: &Path) -> Dev {
    let dev = start_dev(&dir.join("dev"));
    assert!(dev.agent_socket.is_some(), "keyward dev runs an agent");
    let app = write_script(dir, "app.py", PROGRAM);
    // The documented policy: this script (by its bytes), started by `keyward run` as this uid,
    // on this node; and /usr/bin/true, which finishes before it can be verified.
    let uid = euid();
    let policy = serde_json::json!({
        "identities": [
            [format!("exec:uid:{uid}:sha256:{}", sha256_file(&app)), "node:name:dev"],
            [format!("exec:uid:{uid}:sha256:{}", sha256_file("/usr/bin/true")), "node:name:dev"]
        ],
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
                          "password": f.read(), "file": os.environ["DB_PASSWORD_FILE"],
                          "leaked": sorted(k for k in os.environ if k.startswith(("LD_", "PYTHON", "KEYWARD_TOKEN", "NODE_OPTIONS")))}),
              flush=True)
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
            dir.path().join("app.py").to_str().unwrap(),
        ],
    )
    // The caller's loader and interpreter variables and its token stay with the caller (a
    // root-owned library preloaded into the launcher itself is allowed: it is not the caller's).
    .env("LD_PRELOAD", "/lib/x86_64-linux-gnu/libm.so.6")
    .env("PYTHONSTARTUP", "/nonexistent/startup.py")
    .env("NODE_OPTIONS", "--require /tmp/x.js")
    .env("KEYWARD_TOKEN", "kw_should_not_reach_the_program")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().expect("the program printed").unwrap()).unwrap();
    assert_eq!(first["user"], "app");
    assert_eq!(first["password"], "hunter2-on-no-disk");
    assert_eq!(first["leaked"], serde_json::json!([]), "scrubbed variables reached the program");
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
    // Another script of the same interpreter: allowing one script allows no other.
    let other = write_script(dir.path(), "other.py", "print('hi')\n");
    let out = run_cmd(&dev, &["--secret", "X=app/db#user", "--", &other]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The interpreter itself, with the allowed script's text given inline: not the script.
    let out = run_cmd(&dev, &["--secret", "X=app/db#user", "--", PYTHON, "-c", PROGRAM]).output().unwrap();
    assert!(!out.status.success());
    // The same program started directly (not through the launcher) gets nothing: the policy
    // grants only the exec: selector, which only keyward run can obtain.
    let out = Command::new(BIN)
        .args(["workload", "--agent-socket", dev.agent_socket.as_ref().unwrap(), "secret", "app/db"])
        .env_remove("KEYWARD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// `keyward run` in a pid namespace of its own (as in a container): it names its child by the
/// pid it has there, and the agent finds that child among the launcher's children.
#[test]
fn keyward_run_works_in_a_pid_namespace() {
    assert!(is_root(), "this test makes a pid namespace, so it must run as root");
    let dir = tempfile::tempdir().unwrap();
    let dev = setup(dir.path());
    let app = write_script(dir.path(), "inns.py", "import os; print(os.environ['X'], os.getpid())\n");
    let policy = serde_json::json!({
        "identities": [[format!("exec:uid:{}:sha256:{}", euid(), sha256_file(&app)), "node:name:dev"]],
        "rules": [{"resources": ["secrets/app/*"], "operations": ["read"]}]
    });
    std::fs::write(dir.path().join("inns.json"), policy.to_string()).unwrap();
    ok(&dev, &["policy", "put", "inns", dir.path().join("inns.json").to_str().unwrap()], b"");
    let out = Command::new("unshare")
        .args(["--pid", "--fork", BIN, "run", "--agent-socket"])
        .arg(dev.agent_socket.as_ref().unwrap())
        .args(["--secret", "X=app/db#user", "--", &app])
        .env_remove("KEYWARD_TOKEN")
        .output()
        .expect("unshare (util-linux) is needed by this test");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let (value, pid) = text.trim().split_once(' ').unwrap();
    assert_eq!(value, "app");
    assert!(pid.parse::<u32>().unwrap() < 10, "the program ran in the new pid namespace: {text}");
}

/// A program that finishes before the launcher can verify it was not an impostor: it ran the
/// very file that was hashed. Its exit status is passed through.
#[test]
fn a_program_that_exits_at_once_keeps_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let dev = setup(dir.path());
    let out = run_cmd(&dev, &["--secret", "X=app/db#user", "--", "/usr/bin/true"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Attack: another user runs `keyward run` with the documented policy's program. The launcher
/// is trusted by its binary, but the `exec:` selector names the uid that runs it: refused. And
/// the policy's own user cannot have code of its own preloaded into the launcher (LD_PRELOAD of
/// a library it owns): the agent refuses the launcher's session, audited with the reason.
#[test]
fn keyward_run_as_another_uid_or_with_preloaded_code_is_refused() {
    assert!(is_root(), "this test runs the launcher as nobody, so it must run as root");
    let dir = tempfile::tempdir().unwrap();
    let dev = setup(dir.path());
    for p in [dir.path().to_path_buf(), dir.path().join("dev")] {
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let as_nobody = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "run", "--agent-socket"]);
        c.arg(dev.agent_socket.as_ref().unwrap()).args(args).env_remove("KEYWARD_TOKEN");
        c.envs(env.iter().copied());
        c.output().expect("setpriv (util-linux) is needed by this test")
    };
    let app = dir.path().join("app.py").display().to_string();
    let out = as_nobody(&["--secret", "X=app/db#user", "--", &app], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // nobody's own program and policy: the control works, then the same with a library nobody
    // wrote preloaded into the launcher is refused.
    let mine = write_script(dir.path(), "mine.py", "import os; print(os.environ['X'])\n");
    let policy = serde_json::json!({
        "identities": [[format!("exec:uid:65534:sha256:{}", sha256_file(&mine)), "node:name:dev"]],
        "rules": [{"resources": ["secrets/app/*"], "operations": ["read"]}]
    });
    std::fs::write(dir.path().join("nobody.json"), policy.to_string()).unwrap();
    ok(&dev, &["policy", "put", "nobody-run", dir.path().join("nobody.json").to_str().unwrap()], b"");
    let out = as_nobody(&["--secret", "X=app/db#user", "--", &mine], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
    let lib = dir.path().join("evil.so");
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .args(["-x", "c", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("a C compiler (cc) is needed by this test");
    let mut cc = cc;
    cc.stdin.take().unwrap().write_all(b"void keyward_test_preloaded(void) {}\n").unwrap();
    assert!(cc.wait().unwrap().success());
    let out = Command::new("chown").arg("65534:65534").arg(&lib).output().unwrap();
    assert!(out.status.success());
    let out = as_nobody(&["--secret", "X=app/db#user", "--", &mine], &[("LD_PRELOAD", lib.to_str().unwrap())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("code the caller can write"), "{err}");
    let log = std::fs::read_to_string(dir.path().join("dev/agent/audit.log")).unwrap();
    assert!(log.lines().any(|l| l.contains("writable code mapped") && l.contains("uid 65534")), "{log}");
}

/// Randomized secrets reach attested workloads through the agent: the same program (same uid
/// and executable) gets the same value each time, with no token.
#[test]
fn randomized_values_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let dev = setup(dir.path());
    ok(&dev, &["randomized", "define", "svc-password", "--ttl", "1h", "--length", "28"], b"");
    // The generic `keyward` binary is no identity: the policy names the uid and node.
    let policy = serde_json::json!({
        "identities": [[format!("unix:uid:{}", euid()), "node:name:dev"]],
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
