//! HPKE (RFC 9180), base mode, one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! ChaCha20-Poly1305 (KEM 0x0020, KDF 0x0001, AEAD 0x0003). Used to seal released secrets to a
//! workload's ephemeral key so that nothing between the server and the workload (the agent,
//! the network) can read them.
//!
//! Built on the `hpke` crate; this module fixes the suite and the single-shot shape, and keeps
//! the recipient's private key in a wiping, non-printing type.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};

use crate::{CryptoError, SecretBytes};

/// Name of the suite, as written in API responses.
pub const SUITE: &str = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20Poly1305";
/// HPKE `info` of attested releases (the release nonce is the associated data).
pub const RELEASE_INFO: &[u8] = b"keyward release v1";
/// Length of a public key and of an encapsulated key.
pub const KEY_LEN: usize = 32;

type Kem = X25519HkdfSha256;

/// A recipient key pair; the private half is wiped on drop and never printed.
pub struct RecipientKey {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; KEY_LEN],
}

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecipientKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl RecipientKey {
    /// A fresh key pair (derived from 32 bytes of system randomness, as RFC 9180 DeriveKeyPair).
    pub fn generate() -> Result<Self, CryptoError> {
        let ikm = SecretBytes::random(32)?;
        let (private, public) = Kem::derive_keypair(ikm.expose());
        let mut pk = [0u8; KEY_LEN];
        pk.copy_from_slice(&public.to_bytes());
        Ok(Self { private, public: pk })
    }

    /// A key pair from a serialized private key (test vectors).
    pub fn from_private(bytes: &[u8]) -> Result<Self, CryptoError> {
        let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes).map_err(|_| CryptoError::InvalidKeyMaterial)?;
        let public = Kem::sk_to_pk(&private);
        let mut pk = [0u8; KEY_LEN];
        pk.copy_from_slice(&public.to_bytes());
        Ok(Self { private, public: pk })
    }

    /// The public key to hand to the sender.
    pub fn public(&self) -> [u8; KEY_LEN] {
        self.public
    }

    /// Open a single-shot message. Any failure is "decryption failed".
    pub fn open(&self, enc: &[u8], ciphertext: &[u8], info: &[u8], aad: &[u8]) -> Result<SecretBytes, CryptoError> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| CryptoError::DecryptionFailed)?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.private,
            &enc,
            info,
            ciphertext,
            aad,
        )
        .map(SecretBytes::from_vec)
        .map_err(|_| CryptoError::DecryptionFailed)
    }
}

/// A message sealed to a recipient: the encapsulated key and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Encapsulated key (32 bytes).
    pub enc: Vec<u8>,
    /// Ciphertext with its 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// Seal `plaintext` to the recipient public key `recipient` (32 bytes).
pub fn seal(recipient: &[u8], info: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Sealed, CryptoError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient)
        .map_err(|_| CryptoError::Malformed("recipient public key (32 bytes of X25519 expected)"))?;
    let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
    let (enc, ciphertext) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        aad,
        &mut rng,
    )
    .map_err(|_| CryptoError::OutOfRange("HPKE seal"))?;
    Ok(Sealed { enc: enc.to_bytes().to_vec(), ciphertext })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 9180 appendix A.2.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, Base):
    /// the first encryption of the sequence is a single-shot message.
    #[test]
    fn rfc9180_a2_base_vector() {
        let r =
            RecipientKey::from_private(&h("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb")).unwrap();
        assert_eq!(r.public().to_vec(), h("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a"));
        let info = h("4f6465206f6e2061204772656369616e2055726e");
        let enc = h("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a");
        let ct = h("1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28");
        let aad = h("436f756e742d30");
        let pt = r.open(&enc, &ct, &info, &aad).unwrap();
        assert_eq!(pt.expose(), b"Beauty is truth, truth beauty");
        // wrong aad, wrong info, flipped bit: all the same error
        assert!(matches!(r.open(&enc, &ct, &info, b"Count-1"), Err(CryptoError::DecryptionFailed)));
        assert!(matches!(r.open(&enc, &ct, b"", &aad), Err(CryptoError::DecryptionFailed)));
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(matches!(r.open(&enc, &bad, &info, &aad), Err(CryptoError::DecryptionFailed)));
        assert!(matches!(r.open(&enc[..31], &ct, &info, &aad), Err(CryptoError::DecryptionFailed)));
    }

    #[test]
    fn seal_open_roundtrip_and_only_the_recipient_opens() {
        let r = RecipientKey::generate().unwrap();
        let other = RecipientKey::generate().unwrap();
        let s = seal(&r.public(), b"info", b"aad", b"secret").unwrap();
        assert_eq!(s.enc.len(), KEY_LEN);
        assert_eq!(r.open(&s.enc, &s.ciphertext, b"info", b"aad").unwrap().expose(), b"secret");
        assert!(other.open(&s.enc, &s.ciphertext, b"info", b"aad").is_err());
        assert!(seal(&[0u8; 31], b"", b"", b"x").is_err());
        assert!(!format!("{r:?}").contains("private"));
    }
}
