//! Recipient public keys and private keys for JWE, read from PEM or DER files once per run.
//!
//! Accepted: SPKI (`PUBLIC KEY`) public keys; PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`)
//! and SEC1 (`EC PRIVATE KEY`) private keys; RSA (2048 bits or more) and EC on P-256, P-384 and
//! P-521. Every key carries its RFC 7638 JWK thumbprint, which Keyward writes as the recipient's
//! `kid` so that decryption finds the right recipient without trial decryption.

use aws_lc_rs::agreement;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as SpkiKey;
use x509_parser::x509::SubjectPublicKeyInfo;
use zeroize::Zeroizing;

use crate::error::{OcicryptError, Result};

/// Largest key file read.
pub const MAX_KEY_FILE: usize = 64 * 1024;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// An elliptic curve usable for `ECDH-ES+A*KW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    /// NIST P-256.
    P256,
    /// NIST P-384.
    P384,
    /// NIST P-521.
    P521,
}

impl Curve {
    /// The JWK `crv` name.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
            Curve::P521 => "P-521",
        }
    }

    /// From a JWK `crv` name.
    pub fn from_name(name: &str) -> Option<Self> {
        [Curve::P256, Curve::P384, Curve::P521].into_iter().find(|c| c.name() == name)
    }

    /// Length of one coordinate in bytes.
    pub fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }

    pub(crate) fn agreement(self) -> &'static agreement::Algorithm {
        match self {
            Curve::P256 => &agreement::ECDH_P256,
            Curve::P384 => &agreement::ECDH_P384,
            Curve::P521 => &agreement::ECDH_P521,
        }
    }

    fn from_oid(oid: &str) -> Option<Self> {
        match oid {
            "1.2.840.10045.3.1.7" => Some(Curve::P256),
            "1.3.132.0.34" => Some(Curve::P384),
            "1.3.132.0.35" => Some(Curve::P521),
            _ => None,
        }
    }

    /// Split an uncompressed point `04 || x || y` into its coordinates.
    pub(crate) fn split_point(self, point: &[u8]) -> Option<(&[u8], &[u8])> {
        let n = self.coordinate_len();
        if point.len() != 1 + 2 * n || point[0] != 4 {
            return None;
        }
        Some((&point[1..1 + n], &point[1 + n..]))
    }
}

/// A recipient's public key.
#[derive(Debug)]
pub struct PublicKey {
    pub(crate) kind: PublicKind,
    kid: String,
}

#[derive(Debug)]
pub(crate) enum PublicKind {
    Rsa(OaepPublicEncryptingKey),
    Ec { curve: Curve, point: Vec<u8> },
}

impl PublicKey {
    /// Parse a PEM or DER SubjectPublicKeyInfo. `origin` names the key in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |reason: String| OcicryptError::BadKey { path: origin.to_owned(), reason };
        let der = match pem_block(bytes, origin)? {
            Some((label, der)) if label == "PUBLIC KEY" => der,
            Some((label, _)) => {
                return Err(bad(format!("a {label:?} PEM block is not a public key (expected \"PUBLIC KEY\")")));
            }
            None => Zeroizing::new(bytes.to_vec()),
        };
        let (_, spki) =
            SubjectPublicKeyInfo::from_der(&der).map_err(|_| bad("not a SubjectPublicKeyInfo public key".into()))?;
        match spki.parsed().map_err(|_| bad("unreadable public key".into()))? {
            SpkiKey::RSA(rsa) => {
                let key = PublicEncryptingKey::from_der(&der).map_err(|e| bad(format!("RSA key rejected: {e}")))?;
                if key.key_size_bits() < MIN_RSA_BITS {
                    return Err(bad(format!("RSA keys under {MIN_RSA_BITS} bits are refused")));
                }
                let kid = rsa_thumbprint(rsa.modulus, rsa.exponent);
                let key = OaepPublicEncryptingKey::new(key).map_err(|_| bad("RSA key rejected".into()))?;
                Ok(Self { kind: PublicKind::Rsa(key), kid })
            }
            SpkiKey::EC(point) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .and_then(|oid| Curve::from_oid(&oid.to_id_string()))
                    .ok_or_else(|| bad("EC key on an unsupported curve (use P-256, P-384 or P-521)".into()))?;
                let point = point.data().to_vec();
                // Reject points not on the curve now rather than at encryption time.
                let check = agreement::PrivateKey::generate(curve.agreement())
                    .map_err(|_| OcicryptError::Crypto("EC key generation"))?;
                agreement::agree(&check, agreement::UnparsedPublicKey::new(curve.agreement(), &point), (), |_| Ok(()))
                    .map_err(|_| bad("EC public key is not a valid point".into()))?;
                let kid = ec_thumbprint(curve, &point).ok_or_else(|| bad("EC point is not uncompressed".into()))?;
                Ok(Self { kind: PublicKind::Ec { curve, point }, kid })
            }
            _ => Err(bad("only RSA and EC (P-256, P-384, P-521) keys can be JWE recipients".into())),
        }
    }

    /// The RFC 7638 thumbprint (base64url SHA-256 of the canonical JWK).
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// A private key that can unwrap JWE recipients.
pub struct PrivateKey {
    pub(crate) kind: PrivateKind,
    kid: String,
    origin: String,
}

