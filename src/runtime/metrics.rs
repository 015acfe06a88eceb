//! Metrics operators expect, in Prometheus text format on `METRICS_ADDR` (`GET /metrics`).
//!
//! Handles are cheap clones of atomics (prometheus-client), so the hot path pays an atomic
//! add; the registry is only walked when Prometheus scrapes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::runtime::task::TaskGuard;

/// Labels `{reason="…"}`.
pub type ReasonLabels = Vec<(String, String)>;

/// Every metric of the server (the bidder uses the subset it needs).
pub struct Metrics {
    registry: Registry,
    /// Command-channel messages received.
    pub messages_received: Counter,
    /// Messages refused at the boundary, by reason.
    pub messages_malformed: Family<ReasonLabels, Counter>,
    /// Bids judged and accepted.
    pub bids_accepted: Counter,
    /// Bids rejected, by reason (judged on price, or refused: unknown / closed / late).
    pub bids_rejected: Family<ReasonLabels, Counter>,
    /// Retries answered with their first outcome.
    pub bids_duplicate: Counter,
    /// Bids refused `unauthenticated` (`BID_AUTH=required`).
    pub bids_unauthenticated: Counter,
    /// Bids left to the server that holds the auction's lease (dropped from the shadow).
    pub bids_left_to_owner: Counter,
    /// Bids whose outcome is stored but could not be announced yet (bidders retry).
    pub bids_deferred: Counter,
    /// Leases acquired.
    pub leases_acquired: Counter,
    /// Leases lost (fenced, expired or taken over).
    pub leases_lost: Counter,
    /// Master changes seen (failovers, reconnections to a new master).
    pub master_changes: Counter,
    /// Events published.
    pub events_published: Counter,
    /// Auctions opened by this server.
    pub auctions_opened: Counter,
    /// Auctions closed by this server.
    pub auctions_closed: Counter,
    /// Auctions open right now (all servers), as seen by this server's closer.
    pub open_auctions: Gauge,
    /// Seconds from a batch's start to its events being published.
    pub processing_seconds: Histogram,
    /// 1 while health is SERVING, else 0.
    pub serving: Gauge,
    /// Closed auctions taken out of the indexes after their retention ran out.
    pub auctions_forgotten: Counter,
    /// Bids the router keeps outside workers' queues (shadows of other servers' auctions,
    /// work waiting for a close in flight), under one global cap.
    pub router_kept_bids: Gauge,
    /// Auctions the router has a slot for (worker, note about another holder, close).
    pub router_slots: Gauge,
    /// The Redis master's `used_memory`, bytes.
    pub redis_used_memory: Gauge,
    /// The Redis master's `maxmemory`, bytes (0 = no limit).
    pub redis_maxmemory: Gauge,
    /// Bids sent by a bidder (first attempts).
    pub bids_sent: Counter,
    /// Bids re-published by a bidder.
    pub bids_retried: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered under the `auction_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("auction");
        let m = Metrics {
            registry: Registry::default(),
            messages_received: Counter::default(),
            messages_malformed: Family::default(),
            bids_accepted: Counter::default(),
            bids_rejected: Family::default(),
            bids_duplicate: Counter::default(),
            bids_unauthenticated: Counter::default(),
            bids_left_to_owner: Counter::default(),
            bids_deferred: Counter::default(),
            leases_acquired: Counter::default(),
            leases_lost: Counter::default(),
            master_changes: Counter::default(),
            events_published: Counter::default(),
            auctions_opened: Counter::default(),
            auctions_closed: Counter::default(),
            open_auctions: Gauge::default(),
            processing_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            serving: Gauge::default(),
            auctions_forgotten: Counter::default(),
            router_kept_bids: Gauge::default(),
            router_slots: Gauge::default(),
            redis_used_memory: Gauge::default(),
            redis_maxmemory: Gauge::default(),
            bids_sent: Counter::default(),
            bids_retried: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "messages_received",
            "Command-channel messages received",
            m.messages_received.clone(),
        );
        r.register(
            "messages_malformed",
            "Messages refused at the boundary, by reason",
            m.messages_malformed.clone(),
        );
        r.register("bids_accepted", "Bids accepted", m.bids_accepted.clone());
        r.register(
            "bids_rejected",
            "Bids rejected, by reason",
            m.bids_rejected.clone(),
        );
        r.register(
            "bids_duplicate",
            "Retried bids answered with their first outcome",
            m.bids_duplicate.clone(),
        );
        r.register(
            "bids_unauthenticated",
            "Bids refused because their signature is missing or wrong or their bidder unknown",
            m.bids_unauthenticated.clone(),
        );
        r.register(
            "bids_left_to_owner",
            "Bids left to the server holding the auction's lease",
            m.bids_left_to_owner.clone(),
        );
        r.register(
            "bids_deferred",
            "Bids stored but not yet announced (bidders retry)",
            m.bids_deferred.clone(),
        );
        r.register(
            "leases_acquired",
            "Auction leases acquired",
            m.leases_acquired.clone(),
        );
        r.register(
            "leases_lost",
            "Auction leases lost (fenced, expired, taken over)",
            m.leases_lost.clone(),
        );
        r.register(
            "master_changes",
            "Redis master links established after the first (failovers)",
            m.master_changes.clone(),
        );
        r.register(
            "events_published",
            "Events published on the event channel",
            m.events_published.clone(),
        );
        r.register(
            "auctions_opened",
            "Auctions opened by this process",
            m.auctions_opened.clone(),
        );
        r.register(
            "auctions_closed",
            "Auctions closed by this process",
            m.auctions_closed.clone(),
        );
        r.register(
            "open_auctions",
            "Auctions open now (from auctions:open)",
            m.open_auctions.clone(),
        );
        r.register(
            "processing_seconds",
            "Seconds from judging a batch to publishing its events",
            m.processing_seconds.clone(),
        );
        r.register(
            "serving",
            "1 while grpc.health.v1 readiness is SERVING",
            m.serving.clone(),
        );
        r.register(
            "auctions_forgotten",
            "Closed auctions taken out of the indexes after their retention",
            m.auctions_forgotten.clone(),
        );
        r.register(
            "router_kept_bids",
            "Bids kept by the router outside worker queues (shadows, closes in flight)",
            m.router_kept_bids.clone(),
        );
        r.register(
            "router_slots",
            "Auctions the router has a slot for",
            m.router_slots.clone(),
        );
        r.register(
            "redis_used_memory_bytes",
            "The Redis master's used_memory (INFO memory), bytes",
            m.redis_used_memory.clone(),
        );
        r.register(
            "redis_maxmemory_bytes",
            "The Redis master's maxmemory (INFO memory), bytes; 0 = no limit",
            m.redis_maxmemory.clone(),
        );
        r.register("bids_sent", "Bids sent by this bidder", m.bids_sent.clone());
        r.register(
            "bids_retried",
            "Unanswered bids re-published by this bidder",
            m.bids_retried.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a rejection with its reason.
    pub fn rejected(&self, reason: &str) {
        self.bids_rejected
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Counts a malformed message with its reason.
    pub fn malformed(&self, reason: &str) {
        self.messages_malformed
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The main counters by name, for the shutdown log line and tests.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([
            ("messages_received", self.messages_received.get()),
            ("bids_accepted", self.bids_accepted.get()),
            ("bids_duplicate", self.bids_duplicate.get()),
            ("bids_unauthenticated", self.bids_unauthenticated.get()),
            ("bids_left_to_owner", self.bids_left_to_owner.get()),
            ("bids_deferred", self.bids_deferred.get()),
            ("leases_acquired", self.leases_acquired.get()),
            ("leases_lost", self.leases_lost.get()),
            ("events_published", self.events_published.get()),
            ("auctions_opened", self.auctions_opened.get()),
            ("auctions_closed", self.auctions_closed.get()),
        ])
    }
}

/// Adds one.
pub fn inc(c: &Counter) {
    c.inc();
}

/// Adds `n`.
pub fn add(c: &Counter, n: u64) {
    c.inc_by(n);
}

/// Serves `GET /metrics` on `addr` (`METRICS_ADDR`) when one is configured; returns the
/// serving task, which stops when dropped.
pub async fn serve(
    addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<TaskGuard>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = crate::runtime::process::listen(addr, "METRICS_ADDR").await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics endpoint failed");
        }
    });
    info!(%bound, "metrics listening (GET /metrics)");
    Ok(Some(TaskGuard::new("metrics endpoint", task)))
}
