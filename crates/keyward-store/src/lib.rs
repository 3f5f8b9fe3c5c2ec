//! # keyward-store
//!
//! Storage backends for Keyward's [`keyward_core::store::Store`] port, and the conformance suite
//! ([`conformance`]) every backend must pass.
//!
//! - [`sqlite::SqliteStore`]: the embedded default (bundled SQLite, WAL, `synchronous=FULL`,
//!   versioned schema migrations, one writer connection and a small pool of readers).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
pub mod sqlite;

pub use sqlite::SqliteStore;
