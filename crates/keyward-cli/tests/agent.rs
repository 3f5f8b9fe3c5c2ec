//! `keyward agent` as a real process, called by independent clients (curl, a copy of curl,
//! python3): each is told the selectors of what it really is.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{BIN, install_exe, json, ok, start_dev};

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(socket: &Path) -> Agent {
    start_agent_with(socket, &[])
}

fn start_agent_with(socket: &Path, extra: &[&str]) -> Agent {
    let mut own = Vec::new();
    if !extra.contains(&"--audit-dir") {
        own.push("--audit-dir".to_string());
        own.push(socket.with_extension("audit").display().to_string());
    }
    let mut child = Command::new(BIN)
        .args(["agent", "--socket"])
        .arg(socket)
        .args(extra)
        .args(&own)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keyward agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the agent did not open {}", socket.display());
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the agent exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Agent { child, socket: socket.to_path_buf() }
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// `curl` (or a copy of it) asks the agent who it is.
fn curl_whoami(curl: &Path, agent: &Agent, path: &str) -> (u16, Value) {
    let out = Command::new(curl)
        .args(["-sS", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&agent.socket)
        .arg(format!("http://agent{path}"))
        .output()
        .expect("curl is needed by this test");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(body).unwrap())
}

fn selectors(v: &Value) -> Vec<String> {
    v["selectors"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn euid() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

#[test]
fn workload_api_reports_what_the_caller_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&dir.path().join("run/agent.sock"));

    // curl as installed
    let curl = std::fs::canonicalize(which("curl")).unwrap();
    let (code, v) = curl_whoami(&curl, &agent, "/v1/whoami");
    assert_eq!(code, 200, "{v}");
    let sel = selectors(&v);
    assert!(sel.contains(&format!("unix:sha256:{}", sha256_of(&curl))), "{sel:?}");
    assert!(sel.contains(&format!("unix:path:{}", curl.display())), "{sel:?}");
    assert!(sel.contains(&format!("unix:uid:{}", euid())), "{sel:?}");

    // a copy of curl elsewhere: same bytes, same hash, another path
    let copy = dir.path().join("tools/curl-copy");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    install_exe(&curl, &copy, b"");
    let (_, v) = curl_whoami(&copy, &agent, "/v1/whoami");
    let sel = selectors(&v);
    assert!(sel.contains(&format!("unix:sha256:{}", sha256_of(&curl))), "{sel:?}");
    assert!(sel.contains(&format!("unix:path:{}", copy.display())), "{sel:?}");

    // a modified copy: another hash
    let patched = dir.path().join("tools/curl-patched");
    install_exe(&curl, &patched, b"\0patched");
    let (_, v) = curl_whoami(&patched, &agent, "/v1/whoami");
    let sel = selectors(&v);
    assert!(sel.contains(&format!("unix:sha256:{}", sha256_of(&patched))), "{sel:?}");
    assert!(!sel.contains(&format!("unix:sha256:{}", sha256_of(&curl))), "{sel:?}");

    // python3 speaking HTTP on the socket itself
    let py = Command::new("python3")
        .arg("-c")
        .arg(
            "import socket,sys\n\
             s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
             s.sendall(b'GET /v1/whoami HTTP/1.1\\r\\nHost: agent\\r\\nConnection: close\\r\\n\\r\\n')\n\
             d=b''\n\
             while True:\n    c=s.recv(65536)\n    if not c: break\n    d+=c\n\
             import os\n\
             sys.stdout.write(os.readlink('/proc/self/exe')+'\\n'+d.split(b'\\r\\n\\r\\n',1)[1].decode())",
        )
        .arg(&agent.socket)
        .output()
        .expect("python3 is needed by this test");
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    // (python3 may be a wrapper script; the process reports the interpreter it really is)
    let text = String::from_utf8(py.stdout).unwrap();
    let (python, body) = text.split_once('\n').unwrap();
    let v: Value = serde_json::from_str(body).unwrap();
    assert!(selectors(&v).contains(&format!("unix:path:{python}")), "{v}");
    assert!(selectors(&v).contains(&format!("unix:sha256:{}", sha256_of(Path::new(python)))), "{v}");

    // fd passing: python connects, then a forked child writes the request. The connecting
    // process is measured, but the bytes are not its own: refused.
    let forked = Command::new("python3")
        .arg("-c")
        .arg(
            "import os,socket,sys\n\
             s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
             pid=os.fork()\n\
             if pid==0:\n    s.sendall(b'GET /v1/whoami HTTP/1.1\\r\\nHost: agent\\r\\nConnection: close\\r\\n\\r\\n'); os._exit(0)\n\
             os.waitpid(pid,0)\n\
             d=b''\n\
             while True:\n    c=s.recv(65536)\n    if not c: break\n    d+=c\n\
             sys.stdout.write(d.decode())",
        )
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&forked.stdout);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("another process than the one that connected"), "{text}");

    // unknown operations are refused with a JSON error
    let (code, v) = curl_whoami(&curl, &agent, "/v1/nope");
    assert_eq!(code, 404);
    assert_eq!(v["error"]["code"], "not_found");
}

