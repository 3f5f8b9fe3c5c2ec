//! Keyward against a real Kubernetes control plane: kube-apiserver and etcd built from their Go
//! modules (`tests/k8s/go.mod`, `scripts/k8s-binaries`), started by
//! `keyward_test_support::control_plane`, driven with the real `kubectl`, and read back with
//! Debian's `etcdctl`.
//!
//! - Secrets encrypted at rest by `keyward kms-plugin`, in local mode and in service mode
//!   (through a `keyward dev` server), with the plugin pinned to the real API server (its uid
//!   and executable hash): another local process is refused, and audited.
//! - Rotation the documented way; the plugin stopped (reads keep working, writes stop once the
//!   API server's DEK expires, as KEP-3299 describes) and started again (everything recovers
//!   without restarting the API server); the API server restarted (every Secret reads back).
//! - Keyward's Kubernetes auth configured from the API server's own OIDC discovery, and logins
//!   with tokens from `kubectl create token`, plain and bound to a Pod.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{BIN, PYTHON, grpc_python, repo, start_dev};
use keyward_test_support::control_plane::{ControlPlane, Encryption};
use serde_json::Value;

const KEY: &str = "k8s-secrets";

/// One control plane at a time: each test starts its own etcd and API server, and two at once
/// on a 2-core machine make the API servers' own timers (status polls, DEK expiry) the
/// machine's. Poisoning (a failed test) does not stop the next.
fn one_control_plane_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `keyward kms-plugin` as its own process, logging to a file.
struct Plugin {
    child: Child,
    socket: PathBuf,
    data: PathBuf,
    args: Vec<String>,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Plugin {
    fn start(data: &Path, socket: &Path, extra: &[String]) -> Self {
        let mut args: Vec<String> =
            ["kms-plugin", "--key", KEY, "--status-cache", "1s", "--data-dir"].iter().map(|s| s.to_string()).collect();
        args.push(data.display().to_string());
        args.push("--listen".into());
        args.push(format!("unix://{}", socket.display()));
        args.extend(extra.iter().cloned());
        let child = spawn_plugin(&args, data);
        let mut p = Self { child, socket: socket.to_path_buf(), data: data.to_path_buf(), args };
        p.wait_listening();
        p
    }

    fn wait_listening(&mut self) {
        for _ in 0..400 {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("kms-plugin exited ({st}): {}", std::fs::read_to_string(self.log()).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kms-plugin never listened on {}", self.socket.display());
    }

    fn log(&self) -> PathBuf {
        self.data.with_extension("log")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        self.child = spawn_plugin(&self.args, &self.data);
        self.wait_listening();
    }
}

fn spawn_plugin(args: &[String], data: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).unwrap();
    Command::new(BIN).args(args).stdout(Stdio::null()).stderr(log).spawn().expect("spawn keyward kms-plugin")
}

/// SHA-256 of a file, hex.
fn sha256_file(p: &Path) -> String {
    hex::encode(keyward_crypto::hash::sha256(&std::fs::read(p).unwrap()))
}

/// The `key_id`s (`keyward:KEY:ID:vN`) an etcd value names.
fn key_ids(raw: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    let needle = format!("keyward:{KEY}:");
    text.match_indices(&needle)
        .map(|(i, _)| {
            text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-')).collect::<String>()
        })
        .collect()
}

/// The version (`N` of `…:vN`) of the only `key_id` in an etcd value.
fn version_of(raw: &[u8]) -> u32 {
    let ids = key_ids(raw);
    assert_eq!(ids.len(), 1, "one key_id in the stored value: {ids:?}");
    ids[0].rsplit_once(":v").unwrap().1.parse().unwrap()
}

/// Create Secret `name` with one random value; the value.
fn create_secret(cp: &ControlPlane, name: &str) -> String {
    let value = format!("hunter2-{}", hex::encode(keyward_crypto::SecretBytes::random(8).unwrap().expose()));
    cp.kubectl_ok(&["create", "secret", "generic", name, &format!("--from-literal=password={value}")]);
    value
}

/// The Secret as the API server gives it back (decrypted), or kubectl's error.
fn read_secret(cp: &ControlPlane, name: &str) -> Result<String, String> {
    let o = cp.kubectl(&["get", "secret", name, "-o", "jsonpath={.data.password}"]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let b = STANDARD.decode(o.stdout.trim_ascii()).map_err(|e| e.to_string())?;
    Ok(String::from_utf8(b).unwrap())
}

/// What etcd holds for Secret `name`: encrypted by the `keyward` KMS v2 provider, without the
/// value in the clear or in base64.
fn assert_encrypted_at_rest(cp: &ControlPlane, name: &str, value: &str) -> Vec<u8> {
    let raw = cp.etcd_get(&format!("/registry/secrets/default/{name}"));
    assert!(
        raw.starts_with(b"k8s:enc:kms:v2:keyward:"),
        "etcd holds {:?}",
        String::from_utf8_lossy(&raw[..raw.len().min(60)])
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains(value) && !text.contains(&STANDARD.encode(value)), "the value is in etcd in the clear");
    raw
}

/// Wait (up to `limit`) until `f` holds; how long it took.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_secs(2));
    }
    start.elapsed()
}

/// The plugin's audit records that refused a call.
fn refusals(data: &Path) -> Vec<Value> {
    keyward_test_support::audit_records(&data.join("audit.log"))
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .collect()
}

/// Encrypt from another local process (Python grpcio, same uid as the API server): its answer.
fn encrypt_from_python(socket: &Path) -> Value {
    let lib = grpc_python();
    let out = Command::new(PYTHON)
        .arg(repo().join("crates/keyward-cli/tests/kms_client.py"))
        .arg(lib.join("stubs"))
        .arg(socket)
        .arg("encrypt")
        .env("PYTHONPATH", &lib)
        .output()
        .expect("python3 is needed by this test");
    assert!(out.status.success(), "kms_client.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_local_plugin_encrypts_secrets_for_the_real_apiserver_through_rotation_outage_and_restarts() {
    let _one = one_control_plane_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let bin = keyward_test_support::control_plane::binaries();
    let (data, socket) = (dir.path().join("kms"), dir.path().join("kms.sock"));
    // Pinned to the real caller: uid 0 (the API server runs as this test's uid) and the
    // kube-apiserver executable's hash.
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
    let pin = vec![
        "--local".to_string(),
        format!("--allow-uid={uid}"),
        format!("--allow-exe-sha256={}", sha256_file(&bin.join("kube-apiserver"))),
    ];
    let mut plugin = Plugin::start(&data, &socket, &pin);
    let mut cp = ControlPlane::start(
        &dir.path().join("cp"),
        &Encryption::KmsV2 { name: "keyward".into(), socket: socket.clone() },
    );

    // 1. Encrypted at rest; read back through the API server.
    let v1 = create_secret(&cp, "before-rotation");
    let raw = assert_encrypted_at_rest(&cp, "before-rotation", &v1);
    assert_eq!(version_of(&raw), 1);
    assert_eq!(read_secret(&cp, "before-rotation").unwrap(), v1);

    // 4. Another local process, of the same uid, is refused and audited.
    let denied = encrypt_from_python(&socket);
    assert_eq!(denied["error"], "PERMISSION_DENIED", "{denied}");
    let refused = refusals(&data);
    assert!(!refused.is_empty(), "the refusal is audited");
    assert!(refused.iter().any(|r| r.to_string().contains("sha256")), "{refused:?}");

    // 2. Rotation, the documented way: the API server notices the new key_id through Status
    // (it polls every minute) and new writes use it.
    let out = Command::new(BIN)
        .args(["kms-plugin", "rotate", "--local", "--key", KEY, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "rotate: {}", String::from_utf8_lossy(&out.stderr));
    let mut n = 0;
    let took = wait_for("a write under the new key version", Duration::from_secs(150), || {
        n += 1;
        let name = format!("after-rotation-{n}");
        let v = create_secret(&cp, &name);
        version_of(&assert_encrypted_at_rest(&cp, &name, &v)) == 2
    });
    println!("the API server used the rotated key {took:?} after the rotation");
    // Rewrite every Secret, as docs/kubernetes/kms-v2.md says; the old one is now under v2.
    let all = cp.kubectl_ok(&["get", "secrets", "-A", "-o", "json"]);
    let replaced = cp.kubectl_stdin(&["replace", "-f", "-"], Some(&all));
    assert!(replaced.status.success(), "{}", String::from_utf8_lossy(&replaced.stderr));
    assert_eq!(version_of(&assert_encrypted_at_rest(&cp, "before-rotation", &v1)), 2);
    assert_eq!(read_secret(&cp, "before-rotation").unwrap(), v1);

    // 3. The plugin stops: reads keep working (the API server keeps the DEKs it decrypted);
    // writes keep working only while its current DEK is fresh (3 minutes after its last
    // successful Status, KEP-3299), then fail.
    plugin.stop();
    assert_eq!(read_secret(&cp, "before-rotation").unwrap(), v1, "reads survive the outage");
    let mut m = 0;
    let took = wait_for("writes to fail while the plugin is down", Duration::from_secs(300), || {
        m += 1;
        let name = format!("during-outage-{m}");
        let o = cp.kubectl(&["create", "secret", "generic", &name, "--from-literal=password=x"]);
        !o.status.success()
    });
    println!("writes failed {took:?} after the plugin stopped");
    assert_eq!(read_secret(&cp, "before-rotation").unwrap(), v1, "reads still work");
    // Started again: writes recover without restarting the API server.
    plugin.restart();
    let took = wait_for("writes to recover after the plugin restarted", Duration::from_secs(150), || {
        cp.kubectl(&["create", "secret", "generic", "after-recovery", "--from-literal=password=y"]).status.success()
    });
    println!("writes recovered {took:?} after the plugin restarted");

    // The API server restarts: every Secret reads back (decrypted through the plugin).
    cp.stop_apiserver();
    cp.start_apiserver();
    assert_eq!(read_secret(&cp, "before-rotation").unwrap(), v1);
    assert_eq!(read_secret(&cp, "after-recovery").unwrap(), "y");
    let names = String::from_utf8(cp.kubectl_ok(&["get", "secrets", "-o", "name"])).unwrap();
    for name in names.lines() {
        cp.kubectl_ok(&["get", name, "-o", "json"]);
    }

    // The plugin's log verifies, and holds the refusal.
    plugin.stop();
    let out = Command::new(BIN).args(["audit", "verify", "--local-store"]).arg(&data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_plugin_in_service_mode_encrypts_secrets_with_a_keyward_server_key() {
    let _one = one_control_plane_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(&dir.path().join("dev"));
    let kw = |args: &[&str], stdin: &[u8]| common::ok(&dev, args, stdin);
    kw(&["key", "create", KEY], b"");
    let policy = format!(r#"{{"rules": [{{"resources": ["keys/{KEY}"], "operations": ["encrypt", "decrypt"]}}]}}"#);
    kw(&["policy", "put", "kms-plugin", "-"], policy.as_bytes());
    let token: Value = serde_json::from_slice(&kw(
        &["token", "create", "--policy", "kms-plugin", "--display-name", "kms-plugin", "-o", "json"],
        b"",
    ))
    .unwrap();
    let token_file = dir.path().join("kms-token");
    std::fs::write(&token_file, token["token"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let (data, socket) = (dir.path().join("kms"), dir.path().join("kms.sock"));
    let _plugin = Plugin::start(
        &data,
        &socket,
        &[format!("--addr={}", dev.addr), format!("--token-file={}", token_file.display())],
    );
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &Encryption::KmsV2 { name: "keyward".into(), socket: socket.clone() },
    );
    let value = create_secret(&cp, "through-the-server");
    assert_encrypted_at_rest(&cp, "through-the-server", &value);
    assert_eq!(read_secret(&cp, "through-the-server").unwrap(), value);
    // The server audited the plugin's wraps, made with the plugin's token.
    let info: Value = common::json(&dev, &["audit", "info"]);
    let records = keyward_test_support::audit_records(Path::new(info["file"].as_str().unwrap()));
    let accessor = token["accessor"].as_str().unwrap();
    assert!(
        records.iter().any(|r| r["operation"] == "encrypt"
            && r["resource"] == format!("keys/{KEY}")
            && r["decision"] == "allow"
            && r["identity"].as_str().unwrap().contains(accessor)),
        "the server audits the plugin's Encrypt under its token"
    );
}

/// A token `kubectl create token` makes for ServiceAccount `sa` in `ns`, for audience
/// `keyward`, optionally bound to a Pod (name, uid).
fn sa_token(cp: &ControlPlane, ns: &str, sa: &str, pod: Option<(&str, &str)>) -> String {
    let mut args = vec!["create", "token", sa, "-n", ns, "--audience", "keyward", "--duration", "10m"];
    if let Some((name, uid)) = pod {
        args.extend(["--bound-object-kind", "Pod", "--bound-object-name", name, "--bound-object-uid", uid]);
    }
    String::from_utf8(cp.kubectl_ok(&args)).unwrap().trim().to_string()
}

/// A Pod object (it stays Pending: no kubelet runs here) for ServiceAccount `sa`; its uid.
fn create_pod(cp: &ControlPlane, ns: &str, name: &str, sa: &str) -> String {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "payments"}},
        "spec": {"serviceAccountName": sa, "nodeName": "node-a",
                 "containers": [{"name": "api", "image": "registry.example/payments/api:1.2"}]}
    });
    let created = cp.kubectl_stdin(&["create", "-f", "-"], Some(pod.to_string().as_bytes()));
    assert!(created.status.success(), "creating pod {name}: {}", String::from_utf8_lossy(&created.stderr));
    String::from_utf8(cp.kubectl_ok(&["get", "pod", name, "-n", ns, "-o", "jsonpath={.metadata.uid}"])).unwrap()
}

#[test]
fn real_serviceaccount_tokens_log_in_through_the_apiservers_own_discovery() {
    let _one = one_control_plane_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), &Encryption::None);
    // The discovery documents are readable without credentials, as Kubernetes documents for
    // external verifiers.
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "keyward-oidc-discovery",
        "--clusterrole=system:service-account-issuer-discovery",
        "--group=system:unauthenticated",
    ]);
    cp.kubectl_ok(&["create", "namespace", "payments"]);
    cp.kubectl_ok(&["create", "serviceaccount", "api", "-n", "payments"]);
    cp.kubectl_ok(&["create", "serviceaccount", "intruder", "-n", "default"]);
    // The node the pods are bound to, so that pod-bound tokens name it (as agents' tokens do).
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}});
    let created = cp.kubectl_stdin(&["create", "-f", "-"], Some(node.to_string().as_bytes()));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));

    let dev = start_dev(&dir.path().join("dev"));
    let kw = |args: &[&str], stdin: &[u8]| common::ok(&dev, args, stdin);
    let ca = cp.ca.display().to_string();
    // Keyward's Kubernetes auth, from the API server's own discovery, with more options.
    let configure = |more: &[&str]| {
        let mut args = vec!["auth", "kubernetes", "configure", "--issuer", &cp.url, "--audience", "keyward"];
        args.extend(["--discovery", "--ca-file", &ca, "-o", "json"]);
        args.extend(more);
        kw(&args, b"")
    };
    let configured: Value = serde_json::from_slice(&configure(&[])).unwrap();
    assert!(configured["keys"].as_u64().unwrap() >= 1, "the API server's signing key was fetched: {configured}");
    assert!(configured.get("warning").is_none(), "{configured}");
    kw(&["secret", "put", "payments/db", "password=hunter2"], b"");
    let policy = r#"{"rules": [{"resources": ["secrets/payments/*"], "operations": ["read"]}]}"#;
    kw(&["policy", "put", "payments-read", "-"], policy.as_bytes());
    kw(
        &[
            "auth",
            "kubernetes",
            "role",
            "put",
            "payments",
            "--namespace",
            "payments",
            "--service-account",
            "api",
            "--policy",
            "payments-read",
            "--allow-unbound-tokens",
        ],
        b"",
    );
    let login = |jwt: &str| {
        let f = dir.path().join("jwt");
        std::fs::write(&f, jwt).unwrap();
        common::kw(
            &dev,
            &["auth", "kubernetes", "login", "--role", "payments", "--jwt-file", f.to_str().unwrap(), "-o", "json"],
            b"",
        )
    };

    // A token from `kubectl create token`.
    let out = login(&sa_token(&cp, "payments", "api", None));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["identity"]["namespace"].as_str(), v["identity"]["service_account"].as_str()),
        (Some("payments"), Some("api"))
    );
    assert!(v["selectors"].as_array().unwrap().iter().any(|s| s == "k8s-jwt:sa:api"), "{v}");
    let read = Command::new(BIN)
        .args(["secret", "get", "payments/db", "--field", "password"])
        .env("KEYWARD_ADDR", &dev.addr)
        .env("KEYWARD_TOKEN", v["token"].as_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&read.stdout), "hunter2\n", "{}", String::from_utf8_lossy(&read.stderr));

    // A token bound to a Pod: the login names the pod.
    let uid = create_pod(&cp, "payments", "api-7d9", "api");
    let out = login(&sa_token(&cp, "payments", "api", Some(("api-7d9", &uid))));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["identity"]["pod"].as_str(), v["identity"]["pod_uid"].as_str()),
        (Some("api-7d9"), Some(uid.as_str()))
    );

    // Another ServiceAccount's real token is refused by the role.
    let out = login(&sa_token(&cp, "default", "intruder", None));
    assert!(!out.status.success(), "a token of another ServiceAccount logged in");

    // The CSI provider with the tokens the kubelet would pass: a pod mounts with its own
    // pod-bound token; the same token in a Mount for another pod (same ServiceAccount) is
    // refused as TokenPodMismatch.
    let other_uid = create_pod(&cp, "payments", "api-other", "api");
    let _provider = common::start_csi_provider(&dev, dir.path(), &[]);
    let token = sa_token(&cp, "payments", "api", Some(("api-7d9", &uid)));
    let mount = |pod: &str, pod_uid: &str, file: &str| {
        let tokens = serde_json::json!({"keyward": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}});
        let attrs = serde_json::json!({
            "role": "payments",
            "objects": "- path: payments/db\n  field: password\n  fileName: password\n",
            "secretProviderClass": "payments-secrets",
            "csi.storage.k8s.io/pod.name": pod,
            "csi.storage.k8s.io/pod.namespace": "payments",
            "csi.storage.k8s.io/pod.uid": pod_uid,
            "csi.storage.k8s.io/serviceAccount.name": "api",
            "csi.storage.k8s.io/serviceAccount.tokens": tokens.to_string(),
        });
        let path = dir.path().join(file);
        std::fs::write(&path, attrs.to_string()).unwrap();
        common::csi_py(dir.path(), &["mount", path.to_str().unwrap()])
    };
    let r = mount("api-7d9", &uid, "own.json");
    assert_eq!(r["error"], "", "{r}");
    assert_eq!(STANDARD.decode(r["files"][0]["contents"].as_str().unwrap()).unwrap(), b"hunter2");
    let r = mount("api-other", &other_uid, "borrowed.json");
    assert_eq!(r["grpc_error"], "PERMISSION_DENIED", "{r}");
    assert!(r.to_string().contains("own token"), "{r}");

    // A deleted pod's token still verifies by its signature, until it expires...
    let gone_uid = create_pod(&cp, "payments", "api-gone", "api");
    let gone = sa_token(&cp, "payments", "api", Some(("api-gone", &gone_uid)));
    cp.kubectl_ok(&["delete", "pod", "api-gone", "-n", "payments", "--grace-period=0", "--force"]);
    assert!(login(&gone).status.success(), "without TokenReview the signature is all Keyward checks");
    // ...so Keyward can ask the API server (TokenReview), as a reviewer bound to
    // system:auth-delegator whose token stays encrypted in Keyward.
    cp.kubectl_ok(&["create", "serviceaccount", "keyward-reviewer", "-n", "kube-system"]);
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "keyward-reviewer",
        "--clusterrole=system:auth-delegator",
        "--serviceaccount=kube-system:keyward-reviewer",
    ]);
    let reviewer =
        String::from_utf8(cp.kubectl_ok(&["create", "token", "keyward-reviewer", "-n", "kube-system"])).unwrap();
    kw(&["secret", "put", "kubernetes/reviewer", "token=-"], reviewer.trim().as_bytes());
    let url = cp.url.clone();
    configure(&["--token-review-url", &url, "--token-reviewer-secret", "kubernetes/reviewer#token"]);
    let out = login(&gone);
    assert!(!out.status.success(), "a deleted pod's token logged in with TokenReview on");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not accept"), "{err}");
    // An agent joining with its pod's token goes through the same review: it joins while its
    // pod exists, and its token no longer joins once the pod is deleted.
    kw(&["policy", "put", "agents-join", "-"], br#"{"rules": [{"resources": ["agents/*"], "operations": ["join"]}]}"#);
    kw(
        &[
            "auth",
            "kubernetes",
            "role",
            "put",
            "agent",
            "--namespace",
            "payments",
            "--service-account",
            "api",
            "--policy",
            "agents-join",
        ],
        b"",
    );
    let agent_uid = create_pod(&cp, "payments", "agent-pod", "api");
    let agent_jwt = sa_token(&cp, "payments", "api", Some(("agent-pod", &agent_uid)));
    let join = || {
        let body = serde_json::json!({"kubernetes": {"role": "agent", "jwt": agent_jwt},
            "public_key": STANDARD.encode([7u8; 32])});
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-H", "content-type: application/json", "-d"])
            .arg(body.to_string())
            .arg(format!("{}/v1/auth/agent/join", dev.addr))
            .output()
            .expect("curl is needed by this test");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let joined = join();
    assert!(joined.ends_with("\n201") && joined.contains("node-a"), "{joined}");
    cp.kubectl_ok(&["delete", "pod", "agent-pod", "-n", "payments", "--grace-period=0", "--force"]);
    // The API server caches a successful token authentication for 10 s, so the refusal comes
    // once that has passed.
    let mut refused = join();
    let deleted = Instant::now();
    while !refused.ends_with("\n401") && deleted.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_secs(2));
        refused = join();
    }
    assert!(refused.contains("does not accept"), "a deleted agent pod's token joined: {refused}");
    println!("a deleted agent pod's token was refused {:?} after the deletion", deleted.elapsed());

    // A live pod's token still logs in, and the refusal is audited with its reason.
    let live = sa_token(&cp, "payments", "api", Some(("api-7d9", &uid)));
    let out = login(&live);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without an answer from the API server the same token is refused: it fails closed.
    cp.stop_apiserver();
    let out = login(&live);
    assert!(!out.status.success(), "a login went through without TokenReview's answer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not confirm the token"), "{err}");
    let info = common::json(&dev, &["audit", "info"]);
    let log = keyward_test_support::audit_text(Path::new(info["file"].as_str().unwrap()));
    assert!(
        log.lines().any(|l| l.contains("\"deny\"") && l.contains("does not accept this ServiceAccount token")),
        "the TokenReview refusal is audited"
    );
}

