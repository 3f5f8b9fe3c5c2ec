//! Workload identity on one node: who is on the other end of a Unix socket, and what it runs.
//!
//! [`process::Pinned`] holds the caller (a pidfd from `SO_PEERPIDFD`, plus an open `/proc/PID`
//! and its start time) so that a recycled pid can never be measured in its place;
//! [`process::Measurer`] reads the caller's uid/gid, executable path and SHA-256, and its
//! container and pod from [`cgroup`]; [`process::Measurement::selectors`] turns that into the
//! selectors policies match (`unix:sha256:…`, `k8s:pod-uid:…`, …).
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod process;
pub mod socket;

pub use process::{AttestError, Measurement, Measurer, Pinned};
