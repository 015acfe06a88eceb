//! Recording outcomes: the one subscriber on the event channel, and what it keeps of the
//! current step ([`StepTally`]) for the step to read once the load is over. Owns the
//! `bid_id` and `auction_id` formats that carry the step, the bidder, the bid number and
//! the send time through the server and back, and the per-bidder slots through which a
//! closed-loop bidder learns that its bids were answered.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use auction::link::sentinel::Master;
use auction::runtime::config::DEFAULT_EVENT_CHANNEL;
use tokio::sync::Notify;

use crate::load::RespConn;
use crate::now_ms;

/// Per-bidder state shared between a bidder task and the subscriber.
pub(crate) struct BidderSlot {
    pub(crate) answered: AtomicU64,
    pub(crate) notify: Notify,
}

/// The statistics of the current step, aggregated by the subscriber as the events arrive:
/// counts, latency samples and per-second rates rather than a log of the events themselves.
#[derive(Default)]
pub(crate) struct StepTally {
    step: u32,
    /// Microseconds since [`Shared::epoch`].
    load_start_us: u64,
    window_start_us: u64,
    window_end_us: u64,
    /// Bitset of answered bid numbers, per bidder.
    answered: Vec<Vec<u64>>,
    pub(crate) first_outcomes: u64,
    pub(crate) repeats: u64,
    pub(crate) accepted: u64,
    pub(crate) rejected: BTreeMap<String, u64>,
    pub(crate) accepted_in_window: u64,
    pub(crate) outcomes_in_window: u64,
    pub(crate) lat_accepted_us: Vec<u32>,
    pub(crate) lat_outcome_us: Vec<u32>,
    /// Accepted and all outcomes per second since the load started (by arrival).
    pub(crate) per_second: Vec<(u64, u64)>,
    /// (auction index, bidder, bid number) of every accepted bid.
    pub(crate) accepted_bids: Vec<(u32, u32, u32)>,
    /// auction index → (closed_at_ms, local wall ms at arrival).
    pub(crate) closed: HashMap<u32, (u64, u64)>,
    pub(crate) seq_gaps: u64,
    last_seq: HashMap<u32, u64>,
    foreign: u64,
    undecodable: u64,
}

#[derive(Clone)]
pub(crate) struct Shared {
    epoch: Instant,
    step: Arc<AtomicU32>,
    tally: Arc<Mutex<StepTally>>,
    slots: Arc<Mutex<Arc<Vec<BidderSlot>>>>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Shared {
            epoch: Instant::now(),
            step: Arc::new(AtomicU32::new(0)),
            tally: Arc::new(Mutex::new(StepTally::default())),
            slots: Arc::new(Mutex::new(Arc::new(Vec::new()))),
        }
    }

    pub(crate) fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, StepTally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts recording `step` with a fresh tally (no window yet) and a slot per bidder;
    /// returns the slots.
    pub(crate) fn begin_step(&self, step: u32, bidders: usize) -> Arc<Vec<BidderSlot>> {
        let slots: Arc<Vec<BidderSlot>> = Arc::new(
            (0..bidders)
                .map(|_| BidderSlot {
                    answered: AtomicU64::new(0),
                    notify: Notify::new(),
                })
                .collect(),
        );
        *self.slots.lock().unwrap_or_else(|p| p.into_inner()) = slots.clone();
        {
            let mut r = self.lock();
            *r = StepTally {
                step,
                load_start_us: u64::MAX,
                window_start_us: u64::MAX,
                window_end_us: u64::MAX,
                ..StepTally::default()
            };
        }
        self.step.store(step, Ordering::Release);
        slots
    }

    /// Sets the start of the load and the measurement window of the current step.
    pub(crate) fn set_window(
        &self,
        load_start: Instant,
        window_start: Instant,
        window_end: Instant,
    ) {
        let mut r = self.lock();
        r.load_start_us = self.us(load_start);
        r.window_start_us = self.us(window_start);
        r.window_end_us = self.us(window_end);
    }

    /// Stops recording the current step and returns what was recorded.
    pub(crate) fn end_step(&self) -> StepTally {
        self.step.store(0, Ordering::Release);
        std::mem::take(&mut *self.lock())
    }
}

pub(crate) fn bid_id(step: u32, bidder: u32, n: u32, sent_us: u64) -> String {
    format!("s{step}-{bidder}-{n}-{sent_us}")
}

pub(crate) fn parse_bid_id(id: &str) -> Option<(u32, u32, u32, u64)> {
    let mut it = id.strip_prefix('s')?.split('-');
    let step = it.next()?.parse().ok()?;
    let bidder = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let sent = it.next()?.parse().ok()?;
    Some((step, bidder, n, sent))
}

pub(crate) fn auction_id(step: u32, index: usize) -> String {
    format!("s{step}-a{index}")
}

fn parse_auction_id(id: &str) -> Option<(u32, u32)> {
    let (step, index) = id.strip_prefix('s')?.split_once("-a")?;
    Some((step.parse().ok()?, index.parse().ok()?))
}

