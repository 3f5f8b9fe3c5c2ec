//! The served OpenAPI document matches the real routes, in both directions, and every
//! documented operation is answered by a handler (not the 404/405 fallbacks).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use keyward_test_support::server::{TestServer, raw};

fn normalise(path: &str) -> String {
    path.replace("{*", "{")
}

#[tokio::test]
async fn openapi_matches_routes() {
    let doc: serde_json::Value = serde_json::from_str(keyward_server::api::OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            assert!(op["responses"].is_object(), "{method} {path} documents its responses");
            documented.insert((method.clone(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> =
        keyward_server::api::route_table().into_iter().map(|(m, p, _, _)| (m.to_string(), normalise(p))).collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes missing from openapi.json: {undocumented:?}");
    assert!(unrouted.is_empty(), "documented but not routed: {unrouted:?}");

    // Anonymous operations are exactly the anonymous routes.
    for (m, p, anonymous, _) in keyward_server::api::route_table() {
        let op = &doc["paths"][normalise(p)][m];
        let doc_anon = op["security"].as_array().is_some_and(|s| s.is_empty());
        assert_eq!(doc_anon, anonymous, "{m} {p}: security in the document matches the router");
    }

    // Live: each documented operation reaches a handler.
    let s = TestServer::start().await;
    let served = raw(&s.addr, "GET", "/v1/openapi.json", Some(&s.token), None, vec![]).await;
    assert_eq!(served.0, 200);
    assert_eq!(served.1, doc, "the server serves this document");
    for (method, path) in &documented {
        let concrete = path.replace("{name}", "nokey").replace("{path}", "no/secret");
        let (st, body, _) =
            raw(&s.addr, &method.to_uppercase(), &concrete, Some(&s.token), Some("application/json"), b"{}".to_vec())
                .await;
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(code != "no_such_route" && code != "method_not_allowed", "{method} {path} -> {st} {code}");
    }
}

/// Every error code the document lists has a kind in the client (so adapters map it onto their
/// protocol's codes by meaning), and every code the server's source can answer is listed.
#[test]
fn every_error_code_is_documented_and_has_a_kind() {
    let doc: serde_json::Value = serde_json::from_str(keyward_server::api::OPENAPI).unwrap();
    let listed: BTreeSet<String> =
        doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .expect("the Error schema lists its codes")
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
    for code in &listed {
        assert!(keyward_client::ErrorKind::of_code(code).is_some(), "the client has no kind for {code:?}");
    }
    // Codes as the source writes them: `StatusCode::X, "code"` and `code: "code"`.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    let mut found = BTreeSet::new();
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
        for (i, _) in text.match_indices("StatusCode::") {
            let rest = &text[i..];
            let Some(after) = rest.find(", \"").filter(|&a| !rest[..a].contains(')')) else { continue };
            let code: String = rest[after + 3..].chars().take_while(|c| *c != '"').collect();
            if code.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !code.is_empty() {
                found.insert(code);
            }
        }
        for (i, _) in text.match_indices("code: \"") {
            found.insert(text[i + 7..].chars().take_while(|c| *c != '"').collect());
        }
    }
    // The service's own codes.
    use keyward_core::KmsError;
    for e in [
        KmsError::Unauthenticated(keyward_core::error::AuthFailure::Missing),
        KmsError::PermissionDenied(String::new()),
        KmsError::InvalidArgument(String::new()),
        KmsError::DecryptionFailed,
        KmsError::Conflict(String::new()),
        KmsError::KeyDisabled(String::new()),
        KmsError::KeyPendingDeletion(String::new()),
        KmsError::Internal(String::new()),
    ] {
        found.insert(e.code().to_string());
    }
    assert!(found.len() > 20, "the scan found the server's codes: {found:?}");
    let missing: Vec<_> = found.difference(&listed).collect();
    assert!(missing.is_empty(), "codes the server answers but openapi.json does not list: {missing:?}");
}
