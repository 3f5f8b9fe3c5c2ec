//! The container image `scripts/image` builds: an OCI layout that skopeo reads, reproducible,
//! holding only the binary, the libraries it loads and a few files, and enough on its own to
//! run `keyward --version` and a `keyward dev` that answers `/v1/health` from its unpacked root
//! filesystem (through `unshare -r chroot`: nothing outside the image is reachable).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, free_port, repo};
use serde_json::Value;

fn build(out: &Path) -> Value {
    let o = Command::new(repo().join("scripts/image")).arg("--binary").arg(BIN).arg(out).output().unwrap();
    assert!(o.status.success(), "scripts/image failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn skopeo(args: &[&str]) -> Value {
    let o = Command::new("skopeo").args(args).output().expect("skopeo is needed (apt-get install skopeo)");
    assert!(o.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn the_image_holds_the_binary_and_runs_from_its_own_root_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("oci");
    let built = build(&out);
    let tag = built["tag"].as_str().unwrap();
    let image = format!("oci:{}:{tag}", out.display());

    let info = skopeo(&["inspect", &image]);
    assert_eq!((info["Os"].as_str(), info["Layers"].as_array().unwrap().len()), (Some("linux"), 1), "{info}");
    assert_eq!(info["Labels"]["org.opencontainers.image.title"], "keyward");
    let config = skopeo(&["inspect", "--config", &image]);
    assert_eq!(config["config"]["User"], "65532:65532", "runs as a non-root user");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/local/bin/keyward"]));

    // Reproducible: the same binary gives the same manifest.
    assert_eq!(build(&dir.path().join("again"))["manifest"], built["manifest"]);

    // Unpack the one layer and look at what it holds.
    let index: Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("blobs/sha256").join(manifest_digest)).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let list = Command::new("tar").arg("-tvf").arg(out.join("blobs/sha256").join(layer)).output().unwrap();
    let listing = String::from_utf8(list.stdout).unwrap();
    assert!(listing.contains("65532/65532") && listing.contains("var/lib/keyward/"), "{listing}");
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(out.join("blobs/sha256").join(layer))
        .arg("-C")
        .arg(&root)
        .arg("--no-same-owner")
        .status()
        .unwrap();
    assert!(untar.success());
    let files: Vec<String> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .collect();
    for f in &files {
        assert!(
            f == "usr/local/bin/keyward" || f.starts_with("etc/") || f.contains(".so"),
            "only the binary, its libraries and /etc files: {f}"
        );
    }
    assert!(files.iter().any(|f| f.contains("libc.so")) && files.iter().any(|f| f.contains("ld-linux")));

    // It runs from there, with nothing from the host's file system.
    let in_image = |args: &[&str]| {
        // The host's environment stays out too (chroot found before it is cleared).
        let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("chroot (coreutils) is needed");
        let mut c = Command::new("unshare");
        c.arg("-r").arg(chroot).arg(&root).arg("/usr/local/bin/keyward").args(args).env_clear();
        c
    };
    let v = in_image(&["--version"]).output().expect("unshare (util-linux) and user namespaces are needed");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("keyward "));

    let port = free_port();
    let mut dev = in_image(&["dev", "--listen", &format!("127.0.0.1:{port}"), "--data", "/var/lib/keyward/dev"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut health = None;
    for _ in 0..100 {
        let o = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{port}/v1/health")]).output().unwrap();
        if o.status.success() && !o.stdout.is_empty() {
            health = Some(serde_json::from_slice::<Value>(&o.stdout).unwrap());
            break;
        }
        if let Some(st) = dev.try_wait().unwrap() {
            let out = dev.wait_with_output().unwrap();
            panic!("keyward dev exited in the image ({st}): {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its node agent starts too (a plain-HTTP dev server needs no trust store).
    for _ in 0..100 {
        if root.join("var/lib/keyward/dev/agent.sock").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = dev.kill();
    let out = dev.wait_with_output().unwrap();
    let health = health.unwrap_or_else(|| panic!("no answer: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!((health["status"].as_str(), health["sealed"].as_bool()), (Some("ok"), Some(false)), "{health}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("export KEYWARD_AGENT_SOCKET="), "{stdout}");
    assert!(root.join("var/lib/keyward/dev/keyward.db").exists(), "the data stayed inside the image's root");
}
