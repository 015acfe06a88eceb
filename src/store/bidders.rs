//! Bidder identities: each registered bidder's key, stored where only servers can read it
//! (the bidders' ACL user has no key access at all), and the signature a bid carries.
//!
//! A bid's `sig` is lowercase hex of HMAC-SHA256, keyed with the key's UTF-8 bytes, over
//! `auction_id "\n" bid_id "\n" bidder "\n" amount` (amount as its decimal integer), with
//! `"\n" max_amount` appended when the bid has one: it binds the auction, the bid id, the
//! bidder and the amounts, so a signed bid cannot be replayed elsewhere or altered.
//! Registration and revocation bump `bidders:version`, which servers poll to refresh their
//! cache, so a change reaches every server well within a second without a Redis read per
//! bid.

use std::collections::HashMap;
use std::sync::LazyLock;

use hmac::{Hmac, Mac};
use redis::aio::ConnectionLike;
use redis::{RedisError, Script};
use sha2::Sha256;

use crate::keyspace::{BIDDER_KEYS, BIDDERS_REGISTERED, BIDDERS_VERSION};
use crate::wire::Bid;

static REGISTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("bidders/register.lua")));
static REVOKE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("bidders/revoke.lua")));

/// Bytes of randomness in a key (256 bits; the issue asks for at least 128).
const KEY_BYTES: usize = 32;

/// A fresh key: 64 lowercase hex characters from the operating system's CSPRNG.
pub fn new_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a bid's signature covers.
pub fn signed_message(bid: &Bid) -> String {
    let mut m = format!(
        "{}\n{}\n{}\n{}",
        bid.auction_id.as_str(),
        bid.bid_id,
        bid.bidder,
        bid.amount
    );
    if let Some(max) = bid.max_amount {
        m.push('\n');
        m.push_str(&max.to_string());
    }
    m
}

fn mac(key: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length")
}

/// The signature of `bid` under `key`: lowercase hex HMAC-SHA256.
pub fn sign(bid: &Bid, key: &str) -> String {
    let mut m = mac(key);
    m.update(signed_message(bid).as_bytes());
    hex(&m.finalize().into_bytes())
}

/// Whether `sig` (lowercase hex) is `bid`'s signature under `key`, compared in constant time.
pub fn verify(bid: &Bid, sig: &str, key: &str) -> bool {
    let Some(raw) = unhex(sig) else { return false };
    let mut m = mac(key);
    m.update(signed_message(bid).as_bytes());
    m.verify_slice(&raw).is_ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Stores `key` as `bidder`'s key (replacing any earlier one); returns the registration
/// time (Redis ms).
pub async fn register<C: ConnectionLike + Send>(
    conn: &mut C,
    bidder: &str,
    key: &str,
) -> Result<u64, RedisError> {
    REGISTER
        .key(BIDDER_KEYS)
        .key(BIDDERS_REGISTERED)
        .key(BIDDERS_VERSION)
        .arg(bidder)
        .arg(key)
        .invoke_async(conn)
        .await
}

/// Ends `bidder`'s key; false if it was not registered.
pub async fn revoke<C: ConnectionLike + Send>(
    conn: &mut C,
    bidder: &str,
) -> Result<bool, RedisError> {
    let had: u64 = REVOKE
        .key(BIDDER_KEYS)
        .key(BIDDERS_REGISTERED)
        .key(BIDDERS_VERSION)
        .arg(bidder)
        .invoke_async(conn)
        .await?;
    Ok(had == 1)
}

/// Registered bidders and their registration times (Redis ms), by name.
pub async fn list<C: ConnectionLike + Send>(
    conn: &mut C,
) -> Result<Vec<(String, u64)>, RedisError> {
    let all: HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(BIDDERS_REGISTERED)
        .query_async(conn)
        .await?;
    let mut all: Vec<(String, u64)> = all.into_iter().collect();
    all.sort();
    Ok(all)
}

/// The version counter and every key, for a server's cache.
pub async fn version<C: ConnectionLike + Send>(conn: &mut C) -> Result<u64, RedisError> {
    let v: Option<u64> = redis::cmd("GET")
        .arg(BIDDERS_VERSION)
        .query_async(conn)
        .await?;
    Ok(v.unwrap_or(0))
}

/// Every registered bidder's key.
pub async fn keys<C: ConnectionLike + Send>(
    conn: &mut C,
) -> Result<HashMap<String, String>, RedisError> {
    redis::cmd("HGETALL")
        .arg(BIDDER_KEYS)
        .query_async(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::AuctionId;

    fn bid(max: Option<u64>) -> Bid {
        Bid {
            auction_id: AuctionId::parse("guitar-1").expect("id"),
            bid_id: "alice-1".into(),
            bidder: "alice".into(),
            amount: 1250,
            max_amount: max,
            traceparent: None,
            sig: None,
        }
    }

    /// The README's worked example, so a bidder in any language can be checked against it.
    #[test]
    fn the_worked_example_signs_as_documented() {
        let key = "5f2b8c0e9d4a7136a1c3e5f70b9d2e4c6a8f0b1d3e5c7a9f2b4d6e8a0c1e3f5a";
        assert_eq!(signed_message(&bid(None)), "guitar-1\nalice-1\nalice\n1250");
        let sig = sign(&bid(None), key);
        assert_eq!(sig, WORKED_EXAMPLE_SIG, "README's worked example");
        assert!(verify(&bid(None), &sig, key));
        assert_eq!(
            signed_message(&bid(Some(5000))),
            "guitar-1\nalice-1\nalice\n1250\n5000"
        );
        assert_ne!(sign(&bid(Some(5000)), key), sig, "the max is signed too");
    }

    #[test]
    fn a_wrong_key_a_changed_field_or_garbage_does_not_verify() {
        let sig = sign(&bid(None), "k1");
        assert!(!verify(&bid(None), &sig, "k2"));
        let mut changed = bid(None);
        changed.amount += 1;
        assert!(!verify(&changed, &sig, "k1"));
        for junk in ["", "zz", "abc", &sig[..10]] {
            assert!(!verify(&bid(None), junk, "k1"), "{junk}");
        }
    }

    #[test]
    fn keys_are_fresh_256_bit_hex() {
        let (a, b) = (new_key().expect("key"), new_key().expect("key"));
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    const WORKED_EXAMPLE_SIG: &str =
        "a5e39c033dd196e7cc972e110a1f6a8bf0008398048dce8609794e4d5743c7b3";
}
