//! Conformance: this test plays the Secrets Store CSI driver's part, through a client generated
//! from the upstream proto, with attributes built exactly as the driver builds them (JSON strings
//! inside JSON, permission "420"): Version, Mount as the pod, rotation re-mounts, denial for a pod
//! of another namespace, bad parameters and file names, unknown secrets, token caching.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use tonic::Code;

const OBJECTS: &str = "
- path: payments/db
  field: password
  fileName: db/password
  mode: \"0400\"
- path: payments/db
  fileName: db.json
";

#[tokio::test]
async fn mounts_as_the_pod_with_versions_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let (_p, _task) = provider(&dir.path().join("providers"), &w.addr).await;
    let mut c = connect(&dir.path().join("providers/keyward.sock")).await;

    let v = c.version(driver::VersionRequest { version: "v1alpha1".into() }).await.unwrap().into_inner();
    assert_eq!((v.version.as_str(), v.runtime_name.as_str()), ("v1alpha1", "keyward"));
    assert!(v.runtime_version.split('.').count() == 3, "semver: {}", v.runtime_version);

    let objects =
        format!("{OBJECTS}- ciphertext: {}\n  context: {{tenant: a}}\n  fileName: dek\n", w.data_key_ciphertext);
    // The same token for both Mounts (the kubelet refreshes a projected token only near its
    // expiry): the re-mount can use the cached login.
    let same = w.attributes("payments", "api", "api-0", "uid-api-0", "payments", &objects);
    let attrs = || same.clone();
    let r = c.mount(mount_request(attrs())).await.unwrap().into_inner();
    assert!(r.error.as_ref().is_none_or(|e| e.code.is_empty()));
    assert_eq!(r.files.len(), 3);
    assert_eq!(
        (r.files[0].path.as_str(), r.files[0].mode, r.files[0].contents.as_slice()),
        ("db/password", 0o400, &b"hunter2"[..])
    );
    assert_eq!(r.files[1].mode, 420, "the volume's permission, decimal as the driver sends it");
    let whole: serde_json::Value = serde_json::from_slice(&r.files[1].contents).unwrap();
    assert_eq!(whole, serde_json::json!({"user": "app", "password": "hunter2"}));
    assert_eq!(r.files[2].contents.len(), 32, "the unwrapped data key");
    let ids: Vec<_> = r.object_version.iter().map(|o| (o.id.as_str(), o.version.as_str())).collect();
    assert_eq!(
        ids,
        [("secret/payments/db#password", "1"), ("secret/payments/db", "1"), ("data-key/dek", "payments:v1")]
    );

    // Rotation: the driver calls Mount again; the changed secret gets a new version.
    put_secret(&w.admin, "payments/db", &[("user", "app"), ("password", "correct horse")]).await;
    let r2 = c.mount(mount_request(attrs())).await.unwrap().into_inner();
    assert_eq!(r2.files[0].contents, b"correct horse");
    let v2: Vec<_> = r2.object_version.iter().map(|o| o.version.as_str()).collect();
    assert_eq!(v2, ["2", "2", "payments:v1"]);

    // The pod logged in once; the re-mount used its cached Keyward token.
    let logins = w.server_audit(dir.path()).into_iter().filter(|r| r["operation"] == "login").count();
    assert_eq!(logins, 1);
    // Its reads were made as the pod's ServiceAccount, not as some provider identity.
    let reads: Vec<_> = w
        .server_audit(dir.path())
        .into_iter()
        .filter(|r| r["path"] == "/v1/secrets/data/payments/db" && r["operation"] == "read")
        .collect();
    assert!(
        !reads.is_empty() && reads.iter().all(|r| r["identity"].as_str().unwrap().contains("payments/api")),
        "{reads:?}"
    );
}

