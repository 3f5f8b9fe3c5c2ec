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

/// The numbered fields of `stat` (1-based, as proc(5) counts them), after the last `)`.
fn stat_fields(stat: &str) -> Result<Vec<&str>, AttestError> {
    let after = stat.rfind(')').map(|i| &stat[i + 1..]).ok_or(AttestError::Malformed("stat has no command"))?;
    // Fields 1 and 2 (pid, command) come before; pad so that index N is field N.
    let mut f = vec!["", "", ""];
    f.extend(after.split_ascii_whitespace());
    Ok(f)
}

/// Fields of `stat` that each `exec` sets anew: start and end of code, start of the stack,
/// start and end of data, start of the heap, start and end of the arguments and of the
/// environment (proc(5) fields 26, 27, 28, 45 to 51). The kernel shows them only to a reader
/// allowed to ptrace the process (the agent runs as root); to others they read as 0.
const LAYOUT_FIELDS: [usize; 10] = [26, 27, 28, 45, 46, 47, 48, 49, 50, 51];

fn parse_layout(stat: &str) -> Result<(u64, [u64; 10]), AttestError> {
    let f = stat_fields(stat)?;
    let num =
        |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or(AttestError::Malformed("stat is too short"));
    let mut layout = [0u64; 10];
    for (slot, i) in layout.iter_mut().zip(LAYOUT_FIELDS) {
        *slot = num(i)?;
    }
    Ok((num(22)?, layout))
}

/// What `status` says about credentials: real, effective, saved and filesystem uids and gids,
/// supplementary gids, and the tracer's pid.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Creds {
    uids: [u32; 4],
    gids: [u32; 4],
    groups: Vec<u32>,
    tracer: u32,
}

fn parse_status(status: &str) -> Result<Creds, AttestError> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::split_ascii_whitespace);
    let four = |name: &'static str| -> Result<[u32; 4], AttestError> {
        let v: Vec<u32> = field(name)
            .ok_or(AttestError::Malformed("status lacks ids"))?
            .map(|v| v.parse().map_err(|_| AttestError::Malformed("status has a bad id")))
            .collect::<Result<_, _>>()?;
        <[u32; 4]>::try_from(v).map_err(|_| AttestError::Malformed("status lacks ids"))
    };
    let uids = four("Uid:")?;
    let gids = four("Gid:")?;
    let groups = match field("Groups:") {
        Some(g) => {
            g.map(|v| v.parse().map_err(|_| AttestError::Malformed("bad Groups line"))).collect::<Result<_, _>>()?
        }
        None => Vec::new(),
    };
    let tracer = field("TracerPid:")
        .and_then(|mut f| f.next())
        .and_then(|v| v.parse().ok())
        .ok_or(AttestError::Malformed("status lacks TracerPid"))?;
    Ok(Creds { uids, gids, groups, tracer })
}

/// Everything about a process that must stay the same from the moment it is measured until it
/// has its answer: see the module documentation. Read with [`Pinned::stamp`]; compared with
/// [`Stamp::same_as`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    starttime: u64,
    exe: FileKey,
    layout: [u64; 10],
    creds: Creds,
    cgroup: String,
    /// The user namespace (device and inode of `/proc/PID/ns/user`).
    userns: (u64, u64),
}

impl Stamp {
    /// Check that `self` (read now) describes the same image, credentials and cgroup as
    /// `earlier`; say which changed otherwise.
    pub fn same_as(&self, earlier: &Stamp) -> Result<(), AttestError> {
        if self.starttime != earlier.starttime {
            return Err(AttestError::Gone);
        }
        if self.exe != earlier.exe || self.layout != earlier.layout {
            return Err(AttestError::Exec);
        }
        if self.creds != earlier.creds || self.userns != earlier.userns {
            return Err(AttestError::CredentialsChanged);
        }
        if self.cgroup != earlier.cgroup {
            return Err(AttestError::CgroupChanged);
        }
        Ok(())
    }

    /// The real uid and gid (what `SCM_CREDENTIALS` reports for each write).
    pub fn real_ids(&self) -> (u32, u32) {
        (self.creds.uids[0], self.creds.gids[0])
    }

