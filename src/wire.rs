//! The wire format on the two Pub/Sub channels: versioned JSON any Redis client can speak.
//!
//! Bidders publish [`Bid`] commands on the command channel; the server publishes [`Event`]s
//! on the event channel. Decoding is strict at this boundary: size-capped, every field
//! checked, amounts integers in minor units (never floats). A message that fails but still
//! names a `bid_id` yields a [`Malformed`] that carries enough to tell its sender why.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::keyspace::{AuctionId, truncate};

/// The only protocol version this build speaks.
pub const VERSION: u64 = 1;
/// Largest accepted command, in bytes. Real bids are ~150 bytes; anything near this is abuse.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Largest amount, in minor units. Amounts pass through Lua numbers (IEEE doubles), which
/// are exact to 2^53; this bound keeps `high + min_increment` exact too.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;
/// Longest `bid_id`.
pub const MAX_BID_ID_LEN: usize = 128;
/// Longest bidder name.
pub const MAX_BIDDER_LEN: usize = 64;

/// A bid as published by a bidder on the command channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bid {
    /// The auction bid on.
    pub auction_id: AuctionId,
    /// Client-made id; retries reuse it, and the server answers a duplicate with its first outcome.
    pub bid_id: String,
    /// Who bids (a pod name, a user name).
    pub bidder: String,
    /// Offered amount in minor units (cents).
    pub amount: u64,
    /// W3C trace context of the bidder's span, when it has one.
    pub traceparent: Option<String>,
}

impl Bid {
    /// The JSON a bidder publishes.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "v": VERSION,
            "type": "bid",
            "auction_id": self.auction_id.as_str(),
            "bid_id": self.bid_id,
            "bidder": self.bidder,
            "amount": self.amount,
        });
        if let (Some(tp), Some(obj)) = (&self.traceparent, v.as_object_mut()) {
            obj.insert("traceparent".into(), Value::String(tp.clone()));
        }
        v.to_string()
    }
}

/// Why a command was refused at the boundary. Each variant is a counted reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    Oversized(usize),
    /// Not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// `v` missing or not a version we speak.
    #[error("unsupported version {0} (this server speaks v{VERSION})")]
    UnsupportedVersion(String),
    /// `type` missing or not a command (events and admin operations are not accepted here).
    #[error("unknown message type {0} (the command channel accepts only \"bid\")")]
    UnknownType(String),
    /// A field is missing or out of range.
    #[error("field {field}: {problem}")]
    BadField {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl WireError {
    /// A stable, low-cardinality name for counting and for `bid_rejected.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Oversized(_) => "oversized",
            WireError::NotJson(_) => "malformed",
            WireError::UnsupportedVersion(_) => "unsupported_version",
            WireError::UnknownType(_) => "unknown_type",
            WireError::BadField { .. } => "invalid_field",
        }
    }
}

/// A command that failed validation, with whatever identifying fields could be salvaged so
/// its sender can still be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// What was wrong.
    pub error: WireError,
    /// The `bid_id`, when present and itself valid.
    pub bid_id: Option<String>,
    /// The `bidder`, when present and valid.
    pub bidder: Option<String>,
    /// The `auction_id`, when present and valid.
    pub auction_id: Option<AuctionId>,
}

