//! The server's parts, started in dependency order and stopped in the order that loses
//! nothing: [`Server::start`] is the wiring, [`Server::stop`] the shutdown order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::control::health::{self, ADMIN_SERVICE};
use crate::control::hub::Hub;
use crate::keyspace::AuctionId;
use crate::link::sentinel::{Master, Settings};
use crate::link::subscription::{Message, Subscription};
use crate::runtime::backoff::Backoff;
use crate::runtime::metrics::Metrics;
use crate::runtime::task::TaskGuard;
use crate::server::admin::{AdminService, RouterGate};
use crate::server::announcer::{Announcer, EventChannel};
use crate::server::args::{BidAuth, ServerArgs};
use crate::server::bidder_keys::BidderKeys;
use crate::server::close_batch::CloseBatcher;
use crate::server::context::{Context, WorkerSettings};
use crate::server::intake;
use crate::server::lease_keeper::LeaseKeeper;
use crate::server::router::Router;
use crate::server::work::OpError;
use crate::store::ledger::AuctionSpec;
use crate::store::lock;
use crate::wire::Event;

/// Health service names that follow readiness (besides `""`).
const SERVICES: &[&str] = &[ADMIN_SERVICE];
/// Messages between the subscription and intake; refusals waiting to be answered.
const QUEUE: usize = 4096;

/// A running server: every part, each owned here so that dropping it stops it.
pub(crate) struct Server {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) router: Router,
    router_task: TaskGuard,
    /// Where intake answers refusals; the answering task ends when this and the workers'
    /// copies are gone.
    pub(crate) refusals: mpsc::Sender<Event>,
    pub(crate) messages: mpsc::Receiver<Message>,
    subscription: Subscription,
    announcer: Announcer,
    announcer_task: TaskGuard,
    health: tonic_health::server::HealthReporter,
    health_task: TaskGuard,
    /// The admin API's way to the router; closed first at shutdown.
    admin_router: watch::Sender<Option<Router>>,
    grpc: TaskGuard,
    stop_grpc: oneshot::Sender<()>,
    closer: TaskGuard,
    stop_closer: oneshot::Sender<()>,
    /// `--open-on-start` retrying to open its auction (it holds a router handle).
    opening: Option<TaskGuard>,
    _rest: Vec<TaskGuard>,
}

impl Server {
    /// Starts every part against the master found through `args`' Sentinels and serves the
    /// gRPC API on `listener`.
    pub(crate) async fn start(
        args: &ServerArgs,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<Server> {
        let grpc_addr: SocketAddr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new());
        let mut rest: Vec<TaskGuard> = Vec::new();
        rest.extend(crate::runtime::metrics::serve(args.metrics_addr, metrics.clone()).await?);
        let master = Master::start(Settings::from_args(&args.redis));
        let channel = args.redis.event_channel.clone();
        let events = EventChannel {
            name: channel.clone(),
            seed_dialect: args.seed_dialect,
        };
        let (announcer, announcer_task) = Announcer::start(
            master.clone(),
            events.clone(),
            args.wait_replicas,
            args.wait_timeout,
            metrics.clone(),
        );
        let retention = args.retention()?;
        let (closes, close_batcher) = CloseBatcher::start(master.clone(), retention);
        let (keeper, lease_keeper) = LeaseKeeper::start(master.clone(), args.lock_lease / 3);
        let (refusals, refusal_rx) = mpsc::channel(QUEUE);
        let answering =
            intake::answer_refusals(master.clone(), events, metrics.clone(), refusal_rx);
        let sweeping = crate::server::retention::run(master.clone(), retention, metrics.clone());
        let memory = crate::server::redis_memory::run(master.clone(), metrics.clone());
        rest.extend([
            close_batcher,
            lease_keeper,
            TaskGuard::new("refusal answers", tokio::spawn(answering)),
            TaskGuard::new("retention sweeper", tokio::spawn(sweeping)),
            TaskGuard::new("redis memory", tokio::spawn(memory)),
        ]);
        let (bidder_keys, bidder_keys_task) = BidderKeys::start(master.clone());
        rest.push(bidder_keys_task);
        let ctx = Arc::new(Context {
            master: master.clone(),
            announcer: announcer.clone(),
            closes,
            keeper,
            refusals: refusals.clone(),
            owner: lock::owner_id(&crate::runtime::process::host_name()),
            event_channel: channel.clone(),
            settings: WorkerSettings::with_lease(args.lock_lease),
            metrics: metrics.clone(),
            auth: (args.bid_auth == BidAuth::Required).then(|| bidder_keys.clone()),
        });
        info!(owner = %ctx.owner, sentinels = ?args.redis.sentinels.iter().map(ToString::to_string).collect::<Vec<_>>(), "auction server starting");
        let (router, router_task) = Router::start(ctx, args.shutdown_grace);

        // One subscription for bids and control messages; intake dispatches by channel name.
        // (The event channel is subscribed by the hub, only while someone here listens.)
        let (msg_tx, messages) = mpsc::channel(QUEUE);
        let channels = vec![
            args.redis.command_channel.clone(),
            args.control_channel.clone(),
        ];
        let subscription = Subscription::start(master.clone(), channels, msg_tx);

        let (reporter, health_service) = tonic_health::server::health_reporter();
        health::not_serving(&reporter, SERVICES).await;
        let (master_up, master_up_task) = health::master_up(&master, Some(metrics.clone()));
        let (ready, ready_task) = health::all_of(vec![master_up, subscription.watch_live()]);
        let health_task = health::report(reporter.clone(), SERVICES, ready, Some(metrics.clone()));
        rest.extend([master_up_task, ready_task]);

        let (admin_router, gate): (_, RouterGate) = watch::channel(Some(router.clone()));
        let admin = AdminService {
            router: gate,
            master: master.clone(),
            hub: Hub::new(master.clone(), channel),
            control_channel: args.control_channel.clone(),
            admin_token: args.admin_token.clone(),
            enrollment: args.enrollment()?,
            defaults: args.auction_defaults(),
            bidder_keys: bidder_keys.clone(),
        };
        let (stop_grpc, grpc) = serve_grpc(listener, health_service, admin);
        info!(%grpc_addr, "gRPC listening (admin API, grpc.health.v1, reflection)");

        let (stop_closer, stop_closer_rx) = oneshot::channel::<()>();
        let closer = crate::server::closer::run(master, router.clone(), metrics.clone(), async {
            let _ = stop_closer_rx.await;
        });
        let closer = TaskGuard::new("closer", tokio::spawn(closer));
        let opening = args.open_on_start_spec()?.map(|(id, spec)| {
            let opening = open_on_start(router.clone(), id, spec);
            TaskGuard::new("open on start", tokio::spawn(opening))
        });
        Ok(Server {
            metrics,
            router,
            router_task,
            refusals,
            messages,
            subscription,
            announcer,
            announcer_task,
            health: reporter,
            health_task,
            admin_router,
            grpc,
            stop_grpc,
            closer,
            stop_closer,
            opening,
            _rest: rest,
        })
    }

