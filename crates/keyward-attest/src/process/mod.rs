//! Pin the process on the other end of a Unix socket, measure it, and check it is still there.
//!
//! Order of operations, each step closing a race the previous one leaves open:
//!
//! 1. [`Pinned::from_socket`]: `SO_PEERPIDFD` (Linux 6.5+) gives a pidfd for the very process
//!    that called `connect()`; a pid number alone could be recycled before we look at it. On
//!    older kernels the pid from `SO_PEERCRED` is opened with `pidfd_open`, which leaves a small
//!    window between connect and accept (documented in `docs/security-model.md`).
//! 2. `/proc/PID` is opened as a directory and its start time (field 22 of `stat`) recorded;
//!    while the pidfd says the process is alive, that pid cannot belong to anyone else, so the
//!    directory is the pinned process's. Every later read goes through this directory fd, and
//!    reads through it fail once the process has exited.
//! 3. [`Measurer::measure`] reads `status`, `exe` and `cgroup` through that fd.
//! 4. [`Pinned::still_alive`] runs after measuring: the pidfd must not have signalled exit and
//!    the start time must be unchanged. Only then are the selectors used.
//!
//! What this cannot see: a process that `exec`s another program *after* being measured keeps
//! its pid, pidfd and start time. That is what [`Stamp`] is for: everything `exec` (or a
//! credential change, or a move to another cgroup) changes, read in one go, so that a caller can
//! compare the process at every point of a request with the process it measured
//! ([`Stamp::same_as`]): the running executable's inode, the memory layout the kernel sets up at
//! each exec (code, stack, brk, arguments and environment; with address-space randomisation a
//! new exec of even the same file moves them), the real, effective, saved and filesystem ids,
//! the supplementary groups and the cgroup. A traced process (`TracerPid` not 0) is refused at
//! every stamp: whoever traces it runs its code.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use nix::sys::socket::{getsockopt, sockopt};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::{CWD, Mode, OFlags, fstat, openat, readlinkat};
use rustix::process::{Pid, PidfdFlags, pidfd_open};

use crate::cgroup::{self, CgroupInfo};

mod measure;
mod stamp;

pub use self::measure::*;
pub use self::stamp::*;

/// Default largest executable hashed (SPIRE's `workload_size_limit` plays this part): a caller
/// must not be able to make the agent read gigabytes.
pub const DEFAULT_HASH_LIMIT: u64 = 512 * 1024 * 1024;
/// How many executables' hashes are remembered.
const CACHE_ENTRIES: usize = 4096;
/// Largest `/proc/PID/status` or `stat` read.
const MAX_PROC_TEXT: usize = 64 * 1024;

/// Why a caller could not be attested. Every variant means "refuse the request".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The kernel did not name a peer process (pid 0: another pid namespace, or not a Unix
    /// socket).
    #[error("the caller's process cannot be identified (is it in a pid namespace the agent cannot see?)")]
    NoPeer,
    /// The process exited, or changed, while it was being attested.
    #[error("the calling process exited or changed during attestation")]
    Gone,
    /// A read of the process's `/proc` entry failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A `/proc` file did not have the expected shape.
    #[error("unexpected contents in /proc: {0}")]
    Malformed(&'static str),
    /// The process's cgroups could not be interpreted.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// The process executed another program between two points of a request.
    #[error("the calling process executed another program during the request")]
    Exec,
    /// The process's uids, gids or groups changed between two points of a request.
    #[error("the calling process changed its credentials during the request")]
    CredentialsChanged,
    /// The process moved to another cgroup between two points of a request.
    #[error("the calling process moved to another cgroup during the request")]
    CgroupChanged,
    /// Real, effective, saved and filesystem ids differ: a setuid or setgid program, or a
    /// process half-way through changing its credentials. Such a process acts for two users.
    #[error(
        "the calling process runs with mixed credentials (uids {uids:?}, gids {gids:?}: real, effective, saved, \
         filesystem), as a setuid program or a process changing its uid does; it is not attested"
    )]
    MixedCredentials {
        /// Real, effective, saved, filesystem uid.
        uids: [u32; 4],
        /// The same gids.
        gids: [u32; 4],
    },
    /// Another process traces this one (`TracerPid`), and so controls what it runs.
    #[error("the calling process is being traced by process {0}; a traced process is not attested")]
    Traced(u32),
    /// A file the caller could have written is mapped executable in it (`LD_PRELOAD`,
    /// `LD_LIBRARY_PATH`, `LD_AUDIT`, a library in the caller's own directory), so the code that
    /// runs is not only what the executable's hash says.
    #[error(
        "code the caller can write is mapped in it ({0}); only the measured executable and libraries it cannot write may run"
    )]
    ForeignCode(String),
    /// The process runs in another user namespace than the agent, where it could name other
    /// processes as the writers of its bytes.
    #[error(
        "the calling process runs in a user namespace of its own (unshare -U, a rootless container), where the \
         writer of each byte cannot be trusted; it is not attested"
    )]
    UserNamespace,
    /// Bytes of the connection were written by another process than the one that connected
    /// (a passed or inherited socket).
    #[error(
        "the request was written by another process than the one that connected (a passed or inherited socket); \
         each process must open its own connection"
    )]
    ForeignWriter,
}