#[test]
fn a_second_agent_refuses_the_socket_and_a_stopped_one_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut agent = start_agent(&socket);
    let second = Command::new(BIN).args(["agent", "--socket"]).arg(&socket).output().unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"), "{:?}", second);

    // SIGTERM: graceful stop, socket removed
    let pid = agent.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());

    // a file that is not a socket is never replaced
    std::fs::write(&socket, b"keep me").unwrap();
    let third = Command::new(BIN).args(["agent", "--socket"]).arg(&socket).output().unwrap();
    assert!(!third.status.success());
    assert_eq!(std::fs::read(&socket).unwrap(), b"keep me");
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("{name} is needed by this test"))
}

/// The attested release end to end: a real dev server, an agent joined with a one-time token,
/// and a workload (an application built with the SDK: here the `keyward` binary with bytes
/// appended, so another executable than the generic `keyward`, whose hash the policy names)
/// that gets its secret, a data key, a decryption and a signature. A patched copy of the same
/// program gets nothing.
/// A dev server with a secret, two keys and a policy attached to `identity` on node-a, and an
/// agent joined as node-a.
struct Fixture {
    dir: tempfile::TempDir,
    dev: common::Dev,
    _agent: Agent,
    socket: PathBuf,
    join_token_file: PathBuf,
}

fn fixture(dir: tempfile::TempDir, identity: &[String]) -> Fixture {
    fixture_with(dir, identity, &[])
}

