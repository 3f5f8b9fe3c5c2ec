//! OCI image layouts on disk (`oci:DIR[:TAG]`), read and written the way skopeo does.
//!
//! Manifests and indexes are kept as JSON values, so fields this code does not know about
//! survive a round trip. Blobs are content addressed: a new blob is written to a temporary file
//! in `blobs/sha256/` and renamed to its digest only once it is complete (and, for decrypted
//! layers, verified). Unchanged blobs are hard-linked (copied across file systems), so they stay
//! byte-identical.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value, json};
use tempfile::NamedTempFile;

use crate::error::{OcicryptError, Result};
use crate::options::Digest;

/// `index.json` annotation naming an image in a layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// OCI image manifest media type.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Largest manifest or index read.
pub const MAX_JSON: u64 = 4 * 1024 * 1024;

/// An `oci:DIR[:TAG]` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The layout directory.
    pub dir: PathBuf,
    /// The image's `org.opencontainers.image.ref.name`, if given.
    pub tag: Option<String>,
}

impl ImageRef {
    /// Parse `oci:DIR[:TAG]`. As in containers/image, the directory ends at the first `:`.
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s.strip_prefix("oci:").ok_or_else(|| OcicryptError::BadReference(s.to_owned()))?;
        let (dir, tag) = match rest.split_once(':') {
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        if dir.is_empty() || tag.is_some_and(|t| t.is_empty() || t.len() > 255 || t.chars().any(char::is_control)) {
            return Err(OcicryptError::BadReference(s.to_owned()));
        }
        Ok(Self { dir: PathBuf::from(dir), tag: tag.map(str::to_owned) })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci:{}", self.dir.display())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

/// A layer (or config) descriptor of a manifest.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// The whole JSON object, unknown fields included.
    pub json: Map<String, Value>,
    /// `mediaType`.
    pub media_type: String,
    /// `digest`.
    pub digest: Digest,
    /// `size`.
    pub size: u64,
}

impl Descriptor {
    /// Validate a descriptor object.
    pub fn from_json(v: &Value, what: &str) -> Result<Self> {
        let json = v.as_object().ok_or_else(|| OcicryptError::image(format!("{what} is not an object")))?.clone();
        let media_type = json
            .get("mediaType")
            .and_then(Value::as_str)
            .ok_or_else(|| OcicryptError::image(format!("{what} has no mediaType")))?
            .to_owned();
        let digest = Digest::parse(
            json.get("digest")
                .and_then(Value::as_str)
                .ok_or_else(|| OcicryptError::image(format!("{what} has no digest")))?,
        )?;
        let size = json
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| OcicryptError::image(format!("{what} has no valid size")))?;
        Ok(Self { json, media_type, digest, size })
    }

    /// The string annotations of the descriptor.
    pub fn annotations(&self) -> Map<String, Value> {
        self.json.get("annotations").and_then(Value::as_object).cloned().unwrap_or_default()
    }

    /// A string annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.json.get("annotations")?.get(key)?.as_str()
    }

    /// Replace media type, digest, size and annotations (empty annotations are removed).
    pub fn rewrite(&mut self, media_type: &str, digest: &Digest, size: u64, annotations: Map<String, Value>) {
        self.media_type = media_type.to_owned();
        self.digest = digest.clone();
        self.size = size;
        self.json.insert("mediaType".into(), Value::String(media_type.to_owned()));
        self.json.insert("digest".into(), Value::String(digest.to_string()));
        self.json.insert("size".into(), json!(size));
        if annotations.is_empty() {
            self.json.remove("annotations");
        } else {
            self.json.insert("annotations".into(), Value::Object(annotations));
        }
    }
}

/// One image manifest of a source image, with the descriptor that names it.
#[derive(Debug)]
pub struct ManifestImage {
    /// The descriptor naming the manifest (in `index.json` or in an image index).
    pub descriptor: Map<String, Value>,
    /// The manifest JSON.
    pub manifest: Map<String, Value>,
    /// Its config descriptor.
    pub config: Descriptor,
    /// Its layer descriptors, in order.
    pub layers: Vec<Descriptor>,
    /// `os/architecture[/variant]` from the descriptor's `platform`, inside an index.
    pub platform: Option<String>,
    /// A build attestation (BuildKit's `vnd.docker.reference.type: attestation-manifest`):
    /// copied unchanged, never encrypted.
    pub attestation: bool,
}

