//! [`ClientBuilder`]: addresses, token, trust, client certificate, timeouts.

use super::*;

/// Builds a [`Client`].
pub struct ClientBuilder {
    pub(crate) addr: String,
    pub(crate) token: Option<Zeroizing<String>>,
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) identity_pem: Option<Zeroizing<Vec<u8>>>,
    pub(crate) timeout: Duration,
    pub(crate) pool_max_idle: usize,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// The token to send.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Zeroizing::new(token.into()));
        self
    }

    /// Trust this PEM CA certificate for HTTPS.
    pub fn ca_cert_pem(mut self, pem: Vec<u8>) -> Self {
        self.ca_pem = Some(pem);
        self
    }

    /// Present this TLS client certificate (mTLS): PEM holding the certificate chain and its
    /// private key. Without a token, the certificate is the caller's identity.
    pub fn client_identity_pem(mut self, cert_and_key: Vec<u8>) -> Self {
        self.identity_pem = Some(Zeroizing::new(cert_and_key));
        self
    }

    /// Per-request timeout (default 30 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Maximum idle pooled connections (default 64).
    pub fn pool_max_idle(mut self, n: usize) -> Self {
        self.pool_max_idle = n;
        self
    }

    /// Build the client.
    pub fn build(self) -> Result<Client, Error> {
        let addrs: Vec<String> = self
            .addr
            .split(',')
            .map(|a| a.trim().trim_end_matches('/').to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(Error::Config("no server address given".into()));
        }
        if addrs.len() > 32 {
            return Err(Error::Config(format!("{} server addresses given; at most 32", addrs.len())));
        }
        if let Some(addr) = addrs.iter().find(|a| !(a.starts_with("http://") || a.starts_with("https://"))) {
            return Err(Error::Config(format!("server address {addr:?} must start with http:// or https://")));
        }
        let mut b = reqwest::Client::builder()
            .timeout(self.timeout)
            .pool_max_idle_per_host(self.pool_max_idle)
            // Shorter than the server's header-read timeout (10 s by default), which also
            // closes kept-alive connections left idle.
            .pool_idle_timeout(std::time::Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(pem) = &self.ca_pem {
            let cert =
                reqwest::Certificate::from_pem(pem).map_err(|e| Error::Config(format!("CA certificate: {e}")))?;
            b = b.tls_certs_only([cert]);
        } else if addrs.iter().all(|a| a.starts_with("http://")) {
            // No TLS at all: do not load the system's trust store (a minimal container has none).
            b = b.tls_certs_only([]);
        }
        if let Some(pem) = &self.identity_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| Error::Config(format!("client certificate and key: {e}")))?;
            b = b.identity(id);
        }
        let http = b.build().map_err(|e| {
            let mut why = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                why = format!("{why}: {c}");
                cur = c.source();
            }
            if self.ca_pem.is_none() {
                why.push_str(" (without KEYWARD_CACERT the system's trust store is used: set KEYWARD_CACERT to the CA's PEM file)");
            }
            Error::Config(why)
        })?;
        Ok(Client { http, addrs: addrs.into(), current: Arc::new(AtomicUsize::new(0)), token: self.token })
    }
}