pub(crate) enum PrivateKind {
    Rsa(OaepPrivateDecryptingKey),
    Ec { curve: Curve, key: agreement::PrivateKey },
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey").field("origin", &self.origin).field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// Parse a PEM or DER private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |reason: &str| OcicryptError::BadKey { path: origin.to_owned(), reason: reason.to_owned() };
        let (label, der) = match pem_block(bytes, origin)? {
            Some((label, der)) => (Some(label), der),
            None => (None, Zeroizing::new(bytes.to_vec())),
        };
        let pkcs8 = match label.as_deref() {
            Some("ENCRYPTED PRIVATE KEY") => {
                return Err(bad(
                    "encrypted private keys are not supported: decrypt it first (openssl pkcs8 -in KEY -out PLAIN)",
                ));
            }
            Some("RSA PRIVATE KEY") => Some(pkcs1_to_pkcs8(&der)),
            Some("PRIVATE KEY") | Some("EC PRIVATE KEY") | None => None,
            Some(other) => return Err(bad(&format!("a {other:?} PEM block is not a private key"))),
        };
        let der: &[u8] = pkcs8.as_deref().map_or(&der, |v| v.as_slice());
        if label.as_deref() != Some("EC PRIVATE KEY")
            && let Ok(rsa) = PrivateDecryptingKey::from_pkcs8(der)
        {
            if rsa.key_size_bits() < MIN_RSA_BITS {
                return Err(bad(&format!("RSA keys under {MIN_RSA_BITS} bits are refused")));
            }
            let spki = rsa.public_key().as_der().map_err(|_| bad("unreadable RSA key"))?;
            let (_, info) = SubjectPublicKeyInfo::from_der(spki.as_ref()).map_err(|_| bad("unreadable RSA key"))?;
            let Ok(SpkiKey::RSA(pk)) = info.parsed() else { return Err(bad("unreadable RSA key")) };
            let kid = rsa_thumbprint(pk.modulus, pk.exponent);
            let key = OaepPrivateDecryptingKey::new(rsa).map_err(|_| bad("RSA key rejected"))?;
            return Ok(Self { kind: PrivateKind::Rsa(key), kid, origin: origin.to_owned() });
        }
        for curve in [Curve::P256, Curve::P384, Curve::P521] {
            if let Ok(key) = agreement::PrivateKey::from_private_key_der(curve.agreement(), der) {
                let public = key.compute_public_key().map_err(|_| bad("unreadable EC key"))?;
                let kid = ec_thumbprint(curve, public.as_ref()).ok_or_else(|| bad("unreadable EC key"))?;
                return Ok(Self { kind: PrivateKind::Ec { curve, key }, kid, origin: origin.to_owned() });
            }
        }
        Err(bad("not an RSA or EC (P-256, P-384, P-521) private key in PKCS#8, PKCS#1 or SEC1 form"))
    }

    /// The RFC 7638 thumbprint of the matching public key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Where the key came from (for messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// The single PEM block in `bytes`, if it is PEM at all.
