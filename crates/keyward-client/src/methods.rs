//! One typed method per route, taking the request types the server parses (`keyward-api`) and
//! returning the answer types it serializes, so no caller builds a request body or reads an
//! answer by hand.

use keyward_api::routes::{self, fill};
use keyward_api::*;
use reqwest::Method;

use crate::{Client, Error, check_path, name_segment, seg};

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
    pub async fn k8s_configure(&self, r: &K8sConfigReq) -> Result<K8sConfigured, Error> {
        self.call(Method::PUT, routes::K8S_CONFIG, Some(r)).await
    }

    /// `GET /v1/auth/kubernetes/config`.
    pub async fn k8s_config(&self) -> Result<K8sConfig, Error> {
        self.call(Method::GET, routes::K8S_CONFIG, None::<&Empty>).await
    }

    /// `PUT /v1/auth/kubernetes/roles/{name}`.
    pub async fn k8s_put_role(&self, name: &str, r: &K8sRoleReq) -> Result<K8sRole, Error> {
        self.call(Method::PUT, &fill(routes::K8S_ROLE, &[&name_segment(name)?]), Some(r)).await
    }

    /// `GET /v1/auth/kubernetes/roles`.
    pub async fn k8s_roles(&self) -> Result<K8sRoleList, Error> {
        self.call(Method::GET, routes::K8S_ROLES, None::<&Empty>).await
    }

    /// `GET /v1/auth/kubernetes/roles/{name}`.
    pub async fn k8s_role(&self, name: &str) -> Result<K8sRole, Error> {
        self.call(Method::GET, &fill(routes::K8S_ROLE, &[&name_segment(name)?]), None::<&Empty>).await
    }

    /// `DELETE /v1/auth/kubernetes/roles/{name}`.
    pub async fn k8s_delete_role(&self, name: &str) -> Result<(), Error> {
        self.call(Method::DELETE, &fill(routes::K8S_ROLE, &[&name_segment(name)?]), None::<&Empty>).await
    }

    /// `POST /v1/auth/kubernetes/login`.
    pub async fn k8s_login(&self, r: &K8sLoginReq) -> Result<Token, Error> {
        self.call(Method::POST, routes::K8S_LOGIN, Some(r)).await
    }

    /// `PUT /v1/policies/{name}` with a policy document (as read from a policy file).
    pub async fn put_policy(&self, name: &str, document: &PolicyReq) -> Result<Policy, Error> {
        self.call(Method::PUT, &fill(routes::POLICY, &[&name_segment(name)?]), Some(document)).await
    }

    /// `GET /v1/policies`.
    pub async fn policies(&self) -> Result<PolicyList, Error> {
        self.call(Method::GET, routes::POLICIES, None::<&Empty>).await
    }

    /// `GET /v1/policies/{name}`.
    pub async fn policy(&self, name: &str) -> Result<Policy, Error> {
        self.call(Method::GET, &fill(routes::POLICY, &[&name_segment(name)?]), None::<&Empty>).await
    }

    /// `DELETE /v1/policies/{name}`.
    pub async fn delete_policy(&self, name: &str) -> Result<PolicyDeleted, Error> {
        self.call(Method::DELETE, &fill(routes::POLICY, &[&name_segment(name)?]), None::<&Empty>).await
    }

    /// `POST /v1/sys/authorize`: would this be allowed?
    pub async fn authorize(&self, r: &DryRunReq) -> Result<Decision, Error> {
        self.call(Method::POST, routes::SYS_AUTHORIZE, Some(r)).await
    }

    /// `POST /v1/auth/token/create`.
    pub async fn create_token(&self, r: &TokenCreateReq) -> Result<Token, Error> {
        self.call(Method::POST, routes::TOKEN_CREATE, Some(r)).await
    }

    /// `GET /v1/auth/token/accessors`.
    pub async fn token_accessors(&self) -> Result<TokenList, Error> {
        self.call(Method::GET, routes::TOKEN_ACCESSORS, None::<&Empty>).await
    }

    /// `POST /v1/auth/token/lookup`.
    pub async fn lookup_token(&self, accessor: &str) -> Result<Token, Error> {
        self.call(Method::POST, routes::TOKEN_LOOKUP, Some(&AccessorReq { accessor: accessor.into() })).await
    }

    /// `POST /v1/auth/token/renew`.
    pub async fn renew_token(&self, accessor: &str) -> Result<Token, Error> {
        self.call(Method::POST, routes::TOKEN_RENEW, Some(&AccessorReq { accessor: accessor.into() })).await
    }

    /// `POST /v1/auth/token/renew-self`.
    pub async fn renew_self(&self) -> Result<Token, Error> {
        self.call(Method::POST, routes::TOKEN_RENEW_SELF, Some(&Empty {})).await
    }

    /// `POST /v1/auth/token/revoke`.
    pub async fn revoke_token(&self, accessor: &str) -> Result<Revoked, Error> {
        self.call(Method::POST, routes::TOKEN_REVOKE, Some(&AccessorReq { accessor: accessor.into() })).await
    }

    /// `POST /v1/auth/token/revoke-self`.
    pub async fn revoke_self(&self) -> Result<Revoked, Error> {
        self.call(Method::POST, routes::TOKEN_REVOKE_SELF, Some(&Empty {})).await
    }

    /// `POST /v1/sys/init`.
    pub async fn init(&self, r: &InitReq) -> Result<InitResult, Error> {
        self.call(Method::POST, routes::SYS_INIT, Some(r)).await
    }

    /// `POST /v1/sys/unseal`: one share.
    pub async fn unseal(&self, r: &ShareReq) -> Result<Progress, Error> {
        self.call(Method::POST, routes::SYS_UNSEAL, Some(r)).await
    }

    /// `POST /v1/sys/seal`.
    pub async fn seal(&self) -> Result<Sealed, Error> {
        self.call(Method::POST, routes::SYS_SEAL, Some(&Empty {})).await
    }

    /// `GET /v1/sys/rekey`: the rekey in progress, if any.
    pub async fn rekey_status(&self) -> Result<RekeyStatus, Error> {
        self.call(Method::GET, routes::SYS_REKEY, None::<&Empty>).await
    }

    /// `POST /v1/sys/rekey`: start a rekey to new share parameters.
    pub async fn rekey_start(&self, r: &InitReq) -> Result<RekeyStarted, Error> {
        self.call(Method::POST, routes::SYS_REKEY, Some(r)).await
    }

    /// `DELETE /v1/sys/rekey`.
    pub async fn rekey_cancel(&self) -> Result<Cancelled, Error> {
        self.call(Method::DELETE, routes::SYS_REKEY, None::<&Empty>).await
    }

    /// `POST /v1/sys/rekey/update`: one current share toward the rekey.
    pub async fn rekey_update(&self, r: &RekeyShareReq) -> Result<Progress, Error> {
        self.call(Method::POST, routes::SYS_REKEY_UPDATE, Some(r)).await
    }

    /// `POST /v1/sys/rotate-root`: move every key to a new root key.
    pub async fn rotate_root(&self) -> Result<RootRotated, Error> {
        self.call(Method::POST, routes::SYS_ROTATE_ROOT, Some(&Empty {})).await
    }

    /// `POST /v1/keys/{name}/sign`: a message or its SHA-256 digest.
    pub async fn sign(&self, key: &str, r: &SignReq) -> Result<Signature, Error> {
        self.call(Method::POST, &fill(routes::KEY_SIGN, &[&name_segment(key)?]), Some(r)).await
    }

    /// `POST /v1/keys/{name}/verify`.
    pub async fn verify(&self, key: &str, r: &VerifyReq) -> Result<Validity, Error> {
        self.call(Method::POST, &fill(routes::KEY_VERIFY, &[&name_segment(key)?]), Some(r)).await
    }

    /// `POST /v1/keys/{name}/mac`.
    pub async fn mac(&self, key: &str, r: &MessageReq) -> Result<Mac, Error> {
        self.call(Method::POST, &fill(routes::KEY_MAC, &[&name_segment(key)?]), Some(r)).await
    }

    /// `POST /v1/keys/{name}/verify-mac`.
    pub async fn verify_mac(&self, key: &str, r: &VerifyMacReq) -> Result<Validity, Error> {
        self.call(Method::POST, &fill(routes::KEY_VERIFY_MAC, &[&name_segment(key)?]), Some(r)).await
    }

    /// `POST /v1/random`.
    pub async fn random(&self, bytes: usize) -> Result<Random, Error> {
        self.call(Method::POST, routes::RANDOM, Some(&RandomReq { bytes })).await
    }

    /// `GET /v1/keys`: one page of keys by name, after `after`.
    pub async fn list_keys(&self, limit: Option<u32>, after: Option<&str>) -> Result<KeyList, Error> {
        let q = query(&[("limit", limit.map(|l| l.to_string())), ("after", after.map(str::to_string))]);
        self.call(Method::GET, &format!("{}{q}", routes::KEYS), None::<&Empty>).await
    }

    /// `PATCH /v1/keys/{name}`.
    pub async fn update_key(&self, name: &str, r: &UpdateKeyReq) -> Result<Key, Error> {
        self.call(Method::PATCH, &fill(routes::KEY, &[&name_segment(name)?]), Some(r)).await
    }

    /// `PUT /v1/keys/{name}/rotation-policy` (`rotate_every: None` turns rotation off).
    pub async fn set_rotation(&self, name: &str, r: &RotationPolicyReq) -> Result<Key, Error> {
        self.call(Method::PUT, &fill(routes::KEY_ROTATION_POLICY, &[&name_segment(name)?]), Some(r)).await
    }

    /// `GET /v1/aliases`.
    pub async fn aliases(&self) -> Result<AliasList, Error> {
        self.call(Method::GET, routes::ALIASES, None::<&Empty>).await
    }

    /// `PUT /v1/aliases/{name}`: point `alias/NAME` (give NAME) at a key.
    pub async fn set_alias(&self, name: &str, r: &AliasReq) -> Result<AliasSet, Error> {
        self.call(Method::PUT, &fill(routes::ALIAS, &[&name_segment(name)?]), Some(r)).await
    }

    /// `DELETE /v1/aliases/{name}` (give NAME of `alias/NAME`).
    pub async fn delete_alias(&self, name: &str) -> Result<AliasDeleted, Error> {
        self.call(Method::DELETE, &fill(routes::ALIAS, &[&name_segment(name)?]), None::<&Empty>).await
    }

    /// `POST /v1/auth/agent/join-token`: a one-time token for a node's agent.
    pub async fn join_token(&self, r: &JoinTokenReq) -> Result<AgentJoinToken, Error> {
        self.call(Method::POST, routes::AGENT_JOIN_TOKEN, Some(r)).await
    }

    /// `GET /v1/agents`: each node's agent tokens and unspent join tokens.
    pub async fn agents(&self) -> Result<NodeList, Error> {
        self.call(Method::GET, routes::AGENTS, None::<&Empty>).await
    }

    /// `POST /v1/agents/{node}/revoke`.
    pub async fn revoke_node(&self, node: &str) -> Result<NodeRevoked, Error> {
        self.call(Method::POST, &fill(routes::AGENT_REVOKE, &[&name_segment(node)?]), Some(&Empty {})).await
    }

    /// `GET /v1/sys/audit`: the audit log's head and chain key.
    pub async fn audit_info(&self) -> Result<AuditInfo, Error> {
        self.call(Method::GET, routes::SYS_AUDIT, None::<&Empty>).await
    }

    /// `GET /v1/auth/whoami`.
    pub async fn whoami(&self) -> Result<Token, Error> {
        self.call(Method::GET, routes::WHOAMI, None::<&Empty>).await
    }

    /// `GET /v1/secrets/data/{path}` as the server answers it (all fields, as JSON).
    pub async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Secret, Error> {
        check_path(path)?;
        let q = query(&[("version", version.map(|v| v.to_string()))]);
        self.call(Method::GET, &format!("{}{q}", fill(routes::SECRET_DATA, &[&seg(path)])), None::<&Empty>).await
    }

    /// `GET /v1/secrets`: paths under `prefix`, one page.
    pub async fn list_secrets(
        &self,
        prefix: &str,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<SecretList, Error> {
        let q = query(&[
            ("prefix", Some(prefix.to_string())),
            ("limit", limit.map(|l| l.to_string())),
            ("after", after.map(str::to_string)),
        ]);
        self.call(Method::GET, &format!("{}{q}", routes::SECRETS), None::<&Empty>).await
    }

    /// `GET /v1/secrets/metadata/{path}`: the versions of a secret.
    pub async fn secret_metadata(&self, path: &str) -> Result<SecretMetadata, Error> {
        check_path(path)?;
        self.call(Method::GET, &fill(routes::SECRET_METADATA, &[&seg(path)]), None::<&Empty>).await
    }

    /// `POST /v1/secrets/{delete|undelete|destroy}/{path}` for `versions`.
    pub async fn secret_versions_action(&self, action: &str, path: &str, r: &VersionsReq) -> Result<Changed, Error> {
        check_path(path)?;
        let route = match action {
            "delete" => routes::SECRET_DELETE,
            "undelete" => routes::SECRET_UNDELETE,
            "destroy" => routes::SECRET_DESTROY,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "no secret action {action:?}: delete, undelete or destroy"
                )));
            }
        };
        self.call(Method::POST, &fill(route, &[&seg(path)]), Some(r)).await
    }

    /// `PUT /v1/randomized/{name}`: define a randomized secret.
    pub async fn define_randomized(&self, name: &str, r: &RandomizedReq) -> Result<RandomizedDefinition, Error> {
        self.call(Method::PUT, &fill(routes::RANDOMIZED, &[&name_segment(name)?]), Some(r)).await
    }

    /// `GET /v1/randomized/{name}/definition`.
    pub async fn randomized_definition(&self, name: &str) -> Result<RandomizedDefinition, Error> {
        self.call(Method::GET, &fill(routes::RANDOMIZED_DEFINITION, &[&name_segment(name)?]), None::<&Empty>).await
    }

    /// `GET /v1/randomized/{name}`: this caller's value.
    pub async fn randomized(&self, name: &str) -> Result<RandomizedValue, Error> {
        self.call(Method::GET, &fill(routes::RANDOMIZED, &[&name_segment(name)?]), None::<&Empty>).await
    }
}
