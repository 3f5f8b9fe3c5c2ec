//! The server's metrics (`GET /v1/metrics`, `--metrics-listen`): requests by route, method and
//! status with latency histograms; seal state; the audit log's pending records and sync
//! latency; store operations' latency and errors; the key cache; attested releases.
//!
//! Values that live elsewhere (seal state, the current audit log, the key cache) are read at
//! scrape time by a collector, so a re-opened audit log or a new service after an unseal is
//! what a scrape sees.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyward_core::model::*;
use keyward_core::store::{Changes, InstanceHold, SecretRead, Store, StoreError};
use keyward_metrics::prometheus_client::collector::Collector;
use keyward_metrics::prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use keyward_metrics::prometheus_client::metrics::counter::{ConstCounter, Counter};
use keyward_metrics::prometheus_client::metrics::family::Family;
use keyward_metrics::prometheus_client::metrics::gauge::ConstGauge;
use keyward_metrics::prometheus_client::metrics::histogram::Histogram;
use keyward_metrics::prometheus_client::registry::Registry;

use keyward_seal::Sealing;

/// A request's route (the template, never the names in it), method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReleaseLabels {
    outcome: &'static str,
}

/// The server's metrics.
pub struct ServerMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    pub(crate) store: StoreMetrics,
    releases: Family<ReleaseLabels, Counter>,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerMetrics")
    }
}

/// Store operations' latency and errors (see [`Metered`]).
#[derive(Clone)]
pub(crate) struct StoreMetrics {
    seconds: Family<OpLabels, Histogram>,
    errors: Family<OpLabels, Counter>,
}

impl StoreMetrics {
    fn observe<T>(&self, op: &'static str, started: Instant, r: &Result<T, StoreError>) {
        self.seconds.get_or_create(&OpLabels { op }).observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            self.errors.get_or_create(&OpLabels { op }).inc();
        }
    }
}

