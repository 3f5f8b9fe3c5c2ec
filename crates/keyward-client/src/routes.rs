//! One typed method per route the command line uses, taking the request types the server parses
//! (`keyward-api`), so no caller builds a request body by hand. Answers are JSON values until
//! the answers get types of their own.

use keyward_api::{
    AccessorReq, AliasReq, DryRunReq, Empty, InitReq, JoinTokenReq, K8sConfigReq, K8sLoginReq, K8sRoleReq, MessageReq,
    RandomReq, RandomizedReq, RekeyShareReq, RotationPolicyReq, ShareReq, SignReq, TokenCreateReq, UpdateKeyReq,
    VerifyMacReq, VerifyReq, VersionsReq,
};
use reqwest::Method;
use serde_json::Value;

use crate::{Client, Error, check_path, key_segment, seg};

/// A query string from the pairs that are set, percent-encoded (`?a=1&b=x`, or nothing).
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    let q = q.finish();
    if q.is_empty() { q } else { format!("?{q}") }
}

impl Client {
    /// `PUT /v1/auth/kubernetes/config`.
    pub async fn k8s_configure(&self, r: &K8sConfigReq) -> Result<Value, Error> {
        self.call(Method::PUT, "/v1/auth/kubernetes/config", Some(r)).await
    }

    /// `GET /v1/auth/kubernetes/config`.
    pub async fn k8s_config(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/auth/kubernetes/config", None).await
    }

    /// `PUT /v1/auth/kubernetes/roles/{name}`.
    pub async fn k8s_put_role(&self, name: &str, r: &K8sRoleReq) -> Result<Value, Error> {
        self.call(Method::PUT, &format!("/v1/auth/kubernetes/roles/{}", seg(name)), Some(r)).await
    }

    /// `GET /v1/auth/kubernetes/roles`.
    pub async fn k8s_roles(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/auth/kubernetes/roles", None).await
    }

    /// `GET /v1/auth/kubernetes/roles/{name}`.
    pub async fn k8s_role(&self, name: &str) -> Result<Value, Error> {
        self.request(Method::GET, &format!("/v1/auth/kubernetes/roles/{}", seg(name)), None).await
    }

    /// `DELETE /v1/auth/kubernetes/roles/{name}`.
    pub async fn k8s_delete_role(&self, name: &str) -> Result<Value, Error> {
        self.request(Method::DELETE, &format!("/v1/auth/kubernetes/roles/{}", seg(name)), None).await
    }

    /// `POST /v1/auth/kubernetes/login`.
    pub async fn k8s_login(&self, r: &K8sLoginReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/kubernetes/login", Some(r)).await
    }

    /// `PUT /v1/policies/{name}` with a policy document (as read from a policy file).
    pub async fn put_policy(&self, name: &str, document: &Value) -> Result<Value, Error> {
        self.request(Method::PUT, &format!("/v1/policies/{}", seg(name)), Some(document)).await
    }

    /// `GET /v1/policies`.
    pub async fn policies(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/policies", None).await
    }

    /// `GET /v1/policies/{name}`.
    pub async fn policy(&self, name: &str) -> Result<Value, Error> {
        self.request(Method::GET, &format!("/v1/policies/{}", seg(name)), None).await
    }

    /// `DELETE /v1/policies/{name}`.
    pub async fn delete_policy(&self, name: &str) -> Result<Value, Error> {
        self.request(Method::DELETE, &format!("/v1/policies/{}", seg(name)), None).await
    }

    /// `POST /v1/sys/authorize`: would this be allowed?
    pub async fn authorize(&self, r: &DryRunReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/sys/authorize", Some(r)).await
    }

    /// `POST /v1/auth/token/create`.
    pub async fn create_token(&self, r: &TokenCreateReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/token/create", Some(r)).await
    }

    /// `GET /v1/auth/token/accessors`.
    pub async fn token_accessors(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/auth/token/accessors", None).await
    }

