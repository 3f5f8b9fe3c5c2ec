//! The audit log on a real server: every request leaves a record before its response, denied
//! requests say why, no secret reaches the log, the chain verifies, and a sink that cannot be
//! written makes every request fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use base64::Engine;
use keyward_server::{AuditSettings, ServerConfig, start};
use keyward_test_support::server::{TestServer, raw};

#[tokio::test]
async fn every_request_is_audited_without_secrets_and_the_chain_verifies() {
    let s = TestServer::start().await;
    let c = s.client();
    c.create_key("k", "aes256-gcm", "", None).await.unwrap();
    let ctx = BTreeMap::from([("layer".to_string(), "sha256:abc".to_string())]);
    let ct = c.encrypt("k", b"PLAINTEXT-MARKER-91", &ctx).await.unwrap();
    c.put_secret("a/b", &BTreeMap::from([("v".to_string(), "SECRET-MARKER-77".to_string())]), None).await.unwrap();
    let (st, _, rid_denied) = raw(&s.addr, "GET", "/v1/keys", Some("kwt_forged"), None, vec![]).await;
    assert_eq!(st, 401);
    let bad = c.decrypt(&ct.ciphertext[..30], &BTreeMap::new()).await.unwrap_err();
    assert_eq!(bad.status(), Some(400));
    s.anonymous().health().await.unwrap();

    let file = s.dir.path().join("data/audit.log");
    let text = keyward_test_support::audit_text(&file);
    assert!(!text.contains("PLAINTEXT-MARKER"), "plaintext in audit log");
    assert!(!text.contains("SECRET-MARKER"), "secret value in audit log");
    assert!(!text.contains(&s.token), "token in audit log");
    assert!(!text.contains("kwt_forged"), "presented token in audit log");
    assert!(!text.contains("/v1/health"), "health checks are not audited");
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs[0]["chain"], "begins", "the log opens with the chain's first record");
    assert_eq!(recs[1]["operation"], "system", "server start is recorded");
    let recs = recs[2..].to_vec();
    assert_eq!(recs.len(), 5, "create, encrypt, put, denied list, failed decrypt");
    let denied = recs.iter().find(|r| r["request_id"].as_str() == rid_denied.as_deref()).unwrap();
    assert_eq!(denied["status"], 401);
    assert_eq!(denied["identity"], "anonymous");
    assert_eq!(denied["reason"], "unknown or revoked token", "the audit record says which token failure");
    let enc = &recs[1];
    assert_eq!(
        (enc["operation"].as_str(), enc["resource"].as_str(), enc["decision"].as_str()),
        (Some("encrypt"), Some("keys/k"), Some("allow"))
    );
    assert!(enc["identity"].as_str().unwrap().starts_with("acc_"));
    assert_eq!(enc["context"], serde_json::json!({"layer": "sha256:abc"}), "the encryption context is recorded");
    assert!(recs[2].get("context").is_none(), "no context field on other requests");
    assert_eq!(recs[4]["error"], "decryption_failed");

    // The chain verifies with the key and head the server reports, and the report's own request
    // is itself audited before its response.
    let info = c.request(keyward_client::Method::GET, "/v1/sys/audit", None).await.unwrap();
    let key = base64::engine::general_purpose::STANDARD.decode(info["key"].as_str().unwrap()).unwrap();
    let head = keyward_server::audit::Head {
        seq: info["head"]["seq"].as_u64().unwrap(),
        hmac: info["head"]["hmac"].as_str().unwrap().to_string(),
    };
    assert_eq!(head.seq, 7);
    let r = keyward_server::audit::verify_files(&key, std::slice::from_ref(&file), Some(&head)).unwrap();
    assert_eq!(r.last_seq, 8, "the sys/audit request was recorded too");
}

#[tokio::test]
async fn unwritable_audit_sink_refuses_start_and_fails_requests_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        audit: AuditSettings { file: Some("/dev/full".into()), ..Default::default() },
        ..keyward_test_support::server::dev_config(dir.path())
    };
    let e = start(cfg).await.unwrap_err();
    assert!(e.to_string().contains("audit"), "a server whose audit sink cannot write does not start: {e}");

    // At run time: the audit file is replaced by something that cannot be written.
    let s = TestServer::start().await;
    let c = s.client();
    c.create_key("k", "aes256-gcm", "", None).await.unwrap();
    let file = s.dir.path().join("data/audit.log");
    std::fs::rename(&file, s.dir.path().join("data/audit.log.moved")).unwrap();
    std::fs::create_dir(&file).unwrap();
    let e = c.encrypt("k", b"x", &BTreeMap::new()).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("audit_unavailable")));
    // While broken, nothing runs: a key created now would be partial state.
    let e = c.create_key("k2", "aes256-gcm", "", None).await.unwrap_err();
    assert_eq!(e.code(), Some("audit_unavailable"));
    // Fixed: requests flow again, and k2 was never created.
    std::fs::remove_dir(&file).unwrap();
    let mut recovered = false;
    for _ in 0..3 {
        if c.describe_key("k").await.is_ok() {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "recovers once the file can be written");
    assert_eq!(c.describe_key("k2").await.unwrap_err().status(), Some(404));
    c.encrypt("k", b"x", &BTreeMap::new()).await.unwrap();
}

