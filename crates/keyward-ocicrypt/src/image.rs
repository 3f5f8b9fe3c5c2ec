//! Whole-image operations: encrypt, decrypt and inspect an image in an OCI layout.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::cipher::{self, StreamError};
use crate::error::{OcicryptError, Result};
use crate::jwe::{self, Jwe, MatchHint};
use crate::keys::{PrivateKey, PublicKey};
use crate::layout::{Descriptor, DestLayout, ImageRef, SourceImage};
use crate::options::{PrivateOptions, PublicOptions};
use crate::provider::{ANNOTATION_PROVIDER_PREFIX, KeyProvider};

/// Prefix of every encryption annotation; all of them are removed on decryption.
pub const ANNOTATION_PREFIX: &str = "org.opencontainers.image.enc.";
/// JWE recipients.
pub const ANNOTATION_JWE: &str = "org.opencontainers.image.enc.keys.jwe";
/// Public options.
pub const ANNOTATION_PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
/// Prefix of the other key schemes' annotations.
pub const ANNOTATION_KEYS_PREFIX: &str = "org.opencontainers.image.enc.keys.";
/// Largest encryption annotation value accepted.
pub const MAX_ANNOTATION: usize = 4 * 1024 * 1024;
/// Suffix of encrypted media types.
pub const ENCRYPTED_SUFFIX: &str = "+encrypted";

/// The encrypted media type for a plain layer media type, if ocicrypt can encrypt it.
pub fn encrypted_media_type(plain: &str) -> Option<String> {
    const OCI: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.wasm.content.layer.v1+wasm",
    ];
    if OCI.contains(&plain) {
        return Some(format!("{plain}{ENCRYPTED_SUFFIX}"));
    }
    match plain {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Some("application/vnd.oci.image.layer.v1.tar+gzip+encrypted".into())
        }
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Some("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip+encrypted".into())
        }
        _ => None,
    }
}

/// Progress of a long operation, for a display that polls it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Layer bytes processed so far.
    pub bytes_done: AtomicU64,
    /// Layer bytes to process.
    pub bytes_total: AtomicU64,
    /// Layers finished.
    pub layers_done: AtomicUsize,
    /// Layers to process.
    pub layers_total: AtomicUsize,
}

/// Options of [`encrypt_image`].
#[derive(Debug)]
pub struct EncryptOptions<'a> {
    /// JWE recipients.
    pub recipients: &'a [PublicKey],
    /// Key-provider recipients (several of one name share its annotation).
    pub providers: &'a [&'a dyn KeyProvider],
    /// Layers to encrypt, by index (negative counts from the end); empty means all.
    pub layers: &'a [i64],
    /// Layers processed at once (0: one per core).
    pub parallelism: usize,
    /// Sync every blob written to disk before naming it (default: leave it to the page cache).
    pub durable: bool,
    /// Optional progress counters.
    pub progress: Option<&'a Progress>,
}

/// Options of [`decrypt_image`].
#[derive(Debug)]
pub struct DecryptOptions<'a> {
    /// Private keys, parsed once.
    pub keys: &'a [PrivateKey],
    /// Key providers, tried on the layers that carry their annotation.
    pub providers: &'a [&'a dyn KeyProvider],
    /// Layers processed at once (0: one per core).
    pub parallelism: usize,
    /// Sync every blob written to disk before naming it (default: leave it to the page cache).
    pub durable: bool,
    /// Optional progress counters.
    pub progress: Option<&'a Progress>,
}

/// What an operation did.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Digest of the manifest written.
    pub manifest: String,
    /// Layers encrypted or decrypted.
    pub layers_changed: usize,
    /// Layers copied unchanged.
    pub layers_unchanged: usize,
    /// Asymmetric key-unwrap attempts made (decryption only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwrap_attempts: Option<usize>,
}

