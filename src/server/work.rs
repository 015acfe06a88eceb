//! The vocabulary the server's parts speak to each other: a unit of [`Work`] for an
//! auction, why an admin operation did not happen ([`OpError`]), how a worker ended
//! ([`Exit`]) and why a fenced call failed ([`Failure`]).

use std::time::Duration;

use tokio::sync::oneshot;

use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::store::ledger::{AuctionSpec, CloseMode, Closed, LedgerError};
use crate::wire::{Bid, Event};

/// Why an admin operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Another server holds this auction's lease right now; retry shortly.
    #[error("another server holds this auction's lease; retry shortly")]
    HeldElsewhere,
    /// Redis is unreachable or refused; retry.
    #[error("Redis unavailable: {0}")]
    Unavailable(String),
    /// Open: the id is taken.
    #[error("an auction with this id already exists")]
    AlreadyExists,
    /// The auction does not exist.
    #[error("no such auction")]
    NotFound,
    /// The outcome is stored but could not be confirmed durable (no replica acknowledged).
    #[error("stored but not yet confirmed on a replica: {0}")]
    NotDurable(String),
}

/// One unit of work for an auction.
#[derive(Debug)]
pub enum Work {
    /// Judge a bid.
    Bid(Bid),
    /// Open the auction.
    Open {
        /// Parameters.
        spec: AuctionSpec,
        /// Gets the `auction_opened` event.
        reply: oneshot::Sender<Result<Event, OpError>>,
    },
    /// Close the auction.
    Close {
        /// Deadline-driven or forced.
        mode: CloseMode,
        /// Gets the outcome, when someone waits for it.
        reply: Option<oneshot::Sender<Result<Closed, OpError>>>,
    },
}

impl Work {
    /// Answers an admin request that will not run with `err`; a bid needs no answer here
    /// (it is handed on, or the bidder retries).
    pub fn refuse(self, err: OpError) {
        match self {
            Work::Bid(_) => {}
            Work::Open { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Work::Close { reply, .. } => {
                if let Some(r) = reply {
                    let _ = r.send(Err(err));
                }
            }
        }
    }

    /// The bid, if this is one; admin work, which will not run, is answered with `err`.
    pub fn into_bid(self, err: OpError) -> Option<Bid> {
        match self {
            Work::Bid(bid) => Some(bid),
            admin => {
                admin.refuse(err);
                None
            }
        }
    }
}

/// Sent to the router when a worker ends.
#[derive(Debug)]
pub struct Exit {
    /// The auction.
    pub auction: AuctionId,
    /// The worker's generation, so the router ignores exits of replaced workers.
    pub generation: u64,
    /// Set when another server holds the lease (or Redis is down): start no worker for
    /// this auction for this long.
    pub hold_off: Option<Duration>,
    /// Bids this worker received but did not judge, in arrival order. The router keeps them
    /// so that whoever takes the lease next judges them (duplicates are harmless).
    pub leftover: Vec<Bid>,
}

/// Why a fenced call failed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The fence refused the write: the lease is lost.
    Fenced,
    /// No master link; stop and let the router retry later.
    Down(String),
    /// Redis failed (already reported to the master supervisor); worth a retry.
    Transient(String),
}

impl Failure {
    /// The failure a ledger error on the link of `generation` means; a Redis error is
    /// reported to the master supervisor (which re-resolves if the master is gone).
    pub fn of(e: LedgerError, master: &Master, generation: u64) -> Failure {
        match e {
            LedgerError::Fenced => Failure::Fenced,
            LedgerError::Redis(e) => {
                master.report(generation, &e);
                Failure::Transient(e.to_string())
            }
        }
    }
}
