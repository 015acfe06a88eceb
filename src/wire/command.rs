//! The command channel's v1 message: a [`Bid`], and its strict decoding at the boundary.

use serde_json::{Map, Value};

use super::{
    Malformed, VERSION, WireError, describe, is_traceparent, parse_amount, parse_auction_id,
    parse_bid_id, parse_bidder,
};
use crate::keyspace::{AuctionId, truncate};
use crate::wire::MAX_MESSAGE_BYTES;

/// A bid as published by a bidder on the command channel.
#[derive(Clone, PartialEq, Eq)]
pub struct Bid {
    /// The auction bid on.
    pub auction_id: AuctionId,
    /// Client-made id; retries reuse it, and the server answers a duplicate with its first outcome.
    pub bid_id: String,
    /// Who bids (a pod name, a user name).
    pub bidder: String,
    /// Offered amount in minor units (cents).
    pub amount: u64,
    /// The most this bidder will pay (a proxy bid, `>= amount`): the server raises its
    /// price for it up to this when others bid. Secret: never in events, reads or logs
    /// (this type's `Debug` hides it).
    pub max_amount: Option<u64>,
    /// W3C trace context of the bidder's span, when it has one.
    pub traceparent: Option<String>,
    /// The bidder's signature (lowercase hex HMAC-SHA256 with its registered key, see
    /// [`crate::store::bidders`]); required when the server runs with `BID_AUTH=required`.
    pub sig: Option<String>,
}

impl std::fmt::Debug for Bid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bid")
            .field("auction_id", &self.auction_id)
            .field("bid_id", &self.bid_id)
            .field("bidder", &self.bidder)
            .field("amount", &self.amount)
            .field("max_amount", &self.max_amount.map(|_| "<secret>"))
            .field("traceparent", &self.traceparent)
            .field("sig", &self.sig)
            .finish()
    }
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
        if let Some(obj) = v.as_object_mut() {
            if let Some(max) = self.max_amount {
                obj.insert("max_amount".into(), Value::from(max));
            }
            if let Some(tp) = &self.traceparent {
                obj.insert("traceparent".into(), Value::String(tp.clone()));
            }
            if let Some(sig) = &self.sig {
                obj.insert("sig".into(), Value::String(sig.clone()));
            }
        }
        v.to_string()
    }
}

/// Decodes and validates one command-channel message in the v1 format.
pub fn decode_command(payload: &[u8]) -> Result<Bid, Box<Malformed>> {
    decode_object(payload).and_then(from_v1)
}

/// Decodes one command-channel message in the v1 format or, when `seed_dialect` is on and
/// the message is the prototype's (`"tipo"` and no `"v"`), in its dialect.
pub fn decode_any(payload: &[u8], seed_dialect: bool) -> Result<Bid, Box<Malformed>> {
    let obj = decode_object(payload)?;
    if seed_dialect && obj.contains_key("tipo") && !obj.contains_key("v") {
        super::dialect::bid_from(&obj)
    } else {
        from_v1(obj)
    }
}

/// A size-checked JSON object.
pub(super) fn decode_object(payload: &[u8]) -> Result<Map<String, Value>, Box<Malformed>> {
    let bare = |error| Box::new(Malformed::bare(error));
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(bare(WireError::Oversized(payload.len())));
    }
    // One parse that also catches a key given twice: serde_json's own map keeps the last
    // of two equal keys silently, and `{"amount":1,"amount":900000}` must not be judged as
    // either.
    let strict = serde_json::from_slice::<StrictObject>(payload).map_err(|e| {
        let why = if e.classify() == serde_json::error::Category::Data {
            "top level is not an object".to_owned()
        } else {
            truncate(&e.to_string(), 120)
        };
        bare(WireError::NotJson(why))
    })?;
    match strict.duplicate {
        None => Ok(strict.fields),
        Some(key) => {
            // Still answer the bid when its identity is not the repeated key.
            let mut fields = strict.fields;
            fields.remove(&key);
            let salvage = |k: &str, parse: fn(&Value) -> Result<String, WireError>| {
                fields.get(k).and_then(|v| parse(v).ok())
            };
            Err(Box::new(Malformed {
                error: WireError::NotJson(format!("duplicate key {:?}", truncate(&key, 40))),
                bid_id: salvage("bid_id", parse_bid_id),
                bidder: salvage("bidder", parse_bidder),
                auction_id: fields
                    .get("auction_id")
                    .and_then(|v| parse_auction_id(v).ok()),
            }))
        }
    }
}

