//! The auction worker: the one task in the whole system that mutates a given auction.
//!
//! A worker holds its auction's lease (see [`crate::store::lock`]; the [`crate::server::lease_keeper`]
//! renews it) and handles that auction's work strictly in arrival order: bids are judged in
//! batches (one script call for everything queued), and the events go to the
//! [`crate::server::announcer`], which publishes them in `seq` order once a group-commit `WAIT`
//! covers them; the worker meanwhile judges the next batch. Opening and closing go through
//! the same queue, so they are serialized with bids (closes are batched across auctions by
//! [`crate::server::close_batch`]). When the lease is lost the worker stops at once and hands back
//! what it queued (the router keeps it for the next holder; bidders retry anyway); when it
//! goes idle it finishes its queue, releases the lease and exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::runtime::backoff::Backoff;
use crate::runtime::metrics::inc;
use crate::server::announcer::Announcement;
use crate::server::context::Context;
use crate::server::queue::QueueRx;
use crate::server::work::{Exit, Failure, OpError, Work};
use crate::store::ledger::{self, LedgerError};
use crate::store::lock::{self, Acquire, Lease};
use crate::wire::{Bid, Event, RejectReason};

enum Stop {
    /// Lease lost or never acquired; bids left in the queue belong to someone else now.
    HeldElsewhere(Option<Duration>),
    /// Redis is down; queued work cannot be done now.
    Unavailable(String),
    /// Finished normally (idle, closed, or the router is gone) with the lease released.
    Done,
}

/// Runs one worker until it stops, then tells the router through `exits`.
pub async fn run(
    ctx: Arc<Context>,
    auction: AuctionId,
    generation: u64,
    mut rx: QueueRx,
    must_exist: bool,
    exits: mpsc::UnboundedSender<Exit>,
) {
    let mut leftover = Vec::new();
    let stop = serve(&ctx, &auction, &mut rx, must_exist, &mut leftover).await;
    rx.close();
    let hold_off = match &stop {
        Stop::HeldElsewhere(d) => Some(d.unwrap_or(ctx.settings.lease / 5)),
        Stop::Unavailable(_) => Some(Duration::from_millis(200)),
        Stop::Done => None,
    };
    // Whatever is still queued cannot be done by us: bids go back to the router for the
    // next lease holder (and bidders retry anyway, with the same bid_id, so nothing is
    // judged twice); admin callers get an error.
    while let Some(work) = rx.try_recv() {
        leftover.extend(work.into_bid(stop_error(&stop)));
    }
    let _ = exits.send(Exit {
        auction,
        generation,
        hold_off,
        leftover,
    });
}

async fn serve(
    ctx: &Context,
    auction: &AuctionId,
    rx: &mut QueueRx,
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
            _ = lease.lost() => break Stop::HeldElsewhere(None),
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
                        Some(more) => batch.push(more),
                        None => break,
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
    ctx: &Context,
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
        Ok(Acquire::HeldElsewhere(ttl)) => Err(Stop::HeldElsewhere(Some(ttl))),
        Ok(Acquire::UnknownAuction) => Ok(None),
        Err(e) => {
            ctx.master.report(link.generation, &e);
            Err(Stop::Unavailable(e.to_string()))
        }
    }
}

struct Worker<'a> {
    ctx: &'a Context,
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
        self.refuse_unauthentic(bids);
        if bids.is_empty() {
            return Ok(());
        }
        self.judge(bids).await?;
        bids.clear();
        Ok(())
    }

    fn lease(&self) -> Result<&Lease, Stop> {
        self.lease.as_ref().ok_or(Stop::HeldElsewhere(None))
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
                return Err(Stop::HeldElsewhere(None));
            }
            match call(lease.clone()).await {
                Ok(v) => return Ok(v),
                Err(Failure::Fenced) => {
                    warn!(auction = %lease.auction(), token = lease.token(), what, "write refused by the fence: lease lost; stopping this auction's worker");
                    return Err(Stop::HeldElsewhere(None));
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
                    crate::runtime::propagation::set_parent(&span, tp);
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
            // A leader's proxy raise goes out just before the bid that provoked it.
            events.extend(j.raised);
            let mut event = j.event;
            if let Some(span) = span {
                span.record("outcome", outcome);
                if let Some(seq) = event.seq() {
                    span.record("seq", seq);
                }
                event.set_traceparent(crate::runtime::propagation::traceparent(span));
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

    /// With `BID_AUTH=required`, takes out of `bids` those not signed by their bidder's
    /// registered key and answers them `unauthenticated`: never judged and nothing stored,
    /// so a retry of an already judged bid gets its first outcome only when correctly signed.
    fn refuse_unauthentic(&self, bids: &mut Vec<Bid>) {
        let Some(keys) = &self.ctx.auth else {
            return;
        };
        bids.retain(|bid| {
            let Err(why) = keys.verify(bid) else {
                return true;
            };
            let c = &self.ctx.metrics;
            inc(&c.bids_unauthenticated);
            c.rejected(RejectReason::Unauthenticated.as_str());
            debug!(bid_id = %bid.bid_id, bidder = %bid.bidder, why, "refused an unauthenticated bid");
            let event = Event::refusal(bid.clone(), RejectReason::Unauthenticated, Some(why.into()));
            let _ = self.ctx.refusals.try_send(event);
            false
        });
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
                        self.ctx
                            .announce_event(generation, event.clone(), true)
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
                let answer = self
                    .ctx
                    .announce_close(generation, closed, reply.is_some())
                    .await;
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
        _ => OpError::HeldElsewhere,
    }
}
