//! Storage: objects written to a real etcd exactly as kube-apiserver writes them with KMS v2
//! (`k8s:enc:kms:v2:<name>:` + EncryptedObject; seed mode: DEK = HKDF-SHA256-Expand(seed, info),
//! AES-256-GCM with the etcd key as associated data), read back with etcdctl and decrypted
//! through the plugin, including after a key rotation and a plugin restart. The DEK derivation
//! and GCM here use aws-lc-rs directly, not Keyward's code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_lc_rs::{aead, hkdf};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use keyward_kms_plugin::kek;
use prost::Message;

mod storage {
    //! The apiserver's EncryptedObject, generated from `proto/k8s/apiserver/kmsv2/api.proto`.
    #![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
    include!("gen/storage_v2.rs");
}

const PROVIDER: &str = "keyward";

struct Etcd {
    child: Child,
    endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_etcd(dir: &Path) -> Etcd {
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "kms-test", "--data-dir"])
        .arg(dir)
        .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("kms-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is needed by this test (apt-get install etcd-server)");
    let etcd = Etcd { child, endpoint };
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{}/health", etcd.endpoint)).send().await
            && r.text().await.unwrap_or_default().contains("\"true\"")
        {
            return etcd;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("etcd did not become healthy at {}", etcd.endpoint);
}

/// Put raw bytes (etcd's v3 JSON gateway; binary-safe).
async fn put(etcd: &Etcd, key: &str, value: &[u8]) {
    let body = serde_json::json!({"key": B64.encode(key), "value": B64.encode(value)});
    let r = reqwest::Client::new()
        .post(format!("{}/v3/kv/put", etcd.endpoint))
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "etcd put: {}", r.status());
}

/// Get raw bytes with etcdctl, as an operator checking encryption at rest would.
fn etcdctl_get(etcd: &Etcd, key: &str) -> Vec<u8> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint, "get", key, "-w", "json"])
        .output()
        .expect("etcdctl is needed by this test (apt-get install etcd-client)");
    assert!(out.status.success(), "etcdctl: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    B64.decode(v["kvs"][0]["value"].as_str().expect("key present")).unwrap()
}

fn dek(seed: &[u8], info: &[u8]) -> [u8; 32] {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, seed);
    let mut out = [0u8; 32];
    prk.expand(&[info], hkdf::HKDF_SHA256).unwrap().fill(&mut out).unwrap();
    out
}

fn gcm(key: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).unwrap())
}

/// What the apiserver stores for `object` at `etcd_key`, given the seed and Encrypt's answer.
fn apiserver_value(etcd_key: &str, object: &[u8], seed: &[u8], enc: &apiserver::EncryptResponse) -> Vec<u8> {
    let info = seed_bytes(32);
    let nonce = seed_bytes(12);
    let mut sealed = object.to_vec();
    gcm(&dek(seed, &info))
        .seal_in_place_append_tag(
            aead::Nonce::try_assume_unique_for_key(&nonce).unwrap(),
            aead::Aad::from(etcd_key.as_bytes()),
            &mut sealed,
        )
        .unwrap();
    let mut data = info;
    data.extend_from_slice(&nonce);
    data.extend_from_slice(&sealed);
    let obj = storage::EncryptedObject {
        encrypted_data: data,
        key_id: enc.key_id.clone(),
        encrypted_dek_source: enc.ciphertext.clone(),
        annotations: enc.annotations.clone(),
        encrypted_dek_source_type: storage::EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32,
    };
    let mut value = format!("k8s:enc:kms:v2:{PROVIDER}:").into_bytes();
    value.extend(obj.encode_to_vec());
    value
}

fn seed_bytes(n: usize) -> Vec<u8> {
    keyward_crypto::SecretBytes::random(n).unwrap().expose().to_vec()
}

