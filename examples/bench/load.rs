//! The load generator: the simulated bidders, each a tokio task with its own connection
//! to the master, publishing bids on the command channel open-loop at its share of the
//! offered rate or closed-loop flat out; and [`RespConn`], the raw RESP connection they
//! (and the event subscriber) speak.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use auction::keyspace::AuctionId;
use auction::link::sentinel::Master;
use auction::runtime::config::DEFAULT_COMMAND_CHANNEL;
use auction::wire::Bid;
use futures_util::StreamExt;

use crate::STARTING_PRICE;
use crate::recording::{BidderSlot, Shared, bid_id};

/// Longest a closed-loop bidder waits for an outcome before moving on.
const BID_TIMEOUT: Duration = Duration::from_secs(2);
/// An open-loop bidder further behind its schedule than this skips ahead (counted).
const MAX_LAG: Duration = Duration::from_secs(1);
/// Concurrent bidder connections being opened.
const CONNECT_CONCURRENCY: usize = 32;

/// A connection to the master speaking RESP directly, for the simulated bidders (one
/// `PUBLISH` at a time, as `redis-benchmark`'s clients do) and the event subscriber. (A
/// redis-rs multiplexed connection per bidder adds a driver task, a channel hop and
/// allocations per command; with 1,000 bidders that load generator used as much CPU as the
/// Redis master, on the same 2 cores as the system under test.)
pub(crate) struct RespConn {
    generation: u64,
    io: tokio::io::BufReader<tokio::net::TcpStream>,
    out: Vec<u8>,
    line: Vec<u8>,
    /// `PUBLISH` replies not read yet. A bidder reads each reply just before its next
    /// `PUBLISH`, by when it has long arrived (the bid's outcome came after it), so a bid
    /// costs one wake-up of the bidder's task instead of two.
    unread_replies: u32,
}

impl RespConn {
    pub(crate) async fn connect(master: &Master) -> anyhow::Result<RespConn> {
        let link = master.link(Duration::from_secs(10)).await?;
        let addr = (link.addr.host.as_str(), link.addr.port);
        let stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .context("connection to the master timed out")?
                .context("connection to the master")?;
        stream.set_nodelay(true)?;
        Ok(RespConn {
            generation: link.generation,
            io: tokio::io::BufReader::new(stream),
            out: Vec::with_capacity(512),
            line: Vec::with_capacity(64),
            unread_replies: 0,
        })
    }

    /// After a failed command: tells `master` this link failed, waits 100 ms and connects
    /// again through Sentinel (bounded; on failure the old connection stays, to fail again).
    pub(crate) async fn reconnect(&mut self, master: &Master) {
        master.invalidate(self.generation);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(c) = RespConn::connect(master).await {
            *self = c;
        }
    }

    pub(crate) async fn write_command(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        use std::io::Write;
        use tokio::io::AsyncWriteExt;
        self.out.clear();
        write!(self.out, "*{}\r\n", args.len())?;
        for arg in args {
            write!(self.out, "${}\r\n", arg.len())?;
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&self.out).await?;
        Ok(())
    }

    /// One reply line, without its CRLF, in `self.line`.
    async fn read_line(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncBufReadExt;
        self.line.clear();
        let n = self.io.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            bail!("the master closed the connection");
        }
        if !self.line.ends_with(b"\r\n") {
            bail!(
                "malformed RESP line {:?}",
                String::from_utf8_lossy(&self.line)
            );
        }
        self.line.truncate(n - 2);
        Ok(())
    }

    /// The number after `prefix` on the next reply line.
    async fn read_number(&mut self, prefix: u8) -> anyhow::Result<i64> {
        self.read_line().await?;
        let line = String::from_utf8_lossy(&self.line);
        line.strip_prefix(prefix as char)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("expected {:?}<number>, got {line:?}", prefix as char))
    }

    async fn read_bulk(&mut self) -> anyhow::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let len = self.read_number(b'$').await?;
        let len = usize::try_from(len).context("a nil bulk string")?;
        let mut bulk = vec![0; len + 2];
        self.io.read_exact(&mut bulk).await?;
        bulk.truncate(len);
        Ok(bulk)
    }

    /// A Pub/Sub push: `(kind, payload)` for `message`; `(kind, channel)` for the
    /// subscribe confirmation (its count is read and dropped).
    pub(crate) async fn read_push(&mut self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let n = self.read_number(b'*').await?;
        if n != 3 {
            bail!("a Pub/Sub push of {n} elements");
        }
        let kind = self.read_bulk().await?;
        let channel = self.read_bulk().await?;
        if kind == b"message" {
            Ok((kind, self.read_bulk().await?))
        } else {
            self.read_line().await?;
            Ok((kind, channel))
        }
    }

    /// `PUBLISH channel payload` without waiting for its reply (read it with
    /// [`RespConn::publish_reply`] before the next one). Bounded by 5 s.
    pub(crate) async fn publish(&mut self, channel: &str, payload: &[u8]) -> anyhow::Result<()> {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.write_command(&[b"PUBLISH", channel.as_bytes(), payload]),
        )
        .await
        .context("PUBLISH timed out")??;
        self.unread_replies += 1;
        Ok(())
    }

    /// The receiver count of an unread `PUBLISH` reply, if any. Bounded by 5 s.
    pub(crate) async fn publish_reply(&mut self) -> anyhow::Result<Option<i64>> {
        if self.unread_replies == 0 {
            return Ok(None);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), self.read_number(b':'))
            .await
            .context("PUBLISH reply timed out")?
            .context("PUBLISH reply")?;
        self.unread_replies -= 1;
        Ok(Some(n))
    }
}

