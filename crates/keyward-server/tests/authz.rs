//! Authorization matrix: identities against every operation class, each expected to be allowed
//! or denied; every denial is audited with its reason. Token lifecycle: TTL, renew, use limits,
//! revocation of descendants, the last root token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_client::{Client, Method};
use keyward_test_support::server::TestServer;
use serde_json::{Value, json};

async fn token(root: &Client, body: Value) -> (String, String) {
    let v = root.request(Method::POST, "/v1/auth/token/create", Some(&body)).await.unwrap();
    (v["token"].as_str().unwrap().to_string(), v["accessor"].as_str().unwrap().to_string())
}

fn as_token(s: &TestServer, t: &str) -> Client {
    Client::builder(s.addr.clone()).token(t).build().unwrap()
}

/// One probe per operation class; returns the HTTP status (200/201 allowed, 403 denied, ...).
async fn probe(c: &Client, class: &str, ct: &[u8]) -> u16 {
    let r = match class {
        "encrypt payments" => c.encrypt("payments", b"x", &BTreeMap::new()).await.map(|_| ()),
        "encrypt other" => c.encrypt("other", b"x", &BTreeMap::new()).await.map(|_| ()),
        "decrypt payments" => c.decrypt(ct, &BTreeMap::new()).await.map(|_| ()),
        "datakey payments" => c.generate_data_key("payments", &BTreeMap::new(), None, true).await.map(|_| ()),
        "sign signer" => c
            .request(Method::POST, "/v1/keys/signer/sign", Some(&json!({"message": STANDARD.encode(b"m")})))
            .await
            .map(|_| ()),
        "read app secret" => c.get_secret("app/db", None).await.map(|_| ()),
        "write app secret" => {
            c.put_secret("app/db", &BTreeMap::from([("k".into(), "v".into())]), None).await.map(|_| ())
        }
        "read other secret" => c.get_secret("other/x", None).await.map(|_| ()),
        "admin create key" => c.create_key(&format!("new-{}", rand_suffix()), "aes256-gcm", "", None).await.map(|_| ()),
        "admin policies" => c.request(Method::GET, "/v1/policies", None).await.map(|_| ()),
        "audit" => c.request(Method::GET, "/v1/sys/audit", None).await.map(|_| ()),
        "random" => c.request(Method::POST, "/v1/random", Some(&json!({"bytes": 8}))).await.map(|_| ()),
        other => panic!("unknown class {other}"),
    };
    match r {
        Ok(()) => 200,
        Err(e) => e.status().unwrap_or(0),
    }
}

fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    keyward_crypto::fill_random(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const CLASSES: &[&str] = &[
    "encrypt payments",
    "encrypt other",
    "decrypt payments",
    "datakey payments",
    "sign signer",
    "read app secret",
    "write app secret",
    "read other secret",
    "admin create key",
    "admin policies",
    "audit",
    "random",
];

#[tokio::test]
async fn authorization_matrix_and_audited_denials() {
    let s = TestServer::start().await;
    let root = s.client();
    root.create_key("payments", "aes256-gcm", "", None).await.unwrap();
    root.create_key("other", "aes256-gcm", "", None).await.unwrap();
    root.create_key("signer", "ed25519", "", None).await.unwrap();
    root.put_secret("app/db", &BTreeMap::from([("k".into(), "v".into())]), None).await.unwrap();
    root.put_secret("other/x", &BTreeMap::from([("k".into(), "v".into())]), None).await.unwrap();
    let ct = root.encrypt("payments", b"x", &BTreeMap::new()).await.unwrap().ciphertext;

    let policy = |rules: Value| json!({"description": "test", "rules": rules});
    root.request(
        Method::PUT,
        "/v1/policies/payments-app",
        Some(&policy(json!([
            {"resources": ["keys/payments"], "operations": ["encrypt", "decrypt", "generate-data-key"]},
            {"resources": ["secrets/app/*"], "operations": ["read"]}
        ]))),
    )
    .await
    .unwrap();
    root.request(
        Method::PUT,
        "/v1/policies/signer",
        Some(&policy(json!([{"resources": ["keys/signer"], "operations": ["sign", "verify"]}]))),
    )
    .await
    .unwrap();
    root.request(Method::PUT, "/v1/policies/ops", Some(&policy(json!([{"resources": ["*"], "operations": ["*"]}]))))
        .await
        .unwrap();

    let (scoped, _) = token(&root, json!({"policies": ["payments-app"], "ttl": "1h"})).await;
    let (signer, _) = token(&root, json!({"policies": ["signer"]})).await;
    let (ops, _) = token(&root, json!({"policies": ["ops"]})).await;
    let (expired, _) = token(&root, json!({"policies": ["ops"], "ttl": "1s"})).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;

    let a = 200;
    let d = 403;
    let u = 401;
    #[rustfmt::skip]
    let expect: &[(&str, Option<&str>, [u16; 12])] = &[
        //                                 enc  encO  dec  dk   sign rdA  wrA  rdO  adm  pol  aud  rnd
        ("root",            Some(&s.token), [a,  a,    a,   a,   a,   a,   a,   a,   a,   a,   a,   a]),
        ("scoped",          Some(&scoped),  [a,  d,    a,   a,   d,   a,   d,   d,   d,   d,   d,   d]),
        ("signer",          Some(&signer),  [d,  d,    d,   d,   a,   d,   d,   d,   d,   d,   d,   d]),
        ("ops (all)",       Some(&ops),     [a,  a,    a,   a,   a,   a,   a,   a,   a,   a,   a,   a]),
        ("expired",         Some(&expired), [u,  u,    u,   u,   u,   u,   u,   u,   u,   u,   u,   u]),
        ("forged",          Some("kwt_00"), [u,  u,    u,   u,   u,   u,   u,   u,   u,   u,   u,   u]),
        ("no token",        None,           [u,  u,    u,   u,   u,   u,   u,   u,   u,   u,   u,   u]),
    ];
    for (who, tok, want) in expect {
        let c = match tok {
            Some(t) => as_token(&s, t),
            None => s.anonymous(),
        };
        for (class, want) in CLASSES.iter().zip(want) {
            assert_eq!(probe(&c, class, &ct).await, *want, "{who}: {class}");
        }
    }

    // Every denial is in the audit log with its reason and identity.
    let log = keyward_test_support::audit_text(&s.dir.path().join("data/audit.log"));
    let recs: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let denials: Vec<&Value> = recs.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denials.len(), 8 + 11, "scoped 8 + signer 11 denials");
    for r in &denials {
        assert_eq!(r["status"], 403);
        assert!(r["reason"].as_str().unwrap().contains("no policy of this identity grants"), "{r}");
        assert!(r["identity"].as_str().unwrap().starts_with("acc_"));
    }
    let unauth = recs.iter().filter(|r| r["status"] == 401).count();
    assert_eq!(unauth, 36, "every unauthenticated attempt is audited too");
    assert!(!log.contains(&scoped) && !log.contains(&signer) && !log.contains(&expired), "no token in the log");

    // Dry run and whoami.
    let v = root
        .request(
            Method::POST,
            "/v1/sys/authorize",
            Some(&json!({"policies": ["payments-app"], "operation": "read", "resource": "secrets/app/x"})),
        )
        .await
        .unwrap();
    assert_eq!((v["allowed"].as_bool(), v["grant"].as_str()), (Some(true), Some("policy payments-app rule 1")));
    let v = root
        .request(
            Method::POST,
            "/v1/sys/authorize",
            Some(&json!({"policies": ["payments-app"], "operation": "write", "resource": "secrets/app/x"})),
        )
        .await
        .unwrap();
    assert_eq!(v["allowed"], false);
    let me = as_token(&s, &scoped).request(Method::GET, "/v1/auth/whoami", None).await.unwrap();
    assert_eq!(me["policies"], json!(["payments-app"]));
    assert!(me["effective"][0]["grants"].as_array().unwrap().len() >= 2);

    // A scoped token cannot mint broader tokens; policy validation is strict.
    let e = as_token(&s, &scoped)
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["ops"]})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403));
    let e = root
        .request(
            Method::PUT,
            "/v1/policies/bad",
            Some(&policy(json!([{"resources": ["k*s"], "operations": ["read"]}]))),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    let e =
        root.request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["nope"]}))).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
}

