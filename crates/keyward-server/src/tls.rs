//! HTTPS: a rustls (AWS-LC) listener for axum. Handshakes run in their own tasks so a slow or
//! hostile client cannot stall the accept loop; failed handshakes are logged at debug level and
//! dropped.
//!
//! With a client CA configured, clients may present a certificate (mTLS); one that does not
//! chain to that CA fails the handshake. A verified certificate becomes the connection's
//! [`ClientCert`] identity, available to handlers as `ConnectInfo<PeerInfo>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyward_core::policy::selector_value;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Certificate chain and private key files (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; without it, client
    /// certificates are not requested.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS could not be configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be used.
    #[error("client CA: {0}")]
    ClientCa(String),
}

/// The identity a verified TLS client certificate establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the leaf certificate (DER), hex.
    pub fingerprint: String,
    /// Subject common name, if any.
    pub common_name: Option<String>,
    /// `cert:sha256:FP`, `cert:cn:CN`, `cert:dns:NAME`, `cert:uri:URI`, `cert:email:ADDR`, sorted.
    /// Bytes outside printable ASCII (and `%`) are percent-encoded: CN `Billing API` gives
    /// `cert:cn:Billing%20API`.
    pub selectors: Vec<String>,
}

/// Most names taken from one certificate.
const MAX_CERT_NAMES: usize = 32;

impl ClientCert {
    /// Read the identity out of a certificate rustls has already verified.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("client certificate: {e}"))?;
        let fingerprint = hex::encode(keyward_crypto::hash::sha256(der));
        let mut selectors = vec![format!("cert:sha256:{fingerprint}")];
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        if let Some(cn) = &common_name {
            selectors.push(format!("cert:cn:{}", selector_value(cn.as_bytes())));
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in san.value.general_names.iter().take(MAX_CERT_NAMES) {
                match name {
                    GeneralName::DNSName(d) => selectors.push(format!("cert:dns:{}", selector_value(d.as_bytes()))),
                    GeneralName::URI(u) => selectors.push(format!("cert:uri:{}", selector_value(u.as_bytes()))),
                    GeneralName::RFC822Name(m) => {
                        selectors.push(format!("cert:email:{}", selector_value(m.as_bytes())))
                    }
                    _ => {}
                }
            }
        }
        selectors.retain(|s| s.len() <= 512);
        selectors.sort();
        selectors.dedup();
        Ok(Self { fingerprint, common_name, selectors })
    }

    /// `cert:CN` (or `cert:sha256:PREFIX` without a CN), for display names and audit records.
    pub fn display(&self) -> String {
        match &self.common_name {
            Some(cn) => format!("cert:{}", selector_value(cn.as_bytes())),
            None => format!("cert:sha256:{}", &self.fingerprint[..16]),
        }
    }
}

/// Who is at the other end of an HTTPS connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote address.
    pub addr: SocketAddr,
    /// The verified client certificate, when one was presented.
    pub client_cert: Option<Arc<ClientCert>>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for PeerInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn load_certified_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let pem = |path: &PathBuf, reason: String| TlsError::Pem { path: path.clone(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem(&files.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(&files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(&files.cert, "no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem(&files.key, e.to_string()))?;
    CertifiedKey::from_der(certs, key, provider).map(Arc::new).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Pem {
            path: files.key.clone(),
            reason: format!(
                "this private key does not belong to the certificate in {}: give the key the certificate was issued \
                 for",
                files.cert.display()
            ),
        },
        other => TlsError::Rustls(other),
    })
}

/// What identifies a file's content cheaply: inode, size, modification time.
type Stamp = Option<(u64, u64, std::time::SystemTime)>;

fn stamp(files: &TlsFiles) -> [Stamp; 2] {
    use std::os::unix::fs::MetadataExt;
    let one = |p: &PathBuf| std::fs::metadata(p).ok().and_then(|m| Some((m.ino(), m.size(), m.modified().ok()?)));
    [one(&files.cert), one(&files.key)]
}

/// The server certificate, reloaded from its files when they change (see
/// [`ReloadingCert::reload_if_changed`]). A new pair that does not load, or whose key does not
/// match the certificate, is refused and the current one kept.
pub struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: std::sync::RwLock<(Arc<CertifiedKey>, [Stamp; 2])>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert").field("files", &self.files).finish_non_exhaustive()
    }
}

impl ReloadingCert {
    fn new(files: TlsFiles, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let st = stamp(&files);
        let ck = load_certified_key(&files, &provider)?;
        Ok(Self { files, provider, current: std::sync::RwLock::new((ck, st)) })
    }

    /// Reload if either file changed since the last load. `Ok(true)` when a new certificate is
    /// now served; an error (the old certificate stays) when the new files are not usable.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.files);
        if self.current.read().map(|c| c.1 == now).unwrap_or(true) {
            return Ok(false);
        }
        let loaded = load_certified_key(&self.files, &self.provider);
        let mut cur = self
            .current
            .write()
            .map_err(|_| TlsError::Pem { path: self.files.cert.clone(), reason: "certificate lock poisoned".into() })?;
        // Remember the stamp even on failure, so a bad pair is reported once, not every poll.
        cur.1 = now;
        cur.0 = loaded?;
        Ok(true)
    }

    /// Poll the files every `every` and reload on change, until the returned task is aborted.
    pub fn watch(self: Arc<Self>, every: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.reload_if_changed() {
                    Ok(true) => tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "new TLS certificate refused; still serving the previous one")
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

/// Build the rustls server configuration (TLS 1.2 and 1.3, AWS-LC provider, ALPN http/1.1)
/// serving a certificate that can be reloaded.
pub fn reloading_server_config(files: &TlsFiles) -> Result<(Arc<rustls::ServerConfig>, Arc<ReloadingCert>), TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert = Arc::new(ReloadingCert::new(files.clone(), provider.clone())?);
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let pem = |reason: String| TlsError::Pem { path: path.clone(), reason };
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path).map_err(|e| pem(e.to_string()))? {
                roots.add(c.map_err(|e| pem(e.to_string()))?).map_err(|e| pem(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(pem("no CERTIFICATE block found".into()));
            }
            // Optional: tokens keep working without a certificate; a certificate presented
            // must chain to this CA.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(cert.clone());
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), cert))
}

/// Like [`reloading_server_config`], for a certificate that is never reloaded.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Ok(reloading_server_config(files)?.0)
}

/// A listener yielding established TLS streams.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, PeerInfo)>,
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsListener {
    /// Wrap a bound TCP listener.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(256);
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            loop {
                let (sock, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(stream)) => {
                            let client_cert = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                                None => None,
                                Some(der) => match ClientCert::from_der(der) {
                                    Ok(c) => Some(Arc::new(c)),
                                    Err(e) => {
                                        tracing::debug!(%peer, error = %e, "client certificate unreadable; connection dropped");
                                        return;
                                    }
                                },
                            };
                            let _ = tx.send((stream, PeerInfo { addr: peer, client_cert })).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(PeerInfo { addr: self.local, client_cert: None })
    }
}