impl ServerMetrics {
    /// Metrics for a server whose seal state is `sealing` (set with [`ServerMetrics::watch`]).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyward");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            keyward_metrics::latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's headers to its answer (audit record durable), by route and method",
            latency.clone(),
        );
        let store = StoreMetrics {
            seconds: Family::new_with_constructor(keyward_metrics::latency_histogram as fn() -> Histogram),
            errors: Family::default(),
        };
        registry.register("store_operation_duration_seconds", "Store operations, by operation", store.seconds.clone());
        registry.register("store_errors", "Store operations that failed, by operation", store.errors.clone());
        let releases = Family::<ReleaseLabels, Counter>::default();
        registry.register(
            "agent_releases",
            "Releases node agents asked for, by outcome (allowed, refused, failed)",
            releases.clone(),
        );
        Self { registry, requests, latency, store, releases }
    }

    /// Read the seal state, audit log and key cache of `sealing` at each scrape.
    pub fn watch(&mut self, sealing: Arc<Sealing>) {
        self.registry.register_collector(Box::new(Scraped { sealing }));
    }

    /// Count an answered request.
    pub(crate) fn request(&self, route: &str, method: &str, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { route: route.into(), method: method.into(), status }).inc();
        self.latency
            .get_or_create(&RouteLabels { route: route.into(), method: method.into() })
            .observe(took.as_secs_f64());
    }

    /// Count an attested release by its status.
    pub(crate) fn release(&self, status: u16) {
        let outcome = match status {
            200..=299 => "allowed",
            401 | 403 => "refused",
            _ => "failed",
        };
        self.releases.get_or_create(&ReleaseLabels { outcome }).inc();
    }

    /// The OpenMetrics text.
    pub fn text(&self) -> String {
        keyward_metrics::text(&self.registry)
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Scraped {
    sealing: Arc<Sealing>,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let unsealed = self.sealing.unsealed();
        gauge(&mut e, "sealed", "1 while the server is sealed", i64::from(unsealed.is_none()))?;
        if let Some(u) = unsealed {
            let (hits, misses) = u.kms.key_cache_stats();
            counter(&mut e, "key_cache_hits", "Key lookups answered from memory", hits)?;
            counter(&mut e, "key_cache_misses", "Key lookups that went to the store", misses)?;
            if let Some(a) = &u.audit {
                let s = a.stats();
                use std::sync::atomic::Ordering::Relaxed;
                gauge(
                    &mut e,
                    "audit_pending_records",
                    "Audit records offered and not yet durable (requests waiting for the log)",
                    i64::try_from(s.pending.load(Relaxed)).unwrap_or(i64::MAX),
                )?;
                counter(
                    &mut e,
                    "audit_records",
                    "Audit records made durable since the log was opened",
                    s.records.load(Relaxed),
                )?;
                gauge(&mut e, "audit_healthy", "1 while the last audit write succeeded", i64::from(a.is_healthy()))?;
                let h = &s.sync_seconds;
                h.encode(e.encode_descriptor(
                    "audit_sync_duration_seconds",
                    "Audit group commits: one write and its fdatasync",
                    None,
                    h.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

/// A store whose every operation is timed, and counted when it fails.
pub(crate) struct Metered {
    inner: Arc<dyn Store>,
    m: StoreMetrics,
}

impl Metered {
    pub(crate) fn wrap(inner: Arc<dyn Store>, m: StoreMetrics) -> Arc<dyn Store> {
        Arc::new(Self { inner, m })
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self.m.observe($op, started, &r);
        r
    }};
}

#[async_trait]
impl Store for Metered {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        timed!(self, "get_meta", self.inner.get_meta(key))
    }
    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        timed!(self, "put_meta_if_absent", self.inner.put_meta_if_absent(key, value))
    }
    async fn replace_meta(&self, key: &str, expected: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        timed!(self, "replace_meta", self.inner.replace_meta(key, expected, value))
    }
    async fn create_key(&self, key: &KeyRecord, first: &KeyVersionRecord) -> Result<(), StoreError> {
        timed!(self, "create_key", self.inner.create_key(key, first))
    }
    async fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        timed!(self, "get_key", self.inner.get_key(name))
    }
    async fn get_key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        timed!(self, "get_key_by_id", self.inner.get_key_by_id(id))
    }
    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        timed!(self, "list_keys", self.inner.list_keys(after, limit))
    }
    async fn update_key(&self, key: &KeyRecord, expected_revision: u64) -> Result<(), StoreError> {
        timed!(self, "update_key", self.inner.update_key(key, expected_revision))
    }
    async fn add_key_version(
        &self,
        key: &KeyRecord,
        version: &KeyVersionRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        timed!(self, "add_key_version", self.inner.add_key_version(key, version, expected_revision))
    }
    async fn get_key_versions(&self, id: &KeyId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        timed!(self, "get_key_versions", self.inner.get_key_versions(id))
    }
    async fn rewrap_key_version(
        &self,
        id: &KeyId,
        version: u32,
        expected: &[u8],
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        timed!(self, "rewrap_key_version", self.inner.rewrap_key_version(id, version, expected, wrapped))
    }
    async fn keys_due(&self, now: i64, limit: u32) -> Result<Vec<KeyRecord>, StoreError> {
        timed!(self, "keys_due", self.inner.keys_due(now, limit))
    }
    async fn delete_key(&self, id: &KeyId, expected_revision: u64) -> Result<(), StoreError> {
        timed!(self, "delete_key", self.inner.delete_key(id, expected_revision))
    }
    async fn put_secret_version(&self, version: &SecretVersionRecord, expected_current: u32) -> Result<(), StoreError> {
        timed!(self, "put_secret_version", self.inner.put_secret_version(version, expected_current))
    }
    async fn get_secret(&self, path: &str) -> Result<Option<SecretRecord>, StoreError> {
        timed!(self, "get_secret", self.inner.get_secret(path))
    }
    async fn get_secret_version(&self, path: &str, version: u32) -> Result<Option<SecretVersionRecord>, StoreError> {
        timed!(self, "get_secret_version", self.inner.get_secret_version(path, version))
    }
    async fn read_secret(&self, path: &str, version: Option<u32>) -> Result<Option<SecretRead>, StoreError> {
        timed!(self, "read_secret", self.inner.read_secret(path, version))
    }
    async fn list_secret_versions(&self, path: &str) -> Result<Vec<SecretVersionRecord>, StoreError> {
        timed!(self, "list_secret_versions", self.inner.list_secret_versions(path))
    }
    async fn list_secrets(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError> {
        timed!(self, "list_secrets", self.inner.list_secrets(prefix, after, limit))
    }
    async fn set_secret_versions_deleted(
        &self,
        path: &str,
        versions: &[u32],
        deleted_at: Option<i64>,
    ) -> Result<u32, StoreError> {
        timed!(self, "set_secret_versions_deleted", self.inner.set_secret_versions_deleted(path, versions, deleted_at))
    }
    async fn destroy_secret_versions(&self, path: &str, versions: &[u32]) -> Result<u32, StoreError> {
        timed!(self, "destroy_secret_versions", self.inner.destroy_secret_versions(path, versions))
    }
    async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        timed!(self, "put_token", self.inner.put_token(token))
    }
    async fn get_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        timed!(self, "get_token", self.inner.get_token(hash))
    }
    async fn set_token_expiry(&self, accessor: &str, expires_at: Option<i64>) -> Result<(), StoreError> {
        timed!(self, "set_token_expiry", self.inner.set_token_expiry(accessor, expires_at))
    }
    async fn use_token(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError> {
        timed!(self, "use_token", self.inner.use_token(hash))
    }
    async fn delete_tokens(&self, accessors: &[String]) -> Result<u32, StoreError> {
        timed!(self, "delete_tokens", self.inner.delete_tokens(accessors))
    }
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        timed!(self, "list_tokens", self.inner.list_tokens())
    }
    async fn put_policy(&self, name: &str, document: &str, now: i64) -> Result<(), StoreError> {
        timed!(self, "put_policy", self.inner.put_policy(name, document, now))
    }
    async fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        timed!(self, "delete_policy", self.inner.delete_policy(name))
    }
    async fn list_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        timed!(self, "list_policies", self.inner.list_policies())
    }
    async fn get_policy(&self, name: &str) -> Result<Option<String>, StoreError> {
        timed!(self, "get_policy", self.inner.get_policy(name))
    }
    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        timed!(self, "acquire_lease", self.inner.acquire_lease(name, holder, ttl))
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        timed!(self, "release_lease", self.inner.release_lease(name, holder))
    }
    async fn hold_instance(
        &self,
        scope: &str,
        instance: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<InstanceHold, StoreError> {
        timed!(self, "hold_instance", self.inner.hold_instance(scope, instance, max, ttl))
    }
    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
    async fn changes_since(&self, cursor: Option<u64>, limit: u32) -> Result<Changes, StoreError> {
        timed!(self, "changes_since", self.inner.changes_since(cursor, limit))
    }
    async fn wait_for_changes(&self, max: Duration) {
        self.inner.wait_for_changes(max).await;
    }
    async fn prune_changes(&self, age: Duration) -> Result<u64, StoreError> {
        timed!(self, "prune_changes", self.inner.prune_changes(age))
    }
    async fn snapshot(&self) -> Result<std::fs::File, StoreError> {
        timed!(self, "snapshot", self.inner.snapshot())
    }
}
