//! The soak scenario (`--scenario soak`): minutes of churn against Redis data nodes with a
//! small `maxmemory` (`noeviction`), to show that memory plateaus. One server, started
//! with a short `RETENTION`; an opener that opens short auctions (2 to 5 s) at a steady
//! rate for the whole load, which the server closes by itself; honest bidders bidding on
//! the open ones (open loop, `--rate` in aggregate over `--bidders`); one flooding bidder
//! sending unique junk bids (amount 1, 119-character `bid_id`s) on open auctions at a
//! bounded `--flood-rate`. Every `--sample-every` it samples every data node's
//! `used_memory`, the master's `DBSIZE` and `errorstat_OOM`, the server's RSS and the
//! counts so far; sampling goes on for `--tail` after the load, while the last closed
//! auctions expire. The report is [`crate::soak_report`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use auction::keyspace::AuctionId;
use auction::link::sentinel::Master;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction::runtime::config::DEFAULT_COMMAND_CHANNEL;
use auction::wire::Bid;
use auction_testkit::info_field;
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use crate::load::{RespConn, connect_bid_conns};
use crate::recording::{Shared, Subscriber, auction_id, bid_id};
use crate::server::{deadline_of, open_request, start_server, stop_server};
use crate::soak_report::{SoakRun, publish};
use crate::stats::{direct, proc_peak_rss_mb, proc_rss_mb};
use crate::step::StepContext;
use crate::{Args, STARTING_PRICE, Topology, finish, now_ms};

/// `--duration` of the soak when not given.
pub(crate) const DEFAULT_DURATION: Duration = Duration::from_secs(180);
/// `--rate` (honest bids/s in aggregate) of the soak when not given.
pub(crate) const DEFAULT_RATE: u64 = 500;
/// The step number in the ids (`s1-a…`, `s1-…`), so that the subscriber records them.
const STEP: u32 = 1;
/// Auction i lasts `AUCTION_MIN_MS` plus up to `AUCTION_SPREAD_MS`.
const AUCTION_MIN_MS: u64 = 2_000;
const AUCTION_SPREAD_MS: u64 = 3_000;
/// An auction this close to its deadline gets no more bids.
const DEADLINE_MARGIN_MS: u64 = 200;
/// The flood sends a batch every tick (rate / 100 bids), then reads the replies.
const FLOOD_TICK: Duration = Duration::from_millis(10);
/// A bid loop further behind its schedule than this skips ahead.
const MAX_LAG: Duration = Duration::from_secs(1);

/// An open auction bids can go to.
struct Live {
    id: AuctionId,
    deadline_ms: u64,
    /// Honest amounts: `STARTING_PRICE` + this counter.
    next_amount: AtomicU64,
}

/// The auctions open now (by the deadline the server answered), shared by the opener and
/// the bidders.
#[derive(Clone, Default)]
struct LiveSet(Arc<Mutex<Vec<Arc<Live>>>>);

impl LiveSet {
    fn push(&self, live: Live) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(live));
    }

    /// Forgets the auctions about to close, then picks the `n`-th (modulo) of the others.
    fn pick(&self, n: u64) -> Option<Arc<Live>> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let cutoff = now_ms() + DEADLINE_MARGIN_MS;
        set.retain(|l| l.deadline_ms > cutoff);
        (!set.is_empty()).then(|| set[(n % set.len() as u64) as usize].clone())
    }

    /// Auctions whose deadline has not passed.
    fn open_now(&self) -> usize {
        let now = now_ms();
        let set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.iter().filter(|l| l.deadline_ms > now).count()
    }
}

/// What the load's tasks count.
#[derive(Default)]
pub(crate) struct SoakCounters {
    pub(crate) opened: AtomicU64,
    pub(crate) open_failed: AtomicU64,
    pub(crate) honest_sent: AtomicU64,
    pub(crate) honest_errors: AtomicU64,
    pub(crate) flood_sent: AtomicU64,
    pub(crate) flood_errors: AtomicU64,
    /// Bids not sent because no auction was open (the first instants).
    pub(crate) no_open_auction: AtomicU64,
    /// Scheduled sends skipped by a loop more than 1 s behind.
    pub(crate) skipped: AtomicU64,
}