/// A node of a source image: a manifest, or an image index of further nodes.
#[derive(Debug)]
pub enum Node {
    /// An image manifest.
    Manifest(ManifestImage),
    /// An image index (multi-platform image).
    Index {
        /// The descriptor naming the index.
        descriptor: Map<String, Value>,
        /// The index JSON.
        index: Map<String, Value>,
        /// Its entries, in order.
        children: Vec<Node>,
    },
}

/// Deepest nesting of image indexes followed.
const MAX_DEPTH: usize = 4;
/// Most manifests in one image.
const MAX_MANIFESTS: usize = 256;

/// A source image: its layout and the manifest or index `index.json` names.
#[derive(Debug)]
pub struct SourceImage {
    /// Layout directory.
    pub dir: PathBuf,
    /// The image.
    pub root: Node,
}

impl SourceImage {
    /// Open the image `r` names.
    pub fn open(r: &ImageRef) -> Result<Self> {
        let layout: Value = read_json(&r.dir.join("oci-layout"))?;
        if layout.get("imageLayoutVersion").and_then(Value::as_str).is_none() {
            return Err(OcicryptError::image(format!(
                "{}: not an OCI image layout (oci-layout has no imageLayoutVersion)",
                r.dir.display()
            )));
        }
        let index: Value = read_json(&r.dir.join("index.json"))?;
        let entries = index
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| OcicryptError::image("index.json has no manifests"))?;
        let chosen: Vec<&Value> = match &r.tag {
            Some(tag) => entries
                .iter()
                .filter(|m| {
                    m.pointer("/annotations/org.opencontainers.image.ref.name").and_then(Value::as_str) == Some(tag)
                })
                .collect(),
            None => entries.iter().collect(),
        };
        let entry = match chosen.as_slice() {
            [one] => *one,
            [] => return Err(OcicryptError::image(format!("{r}: no such image in the layout"))),
            _ => {
                return Err(OcicryptError::image(format!(
                    "{r}: the layout holds {} images; name one with oci:DIR:TAG",
                    chosen.len()
                )));
            }
        };
        let mut count = 0;
        let root = load_node(&r.dir, entry, 0, &mut count)?;
        Ok(Self { dir: r.dir.clone(), root })
    }

    /// Every manifest of the image, depth first.
    pub fn manifests(&self) -> Vec<&ManifestImage> {
        fn walk<'a>(n: &'a Node, out: &mut Vec<&'a ManifestImage>) {
            match n {
                Node::Manifest(m) => out.push(m),
                Node::Index { children, .. } => children.iter().for_each(|c| walk(c, out)),
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Path of a blob of this layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.dir, digest)
    }

    /// Open a blob for streaming, checking that its size is what the descriptor says.
    pub fn open_blob(&self, d: &Descriptor) -> Result<File> {
        let path = self.blob_path(&d.digest);
        let f = File::open(&path).map_err(|e| OcicryptError::io(&path, e))?;
        let len = f.metadata().map_err(|e| OcicryptError::io(&path, e))?.len();
        if len != d.size {
            return Err(OcicryptError::image(format!(
                "blob {} is {len} bytes but its descriptor says {} (truncated or replaced)",
                d.digest, d.size
            )));
        }
        Ok(f)
    }
}

/// Read the blob a descriptor names, bounded, and check it against the descriptor.
fn read_verified_json(dir: &Path, d: &Descriptor, what: &str) -> Result<Map<String, Value>> {
    let bytes = read_blob_bounded(dir, &d.digest, MAX_JSON)?;
    if Digest::from_sha256(&keyward_crypto::hash::sha256(&bytes)) != d.digest || bytes.len() as u64 != d.size {
        return Err(OcicryptError::image(format!("{what} {} does not match its digest or size", d.digest)));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| OcicryptError::image(format!("{what} {} is not a JSON object: {e}", d.digest)))
}

