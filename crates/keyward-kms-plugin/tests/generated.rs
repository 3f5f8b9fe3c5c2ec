//! All committed generated gRPC code in the workspace (this crate's, keyward-csi's and
//! keyward-keyprovider's) must be
//! exactly what `protoc` + tonic-prost-build make of the proto files in `proto/`. Run with
//! `KEYWARD_REGENERATE=1` to rewrite them after a proto change.
//! Needs `protoc` (Debian: protobuf-compiler), which `.ci/run` installs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn generate(proto: &str, out: &Path, server: bool, client: bool) {
    tonic_prost_build::configure()
        .build_server(server)
        .build_client(client)
        .out_dir(out)
        .compile_protos(&[root().join(proto)], &[root().join("proto")])
        .unwrap_or_else(|e| panic!("protoc failed on {proto} (is protobuf-compiler installed?): {e}"));
}

fn check(proto: &str, committed: &str, server: bool, client: bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    generate(proto, tmp.path(), server, client);
    let package = if proto.contains("secrets-store") {
        "v1alpha1.rs"
    } else if proto.contains("ocicrypt") {
        "keyprovider.rs"
    } else {
        "v2.rs"
    };
    let fresh = std::fs::read_to_string(tmp.path().join(package)).expect("generated code");
    let path = root().join(committed);
    if std::env::var_os("KEYWARD_REGENERATE").is_some() {
        std::fs::write(&path, &fresh).expect("write generated code");
        return;
    }
    let old = std::fs::read_to_string(&path).expect("committed generated code");
    assert!(
        old == fresh,
        "{committed} is stale against {proto}; run KEYWARD_REGENERATE=1 cargo test -p keyward-kms-plugin --test generated"
    );
}

/// The plugin serves code generated with the server half only.
#[test]
fn plugin_api_code_matches_the_proto() {
    check("proto/k8s/kms/v2/api.proto", "crates/keyward-kms-plugin/src/gen/v2.rs", true, false);
}

/// The conformance tests call it through a client generated separately from the same proto,
/// sharing no types with the plugin.
#[test]
fn test_client_code_matches_the_proto() {
    check("proto/k8s/kms/v2/api.proto", "crates/keyward-kms-plugin/tests/gen/kms_v2_client.rs", false, true);
}

#[test]
fn storage_format_code_matches_the_proto() {
    check("proto/k8s/apiserver/kmsv2/api.proto", "crates/keyward-kms-plugin/tests/gen/storage_v2.rs", false, false);
}

/// The CSI provider serves the server half of the Secrets Store provider API.
#[test]
fn csi_provider_code_matches_the_proto() {
    check("proto/secrets-store/v1alpha1/service.proto", "crates/keyward-csi/src/gen/v1alpha1.rs", true, false);
}

/// Its tests call it through a separately generated client.
#[test]
fn csi_test_client_code_matches_the_proto() {
    check("proto/secrets-store/v1alpha1/service.proto", "crates/keyward-csi/tests/gen/csi_client.rs", false, true);
}

/// The ocicrypt key provider serves the server half of `keyprovider.KeyProviderService`; its
/// interoperability tests use skopeo as the client.
#[test]
fn key_provider_code_matches_the_proto() {
    check("proto/ocicrypt/keyprovider.proto", "crates/keyward-keyprovider/src/gen/keyprovider.rs", true, false);
}
