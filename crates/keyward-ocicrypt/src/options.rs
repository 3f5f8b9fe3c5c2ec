//! ocicrypt's layer options: the private options (wrapped for each recipient) and the public
//! options (the `org.opencontainers.image.enc.pubopts` annotation).
//!
//! Both are JSON written by Go's `encoding/json`, so every byte string is standard base64 with
//! padding. The private options carry the layer key, so they only ever exist here as
//! [`SecretBytes`] or wiping strings.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyward_crypto::SecretBytes;
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{OcicryptError, Result};

/// The only layer cipher ocicrypt defines.
pub const CIPHER_AES_256_CTR_HMAC_SHA256: &str = "AES_256_CTR_HMAC_SHA256";

/// Largest options JSON accepted (real ones are about 150 bytes).
pub const MAX_OPTIONS_JSON: usize = 16 * 1024;

/// A `sha256:<64 lowercase hex>` content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parse and validate. Only SHA-256 digests are accepted.
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            OcicryptError::image(format!("unsupported digest {s:?}: only sha256 digests are accepted"))
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(OcicryptError::image(format!("malformed digest {s:?}")));
        }
        Ok(Self(s.to_owned()))
    }

    /// From raw SHA-256 output.
    pub fn from_sha256(bytes: &[u8; 32]) -> Self {
        Self(format!("sha256:{}", hex::encode(bytes)))
    }

    /// The hex part (the blob's file name under `blobs/sha256/`).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The whole `sha256:...` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

/// The private options of one encrypted layer: its key, nonce and the plaintext's digest.
pub struct PrivateOptions {
    /// The 32-byte AES-256 key, also the HMAC-SHA256 key.
    pub symkey: SecretBytes,
    /// The 16-byte initial counter block.
    pub nonce: [u8; 16],
    /// Digest of the unencrypted layer blob.
    pub digest: Digest,
}

impl std::fmt::Debug for PrivateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateOptions").field("digest", &self.digest).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawPrivate {
    symkey: Zeroizing<String>,
    digest: String,
    #[serde(default)]
    cipheroptions: Option<BTreeMap<String, String>>,
}

impl PrivateOptions {
    /// Fresh random key and nonce for a layer whose plaintext digest is `digest`.
    pub fn generate(digest: Digest) -> Result<Self> {
        let symkey = SecretBytes::random(32).map_err(|_| OcicryptError::Crypto("random generator"))?;
        let mut nonce = [0u8; 16];
        keyward_crypto::fill_random(&mut nonce).map_err(|_| OcicryptError::Crypto("random generator"))?;
        Ok(Self { symkey, nonce, digest })
    }

    /// The JSON Go ocicrypt writes: `{"symkey":..,"digest":..,"cipheroptions":{"nonce":..}}`.
    pub fn to_json(&self) -> SecretBytes {
        let key = Zeroizing::new(STANDARD.encode(self.symkey.expose()));
        let json = Zeroizing::new(format!(
            r#"{{"symkey":"{}","digest":"{}","cipheroptions":{{"nonce":"{}"}}}}"#,
            key.as_str(),
            self.digest,
            STANDARD.encode(self.nonce)
        ));
        SecretBytes::copy_from(json.as_bytes())
    }

    /// Parse what a recipient unwrapped. Errors say what is wrong, never what the key is.
    pub fn from_json(json: &[u8]) -> Result<Self> {
        if json.len() > MAX_OPTIONS_JSON {
            return Err(OcicryptError::jwe("private options larger than 16 KiB"));
        }
        let raw: RawPrivate = serde_json::from_slice(json)
            .map_err(|_| OcicryptError::jwe("private options are not the expected JSON"))?;
        let mut key = Zeroizing::new(
            STANDARD
                .decode(raw.symkey.as_bytes())
                .map_err(|_| OcicryptError::jwe("private options: symkey is not base64"))?,
        );
        if key.len() != 32 {
            return Err(OcicryptError::jwe("private options: symkey is not 32 bytes"));
        }
        let symkey = SecretBytes::copy_from(&key);
        key.zeroize();
        let nonce_b64 = raw
            .cipheroptions
            .as_ref()
            .and_then(|o| o.get("nonce"))
            .ok_or_else(|| OcicryptError::jwe("private options: cipheroptions.nonce is missing"))?;
        let nonce: [u8; 16] = STANDARD
            .decode(nonce_b64)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| OcicryptError::jwe("private options: nonce is not 16 bytes of base64"))?;
        let digest = Digest::parse(&raw.digest)?;
        Ok(Self { symkey, nonce, digest })
    }
}

