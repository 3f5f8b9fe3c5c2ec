//! The route paths of the `/v1` API, as the server's router declares them (`{name}` is one path
//! segment, `{*path}` the rest of the path). The server builds its router from these constants
//! and the client its URLs, with [`fill`].

pub const HEALTH: &str = "/v1/health";
pub const OPENAPI: &str = "/v1/openapi.json";
pub const METRICS: &str = "/v1/metrics";
pub const SYS_INIT: &str = "/v1/sys/init";
pub const SYS_UNSEAL: &str = "/v1/sys/unseal";
pub const SYS_SEAL: &str = "/v1/sys/seal";
/// GET the status, POST to start, DELETE to cancel.
pub const SYS_REKEY: &str = "/v1/sys/rekey";
pub const SYS_REKEY_UPDATE: &str = "/v1/sys/rekey/update";
pub const SYS_ROTATE_ROOT: &str = "/v1/sys/rotate-root";
pub const SYS_AUDIT: &str = "/v1/sys/audit";
pub const SYS_SNAPSHOT: &str = "/v1/sys/snapshot";
pub const SYS_AUTHORIZE: &str = "/v1/sys/authorize";

pub const WHOAMI: &str = "/v1/auth/whoami";
pub const K8S_LOGIN: &str = "/v1/auth/kubernetes/login";
pub const K8S_CONFIG: &str = "/v1/auth/kubernetes/config";
pub const K8S_ROLES: &str = "/v1/auth/kubernetes/roles";
pub const K8S_ROLE: &str = "/v1/auth/kubernetes/roles/{name}";
pub const TOKEN_CREATE: &str = "/v1/auth/token/create";
pub const TOKEN_LOOKUP: &str = "/v1/auth/token/lookup";
pub const TOKEN_ACCESSORS: &str = "/v1/auth/token/accessors";
pub const TOKEN_RENEW: &str = "/v1/auth/token/renew";
pub const TOKEN_RENEW_SELF: &str = "/v1/auth/token/renew-self";
pub const TOKEN_REVOKE: &str = "/v1/auth/token/revoke";
pub const TOKEN_REVOKE_SELF: &str = "/v1/auth/token/revoke-self";
pub const POLICIES: &str = "/v1/policies";
pub const POLICY: &str = "/v1/policies/{name}";

pub const AGENT_JOIN_TOKEN: &str = "/v1/auth/agent/join-token";
pub const AGENT_JOIN: &str = "/v1/auth/agent/join";
pub const AGENTS: &str = "/v1/agents";
pub const AGENT_REVOKE: &str = "/v1/agents/{node}/revoke";
pub const AGENT_NONCE: &str = "/v1/agent/nonce";
pub const AGENT_RELEASE: &str = "/v1/agent/release";
pub const AGENT_RELEASES: &str = "/v1/agent/releases";

pub const KEYS: &str = "/v1/keys";
pub const KEY: &str = "/v1/keys/{name}";
pub const ALIASES: &str = "/v1/aliases";
pub const ALIAS: &str = "/v1/aliases/{name}";
pub const KEY_ENABLE: &str = "/v1/keys/{name}/enable";
pub const KEY_DISABLE: &str = "/v1/keys/{name}/disable";
pub const KEY_ROTATE: &str = "/v1/keys/{name}/rotate";
pub const KEY_ROTATION_POLICY: &str = "/v1/keys/{name}/rotation-policy";
pub const KEY_SCHEDULE_DELETION: &str = "/v1/keys/{name}/schedule-deletion";
pub const KEY_CANCEL_DELETION: &str = "/v1/keys/{name}/cancel-deletion";
pub const KEY_ENCRYPT: &str = "/v1/keys/{name}/encrypt";
pub const KEY_DATA_KEY: &str = "/v1/keys/{name}/generate-data-key";
pub const KEY_DATA_KEY_WITHOUT_PLAINTEXT: &str = "/v1/keys/{name}/generate-data-key-without-plaintext";
pub const KEY_SIGN: &str = "/v1/keys/{name}/sign";
pub const KEY_VERIFY: &str = "/v1/keys/{name}/verify";
pub const KEY_MAC: &str = "/v1/keys/{name}/mac";
pub const KEY_VERIFY_MAC: &str = "/v1/keys/{name}/verify-mac";
pub const DECRYPT: &str = "/v1/decrypt";
pub const REENCRYPT: &str = "/v1/reencrypt";
pub const RANDOM: &str = "/v1/random";
pub const RANDOMIZED: &str = "/v1/randomized/{name}";
pub const RANDOMIZED_DEFINITION: &str = "/v1/randomized/{name}/definition";

pub const SECRETS: &str = "/v1/secrets";
pub const SECRET_DATA: &str = "/v1/secrets/data/{*path}";
pub const SECRET_METADATA: &str = "/v1/secrets/metadata/{*path}";
pub const SECRET_DELETE: &str = "/v1/secrets/delete/{*path}";
pub const SECRET_UNDELETE: &str = "/v1/secrets/undelete/{*path}";
pub const SECRET_DESTROY: &str = "/v1/secrets/destroy/{*path}";

/// `template` with its `{…}` parameters replaced, in order, by `values`, which the caller has
/// already percent-encoded as path segments (a `{*path}` value may hold `/`). A parameter with
/// no value left stays as it is, which the server answers with 404.
pub fn fill(template: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(template.len() + values.iter().map(|v| v.len()).sum::<usize>());
    let mut values = values.iter();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else { break };
        out.push_str(&rest[..start]);
        match values.next() {
            Some(v) => out.push_str(v),
            None => out.push_str(&rest[start..=start + len]),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_parameters_in_order() {
        assert_eq!(fill(KEY_ENCRYPT, &["k1"]), "/v1/keys/k1/encrypt");
        assert_eq!(fill(SECRET_DATA, &["app/db"]), "/v1/secrets/data/app/db");
        assert_eq!(fill(AGENT_REVOKE, &["node-1"]), "/v1/agents/node-1/revoke");
        assert_eq!(fill(HEALTH, &[]), HEALTH);
        assert_eq!(fill(KEY, &[]), KEY);
    }
}
