//! The Kubernetes auth method's stored state (configuration and roles, one document in the
//! store) and the verifier built from it.

use std::collections::BTreeMap;
use std::sync::Arc;

use keyward_authn::kubernetes::{AuthnError, Config, Role, ServiceAccountIdentity, Verifier};
use keyward_core::KmsError;
use keyward_core::store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

/// The metadata entry holding the method's document.
pub const META: &str = "auth_kubernetes";
const MAX_ROLES: usize = 1000;

/// The stored document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Doc {
    /// Configuration, once set.
    pub config: Option<Config>,
    /// Roles by name.
    pub roles: BTreeMap<String, Role>,
}

/// Errors of the auth method.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sAuthError {
    /// Verification or configuration failure.
    #[error(transparent)]
    Authn(#[from] AuthnError),
    /// Storage or service failure.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// Not configured yet.
    #[error("Kubernetes auth is not configured: run `keyward auth kubernetes configure`")]
    NotConfigured,
    /// No such role.
    #[error("no Kubernetes auth role named {0:?}")]
    NoRole(String),
}

/// The auth method: cached document and verifier, updated on every write.
pub struct K8sAuth {
    store: Arc<dyn Store>,
    cached: RwLock<Option<(Doc, Option<Arc<Verifier>>)>>,
    /// Bumped by every change and invalidation: a load that read the store before one does
    /// not cache what it read (it could put back a document older than the change).
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for K8sAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sAuth").finish_non_exhaustive()
    }
}

fn corrupt(e: serde_json::Error) -> K8sAuthError {
    K8sAuthError::Kms(KmsError::Internal(format!("stored Kubernetes auth document: {e}")))
}

impl K8sAuth {
    /// The method over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, cached: RwLock::new(None), generation: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Forget the cached document (another server changed it).
    pub async fn invalidate(&self) {
        let mut cached = self.cached.write().await;
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *cached = None;
    }

    async fn load(&self) -> Result<(Doc, Option<Arc<Verifier>>), K8sAuthError> {
        if let Some(c) = self.cached.read().await.as_ref() {
            return Ok(c.clone());
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let doc: Doc = match self.store.get_meta(META).await.map_err(KmsError::from)? {
            Some(raw) => serde_json::from_slice(&raw).map_err(corrupt)?,
            None => Doc::default(),
        };
        let verifier = doc.config.clone().map(Verifier::new).transpose()?.map(Arc::new);
        let mut cached = self.cached.write().await;
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
            *cached = Some((doc.clone(), verifier.clone()));
        }
        Ok((doc, verifier))
    }

    /// The stored document.
    pub async fn doc(&self) -> Result<Doc, K8sAuthError> {
        Ok(self.load().await?.0)
    }

    /// Apply `change` to the stored document (compare-and-set, retried).
    async fn update(&self, change: impl Fn(&mut Doc) -> Result<(), K8sAuthError>) -> Result<Doc, K8sAuthError> {
        for _ in 0..8 {
            let raw = self.store.get_meta(META).await.map_err(KmsError::from)?;
            let mut doc: Doc = match &raw {
                Some(r) => serde_json::from_slice(r).map_err(corrupt)?,
                None => Doc::default(),
            };
            change(&mut doc)?;
            let next = serde_json::to_vec(&doc).map_err(corrupt)?;
            let stored = match &raw {
                Some(r) => self.store.replace_meta(META, r, &next).await,
                None => self.store.put_meta_if_absent(META, &next).await,
            }
            .map_err(KmsError::from)?;
            if stored {
                let verifier = doc.config.clone().map(Verifier::new).transpose()?.map(Arc::new);
                let mut cached = self.cached.write().await;
                self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                *cached = Some((doc.clone(), verifier));
                return Ok(doc);
            }
        }
        Err(KmsError::Conflict("Kubernetes auth configuration is being changed concurrently; retry".into()).into())
    }

