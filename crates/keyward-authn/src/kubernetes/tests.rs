//! Unit tests of ServiceAccount token verification and its configuration.

use super::*;

fn cfg(jwks: &str) -> Config {
    Config {
        issuer: "https://kubernetes.default.svc.cluster.local".into(),
        audience: "keyward".into(),
        jwks: JwksSource::Static(jwks.into()),
        ca_pem: None,
        leeway_secs: 30,
        token_review_url: None,
        token_reviewer_secret: None,
    }
}

#[test]
fn config_validation() {
    let good = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a","use":"sig","alg":"ES256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
    assert!(cfg(good).validate().is_ok());
    // TokenReview: an https URL and a PATH#FIELD secret, both or neither.
    let review = |url: Option<&str>, secret: Option<&str>| {
        let mut c = cfg(good);
        c.token_review_url = url.map(str::to_string);
        c.token_reviewer_secret = secret.map(str::to_string);
        c.validate().is_ok()
    };
    assert!(review(Some("https://10.0.0.1:6443"), Some("kubernetes/reviewer#token")));
    assert!(!review(Some("https://10.0.0.1:6443"), None));
    assert!(!review(None, Some("kubernetes/reviewer#token")));
    assert!(!review(Some("http://10.0.0.1:6443"), Some("kubernetes/reviewer#token")));
    for bad in ["kubernetes/reviewer", "#token", "kubernetes/reviewer#", "a#b#c"] {
        assert!(!review(Some("https://10.0.0.1:6443"), Some(bad)), "{bad}");
    }
    let mut c = cfg(good);
    c.issuer = "http://insecure".into();
    assert!(c.validate().is_err());
    c.issuer = "https://x?y=1".into();
    assert!(c.validate().is_err());
    // An HMAC key is never a usable "public" key.
    assert!(cfg(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#).validate().is_err());
    assert!(cfg("not json").validate().is_err());
    let mut c = cfg(good);
    c.jwks = JwksSource::Url("http://plain/jwks".into());
    assert!(c.validate().is_err());
}

#[test]
fn role_binding_rules() {
    let role = Role {
        bound_namespaces: vec!["payments".into()],
        bound_service_accounts: vec!["api".into(), "worker".into()],
        policies: vec!["p".into()],
        ttl_secs: 600,
        max_ttl_secs: None,
        allow_unbound_tokens: false,
    };
    assert!(role.validate().is_ok());
    assert_eq!(role.max_ttl(), DEFAULT_ROLE_MAX_TTL_SECS);
    assert!(Role { max_ttl_secs: Some(599), ..role.clone() }.validate().is_err(), "max ttl below ttl");
    assert!(Role { max_ttl_secs: Some(MAX_ROLE_MAX_TTL_SECS + 1), ..role.clone() }.validate().is_err());
    let id = ServiceAccountIdentity {
        namespace: "payments".into(),
        service_account: "api".into(),
        service_account_uid: "u".into(),
        pod: Some(("api-0".into(), "pu".into())),
        node: None,
        expires_at: 0,
    };
    assert!(role.check(&id).is_ok());
    assert!(role.check(&ServiceAccountIdentity { namespace: "other".into(), ..id.clone() }).is_err());
    assert!(role.check(&ServiceAccountIdentity { service_account: "x".into(), ..id.clone() }).is_err());
    let unbound = ServiceAccountIdentity { pod: None, ..id.clone() };
    assert!(role.check(&unbound).is_err(), "pod binding required by default");
    assert!(Role { allow_unbound_tokens: true, ..role.clone() }.check(&unbound).is_ok());
    assert!(Role { ttl_secs: 0, ..role.clone() }.validate().is_err());
    assert!(Role { bound_namespaces: vec![], ..role.clone() }.validate().is_err());
    assert_eq!(id.display(), "k8s:payments/api");
    assert_eq!(
        id.selectors(),
        ["k8s-jwt:ns:payments", "k8s-jwt:pod-name:api-0", "k8s-jwt:pod-uid:pu", "k8s-jwt:sa:api"]
    );
}

proptest::proptest! {
    /// Arbitrary bytes as a token never panic and never verify.
    #[test]
    fn arbitrary_tokens_are_refused(s in "[A-Za-z0-9_.-]{0,300}") {
        let good = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        let v = Verifier::new(cfg(good)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        proptest::prop_assert!(rt.block_on(v.verify(&s)).is_err());
    }

    /// Arbitrary JWKS documents never panic.
    #[test]
    fn arbitrary_jwks_never_panic(s in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
        let _ = parse_jwks(&s);
    }
}
