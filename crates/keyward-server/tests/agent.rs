//! Agent join and attested release at the API level: join tokens are single use, releases need
//! the agent's key, a fresh single-use nonce and only `unix:`/`k8s:` workload selectors; grants
//! come only from policies attached by the workload's identity; the response is sealed to the
//! workload's key, and the audit names the selectors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use keyward_crypto::hpke::RecipientKey;
use keyward_crypto::keys::{KeyAlgorithm, LoadedKey};
use keyward_server::agent_api::{PROOF_CONTEXT, RELEASE_INFO, SIGNATURE_HEADER};
use keyward_test_support::audit_text as audit_records;
use keyward_test_support::server::{TestServer, raw};
use serde_json::{Value, json};

struct TestAgent {
    key: LoadedKey,
    token: String,
}

impl TestAgent {
    fn public_b64(&self) -> String {
        B64.encode(self.key.ed25519_public_raw().unwrap())
    }
}

fn new_key() -> LoadedKey {
    LoadedKey::load(KeyAlgorithm::Ed25519, &KeyAlgorithm::Ed25519.generate().unwrap()).unwrap()
}

async fn join_token(s: &TestServer, node: &str) -> String {
    let (st, v, _) = raw(
        &s.addr,
        "POST",
        "/v1/auth/agent/join-token",
        Some(&s.token),
        Some("application/json"),
        json!({"node": node, "ttl": "10m"}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    v["join_token"].as_str().unwrap().to_string()
}

async fn join(s: &TestServer, join_token: &str, key: LoadedKey) -> Result<TestAgent, (u16, Value)> {
    let pk = B64.encode(key.ed25519_public_raw().unwrap());
    let (st, v, _) = raw(
        &s.addr,
        "POST",
        "/v1/auth/agent/join",
        None,
        Some("application/json"),
        json!({"join_token": join_token, "public_key": pk}).to_string().into_bytes(),
    )
    .await;
    if st != 201 {
        return Err((st, v));
    }
    Ok(TestAgent { key, token: v["token"].as_str().unwrap().to_string() })
}

async fn nonce(s: &TestServer, token: &str) -> (u16, Value) {
    let (st, v, _) = raw(&s.addr, "POST", "/v1/agent/nonce", Some(token), None, vec![]).await;
    (st, v)
}

/// Send a release body, signed by `signer` (or unsigned).
async fn send_release(s: &TestServer, token: &str, signer: Option<&LoadedKey>, body: &[u8]) -> (u16, Value) {
    let mut rb = reqwest::Client::new()
        .post(format!("{}/v1/agent/release", s.addr))
        .bearer_auth(token)
        .header("content-type", "application/json");
    if let Some(k) = signer {
        let mut msg = PROOF_CONTEXT.to_vec();
        msg.extend_from_slice(body);
        rb = rb.header(SIGNATURE_HEADER, B64.encode(k.sign(&msg).unwrap()));
    }
    let resp = rb.body(body.to_vec()).send().await.unwrap();
    let st = resp.status().as_u16();
    (st, serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null))
}

fn release_body(agent: &TestAgent, nonce: &str, selectors: &[&str], recipient: &RecipientKey, op: Value) -> Vec<u8> {
    json!({
        "nonce": nonce,
        "public_key": agent.public_b64(),
        "workload": {"selectors": selectors, "pid": 4242},
        "recipient": B64.encode(recipient.public()),
        "op": op,
    })
    .to_string()
    .into_bytes()
}

/// A fresh nonce for `agent`.
async fn fresh_nonce(s: &TestServer, agent: &TestAgent) -> String {
    nonce(s, &agent.token).await.1["nonce"].as_str().unwrap().to_string()
}

/// A release body reading `payments/db` as a workload with `selectors`.
fn read_db(agent: &TestAgent, nonce: &str, selectors: &[&str], recipient: &RecipientKey) -> Vec<u8> {
    release_body(agent, nonce, selectors, recipient, json!({"kind": "read-secret", "path": "payments/db"}))
}

fn open(recipient: &RecipientKey, nonce: &str, v: &Value) -> Value {
    let enc = B64.decode(v["enc"].as_str().unwrap()).unwrap();
    let ct = B64.decode(v["ciphertext"].as_str().unwrap()).unwrap();
    let aad = B64.decode(nonce).unwrap();
    let pt = recipient.open(&enc, &ct, RELEASE_INFO, &aad).unwrap();
    serde_json::from_slice(pt.expose()).unwrap()
}

const APP_HASH: &str = "unix:sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A server with the secret `payments/db` (password `hunter2`) and the policy `name`.
async fn payments_db_server_with(name: &str, policy: Value) -> TestServer {
    let s = TestServer::start().await;
    let root = s.client();
    root.request(reqwest::Method::PUT, &format!("/v1/policies/{name}"), Some(&policy)).await.unwrap();
    let data = std::collections::BTreeMap::from([("password".to_string(), "hunter2".to_string())]);
    root.put_secret("payments/db", &data, None).await.unwrap();
    s
}

/// ...readable by the workload `APP_HASH` on node-1.
async fn payments_db_server() -> TestServer {
    let policy = json!({
        "identities": [[APP_HASH, "node:name:node-1"]],
        "rules": [{"resources": ["secrets/payments/db"], "operations": ["read"]}]
    });
    payments_db_server_with("payments-db", policy).await
}

#[tokio::test]
async fn join_nonce_and_sealed_release() {
    let s = payments_db_server().await;

    // Join: the join token works once.
    let jt = join_token(&s, "node-1").await;
    let agent = join(&s, &jt, new_key()).await.unwrap();
    let (st, v) = join(&s, &jt, new_key()).await.err().unwrap();
    assert_eq!(st, 401, "{v}");
    // A plain token is not an agent.
    assert_eq!(nonce(&s, &s.token).await.0, 403);

    // A good release: sealed, opens only with the workload's key.
    let workload = RecipientKey::generate().unwrap();
    let (st, v) = nonce(&s, &agent.token).await;
    assert_eq!(st, 200, "{v}");
    let n = v["nonce"].as_str().unwrap().to_string();
    let body = read_db(&agent, &n, &[APP_HASH, "unix:uid:1000"], &workload);
    let (st, v) = send_release(&s, &agent.token, Some(&agent.key), &body).await;
    assert_eq!(st, 200, "{v}");
    assert!(!v.to_string().contains("hunter2"), "the agent must not see the secret");
    let inner = open(&workload, &n, &v);
    assert_eq!(inner["data"]["password"], "hunter2");
    let other = RecipientKey::generate().unwrap();
    let enc = B64.decode(v["enc"].as_str().unwrap()).unwrap();
    let ct = B64.decode(v["ciphertext"].as_str().unwrap()).unwrap();
    assert!(other.open(&enc, &ct, RELEASE_INFO, &B64.decode(&n).unwrap()).is_err());

    // Replay of the same signed body: the nonce is spent.
    let (st, v) = send_release(&s, &agent.token, Some(&agent.key), &body).await;
    assert_eq!(st, 401, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("nonce"), "{v}");

    // Unsigned, or signed by another key: refused (the token alone is not enough).
    let n2 = fresh_nonce(&s, &agent).await;
    let body = read_db(&agent, &n2, &[APP_HASH], &workload);
    assert_eq!(send_release(&s, &agent.token, None, &body).await.0, 401);
    assert_eq!(send_release(&s, &agent.token, Some(&new_key()), &body).await.0, 401);

    // Another binary: no policy attaches, denied (and still nothing leaks).
    let n3 = fresh_nonce(&s, &agent).await;
    let body = read_db(
        &agent,
        &n3,
        &["unix:sha256:2222222222222222222222222222222222222222222222222222222222222222"],
        &workload,
    );
    let (st, v) = send_release(&s, &agent.token, Some(&agent.key), &body).await;
    assert_eq!(st, 403, "{v}");

    // The agent cannot claim selectors outside unix:/k8s: (e.g. another node).
    let n4 = fresh_nonce(&s, &agent).await;
    let body = read_db(&agent, &n4, &[APP_HASH, "node:name:node-2"], &workload);
    let (st, v) = send_release(&s, &agent.token, Some(&agent.key), &body).await;
    assert_eq!(st, 400, "{v}");

    // The same binary on another node does not match the identity set.
    let agent2 = join(&s, &join_token(&s, "node-2").await, new_key()).await.unwrap();
    let n5 = fresh_nonce(&s, &agent2).await;
    let body = read_db(&agent2, &n5, &[APP_HASH], &workload);
    assert_eq!(send_release(&s, &agent2.token, Some(&agent2.key), &body).await.0, 403);
    // ...and node-2 cannot spend node-1's nonces.
    let n6 = fresh_nonce(&s, &agent).await;
    let body = read_db(&agent2, &n6, &[APP_HASH], &workload);
    assert_eq!(send_release(&s, &agent2.token, Some(&agent2.key), &body).await.0, 401);

    // Malformed operations are refused before anything runs.
    let n7 = fresh_nonce(&s, &agent).await;
    let body = release_body(&agent, &n7, &[APP_HASH], &workload, json!({"kind": "read-secret", "path": "../sys/seal"}));
    assert_eq!(send_release(&s, &agent.token, Some(&agent.key), &body).await.0, 400);

    // The audit trail names the workload's selectors and the grant.
    let log = audit_records(&s.dir.path().join("data/audit.log"));
    let granted = log
        .lines()
        .find(|l| l.contains("payments-db (identity set 0)"))
        .expect("an audit record of the workload's read");
    assert!(granted.contains(APP_HASH) && granted.contains("node:name:node-1"), "{granted}");
    assert!(log.lines().any(|l| l.contains("\"release\"") && l.contains("\"deny\"")), "denied releases are audited");
    assert!(!log.contains("hunter2"));
}

/// A nonce older than its 10 s lifetime is refused, even unused.
#[tokio::test]
async fn an_expired_nonce_is_refused() {
    let s = TestServer::start().await;
    let agent = join(&s, &join_token(&s, "node-1").await, new_key()).await.unwrap();
    let n = fresh_nonce(&s, &agent).await;
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let workload = RecipientKey::generate().unwrap();
    let body = read_db(&agent, &n, &[APP_HASH], &workload);
    let (st, v) = send_release(&s, &agent.token, Some(&agent.key), &body).await;
    assert_eq!(st, 401, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("expired"), "{v}");
}

/// A rule with `max_instances` admits at most that many pods (by `k8s:pod-uid`) at once: a
/// pod keeps its place while it keeps using the grant, a new pod is refused while the places
/// are taken and admitted once a place has expired; a caller without a pod UID (a workload
/// outside a pod, or a plain token) cannot use the grant at all. Refusals are audited.
#[tokio::test]
async fn a_grant_caps_live_instances_by_pod_uid() {
    let capped = json!({
        "identities": [["k8s:ns:payments", "node:name:node-1"]],
        "rules": [{"resources": ["secrets/payments/db"], "operations": ["read"],
                   "max_instances": 2, "instance_hold_secs": 2}]
    });
    let s = payments_db_server_with("capped", capped).await;
    let agent = join(&s, &join_token(&s, "node-1").await, new_key()).await.unwrap();
    let workload = RecipientKey::generate().unwrap();
    let release_as = |pod: Option<&'static str>| {
        let (s, agent, workload) = (&s, &agent, &workload);
        async move {
            let n = fresh_nonce(s, agent).await;
            let uid = pod.map(|p| format!("k8s:pod-uid:{p}"));
            let mut sel = vec!["k8s:ns:payments"];
            if let Some(u) = &uid {
                sel.push(u);
            }
            let body = read_db(agent, &n, &sel, workload);
            let (st, v) = send_release(s, &agent.token, Some(&agent.key), &body).await;
            if st == 200 {
                assert_eq!(open(workload, &n, &v)["data"]["password"], "hunter2");
            }
            (st, v)
        }
    };

    assert_eq!(release_as(Some("pod-a")).await.0, 200);
    assert_eq!(release_as(Some("pod-b")).await.0, 200);
    let (st, v) = release_as(Some("pod-c")).await;
    assert_eq!(st, 403, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("live instances") && msg.contains("at most 2"), "{msg}");
    assert!(!v.to_string().contains("hunter2") && v.get("ciphertext").is_none(), "nothing is released: {v}");
    assert_eq!(release_as(Some("pod-a")).await.0, 200, "a holder keeps its place");

    // No pod UID: refused before anything runs.
    let (st, v) = release_as(None).await;
    assert_eq!(st, 403, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("k8s:pod-uid"), "{v}");
    // A token naming the policy cannot use the capped rule either.
    let (st, v, _) = raw(
        &s.addr,
        "POST",
        "/v1/auth/token/create",
        Some(&s.token),
        Some("application/json"),
        json!({"policies": ["capped"], "ttl": "10m"}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let t = v["token"].as_str().unwrap();
    let (st, v, _) = raw(&s.addr, "GET", "/v1/secrets/data/payments/db", Some(t), None, vec![]).await;
    assert_eq!(st, 403, "{v}");

    // Once the places expire (2 s without use), a new pod is admitted.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(release_as(Some("pod-c")).await.0, 200);
    assert_eq!(release_as(Some("pod-d")).await.0, 200);
    assert_eq!(release_as(Some("pod-a")).await.0, 403, "pod-a lost its place and both are taken");

    let log = audit_records(&s.dir.path().join("data/audit.log"));
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("live instances already use this grant")).collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(refused.iter().all(|l| l.contains("\"deny\"") && l.contains("k8s:pod-uid:")), "{refused:?}");
    assert!(!log.contains("hunter2"));
}

/// Send a batch body to `/v1/agent/releases`, signed by `signer` under `context`.
async fn send_batch(s: &TestServer, agent: &TestAgent, context: &[u8], body: &[u8]) -> (u16, Value) {
    let mut msg = context.to_vec();
    msg.extend_from_slice(body);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/agent/releases", s.addr))
        .bearer_auth(&agent.token)
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, B64.encode(agent.key.sign(&msg).unwrap()))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let st = resp.status().as_u16();
    (st, serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null))
}

