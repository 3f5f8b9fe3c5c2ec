//! What a person sees: every bad input gets one line on stderr that names the cause and the
//! fix, output is readable as a table and exact as JSON, and everyday commands work against a
//! real `keyward dev` server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

mod common;

use common::{BIN, Dev, json, kw, ok, start_dev};

/// stderr of a failed command, which must be exactly one `error: ` line.
fn one_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure; stdout: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8(o.stderr.clone()).unwrap();
    let lines: Vec<&str> = e.lines().filter(|l| !l.contains(" INFO ") && !l.contains(" WARN ")).collect();
    assert_eq!(lines.len(), 1, "one line: {e}");
    assert!(lines[0].starts_with("error: "), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    lines[0].to_string()
}

/// Run the binary with exactly these variables for the server and token.
fn kw_env(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("KEYWARD_ADDR").env_remove("KEYWARD_TOKEN").env_remove("KEYWARD_AGENT_SOCKET");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn token_of(dev: &Dev, args: &[&str]) -> String {
    json(dev, args)["token"].as_str().unwrap().to_string()
}

#[test]
fn errors_name_the_cause_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    let https = dev.addr.replace("http://", "https://");

    // Transport: the wrong scheme, nothing listening, no agent.
    let e = one_error(&kw_env(&["key", "list"], &[("KEYWARD_ADDR", &https), ("KEYWARD_TOKEN", &dev.token)], b""));
    assert!(e.contains("it speaks plain HTTP, so use an http:// address"), "{e}");
    assert!(!e.contains("InvalidContentType"), "{e}");
    let e =
        one_error(&kw_env(&["key", "list"], &[("KEYWARD_ADDR", "http://127.0.0.1:1"), ("KEYWARD_TOKEN", "x")], b""));
    assert!(e.contains("connection refused: nothing listens there"), "{e}");
    let e = one_error(&kw_env(&["workload", "whoami", "--agent-socket", "/nonexistent/agent.sock"], &[], b""));
    assert!(e.contains("cannot reach the node agent at /nonexistent/agent.sock: no such socket"), "{e}");

    // Tokens: which of missing, malformed, unknown, expired, used up.
    let addr = [("KEYWARD_ADDR", dev.addr.as_str())];
    let e = one_error(&kw_env(&["key", "list"], &addr, b""));
    assert!(e.contains("no token given") && e.contains("KEYWARD_TOKEN"), "{e}");
    let with = |t: &str| kw_env(&["key", "list"], &[("KEYWARD_ADDR", &dev.addr), ("KEYWARD_TOKEN", t)], b"");
    assert!(one_error(&with("hunter2")).contains("the token is malformed"));
    let unknown = format!("kwt_{}", "0".repeat(64));
    assert!(one_error(&with(&unknown)).contains("revoked (itself, or with the token that created it) or was never"));
    let short = token_of(&dev, &["token", "create", "--policy", "root", "--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert!(one_error(&with(&short)).contains("the token has expired"));
    let once = token_of(&dev, &["token", "create", "--policy", "root", "--max-uses", "1"]);
    assert!(with(&once).status.success());
    assert!(one_error(&with(&once)).contains("the token has reached its use limit"));

    // Files are named; a busy port is said once, and nothing is created before it is free.
    let e = one_error(&kw(&dev, &["policy", "put", "p", "/nonexistent/policy.json"], b""));
    assert!(e.contains("reading the policy file /nonexistent/policy.json"), "{e}");
    let port = dev.addr.rsplit(':').next().unwrap();
    let other = dir.path().join("other");
    let e = one_error(&kw_env(
        &["dev", "--listen", &format!("127.0.0.1:{port}"), "--data", other.to_str().unwrap()],
        &[],
        b"",
    ));
    assert!(e.contains("another process already does") && e.matches("already").count() == 1, "{e}");
    assert!(!other.exists(), "no data directory or root token for a server that could not listen");

    // Lifecycle: a cancelled deletion says the key is disabled and how to use it again.
    ok(&dev, &["key", "create", "gone"], b"");
    ok(&dev, &["key", "delete", "gone", "--pending-days", "7"], b"");
    let e = one_error(&kw(&dev, &["encrypt", "--key", "gone"], b"x"));
    assert!(e.contains("keyward key cancel-delete gone") && e.contains("keyward key enable gone"), "{e}");
    let o = kw(&dev, &["key", "cancel-delete", "gone"], b"");
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("The key is disabled: `keyward key enable gone`"));
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    for i in 0..40 {
        ok(&dev, &["key", "create", &format!("k{i:02}")], b"");
    }
    for args in [&["key", "list", "-o", "json"][..], &["key", "list"], &["policy", "show", "root"]] {
        // The reader is gone before anything is written, as `| head -c0` would be: every write
        // fails with EPIPE (a `println!` would panic).
        let mut child = Command::new(BIN)
            .args(args)
            .env("KEYWARD_ADDR", &dev.addr)
            .env("KEYWARD_TOKEN", &dev.token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked") && err.is_empty(), "{err}");
        assert!(o.status.success(), "{:?}", o.status);
    }
}

#[test]
fn output_reads_as_a_table_and_exactly_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    let policy = br#"{"description": "app", "identities": [["k8s:ns:pay", "k8s:sa:api"]],
        "rules": [{"resources": ["keys/app-*"], "operations": ["encrypt", "decrypt"]},
                  {"resources": ["secrets/app/*"], "operations": ["read"], "require": ["k8s:ns:pay"]}]}"#;
    let shown = String::from_utf8(ok(&dev, &["policy", "put", "app", "-"], policy)).unwrap();
    assert!(!shown.lines().any(|l| l.trim().is_empty()), "no blank lines:\n{shown}");
    assert!(shown.contains("k8s:ns:pay, k8s:sa:api"), "{shown}");
    assert!(shown.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["secrets/app/*", "read", "k8s:ns:pay"]));
    assert_eq!(String::from_utf8(ok(&dev, &["policy", "get", "app"], b"")).unwrap(), shown, "get = show");
    let list = String::from_utf8(ok(&dev, &["policy", "list"], b"")).unwrap();
    assert_eq!(list.lines().collect::<Vec<_>>(), ["root", "app"], "one per line");

    // encrypt/decrypt honour -o json; reencrypt says which versions.
    ok(&dev, &["key", "create", "app-1"], b"");
    let e = json(&dev, &["encrypt", "--key", "app-1"]);
    let out = kw(&dev, &["encrypt", "--key", "app-1", "-o", "json"], b"secret");
    let e2: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((e["key"].as_str(), e2["key_version"].as_u64()), (Some("app-1"), Some(1)));
    use base64::Engine;
    let ct = base64::engine::general_purpose::STANDARD.decode(e2["ciphertext"].as_str().unwrap()).unwrap();
    let d: serde_json::Value =
        serde_json::from_slice(&ok(&dev, &["decrypt", "-o", "json"], &ct)).expect("decrypt -o json is JSON");
    assert_eq!(d["plaintext"], "c2VjcmV0");
    ok(&dev, &["key", "rotate", "app-1"], b"");
    let o = kw(&dev, &["reencrypt"], &ct);
    assert!(String::from_utf8_lossy(&o.stderr).contains("from app-1 version 1 to app-1 version 2"));
    let r: serde_json::Value = serde_json::from_slice(&ok(&dev, &["reencrypt", "-o", "json"], &ct)).unwrap();
    assert_eq!((r["source_key_version"].as_u64(), r["key_version"].as_u64()), (Some(1), Some(2)));
    // One name per operation, the old ones kept as aliases.
    assert_eq!(json(&dev, &["generate-data-key", "--key", "app-1"])["key_version"], 2);
    assert_eq!(json(&dev, &["datakey", "--key", "app-1"])["key_version"], 2);
}

