//! End-to-end tests of the /v1 API over a real socket, through the Rust client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_test_support::server::{TestServer, raw};
use serde_json::json;

fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn code(e: &keyward_client::Error) -> (u16, String) {
    (e.status().unwrap_or(0), e.code().unwrap_or("").to_string())
}

#[tokio::test]
async fn key_lifecycle() {
    let s = TestServer::start().await;
    let c = s.client();
    for t in ["aes256-gcm", "hmac-sha256", "ed25519", "ecdsa-p256"] {
        let k = c.create_key(&format!("k-{t}"), t, "test key", None).await.unwrap();
        assert_eq!(k.key_type, t);
        assert_eq!(k.state, "enabled");
        assert_eq!(k.current_version, 1);
        assert_eq!(k.id.len(), 32);
        let has_pub = k.versions.as_ref().unwrap()[0].public_key.is_some();
        assert_eq!(has_pub, t == "ed25519" || t == "ecdsa-p256", "public key only for signing keys ({t})");
    }
    assert_eq!(
        code(&c.create_key("k-aes256-gcm", "aes256-gcm", "", None).await.unwrap_err()),
        (409, "already_exists".into())
    );
    assert_eq!(
        code(&c.create_key("bad name", "aes256-gcm", "", None).await.unwrap_err()),
        (400, "invalid_argument".into())
    );
    let e = c.create_key("x", "rsa-4096", "", None).await.unwrap_err();
    assert_eq!(code(&e), (400, "invalid_argument".into()));
    assert!(e.to_string().contains("aes256-gcm"), "error lists the valid types: {e}");
    assert_eq!(code(&c.create_key("x", "aes256-gcm", "", Some("soon")).await.unwrap_err()).0, 400);
    assert_eq!(
        code(&c.create_key("x", "aes256-gcm", "", Some("5s")).await.unwrap_err()).0,
        400,
        "below minimum period"
    );
    assert_eq!(code(&c.describe_key("missing").await.unwrap_err()), (404, "not_found".into()));

    // Pagination over 4 keys with page size 3.
    let p1 = c.request(keyward_client::Method::GET, "/v1/keys?limit=3", None).await.unwrap();
    assert_eq!(p1["keys"].as_array().unwrap().len(), 3);
    let next = p1["next"].as_str().unwrap().to_string();
    let p2 = c.request(keyward_client::Method::GET, &format!("/v1/keys?limit=3&after={next}"), None).await.unwrap();
    assert_eq!(p2["keys"].as_array().unwrap().len(), 1);
    assert!(p2["next"].is_null());
    assert_eq!(c.request(keyward_client::Method::GET, "/v1/keys?limit=0", None).await.unwrap_err().status(), Some(400));

    // Disable / enable.
    let ct = c.encrypt("k-aes256-gcm", b"data", &BTreeMap::new()).await.unwrap();
    assert_eq!(c.key_action("k-aes256-gcm", "disable").await.unwrap().state, "disabled");
    let e = c.encrypt("k-aes256-gcm", b"data", &BTreeMap::new()).await.unwrap_err();
    assert_eq!(code(&e), (409, "key_disabled".into()));
    assert!(e.to_string().contains("enable it"), "says what to do: {e}");
    assert_eq!(code(&c.decrypt(&ct.ciphertext, &BTreeMap::new()).await.unwrap_err()), (409, "key_disabled".into()));
    c.key_action("k-aes256-gcm", "enable").await.unwrap();
    c.decrypt(&ct.ciphertext, &BTreeMap::new()).await.unwrap();

    // Deletion window: default 7 days, bounds 1..30.
    assert_eq!(code(&c.schedule_deletion("k-aes256-gcm", Some(0)).await.unwrap_err()).0, 400);
    assert_eq!(code(&c.schedule_deletion("k-aes256-gcm", Some(31)).await.unwrap_err()).0, 400);
    let k = c.schedule_deletion("k-aes256-gcm", None).await.unwrap();
    assert_eq!(k.state, "pending_deletion");
    let at = humantime::parse_rfc3339(k.deletion_at.as_deref().unwrap()).unwrap();
    let days = at.duration_since(std::time::SystemTime::now()).unwrap().as_secs_f64() / 86400.0;
    assert!((6.99..=7.01).contains(&days), "default window is 7 days, got {days}");
    assert_eq!(
        code(&c.encrypt("k-aes256-gcm", b"d", &BTreeMap::new()).await.unwrap_err()),
        (409, "key_pending_deletion".into())
    );
    assert_eq!(
        code(&c.decrypt(&ct.ciphertext, &BTreeMap::new()).await.unwrap_err()),
        (409, "key_pending_deletion".into())
    );
    assert_eq!(code(&c.key_action("k-aes256-gcm", "enable").await.unwrap_err()).0, 409, "cannot enable while pending");
    assert_eq!(c.key_action("k-aes256-gcm", "cancel-deletion").await.unwrap().state, "disabled");
    assert_eq!(code(&c.key_action("k-aes256-gcm", "cancel-deletion").await.unwrap_err()).0, 409);
    c.key_action("k-aes256-gcm", "enable").await.unwrap();

    // Rotation policy.
    let k = c
        .request(
            keyward_client::Method::PUT,
            "/v1/keys/k-aes256-gcm/rotation-policy",
            Some(&json!({"rotate_every": "90d"})),
        )
        .await
        .unwrap();
    assert_eq!(k["rotate_every"], "90d");
    assert!(k["next_rotation_at"].is_string());
    let k = c
        .request(
            keyward_client::Method::PUT,
            "/v1/keys/k-aes256-gcm/rotation-policy",
            Some(&json!({"rotate_every": null})),
        )
        .await
        .unwrap();
    assert!(k["next_rotation_at"].is_null());
    let k = c.create_key("auto", "aes256-gcm", "", Some("90d")).await.unwrap();
    assert_eq!(k.rotate_every.as_deref(), Some("90d"));
}