    /// The effective uid and gid (what `SO_PEERCRED` reported at connect).
    pub fn effective_ids(&self) -> (u32, u32) {
        (self.creds.uids[1], self.creds.gids[1])
    }

    /// Refuse a process whose real, effective, saved and filesystem ids are not all the same:
    /// a setuid or setgid program (it acts for the user who started it as much as for its
    /// owner), or a process half-way through dropping privileges. Refuse a process in another
    /// user namespace than the measurer's too: in a user namespace of its own (`unshare -U`,
    /// rootless containers) a process holds `CAP_SYS_ADMIN` over the pid namespaces it makes,
    /// and may then put any of their pids into `SCM_CREDENTIALS`, so the kernel's naming of the
    /// writer of each byte could not be trusted.
    pub fn uniform_credentials(&self) -> Result<(), AttestError> {
        let c = &self.creds;
        if c.uids.iter().any(|u| *u != c.uids[0]) || c.gids.iter().any(|g| *g != c.gids[0]) {
            return Err(AttestError::MixedCredentials { uids: c.uids, gids: c.gids });
        }
        if Some(self.userns) != own_user_namespace() {
            return Err(AttestError::UserNamespace);
        }
        Ok(())
    }
}

impl Pinned {
    /// Read the process's [`Stamp`] now, through the pinned directory. Fails if the process
    /// exited or is traced.
    pub fn stamp(&self) -> Result<Stamp, AttestError> {
        self.read_stamp().map(|(s, _)| s)
    }

    /// The stamp and the executable's open file (for hashing).
    fn read_stamp(&self) -> Result<(Stamp, OwnedFd), AttestError> {
        // Opening `exe` gives the inode actually executed, even if the path now names another
        // file or none.
        let file = openat(&self.dir, "exe", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(io_err("opening /proc/PID/exe"))?;
        let st = fstat(&file).map_err(io_err("stat of the executable"))?;
        let exe = FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        };
        let creds = parse_status(&read_text(&self.dir, "status", "reading /proc/PID/status")?)?;
        let (starttime, layout) = parse_layout(&read_text(&self.dir, "stat", "reading /proc/PID/stat")?)?;
        let cgroup = read_text(&self.dir, "cgroup", "reading /proc/PID/cgroup")?;
        let ns = rustix::fs::statat(&self.dir, "ns/user", rustix::fs::AtFlags::empty())
            .map_err(io_err("reading /proc/PID/ns/user"))?;
        let userns = (ns.st_dev, ns.st_ino);
        if starttime != self.starttime {
            return Err(AttestError::Gone);
        }
        if creds.tracer != 0 {
            return Err(AttestError::Traced(creds.tracer));
        }
        ensure_running(&self.pidfd)?;
        Ok((Stamp { starttime, exe, layout, creds, cgroup, userns }, file))
    }
}

/// What the agent measured about a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    /// Pid in the agent's namespace (not a selector: pids are not identities).
    pub pid: u32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary gids.
    pub supplementary_gids: Vec<u32>,
    /// Path of the executable in the caller's mount namespace, raw bytes; ends in ` (deleted)`
    /// when the file was replaced or removed after the process started.
    pub exe_path: Vec<u8>,
    /// SHA-256 of the executable that is running, or `None` when it is larger than the limit.
    pub exe_sha256: Option<[u8; 32]>,
    /// Container and pod, from the cgroup paths.
    pub cgroup: CgroupInfo,
    /// What must not change while the caller's request is served.
    pub stamp: Stamp,
}

impl Measurement {
    /// The selectors policies match, sorted: `unix:uid:N`, `unix:gid:N`,
    /// `unix:supplementary-gid:N`, `unix:path:P` (percent-encoded), `unix:sha256:HEX`,
    /// `unix:cgroup:PATH` (percent-encoded), and under the kubelet's root
    /// `k8s:container-id:ID`, `k8s:pod-uid:UID`.
    pub fn selectors(&self) -> Vec<String> {
        let mut out = self.credential_selectors();
        out.extend(self.executable_selectors());
        out.sort();
        out.dedup();
        out
    }

