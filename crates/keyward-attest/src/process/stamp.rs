//! The [`Stamp`]: what must not change while a request is served (the executable's inode, the
//! `stat` fields an exec changes, credentials, cgroup, user namespace), read through the pinned
//! `/proc/PID` directory, and the parsers of `stat` and `status` it is made from.

use super::*;

/// The numbered fields of `stat` (1-based, as proc(5) counts them), after the last `)`.
pub(crate) fn stat_fields(stat: &str) -> Result<Vec<&str>, AttestError> {
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
pub(crate) const LAYOUT_FIELDS: [usize; 10] = [26, 27, 28, 45, 46, 47, 48, 49, 50, 51];

pub(crate) fn parse_layout(stat: &str) -> Result<(u64, [u64; 10]), AttestError> {
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
pub(crate) struct Creds {
    pub(crate) uids: [u32; 4],
    pub(crate) gids: [u32; 4],
    pub(crate) groups: Vec<u32>,
    pub(crate) tracer: u32,
}

pub(crate) fn parse_status(status: &str) -> Result<Creds, AttestError> {
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
    pub(crate) starttime: u64,
    pub(crate) exe: FileKey,
    pub(crate) layout: [u64; 10],
    pub(crate) creds: Creds,
    pub(crate) cgroup: String,
    /// The user namespace (device and inode of `/proc/PID/ns/user`).
    pub(crate) userns: (u64, u64),
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
    pub(crate) fn read_stamp(&self) -> Result<(Stamp, OwnedFd), AttestError> {
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
