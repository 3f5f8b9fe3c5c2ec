//! Secret byte buffers.

use zeroize::Zeroize;

use crate::CryptoError;

/// Secret bytes: key material, plaintext, tokens.
///
/// - wiped (zeroized) when dropped;
/// - `Debug` prints only the length, never the contents;
/// - no `Clone`, `Display`, `Serialize`, `Hash` or derived `PartialEq`: use [`SecretBytes::ct_eq`];
/// - the only way to the bytes is [`SecretBytes::expose`], which is easy to audit with grep.
pub struct SecretBytes(Box<[u8]>);

impl SecretBytes {
    /// Take ownership of `v`. If the vector has spare capacity its buffer is copied into an exact
    /// allocation and the original buffer (including the spare capacity) is wiped.
    pub fn from_vec(mut v: Vec<u8>) -> Self {
        if v.capacity() == v.len() {
            return Self(v.into_boxed_slice());
        }
        let exact: Box<[u8]> = v.as_slice().into();
        v.zeroize();
        Self(exact)
    }

    /// Copy `bytes` into a new secret. The caller remains responsible for wiping its copy.
    pub fn copy_from(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }

    /// `len` fresh random bytes.
    pub fn random(len: usize) -> Result<Self, CryptoError> {
        let mut b = vec![0u8; len].into_boxed_slice();
        crate::fill_random(&mut b)?;
        Ok(Self(b))
    }

    /// The secret bytes. Every call site is a place where the secret leaves this type.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        crate::ct_eq(&self.0, other)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_content() {
        let s = SecretBytes::copy_from(b"hunter2-very-secret");
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2"));
        assert!(d.contains("REDACTED"));
    }

    #[test]
    fn from_vec_with_spare_capacity_keeps_content() {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(b"abc");
        let s = SecretBytes::from_vec(v);
        assert_eq!(s.expose(), b"abc");
        assert!(s.ct_eq(b"abc"));
        assert!(!s.ct_eq(b"abd"));
        assert!(!s.ct_eq(b"ab"));
    }

    #[test]
    fn random_is_random() {
        let a = SecretBytes::random(32).unwrap();
        let b = SecretBytes::random(32).unwrap();
        assert_eq!(a.len(), 32);
        assert!(!a.ct_eq(b.expose()));
    }
}
