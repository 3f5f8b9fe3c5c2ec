//! ocicrypt-compatible encryption of container image layers.
//!
//! Images are read from and written to OCI image layouts on disk (`oci:DIR[:TAG]`), in the
//! format Go ocicrypt (containerd imgcrypt, CRI-O, skopeo, podman) reads and writes:
//!
//! - layer media types gain `+encrypted`;
//! - each encrypted layer uses `AES_256_CTR_HMAC_SHA256` with a fresh key and nonce
//!   ([`cipher`]), its private options (key, nonce, plaintext digest) wrapped for every
//!   recipient in a JWE ([`jwe`]) in the `org.opencontainers.image.enc.keys.jwe` annotation, and
//!   its HMAC in `org.opencontainers.image.enc.pubopts` ([`options`]);
//! - decryption never publishes a plaintext blob before its HMAC and its digest have been
//!   checked, and removes everything it wrote if any layer fails.
//!
//! Where Keyward differs from Go ocicrypt, it does so invisibly to other readers: recipients
//! carry a `kid` hint so that decryption costs one asymmetric operation per layer whatever the
//! number of recipients, keys are parsed once per run, and layers are processed in parallel
//! through a pipeline that hashes, decrypts and writes on separate cores without copying.
#![warn(missing_docs)]

pub mod cipher;
pub mod error;
pub mod image;
pub mod jwe;
pub mod keys;
pub mod layout;
pub mod options;
pub mod provider;

pub use error::{OcicryptError, Result};
pub use image::{
    DecryptOptions, EncryptOptions, LayerInfo, Progress, RecipientInfo, Report, decrypt_image, encrypt_image,
    inspect_image,
};
pub use keys::{PrivateKey, PublicKey};
pub use layout::ImageRef;
pub use provider::KeyProvider;
