//! HPKE (RFC 9180), base mode, one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! ChaCha20-Poly1305 (KEM 0x0020, KDF 0x0001, AEAD 0x0003), single-shot. Used to seal released
//! secrets to a workload's ephemeral key so that nothing between the server and the workload
//! (the agent, the network) can read them.
//!
//! Built on aws-lc-rs, the crate's one crypto stack: X25519 from `agreement` (aws-lc's
//! assembly, about twice as fast here as the portable field arithmetic of the `hpke` crate,
//! which matters because every attested release pays for two X25519 operations on each side),
//! HMAC-SHA256 for the labelled HKDF steps and ChaCha20-Poly1305 from `aead`. This module holds
//! only RFC 9180's key schedule (sections 4.1, 5.1 and 5.2); it is checked against the RFC's
//! test vector and, in both directions, against the independent `hpke` crate.

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use crate::{CryptoError, SecretBytes};

/// Name of the suite, as written in API responses.
pub const SUITE: &str = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20Poly1305";
/// HPKE `info` of attested releases (the release nonce is the associated data).
pub const RELEASE_INFO: &[u8] = b"keyward release v1";
/// Length of a public key and of an encapsulated key.
pub const KEY_LEN: usize = 32;

/// `"KEM" || I2OSP(kem_id, 2)`: the DHKEM's suite id.
const KEM_SUITE_ID: &[u8] = b"KEM\x00\x20";
/// `"HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2) || I2OSP(aead_id, 2)`.
const HPKE_SUITE_ID: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";
const MODE_BASE: u8 = 0;
const HASH_LEN: usize = 32;
const AEAD_KEY_LEN: usize = 32;
const AEAD_NONCE_LEN: usize = 12;

type Prk = Zeroizing<[u8; HASH_LEN]>;

/// `LabeledExtract(salt, label, ikm)` = HMAC-SHA256(salt, "HPKE-v1" || suite_id || label || ikm).
/// An empty salt is HKDF's string of zeros, which HMAC pads the same way as the empty key.
fn labeled_extract(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Prk {
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, salt));
    for part in [b"HPKE-v1".as_slice(), suite_id, label, ikm] {
        ctx.update(part);
    }
    let mut out = Zeroizing::new([0u8; HASH_LEN]);
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// `LabeledExpand(prk, label, info, L)` for `L` up to one hash length, where HKDF-Expand is a
/// single block: HMAC-SHA256(prk, I2OSP(L, 2) || "HPKE-v1" || suite_id || label || info || 0x01).
fn labeled_expand<const L: usize>(suite_id: &[u8], prk: &[u8], label: &[u8], info: &[u8]) -> Zeroizing<[u8; L]> {
    const { assert!(L <= HASH_LEN) };
    let len = u16::try_from(L).unwrap_or(u16::MAX).to_be_bytes();
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, prk));
    for part in [len.as_slice(), b"HPKE-v1", suite_id, label, info, &[1u8]] {
        ctx.update(part);
    }
    let mut out = Zeroizing::new([0u8; L]);
    out.copy_from_slice(&ctx.sign().as_ref()[..L]);
    out
}

/// X25519 with `private` and the peer's public key; aws-lc refuses an all-zero result (a
/// low-order peer key), as RFC 9180 section 7.1.4 requires.
fn dh(private: &PrivateKey, peer: &[u8]) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    agreement::agree(private, UnparsedPublicKey::new(&X25519, peer), (), |shared| {
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        if shared.len() != KEY_LEN {
            return Err(());
        }
        out.copy_from_slice(shared);
        Ok(out)
    })
    .ok()
}

/// DHKEM `ExtractAndExpand(dh, enc || pkR)`: the KEM's shared secret.
fn kem_shared_secret(dh: &[u8], enc: &[u8], recipient: &[u8]) -> Prk {
    let eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh);
    let mut kem_context = [0u8; 2 * KEY_LEN];
    kem_context[..KEY_LEN].copy_from_slice(enc);
    kem_context[KEY_LEN..].copy_from_slice(recipient);
    labeled_expand::<HASH_LEN>(KEM_SUITE_ID, eae_prk.as_slice(), b"shared_secret", &kem_context)
}

