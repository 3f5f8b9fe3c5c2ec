//! The `AES_256_CTR_HMAC_SHA256` layer cipher, streamed through a pipeline of threads.
//!
//! A layer is read in 1 MiB chunks. Each chunk passes through stages that run on their own
//! threads, connected by bounded channels, so hashing, the cipher and I/O overlap on several
//! cores while memory stays bounded (`DEPTH` chunks in flight per layer, whatever its size).
//! Chunks are transformed in place: AES-CTR is seekable, so each chunk is processed with the
//! counter for its offset and no chunk is ever copied.
//!
//! - Decrypt: [read, HMAC(ciphertext)] -> [AES-CTR in place, SHA-256(plaintext), write]; the
//!   plaintext's digest names the output blob.
//! - Encrypt: [read, SHA-256(plaintext)] -> [AES-CTR in place, HMAC(ciphertext)] ->
//!   [SHA-256(ciphertext), write].
//!
//! Decryption writes into a caller-supplied sink that must be a temporary file: the HMAC is only
//! known to be right once the whole ciphertext has been read, and the caller publishes the output
//! only when [`decrypt_stream`] has returned `Ok`.

use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use aws_lc_rs::cipher::{AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::{digest, hmac};
use keyward_crypto::SecretBytes;

use crate::error::{OcicryptError, Result};
use crate::options::{Digest, PrivateOptions, PublicOptions};

/// Chunk size. A multiple of the AES block size, so every chunk starts on a block boundary.
pub const CHUNK: usize = 1 << 20;
/// Chunks in flight per layer (besides the one each stage holds).
const DEPTH: usize = 3;

/// What went wrong inside the pipeline, before it is given a layer name.
#[derive(Debug)]
pub(crate) enum StreamError {
    /// Reading the source failed.
    Read(std::io::Error),
    /// Writing the sink failed.
    Write(std::io::Error),
    /// The MAC or the plaintext digest did not match, or the cipher failed.
    Integrity,
    /// The source was not the size the descriptor says.
    Size { expected: u64, actual: u64 },
}

/// The result of encrypting a layer.
#[derive(Debug)]
pub struct Encrypted {
    /// Private options (key, nonce, plaintext digest) to wrap for the recipients.
    pub private: PrivateOptions,
    /// Public options (the HMAC) for the `pubopts` annotation.
    pub public: PublicOptions,
    /// Digest of the ciphertext blob.
    pub digest: Digest,
    /// Size of the ciphertext blob (the same as the plaintext's).
    pub size: u64,
}

/// The result of decrypting a layer.
#[derive(Debug)]
pub struct Decrypted {
    /// Digest of the plaintext, as computed while writing it.
    pub digest: Digest,
    /// Size of the plaintext.
    pub size: u64,
}

/// AES-256-CTR positioned at any block of the stream: the counter for byte `offset` is the
/// 128-bit big-endian nonce plus `offset / 16`, wrapping, exactly as Go's `cipher.NewCTR`.
struct Ctr {
    key: EncryptingKey,
    nonce: u128,
}

impl Ctr {
    fn new(key: &SecretBytes, nonce: [u8; 16]) -> Result<Self> {
        let unbound = UnboundCipherKey::new(&AES_256, key.expose()).map_err(|_| OcicryptError::Crypto("AES key"))?;
        let key = EncryptingKey::ctr(unbound).map_err(|_| OcicryptError::Crypto("AES-CTR"))?;
        Ok(Self { key, nonce: u128::from_be_bytes(nonce) })
    }

    /// XOR the key stream for `[offset, offset + buf.len())` into `buf`. `offset` must be a
    /// multiple of 16.
    fn apply(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), StreamError> {
        debug_assert_eq!(offset % 16, 0);
        let counter = self.nonce.wrapping_add(u128::from(offset / 16));
        let ctx = EncryptionContext::Iv128(FixedLength::from(counter.to_be_bytes()));
        self.key.less_safe_encrypt(buf, ctx).map(|_| ()).map_err(|_| StreamError::Integrity)
    }
}

/// A chunk moving through the pipeline: its bytes and its offset in the stream.
struct Chunk {
    buf: Vec<u8>,
    offset: u64,
}

type StageFn<'a> = dyn FnMut(&mut [u8], u64) -> std::result::Result<(), StreamError> + Send + 'a;

/// Read `src` to its end in chunks and pass every chunk through `first` (on this thread) and then
/// through each of `rest` (one thread each), in order. Returns the number of bytes read.
fn pipeline(
    src: &mut dyn Read,
    first: &mut StageFn<'_>,
    rest: Vec<&mut StageFn<'_>>,
) -> std::result::Result<u64, StreamError> {
    std::thread::scope(|scope| {
        let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(DEPTH + rest.len() + 1);
        for _ in 0..DEPTH {
            // Capacity is reserved now; the pool never holds more buffers than this.
            let _ = pool_tx.send(Vec::with_capacity(CHUNK));
        }
        let (head_tx, mut rx) = sync_channel::<Chunk>(DEPTH);
        let stage_count = rest.len();
        let mut handles = Vec::with_capacity(stage_count);
        for (i, stage) in rest.into_iter().enumerate() {
            let (tx, next_rx) = sync_channel::<Chunk>(DEPTH);
            let input = std::mem::replace(&mut rx, next_rx);
            let out = if i + 1 == stage_count { Output::Pool(pool_tx.clone()) } else { Output::Next(tx) };
            handles.push(scope.spawn(move || run_stage(input, stage, out)));
        }
        drop(pool_tx);
        drop(rx);
        let read = read_loop(src, first, &head_tx, &pool_rx);
        drop(head_tx);
        let mut result = read;
        for h in handles {
            let stage = h.join().unwrap_or(Err(StreamError::Integrity));
            if let (Ok(_), Err(e)) = (&result, stage) {
                result = Err(e);
            }
        }
        result
    })
}

enum Output {
    Next(SyncSender<Chunk>),
    Pool(SyncSender<Vec<u8>>),
}

fn run_stage(input: Receiver<Chunk>, stage: &mut StageFn<'_>, out: Output) -> std::result::Result<(), StreamError> {
    for mut chunk in input {
        stage(&mut chunk.buf, chunk.offset)?;
        let sent = match &out {
            Output::Next(tx) => tx.send(chunk).is_ok(),
            Output::Pool(tx) => tx.send(chunk.buf).is_ok(),
        };
        if !sent {
            break;
        }
    }
    Ok(())
}

fn read_loop(
    src: &mut dyn Read,
    first: &mut StageFn<'_>,
    tx: &SyncSender<Chunk>,
    pool: &Receiver<Vec<u8>>,
) -> std::result::Result<u64, StreamError> {
    let mut offset = 0u64;
    loop {
        // A closed pool means a later stage stopped on an error, which it reports itself.
        let Ok(mut buf) = pool.recv() else { return Ok(offset) };
        buf.clear();
        let n = fill(src, &mut buf).map_err(StreamError::Read)?;
        if n == 0 {
            return Ok(offset);
        }
        first(&mut buf, offset)?;
        if tx.send(Chunk { buf, offset }).is_err() {
            return Ok(offset);
        }
        offset += n as u64;
        if n < CHUNK {
            return Ok(offset);
        }
    }
}

/// Fill `buf` up to [`CHUNK`] bytes, stopping early only at end of input.
fn fill(src: &mut dyn Read, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.resize(CHUNK, 0);
    let mut n = 0;
    while n < CHUNK {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(n)
}

/// Encrypt a layer: read the plaintext from `src`, write the ciphertext to `dst`.
pub(crate) fn encrypt_stream(
    src: &mut dyn Read,
    dst: &mut (dyn Write + Send),
    expected_size: Option<u64>,
) -> std::result::Result<Encrypted, StreamError> {
    // The key and nonce are fresh; the plaintext digest is only known at the end, so it is
    // filled in afterwards.
    let placeholder = Digest::from_sha256(&[0; 32]);
    let mut private = PrivateOptions::generate(placeholder).map_err(|_| StreamError::Integrity)?;
    let ctr = Ctr::new(&private.symkey, private.nonce).map_err(|_| StreamError::Integrity)?;
    let mac_key = hmac::Key::new(hmac::HMAC_SHA256, private.symkey.expose());

    let mut plain_sha = digest::Context::new(&digest::SHA256);
    let mut mac = hmac::Context::with_key(&mac_key);
    let mut cipher_sha = digest::Context::new(&digest::SHA256);
    let size = {
        let mut hash_plain = |buf: &mut [u8], _| {
            plain_sha.update(buf);
            Ok(())
        };
        let mut encrypt = |buf: &mut [u8], offset| {
            ctr.apply(offset, buf)?;
            mac.update(buf);
            Ok(())
        };
        let mut hash_and_write = |buf: &mut [u8], _| {
            cipher_sha.update(buf);
            dst.write_all(buf).map_err(StreamError::Write)
        };
        pipeline(src, &mut hash_plain, vec![&mut encrypt, &mut hash_and_write])?
    };
    if let Some(expected) = expected_size
        && expected != size
    {
        return Err(StreamError::Size { expected, actual: size });
    }
    private.digest = Digest::from_sha256(&digest_bytes(plain_sha.finish()));
    let mut hmac_out = [0u8; 32];
    hmac_out.copy_from_slice(mac.sign().as_ref());
    Ok(Encrypted {
        private,
        public: PublicOptions { hmac: hmac_out },
        digest: Digest::from_sha256(&digest_bytes(cipher_sha.finish())),
        size,
    })
}

/// Decrypt a layer: read the ciphertext from `src`, write the plaintext to `dst`, then check the
/// HMAC and the size. On any error the output must be discarded.
pub(crate) fn decrypt_stream(
    src: &mut dyn Read,
    dst: &mut (dyn Write + Send),
    private: &PrivateOptions,
    public: &PublicOptions,
    expected_size: Option<u64>,
) -> std::result::Result<Decrypted, StreamError> {
    let ctr = Ctr::new(&private.symkey, private.nonce).map_err(|_| StreamError::Integrity)?;
    let mac_key = hmac::Key::new(hmac::HMAC_SHA256, private.symkey.expose());
    let mut mac = hmac::Context::with_key(&mac_key);
    let mut plain_sha = digest::Context::new(&digest::SHA256);
    let size = {
        let mut authenticate = |buf: &mut [u8], _| {
            mac.update(buf);
            Ok(())
        };
        let mut decrypt_and_write = |buf: &mut [u8], offset| {
            ctr.apply(offset, buf)?;
            plain_sha.update(buf);
            dst.write_all(buf).map_err(StreamError::Write)
        };
        pipeline(src, &mut authenticate, vec![&mut decrypt_and_write])?
    };
    if let Some(expected) = expected_size
        && expected != size
    {
        return Err(StreamError::Size { expected, actual: size });
    }
    // The tag is checked before anything else is concluded from the output.
    let tag = mac.sign();
    if !keyward_crypto::ct_eq(tag.as_ref(), &public.hmac) {
        return Err(StreamError::Integrity);
    }
    // The output is named by what it really is. The `digest` of the private options is not
    // checked: Go ocicrypt records the *source* descriptor's digest there, which differs from
    // the plaintext when the writer compressed the layer on the fly (skopeo does, for
    // uncompressed layers). The HMAC, checked above, is what authenticates the content.
    let digest = Digest::from_sha256(&digest_bytes(plain_sha.finish()));
    Ok(Decrypted { digest, size })
}

fn digest_bytes(d: digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretBytes {
        SecretBytes::copy_from(&[b; 32])
    }

    /// NIST SP 800-38A F.5.5 (CTR-AES256.Encrypt).
    #[test]
    fn ctr_matches_sp800_38a() {
        let k = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4").unwrap();
        let iv: [u8; 16] = hex::decode("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").unwrap().try_into().unwrap();
        let mut data = hex::decode(concat!(
            "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
        ))
        .unwrap();
        let ctr = Ctr::new(&SecretBytes::copy_from(&k), iv).unwrap();
        ctr.apply(0, &mut data).unwrap();
        assert_eq!(
            hex::encode(&data),
            concat!(
                "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5",
                "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"
            )
        );
    }

    /// The counter is all 128 bits, big-endian: decrypting at any block offset, including
    /// across a 32-bit and a 64-bit carry and the 128-bit wrap, equals one pass from the start.
    #[test]
    fn ctr_is_seekable_across_carries() {
        for nonce in [
            [0u8; 16],
            u128::from(u32::MAX - 2).to_be_bytes(),
            u128::from(u64::MAX - 1).to_be_bytes(),
            (u128::MAX - 3).to_be_bytes(),
        ] {
            let ctr = Ctr::new(&key(3), nonce).unwrap();
            let mut whole = vec![0u8; 16 * 64];
            ctr.apply(0, &mut whole).unwrap();
            for start in [16usize, 48, 64, 512] {
                let mut part = vec![0u8; whole.len() - start];
                ctr.apply(start as u64, &mut part).unwrap();
                assert_eq!(part, whole[start..], "nonce {nonce:?} offset {start}");
            }
            // Block i of the key stream is AES(nonce + i).
            let ecb_key = {
                let unbound = UnboundCipherKey::new(&AES_256, &[3; 32]).unwrap();
                EncryptingKey::ecb(unbound).unwrap()
            };
            for i in [0u128, 3, 5, 63] {
                let mut block = u128::from_be_bytes(nonce).wrapping_add(i).to_be_bytes();
                ecb_key.encrypt(&mut block).unwrap();
                assert_eq!(block, whole[(i as usize) * 16..(i as usize + 1) * 16]);
            }
        }
    }

    #[test]
    fn round_trip_many_sizes() {
        for size in [0usize, 1, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
            let plain: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let mut ct = Vec::new();
            let enc = encrypt_stream(&mut plain.as_slice(), &mut ct, Some(size as u64)).unwrap();
            assert_eq!(ct.len(), size);
            assert_eq!(enc.size, size as u64);
            assert_eq!(enc.digest, Digest::from_sha256(&keyward_crypto::hash::sha256(&ct)));
            assert_eq!(enc.private.digest, Digest::from_sha256(&keyward_crypto::hash::sha256(&plain)));
            if size > 0 {
                assert_ne!(ct, plain);
            }
            let mut out = Vec::new();
            let dec =
                decrypt_stream(&mut ct.as_slice(), &mut out, &enc.private, &enc.public, Some(size as u64)).unwrap();
            assert_eq!(out, plain);
            assert_eq!(dec.digest, enc.private.digest);
        }
    }

    #[test]
    fn tampering_truncation_and_wrong_keys_fail() {
        let plain = vec![5u8; CHUNK + 100];
        let mut ct = Vec::new();
        let enc = encrypt_stream(&mut plain.as_slice(), &mut ct, None).unwrap();
        let mut flipped = ct.clone();
        flipped[CHUNK + 3] ^= 1;
        let r = decrypt_stream(&mut flipped.as_slice(), &mut Vec::new(), &enc.private, &enc.public, None);
        assert!(matches!(r, Err(StreamError::Integrity)));
        let r =
            decrypt_stream(&mut &ct[..ct.len() - 1], &mut Vec::new(), &enc.private, &enc.public, Some(ct.len() as u64));
        assert!(matches!(r, Err(StreamError::Size { .. })));
        let r = decrypt_stream(&mut &ct[..ct.len() - 1], &mut Vec::new(), &enc.private, &enc.public, None);
        assert!(matches!(r, Err(StreamError::Integrity)));
        let other = PrivateOptions { symkey: key(1), nonce: enc.private.nonce, digest: enc.private.digest.clone() };
        let r = decrypt_stream(&mut ct.as_slice(), &mut Vec::new(), &other, &enc.public, None);
        assert!(matches!(r, Err(StreamError::Integrity)));
    }

    #[test]
    fn write_errors_stop_the_pipeline() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let plain = vec![1u8; 5 * CHUNK];
        let r = encrypt_stream(&mut plain.as_slice(), &mut Broken, None);
        assert!(matches!(r, Err(StreamError::Write(_))));
    }
}