/// Encrypt the selected layers of `src` for `recipients`, writing `dst`.
pub fn encrypt_image(src: &ImageRef, dst: &ImageRef, opts: &EncryptOptions<'_>) -> Result<Report> {
    if opts.recipients.is_empty() && opts.providers.is_empty() {
        return Err(OcicryptError::Usage("give at least one recipient".into()));
    }
    let image = SourceImage::open(src)?;
    let selected = select_layers(image.layers.len(), opts.layers)?;
    let mut jobs = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        if !selected[i] {
            continue;
        }
        if layer.media_type.ends_with(ENCRYPTED_SUFFIX) {
            if opts.layers.is_empty() {
                continue;
            }
            return Err(OcicryptError::Usage(format!("layer {i} ({}) is already encrypted", layer.digest)));
        }
        let media = encrypted_media_type(&layer.media_type).ok_or_else(|| {
            OcicryptError::Usage(format!("layer {i}: media type {:?} cannot be encrypted", layer.media_type))
        })?;
        jobs.push((i, media));
    }
    if jobs.is_empty() {
        return Err(OcicryptError::Usage("no layer to encrypt".into()));
    }
    let dest = DestLayout::create(dst, opts.durable)?;
    let recipients: Vec<&PublicKey> = opts.recipients.iter().collect();
    start_progress(opts.progress, jobs.iter().map(|(i, _)| &image.layers[*i]));
    let results = run_parallel(&jobs, opts.parallelism, |(i, media)| {
        let layer = &image.layers[*i];
        let mut src = image.open_blob(layer)?;
        let mut tmp = dest.temp_blob()?;
        let mut sink = ProgressWriter { inner: tmp.as_file_mut(), progress: opts.progress };
        let enc = cipher::encrypt_stream(&mut src, &mut sink, Some(layer.size)).map_err(|e| stream_error(layer, e))?;
        dest.publish(tmp, &enc.digest)?;
        let private_json = enc.private.to_json();
        let mut annotations = layer.annotations();
        if !recipients.is_empty() {
            let wrapped = jwe::encrypt(private_json.expose(), &recipients)?;
            annotations.insert(ANNOTATION_JWE.into(), Value::String(STANDARD.encode(&wrapped)));
        }
        for p in opts.providers {
            let wrapped = p.wrap(private_json.expose()).map_err(|reason| OcicryptError::Provider {
                layer: layer.digest.to_string(),
                provider: p.name().to_owned(),
                reason,
            })?;
            let key = format!("{ANNOTATION_PROVIDER_PREFIX}{}", p.name());
            let value = match annotations.get(&key).and_then(Value::as_str) {
                Some(prev) => format!("{prev},{}", STANDARD.encode(&wrapped)),
                None => STANDARD.encode(&wrapped),
            };
            annotations.insert(key, Value::String(value));
        }
        annotations.insert(ANNOTATION_PUBOPTS.into(), Value::String(STANDARD.encode(enc.public.to_json())));
        let mut d = layer.clone();
        d.rewrite(media, &enc.digest, enc.size, annotations);
        finish_layer(opts.progress);
        Ok((d, None))
    })?;
    write_result(image, dest, results, &jobs)
}

/// Decrypt every encrypted layer of `src` with `keys`, writing `dst`.
pub fn decrypt_image(src: &ImageRef, dst: &ImageRef, opts: &DecryptOptions<'_>) -> Result<Report> {
    if opts.keys.is_empty() && opts.providers.is_empty() {
        return Err(OcicryptError::Usage("give at least one private key or key provider".into()));
    }
    let image = SourceImage::open(src)?;
    let jobs: Vec<(usize, String)> = image
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.media_type.strip_suffix(ENCRYPTED_SUFFIX).map(|m| (i, m.to_owned())))
        .collect();
    if jobs.is_empty() {
        return Err(OcicryptError::Usage(format!("{src} has no encrypted layer")));
    }
    let dest = DestLayout::create(dst, opts.durable)?;
    let hint = MatchHint::default();
    start_progress(opts.progress, jobs.iter().map(|(i, _)| &image.layers[*i]));
    let results = run_parallel(&jobs, opts.parallelism, |(i, media)| {
        let layer = &image.layers[*i];
        let public = public_options(layer)?;
        let (private, attempts) = unwrap_layer(layer, opts.keys, opts.providers, &hint)?;
        let mut src = image.open_blob(layer)?;
        let mut tmp = dest.temp_blob()?;
        let mut sink = ProgressWriter { inner: tmp.as_file_mut(), progress: opts.progress };
        let dec = cipher::decrypt_stream(&mut src, &mut sink, &private, &public, Some(layer.size))
            .map_err(|e| stream_error(layer, e))?;
        // Only now, with the MAC and the digest verified, does the plaintext get its name.
        dest.publish(tmp, &dec.digest)?;
        let annotations: Map<String, Value> =
            layer.annotations().into_iter().filter(|(k, _)| !k.starts_with(ANNOTATION_PREFIX)).collect();
        let mut d = layer.clone();
        d.rewrite(media, &dec.digest, dec.size, annotations);
        finish_layer(opts.progress);
        Ok((d, Some(attempts)))
    })?;
    write_result(image, dest, results, &jobs)
}

