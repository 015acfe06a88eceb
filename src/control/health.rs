//! `grpc.health.v1` for Kubernetes probes: readiness follows the data plane, liveness
//! follows only the process.
//!
//! Service `""` and the named services are SERVING exactly while every readiness
//! condition holds (for the server: master reachable through Sentinel and subscriptions
//! live; for a bidder: its event subscription live and the server SERVING). The `liveness`
//! service stays SERVING while the process answers, so a Redis outage marks pods unready
//! without making the kubelet restart them.

use futures_util::future::select_all;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use std::sync::Arc;

use crate::link::sentinel::Master;
use crate::runtime::metrics::Metrics;
use crate::runtime::task::TaskGuard;

/// Health service name that follows the process, not its dependencies.
pub const LIVENESS: &str = "liveness";
/// The admin service's health name.
pub const ADMIN_SERVICE: &str = "auction.v1.AuctionAdmin";

/// A readiness condition as a watch of `bool`.
pub type Condition = watch::Receiver<bool>;

/// True while the master handle has a live link. Counts master changes in `metrics`.
pub fn master_up(master: &Master, metrics: Option<Arc<Metrics>>) -> (Condition, TaskGuard) {
    let mut links = master.watch();
    let (tx, rx) = watch::channel(links.borrow().is_some());
    let task = tokio::spawn(async move {
        let mut last_generation = links.borrow().as_ref().map(|l| l.generation);
        while links.changed().await.is_ok() {
            let generation = links.borrow().as_ref().map(|l| l.generation);
            if let (Some(g), Some(m)) = (generation, &metrics) {
                if last_generation.is_some_and(|last| g > last) {
                    m.master_changes.inc();
                }
                last_generation = Some(g);
            }
            let up = generation.is_some();
            tx.send_if_modified(|v| std::mem::replace(v, up) != up);
        }
    });
    (rx, TaskGuard::new("health: master link", task))
}

/// True while every input is true.
pub fn all_of(mut inputs: Vec<Condition>) -> (Condition, TaskGuard) {
    let now = |inputs: &[Condition]| inputs.iter().all(|c| *c.borrow());
    let (tx, rx) = watch::channel(now(&inputs));
    let task = tokio::spawn(async move {
        loop {
            let value = now(&inputs);
            tx.send_if_modified(|v| std::mem::replace(v, value) != value);
            if inputs.is_empty() {
                return;
            }
            let changes = inputs.iter_mut().map(|c| Box::pin(c.changed()));
            let (result, _, _) = select_all(changes).await;
            if result.is_err() {
                // An input's owner is gone: treat as permanently not ready.
                tx.send_replace(false);
                return;
            }
        }
    });
    (rx, TaskGuard::new("health: readiness", task))
}

/// Keeps `services` (and `""`) in step with `ready`; sets `liveness` SERVING; mirrors the
/// state in the `serving` gauge.
pub fn report(
    reporter: HealthReporter,
    services: &'static [&'static str],
    mut ready: Condition,
    metrics: Option<Arc<Metrics>>,
) -> TaskGuard {
    let task = tokio::spawn(async move {
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        loop {
            let status = if *ready.borrow_and_update() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for s in std::iter::once(&"").chain(services) {
                reporter.set_service_status(*s, status).await;
            }
            if let Some(m) = &metrics {
                m.serving.set(i64::from(status == ServingStatus::Serving));
            }
            tracing::info!(?status, "readiness");
            if ready.changed().await.is_err() {
                return;
            }
        }
    });
    TaskGuard::new("health: reporter", task)
}

/// Marks everything but `liveness` NOT_SERVING (shutdown has begun).
pub async fn not_serving(reporter: &HealthReporter, services: &[&str]) {
    for s in std::iter::once(&"").chain(services) {
        reporter
            .set_service_status(*s, ServingStatus::NotServing)
            .await;
    }
}
