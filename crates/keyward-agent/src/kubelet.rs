//! Kubernetes selectors from the kubelet's pod list.
//!
//! The cgroup gives a caller's container id (and usually its pod UID); the kubelet's
//! `GET /pods` (authenticated, over HTTPS verified against a CA) says which pod and container
//! that is: namespace, ServiceAccount, pod name and labels, container name, image and image
//! digest. A container that just started may not be listed yet, so the lookup polls (SPIRE's
//! defaults: 60 attempts, 500 ms apart). A container the kubelet never lists is refused: the
//! agent does not guess.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyward_core::policy::selector_value;
use serde::Deserialize;

/// Largest pod list accepted (a node runs at most a few hundred pods).
const MAX_POD_LIST: usize = 32 * 1024 * 1024;
/// A fetched pod list is reused this long before a miss refetches it.
const MIN_REFRESH: Duration = Duration::from_millis(250);

/// Where the kubelet is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Base URL, e.g. `https://NODE_IP:10250`.
    pub url: String,
    /// Bearer token file (the agent's ServiceAccount token), read on every fetch so rotations
    /// are picked up.
    pub token_file: PathBuf,
    /// PEM CA that signed the kubelet's serving certificate.
    pub ca_pem: Vec<u8>,
    /// Lookups of a container that is not listed yet.
    pub poll_attempts: u32,
    /// Time between those lookups.
    pub poll_interval: Duration,
}

/// Why the kubelet could not name a container.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeletError {
    /// The client could not be built (bad CA).
    #[error("kubelet client: {0}")]
    Config(String),
    /// The kubelet could not be asked.
    #[error("kubelet pod list: {0}")]
    Fetch(String),
    /// The container is not in the pod list.
    #[error("container {0} is not in the kubelet's pod list")]
    NotFound(String),
    /// The cgroup and the kubelet disagree about the pod.
    #[error("the kubelet puts container {0} in another pod than its cgroup says")]
    PodMismatch(String),
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    namespace: String,
    uid: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    service_account_name: String,
    #[serde(default)]
    node_name: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Status {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    name: String,
    #[serde(default, rename = "containerID")]
    container_id: String,
    #[serde(default)]
    image: String,
    #[serde(default, rename = "imageID")]
    image_id: String,
}

/// The kubelet client, with the last pod list.
pub struct Kubelet {
    cfg: KubeletConfig,
    http: reqwest::Client,
    last: Mutex<Option<(Instant, std::sync::Arc<PodList>)>>,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet").field("url", &self.cfg.url).finish_non_exhaustive()
    }
}

/// Selectors for the container `id` of `pod`, in the format of the login selectors.
fn selectors_of(pod: &Pod, c: &ContainerStatus) -> Vec<String> {
    let v = |s: &str| selector_value(s.as_bytes());
    let m = &pod.metadata;
    let mut out = vec![
        format!("k8s:ns:{}", v(&m.namespace)),
        format!("k8s:pod-name:{}", v(&m.name)),
        format!("k8s:pod-uid:{}", v(&m.uid)),
        format!("k8s:container-name:{}", v(&c.name)),
    ];
    if !pod.spec.service_account_name.is_empty() {
        out.push(format!("k8s:sa:{}", v(&pod.spec.service_account_name)));
    }
    if !pod.spec.node_name.is_empty() {
        out.push(format!("k8s:node-name:{}", v(&pod.spec.node_name)));
    }
    for (k, val) in &m.labels {
        out.push(format!("k8s:pod-label:{}:{}", v(k), v(val)));
    }
    // The image as written in the pod spec, and the digest the runtime resolved it to
    // (`docker-pullable://repo@sha256:…` on some runtimes: the scheme is dropped).
    for img in [&c.image, &c.image_id] {
        let img = img.split_once("://").map_or(img.as_str(), |(_, rest)| rest);
        if !img.is_empty() {
            out.push(format!("k8s:container-image:{}", v(img)));
        }
    }
    out.retain(|s| keyward_core::policy::selector_ok(s));
    out.sort();
    out.dedup();
    out
}

fn find(list: &PodList, container_id: &str, pod_uid: Option<&str>) -> Option<Result<Vec<String>, KubeletError>> {
    for pod in &list.items {
        let s = &pod.status;
        let all = s.container_statuses.iter().chain(&s.init_container_statuses).chain(&s.ephemeral_container_statuses);
        for c in all {
            // `containerd://ID`, `cri-o://ID`, `docker://ID`
            let id = c.container_id.split_once("://").map_or(c.container_id.as_str(), |(_, id)| id);
            if id == container_id {
                if pod_uid.is_some_and(|u| u != pod.metadata.uid) {
                    return Some(Err(KubeletError::PodMismatch(container_id.to_string())));
                }
                return Some(Ok(selectors_of(pod, c)));
            }
        }
    }
    None
}

/// An error with its causes ("error sending request" alone does not say a certificate failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

