//! The admin API's boundary: request fields validated (errors name the field) and stored
//! records and events mapped to their protobuf messages.

use tonic::Status;

use crate::keyspace::AuctionId;
use crate::proto::v1 as pb;
use crate::store::ledger::{AuctionRecord, HistoryEntry};
use crate::wire::{self, Event};

pub(super) fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("Redis unavailable, retry: {e}"))
}

pub(super) fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// Compares secrets in time independent of where they differ.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub(super) fn parse_id(raw: &str) -> Result<AuctionId, Status> {
    AuctionId::parse(raw).map_err(|e| invalid("auction_id", e))
}

pub(super) fn amount(field: &str, v: i64, min: i64) -> Result<u64, Status> {
    if v < min || v as u64 > wire::MAX_AMOUNT {
        return Err(invalid(
            field,
            format!(
                "must be between {min} and {} (minor units)",
                wire::MAX_AMOUNT
            ),
        ));
    }
    Ok(v as u64)
}

pub(super) fn page_size(raw: i32, (default, max): (usize, usize)) -> Result<usize, Status> {
    match raw {
        0 => Ok(default),
        n if n < 0 || n as usize > max => {
            Err(invalid("page_size", format!("must be between 0 and {max}")))
        }
        n => Ok(n as usize),
    }
}

pub(super) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub(super) fn high_bid((amount, bidder, bid_id): &(u64, String, String)) -> pb::HighBid {
    pb::HighBid {
        amount: *amount as i64,
        bidder: bidder.clone(),
        bid_id: bid_id.clone(),
    }
}

/// The protobuf view of a stored auction.
pub fn to_proto(r: &AuctionRecord) -> pb::Auction {
    let next_min = match &r.high {
        Some((amount, _, _)) => amount + r.min_increment,
        None => r.starting_price,
    };
    pb::Auction {
        auction_id: r.auction_id.to_string(),
        item: r.item.clone(),
        state: if r.open {
            pb::AuctionState::Open
        } else {
            pb::AuctionState::Closed
        } as i32,
        starting_price: r.starting_price as i64,
        min_increment: r.min_increment as i64,
        reserve_price: r.reserve_price as i64,
        high_bid: r.high.as_ref().map(high_bid),
        bid_count: r.bid_count as i64,
        opened_at: Some(timestamp(r.opened_ms)),
        deadline: Some(timestamp(r.deadline_ms)),
        closed_at: r.closed_ms.map(timestamp),
        winner: r.winner.as_ref().map(high_bid),
        seq: r.seq,
        next_min: if r.open { next_min as i64 } else { 0 },
        soft_close: (r.soft_close_ms > 0).then(|| duration(r.soft_close_ms)),
    }
}

/// Milliseconds as a protobuf duration.
fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf duration as a `Duration`, `field` naming it in the error.
pub(super) fn from_duration(
    field: &str,
    d: &prost_types::Duration,
) -> Result<std::time::Duration, Status> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid(field, "must not be negative"));
    }
    Ok(std::time::Duration::new(d.seconds as u64, d.nanos as u32))
}

pub(super) fn bid_to_proto(h: &HistoryEntry) -> pb::Bid {
    pb::Bid {
        bid_id: h.bid_id.clone(),
        bidder: h.bidder.clone(),
        amount: h.amount as i64,
        seq: h.seq,
        accepted_at: Some(timestamp(h.at_ms)),
        fencing_token: h.fence,
        proxy: h.bid_id.ends_with("+proxy"),
    }
}

/// The protobuf view of a live event (`None` for `auction_opened`, which a watch shows as
/// its snapshot).
pub fn event_to_proto(e: &Event) -> Option<pb::AuctionEvent> {
    use pb::auction_event::Kind;
    let (seq, kind) = match e {
        Event::AuctionOpened { .. } => return None,
        Event::BidAccepted {
            seq,
            bid_id,
            bidder,
            amount,
            next_min,
            proxy,
            deadline_ms,
            ..
        } => (
            *seq,
            Kind::BidAccepted(pb::BidAccepted {
                bid_id: bid_id.clone(),
                bidder: bidder.clone(),
                amount: *amount as i64,
                next_min: *next_min as i64,
                proxy: *proxy,
                deadline: deadline_ms.map(timestamp),
            }),
        ),
        Event::BidRejected {
            seq,
            bid_id,
            bidder,
            amount,
            reason,
            next_min,
            ..
        } => (
            seq.unwrap_or(0),
            Kind::BidRejected(pb::BidRejected {
                bid_id: bid_id.clone(),
                bidder: bidder.clone().unwrap_or_default(),
                amount: amount.unwrap_or(0) as i64,
                reason: reason.as_str().to_owned(),
                next_min: next_min.unwrap_or(0) as i64,
            }),
        ),
        Event::AuctionClosed {
            seq,
            winner,
            amount,
            bid_id,
            bid_count,
            closed_at_ms,
            ..
        } => (
            *seq,
            Kind::AuctionClosed(pb::AuctionClosed {
                winner: winner.clone().unwrap_or_default(),
                amount: amount.unwrap_or(0) as i64,
                bid_id: bid_id.clone().unwrap_or_default(),
                bid_count: *bid_count as i64,
                closed_at: Some(timestamp(*closed_at_ms)),
            }),
        ),
    };
    Some(pb::AuctionEvent {
        seq,
        kind: Some(kind),
    })
}
