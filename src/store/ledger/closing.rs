//! Closing auctions exactly once, many per script call, each under its holder's lease or
//! under a lease taken and given back within the call.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Value};

use super::{CLOSE, LedgerError, Retention};
use crate::keyspace::{self, AuctionId};
use crate::link::script::Reply;
use crate::store::lock::Lease;
use crate::wire::Event;

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
