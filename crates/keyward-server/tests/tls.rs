//! `keyward server` outside dev mode: HTTPS only, explicit insecure seal, and clients that trust
//! only the configured CA. Certificates are made by the `openssl` command (Debian `openssl`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keyward_server::tls::TlsFiles;
use keyward_server::{ServerConfig, start};

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is required for this test (apt-get install openssl)");
    assert!(st.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&st.stderr));
}

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=keyward test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
        .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

fn cfg(dir: &Path, tls: bool, seal: bool) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        dev: false,
        scheduler_interval: Duration::from_secs(3600),
        tls: tls.then(|| TlsFiles { cert: dir.join("server.pem"), key: dir.join("server.key") }),
        insecure_file_seal: seal,
        audit: Default::default(),
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
    sealed.shutdown().await.unwrap();
    let mut bad = cfg(dir.path(), true, true);
    bad.tls = Some(TlsFiles { cert: dir.path().join("ca.key"), key: dir.path().join("server.key") });
    assert!(start(bad).await.is_err(), "a key file is not a certificate");

    let running = start(cfg(dir.path(), true, true)).await.unwrap();
    assert!(running.tls);
    assert!(running.root_token_file.is_none(), "outside dev mode the root token is not written to disk");
    assert!(!dir.path().join("data/root-token").exists());
    let token = String::from_utf8(running.new_root_token.as_ref().unwrap().expose().to_vec()).unwrap();
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let addr = format!("https://{host}:{}", running.addr.port());
        let c = keyward_client::Client::builder(&addr).token(&token).ca_cert_pem(ca.clone()).build().unwrap();
        assert_eq!(c.health().await.unwrap()["status"], "ok");
        c.create_key(&format!("tls-{}", host.replace('.', "-")), "aes256-gcm", "", None).await.unwrap();
    }
    let https = format!("https://127.0.0.1:{}", running.addr.port());

    // A client that does not trust the CA refuses the server.
    let untrusting = keyward_client::Client::builder(&https).token(&token).build().unwrap();
    let e = untrusting.health().await.unwrap_err();
    assert!(matches!(e, keyward_client::Error::Transport { .. }), "{e}");
    // Plain HTTP to the HTTPS port gets nothing useful.
    let plain = keyward_client::Client::builder(format!("http://127.0.0.1:{}", running.addr.port()))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(plain.health().await.is_err());

    // Certificate reload: a new pair (signed by the same CA) is served without a restart; an
    // unusable pair is refused and the current certificate kept.
    assert!(served_subject(running.addr.port()).await.contains("localhost"));
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "new.key",
            "-out",
            "new.csr",
            "-subj",
            "/CN=reloaded",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "new.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "new.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    std::fs::rename(d.join("new.key"), d.join("server.key")).unwrap();
    std::fs::rename(d.join("new.pem"), d.join("server.pem")).unwrap();
    let mut waited = 0;
    while !served_subject(running.addr.port()).await.contains("reloaded") {
        assert!(waited < 100, "the new certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    let c = keyward_client::Client::builder(&https).token(&token).ca_cert_pem(ca.clone()).build().unwrap();
    assert_eq!(c.health().await.unwrap()["status"], "ok", "the reloaded certificate is trusted");
    std::fs::write(d.join("server.key"), "garbage").unwrap();
    tokio::time::sleep(keyward_server::run::TLS_RELOAD_POLL * 2).await;
    assert!(
        served_subject(running.addr.port()).await.contains("reloaded"),
        "a bad pair is refused, the last good one kept"
    );
    assert_eq!(c.health().await.unwrap()["status"], "ok");

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