    /// The selectors that do not describe the executable: ids, cgroup, container and pod.
    pub fn credential_selectors(&self) -> Vec<String> {
        use keyward_core::policy::{MAX_SELECTOR_LEN, selector_value};
        let mut out = vec![format!("unix:uid:{}", self.uid), format!("unix:gid:{}", self.gid)];
        out.extend(self.supplementary_gids.iter().map(|g| format!("unix:supplementary-gid:{g}")));
        if let Some(c) = &self.cgroup.unified {
            let sel = format!("unix:cgroup:{}", selector_value(c.as_bytes()));
            if sel.len() <= MAX_SELECTOR_LEN {
                out.push(sel);
            }
        }
        if let Some(c) = &self.cgroup.container_id {
            out.push(format!("k8s:container-id:{c}"));
        }
        if let Some(p) = &self.cgroup.pod_uid {
            out.push(format!("k8s:pod-uid:{p}"));
        }
        out
    }

    /// The selectors that describe the executable: `unix:path:` and `unix:sha256:`.
    pub fn executable_selectors(&self) -> Vec<String> {
        use keyward_core::policy::{MAX_SELECTOR_LEN, selector_value};
        let mut out = Vec::new();
        let path = format!("unix:path:{}", selector_value(&self.exe_path));
        // A path too long to be a selector is left out: a policy can then never match on it.
        if !self.exe_path.is_empty() && path.len() <= MAX_SELECTOR_LEN {
            out.push(path);
        }
        if let Some(h) = &self.exe_sha256 {
            out.push(format!("unix:sha256:{}", hex::encode(h)));
        }
        out
    }
}

/// The identity of an executable file's contents as far as the cache is concerned: replacing
/// or rewriting the file changes at least the inode or ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, u64),
    ctime: (i64, u64),
}

/// Largest `/proc/PID/maps` read for the code check (a large JVM maps a few thousand regions).
const MAX_MAPS: u64 = 8 * 1024 * 1024;

/// Measures pinned processes; remembers executable hashes by file identity.
pub struct Measurer {
    hash_limit: u64,
    roots: cgroup::KubeletRoots,
    cache: Mutex<HashMap<FileKey, Option<[u8; 32]>>>,
}

impl fmt::Debug for Measurer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Measurer").field("hash_limit", &self.hash_limit).finish_non_exhaustive()
    }
}

impl Default for Measurer {
    fn default() -> Self {
        Self::new(DEFAULT_HASH_LIMIT)
    }
}

impl Measurer {
    /// A measurer that hashes executables up to `hash_limit` bytes (larger ones get no
    /// `unix:sha256` selector).
    pub fn new(hash_limit: u64) -> Self {
        Self { hash_limit, roots: cgroup::KubeletRoots::default(), cache: Mutex::new(HashMap::new()) }
    }

    /// Take container and pod ids only from under these kubelet roots (default
    /// [`cgroup::DEFAULT_KUBELET_ROOTS`]).
    pub fn with_kubelet_roots(mut self, roots: cgroup::KubeletRoots) -> Self {
        self.roots = roots;
        self
    }

    /// How many executables have been hashed and remembered.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Measure a pinned process. Blocking (reads the executable on a cache miss); call
    /// [`Pinned::still_alive`] afterwards before trusting the result.
    pub fn measure(&self, p: &Pinned) -> Result<Measurement, AttestError> {
        self.measure_with(p, true).map(|m| m.ok_or(AttestError::Gone))?
    }

    /// Measure a pinned process if its executable's hash is already known, without reading
    /// the executable: only a few small `/proc` files, so it may run on an async thread. `None`
    /// when the executable must be hashed first ([`Measurer::measure`], blocking).
    pub fn measure_if_cached(&self, p: &Pinned) -> Result<Option<Measurement>, AttestError> {
        self.measure_with(p, false)
    }

    fn measure_with(&self, p: &Pinned, may_hash: bool) -> Result<Option<Measurement>, AttestError> {
        let (stamp, file) = p.read_stamp()?;
        let Some(exe_sha256) = self.exe_hash(&file, stamp.exe, may_hash)? else {
            return Ok(None);
        };
        let exe_path = readlinkat(&p.dir, "exe", Vec::new()).map_err(io_err("reading /proc/PID/exe"))?.into_bytes();
        let cgroup = cgroup::parse(&stamp.cgroup, &self.roots)?;
        let (uid, gid) = stamp.effective_ids();
        Ok(Some(Measurement {
            pid: p.pid,
            uid,
            gid,
            supplementary_gids: stamp.creds.groups.clone(),
            exe_path,
            exe_sha256,
            cgroup,
            stamp,
        }))
    }

