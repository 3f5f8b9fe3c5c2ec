//! Shared by the CLI tests: a `keyward dev` server process and helpers to run the binary
//! against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_keyward");

pub struct Dev {
    pub child: Child,
    pub addr: String,
    pub token: String,
    /// The socket of the node agent `keyward dev` runs, if it started.
    pub agent_socket: Option<String>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_dev(data: &Path) -> Dev {
    start_dev_with(data, &[])
}

/// `keyward dev` with more arguments.
pub fn start_dev_with(data: &Path, extra: &[&str]) -> Dev {
    let mut child = Command::new(BIN)
        .args(["dev", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(extra)
        .env_remove("KEYWARD_ADDR")
        .env_remove("KEYWARD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keyward dev");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut token = None;
    let mut agent = None;
    // Three lines: the address, the token, then the agent's socket (or a comment saying why
    // the dev agent did not start).
    for _ in 0..3 {
        let line = lines.next().expect("dev printed its exports").unwrap();
        if let Some(a) = line.strip_prefix("export KEYWARD_ADDR=") {
            addr = Some(a.to_string());
        } else if let Some(t) = line.strip_prefix("export KEYWARD_TOKEN=") {
            token = Some(t.to_string());
        } else if let Some(s) = line.strip_prefix("export KEYWARD_AGENT_SOCKET=") {
            agent = Some(s.to_string());
        }
    }
    Dev { child, addr: addr.expect("KEYWARD_ADDR"), token: token.expect("KEYWARD_TOKEN"), agent_socket: agent }
}

pub fn kw(dev: &Dev, args: &[&str], stdin: &[u8]) -> Output {
    let mut c = Command::new(BIN)
        .args(args)
        .env("KEYWARD_ADDR", &dev.addr)
        .env("KEYWARD_TOKEN", &dev.token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin).unwrap();
    c.wait_with_output().unwrap()
}

pub fn ok(dev: &Dev, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let o = kw(dev, args, stdin);
    assert!(o.status.success(), "keyward {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

pub fn json(dev: &Dev, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_slice(&ok(dev, &a, b"")).unwrap()
}

/// Make `dst` an executable copy of `src` with `suffix` appended (still runnable: ELF ignores
/// trailing bytes). The executable is written by a `cp` child process, never through a file
/// descriptor of this multi-threaded test process: a descriptor open for writing here could be
/// inherited by a child another test forks at that moment, and exec'ing the file would then
/// fail with ETXTBSY ("Text file busy").
pub fn install_exe(src: &Path, dst: &Path, suffix: &[u8]) {
    let from = if suffix.is_empty() {
        src.to_path_buf()
    } else {
        // The staging file is written here but never executed.
        let staging = dst.with_extension("staging");
        let mut bytes = std::fs::read(src).unwrap();
        bytes.extend_from_slice(suffix);
        std::fs::write(&staging, bytes).unwrap();
        staging
    };
    let st = Command::new("cp").arg(&from).arg(dst).status().expect("cp");
    assert!(st.success(), "cp {} {}", from.display(), dst.display());
    if from != src {
        let _ = std::fs::remove_file(&from);
    }
    std::fs::set_permissions(dst, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// `pip install --target DIR REQUIREMENT` with Debian's python3; fails loudly.
pub fn pip_install(dir: &Path, requirement: &str) {
    let out = Command::new(PYTHON)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
        .arg(dir)
        .arg(requirement)
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
        .output()
        .expect("python3 -m pip is needed by this test (apt-get install python3-pip)");
    assert!(out.status.success(), "pip install {requirement} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// grpcio and grpcio-tools, for the independent gRPC clients.
const GRPCIO_TOOLS: &str = "grpcio-tools==1.85.1";
/// The system interpreter (Debian's python3): reachable by other uids, unlike a per-user one.
pub const PYTHON: &str = "/usr/bin/python3";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// grpcio and grpcio-tools from PyPI under target/ (once), and the stubs generated from the
/// KMS v2 and CSI provider protos into its `stubs/`. Fails loudly if pip or protoc cannot.
pub fn grpc_python() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(install_grpc_python).clone()
}

fn install_grpc_python() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpcio-tools-1.85.1-kms-csi");
    if !dir.join("stubs/secrets_store/v1alpha1/service_pb2_grpc.py").is_file() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        pip_install(&tmp, GRPCIO_TOOLS);
        std::fs::create_dir_all(tmp.join("stubs")).unwrap();
        let out = Command::new(PYTHON)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(repo().join("proto"))
            .arg(format!("--python_out={}", tmp.join("stubs").display()))
            .arg(format!("--grpc_python_out={}", tmp.join("stubs").display()))
            .args(["k8s/kms/v2/api.proto", "secrets-store/v1alpha1/service.proto"])
            .env("PYTHONPATH", &tmp)
            .output()
            .unwrap();
        assert!(out.status.success(), "grpc_tools.protoc failed: {}", String::from_utf8_lossy(&out.stderr));
        let _ = std::fs::rename(&tmp, &dir);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// A self-signed certificate for 127.0.0.1 and localhost in `dir` (`server.pem`, `server.key`).
pub fn self_signed(dir: &Path) -> PathBuf {
    let o = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-keyout", "server.key", "-out", "server.pem", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .current_dir(dir)
        .output()
        .expect("the openssl command is required for this test (apt-get install openssl)");
    assert!(o.status.success(), "openssl: {}", String::from_utf8_lossy(&o.stderr));
    dir.join("server.pem")
}

/// The address a `keyward server` child prints on stderr (`Keyward server on ADDR ...`); the
/// rest of its stderr is drained in the background so the child never blocks on it.
pub fn server_address(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some(rest) = line.strip_prefix("Keyward server on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    addr
}

/// The Prometheus project's OpenMetrics parser (prometheus_client, PyPI), installed into `dir`.
pub fn metrics_parser(dir: &Path) -> std::path::PathBuf {
    let lib = dir.join("pylib");
    pip_install(&lib, "prometheus-client==0.23.1");
    lib
}

pub fn scrape(lib: &Path, url: &str, token: Option<&str>) -> serde_json::Value {
    let mut c = Command::new(PYTHON);
    c.arg(repo().join("crates/keyward-cli/tests/metrics_check.py")).arg(lib).arg(url);
    if let Some(t) = token {
        c.arg(t);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "the OpenMetrics parser refused {url}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[allow(unused_imports)]
pub use keyward_test_support::{free_port, is_root};

/// `keyward csi-provider` as a process, serving `DIR/providers/keyward.sock`.
pub struct Provider(Child);

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the provider against `dev`.
pub fn start_csi_provider(dev: &Dev, dir: &Path, extra: &[&str]) -> Provider {
    let mut child = Command::new(BIN)
        .args(["csi-provider", "--provider-dir"])
        .arg(dir.join("providers"))
        .arg("--data-dir")
        .arg(dir.join("csi-state"))
        .args(extra)
        .env("KEYWARD_ADDR", &dev.addr)
        .env_remove("KEYWARD_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.join("providers/keyward.sock");
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Provider(child);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("csi-provider never listened");
}

/// Call the provider with the Python driver client (`csi_client.py`).
pub fn csi_py(dir: &Path, args: &[&str]) -> serde_json::Value {
    let lib = grpc_python();
    let out = Command::new(PYTHON)
        .arg(repo().join("crates/keyward-cli/tests/csi_client.py"))
        .arg(lib.join("stubs"))
        .arg(dir.join("providers/keyward.sock"))
        .args(args)
        .env("PYTHONPATH", &lib)
        .output()
        .unwrap();
    assert!(out.status.success(), "csi_client.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
