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
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, jitter};
use crate::config::{RedisArgs, parse_duration};
use crate::keyspace::AuctionId;
use crate::sentinel::{Master, Settings};
use crate::subscription::Subscription;
use crate::task::TaskGuard;
use crate::wire::{self, Bid, Event};

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
    let health_listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on HEALTH_ADDR {}: is another process using it?",
                args.health_addr
            )
        })?;
    let health_addr = health_listener.local_addr()?;
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
    let _health_task = crate::health::report(reporter.clone(), &[], ready);
    let _health_server = TaskGuard::new(
        "bidder health server",
        tokio::spawn(async move {
            let no_shutdown = std::future::pending();
            crate::grpc::serve(health_listener, health_service, &[], None, no_shutdown).await
        }),
    );
    info!(bidder = %me, %health_addr, server = %args.server_addr, "bidder started; health listening; waiting for the server to be SERVING and for an open auction");
    let mut server_was_up = false;

    let mut summary = Summary::default();
    let mut tracked: Option<Tracked> = None;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut closed: HashMap<String, ()> = HashMap::new();
    let mut counter = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!(bidder = %me, "stopping on signal");
                break;
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let event = match Event::from_json(&msg.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(error = %e, "ignoring an undecodable event");
                        continue;
                    }
                };
                if let (Some(id), Some(seq)) = (event.auction_id(), event.seq()) {
                    let last = last_seq.entry(id.to_owned()).or_insert(0);
                    if seq <= *last && *last > 0 {
                        // A repeat (e.g. a duplicate's first outcome re-announced); the
                        // bid outcome part is still useful below.
                    } else {
                        if *last > 0 && seq > *last + 1 {
                            summary.gaps += 1;
                            warn!(auction = %id, from = *last, to = seq, "missed events (seq gap); state may be stale until the next event");
                        }
                        *last = seq;
                    }
                }
                if let Event::AuctionClosed { auction_id, winner, amount, .. } = &event {
                    if closed.insert(auction_id.clone(), ()).is_none() {
                        info!(auction = %auction_id, winner = winner.as_deref().unwrap_or("(none)"), amount = ?amount, "auction closed");
                        summary.closed.push((auction_id.clone(), winner.clone(), *amount));
                    }
                    if tracked.as_ref().map(|t| t.id.as_str()) == Some(auction_id.as_str()) {
                        if let Some(t) = tracked.take()
                            && t.pending.is_some()
                        {
                            summary.unconfirmed += 1;
                        }
                        let won = winner.as_deref() == Some(me.as_str());
                        info!(bidder = %me, won, "my auction closed");
                        if !args.keep_going {
                            break;
                        }
                    }
                    continue;
                }
                if tracked.is_none()
                    && let Some(t) = adopt(&event, only.as_ref(), &closed, args.bid_interval)
                {
                    info!(auction = %t.id, next_min = t.next_min, "bidding on auction");
                    tracked = Some(t);
                }
                let Some(t) = tracked.as_mut() else { continue };
                if event.auction_id() != Some(t.id.as_str()) {
                    continue;
                }
                observe(t, &event, &me, &mut summary);
            }
            _ = tick.tick() => {
                let server_is_up = *server_up.borrow();
                if server_is_up != server_was_up {
                    server_was_up = server_is_up;
                    if server_is_up {
                        info!(server = %args.server_addr, "server is SERVING; bidding enabled");
                    } else {
                        warn!(server = %args.server_addr, "server is not SERVING; bidding paused");
                    }
                }
                if !server_is_up {
                    continue;
                }
                let Some(t) = tracked.as_mut() else { continue };
                let now = Instant::now();
                if let Some(deadline) = t.deadline_ms
                    && crate::unix_ms() > deadline + args.close_grace.as_millis() as u64
                {
                    anyhow::bail!(
                        "auction {} passed its deadline {:?} ago without a close event reaching this bidder; check the server's logs",
                        t.id, args.close_grace
                    );
                }
                if let Some(p) = t.pending.as_mut() {
                    if now.duration_since(p.sent_at) >= p.wait {
                        p.sent_at = now;
                        p.wait = args.retry_after + p.backoff.next_delay();
                        summary.retries += 1;
                        debug!(bid_id = %p.bid.bid_id, "no outcome yet; publishing the same bid again");
                        publish(&master, &args.redis.command_channel, &p.bid).await;
                    }
                    continue;
                }
                if now < t.next_bid_at || t.out_of_budget || t.high_bidder.as_deref() == Some(me.as_str()) {
                    continue;
                }
                t.next_bid_at = now + jitter(args.bid_interval, 0.2);
                if t.next_min > args.max_bid {
                    t.out_of_budget = true;
                    info!(next_min = t.next_min, max_bid = args.max_bid, "the price passed my budget; no more bids");
                    continue;
                }
                counter += 1;
                let amount = (t.next_min + fastrand::u64(0..=t.step.saturating_mul(2))).min(args.max_bid);
                let bid = Bid {
                    auction_id: t.id.clone(),
                    bid_id: format!("{me}-{counter}-{:06x}", fastrand::u32(..0x100_0000)),
                    bidder: me.clone(),
                    amount,
                    traceparent: None,
                };
                info!(auction = %t.id, bid_id = %bid.bid_id, amount, "bidding");
                summary.sent += 1;
                publish(&master, &args.redis.command_channel, &bid).await;
                t.pending = Some(Pending {
                    bid,
                    sent_at: now,
                    backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(3)),
                    wait: args.retry_after,
                });
            }
        }
    }
    info!(bidder = %me, ?summary, "bidder done");
    Ok(summary)
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
    })
}

/// Updates the tracked auction from one of its events.
fn observe(t: &mut Tracked, event: &Event, me: &str, summary: &mut Summary) {
    match event {
        Event::BidAccepted {
            bid_id,
            bidder,
            amount,
            next_min,
            ..
        } => {
            if *next_min >= t.next_min {
                t.next_min = *next_min;
                t.high_bidder = Some(bidder.clone());
            }
            if t.pending.as_ref().is_some_and(|p| p.bid.bid_id == *bid_id) {
                t.pending = None;
                summary.accepted += 1;
                info!(bid_id, amount, "my bid was accepted");
            }
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
            if t.pending.as_ref().is_some_and(|p| p.bid.bid_id == *bid_id) {
                t.pending = None;
                summary.rejected += 1;
                info!(bid_id, reason = reason.as_str(), "my bid was rejected");
            }
        }
        _ => {}
    }
    let _ = me;
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
