//! Workload API connections that know who wrote each byte.
//!
//! `SO_PEERCRED`/`SO_PEERPIDFD` name the process that called `connect()`. A process can connect,
//! fork, and let the child write the request while the parent `exec`s a trusted binary to be
//! measured (the "fd passing, then exec" pitfall). To close that, the listening socket has
//! `SO_PASSCRED` (inherited by every accepted socket, and in force for data sent before
//! `accept`), and every read is a `recvmsg` that returns the writer's pid with the bytes: the
//! kernel never merges data from two writers in one read. If any byte of a connection was
//! written by a process other than the pinned one, the connection is marked and every request
//! on it is refused.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use keyward_attest::{AttestError, Pinned};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

/// The caller of one connection: pinned at accept, and whether anyone else wrote to it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub(crate) pinned: Arc<Result<Pinned, AttestError>>,
    pub(crate) foreign_writer: Arc<AtomicBool>,
}

/// Turn on `SO_PASSCRED` on a listening socket (accepted sockets inherit it).
pub(crate) fn pass_credentials(listener: &UnixListener) -> io::Result<()> {
    setsockopt(listener, sockopt::PassCred, &true).map_err(io::Error::from)
}

/// The Workload API listener: accepts, pins the caller, wraps the stream.
#[derive(Debug)]
pub struct CredListener(pub(crate) UnixListener);

/// An accepted connection whose reads check the writer of every byte.
#[derive(Debug)]
pub struct CredStream {
    inner: UnixStream,
    caller: Caller,
    expected_pid: Option<i32>,
}

impl CredStream {
    pub(crate) fn caller(&self) -> &Caller {
        &self.caller
    }
}

impl axum::serve::Listener for CredListener {
    type Io = CredStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, addr)) => {
                    let pinned = Pinned::from_socket(&inner);
                    let expected_pid = pinned.as_ref().ok().and_then(|p| i32::try_from(p.pid()).ok());
                    let caller = Caller { pinned: Arc::new(pinned), foreign_writer: Arc::new(AtomicBool::new(false)) };
                    return (CredStream { inner, caller, expected_pid }, addr);
                }
                Err(e) => {
                    // As axum does for its own listeners: connection errors are the peer's
                    // problem; others (EMFILE) get a pause before the next try.
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        tracing::error!(error = %e, "accept on the Workload API socket failed");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
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
                        writer = Some(cred.pid());
                    }
                }
                Ok((msg.bytes, writer))
            });
            match got {
                Ok((n, writer)) => {
                    // Bytes from a writer we cannot name, or from another process than the
                    // pinned one, taint the connection.
                    if n > 0
                        && (writer.is_none() || writer != me.expected_pid)
                        && !me.caller.foreign_writer.swap(true, Ordering::AcqRel)
                    {
                        tracing::warn!(
                            connected = ?me.expected_pid,
                            writer = ?writer,
                            "Workload API request written by another process than the one that connected"
                        );
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
