//! The router: hands each auction's work to that auction's single worker.
//!
//! Every server replica receives every bid (Pub/Sub fans out). The router keeps one slot
//! per auction: a live worker (this server holds the lease), a note that another server
//! holds it until about when (its bids are left alone: that server judges them, and a
//! bounded shadow is kept for a handover), or a deadline close in flight for an auction
//! nobody held (work waits in the slot). The first piece of work for an auction with no
//! slot starts a worker, which tries to take the lease. A bid for a worker whose queue is
//! full is shed (`overloaded`) rather than waited for. Shadows and work waiting for a close
//! share one global cap ([`MAX_KEPT`], see [`crate::server::kept`]); a slot for an auction
//! that does not exist lives only while its worker finds that out. The slot map is owned
//! by one task, so there is no lock to hold across `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::keyspace::AuctionId;
use crate::runtime::metrics::{add, inc};
use crate::runtime::task::TaskGuard;
use crate::server::context::Context;
use crate::server::kept::{Budget, Kept};
use crate::server::queue::{QueueTx, Refused, queue};
use crate::server::work::{Exit, OpError, Work};
use crate::server::worker;
use crate::store::ledger::{AuctionSpec, CloseMode, Closed};
use crate::wire::{Bid, Event, RejectReason};

/// Longest a note "another server owns this auction" is trusted before asking Redis again.
const MAX_HOLD_OFF: Duration = Duration::from_secs(2);

/// What a bidder is told when its bid is shed or refused at the queue.
const OVERLOADED: &str = "the server is saturated; retry this bid later";
const TOO_MANY_PENDING: &str =
    "this bidder already has its share of bids waiting on this auction; wait for their outcomes";

/// How often notes about other servers' auctions are swept out of the slot map.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Bids kept per auction while another server holds it, and for how long: if the lease
/// comes to us (the holder died or let go), these are judged first, so a handover loses
/// nothing that arrived within this window. Duplicates of bids the old holder judged just
/// get their first outcome again.
const SHADOW_BIDS: usize = 1024;
const SHADOW_AGE: Duration = Duration::from_secs(30);

/// Most bids kept over all auctions in shadows and in work waiting for a close (a bid is
/// at most about 0.5 KB here, so about 32 MB at worst). Beyond it a shadow keeps its newest
/// bids only (the holder judges them anyway), and a bid waiting for a close is answered
/// `overloaded` (the bidder retries it).
pub const MAX_KEPT: usize = 65_536;

enum Slot {
    Worker {
        generation: u64,
        tx: QueueTx,
    },
    /// Another server holds the lease until about `until`; its bids are kept in
    /// `shadow` for whoever holds it next.
    HeldElsewhere {
        until: Instant,
        shadow: Kept<(Instant, Bid)>,
    },
    /// A deadline close of an auction nobody here held is in flight (see [`close_free`]);
    /// work arriving meanwhile waits here, in order, for whoever takes the lease next.
    Closing {
        queued: Kept<Work>,
    },
}

/// Appends `bid` to a shadow, dropping (and counting) what is too old or too many; when the
/// global cap is reached, this shadow's oldest bid makes room (or, if it has none, `bid`
/// is not kept).
fn shadow_push(shadow: &mut Kept<(Instant, Bid)>, bid: Bid, ctx: &Context) {
    let now = Instant::now();
    if !shadow.has_room() {
        let made_room = shadow.pop_front().is_some();
        inc(&ctx.metrics.bids_left_to_owner);
        if !made_room {
            return;
        }
    }
    shadow.push((now, bid));
    while shadow.len() > SHADOW_BIDS
        || shadow
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > SHADOW_AGE)
    {
        shadow.pop_front();
        inc(&ctx.metrics.bids_left_to_owner);
    }
}

