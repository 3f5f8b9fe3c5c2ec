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
use crate::layout::{Descriptor, DestLayout, ImageRef, Node, SourceImage};
use crate::options::{Digest, PrivateOptions, PublicOptions};
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
    /// Digest of the manifest (or image index) written.
    pub manifest: String,
    /// Layers encrypted or decrypted (each once, however many platforms share it).
    pub layers_changed: usize,
    /// Layers copied unchanged.
    pub layers_unchanged: usize,
    /// Asymmetric key-unwrap attempts made (decryption only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwrap_attempts: Option<usize>,
}

/// How a processed layer's descriptor changes, in every manifest that lists it.
struct LayerChange {
    media: String,
    digest: Digest,
    size: u64,
    /// Encryption annotations to set (none when decrypting).
    add: Map<String, Value>,
}

impl LayerChange {
    fn apply(&self, d: &mut Descriptor) {
        let mut annotations = d.annotations();
        annotations.retain(|k, _| !k.starts_with(ANNOTATION_PREFIX));
        annotations.extend(self.add.clone());
        d.rewrite(&self.media, &self.digest, self.size, annotations);
    }
}

/// A layer to process (once, however many manifests list it) and its new media type.
struct Job<'a> {
    layer: &'a Descriptor,
    media: String,
}

