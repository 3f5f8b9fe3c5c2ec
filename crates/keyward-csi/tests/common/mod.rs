//! Shared by the provider's tests: a `keyward dev` server with Kubernetes auth configured for a
//! test issuer (ES256 key made here), ServiceAccount tokens minted for pods, the provider served
//! on a socket, and a client generated separately from the upstream proto.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use keyward_client::{Client, Method};
use keyward_csi::{Provider, ProviderConfig};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

pub mod driver {
    //! The client half generated from `proto/secrets-store/v1alpha1/service.proto`.
    #![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
    include!("../gen/csi_client.rs");
}

pub use driver::csi_driver_provider_client::CsiDriverProviderClient;

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "keyward";

/// A dev server with Kubernetes auth, policies, roles and secrets for two namespaces.
pub struct World {
    pub running: keyward_test_support::server::Running,
    pub addr: String,
    pub admin: Client,
    pub issuer_key: EcdsaKeyPair,
    pub kid: String,
    pub data_key_ciphertext: String,
}

pub async fn world(dir: &Path) -> World {
    let running = keyward_test_support::server::dev_server(&dir.join("server"), "127.0.0.1:0").await;
    let addr = format!("http://{}", running.addr);
    let root = std::fs::read_to_string(running.root_token_file.as_ref().unwrap()).unwrap();
    let admin = Client::builder(addr.clone()).token(root.trim()).build().unwrap();

    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
    let issuer_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = issuer_key.public_key().as_ref().to_vec();
    let kid = "test-issuer-1".to_string();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..])}]});
    let put = |path: &str, body: Value| {
        let admin = admin.clone();
        let path = path.to_string();
        async move { admin.request(Method::PUT, &path, Some(&body)).await.unwrap() }
    };
    put("/v1/auth/kubernetes/config", json!({"issuer": ISSUER, "audience": AUDIENCE, "jwks": jwks.to_string()})).await;
    for (ns, sa) in [("payments", "api"), ("team-b", "worker")] {
        put(
            &format!("/v1/policies/{ns}-app"),
            json!({"rules": [
                {"resources": [format!("secrets/{ns}/*")], "operations": ["read"]},
                {"resources": [format!("keys/{ns}")], "operations": ["decrypt"]}
            ]}),
        )
        .await;
        put(
            &format!("/v1/auth/kubernetes/roles/{ns}"),
            json!({"bound_namespaces": [ns], "bound_service_accounts": [sa], "policies": [format!("{ns}-app")], "ttl": "10m"}),
        )
        .await;
    }
    put_secret(&admin, "payments/db", &[("user", "app"), ("password", "hunter2")]).await;
    put_secret(&admin, "team-b/db", &[("password", "other")]).await;
    admin.create_key("payments", "aes256-gcm", "", None).await.unwrap();
    let ctx = [("tenant".to_string(), "a".to_string())].into();
    let dk = admin.generate_data_key("payments", &ctx, None, false).await.unwrap();
    World { running, addr, admin, issuer_key, kid, data_key_ciphertext: B64.encode(&dk.ciphertext) }
}

pub async fn put_secret(admin: &Client, path: &str, fields: &[(&str, &str)]) -> u32 {
    let data = fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    admin.put_secret(path, &data, None).await.unwrap()
}

impl World {
    /// A projected ServiceAccount token for a pod, as kubelet requests it for the CSI driver.
    pub fn pod_token(&self, ns: &str, sa: &str, pod: &str, uid: &str) -> String {
        let now = keyward_core::now_unix();
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let claims = json!({"iss": ISSUER, "aud": [AUDIENCE], "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now, "nbf": now, "exp": now + 600,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "sa-uid"},
                              "pod": {"name": pod, "uid": uid}, "node": {"name": "node-1", "uid": "node-uid"}}});
        let input = format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()));
        let sig = self.issuer_key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", B64URL.encode(sig.as_ref()))
    }

    /// Mount attributes exactly as the driver builds them: SecretProviderClass parameters, then
    /// the pod's volume context, then the tokens as a JSON string inside the JSON.
    pub fn attributes(&self, ns: &str, sa: &str, pod: &str, uid: &str, role: &str, objects: &str) -> String {
        let tokens = json!({AUDIENCE: {"token": self.pod_token(ns, sa, pod, uid), "expirationTimestamp": "2030-01-01T00:00:00Z"}});
        json!({
            "role": role,
            "objects": objects,
            "secretProviderClass": format!("{ns}-secrets"),
            "csi.storage.k8s.io/pod.name": pod,
            "csi.storage.k8s.io/pod.namespace": ns,
            "csi.storage.k8s.io/pod.uid": uid,
            "csi.storage.k8s.io/serviceAccount.name": sa,
            "csi.storage.k8s.io/ephemeral": "false",
            "providerName": "keyward",
            "csi.storage.k8s.io/serviceAccount.tokens": tokens.to_string(),
        })
        .to_string()
    }

    /// The server's audit records.
    pub fn server_audit(&self, dir: &Path) -> Vec<Value> {
        read_audit(&dir.join("server/audit.log"))
    }
}

pub fn read_audit(path: &Path) -> Vec<Value> {
    keyward_test_support::audit_records(path)
}

/// Serve a provider for `addr` in `dir` (socket `dir/keyward.sock`, audit `dir/audit.log`).
pub async fn provider(dir: &Path, addr: &str) -> (Arc<Provider>, tokio::task::JoinHandle<()>) {
    std::fs::create_dir_all(dir).unwrap();
    let key = keyward_crypto::SecretBytes::random(32).unwrap();
    let audit = keyward_audit::AuditLog::open(
        keyward_audit::AuditConfig {
            file: dir.join("audit.log"),
            stdout: false,
            max_file_bytes: 1 << 30,
            server: None,
        },
        key,
    )
    .unwrap();
    let cfg = ProviderConfig {
        addr: addr.to_string(),
        allowed_addresses: vec![],
        audience: AUDIENCE.into(),
        ca_pem: None,
        timeout: Duration::from_secs(5),
        allow_secret_tokens: false,
    };
    let p = Arc::new(Provider::new(cfg, Arc::new(audit)));
    let listener = keyward_csi::bind(dir).unwrap();
    let p2 = p.clone();
    let task = tokio::spawn(async move { keyward_csi::serve(listener, p2, std::future::pending()).await.unwrap() });
    (p, task)
}

/// Connect as the driver does: insecure gRPC on the Unix socket, authority localhost.
pub async fn connect(socket: &Path) -> CsiDriverProviderClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        }))
        .await
        .unwrap();
    CsiDriverProviderClient::new(channel).max_decoding_message_size(4 * 1024 * 1024)
}

/// A Mount as the driver sends it (permission "420", secrets "{}").
pub fn mount_request(attributes: String) -> driver::MountRequest {
    driver::MountRequest {
        attributes,
        secrets: "{}".into(),
        target_path: "/var/lib/kubelet/pods/0b1e/volumes/kubernetes.io~csi/secrets/mount".into(),
        permission: "420".into(),
        current_object_version: vec![],
    }
}