enum Command {
    Work { auction: AuctionId, work: Work },
    CloseDue(Vec<AuctionId>),
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
    pub fn start(ctx: Arc<Context>, drain: Duration) -> (Router, TaskGuard) {
        let (tx, rx) = mpsc::channel(4096);
        let task = tokio::spawn(run(ctx, rx, drain));
        (Router { tx }, TaskGuard::new("router", task))
    }

    /// Queues a bid for its auction's worker (waits while the router's queue is full).
    pub async fn bid(&self, bid: Bid) {
        let auction = bid.auction_id.clone();
        let _ = self
            .tx
            .send(Command::Work {
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

    /// Asks for deadline closes without waiting for them. Auctions this server holds are
    /// closed by their workers; those nobody holds are closed in batches, each under a
    /// lease taken and given back within the script call; those another server holds are
    /// left to it.
    pub async fn close_due(&self, auctions: Vec<AuctionId>) {
        let _ = self.tx.send(Command::CloseDue(auctions)).await;
    }

    /// Asks for an immediate close without waiting (a forwarded admin close).
    pub async fn close_now_detached(&self, auction: AuctionId) {
        let _ = self
            .send(
                auction,
                Work::Close {
                    mode: CloseMode::Forced,
                    reply: None,
                },
            )
            .await;
    }

    async fn send(&self, auction: AuctionId, work: Work) -> Result<(), OpError> {
        self.tx
            .send(Command::Work { auction, work })
            .await
            .map_err(|_| stopped())
    }
}

fn stopped() -> OpError {
    OpError::Unavailable("server is shutting down".into())
}

/// The router task's state: the slot map and the workers it started.
struct State {
    ctx: Arc<Context>,
    slots: HashMap<AuctionId, Slot>,
    /// Shared by every shadow and close queue in `slots`.
    kept: Budget,
    workers: JoinSet<()>,
    next_generation: u64,
    exits: mpsc::UnboundedSender<Exit>,
    freed: mpsc::UnboundedSender<Freed>,
}

/// The end of a [`close_free`] for one auction.
struct Freed {
    auction: AuctionId,
    /// Set when another server held the lease after all.
    held: Option<Duration>,
}

async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<Command>, drain: Duration) {
    let (exits_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    let (freed_tx, mut freed) = mpsc::unbounded_channel::<Freed>();
    let kept = Budget::new(MAX_KEPT, ctx.metrics.router_kept_bids.clone());
    let mut st = State {
        ctx,
        slots: HashMap::new(),
        kept,
        workers: JoinSet::new(),
        next_generation: 0,
        exits: exits_tx,
        freed: freed_tx,
    };
    // Expired notes are swept on a timer, not per command: a sweep walks every slot, and
    // with thousands of open auctions doing it per bid made routing O(auctions).
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = sweep.tick() => st.sweep(),
            Some(exit) = exits.recv() => st.exited(exit),
            Some(f) = freed.recv() => st.freed(f).await,
            Some(_) = st.workers.join_next(), if !st.workers.is_empty() => {}
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Command::Work { auction, work }) => st.route(auction, work).await,
                Some(Command::CloseDue(auctions)) => st.close_due(auctions).await,
            },
        }
        st.ctx.metrics.router_slots.set(st.slots.len() as i64);
    }
    // Shutdown: dropping the senders lets each worker finish its queue and release its lease.
    st.slots.clear();
    let finished = tokio::time::timeout(drain, async {
        while st.workers.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            remaining = st.workers.len(),
            "workers did not finish within the drain period; their leases will expire"
        );
    }
}

impl State {
    /// Forgets expired notes so the map does not grow with every auction ever seen.
    fn sweep(&mut self) {
        let now = Instant::now();
        self.slots.retain(|_, s| match s {
            Slot::HeldElsewhere { until, shadow } => {
                *until > now
                    || shadow
                        .back()
                        .is_some_and(|(at, _)| now.duration_since(*at) < SHADOW_AGE)
            }
            Slot::Worker { .. } | Slot::Closing { .. } => true,
        });
    }

