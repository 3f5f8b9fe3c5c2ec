//! The log's files: appending with preallocation, the logical end of a preallocated file, the
//! identity of the open file (to notice it was moved away), and the rotated files beside it.

use super::*;

pub(super) fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).read(true).write(true).truncate(false).mode(0o600).open(path)
}

/// Bytes added ahead of the records, written as zeros and synced once, so that appending a
/// batch and `fdatasync` touch only data blocks, not the file size (much cheaper on ext4/xfs).
pub(super) const PREALLOC: u64 = 4 * 1024 * 1024;

/// Where the records end: the file size less any zero-filled preallocated tail.
pub(super) fn logical_end(f: &mut File) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        match chunk.iter().rposition(|b| *b != 0) {
            Some(i) => return Ok(start + i as u64 + 1),
            None => end = start,
        }
    }
    Ok(0)
}

/// An open audit file with its write position and preallocated end.
pub(super) struct LogFile {
    pub(crate) file: File,
    pub(crate) pos: u64,
    pub(crate) alloc: u64,
    pub(crate) id: FileId,
}

/// Which file a path or descriptor is: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId(u32, u32, u64);

impl FileId {
    /// Asks for the inode number only. A `stat` that asks for times marks them as read, and
    /// with multigrain timestamps the next write then takes a fine-grained time and dirties the
    /// inode, which costs every following `fdatasync` an extra synchronous inode write.
    pub(crate) fn of(stx: std::io::Result<rustix::fs::Statx>) -> std::io::Result<Self> {
        let s = stx?;
        Ok(Self(s.stx_dev_major, s.stx_dev_minor, s.stx_ino))
    }

    pub(crate) fn of_path(path: &Path) -> std::io::Result<Self> {
        use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
        Self::of(statx(CWD, path, AtFlags::empty(), StatxFlags::INO).map_err(std::io::Error::from))
    }

    pub(crate) fn of_file(file: &File) -> std::io::Result<Self> {
        use rustix::fs::{AtFlags, StatxFlags, statx};
        Self::of(statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::INO).map_err(std::io::Error::from))
    }
}

impl LogFile {
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = open_append(path)?;
        let pos = logical_end(&mut file)?;
        let alloc = file.metadata()?.len();
        let id = FileId::of_file(&file)?;
        Ok(Self { file, pos, alloc, id })
    }

    /// Write `buf` at the end of the records and make it durable.
    pub(crate) fn append_durable(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let need = self.pos + buf.len() as u64;
        if need > self.alloc {
            let new_alloc = need + PREALLOC;
            let zeros = vec![0u8; usize::try_from(new_alloc - self.alloc).unwrap_or(0)];
            self.file.write_all_at(&zeros, self.alloc)?;
            self.file.sync_all()?;
            self.alloc = new_alloc;
        }
        if let Err(e) = self.file.write_all_at(buf, self.pos).and_then(|()| self.file.sync_data()) {
            // Best effort: leave zeros where the failed batch went, so the tail stays clean.
            let _ = self.file.write_all_at(&vec![0u8; buf.len()], self.pos);
            return Err(e);
        }
        self.pos = need;
        Ok(())
    }

    /// Drop the preallocated tail (before rotation or shutdown).
    pub(crate) fn trim(&self) -> std::io::Result<()> {
        self.file.set_len(self.pos)?;
        self.file.sync_all()
    }
}

pub(super) fn rotated_files(current: &Path) -> Vec<(u64, PathBuf)> {
    let (Some(dir), Some(name)) = (current.parent(), current.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
        for e in rd.flatten() {
            let fname = e.file_name();
            if let Some(n) = fname.to_str().and_then(|s| s.strip_prefix(&prefix)).and_then(|s| s.parse::<u64>().ok()) {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    out
}

pub(super) fn newest_rotated(current: &Path) -> Option<PathBuf> {
    rotated_files(current).pop().map(|(_, p)| p)
}

/// All files of a log (rotated ones first), for verification.
pub fn log_files(current: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = rotated_files(current).into_iter().map(|(_, p)| p).collect();
    if current.exists() {
        v.push(current.to_path_buf());
    }
    v
}
