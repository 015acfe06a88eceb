//! Auction state in Redis, changed only by fenced Lua scripts.
//!
//! One hash per auction holds its parameters, high bid, `seq` and last writer's fence; a
//! stream keeps accepted bids as history; a hash maps each `bid_id` to its first outcome so
//! retries are idempotent. Every write happens inside a script that first runs the fence
//! check from [`crate::store::lock`], and every outcome comes back as a ready [`Event`].
//!
//! A closed auction is kept for its [`Retention`]: the close sets every one of its keys to
//! expire then and records it in `auctions:closed`, from which [`forget_expired`] takes it
//! out of the indexes once that time has passed.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Script, Value};

use crate::keyspace::{self, AuctionId};
use crate::link::script::Reply;
use crate::store::lock::{FENCE_PRELUDE, Lease};
use crate::wire::{self, Bid, Event, RejectReason};

/// A script writing one auction: the fence functions, the check under the single-auction
/// convention (see `lock/fence.lua`), then `body`.
fn fenced_script(body: &str) -> Script {
    Script::new(&[FENCE_PRELUDE, FENCE_CHECK, body].concat())
}

const FENCE_CHECK: &str =
    "if not fence_ok(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return {'fenced'} end\n";

static OPEN: LazyLock<Script> = LazyLock::new(|| fenced_script(include_str!("ledger/open.lua")));
static PLACE_BIDS: LazyLock<Script> =
    LazyLock::new(|| fenced_script(include_str!("ledger/place_bids.lua")));
/// Closes many auctions, each fenced by its own lease (the script checks each one).
static CLOSE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[FENCE_PRELUDE, include_str!("ledger/close.lua")].concat()));
/// Takes closed auctions whose retention ran out out of the indexes (writes no auction).
static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("ledger/forget.lua")));

/// Longest item description, in bytes.
pub const MAX_ITEM_LEN: usize = 200;
/// Shortest and longest auction duration.
pub const DURATION_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600));

/// Shortest and longest time a closed auction is kept (`RETENTION`).
pub const RETENTION_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(365 * 24 * 3600));

/// How long a closed auction is kept after its close: a whole number of milliseconds within
/// [`RETENTION_RANGE`], checked when built (the close script checks it again, since an
/// expiry of zero would delete the auction on the spot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention(Duration);

/// A retention outside [`RETENTION_RANGE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "retention must be between {min} and {max}, got {got}",
    min = short(RETENTION_RANGE.0),
    max = short(RETENTION_RANGE.1),
    got = short(*got)
)]
pub struct InvalidRetention {
    /// The rejected value.
    pub got: Duration,
}

/// `d` the way operators write it: `7d`, `90s`, `1500ms`.
fn short(d: Duration) -> String {
    const DAY: u64 = 24 * 3600;
    match (d.as_secs(), d.subsec_nanos()) {
        (s, 0) if s > 0 && s % DAY == 0 => format!("{}d", s / DAY),
        (s, 0) => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}

impl Retention {
    /// `d`, if it lies within [`RETENTION_RANGE`] (sub-millisecond parts are dropped).
    pub fn new(d: Duration) -> Result<Self, InvalidRetention> {
        let (lo, hi) = RETENTION_RANGE;
        if d < lo || d > hi {
            return Err(InvalidRetention { got: d });
        }
        Ok(Self(Duration::from_millis(d.as_millis() as u64)))
    }

    /// The retention as a duration.
    pub fn duration(self) -> Duration {
        self.0
    }

    fn millis(self) -> u64 {
        self.0.as_millis() as u64
    }
}

/// Failure of a ledger operation.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The caller's lease is gone or superseded; Redis refused the write.
    #[error("write refused by the fence: the lease on this auction was lost")]
    Fenced,
    /// Redis failed or answered something unexpected.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

/// Parameters of a new auction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuctionSpec {
    /// What is sold.
    pub item: String,
    /// From opening to deadline.
    pub duration: Duration,
    /// Lowest acceptable first bid, minor units.
    pub starting_price: u64,
    /// Minimum raise over the high bid, minor units (≥ 1).
    pub min_increment: u64,
    /// Below this the auction has no winner (0 = no reserve).
    pub reserve_price: u64,
}

