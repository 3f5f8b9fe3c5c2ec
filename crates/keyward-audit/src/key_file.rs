//! The chain key of a component's own log, kept beside it: 32 raw bytes in a file only its
//! owner may read (the same format the dev seal uses for its root key).

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use keyward_crypto::SecretBytes;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Group or others may read it.
    #[error("{path} is readable by group or others (mode {mode:o}); run chmod 600 on it")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// It does not hold a 32-byte key.
    #[error("{0} does not hold a 32-byte key")]
    Invalid(String),
    /// It could not be read or created.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No random key could be made.
    #[error("generating a key: {0}")]
    Random(#[from] keyward_crypto::CryptoError),
}

/// Read a key file (refusing one that others may read), or create it with a new random key.
pub fn load_or_create(path: &Path) -> Result<SecretBytes, KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.display().to_string(), source };
    match std::fs::File::open(path) {
        Ok(f) => {
            let md = f.metadata().map_err(io)?;
            let mode = md.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Exposed { path: path.display().to_string(), mode: mode & 0o777 });
            }
            if std::os::unix::fs::MetadataExt::uid(&md) != rustix::process::geteuid().as_raw() {
                return Err(KeyFileError::Invalid(format!("{} (it belongs to another user)", path.display())));
            }
            read_key(f, path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretBytes::random(32)?;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
            f.write_all(key.expose()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Read an existing key file (for verification).
pub fn load(path: &Path) -> Result<SecretBytes, KeyFileError> {
    let f =
        std::fs::File::open(path).map_err(|source| KeyFileError::Io { path: path.display().to_string(), source })?;
    read_key(f, path)
}

fn read_key(f: std::fs::File, path: &Path) -> Result<SecretBytes, KeyFileError> {
    let mut buf = Vec::with_capacity(33);
    f.take(33).read_to_end(&mut buf).map_err(|source| KeyFileError::Io { path: path.display().to_string(), source })?;
    if buf.len() != 32 {
        zeroize::Zeroize::zeroize(&mut buf);
        return Err(KeyFileError::Invalid(path.display().to_string()));
    }
    Ok(SecretBytes::from_vec(buf))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_read_and_exposed_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let a = load_or_create(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let b = load_or_create(&p).unwrap();
        assert_eq!(a.expose(), b.expose());
        assert_eq!(load(&p).unwrap().expose(), a.expose());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_create(&p), Err(KeyFileError::Exposed { .. })));
        let short = dir.path().join("short");
        std::fs::write(&short, b"abc").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load_or_create(&short), Err(KeyFileError::Invalid(_))));
    }
}
