//! The wire format on the two Pub/Sub channels: versioned JSON any Redis client can speak.
//!
//! Bidders publish [`Bid`] commands on the command channel; the server publishes [`Event`]s
//! on the event channel. Decoding is strict at this boundary: size-capped, every field
//! checked, amounts integers in minor units (never floats). A message that fails but still
//! names a `bid_id` yields a [`Malformed`] that carries enough to tell its sender why.

use serde_json::Value;

use crate::keyspace::{AuctionId, truncate};

mod command;
mod control;
pub mod dialect;
mod event;

pub use command::{Bid, decode_any, decode_command};
pub use control::CloseRequest;
pub use event::{Event, RejectReason};

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
    /// The same problem reported for another field (a shared parser's error).
    pub fn renamed(self, field: &'static str) -> Self {
        match self {
            WireError::BadField { problem, .. } => WireError::BadField { field, problem },
            other => other,
        }
    }

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

impl Malformed {
    /// A failure that names no bid (nothing to answer).
    pub fn bare(error: WireError) -> Self {
        Malformed {
            error,
            bid_id: None,
            bidder: None,
            auction_id: None,
        }
    }
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