fn batch_item(nonce: &str, selectors: &[&str], recipient: &RecipientKey, path: &str) -> Value {
    json!({
        "nonce": nonce,
        "workload": {"selectors": selectors, "pid": 4242},
        "recipient": B64.encode(recipient.public()),
        "op": {"kind": "read-secret", "path": path},
    })
}

/// A batch is signed once, under its own context; each release in it still stands alone: its
/// own nonce, decision, status and audit record, and only the allowed one is sealed.
#[tokio::test]
async fn a_batch_is_signed_once_and_each_release_stands_alone() {
    use keyward_server::agent_api::{BATCH_PROOF_CONTEXT, MAX_BATCH};
    let s = payments_db_server().await;
    let agent = join(&s, &join_token(&s, "node-1").await, new_key()).await.unwrap();
    let (w1, w2) = (RecipientKey::generate().unwrap(), RecipientKey::generate().unwrap());
    let (n1, n2, n3) = (fresh_nonce(&s, &agent).await, fresh_nonce(&s, &agent).await, fresh_nonce(&s, &agent).await);
    let other = "unix:sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let batch = |items: Vec<Value>| json!({"public_key": agent.public_b64(), "releases": items}).to_string();
    let body = batch(vec![
        batch_item(&n1, &[APP_HASH], &w1, "payments/db"),
        batch_item(&n2, &[other], &w2, "payments/db"),
        batch_item(&n1, &[APP_HASH], &w2, "payments/db"),
        batch_item(&n3, &[APP_HASH], &w2, "../sys/seal"),
    ]);

    // Signed as a single release: the signature does not carry over to a batch, and nothing ran.
    let (st, v) = send_batch(&s, &agent, PROOF_CONTEXT, body.as_bytes()).await;
    assert_eq!(st, 401, "{v}");

    let (st, v) = send_batch(&s, &agent, BATCH_PROOF_CONTEXT, body.as_bytes()).await;
    assert_eq!(st, 200, "{v}");
    assert!(!v.to_string().contains("hunter2"), "the agent must not see the secret");
    let results = v["results"].as_array().unwrap();
    let statuses: Vec<u64> = results.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    // Allowed; another binary denied; the first nonce again (spent); a malformed path.
    assert_eq!(statuses, [200, 403, 401, 400], "{v}");
    assert_eq!(open(&w1, &n1, &results[0]["body"])["data"]["password"], "hunter2");
    assert!(results[1]["body"]["error"]["message"].is_string(), "{v}");
    assert!(results[2]["body"]["error"]["message"].as_str().unwrap().contains("nonce"), "{v}");

    // The same batch again: signed and well-formed, but every nonce is spent.
    let (st, v) = send_batch(&s, &agent, BATCH_PROOF_CONTEXT, body.as_bytes()).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["results"].as_array().unwrap().iter().all(|r| r["status"] == 401 || r["status"] == 400), "{v}");

    // Empty and oversized batches are refused whole.
    assert_eq!(send_batch(&s, &agent, BATCH_PROOF_CONTEXT, batch(vec![]).as_bytes()).await.0, 400);
    let n = fresh_nonce(&s, &agent).await;
    let many = batch((0..=MAX_BATCH).map(|_| batch_item(&n, &[APP_HASH], &w1, "payments/db")).collect());
    let (st, v) = send_batch(&s, &agent, BATCH_PROOF_CONTEXT, many.as_bytes()).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("64"), "{v}");

    // Audit: one record per release (request id BATCH.i, its own status and decision) plus one
    // for each batch.
    let log = audit_records(&s.dir.path().join("data/audit.log"));
    let recs: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["path"] == "/v1/agent/releases")
        .collect();
    let first_batch: Vec<&Value> = recs.iter().filter(|r| r["operation"] == "release-batch").collect();
    assert_eq!(first_batch.len(), 2, "one record per accepted batch: {recs:?}");
    let id = first_batch[0]["request_id"].as_str().unwrap();
    let parts: Vec<&Value> =
        recs.iter().filter(|r| r["request_id"].as_str().unwrap().starts_with(&format!("{id}."))).collect();
    let mut got: Vec<(String, u64, String)> = parts
        .iter()
        .map(|r| {
            (r["request_id"].as_str().unwrap().to_string(), r["status"].as_u64().unwrap(), r["decision"].to_string())
        })
        .collect();
    got.sort();
    let want: Vec<(String, u64, String)> = [(0, 200, "allow"), (1, 403, "deny"), (2, 401, "deny"), (3, 400, "none")]
        .iter()
        .map(|(i, st, d)| (format!("{id}.{i}"), *st, format!("\"{d}\"")))
        .collect();
    assert_eq!(got, want, "{parts:?}");
    let allowed = parts.iter().find(|r| r["status"] == 200).unwrap();
    assert!(allowed["identity"].as_str().unwrap().contains(APP_HASH), "{allowed}");
    assert!(allowed["identity"].as_str().unwrap().contains("node:name:node-1"), "{allowed}");
    assert!(!log.contains("hunter2"));
}

