//! The auction server: wires the Sentinel link, the command subscription, the router and
//! its workers, the closer and the group commit together, and shuts them down in order.
//!
//! Intake is one task reading the command channel in arrival order: it validates each
//! message at the boundary (bad ones are counted, logged with the reason and, when they
//! name a bid, answered with `bid_rejected`) and hands good bids to the router. Nothing
//! here blocks on Redis per message except the bounded hand-off, so a flood of garbage
//! cannot stall valid bids behind round trips.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::announcer::Announcer;
use crate::backoff::Backoff;
use crate::config::{RedisArgs, parse_duration};
use crate::hub::Hub;
use crate::keyspace::{AuctionId, truncate};
use crate::ledger::AuctionSpec;
use crate::metrics::{Metrics, inc};
use crate::router::Router;
use crate::sentinel::{Master, Settings};
use crate::subscription::Subscription;
use crate::task::TaskGuard;
use crate::wire::{self, CloseRequest, Event};
use crate::worker::{WorkerContext, WorkerSettings};

/// Default auction duration.
pub const DEFAULT_AUCTION_DURATION: &str = "30s";

/// Server configuration (flags with environment fallbacks).
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// Redis / Sentinel / channel settings.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Open one auction for ITEM at start, as the prototype did.
    #[arg(long, env = "OPEN_ON_START", value_name = "ITEM")]
    pub open_on_start: Option<String>,
    /// Duration of auctions opened without an explicit one.
    #[arg(long, env = "AUCTION_DURATION", default_value = DEFAULT_AUCTION_DURATION, value_parser = parse_duration)]
    pub auction_duration: Duration,
    /// Starting price of --open-on-start auctions, minor units.
    #[arg(long, env = "STARTING_PRICE", default_value_t = 100)]
    pub starting_price: u64,
    /// Minimum increment of --open-on-start auctions, minor units.
    #[arg(long, env = "MIN_INCREMENT", default_value_t = 10)]
    pub min_increment: u64,
    /// Reserve price of --open-on-start auctions, minor units (0 = none).
    #[arg(long, env = "RESERVE_PRICE", default_value_t = 0)]
    pub reserve_price: u64,
    /// Replicas that must acknowledge a write before its outcome is announced (0 = don't wait).
    #[arg(long, env = "WAIT_REPLICAS", default_value_t = 1)]
    pub wait_replicas: u32,
    /// Bound on each WAIT for replicas.
    #[arg(long, env = "WAIT_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub wait_timeout: Duration,
    /// Lease on an auction's lock; another server takes over this long after a crash.
    #[arg(long, env = "LOCK_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub lock_lease: Duration,
    /// Bound on draining in-flight work at shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Where the gRPC admin API, health and reflection listen.
    #[arg(long, env = "GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,
    /// Bearer token required by mutating admin calls (unset = no auth; set it in production).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Where Prometheus metrics are served (`GET /metrics`); unset = no metrics endpoint.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Server-to-server channel (forwarded admin closes); only servers may publish on it.
    #[arg(long, env = "CONTROL_CHANNEL", default_value = DEFAULT_CONTROL_CHANNEL, value_parser = crate::config::parse_channel)]
    pub control_channel: String,
}

/// Default gRPC listen address.
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:50051";
/// Default control channel.
pub const DEFAULT_CONTROL_CHANNEL: &str = "auction-control";

impl ServerArgs {
    /// Defaults for a local topology (tests, demos).
    pub fn local(redis: RedisArgs) -> Self {
        Self {
            redis,
            open_on_start: None,
            auction_duration: Duration::from_secs(30),
            starting_price: 100,
            min_increment: 10,
            reserve_price: 0,
            wait_replicas: 1,
            wait_timeout: Duration::from_millis(500),
            lock_lease: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: None,
            metrics_addr: None,
            control_channel: DEFAULT_CONTROL_CHANNEL.into(),
        }
    }

    /// The spec of the --open-on-start auction.
    pub fn open_on_start_spec(&self) -> Option<AuctionSpec> {
        self.open_on_start.as_ref().map(|item| AuctionSpec {
            item: item.clone(),
            duration: self.auction_duration,
            starting_price: self.starting_price,
            min_increment: self.min_increment,
            reserve_price: self.reserve_price,
        })
    }

