//! The automatic bidder behind `auction-client`.
//!
//! It learns auctions from the event channel, bids every interval (with jitter) the current
//! minimum plus a random step, up to its budget, and never outbids itself. Each bid has a
//! fresh `bid_id`; a bid with no outcome after `retry_after` is published again with the
//! same `bid_id` (the server answers duplicates with their first outcome) until it gets one
//! or the auction closes. Events are checked for `seq` gaps.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backoff::{Backoff, jitter};
use crate::config::{RedisArgs, parse_duration};
use crate::keyspace::AuctionId;
use crate::metrics::Metrics;
use crate::proto::v1 as pb;
use crate::proto::v1::auction_admin_client::AuctionAdminClient;
use crate::sentinel::{Master, Settings};
use crate::subscription::Subscription;
use crate::task::TaskGuard;
use crate::wire::{self, Bid, Event, RejectReason};

/// Bidder configuration (flags with environment fallbacks).
#[derive(clap::Args, Clone, Debug)]
pub struct BidderArgs {
    /// Redis / Sentinel / channel settings.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// This bidder's name (default: the host name, i.e. the pod name).
    #[arg(long, env = "BIDDER_NAME")]
    pub bidder_name: Option<String>,
    /// Time between bids (±20% jitter).
    #[arg(long, env = "BID_INTERVAL", default_value = "3s", value_parser = parse_duration)]
    pub bid_interval: Duration,
    /// Budget: never bid above this, minor units.
    #[arg(long, env = "MAX_BID", default_value_t = 100_000)]
    pub max_bid: u64,
    /// Re-publish an unanswered bid (same bid_id) after this long.
    #[arg(long, env = "BID_RETRY_AFTER", default_value = "2s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// Bid only on this auction (default: the first open one seen).
    #[arg(long, env = "AUCTION_ID")]
    pub auction_id: Option<String>,
    /// After an auction closes, wait for the next one instead of exiting.
    #[arg(long, env = "KEEP_GOING")]
    pub keep_going: bool,
    /// Give up if a tracked auction's close is not seen this long after its deadline.
    #[arg(long, env = "CLOSE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub close_grace: Duration,
    /// The auction server's gRPC address; no bids are sent while its health is not SERVING.
    #[arg(long, env = "SERVER_ADDR", default_value = "127.0.0.1:50051")]
    pub server_addr: String,
    /// Where this bidder serves its own grpc.health.v1 (for readiness probes).
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:50052")]
    pub health_addr: SocketAddr,
    /// Where Prometheus metrics are served (`GET /metrics`); unset = no metrics endpoint.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl BidderArgs {
    /// Defaults for a local topology (tests, demos).
    pub fn local(redis: RedisArgs, name: &str) -> Self {
        Self {
            redis,
            bidder_name: Some(name.to_owned()),
            bid_interval: Duration::from_secs(3),
            max_bid: 100_000,
            retry_after: Duration::from_secs(2),
            auction_id: None,
            keep_going: false,
            close_grace: Duration::from_secs(30),
            server_addr: "127.0.0.1:50051".into(),
            health_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: None,
        }
    }

    /// The effective bidder name, validated.
    pub fn name(&self) -> anyhow::Result<String> {
        let name = self.bidder_name.clone().unwrap_or_else(crate::host_name);
        wire::check_token("BIDDER_NAME", &name, wire::MAX_BIDDER_LEN)
            .map_err(|e| anyhow::anyhow!("invalid bidder name: {e}"))?;
        Ok(name)
    }

