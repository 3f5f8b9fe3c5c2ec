//! Certificates made by the `openssl` command (Debian `openssl`), independently of the TLS
//! library Keyward uses: a self-signed CA, and EC P-256 certificates it signs with the
//! extensions a test asks for. Every file is written in the given directory.

use std::path::Path;
use std::process::Command;

/// Run `openssl` in `dir`; its standard output. Fails loudly when openssl is missing or fails.
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is required for this test (apt-get install openssl)");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// A self-signed CA: `NAME.key`, `NAME.pem`, subject `/CN=cn`, valid two days.
pub fn ca(dir: &Path, name: &str, cn: &str) {
    let (key, pem, subj) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={cn}"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
        ],
    );
}

/// `NAME.key` and `NAME.pem`, subject `subj`, signed by the CA `ca` (`ca.pem`/`ca.key` for
/// "ca"), with the extension lines `ext` (e.g. `subjectAltName=IP:127.0.0.1`), valid two days.
pub fn signed(dir: &Path, ca: &str, name: &str, subj: &str, ext: &str) {
    let (key, csr, pem, cnf) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.cnf"));
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subj,
        ],
    );
    std::fs::write(dir.join(&cnf), ext).unwrap();
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &cnf,
        ],
    );
}
