//! Cryptographic operations with a key: encrypt, decrypt, re-encrypt, data keys, sign and
//! verify (messages and digests), MACs, random bytes.

use super::*;

impl Kms {
    /// Encrypt up to 64 KiB under the key's current version, binding `context`.
    pub async fn encrypt(
        &self,
        name: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<Encrypted, KmsError> {
        check_len("plaintext", plaintext.len(), MAX_PLAINTEXT)?;
        validate::context(context)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "encrypt", |a| a == KeyAlgorithm::Aes256Gcm)?;
        let (version, key) = current_aead(&ck)?;
        let ciphertext = format::seal_ciphertext(key, ck.record.id.0, version, context, plaintext)?;
        Ok(Encrypted { ciphertext, key_name: ck.record.name.clone(), key_version: version })
    }

    /// Decrypt a ciphertext envelope; the key is found from its header.
    pub async fn decrypt(&self, ciphertext: &[u8], context: &BTreeMap<String, String>) -> Result<Decrypted, KmsError> {
        check_len("ciphertext", ciphertext.len(), MAX_CIPHERTEXT)?;
        validate::context(context)?;
        let (header, body) =
            format::parse(ciphertext, EnvelopeKind::CiphertextV1).map_err(|_| KmsError::DecryptionFailed)?;
        let ck = self.key_by_id(&KeyId(header.key_id)).await?.ok_or(KmsError::DecryptionFailed)?;
        Self::usable(&ck, "decrypt", |a| a == KeyAlgorithm::Aes256Gcm)?;
        let key = ck.versions.get(&header.version).and_then(|v| v.key.aead()).ok_or(KmsError::DecryptionFailed)?;
        let plaintext = format::open_ciphertext(key, &header, body, context).map_err(|_| KmsError::DecryptionFailed)?;
        Ok(Decrypted { plaintext, key_name: ck.record.name.clone(), key_version: header.version })
    }

    /// Decrypt and encrypt again under `destination` (default: the same key's current version)
    /// with `destination_context`; the plaintext never leaves the service.
    pub async fn reencrypt(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        destination: Option<&str>,
        destination_context: &BTreeMap<String, String>,
    ) -> Result<Reencrypted, KmsError> {
        let d = self.decrypt(ciphertext, context).await?;
        let dest = destination.unwrap_or(&d.key_name).to_string();
        let encrypted = self.encrypt(&dest, d.plaintext.expose(), destination_context).await?;
        Ok(Reencrypted { encrypted, source_key: d.key_name, source_key_version: d.key_version })
    }

    /// Generate a data key of `bytes` (16 to 64, default 32) bytes, returned in the clear (unless
    /// `with_plaintext` is false) and encrypted under the named key.
    pub async fn generate_data_key(
        &self,
        name: &str,
        bytes: Option<usize>,
        context: &BTreeMap<String, String>,
        with_plaintext: bool,
    ) -> Result<DataKey, KmsError> {
        let n = bytes.unwrap_or(32);
        if !(16..=64).contains(&n) {
            return Err(KmsError::invalid("data key size must be between 16 and 64 bytes"));
        }
        let dk = SecretBytes::random(n)?;
        let enc = self.encrypt(name, dk.expose(), context).await?;
        Ok(DataKey {
            plaintext: with_plaintext.then_some(dk),
            ciphertext: enc.ciphertext,
            key_version: enc.key_version,
        })
    }