#[tokio::test]
async fn encrypt_decrypt_context_tamper_rotate_reencrypt() {
    let s = TestServer::start().await;
    let c = s.client();
    c.create_key("app", "aes256-gcm", "", None).await.unwrap();
    c.create_key("other", "aes256-gcm", "", None).await.unwrap();
    let cx = ctx(&[("tenant", "acme"), ("purpose", "test")]);
    let pt = b"the quick brown fox".to_vec();
    let ct = c.encrypt("app", &pt, &cx).await.unwrap();
    assert_eq!(ct.key_version, 1);
    let d = c.decrypt(&ct.ciphertext, &cx).await.unwrap();
    assert_eq!(&d.plaintext[..], &pt[..]);
    assert_eq!((d.key.as_str(), d.key_version), ("app", 1));

    // Wrong, missing or extra context: one uninformative error.
    for bad in [ctx(&[("tenant", "evil"), ("purpose", "test")]), BTreeMap::new(), ctx(&[("tenant", "acme")])] {
        let e = c.decrypt(&ct.ciphertext, &bad).await.unwrap_err();
        assert_eq!(code(&e), (400, "decryption_failed".into()));
    }
    // Every byte flipped, and every truncation: the same error and message.
    for i in 0..ct.ciphertext.len() {
        let mut t = ct.ciphertext.clone();
        t[i] ^= 0x01;
        let e = c.decrypt(&t, &cx).await.unwrap_err();
        assert_eq!(code(&e), (400, "decryption_failed".into()), "flip at {i}");
        assert!(e.to_string().starts_with("decryption failed"), "{e}");
    }
    for n in [0, 1, 10, 22, 23, 34, 35, ct.ciphertext.len() - 1] {
        let e = c.decrypt(&ct.ciphertext[..n], &cx).await.unwrap_err();
        assert_eq!(code(&e), (400, "decryption_failed".into()), "truncated to {n}");
    }

    // Empty plaintext is fine; 64 KiB is the limit.
    let e0 = c.encrypt("app", b"", &BTreeMap::new()).await.unwrap();
    assert!(c.decrypt(&e0.ciphertext, &BTreeMap::new()).await.unwrap().plaintext.is_empty());
    let max = vec![7u8; 64 * 1024];
    let big = c.encrypt("app", &max, &BTreeMap::new()).await.unwrap();
    assert_eq!(c.decrypt(&big.ciphertext, &BTreeMap::new()).await.unwrap().plaintext.len(), max.len());
    let e = c.encrypt("app", &vec![7u8; 64 * 1024 + 1], &BTreeMap::new()).await.unwrap_err();
    assert_eq!(code(&e), (400, "invalid_argument".into()));
    assert!(e.to_string().contains("65536"), "{e}");
    let many: BTreeMap<String, String> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(code(&c.encrypt("app", b"x", &many).await.unwrap_err()).0, 400, "context entry limit");

    // Rotation: new version for new ciphertexts, old ones still decrypt.
    let k = c.key_action("app", "rotate").await.unwrap();
    assert_eq!(k.current_version, 2);
    assert_eq!(k.versions.as_ref().unwrap().len(), 2);
    let ct2 = c.encrypt("app", &pt, &cx).await.unwrap();
    assert_eq!(ct2.key_version, 2);
    assert_eq!(c.decrypt(&ct.ciphertext, &cx).await.unwrap().key_version, 1);
    assert_eq!(&c.decrypt(&ct2.ciphertext, &cx).await.unwrap().plaintext[..], &pt[..]);

    // Re-encrypt to the newest version, then to another key with another context.
    let re = c.reencrypt(&ct.ciphertext, &cx, None, &cx).await.unwrap();
    assert_eq!((re.key.as_str(), re.key_version), ("app", 2));
    assert_eq!((re.source_key.as_str(), re.source_key_version), ("app", 1), "the answer says what it came from");
    assert_eq!(&c.decrypt(&re.ciphertext, &cx).await.unwrap().plaintext[..], &pt[..]);
    let cx2 = ctx(&[("moved", "yes")]);
    let re2 = c.reencrypt(&ct.ciphertext, &cx, Some("other"), &cx2).await.unwrap();
    assert_eq!(re2.key, "other");
    assert_eq!(&c.decrypt(&re2.ciphertext, &cx2).await.unwrap().plaintext[..], &pt[..]);
    assert_eq!(code(&c.reencrypt(&ct.ciphertext, &cx2, None, &cx).await.unwrap_err()).1, "decryption_failed");
    assert_eq!(code(&c.reencrypt(&ct.ciphertext, &cx, Some("nope"), &cx).await.unwrap_err()).0, 404);

    // Data keys.
    let dk = c.generate_data_key("app", &cx, None, true).await.unwrap();
    let p = dk.plaintext.as_ref().unwrap();
    assert_eq!(p.len(), 32);
    assert_eq!(&c.decrypt(&dk.ciphertext, &cx).await.unwrap().plaintext[..], &p[..]);
    let dk = c.generate_data_key("app", &cx, Some(16), false).await.unwrap();
    assert!(dk.plaintext.is_none());
    assert_eq!(c.decrypt(&dk.ciphertext, &cx).await.unwrap().plaintext.len(), 16);
    assert_eq!(code(&c.generate_data_key("app", &cx, Some(8), true).await.unwrap_err()).0, 400);
}

