//! Arguments of `image` and `keyprovider`.

use super::*;

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
