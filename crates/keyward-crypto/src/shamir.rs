//! Shamir's secret sharing over GF(2^8), the field of AES (reduction polynomial
//! x^8 + x^4 + x^3 + x + 1, 0x11b).
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree
//! `threshold - 1`; share `i` holds the evaluations at `x = i` (1..=255). Any `threshold` shares
//! give the secret back by Lagrange interpolation at 0; fewer reveal nothing about it.
//!
//! Field arithmetic is branch-free and table-free, so the time it takes does not depend on the
//! secret or the shares. An encoded share is `y (one byte per secret byte) || x`, the layout
//! HashiCorp Vault uses for its unseal shares.
//!
//! Interpolation cannot tell a forged share from a good one: the result is just a different
//! secret. Callers must authenticate what the shares reconstruct (Keyward opens an AEAD-sealed
//! keyring with it).

use zeroize::Zeroize;

use crate::{CryptoError, SecretBytes};

/// Multiply in GF(2^8) (constant time).
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        p ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// Multiplicative inverse in GF(2^8) as a^254 (constant time); maps 0 to 0.
fn inv(a: u8) -> u8 {
    // 254 = 0b1111_1110: square-and-multiply over a fixed exponent.
    let mut result = 1u8;
    let mut base = a;
    let mut e = 254u8;
    for _ in 0..8 {
        let m = mul(result, base);
        let take = 0u8.wrapping_sub(e & 1);
        result = (m & take) | (result & !take);
        base = mul(base, base);
        e >>= 1;
    }
    result
}

/// One share: the x coordinate (1..=255) and one y byte per secret byte. Wiped on drop, prints
/// only its x coordinate.
pub struct Share {
    x: u8,
    y: Vec<u8>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.y.zeroize();
    }
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share(x={}, [REDACTED])", self.x)
    }
}

impl Share {
    /// The x coordinate, which identifies the share (not secret).
    pub fn x(&self) -> u8 {
        self.x
    }

    /// Encoded form `y || x`.
    pub fn to_bytes(&self) -> SecretBytes {
        let mut v = Vec::with_capacity(self.y.len() + 1);
        v.extend_from_slice(&self.y);
        v.push(self.x);
        SecretBytes::from_vec(v)
    }

    /// Decode `y || x`; `secret_len` is the expected number of y bytes.
    pub fn from_bytes(b: &[u8], secret_len: usize) -> Result<Self, CryptoError> {
        if b.len() != secret_len + 1 {
            return Err(CryptoError::Malformed("share (wrong length)"));
        }
        let (y, x) = b.split_at(secret_len);
        if x[0] == 0 {
            return Err(CryptoError::Malformed("share (x coordinate 0)"));
        }
        Ok(Self { x: x[0], y: y.to_vec() })
    }
}

/// Split `secret` into `shares` shares of which any `threshold` recover it.
/// Requires `2 <= threshold <= shares <= 255` and a non-empty secret.
pub fn split(secret: &[u8], shares: u8, threshold: u8) -> Result<Vec<Share>, CryptoError> {
    if threshold < 2 || shares < threshold {
        return Err(CryptoError::OutOfRange("shamir parameters: need 2 <= threshold <= shares <= 255"));
    }
    if secret.is_empty() {
        return Err(CryptoError::OutOfRange("shamir secret is empty"));
    }
    let degree = usize::from(threshold) - 1;
    let mut out: Vec<Share> = (1..=shares).map(|x| Share { x, y: Vec::with_capacity(secret.len()) }).collect();
    // coefficients[0] is the secret byte, the rest random.
    let mut coefficients = vec![0u8; degree + 1];
    for &s in secret {
        coefficients[0] = s;
        crate::fill_random(&mut coefficients[1..])?;
        for share in &mut out {
            // Horner's rule from the highest coefficient down.
            let mut acc = 0u8;
            for &c in coefficients.iter().rev() {
                acc = mul(acc, share.x) ^ c;
            }
            share.y.push(acc);
        }
    }
    coefficients.zeroize();
    Ok(out)
}

