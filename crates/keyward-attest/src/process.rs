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
//! its pid, pidfd and start time; the measurement describes what ran at attestation time.

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

/// Effective uid and gid, and supplementary gids, from `status`.
fn parse_status(status: &str) -> Result<(u32, u32, Vec<u32>), AttestError> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::split_ascii_whitespace);
    let second = |name: &'static str| -> Result<u32, AttestError> {
        field(name)
            .and_then(|mut f| f.nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or(AttestError::Malformed("status lacks effective ids"))
    };
    let uid = second("Uid:")?;
    let gid = second("Gid:")?;
    let groups = match field("Groups:") {
        Some(g) => {
            g.map(|v| v.parse().map_err(|_| AttestError::Malformed("bad Groups line"))).collect::<Result<_, _>>()?
        }
        None => Vec::new(),
    };
    Ok((uid, gid, groups))
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
}

impl Measurement {
    /// The selectors policies match, sorted: `unix:uid:N`, `unix:gid:N`,
    /// `unix:supplementary-gid:N`, `unix:path:P` (percent-encoded), `unix:sha256:HEX`,
    /// `k8s:container-id:ID`, `k8s:pod-uid:UID`.
    pub fn selectors(&self) -> Vec<String> {
        use keyward_core::policy::{MAX_SELECTOR_LEN, selector_value};
        let mut out = vec![format!("unix:uid:{}", self.uid), format!("unix:gid:{}", self.gid)];
        out.extend(self.supplementary_gids.iter().map(|g| format!("unix:supplementary-gid:{g}")));
        let path = format!("unix:path:{}", selector_value(&self.exe_path));
        // A path too long to be a selector is left out: a policy can then never match on it.
        if !self.exe_path.is_empty() && path.len() <= MAX_SELECTOR_LEN {
            out.push(path);
        }
        if let Some(h) = &self.exe_sha256 {
            out.push(format!("unix:sha256:{}", hex::encode(h)));
        }
        if let Some(c) = &self.cgroup.container_id {
            out.push(format!("k8s:container-id:{c}"));
        }
        if let Some(p) = &self.cgroup.pod_uid {
            out.push(format!("k8s:pod-uid:{p}"));
        }
        out.sort();
        out.dedup();
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

/// Measures pinned processes; remembers executable hashes by file identity.
pub struct Measurer {
    hash_limit: u64,
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
        Self { hash_limit, cache: Mutex::new(HashMap::new()) }
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
        let Some(exe_sha256) = self.exe_hash(&p.dir, may_hash)? else {
            return Ok(None);
        };
        let (uid, gid, supplementary_gids) = parse_status(&read_text(&p.dir, "status", "reading /proc/PID/status")?)?;
        let exe_path = readlinkat(&p.dir, "exe", Vec::new()).map_err(io_err("reading /proc/PID/exe"))?.into_bytes();
        let cgroup = cgroup::parse(&read_text(&p.dir, "cgroup", "reading /proc/PID/cgroup")?)?;
        Ok(Some(Measurement { pid: p.pid, uid, gid, supplementary_gids, exe_path, exe_sha256, cgroup }))
    }

    /// The executable's hash (`Some(None)` when it is too large to hash); `None` when it is
    /// not cached and `may_hash` is false.
    fn exe_hash(&self, dir: &OwnedFd, may_hash: bool) -> Result<Option<Option<[u8; 32]>>, AttestError> {
        // Opening `exe` gives the inode actually executed, even if the path now names
        // another file or none.
        let file = openat(dir, "exe", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(io_err("opening /proc/PID/exe"))?;
        let st = fstat(&file).map_err(io_err("stat of the executable"))?;
        let key = FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        };
        if let Some(h) = self.cache.lock().ok().and_then(|c| c.get(&key).copied()) {
            return Ok(Some(h));
        }
        if !may_hash {
            return Ok(None);
        }
        let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        let hash = if size > self.hash_limit { None } else { Some(hash_fd(&file, self.hash_limit)?) };
        // The file may have been written while it was read: only remember a hash if the
        // identity did not move meanwhile.
        let after = fstat(&file).map_err(io_err("stat of the executable"))?;
        let unchanged = after.st_size == st.st_size
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

    #[test]
    fn starttime_after_last_paren() {
        let stat = "1234 (evil) 0 0 0) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_starttime(stat).unwrap(), 98765);
        assert!(parse_starttime("1234 (x) S 1").is_err());
        assert!(parse_starttime("no paren").is_err());
    }

    #[test]
    fn status_effective_ids() {
        let s = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t50\t51\t52\t53\nGroups:\t4 24 \n";
        assert_eq!(parse_status(s).unwrap(), (1001, 51, vec![4, 24]));
        assert!(parse_status("Name:\tx\nUid:\t1000\n").is_err());
        assert_eq!(parse_status("Uid:\t0 0 0 0\nGid:\t0 0 0 0\nGroups:\n").unwrap(), (0, 0, vec![]));
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
            },
        };
        let s = m.selectors();
        assert!(s.contains(&"unix:path:/opt/my%20app/bin%20(deleted)".to_string()), "{s:?}");
        assert!(s.contains(&format!("unix:sha256:{}", "ab".repeat(32))));
        assert!(s.contains(&"k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796".to_string()));
        for sel in &s {
            assert!(keyward_core::policy::selector_ok(sel), "{sel}");
        }
        let long = Measurement { exe_path: vec![b'a'; 600], exe_sha256: None, ..m };
        assert!(!long.selectors().iter().any(|s| s.starts_with("unix:path:") || s.starts_with("unix:sha256:")));
    }
}
