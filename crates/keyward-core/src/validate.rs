//! Validation of names, paths and encryption contexts.

use std::collections::BTreeMap;

use crate::KmsError;
use crate::limits::*;

/// Key names: 1 to 128 characters of `A-Z a-z 0-9 _ - .`, starting with a letter or digit.
pub fn key_name(name: &str) -> Result<(), KmsError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_KEY_NAME
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(KmsError::invalid(format!(
            "key name {name:?} is invalid: use 1 to {MAX_KEY_NAME} characters from A-Z a-z 0-9 _ - ., starting with a letter or digit"
        )))
    }
}

/// Check an alias: `alias/` and then what a key name may be.
pub fn alias_name(name: &str) -> Result<(), KmsError> {
    match name.strip_prefix(crate::service::ALIAS_PREFIX) {
        Some(rest) if key_name(rest).is_ok() => Ok(()),
        _ => Err(KmsError::invalid(format!(
            "alias {name:?} is invalid: `alias/` then 1 to {MAX_KEY_NAME} characters from A-Z a-z 0-9 _ - ., \
             starting with a letter or digit"
        ))),
    }
}

/// The first path segment reserved for Keyward's own secrets (randomized secret values).
pub const RESERVED_SECRET_PREFIX: &str = "_keyward/";

/// Secret paths as callers may name them: [`internal_secret_path`] rules, and not under
/// [`RESERVED_SECRET_PREFIX`].
pub fn secret_path(path: &str) -> Result<(), KmsError> {
    if path.starts_with(RESERVED_SECRET_PREFIX) {
        return Err(KmsError::invalid(format!(
            "secret paths under {RESERVED_SECRET_PREFIX} are reserved for Keyward; choose another path"
        )));
    }
    internal_secret_path(path)
}

/// Secret paths: `/`-separated segments of `A-Z a-z 0-9 _ - . @ +`, no empty, `.` or `..`
/// segment, at most 512 bytes.
pub fn internal_secret_path(path: &str) -> Result<(), KmsError> {
    let ok = !path.is_empty()
        && path.len() <= MAX_SECRET_PATH
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@' | b'+'))
        });
    if ok {
        Ok(())
    } else {
        Err(KmsError::invalid(format!(
            "secret path {path:?} is invalid: use '/'-separated segments of A-Z a-z 0-9 _ - . @ +, with no empty, '.' or '..' segment, at most {MAX_SECRET_PATH} bytes"
        )))
    }
}

/// Secret list prefixes: empty, or a path prefix of allowed characters.
pub fn secret_prefix(prefix: &str) -> Result<(), KmsError> {
    let ok = prefix.len() <= MAX_SECRET_PATH
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@' | b'+' | b'/'));
    if ok { Ok(()) } else { Err(KmsError::invalid(format!("secret prefix {prefix:?} contains invalid characters"))) }
}

/// Encryption contexts: at most 32 entries, non-empty keys up to 128 bytes, values up to 1024.
pub fn context(ctx: &BTreeMap<String, String>) -> Result<(), KmsError> {
    if ctx.len() > MAX_CONTEXT_ENTRIES {
        return Err(KmsError::invalid(format!("encryption context has more than {MAX_CONTEXT_ENTRIES} entries")));
    }
    for (k, v) in ctx {
        if k.is_empty() || k.chars().count() > MAX_CONTEXT_KEY {
            return Err(KmsError::invalid(format!(
                "encryption context keys must be 1 to {MAX_CONTEXT_KEY} characters"
            )));
        }
        if v.chars().count() > MAX_CONTEXT_VALUE {
            return Err(KmsError::invalid(format!(
                "encryption context values must be at most {MAX_CONTEXT_VALUE} characters"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(key_name("payments-kek.v1_a").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"a".repeat(129), "é"] {
            assert!(key_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert!(secret_path("app/db/password").is_ok());
        for bad in ["", "/a", "a/", "a//b", "a/../b", "./a", "a b", "a\0b", &"a".repeat(513)] {
            assert!(secret_path(bad).is_err(), "{bad:?}");
        }
    }
}
