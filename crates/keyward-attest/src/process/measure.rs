//! Measuring a pinned process: its [`Measurement`] (ids, groups, executable path and SHA-256,
//! cgroup), the executable hashes cached by file identity, and the check of its code mappings.

use super::*;

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
pub(crate) struct FileKey {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: i64,
    pub(crate) mtime: (i64, u64),
    pub(crate) ctime: (i64, u64),
}

/// Largest `/proc/PID/maps` read for the code check (a large JVM maps a few thousand regions).
pub(crate) const MAX_MAPS: u64 = 8 * 1024 * 1024;

/// Measures pinned processes; remembers executable hashes by file identity.
pub struct Measurer {
    pub(crate) hash_limit: u64,
    pub(crate) roots: cgroup::KubeletRoots,
    pub(crate) cache: Mutex<HashMap<FileKey, Option<[u8; 32]>>>,
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

    pub(crate) fn measure_with(&self, p: &Pinned, may_hash: bool) -> Result<Option<Measurement>, AttestError> {
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
    pub(crate) fn exe_hash(
        &self,
        file: &OwnedFd,
        key: FileKey,
        may_hash: bool,
    ) -> Result<Option<Option<[u8; 32]>>, AttestError> {
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

pub(crate) fn hash_fd(file: &OwnedFd, limit: u64) -> Result<[u8; 32], AttestError> {
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
