//! A real Kubernetes control plane for tests: etcd and kube-apiserver built from their Go modules
//! at the versions `tests/k8s/go.mod` pins (by `scripts/k8s-binaries`, once), a PKI made by
//! openssl, a ServiceAccount signing key, and the API server on loopback, optionally encrypting
//! Secrets with a KMS v2 plugin. `kubectl` of the same release talks to it with an admin
//! certificate; `etcdctl` (Debian `etcd-client`) reads what the API server stored.
//!
//! Every process is killed when the [`ControlPlane`] is dropped. A missing binary fails the test
//! loudly with what to install.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{certs, free_port};

/// The directory holding `kube-apiserver`, `kubectl` and `etcd`, built on first use by
/// `scripts/k8s-binaries` (about 10 minutes on 2 cores; cached under `target/k8s/`).
pub fn binaries() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(repo.join("scripts/k8s-binaries"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/k8s-binaries builds kube-apiserver, kubectl and etcd; it needs bash and go");
    assert!(
        out.status.success(),
        "scripts/k8s-binaries failed: see its output above (it needs Go and the Go module proxy)"
    );
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().expect("a directory").trim());
    for b in ["kube-apiserver", "kubectl", "etcd"] {
        assert!(dir.join(b).is_file(), "{} is missing: run scripts/k8s-binaries", dir.join(b).display());
    }
    dir
}

/// How the API server encrypts Secrets.
#[derive(Debug, Clone)]
pub enum Encryption {
    /// Not at all (Secrets are stored as they are).
    None,
    /// With a KMS v2 provider named `name` at the Unix socket `socket`, then `identity` (to read
    /// what was written before).
    KmsV2 { name: String, socket: PathBuf },
}

/// etcd and kube-apiserver, running until dropped.
pub struct ControlPlane {
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`, the API server (also the ServiceAccount token issuer).
    pub url: String,
    /// `http://127.0.0.1:PORT`, etcd's client URL.
    pub etcd_url: String,
    /// A kubeconfig with the admin certificate (group `system:masters`).
    pub kubeconfig: PathBuf,
    /// The CA that signed the API server's certificate (PEM).
    pub ca: PathBuf,
    bin: PathBuf,
    etcd: Child,
    apiserver: Option<Child>,
    args: Vec<String>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}

impl ControlPlane {
    /// Start etcd and the API server in `dir` and wait until `/readyz` answers ok.
    pub fn start(dir: &Path, encryption: &Encryption) -> Self {
        let bin = binaries();
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let (etcd, etcd_url) = start_etcd(&bin, &dir);
        pki(&dir);
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(&kubeconfig, admin_kubeconfig(&dir, &url)).unwrap();
        let mut args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // No kubernetes Service endpoint for a loopback address (nothing in-cluster calls it).
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", dir.join("apiserver.pem").display()),
            format!("--tls-private-key-file={}", dir.join("apiserver.key").display()),
            format!("--client-ca-file={}", dir.join("ca.pem").display()),
            format!("--service-account-issuer={url}"),
            format!("--service-account-key-file={}", dir.join("sa.pub").display()),
            format!("--service-account-signing-key-file={}", dir.join("sa.key").display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=RBAC".into(),
            format!("--cert-dir={}", dir.join("certs").display()),
            "--profiling=false".into(),
        ];
        if let Encryption::KmsV2 { name, socket } = encryption {
            let config = dir.join("encryption.yaml");
            std::fs::write(&config, encryption_config(name, socket)).unwrap();
            args.push(format!("--encryption-provider-config={}", config.display()));
        }
        let ca = dir.join("ca.pem");
        let mut cp = Self { dir, url, etcd_url, kubeconfig, ca, bin, etcd, apiserver: None, args };
        cp.start_apiserver();
        cp
    }

