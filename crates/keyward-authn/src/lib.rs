//! # keyward-authn
//!
//! Verification of the identities Keyward accepts besides its own tokens:
//!
//! - [`kubernetes`]: projected ServiceAccount JWTs, checked offline against the issuer's JWKS
//!   (static, from a URL, or by OIDC discovery), with keys chosen by `kid` and refetched when an
//!   unknown `kid` appears; `iss`, `aud`, `exp`/`nbf` and the pod binding are enforced, and
//!   roles map `(namespace, service account)` to policies.
//!
//! This crate decides *who* a caller is; what they may do is the policy engine's job
//! (`keyward-core`), and issuing the resulting Keyward token is the server's.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod kubernetes;
