//! Who is calling: peer credentials at accept time and, when the policy names executables, the
//! SHA-256 of the caller's executable (measured through a pinned pidfd, like the node agent);
//! then, at every call, the same process still holding the connection.
//!
//! The apiserver keeps one connection for all its calls, so a verdict given at accept would
//! travel with the connection: a process with the allowed uid could connect, then `exec`
//! another program (or fork a child) that keeps calling `Decrypt`. So the connection is pinned
//! at accept (pidfd, stamp: see `keyward_attest::process::Stamp`), every byte read is checked
//! to come from that process under unchanged real ids (`keyward_attest::conn`), and every call
//! compares the process's stamp now with the one at accept. Where the plugin cannot see the
//! caller's pid (another pid namespace: run it with hostPID), only the uid is checked.

use std::collections::BTreeSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use keyward_attest::conn::{CredStream, Peer};
use keyward_attest::{AttestError, Measurer, Stamp};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    /// The connection's process and its stamp at accept, when its pid is visible.
    pinned: Option<(Arc<Peer>, Stamp)>,
}

impl Caller {
    /// A caller refused for `reason`, with nothing known of it.
    pub fn unidentified(reason: &str) -> Self {
        Self { pid: 0, uid: u32::MAX, exe_sha256: None, refused: Some(reason.into()), pinned: None }
    }

    /// Why this call may not use Encrypt or Decrypt, if it may not: the verdict at accept, and
    /// the process holding the connection now (same image and credentials, every byte its
    /// own). The second part is the short reason for the audit record.
    pub fn verdict(&self) -> Result<(), (String, &'static str)> {
        if let Some(r) = &self.refused {
            return Err((r.clone(), "caller not allowed"));
        }
        let Some((peer, stamp)) = &self.pinned else { return Ok(()) };
        let now = peer.check().and_then(|p| p.stamp());
        let check = now.and_then(|now| {
            now.same_as(stamp)?;
            peer.check_stamp(&now)
        });
        check.map_err(|e: AttestError| (format!("the process holding this connection changed: {e}"), e.reason()))
    }

    /// How the caller appears in audit records.
    pub fn identity(&self) -> String {
        match &self.exe_sha256 {
            Some(h) => format!("unix:uid:{} pid:{} unix:sha256:{}", self.uid, self.pid, hex::encode(h)),
            None => format!("unix:uid:{} pid:{}", self.uid, self.pid),
        }
    }
}

/// Identify the peer of `stream` and judge it against `policy`.
pub async fn identify(stream: &CredStream, policy: &CallerPolicy, measurer: &Arc<Measurer>) -> Caller {
    let cred = match stream.socket().peer_cred() {
        Ok(c) => c,
        Err(e) => return Caller::unidentified(&format!("no peer credentials: {e}")),
    };
    let (uid, pid) = (cred.uid(), cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0));
    let mut caller = Caller { pid, uid, exe_sha256: None, refused: None, pinned: None };
    if !policy.uids.contains(&uid) {
        caller.refused = Some(format!("uid {uid} is not allowed"));
        return caller;
    }
    let peer = stream.peer().clone();
    if matches!(peer.pin_error(), Some(AttestError::NoPeer)) {
        // Another pid namespace: only the uid can be checked.
        if !policy.exe_sha256.is_empty() {
            caller.refused = Some(
                "the caller's executable cannot be measured (its pid is not visible: run the plugin with hostPID)"
                    .into(),
            );
        }
        return caller;
    }
    let want_exe = !policy.exe_sha256.is_empty();
    let (p2, m2) = (peer.clone(), measurer.clone());
    let measured = tokio::task::spawn_blocking(move || {
        let pinned = p2.check()?;
        if !want_exe {
            let stamp = pinned.stamp()?;
            stamp.uniform_credentials()?;
            p2.check_stamp(&stamp)?;
            return Ok((stamp, None));
        }
        let m = m2.measure(pinned)?;
        m.stamp.uniform_credentials()?;
        p2.check_stamp(&m.stamp)?;
        m2.check_code(pinned, &m)?;
        Ok::<_, AttestError>((m.stamp, Some(m.exe_sha256)))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()));
    match measured {
        Ok((stamp, exe)) => {
            if let Some(h) = exe {
                caller.exe_sha256 = h;
                let ok = h.is_some_and(|h| policy.exe_sha256.iter().any(|a| keyward_crypto::ct_eq(a, &h)));
                if !ok {
                    caller.refused = Some("the calling executable is not allowed".into());
                }
            }
            caller.pinned = Some((peer, stamp));
        }
        Err(e) => caller.refused = Some(format!("the caller could not be measured: {e}")),
    }
    caller
}

/// An accepted connection with its caller.
#[derive(Debug)]
pub struct Conn {
    /// The socket, noting the writer of every byte.
    pub stream: CredStream,
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