/// Attack: an agent's token is stolen from its node (or read from its memory) and used as a
/// bearer token on the ordinary API against a policy written for the node
/// (`[["node:name:node-1"]]`). Refused before any handler runs, with the reason audited; the
/// token still works where it belongs (nonces, renew-self) and a signed release still reads
/// the secret. A join token is no bearer credential either.
#[tokio::test]
async fn an_agent_token_is_refused_outside_the_agent_routes() {
    let policy = json!({
        "identities": [["node:name:node-1"]],
        "rules": [{"resources": ["secrets/payments/db"], "operations": ["read"]}]
    });
    let s = payments_db_server_with("node-1", policy).await;
    // A join token presented as a bearer token: refused (and spent: it was single-use).
    let jt = join_token(&s, "node-1").await;
    let (st, v, _) = raw(&s.addr, "GET", "/v1/secrets/data/payments/db", Some(&jt), None, vec![]).await;
    assert_eq!(st, 403, "{v}");
    assert!(!v.to_string().contains("hunter2"));
    let agent = join(&s, &join_token(&s, "node-1").await, new_key()).await.unwrap();

    for (method, path) in [
        ("GET", "/v1/secrets/data/payments/db"),
        ("GET", "/v1/auth/whoami"),
        ("POST", "/v1/auth/token/lookup"),
        ("GET", "/v1/keys"),
    ] {
        let body = if method == "POST" { b"{}".to_vec() } else { vec![] };
        let (st, v, _) = raw(&s.addr, method, path, Some(&agent.token), Some("application/json"), body).await;
        assert_eq!(st, 403, "{method} {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("agent routes"), "{msg}");
        assert!(!v.to_string().contains("hunter2"));
    }

    // Control: the agent routes still take it, and a signed release still works.
    assert_eq!(nonce(&s, &agent.token).await.0, 200);
    let (st, v, _) =
        raw(&s.addr, "POST", "/v1/auth/token/renew-self", Some(&agent.token), Some("application/json"), b"{}".to_vec())
            .await;
    assert_eq!(st, 200, "{v}");
    let workload = RecipientKey::generate().unwrap();
    let n = fresh_nonce(&s, &agent).await;
    let (st, v) =
        send_release(&s, &agent.token, Some(&agent.key), &read_db(&agent, &n, &["unix:uid:1000"], &workload)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(open(&workload, &n, &v)["data"]["password"], "hunter2");

    let log = audit_records(&s.dir.path().join("data/audit.log"));
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("agent token outside agent routes")).collect();
    assert_eq!(refusals.len(), 4, "{log}");
    assert!(refusals.iter().all(|l| l.contains("\"status\":403")), "{refusals:?}");
    // Every record says where the request came from.
    assert!(refusals.iter().all(|l| l.contains("\"client\":\"127.0.0.1:")), "{refusals:?}");
    assert!(log.contains("agent join token outside agent routes"), "{log}");
    assert!(!log.contains("hunter2"));
}
