//! [`Recorder`]: every event on the event channel, in arrival order and with its arrival
//! time, through failovers. The one event recorder of the tests and the demo (the
//! benchmark tallies outcomes on a raw connection instead: it must not cost the load
//! generator a decoded `Event` per bid).
//!
//! It listens through the library's own [`Subscription`], which follows the master that
//! Sentinel names, so a recorder started before a failover keeps recording after it;
//! events published while it resubscribes are lost, as for any Pub/Sub subscriber.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use auction::link::sentinel::{Master, Settings};
use auction::link::subscription::Subscription;
use auction::runtime::config::{DEFAULT_EVENT_CHANNEL, RedisArgs};
use auction::runtime::task::TaskGuard;
use auction::wire::Event;
use tokio::sync::{Notify, mpsc};

use crate::DevStack;

/// How long [`Recorder::start`] waits for its subscription to be live.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(20);
/// Messages in flight between the subscription and the recording task.
const BACKLOG: usize = 65_536;

/// What was heard, in arrival order.
#[derive(Default)]
struct Record {
    events: Vec<Event>,
    /// When each of `events` arrived.
    arrived: Vec<Instant>,
    /// Messages that are not v1 events (the prototype's dialect), as text.
    others: Vec<String>,
    /// Indexes over `events`, so the questions a busy bidder asks every tick
    /// ([`Recorder::outcome_of`], [`Recorder::next_min`]) cost one lookup, not a scan of a
    /// record that grows to tens of thousands of events in a chaos run.
    answered: HashSet<String>,
    next_min: HashMap<String, u64>,
}

impl Record {
    fn push(&mut self, e: Event) {
        if let Some(bid_id) = e.bid_id() {
            self.answered.insert(bid_id.to_owned());
        }
        if let Event::BidAccepted {
            auction_id,
            next_min,
            ..
        } = &e
        {
            self.next_min.insert(auction_id.clone(), *next_min);
        }
        self.events.push(e);
        self.arrived.push(Instant::now());
    }

    /// Events that arrived after `t`, with their arrival times (arrivals are in order).
    fn since(&self, t: Instant) -> impl Iterator<Item = (&Instant, &Event)> {
        let from = self.arrived.partition_point(|at| *at <= t);
        self.arrived[from..].iter().zip(&self.events[from..])
    }
}

type Seen = Arc<Mutex<Record>>;

/// Records every event on the event channel. Cloning shares the record.
#[derive(Clone)]
pub struct Recorder {
    seen: Seen,
    notify: Arc<Notify>,
    _listening: Arc<(Subscription, TaskGuard)>,
}

impl Recorder {
    /// Subscribes through the Sentinels of `stack` and returns once the subscription is live,
    /// so no event published after this returns is missed (barring a failover).
    pub async fn start(stack: &DevStack) -> anyhow::Result<Recorder> {
        let args = RedisArgs::local(&stack.sentinel_addrs()).map_err(anyhow::Error::msg)?;
        Recorder::on(Master::start(Settings::from_args(&args))).await
    }

