//! # keyward-core
//!
//! Keyward's domain model and service logic, free of transport and storage types:
//!
//! - [`model`]: keys, key versions, secrets, tokens as stored records;
//! - [`store::Store`]: the storage port every backend implements (`keyward-store`: SQLite,
//!   PostgreSQL, in-memory);
//! - [`seal::Seal`], [`seal::KeyWrapper`] and [`seal::SealConfig`]: how the root keyring is
//!   sealed (the state machine that uses them is `keyward-seal`);
//! - [`service::Kms`]: key lifecycle, cryptographic operations, versioned secrets, tokens;
//! - [`error::KmsError`]: one typed error the transports map to HTTP statuses.
//!
//! The service caches unwrapped key versions in memory (in wiping types), so cryptographic
//! operations do not touch storage on the hot path.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod limits;
pub mod model;
pub mod policy;
pub mod random;
pub mod release;
pub mod seal;
pub mod secretdata;
pub mod service;
pub mod store;
pub mod validate;

pub use error::{AuthFailure, KmsError};
pub use service::Kms;

/// Current time as Unix seconds.
pub fn now_unix() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}
