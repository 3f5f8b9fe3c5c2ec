//! Every API request body type, parsed strictly from untrusted bytes: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keyward_server::wire::parse_all_request_types(data);
});