/// The kubelet stand-in the agent tests serve has the shape of a real Pod: the API server
/// validates a Pod and a kubelet-style status, and the agent reads the same selectors from
/// both.
#[test]
fn the_kubelet_stand_in_has_the_shape_of_a_real_pod() {
    let _one = one_control_plane_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &Encryption::None);
    cp.kubectl_ok(&["create", "namespace", "payments"]);
    cp.kubectl_ok(&["create", "serviceaccount", "api", "-n", "payments"]);
    let uid = create_pod(&cp, "payments", "payments-api-7d9", "api");
    let cid = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    let image_id =
        "registry.example/payments/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    // The status a kubelet reports for a running container.
    let status = serde_json::json!({"status": {"phase": "Running", "containerStatuses": [{
        "name": "api", "containerID": format!("containerd://{cid}"), "image": "registry.example/payments/api:1.2",
        "imageID": image_id, "ready": true, "restartCount": 0, "started": true,
        "state": {"running": {"startedAt": "2026-12-07T00:00:00Z"}}}]}});
    cp.kubectl_ok(&[
        "patch",
        "pod",
        "payments-api-7d9",
        "-n",
        "payments",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let real = cp.kubectl_ok(&["get", "pods", "-n", "payments", "-o", "json"]);
    let real_v: Value = serde_json::from_slice(&real).unwrap();
    // What the agent tests' stand-in serves (crates/keyward-cli/tests/agent.rs).
    let stand_in = serde_json::json!({"kind": "PodList", "apiVersion": "v1", "items": [{
        "metadata": {"name": "payments-api-7d9", "namespace": "payments", "uid": uid, "labels": {"app": "payments"}},
        "spec": {"serviceAccountName": "api", "nodeName": "node-a"},
        "status": {"containerStatuses": [{"name": "api", "containerID": format!("containerd://{cid}"),
            "image": "registry.example/payments/api:1.2", "imageID": image_id}]}
    }]});
    // Every field the stand-in sets is where a real Pod has it, with the same value.
    fn covered(stand_in: &Value, real: &Value, path: &str) {
        match (stand_in, real) {
            (Value::Object(s), Value::Object(r)) => {
                for (k, v) in s {
                    let r = r.get(k).unwrap_or_else(|| panic!("a real Pod has no {path}.{k}"));
                    covered(v, r, &format!("{path}.{k}"));
                }
            }
            (Value::Array(s), Value::Array(r)) => {
                assert_eq!(s.len(), r.len(), "{path}");
                for (i, (s, r)) in s.iter().zip(r).enumerate() {
                    covered(s, r, &format!("{path}[{i}]"));
                }
            }
            (s, r) => assert_eq!(s, r, "{path}"),
        }
    }
    covered(&stand_in["items"], &real_v["items"], "items");
    let from_real = keyward_agent::kubelet::parse_pod_list(&real, cid);
    let from_stand_in = keyward_agent::kubelet::parse_pod_list(stand_in.to_string().as_bytes(), cid);
    assert!(from_real > 0, "the agent finds the container in a real Pod");
    assert_eq!(from_real, from_stand_in, "the same selectors from both");
}