/// The base-mode key schedule: the AEAD key and its first (and, single-shot, only) nonce.
fn key_schedule(shared_secret: &[u8], info: &[u8]) -> (LessSafeKey, Nonce) {
    let psk_id_hash = labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info);
    let mut context = [0u8; 1 + 2 * HASH_LEN];
    context[0] = MODE_BASE;
    context[1..=HASH_LEN].copy_from_slice(psk_id_hash.as_slice());
    context[1 + HASH_LEN..].copy_from_slice(info_hash.as_slice());
    let secret = labeled_extract(HPKE_SUITE_ID, shared_secret, b"secret", b"");
    let key = labeled_expand::<AEAD_KEY_LEN>(HPKE_SUITE_ID, secret.as_slice(), b"key", &context);
    let nonce = labeled_expand::<AEAD_NONCE_LEN>(HPKE_SUITE_ID, secret.as_slice(), b"base_nonce", &context);
    // A 32-byte key always makes a ChaCha20-Poly1305 key.
    let key = UnboundKey::new(&CHACHA20_POLY1305, key.as_slice())
        .map(LessSafeKey::new)
        .unwrap_or_else(|_| unreachable!("32-byte ChaCha20-Poly1305 key"));
    (key, Nonce::assume_unique_for_key(*nonce))
}

fn public_of(private: &PrivateKey) -> Result<[u8; KEY_LEN], CryptoError> {
    let public = private.compute_public_key().map_err(|_| CryptoError::InvalidKeyMaterial)?;
    <[u8; KEY_LEN]>::try_from(public.as_ref()).map_err(|_| CryptoError::InvalidKeyMaterial)
}

/// A recipient key pair; the private half stays inside aws-lc (which wipes it when freed) and
/// is never printed.
pub struct RecipientKey {
    private: PrivateKey,
    public: [u8; KEY_LEN],
}

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecipientKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl RecipientKey {
    /// A fresh key pair from the system's randomness.
    pub fn generate() -> Result<Self, CryptoError> {
        let private = PrivateKey::generate(&X25519).map_err(|_| CryptoError::Rng)?;
        Ok(Self { public: public_of(&private)?, private })
    }

    /// A key pair from a serialized private key (test vectors).
    pub fn from_private(bytes: &[u8]) -> Result<Self, CryptoError> {
        let private = PrivateKey::from_private_key(&X25519, bytes).map_err(|_| CryptoError::InvalidKeyMaterial)?;
        Ok(Self { public: public_of(&private)?, private })
    }

    /// The public key to hand to the sender.
    pub fn public(&self) -> [u8; KEY_LEN] {
        self.public
    }

    /// Open a single-shot message. Any failure is "decryption failed".
    pub fn open(&self, enc: &[u8], ciphertext: &[u8], info: &[u8], aad: &[u8]) -> Result<SecretBytes, CryptoError> {
        if enc.len() != KEY_LEN {
            return Err(CryptoError::DecryptionFailed);
        }
        let dh = dh(&self.private, enc).ok_or(CryptoError::DecryptionFailed)?;
        let shared = kem_shared_secret(dh.as_slice(), enc, &self.public);
        let (key, nonce) = key_schedule(shared.as_slice(), info);
        // Opened in place in a buffer that is wiped when dropped; the plaintext is copied out.
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let plaintext =
            key.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| CryptoError::DecryptionFailed)?;
        Ok(SecretBytes::copy_from(plaintext))
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
    let ephemeral = PrivateKey::generate(&X25519).map_err(|_| CryptoError::Rng)?;
    seal_with(&ephemeral, recipient, info, aad, plaintext)
}

