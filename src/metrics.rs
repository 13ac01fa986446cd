//! keygate's own Prometheus metrics, served as text on the metrics listener (`GET /metrics`).
//! Counters on the hot path are pre-resolved, so recording one is an atomic add.

use std::{fmt::Write as _, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::domain::decision::{Decision, DenyReason};

/// Which front door a decision came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Authorize,
    Envoy,
}

impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Authorize => "authorize",
            Self::Envoy => "envoy",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Outcome(Option<DenyReason>);

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.map_or("ALLOWED", DenyReason::as_str))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    transport: Transport,
    decision: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClosedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Why keygate closed a connection it had accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionClose {
    /// No request started within the handshake deadline.
    Handshake,
    /// No request in flight for the idle timeout.
    Idle,
}

impl ConnectionClose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake_timeout",
            Self::Idle => "idle_timeout",
        }
    }
}

/// One listener's connection counts.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub open: Gauge,
    pub refused: Counter,
    closed_handshake: Counter,
    closed_idle: Counter,
}

impl ListenerMetrics {
    pub fn closed(&self, close: ConnectionClose) -> &Counter {
        match close {
            ConnectionClose::Handshake => &self.closed_handshake,
            ConnectionClose::Idle => &self.closed_idle,
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Indexed by transport, then by outcome (allowed first, then `DenyReason::ALL`).
    decisions: [[Counter; 7]; 2],
    pub decision_seconds: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub argon2_matches: Counter,
    pub argon2_mismatches: Counter,
    pub argon2_queue_depth: Gauge,
    pub key_digest_upgrades: Counter,
    pub store_changes: Counter,
    pub store_errors: Counter,
    pub usage_flushes: Counter,
    connections_open: Family<ListenerLabels, Gauge>,
    connections_refused: Family<ListenerLabels, Counter>,
    connections_closed: Family<ClosedLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("keygate");
        let decisions_family = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Authorization decisions by transport and outcome (ALLOWED or the deny reason)",
            decisions_family.clone(),
        );
        let outcomes: Vec<Outcome> = std::iter::once(Outcome(None))
            .chain(DenyReason::ALL.into_iter().map(|r| Outcome(Some(r))))
            .collect();
        let decisions = [Transport::Authorize, Transport::Envoy].map(|transport| {
            std::array::from_fn(|i| {
                decisions_family
                    .get_or_create(&DecisionLabels {
                        transport,
                        decision: outcomes[i],
                    })
                    .clone()
            })
        });

        // 5 µs .. ~1.3 s: keys in memory sit in the first buckets, argon2 runs in the last ones.
        let decision_seconds = Histogram::new(exponential_buckets(5e-6, 2.5, 14));
        registry.register(
            "decision_duration_seconds",
            "Time to decide one authorization request, including any store and argon2 work",
            decision_seconds.clone(),
        );

        let cache = Family::<ResultLabels, Counter>::default();
        registry.register(
            "credential_cache_lookups",
            "Key lookups (hit: a key held in memory allowed without the store; miss: a store read)",
            cache.clone(),
        );
        let argon2 = Family::<ResultLabels, Counter>::default();
        registry.register(
            "argon2_verifications",
            "argon2id verifications run (operators' passwords, version-1 keys), by result",
            argon2.clone(),
        );
        let argon2_queue_depth = Gauge::default();
        registry.register(
            "argon2_queue_depth",
            "argon2 jobs waiting for or holding a worker",
            argon2_queue_depth.clone(),
        );
        let key_digest_upgrades = Counter::default();
        registry.register(
            "key_digest_upgrades",
            "Version-1 keys whose argon2id hash this process replaced by their SHA-256 digest",
            key_digest_upgrades.clone(),
        );
        let store_changes = Counter::default();
        registry.register(
            "store_change_notifications",
            "Key and auth-mode change notifications received from the store (revocations)",
            store_changes.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Store operations that failed (database unreachable or erroring)",
            store_errors.clone(),
        );
        let usage_flushes = Counter::default();
        registry.register(
            "last_used_flushes",
            "Batched last_used_at writes",
            usage_flushes.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Connections held, by listener",
            connections_open.clone(),
        );
        let connections_refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed as soon as accepted: the listener held its maximum",
            connections_refused.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections keygate closed: no request within the handshake deadline, or idle",
            connections_closed.clone(),
        );
        let hit = |family: &Family<ResultLabels, Counter>, result| {
            family.get_or_create(&ResultLabels { result }).clone()
        };
        Arc::new(Self {
            decisions,
            decision_seconds,
            cache_hits: hit(&cache, "hit"),
            cache_misses: hit(&cache, "miss"),
            argon2_matches: hit(&argon2, "match"),
            argon2_mismatches: hit(&argon2, "mismatch"),
            argon2_queue_depth,
            key_digest_upgrades,
            store_changes,
            store_errors,
            usage_flushes,
            connections_open,
            connections_refused,
            connections_closed,
            registry,
        })
    }

    /// The connection counts of the listener called `listener`.
    pub fn listener(&self, listener: &'static str) -> ListenerMetrics {
        let closed = |close: ConnectionClose| {
            self.connections_closed
                .get_or_create(&ClosedLabels {
                    listener,
                    reason: close.as_str(),
                })
                .clone()
        };
        let labels = ListenerLabels { listener };
        ListenerMetrics {
            open: self.connections_open.get_or_create(&labels).clone(),
            refused: self.connections_refused.get_or_create(&labels).clone(),
            closed_handshake: closed(ConnectionClose::Handshake),
            closed_idle: closed(ConnectionClose::Idle),
        }
    }

    pub fn record_decision(&self, transport: Transport, decision: &Decision, seconds: f64) {
        let outcome = match decision.deny_reason() {
            None => 0,
            Some(reason) => {
                1 + DenyReason::ALL
                    .iter()
                    .position(|r| *r == reason)
                    .unwrap_or(0)
            }
        };
        self.decisions[transport as usize][outcome].inc();
        self.decision_seconds.observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
            let _ = writeln!(text, "# keygate: failed to encode metrics");
        }
        text
    }
}
