//! Key material for every key type Keyward supports, and the operations each type allows.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::hmac;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};

use crate::aead::AeadKey;
use crate::{CryptoError, SecretBytes};

/// The key types ("key specs") Keyward supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// AES-256-GCM: encrypt, decrypt, re-encrypt, generate data keys.
    Aes256Gcm,
    /// HMAC-SHA256: generate and verify MACs.
    HmacSha256,
    /// Ed25519 (RFC 8032): sign and verify.
    Ed25519,
    /// ECDSA on P-256 with SHA-256, ASN.1 DER signatures: sign and verify.
    EcdsaP256,
}

impl KeyAlgorithm {
    /// All algorithms, in documentation order.
    pub const ALL: [KeyAlgorithm; 4] = [Self::Aes256Gcm, Self::HmacSha256, Self::Ed25519, Self::EcdsaP256];

    /// The API name (`aes256-gcm`, `hmac-sha256`, `ed25519`, `ecdsa-p256`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aes256Gcm => "aes256-gcm",
            Self::HmacSha256 => "hmac-sha256",
            Self::Ed25519 => "ed25519",
            Self::EcdsaP256 => "ecdsa-p256",
        }
    }

    /// Parse an API name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether keys of this type sign and verify.
    pub fn is_signing(self) -> bool {
        matches!(self, Self::Ed25519 | Self::EcdsaP256)
    }

    /// Generate fresh key material (raw key bytes for symmetric types, PKCS#8 for key pairs).
    pub fn generate(self) -> Result<SecretBytes, CryptoError> {
        match self {
            Self::Aes256Gcm | Self::HmacSha256 => SecretBytes::random(32),
            Self::Ed25519 => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| CryptoError::Rng)?;
                Ok(SecretBytes::copy_from(doc.as_ref()))
            }
            Self::EcdsaP256 => {
                let doc =
                    EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                        .map_err(|_| CryptoError::Rng)?;
                Ok(SecretBytes::copy_from(doc.as_ref()))
            }
        }
    }
}

/// Key material loaded for use.
pub enum LoadedKey {
    /// AES-256-GCM.
    Aead(AeadKey),
    /// HMAC-SHA256.
    Hmac(Box<hmac::Key>),
    /// Ed25519 key pair.
    Ed25519(Ed25519KeyPair),
    /// ECDSA P-256 key pair.
    EcdsaP256(EcdsaKeyPair),
}

impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::Aead(_) => "aes256-gcm",
            Self::Hmac(_) => "hmac-sha256",
            Self::Ed25519(_) => "ed25519",
            Self::EcdsaP256(_) => "ecdsa-p256",
        };
        write!(f, "LoadedKey({kind}, [REDACTED])")
    }
}

impl LoadedKey {
    /// Load material produced by [`KeyAlgorithm::generate`].
    pub fn load(alg: KeyAlgorithm, material: &SecretBytes) -> Result<Self, CryptoError> {
        Ok(match alg {
            KeyAlgorithm::Aes256Gcm => Self::Aead(AeadKey::new(material)?),
            KeyAlgorithm::HmacSha256 => {
                if material.len() != 32 {
                    return Err(CryptoError::InvalidKeyMaterial);
                }
                Self::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, material.expose())))
            }
            KeyAlgorithm::Ed25519 => Self::Ed25519(
                Ed25519KeyPair::from_pkcs8(material.expose()).map_err(|_| CryptoError::InvalidKeyMaterial)?,
            ),
            KeyAlgorithm::EcdsaP256 => Self::EcdsaP256(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, material.expose())
                    .map_err(|_| CryptoError::InvalidKeyMaterial)?,
            ),
        })
    }

    /// The AEAD key, if this is an encryption key.
    pub fn aead(&self) -> Option<&AeadKey> {
        match self {
            Self::Aead(k) => Some(k),
            _ => None,
        }
    }

    /// The public key as DER SubjectPublicKeyInfo, for signing keys.
    pub fn public_key_der(&self) -> Option<Vec<u8>> {
        match self {
            Self::Ed25519(k) => k.public_key().as_der().ok().map(|d| d.as_ref().to_vec()),
            Self::EcdsaP256(k) => k.public_key().as_der().ok().map(|d| d.as_ref().to_vec()),
            _ => None,
        }
    }

    /// The raw 32-byte public key of an Ed25519 key (RFC 8032 encoding).
    pub fn ed25519_public_raw(&self) -> Option<[u8; 32]> {
        match self {
            Self::Ed25519(k) => <[u8; 32]>::try_from(k.public_key().as_ref()).ok(),
            _ => None,
        }
    }

    /// Sign `message` (signing keys only).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match self {
            Self::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Self::EcdsaP256(k) => {
                k.sign(&SystemRandom::new(), message).map(|s| s.as_ref().to_vec()).map_err(|_| CryptoError::Rng)
            }
            _ => Err(CryptoError::InvalidKeyMaterial),
        }
    }

    /// Sign a SHA-256 digest the caller computed over its message (ECDSA P-256 only: the
    /// signature is the one [`LoadedKey::sign`] makes over that message). Ed25519 signs whole
    /// messages (PureEdDSA), so it refuses.
    pub fn sign_digest_sha256(&self, digest: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match self {
            Self::EcdsaP256(k) => {
                let d = aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
                    .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                k.sign_digest(&d).map(|s| s.as_ref().to_vec()).map_err(|_| CryptoError::Rng)
            }
            _ => Err(CryptoError::InvalidKeyMaterial),
        }
    }

    /// Verify a signature over the message whose SHA-256 digest is `digest` (ECDSA P-256 only).
    pub fn verify_digest_sha256(&self, digest: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
        match self {
            Self::EcdsaP256(k) => {
                let d = aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
                    .map_err(|_| CryptoError::VerificationFailed)?;
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, k.public_key().as_ref())
                    .verify_digest(&d, sig)
                    .map_err(|_| CryptoError::VerificationFailed)
            }
            _ => Err(CryptoError::InvalidKeyMaterial),
        }
    }

    /// Verify a signature made by [`LoadedKey::sign`].
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
        let (alg, public): (&dyn signature::VerificationAlgorithm, &[u8]) = match self {
            Self::Ed25519(k) => (&signature::ED25519, k.public_key().as_ref()),
            Self::EcdsaP256(k) => (&signature::ECDSA_P256_SHA256_ASN1, k.public_key().as_ref()),
            _ => return Err(CryptoError::InvalidKeyMaterial),
        };
        signature::UnparsedPublicKey::new(alg, public).verify(message, sig).map_err(|_| CryptoError::VerificationFailed)
    }

    /// HMAC-SHA256 tag of `message` (MAC keys only).
    pub fn mac(&self, message: &[u8]) -> Result<[u8; 32], CryptoError> {
        match self {
            Self::Hmac(k) => {
                let t = hmac::sign(k, message);
                let mut out = [0u8; 32];
                out.copy_from_slice(t.as_ref());
                Ok(out)
            }
            _ => Err(CryptoError::InvalidKeyMaterial),
        }
    }

    /// Verify an HMAC-SHA256 tag in constant time.
    pub fn verify_mac(&self, message: &[u8], tag: &[u8]) -> Result<(), CryptoError> {
        match self {
            Self::Hmac(k) => hmac::verify(k, message, tag).map_err(|_| CryptoError::VerificationFailed),
            _ => Err(CryptoError::InvalidKeyMaterial),
        }
    }
}