    /// Start the API server (again) with the same arguments, and wait until it is ready.
    pub fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "the API server is running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("apiserver.log")).unwrap();
        let child = Command::new(self.bin.join("kube-apiserver"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kube-apiserver");
        self.apiserver = Some(child);
        self.wait_ready(Duration::from_secs(120));
    }

    /// Stop the API server (SIGKILL, as a crash would).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.apiserver.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("kube-apiserver exited ({st}):\n{}", self.log_tail());
            }
            let o = self.kubectl(&["--request-timeout=5s", "get", "--raw", "/readyz"]);
            if o.status.success() && o.stdout.starts_with(b"ok") {
                return;
            }
            if start.elapsed() > limit {
                let verbose = self.kubectl(&["get", "--raw", "/readyz?verbose"]);
                panic!(
                    "kube-apiserver not ready after {limit:?}: {}{}\n{}",
                    String::from_utf8_lossy(&verbose.stdout),
                    String::from_utf8_lossy(&verbose.stderr),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The last lines the API server logged.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Run kubectl against this API server as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    /// Run kubectl with `stdin`.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        if let Some(input) = stdin {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(input).unwrap();
        }
        c.wait_with_output().unwrap()
    }

    /// kubectl that must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> Vec<u8> {
        let o = self.kubectl(args);
        assert!(o.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    }

    /// An HTTP client of the API server, authenticated as the admin (for load generators that
    /// must not pay a kubectl process per call).
    pub fn http_client(&self) -> reqwest::Client {
        let mut pem = std::fs::read(self.dir.join("admin.pem")).unwrap();
        pem.extend(std::fs::read(self.dir.join("admin.key")).unwrap());
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap())
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }

    /// The raw value etcd holds under `key` (e.g. `/registry/secrets/default/NAME`), read with
    /// Debian's etcdctl, independently of the API server.
    pub fn etcd_get(&self, key: &str) -> Vec<u8> {
        let o = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.etcd_url, "get", key, "--print-value-only"])
            .output()
            .expect("etcdctl is needed by this test (apt-get install etcd-client)");
        assert!(o.status.success(), "etcdctl get {key}: {}", String::from_utf8_lossy(&o.stderr));
        let mut v = o.stdout;
        if v.last() == Some(&b'\n') {
            v.pop();
        }
        v
    }
}

fn start_etcd(bin: &Path, dir: &Path) -> (Child, String) {
    let (client, peer) = (free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
    let mut etcd = Command::new(bin.join("etcd"))
        .args(["--name", "default", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("default={peer_url}"), "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn etcd");
    let start = Instant::now();
    loop {
        if let Some(st) = etcd.try_wait().unwrap() {
            panic!("etcd exited ({st}): {}", std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default());
        }
        let ok = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd_url, "endpoint", "health"])
            .output()
            .expect("etcdctl is needed by this test (apt-get install etcd-client)")
            .status
            .success();
        if ok {
            return (etcd, etcd_url);
        }
        assert!(start.elapsed() < Duration::from_secs(30), "etcd never became healthy");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The CA, the API server's serving certificate, the admin's client certificate and the
/// ServiceAccount signing key (EC P-256: tokens are ES256).
fn pki(dir: &Path) {
    certs::ca(dir, "ca", "keyward-test-kubernetes-ca");
    certs::signed(
        dir,
        "ca",
        "apiserver",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
    );
    certs::signed(dir, "ca", "admin", "/O=system:masters/CN=keyward-test-admin", "extendedKeyUsage=clientAuth\n");
    certs::openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key"]);
    certs::openssl(dir, &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

fn admin_kubeconfig(dir: &Path, url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    \
         certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {cert}\n    \
         client-key: {key}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
         current-context: test\n",
        ca = dir.join("ca.pem").display(),
        cert = dir.join("admin.pem").display(),
        key = dir.join("admin.key").display(),
    )
}

/// The encryption configuration `docs/kubernetes/kms-v2.md` gives.
fn encryption_config(name: &str, socket: &Path) -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    \
         providers:\n      - kms:\n          apiVersion: v2\n          name: {name}\n          endpoint: unix://{socket}\n          \
         timeout: 3s\n      - identity: {{}}\n",
        socket = socket.display()
    )
}
