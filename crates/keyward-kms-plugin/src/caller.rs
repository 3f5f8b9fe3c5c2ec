//! Who is calling: peer credentials at accept time and, when the policy names executables, the
//! SHA-256 of the caller's executable (measured through a pinned pidfd, like the node agent).

use std::collections::BTreeSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use keyward_attest::{Measurer, Pinned};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;

/// Which local processes may call `Encrypt` and `Decrypt`. Deny by default: a caller must have an
/// allowed uid and, when `exe_sha256` is not empty, run one of those executables.
#[derive(Debug, Clone, Default)]
pub struct CallerPolicy {
    /// Allowed uids (from SO_PEERCRED).
    pub uids: BTreeSet<u32>,
    /// Allowed SHA-256 digests of the calling executable (e.g. kube-apiserver's); empty: any.
    pub exe_sha256: Vec<[u8; 32]>,
}

/// A connected caller, as established at accept time.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Pid in the plugin's pid namespace (0 when the caller is in a namespace the plugin cannot
    /// see; run the plugin with hostPID to measure executables).
    pub pid: u32,
    /// Uid.
    pub uid: u32,
    /// SHA-256 of the caller's executable, when the policy asked for it and it was measured.
    pub exe_sha256: Option<[u8; 32]>,
    /// Why the caller may not use Encrypt/Decrypt; `None` when it may.
    pub refused: Option<String>,
}

impl Caller {
    /// How the caller appears in audit records.
    pub fn identity(&self) -> String {
        match &self.exe_sha256 {
            Some(h) => format!("unix:uid:{} pid:{} unix:sha256:{}", self.uid, self.pid, hex::encode(h)),
            None => format!("unix:uid:{} pid:{}", self.uid, self.pid),
        }
    }
}

/// Identify the peer of `stream` and judge it against `policy`.
pub async fn identify(stream: &UnixStream, policy: &CallerPolicy, measurer: &Arc<Measurer>) -> Caller {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            return Caller {
                pid: 0,
                uid: u32::MAX,
                exe_sha256: None,
                refused: Some(format!("no peer credentials: {e}")),
            };
        }
    };
    let (uid, pid) = (cred.uid(), cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0));
    let mut caller = Caller { pid, uid, exe_sha256: None, refused: None };
    if !policy.uids.contains(&uid) {
        caller.refused = Some(format!("uid {uid} is not allowed"));
        return caller;
    }
    if policy.exe_sha256.is_empty() {
        return caller;
    }
    let measured = match Pinned::from_socket(stream) {
        Ok(pinned) => {
            let m = measurer.clone();
            tokio::task::spawn_blocking(move || {
                let measurement = m.measure(&pinned)?;
                pinned.still_alive()?;
                Ok::<_, keyward_attest::AttestError>(measurement)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Err(e) => Err(e.to_string()),
    };
    match measured {
        Ok(m) => {
            caller.exe_sha256 = m.exe_sha256;
            let ok = m.exe_sha256.is_some_and(|h| policy.exe_sha256.iter().any(|a| keyward_crypto::ct_eq(a, &h)));
            if !ok {
                caller.refused = Some("the calling executable is not allowed".into());
            }
        }
        Err(e) => caller.refused = Some(format!("the caller could not be measured: {e}")),
    }
    caller
}

/// An accepted connection with its caller.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: UnixStream,
    /// Who connected.
    pub caller: Caller,
}

impl Connected for Conn {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
