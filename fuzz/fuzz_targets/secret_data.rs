//! The stored secret encoding decoder: never a panic, and encode(decode(x)) == x when it decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keyward_core::secretdata::fuzz_roundtrip(data);
});
