//! # keyward-seal
//!
//! How a Keyward root keyring is sealed and unsealed, for every process that keeps one (the
//! server, and the KMS plugin in local mode): the seal state machine ([`Sealing`]:
//! uninitialised, sealed while collecting Shamir shares, unsealed with a running
//! [`keyward_core::Kms`] and its audit log) and the ceremonies between those states (init,
//! unseal, seal, rekey, root rotation, migration between seal kinds); the insecure file seal of
//! dev mode ([`file::InsecureFileSeal`]); and, while unsealed, the store's anchor of the audit
//! log. A PKCS#11 device comes in as a [`keyward_core::seal::KeyWrapper`] (`keyward-hsm`).
//!
//! It depends on the domain (`keyward-core`), the crypto primitives and the audit log; never on
//! a store backend, an HTTP type or the server.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod anchor;
pub mod file;
mod sealing;

pub use sealing::*;
