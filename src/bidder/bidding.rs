//! [`Bidder`]: the bidder's state and its reactions: to an event (adopt, follow, see the
//! close), and to a tick (bid when due, retry what is unanswered, resync after a gap).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::bidder::args::BidderArgs;
use crate::bidder::discovery::{Discovery, find_open};
use crate::bidder::summary::Summary;
use crate::bidder::tracking::{Pending, Tracked, adopt, adopt_stored, observe, timestamp_ms};
use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::proto::v1 as pb;
use crate::proto::v1::auction_admin_client::AuctionAdminClient;
use crate::runtime::backoff::{Backoff, jitter};
use crate::runtime::metrics::Metrics;
use crate::store::bidders;
use crate::wire::{Bid, Event};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// How often a bidder may ask the server for stored state.
const RESYNC_EVERY: Duration = Duration::from_secs(2);

pub(crate) struct Bidder<'a> {
    pub(crate) args: &'a BidderArgs,
    pub(crate) me: String,
    pub(crate) only: Option<AuctionId>,
    pub(crate) master: Master,
    pub(crate) admin: AuctionAdminClient<tonic::transport::Channel>,
    pub(crate) summary: Summary,
    pub(crate) tracked: Option<Tracked>,
    pub(crate) last_seq: HashMap<String, u64>,
    pub(crate) closed: HashMap<String, ()>,
    pub(crate) counter: u64,
    pub(crate) server_was_up: bool,
    /// Whether the event channel is subscribed right now (from the subscription).
    pub(crate) subscribed: watch::Receiver<bool>,
    pub(crate) was_subscribed: bool,
    pub(crate) discovery: Discovery,
    pub(crate) metrics: Arc<Metrics>,
    /// The key bids are signed with (`BIDDER_KEY`), if any.
    pub(crate) key: Option<String>,
}

impl Bidder<'_> {
    pub(crate) fn on_event(&mut self, event: &Event) -> Flow {
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

    pub(crate) async fn on_tick(&mut self, server_is_up: bool) -> anyhow::Result<Flow> {
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
        self.discover_if_due().await;
        let args = self.args;
        let Some(t) = self.tracked.as_mut() else {
            return Ok(Flow::Continue);
        };
        let now = Instant::now();
        if let Some(deadline) = t.deadline_ms
            && crate::runtime::process::unix_ms() > deadline + args.close_grace.as_millis() as u64
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
        let budget = args.budget();
        if t.next_min > budget {
            t.out_of_budget = true;
            info!(
                next_min = t.next_min,
                budget, "the price passed my budget; no more bids"
            );
            return Ok(Flow::Continue);
        }
        self.counter += 1;
        // By proxy, the lowest acceptable amount: the server raises it as needed, up to
        // the max; otherwise the minimum plus a random step, as the prototype did.
        let amount = match args.proxy_max {
            Some(_) => t.next_min,
            None => (t.next_min + fastrand::u64(0..=t.step.saturating_mul(2))).min(budget),
        };
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
            max_amount: args.proxy_max,
            traceparent: crate::runtime::propagation::traceparent(&span),
            sig: None,
        };
        let bid = Bid {
            sig: self.key.as_deref().map(|key| bidders::sign(&bid, key)),
            ..bid
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

    /// Looks for an auction that is already open when none is tracked: at start, after every
    /// resubscription (events may have been missed meanwhile), and every
    /// [`DISCOVER_EVERY`](crate::bidder::discovery::DISCOVER_EVERY) while idle.
    async fn discover_if_due(&mut self) {
        // Copied out: a watch borrow must not be held across an await.
        let subscribed = *self.subscribed.borrow();
        if subscribed && !self.was_subscribed {
            self.discovery.due = true;
        }
        self.was_subscribed = subscribed;
        if !subscribed || !self.discovery.is_due(self.tracked.is_none()) {
            return;
        }
        self.discovery.ran();
        match find_open(&mut self.admin, self.only.as_ref(), &self.closed).await {
            Ok(Some(a)) => {
                if let Some(t) = adopt_stored(&a, self.args.bid_interval) {
                    let last = self.last_seq.entry(a.auction_id.clone()).or_insert(0);
                    *last = (*last).max(a.seq);
                    info!(auction = %t.id, next_min = t.next_min, "bidding on an auction that was already open");
                    self.tracked = Some(t);
                }
            }
            Ok(None) => debug!("no open auction yet; waiting for one to open"),
            Err(status) => debug!(%status, "could not list open auctions; will retry"),
        }
    }

    /// Reads the tracked auction's stored state through the server's gRPC API when events
    /// were missed (a `seq` gap), when we adopted it without its parameters, or when its
    /// deadline passed and no close was heard (Pub/Sub is at-most-once).
    async fn resync_if_due(&mut self) -> Flow {
        let Some(t) = self.tracked.as_mut() else {
            return Flow::Continue;
        };
        let overdue = t
            .deadline_ms
            .is_none_or(|d| crate::runtime::process::unix_ms() > d + 1000);
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
            crate::runtime::propagation::inject_into(&mut request);
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
        t.deadline_ms = timestamp_ms(&a.deadline).or(t.deadline_ms);
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