#[tokio::test]
async fn token_lifecycle_revocation_uses_and_root() {
    let s = TestServer::start().await;
    let root = s.client();
    root.request(Method::PUT, "/v1/policies/ops", Some(&json!({"rules": [{"resources": ["*"], "operations": ["*"]}]})))
        .await
        .unwrap();
    let (parent, parent_acc) = token(&root, json!({"policies": ["ops"], "ttl": "1h"})).await;
    let pc = as_token(&s, &parent);
    let child = pc
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["ops"], "ttl": "2h"})))
        .await
        .unwrap();
    let child_tok = child["token"].as_str().unwrap().to_string();
    let parent_info =
        root.request(Method::POST, "/v1/auth/token/lookup", Some(&json!({"accessor": parent_acc}))).await.unwrap();
    assert_eq!(child["expires_at"], parent_info["expires_at"], "a child never outlives its parent");
    let renewed = pc.request(Method::POST, "/v1/auth/token/renew-self", Some(&json!({}))).await.unwrap();
    assert!(renewed["expires_at"].is_string());

    // Revoking the parent revokes the child.
    let v = root.request(Method::POST, "/v1/auth/token/revoke", Some(&json!({"accessor": parent_acc}))).await.unwrap();
    assert_eq!(v["revoked"].as_array().unwrap().len(), 2);
    assert_eq!(pc.health().await.unwrap().status, "ok");
    assert_eq!(pc.request(Method::GET, "/v1/auth/whoami", None).await.unwrap_err().status(), Some(401));
    assert_eq!(
        as_token(&s, &child_tok).request(Method::GET, "/v1/auth/whoami", None).await.unwrap_err().status(),
        Some(401)
    );

    // Use limits survive a restart.
    let (limited, _) = token(&root, json!({"policies": ["ops"], "max_uses": 2})).await;
    let lc = as_token(&s, &limited);
    lc.request(Method::GET, "/v1/auth/whoami", None).await.unwrap();
    let s = s.restart().await;
    let lc = as_token(&s, &limited);
    lc.request(Method::GET, "/v1/auth/whoami", None).await.unwrap();
    assert_eq!(
        lc.request(Method::GET, "/v1/auth/whoami", None).await.unwrap_err().status(),
        Some(401),
        "third use refused"
    );

    // The root token can be revoked only once another root-policy token exists.
    let root = s.client();
    let me = root.request(Method::GET, "/v1/auth/whoami", None).await.unwrap();
    let root_acc = me["accessor"].as_str().unwrap().to_string();
    let e = root.request(Method::POST, "/v1/auth/token/revoke-self", Some(&json!({}))).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    let (child_root, _) = token(&root, json!({"policies": ["root"]})).await;
    let e = root.request(Method::POST, "/v1/auth/token/revoke-self", Some(&json!({}))).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "a child root token dies with its parent, so it does not count");
    let e = as_token(&s, &child_root)
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["ops"], "orphan": false})))
        .await;
    assert!(e.is_ok());
    let (root2, _) = token(&root, json!({"policies": ["root"], "orphan": true})).await;
    let r2 = as_token(&s, &root2);
    r2.request(Method::POST, "/v1/auth/token/revoke", Some(&json!({"accessor": root_acc}))).await.unwrap();
    assert_eq!(root.request(Method::GET, "/v1/keys", None).await.unwrap_err().status(), Some(401));
    r2.request(Method::GET, "/v1/keys", None).await.unwrap();
}

