//! Workload identity on one node: who is on the other end of a Unix socket, and what it runs.
//!
//! [`process::Pinned`] holds the caller (a pidfd from `SO_PEERPIDFD`, plus an open `/proc/PID`
//! and its start time) so that a recycled pid can never be measured in its place;
//! [`process::Measurer`] reads the caller's uid/gid, executable path and SHA-256, and its
//! container and pod from [`cgroup`]; [`process::Measurement::selectors`] turns that into the
//! selectors policies match (`unix:sha256:…`, `k8s:pod-uid:…`, …); [`process::Stamp`] is what
//! must stay the same while a request is served (no exec, no credential change, no move).
//! [`conn`] reads a Unix socket noting the writer of every byte; [`harden`] keeps a process that
//! holds key material out of core files, ptrace and swap.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cgroup;
pub mod conn;
pub mod harden;
pub mod process;
pub mod socket;

pub use process::{AttestError, Measurement, Measurer, Pinned, Stamp};