    /// Sign `message` with the key's current version; returns a signature envelope.
    pub async fn sign(&self, name: &str, message: &[u8]) -> Result<(Vec<u8>, u32), KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "sign", KeyAlgorithm::is_signing)?;
        let v = current(&ck)?;
        let sig = v.1.key.sign(message)?;
        Ok((format::wrap_tag(EnvelopeKind::SignatureV1, ck.record.id.0, v.0, &sig), v.0))
    }

    /// Sign the SHA-256 `digest` of a message the caller hashed (a message of any size); the
    /// signature verifies against the message itself. ECDSA keys only: Ed25519 signs whole
    /// messages.
    pub async fn sign_digest(&self, name: &str, digest: &[u8]) -> Result<(Vec<u8>, u32), KmsError> {
        if digest.len() != 32 {
            return Err(KmsError::invalid("digest must be a SHA-256 digest: 32 bytes, base64"));
        }
        let ck = self.key(name).await?;
        Self::usable(&ck, DIGEST_SIGNING, |a| a == KeyAlgorithm::EcdsaP256)?;
        let v = current(&ck)?;
        let sig = v.1.key.sign_digest_sha256(digest)?;
        Ok((format::wrap_tag(EnvelopeKind::SignatureV1, ck.record.id.0, v.0, &sig), v.0))
    }

    /// Verify a signature envelope over the message whose SHA-256 digest is `digest`.
    pub async fn verify_digest(&self, name: &str, digest: &[u8], signature: &[u8]) -> Result<bool, KmsError> {
        if digest.len() != 32 {
            return Err(KmsError::invalid("digest must be a SHA-256 digest: 32 bytes, base64"));
        }
        let ck = self.key(name).await?;
        Self::usable(&ck, DIGEST_SIGNING, |a| a == KeyAlgorithm::EcdsaP256)?;
        // Bytes that are not a signature envelope do not verify.
        let Ok((h, sig)) = format::parse(signature, EnvelopeKind::SignatureV1) else { return Ok(false) };
        if h.key_id != ck.record.id.0 {
            return Ok(false);
        }
        Ok(ck.versions.get(&h.version).is_some_and(|v| v.key.verify_digest_sha256(digest, sig).is_ok()))
    }

    /// Verify a signature envelope made by this key (any version).
    pub async fn verify(&self, name: &str, message: &[u8], signature: &[u8]) -> Result<bool, KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "verify", KeyAlgorithm::is_signing)?;
        // Bytes that are not a signature envelope do not verify.
        let Ok((h, sig)) = format::parse(signature, EnvelopeKind::SignatureV1) else { return Ok(false) };
        if h.key_id != ck.record.id.0 {
            return Ok(false);
        }
        Ok(ck.versions.get(&h.version).is_some_and(|v| v.key.verify(message, sig).is_ok()))
    }

    /// HMAC-SHA256 of `message` with the key's current version; returns a MAC envelope.
    pub async fn mac(&self, name: &str, message: &[u8]) -> Result<(Vec<u8>, u32), KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "mac", |a| a == KeyAlgorithm::HmacSha256)?;
        let v = current(&ck)?;
        let tag = v.1.key.mac(message)?;
        Ok((format::wrap_tag(EnvelopeKind::MacV1, ck.record.id.0, v.0, &tag), v.0))
    }

    /// Verify a MAC envelope made by this key (any version), in constant time.
    pub async fn verify_mac(&self, name: &str, message: &[u8], mac: &[u8]) -> Result<bool, KmsError> {
        check_len("message", message.len(), MAX_MESSAGE)?;
        let ck = self.key(name).await?;
        Self::usable(&ck, "verify-mac", |a| a == KeyAlgorithm::HmacSha256)?;
        // Bytes that are not a MAC envelope do not verify.
        let Ok((h, tag)) = format::parse(mac, EnvelopeKind::MacV1) else { return Ok(false) };
        if h.key_id != ck.record.id.0 {
            return Ok(false);
        }
        Ok(ck.versions.get(&h.version).is_some_and(|v| v.key.verify_mac(message, tag).is_ok()))
    }

    /// `n` random bytes (1 to 1024) from the CSPRNG.
    pub fn random(&self, n: usize) -> Result<SecretBytes, KmsError> {
        if n == 0 || n > MAX_RANDOM_BYTES {
            return Err(KmsError::invalid(format!("bytes must be between 1 and {MAX_RANDOM_BYTES}")));
        }
        Ok(SecretBytes::random(n)?)
    }

    // ----- secrets --------------------------------------------------------------------------
}
