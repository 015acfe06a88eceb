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

use crate::sentinel::Master;
use crate::task::TaskGuard;

/// Health service name that follows the process, not its dependencies.
pub const LIVENESS: &str = "liveness";
/// The admin service's health name.
pub const ADMIN_SERVICE: &str = "auction.v1.AuctionAdmin";

/// A readiness condition as a watch of `bool`.
pub type Condition = watch::Receiver<bool>;

/// True while the master handle has a live link.
pub fn master_up(master: &Master) -> (Condition, TaskGuard) {
    let mut links = master.watch();
    let (tx, rx) = watch::channel(links.borrow().is_some());
    let task = tokio::spawn(async move {
        while links.changed().await.is_ok() {
            let up = links.borrow().is_some();
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

/// Keeps `services` (and `""`) in step with `ready`; sets `liveness` SERVING.
pub fn report(
    reporter: HealthReporter,
    services: &'static [&'static str],
    mut ready: Condition,
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
