//! The insecure file seal of `keyward dev`: the root key is kept in the clear in a file readable
//! only by its owner. It exists so a laptop can run Keyward with no ceremony; it protects
//! nothing against anyone who can read the data directory, and says so at every start.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use keyward_core::seal::{Seal, SealError};
use keyward_crypto::SecretBytes;

/// Root key in a 0600 file (`root-key.insecure`).
#[derive(Debug, Clone)]
pub struct InsecureFileSeal {
    path: PathBuf,
}

impl InsecureFileSeal {
    /// A seal keeping the root key at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

impl Seal for InsecureFileSeal {
    fn kind(&self) -> &'static str {
        "insecure-file"
    }

    fn is_insecure(&self) -> bool {
        true
    }

    fn load_or_create(&self) -> Result<(SecretBytes, bool), SealError> {
        match std::fs::File::open(&self.path) {
            Ok(mut f) => {
                let md = f.metadata()?;
                let mode = md.permissions().mode();
                let me = rustix::process::geteuid().as_raw();
                if std::os::unix::fs::MetadataExt::uid(&md) != me {
                    return Err(SealError::Invalid(format!(
                        "{} belongs to another user (uid {}): a key someone else made is not this server's",
                        self.path.display(),
                        std::os::unix::fs::MetadataExt::uid(&md)
                    )));
                }
                if mode & 0o077 != 0 {
                    return Err(SealError::Invalid(format!(
                        "{} is readable by group or others (mode {:o}); run chmod 600 on it",
                        self.path.display(),
                        mode & 0o777
                    )));
                }
                let mut buf = Vec::with_capacity(33);
                std::io::Read::take(&mut f, 33).read_to_end(&mut buf)?;
                if buf.len() != 32 {
                    zeroize::Zeroize::zeroize(&mut buf);
                    return Err(SealError::Invalid(format!(
                        "{} does not hold a 32-byte root key",
                        self.path.display()
                    )));
                }
                Ok((SecretBytes::from_vec(buf), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SecretBytes::random(32).map_err(|e| SealError::Invalid(e.to_string()))?;
                let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&self.path)?;
                f.write_all(key.expose())?;
                f.sync_all()?;
                Ok((key, true))
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_same_key_and_refuses_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root-key.insecure");
        let seal = InsecureFileSeal::new(p.clone());
        let (k1, created) = seal.load_or_create().unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let (k2, created) = seal.load_or_create().unwrap();
        assert!(!created);
        assert!(k1.ct_eq(k2.expose()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(seal.load_or_create().is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, b"short").unwrap();
        assert!(seal.load_or_create().is_err());
    }
}