/// Verify an Ed25519 signature with a raw 32-byte public key (test vectors, clients).
pub fn verify_ed25519_raw(public: &[u8], message: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
    signature::UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(message, sig)
        .map_err(|_| CryptoError::VerificationFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_digest_is_a_signature_of_the_message() {
        let m = KeyAlgorithm::EcdsaP256.generate().unwrap();
        let k = LoadedKey::load(KeyAlgorithm::EcdsaP256, &m).unwrap();
        let msg = vec![7u8; 200_000];
        let d = crate::hash::sha256(&msg);
        let sig = k.sign_digest_sha256(&d).unwrap();
        k.verify(&msg, &sig).unwrap();
        k.verify_digest_sha256(&d, &sig).unwrap();
        k.verify_digest_sha256(&d, &k.sign(&msg).unwrap()).unwrap();
        assert!(k.verify(b"other", &sig).is_err());
        assert!(k.sign_digest_sha256(&d[..31]).is_err(), "a digest has 32 bytes");
        let e = LoadedKey::load(KeyAlgorithm::Ed25519, &KeyAlgorithm::Ed25519.generate().unwrap()).unwrap();
        assert!(e.sign_digest_sha256(&d).is_err(), "Ed25519 signs whole messages");
    }

    #[test]
    fn every_algorithm_generates_loads_and_works() {
        for alg in KeyAlgorithm::ALL {
            assert_eq!(KeyAlgorithm::parse(alg.as_str()), Some(alg));
            let m = alg.generate().unwrap();
            let k = LoadedKey::load(alg, &m).unwrap();
            match alg {
                KeyAlgorithm::Aes256Gcm => assert!(k.aead().is_some()),
                KeyAlgorithm::HmacSha256 => {
                    let t = k.mac(b"m").unwrap();
                    k.verify_mac(b"m", &t).unwrap();
                    assert!(k.verify_mac(b"n", &t).is_err());
                }
                _ => {
                    let s = k.sign(b"m").unwrap();
                    k.verify(b"m", &s).unwrap();
                    assert!(k.verify(b"n", &s).is_err());
                    assert!(k.public_key_der().is_some());
                }
            }
            // Material of one type is not accepted as another where formats differ.
            if alg.is_signing() {
                assert!(LoadedKey::load(KeyAlgorithm::Aes256Gcm, &m).is_err());
            }
        }
        assert_eq!(KeyAlgorithm::parse("rsa-2048"), None);
    }

    // RFC 8032 section 7.1, TEST 2.
    #[test]
    fn ed25519_rfc8032_test2() {
        let public = hex::decode("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c").unwrap();
        let sig = hex::decode(concat!(
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da",
            "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        ))
        .unwrap();
        verify_ed25519_raw(&public, &[0x72], &sig).unwrap();
        assert!(verify_ed25519_raw(&public, &[0x73], &sig).is_err());
    }

    #[test]
    fn bad_material_rejected() {
        assert!(LoadedKey::load(KeyAlgorithm::HmacSha256, &SecretBytes::copy_from(&[1; 31])).is_err());
        assert!(LoadedKey::load(KeyAlgorithm::Ed25519, &SecretBytes::copy_from(&[1; 48])).is_err());
        assert!(LoadedKey::load(KeyAlgorithm::EcdsaP256, &SecretBytes::copy_from(&[1; 48])).is_err());
    }
}
