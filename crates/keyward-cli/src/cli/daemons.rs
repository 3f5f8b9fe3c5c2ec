//! Arguments of the long-running commands: `dev`, `server`, `agent`, `run`, `kms-plugin`,
//! `csi-provider`, and their HTTP and audit options.

use super::*;
use clap::{Args, Subcommand};

#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Address to listen on (loopback only in dev mode).
    #[arg(long, default_value = "127.0.0.1:8270")]
    pub listen: std::net::SocketAddr,
    /// Data directory (database, insecure root key, root token).
    #[arg(long, env = "KEYWARD_DEV_DATA")]
    pub data: Option<PathBuf>,
    /// How often the scheduler checks for due rotations and deletions.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub scheduler_interval: std::time::Duration,
    #[command(flatten)]
    pub audit: AuditArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Also serve the metrics (OpenMetrics text) at GET /metrics on this address, without a
    /// token: for a private network. `GET /v1/metrics` serves them with a token (read on
    /// sys/metrics).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The node agent's socket.
    #[arg(long, env = "KEYWARD_AGENT_SOCKET", default_value = keyward_agent::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// ENV=PATH[#FIELD]: the program gets the secret (or one field) in variable ENV.
    #[arg(long = "secret", value_parser = keyward_agent::launcher::parse_binding)]
    pub secrets: Vec<keyward_agent::launcher::Binding>,
    /// ENV=PATH[#FIELD]: the secret goes into a memory-only file; ENV names it (/dev/fd/N).
    #[arg(long = "file", value_parser = keyward_agent::launcher::parse_binding)]
    pub files: Vec<keyward_agent::launcher::Binding>,
    /// Re-fetch the secrets this often; on a change, rewrite the files and signal the program
    /// (0s: never).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub refresh: std::time::Duration,
    /// Signal sent to the program when a secret changed.
    #[arg(long, default_value = "SIGHUP", value_parser = parse_signal)]
    pub signal: nix::sys::signal::Signal,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub(super) fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    let name = if s.starts_with("SIG") { s.to_string() } else { format!("SIG{s}") };
    name.parse().map_err(|_| format!("{s:?} is not a signal name such as SIGHUP or USR1"))
}

#[derive(Args, Debug, Clone)]
pub struct CsiProviderArgs {
    /// Serve metrics (OpenMetrics text) at GET /metrics on this address, without
    /// authentication: keep it on a private network.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Directory of provider sockets the driver searches; the socket is DIR/keyward.sock.
    #[arg(long, default_value = keyward_csi::DEFAULT_PROVIDER_DIR)]
    pub provider_dir: PathBuf,
    /// Audience of the pod ServiceAccount tokens presented to Keyward (the CSIDriver's
    /// tokenRequests must include it; a SecretProviderClass may choose another with `audience`).
    #[arg(long, default_value = "keyward")]
    pub audience: String,
    /// Another Keyward address a SecretProviderClass may name with `keywardAddress`
    /// (repeatable). Pod tokens are sent nowhere else.
    #[arg(long = "allowed-address")]
    pub allowed_addresses: Vec<String>,
    /// Timeout of each call to Keyward.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// State directory: the provider's audit log and its chain key.
    #[arg(long, default_value = "/var/lib/keyward-csi")]
    pub data_dir: PathBuf,
    /// WEAKER: also take a pod's token from the volume's nodePublishSecretRef Secret (whose
    /// data the pod's author chooses) when the driver passes none from tokenRequests. The token
    /// must still belong to the Mount's pod.
    #[arg(long)]
    pub insecure_allow_secret_tokens: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum KmsPluginCmd {
    /// Rotate the key of a local-mode plugin (the running plugin reports the new key_id at its
    /// next status check). In service mode rotate on the server: `keyward key rotate NAME`.
    Rotate,
}

pub(super) fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode such as 600"))
}

