//! `/proc/PID/cgroup` parser: never a panic; whatever it accepts is well formed, and a pod is
//! only ever found under the kubelet's root.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let roots = keyward_attest::cgroup::KubeletRoots::default();
        if let Ok(info) = keyward_attest::cgroup::parse(text, &roots) {
            if info.pod_uid.is_some() {
                assert!(text.lines().any(|l| l.contains(":/kubepods/") || l.contains(":/kubepods.slice/")));
            }
            if let Some(c) = info.container_id {
                assert!(c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            }
            if let Some(p) = info.pod_uid {
                assert_eq!(p.len(), 36);
            }
        }
    }
});
