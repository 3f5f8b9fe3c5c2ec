//! Shared by the plugin's integration tests: a plugin served in this process, and a client
//! generated separately from the upstream proto (it shares no types with the plugin).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keyward_kms_plugin::{CallerPolicy, Kek, Plugin, PluginSettings, kek};
use tonic::transport::{Channel, Endpoint};

pub mod apiserver {
    //! The client half generated from `proto/k8s/kms/v2/api.proto`.
    #![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
    include!("../gen/kms_v2_client.rs");
}

pub use apiserver::key_management_service_client::KeyManagementServiceClient;

/// A plugin serving on a socket until dropped.
pub struct Served {
    pub socket: PathBuf,
    pub plugin: Arc<Plugin>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The uid of this test process.
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

pub fn settings() -> PluginSettings {
    PluginSettings { status_cache: Duration::from_millis(100), ..PluginSettings::default() }
}

/// Serve `kek` on `socket` (mode 0666), allowing `policy`.
pub async fn serve(kek: Kek, audit: Arc<keyward_audit::AuditLog>, socket: &Path, policy: CallerPolicy) -> Served {
    serve_with(kek, audit, socket, policy, settings()).await
}

pub async fn serve_with(
    kek: Kek,
    audit: Arc<keyward_audit::AuditLog>,
    socket: &Path,
    policy: CallerPolicy,
    settings: PluginSettings,
) -> Served {
    let plugin = Arc::new(Plugin::new(kek, audit, settings));
    let listener = keyward_kms_plugin::bind(socket, 0o666).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let p = plugin.clone();
    let task = tokio::spawn(async move {
        keyward_kms_plugin::serve(listener, p, policy, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Served { socket: socket.to_path_buf(), plugin, stop: Some(tx), task: Some(task) }
}

/// A local-mode plugin over the store in `dir`, allowing this process's uid.
pub async fn local(dir: &Path, socket: &Path) -> Served {
    let (l, audit) = kek::Local::open(dir, keyward_store::SqliteStore::open_shared, "k8s-secrets", None).await.unwrap();
    serve(Kek::Local(l), audit, socket, allow_me()).await
}

pub fn allow_me() -> CallerPolicy {
    CallerPolicy { uids: [my_uid()].into(), exe_sha256: vec![] }
}

/// Connect as kube-apiserver does: gRPC over the Unix socket, `:authority` localhost.
pub async fn connect(socket: &Path) -> KeyManagementServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://localhost")
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        }))
        .await
        .unwrap();
    KeyManagementServiceClient::new(channel)
}

pub async fn status(c: &mut KeyManagementServiceClient<Channel>) -> apiserver::StatusResponse {
    c.status(apiserver::StatusRequest {}).await.unwrap().into_inner()
}

pub async fn encrypt(c: &mut KeyManagementServiceClient<Channel>, seed: &[u8]) -> apiserver::EncryptResponse {
    c.encrypt(apiserver::EncryptRequest { plaintext: seed.to_vec(), uid: uuid() }).await.unwrap().into_inner()
}

pub async fn decrypt(
    c: &mut KeyManagementServiceClient<Channel>,
    e: &apiserver::EncryptResponse,
) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(apiserver::DecryptRequest {
        ciphertext: e.ciphertext.clone(),
        uid: uuid(),
        key_id: e.key_id.clone(),
        annotations: e.annotations.clone(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

/// A random per-request id, as the apiserver sends.
pub fn uuid() -> String {
    hex::encode(keyward_crypto::SecretBytes::random(16).unwrap().expose())
}

pub fn seed() -> Vec<u8> {
    keyward_crypto::SecretBytes::random(32).unwrap().expose().to_vec()
}

/// Poll Status (as the apiserver does after a rotation) until its key_id differs from `old`.
pub async fn wait_new_key_id(c: &mut KeyManagementServiceClient<Channel>, old: &str) -> String {
    for _ in 0..100 {
        let s = status(c).await;
        if s.healthz == "ok" && s.key_id != old {
            return s.key_id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("key_id never changed from {old}");
}

/// The records of the plugin's audit log in `dir`.
pub fn audit_records(dir: &Path) -> Vec<serde_json::Value> {
    keyward_test_support::audit_records(&dir.join("audit.log"))
}
