//! The admin API's boundary: request fields validated (errors name the field) and stored
//! records and events mapped to their protobuf messages.

use tonic::Status;

use crate::keyspace::AuctionId;
use crate::proto::v1 as pb;
use crate::store::ledger::{AuctionRecord, HistoryEntry, Listed};
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

/// The `ListAuctions` page token for the page after `last`: `c<opened_ms>:<auction_id>`, a
/// place in the index by value, so entries the retention sweeper removes between two pages
/// do not shift the next one.
pub(super) fn auctions_token(last: &Listed) -> String {
    format!("c{}:{}", last.opened_ms, last.id)
}

/// The place a `ListAuctions` page token names (`None` for the first page).
pub(super) fn auctions_after(token: &str) -> Result<Option<Listed>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || bad_token("ListAuctions");
    let (ms, id) = token
        .strip_prefix('c')
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(bad)?;
    Ok(Some(Listed {
        opened_ms: parse_decimal(ms).ok_or_else(bad)?,
        id: AuctionId::parse(id).map_err(|_| bad())?,
    }))
}

/// Where a `ListBids` page starts.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BidsAfter {
    /// The first page.
    Start,
    /// After this stream id (`<ms>-<seq>`, both checked to fit Redis's 64-bit parts).
    Entry(String),
    /// After the largest possible stream id: nothing can follow.
    End,
}

/// The place a `ListBids` page token (the last stream id of the previous page) names.
pub(super) fn bids_after(token: &str) -> Result<BidsAfter, Status> {
    if token.is_empty() {
        return Ok(BidsAfter::Start);
    }
    let bad = || bad_token("ListBids");
    let (ms, seq) = token.split_once('-').ok_or_else(bad)?;
    match (parse_decimal(ms), parse_decimal(seq)) {
        (Some(u64::MAX), Some(u64::MAX)) => Ok(BidsAfter::End),
        (Some(ms), Some(seq)) => Ok(BidsAfter::Entry(format!("{ms}-{seq}"))),
        _ => Err(bad()),
    }
}

fn bad_token(rpc: &str) -> Status {
    invalid(
        "page_token",
        format!("not a token from a previous {rpc} response; start again with an empty page_token"),
    )
}

/// A plain decimal `u64` (digits only: no sign, no spaces), `None` if it is not one or
/// does not fit.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auction_page_tokens_round_trip_and_refuse_anything_else() {
        let place = Listed {
            opened_ms: 1_795_770_000_000,
            id: AuctionId::parse("lot-7").expect("id"),
        };
        let token = auctions_token(&place);
        assert_eq!(auctions_after(&token).expect("valid"), Some(place));
        assert_eq!(auctions_after("").expect("first page"), None);
        for bad in [
            "o18446744073709551615",
            "o5",
            "c18446744073709551616:a",
            "c-1:a",
            "c+1:a",
            "c1:",
            "c1:a:b",
            "c:a",
            "c1",
            "garbage",
        ] {
            let err = auctions_after(bad).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(err.message().starts_with("page_token"), "{bad}: {err:?}");
        }
    }

    #[test]
    fn bid_page_tokens_fit_redis_stream_ids() {
        assert_eq!(bids_after("").expect("first"), BidsAfter::Start);
        assert_eq!(
            bids_after("1795770000000-3").expect("valid"),
            BidsAfter::Entry("1795770000000-3".into())
        );
        assert_eq!(
            bids_after("18446744073709551615-18446744073709551615").expect("largest"),
            BidsAfter::End
        );
        for bad in [
            "18446744073709551616-0",
            "0-18446744073709551616",
            "1-",
            "-1",
            "1-2-3",
            "+1-2",
            "1",
            "o18446744073709551615",
        ] {
            let err = bids_after(bad).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
