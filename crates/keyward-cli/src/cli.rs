//! Command-line definition (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "keyward", version, about = "Keyward: keys and secrets released to workloads by what they are")]
pub struct Cli {
    /// Server address.
    #[arg(long, global = true, env = "KEYWARD_ADDR", default_value = "http://127.0.0.1:8270")]
    pub addr: String,
    /// API token (prefer the KEYWARD_TOKEN variable over this flag: flags show in `ps`).
    #[arg(long, global = true, env = "KEYWARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate to trust for HTTPS.
    #[arg(long, global = true, env = "KEYWARD_CACERT")]
    pub cacert: Option<PathBuf>,
    /// TLS client certificate (PEM) to present; without a token it is your identity.
    #[arg(long, global = true, env = "KEYWARD_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, global = true, env = "KEYWARD_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Output format for commands that print data.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a development server: embedded store, insecure file seal, plain HTTP on loopback.
    Dev(DevArgs),
    /// Run a server: HTTPS only, sealed by Shamir shares (see `keyward operator init`).
    Server(ServerArgs),
    /// Run the node agent: the Workload API on a Unix socket, callers identified by measurement.
    /// With a subcommand, ask a running agent instead (`keyward agent whoami`).
    #[command(args_conflicts_with_subcommands = true)]
    Agent(AgentArgs),
    /// Run the Kubernetes KMS v2 plugin for kube-apiserver (gRPC on a Unix socket): service mode
    /// wraps through the Keyward server at --addr, --local keeps the key in --data-dir.
    /// `keyward kms-plugin rotate --local` rotates the local key.
    #[command(args_conflicts_with_subcommands = true)]
    KmsPlugin(KmsPluginArgs),
    /// Run a program with secrets from the node agent, as its environment variables (--secret)
    /// or memory-only files (--file), bound to the program's executable (`exec:sha256:`).
    Run(RunArgs),
    /// Run the Secrets Store CSI driver provider: secrets mounted into pods, each Mount
    /// authenticated as the pod with its ServiceAccount token (server at --addr).
    CsiProvider(CsiProviderArgs),
    /// Encrypted container images (ocicrypt-compatible): encrypt, decrypt and inspect the
    /// layers of an image in an OCI layout (`oci:DIR[:TAG]`).
    #[command(subcommand)]
    Image(ImageCmd),
    /// The ocicrypt key provider: with no subcommand, answer one key-provider request (JSON on
    /// stdin, JSON on stdout), as containerd, CRI-O and skopeo run a `cmd` provider; `serve`
    /// answers them over gRPC. Wrapping uses the server at --addr; unwrapping goes through the
    /// node agent, so a layer key reaches only nodes and programs a policy allows.
    #[command(args_conflicts_with_subcommands = true)]
    Keyprovider(KeyproviderArgs),
    /// Show server health, seal state and unseal progress.
    Status,
    /// Print a shell completion script: `keyward completion bash > /etc/bash_completion.d/keyward`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (keyward.1 and one per subcommand) into a directory.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Seal ceremonies: init, unseal, seal, rekey, root key rotation.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Manage keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Encrypt stdin under a key; writes the ciphertext to stdout (with -o json: the ciphertext
    /// in base64, the key and its version).
    Encrypt {
        /// Key name.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        ctx: ContextArgs,
        /// Write the ciphertext as base64 text instead of raw bytes.
        #[arg(long)]
        base64: bool,
    },
    /// Decrypt a ciphertext from stdin; writes the plaintext to stdout (with -o json: the
    /// plaintext in base64, the key and version it was made with).
    Decrypt {
        #[command(flatten)]
        ctx: ContextArgs,
        /// Read the ciphertext as base64 text and write the plaintext as base64.
        #[arg(long)]
        base64: bool,
    },
    /// Re-encrypt a ciphertext from stdin (to the newest version, or to another key); says on
    /// stderr which key versions it went from and to (with -o json, on stdout).
    Reencrypt {
        #[command(flatten)]
        ctx: ContextArgs,
        /// Destination key (default: the same key).
        #[arg(long)]
        to_key: Option<String>,
        /// Destination context entries KEY=VALUE.
        #[arg(long = "to-context", value_parser = parse_kv)]
        to_context: Vec<(String, String)>,
        /// Base64 text in and out.
        #[arg(long)]
        base64: bool,
    },
    /// Generate a data key for envelope encryption.
    #[command(visible_alias = "datakey")]
    GenerateDataKey {
        /// Key name.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        ctx: ContextArgs,
        /// Data key size in bytes (16 to 64).
        #[arg(long)]
        bytes: Option<usize>,
        /// Return only the wrapped data key.
        #[arg(long)]
        without_plaintext: bool,
    },
    /// Sign stdin; prints the signature (base64). Input over 64 KiB (or with --digest) is
    /// hashed here and its SHA-256 digest signed (ecdsa-p256 keys): the signature is still one
    /// of the whole input.
    Sign {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Sign the SHA-256 digest of stdin even if it is small.
        #[arg(long)]
        digest: bool,
        /// Write the signature to this file instead of stdout.
        #[arg(long)]
        signature_file: Option<PathBuf>,
    },
    /// Verify a signature over stdin (exit status 3 if it does not verify).
    Verify {
        /// Key name.
        #[arg(long)]
        key: String,
        /// Signature (base64) as printed by `keyward sign`.
        #[arg(long, required_unless_present = "signature_file", conflicts_with = "signature_file")]
        signature: Option<String>,
        /// Read the signature from this file (as written by `keyward sign --signature-file`).
        #[arg(long)]
        signature_file: Option<PathBuf>,
        /// Verify against the SHA-256 digest of stdin even if it is small.
        #[arg(long)]
        digest: bool,
    },
    /// Compute an HMAC over stdin; prints the MAC (base64).
    Mac {
        /// Key name (hmac-sha256).
        #[arg(long)]
        key: String,
    },
    /// Verify a MAC over stdin.
    VerifyMac {
        /// Key name.
        #[arg(long)]
        key: String,
        /// MAC (base64) as printed by `keyward mac`.
        #[arg(long)]
        mac: String,
    },
    /// Random bytes from the server's CSPRNG.
    Random {
        /// How many bytes (1 to 1024).
        #[arg(long, default_value_t = 32)]
        bytes: usize,
        /// Encoding of the output.
        #[arg(long, value_enum, default_value_t = Encoding::Base64)]
        encoding: Encoding,
    },
    /// Versioned secrets.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Load generator: throughput and latency percentiles.
    Bench(BenchArgs),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Policies (deny by default).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Randomized secrets: a generated value per workload identity, rotated at a TTL.
    #[command(subcommand)]
    Randomized(RandomizedCmd),
    /// Tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Who am I, and what may I do.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Node agents: join tokens.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Workload side: ask the node agent for secrets and key operations (no token: the agent
    /// identifies this process by what it runs).
    Workload(WorkloadArgs),
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Create a one-time join token for the agent of NODE (prints it once).
    JoinToken {
        /// Node name (DNS name).
        node: String,
        /// How long the token stays usable (default 1h, at most 7d).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List nodes: each node's live agent tokens and unspent join tokens.
    List,
    /// Revoke a node: its agent is refused from its next request on, and its unspent join
    /// tokens stop working. An agent that joins with a ServiceAccount joins again unless its
    /// `join` grant on agents/NODE is removed too.
    Revoke {
        /// Node name.
        node: String,
    },
}

#[derive(Args, Debug)]
pub struct WorkloadArgs {
    /// The agent's Workload API socket.
    #[arg(long, global = true, env = "KEYWARD_AGENT_SOCKET", default_value = keyward_agent::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    #[command(subcommand)]
    pub command: WorkloadCmd,
}

#[derive(Subcommand, Debug)]
pub enum WorkloadCmd {
    /// The selectors the agent measures for this process.
    Whoami,
    /// Read a secret released to this workload; prints its fields (or one with --field).
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
    /// This workload's value of a randomized secret (prints the value).
    Randomized {
        /// Name of the randomized secret.
        name: String,
    },
    /// Sign stdin with KEY; prints the signature in base64.
    Sign {
        /// Key name.
        key: String,
    },
    /// Generate a data key under KEY; prints its plaintext and ciphertext in base64.
    #[command(visible_alias = "data-key")]
    GenerateDataKey {
        /// Key name.
        key: String,
        #[command(flatten)]
        ctx: ContextArgs,
    },
    /// Decrypt a base64 ciphertext from stdin; writes the plaintext to stdout.
    Decrypt {
        #[command(flatten)]
        ctx: ContextArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Save a consistent copy of the running server's store to FILE (created, mode 0600; never
    /// overwritten). Needs `admin` on sys/snapshot. What is encrypted stays encrypted.
    Save {
        /// Where to write the snapshot.
        file: PathBuf,
    },
    /// Put a snapshot in place as the database of a new data directory (empty or absent). Start
    /// a server on it and unseal it with the same shares (or the same HSM key).
    Restore {
        /// The snapshot.
        file: PathBuf,
        /// The new server's data directory.
        #[arg(long)]
        data: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AliasCmd {
    /// Point an alias at a key (creates it, or moves it).
    Set {
        /// The alias, alias/NAME.
        alias: String,
        /// The key it names.
        key: String,
    },
    /// List aliases and the keys they name.
    List,
    /// Delete an alias (the key stays).
    Delete {
        /// The alias, alias/NAME.
        alias: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum OperatorCmd {
    /// Initialise a new server: prints the unseal key shares (recovery shares with the PKCS#11
    /// seal) and the root token, once.
    Init {
        /// Number of shares to issue.
        #[arg(long, default_value_t = 5)]
        shares: u8,
        /// Shares needed to unseal.
        #[arg(long, default_value_t = 3)]
        threshold: u8,
    },
    /// Submit one unseal share (or recovery share), read from a prompt (not echoed) or from
    /// stdin, never from argv.
    Unseal {
        /// Move the keyring from the seal it is stored with to the server's (Shamir to PKCS#11
        /// or back) once the shares open it. Nothing stored is re-encrypted; the shares stay valid.
        #[arg(long)]
        migrate: bool,
    },
    /// Seal the server: it stops serving and forgets its keys until unsealed again.
    Seal,
    /// Replace the unseal shares (the root key is unchanged; old shares stop working). Each
    /// holder runs it once with their current share; the last one gets the new shares.
    Rekey {
        /// Number of new shares (when starting the rekey).
        #[arg(long, default_value_t = 5)]
        shares: u8,
        /// New threshold (when starting the rekey).
        #[arg(long, default_value_t = 3)]
        threshold: u8,
        /// Cancel the rekey in progress.
        #[arg(long)]
        cancel: bool,
    },
    /// Move all stored key material to a new root key, while serving.
    RotateRoot,
    /// Backups of the store: `save` a consistent copy from a running server (SQLite), `restore`
    /// one into an empty data directory. See docs/operations.md.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Encoding {
    Base64,
    Hex,
    Raw,
}

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

fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
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

#[derive(Args, Debug, Clone)]
pub struct KeyproviderArgs {
    #[command(flatten)]
    pub provider: ProviderArgs,
    #[command(subcommand)]
    pub command: Option<KeyproviderCmd>,
}

/// How the key provider is set up.
#[derive(Args, Debug, Clone)]
pub struct ProviderArgs {
    /// The provider's name in OCICRYPT_KEYPROVIDER_CONFIG (its annotation is
    /// org.opencontainers.image.enc.keys.provider.NAME).
    #[arg(long, default_value = keyward_keyprovider::PROVIDER_NAME)]
    pub name: String,
    /// Key used when `--encryption-key provider:NAME` gives no key.
    #[arg(long)]
    pub key: Option<String>,
    /// The node agent's Workload API socket (for unwrapping).
    #[arg(long, env = "KEYWARD_AGENT_SOCKET", default_value = keyward_agent::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
}

#[derive(Subcommand, Debug, Clone)]
pub enum KeyproviderCmd {
    /// Serve `keyprovider.KeyProviderService` over gRPC (`"grpc": "unix:///PATH"` in the
    /// ocicrypt configuration).
    Serve {
        #[command(flatten)]
        provider: ProviderArgs,
        /// Where to listen: unix:///PATH.
        #[arg(long, default_value = "unix:///run/keyward/keyprovider.sock")]
        listen: String,
    },
}

/// Source, destination and how to write, shared by `image encrypt` and `image decrypt`.
#[derive(Args, Debug, Clone)]
pub struct ImageCopyArgs {
    /// Layers processed at once (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub parallel: usize,
    /// fsync every blob before naming it (skopeo does not; costs about half the speed on
    /// a plain disk). index.json is always replaced atomically.
    #[arg(long)]
    pub sync: bool,
    /// Source image, `oci:DIR[:TAG]`.
    pub src: String,
    /// Destination image, `oci:DIR[:TAG]`.
    pub dst: String,
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Encrypt layers of SRC for the recipients, writing DST. Other ocicrypt implementations
    /// (containerd imgcrypt, CRI-O, skopeo) decrypt the result.
    Encrypt {
        /// A recipient: `jwe:PUBLIC.pem` (RSA 2048+ or EC P-256/384/521, SubjectPublicKeyInfo PEM
        /// or DER), or `keyward:KEY[::image=NAME]` (the layer key encrypted under a Keyward key on
        /// the server at --addr, unwrapped later only through a node agent). Repeatable.
        #[arg(long = "recipient", required = true)]
        recipients: Vec<String>,
        /// Encrypt only this layer (0-based; negative counts from the end). Repeatable; default all.
        #[arg(long = "layer", allow_negative_numbers = true)]
        layers: Vec<i64>,
        #[command(flatten)]
        io: ImageCopyArgs,
    },
    /// Decrypt every encrypted layer of SRC, writing DST. A plaintext layer is published only
    /// after its HMAC has been verified; on any error nothing is left behind.
    Decrypt {
        /// A private key (PKCS#8, PKCS#1 or SEC1; PEM or DER). Repeatable: each is parsed once.
        #[arg(long = "key", required_unless_present = "keyward")]
        keys: Vec<PathBuf>,
        /// Also unwrap `keyward` key-provider recipients, through the node agent.
        #[arg(long)]
        keyward: bool,
        /// The node agent's socket, for --keyward.
        #[arg(long, env = "KEYWARD_AGENT_SOCKET", default_value = keyward_agent::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
        #[command(flatten)]
        io: ImageCopyArgs,
    },
    /// Show which layers of SRC are encrypted and for which recipients; needs no key.
    Inspect {
        /// Image, `oci:DIR[:TAG]`.
        src: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RandomizedCmd {
    /// Create or replace a definition (`write` on randomized/NAME).
    Define {
        /// Name of the randomized secret.
        name: String,
        /// password, api-key or bytes.
        #[arg(long, default_value = "password")]
        kind: String,
        /// Characters (password, api-key) or bytes (bytes).
        #[arg(long)]
        length: Option<u16>,
        /// Characters to draw from (password, api-key).
        #[arg(long)]
        alphabet: Option<String>,
        /// Rotation period, e.g. 24h.
        #[arg(long)]
        ttl: String,
        /// How long the previous value is still returned after a rotation, e.g. 1h.
        #[arg(long)]
        grace: Option<String>,
    },
    /// Show a definition (no value).
    Show {
        /// Name of the randomized secret.
        name: String,
    },
    /// Get your identity's value (`read` on randomized/NAME); with --value-only, just the value.
    Get {
        /// Name of the randomized secret.
        name: String,
        /// Print only the value.
        #[arg(long)]
        value_only: bool,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum KmsPluginCmd {
    /// Rotate the key of a local-mode plugin (the running plugin reports the new key_id at its
    /// next status check). In service mode rotate on the server: `keyward key rotate NAME`.
    Rotate,
}

fn parse_mode(s: &str) -> Result<u32, String> {
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

#[derive(Args, Debug, Clone, Default)]
pub struct ContextArgs {
    /// Encryption context entry KEY=VALUE (repeatable); decrypt needs the same entries.
    #[arg(long = "context", value_parser = parse_kv)]
    pub context: Vec<(String, String)>,
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a key.
    Create {
        /// Key name.
        name: String,
        /// Key type: aes256-gcm, hmac-sha256, ed25519, ecdsa-p256.
        #[arg(long = "type", default_value = "aes256-gcm")]
        key_type: String,
        /// What the key is for (shown by `key show`).
        #[arg(long, default_value = "")]
        description: String,
        /// Rotate automatically, e.g. 90d.
        #[arg(long)]
        rotate_every: Option<String>,
    },
    /// List keys.
    List {
        /// At most this many keys (the server's default page otherwise).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after this key name (as printed after a page: `--after NAME`).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show a key and its versions.
    #[command(visible_alias = "get")]
    Show {
        /// Key name.
        name: String,
    },
    /// Add a new version (older versions keep decrypting).
    Rotate {
        /// Key name.
        name: String,
    },
    /// Enable a disabled key.
    Enable {
        /// Key name.
        name: String,
    },
    /// Disable a key (all cryptographic use refused).
    Disable {
        /// Key name.
        name: String,
    },
    /// Set or clear automatic rotation.
    RotationPolicy {
        /// Key name.
        name: String,
        /// Period such as 90d; omit with --off.
        #[arg(long, conflicts_with = "off")]
        rotate_every: Option<String>,
        /// Stop rotating automatically.
        #[arg(long)]
        off: bool,
    },
    /// Schedule deletion after a pending window (default 7 days, minimum 1).
    Delete {
        /// Key name.
        name: String,
        /// Days before the key is deleted for good (default 7, at least 1).
        #[arg(long)]
        pending_days: Option<u32>,
    },
    /// Change a key's description.
    Update {
        /// Key name (or alias).
        name: String,
        /// The new description.
        #[arg(long)]
        description: String,
    },
    /// Aliases: `alias/NAME` names a key wherever a key name is accepted; point it at a new
    /// key to move every user of the alias at once.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Cancel a scheduled deletion (the key comes back disabled).
    CancelDelete {
        /// Key name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SecretCmd {
    /// Write a new version: KEY=VALUE, KEY=@FILE (value from a file) or KEY=- (from stdin).
    Put {
        /// Secret path, e.g. app/db.
        path: String,
        /// Fields KEY=VALUE, KEY=@FILE or KEY=-.
        #[arg(value_parser = parse_kv)]
        fields: Vec<(String, String)>,
        /// Read all fields from a JSON object file ("-" for stdin).
        #[arg(long, conflicts_with = "fields")]
        from_file: Option<PathBuf>,
        /// Only write if the current version is this (0: must not exist).
        #[arg(long)]
        cas: Option<u32>,
    },
    /// Read a secret.
    #[command(visible_alias = "show")]
    Get {
        /// Secret path, e.g. app/db.
        path: String,
        /// Version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
        /// Print only this field's value.
        #[arg(long)]
        field: Option<String>,
    },
    /// List secret paths under a prefix.
    List {
        /// Path prefix (default: every path).
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many paths.
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after this path.
        #[arg(long)]
        after: Option<String>,
    },
    /// Version history.
    Versions {
        /// Secret path, e.g. app/db.
        path: String,
    },
    /// Soft-delete versions (default: latest).
    Delete {
        /// Secret path, e.g. app/db.
        path: String,
        /// Versions, comma-separated (default: the latest).
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u32>,
    },
    /// Undo a soft delete (default: latest).
    Undelete {
        /// Secret path, e.g. app/db.
        path: String,
        /// Versions, comma-separated (default: the latest).
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u32>,
    },
    /// Erase versions for good.
    Destroy {
        /// Secret path, e.g. app/db.
        path: String,
        /// Versions, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u32>,
    },
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// encrypt, decrypt, generate-data-key, secret-get, secret-put, key-create or workload-secret.
    #[arg(long, default_value = "encrypt")]
    pub op: String,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 32)]
    pub concurrency: usize,
    /// How long to measure, e.g. 30s.
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
    /// Load before measuring starts (not counted).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: std::time::Duration,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Key to use (created if missing).
    #[arg(long, default_value = "bench-aes")]
    pub key: String,
    /// Secret path for secret-get.
    #[arg(long, default_value = "bench/secret")]
    pub secret_path: String,
    /// Stop after this many measured operations.
    #[arg(long)]
    pub max_ops: Option<u64>,
    /// The node agent's socket, for `--op workload-secret` (attested release of a secret).
    #[arg(long, env = "KEYWARD_AGENT_SOCKET")]
    pub agent_socket: Option<PathBuf>,
    /// Print the report as JSON (the same as `-o json`; kept for scripts).
    #[arg(long, hide = true)]
    pub json: bool,
    /// (encrypt, secret-put) Give every operation a unique payload, remember what was
    /// acknowledged, and read it all back after the run: reports lost writes and wrong answers.
    /// KEYWARD_ADDR may list several servers (comma-separated) to fail over between.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Show the audit log's file, chain head and writer counters (group commits).
    Info,
    /// Verify the hash chain of audit files; reports the first broken record.
    Verify {
        /// Audit files (default: the server's current file and its rotated predecessors).
        files: Vec<PathBuf>,
        /// Read the 32-byte HMAC key from this file instead of asking the server: base64 (as
        /// `audit info` shows it), or the raw `audit-key` file a node agent, KMS plugin or CSI
        /// provider keeps beside its log (then the log beside it is the default file). Without
        /// the server, truncation of the tail cannot be detected.
        #[arg(long, conflicts_with = "local_store")]
        key_file: Option<PathBuf>,
        /// Verify a KMS plugin's local-mode log: the chain key is read from its store in this
        /// data directory (the default file is DIR/audit.log).
        #[arg(long, value_name = "DIR")]
        local_store: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Create or replace a policy from a JSON file ("-" for stdin):
    /// {"description": "...", "identities": [["k8s:ns:app", "k8s:sa:api"]],
    ///  "rules": [{"resources": ["keys/app"], "operations": ["encrypt"], "require": ["k8s:ns:app"]}]}
    /// (`identities` and `require` are optional; see docs/policies.md)
    Put {
        /// Policy name.
        name: String,
        /// The policy's JSON file ("-" for stdin).
        file: PathBuf,
    },
    /// List policy names.
    List,
    /// Show a policy.
    #[command(visible_alias = "get")]
    Show {
        /// Policy name.
        name: String,
    },
    /// Delete a policy.
    Delete {
        /// Policy name.
        name: String,
    },
    /// Dry run: would this token (accessor), or an identity with these policies and selectors,
    /// be allowed OPERATION on RESOURCE, and by which grant?
    Check {
        /// Token accessor to check.
        #[arg(long, conflicts_with_all = ["policies", "selectors"])]
        accessor: Option<String>,
        /// Policies to check (repeatable).
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Identity selectors, e.g. k8s:ns:payments or cert:cn:billing (repeatable).
        #[arg(long = "selector")]
        selectors: Vec<String>,
        /// Operation, e.g. decrypt.
        operation: String,
        /// Resource, e.g. keys/payments.
        resource: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token (prints it once).
    Create {
        /// Policy to attach (repeatable).
        #[arg(long = "policy", required = true)]
        policies: Vec<String>,
        /// Lifetime, renewable, e.g. 1h.
        #[arg(long)]
        ttl: Option<String>,
        /// Renewals never extend the token beyond this long after creation, e.g. 24h.
        #[arg(long)]
        max_ttl: Option<String>,
        /// The token stops working after this many requests.
        #[arg(long)]
        max_uses: Option<u32>,
        /// A name shown in audit records and `token list`.
        #[arg(long)]
        display_name: Option<String>,
        /// No parent: not revoked with its creator (root only).
        #[arg(long)]
        orphan: bool,
    },
    /// List tokens by accessor (never the tokens): your own and those created from them, or
    /// every token with `admin` on auth/token.
    List,
    /// Look a token up by accessor.
    Lookup {
        /// The token's accessor (as `token list` prints it).
        accessor: String,
    },
    /// Renew a token by accessor (or your own with no accessor).
    Renew {
        /// The token's accessor (default: your own token).
        accessor: Option<String>,
    },
    /// Revoke a token and all tokens created from it (or your own with no accessor).
    Revoke {
        /// The token's accessor (default: your own token).
        accessor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthCmd {
    /// Show the caller's token and effective grants.
    Whoami,
    /// Kubernetes ServiceAccount login.
    #[command(subcommand)]
    Kubernetes(K8sCmd),
}

#[derive(Subcommand, Debug)]
pub enum K8sCmd {
    /// Set the issuer, its signing keys and the audience Keyward requires.
    Configure {
        /// The cluster's ServiceAccount issuer (`--service-account-issuer`), an https URL.
        #[arg(long)]
        issuer: String,
        /// The audience every token must include (the projected volume's `audience`).
        #[arg(long, default_value = "keyward")]
        audience: String,
        /// A JWKS file (e.g. `kubectl get --raw /openid/v1/jwks > jwks.json`); static.
        #[arg(long, conflicts_with_all = ["jwks_url", "discovery"])]
        jwks_file: Option<PathBuf>,
        /// An https URL serving the JWKS; refetched when keys rotate.
        #[arg(long, conflicts_with = "discovery")]
        jwks_url: Option<String>,
        /// Find the JWKS by OIDC discovery from the issuer; refetched when keys rotate.
        #[arg(long)]
        discovery: bool,
        /// PEM CA certificates to trust when fetching the JWKS.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Clock skew tolerated on exp/nbf, seconds.
        #[arg(long)]
        leeway_secs: Option<u64>,
    },
    /// Show the configuration.
    Show,
    /// Roles: which ServiceAccounts may log in and what they get.
    #[command(subcommand)]
    Role(K8sRoleCmd),
    /// Exchange a ServiceAccount token for a Keyward token.
    Login {
        /// Role to log in with.
        #[arg(long)]
        role: String,
        /// File holding the projected ServiceAccount token.
        #[arg(long, default_value = "/var/run/secrets/tokens/keyward")]
        jwt_file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum K8sRoleCmd {
    /// Create or replace a role.
    Put {
        /// Role name.
        name: String,
        /// Bound namespace (repeatable; `*` for any).
        #[arg(long = "namespace", required = true)]
        namespaces: Vec<String>,
        /// Bound ServiceAccount name (repeatable; `*` for any).
        #[arg(long = "service-account", required = true)]
        service_accounts: Vec<String>,
        /// Policy of the issued token (repeatable; policies attached by identity apply too).
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// TTL of the issued token.
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// Renewals never extend the issued token beyond this long after login (default 24h).
        #[arg(long)]
        max_ttl: Option<String>,
        /// Accept tokens that are not bound to a pod.
        #[arg(long)]
        allow_unbound_tokens: bool,
    },
    /// List roles.
    List,
    /// Show a role.
    Show {
        /// Role name.
        name: String,
    },
    /// Delete a role.
    Delete {
        /// Role name.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        let here = format!("{path} {}", cmd.get_name());
        if cmd.get_about().is_none() && !path.is_empty() {
            out.push(format!("{here}: the command"));
        }
        for a in cmd.get_arguments() {
            if !a.is_hide_set() && a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{here}: {}", a.get_id()));
            }
        }
        for sc in cmd.get_subcommands() {
            undocumented(sc, &here, out);
        }
    }

    #[test]
    fn every_command_and_argument_says_what_it_is() {
        super::Cli::command().debug_assert();
        let mut missing = Vec::new();
        undocumented(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help text:\n{}", missing.join("\n"));
    }
}
