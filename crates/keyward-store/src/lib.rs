//! # keyward-store
//!
//! Storage backends for Keyward's [`keyward_core::store::Store`] port, and the conformance suite
//! ([`conformance`]) every backend must pass.
//!
//! - [`sqlite::SqliteStore`]: the embedded default (bundled SQLite, WAL, `synchronous=FULL`,
//!   versioned schema migrations, one writer connection and a small pool of readers).
//! - [`memory::MemoryStore`]: everything in memory, for tests and throwaway servers.
//! - [`postgres::PostgresStore`]: PostgreSQL, shared by several servers (pooled connections,
//!   single-statement compare-and-set, migrations under an advisory lock).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
pub mod memory;
pub mod postgres;
pub mod sqlite;

pub use memory::MemoryStore;
pub use postgres::{PostgresConfig, PostgresStore};
pub use sqlite::SqliteStore;
