//! Arguments of the commands on keys, secrets and workloads: `key`, `secret`, `randomized`,
//! `workload`, `bench`.

use super::*;

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
