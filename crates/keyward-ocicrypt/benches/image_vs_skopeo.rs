//! Image decryption, Keyward against skopeo (Go ocicrypt), side by side on the same images and
//! the same machine, in one run.
//!
//! Images: one incompressible layer of KEYWARD_BENCH_LAYER_MIB MiB (default 512), and ten layers
//! of a tenth of that each. Each image is encrypted once for 1 recipient and once for 10 (RSA-2048
//! and EC P-256 keys made by openssl; the key used to decrypt is the last recipient, the worst
//! case for trial decryption). Every decryption writes a fresh OCI layout; the median of
//! KEYWARD_BENCH_RUNS runs (default 3) is reported, with MB/s of layer data and the ratio.
//! Keyward runs in this process, so its peak memory is this process's VmHWM (reported; the
//! image data is generated in 1 MiB pieces, never held whole).
//!
//! Run: `cargo bench -p keyward-ocicrypt --bench image_vs_skopeo` (needs skopeo and openssl).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyward_ocicrypt::{DecryptOptions, ImageRef, PrivateKey, PublicKey, decrypt_image};
use keyward_test_support::oci::*;
use serde_json::json;

/// Write a layout with uncompressed layers of noise, streamed to disk 1 MiB at a time.
fn big_image(dir: &Path, layer_sizes: &[u64]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut descs = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let tmp = blobs.join("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
        let mut sha = keyward_crypto::hash::Sha256Stream::default();
        let mut left = *size;
        let mut seed = i as u64 * 7919 + 1;
        while left > 0 {
            let n = left.min(1 << 20);
            let chunk = noise(n as usize, seed);
            seed += 1;
            sha.update(&chunk);
            f.write_all(&chunk).unwrap();
            left -= n;
        }
        f.flush().unwrap();
        drop(f);
        let hex = hex::encode(sha.finish());
        std::fs::rename(&tmp, blobs.join(&hex)).unwrap();
        descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{hex}"), "size": size}));
    }
    let diff_ids: Vec<_> = descs.iter().map(|d| d["digest"].clone()).collect();
    let config = serde_json::to_vec(
        &json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}),
    )
    .unwrap();
    let config_digest = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let md = put_blob(dir, &manifest);
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn oci(dir: &Path) -> String {
    format!("oci:{}:v1", dir.display())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let layer_mib: u64 = std::env::var("KEYWARD_BENCH_LAYER_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(512);
    let runs: usize = std::env::var("KEYWARD_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    // Under target/, on disk like a real image store (not tmpfs).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/tmp");
    std::fs::create_dir_all(&root).unwrap();
    let tmp = tempfile::tempdir_in(&root).unwrap();
    let t = tmp.path();
    let skopeo = Skopeo::new(t);

    let mut keys = Vec::new();
    for i in 0..10 {
        keys.push(openssl_key(t, &format!("k{i}"), if i % 2 == 0 { "rsa2048" } else { "p256" }));
    }
    let publics: Vec<PublicKey> =
        keys.iter().map(|(_, p)| PublicKey::from_bytes(&std::fs::read(p).unwrap(), "pub").unwrap()).collect();

    let total = layer_mib << 20;
    let images = [("1 layer", vec![total]), ("10 layers", vec![total / 10; 10])];
    println!(
        "Image decryption, Keyward vs skopeo {} ({} CPUs), median of {runs} runs, layer data {} MiB",
        run(std::process::Command::new("skopeo").arg("--version")).trim().trim_start_matches("skopeo version "),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        layer_mib
    );
    println!(
        "{:<11} {:>10} {:>14} {:>14} {:>8} {:>16}",
        "image", "recipients", "skopeo MB/s", "keyward MB/s", "ratio", "keyward unwraps"
    );
    for (name, sizes) in &images {
        let src = t.join(format!("src-{}", sizes.len()));
        big_image(&src, sizes);
        let bytes: u64 = sizes.iter().sum();
        for recipients in [1usize, 10] {
            // The decrypting key is the last recipient.
            let chosen = &publics[10 - recipients..];
            let enc = t.join(format!("enc-{}-{recipients}", sizes.len()));
            let t0 = Instant::now();
            encrypt_to(&oci(&src), &oci(&enc), chosen, &[]).unwrap();
            let enc_time = t0.elapsed();
            let (key_path, _) = &keys[9];
            let mut sk = Vec::new();
            let mut kw = Vec::new();
            let mut unwraps = 0;
            for r in 0..runs {
                let out = t.join(format!("out-sk-{r}"));
                let t0 = Instant::now();
                let (ok, err) =
                    skopeo.copy(&["--decryption-key".into(), key_path.display().to_string()], &oci(&enc), &oci(&out));
                sk.push(t0.elapsed());
                assert!(ok, "skopeo: {err}");
                std::fs::remove_dir_all(&out).unwrap();

                let out = t.join(format!("out-kw-{r}"));
                let t0 = Instant::now();
                // Keys are read and parsed as part of the timed work, as the CLI does.
                let key = PrivateKey::from_bytes(&std::fs::read(key_path).unwrap(), "key").unwrap();
                let report = decrypt_image(
                    &ImageRef::parse(&oci(&enc)).unwrap(),
                    &ImageRef::parse(&oci(&out)).unwrap(),
                    &DecryptOptions { keys: &[key], providers: &[], parallelism: 0, durable: false, progress: None },
                )
                .unwrap();
                kw.push(t0.elapsed());
                unwraps = report.unwrap_attempts.unwrap_or(0);
                std::fs::remove_dir_all(&out).unwrap();
            }
            let mbs = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
            let (s, k) = (median(sk), median(kw));
            println!(
                "{:<11} {:>10} {:>14.1} {:>14.1} {:>7.1}x {:>16}   (keyward encrypt {:.1} MB/s)",
                name,
                recipients,
                mbs(s),
                mbs(k),
                s.as_secs_f64() / k.as_secs_f64(),
                unwraps,
                mbs(enc_time)
            );
            std::fs::remove_dir_all(&enc).unwrap();
        }
        std::fs::remove_dir_all(&src).unwrap();
    }
    println!("keyward peak memory (VmHWM of this process, which also generated the images): {:.1} MiB", vm_hwm_mib());
}