#[test]
fn tokens_and_nodes_can_be_listed_and_nodes_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    ok(
        &dev,
        &["policy", "put", "reader", "-"],
        br#"{"rules": [{"resources": ["auth/token"], "operations": ["list", "write"]}]}"#,
    );
    let ci = json(&dev, &["token", "create", "--policy", "reader", "--display-name", "ci"]);
    let ci_token = ci["token"].as_str().unwrap();

    // The root token (admin on auth/token) sees every token; never a token itself.
    let all = json(&dev, &["token", "list"]);
    assert_eq!(all["scope"], "all");
    let accessors: Vec<&str> =
        all["tokens"].as_array().unwrap().iter().map(|t| t["accessor"].as_str().unwrap()).collect();
    assert!(accessors.contains(&ci["accessor"].as_str().unwrap()));
    assert!(!all.to_string().contains(ci_token) && !all.to_string().contains(&dev.token), "accessors only");
    let table = String::from_utf8(ok(&dev, &["token", "list"], b"")).unwrap();
    assert!(table.lines().any(|l| l.contains(ci["accessor"].as_str().unwrap()) && l.contains(" ci ")), "{table}");

    // A token without admin sees its own subtree only.
    let o = kw_env(&["token", "list", "-o", "json"], &[("KEYWARD_ADDR", &dev.addr), ("KEYWARD_TOKEN", ci_token)], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mine: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(mine["scope"], "subtree");
    assert_eq!(mine["tokens"].as_array().unwrap().len(), 1, "{mine}");

    // Nodes: the dev agent and a join token; revoking a node refuses its agent from then on.
    ok(&dev, &["node", "join-token", "node-b"], b"");
    let nodes = json(&dev, &["node", "list"]);
    let kinds: Vec<(String, String)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap().into(), n["kind"].as_str().unwrap().into()))
        .collect();
    assert!(kinds.contains(&("dev".into(), "agent".into())) && kinds.contains(&("node-b".into(), "join-token".into())));
    let socket = dev.agent_socket.clone().expect("keyward dev runs an agent");
    ok(&dev, &["secret", "put", "app/db", "password=x"], b"");
    // A policy for what this test process is measured as, on node dev.
    let me = kw(&dev, &["workload", "whoami", "-o", "json", "--agent-socket", &socket], b"");
    let me: serde_json::Value = serde_json::from_slice(&me.stdout).unwrap();
    let sels: Vec<String> = me["selectors"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect();
    assert!(sels.contains(&"node:name:dev".to_string()), "whoami shows the node the server adds: {sels:?}");
    let uid = sels.iter().find(|s| s.starts_with("unix:uid:")).unwrap();

    // Refused, and told what it was measured as.
    let e = one_error(&kw(&dev, &["workload", "secret", "app/db", "--agent-socket", &socket], b""));
    assert!(e.contains("this process was measured as [") && e.contains(uid) && e.contains("node:name:dev"), "{e}");
    let p = format!(
        r#"{{"identities": [["{uid}", "node:name:dev"]], "rules": [{{"resources": ["secrets/app/*"], "operations": ["read"]}}]}}"#
    );
    ok(&dev, &["policy", "put", "by-uid", "-"], p.as_bytes());
    let got = ok(&dev, &["workload", "secret", "app/db", "--field", "password", "--agent-socket", &socket], b"");
    assert_eq!(got, b"x\n");

    let r = json(&dev, &["node", "revoke", "dev"]);
    assert!(!r["revoked"].as_array().unwrap().is_empty());
    let o = kw(&dev, &["workload", "secret", "app/db", "--agent-socket", &socket], b"");
    assert!(!o.status.success(), "a revoked node's agent releases nothing");
    let e = one_error(&kw(&dev, &["node", "revoke", "nope"], b""));
    assert!(e.contains("not found"), "{e}");
}

