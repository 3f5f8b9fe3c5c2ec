//! A test Kubernetes ServiceAccount issuer: signing keys made by the `openssl` command (RS256
//! and ES256) with their JWKs (kid as the API server computes it), tokens signed by openssl
//! (independently of the JWT library Keyward verifies with), and the claims the API server puts
//! in a projected token.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Value, json};

pub use crate::certs::openssl;

/// A signing key made by openssl, with its JWK (kid = base64url(SHA-256(SPKI DER)), as the
/// Kubernetes API server computes it).
pub struct SigningKey {
    pub file: String,
    pub alg: &'static str,
    pub jwk: Value,
    pub kid: String,
}

pub fn make_key(dir: &Path, name: &str, ec: bool) -> SigningKey {
    let file = format!("{name}.pem");
    if ec {
        openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &file]);
    } else {
        openssl(dir, &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &file]);
    }
    let spki = openssl(dir, &["pkey", "-in", &file, "-pubout", "-outform", "DER"]);
    let kid = B64URL.encode(keyward_crypto::hash::sha256(&spki));
    let jwk = if ec {
        let point = &spki[spki.len() - 65..];
        assert_eq!(point[0], 4, "uncompressed point");
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
               "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..])})
    } else {
        let out = String::from_utf8(openssl(dir, &["rsa", "-in", &file, "-noout", "-modulus"])).unwrap();
        let n = hex::decode(out.trim().strip_prefix("Modulus=").unwrap()).unwrap();
        json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": B64URL.encode(n), "e": "AQAB"})
    };
    SigningKey { file, alg: if ec { "ES256" } else { "RS256" }, jwk, kid }
}

/// DER ECDSA-Sig-Value → the 64-byte r||s of JWS.
pub fn der_to_jose(der: &[u8]) -> Vec<u8> {
    fn int(b: &[u8]) -> (&[u8], &[u8]) {
        assert_eq!(b[0], 2);
        let len = b[1] as usize;
        (&b[2..2 + len], &b[2 + len..])
    }
    assert_eq!(der[0], 0x30);
    let body = &der[2..];
    let (r, rest) = int(body);
    let (s, _) = int(rest);
    let mut out = Vec::new();
    for v in [r, s] {
        let v = &v[v.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0, 32 - v.len()));
        out.extend_from_slice(v);
    }
    out
}

pub fn sign_with(dir: &Path, key: &SigningKey, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()));
    let msg = dir.join("msg");
    std::fs::write(&msg, &input).unwrap();
    let sig = openssl(dir, &["dgst", "-sha256", "-sign", &key.file, "msg"]);
    let sig = if key.alg == "ES256" { der_to_jose(&sig) } else { sig };
    format!("{input}.{}", B64URL.encode(sig))
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

pub fn claims(iss: &str, aud: &str, ns: &str, sa: &str, pod: bool, exp: i64) -> Value {
    let mut k8s = json!({"namespace": ns, "serviceaccount": {"name": sa, "uid": "sa-uid-1"}});
    if pod {
        k8s["pod"] = json!({"name": format!("{sa}-0"), "uid": "pod-uid-1"});
        k8s["node"] = json!({"name": "node-1", "uid": "node-uid-1"});
    }
    json!({"iss": iss, "aud": [aud], "sub": format!("system:serviceaccount:{ns}:{sa}"),
           "iat": now() - 10, "nbf": now() - 10, "exp": exp, "jti": "0b1e", "kubernetes.io": k8s})
}