/// The public options of an encrypted layer: the cipher and the ciphertext's HMAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicOptions {
    /// HMAC-SHA256 of the whole ciphertext, keyed with the layer key.
    pub hmac: [u8; 32],
}

#[derive(Deserialize)]
struct RawPublic {
    #[serde(default)]
    cipher: String,
    #[serde(default)]
    hmac: Option<String>,
}

impl PublicOptions {
    /// `{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":..,"cipheroptions":{}}`.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"cipher":"{CIPHER_AES_256_CTR_HMAC_SHA256}","hmac":"{}","cipheroptions":{{}}}}"#,
            STANDARD.encode(self.hmac)
        )
    }

    /// Parse the decoded `pubopts` annotation.
    pub fn from_json(json: &[u8]) -> std::result::Result<Self, String> {
        if json.len() > MAX_OPTIONS_JSON {
            return Err("larger than 16 KiB".into());
        }
        let raw: RawPublic = serde_json::from_slice(json).map_err(|e| format!("not the expected JSON: {e}"))?;
        if raw.cipher.is_empty() {
            return Err("no cipher type".into());
        }
        if raw.cipher != CIPHER_AES_256_CTR_HMAC_SHA256 {
            return Err(format!("unsupported cipher {:?}", raw.cipher));
        }
        let hmac = raw
            .hmac
            .and_then(|h| STANDARD.decode(h).ok())
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or("hmac is missing or not 32 bytes of base64")?;
        Ok(Self { hmac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_options_round_trip_and_go_shape() {
        let d = Digest::from_sha256(&[7; 32]);
        let p = PrivateOptions::generate(d.clone()).unwrap();
        let json = p.to_json();
        let v: serde_json::Value = serde_json::from_slice(json.expose()).unwrap();
        assert_eq!(v["digest"], d.as_str());
        assert_eq!(STANDARD.decode(v["symkey"].as_str().unwrap()).unwrap().len(), 32);
        assert_eq!(STANDARD.decode(v["cipheroptions"]["nonce"].as_str().unwrap()).unwrap().len(), 16);
        let back = PrivateOptions::from_json(json.expose()).unwrap();
        assert!(back.symkey.ct_eq(p.symkey.expose()));
        assert_eq!(back.nonce, p.nonce);
        assert_eq!(back.digest, d);
        assert!(!format!("{back:?}").contains(v["symkey"].as_str().unwrap()));
    }

    #[test]
    fn public_options_need_a_cipher_and_an_hmac() {
        let p = PublicOptions { hmac: [9; 32] };
        assert_eq!(PublicOptions::from_json(p.to_json().as_bytes()).unwrap(), p);
        assert_eq!(PublicOptions::from_json(b"{}").unwrap_err(), "no cipher type");
        assert!(PublicOptions::from_json(br#"{"cipher":"AES_256_CTR_HMAC_SHA256"}"#).is_err());
        assert!(PublicOptions::from_json(br#"{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":""}"#).is_err());
        assert!(PublicOptions::from_json(br#"{"cipher":"ROT13","hmac":""}"#).unwrap_err().contains("unsupported"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = PrivateOptions::from_json(&bytes);
                let _ = PublicOptions::from_json(&bytes);
                if let Ok(s) = std::str::from_utf8(&bytes)
                    && let Ok(d) = Digest::parse(s)
                {
                    prop_assert_eq!(d.hex().len(), 64);
                }
            }

            #[test]
            fn json_shaped_private_options(
                key in "[A-Za-z0-9+/=]{0,60}",
                nonce in "[A-Za-z0-9+/=]{0,30}",
                digest in "(sha256:)?[0-9a-f]{0,70}",
            ) {
                let json = format!(r#"{{"symkey":"{key}","digest":"{digest}","cipheroptions":{{"nonce":"{nonce}"}}}}"#);
                if let Ok(p) = PrivateOptions::from_json(json.as_bytes()) {
                    prop_assert_eq!(p.symkey.len(), 32);
                    let back = PrivateOptions::from_json(p.to_json().expose()).unwrap();
                    prop_assert!(back.symkey.ct_eq(p.symkey.expose()));
                    prop_assert_eq!(back.nonce, p.nonce);
                }
            }
        }
    }

    #[test]
    fn digests_are_validated() {
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(128))).is_err());
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
    }
}
