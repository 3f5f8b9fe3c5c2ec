//! AES-256-GCM with random 96-bit nonces.
//!
//! Sealed form: `nonce (12) || ciphertext || tag (16)`. Random nonces bound the safe number of
//! messages per key to about 2^32; Keyward keys rotate (and can rotate automatically) well before.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::{CryptoError, SecretBytes};

/// Length of the nonce prepended to sealed data.
pub const NONCE_SIZE: usize = NONCE_LEN;
/// Length of the GCM authentication tag.
pub const TAG_SIZE: usize = 16;
/// Length of an AES-256 key.
pub const KEY_SIZE: usize = 32;

/// An AES-256-GCM key ready for use.
pub struct AeadKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey([REDACTED])")
    }
}

impl AeadKey {
    /// Load a 32-byte key.
    pub fn new(key: &SecretBytes) -> Result<Self, CryptoError> {
        if key.len() != KEY_SIZE {
            return Err(CryptoError::InvalidKeyMaterial);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key.expose()).map_err(|_| CryptoError::InvalidKeyMaterial)?;
        Ok(Self { key: LessSafeKey::new(unbound) })
    }

    /// Encrypt `plaintext` with a fresh random nonce; returns `nonce || ciphertext || tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(NONCE_SIZE + plaintext.len() + TAG_SIZE);
        self.seal_into(aad, plaintext, &mut out)?;
        Ok(out)
    }

    /// Like [`AeadKey::seal`], appending `nonce || ciphertext || tag` to `out`.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let mut nonce = [0u8; NONCE_SIZE];
        crate::fill_random(&mut nonce)?;
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])
            .map_err(|_| CryptoError::OutOfRange("plaintext too long"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypt `nonce || ciphertext || tag`. Any failure is [`CryptoError::DecryptionFailed`].
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, CryptoError> {
        if sealed.len() < NONCE_SIZE + TAG_SIZE {
            return Err(CryptoError::DecryptionFailed);
        }
        let (nonce, rest) = sealed.split_at(NONCE_SIZE);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::DecryptionFailed)?;
        let mut buf = rest.to_vec();
        let n = match self.key.open_in_place(nonce, Aad::from(aad), &mut buf) {
            Ok(pt) => pt.len(),
            Err(_) => {
                zeroize::Zeroize::zeroize(&mut buf);
                return Err(CryptoError::DecryptionFailed);
            }
        };
        buf.truncate(n);
        Ok(SecretBytes::from_vec(buf))
    }

    /// Decrypt with an explicit nonce (for test vectors and foreign formats).
    pub fn open_with_nonce(
        &self,
        nonce: &[u8; NONCE_SIZE],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<SecretBytes, CryptoError> {
        let mut sealed = Vec::with_capacity(NONCE_SIZE + ciphertext_and_tag.len());
        sealed.extend_from_slice(nonce);
        sealed.extend_from_slice(ciphertext_and_tag);
        self.open(aad, &sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hexkey: &str) -> AeadKey {
        AeadKey::new(&SecretBytes::from_vec(hex::decode(hexkey).unwrap())).unwrap()
    }

    // NIST GCM test vectors (gcmEncryptExtIV256.rsp / McGrew-Viega test case 16): key, IV, AAD,
    // plaintext, ciphertext||tag.
    #[test]
    fn nist_vector_case16() {
        let k = key("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let iv: [u8; 12] = hex::decode("cafebabefacedbaddecaf888").unwrap().try_into().unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let pt = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .unwrap();
        let ct = hex::decode(concat!(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
            "76fc6ece0f4e1768cddf8853bb2d551b"
        ))
        .unwrap();
        assert_eq!(k.open_with_nonce(&iv, &aad, &ct).unwrap().expose(), &pt[..]);
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert_eq!(k.open_with_nonce(&iv, &aad, &bad).unwrap_err(), CryptoError::DecryptionFailed);
    }

    // NIST test case 13: zero key, empty plaintext.
    #[test]
    fn nist_vector_case13_empty() {
        let k = key("0000000000000000000000000000000000000000000000000000000000000000");
        let iv = [0u8; 12];
        let tag = hex::decode("530f8afbc74536b9a963b4f1c4cb738b").unwrap();
        assert!(k.open_with_nonce(&iv, b"", &tag).unwrap().is_empty());
    }

    #[test]
    fn roundtrip_and_every_bit_flip_fails() {
        let k = AeadKey::new(&SecretBytes::random(32).unwrap()).unwrap();
        let sealed = k.seal(b"ctx", b"attack at dawn").unwrap();
        assert_eq!(k.open(b"ctx", &sealed).unwrap().expose(), b"attack at dawn");
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x80;
            assert_eq!(k.open(b"ctx", &t).unwrap_err(), CryptoError::DecryptionFailed);
        }
        for n in 0..sealed.len() {
            assert_eq!(k.open(b"ctx", &sealed[..n]).unwrap_err(), CryptoError::DecryptionFailed);
        }
    }

    #[test]
    fn wrong_key_length_rejected() {
        assert!(AeadKey::new(&SecretBytes::copy_from(&[0u8; 16])).is_err());
    }
}