async fn sign(c: &keyward_client::Client, key: &str, msg: &[u8]) -> String {
    let v = c
        .request(
            keyward_client::Method::POST,
            &format!("/v1/keys/{key}/sign"),
            Some(&json!({"message": STANDARD.encode(msg)})),
        )
        .await
        .unwrap();
    v["signature"].as_str().unwrap().to_string()
}

async fn verify(c: &keyward_client::Client, key: &str, msg: &[u8], sig: &str) -> Result<bool, keyward_client::Error> {
    let v = c
        .request(
            keyward_client::Method::POST,
            &format!("/v1/keys/{key}/verify"),
            Some(&json!({"message": STANDARD.encode(msg), "signature": sig})),
        )
        .await?;
    Ok(v["valid"].as_bool().unwrap())
}

#[tokio::test]
async fn sign_verify_mac_random() {
    let s = TestServer::start().await;
    let c = s.client();
    for t in ["ed25519", "ecdsa-p256"] {
        c.create_key(t, t, "", None).await.unwrap();
        let sig = sign(&c, t, b"message").await;
        assert!(verify(&c, t, b"message", &sig).await.unwrap());
        assert!(!verify(&c, t, b"messagf", &sig).await.unwrap());
        c.key_action(t, "rotate").await.unwrap();
        assert!(verify(&c, t, b"message", &sig).await.unwrap(), "old version still verifies");
        let sig2 = sign(&c, t, b"message").await;
        assert!(verify(&c, t, b"message", &sig2).await.unwrap());
        // Bytes that are not a signature envelope do not verify (as the API contract states: any
        // base64 there is a schema-valid request).
        assert!(!verify(&c, t, b"message", "bm90IGEgc2lnbmF0dXJl").await.unwrap());
    }
    // A signature by one key does not verify under another.
    let sig = sign(&c, "ed25519", b"m").await;
    c.create_key("ed2", "ed25519", "", None).await.unwrap();
    assert!(!verify(&c, "ed2", b"m", &sig).await.unwrap());

    // The public key is real: verify an Ed25519 signature outside Keyward.
    let k = c.describe_key("ed25519").await.unwrap();
    let spki = STANDARD.decode(k.versions.as_ref().unwrap()[1].public_key.as_deref().unwrap()).unwrap();
    let env = STANDARD.decode(sign(&c, "ed25519", b"outside").await).unwrap();
    let raw_pub = &spki[spki.len() - 32..];
    keyward_crypto::keys::verify_ed25519_raw(raw_pub, b"outside", &env[23..]).unwrap();

    // MAC.
    c.create_key("mac", "hmac-sha256", "", None).await.unwrap();
    let m = c
        .request(keyward_client::Method::POST, "/v1/keys/mac/mac", Some(&json!({"message": STANDARD.encode(b"hello")})))
        .await
        .unwrap();
    let mac = m["mac"].as_str().unwrap();
    let vm = |msg: &'static [u8], mac: String| {
        let c = c.clone();
        async move {
            c.request(
                keyward_client::Method::POST,
                "/v1/keys/mac/verify-mac",
                Some(&json!({"message": STANDARD.encode(msg), "mac": mac})),
            )
            .await
        }
    };
    assert_eq!(vm(b"hello", mac.to_string()).await.unwrap()["valid"], true);
    assert_eq!(vm(b"hellp", mac.to_string()).await.unwrap()["valid"], false);

    // Wrong key types.
    let e = c.encrypt("mac", b"x", &BTreeMap::new()).await.unwrap_err();
    assert_eq!(code(&e), (409, "wrong_key_type".into()));
    c.create_key("aes", "aes256-gcm", "", None).await.unwrap();
    let e =
        c.request(keyward_client::Method::POST, "/v1/keys/aes/sign", Some(&json!({"message": ""}))).await.unwrap_err();
    assert_eq!(code(&e), (409, "wrong_key_type".into()));

    // Random.
    let r = c.request(keyward_client::Method::POST, "/v1/random", Some(&json!({"bytes": 48}))).await.unwrap();
    assert_eq!(STANDARD.decode(r["bytes"].as_str().unwrap()).unwrap().len(), 48);
    for n in [0, 1025] {
        assert_eq!(
            c.request(keyward_client::Method::POST, "/v1/random", Some(&json!({"bytes": n})))
                .await
                .unwrap_err()
                .status(),
            Some(400)
        );
    }
}