fn write_result(
    image: SourceImage,
    dest: DestLayout,
    results: Vec<(Descriptor, Option<usize>)>,
    jobs: &[(usize, String)],
) -> Result<Report> {
    let mut layers = image.layers.clone();
    let mut attempts = None;
    for ((i, _), (d, a)) in jobs.iter().zip(results) {
        layers[*i] = d;
        if let Some(a) = a {
            *attempts.get_or_insert(0) += a;
        }
    }
    dest.copy_blob(&image, &image.config.digest)?;
    for (i, l) in layers.iter().enumerate() {
        if !jobs.iter().any(|(j, _)| *j == i) {
            dest.copy_blob(&image, &l.digest)?;
        }
    }
    let mut manifest = image.manifest.clone();
    manifest.insert("layers".into(), Value::Array(layers.into_iter().map(|d| Value::Object(d.json)).collect()));
    let digest = dest.commit_image(&manifest, image.manifest_descriptor.clone())?;
    Ok(Report {
        manifest: digest.to_string(),
        layers_changed: jobs.len(),
        layers_unchanged: image.layers.len() - jobs.len(),
        unwrap_attempts: attempts,
    })
}

fn select_layers(count: usize, wanted: &[i64]) -> Result<Vec<bool>> {
    if wanted.is_empty() {
        return Ok(vec![true; count]);
    }
    let mut selected = vec![false; count];
    for &w in wanted {
        let idx = if w < 0 { count as i64 + w } else { w };
        if idx < 0 || idx >= count as i64 {
            return Err(OcicryptError::Usage(format!("layer {w} does not exist: the image has {count} layers")));
        }
        selected[idx as usize] = true;
    }
    Ok(selected)
}

fn stream_error(layer: &Descriptor, e: StreamError) -> OcicryptError {
    let name = layer.digest.to_string();
    match e {
        StreamError::Read(source) => OcicryptError::Io { path: format!("blob {name}"), source },
        StreamError::Write(source) => OcicryptError::Io { path: "destination blob".into(), source },
        StreamError::Integrity => OcicryptError::DecryptionFailed { layer: name },
        StreamError::Size { expected, actual } => OcicryptError::image(format!(
            "blob {name} is {actual} bytes but its descriptor says {expected} (truncated or replaced)"
        )),
    }
}

fn bad_annotation(layer: &Descriptor, annotation: &str, reason: impl Into<String>) -> OcicryptError {
    OcicryptError::BadAnnotation {
        layer: layer.digest.to_string(),
        annotation: annotation.into(),
        reason: reason.into(),
    }
}

fn public_options(layer: &Descriptor) -> Result<PublicOptions> {
    let raw = layer.annotation(ANNOTATION_PUBOPTS).unwrap_or("");
    if raw.len() > MAX_ANNOTATION {
        return Err(bad_annotation(layer, ANNOTATION_PUBOPTS, "too large"));
    }
    let json = STANDARD.decode(raw).map_err(|_| bad_annotation(layer, ANNOTATION_PUBOPTS, "not base64"))?;
    PublicOptions::from_json(&json).map_err(|reason| bad_annotation(layer, ANNOTATION_PUBOPTS, reason))
}

/// The comma-separated base64 blobs of a `keys.*` annotation.
fn key_blobs(layer: &Descriptor, annotation: &str) -> Result<Vec<Vec<u8>>> {
    let Some(raw) = layer.annotation(annotation) else { return Ok(Vec::new()) };
    if raw.len() > MAX_ANNOTATION {
        return Err(bad_annotation(layer, annotation, "too large"));
    }
    raw.split(',')
        .map(|b| {
            STANDARD
                .decode(b.trim())
                .map_err(|_| bad_annotation(layer, annotation, "not a comma-separated list of base64 values"))
        })
        .collect()
}

fn unwrap_layer(
    layer: &Descriptor,
    keys: &[PrivateKey],
    providers: &[&dyn KeyProvider],
    hint: &MatchHint,
) -> Result<(PrivateOptions, usize)> {
    let blobs = if keys.is_empty() { Vec::new() } else { key_blobs(layer, ANNOTATION_JWE)? };
    let mut recipients = 0;
    let mut attempts = 0;
    for blob in blobs {
        let jwe = Jwe::parse(&blob).map_err(|e| bad_annotation(layer, ANNOTATION_JWE, e.to_string()))?;
        recipients += jwe.recipients().len();
        let (found, tries) = jwe.decrypt_counting(keys, hint);
        attempts += tries;
        if let Some(plain) = found {
            let private = PrivateOptions::from_json(plain.expose())?;
            return Ok((private, attempts));
        }
    }
    let mut provider_error = None;
    for p in providers {
        let annotation = format!("{ANNOTATION_PROVIDER_PREFIX}{}", p.name());
        for wrapped in key_blobs(layer, &annotation)? {
            recipients += 1;
            attempts += 1;
            match p.unwrap(&wrapped) {
                Ok(plain) => return Ok((PrivateOptions::from_json(plain.expose())?, attempts)),
                Err(reason) => {
                    provider_error = Some(OcicryptError::Provider {
                        layer: layer.digest.to_string(),
                        provider: p.name().to_owned(),
                        reason,
                    })
                }
            }
        }
    }
    if let Some(e) = provider_error {
        return Err(e);
    }
    if recipients == 0 {
        let schemes: Vec<String> = layer
            .annotations()
            .keys()
            .filter_map(|k| k.strip_prefix(ANNOTATION_KEYS_PREFIX).map(str::to_owned))
            .collect();
        return Err(OcicryptError::Usage(format!(
            "layer {} has no recipient for the keys or providers given (key schemes present: {})",
            layer.digest,
            if schemes.is_empty() { "none".into() } else { schemes.join(", ") }
        )));
    }
    Err(OcicryptError::NoMatchingKey { layer: layer.digest.to_string(), keys: keys.len(), recipients })
}