/// Read an object back as the apiserver does: prefix, EncryptedObject, Decrypt of the seed
/// through the plugin, HKDF, GCM with the etcd key.
async fn apiserver_read(
    etcd: &Etcd,
    c: &mut KeyManagementServiceClient<tonic::transport::Channel>,
    etcd_key: &str,
    aad_key: &str,
) -> Option<Vec<u8>> {
    let value = etcdctl_get(etcd, etcd_key);
    let prefix = format!("k8s:enc:kms:v2:{PROVIDER}:");
    let body = value.strip_prefix(prefix.as_bytes()).expect("stored with the KMS v2 prefix");
    let obj = storage::EncryptedObject::decode(body).unwrap();
    assert_eq!(obj.encrypted_dek_source_type, storage::EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32);
    let seed = c
        .decrypt(apiserver::DecryptRequest {
            ciphertext: obj.encrypted_dek_source.clone(),
            uid: uuid(),
            key_id: obj.key_id.clone(),
            annotations: obj.annotations.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    let (info, rest) = obj.encrypted_data.split_at(32);
    let (nonce, sealed) = rest.split_at(12);
    let mut buf = sealed.to_vec();
    gcm(&dek(&seed, info))
        .open_in_place(
            aead::Nonce::try_assume_unique_for_key(nonce).unwrap(),
            aead::Aad::from(aad_key.as_bytes()),
            &mut buf,
        )
        .ok()
        .map(|pt| pt.to_vec())
}

#[tokio::test]
async fn apiserver_objects_in_etcd_survive_rotation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd(&dir.path().join("etcd")).await;
    let data = dir.path().join("kms");
    let socket = dir.path().join("kms.sock");
    let served = local(&data, &socket).await;
    let mut c = connect(&socket).await;

    // Before rotation: one seed (one DEK generation), several objects.
    let k1 = status(&mut c).await.key_id;
    let seed1 = seed();
    let enc1 = encrypt(&mut c, &seed1).await;
    assert_eq!(enc1.key_id, k1);
    let mut written = Vec::new();
    for i in 0..3 {
        let key = format!("/registry/secrets/default/s{i}");
        let object = format!("{{\"kind\":\"Secret\",\"data\":{{\"password\":\"hunter{i}\"}}}}").into_bytes();
        put(&etcd, &key, &apiserver_value(&key, &object, &seed1, &enc1)).await;
        written.push((key, object, k1.clone()));
    }

    // Rotation, then a write under the new key_id.
    kek::Local::rotate(&data, keyward_store::SqliteStore::open_shared, "k8s-secrets").await.unwrap();
    let k2 = wait_new_key_id(&mut c, &k1).await;
    let seed2 = seed();
    let enc2 = encrypt(&mut c, &seed2).await;
    assert_eq!(enc2.key_id, k2);
    let key = "/registry/secrets/payments/db".to_string();
    let object = b"{\"kind\":\"Secret\",\"data\":{\"password\":\"rotated\"}}".to_vec();
    put(&etcd, &key, &apiserver_value(&key, &object, &seed2, &enc2)).await;
    written.push((key, object, k2.clone()));

    // Plugin restart.
    drop(c);
    served.stop().await;
    let served = local(&data, &socket).await;
    let mut c = connect(&socket).await;
    assert_eq!(status(&mut c).await.key_id, k2);

    for (key, object, key_id) in &written {
        let raw = etcdctl_get(&etcd, key);
        assert!(!raw.windows(6).any(|w| w == b"hunter"), "no plaintext at rest");
        let obj = storage::EncryptedObject::decode(&raw[format!("k8s:enc:kms:v2:{PROVIDER}:").len()..]).unwrap();
        assert_eq!(&obj.key_id, key_id);
        assert_eq!(apiserver_read(&etcd, &mut c, key, key).await.as_deref(), Some(object.as_slice()), "{key}");
        // The etcd key is bound: the same value read as another object does not open.
        assert_eq!(apiserver_read(&etcd, &mut c, key, "/registry/secrets/default/other").await, None);
    }
    served.stop().await;
}