    fn exited(&mut self, exit: Exit) {
        let current = matches!(self.slots.get(&exit.auction), Some(Slot::Worker { generation, .. }) if *generation == exit.generation);
        if !current {
            add(
                &self.ctx.metrics.bids_left_to_owner,
                exit.leftover.len() as u64,
            );
            return;
        }
        match exit.hold_off {
            Some(d) => self.hold_off(exit.auction, d, exit.leftover),
            None => {
                self.slots.remove(&exit.auction);
            }
        }
    }

    /// Notes that another server holds `auction` for about `d`, keeping `bids` as the
    /// shadow for a handover.
    fn hold_off(&mut self, auction: AuctionId, d: Duration, bids: impl IntoIterator<Item = Bid>) {
        let mut shadow = Kept::new(&self.kept);
        for bid in bids {
            shadow_push(&mut shadow, bid, &self.ctx);
        }
        let until = Instant::now() + d.min(MAX_HOLD_OFF);
        self.slots
            .insert(auction, Slot::HeldElsewhere { until, shadow });
    }

    /// Hands `work` to its auction's worker, starting one when there is none.
    async fn route(&mut self, auction: AuctionId, work: Work) {
        let now = Instant::now();
        let work = match self.slots.get_mut(&auction) {
            Some(Slot::Worker { tx, .. }) => {
                let tx = tx.clone();
                // A full queue means this auction's worker is saturated: a bid is shed at
                // once (answered `overloaded`, the bidder retries it later) so that latency
                // and memory stay bounded; admin work waits for room. A bidder past its
                // share of the queue is refused without taking anyone else's place.
                match tx.try_send(work).map_err(|r| *r) {
                    Ok(()) => return,
                    Err(Refused::Full(Work::Bid(bid))) => {
                        self.refuse(bid, RejectReason::Overloaded, OVERLOADED);
                        return;
                    }
                    Err(Refused::TooManyPending(bid)) => {
                        self.refuse(bid, RejectReason::TooManyPending, TOO_MANY_PENDING);
                        return;
                    }
                    Err(Refused::Full(admin)) => match tx.send(admin).await {
                        Ok(()) => return,
                        Err(back) => back,
                    },
                    // The worker just exited (its queue closed): start anew below.
                    Err(Refused::Closed(back)) => back,
                }
            }
            Some(Slot::Closing { queued }) => {
                // Over the global cap a bid is shed like one for a full worker queue; admin
                // work (a caller waiting on a bounded call) always waits.
                if !matches!(work, Work::Bid(_)) {
                    queued.push(work);
                } else if let Err(Work::Bid(bid)) = queued.try_push(work) {
                    self.refuse(bid, RejectReason::Overloaded, OVERLOADED);
                }
                return;
            }
            Some(Slot::HeldElsewhere { until, shadow })
                if now < *until && !matches!(work, Work::Open { .. }) =>
            {
                if let Some(bid) = work.into_bid(OpError::HeldElsewhere) {
                    shadow_push(shadow, bid, &self.ctx);
                }
                return;
            }
            _ => work,
        };
        let must_exist = !matches!(work, Work::Open { .. });
        let tx = self.start_worker(&auction, must_exist).await;
        let _ = tx.send(work).await;
    }

    /// Answers `bid` with `reason` instead of queueing it; nothing is stored (best effort:
    /// if even the answers back up, the bidder's retry timer covers it).
    fn refuse(&self, bid: Bid, reason: RejectReason, detail: &str) {
        self.ctx.metrics.rejected(reason.as_str());
        let event = Event::refusal(bid, reason, Some(detail.into()));
        let _ = self.ctx.refusals.try_send(event);
    }