impl AttestError {
    /// A short, stable reason for audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPeer => "caller not identifiable",
            Self::Gone => "process exited or changed",
            Self::Io { .. } | Self::Malformed(_) => "process could not be read",
            Self::Cgroup(c) => c.reason(),
            Self::Exec => "exec during request",
            Self::CredentialsChanged => "credentials changed",
            Self::CgroupChanged => "cgroup changed during request",
            Self::MixedCredentials { .. } => "setuid or mixed credentials",
            Self::Traced(_) => "process is traced",
            Self::ForeignCode(_) => "writable code mapped",
            Self::ForeignWriter => "written by another process",
            Self::UserNamespace => "process in another user namespace",
        }
    }
}

fn io_err(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> AttestError {
    move |e| {
        // ESRCH/ENOENT from a /proc dir fd mean the process is gone.
        if e == rustix::io::Errno::SRCH || e == rustix::io::Errno::NOENT {
            AttestError::Gone
        } else {
            AttestError::Io { what, source: e.into() }
        }
    }
}

/// A process held so that its pid cannot be recycled under us.
pub struct Pinned {
    pid: u32,
    peer_uid: u32,
    peer_gid: u32,
    pidfd: OwnedFd,
    dir: OwnedFd,
    starttime: u64,
}

impl fmt::Debug for Pinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pinned")
            .field("pid", &self.pid)
            .field("peer_uid", &self.peer_uid)
            .field("peer_gid", &self.peer_gid)
            .field("starttime", &self.starttime)
            .finish_non_exhaustive()
    }
}

impl Pinned {
    /// Pin the peer of a connected Unix stream socket.
    pub fn from_socket<S: AsFd>(sock: &S) -> Result<Self, AttestError> {
        let cred = getsockopt(sock, sockopt::PeerCredentials)
            .map_err(|e| AttestError::Io { what: "reading SO_PEERCRED", source: e.into() })?;
        let pid = u32::try_from(cred.pid()).ok().filter(|p| *p > 0).ok_or(AttestError::NoPeer)?;
        let pidfd = match getsockopt(sock, sockopt::PeerPidfd) {
            Ok(fd) => {
                // The pidfd names the connecting process; its pid must be the one SO_PEERCRED
                // reported (both are in our pid namespace).
                if pidfd_pid(&fd)? != pid {
                    return Err(AttestError::Gone);
                }
                fd
            }
            // Kernel without SO_PEERPIDFD: fall back to opening the pid.
            Err(nix::errno::Errno::ENOPROTOOPT) => open_pidfd(pid)?,
            Err(nix::errno::Errno::ESRCH | nix::errno::Errno::EINVAL) => return Err(AttestError::Gone),
            Err(e) => return Err(AttestError::Io { what: "reading SO_PEERPIDFD", source: e.into() }),
        };
        Self::pin(pid, cred.uid(), cred.gid(), pidfd)
    }