fn pem_block(bytes: &[u8], origin: &str) -> Result<Option<(String, Zeroizing<Vec<u8>>)>> {
    if bytes.len() > MAX_KEY_FILE {
        return Err(OcicryptError::BadKey { path: origin.to_owned(), reason: "larger than 64 KiB".into() });
    }
    let text = bytes.trim_ascii_start();
    if !text.starts_with(b"-----BEGIN ") {
        return Ok(None);
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(text)
        .map_err(|_| OcicryptError::BadKey { path: origin.to_owned(), reason: "malformed PEM".into() })?;
    Ok(Some((pem.label.clone(), Zeroizing::new(pem.contents.clone()))))
}

/// Wrap a PKCS#1 RSAPrivateKey in a PKCS#8 PrivateKeyInfo (version 0, rsaEncryption, NULL).
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Zeroizing<Vec<u8>> {
    const ALGORITHM: &[u8] = &[
        0x02, 0x01, 0x00, // version 0
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut octets = Zeroizing::new(vec![0x04]);
    der_len(&mut octets, pkcs1.len());
    octets.extend_from_slice(pkcs1);
    let mut out = Zeroizing::new(vec![0x30]);
    der_len(&mut out, ALGORITHM.len() + octets.len());
    out.extend_from_slice(ALGORITHM);
    out.extend_from_slice(&octets);
    out
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn b64u(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while b.len() > 1 && b[0] == 0 {
        b = &b[1..];
    }
    b
}

/// RFC 7638 section 3.2: the members `e`, `kty`, `n`, in that order, no white space.
fn rsa_thumbprint(modulus: &[u8], exponent: &[u8]) -> String {
    let jwk = format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64u(strip_zeros(exponent)), b64u(strip_zeros(modulus)));
    b64u(&keyward_crypto::hash::sha256(jwk.as_bytes()))
}

/// RFC 7638: the members `crv`, `kty`, `x`, `y`, coordinates at their full length.
fn ec_thumbprint(curve: Curve, point: &[u8]) -> Option<String> {
    let (x, y) = curve.split_point(point)?;
    let jwk = format!(r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#, curve.name(), b64u(x), b64u(y));
    Some(b64u(&keyward_crypto::hash::sha256(jwk.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 section 3.1's example key and thumbprint.
    #[test]
    fn rfc7638_example_thumbprint() {
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(concat!(
                "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs",
                "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91",
                "CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
            ))
            .unwrap();
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode("AQAB").unwrap();
        assert_eq!(rsa_thumbprint(&n, &e), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        let mut padded = vec![0u8];
        padded.extend_from_slice(&n);
        assert_eq!(rsa_thumbprint(&padded, &[0, 1, 0, 1]), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn public_and_private_thumbprints_agree() {
        let rsa = PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let spki = rsa.public_key().as_der().unwrap();
        let pkcs8 = rsa.as_der().unwrap();
        let public = PublicKey::from_bytes(spki.as_ref(), "pub").unwrap();
        let private = PrivateKey::from_bytes(pkcs8.as_ref(), "priv").unwrap();
        assert_eq!(public.kid(), private.kid());

        for curve in [Curve::P256, Curve::P384, Curve::P521] {
            let k = agreement::PrivateKey::generate(curve.agreement()).unwrap();
            let pkcs8: aws_lc_rs::encoding::Pkcs8V1Der<'_> = k.as_der().unwrap();
            let spki: aws_lc_rs::encoding::PublicKeyX509Der<'_> = k.compute_public_key().unwrap().as_der().unwrap();
            let public = PublicKey::from_bytes(spki.as_ref(), "pub").unwrap();
            let private = PrivateKey::from_bytes(pkcs8.as_ref(), "priv").unwrap();
            assert_eq!(public.kid(), private.kid(), "{curve:?}");
            assert!(matches!(private.kind, PrivateKind::Ec { curve: c, .. } if c == curve));
        }
    }

    #[test]
    fn garbage_keys_are_refused_with_a_reason() {
        for bytes in [&b""[..], b"hello", b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n"] {
            assert!(matches!(PublicKey::from_bytes(bytes, "k"), Err(OcicryptError::BadKey { .. })));
            assert!(matches!(PrivateKey::from_bytes(bytes, "k"), Err(OcicryptError::BadKey { .. })));
        }
        let e = PrivateKey::from_bytes(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "k",
        )
        .unwrap_err();
        assert!(e.to_string().contains("encrypted private keys"), "{e}");
    }
}