    /// Starts a worker for `auction`; bids kept while someone else held the lease go to it
    /// first, in order.
    async fn start_worker(&mut self, auction: &AuctionId, must_exist: bool) -> QueueTx {
        self.next_generation += 1;
        let generation = self.next_generation;
        let settings = &self.ctx.settings;
        let (tx, wrx) = queue(settings.queue, settings.share);
        debug!(%auction, generation, "starting worker");
        self.workers.spawn(worker::run(
            self.ctx.clone(),
            auction.clone(),
            generation,
            wrx,
            must_exist,
            self.exits.clone(),
        ));
        let previous = self.slots.insert(
            auction.clone(),
            Slot::Worker {
                generation,
                tx: tx.clone(),
            },
        );
        if let Some(Slot::HeldElsewhere { shadow, .. }) = previous {
            for (_, bid) in shadow.take_all() {
                if tx.send(Work::Bid(bid)).await.is_err() {
                    inc(&self.ctx.metrics.bids_left_to_owner);
                }
            }
        }
        tx
    }

    async fn close_due(&mut self, auctions: Vec<AuctionId>) {
        let now = Instant::now();
        let mut free = Vec::new();
        for auction in auctions {
            match self.slots.get(&auction) {
                Some(Slot::Worker { tx, .. }) => {
                    let close = Work::Close {
                        mode: CloseMode::Due,
                        reply: None,
                    };
                    // A worker that is just exiting refuses it; the closer asks again.
                    let _ = tx.send(close).await;
                }
                // Its holder closes it; a close of ours is already in flight.
                Some(Slot::HeldElsewhere { until, .. }) if now < *until => {}
                Some(Slot::Closing { .. }) => {}
                _ => {
                    // The shadow's bids move over, already counted against the cap.
                    let mut queued = Kept::new(&self.kept);
                    if let Some(Slot::HeldElsewhere { shadow, .. }) = self.slots.remove(&auction) {
                        for (_, bid) in shadow.take_all() {
                            queued.push(Work::Bid(bid));
                        }
                    }
                    self.slots.insert(auction.clone(), Slot::Closing { queued });
                    free.push(auction);
                }
            }
        }
        if !free.is_empty() {
            self.workers
                .spawn(close_free(self.ctx.clone(), free, self.freed.clone()));
        }
    }

    /// A [`close_free`] ended for one auction: work that waited goes to a new worker.
    async fn freed(&mut self, f: Freed) {
        let Some(Slot::Closing { queued }) = self.slots.remove(&f.auction) else {
            return;
        };
        if let Some(d) = f.held {
            let bids = queued
                .take_all()
                .filter_map(|w| w.into_bid(OpError::HeldElsewhere));
            self.hold_off(f.auction, d, bids);
            return;
        }
        for work in queued.take_all() {
            self.route(f.auction.clone(), work).await;
        }
    }
}

/// Closes due auctions that no worker here holds, in batches through the close batcher,
/// each under a lease taken and given back within the script call, and announces them.
/// An auction whose lease turns out to be held is left to its holder.
async fn close_free(
    ctx: Arc<Context>,
    auctions: Vec<AuctionId>,
    back: mpsc::UnboundedSender<Freed>,
) {
    let results = ctx.closes.close_free_many(&auctions, CloseMode::Due).await;
    let mut failed = 0;
    let mut first_error = None;
    for (auction, result) in auctions.into_iter().zip(results) {
        let held = match result {
            Ok((Closed::HeldElsewhere(d), _)) => Some(d),
            Ok((closed, generation)) => {
                if let Err(e) = ctx.announce_close(generation, closed, false).await {
                    debug!(%auction, error = %e, "deadline close not announced");
                }
                None
            }
            Err(e) => {
                // Stays open; the closer asks again.
                failed += 1;
                first_error.get_or_insert(e);
                None
            }
        };
        let _ = back.send(Freed { auction, held });
    }
    if let Some(e) = first_error {
        warn!(failed, error = ?e, "deadline closes failed; the closer retries them shortly (if this persists, check the Redis master and the server's ACL user)");
    }
}