    /// Validates everything clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.redis.validate().map_err(anyhow::Error::msg)?;
        self.name()?;
        if self.max_bid == 0 || self.max_bid > wire::MAX_AMOUNT {
            anyhow::bail!("MAX_BID must be between 1 and {}", wire::MAX_AMOUNT);
        }
        if let Some(id) = &self.auction_id {
            AuctionId::parse(id)?;
        }
        self.server_endpoint()?;
        Ok(())
    }

    /// `SERVER_ADDR` as a gRPC endpoint (`host:port` or `http://host:port`).
    pub fn server_endpoint(&self) -> anyhow::Result<tonic::transport::Endpoint> {
        let raw = self.server_addr.trim();
        let uri = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}")
        };
        tonic::transport::Endpoint::from_shared(uri)
            .map(|e| e.connect_timeout(Duration::from_secs(2)))
            .map_err(|e| {
                anyhow::anyhow!("SERVER_ADDR {raw:?} is not a valid address (host:port): {e}")
            })
    }
}

/// What a bidder did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Bids published (first attempts).
    pub sent: u64,
    /// Re-publications of unanswered bids.
    pub retries: u64,
    /// Bids accepted.
    pub accepted: u64,
    /// Bids rejected.
    pub rejected: u64,
    /// Bids without an outcome when their auction closed.
    pub unconfirmed: u64,
    /// Closes seen: (auction, winner, amount).
    pub closed: Vec<(String, Option<String>, Option<u64>)>,
    /// `seq` gaps observed.
    pub gaps: u64,
}

struct Pending {
    bid: Bid,
    sent_at: Instant,
    backoff: Backoff,
    wait: Duration,
    /// Open from publication until the outcome arrives: its duration is the bid's latency.
    span: tracing::Span,
}

struct Tracked {
    id: AuctionId,
    next_min: u64,
    step: u64,
    high_bidder: Option<String>,
    deadline_ms: Option<u64>,
    pending: Option<Pending>,
    next_bid_at: Instant,
    out_of_budget: bool,
    resync_due: bool,
    last_resync: Option<Instant>,
}

