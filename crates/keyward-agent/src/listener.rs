//! The Workload API listener: accepts, pins the caller (`keyward_attest::conn`), and caps how
//! many connections one uid (and everyone together) may hold, so that a local user opening
//! connections without end cannot take the agent from the others. A connection over a cap is
//! closed at once and the refusal recorded.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use keyward_attest::conn::{CredStream, Peer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;

/// Connection limits of the Workload API.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections one uid may hold at once.
    pub per_uid: usize,
    /// Connections held in all.
    pub total: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self { per_uid: 64, total: 4096 }
    }
}

/// Open connections, by uid.
#[derive(Debug, Default)]
struct Counts {
    by_uid: HashMap<u32, usize>,
    total: usize,
}

/// A place under the caps, given back when the connection closes.
#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<Counts>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.counts.lock() {
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.by_uid.get_mut(&self.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_uid.remove(&self.uid);
                }
            }
        }
    }
}

/// What a request handler learns about its connection.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The pinned peer and what its writes said.
    pub peer: Arc<Peer>,
    /// Effective uid at connect (`SO_PEERCRED`).
    pub uid: u32,
}

/// The Workload API listener.
#[derive(Debug)]
pub struct CredListener {
    pub(crate) inner: UnixListener,
    limits: ConnLimits,
    counts: Arc<Mutex<Counts>>,
    refused: Option<tokio::sync::mpsc::Sender<(u32, u32, &'static str)>>,
}

impl CredListener {
    pub(crate) fn new(inner: UnixListener) -> Self {
        Self { inner, limits: ConnLimits::default(), counts: Arc::default(), refused: None }
    }

    /// Use these caps.
    pub fn with_limits(mut self, limits: ConnLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Send (uid, pid, reason) of each refused connection here (the agent's audit log).
    /// (A full channel drops the report: the records are rate-limited per uid anyway.)
    pub(crate) fn report_refusals_to(&mut self, tx: tokio::sync::mpsc::Sender<(u32, u32, &'static str)>) {
        self.refused = Some(tx);
    }

    fn take_slot(&self, uid: u32) -> Result<Slot, &'static str> {
        let mut c = self.counts.lock().map_err(|_| "connection table unusable")?;
        if c.total >= self.limits.total {
            return Err("connection limit reached");
        }
        let mine = c.by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= self.limits.per_uid {
            return Err("connection limit per uid reached");
        }
        c.total += 1;
        *c.by_uid.entry(uid).or_default() += 1;
        Ok(Slot { counts: self.counts.clone(), uid })
    }
}

/// An accepted connection: reads note their writer; holds its place under the caps.
#[derive(Debug)]
pub struct AgentStream {
    inner: CredStream,
    caller: Caller,
    _slot: Slot,
}

impl AgentStream {
    pub(crate) fn caller(&self) -> &Caller {
        &self.caller
    }
}

impl axum::serve::Listener for CredListener {
    type Io = AgentStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((sock, addr)) => {
                    let (uid, pid) = match sock.peer_cred() {
                        Ok(c) => (c.uid(), c.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0)),
                        Err(_) => continue,
                    };
                    let slot = match self.take_slot(uid) {
                        Ok(s) => s,
                        Err(reason) => {
                            tracing::warn!(uid, pid, reason, "Workload API connection refused");
                            if let Some(tx) = &self.refused {
                                let _ = tx.try_send((uid, pid, reason));
                            }
                            continue;
                        }
                    };
                    let inner = CredStream::new(sock);
                    let caller = Caller { peer: inner.peer().clone(), uid };
                    return (AgentStream { inner, caller, _slot: slot }, addr);
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
        self.inner.local_addr()
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentStream {
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