fn fixture_with(dir: tempfile::TempDir, identity: &[String], agent_args: &[&str]) -> Fixture {
    let dev = start_dev(&dir.path().join("dev"));
    ok(&dev, &["secret", "put", "payments/db", "password=-"], b"hunter2");
    ok(&dev, &["key", "create", "payments"], b"");
    ok(&dev, &["key", "create", "payments-signer", "--type", "ed25519"], b"");
    let mut set = identity.to_vec();
    set.push("node:name:node-a".into());
    let policy = dir.path().join("policy.json");
    let body = serde_json::json!({
        "identities": [set],
        "rules": [
            {"resources": ["secrets/payments/db"], "operations": ["read"]},
            {"resources": ["keys/payments"], "operations": ["generate-data-key", "decrypt"]},
            {"resources": ["keys/payments-signer"], "operations": ["sign"]}
        ]
    });
    std::fs::write(&policy, body.to_string()).unwrap();
    ok(&dev, &["policy", "put", "payments-api", policy.to_str().unwrap()], b"");

    let jt = json(&dev, &["node", "join-token", "node-a", "--ttl", "5m"]);
    let join_token_file = dir.path().join("join-token");
    std::fs::write(&join_token_file, jt["join_token"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&join_token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let socket = dir.path().join("agent.sock");
    let audit_dir = dir.path().join("agent-audit");
    let mut args = vec![
        "--join-token-file",
        join_token_file.to_str().unwrap(),
        "--addr",
        &dev.addr,
        "--audit-dir",
        audit_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(agent_args);
    let agent = start_agent_with(&socket, &args);
    Fixture { dir, dev, _agent: agent, socket, join_token_file }
}

#[test]
fn secrets_are_released_to_the_measured_binary_only() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("bin/payments-api");
    std::fs::create_dir_all(app.parent().unwrap()).unwrap();
    install_exe(Path::new(BIN), &app, b"\0payments-api");
    let app_hash = sha256_of(&app);
    let Fixture { dir, dev, _agent, socket, join_token_file: jt_file } =
        fixture(tmp, &[format!("unix:sha256:{app_hash}")]);

    let workload = |exe: &Path, args: &[&str], stdin: &[u8]| {
        let mut c = Command::new(exe)
            .arg("workload")
            .arg("--agent-socket")
            .arg(&socket)
            .args(args)
            .env_remove("KEYWARD_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), stdin).unwrap();
        c.wait_with_output().unwrap()
    };

    // The secret, opened inside the workload.
    let out = workload(&app, &["secret", "payments/db", "--field", "password"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"hunter2\n");

    // A data key, then its decryption, then a signature: all through the agent.
    let out = workload(&app, &["data-key", "payments", "--context", "tenant=a", "--output", "json"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dk: Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = workload(&app, &["decrypt", "--context", "tenant=a"], dk["ciphertext"].as_str().unwrap().as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(out.stdout, b64.decode(dk["plaintext"].as_str().unwrap()).unwrap());
    let out = workload(&app, &["sign", "payments-signer"], b"pay 100 to bob");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sig = String::from_utf8(out.stdout).unwrap();
    let v = ok(&dev, &["verify", "--key", "payments-signer", "--signature", sig.trim()], b"pay 100 to bob");
    assert!(String::from_utf8_lossy(&v).contains("valid"), "{}", String::from_utf8_lossy(&v));

    // The same program, patched by one byte: another hash, nothing released.
    let patched = dir.path().join("bin/payments-api-patched");
    install_exe(&app, &patched, b"\0patched");
    let out = workload(&patched, &["secret", "payments/db"], b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") || err.contains("no policy"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2"));

    // A join token file others could read is refused before anything is sent: whoever reads
    // it first joins as the node.
    let exposed = dir.path().join("exposed-join-token");
    std::fs::write(&exposed, "kwt_whatever").unwrap();
    std::fs::set_permissions(&exposed, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args(["agent", "--socket"])
        .arg(dir.path().join("third.sock"))
        .args(["--join-token-file", exposed.to_str().unwrap(), "--addr", &dev.addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("can be read by other users"), "{out:?}");

    // The join token is spent: a second agent cannot join with it.
    let second = Command::new(BIN)
        .args(["agent", "--socket"])
        .arg(dir.path().join("second.sock"))
        .args(["--join-token-file", jt_file.to_str().unwrap(), "--addr", &dev.addr])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("joining"), "{second:?}");

    // The audit trail names the binary's hash for the granted read, and the denial.
    let log = std::fs::read(dir.path().join("dev/audit.log")).unwrap();
    let log = String::from_utf8_lossy(&log);
    let read = log
        .lines()
        .find(|l| l.contains("secrets/payments/db") && l.contains("\"allow\"") && l.contains("workload pid"))
        .expect("audit record of the workload's read");
    assert!(read.contains(&app_hash) && read.contains("node:name:node-a"), "{read}");
    assert!(log.lines().any(|l| l.contains("secrets/payments/db") && l.contains("\"deny\"")));
    assert!(!log.contains("hunter2"));
}

/// An independent workload: python3 speaking HTTP to the agent and opening the sealed answer
/// with pyhpke (an HPKE implementation unrelated to ours, on pyca/cryptography), with the
/// policy bound to the python interpreter's hash.
#[test]
fn a_python_workload_opens_its_release_with_an_independent_hpke() {
    let pylib = pyhpke_dir();
    let exe = Command::new("python3")
        .args(["-c", "import os; print(os.readlink('/proc/self/exe'))"])
        .output()
        .expect("python3 is needed by this test");
    let python = PathBuf::from(String::from_utf8(exe.stdout).unwrap().trim());
    let f = fixture(tempfile::tempdir().unwrap(), &[format!("unix:sha256:{}", sha256_of(&python))]);
    let script = r#"
import base64, json, os, socket, sys
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
suite = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)
kp = suite.kem.derive_key_pair(os.urandom(32))
body = json.dumps({"path": "payments/db", "recipient": base64.b64encode(kp.public_key.to_public_bytes()).decode()}).encode()
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
f = s.makefile("rb")
def call(path, body, session=None):
    extra = b"keyward-session: %s\r\n" % session.encode() if session else b""
    s.sendall(b"POST %s HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n" % (path, extra, len(body)) + body)
    status = f.readline()
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""): break
        if line.lower().startswith(b"content-length:"): length = int(line.split(b":")[1])
    return status, f.read(length)
# a session first: the agent measures this process and answers a secret only it knows
status, payload = call(b"/v1/session", b"")
assert status.startswith(b"HTTP/1.1 200"), payload
session = json.loads(payload)["session"]
status, payload = call(b"/v1/secret", body, session)
assert status.startswith(b"HTTP/1.1 200"), payload
r = json.loads(payload)
ctx = suite.create_recipient_context(base64.b64decode(r["enc"]), kp.private_key, info=b"keyward release v1")
inner = json.loads(ctx.open(base64.b64decode(r["ciphertext"]), aad=base64.b64decode(r["nonce"])))
print(inner["data"]["password"])
"#;
    let out = Command::new(&python).arg("-c").arg(script).arg(&f.socket).env("PYTHONPATH", &pylib).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "hunter2");
    drop(f.dev);
    drop(f.dir);
}

/// pyhpke installed from PyPI into a directory under target/ (once); fails loudly if pip
/// cannot install it.
fn pyhpke_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyhpke-0.6.5");
    if dir.join("pyhpke").is_dir() {
        return dir;
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
        .arg(&tmp)
        .arg("pyhpke==0.6.5")
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
        .output()
        .expect("python3 -m pip is needed by this test (apt-get install python3-pip)");
    assert!(out.status.success(), "pip install pyhpke failed: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::rename(&tmp, &dir);
    let _ = std::fs::remove_dir_all(&tmp);
    dir
}

/// A cgroup made for one test, shaped like the kubelet's (cgroupfs driver):
/// `kubepods/burstable/pod<UID>/<CONTAINER ID>`, in the cgroup v1 `pids` hierarchy or in the v2
/// tree, whichever this machine has. Removed on drop.
struct TestCgroup {
    dirs: Vec<PathBuf>,
    leaf: PathBuf,
}

impl TestCgroup {
    fn new(pod_uid: &str, container_id: &str) -> Self {
        let root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/pids")
        };
        assert!(root.is_dir(), "this test needs a writable cgroup hierarchy at {} (run as root)", root.display());
        let mut dirs = Vec::new();
        let mut p = root;
        for part in ["kubepods", "burstable", &format!("pod{pod_uid}"), container_id] {
            p = p.join(part);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
                dirs.push(p.clone());
            }
        }
        Self { dirs, leaf: p }
    }

    /// `exe args...`, started inside this cgroup (a shell moves itself in, then execs).
    fn command(&self, exe: &Path) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#).arg(&self.leaf).arg(exe);
        c
    }
}

/// A subtree of the cgroup hierarchy delegated to `uid`, as systemd delegates
/// `user@UID.service` (and rootless container tools use it): the user may create cgroups in it
/// and move its own processes between them. Removed on drop.
struct Delegated {
    top: PathBuf,
    subtree: PathBuf,
}

impl Delegated {
    fn new(uid: u32) -> Self {
        let root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/pids")
        };
        let top = root.join(format!("keyward-test-user-{}.slice", random_hex(4)));
        let subtree = top.join(format!("user@{uid}.service"));
        std::fs::create_dir_all(&subtree)
            .unwrap_or_else(|e| panic!("this test needs to create cgroups (run as root): {}: {e}", subtree.display()));
        let out = Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(&subtree).output().unwrap();
        assert!(out.status.success(), "delegating {}: {}", subtree.display(), String::from_utf8_lossy(&out.stderr));
        Self { top, subtree }
    }

    /// `exe` run as `uid`, which first makes `rel` inside its subtree and moves itself there.
    fn command_as(&self, uid: u32, rel: &str, exe: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]);
        c.args(["sh", "-c", r#"mkdir -p "$0" && echo $$ > "$0/cgroup.procs" && exec "$@""#]);
        c.arg(self.subtree.join(rel)).arg(exe);
        c
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(r#"find "$0" -depth -type d -exec rmdir {} \; 2>/dev/null"#)
            .arg(&self.top)
            .status();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A stand-in for the kubelet's `GET /pods`: python3's HTTPS server with an openssl-made
/// certificate, demanding the agent's bearer token.
struct FakeKubelet {
    child: Child,
    url: String,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fake_kubelet(dir: &Path, pod_list: &Value, token: &str) -> FakeKubelet {
    // A CA, and a serving certificate for 127.0.0.1 signed by it.
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    for args in [
        vec![
            "req",
            "-x509",
            ec[0],
            ec[1],
            ec[2],
            ec[3],
            ec[4],
            "-days",
            "1",
            "-subj",
            "/CN=kubelet-ca",
            "-keyout",
            "ca-key.pem",
            "-out",
            "kubelet-ca.pem",
        ],
        vec![
            "req",
            ec[0],
            ec[1],
            ec[2],
            ec[3],
            ec[4],
            "-subj",
            "/CN=kubelet",
            "-keyout",
            "kubelet-key.pem",
            "-out",
            "kubelet.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "kubelet.csr",
            "-CA",
            "kubelet-ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "kubelet-cert.pem",
        ],
    ] {
        let o = Command::new("openssl").args(&args).current_dir(dir).output().expect("openssl is needed by this test");
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    std::fs::write(dir.join("pods.json"), pod_list.to_string()).unwrap();
    let script = r#"
import http.server, ssl, sys
token, pods = sys.argv[1], open("pods.json", "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer " + token:
            self.send_response(401); self.end_headers(); return
        if self.path != "/pods":
            self.send_response(404); self.end_headers(); return
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(pods))); self.end_headers(); self.wfile.write(pods)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain("kubelet-cert.pem", "kubelet-key.pem")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(token)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed by this test");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let port: u16 = line.trim().parse().expect("the kubelet stand-in printed its port");
    FakeKubelet { child, url: format!("https://127.0.0.1:{port}") }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A workload in a container: its cgroup (a real one) gives the container id and pod UID, the
/// kubelet's pod list gives namespace, ServiceAccount, labels and image; a policy that needs
/// `k8s:ns`, `k8s:sa` *and* the binary's hash releases only to that container.
#[test]
fn a_container_gets_its_pod_selectors_from_the_kubelet() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("payments-api");
    install_exe(Path::new(BIN), &app, b"\0payments-api");
    let app_hash = sha256_of(&app);
    let h = random_hex(16);
    let pod_uid = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]);
    let cid = random_hex(32);
    let stranger = random_hex(32);
    let pods = serde_json::json!({"kind": "PodList", "apiVersion": "v1", "items": [{
        "metadata": {"name": "payments-api-7d9", "namespace": "payments", "uid": pod_uid, "labels": {"app": "payments"}},
        "spec": {"serviceAccountName": "api", "nodeName": "node-a"},
        "status": {"containerStatuses": [{"name": "api", "containerID": format!("containerd://{cid}"),
            "image": "registry.example/payments/api:1.2",
            "imageID": "registry.example/payments/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}]}
    }]});
    let kubelet = fake_kubelet(tmp.path(), &pods, "kubelet-token");
    std::fs::write(tmp.path().join("kubelet-token"), "kubelet-token\n").unwrap();
    let token_file = tmp.path().join("kubelet-token");
    let ca = tmp.path().join("kubelet-ca.pem");
    let identity = [format!("unix:sha256:{app_hash}"), "k8s:ns:payments".to_string(), "k8s:sa:api".to_string()];
    let f = fixture_with(
        tempfile::tempdir().unwrap(),
        &identity,
        &[
            "--kubelet-url",
            &kubelet.url,
            "--kubelet-token-file",
            token_file.to_str().unwrap(),
            "--kubelet-ca",
            ca.to_str().unwrap(),
            "--kubelet-poll-attempts",
            "3",
            "--kubelet-poll-interval",
            "100ms",
        ],
    );
    let container = TestCgroup::new(&pod_uid, &cid);
    let run = |mut c: Command, args: &[&str]| {
        let out = c
            .arg("workload")
            .arg("--agent-socket")
            .arg(&f.socket)
            .args(args)
            .env_remove("KEYWARD_TOKEN")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Inside the container: the pod's selectors, and the secret.
    let (ok_, out, err) = run(container.command(&app), &["whoami", "--output", "json"]);
    assert!(ok_, "{err}");
    for want in [
        "k8s:ns:payments".to_string(),
        "k8s:sa:api".to_string(),
        "k8s:pod-name:payments-api-7d9".to_string(),
        format!("k8s:pod-uid:{pod_uid}"),
        format!("k8s:container-id:{cid}"),
        "k8s:container-name:api".to_string(),
        "k8s:pod-label:app:payments".to_string(),
        "k8s:container-image:registry.example/payments/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_string(),
        format!("unix:sha256:{app_hash}"),
    ] {
        assert!(out.contains(&want), "{want} missing from {out}");
    }
    let (ok_, out, err) = run(container.command(&app), &["secret", "payments/db", "--field", "password"]);
    assert!(ok_, "{err}");
    assert_eq!(out, "hunter2\n");

    // The same binary outside any container: no k8s selectors, no secret.
    let (ok_, out, err) = run(Command::new(&app), &["secret", "payments/db"]);
    assert!(!ok_ && !out.contains("hunter2"), "{out}");
    assert!(err.contains("403") || err.contains("no policy"), "{err}");

    // A container the kubelet does not list: refused after polling, never guessed.
    let unlisted = TestCgroup::new(&pod_uid, &stranger);
    let (ok_, _, err) = run(unlisted.command(&app), &["whoami"]);
    assert!(!ok_);
    assert!(err.contains("not in the kubelet's pod list"), "{err}");

    // Attack: a user with a delegated cgroup subtree (nobody here) reads the victim's pod UID
    // and container id from /proc/*/cgroup, makes `kubepods/burstable/pod<UID>/<ID>` inside
    // its own subtree, moves in and runs the same binary. The ids are the victim's, but not
    // under the kubelet's root: refused, audited, nothing released.
    for d in [f.dir.path(), tmp.path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let user = Delegated::new(65534);
    for forged in [format!("kubepods/burstable/pod{pod_uid}/{cid}"), format!("app.slice/pod{pod_uid}/{cid}")] {
        let (ok_, out, err) =
            run(user.command_as(65534, &forged, &app), &["secret", "payments/db", "--field", "password"]);
        assert!(!ok_ && !out.contains("hunter2"), "{out}");
        assert!(err.contains("cgroup outside kubelet hierarchy"), "{err}");
    }
    let (ok_, out, _) = run(user.command_as(65534, "plain", &app), &["whoami", "--output", "json"]);
    assert!(ok_ && !out.contains("k8s:"), "elsewhere, a process has no k8s selectors: {out}");
    let log = std::fs::read_to_string(f.dir.path().join("agent-audit/audit.log")).unwrap();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("cgroup outside kubelet hierarchy")).collect();
    assert!(refused.len() >= 2 && refused.iter().all(|l| l.contains("uid 65534") && l.contains("\"deny\"")), "{log}");
}

/// `keyward dev` runs a node agent (node `dev`) and prints its socket; `keyward agent whoami`
/// and `keyward agent fetch-secret` use it, with no token. The `keyward` binary itself is no
/// identity (anyone can run it): its hash and path are never measured, and the policy names
/// the uid and node instead.
#[test]
fn dev_runs_an_agent_for_the_laptop_flow() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    let socket = dev.agent_socket.clone().expect("keyward dev printed KEYWARD_AGENT_SOCKET");
    let bin = std::fs::canonicalize(BIN).unwrap();
    ok(&dev, &["secret", "put", "app/db", "password=-"], b"s3cret");
    let policy = dir.path().join("p.json");
    let body = serde_json::json!({
        "identities": [[format!("unix:uid:{}", euid()), "node:name:dev"]],
        "rules": [{"resources": ["secrets/app/db"], "operations": ["read"]}]
    });
    std::fs::write(&policy, body.to_string()).unwrap();
    ok(&dev, &["policy", "put", "app", policy.to_str().unwrap()], b"");
    let agent = |args: &[&str]| {
        Command::new(&bin)
            .arg("agent")
            .args(args)
            .env("KEYWARD_AGENT_SOCKET", &socket)
            .env_remove("KEYWARD_TOKEN")
            .output()
            .unwrap()
    };
    let out = agent(&["whoami", "--output", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let who = String::from_utf8_lossy(&out.stdout);
    assert!(who.contains(&format!("unix:uid:{}", euid())), "{who}");
    assert!(!who.contains("unix:path:") && !who.contains("unix:sha256:"), "keyward's own binary is no identity: {who}");
    let out = agent(&["fetch-secret", "app/db", "--field", "password"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"s3cret\n");
}

/// Many workloads asking at once: the agent sends their releases in signed batches, every
/// workload gets its own answer, and every release has its own audit record beside the
/// batches' records (the load generator is the workload: 16 concurrent releases).
#[test]
fn concurrent_releases_travel_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    let socket = dev.agent_socket.clone().expect("keyward dev printed KEYWARD_AGENT_SOCKET");
    let out = ok(
        &dev,
        &["bench", "--op", "workload-secret", "--agent-socket", &socket, "-c", "16", "--max-ops", "400"]
            .iter()
            .chain(&["--warmup", "0s", "--duration", "60s", "--size", "64", "--json"])
            .copied()
            .collect::<Vec<_>>(),
        b"",
    );
    let report: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["ops"], 400, "{report}");

    let log = std::fs::read(dir.path().join("dev/audit.log")).unwrap();
    let records: Vec<Value> = String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let batches: Vec<&Value> = records.iter().filter(|r| r["operation"] == "release-batch").collect();
    assert!(!batches.is_empty(), "16 concurrent releases must share batches");
    let in_batches: u64 =
        batches.iter().map(|b| b["reason"].as_str().unwrap().split(' ').next().unwrap().parse::<u64>().unwrap()).sum();
    assert!(in_batches >= 2 * batches.len() as u64, "a batch holds at least two releases");
    // An allowed read record for every release, whether it went alone or in a batch (the
    // load generator makes one more, before it starts timing).
    let reads = records
        .iter()
        .filter(|r| r["resource"] == "secrets/bench/secret" && r["decision"] == "allow" && r["status"] == 200)
        .count();
    assert!((400..=416).contains(&reads), "one audit record per release: {reads}");
    let batched_reads =
        records.iter().filter(|r| r["resource"] == "secrets/bench/secret" && r["path"] == "/v1/agent/releases").count()
            as u64;
    assert_eq!(batched_reads, in_batches, "each release of a batch has its own record");
    assert!(!String::from_utf8_lossy(&log).contains(&"x".repeat(64)), "no secret value in the audit log");
}

/// The same binary run as another uid is another identity when the policy requires the uid.
#[test]
fn the_same_binary_as_another_uid_is_denied_when_the_uid_is_required() {
    assert_eq!(euid(), "0", "this test runs the workload as nobody, so it must run as root");
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("payments-api");
    install_exe(Path::new(BIN), &app, b"\0payments-api");
    let hash = sha256_of(&app);
    let f = fixture(tmp, &[format!("unix:sha256:{hash}"), "unix:uid:0".to_string()]);
    // Let nobody reach the binary and the socket (authorization is by measurement, not mode).
    std::fs::set_permissions(f.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let run = |as_nobody: bool| {
        let mut c = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&app);
            c
        } else {
            Command::new(&app)
        };
        c.args(["workload", "--agent-socket"]).arg(&f.socket).args(["secret", "payments/db", "--field", "password"]);
        c.env_remove("KEYWARD_TOKEN").output().expect("setpriv (util-linux) is needed by this test")
    };
    let root = run(false);
    assert!(root.status.success(), "{}", String::from_utf8_lossy(&root.stderr));
    assert_eq!(root.stdout, b"hunter2\n");
    let nobody = run(true);
    assert!(!nobody.status.success());
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(err.contains("403") || err.contains("no policy"), "{err}");
}

/// The write-then-exec attacker (python, run as nobody): it opens a session, writes a complete
/// release request with its own recipient key, forks a child that keeps the socket, and
/// `exec`s the target; the child reads the answer and tries to open it. In `session` mode it
/// only asks for a session before the exec, and the child tries to use that session on a
/// connection of its own. The child prints what it got, as JSON.
const WRITE_THEN_EXEC: &str = r#"
import base64, json, os, socket, sys
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
sock_path, mode, secret_path, target = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
suite = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)
kp = suite.kem.derive_key_pair(os.urandom(32))
def connect():
    s = socket.socket(socket.AF_UNIX); s.connect(sock_path); return s, s.makefile("rb")
def send(s, path, body, session=None):
    extra = ("keyward-session: %s\r\n" % session).encode() if session else b""
    s.sendall(b"POST %s HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n" % (path, extra, len(body)) + body)
def read(f):
    status = int(f.readline().split()[1]); length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""): break
        if line.lower().startswith(b"content-length:"): length = int(line.split(b":")[1])
    return status, f.read(length)
release = json.dumps({"path": secret_path, "recipient": base64.b64encode(kp.public_key.to_public_bytes()).decode()}).encode()
s, f = connect()
if mode in ("release", "plain"):
    send(s, b"/v1/session", b""); session = json.loads(read(f)[1])["session"]
    send(s, b"/v1/secret", release, session)
else:
    send(s, b"/v1/session", b"")
if os.fork() == 0:
    status, body = read(f)
    out = {"status": status}
    if mode == "session" and status == 200:
        c, cf = connect()
        send(c, b"/v1/secret", release, json.loads(body)["session"])
        status, body = read(cf)
        out["child_status"] = status
    try:
        r = json.loads(body)
        ctx = suite.create_recipient_context(base64.b64decode(r["enc"]), kp.private_key, info=b"keyward release v1")
        out["secret"] = json.loads(ctx.open(base64.b64decode(r["ciphertext"]), aad=base64.b64decode(r["nonce"])).decode())
    except Exception as e:
        out["error"] = body.decode(errors="replace")[:300]
    print(json.dumps(out), flush=True)
    os._exit(0)
if mode == "plain":
    # The control: the same workload, which does not exec.
    os.wait(); sys.exit(0)
os.execv(target[0], target)
"#;

/// Attack: write a request, then `exec` another program that the policy allows, in two forms.
/// (1) A setuid-root program: the agent used to measure euid 0 and release a secret granted to
/// root to nobody's forked child. (2) A program the policy names by its hash (python itself,
/// the attacker being a modified copy of python). Each is tried several times, in both modes;
/// nothing is ever released, and the agent's own audit log records the exec (or the setuid
/// program's mixed credentials). Controls: root itself, and the allowed python itself, still
/// get their secrets.
#[test]
fn write_then_exec_is_refused() {
    assert_eq!(euid(), "0", "this test runs the attacker as nobody, so it must run as root");
    let pylib = pyhpke_dir();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let t = dir.path();
    let dev = start_dev(&t.join("dev"));
    let socket = dev.agent_socket.clone().expect("keyward dev runs an agent");
    let python = std::fs::canonicalize(common::PYTHON).unwrap();
    ok(&dev, &["secret", "put", "root/db", "password=-"], b"root-only");
    ok(&dev, &["secret", "put", "py/db", "password=-"], b"python-only");
    for (name, identity, resource) in [
        ("root-db", vec!["unix:uid:0".to_string()], "secrets/root/db"),
        ("py-db", vec![format!("unix:sha256:{}", sha256_of(&python)), "unix:uid:65534".into()], "secrets/py/db"),
    ] {
        let mut set = identity;
        set.push("node:name:dev".into());
        let body =
            serde_json::json!({"identities": [set], "rules": [{"resources": [resource], "operations": ["read"]}]});
        std::fs::write(t.join(format!("{name}.json")), body.to_string()).unwrap();
        ok(&dev, &["policy", "put", name, t.join(format!("{name}.json")).to_str().unwrap()], b"");
    }
    // A setuid-root program (a copy of sleep), and the attacker's own python (a modified copy).
    let suid = t.join("sleep-suid");
    install_exe(Path::new("/bin/sleep"), &suid, b"");
    std::fs::set_permissions(&suid, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let attacker_py = t.join("python-attacker");
    install_exe(&python, &attacker_py, b"\0attacker");
    let script = t.join("attack.py");
    std::fs::write(&script, WRITE_THEN_EXEC).unwrap();
    for p in [t.to_path_buf(), t.join("dev")] {
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let attack = |interpreter: &Path, mode: &str, secret: &str, target: &[&str]| -> Value {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(interpreter)
            .arg(&script)
            .args([socket.as_str(), mode, secret])
            .args(target)
            .env("PYTHONPATH", &pylib)
            .env("PYTHONHOME", "/usr")
            .env_remove("KEYWARD_TOKEN")
            .output()
            .expect("setpriv (util-linux) and python3 are needed by this test");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim())
            .unwrap_or_else(|_| panic!("attacker output: {text} / {}", String::from_utf8_lossy(&out.stderr)))
    };
    let python_target = [python.to_str().unwrap(), "-c", "import time; time.sleep(0.5)"];
    for round in 0..6 {
        for mode in ["release", "session"] {
            let v = attack(&python, mode, "root/db", &[suid.to_str().unwrap(), "0.5"]);
            assert!(v.get("secret").is_none(), "round {round} {mode}: nobody got root's secret: {v}");
            let v = attack(&attacker_py, mode, "py/db", &python_target);
            assert!(v.get("secret").is_none(), "round {round} {mode}: the attacker got python's secret: {v}");
        }
    }
    // Which check caught each attempt depends on when the exec landed (mid-exec the process
    // reads as gone); each is a refusal with its reason, and the exec is caught every round
    // that reached a release.
    let log = std::fs::read_to_string(t.join("dev/agent/audit.log")).unwrap();
    let log = log.trim_end_matches('\0');
    let known = [
        "exec during request",
        "setuid or mixed credentials",
        "session of another process",
        "process exited or changed",
        "credentials changed",
    ];
    for l in log.lines().filter(|l| l.contains("\"deny\"")) {
        assert!(known.iter().any(|r| l.contains(r)), "unexpected refusal: {l}");
    }
    assert!(log.lines().any(|l| l.contains("exec during request") && l.contains("\"deny\"")), "{log}");
    assert!(!log.contains("root-only") && !log.contains("python-only"));

    // In a user namespace of its own, a process may name other processes of its pid namespace
    // as the writer of its bytes (SCM_CREDENTIALS), so the per-read check cannot hold there:
    // such a process is not attested at all.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "-Urp", "--fork"])
        .arg(&python)
        .arg("-c")
        .arg(
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
             s.sendall(b'POST /v1/session HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n')\n\
             print(s.makefile('rb').read().decode())",
        )
        .arg(&socket)
        .env("PYTHONHOME", "/usr")
        .output()
        .expect("unshare (util-linux) is needed by this test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 403") && text.contains("process in another user namespace"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A setuid-root program that is itself a client (a setuid copy of python asking for a
    // session) acts for two users: refused, whatever it runs.
    let suid_py = t.join("python-suid");
    install_exe(&python, &suid_py, b"");
    std::fs::set_permissions(&suid_py, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&suid_py)
        .arg("-c")
        .arg(
            "import socket, sys, os\n\
             s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
             s.sendall(b'POST /v1/session HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n')\n\
             print(os.geteuid(), s.makefile('rb').read().decode())",
        )
        .arg(&socket)
        .env("PYTHONHOME", "/usr")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("0 HTTP/1.1 403"), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("setuid or mixed credentials"), "{text}");

    // Controls: root asks for root's secret; the allowed python (as nobody) for its own.
    let out = Command::new(BIN)
        .args(["workload", "--agent-socket", &socket, "secret", "root/db", "--field", "password"])
        .env_remove("KEYWARD_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"root-only\n");
    let v = attack(&python, "plain", "py/db", &[]);
    assert_eq!(v["secret"]["data"]["password"], "python-only", "{v}");
}

/// Starvation: a local user (nobody) opens far more Workload API connections than its cap and
/// holds them, and another makes the agent hash several large new executables at once. The
/// extra connections are closed at once (audited), the hashes wait for their user's own
/// places, and a legitimate caller of a third uid is still answered within 2 s throughout.
#[test]
fn one_user_cannot_starve_the_agent() {
    assert_eq!(euid(), "0", "this test runs the flood as nobody, so it must run as root");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let socket = dir.path().join("agent.sock");
    let audit = dir.path().join("agent-audit");
    let agent = start_agent_with(&socket, &["--max-connections-per-uid", "16", "--audit-dir", audit.to_str().unwrap()]);
    let curl = std::fs::canonicalize(which("curl")).unwrap();
    // Six large executables (copies of curl, extended to 400 MiB with zeros: still runnable).
    let mut big = Vec::new();
    for i in 0..6 {
        let p = dir.path().join(format!("curl-big-{i}"));
        install_exe(&curl, &p, format!("\0big{i}").as_bytes());
        let st = Command::new("truncate").args(["-s", "400M"]).arg(&p).status().unwrap();
        assert!(st.success());
        big.push(p);
    }
    let flood = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", common::PYTHON, "-c"])
        .arg(
            "import socket, sys, time\n\
             conns = []\n\
             for _ in range(64):\n    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); conns.append(s)\n\
             time.sleep(0.5)\n\
             closed = 0\n\
             for s in conns:\n    s.setblocking(False)\n    try:\n        closed += s.recv(1) == b''\n    except BlockingIOError:\n        pass\n\
             print(closed, flush=True)\n\
             time.sleep(4)\n",
        )
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // (another local user, so that its connections do not count under nobody's cap)
    let hashing: Vec<Child> = big
        .iter()
        .map(|p| {
            Command::new("setpriv")
                .args(["--reuid=65533", "--regid=65533", "--clear-groups"])
                .arg(p)
                .args(["-s", "-o", "/dev/null", "--unix-socket"])
                .arg(&agent.socket)
                .arg("http://agent/v1/whoami")
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        let started = Instant::now();
        let (code, v) = curl_whoami(&curl, &agent, "/v1/whoami");
        assert_eq!(code, 200, "{v}");
        assert!(started.elapsed() < Duration::from_secs(2), "the legitimate call waited {:?}", started.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = flood.wait_with_output().unwrap();
    let closed: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(closed, 64 - 16, "nobody keeps at most its 16 connections");
    for mut h in hashing {
        assert!(h.wait().unwrap().success(), "the large executables are measured in their turn");
    }
    let log = std::fs::read_to_string(audit.join("audit.log")).unwrap();
    let refused =
        log.lines().filter(|l| l.contains("connection limit per uid reached") && l.contains("uid 65534")).count();
    assert_eq!(refused, 48, "each refused connection is audited");
    // The agent's own log verifies with the key file beside it (docs/audit.md).
    drop(agent);
    let out = Command::new(BIN).args(["audit", "verify", "--key-file"]).arg(audit.join("audit-key")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "), "{out:?}");
}
