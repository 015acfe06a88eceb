//! Names of every Redis key the system uses, and the identifiers embedded in them.
//!
//! All keys of one auction share the hash tag `{ID}` so they live in one cluster slot and
//! a single Lua script may touch them all. Identifiers are validated here, once, before
//! they can reach a key name: an auction id can never contain `{`, `}` or `:` and so can
//! never alias another auction's keys.

use std::fmt;

/// Sorted set of open auctions scored by deadline (Redis ms): the closer's work list.
pub const OPEN_AUCTIONS: &str = "auctions:open";
/// Sorted set of every auction opened and not yet forgotten, scored by opening time
/// (Redis ms).
pub const ALL_AUCTIONS: &str = "auctions:all";
/// Sorted set of closed auctions scored by the time (Redis ms) their keys expire: the
/// retention sweeper's work list (it takes expired ones out of every index).
pub const CLOSED_AUCTIONS: &str = "auctions:closed";
/// Hash bidder name → its key (bid authentication). Bidders' ACL user cannot read it.
pub const BIDDER_KEYS: &str = "bidders:keys";
/// Hash bidder name → registration time (Redis ms), for `ListBidders`.
pub const BIDDERS_REGISTERED: &str = "bidders:registered";
/// Counter bumped by every registration and revocation: servers poll it to refresh their
/// cache of keys.
pub const BIDDERS_VERSION: &str = "bidders:version";

/// Counter every group commit increments on its connection right before `WAIT`: `WAIT`
/// counts only the calling connection's own writes, so an answer that was read rather
/// than written (an `already` close, a batch of pure duplicates or refusals, the first
/// batch on a new connection) is vouched for only after a write of this connection that
/// follows it. Its value means nothing.
pub const COMMIT_MARKER: &str = "auctions:commit-marker";

/// Longest accepted auction id, in bytes.
pub const MAX_AUCTION_ID_LEN: usize = 64;

/// A validated auction identifier: 1–64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuctionId(String);

/// Why a string is not a valid auction id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auction_id must be 1-{MAX_AUCTION_ID_LEN} characters of A-Z a-z 0-9 _ -, got {0:?}")]
pub struct InvalidAuctionId(pub String);

impl AuctionId {
    /// Validates `raw` as an auction id.
    pub fn parse(raw: &str) -> Result<Self, InvalidAuctionId> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_AUCTION_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidAuctionId(truncate(raw, 80)))
        }
    }

    /// A fresh random id (12 hex digits, prefixed `a`), for auctions opened without one.
    pub fn random() -> Self {
        Self(format!("a{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `auction:{ID}`: the hash holding the auction's state.
    pub fn state_key(&self) -> String {
        format!("auction:{{{}}}", self.0)
    }

    /// `auction:{ID}:bids`: stream of accepted bids, the auction's history.
    pub fn bids_key(&self) -> String {
        format!("auction:{{{}}}:bids", self.0)
    }

    /// `auction:{ID}:outcomes`: hash bid_id → first outcome, for idempotent retries.
    pub fn outcomes_key(&self) -> String {
        format!("auction:{{{}}}:outcomes", self.0)
    }

    /// `auction:{ID}:fence`: the fencing-token counter; it only grows.
    pub fn fence_key(&self) -> String {
        format!("auction:{{{}}}:fence", self.0)
    }

    /// `lock:auction:{ID}`: the lease; its value is `OWNER#TOKEN`.
    pub fn lock_key(&self) -> String {
        format!("lock:auction:{{{}}}", self.0)
    }
}

impl fmt::Display for AuctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, for quoting untrusted input
/// in logs and errors without letting it grow them unboundedly.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids_and_builds_tagged_keys() {
        let id = AuctionId::parse("lot-42_b").expect("valid id");
        assert_eq!(id.state_key(), "auction:{lot-42_b}");
        assert_eq!(id.bids_key(), "auction:{lot-42_b}:bids");
        assert_eq!(id.lock_key(), "lock:auction:{lot-42_b}");
    }

    #[test]
    fn rejects_ids_that_could_alias_other_keys() {
        for bad in ["", "a}b", "a{b", "a:b", "a b", "é", &"x".repeat(65)] {
            assert!(AuctionId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn random_ids_are_valid() {
        let id = AuctionId::random();
        assert!(AuctionId::parse(id.as_str()).is_ok());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
