//! The API contract: schemathesis (PyPI) reads `openapi.json` and throws generated requests at
//! a real `keyward dev` server, in all its phases (examples, coverage, fuzzing, stateful) and
//! with all its checks: a request the schema allows must be accepted (or refused for want of
//! permission, existence or state), one it forbids must be refused, every answer must match its
//! documented schema and status, and nothing may answer 5xx. The agent routes are exercised
//! with an agent's credential. `tests/schemathesis.toml` lists the few inputs no schema can
//! judge (opaque ciphertexts and key documents), and why.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{PYTHON, json, pip_install, repo, start_dev};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// schemathesis under target/, installed once.
fn schemathesis() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-4.32.5");
    if !dir.join("schemathesis").is_dir() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        pip_install(&tmp, SCHEMATHESIS);
        let _ = std::fs::rename(&tmp, &dir);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// Run schemathesis against `addr` with `token`; its report, and whether it passed.
fn run(addr: &str, token: &str, paths: (&str, &str), seed: &str) -> (bool, String) {
    let out = Command::new(PYTHON)
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(repo().join("crates/keyward-cli/tests/schemathesis.toml"))
        .arg("run")
        .arg(repo().join("crates/keyward-server/openapi.json"))
        .args(["--url", addr, "-H", &format!("Authorization: Bearer {token}"), "--checks", "all"])
        .args(["--max-examples", "25", "--workers", "1", "--seed", seed])
        .args([paths.0, paths.1])
        .env("PYTHONPATH", schemathesis())
        .env("NO_COLOR", "1")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("python3 is needed by this test");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), report)
}

#[test]
fn the_server_keeps_the_openapi_contract() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));

    // Every route but the agent's, as the root token.
    // A fixed seed keeps CI repeatable; KEYWARD_CONTRACT_SEED explores others.
    let seed: u64 = std::env::var("KEYWARD_CONTRACT_SEED").map(|s| s.parse().unwrap()).unwrap_or(1);
    let (ok, report) = run(&dev.addr, &dev.token, ("--exclude-path-regex", "^/v1/agent/"), &seed.to_string());
    assert!(ok, "schemathesis found contract violations:\n{report}");
    assert!(report.contains(" passed"), "{report}");
    assert!(!report.contains("Server error"), "{report}");

    // The agent routes, as a joined agent (its key is only needed for signed releases, which
    // the generated requests cannot sign: those must be refused, not misread).
    let join = json(&dev, &["node", "join-token", "contract-node"])["join_token"].as_str().unwrap().to_string();
    let body = serde_json::json!({"join_token": join, "public_key": "A".repeat(43) + "="});
    let resp = Command::new("curl")
        .args(["-s", "-X", "POST", "-H", "content-type: application/json", "-d", &body.to_string()])
        .arg(format!("{}/v1/auth/agent/join", dev.addr))
        .output()
        .unwrap();
    let agent: serde_json::Value = serde_json::from_slice(&resp.stdout).unwrap();
    let agent_token = agent["token"].as_str().unwrap_or_else(|| panic!("no agent token: {agent}"));
    let (ok, report) = run(&dev.addr, agent_token, ("--include-path-regex", "^/v1/agent/"), &(seed + 1).to_string());
    assert!(ok, "schemathesis found contract violations on the agent routes:\n{report}");
    assert!(report.contains("Selected: 3/"), "the three agent routes were tested: {report}");
}