fn load_node(dir: &Path, entry: &Value, depth: usize, count: &mut usize) -> Result<Node> {
    let d = Descriptor::from_json(entry, "manifest entry")?;
    *count += 1;
    if *count > MAX_MANIFESTS {
        return Err(OcicryptError::image(format!("more than {MAX_MANIFESTS} manifests in one image")));
    }
    match d.media_type.as_str() {
        MEDIA_INDEX => {
            if depth >= MAX_DEPTH {
                return Err(OcicryptError::image(format!("image indexes nested deeper than {MAX_DEPTH}")));
            }
            let index = read_verified_json(dir, &d, "image index")?;
            let children = index
                .get("manifests")
                .and_then(Value::as_array)
                .ok_or_else(|| OcicryptError::image(format!("image index {} has no manifests", d.digest)))?
                .iter()
                .map(|c| load_node(dir, c, depth + 1, count))
                .collect::<Result<Vec<_>>>()?;
            Ok(Node::Index { descriptor: d.json, index, children })
        }
        MEDIA_MANIFEST => {
            let manifest = read_verified_json(dir, &d, "manifest")?;
            let config = Descriptor::from_json(manifest.get("config").unwrap_or(&Value::Null), "manifest config")?;
            let layers = manifest
                .get("layers")
                .and_then(Value::as_array)
                .ok_or_else(|| OcicryptError::image("manifest has no layers"))?
                .iter()
                .enumerate()
                .map(|(i, l)| Descriptor::from_json(l, &format!("layer {i}")))
                .collect::<Result<Vec<_>>>()?;
            let platform = d.json.get("platform").and_then(|p| {
                let os = p.get("os")?.as_str()?;
                let arch = p.get("architecture")?.as_str()?;
                Some(match p.get("variant").and_then(Value::as_str) {
                    Some(v) => format!("{os}/{arch}/{v}"),
                    None => format!("{os}/{arch}"),
                })
            });
            let attestation = d.annotation("vnd.docker.reference.type") == Some("attestation-manifest");
            Ok(Node::Manifest(ManifestImage { descriptor: d.json, manifest, config, layers, platform, attestation }))
        }
        other => Err(OcicryptError::image(format!(
            "manifest media type {other:?} is neither an OCI image manifest nor an OCI image index"
        ))),
    }
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

fn read_json(path: &Path) -> Result<Value> {
    let f = File::open(path).map_err(|e| OcicryptError::io(path, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON + 1).read_to_end(&mut bytes).map_err(|e| OcicryptError::io(path, e))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(OcicryptError::image(format!("{}: larger than {MAX_JSON} bytes", path.display())));
    }
    serde_json::from_slice(&bytes).map_err(|e| OcicryptError::image(format!("{}: {e}", path.display())))
}

fn read_blob_bounded(dir: &Path, digest: &Digest, max: u64) -> Result<Vec<u8>> {
    let path = blob_path(dir, digest);
    let f = File::open(&path).map_err(|e| OcicryptError::io(&path, e))?;
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes).map_err(|e| OcicryptError::io(&path, e))?;
    if bytes.len() as u64 > max {
        return Err(OcicryptError::image(format!("blob {digest} is larger than {max} bytes")));
    }
    Ok(bytes)
}

/// A destination layout being written. Blobs created by this run are removed again by
/// [`DestLayout::abandon`] (or on drop, unless [`DestLayout::commit_image`] succeeded).
///
/// `index.json` is always replaced atomically and synced. Blobs are synced only when `durable`
/// is set: like containers/image (skopeo, podman), the default leaves them to the page cache,
/// which halves the time to write a large image on a plain disk.
#[derive(Debug)]
pub struct DestLayout {
    dir: PathBuf,
    tag: Option<String>,
    durable: bool,
    created: Mutex<Vec<PathBuf>>,
    committed: bool,
}

impl DestLayout {
    /// Create (or open) the layout directory; `durable` syncs every blob before it is named.
    pub fn create(r: &ImageRef, durable: bool) -> Result<Self> {
        let blobs = r.dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|e| OcicryptError::io(&blobs, e))?;
        let marker = r.dir.join("oci-layout");
        if !marker.exists() {
            write_atomic(&r.dir, &marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Ok(Self { dir: r.dir.clone(), tag: r.tag.clone(), durable, created: Mutex::new(Vec::new()), committed: false })
    }

    /// A temporary file in the blob directory, for a blob whose digest is not known yet.
    pub fn temp_blob(&self) -> Result<NamedTempFile> {
        let blobs = self.dir.join("blobs").join("sha256");
        tempfile::Builder::new().prefix(".tmp-").tempfile_in(&blobs).map_err(|e| OcicryptError::io(&blobs, e))
    }

    /// Publish a completed temporary blob under its digest.
    pub fn publish(&self, tmp: NamedTempFile, digest: &Digest) -> Result<()> {
        let path = blob_path(&self.dir, digest);
        if path.exists() {
            return Ok(());
        }
        if self.durable {
            tmp.as_file().sync_data().map_err(|e| OcicryptError::io(tmp.path(), e))?;
        }
        tmp.persist(&path).map_err(|e| OcicryptError::io(&path, e.error))?;
        self.created.lock().unwrap_or_else(|e| e.into_inner()).push(path);
        Ok(())
    }

    /// Copy a blob unchanged from `src` (hard link when possible).
    pub fn copy_blob(&self, src: &SourceImage, digest: &Digest) -> Result<()> {
        let to = blob_path(&self.dir, digest);
        if to.exists() {
            return Ok(());
        }
        let from = src.blob_path(digest);
        if fs::hard_link(&from, &to).is_err() {
            let mut tmp = self.temp_blob()?;
            let mut f = File::open(&from).map_err(|e| OcicryptError::io(&from, e))?;
            std::io::copy(&mut f, tmp.as_file_mut()).map_err(|e| OcicryptError::io(&from, e))?;
            if self.durable {
                tmp.as_file().sync_data().map_err(|e| OcicryptError::io(tmp.path(), e))?;
            }
            tmp.persist(&to).map_err(|e| OcicryptError::io(&to, e.error))?;
        }
        self.created.lock().unwrap_or_else(|e| e.into_inner()).push(to);
        Ok(())
    }

    /// Write a small blob (a manifest) and return its digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::from_sha256(&keyward_crypto::hash::sha256(bytes));
        let mut tmp = self.temp_blob()?;
        tmp.write_all(bytes).map_err(|e| OcicryptError::io(tmp.path(), e))?;
        self.publish(tmp, &digest)?;
        Ok(digest)
    }