/// A JSON object's fields (the first of each key) and the first key given twice, if any.
struct StrictObject {
    fields: Map<String, Value>,
    duplicate: Option<String>,
}

impl<'de> serde::Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = StrictObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut fields: A,
            ) -> Result<StrictObject, A::Error> {
                let mut obj = Map::new();
                let mut duplicate = None;
                while let Some(key) = fields.next_key::<String>()? {
                    let value: Value = fields.next_value()?;
                    if obj.contains_key(&key) {
                        duplicate.get_or_insert(key);
                    } else {
                        obj.insert(key, value);
                    }
                }
                Ok(StrictObject {
                    fields: obj,
                    duplicate,
                })
            }
        }
        d.deserialize_map(Keys)
    }
}

/// The v1 bid in `obj`.
fn from_v1(obj: Map<String, Value>) -> Result<Bid, Box<Malformed>> {
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
    let max_amount = match obj.get("max_amount") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let max = parse_amount(v).map_err(|e| fail(e.renamed("max_amount")))?;
            if max < amount {
                return Err(fail(WireError::BadField {
                    field: "max_amount",
                    problem: format!("must be at least amount ({amount})"),
                }));
            }
            Some(max)
        }
    };
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
    let sig = match obj.get("sig") {
        None | Some(Value::Null) => None,
        Some(Value::String(s))
            if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Some(s.clone())
        }
        Some(_) => {
            return Err(fail(WireError::BadField {
                field: "sig",
                problem: "not 64 lowercase hex characters (HMAC-SHA256, see README)".into(),
            }));
        }
    };
    Ok(Bid {
        auction_id,
        bid_id,
        bidder,
        amount,
        max_amount,
        traceparent,
        sig,
    })
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
    fn a_proxy_bid_carries_its_max_which_debug_output_hides() {
        let raw = r#"{"v":1,"type":"bid","auction_id":"a1","bid_id":"b-1","bidder":"al","amount":100,"max_amount":987654}"#;
        let bid = decode(raw).expect("valid");
        assert_eq!(bid.max_amount, Some(987654));
        assert_eq!(decode(&bid.to_json()).expect("round trip"), bid);
        assert!(!format!("{bid:?}").contains("987654"), "{bid:?}");
        for max in ["99", "0", "1.5", "\"500\"", "1000000000000000001"] {
            let raw = format!(
                r#"{{"v":1,"type":"bid","auction_id":"a1","bid_id":"b-1","bidder":"al","amount":100,"max_amount":{max}}}"#
            );
            let err = decode(&raw).expect_err(max);
            assert!(
                matches!(
                    err.error,
                    WireError::BadField {
                        field: "max_amount",
                        ..
                    }
                ),
                "{max}: {err:?}"
            );
        }
    }

    #[test]
    fn a_key_given_twice_is_malformed_and_named() {
        let raw = r#"{"v":1,"type":"bid","auction_id":"a1","bid_id":"b-1","bidder":"al","amount":1,"amount":900000}"#;
        let err = decode(raw).expect_err("duplicate key");
        assert_eq!(err.error.reason(), "malformed");
        assert!(
            err.error.to_string().contains("duplicate key \"amount\""),
            "{}",
            err.error
        );
        assert_eq!(
            err.bid_id.as_deref(),
            Some("b-1"),
            "the bid is still answered"
        );
        let raw = r#"{"v":1,"type":"bid","auction_id":"a1","bid_id":"b-1","bid_id":"b-2","bidder":"al","amount":1}"#;
        let err = decode(raw).expect_err("duplicate bid_id");
        assert!(
            err.bid_id.is_none(),
            "a repeated bid_id names no bid to answer"
        );
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
}
