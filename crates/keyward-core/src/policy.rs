//! Deny-by-default policies.
//!
//! A policy is a named list of rules; a rule grants `operations` on `resources`. A request is
//! allowed when at least one rule of at least one policy attached to the caller's token matches
//! both its operation and its resource; otherwise it is denied. The `root` policy (attached to
//! the root token) grants everything. Matching (see `docs/policies.md`):
//!
//! - a resource pattern is an exact resource (`keys/payments`, `secrets/app/db`), or ends in `*`
//!   and matches every resource starting with what precedes the `*` (`secrets/app/*`,
//!   `keys/team-*`, `*`). `*` may appear only at the end.
//! - an operation is one of [`OPERATIONS`], or `*` for all of them.
//!
//! Identities. A caller carries *selectors*, facts established by how it authenticated
//! (`k8s:ns:payments`, `k8s:sa:api`, `cert:cn:billing`, `cert:uri:spiffe://bank/billing`, and
//! with the node agent `unix:sha256:HEX`, ...). Selectors are set only by auth methods, never by
//! the caller. They act in two places:
//!
//! - a policy's `identities` attaches it to callers without naming it on their token: the
//!   policy applies when every selector of at least one of its sets matches the caller;
//! - a rule's `require` narrows that rule: it grants only when every required selector matches
//!   the caller, whichever way the policy reached the caller.
//!
//! A selector pattern is exact, or ends in `*` after at least `kind:name:` (`cert:dns:*.bank`
//! is invalid, `cert:uri:spiffe://bank/*` is valid).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::KmsError;

/// Every operation a policy can grant.
pub const OPERATIONS: &[&str] = &[
    "encrypt",
    "decrypt",
    "generate-data-key",
    "sign",
    "verify",
    "mac",
    "verify-mac",
    "read",
    "write",
    "destroy",
    "list",
    "admin",
    "random",
    "audit",
    "join",
];

/// The name of the built-in policy that grants everything.
pub const ROOT_POLICY: &str = "root";

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Resource patterns.
    pub resources: Vec<String>,
    /// Operations granted on them.
    pub operations: Vec<String>,
    /// Selectors the caller must all have for this rule to grant anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<String>,
    /// At most this many distinct live instances (pods, by `k8s:pod-uid`) may use this rule on
    /// one resource at once. An instance holds its place for [`Rule::instance_hold_secs`] after
    /// each use; a caller without a pod UID is refused. Only for operations that change nothing
    /// stored ([`CAPPABLE_OPERATIONS`]), since the place is taken after the operation has run
    /// and before its answer leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// How long an instance keeps its place after its last use (default
    /// [`DEFAULT_INSTANCE_HOLD_SECS`]); a pod that is gone frees its place when this runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_hold_secs: Option<u64>,
}

/// Operations a rule with `max_instances` may grant: those that change nothing stored.
pub const CAPPABLE_OPERATIONS: &[&str] =
    &["encrypt", "decrypt", "generate-data-key", "sign", "verify", "mac", "verify-mac", "read", "random"];

/// How long an instance holds its place under `max_instances` after its last use.
pub const DEFAULT_INSTANCE_HOLD_SECS: u64 = 600;

/// The selector that names an instance for `max_instances`.
pub const INSTANCE_SELECTOR: &str = "k8s:pod-uid:";

/// A named policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Selector sets attaching this policy to callers (any set, all of its selectors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Vec<String>>,
    /// Grants.
    pub rules: Vec<Rule>,
}

/// Longest selector accepted.
pub const MAX_SELECTOR_LEN: usize = 512;

/// Whether `s` is a well-formed concrete selector: `kind:name:value`, printable ASCII without
/// spaces, `kind` and `name` lowercase `a-z 0-9 -`.
pub fn selector_ok(s: &str) -> bool {
    let mut parts = s.splitn(3, ':');
    let (Some(kind), Some(name), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ident = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    s.len() <= MAX_SELECTOR_LEN
        && ident(kind)
        && ident(name)
        && !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_graphic())
}