    /// Write a manifest or index and return its digest and size.
    pub fn put_json(&self, doc: &Map<String, Value>) -> Result<(Digest, usize)> {
        let bytes = serde_json::to_vec(doc).map_err(|e| OcicryptError::image(e.to_string()))?;
        Ok((self.put_bytes(&bytes)?, bytes.len()))
    }

    /// Point `index.json` at the image `descriptor` names (replacing an entry with the same tag).
    pub fn commit_root(mut self, mut descriptor: Map<String, Value>) -> Result<()> {
        let mut annotations = descriptor.get("annotations").and_then(Value::as_object).cloned().unwrap_or_default();
        annotations.remove(REF_NAME);
        if let Some(tag) = &self.tag {
            annotations.insert(REF_NAME.into(), Value::String(tag.clone()));
        }
        if annotations.is_empty() {
            descriptor.remove("annotations");
        } else {
            descriptor.insert("annotations".into(), Value::Object(annotations));
        }

        let index_path = self.dir.join("index.json");
        let mut index =
            if index_path.exists() { read_json(&index_path)? } else { json!({"schemaVersion": 2, "manifests": []}) };
        let manifests = index
            .get_mut("manifests")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| OcicryptError::image("destination index.json has no manifests"))?;
        let tag = self.tag.clone();
        manifests.retain(|m| {
            m.pointer("/annotations/org.opencontainers.image.ref.name").and_then(Value::as_str) != tag.as_deref()
        });
        manifests.push(Value::Object(descriptor));
        let bytes = serde_json::to_vec(&index).map_err(|e| OcicryptError::image(e.to_string()))?;
        write_atomic(&self.dir, &index_path, &bytes)?;
        self.committed = true;
        Ok(())
    }

    /// Remove every blob this run created.
    pub fn abandon(&mut self) {
        for p in self.created.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = fs::remove_file(p);
        }
    }
}

impl Drop for DestLayout {
    fn drop(&mut self) {
        if !self.committed {
            self.abandon();
        }
    }
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(|e| OcicryptError::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| OcicryptError::io(path, e))?;
    tmp.as_file().sync_data().map_err(|e| OcicryptError::io(path, e))?;
    tmp.persist(path).map_err(|e| OcicryptError::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn descriptors_and_references_never_panic(
                media in ".{0,20}",
                digest in "(sha256:)?[0-9a-f./]{0,70}",
                size in proptest::option::of(any::<i64>()),
                reference in ".{0,40}",
            ) {
                let v = json!({"mediaType": media, "digest": digest, "size": size});
                if let Ok(d) = Descriptor::from_json(&v, "t") {
                    // Accepted digests name a file directly under blobs/sha256.
                    prop_assert!(!d.digest.hex().contains('/') && !d.digest.hex().contains('.'));
                    prop_assert!(size.is_some_and(|s| s >= 0));
                }
                let _ = ImageRef::parse(&reference);
            }
        }
    }

    #[test]
    fn references() {
        assert_eq!(ImageRef::parse("oci:/tmp/x").unwrap(), ImageRef { dir: "/tmp/x".into(), tag: None });
        assert_eq!(ImageRef::parse("oci:/tmp/x:v1").unwrap().tag.as_deref(), Some("v1"));
        for bad in ["/tmp/x", "docker://x", "oci:", "oci:/x:", "oci::tag"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
