//! The router: hands each auction's work to that auction's single worker.
//!
//! Every server replica receives every bid (Pub/Sub fans out). The router keeps one slot
//! per auction: a live worker (this server holds the lease), or a note that another server
//! holds it until about when (its bids are left alone: that server judges them). The first
//! piece of work for an auction with no slot starts a worker, which tries to take the
//! lease. The slot map is owned by one task, so there is no lock to hold across `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::keyspace::AuctionId;
use crate::ledger::{AuctionSpec, CloseMode, Closed};
use crate::metrics::{add, inc};
use crate::task::TaskGuard;
use crate::wire::{Bid, Event};
use crate::worker::{self, Exit, OpError, Work, WorkerContext};

/// Longest a note "another server owns this auction" is trusted before asking Redis again.
const MAX_BUSY_NOTE: Duration = Duration::from_secs(2);

/// Bids kept per auction while another server holds it, and for how long: if the lease
/// comes to us (the holder died or let go), these are judged first, so a handover loses
/// nothing that arrived within this window. Duplicates of bids the old holder judged just
/// get their first outcome again.
const SHADOW_BIDS: usize = 1024;
const SHADOW_AGE: Duration = Duration::from_secs(30);

enum Slot {
    Worker {
        generation: u64,
        tx: mpsc::Sender<Work>,
    },
    Busy {
        until: Instant,
        shadow: VecDeque<(Instant, Bid)>,
    },
}

/// Appends `bid` to a shadow, dropping (and counting) what is too old or too many.
fn shadow_push(shadow: &mut VecDeque<(Instant, Bid)>, bid: Bid, ctx: &WorkerContext) {
    let now = Instant::now();
    shadow.push_back((now, bid));
    while shadow.len() > SHADOW_BIDS
        || shadow
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > SHADOW_AGE)
    {
        shadow.pop_front();
        inc(&ctx.metrics.bids_left_to_owner);
    }
}

struct Command {
    auction: AuctionId,
    work: Work,
}

/// Handle to the router task; clone freely. When every handle is dropped the router
/// stops: workers finish their queues and release their leases.
#[derive(Clone)]
pub struct Router {
    tx: mpsc::Sender<Command>,
}

impl Router {
    /// Starts the router. `drain` bounds how long workers may take to finish at shutdown.
    /// The returned task ends after every handle is dropped and the workers drained; its
    /// owner awaits it at shutdown (and aborts it, stopping all workers, by dropping it).
    pub fn start(ctx: Arc<WorkerContext>, drain: Duration) -> (Router, TaskGuard) {
        let (tx, rx) = mpsc::channel(4096);
        let task = tokio::spawn(run(ctx, rx, drain));
        (Router { tx }, TaskGuard::new("router", task))
    }

    /// Queues a bid for its auction's worker (waits while the router's queue is full).
    pub async fn bid(&self, bid: Bid) {
        let auction = bid.auction_id.clone();
        let _ = self
            .tx
            .send(Command {
                auction,
                work: Work::Bid(bid),
            })
            .await;
    }

