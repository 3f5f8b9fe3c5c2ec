//! Workload API bodies (from any local process) and kubelet pod lists, as the agent parses
//! them: never a panic; selectors made from a pod list are always well formed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keyward_agent::parse_workload_request(data);
    keyward_agent::kubelet::parse_pod_list(data, "c");
});