/// Runs the bidder until its auction closes (or, with `keep_going`, until `shutdown`).
pub async fn run(args: BidderArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<Summary> {
    args.validate()?;
    let me = args.name()?;
    let only: Option<AuctionId> = args
        .auction_id
        .as_deref()
        .map(AuctionId::parse)
        .transpose()?;
    let health_listener = crate::grpc::listen(args.health_addr, "HEALTH_ADDR").await?;
    let health_addr = health_listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let _metrics_endpoint = crate::metrics::serve(args.metrics_addr, metrics.clone()).await?;
    let master = Master::start(Settings::from_args(&args.redis));
    let (tx, mut rx) = mpsc::channel(4096);
    let sub = Subscription::start(master.clone(), vec![args.redis.event_channel.clone()], tx);
    let (server_up_tx, server_up) = watch::channel(false);
    let _server_watch = TaskGuard::new(
        "server health watch",
        tokio::spawn(watch_server_health(args.server_endpoint()?, server_up_tx)),
    );
    let (reporter, health_service) = tonic_health::server::health_reporter();
    crate::health::not_serving(&reporter, &[]).await;
    let (ready, _ready_task) = crate::health::all_of(vec![sub.watch_live(), server_up.clone()]);
    let _health_task = crate::health::report(reporter.clone(), &[], ready, Some(metrics.clone()));
    let _health_server = TaskGuard::new(
        "bidder health server",
        tokio::spawn(async move {
            let no_shutdown = std::future::pending();
            crate::grpc::serve(health_listener, health_service, &[], None, no_shutdown).await
        }),
    );
    info!(bidder = %me, %health_addr, server = %args.server_addr, "bidder started; health listening; waiting for the server to be SERVING and for an open auction");
    let admin = AuctionAdminClient::new(args.server_endpoint()?.connect_lazy());
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
        metrics,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// How often a bidder may ask the server for stored state.
const RESYNC_EVERY: Duration = Duration::from_secs(2);

struct Bidder<'a> {
    args: &'a BidderArgs,
    me: String,
    only: Option<AuctionId>,
    master: Master,
    admin: AuctionAdminClient<tonic::transport::Channel>,
    summary: Summary,
    tracked: Option<Tracked>,
    last_seq: HashMap<String, u64>,
    closed: HashMap<String, ()>,
    counter: u64,
    server_was_up: bool,
    metrics: Arc<Metrics>,
}

impl Bidder<'_> {
    fn on_event(&mut self, event: &Event) -> Flow {
        if let (Some(id), Some(seq)) = (event.auction_id(), event.seq()) {
            let last = self.last_seq.entry(id.to_owned()).or_insert(0);
            // Repeats (seq <= last) are re-announced outcomes: still useful below.
            if seq > *last {
                if *last > 0 && seq > *last + 1 {
                    self.summary.gaps += 1;
                    warn!(auction = %id, from = *last, to = seq, "missed events (seq gap); resyncing from the server's stored state");
                    if let Some(t) = self.tracked.as_mut()
                        && t.id.as_str() == id
                    {
                        t.resync_due = true;
                    }
                }
                *last = seq;
            }
        }
        if let Event::AuctionClosed {
            auction_id,
            winner,
            amount,
            ..
        } = event
        {
            return self.closed_seen(auction_id, winner.clone(), *amount);
        }
        if self.tracked.is_none()
            && let Some(t) = adopt(
                event,
                self.only.as_ref(),
                &self.closed,
                self.args.bid_interval,
            )
        {
            info!(auction = %t.id, next_min = t.next_min, "bidding on auction");
            self.tracked = Some(t);
        }
        if let Some(t) = self.tracked.as_mut()
            && event.auction_id() == Some(t.id.as_str())
        {
            observe(t, event, &mut self.summary, &self.metrics);
        }
        Flow::Continue
    }

    /// Records a close (from an event or from stored state); stops when it is ours.
    fn closed_seen(
        &mut self,
        auction_id: &str,
        winner: Option<String>,
        amount: Option<u64>,
    ) -> Flow {
        if self.closed.insert(auction_id.to_owned(), ()).is_none() {
            info!(auction = %auction_id, winner = winner.as_deref().unwrap_or("(none)"), amount = ?amount, "auction closed");
            self.summary
                .closed
                .push((auction_id.to_owned(), winner.clone(), amount));
        }
        if self.tracked.as_ref().map(|t| t.id.as_str()) != Some(auction_id) {
            return Flow::Continue;
        }
        if let Some(t) = self.tracked.take()
            && t.pending.is_some()
        {
            self.summary.unconfirmed += 1;
        }
        let won = winner.as_deref() == Some(self.me.as_str());
        info!(bidder = %self.me, won, "my auction closed");
        if self.args.keep_going {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    async fn on_tick(&mut self, server_is_up: bool) -> anyhow::Result<Flow> {
        if server_is_up != self.server_was_up {
            self.server_was_up = server_is_up;
            if server_is_up {
                info!(server = %self.args.server_addr, "server is SERVING; bidding enabled");
            } else {
                warn!(server = %self.args.server_addr, "server is not SERVING; bidding paused");
            }
        }
        if !server_is_up {
            return Ok(Flow::Continue);
        }
        if self.resync_if_due().await == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let args = self.args;
        let Some(t) = self.tracked.as_mut() else {
            return Ok(Flow::Continue);
        };
        let now = Instant::now();
        if let Some(deadline) = t.deadline_ms
            && crate::unix_ms() > deadline + args.close_grace.as_millis() as u64
        {
            anyhow::bail!(
                "auction {} passed its deadline {:?} ago and neither a close event nor the server's stored state shows it closed; check the server's logs",
                t.id,
                args.close_grace
            );
        }
        if let Some(p) = t.pending.as_mut() {
            if now.duration_since(p.sent_at) >= p.wait {
                p.sent_at = now;
                p.wait = args.retry_after + p.backoff.next_delay();
                self.summary.retries += 1;
                self.metrics.bids_retried.inc();
                debug!(parent: &p.span, bid_id = %p.bid.bid_id, "no outcome yet; publishing the same bid again");
                publish(&self.master, &args.redis.command_channel, &p.bid)
                    .instrument(p.span.clone())
                    .await;
            }
            return Ok(Flow::Continue);
        }
        if now < t.next_bid_at
            || t.out_of_budget
            || t.high_bidder.as_deref() == Some(self.me.as_str())
        {
            return Ok(Flow::Continue);
        }
        t.next_bid_at = now + jitter(args.bid_interval, 0.2);
        if t.next_min > args.max_bid {
            t.out_of_budget = true;
            info!(
                next_min = t.next_min,
                max_bid = args.max_bid,
                "the price passed my budget; no more bids"
            );
            return Ok(Flow::Continue);
        }
        self.counter += 1;
        let amount = (t.next_min + fastrand::u64(0..=t.step.saturating_mul(2))).min(args.max_bid);
        let bid_id = format!(
            "{}-{}-{:06x}",
            self.me,
            self.counter,
            fastrand::u32(..0x100_0000)
        );
        let span =
            info_span!("bid", bid_id = %bid_id, auction_id = %t.id, amount, bidder = %self.me);
        let bid = Bid {
            auction_id: t.id.clone(),
            bid_id,
            bidder: self.me.clone(),
            amount,
            traceparent: crate::propagation::traceparent(&span),
        };
        info!(parent: &span, auction = %t.id, bid_id = %bid.bid_id, amount, "bidding");
        self.summary.sent += 1;
        self.metrics.bids_sent.inc();
        publish(&self.master, &args.redis.command_channel, &bid)
            .instrument(span.clone())
            .await;
        t.pending = Some(Pending {
            bid,
            sent_at: now,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(3)),
            wait: args.retry_after,
            span,
        });
        Ok(Flow::Continue)
    }

    /// Reads the tracked auction's stored state through the server's gRPC API when events
    /// were missed (a `seq` gap), when we adopted it without its parameters, or when its
    /// deadline passed and no close was heard (Pub/Sub is at-most-once).
    async fn resync_if_due(&mut self) -> Flow {
        let Some(t) = self.tracked.as_mut() else {
            return Flow::Continue;
        };
        let overdue = t.deadline_ms.is_none_or(|d| crate::unix_ms() > d + 1000);
        let due = t.resync_due
            || (overdue && t.last_resync.is_none_or(|at| at.elapsed() >= RESYNC_EVERY));
        if !due {
            return Flow::Continue;
        }
        t.resync_due = false;
        t.last_resync = Some(Instant::now());
        let span = info_span!("resync", auction_id = %t.id);
        let mut request = tonic::Request::new(pb::GetAuctionRequest {
            auction_id: t.id.to_string(),
        });
        {
            let _entered = span.enter();
            crate::propagation::inject_into(&mut request);
        }
        let reply =
            tokio::time::timeout(Duration::from_secs(2), self.admin.get_auction(request)).await;
        let auction = match reply {
            Ok(Ok(r)) => r.into_inner().auction,
            Ok(Err(status)) => {
                debug!(auction = %t.id, %status, "resync failed; will retry");
                return Flow::Continue;
            }
            Err(_) => {
                debug!(auction = %t.id, "resync timed out; will retry");
                return Flow::Continue;
            }
        };
        let Some(a) = auction else {
            return Flow::Continue;
        };
        let ms = |ts: &Option<prost_types::Timestamp>| {
            ts.as_ref()
                .map(|t| t.seconds.max(0) as u64 * 1000 + t.nanos.max(0) as u64 / 1_000_000)
        };
        t.deadline_ms = ms(&a.deadline).or(t.deadline_ms);
        t.step = (a.min_increment.max(1)) as u64;
        let last = self.last_seq.entry(a.auction_id.clone()).or_insert(0);
        *last = (*last).max(a.seq);
        if a.state == pb::AuctionState::Closed as i32 {
            let (winner, amount) = match &a.winner {
                Some(w) => (Some(w.bidder.clone()), Some(w.amount as u64)),
                None => (None, None),
            };
            return self.closed_seen(&a.auction_id, winner, amount);
        }
        if (a.next_min as u64) > t.next_min {
            t.next_min = a.next_min as u64;
        }
        t.high_bidder = a.high_bid.map(|h| h.bidder);
        Flow::Continue
    }
}

/// Starts tracking the auction `event` is about, if it is one we may bid on.
fn adopt(
    event: &Event,
    only: Option<&AuctionId>,
    closed: &HashMap<String, ()>,
    interval: Duration,
) -> Option<Tracked> {
    let id = AuctionId::parse(event.auction_id()?).ok()?;
    if only.is_some_and(|o| *o != id) || closed.contains_key(id.as_str()) {
        return None;
    }
    let first_bid_at =
        Instant::now() + Duration::from_millis(fastrand::u64(0..=interval.as_millis() as u64 / 2));
    let (next_min, step, deadline_ms) = match event {
        Event::AuctionOpened {
            starting_price,
            min_increment,
            deadline_ms,
            ..
        } => (*starting_price, *min_increment, Some(*deadline_ms)),
        Event::BidAccepted { next_min, .. } => (*next_min, 1, None),
        Event::BidRejected {
            next_min: Some(n), ..
        } => (*n, 1, None),
        _ => return None,
    };
    Some(Tracked {
        id,
        next_min,
        step: step.max(1),
        high_bidder: None,
        deadline_ms,
        pending: None,
        next_bid_at: first_bid_at,
        out_of_budget: false,
        // Adopted from a bid event: we know neither the deadline nor the increment yet.
        resync_due: deadline_ms.is_none(),
        last_resync: None,
    })
}

/// Updates the tracked auction from one of its events.
fn observe(t: &mut Tracked, event: &Event, summary: &mut Summary, metrics: &Metrics) {
    let (bid_id, outcome) = match event {
        // Not judged: the server shed it under overload. It stays pending and is published
        // again (same bid_id) when its retry timer fires.
        Event::BidRejected {
            reason: RejectReason::Overloaded,
            bid_id,
            ..
        } => {
            if t.pending.as_ref().is_some_and(|p| p.bid.bid_id == *bid_id) {
                debug!(bid_id, "the server is saturated; this bid will be retried");
            }
            return;
        }
        Event::BidAccepted {
            bid_id,
            bidder,
            next_min,
            ..
        } => {
            if *next_min >= t.next_min {
                t.next_min = *next_min;
                t.high_bidder = Some(bidder.clone());
            }
            (bid_id, "accepted")
        }
        Event::BidRejected {
            bid_id,
            reason,
            next_min,
            ..
        } => {
            if let Some(n) = next_min
                && *n > t.next_min
            {
                t.next_min = *n;
            }
            (bid_id, reason.as_str())
        }
        _ => return,
    };
    if t.pending.as_ref().is_none_or(|p| p.bid.bid_id != *bid_id) {
        return;
    }
    let Some(p) = t.pending.take() else { return };
    let outcome_span = info_span!(parent: &p.span, "bid.outcome", bid_id = %bid_id, outcome);
    let _entered = outcome_span.enter();
    if outcome == "accepted" {
        summary.accepted += 1;
        metrics.bids_accepted.inc();
        info!(bid_id, amount = p.bid.amount, "my bid was accepted");
    } else {
        summary.rejected += 1;
        metrics.rejected(outcome);
        info!(bid_id, reason = outcome, "my bid was rejected");
    }
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

async fn publish(master: &Master, channel: &str, bid: &Bid) {
    let link = match master.link(Duration::from_secs(1)).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, bid_id = %bid.bid_id, "cannot publish now; will retry");
            return;
        }
    };
    let mut conn = link.conn.clone();
    match redis::cmd("PUBLISH")
        .arg(channel)
        .arg(bid.to_json())
        .query_async::<u64>(&mut conn)
        .await
    {
        Ok(0) => {
            warn!(bid_id = %bid.bid_id, "no server is subscribed to the command channel; will retry")
        }
        Ok(_) => {}
        Err(e) => {
            master.report(link.generation, &e);
            warn!(error = %e, bid_id = %bid.bid_id, "publish failed; will retry");
        }
    }
}
