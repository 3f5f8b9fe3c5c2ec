//! The launcher protocol behind `keyward run`. The agent trusts its own binary as a launcher:
//! here the test binary is both the agent and the launcher. A launcher's child is verified
//! against the claimed executable digest. A non-child, or a child running something else, is
//! refused, and so is any process that is not a launcher.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use keyward_agent::{AgentConfig, bind, serve};
use keyward_client::workload::WorkloadClient;

fn sha256_hex(path: &str) -> String {
    let bytes = std::fs::read(std::fs::canonicalize(path).unwrap()).unwrap();
    hex::encode(keyward_crypto::hash::sha256(&bytes))
}

#[tokio::test]
async fn children_are_verified_against_the_claimed_executable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let config = AgentConfig { socket: socket.clone(), ..Default::default() };
    let listener = bind(&socket).unwrap();
    let agent = tokio::spawn(async move {
        serve(&config, listener, None, None, keyward_agent::AgentLog::none(), std::future::pending()).await
    });

    let mut child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let good = WorkloadClient::new(&socket).unwrap().for_exec(&sha256_hex("/bin/sleep"));
    let selectors = good.verify_child(pid).await.unwrap();
    assert!(selectors.contains(&format!("unix:sha256:{}", sha256_hex("/bin/sleep"))), "{selectors:?}");

    // A claim the child does not match.
    let wrong = WorkloadClient::new(&socket).unwrap().for_exec(&sha256_hex("/bin/cat"));
    let e = wrong.verify_child(pid).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("exec_mismatch")), "{e}");
    // Not our child.
    let e = good.verify_child(1).await.unwrap_err();
    assert!(e.to_string().contains("not the caller's child"), "{e}");
    // A finished child.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(good.verify_child(pid).await.unwrap_err().status(), Some(403));

    // Another program may not claim anything: python (not the agent's binary) opens a session
    // and asks the agent.
    let script = format!(
        r#"
import http.client, json, socket
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect({sock:?})
c = C("agent")
c.request("POST", "/v1/session"); session = json.loads(c.getresponse().read())["session"]
body = json.dumps({{"pid": 1, "exec_sha256": "{h}"}})
c.request("POST", "/v1/verify-child", body, {{"Content-Type": "application/json", "keyward-session": session}})
r = c.getresponse()
print("HTTP/1.1", r.status, r.read().decode())
"#,
        sock = socket.to_str().unwrap(),
        h = "ab".repeat(32)
    );
    let out = tokio::task::spawn_blocking(move || Command::new("python3").args(["-c", &script]).output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 403") && text.contains("not_a_launcher"), "{text}");
    agent.abort();
}
