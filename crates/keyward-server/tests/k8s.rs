//! Kubernetes ServiceAccount login against an issuer served over HTTPS (OIDC discovery + JWKS),
//! with tokens signed by the `openssl` command (RS256 and ES256), independently of the JWT
//! library Keyward verifies with. Covers the identity matrix of the trust-layer issue: two
//! ServiceAccounts in different namespaces, expired, wrong audience, unknown key, wrong issuer,
//! unbound, alg confusion, tampering, key rotation (refetch on unknown kid), and the audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use keyward_server::tls::{TlsFiles, TlsListener, server_config};
use keyward_test_support::server::{TestServer, raw};
use serde_json::{Value, json};

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is required for this test (apt-get install openssl)");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// A signing key made by openssl, with its JWK (kid = base64url(SHA-256(SPKI DER)), as the
/// Kubernetes API server computes it).
struct SigningKey {
    file: String,
    alg: &'static str,
    jwk: Value,
    kid: String,
}

fn make_key(dir: &Path, name: &str, ec: bool) -> SigningKey {
    let file = format!("{name}.pem");
    if ec {
        openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &file]);
    } else {
        openssl(dir, &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &file]);
    }
    let spki = openssl(dir, &["pkey", "-in", &file, "-pubout", "-outform", "DER"]);
    let kid = B64URL.encode(keyward_crypto::hash::sha256(&spki));
    let jwk = if ec {
        let point = &spki[spki.len() - 65..];
        assert_eq!(point[0], 4, "uncompressed point");
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
               "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..])})
    } else {
        let out = String::from_utf8(openssl(dir, &["rsa", "-in", &file, "-noout", "-modulus"])).unwrap();
        let n = hex::decode(out.trim().strip_prefix("Modulus=").unwrap()).unwrap();
        json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": B64URL.encode(n), "e": "AQAB"})
    };
    SigningKey { file, alg: if ec { "ES256" } else { "RS256" }, jwk, kid }
}

/// DER ECDSA-Sig-Value → the 64-byte r||s of JWS.
fn der_to_jose(der: &[u8]) -> Vec<u8> {
    fn int(b: &[u8]) -> (&[u8], &[u8]) {
        assert_eq!(b[0], 2);
        let len = b[1] as usize;
        (&b[2..2 + len], &b[2 + len..])
    }
    assert_eq!(der[0], 0x30);
    let body = &der[2..];
    let (r, rest) = int(body);
    let (s, _) = int(rest);
    let mut out = Vec::new();
    for v in [r, s] {
        let v = &v[v.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0, 32 - v.len()));
        out.extend_from_slice(v);
    }
    out
}

fn sign_with(dir: &Path, key: &SigningKey, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()));
    let msg = dir.join("msg");
    std::fs::write(&msg, &input).unwrap();
    let sig = openssl(dir, &["dgst", "-sha256", "-sign", &key.file, "msg"]);
    let sig = if key.alg == "ES256" { der_to_jose(&sig) } else { sig };
    format!("{input}.{}", B64URL.encode(sig))
}

fn now() -> i64 {
    keyward_core::now_unix()
}

fn claims(iss: &str, aud: &str, ns: &str, sa: &str, pod: bool, exp: i64) -> Value {
    let mut k8s = json!({"namespace": ns, "serviceaccount": {"name": sa, "uid": "sa-uid-1"}});
    if pod {
        k8s["pod"] = json!({"name": format!("{sa}-0"), "uid": "pod-uid-1"});
        k8s["node"] = json!({"name": "node-1", "uid": "node-uid-1"});
    }
    json!({"iss": iss, "aud": [aud], "sub": format!("system:serviceaccount:{ns}:{sa}"),
           "iat": now() - 10, "nbf": now() - 10, "exp": exp, "jti": "0b1e", "kubernetes.io": k8s})
}

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