#[tokio::test]
async fn secrets_kv() {
    let s = TestServer::start().await;
    let c = s.client();
    let d1 = ctx(&[("user", "app"), ("password", "pw1")]);
    assert_eq!(c.put_secret("app/db", &d1, None).await.unwrap(), 1);
    assert_eq!(c.put_secret("app/db", &ctx(&[("password", "pw2")]), Some(1)).await.unwrap(), 2);
    let e = c.put_secret("app/db", &ctx(&[("password", "pw3")]), Some(1)).await.unwrap_err();
    assert_eq!(code(&e), (409, "conflict".into()));
    assert_eq!(c.put_secret("app/new", &d1, Some(0)).await.unwrap(), 1, "cas 0 creates");
    assert_eq!(code(&c.put_secret("app/new", &d1, Some(0)).await.unwrap_err()).0, 409);

    let latest = c.get_secret("app/db", None).await.unwrap();
    assert_eq!(latest.version, 2);
    assert_eq!(latest.data["password"].as_str(), "pw2");
    assert!(!format!("{latest:?}").contains("pw2"), "Debug of a secret prints no value");
    assert_eq!(c.get_secret("app/db", Some(1)).await.unwrap().data["user"].as_str(), "app");
    assert_eq!(code(&c.get_secret("app/db", Some(3)).await.unwrap_err()).0, 404);
    assert_eq!(code(&c.get_secret("app/none", None).await.unwrap_err()).0, 404);

    // Soft delete, undelete, destroy.
    let del = |p: &str, what: &str, v: serde_json::Value| {
        let c = c.clone();
        let path = format!("/v1/secrets/{what}/{p}");
        async move { c.request(keyward_client::Method::POST, &path, Some(&json!({"versions": v}))).await }
    };
    assert_eq!(del("app/db", "delete", json!([])).await.unwrap()["changed"], 1);
    let e = c.get_secret("app/db", None).await.unwrap_err();
    assert_eq!(code(&e).0, 404);
    assert!(e.to_string().contains("deleted"), "{e}");
    assert_eq!(c.get_secret("app/db", Some(1)).await.unwrap().version, 1, "other versions still readable");
    assert_eq!(del("app/db", "undelete", json!([2])).await.unwrap()["changed"], 1);
    assert_eq!(c.get_secret("app/db", None).await.unwrap().version, 2);
    assert_eq!(del("app/db", "destroy", json!([1])).await.unwrap()["changed"], 1);
    let e = c.get_secret("app/db", Some(1)).await.unwrap_err();
    assert!(e.to_string().contains("destroyed"), "{e}");
    assert_eq!(del("app/db", "undelete", json!([1])).await.unwrap()["changed"], 0, "destroyed cannot come back");
    assert_eq!(del("app/db", "destroy", json!([])).await.unwrap_err().status(), Some(400), "destroy names versions");
    assert_eq!(del("app/db", "delete", json!([9])).await.unwrap_err().status(), Some(404));

    let meta = c.request(keyward_client::Method::GET, "/v1/secrets/metadata/app/db", None).await.unwrap();
    assert_eq!(meta["current_version"], 2);
    let vs = meta["versions"].as_array().unwrap();
    assert_eq!(vs[0]["destroyed"], true);
    assert_eq!(vs[1]["destroyed"], false);
    assert!(!meta.to_string().contains("pw2"), "metadata holds no values");

    // Listing with prefix and pagination.
    for p in ["team/a", "team/b", "team/c", "teamx"] {
        c.put_secret(p, &ctx(&[("v", "1")]), None).await.unwrap();
    }
    let l = c.request(keyward_client::Method::GET, "/v1/secrets?prefix=team/&limit=2", None).await.unwrap();
    assert_eq!(l["paths"], json!(["team/a", "team/b"]));
    let l =
        c.request(keyward_client::Method::GET, "/v1/secrets?prefix=team/&limit=2&after=team/b", None).await.unwrap();
    assert_eq!(l["paths"], json!(["team/c"]));

    // Validation.
    for bad in ["a/../b", "a//b", "./a"] {
        let e = c.put_secret(bad, &d1, None).await.unwrap_err();
        assert!(matches!(e, keyward_client::Error::InvalidArgument(_)), "client refuses {bad}: {e}");
    }
    // The server checks too: paths that URL parsers keep as-is but Keyward refuses.
    for bad in ["a%20b", "a//b", "a/%00"] {
        let (st, b, _) = raw(
            &s.addr,
            "PUT",
            &format!("/v1/secrets/data/{bad}"),
            Some(&s.token),
            Some("application/json"),
            br#"{"data":{}}"#.to_vec(),
        )
        .await;
        assert_eq!((st, b["error"]["code"].as_str()), (400, Some("invalid_argument")), "{bad}");
    }
    let huge = ctx(&[("v", &"x".repeat(200 * 1024))]);
    assert_eq!(c.put_secret("big", &huge, None).await.unwrap_err().status(), Some(400));
}

