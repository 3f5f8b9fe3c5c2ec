//! The server's side of the audit log: the per-request audit context that authentication and
//! authorization fill in. The log itself (writer, chain, verifier, anchors) is `keyward-audit`,
//! re-exported here; the task that keeps each log's anchor in the store is `keyward-seal`'s
//! (the log opens at unseal).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub use keyward_audit::*;

/// Per-request audit facts, filled in by authentication and authorization.
#[derive(Debug, Default)]
pub struct AuditCtx {
    inner: Mutex<CtxFields>,
    /// Places the caller must take under live-instance caps before the answer leaves (each
    /// cap, and the caller's pod UID): one per capped grant the request used.
    instance: Mutex<Vec<(keyward_core::service::InstanceCap, String)>>,
    /// The handler already made this request's record durable (a release batch writes its own
    /// together with its releases' records, in one group commit).
    recorded: AtomicBool,
}

#[derive(Debug, Default, Clone)]
struct CtxFields {
    identity: Option<String>,
    client: Option<String>,
    operation: Option<String>,
    resource: Option<String>,
    decision: Option<&'static str>,
    reason: Option<String>,
    context: Option<std::collections::BTreeMap<String, String>>,
}

impl AuditCtx {
    /// Record who the caller is.
    pub fn set_identity(&self, accessor: &str) {
        if let Ok(mut f) = self.inner.lock() {
            f.identity = Some(accessor.to_string());
        }
    }

    /// A context for a part of this request audited on its own (one release of an agent's
    /// batch): the same caller, no decision yet.
    pub fn part(&self) -> Self {
        let (identity, client) =
            self.inner.lock().ok().map(|f| (f.identity.clone(), f.client.clone())).unwrap_or_default();
        Self { inner: Mutex::new(CtxFields { identity, client, ..CtxFields::default() }), ..Self::default() }
    }

    /// Record where the request came from (the TCP peer).
    pub fn set_client(&self, client: String) {
        if let Ok(mut f) = self.inner.lock() {
            f.client = Some(client);
        }
    }

    /// Note that the handler has written this request's record itself.
    pub fn mark_recorded(&self) {
        self.recorded.store(true, Ordering::Release);
    }

    /// Whether the handler has written this request's record itself.
    pub fn is_recorded(&self) -> bool {
        self.recorded.load(Ordering::Acquire)
    }

    /// Record an authorization decision (the last one wins; each request makes one).
    pub fn set_decision(&self, operation: &str, resource: &str, allowed: bool, reason: String) {
        if let Ok(mut f) = self.inner.lock() {
            f.operation = Some(operation.to_string());
            f.resource = Some(resource.to_string());
            f.decision = Some(if allowed { "allow" } else { "deny" });
            f.reason = Some(reason);
        }
    }

    /// Note that a grant this request used caps live instances: `instance` must hold a place
    /// under `cap` before the answer leaves. Caps add up: a request that needs two grants
    /// (re-encrypt) must take a place under each capped one.
    pub fn add_instance_cap(&self, cap: keyward_core::service::InstanceCap, instance: String) {
        if let Ok(mut c) = self.instance.lock() {
            c.push((cap, instance));
        }
    }

    /// The places this request must take.
    pub fn instance_caps(&self) -> Vec<(keyward_core::service::InstanceCap, String)> {
        self.instance.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Record the encryption context of a cryptographic operation.
    pub fn set_context(&self, context: &std::collections::BTreeMap<String, String>) {
        if let Ok(mut f) = self.inner.lock() {
            f.context = (!context.is_empty()).then(|| context.clone());
        }
    }

    /// The operation and resource of the last decision.
    pub fn operation_and_resource(&self) -> Option<(String, String)> {
        let f = self.inner.lock().ok()?;
        Some((f.operation.clone()?, f.resource.clone()?))
    }

    /// Record why a request was refused before authorization.
    pub fn set_reason(&self, reason: &str) {
        if let Ok(mut f) = self.inner.lock() {
            f.reason = Some(reason.to_string());
        }
    }

    /// Build the record.
    pub fn record(&self, request_id: &str, method: &str, path: &str, status: u16, error: Option<&str>) -> AuditRecord {
        let f = self.inner.lock().map(|f| f.clone()).unwrap_or_default();
        AuditRecord {
            time: now_rfc3339(),
            request_id: request_id.to_string(),
            identity: f.identity.unwrap_or_else(|| "anonymous".into()),
            method: method.to_string(),
            path: path.to_string(),
            operation: f.operation,
            resource: f.resource,
            decision: f.decision.unwrap_or("none"),
            reason: f.reason,
            status,
            error: error.map(str::to_string),
            context: f.context,
            client: f.client,
            chain: None,
        }
    }
}
