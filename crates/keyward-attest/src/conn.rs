//! Unix socket connections that know who wrote each byte.
//!
//! `SO_PEERCRED`/`SO_PEERPIDFD` name the process that called `connect()`. A process can connect,
//! fork, and let the child write the request while the parent `exec`s a trusted binary to be
//! measured (the "fd passing, then exec" pitfall). To close that, the listening socket has
//! `SO_PASSCRED` (inherited by every accepted socket, and in force for data sent before
//! `accept`), and every read is a `recvmsg` that returns the writer's pid, uid and gid with the
//! bytes (the kernel never merges data from two writers in one read). The pid is the writer's
//! process (thread group) id; the uid and gid are its *real* ids at the moment it wrote.
//!
//! A connection on which any byte came from another process than the pinned one, or from the
//! pinned process under other real ids than its first bytes, is marked, and [`Peer::check`]
//! refuses every request on it from then on.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

use crate::process::{AttestError, Pinned, Stamp};

const CLEAN: u8 = 0;
const FOREIGN: u8 = 1;
const UNNAMED: u8 = 2;
const CREDS: u8 = 3;

/// The process on the other end of one connection: pinned at accept, and what its writes said.
#[derive(Debug)]
pub struct Peer {
    pinned: Result<Pinned, AttestError>,
    taint: AtomicU8,
    /// Real uid and gid of the first bytes written.
    writer_ids: Mutex<Option<(u32, u32)>>,
}

impl Peer {
    /// The pinned process, if the connection is still clean; otherwise why not.
    pub fn check(&self) -> Result<&Pinned, AttestError> {
        let p = self.pinned.as_ref().map_err(|e| match e {
            AttestError::NoPeer => AttestError::NoPeer,
            _ => AttestError::Gone,
        })?;
        match self.taint.load(Ordering::Acquire) {
            CLEAN => Ok(p),
            CREDS => Err(AttestError::CredentialsChanged),
            _ => Err(AttestError::ForeignWriter),
        }
    }

    /// Why the connection could not be pinned at accept, if it could not.
    pub fn pin_error(&self) -> Option<&AttestError> {
        self.pinned.as_ref().err()
    }

    /// Check the pinned process's stamp against what its writes said: the connection must be
    /// clean, `SO_PEERCRED` (effective ids at connect) and every write's real ids must be the
    /// stamp's.
    pub fn check_stamp(&self, stamp: &Stamp) -> Result<(), AttestError> {
        let p = self.check()?;
        if p.peer_ids() != stamp.effective_ids() {
            return Err(AttestError::CredentialsChanged);
        }
        match *self.writer_ids.lock().map_err(|_| AttestError::Gone)? {
            Some(ids) if ids != stamp.real_ids() => Err(AttestError::CredentialsChanged),
            _ => Ok(()),
        }
    }

    fn note_write(&self, expected_pid: Option<i32>, cred: Option<UnixCredentials>) {
        let mark = |code: u8| {
            if self.taint.compare_exchange(CLEAN, code, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                tracing::warn!(
                    connected = ?expected_pid,
                    writer = ?cred.map(|c| c.pid()),
                    "bytes written by another process than the one that connected, or under other credentials"
                );
            }
        };
        let Some(c) = cred else {
            return mark(UNNAMED);
        };
        if Some(c.pid()) != expected_pid {
            return mark(FOREIGN);
        }
        if let Ok(mut ids) = self.writer_ids.lock() {
            match *ids {
                None => *ids = Some((c.uid(), c.gid())),
                Some(prev) if prev != (c.uid(), c.gid()) => mark(CREDS),
                Some(_) => {}
            }
        }
    }
}

/// Turn on `SO_PASSCRED` on a listening socket (accepted sockets inherit it).
pub fn pass_credentials(listener: &UnixListener) -> io::Result<()> {
    setsockopt(listener, sockopt::PassCred, &true).map_err(io::Error::from)
}

/// An accepted connection whose reads note the writer of every byte.
#[derive(Debug)]
pub struct CredStream {
    inner: UnixStream,
    peer: Arc<Peer>,
    expected_pid: Option<i32>,
}

impl CredStream {
    /// Pin the peer of a freshly accepted stream (whose listener has `SO_PASSCRED`).
    pub fn new(inner: UnixStream) -> Self {
        let pinned = Pinned::from_socket(&inner);
        let expected_pid = pinned.as_ref().ok().and_then(|p| i32::try_from(p.pid()).ok());
        let peer = Arc::new(Peer { pinned, taint: AtomicU8::new(CLEAN), writer_ids: Mutex::new(None) });
        Self { inner, peer, expected_pid }
    }

    /// The connection's peer.
    pub fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    /// The socket.
    pub fn socket(&self) -> &UnixStream {
        &self.inner
    }
}

impl AsyncRead for CredStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            ready!(me.inner.poll_read_ready(cx))?;
            let fd = me.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            let got = me.inner.try_io(Interest::READABLE, || {
                let mut iov = [io::IoSliceMut::new(unfilled)];
                let mut space = nix::cmsg_space!(UnixCredentials);
                let msg = recvmsg::<()>(fd, &mut iov, Some(space.as_mut_slice()), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut writer = None;
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmCredentials(cred) = c {
                        writer = Some(cred);
                    }
                }
                Ok((msg.bytes, writer))
            });
            match got {
                Ok((n, writer)) => {
                    if n > 0 {
                        me.peer.note_write(me.expected_pid, writer);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for CredStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