    /// Validates everything clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.redis.validate().map_err(anyhow::Error::msg)?;
        if let Some(spec) = self.open_on_start_spec() {
            spec.validate().context("invalid --open-on-start auction")?;
        }
        if self.lock_lease < Duration::from_millis(300) {
            anyhow::bail!("LOCK_LEASE must be at least 300ms");
        }
        let channels = [
            &self.redis.command_channel,
            &self.redis.event_channel,
            &self.control_channel,
        ];
        if channels[2] == channels[0] || channels[2] == channels[1] {
            anyhow::bail!("CONTROL_CHANNEL must differ from COMMAND_CHANNEL and EVENT_CHANNEL");
        }
        if let Some(t) = &self.admin_token
            && (t.trim().len() < 16 || t.trim() != t)
        {
            anyhow::bail!("ADMIN_TOKEN must be at least 16 characters without surrounding spaces");
        }
        if self.wait_timeout >= self.lock_lease / 3 {
            anyhow::bail!("WAIT_TIMEOUT must be shorter than a third of LOCK_LEASE");
        }
        Ok(())
    }
}

/// Runs the server until `shutdown` resolves, then drains and returns.
pub async fn run(args: ServerArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    args.validate()?;
    // Bind first: a taken port is a configuration error to report before touching Redis.
    let listener = crate::grpc::listen(args.grpc_addr, "GRPC_ADDR").await?;
    let grpc_addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let _metrics_endpoint = crate::metrics::serve(args.metrics_addr, metrics.clone()).await?;
    let master = Master::start(Settings::from_args(&args.redis));
    let (announcer, announcer_task) = Announcer::start(
        master.clone(),
        args.redis.event_channel.clone(),
        args.wait_replicas,
        args.wait_timeout,
        metrics.clone(),
    );
    let (closes, _close_batcher) = crate::close_batch::CloseBatcher::start(master.clone());
    let (keeper, _lease_keeper) =
        crate::lease_keeper::LeaseKeeper::start(master.clone(), args.lock_lease / 3);
    // State-independent refusals (malformed messages, bids shed under overload) are
    // answered in batches, best effort.
    let (reject_tx, reject_rx) = mpsc::channel(4096);
    let _rejecter = TaskGuard::new(
        "refusal answers",
        tokio::spawn(answer_refusals(
            master.clone(),
            args.redis.event_channel.clone(),
            metrics.clone(),
            reject_rx,
        )),
    );
    let host = crate::host_name();
    let ctx = Arc::new(WorkerContext {
        master: master.clone(),
        announcer: announcer.clone(),
        closes,
        keeper,
        refusals: reject_tx.clone(),
        owner: crate::lock::owner_id(&host),
        event_channel: args.redis.event_channel.clone(),
        settings: WorkerSettings {
            lease: args.lock_lease,
            idle_release: args.lock_lease * 2,
            ..WorkerSettings::default()
        },
        metrics: metrics.clone(),
    });
    info!(owner = %ctx.owner, sentinels = ?args.redis.sentinels.iter().map(ToString::to_string).collect::<Vec<_>>(), "auction server starting");
    let (router, router_task) = Router::start(ctx.clone(), args.shutdown_grace);
    let hub = Hub::new(master.clone(), args.redis.event_channel.clone());

    // One subscription for bids and control messages; intake dispatches by channel name.
    // (The event channel is subscribed by the hub, only while someone here listens.)
    let (msg_tx, mut msg_rx) = mpsc::channel(4096);
    let subscription = Subscription::start(
        master.clone(),
        vec![
            args.redis.command_channel.clone(),
            args.control_channel.clone(),
        ],
        msg_tx,
    );

    let (reporter, health_service) = tonic_health::server::health_reporter();
    crate::health::not_serving(&reporter, SERVICES).await;
    let (master_up, _master_up_task) = crate::health::master_up(&master, Some(metrics.clone()));
    let (ready, _ready_task) = crate::health::all_of(vec![master_up, subscription.watch_live()]);
    let health_task =
        crate::health::report(reporter.clone(), SERVICES, ready, Some(metrics.clone()));

    let admin = AdminService {
        router: router.clone(),
        master: master.clone(),
        hub: hub.clone(),
        control_channel: args.control_channel.clone(),
        admin_token: args.admin_token.clone(),
        default_duration: args.auction_duration,
    };
    let (stop_grpc_tx, stop_grpc_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_routes = tonic::service::Routes::new(
        crate::proto::v1::auction_admin_server::AuctionAdminServer::new(admin),
    );
    let grpc = TaskGuard::new(
        "grpc server",
        tokio::spawn(async move {
            crate::grpc::serve(
                listener,
                health_service,
                &[crate::proto::FILE_DESCRIPTOR_SET],
                Some(admin_routes),
                async {
                    let _ = stop_grpc_rx.await;
                },
            )
            .await
        }),
    );
    info!(%grpc_addr, "gRPC listening (admin API, grpc.health.v1, reflection)");

    let (stop_closer_tx, stop_closer_rx) = tokio::sync::oneshot::channel::<()>();
    let closer = TaskGuard::new(
        "closer",
        tokio::spawn(crate::closer::run(
            master.clone(),
            router.clone(),
            metrics.clone(),
            async {
                let _ = stop_closer_rx.await;
            },
        )),
    );
    let _opener = args.open_on_start_spec().map(|spec| {
        TaskGuard::new(
            "open on start",
            tokio::spawn(open_on_start(router.clone(), spec)),
        )
    });

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = msg_rx.recv() => {
                let Some(msg) = msg else { break };
                if msg.channel == args.control_channel {
                    match CloseRequest::from_json(&msg.payload) {
                        Ok(req) => router.close_now_detached(req.auction_id).await,
                        Err(e) => warn!(error = %e, payload = %truncate(&String::from_utf8_lossy(&msg.payload), 200), "refused a control-channel message"),
                    }
                } else {
                    intake(&msg.payload, &router, &metrics, &reject_tx).await;
                }
            }
        }
    }
    info!("shutting down: NOT_SERVING, no new bids or admin calls; draining auctions in progress");
    drop(health_task);
    crate::health::not_serving(&reporter, SERVICES).await;
    let _ = stop_grpc_tx.send(());
    grpc.join(Duration::from_secs(2)).await;
    drop(subscription);
    let _ = stop_closer_tx.send(());
    closer.join(Duration::from_secs(1)).await;
    drop(router);
    router_task
        .join(args.shutdown_grace + Duration::from_secs(1))
        .await;
    // Outcomes judged while draining are announced before the process exits.
    if tokio::time::timeout(Duration::from_secs(2), announcer.drain())
        .await
        .is_err()
    {
        warn!("announcements still queued at exit; bidders' retries will announce them");
    }
    drop(announcer_task);
    info!(metrics = ?metrics.snapshot(), "auction server stopped");
    Ok(())
}

