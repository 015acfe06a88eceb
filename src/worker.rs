//! The auction worker: the one task in the whole system that mutates a given auction.
//!
//! A worker holds its auction's lease (see [`crate::lock`]; the [`crate::lease_keeper`]
//! renews it) and handles that auction's work strictly in arrival order: bids are judged in
//! batches (one script call for everything queued), and the events go to the
//! [`crate::announcer`], which publishes them in `seq` order once a group-commit `WAIT`
//! covers them; the worker meanwhile judges the next batch. Opening and closing go through
//! the same queue, so they are serialized with bids (closes are batched across auctions by
//! [`crate::close_batch`]). When the lease is lost the worker stops at once and hands back
//! what it queued (the router keeps it for the next holder; bidders retry anyway); when it
//! goes idle it finishes its queue, releases the lease and exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::announcer::{Announcement, Announcer, NotAnnounced};
use crate::backoff::Backoff;
use crate::close_batch::CloseBatcher;
use crate::keyspace::AuctionId;
use crate::lease_keeper::LeaseKeeper;
use crate::ledger::{self, AuctionSpec, CloseMode, Closed, LedgerError};
use crate::lock::{self, Acquire, Lease};
use crate::metrics::{Metrics, inc};
use crate::sentinel::Master;
use crate::wire::{Bid, Event};

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
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(5),
            idle_release: Duration::from_secs(10),
            max_batch: 256,
            queue: 4096,
        }
    }
}

/// Everything a worker needs, shared by all workers of one server.
pub struct WorkerContext {
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
}

/// Why an admin operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Another server holds this auction's lease right now; retry shortly.
    #[error("another server holds this auction's lease; retry shortly")]
    Busy,
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
    /// Set when another server holds the lease: leave its bids alone for this long.
    pub busy_for: Option<Duration>,
    /// Bids this worker received but did not judge, in arrival order. The router keeps them
    /// so that whoever takes the lease next judges them (duplicates are harmless).
    pub leftover: Vec<Bid>,
}

enum Stop {
    /// Lease lost or never acquired; bids left in the queue belong to someone else now.
    NotOwner(Option<Duration>),
    /// Redis is down; queued work cannot be done now.
    Unavailable(String),
    /// Finished normally (idle, closed, or the router is gone) with the lease released.
    Done,
}

/// Runs one worker until it stops, then tells the router through `exits`.
pub async fn run(
    ctx: Arc<WorkerContext>,
    auction: AuctionId,
    generation: u64,
    mut rx: mpsc::Receiver<Work>,
    must_exist: bool,
    exits: mpsc::UnboundedSender<Exit>,
) {
    let mut leftover = Vec::new();
    let stop = serve(&ctx, &auction, &mut rx, must_exist, &mut leftover).await;
    rx.close();
    let busy_for = match &stop {
        Stop::NotOwner(d) => Some(d.unwrap_or(ctx.settings.lease / 5)),
        Stop::Unavailable(_) => Some(Duration::from_millis(200)),
        Stop::Done => None,
    };
    // Whatever is still queued cannot be done by us: bids go back to the router for the
    // next lease holder (and bidders retry anyway, with the same bid_id, so nothing is
    // judged twice); admin callers get an error.
    while let Ok(work) = rx.try_recv() {
        leftover.extend(work.into_bid(stop_error(&stop)));
    }
    let _ = exits.send(Exit {
        auction,
        generation,
        busy_for,
        leftover,
    });
}