#[tokio::test]
async fn a_pod_gets_only_what_its_own_identity_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let (_p, _task) = provider(&dir.path().join("providers"), &w.addr).await;
    let mut c = connect(&dir.path().join("providers/keyward.sock")).await;
    let err = |r: Result<tonic::Response<driver::MountResponse>, tonic::Status>| r.unwrap_err();

    // A team-b pod naming the payments role: the role is bound to another namespace.
    let e = err(c.mount(mount_request(w.attributes("team-b", "worker", "w-0", "uid-w-0", "payments", OBJECTS))).await);
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().starts_with("PermissionDenied: logging in as team-b/worker with role payments"),
        "{}",
        e.message()
    );
    // With its own role, asking for payments secrets: denied by policy.
    let e = err(c.mount(mount_request(w.attributes("team-b", "worker", "w-0", "uid-w-0", "team-b", OBJECTS))).await);
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("PermissionDenied: secret payments/db"), "{}", e.message());
    // Its own secret works.
    let own = "- path: team-b/db\n  field: password\n  fileName: password\n";
    let r = c.mount(mount_request(w.attributes("team-b", "worker", "w-0", "uid-w-0", "team-b", own))).await.unwrap();
    assert_eq!(r.into_inner().files[0].contents, b"other");

    // Both refusals are in the provider's audit log, with the pod and the reason.
    let denied: Vec<_> =
        read_audit(&dir.path().join("providers/audit.log")).into_iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert!(denied.iter().all(|r| r["identity"] == "k8s:team-b/worker pod w-0"));
}

#[tokio::test]
async fn bad_requests_get_clear_codes() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let (_p, _task) = provider(&dir.path().join("providers"), &w.addr).await;
    let mut c = connect(&dir.path().join("providers/keyward.sock")).await;
    let attrs = |objects: &str| w.attributes("payments", "api", "api-0", "uid-api-0", "payments", objects);
    let cases: Vec<(driver::MountRequest, Code, &str)> = vec![
        (
            mount_request(attrs("- path: payments/db\n  fileName: ../../etc/passwd\n")),
            Code::InvalidArgument,
            "InvalidFileName",
        ),
        (mount_request(attrs("- path: payments/db\n  fileName: /abs\n")), Code::InvalidArgument, "InvalidFileName"),
        (mount_request(attrs("- path: payments/db\n  fileName: ..data\n")), Code::InvalidArgument, "InvalidFileName"),
        (mount_request(attrs("- path: [unclosed\n")), Code::InvalidArgument, "InvalidParameters"),
        (mount_request(attrs("- path: payments/nope\n  fileName: x\n")), Code::NotFound, "NotFound"),
        (mount_request(attrs("- path: payments/db\n  field: nope\n  fileName: x\n")), Code::NotFound, "NotFound"),
        (mount_request("not json".into()), Code::InvalidArgument, "InvalidRequest"),
        (
            driver::MountRequest { permission: "0644".into(), ..mount_request(attrs(OBJECTS)) },
            Code::InvalidArgument,
            "InvalidRequest",
        ),
    ];
    for (req, code, label) in cases {
        let e = c.mount(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{label}: {e:?}");
        assert!(e.message().starts_with(&format!("{label}: ")), "{}", e.message());
        let details = <driver::MountResponse as prost::Message>::decode(e.details()).unwrap();
        assert_eq!(details.error.unwrap().code, label, "the code is in the details too");
    }
    // No tokens: the CSIDriver lacks tokenRequests.
    let mut v: serde_json::Value = serde_json::from_str(&attrs(OBJECTS)).unwrap();
    v.as_object_mut().unwrap().remove("csi.storage.k8s.io/serviceAccount.tokens");
    let e = c.mount(mount_request(v.to_string())).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("tokenRequests"), "{}", e.message());
    // A Keyward address the provider was not told to trust with pod tokens.
    v["keywardAddress"] = "https://attacker.example".into();
    v["csi.storage.k8s.io/serviceAccount.tokens"] =
        serde_json::json!({AUDIENCE: {"token": w.pod_token("payments", "api", "api-0", "uid-api-0")}})
            .to_string()
            .into();
    let e = c.mount(mount_request(v.to_string())).await.unwrap_err();
    assert!(e.message().starts_with("AddressNotAllowed: "), "{}", e.message());
    // Over the response limit.
    let big = "x".repeat(100_000);
    put_secret(&w.admin, "payments/big", &[("v", &big)]).await;
    let objects: String = (0..32).map(|i| format!("- path: payments/big\n  fileName: big{i}\n")).collect();
    let e = c.mount(mount_request(attrs(&objects))).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // The provider still serves good requests.
    assert!(c.mount(mount_request(attrs(OBJECTS))).await.is_ok());
}

