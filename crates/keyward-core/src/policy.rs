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
}

/// A named policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Grants.
    pub rules: Vec<Rule>,
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
        }
        Ok(())
    }

    /// The first rule granting `operation` on `resource`, if any.
    pub fn grants(&self, operation: &str, resource: &str) -> Option<usize> {
        self.rules.iter().position(|r| {
            r.operations.iter().any(|o| o == "*" || o == operation) && r.resources.iter().any(|p| matches(p, resource))
        })
    }

    /// Operations granted (for whoami).
    pub fn summary(&self) -> BTreeSet<String> {
        self.rules
            .iter()
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
                })
                .collect(),
        }
    }

    #[test]
    fn matching() {
        let p = pol(&[(&["keys/payments"], &["encrypt", "decrypt"]), (&["secrets/app/*"], &["read"])]);
        p.validate().unwrap();
        assert_eq!(p.grants("encrypt", "keys/payments"), Some(0));
        assert_eq!(p.grants("sign", "keys/payments"), None, "operation not granted");
        assert_eq!(p.grants("encrypt", "keys/payments2"), None, "exact match only");
        assert_eq!(p.grants("read", "secrets/app/db"), Some(1));
        assert_eq!(p.grants("read", "secrets/app/"), Some(1));
        assert_eq!(p.grants("read", "secrets/apple"), None, "prefix is literal");
        assert_eq!(p.grants("write", "secrets/app/db"), None);
        let all = pol(&[(&["*"], &["*"])]);
        assert_eq!(all.grants("admin", "keys/x"), Some(0));
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
    }
}
