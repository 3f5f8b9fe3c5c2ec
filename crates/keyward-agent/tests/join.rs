//! An agent joins with its pod-bound ServiceAccount token (no join token), through its own
//! upstream client against a real server: it joins again after a restart, re-reads the
//! projected token at every join, rejoins with a new key when its agent token is revoked, and
//! tokens that are unbound, of another ServiceAccount or expired are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use keyward_test_support::k8s::{claims, make_key, now, sign_with};
use keyward_test_support::server::{TestServer, raw};
use serde_json::{Value, json};

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