/// One sample of the run.
#[derive(Serialize, Clone, Default)]
pub(crate) struct Sample {
    /// Seconds since the load started.
    pub(crate) t_s: f64,
    /// Whether the load was running (false: the tail after it).
    pub(crate) load: bool,
    /// `used_memory` of every data node in MB (index 0 = the master).
    pub(crate) used_memory_mb: Vec<f64>,
    /// `DBSIZE` of the master.
    pub(crate) keys: u64,
    /// `errorstat_OOM` count of the master since the start.
    pub(crate) oom_errors: u64,
    pub(crate) server_rss_mb: f64,
    pub(crate) auctions_opened: u64,
    pub(crate) auctions_closed: u64,
    /// Auctions open now, as the bidders see them.
    pub(crate) auctions_live: usize,
    pub(crate) honest_sent: u64,
    pub(crate) honest_accepted: u64,
    /// `overloaded` and `too_many_pending`.
    pub(crate) honest_shed: u64,
    /// Other rejections (mostly `too_low`: honest bids crossing on their way to Redis).
    pub(crate) honest_rejected_other: u64,
    pub(crate) flood_sent: u64,
}

/// Runs the soak: the topology with `--maxmemory`, the server with `--retention`, the
/// load with sampling, then the report.
pub(crate) async fn run(
    args: &Args,
    target: &std::path::Path,
    server_bin: &std::path::Path,
    clk_tck: f64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| target.join("bench").join("soak.json"));
    anyhow::ensure!(args.open_rate > 0.0, "--open-rate must be positive");
    anyhow::ensure!(args.bidders > 0, "--bidders must be positive");
    let conf = vec![
        format!("maxmemory {}", args.maxmemory),
        "maxmemory-policy noeviction".to_owned(),
    ];
    let mut topology = Topology::start(args.master_nice, conf).await?;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut topology.admin_conn)
        .await
        .context("FLUSHALL")?;
    let shared = Shared::new();
    let subscriber = Subscriber::start(&topology.master, shared.clone()).await?;
    let ctx = StepContext {
        args,
        stack: &topology.stack,
        master: &topology.master,
        server_bin,
        shared: &shared,
        clk_tck,
    };
    shared.begin_step(STEP, args.bidders);
    let retention = format!("{}ms", args.retention.as_millis());
    let env = [("RETENTION", retention)];
    let (server, grpc_port) = start_server(
        &ctx,
        &mut topology.admin_conn,
        STEP,
        args.wait_replicas,
        &env,
    )
    .await?;
    let pid = server.pid();
    let admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
    let tail = args
        .tail
        .unwrap_or(args.retention + Duration::from_secs(10));
    eprintln!(
        "soak: {:?} of load ({} auctions/s of 2-5 s, {} honest bids/s over {} bidders, a flood of {}/s), then {tail:?} of tail; maxmemory {}, RETENTION {:?}",
        args.duration,
        args.open_rate,
        args.rate,
        args.bidders,
        args.flood_rate,
        args.maxmemory,
        args.retention
    );
    let (samples, counters) = run_load(&ctx, admin, pid, tail).await?;
    let tally = shared.end_step();
    let peak_rss_mb = proc_peak_rss_mb(pid);
    let (exit_code, server_counters) = stop_server(server).await;
    drop(subscriber);
    let run = SoakRun {
        args,
        topology: &topology,
        samples: &samples,
        counters: &counters,
        tally: &tally,
        server_peak_rss_mb: peak_rss_mb,
        server_exit_code: exit_code,
        server_counters,
        started,
    };
    publish(&run, &json_path)?;
    finish(args, target, &topology.stack, started)
}

/// Starts the opener, the honest bidders and the flood, samples until the tail ends, and
/// waits for the tasks (bounded). Returns the samples and the final counts.
async fn run_load(
    ctx: &StepContext<'_>,
    admin: AuctionAdminClient<tonic::transport::Channel>,
    pid: u32,
    tail: Duration,
) -> anyhow::Result<(Vec<Sample>, Arc<SoakCounters>)> {
    let args = ctx.args;
    let mut conns = connect_bid_conns(ctx.master, args.bidders + 1).await?;
    let flood_conn = conns.pop().context("no connection for the flood")?;
    let live = LiveSet::default();
    let counters = Arc::new(SoakCounters::default());
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + args.duration;
    ctx.shared.set_window(start, start, end);
    let load = Load {
        start,
        end,
        live: live.clone(),
        counters: counters.clone(),
        master: ctx.master.clone(),
        shared: ctx.shared.clone(),
        pick: Arc::new(AtomicU64::new(0)),
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(opener(admin, load.clone(), args.open_rate));
    let interval = Duration::from_secs_f64(args.bidders as f64 / args.rate.max(1) as f64);
    for (b, conn) in conns.into_iter().enumerate() {
        let offset = interval.mul_f64(b as f64 / args.bidders as f64);
        tasks.spawn(honest(load.clone(), b as u32, offset, interval, conn));
    }
    tasks.spawn(flood(load.clone(), args.flood_rate, flood_conn));
    let samples = sample_until(ctx, &load, pid, end + tail).await;
    let bound = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(_)) = tokio::time::timeout_at(bound.into(), tasks.join_next()).await {}
    tasks.abort_all();
    Ok((samples, counters))
}

