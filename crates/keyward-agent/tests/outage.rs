//! Outages: with the server gone, the agent answers a repeated request from its cache of sealed
//! answers (opened by the same client only), for its outage window, and says so in its health;
//! anything not cached, and anything after the window, is 503. Server and agent run in this
//! process; this test binary is the workload.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyward_agent::upstream::{JoinCredential, Upstream, UpstreamConfig};
use keyward_agent::{AgentConfig, AgentLog, bind, serve};
use keyward_client::workload::WorkloadClient;
use keyward_client::{Client, Method};
use serde_json::{Value, json};

async fn health(socket: &std::path::Path) -> Value {
    let http = reqwest::Client::builder().unix_socket(socket.to_path_buf()).build().unwrap();
    serde_json::from_slice(&http.get("http://agent/v1/health").send().await.unwrap().bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_during_an_outage_for_the_window_only() {
    let dir = tempfile::tempdir().unwrap();
    let running = keyward_test_support::server::dev_server(&dir.path().join("data"), "127.0.0.1:0").await;
    let addr = format!("http://{}", running.addr);
    let root = std::fs::read_to_string(running.root_token_file.as_ref().unwrap()).unwrap();
    let admin = Client::builder(addr.clone()).token(root.trim()).build().unwrap();

    // This test binary is the workload (and the agent: a `keyward`-like binary is no identity
    // by its hash, so the policy names the uid and node).
    let me = format!("unix:uid:{}", std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()));
    for (path, v) in [("app/db", "hunter2"), ("app/other", "x")] {
        admin.put_secret(path, &BTreeMap::from([("password".to_string(), v.to_string())]), None).await.unwrap();
    }
    let policy = json!({"identities": [[me, "node:name:n1"]],
                        "rules": [{"resources": ["secrets/app/*"], "operations": ["read"]}]});
    admin.request(Method::PUT, "/v1/policies/me", Some(&policy)).await.unwrap();
    let jt = admin.request(Method::POST, "/v1/auth/agent/join-token", Some(&json!({"node": "n1"}))).await.unwrap();
    let up = Upstream::join(&UpstreamConfig {
        addr,
        ca_pem: None,
        join: JoinCredential::Token(jt["join_token"].as_str().unwrap().to_string().into()),
    })
    .await
    .unwrap();

    let socket = dir.path().join("agent.sock");
    let config = AgentConfig { socket: socket.clone(), outage_window: Duration::from_secs(3), ..Default::default() };
    let listener = bind(&socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let log = AgentLog::open(&dir.path().join("agent-audit")).unwrap();
    let agent = tokio::spawn(async move {
        serve(&config, listener, Some(Arc::new(up)), None, log, async move {
            let _ = stopped.await;
        })
        .await
    });

    let workload = WorkloadClient::new(&socket).unwrap();
    let s = workload.get_secret("app/db", None).await.unwrap();
    assert_eq!(s.data["password"].as_str(), "hunter2");
    assert_eq!(health(&socket).await["server"], "reachable");

    // The server goes away.
    running.shutdown().await.unwrap();
    let s = workload.get_secret("app/db", None).await.expect("answered from the outage cache");
    assert_eq!(s.data["password"].as_str(), "hunter2");
    let h = health(&socket).await;
    assert_eq!(h["server"], "unreachable", "{h}");
    assert_eq!(h["cached_answers"], 1, "{h}");
    // Not asked before: nothing to replay.
    let e = workload.get_secret("app/other", None).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    // Another client (another key) cannot be given this client's sealed answer.
    let e = WorkloadClient::new(&socket).unwrap().get_secret("app/db", None).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    // After the window, nothing.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let e = workload.get_secret("app/db", None).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");

    let _ = stop.send(());
    agent.await.unwrap().unwrap();

    // The agent's own log says what it decided alone: the session it opened, and the answer it
    // replayed from its cache while the server was away; the chain verifies.
    let key = keyward_audit::key_file::load(&dir.path().join("agent-audit/audit-key")).unwrap();
    let file = dir.path().join("agent-audit/audit.log");
    keyward_audit::verify_files(key.expose(), std::slice::from_ref(&file), None).unwrap();
    let text = String::from_utf8(std::fs::read(&file).unwrap()).unwrap();
    let text = text.trim_end_matches('\0');
    assert!(text.lines().any(|l| l.contains("\"operation\":\"session\"") && l.contains("\"allow\"")), "{text}");
    let replay = text.lines().find(|l| l.contains("outage cache")).expect("the replay is recorded");
    assert!(replay.contains("\"path\":\"/v1/secret\"") && replay.contains(&me), "{replay}");
    assert!(text.lines().any(|l| l.contains("server unreachable") && l.contains("\"deny\"")), "{text}");
    assert!(!text.contains("hunter2"));
}
