//! Process hardening for anything that holds unsealed keys: no core dumps, not dumpable or
//! ptrace-attachable by other same-uid processes, and all memory locked so key material is never
//! swapped out. Uses rustix's safe wrappers; no `unsafe` here.

use rustix::mm::{MlockAllFlags, mlockall};
use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};

/// What hardening achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Core dumps disabled (RLIMIT_CORE = 0).
    pub no_core_dumps: bool,
    /// Process marked not dumpable (PR_SET_DUMPABLE 0): no core, no ptrace by same uid, /proc/PID/mem closed.
    pub not_dumpable: bool,
    /// All current and future memory locked (mlockall), so nothing is swapped.
    pub memory_locked: bool,
}

/// Why hardening failed where it was required.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardenError {
    /// A required protection could not be applied.
    #[error("{what} failed: {source}; {fix}")]
    Failed {
        /// Which protection.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
        /// What the operator can do.
        fix: &'static str,
    },
}

/// Apply every protection. Core-dump protections are always required; memory locking is
/// required when `require_mlock` is set (servers), and otherwise only warned about (dev mode on
/// a laptop, where RLIMIT_MEMLOCK is often small).
pub fn harden_process(require_mlock: bool) -> Result<Hardening, HardenError> {
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) }).map_err(|e| HardenError::Failed {
        what: "disabling core dumps",
        source: e.into(),
        fix: "this should never happen; report it",
    })?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(|e| HardenError::Failed {
        what: "marking the process not dumpable",
        source: e.into(),
        fix: "this should never happen; report it",
    })?;
    let memory_locked = match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => true,
        Err(e) if require_mlock => {
            return Err(HardenError::Failed {
                what: "locking memory (mlockall)",
                source: e.into(),
                fix: "grant CAP_IPC_LOCK (Kubernetes: securityContext.capabilities.add [IPC_LOCK]) or raise RLIMIT_MEMLOCK \
                      (systemd: LimitMEMLOCK=infinity), or pass --insecure-no-mlock",
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not lock memory: key material may be swapped to disk (dev mode continues)");
            false
        }
    };
    Ok(Hardening { no_core_dumps: true, not_dumpable: true, memory_locked })
}
