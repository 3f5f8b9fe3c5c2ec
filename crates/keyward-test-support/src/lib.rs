//! # keyward-test-support
//!
//! What Keyward's tests share, in one place instead of a copy per crate: a dev server started
//! in-process ([`server`]), a real Kubernetes control plane (etcd and kube-apiserver built from
//! their Go modules, [`control_plane`]), a test Kubernetes token issuer ([`k8s`]), a throwaway PostgreSQL cluster ([`postgres`]), a SoftHSM2 token
//! ([`softhsm`]), OCI layouts, keys and skopeo for image encryption ([`oci`]), and small
//! helpers (certificates made by openssl ([`certs`]), a free port, whether the tests run as root, reading an audit file). Every helper
//! starts the real component and fails loudly, never skips, when it is missing.
//!
//! Only tests depend on it (as a dev-dependency); it may depend on anything, and nothing that
//! ships depends on it.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_debug_implementations)]

pub mod certs;
pub mod control_plane;
pub mod k8s;
pub mod oci;
pub mod postgres;
pub mod server;
pub mod softhsm;

/// Whether the tests run as root (some components refuse root and are run as another user).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
}

/// A loopback TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The text of a live audit file, without its preallocated zero tail.
pub fn audit_text(path: &std::path::Path) -> String {
    let mut b = std::fs::read(path).unwrap();
    while b.last() == Some(&0) {
        b.pop();
    }
    String::from_utf8(b).unwrap()
}

/// The records of a live audit file, parsed.
pub fn audit_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    audit_text(path).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}
