//! [`Context`]: what every part of one server's data plane shares (the master handle, the
//! announcer, the close batcher, the lease keeper, this process's lock owner id, tunables,
//! metrics), built once by the wiring in [`crate::server`] and handed to the router and
//! its workers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{Span, debug};

use crate::link::sentinel::Master;
use crate::runtime::metrics::{Metrics, inc};
use crate::server::announcer::{Announcement, Announcer, NotAnnounced};
use crate::server::bidder_keys::BidderKeys;
use crate::server::close_batch::CloseBatcher;
use crate::server::lease_keeper::LeaseKeeper;
use crate::server::work::OpError;
use crate::store::ledger::Closed;
use crate::wire::Event;

/// Tunables shared by every worker of a server.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Lease duration; renewed every third of it.
    pub lease: Duration,
    /// Release the lease after this long without work.
    pub idle_release: Duration,
    /// Most bids judged in one script call.
    pub max_batch: usize,
    /// Per-auction queue capacity.
    pub queue: usize,
    /// Bids one bidder may have waiting in one auction's queue (its fair share).
    pub share: u32,
}

impl WorkerSettings {
    /// The settings for leases of `lease` (`LOCK_LEASE`).
    pub fn with_lease(lease: Duration) -> Self {
        Self {
            lease,
            // Long enough that a steady bidder never makes the lease move around.
            idle_release: lease * 2,
            max_batch: 256,
            queue: 4096,
            share: 32,
        }
    }
}

/// Everything a worker needs, shared by all workers of one server.
pub struct Context {
    /// The master handle.
    pub master: Master,
    /// Group commit and in-order publishing of outcomes.
    pub announcer: Announcer,
    /// Closes, batched across auctions.
    pub closes: CloseBatcher,
    /// Renews and releases leases, batched across auctions.
    pub keeper: LeaseKeeper,
    /// State-independent refusals to announce (best effort, batched).
    pub refusals: mpsc::Sender<Event>,
    /// This process's lock owner id.
    pub owner: String,
    /// Channel events are published on.
    pub event_channel: String,
    /// Tunables.
    pub settings: WorkerSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// With `BID_AUTH=required`: the registered keys every bid must be signed with. The
    /// worker checks them, so exactly one server (the lease holder) answers each bid.
    pub auth: Option<BidderKeys>,
}

impl Context {
    /// Counts, logs and announces the result of a close; returns what the caller is told.
    pub async fn announce_close(
        &self,
        generation: u64,
        closed: Closed,
        wait: bool,
    ) -> Result<Closed, OpError> {
        match &closed {
            Closed::ByUs(event) | Closed::Already(event) => {
                if matches!(closed, Closed::ByUs(_)) {
                    inc(&self.metrics.auctions_closed);
                    debug!(auction = ?event.auction_id(), ?event, "auction closed");
                }
                // An earlier close may have been stored but never announced (its server died):
                // announcing again is harmless, subscribers dedupe by seq.
                self.announce_event(generation, event.clone(), wait).await?;
                Ok(closed)
            }
            Closed::NotDue(_) => Ok(closed),
            Closed::Unknown => Err(OpError::NotFound),
            Closed::HeldElsewhere(_) => Err(OpError::HeldElsewhere),
        }
    }

    /// Announces `event` (after replicas acknowledged it) and, when `wait`, waits for that.
    pub async fn announce_event(
        &self,
        generation: u64,
        event: Event,
        wait: bool,
    ) -> Result<(), OpError> {
        if !wait {
            self.announcer
                .announce(Announcement {
                    generation,
                    events: vec![event],
                    outcomes: 0,
                    started: None,
                    span: Span::none(),
                    done: None,
                })
                .await;
            return Ok(());
        }
        self.announcer
            .announce_and_wait(generation, vec![event])
            .await
            .map_err(|e| match e {
                NotAnnounced::Failed(e) => OpError::Unavailable(e),
                e => OpError::NotDurable(e.to_string()),
            })
    }
}
