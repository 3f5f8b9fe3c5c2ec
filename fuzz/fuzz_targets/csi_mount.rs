//! CSI Mount requests as the provider decodes them (prost, then attributes JSON, objects YAML,
//! permission, file names): never a panic; whatever is accepted has safe file names and modes.
#![no_main]
use keyward_csi::params::{check_file_name, parse_mount, parse_objects};
use keyward_csi::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = proto::MountRequest::decode(data) {
        if let Ok(m) = parse_mount(&r.attributes, &r.secrets, &r.permission, "keyward", false) {
            for o in &m.objects {
                assert!(check_file_name(&o.file_name).is_ok());
                assert!(o.mode <= 0o777);
            }
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(objs) = parse_objects(s, 0o644) {
            for o in objs {
                assert!(!o.file_name.starts_with('/') && !o.file_name.split('/').any(|e| e == ".." || e.is_empty()));
            }
        }
    }
});