/// What every task of the load shares.
#[derive(Clone)]
struct Load {
    start: Instant,
    end: Instant,
    live: LiveSet,
    counters: Arc<SoakCounters>,
    master: Master,
    shared: Shared,
    /// Round-robin over the open auctions, shared by the honest bidders.
    pick: Arc<AtomicU64>,
}

/// The time of the next send after the one due at `next`: `interval` later, or further
/// when this loop is more than [`MAX_LAG`] behind (the sends skipped are counted).
fn next_send(next: Instant, interval: Duration, counters: &SoakCounters) -> Instant {
    let late = Instant::now().saturating_duration_since(next);
    if late > MAX_LAG {
        let missed = (late.as_secs_f64() / interval.as_secs_f64()) as u32;
        counters.skipped.fetch_add(missed as u64, Ordering::Relaxed);
        return next + interval * (missed + 1);
    }
    next + interval
}

/// Opens auctions at `rate` per second from the load's start to its end, auction i
/// lasting 2 to 5 s; each one opened joins the live set.
async fn opener(mut admin: AuctionAdminClient<tonic::transport::Channel>, load: Load, rate: f64) {
    let total = (load.end - load.start).as_secs_f64() * rate;
    // Bounded: at most `total` auctions, each call bounded by 2 s.
    for i in 0..total.ceil() as u64 {
        let due = load.start + Duration::from_secs_f64(i as f64 / rate);
        if due >= load.end || Instant::now() >= load.end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let ms = AUCTION_MIN_MS + i.wrapping_mul(7919) % (AUCTION_SPREAD_MS + 1);
        let req = open_request(STEP, i as usize, ms);
        let opened = tokio::time::timeout(Duration::from_secs(2), admin.open_auction(req)).await;
        let deadline = match opened {
            Ok(Ok(resp)) => deadline_of(resp.into_inner()),
            _ => None,
        };
        let id = AuctionId::parse(&auction_id(STEP, i as usize));
        match (deadline, id) {
            (Some(deadline_ms), Ok(id)) => {
                load.live.push(Live {
                    id,
                    deadline_ms,
                    next_amount: AtomicU64::new(0),
                });
                load.counters.opened.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                load.counters.open_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One honest bidder: a bid every `interval` (from `offset` after the start) on the next
/// open auction, at that auction's next amount.
async fn honest(load: Load, bidder: u32, offset: Duration, interval: Duration, mut conn: RespConn) {
    let name = format!("soak{bidder}");
    let mut next = load.start + offset;
    let mut n: u32 = 0;
    // Bounded: `next` moves on by at least `interval` every turn, up to the end.
    while next < load.end {
        tokio::time::sleep_until(next.into()).await;
        next = next_send(next, interval, &load.counters);
        let Some(auction) = load.live.pick(load.pick.fetch_add(1, Ordering::Relaxed)) else {
            load.counters
                .no_open_auction
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let sent = async {
            // The previous reply first, then the amount (see crate::load::bidder).
            conn.publish_reply().await?;
            let bid = Bid {
                auction_id: auction.id.clone(),
                bid_id: bid_id(STEP, bidder, n, load.shared.us(Instant::now())),
                bidder: name.clone(),
                amount: STARTING_PRICE + auction.next_amount.fetch_add(1, Ordering::Relaxed),
                max_amount: None,
                traceparent: None,
                sig: None,
            };
            conn.publish(DEFAULT_COMMAND_CHANNEL, bid.to_json().as_bytes())
                .await
        }
        .await;
        match sent {
            Ok(()) => {
                n += 1;
                load.counters.honest_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                load.counters.honest_errors.fetch_add(1, Ordering::Relaxed);
                conn.reconnect(&load.master).await;
            }
        }
    }
    let _ = conn.publish_reply().await;
}

/// The flooding bidder: every [`FLOOD_TICK`], `rate / 100` junk bids (amount 1, a unique
/// 119-character `bid_id`) round-robin over the open auctions, then their replies.
async fn flood(load: Load, rate: u64, mut conn: RespConn) {
    let per_tick = (rate / 100).max(1);
    let padding = "x".repeat(100);
    let mut n: u64 = 0;
    let mut next = load.start;
    // Bounded: `next` moves on by at least a tick every turn, up to the end.
    while next < load.end && rate > 0 {
        tokio::time::sleep_until(next.into()).await;
        next = next_send(next, FLOOD_TICK, &load.counters);
        let batch = async {
            let mut sent = 0u64;
            for _ in 0..per_tick {
                let Some(auction) = load.live.pick(n) else {
                    break;
                };
                let bid = Bid {
                    auction_id: auction.id.clone(),
                    bid_id: format!("flood-{n:012}-{padding}"),
                    bidder: "flood".to_owned(),
                    amount: 1,
                    max_amount: None,
                    traceparent: None,
                    sig: None,
                };
                conn.publish(DEFAULT_COMMAND_CHANNEL, bid.to_json().as_bytes())
                    .await?;
                n += 1;
                sent += 1;
            }
            for _ in 0..sent {
                conn.publish_reply().await?;
            }
            anyhow::Ok(sent)
        }
        .await;
        match batch {
            Ok(sent) => {
                load.counters.flood_sent.fetch_add(sent, Ordering::Relaxed);
            }
            Err(_) => {
                load.counters.flood_errors.fetch_add(1, Ordering::Relaxed);
                conn.reconnect(&load.master).await;
            }
        }
    }
}

/// Samples every `--sample-every` from the load's start until `until`.
async fn sample_until(ctx: &StepContext<'_>, load: &Load, pid: u32, until: Instant) -> Vec<Sample> {
    let mut nodes: Vec<Option<MultiplexedConnection>> = Vec::new();
    for port in ctx.stack.redis_ports() {
        nodes.push(direct(port).await.ok());
    }
    let every = ctx.args.sample_every.max(Duration::from_millis(100));
    let count = ((until - load.start).as_secs_f64() / every.as_secs_f64()).ceil() as u32 + 1;
    let mut samples = Vec::with_capacity(count as usize);
    for k in 0..count {
        let at = load.start + every * k;
        if at > until {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let s = sample(&mut nodes, load, pid).await;
        if k % 10 == 0 {
            eprintln!(
                "[{:>5.0}s] used_memory {:.1} MB, keys {}, OOM {}, server RSS {:.1} MB, auctions {} opened / {} closed, honest accepted {} shed {}, flood {}",
                s.t_s,
                s.used_memory_mb.first().copied().unwrap_or(0.0),
                s.keys,
                s.oom_errors,
                s.server_rss_mb,
                s.auctions_opened,
                s.auctions_closed,
                s.honest_accepted,
                s.honest_shed,
                s.flood_sent
            );
        }
        samples.push(s);
    }
    samples
}

/// One sample: Redis over `nodes` (index 0 = the master; a node that does not answer
/// reads 0), the server's RSS and the counts so far.
async fn sample(nodes: &mut [Option<MultiplexedConnection>], load: &Load, pid: u32) -> Sample {
    let t_s = Instant::now()
        .saturating_duration_since(load.start)
        .as_secs_f64();
    let mut s = Sample {
        t_s,
        load: Instant::now() <= load.end,
        ..Sample::default()
    };
    for (i, node) in nodes.iter_mut().enumerate() {
        let Some(conn) = node else {
            s.used_memory_mb.push(0.0);
            continue;
        };
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .arg("errorstats")
            .query_async(conn)
            .await
            .unwrap_or_default();
        let used = info_field(&info, "used_memory").and_then(|v| v.parse::<f64>().ok());
        s.used_memory_mb.push(used.unwrap_or(0.0) / 1_048_576.0);
        if i == 0 {
            // errorstat_OOM:count=N
            s.oom_errors = info_field(&info, "errorstat_OOM")
                .and_then(|v| v.strip_prefix("count="))
                .and_then(|v| v.split(',').next()?.parse().ok())
                .unwrap_or(0);
            s.keys = redis::cmd("DBSIZE")
                .query_async(conn)
                .await
                .unwrap_or_default();
        }
    }
    s.server_rss_mb = proc_rss_mb(pid);
    let c = &load.counters;
    s.auctions_opened = c.opened.load(Ordering::Relaxed);
    s.auctions_live = load.live.open_now();
    s.honest_sent = c.honest_sent.load(Ordering::Relaxed);
    s.flood_sent = c.flood_sent.load(Ordering::Relaxed);
    let tally = load.shared.lock();
    s.auctions_closed = tally.closed.len() as u64;
    s.honest_accepted = tally.accepted;
    for (reason, &count) in &tally.rejected {
        if reason == "overloaded" || reason == "too_many_pending" {
            s.honest_shed += count;
        } else {
            s.honest_rejected_other += count;
        }
    }
    s
}
