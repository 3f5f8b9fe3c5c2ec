//! `/proc/PID/cgroup` parser: never a panic; whatever it accepts is well formed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(info) = keyward_attest::cgroup::parse(text) {
            if let Some(c) = info.container_id {
                assert!(c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            }
            if let Some(p) = info.pod_uid {
                assert_eq!(p.len(), 36);
            }
        }
    }
});