/// An invalid auction parameter: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidSpec {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl AuctionSpec {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let bad = |field, problem: String| Err(InvalidSpec { field, problem });
        let item = self.item.trim();
        if item.is_empty() || self.item.len() > MAX_ITEM_LEN {
            return bad("item", format!("must be 1-{MAX_ITEM_LEN} bytes"));
        }
        if self.item.chars().any(char::is_control) {
            return bad("item", "must not contain control characters".into());
        }
        let (lo, hi) = DURATION_RANGE;
        if self.duration < lo || self.duration > hi {
            return bad("duration", format!("must be between {lo:?} and {hi:?}"));
        }
        for (field, v) in [
            ("starting_price", self.starting_price),
            ("min_increment", self.min_increment),
            ("reserve_price", self.reserve_price),
        ] {
            if v > wire::MAX_AMOUNT {
                return bad(field, format!("must be at most {}", wire::MAX_AMOUNT));
            }
        }
        if self.starting_price == 0 {
            return bad("starting_price", "must be at least 1 (minor units)".into());
        }
        if self.min_increment == 0 {
            return bad("min_increment", "must be at least 1 (minor units)".into());
        }
        Ok(())
    }
}

/// Opens `id` with `spec`. `Ok(None)` when an auction with that id already exists.
pub async fn open<C: ConnectionLike + Send>(
    conn: &mut C,
    lease: &Lease,
    spec: &AuctionSpec,
) -> Result<Option<Event>, LedgerError> {
    let id = lease.auction();
    let reply: Vec<Value> = OPEN
        .key(id.state_key())
        .key(id.lock_key())
        .key(keyspace::OPEN_AUCTIONS)
        .key(keyspace::ALL_AUCTIONS)
        .key(keyspace::CLOSED_AUCTIONS)
        .arg(lease.value())
        .arg(lease.token())
        .arg(id.as_str())
        .arg(&spec.item)
        .arg(spec.duration.as_millis() as u64)
        .arg(spec.starting_price)
        .arg(spec.min_increment)
        .arg(spec.reserve_price)
        .invoke_async(conn)
        .await?;
    let reply = Reply::new("open", reply);
    match reply.tag()? {
        "opened" => Ok(Some(Event::AuctionOpened {
            auction_id: id.to_string(),
            seq: 1,
            item: spec.item.clone(),
            starting_price: spec.starting_price,
            min_increment: spec.min_increment,
            reserve_price: spec.reserve_price,
            opened_at_ms: reply.int(1)?,
            deadline_ms: reply.int(2)?,
        })),
        "exists" => Ok(None),
        "fenced" => Err(LedgerError::Fenced),
        other => Err(reply.unexpected(other).into()),
    }
}

/// One bid's outcome from [`place_bids`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    /// The event announcing it.
    pub event: Event,
    /// False when this `bid_id` had been judged before and `event` repeats the first outcome.
    pub fresh: bool,
}

/// Judges `bids` (all on the lease's auction) in order, in one script call.
pub async fn place_bids<C: ConnectionLike + Send>(
    conn: &mut C,
    lease: &Lease,
    bids: &[Bid],
) -> Result<Vec<Judged>, LedgerError> {
    let id = lease.auction();
    let mut call = PLACE_BIDS.prepare_invoke();
    call.key(id.state_key())
        .key(id.lock_key())
        .key(id.bids_key())
        .key(id.outcomes_key())
        .arg(lease.value())
        .arg(lease.token());
    for bid in bids {
        debug_assert_eq!(&bid.auction_id, id);
        call.arg(&bid.bid_id).arg(&bid.bidder).arg(bid.amount);
    }
    let reply: Vec<Value> = call.invoke_async(conn).await?;
    let reply = Reply::new("place_bids", reply);
    if reply.tag().ok() == Some("fenced") {
        return Err(LedgerError::Fenced);
    }
    if reply.len() != bids.len() {
        return Err(reply
            .unexpected(&format!("{} outcomes for {} bids", reply.len(), bids.len()))
            .into());
    }
    bids.iter()
        .enumerate()
        .map(|(i, bid)| {
            let line = reply.str(i)?;
            decode_outcome(id, bid, line).ok_or_else(|| reply.unexpected(line).into())
        })
        .collect()
}