/// Health service names that follow readiness (besides `""`).
const SERVICES: &[&str] = &[crate::health::ADMIN_SERVICE];

async fn intake(
    payload: &[u8],
    router: &Router,
    metrics: &Metrics,
    reject_tx: &mpsc::Sender<Event>,
) {
    inc(&metrics.messages_received);
    match wire::decode_command(payload) {
        Ok(bid) => router.bid(bid).await,
        Err(bad) => {
            metrics.malformed(bad.error.reason());
            warn!(
                reason = bad.error.reason(),
                error = %bad.error,
                bid_id = ?bad.bid_id,
                payload = %truncate(&String::from_utf8_lossy(payload), 200),
                "refused a command-channel message"
            );
            if let Some(event) = Event::for_malformed(&bad) {
                // Answering is best effort: under a flood of garbage, drop answers rather
                // than slow down intake of valid bids.
                let _ = reject_tx.try_send(event);
            }
        }
    }
}

async fn answer_refusals(
    master: Master,
    channel: String,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Event>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        if let Err(e) = crate::announcer::publish(&master, &channel, &batch, &metrics).await {
            warn!(error = %e, dropped = batch.len(), "could not answer refused messages; their senders retry");
        }
        batch.clear();
    }
}

async fn open_on_start(router: Router, spec: AuctionSpec) {
    let id = AuctionId::random();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // Bounded: about a minute of retries covers a topology that is still starting.
    for _ in 0..40 {
        match router.open(id.clone(), spec.clone()).await {
            Ok(event) => {
                info!(auction = %id, item = %spec.item, event = %event.to_json(), "opened the --open-on-start auction");
                return;
            }
            Err(e) => {
                warn!(auction = %id, error = %e, "cannot open the --open-on-start auction yet; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    warn!(auction = %id, "gave up opening the --open-on-start auction; open one with the admin API");
}