    /// Refuse a process in which a file it could have written is mapped executable, besides
    /// its own (measured) executable: a library preloaded, audited or found through
    /// `LD_LIBRARY_PATH` from the caller's files, or code loaded from a memfd it made. Such
    /// code runs with the measured identity without being part of what was measured. A file
    /// counts as the caller's when the caller owns it (unless the caller is root) or anyone but
    /// its owner may write it. Reads `/proc/PID/maps` and stats each mapped file through
    /// `/proc/PID/map_files` (the file actually mapped, in any mount namespace). Blocking.
    pub fn check_code(&self, p: &Pinned, m: &Measurement) -> Result<(), AttestError> {
        use std::io::Read;
        let fd = openat(&p.dir, "maps", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(io_err("reading /proc/PID/maps"))?;
        let mut maps = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_MAPS)
            .read_to_end(&mut maps)
            .map_err(|e| AttestError::Io { what: "reading /proc/PID/maps", source: e })?;
        if maps.len() as u64 >= MAX_MAPS {
            return Err(AttestError::Malformed("the process maps more regions than the agent reads"));
        }
        let mut seen = std::collections::HashSet::new();
        for line in maps.split(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(line);
            let mut f = text.split_ascii_whitespace();
            let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            if !perms.contains('x') || inode == "0" || !seen.insert(inode.to_string()) {
                continue;
            }
            let path = f.collect::<Vec<_>>().join(" ");
            // `maps` pads addresses to 8 digits; `map_files` names them without leading zeros.
            let bounds = range
                .split_once('-')
                .and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)));
            let Some((start, end)) = bounds else {
                return Err(AttestError::Malformed("a maps line has no address range"));
            };
            let st = match rustix::fs::statat(
                &p.dir,
                format!("map_files/{start:x}-{end:x}"),
                rustix::fs::AtFlags::empty(),
            ) {
                Ok(st) => st,
                Err(e) => return Err(io_err("reading /proc/PID/map_files")(e)),
            };
            if st.st_dev == m.stamp.exe.dev && st.st_ino == m.stamp.exe.ino {
                continue;
            }
            let writable_by_others = st.st_mode & 0o022 != 0;
            let callers = m.uid != 0 && st.st_uid == m.uid;
            if writable_by_others || callers {
                return Err(AttestError::ForeignCode(path));
            }
        }
        Ok(())
    }

    /// The executable's hash (`Some(None)` when it is too large to hash); `None` when it is
    /// not cached and `may_hash` is false.
    fn exe_hash(&self, file: &OwnedFd, key: FileKey, may_hash: bool) -> Result<Option<Option<[u8; 32]>>, AttestError> {
        if let Some(h) = self.cache.lock().ok().and_then(|c| c.get(&key).copied()) {
            return Ok(Some(h));
        }
        if !may_hash {
            return Ok(None);
        }
        let size = u64::try_from(key.size).unwrap_or(u64::MAX);
        let hash = if size > self.hash_limit { None } else { Some(hash_fd(file, self.hash_limit)?) };
        // The file may have been written while it was read: only remember a hash if the
        // identity did not move meanwhile.
        let after = fstat(file).map_err(io_err("stat of the executable"))?;
        let unchanged = after.st_size == key.size
            && (after.st_mtime, after.st_mtime_nsec) == key.mtime
            && (after.st_ctime, after.st_ctime_nsec) == key.ctime;
        if !unchanged {
            return Err(AttestError::Gone);
        }
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_ENTRIES {
                c.clear();
            }
            c.insert(key, hash);
        }
        Ok(Some(hash))
    }
}

fn hash_fd(file: &OwnedFd, limit: u64) -> Result<[u8; 32], AttestError> {
    let mut h = keyward_crypto::hash::Sha256Stream::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = rustix::io::read(file, &mut buf).map_err(io_err("reading the executable"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(AttestError::Gone);
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
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
