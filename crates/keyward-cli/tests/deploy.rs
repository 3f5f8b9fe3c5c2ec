//! The Kubernetes manifests in `deploy/`: schema-valid (`kubernetes-validate --strict`, from
//! PyPI), decoded by the real kubectl (`kubectl annotate --local --dry-run=client`, which needs
//! no API server) and rendered by `kubectl kustomize`, and consistent with the binary and with
//! each other (`deploy_check.py`: flags, mounted paths, selectors, ports, references). Broken
//! copies must fail the same checks, so the checks are known to bite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{BIN, PYTHON, pip_install, repo};

const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const KUBERNETES_VERSION: &str = "1.31";

/// kubernetes-validate (and its PyYAML, used by the checker) under target/, installed once.
fn python_path() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubernetes-validate-1.37.0");
    if !dir.join("kubernetes_validate").is_dir() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        pip_install(&tmp, KUBERNETES_VALIDATE);
        let _ = std::fs::rename(&tmp, &dir);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

fn yaml_files(deploy: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["", "server", "postgres", "agent", "csi", "kms-plugin", "examples"] {
        for e in std::fs::read_dir(deploy.join(sub)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            // The kustomization and the apiserver's EncryptionConfiguration are not API objects
            // (the checker reads the latter).
            if name.ends_with(".yaml") && name != "kustomization.yaml" && name != "encryption-config.yaml" {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

fn validate(deploy: &Path) -> Output {
    Command::new(PYTHON)
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(yaml_files(deploy))
        .env("PYTHONPATH", python_path())
        .output()
        .unwrap()
}

/// kubectl decodes every manifest file offline (client-side dry run of an annotation); returns
/// the objects it names, or its error.
fn kubectl_dry_run(deploy: &Path, work: &Path) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for f in yaml_files(deploy) {
        let out = Command::new("kubectl")
            .args(["annotate", "--local", "--dry-run=client", "-o", "name", "-f"])
            .arg(&f)
            .arg("keyward.dev/checked=true")
            .env("KUBECONFIG", work.join("no-kubeconfig"))
            .output()
            .expect("kubectl is needed by this test (apt-get install kubernetes-client)");
        if !out.status.success() {
            return Err(format!("{}: {}", f.display(), String::from_utf8_lossy(&out.stderr)));
        }
        names.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
    }
    Ok(names)
}

/// `kubectl kustomize`, then the consistency checker. Returns its output and success.
fn render_and_check(deploy: &Path, work: &Path) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy)
        .env("KUBECONFIG", work.join("no-kubeconfig"))
        .output()
        .expect("kubectl is needed by this test (apt-get install kubernetes-client)");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    let rendered = work.join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).unwrap();
    let out = Command::new(PYTHON)
        .arg(repo().join("crates/keyward-cli/tests/deploy_check.py"))
        .arg(BIN)
        .arg(deploy)
        .arg(&rendered)
        .env("PYTHONPATH", python_path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of deploy/ with `from` replaced by `to` in `file`.
fn broken(work: &Path, name: &str, file: &str, from: &str, to: &str) -> PathBuf {
    let dir = work.join(name);
    copy_dir(&repo().join("deploy"), &dir);
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    assert!(text.contains(from), "{file} contains {from:?}");
    std::fs::write(dir.join(file), text.replacen(from, to, 1)).unwrap();
    dir
}

#[test]
fn manifests_are_valid_and_consistent_with_the_binary() {
    let deploy = repo().join("deploy");
    let work = tempfile::tempdir().unwrap();

    let out = validate(&deploy);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubernetes-validate: {report}{}", String::from_utf8_lossy(&out.stderr));
    let passed = report.matches(" passed for resource ").count();
    assert!(passed >= 17, "every object validated ({passed}): {report}");
    assert!(!report.contains("ERROR"), "{report}");

    let names = kubectl_dry_run(&deploy, work.path()).unwrap();
    for want in [
        "statefulset.apps/keyward-server",
        "poddisruptionbudget.policy/keyward-server",
        "statefulset.apps/keyward-postgres",
        "daemonset.apps/keyward-agent",
        "daemonset.apps/keyward-csi-provider",
        "pod/keyward-kms",
    ] {
        assert!(names.iter().any(|n| n == want), "kubectl decoded {want}: {names:?}");
    }
    assert_eq!(names.len(), passed, "kubectl and the schema validator saw the same objects");

    let (ok, text) = render_and_check(&deploy, work.path());
    assert!(ok, "deploy_check.py: {text}");
    println!("{text}");

    // The checks bite.
    let cases = [
        ("flag", "server/statefulset.yaml", "--tls-cert=", "--tls-certificate=", "has no flag --tls-certificate"),
        (
            "mount",
            "server/statefulset.yaml",
            "mountPath: /etc/keyward/tls",
            "mountPath: /etc/tls",
            "on no mounted volume",
        ),
        ("socket", "agent/daemonset.yaml", "mountPath: /run/keyward", "mountPath: /run/kw", "socket directory"),
        (
            "selector",
            "server/pdb.yaml",
            "      app.kubernetes.io/name: keyward-server",
            "      app.kubernetes.io/name: keyward-srv",
            "matches no pod",
        ),
        ("kms", "kms-plugin/encryption-config.yaml", "kms.sock", "kms2.sock", "EncryptionConfiguration names"),
        ("image", "kustomization.yaml", "  - name: keyward\n", "  - name: keyward-other\n", "is not set"),
        ("workload", "examples/workload.yaml", "path: /run/keyward\n", "path: /run/kw\n", "socket"),
        ("secret", "server/statefulset.yaml", "name: keyward-postgres-url", "name: keyward-pg-url", "keyward-pg-url"),
        (
            "audit",
            "server/statefulset.yaml",
            "--audit-file=/var/lib/keyward-audit/audit.log",
            "--audit-file=/var/lib/keyward/audit.log",
            "must be on a persistent volume",
        ),
    ];
    for (name, file, from, to, expect) in cases {
        let dir = broken(work.path(), name, file, from, to);
        let (ok, text) = render_and_check(&dir, work.path());
        assert!(!ok && text.contains(expect), "{name}: expected a failure with {expect:?}, got: {text}");
    }
    let dir = broken(work.path(), "yaml", "agent/rbac.yaml", "verbs: [get]", "verbs: [get");
    let e = kubectl_dry_run(&dir, work.path()).unwrap_err();
    assert!(e.contains("rbac.yaml"), "kubectl refuses malformed YAML: {e}");
    let dir = broken(work.path(), "field", "csi/daemonset.yaml", "readOnlyRootFilesystem", "readOnlyRootFileSystem");
    let out = validate(&dir);
    assert!(!out.status.success(), "an unknown field fails strict validation");
    assert!(String::from_utf8_lossy(&out.stdout).contains("readOnlyRootFileSystem"));
}