    /// Opens `auction` and returns its `auction_opened` event.
    pub async fn open(&self, auction: AuctionId, spec: AuctionSpec) -> Result<Event, OpError> {
        let (reply, rx) = oneshot::channel();
        self.send(auction, Work::Open { spec, reply }).await?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Closes `auction` and waits for the outcome.
    pub async fn close(&self, auction: AuctionId, mode: CloseMode) -> Result<Closed, OpError> {
        let (reply, rx) = oneshot::channel();
        self.send(
            auction,
            Work::Close {
                mode,
                reply: Some(reply),
            },
        )
        .await?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Asks for a deadline close without waiting for it.
    pub async fn close_due(&self, auction: AuctionId) {
        let _ = self
            .send(
                auction,
                Work::Close {
                    mode: CloseMode::Due,
                    reply: None,
                },
            )
            .await;
    }

    /// Asks for an immediate close without waiting (a forwarded admin close).
    pub async fn close_now_detached(&self, auction: AuctionId) {
        let _ = self
            .send(
                auction,
                Work::Close {
                    mode: CloseMode::Now,
                    reply: None,
                },
            )
            .await;
    }

    async fn send(&self, auction: AuctionId, work: Work) -> Result<(), OpError> {
        self.tx
            .send(Command { auction, work })
            .await
            .map_err(|_| stopped())
    }
}

fn stopped() -> OpError {
    OpError::Unavailable("server is shutting down".into())
}

async fn run(ctx: Arc<WorkerContext>, mut rx: mpsc::Receiver<Command>, drain: Duration) {
    let (exits_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    let mut slots: HashMap<AuctionId, Slot> = HashMap::new();
    let mut workers = JoinSet::new();
    let mut next_generation = 0u64;
    loop {
        tokio::select! {
            biased;
            Some(exit) = exits.recv() => {
                let current = matches!(slots.get(&exit.auction), Some(Slot::Worker { generation, .. }) if *generation == exit.generation);
                if current {
                    match exit.busy_for {
                        Some(d) => {
                            let mut shadow = VecDeque::new();
                            for bid in exit.leftover {
                                shadow_push(&mut shadow, bid, &ctx);
                            }
                            let until = Instant::now() + d.min(MAX_BUSY_NOTE);
                            slots.insert(exit.auction, Slot::Busy { until, shadow });
                        }
                        None => {
                            slots.remove(&exit.auction);
                        }
                    }
                } else {
                    add(&ctx.metrics.bids_left_to_owner, exit.leftover.len() as u64);
                }
            }
            Some(_) = workers.join_next(), if !workers.is_empty() => {}
            cmd = rx.recv() => {
                let Some(Command { auction, mut work }) = cmd else { break };
                // Loop: a worker may have just exited (its queue closed); then start anew.
                loop {
                    let now = Instant::now();
                    match slots.get(&auction) {
                        Some(Slot::Worker { tx, .. }) => {
                            let tx = tx.clone();
                            match tx.send(work).await {
                                Ok(()) => break,
                                Err(mpsc::error::SendError(back)) => {
                                    work = back;
                                    slots.remove(&auction);
                                }
                            }
                        }
                        Some(Slot::Busy { until, .. }) if now < *until && !matches!(work, Work::Open { .. }) => {
                            let Some(Slot::Busy { shadow, .. }) = slots.get_mut(&auction) else { break };
                            match work {
                                Work::Bid(bid) => shadow_push(shadow, bid, &ctx),
                                Work::Close { reply, .. } => {
                                    if let Some(r) = reply {
                                        let _ = r.send(Err(OpError::Busy));
                                    }
                                }
                                Work::Open { .. } => {}
                            }
                            break;
                        }
                        _ => {
                            next_generation += 1;
                            let must_exist = !matches!(work, Work::Open { .. });
                            let (tx, wrx) = mpsc::channel(ctx.settings.queue);
                            debug!(%auction, generation = next_generation, "starting worker");
                            workers.spawn(worker::run(
                                ctx.clone(),
                                auction.clone(),
                                next_generation,
                                wrx,
                                must_exist,
                                exits_tx.clone(),
                            ));
                            let previous = slots.insert(auction.clone(), Slot::Worker { generation: next_generation, tx: tx.clone() });
                            // Bids kept while someone else held the lease go first, in order.
                            if let Some(Slot::Busy { shadow, .. }) = previous {
                                for (_, bid) in shadow {
                                    if tx.send(Work::Bid(bid)).await.is_err() {
                                        inc(&ctx.metrics.bids_left_to_owner);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Forget expired notes so the map does not grow with every auction ever seen.
        if slots.len() > 1024 {
            let now = Instant::now();
            slots.retain(|_, s| match s {
                Slot::Busy { shadow, .. } => shadow
                    .back()
                    .is_some_and(|(at, _)| now.duration_since(*at) < SHADOW_AGE),
                Slot::Worker { .. } => true,
            });
        }
    }
    // Shutdown: dropping the senders lets each worker finish its queue and release its lease.
    slots.clear();
    let finished = tokio::time::timeout(drain, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            remaining = workers.len(),
            "workers did not finish within the drain period; their leases will expire"
        );
    }
}