/// The store keeps an anchor of the audit log (its last record, refreshed every second), so
/// records removed from the end while the server was stopped are found at the next start, which
/// refuses to continue the chain. A log whose files were all moved away starts a new chain whose
/// first records say where the old one ended.
#[tokio::test]
async fn records_removed_from_the_end_while_stopped_are_found_at_start() {
    let mut s = TestServer::start().await;
    let c = s.client();
    for i in 0..4 {
        c.create_key(&format!("k{i}"), "aes256-gcm", "", None).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await; // anchored
    s.running.take().unwrap().shutdown().await.unwrap();
    let file = s.dir.path().join("data/audit.log");
    let records = keyward_test_support::audit_text(&file);
    let lines: Vec<&str> = records.lines().collect();
    assert!(lines.len() >= 5, "{records}");

    // The last two records removed: the server refuses to start, and says why.
    let kept = lines[..lines.len() - 2].join("\n") + "\n";
    std::fs::write(&file, &kept).unwrap();
    let e = start(keyward_test_support::server::dev_config(s.dir.path())).await.unwrap_err().to_string();
    assert!(e.contains("records were removed from the end"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), kept, "the damaged file is left as it was");

    // Moved away whole: a new chain starts, and says where the old one ended.
    std::fs::rename(&file, s.dir.path().join("data/damaged-audit.log")).unwrap();
    let s = TestServer::start_in(s.dir).await;
    let fresh = keyward_test_support::audit_text(&file);
    let first: Vec<serde_json::Value> = fresh.lines().take(3).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((first[0]["seq"].as_u64(), first[0]["chain"].as_str()), (Some(1), Some("begins")));
    let said = first[2]["reason"].as_str().unwrap();
    assert!(said.contains(&format!("reached record {}", lines.len())), "{said}");
    s.client().describe_key("k0").await.unwrap();
}

/// Every cut of the audit log, on a real file with real server restarts: records removed from
/// the start or the middle, or reordered, make the next start refuse to continue the log (the
/// whole current file is verified at unseal); a file moved away while the server runs leaves a
/// new file whose first record says where the chain was, and verification reports the gap.
#[tokio::test]
async fn every_cut_of_the_audit_log_is_found() {
    let mut s = TestServer::start().await;
    let c = s.client();
    for i in 0..5 {
        c.create_key(&format!("k{i}"), "aes256-gcm", "", None).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await; // anchored
    s.running.take().unwrap().shutdown().await.unwrap();
    let file = s.dir.path().join("data/audit.log");
    let original = keyward_test_support::audit_text(&file);
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() >= 7, "{original}");
    let cuts: Vec<(&str, Vec<&str>, &str)> = vec![
        ("start", lines[2..].to_vec(), "does not begin a chain"),
        ("middle", [&lines[..3], &lines[4..]].concat(), "deleted or reordered"),
        ("reorder", [&lines[..3], &[lines[4], lines[3]], &lines[5..]].concat(), "deleted or reordered"),
    ];
    for (what, kept, says) in cuts {
        std::fs::write(&file, kept.join("\n") + "\n").unwrap();
        let e = start(keyward_test_support::server::dev_config(s.dir.path())).await.unwrap_err().to_string();
        assert!(e.contains(says), "{what}: {e}");
    }
    std::fs::write(&file, &original).unwrap();

    // Moved away while the server runs: the next record opens a new file that says so.
    let s = TestServer::start_in(s.dir).await;
    let c = s.client();
    c.create_key("before-move", "aes256-gcm", "", None).await.unwrap();
    let moved = s.dir.path().join("data/moved.log");
    std::fs::rename(&file, &moved).unwrap();
    c.create_key("after-move", "aes256-gcm", "", None).await.unwrap();
    let info = c.request(keyward_client::Method::GET, "/v1/sys/audit", None).await.unwrap();
    let key = base64::engine::general_purpose::STANDARD.decode(info["key"].as_str().unwrap()).unwrap();
    let head = keyward_server::audit::Head {
        seq: info["head"]["seq"].as_u64().unwrap(),
        hmac: info["head"]["hmac"].as_str().unwrap().to_string(),
    };
    let alone = keyward_server::audit::verify_files(&key, std::slice::from_ref(&file), Some(&head)).unwrap();
    assert!(alone.continues_after.is_some(), "{alone:?}");
    assert!(alone.note.as_deref().unwrap().contains("moved away"), "{alone:?}");
    let both = keyward_server::audit::verify_files(&key, &[moved, file.clone()], Some(&head)).unwrap();
    assert_eq!((both.continues_after, both.gaps.len()), (None, 1), "{both:?}");
}