fn start_progress<'a>(p: Option<&Progress>, layers: impl Iterator<Item = &'a Descriptor>) {
    if let Some(p) = p {
        for l in layers {
            p.bytes_total.fetch_add(l.size, Ordering::Relaxed);
            p.layers_total.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn finish_layer(p: Option<&Progress>) {
    if let Some(p) = p {
        p.layers_done.fetch_add(1, Ordering::Relaxed);
    }
}

struct ProgressWriter<'a, W> {
    inner: W,
    progress: Option<&'a Progress>,
}

impl<W: std::io::Write> std::io::Write for ProgressWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(p) = self.progress {
            p.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Run `f` over `jobs` on up to `parallelism` threads (0: one per core); results in job order.
/// After the first error no new job starts, and the first error is returned.
fn run_parallel<J: Sync, R: Send>(
    jobs: &[J],
    parallelism: usize,
    f: impl Fn(&J) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = if parallelism == 0 { cores } else { parallelism }.clamp(1, jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<R>>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let r = f(job);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(jobs.len());
    let mut first_err = None;
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(r)) => out.push(r),
            Some(Err(e)) => {
                first_err.get_or_insert(e);
            }
            None => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// What `inspect` reports about one layer.
#[derive(Debug, Serialize)]
pub struct LayerInfo {
    /// Position in the manifest.
    pub index: usize,
    /// Layer digest.
    pub digest: String,
    /// Layer size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// Whether the layer is encrypted.
    pub encrypted: bool,
    /// The cipher named by `pubopts`, if encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    /// JWE recipients (alg, kid if any, curve for ECDH).
    pub jwe_recipients: Vec<RecipientInfo>,
    /// Other key schemes present and how many wrapped keys each holds.
    pub other_schemes: BTreeMap<String, usize>,
    /// Problems found reading the encryption annotations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// One JWE recipient as `inspect` shows it.
#[derive(Debug, Serialize)]
pub struct RecipientInfo {
    /// Key management algorithm.
    pub alg: String,
    /// Key id hint (Keyward writes the RFC 7638 thumbprint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Curve of the ephemeral key, for ECDH-ES.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curve: Option<String>,
}

/// Which layers of `src` are encrypted and for whom; needs no key.
pub fn inspect_image(src: &ImageRef) -> Result<Vec<LayerInfo>> {
    let image = SourceImage::open(src)?;
    let mut out = Vec::new();
    for (index, layer) in image.layers.iter().enumerate() {
        let encrypted = layer.media_type.ends_with(ENCRYPTED_SUFFIX);
        let mut info = LayerInfo {
            index,
            digest: layer.digest.to_string(),
            size: layer.size,
            media_type: layer.media_type.clone(),
            encrypted,
            cipher: None,
            jwe_recipients: Vec::new(),
            other_schemes: BTreeMap::new(),
            problems: Vec::new(),
        };
        if encrypted {
            match public_options(layer) {
                Ok(_) => info.cipher = Some(crate::options::CIPHER_AES_256_CTR_HMAC_SHA256.into()),
                Err(e) => info.problems.push(e.to_string()),
            }
            match key_blobs(layer, ANNOTATION_JWE) {
                Ok(blobs) => {
                    for blob in blobs {
                        match Jwe::parse(&blob) {
                            Ok(jwe) => info.jwe_recipients.extend(jwe.recipients().iter().map(|r| RecipientInfo {
                                alg: r.alg.clone(),
                                kid: r.kid.clone(),
                                curve: r.epk_curve(),
                            })),
                            Err(e) => info.problems.push(e.to_string()),
                        }
                    }
                }
                Err(e) => info.problems.push(e.to_string()),
            }
            for key in layer.annotations().keys() {
                if let Some(scheme) = key.strip_prefix(ANNOTATION_KEYS_PREFIX)
                    && scheme != "jwe"
                {
                    let n = key_blobs(layer, key).map(|b| b.len()).unwrap_or(0);
                    info.other_schemes.insert(scheme.to_owned(), n);
                }
            }
        }
        out.push(info);
    }
    Ok(out)
}
