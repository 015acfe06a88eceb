//! One auction's work queue, fair between bidders.
//!
//! The queue is bounded (a full queue sheds bids as `overloaded`), and once it is half
//! full no bidder name may have more than its share of bids waiting in it
//! (`too_many_pending`): a flood of bids from one name fills at most half the queue plus
//! its share, so the other bidders' bids are still queued and judged. Below half, anyone's
//! bids get in, so a single bidder's legitimate burst (a pipelined client) is not cut.
//! Honest clients have one bid in flight at a time (`auction-client` does), far below the
//! share. The router counts a bid in when it queues it and the worker
//! counts it out when it takes it; the count is one small map per auction, touched under
//! a lock that is never held across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::server::work::Work;
use crate::wire::Bid;

/// Why the router could not queue work now.
#[derive(Debug)]
pub enum Refused {
    /// The queue is full: a bid is shed (`overloaded`); admin work may wait for room.
    Full(Work),
    /// This bid's bidder already has its share of the queue waiting (`too_many_pending`).
    TooManyPending(Bid),
    /// The worker has gone; start another.
    Closed(Work),
}

/// Bids waiting per bidder.
#[derive(Clone, Default)]
struct Waiting(Arc<Mutex<HashMap<String, u32>>>);

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        // Counting never panics while holding the lock; recover rather than cascade.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `bid` in unless the queue is `contended` and its bidder already has `share`
    /// waiting.
    fn admit(&self, bid: &Bid, share: u32, contended: bool) -> bool {
        let mut waiting = self.lock();
        match waiting.get_mut(&bid.bidder) {
            Some(n) if contended && *n >= share => false,
            Some(n) => {
                *n += 1;
                true
            }
            // The name is copied only for a bidder with nothing waiting yet.
            None => {
                waiting.insert(bid.bidder.clone(), 1);
                true
            }
        }
    }

    /// Counts a bid in whatever the share (handed-over bids, already accepted by a router).
    fn count_in(&self, bid: &Bid) {
        self.admit(bid, 0, false);
    }

    fn count_out(&self, work: &Work) {
        if let Work::Bid(bid) = work {
            let mut waiting = self.lock();
            if let Some(n) = waiting.get_mut(&bid.bidder) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    waiting.remove(&bid.bidder);
                }
            }
        }
    }
}

/// A queue of `capacity` with a share of `share` bids per bidder.
pub fn queue(capacity: usize, share: u32) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(capacity);
    let waiting = Waiting::default();
    (
        QueueTx {
            tx,
            waiting: waiting.clone(),
            share,
        },
        QueueRx { rx, waiting },
    )
}

/// The router's end.
#[derive(Clone)]
pub struct QueueTx {
    tx: mpsc::Sender<Work>,
    waiting: Waiting,
    share: u32,
}

impl QueueTx {
    /// Queues `work` now or says why not (boxed: it hands the work back, and a bid is big).
    pub fn try_send(&self, work: Work) -> Result<(), Box<Refused>> {
        let contended = self.tx.capacity() * 2 < self.tx.max_capacity();
        let work = match work {
            Work::Bid(bid) if !self.waiting.admit(&bid, self.share, contended) => {
                return Err(Box::new(Refused::TooManyPending(bid)));
            }
            work => work,
        };
        self.tx.try_send(work).map_err(|e| {
            Box::new(match e {
                mpsc::error::TrySendError::Full(work) => {
                    self.waiting.count_out(&work);
                    Refused::Full(work)
                }
                mpsc::error::TrySendError::Closed(work) => {
                    self.waiting.count_out(&work);
                    Refused::Closed(work)
                }
            })
        })
    }

    /// Queues `work`, waiting for room; gives it back if the worker has gone. Bids sent
    /// this way (a handover's shadow) are counted but not held to the share.
    pub async fn send(&self, work: Work) -> Result<(), Work> {
        if let Work::Bid(bid) = &work {
            self.waiting.count_in(bid);
        }
        self.tx
            .send(work)
            .await
            .map_err(|mpsc::error::SendError(work)| {
                self.waiting.count_out(&work);
                work
            })
    }
}

/// The worker's end.
pub struct QueueRx {
    rx: mpsc::Receiver<Work>,
    waiting: Waiting,
}

impl QueueRx {
    /// The next work, waiting for it; `None` once closed and empty.
    pub async fn recv(&mut self) -> Option<Work> {
        let work = self.rx.recv().await?;
        self.waiting.count_out(&work);
        Some(work)
    }

    /// The next work if there is some now.
    pub fn try_recv(&mut self) -> Option<Work> {
        let work = self.rx.try_recv().ok()?;
        self.waiting.count_out(&work);
        Some(work)
    }

    /// Takes no more work; what is queued can still be received.
    pub fn close(&mut self) {
        self.rx.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::AuctionId;

    fn bid(bidder: &str, n: u64) -> Work {
        Work::Bid(Bid {
            auction_id: AuctionId::parse("a").expect("id"),
            bid_id: format!("{bidder}-{n}"),
            bidder: bidder.into(),
            amount: n,
            max_amount: None,
            traceparent: None,
            sig: None,
        })
    }

    #[tokio::test]
    async fn past_half_full_a_flooding_bidder_gets_only_its_share() {
        let (tx, mut rx) = queue(10, 3);
        // Below half, a burst from one bidder gets in.
        for n in 0..6 {
            tx.try_send(bid("flood", n))
                .expect("an uncontended queue admits a burst");
        }
        assert!(matches!(
            tx.try_send(bid("flood", 6)).map_err(|r| *r),
            Err(Refused::TooManyPending(_))
        ));
        tx.try_send(bid("honest", 1)).expect("others still get in");
        // Drained below half again, anyone's bids get in.
        for _ in 0..3 {
            assert!(rx.recv().await.is_some());
        }
        tx.try_send(bid("flood", 7)).expect("room again");
    }

    #[tokio::test]
    async fn a_full_queue_sheds_and_a_closed_one_hands_work_back() {
        let (tx, mut rx) = queue(1, 10);
        tx.try_send(bid("a", 1)).expect("room");
        assert!(matches!(
            tx.try_send(bid("b", 1)).map_err(|r| *r),
            Err(Refused::Full(_))
        ));
        rx.close();
        assert!(rx.try_recv().is_some(), "queued work is still received");
        assert!(matches!(
            tx.try_send(bid("b", 2)).map_err(|r| *r),
            Err(Refused::Closed(_))
        ));
    }
}