    /// Pin a process known only by its pid (for example a child this process started).
    pub fn from_pid(pid: u32) -> Result<Self, AttestError> {
        let pidfd = open_pidfd(pid)?;
        let dir = open_proc_dir(pid)?;
        let st = fstat(&dir).map_err(io_err("reading /proc/PID"))?;
        drop(dir);
        Self::pin(pid, st.st_uid, st.st_gid, pidfd)
    }

    fn pin(pid: u32, peer_uid: u32, peer_gid: u32, pidfd: OwnedFd) -> Result<Self, AttestError> {
        let dir = open_proc_dir(pid)?;
        let starttime = read_starttime(&dir)?;
        // While the pidfd's process lives, nobody else can hold its pid: so the directory
        // opened above is that process's.
        ensure_running(&pidfd)?;
        Ok(Self { pid, peer_uid, peer_gid, pidfd, dir, starttime })
    }

    /// The pid, in the agent's pid namespace.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process for as long as it lives: pid and start time (a recycled pid has another).
    pub fn identity(&self) -> (u32, u64) {
        (self.pid, self.starttime)
    }

    /// Uid and gid from `SO_PEERCRED` (the credentials at `connect()` time).
    pub fn peer_ids(&self) -> (u32, u32) {
        (self.peer_uid, self.peer_gid)
    }