/// Token scope, as the attacks: a use-limited token hands a child more uses than it has, and a
/// holder of `write` on `auth/token` renews, revokes or looks up a token it did not create.
/// Children get at most their parent's remaining uses (and expiry); acting outside one's own
/// subtree needs `admin` on `auth/token`; each refusal is audited with its reason.
#[tokio::test]
async fn tokens_act_only_within_their_subtree_and_children_inherit_limits() {
    let s = TestServer::start().await;
    let root = s.client();
    let pol = |ops: &[&str]| json!({"rules": [{"resources": ["auth/token"], "operations": ops}]});
    root.request(Method::PUT, "/v1/policies/tokens", Some(&pol(&["read", "write"]))).await.unwrap();
    root.request(Method::PUT, "/v1/policies/token-admin", Some(&pol(&["read", "write", "admin"]))).await.unwrap();

    // A parent with 3 uses: creating a child uses one, so the child gets at most 2, whatever
    // it asks for; a child of the child at most what that has left.
    let (limited, _) = token(&root, json!({"policies": ["tokens"], "max_uses": 3, "orphan": true})).await;
    let v = as_token(&s, &limited)
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["tokens"], "max_uses": 100})))
        .await
        .unwrap();
    assert_eq!(v["max_uses"], 2, "{v}");
    let v = as_token(&s, &limited)
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["tokens"]})))
        .await
        .unwrap();
    assert_eq!(v["max_uses"], 1, "an unlimited request gets what is left: {v}");
    let e = as_token(&s, &limited)
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["tokens"]})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "the parent's last use has nothing left to give: {e}");
    assert!(e.to_string().contains("no uses left"), "{e}");

    // Subtrees: A and B both hold write on auth/token; B cannot touch A's child.
    let (a, _) = token(&root, json!({"policies": ["tokens"], "orphan": true, "ttl": "1h"})).await;
    let (b, b_acc) = token(&root, json!({"policies": ["tokens"], "orphan": true, "ttl": "1h"})).await;
    let child = as_token(&s, &a)
        .request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["tokens"], "ttl": "10m"})))
        .await
        .unwrap();
    let child_acc = child["accessor"].as_str().unwrap().to_string();
    let on = |c: &Client, op: &'static str, acc: &str| {
        let (c, acc) = (c.clone(), acc.to_string());
        async move {
            c.request(Method::POST, &format!("/v1/auth/token/{op}"), Some(&json!({"accessor": acc})))
                .await
                .map_err(|e| (e.status(), e.to_string()))
        }
    };
    let bc = as_token(&s, &b);
    for op in ["lookup", "renew", "revoke"] {
        let e = on(&bc, op, &child_acc).await.unwrap_err();
        assert_eq!(e.0, Some(403), "{op}: {e:?}");
        assert!(e.1.contains("admin"), "{op}: {e:?}");
    }
    // An accessor that does not exist looks the same (no oracle).
    assert_eq!(on(&bc, "lookup", "acc_000000000000000000000000").await.unwrap_err().0, Some(403));
    // Control: A acts on its own child; an admin acts on anyone's.
    let ac = as_token(&s, &a);
    assert!(on(&ac, "lookup", &child_acc).await.is_ok());
    assert!(on(&ac, "renew", &child_acc).await.is_ok());
    let (admin, _) = token(&root, json!({"policies": ["token-admin"], "orphan": true, "ttl": "1h"})).await;
    let adm = as_token(&s, &admin);
    assert!(on(&adm, "lookup", &b_acc).await.is_ok());
    assert!(on(&ac, "revoke", &child_acc).await.is_ok());

    let log = keyward_test_support::audit_text(&s.dir.path().join("data/audit.log"));
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("outside the caller's token subtree")).collect();
    assert_eq!(refused.len(), 4, "{log}");
    assert!(refused.iter().all(|l| l.contains("\"deny\"")));
}