/// A selector value for arbitrary bytes: bytes outside printable ASCII, and `%`, are
/// percent-encoded (`Billing API` gives `Billing%20API`), so the result is always a valid value.
pub fn selector_value(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Whether `p` is a well-formed selector pattern: a selector, possibly ending in `*` after
/// `kind:name:`.
pub fn selector_pattern_ok(p: &str) -> bool {
    let body = p.strip_suffix('*').unwrap_or(p);
    if body.contains('*') {
        return false;
    }
    if p.ends_with('*') && body.ends_with(':') { selector_ok(&format!("{body}x")) } else { selector_ok(body) }
}

/// Whether any of the caller's `selectors` matches `pattern`.
pub fn has_selector(pattern: &str, selectors: &[String]) -> bool {
    selectors.iter().any(|s| matches(pattern, s))
}

fn pattern_ok(p: &str) -> bool {
    !p.is_empty() && p.len() <= 600 && !p[..p.len() - 1].contains('*') && p.bytes().all(|b| b.is_ascii_graphic())
}

impl Policy {
    /// Check names, patterns and operations.
    pub fn validate(&self) -> Result<(), KmsError> {
        crate::validate::key_name(&self.name)
            .map_err(|_| KmsError::invalid(format!("policy name {:?} is invalid: use A-Z a-z 0-9 _ - .", self.name)))?;
        if self.name == ROOT_POLICY {
            return Err(KmsError::invalid("the root policy is built in and cannot be replaced"));
        }
        if self.rules.is_empty() || self.rules.len() > 256 {
            return Err(KmsError::invalid("a policy has 1 to 256 rules"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.resources.is_empty() || r.operations.is_empty() {
                return Err(KmsError::invalid(format!("rule {i} needs at least one resource and one operation")));
            }
            if let Some(bad) = r.resources.iter().find(|p| !pattern_ok(p)) {
                return Err(KmsError::invalid(format!(
                    "rule {i}: resource pattern {bad:?} is invalid (printable, '*' only at the end)"
                )));
            }
            if let Some(bad) = r.operations.iter().find(|o| *o != "*" && !OPERATIONS.contains(&o.as_str())) {
                return Err(KmsError::invalid(format!(
                    "rule {i}: unknown operation {bad:?}; use one of {} or *",
                    OPERATIONS.join(", ")
                )));
            }
            if let Some(max) = r.max_instances {
                if max == 0 || max > 100_000 {
                    return Err(KmsError::invalid(format!("rule {i}: max_instances is 1 to 100000")));
                }
                if let Some(bad) = r.operations.iter().find(|o| !CAPPABLE_OPERATIONS.contains(&o.as_str())) {
                    return Err(KmsError::invalid(format!(
                        "rule {i}: a rule with max_instances may grant only operations that change nothing stored \
                         ({}); {bad:?} is not one of them",
                        CAPPABLE_OPERATIONS.join(", ")
                    )));
                }
            }
            match r.instance_hold_secs {
                Some(_) if r.max_instances.is_none() => {
                    return Err(KmsError::invalid(format!("rule {i}: instance_hold_secs needs max_instances")));
                }
                Some(h) if h == 0 || h > 86_400 => {
                    return Err(KmsError::invalid(format!("rule {i}: instance_hold_secs is 1 to 86400")));
                }
                _ => {}
            }
            if r.require.len() > 32 {
                return Err(KmsError::invalid(format!("rule {i}: at most 32 required selectors")));
            }
            if let Some(bad) = r.require.iter().find(|p| !selector_pattern_ok(p)) {
                return Err(KmsError::invalid(format!(
                    "rule {i}: required selector {bad:?} is invalid: use kind:name:value, e.g. k8s:ns:payments"
                )));
            }
        }
        if self.identities.len() > 64 {
            return Err(KmsError::invalid("a policy has at most 64 identity sets"));
        }
        for (i, set) in self.identities.iter().enumerate() {
            if set.is_empty() || set.len() > 32 {
                return Err(KmsError::invalid(format!("identity set {i} needs 1 to 32 selectors")));
            }
            if let Some(bad) = set.iter().find(|p| !selector_pattern_ok(p)) {
                return Err(KmsError::invalid(format!(
                    "identity set {i}: selector {bad:?} is invalid: use kind:name:value, e.g. k8s:sa:api or cert:cn:billing"
                )));
            }
        }
        Ok(())
    }

    /// The first identity set of this policy all of whose selectors the caller has.
    pub fn attached_by(&self, selectors: &[String]) -> Option<usize> {
        if selectors.is_empty() {
            return None;
        }
        self.identities.iter().position(|set| set.iter().all(|p| has_selector(p, selectors)))
    }

    /// The first rule granting `operation` on `resource` to a caller with `selectors`, if any.
    pub fn grants(&self, operation: &str, resource: &str, selectors: &[String]) -> Option<usize> {
        self.rules.iter().position(|r| {
            r.operations.iter().any(|o| o == "*" || o == operation)
                && r.resources.iter().any(|p| matches(p, resource))
                && r.require.iter().all(|p| has_selector(p, selectors))
        })
    }

    /// What this policy grants a caller with `selectors` (for whoami): rules whose requirements
    /// the caller does not meet are left out.
    pub fn summary(&self, selectors: &[String]) -> BTreeSet<String> {
        self.rules
            .iter()
            .filter(|r| r.require.iter().all(|p| has_selector(p, selectors)))
            .flat_map(|r| r.resources.iter().map(move |p| format!("{} on {p}", r.operations.join(","))))
            .collect()
    }
}

/// Whether `pattern` matches `resource`.
pub fn matches(pattern: &str, resource: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => resource.starts_with(prefix),
        None => pattern == resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(rules: &[(&[&str], &[&str])]) -> Policy {
        Policy {
            name: "p".into(),
            description: String::new(),
            rules: rules
                .iter()
                .map(|(r, o)| Rule {
                    resources: r.iter().map(|s| s.to_string()).collect(),
                    operations: o.iter().map(|s| s.to_string()).collect(),
                    require: vec![],
                    max_instances: None,
                    instance_hold_secs: None,
                })
                .collect(),
            identities: vec![],
        }
    }

    #[test]
    fn instance_caps_are_validated() {
        let doc = |rule: &str| format!(r#"{{"name": "p", "rules": [{rule}]}}"#);
        let parse = |rule: &str| serde_json::from_str::<Policy>(&doc(rule)).unwrap().validate();
        parse(r#"{"resources": ["secrets/db"], "operations": ["read"], "max_instances": 2}"#).unwrap();
        parse(r#"{"resources": ["keys/k"], "operations": ["decrypt", "sign"], "max_instances": 1, "instance_hold_secs": 30}"#)
            .unwrap();
        for (rule, want) in [
            (r#"{"resources": ["secrets/db"], "operations": ["read"], "max_instances": 0}"#, "1 to 100000"),
            (r#"{"resources": ["secrets/db"], "operations": ["write"], "max_instances": 2}"#, "change nothing stored"),
            (r#"{"resources": ["secrets/db"], "operations": ["*"], "max_instances": 2}"#, "change nothing stored"),
            (
                r#"{"resources": ["secrets/db"], "operations": ["read"], "instance_hold_secs": 5}"#,
                "needs max_instances",
            ),
            (
                r#"{"resources": ["secrets/db"], "operations": ["read"], "max_instances": 1, "instance_hold_secs": 0}"#,
                "1 to 86400",
            ),
        ] {
            let e = parse(rule).unwrap_err().to_string();
            assert!(e.contains(want), "{rule}: {e}");
        }
    }

    fn sel(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn matching() {
        let p = pol(&[(&["keys/payments"], &["encrypt", "decrypt"]), (&["secrets/app/*"], &["read"])]);
        p.validate().unwrap();
        assert_eq!(p.grants("encrypt", "keys/payments", &[]), Some(0));
        assert_eq!(p.grants("sign", "keys/payments", &[]), None, "operation not granted");
        assert_eq!(p.grants("encrypt", "keys/payments2", &[]), None, "exact match only");
        assert_eq!(p.grants("read", "secrets/app/db", &[]), Some(1));
        assert_eq!(p.grants("read", "secrets/app/", &[]), Some(1));
        assert_eq!(p.grants("read", "secrets/apple", &[]), None, "prefix is literal");
        assert_eq!(p.grants("write", "secrets/app/db", &[]), None);
        let all = pol(&[(&["*"], &["*"])]);
        assert_eq!(all.grants("admin", "keys/x", &[]), Some(0));
    }

    #[test]
    fn validation() {
        assert!(pol(&[(&["keys/*x"], &["read"])]).validate().is_err(), "* only at the end");
        assert!(pol(&[(&["keys/x"], &["fly"])]).validate().is_err(), "unknown operation");
        assert!(pol(&[]).validate().is_err(), "no rules");
        assert!(pol(&[(&[], &["read"])]).validate().is_err());
        let mut root = pol(&[(&["*"], &["*"])]);
        root.name = "root".into();
        assert!(root.validate().is_err(), "root is built in");
        let mut p = pol(&[(&["keys/x"], &["read"])]);
        for bad in ["k8s", "k8s:ns", "k8s:ns:", "K8S:ns:x", "k8s:ns:a b", "*", "k8s:*", "cert:dns:*.bank", "k8s:n*:x"] {
            p.identities = vec![sel(&[bad])];
            assert!(p.validate().is_err(), "identity selector {bad:?} must be refused");
            p.identities = vec![];
            p.rules[0].require = sel(&[bad]);
            assert!(p.validate().is_err(), "required selector {bad:?} must be refused");
            p.rules[0].require = vec![];
        }
        for good in ["k8s:ns:payments", "k8s:ns:*", "cert:uri:spiffe://bank/*", "unix:sha256:ab12", "k8s:label:app=x"] {
            p.identities = vec![sel(&[good])];
            p.validate().unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        p.identities = vec![vec![]];
        assert!(p.validate().is_err(), "an empty identity set would match everyone");
    }

    #[test]
    fn identities_and_requirements() {
        let mut p = pol(&[(&["keys/pay"], &["encrypt"]), (&["keys/pay"], &["decrypt"])]);
        p.identities = vec![sel(&["k8s:ns:payments", "k8s:sa:api"]), sel(&["cert:uri:spiffe://bank/*"])];
        p.rules[1].require = sel(&["k8s:ns:payments"]);
        p.validate().unwrap();
        let api = sel(&["k8s:ns:payments", "k8s:sa:api"]);
        assert_eq!(p.attached_by(&api), Some(0));
        assert_eq!(p.attached_by(&sel(&["k8s:ns:payments"])), None, "all selectors of a set are needed");
        assert_eq!(p.attached_by(&sel(&["k8s:ns:payments", "k8s:sa:web"])), None);
        assert_eq!(p.attached_by(&sel(&["cert:uri:spiffe://bank/billing"])), Some(1), "prefix pattern");
        assert_eq!(p.attached_by(&sel(&["cert:uri:spiffe://bankx/billing"])), None);
        assert_eq!(p.attached_by(&[]), None, "no selectors, no identity match");
        assert_eq!(p.grants("decrypt", "keys/pay", &api), Some(1));
        let cert = sel(&["cert:uri:spiffe://bank/billing"]);
        assert_eq!(p.grants("encrypt", "keys/pay", &cert), Some(0));
        assert_eq!(p.grants("decrypt", "keys/pay", &cert), None, "the rule requires k8s:ns:payments");
        assert!(!p.summary(&cert).iter().any(|g| g.starts_with("decrypt")));
        assert!(p.summary(&api).iter().any(|g| g.starts_with("decrypt")));
    }
}
