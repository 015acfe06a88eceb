//! Reading auctions and their accepted-bid history back, for the admin API and tests.

use std::collections::HashMap;

use redis::RedisError;
use redis::aio::ConnectionLike;

use crate::keyspace::{self, AuctionId};

/// A stored auction, read back (for admin reads and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuctionRecord {
    /// The id.
    pub auction_id: AuctionId,
    /// What is sold.
    pub item: String,
    /// True while open.
    pub open: bool,
    /// Parameters, minor units.
    pub starting_price: u64,
    /// Minimum raise.
    pub min_increment: u64,
    /// Reserve price.
    pub reserve_price: u64,
    /// Redis ms.
    pub opened_ms: u64,
    /// Redis ms (moved by late bids under soft close).
    pub deadline_ms: u64,
    /// Soft-close window, ms (0 = off).
    pub soft_close_ms: u64,
    /// Current high bid: (amount, bidder, bid_id).
    pub high: Option<(u64, String, String)>,
    /// Accepted bids.
    pub bid_count: u64,
    /// Last event's seq.
    pub seq: u64,
    /// Last writer's fencing token.
    pub fence: u64,
    /// Redis ms, once closed.
    pub closed_ms: Option<u64>,
    /// Winner (amount, bidder, bid_id), once closed with one.
    pub winner: Option<(u64, String, String)>,
}

/// Reads an auction; `None` if it does not exist.
pub async fn get<C: ConnectionLike + Send>(
    conn: &mut C,
    id: &AuctionId,
) -> Result<Option<AuctionRecord>, RedisError> {
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(id.state_key())
        .query_async(conn)
        .await?;
    Ok(record(id.clone(), &h))
}

fn record(id: AuctionId, h: &HashMap<String, String>) -> Option<AuctionRecord> {
    if h.is_empty() {
        return None;
    }
    let s = |k: &str| h.get(k).cloned().unwrap_or_default();
    let n = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
    let triple = |a: &str, b: &str, c: &str| {
        n(a).filter(|_| !s(b).is_empty())
            .map(|amount| (amount, s(b), s(c)))
    };
    Some(AuctionRecord {
        auction_id: id,
        item: s("item"),
        open: s("state") == "open",
        starting_price: n("starting_price").unwrap_or(0),
        min_increment: n("min_increment").unwrap_or(0),
        reserve_price: n("reserve_price").unwrap_or(0),
        opened_ms: n("opened_ms").unwrap_or(0),
        deadline_ms: n("deadline_ms").unwrap_or(0),
        soft_close_ms: n("soft_close_ms").unwrap_or(0),
        high: triple("high_amount", "high_bidder", "high_bid_id"),
        bid_count: n("bid_count").unwrap_or(0),
        seq: n("seq").unwrap_or(0),
        fence: n("fence").unwrap_or(0),
        closed_ms: n("closed_ms"),
        winner: triple("winning_amount", "winner", "winning_bid_id"),
    })
}

/// A place in `auctions:all`, which Redis orders by opening time, then by id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    /// Opening time (Redis ms), the entry's score.
    pub opened_ms: u64,
    /// The auction.
    pub id: AuctionId,
}

/// Up to `count` auctions in opening order, from just after `after` (from the first when
/// `None`). Paging by value rather than by position keeps pages right while the retention
/// sweeper takes entries out of the index: a removal never shifts the next page.
pub async fn list_ids<C: ConnectionLike + Send>(
    conn: &mut C,
    after: Option<&Listed>,
    count: usize,
) -> Result<Vec<Listed>, RedisError> {
    let count = count.max(1);
    let min = after.map_or_else(|| "-inf".to_owned(), |a| a.opened_ms.to_string());
    // Auctions opened in the same millisecond as `after` come first; those up to `after`
    // are skipped, a page at a time if there are that many.
    let mut skip = 0usize;
    let mut listed = Vec::with_capacity(count);
    loop {
        let page: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(keyspace::ALL_AUCTIONS)
            .arg(&min)
            .arg("+inf")
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(skip)
            .arg(count)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        let n = page.len();
        listed.extend(page.into_iter().filter_map(|(member, score)| {
            let id = AuctionId::parse(&member).ok()?;
            // Opening times are whole ms well inside f64's exact range.
            let entry = Listed {
                opened_ms: score as u64,
                id,
            };
            after.is_none_or(|a| entry > *a).then_some(entry)
        }));
        if listed.len() >= count || n < count {
            listed.truncate(count);
            return Ok(listed);
        }
        skip += n;
    }
}

/// Reads several auctions in one round trip; one answer per id, in order, `None` for an
/// auction that is gone (its retention ran out).
pub async fn get_many<C: ConnectionLike + Send>(
    conn: &mut C,
    ids: &[AuctionId],
) -> Result<Vec<Option<AuctionRecord>>, RedisError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HGETALL").arg(id.state_key());
    }
    let hashes: Vec<HashMap<String, String>> = pipe.query_async(conn).await?;
    Ok(ids
        .iter()
        .zip(hashes)
        .map(|(id, h)| record(id.clone(), &h))
        .collect())
}

/// One accepted bid from the history stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Client-made id.
    pub bid_id: String,
    /// Who.
    pub bidder: String,
    /// Amount, minor units.
    pub amount: u64,
    /// The event seq it was announced with.
    pub seq: u64,
    /// The fencing token of the writer that accepted it.
    pub fence: u64,
    /// Redis ms when accepted.
    pub at_ms: u64,
}

/// Reads up to `count` accepted bids after stream id `after` (`"-"` from the start).
/// Returns the entries with their stream ids, for paging.
pub async fn history<C: ConnectionLike + Send>(
    conn: &mut C,
    id: &AuctionId,
    after: &str,
    count: usize,
) -> Result<Vec<(String, HistoryEntry)>, RedisError> {
    let start = if after == "-" {
        "-".to_owned()
    } else {
        format!("({after}")
    };
    let raw: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(id.bids_key())
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(raw
        .into_iter()
        .map(|(sid, f)| {
            let n = |k: &str| f.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
            let entry = HistoryEntry {
                bid_id: f.get("bid_id").cloned().unwrap_or_default(),
                bidder: f.get("bidder").cloned().unwrap_or_default(),
                amount: n("amount"),
                seq: n("seq"),
                fence: n("fence"),
                at_ms: n("at_ms"),
            };
            (sid, entry)
        })
        .collect())
}
