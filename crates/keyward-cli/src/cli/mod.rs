//! Command-line definition (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod admin;
mod daemons;
mod data;
mod image;

pub use self::admin::*;
pub use self::daemons::*;
pub use self::data::*;
pub use self::image::*;

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

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Encoding {
    Base64,
    Hex,
    Raw,
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
