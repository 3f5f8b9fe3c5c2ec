//! Hashing and HMAC helpers.

use aws_lc_rs::{digest, hmac};

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 over data given in pieces (e.g. a file read in chunks).
pub struct Sha256Stream(digest::Context);

impl std::fmt::Debug for Sha256Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256Stream")
    }
}

impl Default for Sha256Stream {
    fn default() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }
}

impl Sha256Stream {
    /// Add data.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything added.
    pub fn finish(self) -> [u8; 32] {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// HMAC-SHA256 of `data` under `key`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    HmacKey::new(key).sign(data)
}

/// An HMAC-SHA256 key prepared once, for many messages (the audit chain).
pub struct HmacKey(hmac::Key);

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey([REDACTED])")
    }
}

impl HmacKey {
    /// Prepare `key`.
    pub fn new(key: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    /// HMAC-SHA256 of `data`.
    pub fn sign(&self, data: &[u8]) -> [u8; 32] {
        let t = hmac::sign(&self.0, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(t.as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // FIPS 180-2 "abc".
    #[test]
    fn sha256_vector() {
        assert_eq!(hex::encode(sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    // RFC 4231 test case 2.
    #[test]
    fn hmac_rfc4231_case2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