#[tokio::test]
async fn bad_input_and_authentication() {
    let s = TestServer::start().await;
    let c = s.client();
    c.create_key("k", "aes256-gcm", "", None).await.unwrap();
    let a = &s.addr;
    let t = Some(s.token.as_str());
    let j = Some("application/json");

    // Health is anonymous; nothing else is.
    assert_eq!(s.anonymous().health().await.unwrap().status, "ok");
    let (st, body, rid) = raw(a, "GET", "/v1/keys", None, None, vec![]).await;
    assert_eq!(st, 401);
    assert_eq!(body["error"]["code"], "unauthenticated");
    assert_eq!(body["error"]["request_id"].as_str(), rid.as_deref(), "request id in body and header");
    assert_eq!(raw(a, "GET", "/v1/keys", Some("kwt_wrong"), None, vec![]).await.0, 401);
    assert_eq!(raw(a, "GET", "/v1/openapi.json", None, None, vec![]).await.0, 401);
    let big_token = "x".repeat(10_000);
    assert_eq!(raw(a, "GET", "/v1/keys", Some(&big_token), None, vec![]).await.0, 401);
    let (st, _, _) = raw(a, "POST", "/v1/keys/k/encrypt", None, j, br#"{"plaintext":""}"#.to_vec()).await;
    assert_eq!(st, 401, "crypto refused without token");

    // Malformed JSON, unknown fields, wrong types, wrong media type, bad base64.
    let (st, b, _) = raw(a, "POST", "/v1/keys/k/encrypt", t, j, b"{not json".to_vec()).await;
    assert_eq!((st, b["error"]["code"].as_str()), (400, Some("invalid_json")));
    let (st, b, _) = raw(a, "POST", "/v1/keys/k/encrypt", t, j, br#"{"plaintext":"","extra":1}"#.to_vec()).await;
    assert_eq!(st, 400);
    assert!(b["error"]["message"].as_str().unwrap().contains("extra"), "names the unknown field: {b}");
    let (st, b, _) = raw(a, "POST", "/v1/keys/k/encrypt", t, j, br#"{"plaintext": 5}"#.to_vec()).await;
    assert_eq!(st, 400);
    assert!(!b.to_string().contains('5') || b["error"]["message"].as_str().unwrap().contains("column"));
    let (st, b, _) = raw(a, "PUT", "/v1/secrets/data/x", t, j, br#"{"data":{"k":123456789}}"#.to_vec()).await;
    assert_eq!(st, 400);
    assert!(!b.to_string().contains("123456789"), "values are never echoed: {b}");
    let (st, _, _) = raw(a, "POST", "/v1/keys/k/encrypt", t, Some("text/plain"), br#"{"plaintext":""}"#.to_vec()).await;
    assert_eq!(st, 415);
    let (st, b, _) = raw(a, "POST", "/v1/keys/k/encrypt", t, j, br#"{"plaintext":"!!!"}"#.to_vec()).await;
    assert_eq!((st, b["error"]["message"].as_str().unwrap().contains("plaintext")), (400, true));
    let (st, _, _) = raw(a, "POST", "/v1/keys/k/encrypt", t, j, br#"{"plaintext":""#.to_vec()).await;
    assert_eq!(st, 400, "truncated body");
    let (st, _, _) = raw(a, "GET", "/v1/keys?bogus=1", t, None, vec![]).await;
    assert_eq!(st, 400, "unknown query parameter");

    // Oversize body.
    let mut big = br#"{"plaintext":""#.to_vec();
    big.extend(std::iter::repeat_n(b'A', 300 * 1024));
    big.extend(br#""}"#);
    let (st, b, _) = raw(a, "POST", "/v1/keys/k/encrypt", t, j, big).await;
    assert_eq!((st, b["error"]["code"].as_str()), (413, Some("payload_too_large")));

    // Unknown routes and methods get JSON errors too.
    let (st, b, _) = raw(a, "GET", "/v1/nope", t, None, vec![]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (404, Some("no_such_route")));
    let (st, b, _) = raw(a, "DELETE", "/v1/keys", t, None, vec![]).await;
    assert_eq!((st, b["error"]["code"].as_str()), (405, Some("method_not_allowed")));

    // Nothing above changed state.
    let keys = c.request(keyward_client::Method::GET, "/v1/keys", None).await.unwrap();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    let secrets = c.request(keyward_client::Method::GET, "/v1/secrets", None).await.unwrap();
    assert!(secrets["paths"].as_array().unwrap().is_empty(), "a failed request leaves no partial state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotation_while_encrypting() {
    let s = TestServer::start().await;
    let c = s.client();
    c.create_key("hot", "aes256-gcm", "", None).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8u8 {
        let (c, stop) = (c.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || out.len() < 5 {
                let pt = format!("w{w}-{i}").into_bytes();
                let ct = c.encrypt("hot", &pt, &BTreeMap::new()).await.expect("encrypt during rotation");
                out.push((pt, ct));
                i += 1;
            }
            out
        }));
    }
    let mut rotators = Vec::new();
    for _ in 0..3 {
        let c = c.clone();
        rotators.push(tokio::spawn(async move {
            for _ in 0..7 {
                c.key_action("hot", "rotate").await.expect("rotate");
            }
        }));
    }
    for r in rotators {
        r.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let k = c.describe_key("hot").await.unwrap();
    assert_eq!(k.current_version, 22, "21 concurrent rotations all landed");
    let mut versions = std::collections::BTreeSet::new();
    for w in workers {
        for (pt, ct) in w.await.unwrap() {
            let d = c.decrypt(&ct.ciphertext, &BTreeMap::new()).await.unwrap();
            assert_eq!(&d.plaintext[..], &pt[..]);
            versions.insert(ct.key_version);
        }
    }
    assert!(versions.len() > 1, "encryptions spanned several versions: {versions:?}");
}

#[tokio::test]
async fn restart_keeps_keys_versions_secrets_and_token() {
    let s = TestServer::start().await;
    let c = s.client();
    c.create_key("persist", "aes256-gcm", "", None).await.unwrap();
    let ct1 = c.encrypt("persist", b"v1 data", &BTreeMap::new()).await.unwrap();
    c.key_action("persist", "rotate").await.unwrap();
    c.create_key("signer", "ecdsa-p256", "", None).await.unwrap();
    let sig = sign(&c, "signer", b"m").await;
    c.put_secret("p/s", &ctx(&[("a", "1")]), None).await.unwrap();
    c.put_secret("p/s", &ctx(&[("a", "2")]), None).await.unwrap();
    let token = s.token.clone();

    let s = s.restart().await;
    assert_eq!(s.token, token, "root token file unchanged");
    let c = s.client();
    assert_eq!(&c.decrypt(&ct1.ciphertext, &BTreeMap::new()).await.unwrap().plaintext[..], b"v1 data");
    assert_eq!(c.describe_key("persist").await.unwrap().current_version, 2);
    assert!(verify(&c, "signer", b"m", &sig).await.unwrap());
    assert_eq!(c.get_secret("p/s", Some(1)).await.unwrap().data["a"].as_str(), "1");
    assert_eq!(c.get_secret("p/s", None).await.unwrap().version, 2);
}

#[tokio::test]
async fn secrets_and_key_material_are_not_stored_in_the_clear() {
    let s = TestServer::start().await;
    let c = s.client();
    let marker = "SECRET-MARKER-7f3a9c";
    c.put_secret("leak/check", &ctx(&[("value", marker)]), None).await.unwrap();
    c.create_key("leak", "hmac-sha256", "", None).await.unwrap();
    let data = s.dir.path().join("data");
    let mut all = Vec::new();
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_str().unwrap().starts_with("keyward.db") {
            all.extend(std::fs::read(&p).unwrap());
        }
    }
    assert!(!all.is_empty());
    assert!(!all.windows(marker.len()).any(|w| w == marker.as_bytes()), "secret value found in the database files");
    assert!(!all.windows(s.token.len()).any(|w| w == s.token.as_bytes()), "root token found in the database files");
}

/// Attack: another local user makes the data directory first (a dev server's quick start in a
/// shared place such as /tmp) with a root key of their own in it, to read the root token the
/// server would write there. The server refuses a data directory that is not its user's, or
/// that others may write, and a root key file that someone else owns.
#[tokio::test]
async fn a_data_directory_or_key_of_another_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = keyward_server::start(keyward_server::ServerConfig::dev("127.0.0.1:0".parse().unwrap(), theirs.clone()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("writable by nobody else"), "{e}");
    assert!(!theirs.join("root-token").exists() && !theirs.join("keyward.db").exists());

    // A key file of another user in a directory of ours (as root, the test can make one).
    if rustix::process::geteuid().is_root() {
        let mine = dir.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(mine.join("root-key.insecure"), [0u8; 32]).unwrap();
        std::fs::set_permissions(mine.join("root-key.insecure"), std::fs::Permissions::from_mode(0o600)).unwrap();
        rustix::fs::chown(mine.join("root-key.insecure"), Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
        let e = keyward_server::start(keyward_server::ServerConfig::dev("127.0.0.1:0".parse().unwrap(), mine))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("belongs to another user"), "{e}");
    }
}

#[tokio::test]
async fn aliases_name_keys_and_are_authorized_on_the_key_they_name() {
    use reqwest::Method;
    let s = TestServer::start().await;
    let root = s.client();
    for k in ["pay-2025", "pay-2026", "hr"] {
        root.create_key(k, "aes256-gcm", "", None).await.unwrap();
    }
    let v = root.request(Method::PUT, "/v1/aliases/pay", Some(&json!({"key": "pay-2025"}))).await.unwrap();
    assert_eq!((v["alias"].as_str(), v["previous"].is_null()), (Some("alias/pay"), true));
    let cx = ctx(&[("t", "1")]);
    let ct = root.encrypt("alias/pay", b"card", &cx).await.unwrap();
    assert_eq!((ct.key.as_str(), ct.key_version), ("pay-2025", 1), "an alias names its key");

    // A token allowed to use pay-* keys (and manage pay-2025 only).
    let rules = json!({"rules": [
        {"resources": ["keys/pay-*"], "operations": ["encrypt", "decrypt", "read"]},
        {"resources": ["keys/pay-2025"], "operations": ["admin"]}]});
    root.request(Method::PUT, "/v1/policies/pay", Some(&rules)).await.unwrap();
    let t = root.request(Method::POST, "/v1/auth/token/create", Some(&json!({"policies": ["pay"]}))).await.unwrap();
    let app = keyward_client::Client::builder(&s.addr).token(t["token"].as_str().unwrap()).build().unwrap();
    assert_eq!(app.encrypt("alias/pay", b"x", &cx).await.unwrap().key, "pay-2025");
    assert_eq!(app.describe_key("alias/pay").await.unwrap().name, "pay-2025");
    // Moving the alias needs admin on the key it names next: refused, and it stays.
    let e = app.request(Method::PUT, "/v1/aliases/pay", Some(&json!({"key": "pay-2026"}))).await.unwrap_err();
    assert_eq!(code(&e), (403, "permission_denied".into()));
    // Nor may it point an alias at a key it cannot manage.
    let e = app.request(Method::PUT, "/v1/aliases/other", Some(&json!({"key": "hr"}))).await.unwrap_err();
    assert_eq!(code(&e).0, 403);
    // Moved by root to hr: the application's grants on pay-* no longer reach through it.
    let v = root.request(Method::PUT, "/v1/aliases/pay", Some(&json!({"key": "hr"}))).await.unwrap();
    assert_eq!(v["previous"], "pay-2025");
    assert_eq!(code(&app.encrypt("alias/pay", b"x", &cx).await.unwrap_err()), (403, "permission_denied".into()));
    // An alias that names nothing is refused as a key the caller may not use (no oracle), and
    // said to be missing to a caller who may.
    assert_eq!(code(&app.encrypt("alias/none", b"x", &cx).await.unwrap_err()).0, 403);
    assert_eq!(code(&root.encrypt("alias/none", b"x", &cx).await.unwrap_err()), (404, "not_found".into()));
    // Old ciphertexts name their key, not the alias.
    assert_eq!(&root.decrypt(&ct.ciphertext, &cx).await.unwrap().plaintext[..], b"card");

    let list = root.request(Method::GET, "/v1/aliases", None).await.unwrap();
    assert_eq!(list["aliases"], json!([{"alias": "alias/pay", "key": "hr"}]));
    for bad in ["a/b", "-x", ""] {
        let path = format!("/v1/aliases/{}", bad.replace('/', "%2F"));
        assert!(root.request(Method::PUT, &path, Some(&json!({"key": "hr"}))).await.is_err(), "{bad}");
    }
    assert_eq!(
        code(&root.request(Method::PUT, "/v1/aliases/x", Some(&json!({"key": "nope"}))).await.unwrap_err()).0,
        404
    );
    // The description changes in place.
    let k =
        root.request(Method::PATCH, "/v1/keys/alias%2Fpay", Some(&json!({"description": "HR payroll"}))).await.unwrap();
    assert_eq!((k["name"].as_str(), k["description"].as_str()), (Some("hr"), Some("HR payroll")));
    let v = root.request(Method::DELETE, "/v1/aliases/pay", None).await.unwrap();
    assert_eq!(v["key"], "hr");
    assert_eq!(code(&root.encrypt("alias/pay", b"x", &cx).await.unwrap_err()).0, 404);
}