/// Interpolate the secret at x = 0 from at least two shares with distinct x coordinates and
/// equal lengths. With fewer shares than the threshold, or any forged share, the result is a
/// wrong secret, not an error: authenticate it.
pub fn combine(shares: &[Share]) -> Result<SecretBytes, CryptoError> {
    if shares.len() < 2 {
        return Err(CryptoError::OutOfRange("shamir: at least two shares are needed"));
    }
    let len = shares[0].y.len();
    if shares.iter().any(|s| s.y.len() != len) {
        return Err(CryptoError::Malformed("shares of different lengths"));
    }
    for (i, a) in shares.iter().enumerate() {
        if shares[i + 1..].iter().any(|b| b.x == a.x) {
            return Err(CryptoError::Malformed("two shares with the same x coordinate"));
        }
    }
    // Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); subtraction is xor.
    let basis: Vec<u8> = shares
        .iter()
        .enumerate()
        .map(|(i, si)| {
            shares
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .fold(1u8, |acc, (_, sj)| mul(acc, mul(sj.x, inv(sj.x ^ si.x))))
        })
        .collect();
    let mut secret = vec![0u8; len];
    for (s, l) in shares.iter().zip(&basis) {
        for (out, y) in secret.iter_mut().zip(&s.y) {
            *out ^= mul(*y, *l);
        }
    }
    Ok(SecretBytes::from_vec(secret))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// FIPS-197 section 4.2: {57} * {83} = {c1}; section 4.2.1: {57} * {13} = {fe}.
    #[test]
    fn field_multiplication_matches_fips_197() {
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        assert_eq!(mul(0x57, 0x02), 0xae);
        assert_eq!(mul(0x57, 0x04), 0x47);
        assert_eq!(mul(0x57, 0x08), 0x8e);
        assert_eq!(mul(0x57, 0x10), 0x07);
    }

    /// Inverses: {53}^-1 = {ca} (the AES S-box derivation example), and a * a^-1 = 1 for all a.
    #[test]
    fn field_inverse() {
        assert_eq!(inv(0x53), 0xca);
        assert_eq!(inv(0), 0);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "inverse of {a:#04x}");
        }
    }

    /// A polynomial worked by hand: f(x) = 0x2a + 0x07 x (threshold 2).
    /// f(1) = 0x2a ^ 0x07 = 0x2d; f(2) = 0x2a ^ {07}*{02} = 0x2a ^ 0x0e = 0x24;
    /// f(3) = 0x2a ^ {07}*{03} = 0x2a ^ 0x09 = 0x23.
    #[test]
    fn combines_hand_computed_shares() {
        let s = |x: u8, y: u8| Share::from_bytes(&[y, x], 1).unwrap();
        for pair in [[s(1, 0x2d), s(2, 0x24)], [s(2, 0x24), s(3, 0x23)], [s(3, 0x23), s(1, 0x2d)]] {
            assert_eq!(combine(&pair).unwrap().expose(), &[0x2a]);
        }
        // A forged y gives a different secret, silently.
        assert_ne!(combine(&[s(1, 0x2d), s(2, 0x25)]).unwrap().expose(), &[0x2a]);
    }

    #[test]
    fn rejects_bad_parameters_and_shares() {
        assert!(split(b"k", 3, 1).is_err());
        assert!(split(b"k", 2, 3).is_err());
        assert!(split(b"", 3, 2).is_err());
        let sh = split(b"key", 3, 2).unwrap();
        assert!(combine(&sh[..1]).is_err());
        let dup = [
            Share::from_bytes(sh[0].to_bytes().expose(), 3).unwrap(),
            Share::from_bytes(sh[0].to_bytes().expose(), 3).unwrap(),
        ];
        assert!(combine(&dup).is_err());
        assert!(Share::from_bytes(&[1, 2, 3, 0], 3).is_err(), "x = 0 would be the secret itself");
        assert!(Share::from_bytes(&[1, 2, 3], 3).is_err());
        assert_eq!(format!("{:?}", sh[0]), "Share(x=1, [REDACTED])");
    }

    proptest! {
        #[test]
        fn any_threshold_subset_recovers(secret in proptest::collection::vec(any::<u8>(), 1..64),
                                         n in 2u8..12, t_off in 0u8..10, seed in any::<u64>()) {
            let t = 2 + t_off % (n - 1);
            let shares = split(&secret, n, t).unwrap();
            prop_assert_eq!(shares.len(), usize::from(n));
            // A pseudo-random subset of size t, in a pseudo-random order.
            let mut idx: Vec<usize> = (0..usize::from(n)).collect();
            let mut r = seed;
            for i in (1..idx.len()).rev() {
                r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                idx.swap(i, (r >> 33) as usize % (i + 1));
            }
            let pick: Vec<Share> = idx[..usize::from(t)]
                .iter()
                .map(|&i| Share::from_bytes(shares[i].to_bytes().expose(), secret.len()).unwrap())
                .collect();
            let got = combine(&pick).unwrap();
            prop_assert_eq!(got.expose(), &secret[..]);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40), len in 0usize..40) {
            let _ = Share::from_bytes(&b, len);
        }
    }
}