    /// The pinned process's parent pid (from `/proc/PID/status`, read through the pinned
    /// directory). Check [`Pinned::still_alive`] afterwards before trusting it.
    pub fn parent_pid(&self) -> Result<u32, AttestError> {
        let status = read_text(&self.dir, "status", "reading /proc/PID/status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or(AttestError::Malformed("status lacks PPid"))
    }

    /// The pinned process's children, as pids in this (the agent's) pid namespace, from
    /// `task/*/children` (each thread's children) read through the pinned directory.
    pub fn children(&self) -> Result<Vec<u32>, AttestError> {
        let task = openat(&self.dir, "task", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(io_err("opening /proc/PID/task"))?;
        let mut out = Vec::new();
        let dir = rustix::fs::Dir::read_from(&task).map_err(io_err("reading /proc/PID/task"))?;
        for entry in dir {
            let entry = entry.map_err(io_err("reading /proc/PID/task"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_err() {
                continue;
            }
            let text = read_text(&task, &format!("{name}/children"), "reading /proc/PID/task/TID/children")?;
            out.extend(text.split_ascii_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The process's pid in its own (innermost) pid namespace: the last `NSpid` of `status`.
    /// Equal to [`Pinned::pid`] for a process in the agent's pid namespace.
    pub fn innermost_pid(&self) -> Result<u32, AttestError> {
        let status = read_text(&self.dir, "status", "reading /proc/PID/status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_ascii_whitespace().last())
            .and_then(|v| v.parse().ok())
            .ok_or(AttestError::Malformed("status lacks NSpid"))
    }

    /// Check, after measuring, that the pinned process is still the same live process.
    pub fn still_alive(&self) -> Result<(), AttestError> {
        ensure_running(&self.pidfd)?;
        if read_starttime(&self.dir)? != self.starttime {
            return Err(AttestError::Gone);
        }
        Ok(())
    }
}

fn open_pidfd(pid: u32) -> Result<OwnedFd, AttestError> {
    let raw = i32::try_from(pid).map_err(|_| AttestError::NoPeer)?;
    let pid = Pid::from_raw(raw).ok_or(AttestError::NoPeer)?;
    pidfd_open(pid, PidfdFlags::empty()).map_err(io_err("pidfd_open"))
}

fn open_proc_dir(pid: u32) -> Result<OwnedFd, AttestError> {
    openat(CWD, format!("/proc/{pid}"), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(io_err("opening /proc/PID"))
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo` (`Pid: -1` once it has exited).
fn pidfd_pid(pidfd: &OwnedFd) -> Result<u32, AttestError> {
    let text = read_text(CWD, &format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()), "reading pidfd info")?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .ok_or(AttestError::Malformed("pidfd fdinfo has no Pid line"))?
        .trim();
    match value.parse::<i64>() {
        Ok(p) if p > 0 => u32::try_from(p).map_err(|_| AttestError::Malformed("pid out of range")),
        Ok(_) => Err(AttestError::Gone),
        Err(_) => Err(AttestError::Malformed("pidfd fdinfo Pid is not a number")),
    }
}

/// A pidfd becomes readable when its process exits.
fn ensure_running(pidfd: &OwnedFd) -> Result<(), AttestError> {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    match poll(&mut fds, Some(&zero)) {
        Ok(0) => Ok(()),
        Ok(_) => Err(AttestError::Gone),
        Err(e) => Err(AttestError::Io { what: "polling the pidfd", source: e.into() }),
    }
}

fn read_text<D: AsFd>(dir: D, name: &str, what: &'static str) -> Result<String, AttestError> {
    use std::io::Read;
    let fd = openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).map_err(io_err(what))?;
    // Grows as needed from a small buffer (these files are a few hundred bytes to a few KiB).
    let mut buf = Vec::with_capacity(4096);
    std::fs::File::from(fd).take(MAX_PROC_TEXT as u64).read_to_end(&mut buf).map_err(|e| {
        match rustix::io::Errno::from_io_error(&e) {
            Some(errno) => io_err(what)(errno),
            None => AttestError::Io { what, source: e },
        }
    })?;
    if buf.len() >= MAX_PROC_TEXT {
        return Err(AttestError::Malformed("a /proc file is larger than expected"));
    }
    String::from_utf8(buf).map_err(|_| AttestError::Malformed("a /proc file is not UTF-8"))
}

/// Field 22 of `stat`, counted after the last `)` so that a command name containing `) ` cannot
/// shift the fields.
fn read_starttime(dir: &OwnedFd) -> Result<u64, AttestError> {
    parse_starttime(&read_text(dir, "stat", "reading /proc/PID/stat")?)
}

fn parse_starttime(stat: &str) -> Result<u64, AttestError> {
    let after = stat.rfind(')').map(|i| &stat[i + 1..]).ok_or(AttestError::Malformed("stat has no command"))?;
    // After the command come field 3 (state) onwards; starttime is field 22.
    after
        .split_ascii_whitespace()
        .nth(22 - 3)
        .and_then(|s| s.parse().ok())
        .ok_or(AttestError::Malformed("stat has no start time"))
}

/// This process's user namespace (device and inode of `/proc/self/ns/user`), read once.
fn own_user_namespace() -> Option<(u64, u64)> {
    static OWN: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| {
        rustix::fs::statat(CWD, "/proc/self/ns/user", rustix::fs::AtFlags::empty()).ok().map(|s| (s.st_dev, s.st_ino))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A `stat` line of a real process (Linux 6.x), with a command that tries to shift fields.
    const STAT: &str = "1234 (evil) 0 0 0) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 \
        18446744073709551615 94000000000000 94000000100000 140730000000000 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 \
        94000000200000 94000000300000 94000000400000 140730000001000 140730000002000 140730000003000 140730000004000 0";

    #[test]
    fn starttime_and_layout_after_last_paren() {
        assert_eq!(parse_starttime(STAT).unwrap(), 98765);
        let (start, layout) = parse_layout(STAT).unwrap();
        assert_eq!(start, 98765);
        assert_eq!(
            layout,
            [
                94000000000000,
                94000000100000,
                140730000000000,
                94000000200000,
                94000000300000,
                94000000400000,
                140730000001000,
                140730000002000,
                140730000003000,
                140730000004000
            ]
        );
        assert!(parse_starttime("1234 (x) S 1").is_err());
        assert!(parse_starttime("no paren").is_err());
        assert!(parse_layout("1234 (x) S 1 2 3").is_err());
    }

    fn creds(u: [u32; 4], g: [u32; 4]) -> String {
        format!(
            "Name:\tx\nUid:\t{}\t{}\t{}\t{}\nGid:\t{}\t{}\t{}\t{}\nGroups:\t4 24 \nTracerPid:\t0\n",
            u[0], u[1], u[2], u[3], g[0], g[1], g[2], g[3]
        )
    }

    #[test]
    fn status_ids_and_tracer() {
        let c = parse_status(&creds([1000, 1001, 1002, 1003], [50, 51, 52, 53])).unwrap();
        assert_eq!(c, Creds { uids: [1000, 1001, 1002, 1003], gids: [50, 51, 52, 53], groups: vec![4, 24], tracer: 0 });
        assert!(parse_status("Name:\tx\nUid:\t1000\n").is_err());
        assert!(parse_status("Uid:\t0 0 0 0\nGid:\t0 0 0 0\nGroups:\n").is_err(), "no TracerPid");
        let traced = parse_status("Uid:\t0 0 0 0\nGid:\t0 0 0 0\nGroups:\nTracerPid:\t77\n").unwrap();
        assert_eq!(traced.tracer, 77);
    }

    fn stamp(status: &str, layout: [u64; 10], cgroup: &str) -> Stamp {
        let exe = FileKey { dev: 1, ino: 2, size: 3, mtime: (4, 5), ctime: (6, 7) };
        let userns = own_user_namespace().unwrap();
        Stamp { starttime: 9, exe, layout, creds: parse_status(status).unwrap(), cgroup: cgroup.into(), userns }
    }

    #[test]
    fn stamps_name_what_changed() {
        let plain = creds([1000; 4], [100; 4]);
        let a = stamp(&plain, [1; 10], "0::/a\n");
        a.same_as(&a.clone()).unwrap();
        a.uniform_credentials().unwrap();
        let mut exec = a.clone();
        exec.layout[2] += 4096;
        assert!(matches!(exec.same_as(&a), Err(AttestError::Exec)));
        let mut other_file = a.clone();
        other_file.exe.ino += 1;
        assert!(matches!(other_file.same_as(&a), Err(AttestError::Exec)));
        let setuid = stamp(&creds([1000, 0, 0, 0], [100; 4]), [1; 10], "0::/a\n");
        assert!(matches!(setuid.same_as(&a), Err(AttestError::CredentialsChanged)));
        let e = setuid.uniform_credentials().unwrap_err();
        assert_eq!(e.reason(), "setuid or mixed credentials");
        assert!(stamp(&creds([1000; 4], [100, 0, 100, 100]), [1; 10], "").uniform_credentials().is_err());
        let moved = stamp(&plain, [1; 10], "0::/b\n");
        assert!(matches!(moved.same_as(&a), Err(AttestError::CgroupChanged)));
        let mut reborn = a.clone();
        reborn.starttime += 1;
        assert!(matches!(reborn.same_as(&a), Err(AttestError::Gone)));
    }

    #[test]
    fn selectors_are_valid_and_encoded() {
        let m = Measurement {
            pid: 7,
            uid: 1000,
            gid: 100,
            supplementary_gids: vec![4],
            exe_path: b"/opt/my app/bin (deleted)".to_vec(),
            exe_sha256: Some([0xab; 32]),
            cgroup: CgroupInfo {
                container_id: Some("a".repeat(64)),
                pod_uid: Some("2c48913c-b29f-11e7-9350-020968147796".into()),
                unified: Some("/system.slice/containerd.service".into()),
            },
            stamp: stamp(&creds([1000; 4], [100; 4]), [1; 10], ""),
        };
        let s = m.selectors();
        assert!(s.contains(&"unix:path:/opt/my%20app/bin%20(deleted)".to_string()), "{s:?}");
        assert!(s.contains(&format!("unix:sha256:{}", "ab".repeat(32))));
        assert!(s.contains(&"k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796".to_string()));
        assert!(s.contains(&"unix:cgroup:/system.slice/containerd.service".to_string()), "{s:?}");
        for sel in &s {
            assert!(keyward_core::policy::selector_ok(sel), "{sel}");
        }
        assert!(!m.credential_selectors().iter().any(|s| s.starts_with("unix:sha256:") || s.starts_with("unix:path:")));
        let long = Measurement { exe_path: vec![b'a'; 600], exe_sha256: None, ..m };
        assert!(!long.selectors().iter().any(|s| s.starts_with("unix:path:") || s.starts_with("unix:sha256:")));
    }
}
