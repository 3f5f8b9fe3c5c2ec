//! A throwaway SoftHSM2 token (Debian `softhsm2`), created by `softhsm2-util` in a directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// SoftHSM2's PKCS#11 library (Debian `softhsm2`).
pub const SOFTHSM_LIB: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 configuration in `dir` with one token labelled `label` (user PIN `pin`),
/// initialised by `softhsm2-util`. Returns the configuration file for `SOFTHSM2_CONF`.
pub fn softhsm_token(dir: &Path, label: &str, pin: &str) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label, "--so-pin", "12345678", "--pin", pin])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util is required for this test (apt-get install softhsm2)");
    assert!(out.status.success(), "softhsm2-util --init-token: {}", String::from_utf8_lossy(&out.stderr));
    assert!(Path::new(SOFTHSM_LIB).exists(), "{SOFTHSM_LIB} is missing (apt-get install softhsm2)");
    conf
}