fn decode_outcome(id: &AuctionId, bid: &Bid, line: &str) -> Option<Judged> {
    let (kind, rest) = line.split_once('|')?;
    if kind == "x" {
        let reason = RejectReason::from_name(rest)?;
        return Some(Judged {
            event: Event::refusal(bid.clone(), reason, None),
            fresh: true,
        });
    }
    let mut f = rest.splitn(6, '|');
    let (status, seq, reason, next_min, amount, bidder) = (
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
    );
    let seq: u64 = seq.parse().ok()?;
    let next_min: u64 = next_min.parse().ok()?;
    let amount: u64 = amount.parse().ok()?;
    let event = match status {
        "accepted" => Event::BidAccepted {
            auction_id: id.to_string(),
            seq,
            bid_id: bid.bid_id.clone(),
            bidder: bidder.to_owned(),
            amount,
            next_min,
            traceparent: None,
        },
        "rejected" => Event::BidRejected {
            auction_id: Some(id.to_string()),
            seq: Some(seq),
            bid_id: bid.bid_id.clone(),
            bidder: Some(bidder.to_owned()),
            amount: Some(amount),
            reason: RejectReason::from_name(reason)?,
            detail: None,
            next_min: Some(next_min),
            traceparent: None,
        },
        _ => return None,
    };
    Some(Judged {
        event,
        fresh: kind == "new",
    })
}

/// How a close request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Closed by this call.
    ByUs(Event),
    /// It had closed before; the event repeats that close.
    Already(Event),
    /// Only for [`CloseMode::Due`]: the deadline (Redis ms) has not passed.
    NotDue(u64),
    /// No such auction.
    Unknown,
    /// Only for [`CloseAs::Free`]: someone holds the lease, for about this long.
    HeldElsewhere(Duration),
}

/// When a close may happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseMode {
    /// Only if Redis time has reached the deadline.
    Due,
    /// Whatever the deadline (an admin's early close).
    Forced,
}

/// Under which lease a close is made.
#[derive(Clone, Debug)]
pub enum CloseAs {
    /// The caller's own lease (fenced).
    Holder(Lease),
    /// Nobody's: the lease must be free, and is taken and given back within the call.
    Free(AuctionId),
}

impl CloseAs {
    /// The auction.
    pub fn auction(&self) -> &AuctionId {
        match self {
            CloseAs::Holder(lease) => lease.auction(),
            CloseAs::Free(id) => id,
        }
    }
}

/// Closes the lease's auction (exactly once across all callers); a close made by this call
/// starts the auction's `retention`.
pub async fn close<C: ConnectionLike + Send>(
    conn: &mut C,
    lease: &Lease,
    mode: CloseMode,
    retention: Retention,
) -> Result<Closed, LedgerError> {
    let mut results =
        close_many(conn, &[(CloseAs::Holder(lease.clone()), mode)], retention).await?;
    results.pop().unwrap_or_else(|| {
        Err(LedgerError::Redis(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "close answered nothing",
        ))))
    })
}