    /// Records through `master` (a handle the caller already follows the master with).
    pub async fn on(master: Master) -> anyhow::Result<Recorder> {
        let (tx, mut rx) = mpsc::channel(BACKLOG);
        let subscription = Subscription::start(master, vec![DEFAULT_EVENT_CHANNEL.into()], tx);
        let seen: Seen = Arc::default();
        let notify = Arc::new(Notify::new());
        let (record, wake) = (seen.clone(), notify.clone());
        let task = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let decoded = Event::from_json(&msg.payload);
                let mut r = lock(&record);
                match decoded {
                    Ok(e) => r.push(e),
                    Err(_) => r
                        .others
                        .push(String::from_utf8_lossy(&msg.payload).into_owned()),
                }
                drop(r);
                wake.notify_waiters();
            }
        });
        let mut live = subscription.watch_live();
        tokio::time::timeout(SUBSCRIBE_LIMIT, live.wait_for(|l| *l))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the event recorder's subscription was not live within {SUBSCRIBE_LIMIT:?}"
                )
            })?
            .map_err(|_| anyhow::anyhow!("the event recorder's subscription task ended"))?;
        Ok(Recorder {
            seen,
            notify,
            _listening: Arc::new((subscription, TaskGuard::new("event recorder", task))),
        })
    }

    /// Every event so far, in arrival order.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.seen).events.clone()
    }

    /// Every event so far with its arrival time.
    pub fn timed(&self) -> Vec<(Instant, Event)> {
        let r = lock(&self.seen);
        r.arrived
            .iter()
            .copied()
            .zip(r.events.iter().cloned())
            .collect()
    }

    /// Every message that was not a v1 event (e.g. the prototype dialect's), in order.
    pub fn others(&self) -> Vec<String> {
        lock(&self.seen).others.clone()
    }

    /// Waits until `pred` holds over the events seen so far; panics after `limit` with
    /// `what` and the last events seen.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        limit: Duration,
        mut pred: impl FnMut(&[Event]) -> Option<T>,
    ) -> T {
        self.wait_for(what, limit, |events, _| pred(events)).await
    }

    /// [`Recorder::wait_until`] over the v1 events and the other messages (as text).
    /// `pred` runs under the record's lock: it must not call back into the recorder.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut pred: impl FnMut(&[Event], &[String]) -> Option<T>,
    ) -> T {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Judged on the record itself, under its lock, not on a copy per wake-up.
            let found = {
                let r = lock(&self.seen);
                pred(&r.events, &r.others)
            };
            if let Some(v) = found {
                return v;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                let evs = self.events();
                let tail: Vec<String> = evs.iter().rev().take(10).map(|e| e.to_json()).collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}; {} events seen, last: {tail:#?}",
                    evs.len()
                );
            }
        }
    }

    /// The `i`-th event in arrival order (from 0), waiting up to `limit` for it to arrive.
    pub async fn nth(&self, i: usize, limit: Duration) -> Option<Event> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = lock(&self.seen).events.get(i) {
                return Some(e.clone());
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits for the first `auction_opened` and returns its id.
    pub async fn opened(&self, limit: Duration) -> String {
        self.wait_until("auction_opened", limit, |evs| {
            evs.iter().find_map(|e| match e {
                Event::AuctionOpened { auction_id, .. } => Some(auction_id.clone()),
                _ => None,
            })
        })
        .await
    }

    /// Waits for the `auction_closed` of `id`.
    pub async fn closed(&self, id: &str, limit: Duration) -> Event {
        self.wait_until(&format!("auction_closed of {id}"), limit, |evs| {
            evs.iter()
                .find(|e| matches!(e, Event::AuctionClosed { auction_id, .. } if auction_id == id))
                .cloned()
        })
        .await
    }

    /// Whether any outcome of `bid_id` was seen.
    pub fn outcome_of(&self, bid_id: &str) -> bool {
        lock(&self.seen).answered.contains(bid_id)
    }

    /// Whether any outcome of a bid by `bidder` arrived after `t`.
    pub fn heard_from_after(&self, bidder: &str, t: Instant) -> bool {
        lock(&self.seen).since(t).any(|(_, e)| match e {
            Event::BidAccepted { bidder: b, .. } => b == bidder,
            Event::BidRejected { bidder: b, .. } => b.as_deref() == Some(bidder),
            _ => false,
        })
    }

    /// `next_min` of the latest `bid_accepted` of `auction`.
    pub fn next_min(&self, auction: &str) -> Option<u64> {
        lock(&self.seen).next_min.get(auction).copied()
    }

    /// Arrival of the first `bid_accepted` after `t` (optionally only for some auctions).
    pub fn first_accept_after(
        &self,
        t: Instant,
        auctions: Option<&HashSet<String>>,
    ) -> Option<Instant> {
        lock(&self.seen).since(t).find_map(|(at, e)| match e {
            Event::BidAccepted { auction_id, .. }
                if auctions.is_none_or(|set| set.contains(auction_id)) =>
            {
                Some(*at)
            }
            _ => None,
        })
    }
}

/// The record stays usable after a panicking reader: it is only ever appended to.
fn lock(seen: &Seen) -> MutexGuard<'_, Record> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}