/// Attacks on the pod's identity, with attributes as the driver sends them and tokens minted by
/// the test issuer for matching and mismatching pods:
/// 1. a pod in `team-b` carries a stolen token of `payments/api` (here in its attributes, as a
///    copied token would reach them) and names the `payments` role: the token's identity is
///    not the Mount's pod, refused `TokenPodMismatch`, audited with both identities;
/// 2. the same stolen token put in the volume's nodePublishSecretRef (`secrets`, chosen by the
///    pod's author), with the pod's own token in the attribute: the attribute's is used, so the
///    pod gets only its own secrets;
/// 3. a Mount repeating the attributes of an earlier successful one, with the token
///    `not-a-jwt`: a cached login answers only for the token it was made with, so it is
///    refused.
#[tokio::test]
async fn a_pod_can_mount_only_with_its_own_token() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let (_p, _task) = provider(&dir.path().join("providers"), &w.addr).await;
    let mut c = connect(&dir.path().join("providers/keyward.sock")).await;
    let stolen = w.pod_token("payments", "api", "api-0", "uid-api-0");
    let with_token = |attrs: String, token: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&attrs).unwrap();
        v["csi.storage.k8s.io/serviceAccount.tokens"] =
            serde_json::json!({AUDIENCE: {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}})
                .to_string()
                .into();
        v.to_string()
    };

    // 1. The stolen token in another namespace's Mount.
    let theirs = w.attributes("team-b", "worker", "w-0", "uid-w-0", "payments", OBJECTS);
    let e = c.mount(mount_request(with_token(theirs.clone(), &stolen))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("TokenPodMismatch: "), "{}", e.message());
    assert!(!format!("{e:?}").contains("hunter2"));
    // ...and in a Mount of the same ServiceAccount's other pod.
    let sibling = w.attributes("payments", "api", "api-1", "uid-api-1", "payments", OBJECTS);
    let e = c.mount(mount_request(with_token(sibling, &stolen))).await.unwrap_err();
    assert!(e.message().starts_with("TokenPodMismatch: "), "{}", e.message());

    // 2. The stolen token in `secrets`, the pod's own in the attribute.
    let own = "- path: team-b/db\n  field: password\n  fileName: password\n";
    let mut req = mount_request(w.attributes("team-b", "worker", "w-0", "uid-w-0", "team-b", own));
    req.secrets = serde_json::json!({"csi.storage.k8s.io/serviceAccount.tokens":
        serde_json::json!({AUDIENCE: {"token": stolen}}).to_string()})
    .to_string();
    let r = c.mount(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.files[0].contents, b"other", "the pod's own token was used");
    let mut payments = req.clone();
    payments.attributes = w.attributes("team-b", "worker", "w-0", "uid-w-0", "payments", OBJECTS);
    let e = c.mount(payments).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // 3. A cached login is not an answer for another token.
    let good = w.attributes("payments", "api", "api-0", "uid-api-0", "payments", OBJECTS);
    assert!(c.mount(mount_request(good.clone())).await.is_ok(), "control: the pod's own Mount");
    let e = c.mount(mount_request(with_token(good.clone(), "not-a-jwt"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(c.mount(mount_request(good)).await.is_ok(), "and the pod's own token still works");

    // The refusals are audited with the reason naming both identities.
    let denied: Vec<_> =
        read_audit(&dir.path().join("providers/audit.log")).into_iter().filter(|r| r["decision"] == "deny").collect();
    let mismatch = denied.iter().find(|r| r["error"] == "TokenPodMismatch").expect("audited");
    assert_eq!(mismatch["identity"], "k8s:team-b/worker pod w-0", "{mismatch}");
    let reason = mismatch["reason"].as_str().unwrap();
    assert!(reason.contains("payments/api") && reason.contains("team-b/worker"), "{reason}");
    assert!(denied.iter().all(|r| r["client"].as_str().is_some_and(|c| c.starts_with("unix:pid="))), "{denied:?}");
}