/// Closes several auctions in one script call; one result per entry, in order. Each close
/// made by this call starts that auction's `retention` (every key of it expires then, and
/// it is recorded in `auctions:closed` for [`forget_expired`]). The auctions need not share
/// a hash slot (this is one Redis, not a cluster; a cluster would group calls per slot).
pub async fn close_many<C: ConnectionLike + Send>(
    conn: &mut C,
    closes: &[(CloseAs, CloseMode)],
    retention: Retention,
) -> Result<Vec<Result<Closed, LedgerError>>, LedgerError> {
    let mut call = CLOSE.prepare_invoke();
    call.key(keyspace::OPEN_AUCTIONS)
        .key(keyspace::CLOSED_AUCTIONS)
        .arg(retention.millis());
    for (who, mode) in closes {
        let id = who.auction();
        call.key(id.state_key())
            .key(id.lock_key())
            .key(id.fence_key())
            .key(id.bids_key())
            .key(id.outcomes_key());
        match who {
            CloseAs::Holder(lease) => call.arg(lease.value()).arg(lease.token()),
            CloseAs::Free(_) => call.arg("").arg(""),
        };
        call.arg(id.as_str()).arg(match mode {
            CloseMode::Due => "due",
            CloseMode::Forced => "now",
        });
    }
    let replies: Vec<Vec<Value>> = call.invoke_async(conn).await?;
    if replies.len() != closes.len() {
        return Err(LedgerError::Redis(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "close answered the wrong number of results",
            format!("{} for {} auctions", replies.len(), closes.len()),
        ))));
    }
    Ok(replies
        .into_iter()
        .zip(closes)
        .map(|(reply, (who, _))| closed(who.auction(), Reply::new("close", reply)))
        .collect())
}

fn closed(id: &AuctionId, reply: Reply) -> Result<Closed, LedgerError> {
    let tag = reply.tag()?;
    match tag {
        "closed" | "already" => {
            let event = Event::AuctionClosed {
                auction_id: id.to_string(),
                seq: reply.int(1)?,
                winner: reply.opt_str(2)?,
                amount: reply.opt_int(3)?,
                bid_id: reply.opt_str(4)?,
                bid_count: reply.int(5)?,
                closed_at_ms: reply.int(6)?,
            };
            Ok(if tag == "closed" {
                Closed::ByUs(event)
            } else {
                Closed::Already(event)
            })
        }
        "not_due" => Ok(Closed::NotDue(reply.int(1)?)),
        "unknown" => Ok(Closed::Unknown),
        "held" => Ok(Closed::HeldElsewhere(Duration::from_millis(
            reply.int(1).unwrap_or(0),
        ))),
        "fenced" => Err(LedgerError::Fenced),
        other => Err(reply.unexpected(other).into()),
    }
}

/// Takes up to `limit` closed auctions whose retention has run out (by Redis time) out of
/// `auctions:all` and `auctions:closed`; their keys have expired by themselves. Returns how
/// many; fewer than `limit` means none is left due. Idempotent: any server may call it.
pub async fn forget_expired<C: ConnectionLike + Send>(
    conn: &mut C,
    limit: usize,
) -> Result<usize, RedisError> {
    FORGET
        .key(keyspace::CLOSED_AUCTIONS)
        .key(keyspace::ALL_AUCTIONS)
        .arg(limit.max(1))
        .invoke_async(conn)
        .await
}

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
    /// Redis ms.
    pub deadline_ms: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_whole_ms_within_its_range_and_says_so_otherwise() {
        let ms = |r: Result<Retention, InvalidRetention>| r.map(|r| r.millis());
        assert_eq!(ms(Retention::new(Duration::from_secs(1))), Ok(1000));
        assert_eq!(
            ms(Retention::new(Duration::from_micros(1_500_999))),
            Ok(1500)
        );
        assert_eq!(
            ms(Retention::new(Duration::from_secs(365 * 24 * 3600))),
            Ok(365 * 24 * 3600 * 1000)
        );
        let err = Retention::new(Duration::from_millis(999)).expect_err("too short");
        assert_eq!(
            err.to_string(),
            "retention must be between 1s and 365d, got 999ms"
        );
        let err = Retention::new(Duration::from_secs(400 * 24 * 3600)).expect_err("too long");
        assert!(err.to_string().ends_with("got 400d"), "{err}");
    }
}
