//! The committed generated code must be exactly what `protoc` + tonic-prost-build make of the
//! proto files in `proto/`. Run with `KEYWARD_REGENERATE=1` to rewrite them after a proto change.
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
    let fresh = std::fs::read_to_string(tmp.path().join("v1alpha1.rs")).expect("generated v2.rs");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(committed);
    if std::env::var_os("KEYWARD_REGENERATE").is_some() {
        std::fs::write(&path, &fresh).expect("write generated code");
        return;
    }
    let old = std::fs::read_to_string(&path).expect("committed generated code");
    assert!(
        old == fresh,
        "{committed} is stale against {proto}; run KEYWARD_REGENERATE=1 cargo test -p keyward-csi --test generated"
    );
}

/// The provider serves code generated with the server half only.
#[test]
fn provider_api_code_matches_the_proto() {
    check("proto/secrets-store/v1alpha1/service.proto", "src/gen/v1alpha1.rs", true, false);
}

/// The conformance tests call it through a client generated separately from the same proto,
/// sharing no types with the provider.
#[test]
fn test_client_code_matches_the_proto() {
    check("proto/secrets-store/v1alpha1/service.proto", "tests/gen/csi_client.rs", false, true);
}