    /// `POST /v1/auth/token/lookup`.
    pub async fn lookup_token(&self, accessor: &str) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/token/lookup", Some(&AccessorReq { accessor: accessor.into() })).await
    }

    /// `POST /v1/auth/token/renew`.
    pub async fn renew_token(&self, accessor: &str) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/token/renew", Some(&AccessorReq { accessor: accessor.into() })).await
    }

    /// `POST /v1/auth/token/renew-self`.
    pub async fn renew_self(&self) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/token/renew-self", Some(&Empty {})).await
    }

    /// `POST /v1/auth/token/revoke`.
    pub async fn revoke_token(&self, accessor: &str) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/token/revoke", Some(&AccessorReq { accessor: accessor.into() })).await
    }

    /// `POST /v1/auth/token/revoke-self`.
    pub async fn revoke_self(&self) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/token/revoke-self", Some(&Empty {})).await
    }

    /// `POST /v1/sys/init`.
    pub async fn init(&self, r: &InitReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/sys/init", Some(r)).await
    }

    /// `POST /v1/sys/unseal`: one share.
    pub async fn unseal(&self, r: &ShareReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/sys/unseal", Some(r)).await
    }

    /// `POST /v1/sys/seal`.
    pub async fn seal(&self) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/sys/seal", Some(&Empty {})).await
    }

    /// `GET /v1/sys/rekey`: the rekey in progress, if any.
    pub async fn rekey_status(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/sys/rekey", None).await
    }

    /// `POST /v1/sys/rekey`: start a rekey to new share parameters.
    pub async fn rekey_start(&self, r: &InitReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/sys/rekey", Some(r)).await
    }

    /// `DELETE /v1/sys/rekey`.
    pub async fn rekey_cancel(&self) -> Result<Value, Error> {
        self.request(Method::DELETE, "/v1/sys/rekey", None).await
    }

    /// `POST /v1/sys/rekey/update`: one current share toward the rekey.
    pub async fn rekey_update(&self, r: &RekeyShareReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/sys/rekey/update", Some(r)).await
    }

    /// `POST /v1/sys/rotate-root`: move every key to a new root key.
    pub async fn rotate_root(&self) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/sys/rotate-root", Some(&Empty {})).await
    }

    /// `POST /v1/keys/{name}/sign`: a message or its SHA-256 digest.
    pub async fn sign(&self, key: &str, r: &SignReq) -> Result<Value, Error> {
        self.call(Method::POST, &format!("/v1/keys/{}/sign", key_segment(key)), Some(r)).await
    }

    /// `POST /v1/keys/{name}/verify`.
    pub async fn verify(&self, key: &str, r: &VerifyReq) -> Result<Value, Error> {
        self.call(Method::POST, &format!("/v1/keys/{}/verify", key_segment(key)), Some(r)).await
    }

    /// `POST /v1/keys/{name}/mac`.
    pub async fn mac(&self, key: &str, r: &MessageReq) -> Result<Value, Error> {
        self.call(Method::POST, &format!("/v1/keys/{}/mac", key_segment(key)), Some(r)).await
    }

    /// `POST /v1/keys/{name}/verify-mac`.
    pub async fn verify_mac(&self, key: &str, r: &VerifyMacReq) -> Result<Value, Error> {
        self.call(Method::POST, &format!("/v1/keys/{}/verify-mac", key_segment(key)), Some(r)).await
    }

    /// `POST /v1/random`.
    pub async fn random(&self, bytes: usize) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/random", Some(&RandomReq { bytes })).await
    }

    /// `GET /v1/keys`: one page of keys by name, after `after`.
    pub async fn list_keys(&self, limit: Option<u32>, after: Option<&str>) -> Result<Value, Error> {
        let q = query(&[("limit", limit.map(|l| l.to_string())), ("after", after.map(str::to_string))]);
        self.request(Method::GET, &format!("/v1/keys{q}"), None).await
    }

    /// `PATCH /v1/keys/{name}`.
    pub async fn update_key(&self, name: &str, r: &UpdateKeyReq) -> Result<Value, Error> {
        self.call(Method::PATCH, &format!("/v1/keys/{}", key_segment(name)), Some(r)).await
    }

    /// `PUT /v1/keys/{name}/rotation-policy` (`rotate_every: None` turns rotation off).
    pub async fn set_rotation(&self, name: &str, r: &RotationPolicyReq) -> Result<Value, Error> {
        self.call(Method::PUT, &format!("/v1/keys/{}/rotation-policy", key_segment(name)), Some(r)).await
    }

    /// `GET /v1/aliases`.
    pub async fn aliases(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/aliases", None).await
    }

    /// `PUT /v1/aliases/{name}`: point `alias/NAME` (give NAME) at a key.
    pub async fn set_alias(&self, name: &str, r: &AliasReq) -> Result<Value, Error> {
        self.call(Method::PUT, &format!("/v1/aliases/{}", key_segment(name)), Some(r)).await
    }

    /// `DELETE /v1/aliases/{name}` (give NAME of `alias/NAME`).
    pub async fn delete_alias(&self, name: &str) -> Result<Value, Error> {
        self.request(Method::DELETE, &format!("/v1/aliases/{}", key_segment(name)), None).await
    }

    /// `POST /v1/auth/agent/join-token`: a one-time token for a node's agent.
    pub async fn join_token(&self, r: &JoinTokenReq) -> Result<Value, Error> {
        self.call(Method::POST, "/v1/auth/agent/join-token", Some(r)).await
    }

    /// `GET /v1/agents`: each node's agent tokens and unspent join tokens.
    pub async fn agents(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/agents", None).await
    }

    /// `POST /v1/agents/{node}/revoke`.
    pub async fn revoke_node(&self, node: &str) -> Result<Value, Error> {
        self.call(Method::POST, &format!("/v1/agents/{}/revoke", key_segment(node)), Some(&Empty {})).await
    }

    /// `GET /v1/sys/audit`: the audit log's head and chain key.
    pub async fn audit_info(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/sys/audit", None).await
    }

    /// `GET /v1/auth/whoami`.
    pub async fn whoami(&self) -> Result<Value, Error> {
        self.request(Method::GET, "/v1/auth/whoami", None).await
    }

    /// `GET /v1/secrets/data/{path}` as the server answers it (all fields, as JSON).
    pub async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Value, Error> {
        check_path(path)?;
        let q = query(&[("version", version.map(|v| v.to_string()))]);
        self.request(Method::GET, &format!("/v1/secrets/data/{}{q}", seg(path)), None).await
    }

    /// `GET /v1/secrets`: paths under `prefix`, one page.
    pub async fn list_secrets(&self, prefix: &str, limit: Option<u32>, after: Option<&str>) -> Result<Value, Error> {
        let q = query(&[
            ("prefix", Some(prefix.to_string())),
            ("limit", limit.map(|l| l.to_string())),
            ("after", after.map(str::to_string)),
        ]);
        self.request(Method::GET, &format!("/v1/secrets{q}"), None).await
    }

    /// `GET /v1/secrets/metadata/{path}`: the versions of a secret.
    pub async fn secret_metadata(&self, path: &str) -> Result<Value, Error> {
        check_path(path)?;
        self.request(Method::GET, &format!("/v1/secrets/metadata/{}", seg(path)), None).await
    }

    /// `POST /v1/secrets/{delete|undelete|destroy}/{path}` for `versions`.
    pub async fn secret_versions_action(&self, action: &str, path: &str, r: &VersionsReq) -> Result<Value, Error> {
        check_path(path)?;
        if !matches!(action, "delete" | "undelete" | "destroy") {
            return Err(Error::InvalidArgument(format!("no secret action {action:?}: delete, undelete or destroy")));
        }
        self.call(Method::POST, &format!("/v1/secrets/{action}/{}", seg(path)), Some(r)).await
    }

    /// `PUT /v1/randomized/{name}`: define a randomized secret.
    pub async fn define_randomized(&self, name: &str, r: &RandomizedReq) -> Result<Value, Error> {
        self.call(Method::PUT, &format!("/v1/randomized/{}", key_segment(name)), Some(r)).await
    }

    /// `GET /v1/randomized/{name}/definition`.
    pub async fn randomized_definition(&self, name: &str) -> Result<Value, Error> {
        self.request(Method::GET, &format!("/v1/randomized/{}/definition", key_segment(name)), None).await
    }

    /// `GET /v1/randomized/{name}`: this caller's value.
    pub async fn randomized(&self, name: &str) -> Result<Value, Error> {
        self.request(Method::GET, &format!("/v1/randomized/{}", key_segment(name)), None).await
    }
}
