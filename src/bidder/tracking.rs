//! What a bidder knows of the one auction it bids on ([`Tracked`]) and of its bid in flight
//! ([`Pending`]): adopting an auction from an event, and following it event by event.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, info_span};

use crate::bidder::summary::Summary;
use crate::keyspace::AuctionId;
use crate::proto::v1 as pb;
use crate::runtime::backoff::Backoff;
use crate::runtime::metrics::Metrics;
use crate::wire::{Bid, Event, RejectReason};

pub(crate) struct Pending {
    pub(crate) bid: Bid,
    pub(crate) sent_at: Instant,
    pub(crate) backoff: Backoff,
    pub(crate) wait: Duration,
    /// Open from publication until the outcome arrives: its duration is the bid's latency.
    pub(crate) span: tracing::Span,
}

pub(crate) struct Tracked {
    pub(crate) id: AuctionId,
    pub(crate) next_min: u64,
    pub(crate) step: u64,
    pub(crate) high_bidder: Option<String>,
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) pending: Option<Pending>,
    pub(crate) next_bid_at: Instant,
    pub(crate) out_of_budget: bool,
    pub(crate) resync_due: bool,
    pub(crate) last_resync: Option<Instant>,
}

/// Starts tracking the auction `event` is about, if it is one we may bid on.
pub(crate) fn adopt(
    event: &Event,
    only: Option<&AuctionId>,
    closed: &HashMap<String, ()>,
    interval: Duration,
) -> Option<Tracked> {
    let id = AuctionId::parse(event.auction_id()?).ok()?;
    if only.is_some_and(|o| *o != id) || closed.contains_key(id.as_str()) {
        return None;
    }
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
        next_bid_at: first_bid_at(interval),
        out_of_budget: false,
        // Adopted from a bid event: we know neither the deadline nor the increment yet.
        resync_due: deadline_ms.is_none(),
        last_resync: None,
    })
}

/// Starts tracking an open auction read from the server's stored state (a late start, a
/// resubscription): everything is known, price, increment, deadline and leader.
pub(crate) fn adopt_stored(a: &pb::Auction, interval: Duration) -> Option<Tracked> {
    let id = AuctionId::parse(&a.auction_id).ok()?;
    Some(Tracked {
        id,
        next_min: u64::try_from(a.next_min).ok()?.max(1),
        step: u64::try_from(a.min_increment).unwrap_or(1).max(1),
        high_bidder: a.high_bid.as_ref().map(|h| h.bidder.clone()),
        deadline_ms: timestamp_ms(&a.deadline),
        pending: None,
        next_bid_at: first_bid_at(interval),
        out_of_budget: false,
        resync_due: false,
        last_resync: Some(Instant::now()),
    })
}

/// A protobuf timestamp as ms since the epoch.
pub(crate) fn timestamp_ms(ts: &Option<prost_types::Timestamp>) -> Option<u64> {
    ts.as_ref()
        .map(|t| t.seconds.max(0) as u64 * 1000 + t.nanos.max(0) as u64 / 1_000_000)
}

/// When a newly adopted auction gets its first bid: within half an interval, so bidders
/// that adopt it together do not all bid at once.
fn first_bid_at(interval: Duration) -> Instant {
    Instant::now() + Duration::from_millis(fastrand::u64(0..=interval.as_millis() as u64 / 2))
}

/// Updates the tracked auction from one of its events.
pub(crate) fn observe(t: &mut Tracked, event: &Event, summary: &mut Summary, metrics: &Metrics) {
    let (bid_id, outcome) = match event {
        // Not judged: the server shed it under overload. It stays pending and is published
        // again (same bid_id) when its retry timer fires.
        Event::BidRejected {
            reason: RejectReason::Overloaded | RejectReason::TooManyPending,
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
            deadline_ms,
            ..
        } => {
            if *next_min >= t.next_min {
                t.next_min = *next_min;
                t.high_bidder = Some(bidder.clone());
            }
            // Soft close moved the deadline: expect the close later.
            if let Some(d) = deadline_ms
                && t.deadline_ms.is_none_or(|old| *d > old)
            {
                t.deadline_ms = Some(*d);
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
