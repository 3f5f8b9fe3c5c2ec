//! Key derivation: HKDF-SHA256 (RFC 5869).

use aws_lc_rs::hkdf::{HKDF_SHA256, KeyType, Salt};

use crate::{CryptoError, SecretBytes};

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Derive `len` bytes (at most 255 * 32) from `ikm` with HKDF-SHA256.
pub fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8], len: usize) -> Result<SecretBytes, CryptoError> {
    if len == 0 || len > 255 * 32 {
        return Err(CryptoError::OutOfRange("HKDF output length"));
    }
    let prk = Salt::new(HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    let okm = prk.expand(&info, Len(len)).map_err(|_| CryptoError::OutOfRange("HKDF output length"))?;
    let mut out = vec![0u8; len];
    okm.fill(&mut out).map_err(|_| CryptoError::OutOfRange("HKDF output length"))?;
    Ok(SecretBytes::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 5869 appendix A.1.
    #[test]
    fn rfc5869_case1() {
        let ikm = [0x0b; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let okm = hkdf_sha256(&ikm, &salt, &info, 42).unwrap();
        assert_eq!(
            hex::encode(okm.expose()),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn bounds() {
        assert!(hkdf_sha256(b"k", b"", b"", 0).is_err());
        assert!(hkdf_sha256(b"k", b"", b"", 255 * 32 + 1).is_err());
        assert_eq!(hkdf_sha256(b"k", b"", b"", 255 * 32).unwrap().len(), 255 * 32);
    }
}