/// Decodes and validates one command-channel message.
pub fn decode_command(payload: &[u8]) -> Result<Bid, Box<Malformed>> {
    let bare = |error| {
        Box::new(Malformed {
            error,
            bid_id: None,
            bidder: None,
            auction_id: None,
        })
    };
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(bare(WireError::Oversized(payload.len())));
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| bare(WireError::NotJson(truncate(&e.to_string(), 120))))?;
    let Value::Object(obj) = value else {
        return Err(bare(WireError::NotJson(
            "top level is not an object".into(),
        )));
    };
    // Salvage identity first so that every later failure can be answered.
    let bid_id = obj.get("bid_id").map(parse_bid_id);
    let bidder = obj.get("bidder").map(parse_bidder);
    let auction_id = obj.get("auction_id").map(parse_auction_id);
    let fail = |error| {
        Box::new(Malformed {
            error,
            bid_id: bid_id.clone().and_then(Result::ok),
            bidder: bidder.clone().and_then(Result::ok),
            auction_id: auction_id.clone().and_then(Result::ok),
        })
    };

    match obj.get("v") {
        Some(v) if v.as_u64() == Some(VERSION) => {}
        other => {
            return Err(fail(WireError::UnsupportedVersion(describe(other))));
        }
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("bid") => {}
        _ => return Err(fail(WireError::UnknownType(describe(obj.get("type"))))),
    }
    let missing = |field| WireError::BadField {
        field,
        problem: "missing".into(),
    };
    let auction_id = auction_id
        .clone()
        .ok_or_else(|| fail(missing("auction_id")))?
        .map_err(&fail)?;
    let bid_id = bid_id
        .clone()
        .ok_or_else(|| fail(missing("bid_id")))?
        .map_err(&fail)?;
    let bidder = bidder
        .clone()
        .ok_or_else(|| fail(missing("bidder")))?
        .map_err(&fail)?;
    let amount =
        parse_amount(obj.get("amount").ok_or_else(|| fail(missing("amount")))?).map_err(&fail)?;
    let traceparent = match obj.get("traceparent") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if is_traceparent(s) => Some(s.clone()),
        Some(_) => {
            return Err(fail(WireError::BadField {
                field: "traceparent",
                problem: "not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)".into(),
            }));
        }
    };
    Ok(Bid {
        auction_id,
        bid_id,
        bidder,
        amount,
        traceparent,
    })
}

fn describe(v: Option<&Value>) -> String {
    match v {
        None => "(missing)".into(),
        Some(v) => truncate(&v.to_string(), 40),
    }
}

fn parse_auction_id(v: &Value) -> Result<AuctionId, WireError> {
    let s = v.as_str().ok_or_else(|| WireError::BadField {
        field: "auction_id",
        problem: "must be a string".into(),
    })?;
    AuctionId::parse(s).map_err(|e| WireError::BadField {
        field: "auction_id",
        problem: e.to_string(),
    })
}

/// Validates a token-like field (bid ids, bidder names): ASCII letters, digits and `_.:@-`.
/// No `|`, quotes, spaces or control characters, so they are safe in logs and stored outcomes.
pub fn check_token(field: &'static str, s: &str, max: usize) -> Result<(), WireError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(WireError::BadField {
            field,
            problem: format!(
                "must be 1-{max} characters of A-Z a-z 0-9 _ . : @ -, got {:?}",
                truncate(s, 40)
            ),
        })
    }
}

fn parse_token(field: &'static str, v: &Value, max: usize) -> Result<String, WireError> {
    let s = v.as_str().ok_or_else(|| WireError::BadField {
        field,
        problem: "must be a string".into(),
    })?;
    check_token(field, s, max)?;
    Ok(s.to_owned())
}

fn parse_bid_id(v: &Value) -> Result<String, WireError> {
    parse_token("bid_id", v, MAX_BID_ID_LEN)
}

fn parse_bidder(v: &Value) -> Result<String, WireError> {
    parse_token("bidder", v, MAX_BIDDER_LEN)
}

fn parse_amount(v: &Value) -> Result<u64, WireError> {
    let bad = |problem: &str| WireError::BadField {
        field: "amount",
        problem: problem.into(),
    };
    match v.as_u64() {
        Some(0) => Err(bad("must be positive")),
        Some(n) if n > MAX_AMOUNT => Err(bad(&format!("must be at most {MAX_AMOUNT}"))),
        Some(n) => Ok(n),
        None if v.is_number() => Err(bad(
            "must be a positive integer in minor units (cents), not a fraction or negative",
        )),
        None => Err(bad("must be an integer")),
    }
}

fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

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

/// A server-to-server request on the control channel: "whoever holds this auction's
/// lease, close it now". Sent by a server whose admin API was asked to close an auction
/// another server holds; only servers may publish here (Redis ACL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    /// The auction to close.
    pub auction_id: AuctionId,
}