async fn serve(
    ctx: &WorkerContext,
    auction: &AuctionId,
    rx: &mut mpsc::Receiver<Work>,
    must_exist: bool,
    leftover: &mut Vec<Bid>,
) -> Stop {
    let lease = match take_lease(ctx, auction, must_exist).await {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            // No such auction: answer every queued request so nobody waits in vain.
            rx.close();
            let mut w = Worker { ctx, lease: None };
            while let Some(work) = rx.recv().await {
                w.unknown(work).await;
            }
            return Stop::Done;
        }
        Err(stop) => return stop,
    };
    debug!(%auction, token = lease.token(), "lease acquired");
    inc(&ctx.metrics.leases_acquired);
    ctx.keeper.keep(lease.clone());
    // The keeper renews the lease; this only notices when it could not in time.
    let mut check = tokio::time::interval(ctx.settings.lease / 3);
    check.tick().await;
    let mut idle_since = Instant::now();
    let mut draining = false;
    let mut w = Worker {
        ctx,
        lease: Some(lease.clone()),
    };
    let stop = loop {
        let idle_deadline = tokio::time::Instant::from_std(idle_since + ctx.settings.idle_release);
        tokio::select! {
            biased;
            _ = lease.lost() => break Stop::NotOwner(None),
            _ = check.tick() => {
                if !lease.locally_valid() {
                    warn!(%auction, token = lease.token(), "lease could not be renewed in time (Redis unreachable?); stopping this auction's worker");
                    break Stop::Unavailable("lease could not be renewed in time".into());
                }
            }
            work = rx.recv() => {
                let Some(first) = work else { break Stop::Done };
                let mut batch = vec![first];
                while batch.len() < ctx.settings.max_batch {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                // A closed auction keeps its worker until idle: late bids are answered
                // by the holder instead of moving the lease around.
                if let Err((stop, unjudged)) = w.handle(batch).await {
                    leftover.extend(unjudged);
                    break stop;
                }
                idle_since = Instant::now();
            }
            _ = tokio::time::sleep_until(idle_deadline), if !draining => {
                // Idle: finish anything that raced in, then let the lease go.
                rx.close();
                draining = true;
            }
        }
    };
    // Given back at once when done; otherwise (lost, or Redis down) the keeper just stops
    // renewing it (a release of a lease that is no longer ours changes nothing).
    let _ = tokio::time::timeout(Duration::from_secs(1), ctx.keeper.release(lease)).await;
    if matches!(stop, Stop::Done) {
        debug!(%auction, "lease released");
    } else {
        inc(&ctx.metrics.leases_lost);
    }
    stop
}

async fn take_lease(
    ctx: &WorkerContext,
    auction: &AuctionId,
    must_exist: bool,
) -> Result<Option<Lease>, Stop> {
    let link = ctx
        .master
        .link(Duration::from_secs(2))
        .await
        .map_err(|e| Stop::Unavailable(e.to_string()))?;
    let mut conn = link.conn.clone();
    match lock::acquire(
        &mut conn,
        auction,
        &ctx.owner,
        ctx.settings.lease,
        must_exist,
    )
    .instrument(info_span!("lease.acquire", %auction, must_exist))
    .await
    {
        Ok(Acquire::Acquired(lease)) => {
            // Make the lease itself durable before writing under it, so that a failover
            // right after is unlikely to lose the lock and hand the auction to another
            // server while this one still writes (the fence would refuse it, but the
            // handover costs time). Best effort: the fence is what protects the data.
            if let Err(e) = ctx.announcer.flush(link.generation).await {
                debug!(%auction, error = %e, "lease not yet replicated; continuing (fenced anyway)");
            }
            Ok(Some(lease))
        }
        Ok(Acquire::Held(ttl)) => Err(Stop::NotOwner(Some(ttl))),
        Ok(Acquire::UnknownAuction) => Ok(None),
        Err(e) => {
            ctx.master.report(link.generation, &e);
            Err(Stop::Unavailable(e.to_string()))
        }
    }
}

struct Worker<'a> {
    ctx: &'a WorkerContext,
    lease: Option<Lease>,
}