/// Encrypt the selected layers of `src` for `recipients`, writing `dst`. In a multi-platform
/// image every platform's manifest is processed (`layers` then counts within each manifest);
/// build attestations are copied unchanged.
pub fn encrypt_image(src: &ImageRef, dst: &ImageRef, opts: &EncryptOptions<'_>) -> Result<Report> {
    if opts.recipients.is_empty() && opts.providers.is_empty() {
        return Err(OcicryptError::Usage("give at least one recipient".into()));
    }
    let image = SourceImage::open(src)?;
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for m in image.manifests().into_iter().filter(|m| !m.attestation) {
        let selected = select_layers(m.layers.len(), opts.layers)?;
        for (i, layer) in m.layers.iter().enumerate() {
            if !selected[i] || jobs.iter().any(|j| j.layer.digest == layer.digest) {
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
            jobs.push(Job { layer, media });
        }
    }
    if jobs.is_empty() {
        return Err(OcicryptError::Usage("no layer to encrypt".into()));
    }
    let dest = DestLayout::create(dst, opts.durable)?;
    let recipients: Vec<&PublicKey> = opts.recipients.iter().collect();
    start_progress(opts.progress, jobs.iter().map(|j| j.layer));
    let results = run_parallel(&jobs, opts.parallelism, |job| {
        let layer = job.layer;
        let mut src = image.open_blob(layer)?;
        let mut tmp = dest.temp_blob()?;
        let mut sink = ProgressWriter { inner: tmp.as_file_mut(), progress: opts.progress };
        let enc = cipher::encrypt_stream(&mut src, &mut sink, Some(layer.size)).map_err(|e| stream_error(layer, e))?;
        dest.publish(tmp, &enc.digest)?;
        let private_json = enc.private.to_json();
        let mut add = Map::new();
        if !recipients.is_empty() {
            let wrapped = jwe::encrypt(private_json.expose(), &recipients)?;
            add.insert(ANNOTATION_JWE.into(), Value::String(STANDARD.encode(&wrapped)));
        }
        for p in opts.providers {
            let wrapped = p.wrap(private_json.expose()).map_err(|reason| OcicryptError::Provider {
                layer: layer.digest.to_string(),
                provider: p.name().to_owned(),
                reason,
            })?;
            let key = format!("{ANNOTATION_PROVIDER_PREFIX}{}", p.name());
            let value = match add.get(&key).and_then(Value::as_str) {
                Some(prev) => format!("{prev},{}", STANDARD.encode(&wrapped)),
                None => STANDARD.encode(&wrapped),
            };
            add.insert(key, Value::String(value));
        }
        add.insert(ANNOTATION_PUBOPTS.into(), Value::String(STANDARD.encode(enc.public.to_json())));
        finish_layer(opts.progress);
        Ok((LayerChange { media: job.media.clone(), digest: enc.digest, size: enc.size, add }, None))
    })?;
    write_result(&image, dest, &jobs, results)
}

/// Decrypt every encrypted layer of `src` (of every platform, in a multi-platform image) with
/// `keys` and `providers`, writing `dst`.
pub fn decrypt_image(src: &ImageRef, dst: &ImageRef, opts: &DecryptOptions<'_>) -> Result<Report> {
    if opts.keys.is_empty() && opts.providers.is_empty() {
        return Err(OcicryptError::Usage("give at least one private key or key provider".into()));
    }
    let image = SourceImage::open(src)?;
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for m in image.manifests() {
        for layer in &m.layers {
            if let Some(media) = layer.media_type.strip_suffix(ENCRYPTED_SUFFIX)
                && !jobs.iter().any(|j| j.layer.digest == layer.digest)
            {
                jobs.push(Job { layer, media: media.to_owned() });
            }
        }
    }
    if jobs.is_empty() {
        return Err(OcicryptError::Usage(format!("{src} has no encrypted layer")));
    }
    let dest = DestLayout::create(dst, opts.durable)?;
    let hint = MatchHint::default();
    start_progress(opts.progress, jobs.iter().map(|j| j.layer));
    let results = run_parallel(&jobs, opts.parallelism, |job| {
        let layer = job.layer;
        let public = public_options(layer)?;
        let (private, attempts) = unwrap_layer(layer, opts.keys, opts.providers, &hint)?;
        let mut src = image.open_blob(layer)?;
        let mut tmp = dest.temp_blob()?;
        let mut sink = ProgressWriter { inner: tmp.as_file_mut(), progress: opts.progress };
        let dec = cipher::decrypt_stream(&mut src, &mut sink, &private, &public, Some(layer.size))
            .map_err(|e| stream_error(layer, e))?;
        // Only now, with the MAC verified, does the plaintext get its name.
        dest.publish(tmp, &dec.digest)?;
        finish_layer(opts.progress);
        Ok((
            LayerChange { media: job.media.clone(), digest: dec.digest, size: dec.size, add: Map::new() },
            Some(attempts),
        ))
    })?;
    write_result(&image, dest, &jobs, results)
}

fn write_result(
    image: &SourceImage,
    dest: DestLayout,
    jobs: &[Job<'_>],
    results: Vec<(LayerChange, Option<usize>)>,
) -> Result<Report> {
    let mut attempts = None;
    let mut changes = BTreeMap::new();
    for (job, (change, a)) in jobs.iter().zip(results) {
        if let Some(a) = a {
            *attempts.get_or_insert(0) += a;
        }
        changes.insert(job.layer.digest.clone(), change);
    }
    let mut unchanged = std::collections::BTreeSet::new();
    let root = write_node(&image.root, image, &dest, &changes, &mut unchanged)?;
    let digest = root.get("digest").and_then(Value::as_str).unwrap_or_default().to_owned();
    dest.commit_root(root)?;
    Ok(Report {
        manifest: digest,
        layers_changed: changes.len(),
        layers_unchanged: unchanged.len(),
        unwrap_attempts: attempts,
    })
}

/// Write a manifest (its config and unchanged layers copied, changed layers' descriptors
/// rewritten) or an index (its entries first), returning the descriptor that names it.
fn write_node(
    node: &Node,
    image: &SourceImage,
    dest: &DestLayout,
    changes: &BTreeMap<Digest, LayerChange>,
    unchanged: &mut std::collections::BTreeSet<Digest>,
) -> Result<Map<String, Value>> {
    let (mut descriptor, doc) = match node {
        Node::Manifest(m) => {
            dest.copy_blob(image, &m.config.digest)?;
            let mut layers = Vec::with_capacity(m.layers.len());
            for l in &m.layers {
                let mut d = l.clone();
                match changes.get(&l.digest) {
                    Some(c) if !m.attestation => c.apply(&mut d),
                    _ => {
                        dest.copy_blob(image, &l.digest)?;
                        unchanged.insert(l.digest.clone());
                    }
                }
                layers.push(Value::Object(d.json));
            }
            let mut manifest = m.manifest.clone();
            manifest.insert("layers".into(), Value::Array(layers));
            (m.descriptor.clone(), manifest)
        }
        Node::Index { descriptor, index, children } => {
            let entries = children
                .iter()
                .map(|c| write_node(c, image, dest, changes, unchanged).map(Value::Object))
                .collect::<Result<Vec<_>>>()?;
            let mut index = index.clone();
            index.insert("manifests".into(), Value::Array(entries));
            (descriptor.clone(), index)
        }
    };
    let (digest, size) = dest.put_json(&doc)?;
    descriptor.insert("digest".into(), Value::String(digest.to_string()));
    descriptor.insert("size".into(), Value::from(size));
    Ok(descriptor)
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
    /// Position in its manifest.
    pub index: usize,
    /// The manifest's platform, in a multi-platform image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
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

/// Which layers of `src` are encrypted and for whom (every platform of a multi-platform
/// image); needs no key.
pub fn inspect_image(src: &ImageRef) -> Result<Vec<LayerInfo>> {
    let image = SourceImage::open(src)?;
    let mut out = Vec::new();
    for m in image.manifests() {
        for (index, layer) in m.layers.iter().enumerate() {
            out.push(layer_info(index, layer, m.platform.clone()));
        }
    }
    Ok(out)
}

fn layer_info(index: usize, layer: &Descriptor, platform: Option<String>) -> LayerInfo {
    let encrypted = layer.media_type.ends_with(ENCRYPTED_SUFFIX);
    let mut info = LayerInfo {
        index,
        platform,
        digest: layer.digest.to_string(),
        size: layer.size,
        media_type: layer.media_type.clone(),
        encrypted,
        cipher: None,
        jwe_recipients: Vec::new(),
        other_schemes: BTreeMap::new(),
        problems: Vec::new(),
    };
    if !encrypted {
        return info;
    }
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
    info
}
