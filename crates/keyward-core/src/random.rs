//! Randomized secrets: a value generated per workload identity, rotated at a TTL, with the
//! previous value still returned during a grace period. Two replicas of one workload (one
//! identity) share a value; different identities never do. Nobody types or sees it but the
//! workload.

use serde::{Deserialize, Serialize};

use crate::KmsError;

/// What a randomized secret generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RandomKind {
    /// Printable password: letters, digits and `!#%+-.:=@_~` (or `alphabet`).
    Password,
    /// API key: letters and digits (or `alphabet`).
    ApiKey,
    /// Random bytes, base64 encoded; `length` is the number of bytes.
    Bytes,
}

/// A randomized secret's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSpec {
    /// What to generate.
    pub kind: RandomKind,
    /// Characters (password, api-key) or bytes (bytes).
    pub length: u16,
    /// Characters to draw from (password and api-key only): 2 to 128 printable ASCII, at least
    /// two different (repeats are ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alphabet: Option<String>,
    /// A value is replaced this long after it was generated (seconds).
    pub ttl_secs: u64,
    /// After a rotation the previous value is still returned for this long (seconds).
    #[serde(default)]
    pub grace_secs: u64,
}

const PASSWORD: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#%+-.:=@_~";
const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Shortest and longest TTL.
pub const TTL_RANGE: (u64, u64) = (1, 400 * 86400);

impl RandomSpec {
    /// Check the definition; the message says what to fix.
    pub fn validate(&self) -> Result<(), KmsError> {
        let bad = |m: String| Err(KmsError::InvalidArgument(m));
        match self.kind {
            RandomKind::Bytes => {
                if !(16..=512).contains(&self.length) {
                    return bad("bytes length must be 16 to 512".into());
                }
                if self.alphabet.is_some() {
                    return bad("alphabet applies to password and api-key only".into());
                }
            }
            _ => {
                if !(8..=256).contains(&self.length) {
                    return bad("length must be 8 to 256 characters".into());
                }
                if let Some(a) = &self.alphabet {
                    // A set of characters: repeats are ignored, at least two must differ.
                    let distinct: std::collections::BTreeSet<u8> = a.bytes().collect();
                    let ok =
                        (2..=128).contains(&a.len()) && a.bytes().all(|b| b.is_ascii_graphic()) && distinct.len() >= 2;
                    if !ok {
                        return bad(
                            "alphabet must be 2 to 128 printable ASCII characters, at least two of them different"
                                .into(),
                        );
                    }
                }
            }
        }
        if !(TTL_RANGE.0..=TTL_RANGE.1).contains(&self.ttl_secs) {
            return bad(format!("ttl must be {} second to {} days", TTL_RANGE.0, TTL_RANGE.1 / 86400));
        }
        Ok(())
    }

    /// A fresh value, drawn uniformly (rejection sampling) from the CSPRNG.
    pub fn generate(&self) -> Result<zeroize::Zeroizing<String>, KmsError> {
        if self.kind == RandomKind::Bytes {
            let b = keyward_crypto::SecretBytes::random(self.length as usize)?;
            use base64::Engine;
            return Ok(zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(b.expose())));
        }
        let alphabet =
            self.alphabet.as_deref().unwrap_or(if self.kind == RandomKind::Password { PASSWORD } else { ALNUM });
        // Each distinct character once, so every one is equally likely.
        let a: Vec<u8> = alphabet.bytes().collect::<std::collections::BTreeSet<u8>>().into_iter().collect();
        let n = a.len();
        // Accept a byte only below the largest multiple of n, so every character is equally likely.
        let limit = 256 - (256 % n);
        let mut out = zeroize::Zeroizing::new(String::with_capacity(self.length as usize));
        while out.len() < self.length as usize {
            let buf = keyward_crypto::SecretBytes::random(64)?;
            for &b in buf.expose() {
                if (b as usize) < limit && out.len() < self.length as usize {
                    out.push(a[b as usize % n] as char);
                }
            }
        }
        Ok(out)
    }
}

/// The value a caller gets.
#[derive(Debug)]
pub struct RandomValue {
    /// The current value.
    pub value: zeroize::Zeroizing<String>,
    /// Its version (1 for the first value of this identity).
    pub version: u32,
    /// When it was generated.
    pub created_at: i64,
    /// When it will be replaced.
    pub rotates_at: i64,
    /// The value it replaced and until when that one is still valid, during the grace period.
    pub previous: Option<(zeroize::Zeroizing<String>, i64)>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(kind: RandomKind, length: u16, alphabet: Option<&str>) -> RandomSpec {
        RandomSpec { kind, length, alphabet: alphabet.map(str::to_string), ttl_secs: 60, grace_secs: 10 }
    }

    #[test]
    fn values_have_the_asked_shape_and_differ() {
        let p = spec(RandomKind::Password, 32, None).generate().unwrap();
        assert_eq!(p.len(), 32);
        assert!(p.bytes().all(|b| PASSWORD.as_bytes().contains(&b)));
        assert_ne!(*p, *spec(RandomKind::Password, 32, None).generate().unwrap());
        let k = spec(RandomKind::ApiKey, 40, None).generate().unwrap();
        assert!(k.bytes().all(|b| b.is_ascii_alphanumeric()));
        let b = spec(RandomKind::Bytes, 32, None).generate().unwrap();
        use base64::Engine;
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(b.as_bytes()).unwrap().len(), 32);
        let hex = spec(RandomKind::ApiKey, 64, Some("0123456789abcdef")).generate().unwrap();
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn every_character_is_drawn_evenly() {
        // 3 characters do not divide 256: rejection sampling keeps them even.
        let s = spec(RandomKind::ApiKey, 256, Some("abc"));
        let mut counts = [0usize; 3];
        for _ in 0..200 {
            for b in s.generate().unwrap().bytes() {
                counts[(b - b'a') as usize] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        for c in counts {
            let share = c as f64 / total as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn bad_definitions_are_refused() {
        for s in [
            spec(RandomKind::Password, 4, None),
            spec(RandomKind::Bytes, 8, None),
            spec(RandomKind::Bytes, 32, Some("ab")),
            spec(RandomKind::ApiKey, 32, Some("aa")),
            spec(RandomKind::ApiKey, 32, Some("a b")),
            RandomSpec { ttl_secs: 0, ..spec(RandomKind::Password, 32, None) },
        ] {
            assert!(s.validate().is_err(), "{s:?}");
        }
        assert!(spec(RandomKind::Password, 32, None).validate().is_ok());
        // An alphabet is a set: repeats are ignored, two different characters suffice.
        assert!(spec(RandomKind::ApiKey, 32, Some("abab")).validate().is_ok());
        let v = spec(RandomKind::ApiKey, 64, Some("aaaaaaab")).generate().unwrap();
        assert!(v.contains('b') && v.contains('a'), "each distinct character is equally likely: {}", &*v);
    }
}