pub(crate) async fn connect_bid_conns(master: &Master, n: usize) -> anyhow::Result<Vec<RespConn>> {
    futures_util::stream::iter(0..n)
        .map(|_| RespConn::connect(master))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[derive(Default)]
pub(crate) struct LoadCounters {
    pub(crate) published: AtomicU64,
    pub(crate) published_in_window: AtomicU64,
    pub(crate) not_sent: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) no_receiver: AtomicU64,
}

pub(crate) struct BidderLoad {
    pub(crate) step: u32,
    pub(crate) bidder: u32,
    pub(crate) bidders: usize,
    pub(crate) rate: u64,
    pub(crate) window: u64,
    pub(crate) load_start: Instant,
    pub(crate) window_start: Instant,
    pub(crate) window_end: Instant,
    pub(crate) shared: Shared,
    pub(crate) slots: Arc<Vec<BidderSlot>>,
    pub(crate) counters: Arc<LoadCounters>,
    pub(crate) amounts: Arc<Vec<AtomicU64>>,
    pub(crate) next_auction: Arc<AtomicU64>,
    pub(crate) auction_ids: Arc<Vec<AuctionId>>,
    pub(crate) master: Master,
    /// Each bidder's key when the step signs its bids (empty otherwise).
    pub(crate) keys: Arc<Vec<String>>,
}

/// One simulated bidder: open loop on its share of the rate, or closed loop (flat out).
pub(crate) async fn bidder(load: BidderLoad, mut conn: RespConn) {
    let name = format!("bench{}", load.bidder);
    let slot = &load.slots[load.bidder as usize];
    let mut n: u32 = 0;
    let mut given_up: u64 = 0;
    let interval =
        (load.rate > 0).then(|| Duration::from_secs_f64(load.bidders as f64 / load.rate as f64));
    let mut next = load.load_start
        + interval.map_or(Duration::ZERO, |_| {
            Duration::from_secs_f64(load.bidder as f64 / load.rate as f64)
        });
    tokio::time::sleep_until(load.load_start.into()).await;
    // Bounded: the loop ends with the window, and every wait inside is bounded.
    'bids: while Instant::now() < load.window_end {
        if let Some(interval) = interval {
            if next >= load.window_end {
                break;
            }
            tokio::time::sleep_until(next.into()).await;
            let late = Instant::now().saturating_duration_since(next);
            if late > MAX_LAG {
                let missed = (late.as_secs_f64() / interval.as_secs_f64()) as u32;
                load.counters
                    .not_sent
                    .fetch_add(missed as u64, Ordering::Relaxed);
                next += interval * missed;
            }
            next += interval;
        } else {
            loop {
                let notified = slot.notify.notified();
                let answered = slot.answered.load(Ordering::Acquire);
                let outstanding = (n as u64).saturating_sub(answered + given_up);
                if outstanding < load.window {
                    break;
                }
                let limit = (Instant::now() + BID_TIMEOUT).min(load.window_end);
                if tokio::time::timeout_at(limit.into(), notified)
                    .await
                    .is_err()
                {
                    if Instant::now() >= load.window_end {
                        break 'bids;
                    }
                    // No outcome in time: stop waiting for the outstanding bids.
                    given_up = (n as u64).saturating_sub(slot.answered.load(Ordering::Acquire));
                }
            }
        }
        // The previous bid's reply first, and only then the amount: drawn before, a bid
        // could wait out that reply's round trip and reach Redis behind higher amounts
        // drawn after it, and be judged too low for the generator's own delay.
        let result = async {
            let previous = conn.publish_reply().await?;
            let index = (load.next_auction.fetch_add(1, Ordering::Relaxed)
                % load.auction_ids.len() as u64) as usize;
            let amount = STARTING_PRICE + load.amounts[index].fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let mut bid = Bid {
                auction_id: load.auction_ids[index].clone(),
                bid_id: bid_id(load.step, load.bidder, n, load.shared.us(sent)),
                bidder: name.clone(),
                amount,
                max_amount: None,
                traceparent: None,
                sig: None,
            };
            if let Some(key) = load.keys.get(load.bidder as usize) {
                bid.sig = Some(auction::store::bidders::sign(&bid, key));
            }
            conn.publish(DEFAULT_COMMAND_CHANNEL, bid.to_json().as_bytes())
                .await?;
            anyhow::Ok((sent, previous))
        }
        .await;
        match result {
            Ok((sent, previous)) => {
                n += 1;
                load.counters.published.fetch_add(1, Ordering::Relaxed);
                if sent >= load.window_start {
                    load.counters
                        .published_in_window
                        .fetch_add(1, Ordering::Relaxed);
                }
                if previous == Some(0) {
                    load.counters.no_receiver.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                // Not counted as published; reconnect through Sentinel (bounded).
                load.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "bidder PUBLISH failed; reconnecting");
                conn.reconnect(&load.master).await;
            }
        }
    }
    if let Ok(Some(0)) = conn.publish_reply().await {
        load.counters.no_receiver.fetch_add(1, Ordering::Relaxed);
    }
}
