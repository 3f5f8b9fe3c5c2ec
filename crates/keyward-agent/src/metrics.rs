//! The node agent's metrics (`keyward agent --metrics-listen ADDR`, `GET /metrics`): sessions
//! opened, releases by operation and status, refusals by reason, answers replayed from the
//! outage cache.

use keyward_metrics::prometheus_client::encoding::EncodeLabelSet;
use keyward_metrics::prometheus_client::metrics::counter::Counter;
use keyward_metrics::prometheus_client::metrics::family::Family;
use keyward_metrics::prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    op: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The agent's counters.
pub struct AgentMetrics {
    registry: Registry,
    sessions: Counter,
    releases: Family<ReleaseLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    replays: Counter,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keyward_agent");
        let sessions = Counter::default();
        registry.register("sessions", "Sessions opened (a caller measured and bound to a session)", sessions.clone());
        let releases = Family::<ReleaseLabels, Counter>::default();
        registry.register(
            "releases",
            "Releases relayed to the server, by operation and the status answered",
            releases.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register("refusals", "Requests the agent refused itself, by reason", refusals.clone());
        let replays = Counter::default();
        registry.register(
            "outage_replays",
            "Answers replayed from the outage cache while the server was unreachable",
            replays.clone(),
        );
        Self { registry, sessions, releases, refusals, replays }
    }
}

impl AgentMetrics {
    pub(crate) fn session(&self) {
        self.sessions.inc();
    }

    pub(crate) fn release(&self, op: &'static str, status: u16) {
        self.releases.get_or_create(&ReleaseLabels { op, status }).inc();
    }

    pub(crate) fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn replay(&self) {
        self.replays.inc();
    }

    /// The OpenMetrics text.
    pub fn text(&self) -> String {
        keyward_metrics::text(&self.registry)
    }
}
