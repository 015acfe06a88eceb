//! The event channel's v1 messages: every [`Event`] an auction goes through, and the
//! [`RejectReason`]s a bid can be refused with.

use serde::{Deserialize, Serialize};

use super::{Bid, Malformed, VERSION, WireError};
use crate::keyspace::truncate;
use crate::wire::MAX_MESSAGE_BYTES;

/// Why a bid was rejected. Serialized as its snake_case name in `bid_rejected.reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// No auction with that id.
    UnknownAuction,
    /// The auction has closed.
    AuctionClosed,
    /// Reached Redis after the deadline (judged by Redis `TIME`), before the close ran.
    DeadlinePassed,
    /// Below the starting price (first bid) or below the current high bid.
    TooLow,
    /// Equal to the high bid: the earlier bid wins ties.
    EqualToHigh,
    /// Above the high bid but by less than the minimum increment.
    BelowMinIncrement,
    /// The message did not decode; `detail` says why.
    Malformed,
    /// The server is saturated and did not queue the bid; retry it (same `bid_id`) later.
    Overloaded,
    /// Not judged: this bidder already has its share of bids waiting on this auction at the
    /// server (a flood from one name); nothing stored. Wait for the outcomes, then retry.
    TooManyPending,
    /// Not judged: the server requires signed bids (`BID_AUTH=required`) and this one's
    /// signature is missing or wrong, or its bidder is not registered; nothing stored.
    Unauthenticated,
    /// Valid, but the leader's proxy bid (`max_amount`) covers it: the leader's price rose
    /// to just above it (announced as the leader's `bid_accepted` with `"proxy": true`).
    OutbidByProxy,
}

impl RejectReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownAuction => "unknown_auction",
            RejectReason::AuctionClosed => "auction_closed",
            RejectReason::DeadlinePassed => "deadline_passed",
            RejectReason::TooLow => "too_low",
            RejectReason::EqualToHigh => "equal_to_high",
            RejectReason::BelowMinIncrement => "below_min_increment",
            RejectReason::Malformed => "malformed",
            RejectReason::Overloaded => "overloaded",
            RejectReason::OutbidByProxy => "outbid_by_proxy",
            RejectReason::TooManyPending => "too_many_pending",
            RejectReason::Unauthenticated => "unauthenticated",
        }
    }

    /// Parses a wire name (as stored by the Lua scripts).
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "unknown_auction" => RejectReason::UnknownAuction,
            "auction_closed" => RejectReason::AuctionClosed,
            "deadline_passed" => RejectReason::DeadlinePassed,
            "too_low" => RejectReason::TooLow,
            "equal_to_high" => RejectReason::EqualToHigh,
            "below_min_increment" => RejectReason::BelowMinIncrement,
            "malformed" => RejectReason::Malformed,
            "overloaded" => RejectReason::Overloaded,
            "outbid_by_proxy" => RejectReason::OutbidByProxy,
            "too_many_pending" => RejectReason::TooManyPending,
            "unauthenticated" => RejectReason::Unauthenticated,
            _ => return None,
        })
    }
}