impl Kubelet {
    /// A client for the kubelet at `cfg.url`.
    pub fn new(cfg: KubeletConfig) -> Result<Self, KubeletError> {
        let ca = reqwest::Certificate::from_pem(&cfg.ca_pem).map_err(|e| KubeletError::Config(format!("CA: {e}")))?;
        let http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| KubeletError::Config(e.to_string()))?;
        Ok(Self { cfg, http, last: Mutex::new(None) })
    }

    async fn fetch(&self) -> Result<std::sync::Arc<PodList>, KubeletError> {
        let token = zeroize::Zeroizing::new(
            std::fs::read_to_string(&self.cfg.token_file)
                .map_err(|e| KubeletError::Fetch(format!("reading {}: {e}", self.cfg.token_file.display())))?,
        );
        let url = format!("{}/pods", self.cfg.url.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token.trim())
            .send()
            .await
            .map_err(|e| KubeletError::Fetch(error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(KubeletError::Fetch(format!("{url} answered {status}")));
        }
        if resp.content_length().is_some_and(|l| l > MAX_POD_LIST as u64) {
            return Err(KubeletError::Fetch("pod list too large".into()));
        }
        let bytes = resp.bytes().await.map_err(|e| KubeletError::Fetch(e.to_string()))?;
        if bytes.len() > MAX_POD_LIST {
            return Err(KubeletError::Fetch("pod list too large".into()));
        }
        let list: PodList =
            serde_json::from_slice(&bytes).map_err(|e| KubeletError::Fetch(format!("not a PodList: {e}")))?;
        let list = std::sync::Arc::new(list);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Instant::now(), list.clone()));
        }
        Ok(list)
    }

    /// The `k8s:` selectors of a container, polling while it is not listed yet.
    pub async fn selectors(&self, container_id: &str, pod_uid: Option<&str>) -> Result<Vec<String>, KubeletError> {
        let cached = self.last.lock().ok().and_then(|l| l.clone());
        if let Some((_, list)) = &cached
            && let Some(r) = find(list, container_id, pod_uid)
        {
            return r;
        }
        let mut attempts = 0;
        loop {
            let fresh = cached.as_ref().is_some_and(|(at, _)| at.elapsed() < MIN_REFRESH) && attempts == 0;
            if !fresh {
                let list = self.fetch().await?;
                if let Some(r) = find(&list, container_id, pod_uid) {
                    return r;
                }
            }
            attempts += 1;
            if attempts >= self.cfg.poll_attempts.max(1) {
                return Err(KubeletError::NotFound(container_id.to_string()));
            }
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
    }
}

/// Parse a pod list from untrusted bytes and look a container up in it (fuzzing and property
/// tests): never a panic; every selector produced is well formed.
#[doc(hidden)]
pub fn parse_pod_list(data: &[u8], container_id: &str) -> usize {
    let Ok(list) = serde_json::from_slice::<PodList>(data) else { return 0 };
    match find(&list, container_id, None) {
        Some(Ok(sel)) => {
            assert!(sel.iter().all(|s| keyward_core::policy::selector_ok(s)));
            sel.len()
        }
        _ => 0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn list() -> PodList {
        serde_json::from_value(serde_json::json!({"kind": "PodList", "items": [{
            "metadata": {"name": "api-7d9", "namespace": "payments", "uid": "2c48913c-b29f-11e7-9350-020968147796",
                         "labels": {"app": "payments", "app.kubernetes.io/version": "1.2 beta"}},
            "spec": {"serviceAccountName": "api", "nodeName": "node-a"},
            "status": {
                "initContainerStatuses": [{"name": "init", "containerID": "containerd://aaaa", "image": "busybox", "imageID": ""}],
                "containerStatuses": [{"name": "api", "containerID": format!("containerd://{CID}"),
                    "image": "registry.example/payments/api:1.2",
                    "imageID": "docker-pullable://registry.example/payments/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}]
            }
        }]}))
        .unwrap()
    }

    proptest::proptest! {
        #[test]
        fn pod_lists_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_pod_list(&bytes, "x");
        }

        #[test]
        fn odd_names_give_valid_selectors(name in "\\PC{0,24}", label in "\\PC{0,24}", image in "\\PC{0,24}") {
            let v = serde_json::json!({"items": [{
                "metadata": {"name": name, "namespace": name, "uid": "u", "labels": {label.clone(): label}},
                "spec": {"serviceAccountName": name},
                "status": {"containerStatuses": [{"name": name, "containerID": "containerd://c", "image": image, "imageID": image}]}
            }]});
            let _ = parse_pod_list(v.to_string().as_bytes(), "c");
        }
    }

    #[test]
    fn container_to_selectors() {
        let s = find(&list(), CID, Some("2c48913c-b29f-11e7-9350-020968147796")).unwrap().unwrap();
        for want in [
            "k8s:ns:payments",
            "k8s:sa:api",
            "k8s:pod-name:api-7d9",
            "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796",
            "k8s:node-name:node-a",
            "k8s:container-name:api",
            "k8s:pod-label:app:payments",
            "k8s:pod-label:app.kubernetes.io/version:1.2%20beta",
            "k8s:container-image:registry.example/payments/api:1.2",
            "k8s:container-image:registry.example/payments/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(s.contains(&want.to_string()), "{want} missing from {s:?}");
        }
        // init containers are found too
        assert!(find(&list(), "aaaa", None).unwrap().unwrap().contains(&"k8s:container-name:init".to_string()));
        // unknown container, or a pod UID that disagrees with the cgroup
        assert!(find(&list(), "bbbb", None).is_none());
        assert!(matches!(
            find(&list(), CID, Some("00000000-0000-0000-0000-000000000000")),
            Some(Err(KubeletError::PodMismatch(_)))
        ));
    }
}
