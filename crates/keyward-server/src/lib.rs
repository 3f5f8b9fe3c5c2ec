//! # keyward-server
//!
//! The Keyward HTTP/JSON API server: routing ([`api`]), strict request parsing and the single
//! error-to-status mapping ([`error`]), token authentication, the rotation/purge scheduler, and
//! start-up ([`run`]): opening the store, unsealing the root key through a [`keyward_core::seal::Seal`],
//! binding the listener.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent_api;
pub mod api;
pub mod audit;
pub mod cluster;
pub mod error;
pub mod extract;
pub mod k8s_auth;
pub mod metrics;
pub mod run;
pub mod serve;
pub mod tls;
#[allow(missing_docs)]
pub mod wire;

pub use cluster::ClusterConfig;
pub use run::{AuditSettings, Running, ServerConfig, Storage, start};
pub use serve::HttpLimits;