/// An event on the event channel. `seq` orders an auction's history without gaps; events
/// that changed nothing stored (rejections for unknown or closed auctions, malformed
/// messages) carry no `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An auction opened.
    AuctionOpened {
        /// The auction.
        auction_id: String,
        /// Always 1.
        seq: u64,
        /// What is sold.
        item: String,
        /// Lowest acceptable first bid.
        starting_price: u64,
        /// Every later bid must beat the high bid by at least this.
        min_increment: u64,
        /// Below this the auction closes without a winner.
        reserve_price: u64,
        /// Opening time, Redis clock, ms since the epoch.
        opened_at_ms: u64,
        /// Deadline, Redis clock, ms since the epoch.
        deadline_ms: u64,
        /// Soft close: a bid accepted less than this many ms before the deadline moves the
        /// deadline to its time plus this (0 or absent: off).
        #[serde(default, skip_serializing_if = "is_zero")]
        soft_close_ms: u64,
    },
    /// A bid became the high bid.
    BidAccepted {
        /// The auction.
        auction_id: String,
        /// Position in the auction's history.
        seq: u64,
        /// The bid's client-made id.
        bid_id: String,
        /// Who bid.
        bidder: String,
        /// The amount, now the high bid.
        amount: u64,
        /// The lowest amount the next bid may offer.
        next_min: u64,
        /// W3C trace context of the server's judging span, when the bid was traced.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// Set on a raise made for the leader by its proxy bid (`max_amount`), not by a
        /// bid it sent; its `bid_id` is derived from the bid that provoked it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        proxy: bool,
        /// The auction's new deadline, Redis clock, when this bid extended it (soft close).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
    },
    /// A bid was refused.
    BidRejected {
        /// The auction, when the message named a valid one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auction_id: Option<String>,
        /// Present when the rejection is part of the auction's stored history.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// The bid's client-made id.
        bid_id: String,
        /// Who bid, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bidder: Option<String>,
        /// The amount offered, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        amount: Option<u64>,
        /// Why.
        reason: RejectReason,
        /// Human-readable detail for `malformed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// The lowest amount a new bid may offer, when the auction is open.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_min: Option<u64>,
        /// W3C trace context of the server's judging span, when the bid was traced.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    /// The auction closed, exactly once.
    AuctionClosed {
        /// The auction.
        auction_id: String,
        /// The last position in the auction's history.
        seq: u64,
        /// The winning bidder, or null (no bids, or high bid under the reserve).
        winner: Option<String>,
        /// The winning amount, or null.
        amount: Option<u64>,
        /// The winning bid's id, or null.
        bid_id: Option<String>,
        /// Accepted bids over the auction's life.
        bid_count: u64,
        /// Closing time, Redis clock, ms since the epoch.
        closed_at_ms: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u64,
    #[serde(flatten)]
    body: T,
}

impl Event {
    /// The auction this event is about, if any.
    pub fn auction_id(&self) -> Option<&str> {
        match self {
            Event::AuctionOpened { auction_id, .. }
            | Event::BidAccepted { auction_id, .. }
            | Event::AuctionClosed { auction_id, .. } => Some(auction_id),
            Event::BidRejected { auction_id, .. } => auction_id.as_deref(),
        }
    }

    /// The event's position in its auction's history, if it has one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::AuctionOpened { seq, .. }
            | Event::BidAccepted { seq, .. }
            | Event::AuctionClosed { seq, .. } => Some(*seq),
            Event::BidRejected { seq, .. } => *seq,
        }
    }

    /// Sets the trace context on a bid outcome (other events carry none).
    pub fn set_traceparent(&mut self, tp: Option<String>) {
        if let Event::BidAccepted { traceparent, .. } | Event::BidRejected { traceparent, .. } =
            self
        {
            *traceparent = tp;
        }
    }

    /// The trace context of a bid outcome, if any.
    pub fn traceparent(&self) -> Option<&str> {
        match self {
            Event::BidAccepted { traceparent, .. } | Event::BidRejected { traceparent, .. } => {
                traceparent.as_deref()
            }
            _ => None,
        }
    }

    /// The bid this event answers, if any.
    pub fn bid_id(&self) -> Option<&str> {
        match self {
            Event::BidAccepted { bid_id, .. } | Event::BidRejected { bid_id, .. } => Some(bid_id),
            _ => None,
        }
    }

    /// The JSON published on the event channel.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(&Envelope {
            v: VERSION,
            body: self,
        })
        .unwrap_or_default()
    }

    /// Decodes an event-channel message.
    pub fn from_json(payload: &[u8]) -> Result<Event, WireError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::Oversized(payload.len()));
        }
        let env: Envelope<Event> = serde_json::from_slice(payload)
            .map_err(|e| WireError::NotJson(truncate(&e.to_string(), 120)))?;
        if env.v != VERSION {
            return Err(WireError::UnsupportedVersion(env.v.to_string()));
        }
        Ok(env.body)
    }

    /// A refusal of `bid` that does not depend on the auction's state (no `seq`, not
    /// stored): unknown auction, overload.
    pub fn refusal(bid: Bid, reason: RejectReason, detail: Option<String>) -> Event {
        Event::BidRejected {
            auction_id: Some(bid.auction_id.to_string()),
            seq: None,
            bid_id: bid.bid_id,
            bidder: Some(bid.bidder),
            amount: Some(bid.amount),
            reason,
            detail,
            next_min: None,
            traceparent: None,
        }
    }

    /// The rejection event answering a message that failed to decode, when it named a bid.
    pub fn for_malformed(m: &Malformed) -> Option<Event> {
        Some(Event::BidRejected {
            auction_id: m.auction_id.as_ref().map(|a| a.as_str().to_owned()),
            seq: None,
            bid_id: m.bid_id.clone()?,
            bidder: m.bidder.clone(),
            amount: None,
            reason: RejectReason::Malformed,
            detail: Some(m.error.to_string()),
            next_min: None,
            traceparent: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_version_and_type() {
        let ev = Event::BidRejected {
            auction_id: Some("a1".into()),
            seq: None,
            bid_id: "b1".into(),
            bidder: Some("al".into()),
            amount: Some(5),
            reason: RejectReason::TooLow,
            detail: None,
            next_min: Some(10),
            traceparent: None,
        };
        let json = ev.to_json();
        assert!(
            json.contains(r#""v":1"#) && json.contains(r#""type":"bid_rejected""#),
            "{json}"
        );
        assert!(!json.contains("seq"), "absent seq is omitted: {json}");
        assert_eq!(Event::from_json(json.as_bytes()).expect("decode"), ev);
    }
}