    /// Set the configuration. With a fetched JWKS, the keys are fetched now so that a wrong URL
    /// or CA is reported at once.
    /// Set the configuration. Its keys are fetched at once: the answer is how many, or (for a
    /// JWKS URL or discovery that cannot be fetched now) none and why. The configuration is
    /// stored either way; logins fail until the keys can be fetched (they are tried again on
    /// each login, rate-limited).
    pub async fn configure(&self, config: Config) -> Result<(usize, Option<String>), K8sAuthError> {
        let probe = Verifier::new(config.clone())?;
        let (keys, warning) = match probe.refresh().await {
            Ok(n) => (n, None),
            Err(keyward_authn::kubernetes::AuthnError::JwksUnavailable(why))
                if !matches!(config.jwks, keyward_authn::kubernetes::JwksSource::Static(_)) =>
            {
                (0, Some(why))
            }
            // A static document that holds no usable key is the caller's to fix.
            Err(keyward_authn::kubernetes::AuthnError::JwksUnavailable(why)) => {
                return Err(keyward_authn::kubernetes::AuthnError::Config(why).into());
            }
            Err(e) => return Err(e.into()),
        };
        let doc = self
            .update(|d| {
                d.config = Some(config.clone());
                Ok(())
            })
            .await?;
        // Keep the keys just fetched (the next unknown kid may still refetch at once).
        let probe = warning.is_none().then(|| Arc::new(probe));
        *self.cached.write().await = Some((doc, probe));
        Ok((keys, warning))
    }

    /// Create or replace a role.
    pub async fn put_role(&self, name: &str, role: Role) -> Result<(), K8sAuthError> {
        role.validate()?;
        self.update(|d| {
            if !d.roles.contains_key(name) && d.roles.len() >= MAX_ROLES {
                return Err(AuthnError::Config(format!("at most {MAX_ROLES} roles")).into());
            }
            d.roles.insert(name.to_string(), role.clone());
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Delete a role; whether it existed.
    pub async fn delete_role(&self, name: &str) -> Result<bool, K8sAuthError> {
        let existed = self.doc().await?.roles.contains_key(name);
        self.update(|d| {
            d.roles.remove(name);
            Ok(())
        })
        .await?;
        Ok(existed)
    }

    /// When the configuration asks for it, confirm `jwt` (verified as `id` by `verifier`) with
    /// the API server's TokenReview, as the reviewer whose token is in the configured Keyward
    /// secret. Without an answer the login is refused.
    async fn review(
        kms: &keyward_core::Kms,
        verifier: &Verifier,
        jwt: &str,
        id: &ServiceAccountIdentity,
    ) -> Result<(), K8sAuthError> {
        let Some(secret) = verifier.config().token_reviewer_secret.clone() else { return Ok(()) };
        let unavailable = |why: String| K8sAuthError::Authn(AuthnError::ReviewUnavailable(why));
        let (path, field) =
            secret.split_once('#').ok_or_else(|| unavailable("the reviewer secret is not PATH#FIELD".into()))?;
        let value = kms
            .get_secret(path, None)
            .await
            .map_err(|e| unavailable(format!("the reviewer's token (secret {path}) cannot be read: {e}")))?;
        let reviewer = value
            .data
            .expose()
            .get(field)
            .map(|t| zeroize::Zeroizing::new(t.trim().to_string()))
            .ok_or_else(|| unavailable(format!("the secret {path} has no field {field:?}")))?;
        verifier.review(jwt, &reviewer, id).await.map_err(K8sAuthError::from)
    }

    /// Verify `jwt` for `role`: the identity and the role it logs in with. Every way in (a
    /// login, an agent's join) goes through here, so none skips a step: the signature and
    /// claims, the role's bindings, then the API server's TokenReview when configured, all
    /// under one snapshot of the configuration. A refusal after the token verified also
    /// returns the verified identity, so that it is audited with the claims, not as anonymous.
    pub async fn login_verbose(
        &self,
        kms: &keyward_core::Kms,
        role: &str,
        jwt: &str,
    ) -> Result<(ServiceAccountIdentity, Role), (Option<ServiceAccountIdentity>, K8sAuthError)> {
        let (doc, verifier) = self.load().await.map_err(|e| (None, e))?;
        let verifier = verifier.ok_or((None, K8sAuthError::NotConfigured))?;
        let r = doc.roles.get(role).cloned().ok_or_else(|| (None, K8sAuthError::NoRole(role.to_string())))?;
        let id = verifier.verify(jwt).await.map_err(|e| (None, e.into()))?;
        if let Err(e) = r.check(&id) {
            return Err((Some(id), e.into()));
        }
        if let Err(e) = Self::review(kms, &verifier, jwt, &id).await {
            return Err((Some(id), e));
        }
        Ok((id, r))
    }
}
