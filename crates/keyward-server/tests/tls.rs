//! `keyward server` outside dev mode: HTTPS only, explicit insecure seal, and clients that trust
//! only the configured CA. Certificates are made by the `openssl` command (Debian `openssl`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keyward_server::tls::TlsFiles;
use keyward_server::{ServerConfig, start};
use keyward_test_support::certs;

/// The server's certificate for 127.0.0.1 and localhost.
const SERVER_EXT: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n";

/// A CA (`ca.pem`) and a server certificate (`server.pem`, `server.key`) signed by it.
fn make_certs(dir: &Path) {
    certs::ca(dir, "ca", "keyward test CA");
    certs::signed(dir, "ca", "server", "/CN=localhost", SERVER_EXT);
}

fn cfg(dir: &Path, tls: bool, seal: bool) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        dev: false,
        scheduler_interval: Duration::from_secs(3600),
        tls: tls.then(|| TlsFiles { cert: dir.join("server.pem"), key: dir.join("server.key"), client_ca: None }),
        insecure_file_seal: seal,
        pkcs11: None,
        audit: Default::default(),
        storage: Default::default(),
        cluster: Default::default(),
        http: Default::default(),
        metrics_listen: None,
    }
}

#[tokio::test]
async fn server_mode_requires_tls_and_serves_https() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());

    let e = start(cfg(dir.path(), false, true)).await.unwrap_err();
    assert!(e.to_string().contains("--tls-cert"), "{e}");
    // Without the insecure file seal the server starts uninitialised and sealed.
    let sealed = start(cfg(dir.path(), true, false)).await.unwrap();
    assert_eq!(sealed.seal, "shamir");
    assert!(sealed.new_root_token.is_none());
    // Liveness stays 200 while sealed; readiness (`?ready=true`) is 503 so a Service skips it.
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let probe = keyward_client::Client::builder(format!("https://127.0.0.1:{}", sealed.addr.port()))
        .ca_cert_pem(ca.clone())
        .build()
        .unwrap();
    let h = probe.health().await.unwrap();
    assert_eq!((h.status.as_str(), h.ready), ("uninitialized", false), "{h:?}");
    let e = probe.request(reqwest::Method::GET, "/v1/health?ready=true", None).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    let e = probe.request(reqwest::Method::GET, "/v1/health?readyy=true", None).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "unknown parameters are refused: {e}");
    sealed.shutdown().await.unwrap();
    let mut bad = cfg(dir.path(), true, true);
    bad.tls = Some(TlsFiles { cert: dir.path().join("ca.key"), key: dir.path().join("server.key"), client_ca: None });
    assert!(start(bad).await.is_err(), "a key file is not a certificate");

    let running = start(cfg(dir.path(), true, true)).await.unwrap();
    assert!(running.tls);
    assert!(running.root_token_file.is_none(), "outside dev mode the root token is not written to disk");
    assert!(!dir.path().join("data/root-token").exists());
    let token = String::from_utf8(running.new_root_token.as_ref().unwrap().expose().to_vec()).unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let addr = format!("https://{host}:{}", running.addr.port());
        let c = keyward_client::Client::builder(&addr).token(&token).ca_cert_pem(ca.clone()).build().unwrap();
        assert_eq!(c.health().await.unwrap().status, "ok");
        assert_eq!(c.request(reqwest::Method::GET, "/v1/health?ready=true", None).await.unwrap()["ready"], true);
        c.create_key(&format!("tls-{}", host.replace('.', "-")), "aes256-gcm", "", None).await.unwrap();
    }
    let https = format!("https://127.0.0.1:{}", running.addr.port());

    // A client that does not trust the CA refuses the server.
    let untrusting = keyward_client::Client::builder(&https).token(&token).build().unwrap();
    let e = untrusting.health().await.unwrap_err();
    assert!(matches!(e, keyward_client::Error::Transport { .. }), "{e}");
    // ...and says what to do about it, in words.
    assert!(e.to_string().contains("set KEYWARD_CACERT (or --cacert) to the PEM file of that CA"), "{e}");
    // Plain HTTP to the HTTPS port gets nothing useful but the advice to use HTTPS.
    let plain = keyward_client::Client::builder(format!("http://127.0.0.1:{}", running.addr.port()))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let e = plain.health().await.unwrap_err();
    assert!(e.to_string().contains("the server speaks HTTPS: use an https:// address"), "{e}");

    // Certificate reload: a new pair (signed by the same CA) is served without a restart; an
    // unusable pair is refused and the current certificate kept.
    assert!(served_subject(running.addr.port()).await.contains("localhost"));
    let d = dir.path();
    certs::signed(d, "ca", "new", "/CN=reloaded", SERVER_EXT);
    std::fs::rename(d.join("new.key"), d.join("server.key")).unwrap();
    std::fs::rename(d.join("new.pem"), d.join("server.pem")).unwrap();
    let mut waited = 0;
    while !served_subject(running.addr.port()).await.contains("reloaded") {
        assert!(waited < 100, "the new certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    let c = keyward_client::Client::builder(&https).token(&token).ca_cert_pem(ca.clone()).build().unwrap();
    assert_eq!(c.health().await.unwrap().status, "ok", "the reloaded certificate is trusted");
    std::fs::write(d.join("server.key"), "garbage").unwrap();
    tokio::time::sleep(keyward_server::run::TLS_RELOAD_POLL * 2).await;
    assert!(
        served_subject(running.addr.port()).await.contains("reloaded"),
        "a bad pair is refused, the last good one kept"
    );
    assert_eq!(c.health().await.unwrap().status, "ok");

    running.shutdown().await.unwrap();
}

/// A client certificate `NAME.pem`/`NAME.key` with `subj` and `san`, signed by `ca`.
fn client_cert(dir: &Path, ca: &str, name: &str, subj: &str, san: &str) {
    let ext = format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n");
    certs::signed(dir, ca, name, subj, &ext);
}

#[tokio::test]
async fn client_certificates_are_identities() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    certs::ca(d, "clientca", "clientca");
    certs::ca(d, "rogueca", "rogueca");
    client_cert(d, "clientca", "billing", "/CN=billing/O=Bank", "URI:spiffe://bank/billing,DNS:billing.internal");
    client_cert(d, "clientca", "reports", "/CN=Reports Service", "DNS:reports.internal");
    client_cert(d, "rogueca", "rogue", "/CN=billing", "URI:spiffe://bank/billing");

    let mut c = cfg(d, true, true);
    c.tls.as_mut().unwrap().client_ca = Some(d.join("clientca.pem"));
    let running = start(c).await.unwrap();
    let https = format!("https://localhost:{}", running.addr.port());
    let ca = std::fs::read(d.join("ca.pem")).unwrap();
    let token = String::from_utf8(running.new_root_token.as_ref().unwrap().expose().to_vec()).unwrap();
    let root = keyward_client::Client::builder(&https).token(&token).ca_cert_pem(ca.clone()).build().unwrap();
    root.create_key("pay", "aes256-gcm", "", None).await.unwrap();
    root.request(
        reqwest::Method::PUT,
        "/v1/policies/billing-cert",
        Some(&serde_json::json!({
            "identities": [["cert:uri:spiffe://bank/billing", "cert:cn:billing"]],
            "rules": [
                {"resources": ["keys/pay"], "operations": ["encrypt"]},
                {"resources": ["keys/pay"], "operations": ["decrypt"], "require": ["cert:dns:payments.internal"]}
            ]
        })),
    )
    .await
    .unwrap();
    let as_cert = |name: &str| {
        let mut pem = std::fs::read(d.join(format!("{name}.key"))).unwrap();
        pem.extend(std::fs::read(d.join(format!("{name}.pem"))).unwrap());
        keyward_client::Client::builder(&https).ca_cert_pem(ca.clone()).client_identity_pem(pem).build().unwrap()
    };
    let ctx = Default::default();

    // The billing certificate gets the policy attached to its URI SAN and CN, nothing more.
    let billing = as_cert("billing");
    let ct = billing.encrypt("pay", b"card", &ctx).await.unwrap();
    let e = billing.decrypt(&ct.ciphertext, &ctx).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "decrypt requires a DNS SAN this certificate lacks: {e}");
    assert_eq!(root.decrypt(&ct.ciphertext, &ctx).await.unwrap().plaintext.as_slice(), b"card");
    let me = billing.request(reqwest::Method::GET, "/v1/auth/whoami", None).await.unwrap();
    assert_eq!(me["kind"], "certificate");
    assert_eq!(me["display_name"], "cert:billing");
    let sel: Vec<&str> = me["selectors"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for want in ["cert:cn:billing", "cert:dns:billing.internal", "cert:uri:spiffe://bank/billing"] {
        assert!(sel.contains(&want), "{want} in {sel:?}");
    }
    assert!(sel.iter().any(|s| s.starts_with("cert:sha256:")));
    assert_eq!(me["effective"][0]["policy"], "billing-cert");
    assert_eq!(me["effective"][0]["via"]["identity_set"], 0);
    assert_eq!(me["effective"][0]["grants"], serde_json::json!(["encrypt on keys/pay"]));
    let e = billing.request(reqwest::Method::POST, "/v1/auth/token/renew-self", Some(&serde_json::json!({}))).await;
    assert_eq!(e.unwrap_err().status(), Some(400), "a certificate has no token to renew");
    let e = billing
        .request(
            reqwest::Method::POST,
            "/v1/auth/token/create",
            Some(&serde_json::json!({"policies": ["billing-cert"]})),
        )
        .await;
    assert_eq!(e.unwrap_err().status(), Some(403), "a certificate cannot mint tokens");

    // Another valid certificate with no policy attached: denied. Its CN with a space is encoded.
    let reports = as_cert("reports");
    assert_eq!(reports.encrypt("pay", b"x", &ctx).await.unwrap_err().status(), Some(403));
    let me = reports.request(reqwest::Method::GET, "/v1/auth/whoami", None).await.unwrap();
    assert!(me["selectors"].as_array().unwrap().iter().any(|s| s == "cert:cn:Reports%20Service"), "{me}");
    assert_eq!(me["effective"], serde_json::json!([]));

    // Same names, signed by a CA the server does not trust: the handshake fails.
    let e = as_cert("rogue").encrypt("pay", b"x", &ctx).await.unwrap_err();
    assert!(matches!(e, keyward_client::Error::Transport { .. }), "{e}");
    // Neither token nor certificate: 401. A token still wins over a certificate.
    let anon = keyward_client::Client::builder(&https).ca_cert_pem(ca.clone()).build().unwrap();
    assert_eq!(anon.encrypt("pay", b"x", &ctx).await.unwrap_err().status(), Some(401));
    let mut pem = std::fs::read(d.join("billing.key")).unwrap();
    pem.extend(std::fs::read(d.join("billing.pem")).unwrap());
    let both = keyward_client::Client::builder(&https)
        .token(&token)
        .ca_cert_pem(ca.clone())
        .client_identity_pem(pem)
        .build()
        .unwrap();
    assert_eq!(
        both.decrypt(&ct.ciphertext, &ctx).await.unwrap().plaintext.as_slice(),
        b"card",
        "the root token is used"
    );

    // The dry run answers for selectors too.
    let v = root
        .request(
            reqwest::Method::POST,
            "/v1/sys/authorize",
            Some(&serde_json::json!({
                "selectors": ["cert:cn:billing", "cert:uri:spiffe://bank/billing", "cert:dns:payments.internal"],
                "operation": "decrypt", "resource": "keys/pay"
            })),
        )
        .await
        .unwrap();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["grant"], "policy billing-cert (identity set 0) rule 1");

    // Audit: the certificate identity and the denial reason are recorded.
    let log = std::fs::read_to_string(d.join("data/audit.log")).unwrap();
    let recs: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim_matches('\0').is_empty())
        .map(|l| serde_json::from_str(l.trim_matches('\0')).unwrap())
        .collect();
    let denied = recs
        .iter()
        .find(|r| r["operation"] == "decrypt" && r["identity"].as_str().unwrap_or("").starts_with("cert:billing ["))
        .expect("the certificate's denied decrypt is audited");
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert!(denied["reason"].as_str().unwrap().contains("no policy"), "{denied}");
    running.shutdown().await.unwrap();
}

/// The subject of the certificate the server presents, as `openssl s_client` sees it.
/// Runs on the blocking pool: the server under test shares this test's runtime.
async fn served_subject(port: u16) -> String {
    tokio::task::spawn_blocking(move || {
        let o = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl s_client runs");
        let out = String::from_utf8_lossy(&o.stdout);
        out.lines().find(|l| l.starts_with("subject=")).unwrap_or("").to_string()
    })
    .await
    .unwrap()
}