impl CloseRequest {
    /// The JSON published on the control channel.
    pub fn to_json(&self) -> String {
        serde_json::json!({"v": VERSION, "type": "close", "auction_id": self.auction_id.as_str()})
            .to_string()
    }

    /// Decodes a control-channel message.
    pub fn from_json(payload: &[u8]) -> Result<Self, WireError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::Oversized(payload.len()));
        }
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| WireError::NotJson(truncate(&e.to_string(), 120)))?;
        if value.get("v").and_then(Value::as_u64) != Some(VERSION) {
            return Err(WireError::UnsupportedVersion(describe(value.get("v"))));
        }
        if value.get("type").and_then(Value::as_str) != Some("close") {
            return Err(WireError::UnknownType(describe(value.get("type"))));
        }
        let auction_id = parse_auction_id(value.get("auction_id").unwrap_or(&Value::Null))?;
        Ok(Self { auction_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<Bid, Box<Malformed>> {
        decode_command(s.as_bytes())
    }

    #[test]
    fn decodes_a_valid_bid_and_round_trips() {
        let raw = r#"{"v":1,"type":"bid","auction_id":"a1","bid_id":"b-1","bidder":"alice","amount":1234}"#;
        let bid = decode(raw).expect("valid");
        assert_eq!(bid.amount, 1234);
        assert_eq!(decode(&bid.to_json()).expect("round trip"), bid);
    }

    #[test]
    fn rejects_floats_negatives_zero_and_huge_amounts_naming_the_bid() {
        for amount in ["12.5", "-3", "0", "1e300", "\"12\"", "1000000000000000001"] {
            let raw = format!(
                r#"{{"v":1,"type":"bid","auction_id":"a1","bid_id":"b-1","bidder":"al","amount":{amount}}}"#
            );
            let err = decode(&raw).expect_err(amount);
            assert_eq!(err.bid_id.as_deref(), Some("b-1"), "{amount}");
            assert!(
                matches!(
                    err.error,
                    WireError::BadField {
                        field: "amount",
                        ..
                    }
                ),
                "{amount}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_wrong_version_type_and_garbage() {
        let e = decode(r#"{"v":2,"type":"bid","bid_id":"x"}"#).expect_err("v2");
        assert_eq!(e.error.reason(), "unsupported_version");
        assert_eq!(e.bid_id.as_deref(), Some("x"));
        let e = decode(r#"{"v":1,"type":"close","auction_id":"a"}"#).expect_err("type");
        assert_eq!(e.error.reason(), "unknown_type");
        assert_eq!(
            decode("not json").expect_err("junk").error.reason(),
            "malformed"
        );
        assert_eq!(
            decode("[1,2]").expect_err("array").error.reason(),
            "malformed"
        );
        let big = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert_eq!(decode(&big).expect_err("big").error.reason(), "oversized");
    }

    #[test]
    fn rejects_ids_with_separators_or_bad_trace_context() {
        let e = decode(
            r#"{"v":1,"type":"bid","auction_id":"a1","bid_id":"b|1","bidder":"al","amount":5}"#,
        )
        .expect_err("pipe");
        assert!(e.bid_id.is_none());
        let e = decode(r#"{"v":1,"type":"bid","auction_id":"a1","bid_id":"b1","bidder":"al","amount":5,"traceparent":"zz"}"#)
            .expect_err("traceparent");
        assert_eq!(e.bid_id.as_deref(), Some("b1"));
    }

    #[test]
    fn close_requests_round_trip_and_reject_other_types() {
        let req = CloseRequest {
            auction_id: AuctionId::parse("a1").expect("id"),
        };
        assert_eq!(CloseRequest::from_json(req.to_json().as_bytes()), Ok(req));
        assert!(CloseRequest::from_json(br#"{"v":1,"type":"bid","auction_id":"a1"}"#).is_err());
        assert!(CloseRequest::from_json(br#"{"v":1,"type":"close","auction_id":"a:1"}"#).is_err());
    }

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
