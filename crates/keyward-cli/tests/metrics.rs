//! Metrics of the server and the node agent, scraped and parsed by the Prometheus project's
//! own OpenMetrics parser (prometheus_client from PyPI), after real traffic: requests by route,
//! method and status with latency histograms, seal state, the audit log, the store, the key
//! cache, releases and the agent's refusals. No path of a secret ever appears in them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{BIN, free_port, json, kw, metrics_parser as parser, ok, scrape};

/// The samples of `family` whose labels include every pair of `labels`.
fn samples<'a>(m: &'a Value, family: &str, labels: &[(&str, &str)]) -> Vec<&'a Value> {
    let fam = &m["families"][family];
    assert!(fam.is_object(), "no family {family} in:\n{}", m["text"].as_str().unwrap_or(""));
    fam["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v)))
        .collect()
}

fn value(m: &Value, family: &str, sample: &str, labels: &[(&str, &str)]) -> f64 {
    samples(m, family, labels)
        .iter()
        .find(|s| s[0] == sample)
        .and_then(|s| s[2].as_f64())
        .unwrap_or_else(|| panic!("no {sample}{labels:?} in {family}:\n{}", m["text"].as_str().unwrap_or("")))
}

#[test]
fn server_and_agent_metrics_parse_and_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let lib = parser(dir.path());
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let dev = common::start_dev_with(&dir.path().join("dev"), &["--metrics-listen", &metrics_addr]);

    ok(&dev, &["key", "create", "pay"], b"");
    for _ in 0..3 {
        ok(&dev, &["encrypt", "--key", "pay"], b"x");
    }
    ok(&dev, &["secret", "put", "team/very-secret-path", "v=1"], b"");
    let o = kw(&dev, &["secret", "get", "team/very-secret-path-missing"], b"");
    assert!(!o.status.success());
    let agent_token = json(&dev, &["node", "join-token", "node-m"])["join_token"].as_str().unwrap().to_string();

    // A node agent of its own, with metrics.
    let jt = dir.path().join("join-token");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&jt).unwrap();
        std::io::Write::write_all(&mut f, agent_token.as_bytes()).unwrap();
    }
    let agent_port = free_port();
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(BIN)
        .args(["agent", "--join-token-file"])
        .arg(&jt)
        .arg("--socket")
        .arg(&socket)
        .arg("--audit-dir")
        .arg(dir.path().join("agent-audit"))
        .args(["--metrics-listen", &format!("127.0.0.1:{agent_port}")])
        .env("KEYWARD_ADDR", &dev.addr)
        .env_remove("KEYWARD_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = socket.to_str().unwrap();
    // Refused by the server (no policy), relayed: a release with status 403.
    assert!(!kw(&dev, &["workload", "secret", "team/very-secret-path", "--agent-socket", s], b"").status.success());
    // Refused by the agent itself: not JSON.
    let bad = Command::new("curl")
        .args(["-s", "--unix-socket", s, "-H", "content-type: application/json", "-d", "not json"])
        .arg("http://agent/v1/secret")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stdout).contains("invalid_argument"));

    // With a token on the API, and without one on the private address: the same families.
    let m = scrape(&lib, &format!("{}/v1/metrics", dev.addr), Some(&dev.token));
    assert!(m["content_type"].as_str().unwrap().starts_with("application/openmetrics-text"));
    let private = scrape(&lib, &format!("http://127.0.0.1:{port}/metrics"), None);
    assert!(private["families"]["keyward_http_requests"].is_object());
    let anon = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("{}/v1/metrics", dev.addr)])
        .output()
        .unwrap();
    assert_eq!(anon.stdout, b"401", "the API's metrics need a token");

    let encrypt = [("route", "/v1/keys/{name}/encrypt"), ("method", "POST"), ("status", "200")];
    assert_eq!(value(&m, "keyward_http_requests", "keyward_http_requests_total", &encrypt), 3.0);
    let missing = [("route", "/v1/secrets/data/{*path}"), ("method", "GET"), ("status", "404")];
    assert_eq!(value(&m, "keyward_http_requests", "keyward_http_requests_total", &missing), 1.0);
    let route = [("route", "/v1/keys/{name}/encrypt"), ("method", "POST")];
    assert_eq!(
        value(&m, "keyward_http_request_duration_seconds", "keyward_http_request_duration_seconds_count", &route),
        3.0
    );
    assert_eq!(m["families"]["keyward_http_request_duration_seconds"]["type"], "histogram");
    assert_eq!(value(&m, "keyward_sealed", "keyward_sealed", &[]), 0.0);
    assert!(value(&m, "keyward_audit_records", "keyward_audit_records_total", &[]) >= 5.0);
    assert!(value(&m, "keyward_audit_sync_duration_seconds", "keyward_audit_sync_duration_seconds_count", &[]) >= 1.0);
    value(&m, "keyward_audit_pending_records", "keyward_audit_pending_records", &[]);
    assert!(
        value(
            &m,
            "keyward_store_operation_duration_seconds",
            "keyward_store_operation_duration_seconds_count",
            &[("op", "put_secret_version")]
        ) >= 1.0
    );
    assert!(value(&m, "keyward_key_cache_hits", "keyward_key_cache_hits_total", &[]) >= 2.0, "encrypts hit the cache");
    assert!(value(&m, "keyward_agent_releases", "keyward_agent_releases_total", &[("outcome", "refused")]) >= 1.0);
    assert!(!m["text"].as_str().unwrap().contains("very-secret-path"), "route templates, never paths");

    let a = scrape(&lib, &format!("http://127.0.0.1:{agent_port}/metrics"), None);
    let released = [("op", "read-secret"), ("status", "403")];
    assert_eq!(value(&a, "keyward_agent_releases", "keyward_agent_releases_total", &released), 1.0);
    assert!(value(&a, "keyward_agent_refusals", "keyward_agent_refusals_total", &[("reason", "bad request")]) >= 1.0);
    assert!(value(&a, "keyward_agent_sessions", "keyward_agent_sessions_total", &[]) >= 1.0);

    let _ = agent.kill();
    let _ = agent.wait();
}