/// [`seal`] with a given ephemeral key (RFC 9180's test vectors fix it).
fn seal_with(
    ephemeral: &PrivateKey,
    recipient: &[u8],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, CryptoError> {
    let malformed = || CryptoError::Malformed("recipient public key (32 bytes of X25519 expected)");
    if recipient.len() != KEY_LEN {
        return Err(malformed());
    }
    let enc = public_of(ephemeral)?;
    let dh = dh(ephemeral, recipient).ok_or_else(malformed)?;
    let shared = kem_shared_secret(dh.as_slice(), &enc, recipient);
    let (key, nonce) = key_schedule(shared.as_slice(), info);
    let mut ciphertext = Vec::with_capacity(plaintext.len() + CHACHA20_POLY1305.tag_len());
    ciphertext.extend_from_slice(plaintext);
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut ciphertext)
        .map_err(|_| CryptoError::OutOfRange("HPKE seal"))?;
    Ok(Sealed { enc: enc.to_vec(), ciphertext })
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

    /// The same vector from the sender's side: with the RFC's ephemeral key, `enc` and the
    /// ciphertext come out byte for byte.
    #[test]
    fn rfc9180_a2_base_vector_sender() {
        let eph = PrivateKey::from_private_key(
            &X25519,
            &h("f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600"),
        )
        .unwrap();
        let s = seal_with(
            &eph,
            &h("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a"),
            &h("4f6465206f6e2061204772656369616e2055726e"),
            &h("436f756e742d30"),
            b"Beauty is truth, truth beauty",
        )
        .unwrap();
        assert_eq!(s.enc, h("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a"));
        assert_eq!(
            s.ciphertext,
            h("1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28")
        );
    }

    /// A low-order recipient key (all zeros gives an all-zero shared secret) is refused, as
    /// RFC 9180 section 7.1.4 requires; so is such an `enc` when opening.
    #[test]
    fn low_order_points_are_refused() {
        assert!(matches!(seal(&[0u8; 32], b"", b"", b"x"), Err(CryptoError::Malformed(_))));
        let r = RecipientKey::generate().unwrap();
        assert!(matches!(r.open(&[0u8; 32], &[0u8; 40], b"", b""), Err(CryptoError::DecryptionFailed)));
    }

    /// Interoperability with the independent `hpke` crate, both directions, over random
    /// messages, infos and associated data.
    mod against_hpke_crate {
        use super::*;
        use ::hpke::aead::ChaCha20Poly1305;
        use ::hpke::kdf::HkdfSha256;
        use ::hpke::kem::X25519HkdfSha256;
        use ::hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
        use proptest::prelude::*;

        type Kem = X25519HkdfSha256;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn ours_seals_theirs_opens(pt in proptest::collection::vec(any::<u8>(), 0..2048),
                                       info in proptest::collection::vec(any::<u8>(), 0..64),
                                       aad in proptest::collection::vec(any::<u8>(), 0..64),
                                       ikm in any::<[u8; 32]>()) {
                let (sk, pk) = Kem::derive_keypair(&ikm);
                let s = seal(&pk.to_bytes(), &info, &aad, &pt).unwrap();
                let enc = <Kem as ::hpke::Kem>::EncappedKey::from_bytes(&s.enc).unwrap();
                let opened = ::hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
                    &OpModeR::Base, &sk, &enc, &info, &s.ciphertext, &aad).unwrap();
                prop_assert_eq!(opened, pt);
            }

            #[test]
            fn theirs_seals_ours_opens(pt in proptest::collection::vec(any::<u8>(), 0..2048),
                                       info in proptest::collection::vec(any::<u8>(), 0..64),
                                       aad in proptest::collection::vec(any::<u8>(), 0..64)) {
                let r = RecipientKey::generate().unwrap();
                let pk = <Kem as ::hpke::Kem>::PublicKey::from_bytes(&r.public()).unwrap();
                let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
                let (enc, ct) = ::hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
                    &OpModeS::Base, &pk, &info, &pt, &aad, &mut rng).unwrap();
                let opened = r.open(&enc.to_bytes(), &ct, &info, &aad).unwrap();
                prop_assert_eq!(opened.expose(), pt.as_slice());
            }
        }
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
