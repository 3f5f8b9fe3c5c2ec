//! What ocicrypt sends a key provider (the protocol's JSON, on stdin or inside gRPC) and the
//! annotation it hands back for unwrapping: never a panic; an accepted annotation names a key.
#![no_main]
use keyward_keyprovider::protocol::{Request, parse_request};
use keyward_keyprovider::parse_annotation;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Request::Unwrap { annotation, .. }) = parse_request(data, "keyward") {
        let _ = parse_annotation(&annotation);
    }
    if let Ok(info) = parse_annotation(data) {
        let _ = (info.key, info.key_version, info.layer, info.image);
    }
});
