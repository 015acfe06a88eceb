//! The control channel, between servers: a [`CloseRequest`].

use serde_json::Value;

use super::{VERSION, WireError, describe, parse_auction_id};
use crate::keyspace::{AuctionId, truncate};
use crate::wire::MAX_MESSAGE_BYTES;

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

    #[test]
    fn close_requests_round_trip_and_reject_other_types() {
        let req = CloseRequest {
            auction_id: AuctionId::parse("a1").expect("id"),
        };
        assert_eq!(CloseRequest::from_json(req.to_json().as_bytes()), Ok(req));
        assert!(CloseRequest::from_json(br#"{"v":1,"type":"bid","auction_id":"a1"}"#).is_err());
        assert!(CloseRequest::from_json(br#"{"v":1,"type":"close","auction_id":"a:1"}"#).is_err());
    }
}