    /// Stops in the order that loses nothing: NOT_SERVING first (probes stop routing
    /// admin calls here), then no new admin calls (open watches end `UNAVAILABLE`), no new
    /// bids, no new closes; then the workers drain their queues and release their leases
    /// (bounded by `grace`); then the outcomes judged meanwhile are announced.
    ///
    /// The router drains once every handle to it is gone. The admin API's handle goes
    /// first, through its gate rather than with the gRPC server: a client's open
    /// connection (a watch stream, a slow reader) keeps the service alive beyond the gRPC
    /// server's own stop, and must not keep the router, and so every lease, with it.
    pub(crate) async fn stop(self, grace: Duration) {
        info!(
            "shutting down: NOT_SERVING, no new bids or admin calls; draining auctions in progress"
        );
        drop(self.health_task);
        health::not_serving(&self.health, SERVICES).await;
        self.admin_router.send_replace(None);
        let _ = self.stop_grpc.send(());
        self.grpc.join(Duration::from_secs(2)).await;
        drop(self.subscription);
        let _ = self.stop_closer.send(());
        self.closer.join(Duration::from_secs(1)).await;
        drop(self.opening);
        drop(self.router);
        self.router_task.join(grace + Duration::from_secs(1)).await;
        // Outcomes judged while draining are announced before the process exits.
        if tokio::time::timeout(Duration::from_secs(2), self.announcer.drain())
            .await
            .is_err()
        {
            warn!("announcements still queued at exit; bidders' retries will announce them");
        }
        drop(self.announcer_task);
        info!(metrics = ?self.metrics.snapshot(), "auction server stopped");
    }
}

/// Serves health, reflection and the admin API on `listener` until the returned sender
/// fires (or is dropped).
fn serve_grpc(
    listener: tokio::net::TcpListener,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    admin: AdminService,
) -> (oneshot::Sender<()>, TaskGuard) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let routes = tonic::service::Routes::new(
        crate::proto::v1::auction_admin_server::AuctionAdminServer::new(admin),
    );
    let serving = async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        let descriptors = [crate::proto::FILE_DESCRIPTOR_SET];
        crate::control::grpc::serve(listener, health, &descriptors, Some(routes), stop).await
    };
    (
        stop_tx,
        TaskGuard::new("grpc server", tokio::spawn(serving)),
    )
}

async fn open_on_start(router: Router, id: AuctionId, spec: AuctionSpec) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // Bounded: about a minute of retries covers a topology that is still starting.
    for _ in 0..40 {
        match router.open(id.clone(), spec.clone()).await {
            Ok(event) => {
                info!(auction = %id, item = %spec.item, event = %event.to_json(), "opened the --open-on-start auction");
                return;
            }
            Err(OpError::AlreadyExists) => {
                info!(auction = %id, "the --open-on-start auction already exists (a restart?); not opening it again");
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
