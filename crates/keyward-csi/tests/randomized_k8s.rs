//! Randomized secrets for Kubernetes workloads, using this crate's test world (a server with
//! Kubernetes auth and a test issuer): two replicas of one ServiceAccount, logged in with their
//! own pod-bound tokens, share one value; a pod of another ServiceAccount gets another. (The
//! CSI provider itself only mounts KV secrets and data keys.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use keyward_client::{Client, Method};
use serde_json::json;

async fn login(w: &World, ns: &str, sa: &str, pod: &str, role: &str) -> Client {
    let anon = Client::builder(w.addr.clone()).build().unwrap();
    let jwt = w.pod_token(ns, sa, pod, &format!("uid-{pod}"));
    let v = anon
        .request(Method::POST, "/v1/auth/kubernetes/login", Some(&json!({"role": role, "jwt": jwt})))
        .await
        .unwrap();
    Client::builder(w.addr.clone()).token(v["token"].as_str().unwrap()).build().unwrap()
}

#[tokio::test]
async fn replicas_of_a_service_account_share_a_randomized_value() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    w.admin
        .request(Method::PUT, "/v1/randomized/db-password", Some(&json!({"kind": "password", "ttl": "1h"})))
        .await
        .unwrap();
    for ns in ["payments", "team-b"] {
        w.admin
            .request(
                Method::PUT,
                &format!("/v1/policies/{ns}-app"),
                Some(&json!({"rules": [
                    {"resources": [format!("secrets/{ns}/*")], "operations": ["read"]},
                    {"resources": [format!("keys/{ns}")], "operations": ["decrypt"]},
                    {"resources": ["randomized/db-password"], "operations": ["read"]}
                ]})),
            )
            .await
            .unwrap();
    }
    let get = |c: Client| async move { c.request(Method::GET, "/v1/randomized/db-password", None).await.unwrap() };
    let a = get(login(&w, "payments", "api", "api-0", "payments").await).await;
    let b = get(login(&w, "payments", "api", "api-1", "payments").await).await;
    let other = get(login(&w, "team-b", "worker", "w-0", "team-b").await).await;
    assert_eq!(a["identity"], "k8s:payments/api");
    assert_eq!(a["value"], b["value"], "two replicas share the value");
    assert_ne!(a["value"], other["value"], "another ServiceAccount never does");
    assert_eq!(other["identity"], "k8s:team-b/worker");
}
