//! Tokens: creation (children within their parent's limits), authentication, lookup, renewal,
//! revocation of a subtree, login tokens.

use super::*;

impl Kms {
    pub(super) fn token_hash(&self, token: &[u8]) -> [u8; 32] {
        hash::hmac_sha256(self.token_key.expose(), token)
    }

    pub(super) async fn insert_token(
        &self,
        parent: Option<&TokenRecord>,
        req: TokenRequest,
    ) -> Result<(SecretBytes, TokenRecord), KmsError> {
        let raw = SecretBytes::random(32)?;
        let token = SecretBytes::from_vec(format!("kwt_{}", hex::encode(raw.expose())).into_bytes());
        let mut acc = [0u8; 12];
        keyward_crypto::fill_random(&mut acc)?;
        let now = now_unix();
        let after = |t: u64| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX));
        let mut expires_at = req.ttl_secs.map(after);
        let max_expires_at = req.max_ttl_secs.map(after);
        if let Some(m) = max_expires_at {
            expires_at = Some(expires_at.map_or(m, |e| e.min(m)));
        }
        // A child never outlives its parent.
        if let Some(pe) = parent.and_then(|p| p.expires_at) {
            expires_at = Some(expires_at.map_or(pe, |e| e.min(pe)));
        }
        let mut selectors = req.selectors;
        selectors.sort();
        selectors.dedup();
        let rec = TokenRecord {
            hash: self.token_hash(token.expose()),
            accessor: format!("acc_{}", hex::encode(acc)),
            policies: req.policies,
            created_at: now,
            expires_at,
            parent: parent.map(|p| p.accessor.clone()),
            ttl_secs: req.ttl_secs,
            max_uses: req.max_uses,
            uses: 0,
            display_name: req.display_name,
            selectors,
            max_expires_at,
        };
        self.store.put_token(&rec).await?;
        if let Ok(mut m) = self.tokens.write() {
            m.insert(rec.hash, Arc::new(rec.clone()));
        }
        Ok((token, rec))
    }

    pub(super) async fn reload_tokens(&self) -> Result<(), KmsError> {
        let all = self.store.list_tokens().await?;
        let map = all.into_iter().map(|t| (t.hash, Arc::new(t))).collect();
        *self.tokens.write().map_err(|_| KmsError::Internal("token cache poisoned".into()))? = map;
        Ok(())
    }

    /// Every token: from the store when it is shared (other servers create tokens this one has
    /// not seen), else from the cache.
    pub(super) async fn all_tokens(&self) -> Result<Vec<Arc<TokenRecord>>, KmsError> {
        if self.store.is_shared() {
            return Ok(self.store.list_tokens().await?.into_iter().map(Arc::new).collect());
        }
        let m = self.tokens.read().map_err(|_| KmsError::Internal("token cache poisoned".into()))?;
        Ok(m.values().cloned().collect())
    }

    pub(super) async fn token_by_accessor(&self, accessor: &str) -> Result<Arc<TokenRecord>, KmsError> {
        self.all_tokens()
            .await?
            .into_iter()
            .find(|t| t.accessor == accessor)
            .ok_or_else(|| not_found("token", accessor))
    }

    /// Authenticate a bearer token. Counts a use for tokens with a use limit (and revokes the
    /// token when it is used up).
    pub async fn authenticate(&self, token: &str) -> Result<Arc<TokenRecord>, KmsError> {
        use crate::error::AuthFailure;
        if token.is_empty() {
            return Err(KmsError::Unauthenticated(AuthFailure::Missing));
        }
        if token.len() > 256 || !token.starts_with("kwt_") {
            return Err(KmsError::Unauthenticated(AuthFailure::Malformed));
        }
        self.require_fresh()?;
        let h = self.token_hash(token.as_bytes());
        let cached = {
            let map = self.tokens.read().map_err(|_| KmsError::Internal("token cache poisoned".into()))?;
            map.get(&h).cloned()
        };
        let invalid = KmsError::Unauthenticated(AuthFailure::Invalid);
        let rec = match cached {
            Some(r) => r,
            // Created by another server since this one last caught up with the feed.
            None if self.store.is_shared() => {
                let rec = Arc::new(self.store.get_token(&h).await?.ok_or(invalid)?);
                if let Ok(mut m) = self.tokens.write() {
                    m.insert(h, rec.clone());
                }
                rec
            }
            None => return Err(invalid),
        };
        if !keyward_crypto::ct_eq(&rec.hash, &h) {
            return Err(KmsError::Unauthenticated(AuthFailure::Invalid));
        }
        if rec.expires_at.is_some_and(|e| e <= now_unix()) {
            return Err(KmsError::Unauthenticated(AuthFailure::Expired));
        }
        if rec.max_uses.is_some() {
            // Counted in the store, atomically, before use: neither a restart nor several
            // servers can grant extra uses.
            let Some(uses) = self.store.use_token(&h).await? else {
                return Err(KmsError::Unauthenticated(AuthFailure::UsedUp));
            };
            let mut next = (*rec).clone();
            next.uses = uses;
            let next = Arc::new(next);
            if let Ok(mut m) = self.tokens.write() {
                m.insert(h, next.clone());
            }
            return Ok(next);
        }
        Ok(rec)
    }

    /// Create a token for `parent`. A non-root parent can only hand out policies it holds.
    pub async fn create_token(
        &self,
        parent: &TokenRecord,
        req: TokenRequest,
    ) -> Result<(SecretBytes, TokenRecord), KmsError> {
        if req.policies.is_empty() || req.policies.len() > 64 {
            return Err(KmsError::invalid("a token needs 1 to 64 policies"));
        }
        if req.display_name.len() > 128 {
            return Err(KmsError::invalid("display name is at most 128 bytes"));
        }
        if let Some(t) = req.ttl_secs
            && (t == 0 || t > MAX_ROTATION_PERIOD)
        {
            return Err(KmsError::invalid("ttl must be between 1 second and 10 years"));
        }
        if req.max_uses == Some(0) {
            return Err(KmsError::invalid("max_uses must be at least 1"));
        }
        if req.max_ttl_secs.is_some_and(|t| t == 0 || t > MAX_ROTATION_PERIOD) {
            return Err(KmsError::invalid("max_ttl must be between 1 second and 10 years"));
        }
        if !req.selectors.is_empty() {
            return Err(KmsError::invalid("selectors are set by auth methods, not by token creation"));
        }
        if !parent.is_stored() {
            return Err(KmsError::PermissionDenied(
                "only token holders can create tokens; this identity (a client certificate) has no token".into(),
            ));
        }
        if req.orphan && !parent.is_root() {
            return Err(KmsError::PermissionDenied("only a root token can create orphan tokens".into()));
        }
        {
            let known = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
            for p in &req.policies {
                if p != ROOT_POLICY && !known.contains_key(p) {
                    return Err(not_found("policy", p));
                }
                if !parent.is_root() && !parent.policies.contains(p) {
                    return Err(KmsError::PermissionDenied(format!(
                        "a token can only create tokens with policies it holds itself, and it does not hold {p:?}"
                    )));
                }
            }
        }
        let parent = if req.orphan { None } else { Some(parent) };
        // A child never has more uses than its parent has left (its creation used one).
        let mut req = req;
        if let Some(p) = parent
            && let Some(max) = p.max_uses
        {
            let left = max.saturating_sub(p.uses);
            if left == 0 {
                return Err(KmsError::PermissionDenied(
                    "this token has no uses left to give a child token (creating it used the last one)".into(),
                ));
            }
            req.max_uses = Some(req.max_uses.map_or(left, |m| m.min(left)));
        }
        self.insert_token(parent, req).await
    }

    /// Whether the token `accessor` is `caller` or was created from it (directly or through
    /// other tokens): the tokens a holder may look up, renew and revoke without `admin` on
    /// `auth/token`. An unknown accessor is in nobody's subtree.
    pub async fn in_subtree(&self, caller: &TokenRecord, accessor: &str) -> Result<bool, KmsError> {
        let all = self.all_tokens().await?;
        let mut at = accessor.to_string();
        for _ in 0..=all.len() {
            if at == caller.accessor {
                return Ok(caller.is_stored());
            }
            match all.iter().find(|t| t.accessor == at).and_then(|t| t.parent.clone()) {
                Some(p) => at = p,
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// The live tokens (not expired, uses left) of `caller`'s subtree: itself and every token
    /// created from it, at any depth; with `all`, every live token. Oldest first.
    pub async fn list_tokens(&self, caller: &TokenRecord, all: bool) -> Result<Vec<Arc<TokenRecord>>, KmsError> {
        let tokens = self.all_tokens().await?;
        let now = now_unix();
        let live = |t: &TokenRecord| t.expires_at.is_none_or(|e| e > now) && t.max_uses.is_none_or(|m| t.uses < m);
        let mut keep: std::collections::HashSet<String> = std::collections::HashSet::new();
        if !all && caller.is_stored() {
            let mut queue = vec![caller.accessor.clone()];
            while let Some(a) = queue.pop() {
                if keep.insert(a.clone()) {
                    queue.extend(
                        tokens.iter().filter(|t| t.parent.as_deref() == Some(a.as_str())).map(|t| t.accessor.clone()),
                    );
                }
            }
        }
        let mut out: Vec<Arc<TokenRecord>> =
            tokens.into_iter().filter(|t| live(t) && (all || keep.contains(&t.accessor))).collect();
        out.sort_by(|a, b| (a.created_at, &a.accessor).cmp(&(b.created_at, &b.accessor)));
        Ok(out)
    }

    /// Issue an orphan token to an identity an auth method has verified (e.g. a Kubernetes
    /// ServiceAccount). The method's configuration, set by an administrator, chose the policies;
    /// they must exist.
    pub async fn issue_login_token(&self, req: TokenRequest) -> Result<(SecretBytes, TokenRecord), KmsError> {
        if (req.policies.is_empty() && req.selectors.is_empty())
            || req.policies.len() > 64
            || req.display_name.len() > 128
        {
            return Err(KmsError::invalid(
                "a login token needs up to 64 policies (or identity selectors) and a short display name",
            ));
        }
        if req.ttl_secs.is_none_or(|t| t == 0) || req.max_ttl_secs.is_none_or(|t| t == 0) {
            return Err(KmsError::invalid("a login token needs a ttl and a max ttl"));
        }
        if req.selectors.len() > 64 || req.selectors.iter().any(|s| !crate::policy::selector_ok(s)) {
            return Err(KmsError::Internal("auth method produced an invalid selector".into()));
        }
        {
            let known = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
            if let Some(p) = req.policies.iter().find(|p| *p == ROOT_POLICY || !known.contains_key(*p)) {
                return Err(KmsError::PermissionDenied(format!(
                    "the login role names policy {p:?}, which does not exist or cannot be given by a login"
                )));
            }
        }
        self.insert_token(None, TokenRequest { orphan: true, ..req }).await
    }

    /// Look a token up by accessor.
    pub async fn lookup_token(&self, accessor: &str) -> Result<Arc<TokenRecord>, KmsError> {
        let t = self.token_by_accessor(accessor).await?;
        if t.expires_at.is_some_and(|e| e <= now_unix()) {
            return Err(not_found("token (expired)", accessor));
        }
        Ok(t)
    }

    /// Extend a token's expiry by its TTL from now (never beyond its parent's expiry or its own
    /// max TTL).
    pub async fn renew_token(&self, accessor: &str) -> Result<Arc<TokenRecord>, KmsError> {
        let t = self.lookup_token(accessor).await?;
        let Some(ttl) = t.ttl_secs else {
            return Err(KmsError::Conflict("this token has no TTL and does not expire; nothing to renew".into()));
        };
        let mut next = (*t).clone();
        let mut exp = now_unix().saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX));
        if let Some(p) = t.parent.as_deref()
            && let Some(pe) = self.token_by_accessor(p).await.ok().and_then(|p| p.expires_at)
        {
            exp = exp.min(pe);
        }
        if let Some(m) = t.max_expires_at {
            exp = exp.min(m);
        }
        next.expires_at = Some(exp);
        self.store.set_token_expiry(&next.accessor, next.expires_at).await?;
        let next = Arc::new(next);
        if let Ok(mut m) = self.tokens.write() {
            m.insert(next.hash, next.clone());
        }
        Ok(next)
    }

    /// Revoke a token and every token created from it; returns the accessors revoked. The last
    /// token holding the root policy cannot be revoked.
    pub async fn revoke_token(&self, accessor: &str) -> Result<Vec<String>, KmsError> {
        let all = self.all_tokens().await?;
        if !all.iter().any(|t| t.accessor == accessor) {
            return Err(not_found("token", accessor));
        }
        let mut doomed = vec![accessor.to_string()];
        let mut i = 0;
        while let Some(a) = doomed.get(i).cloned() {
            doomed.extend(all.iter().filter(|t| t.parent.as_deref() == Some(a.as_str())).map(|t| t.accessor.clone()));
            i += 1;
        }
        let now = now_unix();
        let roots_left = all
            .iter()
            .filter(|t| t.is_root() && !doomed.contains(&t.accessor) && t.expires_at.is_none_or(|e| e > now))
            .count();
        if roots_left == 0 && all.iter().any(|t| t.is_root() && doomed.contains(&t.accessor)) {
            return Err(KmsError::Conflict(
                "this would revoke the last root token: first create another with `{\"policies\": [\"root\"], \"orphan\": true}`".into(),
            ));
        }
        self.store.delete_tokens(&doomed).await?;
        if let Ok(mut m) = self.tokens.write() {
            m.retain(|_, t| !doomed.contains(&t.accessor));
        }
        Ok(doomed)
    }

    // ----- policies -------------------------------------------------------------------------
}
