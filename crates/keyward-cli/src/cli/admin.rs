//! Arguments of the administrative commands: `node`, `operator`, `audit`, `policy`, `token`, `auth`.

use super::*;

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
        /// Confirm every login with this API server's TokenReview (an https URL, trusted with
        /// --ca-file): the token of a deleted pod or ServiceAccount is then refused.
        #[arg(long, requires = "token_reviewer_secret")]
        token_review_url: Option<String>,
        /// PATH#FIELD of the Keyward secret holding the reviewer's ServiceAccount token (bound to
        /// `system:auth-delegator`).
        #[arg(long, requires = "token_review_url")]
        token_reviewer_secret: Option<String>,
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