/// Node agents join with their projected ServiceAccount token instead of a join token: the node
/// comes from the token's pod binding, and the ServiceAccount needs `join` on `agents/NODE`.
#[tokio::test]
async fn agents_join_with_service_account_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = make_key(d, "ec", true);
    let iss = "https://kubernetes.default.svc.cluster.local";
    let srv = TestServer::start().await;
    let call = |m: &'static str, p: &str, t: Option<&str>, b: Value| {
        let (addr, p, t) = (srv.addr.clone(), p.to_string(), t.map(str::to_string));
        async move { raw(&addr, m, &p, t.as_deref(), Some("application/json"), serde_json::to_vec(&b).unwrap()).await }
    };
    let root = Some(srv.token.as_str());
    let jwks = json!({"keys": [ec.jwk]}).to_string();
    let (st, v, _) =
        call("PUT", "/v1/auth/kubernetes/config", root, json!({"issuer": iss, "audience": "keyward", "jwks": jwks}))
            .await;
    assert_eq!(st, 200, "{v}");
    let pol = json!({"rules": [{"resources": ["agents/*"], "operations": ["join"]}]});
    assert_eq!(call("PUT", "/v1/policies/agents", root, pol).await.0, 200);
    let role =
        json!({"bound_namespaces": ["keyward"], "bound_service_accounts": ["*"], "policies": ["agents"], "ttl": "10m"});
    assert_eq!(call("PUT", "/v1/auth/kubernetes/roles/agent", root, role).await.0, 200);
    // The ServiceAccount `other` in `keyward` logs in on the same role but its grant is
    // narrowed by a rule that requires the agent's ServiceAccount.
    let pol = json!({"rules": [{"resources": ["agents/*"], "operations": ["join"], "require": ["k8s-jwt:sa:agent"]}]});
    assert_eq!(call("PUT", "/v1/policies/agents", root, pol).await.0, 200);

    let pk = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let hdr = json!({"alg": ec.alg, "kid": ec.kid, "typ": "JWT"});
    let join = |jwt: String| {
        call(
            "POST",
            "/v1/auth/agent/join",
            None,
            json!({"kubernetes": {"role": "agent", "jwt": jwt}, "public_key": pk}),
        )
    };

    // The agent's pod-bound token on node-1: joined as node-1.
    let good = sign_with(d, &ec, &hdr, &claims(iss, "keyward", "keyward", "agent", true, now() + 600));
    let (st, v, _) = join(good.clone()).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["node"], "node-1");
    // Its token is for agent work only: nonces yes, the ordinary API (even whoami) no.
    let (st, _, _) = call("POST", "/v1/agent/nonce", v["token"].as_str(), json!({"count": 1})).await;
    assert_eq!(st, 200);
    let (st, who, _) = call("GET", "/v1/auth/whoami", v["token"].as_str(), Value::Null).await;
    assert_eq!(st, 403, "{who}");
    assert!(who.to_string().contains("agent routes"), "{who}");
    // Unlike a join token, the same ServiceAccount token can join again (an agent restart),
    // here through the agent's own client.
    use keyward_agent::upstream::{JoinCredential, Upstream, UpstreamConfig};
    let cfg = UpstreamConfig {
        addr: srv.addr.clone(),
        ca_pem: None,
        join: JoinCredential::Kubernetes { role: "agent".into(), jwt: good.clone().into() },
    };
    let up = Upstream::join(&cfg).await.unwrap();
    assert_eq!(up.node(), "node-1");
    assert_eq!(join(good.clone()).await.0, 201);

    // Joining again by itself: the token is read from its file at every join. A renewal
    // renews; once the agent token is revoked, the next round joins again with a new key (the
    // kubelet has meanwhile refreshed the projected token in the file), and it works.
    use keyward_agent::upstream::Renewal;
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("keyward");
    std::fs::write(&token_file, &good).unwrap();
    let cfg = UpstreamConfig {
        addr: srv.addr.clone(),
        ca_pem: None,
        join: JoinCredential::KubernetesFile { role: "agent".into(), path: token_file.clone() },
    };
    let up = std::sync::Arc::new(Upstream::join(&cfg).await.unwrap());
    let first = up.accessor();
    assert_eq!(up.renew_once().await.unwrap(), Renewal::Renewed);
    up.nonce().await.unwrap();
    let refreshed = sign_with(d, &ec, &hdr, &claims(iss, "keyward", "keyward", "agent", true, now() + 900));
    std::fs::write(&token_file, &refreshed).unwrap();
    assert_eq!(call("POST", "/v1/auth/token/revoke", root, json!({"accessor": first})).await.0, 200);
    assert_eq!(up.renew_once().await.unwrap(), Renewal::Rejoined);
    assert_ne!(up.accessor(), first);
    assert_eq!(up.node(), "node-1");
    up.nonce().await.expect("the new agent token gets nonces");
    assert_eq!(up.renew_once().await.unwrap(), Renewal::Renewed);
    // An unreadable token file is named, and the agent keeps its working token.
    std::fs::remove_file(&token_file).unwrap();
    let second = up.accessor();
    assert_eq!(call("POST", "/v1/auth/token/revoke", root, json!({"accessor": second})).await.0, 200);
    let e = up.renew_once().await.unwrap_err();
    assert!(e.to_string().contains("reading the ServiceAccount token"), "{e}");
    // A single-use join token cannot be presented again: the refusal is reported as is.
    let jt = call("POST", "/v1/auth/agent/join-token", root, json!({"node": "node-9"})).await.1;
    let once = Upstream::join(&UpstreamConfig {
        addr: srv.addr.clone(),
        ca_pem: None,
        join: JoinCredential::Token(jt["join_token"].as_str().unwrap().to_string().into()),
    })
    .await
    .unwrap();
    assert_eq!(call("POST", "/v1/auth/token/revoke", root, json!({"accessor": once.accessor()})).await.0, 200);
    assert_eq!(once.renew_once().await.unwrap_err().status(), Some(401));

    // Not bound to a pod, so no node: refused, even on a role that accepts unbound tokens.
    let role = json!({"bound_namespaces": ["keyward"], "bound_service_accounts": ["agent"], "policies": ["agents"],
                      "ttl": "10m", "allow_unbound_tokens": true});
    assert_eq!(call("PUT", "/v1/auth/kubernetes/roles/agent-unbound", root, role).await.0, 200);
    let unbound = sign_with(d, &ec, &hdr, &claims(iss, "keyward", "keyward", "agent", false, now() + 600));
    let (st, v, _) = call(
        "POST",
        "/v1/auth/agent/join",
        None,
        json!({"kubernetes": {"role": "agent-unbound", "jwt": unbound.clone()}, "public_key": pk}),
    )
    .await;
    assert_eq!(st, 401, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("names no node"), "{v}");
    assert_eq!(join(unbound).await.0, 403, "the agent role wants pod-bound tokens");
    // Another ServiceAccount without the grant: 403.
    let other = sign_with(d, &ec, &hdr, &claims(iss, "keyward", "keyward", "other", true, now() + 600));
    let (st, v, _) = join(other).await;
    assert_eq!(st, 403, "{v}");
    // Expired: 401.
    let old = sign_with(d, &ec, &hdr, &claims(iss, "keyward", "keyward", "agent", true, now() - 600));
    assert_eq!(join(old).await.0, 401);
    // Both or neither credential: 400.
    let (st, _, _) = call("POST", "/v1/auth/agent/join", None, json!({"public_key": pk})).await;
    assert_eq!(st, 400);
}