#[derive(Args, Debug, Clone)]
pub struct KmsPluginArgs {
    /// Serve metrics (OpenMetrics text) at GET /metrics on this address, without
    /// authentication: keep it on a private network.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Option<KmsPluginCmd>,
    /// The socket kube-apiserver's EncryptionConfiguration names as `endpoint`.
    #[arg(long, default_value = "unix:///var/run/keyward/kms.sock")]
    pub listen: String,
    /// File mode of the socket. Callers are checked by uid (and executable) whatever the mode.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// The Keyward key that wraps the apiserver's seeds (AES-256-GCM). Local mode creates it.
    #[arg(long, global = true, default_value = "kubernetes-kms")]
    pub key: String,
    /// State directory: the audit log (both modes) and, in local mode, the sealed key store.
    #[arg(long, global = true, default_value = "/var/lib/keyward-kms")]
    pub data_dir: PathBuf,
    /// Local mode: the key lives in --data-dir, sealed with the insecure file seal (an HSM seal
    /// is the way to protect it at rest), so the control plane starts without the network.
    #[arg(long, global = true)]
    pub local: bool,
    /// Service mode: file holding the Keyward token the plugin authenticates with (or use
    /// --client-cert/--client-key); it needs encrypt and decrypt on keys/KEY.
    #[arg(long, conflicts_with = "local")]
    pub token_file: Option<PathBuf>,
    /// Uid allowed to call Encrypt and Decrypt (repeatable; default: the plugin's own uid).
    #[arg(long = "allow-uid")]
    pub allow_uids: Vec<u32>,
    /// SHA-256 (hex) of an executable allowed to call Encrypt and Decrypt, e.g. kube-apiserver's
    /// (repeatable; default: any executable of an allowed uid). Needs hostPID in Kubernetes.
    #[arg(long = "allow-exe-sha256")]
    pub allow_exe_sha256: Vec<String>,
    /// How long a successful Status round trip is reused.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub status_cache: std::time::Duration,
    /// Service mode: while Keyward is unreachable, answer Decrypt from memory for seeds unwrapped
    /// within this window (0s: never).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub outage_window: std::time::Duration,
    /// Local mode: rotate the key automatically this often (set when the key is created).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rotate_every: Option<std::time::Duration>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum AgentCmd {
    /// The selectors the agent at --socket measures for this process.
    Whoami,
    /// Read a secret released to this process (for scripts); prints its fields, or one field's
    /// value with --field (the same as `keyward workload secret`).
    #[command(visible_alias = "fetch-secret")]
    Secret {
        /// Secret path.
        path: String,
        /// Version (default: latest).
        #[arg(long)]
        version: Option<u32>,
        /// Print only this field's value.
        #[arg(long)]
        field: Option<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Serve metrics (OpenMetrics text) at GET /metrics on this address, without
    /// authentication: keep it on a private network.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Option<AgentCmd>,
    /// Unix socket of the Workload API (created mode 0666: callers are authorized by
    /// measurement, not by file mode).
    #[arg(
        long,
        visible_alias = "agent-socket",
        global = true,
        env = "KEYWARD_AGENT_SOCKET",
        default_value = keyward_agent::DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// Largest executable hashed for `unix:sha256` selectors, in bytes; larger ones get none.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    pub hash_limit: u64,
    /// While the server is unreachable, answer a repeated request of the same client from the
    /// sealed answer it got earlier, for this long after it was obtained (0s: never). Never for
    /// data keys.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub outage_window: std::time::Duration,
    /// File holding a one-time join token (`keyward node join-token`): the agent joins the
    /// server at --addr with it. Without it only `whoami` is served.
    #[arg(long, conflicts_with = "k8s_join_role")]
    pub join_token_file: Option<PathBuf>,
    /// Join with the agent's projected ServiceAccount token instead, on this Kubernetes auth
    /// role (the token must be bound to the agent's pod; its ServiceAccount needs `join` on
    /// `agents/NODE`).
    #[arg(long)]
    pub k8s_join_role: Option<String>,
    /// The projected ServiceAccount token for --k8s-join-role (audience: Keyward's).
    #[arg(long, default_value = "/var/run/secrets/tokens/keyward")]
    pub k8s_token_file: PathBuf,
    /// The kubelet to ask which pod a caller's container belongs to, e.g.
    /// https://NODE_IP:10250 (callers in containers then get k8s:ns, k8s:sa, labels, image...).
    #[arg(long, env = "KEYWARD_KUBELET_URL")]
    pub kubelet_url: Option<String>,
    /// Bearer token for the kubelet (re-read on every fetch).
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token")]
    pub kubelet_token_file: PathBuf,
    /// CA that signed the kubelet's serving certificate.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")]
    pub kubelet_ca: PathBuf,
    /// Lookups of a container the kubelet does not list yet, before refusing the caller.
    #[arg(long, default_value_t = 60)]
    pub kubelet_poll_attempts: u32,
    /// Time between those lookups.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub kubelet_poll_interval: std::time::Duration,
    /// Where the kubelet puts pods in the cgroup tree, as the host sees it (repeat for
    /// several). Container and pod ids are taken only from under these; a pod-like cgroup
    /// elsewhere is refused. Default: /kubepods.slice (systemd driver) and /kubepods (cgroupfs).
    #[arg(long = "cgroup-root", value_name = "PATH")]
    pub cgroup_roots: Vec<String>,
    /// Workload API connections one uid may hold at once; more are closed at once (and audited).
    #[arg(long, default_value_t = 64)]
    pub max_connections_per_uid: usize,
    /// Workload API connections held in all.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Directory of the agent's own audit log (`audit.log`, chained under `audit-key` beside
    /// it): what the agent decides alone (sessions, refusals, outage-cache answers).
    #[arg(long, default_value = "/var/lib/keyward/agent")]
    pub audit_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8270")]
    pub listen: std::net::SocketAddr,
    /// Data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// PEM certificate chain for HTTPS.
    #[arg(long)]
    pub tls_cert: PathBuf,
    /// PEM private key for HTTPS.
    #[arg(long)]
    pub tls_key: PathBuf,
    /// PEM CA certificate(s) for client certificates (mTLS). Clients may then authenticate
    /// with a certificate chaining to it; policies attach to its `cert:` selectors.
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// Keep the unseal key in an unencrypted file in the data directory instead of Shamir
    /// shares. Anyone who can read that file has every key.
    #[arg(long)]
    pub insecure_file_seal: bool,
    /// Seal with a key in an HSM: the vendor's PKCS#11 library (e.g.
    /// /usr/lib/softhsm/libsofthsm2.so). The server then unseals itself at start and the Shamir
    /// shares become recovery shares.
    #[arg(long, env = "KEYWARD_PKCS11_LIB")]
    pub pkcs11_lib: Option<PathBuf>,
    /// Label of the HSM token holding the seal key.
    #[arg(long, env = "KEYWARD_PKCS11_TOKEN", requires = "pkcs11_lib")]
    pub pkcs11_token: Option<String>,
    /// Label of the seal key (AES-256, generated non-extractable in the token at init or
    /// migration if absent).
    #[arg(long, env = "KEYWARD_PKCS11_KEY", default_value = "keyward-seal")]
    pub pkcs11_key: String,
    /// File holding the token's user PIN (one line).
    #[arg(long, env = "KEYWARD_PKCS11_PIN_FILE", requires = "pkcs11_lib")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// Start even if memory cannot be locked (key material could be swapped to disk).
    #[arg(long)]
    pub insecure_no_mlock: bool,
    /// How often the scheduler checks for due rotations and deletions.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub scheduler_interval: std::time::Duration,
    /// Store in PostgreSQL instead of SQLite in the data directory: a connection string or URL
    /// (`postgresql://keyward@db:5432/keyward`). Prefer the variable to the flag: a password in
    /// it would show in `ps`.
    #[arg(long, env = "KEYWARD_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// PEM CA certificate(s) that sign the PostgreSQL server's certificate: connections then
    /// always use TLS and verify the server (no fall-back to plain text).
    #[arg(long, env = "KEYWARD_POSTGRES_CA")]
    pub postgres_ca: Option<PathBuf>,
    /// With PostgreSQL: refuse requests (503) when changes made by other servers may not have
    /// been seen for this long (a revoked token or disabled key is never honoured after it).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub max_staleness: std::time::Duration,
    /// With PostgreSQL: lifetime of the lease that elects the one server running scheduled
    /// work; another server takes over this long after the holder dies.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub scheduler_lease: std::time::Duration,
    #[command(flatten)]
    pub audit: AuditArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Also serve the metrics (OpenMetrics text) at GET /metrics on this address, without a
    /// token: for a private network. `GET /v1/metrics` serves them with a token (read on
    /// sys/metrics).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Limits on client connections (slow or numerous clients cannot take the server from others).
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Time for a request's headers to arrive whole, from the connection's start or the end of
    /// the previous answer (so it also closes kept-alive connections left idle).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// Close a connection on which no byte moves either way for this long (a slow body, an
    /// answer not read).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// Connections served at once; more wait to be accepted until one closes.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
}

impl HttpArgs {
    pub fn limits(&self) -> keyward_server::HttpLimits {
        keyward_server::HttpLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Audit log file (default DATA/audit.log).
    #[arg(long)]
    pub audit_file: Option<PathBuf>,
    /// Also write audit records to stdout as JSON lines.
    #[arg(long)]
    pub audit_stdout: bool,
    /// Rotate the audit file at this many bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub audit_max_bytes: u64,
    /// Run with NO audit log (only to measure the audit's cost).
    #[arg(long)]
    pub insecure_no_audit: bool,
}

impl AuditArgs {
    pub fn settings(&self) -> keyward_server::AuditSettings {
        keyward_server::AuditSettings {
            file: self.audit_file.clone(),
            stdout: self.audit_stdout,
            max_file_bytes: self.audit_max_bytes,
            insecure_disable: self.insecure_no_audit,
        }
    }
}
