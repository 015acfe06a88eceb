//! The automatic bidder behind `auction-client`.
//!
//! It learns auctions from the event channel (and, when it starts or resubscribes after
//! an auction opened, from the server's `ListAuctions`), bids every interval (with jitter) the current
//! minimum plus a random step, up to its budget, and never outbids itself. Each bid has a
//! fresh `bid_id`; a bid with no outcome after `retry_after` is published again with the
//! same `bid_id` (the server answers duplicates with their first outcome) until it gets one
//! or the auction closes. Events are checked for `seq` gaps.
//!
//! - [`args`]: the configuration.
//! - [`summary`]: what a bidder did, returned when it stops.
//! - `bidding`: the bidder's reactions to events and ticks; `tracking`: what it knows of
//!   its auction and its bid in flight; `discovery`: finding an auction already open (a
//!   late start, a resubscription) through the server's admin API; `enroll`: getting a key
//!   of its own name from the server (`ENROLL_TOKEN`).
//!
//! Uses [`crate::control`] (its own health, the server's), [`crate::link`] and
//! [`crate::wire`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::keyspace::AuctionId;
use crate::link::sentinel::{Master, Settings};
use crate::link::subscription::Subscription;
use crate::proto::v1::auction_admin_client::AuctionAdminClient;
use crate::runtime::backoff::Backoff;
use crate::runtime::metrics::Metrics;
use crate::runtime::task::TaskGuard;
use crate::wire::Event;

pub mod args;
mod bidding;
mod discovery;
mod enroll;
pub mod summary;
mod tracking;

pub use args::BidderArgs;
use bidding::{Bidder, Flow};
use discovery::Discovery;
pub use summary::Summary;

/// Runs the bidder until its auction closes (or, with `keep_going`, until `shutdown`).
pub async fn run(args: BidderArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<Summary> {
    args.validate()?;
    let me = args.name()?;
    let only: Option<AuctionId> = args
        .auction_id
        .as_deref()
        .map(AuctionId::parse)
        .transpose()?;
    let health_listener = crate::runtime::process::listen(args.health_addr, "HEALTH_ADDR").await?;
    let health_addr = health_listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let _metrics_endpoint =
        crate::runtime::metrics::serve(args.metrics_addr, metrics.clone()).await?;
    let master = Master::start(Settings::from_args(&args.redis));
    let (tx, mut rx) = mpsc::channel(4096);
    let sub = Subscription::start(master.clone(), vec![args.redis.event_channel.clone()], tx);
    let (server_up_tx, server_up) = watch::channel(false);
    let _server_watch = TaskGuard::new(
        "server health watch",
        tokio::spawn(watch_server_health(args.server_endpoint()?, server_up_tx)),
    );
    // With ENROLL_TOKEN the bidder is not ready until it has its key.
    let enroll_token = args.enroll_token()?;
    let (has_key_tx, has_key) = watch::channel(enroll_token.is_none());
    let (reporter, health_service) = tonic_health::server::health_reporter();
    crate::control::health::not_serving(&reporter, &[]).await;
    let (ready, _ready_task) =
        crate::control::health::all_of(vec![sub.watch_live(), server_up.clone(), has_key]);
    let _health_task =
        crate::control::health::report(reporter.clone(), &[], ready, Some(metrics.clone()));
    let _health_server = TaskGuard::new(
        "bidder health server",
        tokio::spawn(async move {
            let no_shutdown = std::future::pending();
            crate::control::grpc::serve(health_listener, health_service, &[], None, no_shutdown)
                .await
        }),
    );
    info!(bidder = %me, %health_addr, server = %args.server_addr, "bidder started; health listening; waiting for the server to be SERVING and for an open auction");
    let admin = AuctionAdminClient::new(args.server_endpoint()?.connect_lazy());
    tokio::pin!(shutdown);
    let key = match enroll_token {
        None => args.key()?,
        Some(token) => {
            let enrolling = enroll::enroll(admin.clone(), &me, &token, server_up.clone());
            tokio::select! {
                key = enrolling => {
                    has_key_tx.send_replace(true);
                    Some(key?)
                }
                _ = &mut shutdown => {
                    info!(bidder = %me, "stopping on signal before enrollment");
                    return Ok(Summary::default());
                }
            }
        }
    };
    let mut bidder = Bidder {
        args: &args,
        me,
        only,
        master,
        admin,
        summary: Summary::default(),
        tracked: None,
        last_seq: HashMap::new(),
        closed: HashMap::new(),
        counter: 0,
        server_was_up: false,
        subscribed: sub.watch_live(),
        was_subscribed: false,
        discovery: Discovery::default(),
        metrics,
        key,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let flow = tokio::select! {
            _ = &mut shutdown => {
                info!(bidder = %bidder.me, "stopping on signal");
                Flow::Stop
            }
            msg = rx.recv() => match msg {
                None => Flow::Stop,
                Some(msg) => match Event::from_json(&msg.payload) {
                    Ok(event) => bidder.on_event(&event),
                    // The prototype's dialect, published beside v1 under SEED_DIALECT.
                    Err(_) if crate::wire::dialect::is_dialect(&msg.payload) => Flow::Continue,
                    Err(e) => {
                        warn!(error = %e, "ignoring an undecodable event");
                        Flow::Continue
                    }
                },
            },
            _ = tick.tick() => {
                // Copy the value out first: a watch borrow held across the await would
                // block the health watcher's send (and with it a runtime thread).
                let server_is_up = *server_up.borrow();
                bidder.on_tick(server_is_up).await?
            }
        };
        if flow == Flow::Stop {
            break;
        }
    }
    info!(bidder = %bidder.me, summary = ?bidder.summary, "bidder done");
    Ok(bidder.summary)
}

/// Follows the server's `grpc.health.v1` status (service `""`) with `Watch`, reconnecting
/// with capped backoff; publishes true exactly while it is SERVING.
async fn watch_server_health(endpoint: tonic::transport::Endpoint, up: watch::Sender<bool>) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let watched = async {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut client = HealthClient::new(channel);
            let mut stream = client
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
                backoff.reset();
                up.send_replace(msg.status == ServingStatus::Serving as i32);
            }
            Ok::<(), String>(())
        }
        .await;
        up.send_replace(false);
        if let Err(e) = watched {
            debug!(error = %e, "server health watch failed; retrying");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