#[test]
fn artifacts_of_any_size_are_signed_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    ok(&dev, &["key", "create", "releases", "--type", "ecdsa-p256"], b"");
    ok(&dev, &["key", "create", "ed", "--type", "ed25519"], b"");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sig = dir.path().join("app.sig");
    let s = sig.to_str().unwrap();
    ok(&dev, &["sign", "--key", "releases", "--signature-file", s], &big);
    assert_eq!(ok(&dev, &["verify", "--key", "releases", "--signature-file", s], &big), b"valid\n");
    let mut changed = big.clone();
    changed[150_000] ^= 1;
    let o = kw(&dev, &["verify", "--key", "releases", "--signature-file", s], &changed);
    assert_eq!((o.status.code(), o.stdout.as_slice()), (Some(3), &b"INVALID\n"[..]));
    // A digest signature is one of the message: a small message signed by digest verifies as
    // a message, and the other way round.
    let small = b"release notes";
    let by_digest = String::from_utf8(ok(&dev, &["sign", "--key", "releases", "--digest"], small)).unwrap();
    assert_eq!(ok(&dev, &["verify", "--key", "releases", "--signature", by_digest.trim()], small), b"valid\n");
    let plain = String::from_utf8(ok(&dev, &["sign", "--key", "releases"], small)).unwrap();
    assert_eq!(ok(&dev, &["verify", "--key", "releases", "--digest", "--signature", plain.trim()], small), b"valid\n");
    // Ed25519 signs whole messages: a large one is refused with what to do instead.
    let e = one_error(&kw(&dev, &["sign", "--key", "ed"], &big));
    assert!(e.contains("use an ecdsa-p256 key for larger ones"), "{e}");
    assert!(ok(&dev, &["sign", "--key", "ed"], small).len() > 40);
}

#[test]
fn help_completions_and_man_pages_come_from_the_command_definitions() {
    // Server commands neither show nor take the client options.
    for cmd in ["server", "dev"] {
        let help = String::from_utf8(kw_env(&[cmd, "--help"], &[], b"").stdout).unwrap();
        for flag in ["--token", "--client-cert", "--output", "--cacert"] {
            assert!(!help.contains(flag), "{cmd} --help shows {flag}");
        }
        let required: &[&str] =
            if cmd == "server" { &["--data", "d", "--tls-cert", "c", "--tls-key", "k"] } else { &[] };
        let e = one_error(&kw_env(&[&[cmd, "--token", "x"][..], required].concat(), &[], b""));
        assert!(e.contains("--token is an option of the client commands"), "{e}");
    }
    // ...which the client commands still take after the subcommand.
    let help = String::from_utf8(kw_env(&["key", "list", "--help"], &[], b"").stdout).unwrap();
    assert!(help.contains("--token") && help.contains("--output"), "{help}");

    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let o = kw_env(&["completion", shell], &[], b"");
        assert!(o.status.success());
        let script = String::from_utf8(o.stdout).unwrap();
        assert!(script.contains("generate-data-key") && script.contains("--signature-file"), "{shell}");
        if shell == "bash" {
            let f = dir.path().join("keyward.bash");
            std::fs::write(&f, &script).unwrap();
            assert!(Command::new("bash").arg("-n").arg(&f).status().unwrap().success(), "valid bash");
        }
    }
    let man = dir.path().join("man");
    let o = kw_env(&["man", "--out", man.to_str().unwrap()], &[], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = std::fs::read_to_string(man.join("keyward-sign.1")).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH"), "a roff page");
    assert!(page.contains("signature\\-file"), "{page}");
    assert!(man.join("keyward.1").exists() && man.join("keyward-node-revoke.1").exists());
}
