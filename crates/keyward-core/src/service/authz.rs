//! Policies and authorization decisions (deny by default), instance caps.

use super::*;

impl Kms {
    pub(super) async fn reload_policies(&self) -> Result<(), KmsError> {
        let mut map = HashMap::new();
        for (name, doc) in self.store.list_policies().await? {
            let p: Policy =
                serde_json::from_str(&doc).map_err(|e| KmsError::Internal(format!("stored policy {name}: {e}")))?;
            map.insert(name, Arc::new(p));
        }
        *self.policies.write().map_err(|_| KmsError::Internal("policy cache poisoned".into()))? = map;
        Ok(())
    }

    /// Create or replace a policy.
    pub async fn put_policy(&self, policy: Policy) -> Result<(), KmsError> {
        policy.validate()?;
        let doc = serde_json::to_string(&policy).map_err(|e| KmsError::Internal(e.to_string()))?;
        self.store.put_policy(&policy.name, &doc, now_unix()).await?;
        if let Ok(mut m) = self.policies.write() {
            m.insert(policy.name.clone(), Arc::new(policy));
        }
        Ok(())
    }

    /// A policy by name.
    pub fn get_policy(&self, name: &str) -> Result<Arc<Policy>, KmsError> {
        self.policies.read().ok().and_then(|m| m.get(name).cloned()).ok_or_else(|| not_found("policy", name))
    }

    /// All policy names (the built-in `root` first).
    pub fn list_policies(&self) -> Vec<String> {
        let mut v: Vec<String> = self.policies.read().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        v.sort();
        v.insert(0, ROOT_POLICY.into());
        v
    }

    /// Delete a policy. Tokens naming it lose what it granted.
    pub async fn delete_policy(&self, name: &str) -> Result<(), KmsError> {
        if name == ROOT_POLICY {
            return Err(KmsError::invalid("the root policy is built in and cannot be deleted"));
        }
        if !self.store.delete_policy(name).await? {
            return Err(not_found("policy", name));
        }
        if let Ok(mut m) = self.policies.write() {
            m.remove(name);
        }
        Ok(())
    }

    /// Decide whether a holder of `policies` may do `operation` on `resource`. Returns the grant
    /// (`policy NAME rule N`) or [`KmsError::PermissionDenied`] with the reason. Deny by default.
    pub fn decide(
        &self,
        policies: &[String],
        selectors: &[String],
        operation: &str,
        resource: &str,
    ) -> Result<String, KmsError> {
        self.decide_grant(policies, selectors, operation, resource).map(|g| g.reason)
    }

    /// [`Kms::decide`], with the granting rule's live-instance cap if it has one: the caller
    /// must then take a place with [`Kms::hold_instance`] before the answer leaves.
    pub fn decide_grant(
        &self,
        policies: &[String],
        selectors: &[String],
        operation: &str,
        resource: &str,
    ) -> Result<Grant, KmsError> {
        self.require_fresh()?;
        if policies.iter().any(|p| p == ROOT_POLICY) {
            return Ok(Grant { reason: "policy root".into(), cap: None });
        }
        let map = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
        let grant = |name: &str, p: &Policy, i: usize, reason: String| {
            let rule = &p.rules[i];
            let cap = rule.max_instances.map(|max| InstanceCap {
                scope: format!("{name}#{i}:{resource}"),
                max,
                hold: Duration::from_secs(rule.instance_hold_secs.unwrap_or(DEFAULT_INSTANCE_HOLD_SECS)),
            });
            Grant { reason, cap }
        };
        for name in policies {
            if let Some((p, i)) = map.get(name).and_then(|p| p.grants(operation, resource, selectors).map(|i| (p, i))) {
                return Ok(grant(name, p, i, format!("policy {name} rule {i}")));
            }
        }
        if !selectors.is_empty() {
            // Policies attached by identity; sorted by name so the reported grant is stable.
            let mut attached: Vec<(&String, &Arc<Policy>, usize)> = map
                .iter()
                .filter(|(n, _)| !policies.contains(n))
                .filter_map(|(n, p)| p.attached_by(selectors).map(|set| (n, p, set)))
                .collect();
            attached.sort_by(|a, b| a.0.cmp(b.0));
            for (name, p, set) in attached {
                if let Some(i) = p.grants(operation, resource, selectors) {
                    return Ok(grant(name, p, i, format!("policy {name} (identity set {set}) rule {i}")));
                }
            }
        }
        Err(KmsError::PermissionDenied(format!("no policy of this identity grants {operation} on {resource}")))
    }

    /// Authorize `operation` on `resource` for `who`: [`Kms::decide_grant`] with its token's
    /// policies and selectors.
    pub fn authorize(&self, who: &TokenRecord, operation: &str, resource: &str) -> Result<Grant, KmsError> {
        self.decide_grant(&who.policies, &who.selectors, operation, resource)
    }

    /// Take (or renew) `instance`'s place under `cap`. Refused when `cap.max` other live
    /// instances hold places; several servers sharing a store never admit more together.
    pub async fn hold_instance(&self, cap: &InstanceCap, instance: &str) -> Result<(), KmsError> {
        match self.store.hold_instance(&cap.scope, instance, cap.max, cap.hold).await? {
            InstanceHold::Held => Ok(()),
            InstanceHold::Full { holders } => Err(KmsError::PermissionDenied(format!(
                "{holders} live instances already use this grant ({}, at most {}); a place frees up when one \
                 has not used it for {} s",
                cap.scope,
                cap.max,
                cap.hold.as_secs()
            ))),
        }
    }

    /// The policies that apply to a caller: those named on its token, then those attached by
    /// its selectors (with the index of the identity set that matched).
    pub fn effective_policies(&self, who: &TokenRecord) -> Result<Vec<(String, Option<usize>)>, KmsError> {
        let map = self.policies.read().map_err(|_| KmsError::Internal("policy cache poisoned".into()))?;
        let mut out: Vec<(String, Option<usize>)> = who.policies.iter().map(|p| (p.clone(), None)).collect();
        let mut attached: Vec<(String, Option<usize>)> = map
            .iter()
            .filter(|(n, _)| !who.policies.contains(n))
            .filter_map(|(n, p)| p.attached_by(&who.selectors).map(|set| (n.clone(), Some(set))))
            .collect();
        attached.sort();
        out.extend(attached);
        Ok(out)
    }
}