impl Worker<'_> {
    /// Handles a batch in order. On failure, returns the bids it could not judge (in order).
    async fn handle(&mut self, batch: Vec<Work>) -> Result<(), (Stop, Vec<Bid>)> {
        let mut pending: Vec<Bid> = Vec::new();
        let mut rest = batch.into_iter();
        while let Some(work) = rest.next() {
            let failed = match work {
                Work::Bid(bid) => {
                    pending.push(bid);
                    continue;
                }
                // Keep arrival order: bids queued before an admin operation go first.
                admin => match self.judge_all(&mut pending).await {
                    Err(stop) => Some((stop, Some(admin))),
                    Ok(()) => self.admin(admin).await.err().map(|stop| (stop, None)),
                },
            };
            if let Some((stop, admin)) = failed {
                if let Some(admin) = admin {
                    admin.refuse(stop_error(&stop));
                }
                pending.extend(rest.filter_map(|w| w.into_bid(stop_error(&stop))));
                return Err((stop, pending));
            }
        }
        let result = self.judge_all(&mut pending).await;
        result.map_err(|stop| (stop, pending))
    }

    /// Judges `bids` and empties it on success; leaves it intact on failure.
    async fn judge_all(&mut self, bids: &mut Vec<Bid>) -> Result<(), Stop> {
        if bids.is_empty() {
            return Ok(());
        }
        self.judge(bids).await?;
        bids.clear();
        Ok(())
    }

    fn lease(&self) -> Result<&Lease, Stop> {
        self.lease.as_ref().ok_or(Stop::NotOwner(None))
    }

    /// Runs a fenced ledger call, retrying transient failures while the lease may still be
    /// valid. Returns the result and the link generation it ran on.
    async fn fenced<T, F, Fut>(&self, what: &str, call: F) -> Result<(T, u64), Stop>
    where
        F: Fn(Lease) -> Fut,
        Fut: std::future::Future<Output = Result<(T, u64), Failure>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            let lease = self.lease()?.clone();
            if !lease.locally_valid() {
                return Err(Stop::NotOwner(None));
            }
            match call(lease.clone()).await {
                Ok(v) => return Ok(v),
                Err(Failure::Fenced) => {
                    warn!(auction = %lease.auction(), token = lease.token(), what, "write refused by the fence: lease lost; stopping this auction's worker");
                    return Err(Stop::NotOwner(None));
                }
                Err(Failure::Down(e)) => return Err(Stop::Unavailable(e)),
                Err(Failure::Transient(e)) => {
                    if backoff.attempts() >= 5 {
                        return Err(Stop::Unavailable(e));
                    }
                    debug!(auction = %lease.auction(), what, error = %e, "retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn judge(&mut self, bids: &[Bid]) -> Result<(), Stop> {
        let started = Instant::now();
        let n = bids.len() as u64;
        let token = self.lease.as_ref().map(Lease::token).unwrap_or(0);
        let batch = info_span!("judge_batch", auction = %bids[0].auction_id, bids = n, token);
        // One span per traced bid, child of the bidder's span, so a bid is one trace. Bids
        // without a traceparent (tracing off at the bidder) cost nothing here.
        let spans: Vec<Option<Span>> = bids
            .iter()
            .map(|b| {
                b.traceparent.as_deref().map(|tp| {
                    let span = info_span!(parent: &batch, "bid.judge", bid_id = %b.bid_id, auction_id = %b.auction_id, amount = b.amount, token, outcome = Empty, seq = Empty);
                    crate::propagation::set_parent(&span, tp);
                    span
                })
            })
            .collect();
        let bids = Arc::new(bids.to_vec());
        let (judged, generation) = self
            .fenced("place bids", |lease| {
                let bids = bids.clone();
                on_master(&self.ctx.master, lease, |mut conn, lease| async move {
                    ledger::place_bids(&mut conn, &lease, &bids).await
                })
            })
            .instrument(batch.clone())
            .await?;
        let c = &self.ctx.metrics;
        let mut events = Vec::with_capacity(judged.len());
        for (j, span) in judged.into_iter().zip(&spans) {
            let outcome = match (&j.event, j.fresh) {
                (_, false) => {
                    inc(&c.bids_duplicate);
                    "duplicate"
                }
                (Event::BidAccepted { .. }, true) => {
                    inc(&c.bids_accepted);
                    "accepted"
                }
                (Event::BidRejected { reason, .. }, true) => {
                    c.rejected(reason.as_str());
                    reason.as_str()
                }
                _ => "other",
            };
            let mut event = j.event;
            if let Some(span) = span {
                span.record("outcome", outcome);
                if let Some(seq) = event.seq() {
                    span.record("seq", seq);
                }
                event.set_traceparent(crate::propagation::traceparent(span));
            }
            events.push(event);
        }
        // Hand the events over and go on: the announcer publishes them, in order, once a
        // WAIT issued after this write succeeds, while this worker judges the next batch.
        self.ctx
            .announcer
            .announce(Announcement {
                generation,
                events,
                outcomes: n,
                started: Some(started),
                span: batch,
                done: None,
            })
            .await;
        Ok(())
    }

    async fn admin(&mut self, work: Work) -> Result<(), Stop> {
        match work {
            Work::Bid(_) => Ok(()),
            Work::Open { spec, reply } => {
                let spec = Arc::new(spec);
                let result = self
                    .fenced("open", |lease| {
                        let spec = spec.clone();
                        on_master(&self.ctx.master, lease, |mut conn, lease| async move {
                            ledger::open(&mut conn, &lease, &spec).await
                        })
                    })
                    .await;
                let (opened, generation) = match result {
                    Ok(v) => v,
                    Err(stop) => {
                        let _ = reply.send(Err(stop_error(&stop)));
                        return Err(stop);
                    }
                };
                let answer = match opened {
                    Some(event) => {
                        inc(&self.ctx.metrics.auctions_opened);
                        info!(auction = ?event.auction_id(), item = %spec.item, "auction opened");
                        announce_one(self.ctx, generation, event.clone(), true)
                            .await
                            .map(|()| event)
                    }
                    None => Err(OpError::AlreadyExists),
                };
                let _ = reply.send(answer);
                Ok(())
            }
            Work::Close { mode, reply } => {
                let result = self
                    .fenced("close", |lease| self.ctx.closes.close(lease, mode))
                    .await;
                let (closed, generation) = match result {
                    Ok(v) => v,
                    Err(stop) => {
                        if let Some(r) = reply {
                            let _ = r.send(Err(stop_error(&stop)));
                        }
                        return Err(stop);
                    }
                };
                let answer = announce_close(self.ctx, generation, closed, reply.is_some()).await;
                if let Some(r) = reply {
                    let _ = r.send(answer);
                }
                Ok(())
            }
        }
    }

    /// Answers work for an auction that does not exist.
    async fn unknown(&mut self, work: Work) {
        match work {
            Work::Bid(bid) => {
                self.ctx.metrics.rejected("unknown_auction");
                let reason = crate::wire::RejectReason::UnknownAuction;
                // Answered with the other refusals, batched.
                let _ = self
                    .ctx
                    .refusals
                    .send(Event::refusal(bid, reason, None))
                    .await;
            }
            Work::Open { reply, .. } => {
                let _ = reply.send(Err(OpError::Unavailable("lease not acquired".into())));
            }
            Work::Close { reply, .. } => {
                if let Some(r) = reply {
                    let _ = r.send(Err(OpError::NotFound));
                }
            }
        }
    }
}

/// Counts, logs and announces the result of a close; returns what the caller is told.
pub(crate) async fn announce_close(
    ctx: &WorkerContext,
    generation: u64,
    closed: Closed,
    wait: bool,
) -> Result<Closed, OpError> {
    match &closed {
        Closed::Now(event) | Closed::Already(event) => {
            if matches!(closed, Closed::Now(_)) {
                inc(&ctx.metrics.auctions_closed);
                debug!(auction = ?event.auction_id(), ?event, "auction closed");
            }
            // An earlier close may have been stored but never announced (its server died):
            // announcing again is harmless, subscribers dedupe by seq.
            announce_one(ctx, generation, event.clone(), wait).await?;
            Ok(closed)
        }
        Closed::NotDue(_) => Ok(closed),
        Closed::Unknown => Err(OpError::NotFound),
        Closed::Held(_) => Err(OpError::Busy),
    }
}

/// Announces `event` (after replicas acknowledged it) and, when `wait`, waits for that.
async fn announce_one(
    ctx: &WorkerContext,
    generation: u64,
    event: Event,
    wait: bool,
) -> Result<(), OpError> {
    if !wait {
        ctx.announcer
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
    ctx.announcer
        .announce_and_wait(generation, vec![event])
        .await
        .map_err(|e| match e {
            NotAnnounced::Failed(e) => OpError::Unavailable(e),
            e => OpError::NotDurable(e.to_string()),
        })
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

/// Runs `call` on the current master link; returns its result and the link's generation.
async fn on_master<T, F, Fut>(master: &Master, lease: Lease, call: F) -> Result<(T, u64), Failure>
where
    F: FnOnce(redis::aio::MultiplexedConnection, Lease) -> Fut,
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    let link = master
        .link(lease.ttl() / 3)
        .await
        .map_err(|e| Failure::Down(e.to_string()))?;
    call(link.conn.clone(), lease)
        .await
        .map(|v| (v, link.generation))
        .map_err(|e| Failure::of(e, master, link.generation))
}

fn stop_error(stop: &Stop) -> OpError {
    match stop {
        Stop::Unavailable(e) => OpError::Unavailable(e.clone()),
        _ => OpError::Busy,
    }
}