pub(crate) struct Subscriber {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// Subscribes to the event channel on a raw RESP connection (no timeout on reads: the
    /// task waits for events until it is dropped).
    pub(crate) async fn start(master: &Master, shared: Shared) -> anyhow::Result<Subscriber> {
        let mut conn = RespConn::connect(master).await?;
        conn.write_command(&[b"SUBSCRIBE", DEFAULT_EVENT_CHANNEL.as_bytes()])
            .await?;
        match tokio::time::timeout(Duration::from_secs(5), conn.read_push()).await {
            Ok(Ok((kind, _))) if kind == b"subscribe" => {}
            Ok(Ok((kind, _))) => bail!("SUBSCRIBE answered {:?}", String::from_utf8_lossy(&kind)),
            Ok(Err(e)) => return Err(e.context("SUBSCRIBE to the event channel")),
            Err(_) => bail!("SUBSCRIBE to the event channel timed out"),
        }
        let task = tokio::spawn(async move {
            loop {
                match conn.read_push().await {
                    Ok((kind, payload)) if kind == b"message" => {
                        let at = Instant::now();
                        match serde_json::from_slice::<Seen>(&payload) {
                            Ok(seen) => record(&shared, &seen, at),
                            Err(_) => shared.lock().undecodable += 1,
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!(
                            "error: the event subscription ended ({e:#}); results after this are incomplete"
                        );
                        return;
                    }
                }
            }
        });
        Ok(Subscriber { task })
    }
}

/// What the subscriber reads of an event, borrowed from the payload. (The full
/// [`auction::wire::Event`] decoder buffers every field to pick the tagged variant; on the
/// same 2 cores as the system under test, the load generator should cost as little as it
/// can. The event format itself is checked by the integration tests.)
#[derive(serde::Deserialize)]
struct Seen<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    auction_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    bid_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    closed_at_ms: Option<u64>,
}

fn record(shared: &Shared, event: &Seen, at: Instant) {
    let step = shared.step.load(Ordering::Acquire);
    let at_us = shared.us(at);
    let mut guard = shared.lock();
    let r = &mut *guard;
    if r.step != step {
        return;
    }
    let auction = event.auction_id.as_deref().and_then(parse_auction_id);
    if let (Some(seq), Some((s, a))) = (event.seq, auction)
        && s == step
    {
        let last = r.last_seq.entry(a).or_insert(0);
        if seq > *last + 1 {
            r.seq_gaps += seq - *last - 1;
        }
        *last = (*last).max(seq);
    }
    match event.kind.as_ref() {
        kind @ ("bid_accepted" | "bid_rejected") => {
            let accepted = kind == "bid_accepted";
            let Some(bidder) = r.outcome(event, accepted, auction, at_us) else {
                return;
            };
            drop(guard);
            let slots = shared
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(slot) = slots.get(bidder as usize) {
                slot.answered.fetch_add(1, Ordering::AcqRel);
                slot.notify.notify_one();
            }
        }
        "auction_closed" => {
            if let (Some((s, a)), Some(closed_at_ms)) = (auction, event.closed_at_ms)
                && s == step
            {
                r.closed.entry(a).or_insert((closed_at_ms, now_ms()));
            }
        }
        _ => {}
    }
}

impl StepTally {
    /// Counts a bid's outcome (`accepted` or rejected) arriving at `at_us`; returns the
    /// bidder to notify when it is the bid's first outcome in this step.
    fn outcome(
        &mut self,
        event: &Seen,
        accepted: bool,
        auction: Option<(u32, u32)>,
        at_us: u64,
    ) -> Option<u32> {
        let Some(bid_id) = event.bid_id.as_deref() else {
            self.undecodable += 1;
            return None;
        };
        let Some((s, bidder, n, sent_us)) = parse_bid_id(bid_id) else {
            self.foreign += 1;
            return None;
        };
        if s != self.step {
            self.foreign += 1;
            return None;
        }
        let words = &mut self.answered;
        if words.len() <= bidder as usize {
            words.resize(bidder as usize + 1, Vec::new());
        }
        let bits = &mut words[bidder as usize];
        let (w, b) = ((n / 64) as usize, n % 64);
        if bits.len() <= w {
            bits.resize(w + 1, 0);
        }
        if bits[w] & (1 << b) != 0 {
            self.repeats += 1;
            return None;
        }
        bits[w] |= 1 << b;
        self.first_outcomes += 1;
        if accepted {
            self.accepted += 1;
            if let Some((_, a)) = auction {
                self.accepted_bids.push((a, bidder, n));
            }
        } else {
            let reason = event.reason.as_deref().unwrap_or("(none)");
            match self.rejected.get_mut(reason) {
                Some(count) => *count += 1,
                None => {
                    self.rejected.insert(reason.to_owned(), 1);
                }
            }
        }
        self.timing(accepted, at_us, sent_us);
        Some(bidder)
    }

    /// Counts a first outcome in the window and the second it arrived in, and its latency
    /// if its bid was sent in the window.
    fn timing(&mut self, accepted: bool, at_us: u64, sent_us: u64) {
        let latency = at_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32;
        let in_window = (self.window_start_us..self.window_end_us).contains(&at_us);
        let sent_in_window = (self.window_start_us..self.window_end_us).contains(&sent_us);
        if in_window {
            self.outcomes_in_window += 1;
            if accepted {
                self.accepted_in_window += 1;
            }
        }
        if sent_in_window {
            self.lat_outcome_us.push(latency);
            if accepted {
                self.lat_accepted_us.push(latency);
            }
        }
        if at_us >= self.load_start_us {
            let sec = ((at_us - self.load_start_us) / 1_000_000) as usize;
            if sec < 3600 {
                if self.per_second.len() <= sec {
                    self.per_second.resize(sec + 1, (0, 0));
                }
                self.per_second[sec].1 += 1;
                if accepted {
                    self.per_second[sec].0 += 1;
                }
            }
        }
    }
}
