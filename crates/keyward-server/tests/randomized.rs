//! Randomized secrets over the API: one value per workload identity, shared by its replicas,
//! never by another identity; created on first read (once, even under concurrent first reads),
//! rotated at the TTL with the previous value during the grace period; never listed, never in
//! the audit log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use keyward_client::{Client, Method};
use keyward_test_support::server::TestServer;
use serde_json::{Value, json};

async fn token_with(c: &Client, policy: &str) -> String {
    let v = c.request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": [policy]}))).await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

async fn get(s: &TestServer, token: &str) -> Result<Value, keyward_client::Error> {
    let c = Client::builder(s.addr.clone()).token(token).build().unwrap();
    c.request(Method::GET, "/v1/randomized/db-password", None).await
}

#[tokio::test]
async fn values_per_identity_rotate_with_grace() {
    let s = TestServer::start().await;
    let c = s.client();
    let def = c
        .request(
            Method::PUT,
            "/v1/randomized/db-password",
            Some(&json!({"kind": "password", "length": 24, "ttl": "3s", "grace": "1s"})),
        )
        .await
        .unwrap();
    assert_eq!(def["ttl"], "3s");
    c.request(
        Method::PUT,
        "/v1/policies/app",
        Some(&json!({"rules": [{"resources": ["randomized/db-password"], "operations": ["read"]}]})),
    )
    .await
    .unwrap();
    let (a, b) = (token_with(&c, "app").await, token_with(&c, "app").await);

    let a1 = get(&s, &a).await.unwrap();
    let value = a1["value"].as_str().unwrap().to_string();
    assert_eq!(value.len(), 24);
    assert_eq!(a1["version"], 1);
    assert!(a1.get("previous").is_none());
    assert_eq!(get(&s, &a).await.unwrap()["value"], value.as_str(), "the same identity gets the same value");
    let b1 = get(&s, &b).await.unwrap();
    assert_ne!(b1["value"], value.as_str(), "another identity never shares it");
    assert_ne!(a1["identity"], b1["identity"]);

    // Concurrent first reads by a new identity agree on one value.
    let t = token_with(&c, "app").await;
    let reads = futures_join(&s, &t, 8).await;
    assert!(reads.windows(2).all(|w| w[0] == w[1]), "{reads:?}");

    // After the TTL: a new value, and the old one during the grace period.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let a2 = get(&s, &a).await.unwrap();
    assert_eq!(a2["version"], 2);
    assert_ne!(a2["value"], value.as_str());
    assert_eq!(a2["previous"]["value"], value.as_str(), "{a2}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a3 = get(&s, &a).await.unwrap();
    assert_eq!((a3["version"].clone(), a3["value"].clone()), (a2["version"].clone(), a2["value"].clone()));
    assert!(a3.get("previous").is_none(), "grace over: {a3}");

    // Deny by default; definitions carry no value; values are neither listed nor audited.
    c.request(
        Method::PUT,
        "/v1/policies/other",
        Some(&json!({"rules": [{"resources": ["randomized/other"], "operations": ["read"]}]})),
    )
    .await
    .unwrap();
    let none = token_with(&c, "other").await;
    assert_eq!(get(&s, &none).await.unwrap_err().status(), Some(403));
    let d = c.request(Method::GET, "/v1/randomized/db-password/definition", None).await.unwrap();
    assert!(d.get("value").is_none() && d["kind"] == "password");
    let listed = c.request(Method::GET, "/v1/secrets", None).await.unwrap();
    assert!(!listed.to_string().contains("_keyward"), "{listed}");
    let e = c.put_secret("_keyward/random/x", &BTreeMap::from([("a".into(), "b".into())]), None).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    let audit = keyward_test_support::audit_text(&s.dir.path().join("data/audit.log"));
    assert!(!audit.contains(&value), "a value leaked into the audit log");

    // Bad definitions are refused with what to fix.
    for bad in [
        json!({"kind": "pin", "ttl": "1h"}),
        json!({"kind": "password", "length": 4, "ttl": "1h"}),
        json!({"kind": "bytes", "alphabet": "ab", "ttl": "1h"}),
        json!({"kind": "password", "ttl": "1h", "colour": "red"}),
    ] {
        let e = c.request(Method::PUT, "/v1/randomized/x", Some(&bad)).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{bad}");
    }
    // A grace longer than the period is capped at it.
    let capped = json!({"kind": "password", "ttl": "1h", "grace": "2h"});
    assert_eq!(c.request(Method::PUT, "/v1/randomized/x", Some(&capped)).await.unwrap()["grace"], "1h");
    assert_eq!(c.request(Method::GET, "/v1/randomized/nope", None).await.unwrap_err().status(), Some(404));
}

async fn futures_join(s: &TestServer, token: &str, n: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let c = Client::builder(s.addr.clone()).token(token).build().unwrap();
        tasks.push(tokio::spawn(async move {
            c.request(Method::GET, "/v1/randomized/db-password", None).await.unwrap()["value"]
                .as_str()
                .unwrap()
                .to_string()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
