//! Auction state in Redis, changed only by fenced Lua scripts.
//!
//! One hash per auction holds its parameters, high bid, `seq` and last writer's fence; a
//! stream keeps accepted bids as history; a hash maps each `bid_id` to its first outcome so
//! retries are idempotent. Every write happens inside a script that first runs the fence
//! check from [`crate::store::lock`], and every outcome comes back as a ready [`Event`].
//!
//! Here: the parameters of an auction and opening it; `judge`: judging bids in batches
//! ([`place_bids`]); `closing`: closing exactly once ([`close_many`]); `retention`: how
//! long a closed auction is kept ([`Retention`]: the close sets every one of its keys to
//! expire then and records it in `auctions:closed`, from which [`forget_expired`] takes it
//! out of the indexes once that time has passed); `read`: reading auctions and their
//! history back for the admin API and tests.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Script, Value};

use crate::keyspace;
use crate::link::script::Reply;
use crate::store::lock::{FENCE_PRELUDE, Lease};
use crate::wire::{self, Event};

mod closing;
mod judge;
mod read;
mod retention;

pub use closing::{CloseAs, CloseMode, Closed, close, close_many};
pub use judge::{Judged, place_bids};
pub use read::{AuctionRecord, HistoryEntry, Listed, get, get_many, history, list_ids};
pub use retention::{InvalidRetention, RETENTION_RANGE, Retention, forget_expired};

/// A script writing one auction: the fence functions, the check under the single-auction
/// convention (see `lock/fence.lua`), then `body`.
fn fenced_script(body: &str) -> Script {
    Script::new(&[FENCE_PRELUDE, FENCE_CHECK, body].concat())
}

const FENCE_CHECK: &str =
    "if not fence_ok(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return {'fenced'} end\n";

static OPEN: LazyLock<Script> = LazyLock::new(|| fenced_script(include_str!("open.lua")));
pub(super) static PLACE_BIDS: LazyLock<Script> =
    LazyLock::new(|| fenced_script(include_str!("place_bids.lua")));
/// Closes many auctions, each fenced by its own lease (the script checks each one).
pub(super) static CLOSE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[FENCE_PRELUDE, include_str!("close.lua")].concat()));

/// Longest item description, in bytes.
pub const MAX_ITEM_LEN: usize = 200;
/// Shortest and longest auction duration.
pub const DURATION_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600));

/// Longest soft-close window: past this an auction could be held open by one bid an hour.
pub const MAX_SOFT_CLOSE: Duration = Duration::from_secs(3600);

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
    /// Soft close: a bid accepted less than this before the deadline moves the deadline to
    /// its time plus this (zero: off).
    pub soft_close: Duration,
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
        if self.soft_close > MAX_SOFT_CLOSE {
            return bad(
                "soft_close",
                format!("must be at most {MAX_SOFT_CLOSE:?} (0 = off)"),
            );
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
        .arg(spec.soft_close.as_millis() as u64)
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
            soft_close_ms: spec.soft_close.as_millis() as u64,
        })),
        "exists" => Ok(None),
        "fenced" => Err(LedgerError::Fenced),
        other => Err(reply.unexpected(other).into()),
    }
}
