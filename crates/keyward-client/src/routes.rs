//! One typed method per route the command line uses, taking the request types the server parses
//! (`keyward-api`), so no caller builds a request body by hand. Answers are JSON values until
//! the answers get types of their own.

use keyward_api::{
    AccessorReq, DryRunReq, Empty, InitReq, K8sConfigReq, K8sLoginReq, K8sRoleReq, MessageReq, RandomReq,
    RekeyShareReq, ShareReq, SignReq, TokenCreateReq, VerifyMacReq, VerifyReq,
};
use reqwest::Method;
use serde_json::Value;

use crate::{Client, Error, key_segment, seg};

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
}
