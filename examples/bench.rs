//! Throughput and latency benchmark on real processes: a Redis master with 2 replicas and
//! 3 Sentinels ([`DevStack`]), the release `auction-server` as a child process, auctions
//! opened through the gRPC admin API, and M simulated bidders in this process (tokio tasks,
//! each with its own Redis connection to the master found through Sentinel) publishing bids
//! on the command channel, open-loop at a target aggregate rate or closed-loop flat out.
//! One subscriber on the event channel records every outcome.
//!
//! Reports accepted bids/s over the measurement window (warm-up excluded), outcomes/s,
//! publish → `bid_accepted` latency p50 / p99 / p99.9 (one monotonic clock: the send time
//! travels in the `bid_id`), bids lost (no outcome after the drain period), accepted bids
//! missing from the stored history (unconfirmed), server CPU seconds and peak RSS (from
//! /proc), Redis CPU and `INFO commandstats`, the lateness of every auction close, and
//! `redis-benchmark` `EVAL "return 1" 0` (`-c 50`, `-P 1` and `-P 16`) on the same master.
//! Writes a table to stdout and JSON to `target/bench/summary.json` (plus a markdown table
//! in `target/bench/summary.md`). Run it with `bash scripts/bench.sh --help`.
//!
//! Everything binds 127.0.0.1; every loop is bounded in count and time; the stack and the
//! server are killed when this process ends (also on Ctrl-C / SIGTERM).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use auction::keyspace::AuctionId;
use auction::link::sentinel::{Master, Settings};
use auction::proto::v1 as pb;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction::runtime::config::{DEFAULT_COMMAND_CHANNEL, DEFAULT_EVENT_CHANNEL, RedisArgs};
use auction::wire::Bid;
use auction_testkit::{DevStack, DevStackConfig, Process};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// Starting price of every benchmark auction; amounts are this plus a per-auction counter.
const STARTING_PRICE: u64 = 100;
/// Longest a closed-loop bidder waits for an outcome before moving on.
const BID_TIMEOUT: Duration = Duration::from_secs(2);
/// An open-loop bidder further behind its schedule than this skips ahead (counted).
const MAX_LAG: Duration = Duration::from_secs(1);
/// Concurrent OpenAuction calls.
const OPEN_CONCURRENCY: usize = 32;
/// Concurrent bidder connections being opened.
const CONNECT_CONCURRENCY: usize = 32;
/// How long after the last deadline an unclosed auction counts as missing.
const CLOSE_GRACE: Duration = Duration::from_secs(30);
/// Deadline spread of the `auctions` scenario's second 10,000-auction step.
const SPREAD_STEP: Duration = Duration::from_secs(10);

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// One step with the options given (--bidders, --auctions, --rate, --wait-replicas).
    Single,
    /// Offered-rate sweep on one auction (--rates), then flat out: accepted/s and p99 per step.
    Rate,
    /// Flat out with 10, 100 and 1,000 bidders on one auction.
    Bidders,
    /// Flat out with 1, 100 and 10,000 open auctions, all closing at the same deadline (a
    /// burst), then 10,000 again with deadlines spread uniformly over 10 s.
    Auctions,
    /// WAIT_REPLICAS 0 and 1, flat out and at 1,000 bids/s.
    Wait,
    /// All of the above (identical steps run once), and the targets of issue 6.
    All,
}

/// Benchmark of the auction server on a local Redis Sentinel topology.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(about, long_about = None)]
struct Args {
    /// Which steps to run.
    #[arg(long, value_enum, default_value = "single")]
    scenario: Scenario,
    /// Simulated bidders (each a tokio task with its own Redis connection).
    #[arg(long, default_value_t = 100)]
    bidders: usize,
    /// Auctions open during the load; bids go round-robin over them.
    #[arg(long, default_value_t = 1)]
    auctions: usize,
    /// Aggregate offered rate in bids/s, open loop; 0 = flat out (closed loop: each bidder
    /// keeps --window bids outstanding and publishes the next one when an outcome arrives).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Outstanding bids per bidder when flat out.
    #[arg(long, default_value_t = 1)]
    window: u64,
    /// Measurement window.
    #[arg(long, default_value = "8s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    duration: Duration,
    /// Load before the measurement window (not counted).
    #[arg(long, default_value = "2s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    warmup: Duration,
    /// After the load, how long to wait for outstanding outcomes before counting bids lost.
    #[arg(long, default_value = "5s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    drain: Duration,
    /// Passed to the server as WAIT_REPLICAS.
    #[arg(long, default_value_t = 1)]
    wait_replicas: u32,
    /// Offered rates of the sweep (bids/s); it stops after two saturated steps.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,300,1000,3000,10000,20000,40000"
    )]
    rates: Vec<u64>,
    /// Gap between the end of the load and the common deadline of the step's auctions.
    #[arg(long, default_value = "1500ms", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    close_margin: Duration,
    /// Spread the deadlines: auction i of n closes at `common deadline + spread × i / n`
    /// (0 = every auction shares the deadline). The `auctions` scenario's two 10,000-auction
    /// steps ignore it (one at 0, one at 10s).
    #[arg(long, default_value = "0", value_parser = parse_spread)]
    #[serde(with = "secs")]
    deadline_spread: Duration,
    /// `redis-benchmark -n` for `-P 1` (`-P 16` uses 5x as many); 0 skips redis-benchmark.
    #[arg(long, default_value_t = 200_000)]
    rb_requests: u64,
    /// The server binary (default: auction-server next to this example's directory).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Run the server under this command, e.g. "valgrind --tool=callgrind".
    #[arg(long)]
    server_wrapper: Option<String>,
    /// A command run (sh -c) during each measurement window, `{pid}` = the server's pid,
    /// `{master_pid}` = the Redis master's; stopped with SIGINT at the window's end, e.g.
    /// "perf record -e cpu-clock -g -p {pid} -o perf.data".
    #[arg(long)]
    attach: Option<String>,
    /// Nice value given to the Redis master, in the redis-benchmark baseline and in every
    /// step alike (0 = leave it). In production the master has a host or a core of its own;
    /// here it shares two cores with the replicas, the server and the load generator, and
    /// a master waiting for a core stalls every bid in flight. Needs root (CAP_SYS_NICE);
    /// without it the run goes on at nice 0 and says so.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    master_nice: i32,
    /// RUST_LOG of the server.
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Where the JSON summary goes (default: target/bench/summary.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the stack's directory (Redis and server logs) under target/bench/logs.
    #[arg(long)]
    keep_logs: bool,
    /// Hard bound on the whole run; everything is stopped when it expires.
    #[arg(long, default_value = "20m", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    max_time: Duration,
}

/// A duration like `10s` or `500ms`, or `0`.
fn parse_spread(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| format!("{s:?} is not a duration like 10s or 0: {e}"))
}

/// "10 s", "2.5 s", "500 ms".
fn fmt_spread(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// One configuration to measure.
#[derive(Clone, Debug, Serialize, PartialEq)]
struct StepConfig {
    bidders: usize,
    auctions: usize,
    /// 0 = flat out.
    rate: u64,
    window: u64,
    wait_replicas: u32,
    #[serde(with = "secs")]
    warmup: Duration,
    #[serde(with = "secs")]
    duration: Duration,
    /// Auction i of n has its deadline `spread × i / n` after the common one (0 = a burst).
    #[serde(with = "secs")]
    deadline_spread: Duration,
}

impl StepConfig {
    fn label(&self) -> String {
        let rate = if self.rate == 0 {
            "flat out".to_owned()
        } else {
            format!("{}/s", self.rate)
        };
        let spread = if self.deadline_spread.is_zero() {
            String::new()
        } else {
            format!(", deadlines over {}", fmt_spread(self.deadline_spread))
        };
        format!(
            "{rate}, {} bidders, {} auctions, WAIT {}{spread}",
            self.bidders, self.auctions, self.wait_replicas
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let max_time = args.max_time;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::time::timeout(max_time, run(args)) => match r {
                Ok(r) => r,
                Err(_) => Err(anyhow!("the benchmark exceeded --max-time {max_time:?}; stopped")),
            },
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    })
}

fn target_dir() -> anyhow::Result<PathBuf> {
    // target/<profile>/examples/bench → target
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .nth(3)
        .map(PathBuf::from)
        .context("cannot locate the target directory from the executable's path")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = target_dir()?;
    let server_bin = match &args.server_bin {
        Some(p) => p.clone(),
        None => target
            .join(if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            })
            .join("auction-server"),
    };
    anyhow::ensure!(
        server_bin.exists(),
        "{} not found: build it first (`cargo build --release --bins`)",
        server_bin.display()
    );
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the benchmark; use `bash scripts/bench.sh`");
    }
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| target.join("bench").join("summary.json"));
    let clk_tck = clock_ticks();
    let started = Instant::now();

    eprintln!("starting Redis: 1 master, 2 replicas, 3 Sentinels on 127.0.0.1…");
    let stack = DevStack::start(DevStackConfig::default()).await?;
    let master_port = stack.current_master_port().await?;
    let redis_args = RedisArgs::local(&stack.sentinel_addrs()).map_err(anyhow::Error::msg)?;
    let master = Master::start(Settings::from_args(&redis_args));
    let mut admin_conn = master.link(Duration::from_secs(10)).await?.conn;
    // Record Redis's own stalls (fork, AOF, slow commands) of 10 ms and more.
    for port in stack.redis_ports() {
        let mut c = direct(port).await?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("latency-monitor-threshold")
            .arg(10)
            .query_async::<()>(&mut c)
            .await?;
    }
    let master_nice = set_nice(master_pid(&mut admin_conn).await, args.master_nice);
    eprintln!(
        "Redis up: master 127.0.0.1:{master_port}, replicas {:?}, Sentinels {}",
        &stack.redis_ports()[1..],
        stack.sentinels_csv()
    );

    let rb = if args.rb_requests > 0 {
        eprintln!("redis-benchmark EVAL \"return 1\" 0 on the master (-c 50, -P 1 and -P 16)…");
        Some(redis_benchmark(master_port, args.rb_requests).await?)
    } else {
        None
    };
    if let Some(rb) = &rb {
        eprintln!(
            "redis-benchmark: EVAL -P 1 {:.0} req/s, -P 16 {:.0} req/s",
            rb.p1_rps, rb.p16_rps
        );
    }

    let shared = Shared::new();
    let subscriber = Subscriber::start(&master, shared.clone()).await?;

    let plan = plan(&args);
    let mut results: Vec<StepResult> = Vec::new();
    let mut curves: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    let mut step_no = 0u32;
    for group in &plan {
        let mut saturated = 0;
        for cfg in &group.steps {
            if group.name == "rate" && saturated >= 2 {
                break;
            }
            let index = match results.iter().position(|r| &r.config == cfg) {
                Some(i) => {
                    eprintln!(
                        "[{}] {}: same as step {} (reused)",
                        group.name,
                        cfg.label(),
                        i + 1
                    );
                    i
                }
                None => {
                    step_no += 1;
                    eprintln!(
                        "[{:>5.0}s] step {step_no} ({}): {}",
                        started.elapsed().as_secs_f64(),
                        group.name,
                        cfg.label()
                    );
                    let ctx = StepContext {
                        args: &args,
                        stack: &stack,
                        master: &master,
                        server_bin: &server_bin,
                        shared: &shared,
                        clk_tck,
                    };
                    let adjacent = rb.is_some() && cfg.competes_for_ceiling();
                    let before = if adjacent {
                        Some(eval_rps(master_port, 1, args.rb_requests).await?.0)
                    } else {
                        None
                    };
                    let mut r = run_step(&ctx, &mut admin_conn, step_no, cfg).await?;
                    if let Some(before_rps) = before {
                        let after_rps = eval_rps(master_port, 1, args.rb_requests).await?.0;
                        r.eval_p1_adjacent = Some(Adjacent {
                            before_rps,
                            after_rps,
                            mean_rps: (before_rps + after_rps) / 2.0,
                        });
                    }
                    eprintln!("          {}", r.one_line());
                    results.push(r);
                    results.len() - 1
                }
            };
            if results[index].saturated() {
                saturated += 1;
            }
            curves.entry(group.name).or_default().push(index);
        }
    }
    drop(subscriber);

    let targets = evaluate_targets(&results, rb.as_ref());
    let table = markdown_table(&results, rb.as_ref(), master_nice);
    println!();
    println!("{table}");
    if !targets.is_empty() {
        println!("{}", targets_table(&targets));
    }
    let summary = json!({
        "generated_at_unix_ms": now_ms(),
        "machine": machine(),
        "args": &args,
        "topology": {
            "master_port": master_port,
            "master_nice": master_nice,
            "replicas": stack.redis_ports().len() - 1,
            "sentinels": stack.sentinel_addrs().len(),
        },
        "redis_benchmark": rb,
        "steps": results,
        "curves": curves,
        "targets": targets.iter().filter(|t| !t.informational).collect::<Vec<_>>(),
        "informational": targets.iter().filter(|t| t.informational).collect::<Vec<_>>(),
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&summary)?)?;
    let md = json_path.with_extension("md");
    std::fs::write(&md, format!("{table}\n{}", targets_table(&targets)))?;
    println!("JSON: {}   markdown: {}", json_path.display(), md.display());
    if args.keep_logs {
        let keep = target.join("bench").join("logs");
        std::fs::create_dir_all(&keep)?;
        copy_logs(stack.dir(), &keep, "")?;
        println!("logs: {}", keep.display());
    }
    eprintln!(
        "done in {:.0}s; stopping Redis and cleaning up",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Copies every `*.log` under `from` (two levels) into `to`, prefixing subdirectory names.
fn copy_logs(from: &std::path::Path, to: &std::path::Path, prefix: &str) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && prefix.is_empty() {
            copy_logs(&path, to, &format!("{name}-"))?;
        } else if path.extension().is_some_and(|e| e == "log") {
            std::fs::copy(&path, to.join(format!("{prefix}{name}")))?;
        }
    }
    Ok(())
}

struct Group {
    name: &'static str,
    steps: Vec<StepConfig>,
}

fn plan(args: &Args) -> Vec<Group> {
    let base = StepConfig {
        bidders: args.bidders,
        auctions: args.auctions,
        rate: args.rate,
        window: args.window,
        wait_replicas: args.wait_replicas,
        warmup: args.warmup,
        duration: args.duration,
        deadline_spread: args.deadline_spread,
    };
    // Each step as (offered rate (0 = flat out), bidders, auctions, WAIT_REPLICAS).
    let steps = |points: Vec<(u64, usize, usize, u32)>| -> Vec<StepConfig> {
        points
            .into_iter()
            .map(|(rate, bidders, auctions, wait_replicas)| StepConfig {
                rate,
                bidders,
                auctions,
                wait_replicas,
                ..base.clone()
            })
            .collect()
    };
    let (b, w) = (args.bidders, args.wait_replicas);
    let rate = Group {
        name: "rate",
        steps: steps(
            args.rates
                .iter()
                .map(|&r| (r, b, 1, w))
                .chain([(0, b, 1, w)])
                .collect(),
        ),
    };
    let bidders = Group {
        name: "bidders",
        steps: steps([10, 100, 1000].map(|n| (0, n, 1, w)).to_vec()),
    };
    // 10,000 open auctions twice: every deadline in the same millisecond (a burst), then
    // the deadlines spread over SPREAD_STEP (1,000 closes due per second).
    let mut auction_steps = steps([1, 100, 10_000, 10_000].map(|n| (0, b, n, w)).to_vec());
    auction_steps[2].deadline_spread = Duration::ZERO;
    auction_steps[3].deadline_spread = SPREAD_STEP;
    let auctions = Group {
        name: "auctions",
        steps: auction_steps,
    };
    let wait = Group {
        name: "wait_replicas",
        steps: steps(vec![
            (0, b, 1, 0),
            (0, b, 1, 1),
            (1000, b, 1, 0),
            (1000, b, 1, 1),
        ]),
    };
    match args.scenario {
        Scenario::Single => vec![Group {
            name: "single",
            steps: vec![base],
        }],
        Scenario::Rate => vec![rate],
        Scenario::Bidders => vec![bidders],
        Scenario::Auctions => vec![auctions],
        Scenario::Wait => vec![wait],
        Scenario::All => vec![rate, bidders, auctions, wait],
    }
}

// ---------------------------------------------------------------------------------------
// Recording outcomes

/// Per-bidder state shared between a bidder task and the subscriber.
struct BidderSlot {
    answered: AtomicU64,
    notify: Notify,
}

/// What the subscriber records for the current step.
#[derive(Default)]
struct Recorder {
    step: u32,
    /// Microseconds since [`Shared::epoch`].
    load_start_us: u64,
    window_start_us: u64,
    window_end_us: u64,
    /// Bitset of answered bid numbers, per bidder.
    answered: Vec<Vec<u64>>,
    first_outcomes: u64,
    repeats: u64,
    accepted: u64,
    rejected: BTreeMap<String, u64>,
    accepted_in_window: u64,
    outcomes_in_window: u64,
    lat_accepted_us: Vec<u32>,
    lat_outcome_us: Vec<u32>,
    /// Accepted and all outcomes per second since the load started (by arrival).
    per_second: Vec<(u64, u64)>,
    /// (auction index, bidder, bid number) of every accepted bid.
    accepted_bids: Vec<(u32, u32, u32)>,
    /// auction index → (closed_at_ms, local wall ms at arrival).
    closed: HashMap<u32, (u64, u64)>,
    seq_gaps: u64,
    last_seq: HashMap<u32, u64>,
    foreign: u64,
    undecodable: u64,
}

#[derive(Clone)]
struct Shared {
    epoch: Instant,
    step: Arc<AtomicU32>,
    recorder: Arc<Mutex<Recorder>>,
    slots: Arc<Mutex<Arc<Vec<BidderSlot>>>>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            epoch: Instant::now(),
            step: Arc::new(AtomicU32::new(0)),
            recorder: Arc::new(Mutex::new(Recorder::default())),
            slots: Arc::new(Mutex::new(Arc::new(Vec::new()))),
        }
    }

    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bid_id(step: u32, bidder: u32, n: u32, sent_us: u64) -> String {
    format!("s{step}-{bidder}-{n}-{sent_us}")
}

fn parse_bid_id(id: &str) -> Option<(u32, u32, u32, u64)> {
    let mut it = id.strip_prefix('s')?.split('-');
    let step = it.next()?.parse().ok()?;
    let bidder = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let sent = it.next()?.parse().ok()?;
    Some((step, bidder, n, sent))
}

fn auction_id(step: u32, index: usize) -> String {
    format!("s{step}-a{index}")
}

fn parse_auction_id(id: &str) -> Option<(u32, u32)> {
    let (step, index) = id.strip_prefix('s')?.split_once("-a")?;
    Some((step.parse().ok()?, index.parse().ok()?))
}

struct Subscriber {
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
    async fn start(master: &Master, shared: Shared) -> anyhow::Result<Subscriber> {
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

/// What the recorder reads of an event, borrowed from the payload. (The full
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
            let Some(bid_id) = event.bid_id.as_deref() else {
                r.undecodable += 1;
                return;
            };
            let Some((s, bidder, n, sent_us)) = parse_bid_id(bid_id) else {
                r.foreign += 1;
                return;
            };
            if s != step {
                r.foreign += 1;
                return;
            }
            let words = &mut r.answered;
            if words.len() <= bidder as usize {
                words.resize(bidder as usize + 1, Vec::new());
            }
            let bits = &mut words[bidder as usize];
            let (w, b) = ((n / 64) as usize, n % 64);
            if bits.len() <= w {
                bits.resize(w + 1, 0);
            }
            if bits[w] & (1 << b) != 0 {
                r.repeats += 1;
                return;
            }
            bits[w] |= 1 << b;
            r.first_outcomes += 1;
            let accepted = kind == "bid_accepted";
            if accepted {
                r.accepted += 1;
                if let Some((_, a)) = auction {
                    r.accepted_bids.push((a, bidder, n));
                }
            } else {
                let reason = event.reason.as_deref().unwrap_or("(none)");
                match r.rejected.get_mut(reason) {
                    Some(count) => *count += 1,
                    None => {
                        r.rejected.insert(reason.to_owned(), 1);
                    }
                }
            }
            let latency = at_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32;
            let in_window = (r.window_start_us..r.window_end_us).contains(&at_us);
            let sent_in_window = (r.window_start_us..r.window_end_us).contains(&sent_us);
            if in_window {
                r.outcomes_in_window += 1;
                if accepted {
                    r.accepted_in_window += 1;
                }
            }
            if sent_in_window {
                r.lat_outcome_us.push(latency);
                if accepted {
                    r.lat_accepted_us.push(latency);
                }
            }
            if at_us >= r.load_start_us {
                let sec = ((at_us - r.load_start_us) / 1_000_000) as usize;
                if sec < 3600 {
                    if r.per_second.len() <= sec {
                        r.per_second.resize(sec + 1, (0, 0));
                    }
                    r.per_second[sec].1 += 1;
                    if accepted {
                        r.per_second[sec].0 += 1;
                    }
                }
            }
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

// ---------------------------------------------------------------------------------------
// One step

struct StepContext<'a> {
    args: &'a Args,
    stack: &'a DevStack,
    master: &'a Master,
    server_bin: &'a std::path::Path,
    shared: &'a Shared,
    clk_tck: f64,
}

#[derive(Serialize, Default, Clone)]
struct Percentiles {
    n: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn percentiles_ms(samples: &mut [u32]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    Percentiles {
        n: samples.len(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: samples[samples.len() - 1] as f64 / 1000.0,
    }
}

#[derive(Serialize, Clone, Default)]
struct Closing {
    auctions: usize,
    closed_seen: usize,
    /// Not announced within the grace period: (closed in Redis but not announced, still open).
    missing_announced_closed: usize,
    missing_still_open: usize,
    /// `closed_at_ms` − deadline (both Redis clock), ms.
    lateness_ms: Percentiles,
    /// Arrival of `auction_closed` here (wall clock, same host) − deadline, ms.
    announce_lateness_ms: Percentiles,
    /// Deadlines spread (last − first), ms.
    deadline_spread_ms: u64,
    /// Server CPU from the end of the drain until every close was seen.
    server_cpu_s: f64,
    /// `INFO commandstats` of the master over the same period.
    commandstats: BTreeMap<String, BTreeMap<String, f64>>,
}

#[derive(Serialize, Clone, Default)]
struct ServerStats {
    pid: u32,
    cpu_s_window: f64,
    cpu_s_total: f64,
    /// Mean cores used during the window.
    cores_window: f64,
    peak_rss_mb: f64,
    cpu_us_per_accepted: f64,
    exit_code: Option<i32>,
    /// The server's own counters, from its shutdown log line.
    counters: Option<String>,
}

#[derive(Serialize, Clone, Default)]
struct RedisStats {
    master_cpu_s_window: f64,
    replicas_cpu_s_window: f64,
    /// `INFO commandstats` of the master over the window: calls, usec, usec_per_call.
    commandstats: BTreeMap<String, BTreeMap<String, f64>>,
    master_used_memory_mb: f64,
    /// Per data node over the window (index 0 = master).
    nodes: Vec<NodeWindow>,
}

#[derive(Serialize, Clone)]
struct StepResult {
    step: u32,
    label: String,
    config: StepConfig,
    published: u64,
    published_in_window: u64,
    /// Scheduled sends skipped because the bidder was more than 1 s behind (open loop).
    not_sent: u64,
    publish_errors: u64,
    /// PUBLISH answered 0 receivers (the server was not subscribed).
    no_receiver: u64,
    published_per_s: f64,
    accepted_per_s: f64,
    outcomes_per_s: f64,
    accepted: u64,
    rejected: BTreeMap<String, u64>,
    /// Publish → bid_accepted, bids sent in the window.
    latency_accepted_ms: Percentiles,
    /// Publish → any outcome, bids sent in the window.
    latency_outcome_ms: Percentiles,
    /// Published, no outcome after the drain period.
    lost: u64,
    /// Announced bid_accepted, absent from the auction's stored history at the end.
    unconfirmed: u64,
    repeated_outcomes: u64,
    seq_gaps: u64,
    /// Accepted and all outcomes per second since the load started (warm-up included).
    per_second_accepted: Vec<u64>,
    per_second_outcomes: Vec<u64>,
    open_phase_s: f64,
    opens_per_s: f64,
    drain_s: f64,
    closing: Closing,
    server: ServerStats,
    redis: RedisStats,
    bench_cpu_s_window: f64,
    /// Longest lateness of a 5 ms timer in this process during the window.
    bench_loop_lag_ms: f64,
    /// Round trips measured on a separate connection during the window.
    probe: Probe,
    /// Whole-machine CPU during the window (other = not the server, Redis or this process).
    machine: MachineWindow,
    /// Script calls (EVAL/EVALSHA) per outcome, from commandstats.
    script_calls_per_outcome: f64,
    /// `redis-benchmark` `EVAL -P 1` on the same master just before and just after this
    /// step, for the steps that compete for the ratio target
    /// ([`StepConfig::competes_for_ceiling`]). This machine's speed drifts by ±15 % over
    /// minutes, so the ratio is taken against the baseline measured beside the step, not
    /// minutes earlier.
    eval_p1_adjacent: Option<Adjacent>,
}

impl StepResult {
    /// The `EVAL -P 1` rate this step's ratio divides by: the mean of its neighbouring runs
    /// where they were measured, else the run's start (`run_start`).
    fn eval_baseline(&self, run_start: f64) -> f64 {
        self.eval_p1_adjacent
            .as_ref()
            .map_or(run_start, |a| a.mean_rps)
    }
}

#[derive(Serialize, Clone)]
struct Adjacent {
    before_rps: f64,
    after_rps: f64,
    mean_rps: f64,
}

impl StepConfig {
    /// Whether the step can compete for the throughput and ratio targets' ceiling: one
    /// auction, `WAIT 1`, flat out or offered at least 10,000 bids/s. These steps get their
    /// own `EVAL -P 1` baseline just before and just after them.
    fn competes_for_ceiling(&self) -> bool {
        self.auctions == 1 && self.wait_replicas == 1 && (self.rate == 0 || self.rate >= 10_000)
    }
}

#[derive(Serialize, Clone, Default)]
struct MachineWindow {
    busy_cores: f64,
    other_cores: f64,
    loadavg_1m: f64,
}

#[derive(Serialize, Clone, Default)]
struct Probe {
    /// PING on the master.
    ping_ms: Percentiles,
    /// `WAIT n 1000` right after a `SET` on the master (n = max(WAIT_REPLICAS, 1)).
    wait_ms: Percentiles,
}

#[derive(Serialize, Clone, Default)]
struct NodeWindow {
    port: u16,
    cpu_s: f64,
    aof_delayed_fsync: f64,
    forks: f64,
    aof_rewrites: f64,
    /// `LATENCY LATEST` (threshold 10 ms): event, latest ms, max ms.
    latency_events: Vec<(String, u64, u64)>,
}

impl StepResult {
    fn saturated(&self) -> bool {
        self.config.rate > 0
            && (self.outcomes_per_s < 0.9 * self.config.rate as f64
                || self.lost > 0
                || self.latency_outcome_ms.p99 > 1000.0)
    }

    fn one_line(&self) -> String {
        format!(
            "accepted {:.0}/s, outcomes {:.0}/s (published {:.0}/s), p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, lost {}, unconfirmed {}, server CPU {:.2} s ({:.2} cores), peak RSS {:.1} MB, closes {}/{} max late {:.0} ms; probe PING p50 {:.2} ms, WAIT p50 {:.2} / p99 {:.2} ms; machine busy {:.2} cores, other processes {:.2} cores",
            self.accepted_per_s,
            self.outcomes_per_s,
            self.published_per_s,
            self.latency_accepted_ms.p50,
            self.latency_accepted_ms.p99,
            self.latency_accepted_ms.p999,
            self.lost,
            self.unconfirmed,
            self.server.cpu_s_window,
            self.server.cores_window,
            self.server.peak_rss_mb,
            self.closing.closed_seen,
            self.closing.auctions,
            self.closing.lateness_ms.max,
            self.probe.ping_ms.p50,
            self.probe.wait_ms.p50,
            self.probe.wait_ms.p99,
            self.machine.busy_cores,
            self.machine.other_cores,
        )
    }
}

async fn run_step(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    step: u32,
    cfg: &StepConfig,
) -> anyhow::Result<StepResult> {
    let shared = ctx.shared;
    // A clean keyspace per step, so each step's Redis costs are its own.
    redis::cmd("FLUSHALL")
        .query_async::<()>(admin_conn)
        .await
        .context("FLUSHALL")?;
    let slots: Arc<Vec<BidderSlot>> = Arc::new(
        (0..cfg.bidders)
            .map(|_| BidderSlot {
                answered: AtomicU64::new(0),
                notify: Notify::new(),
            })
            .collect(),
    );
    *shared.slots.lock().unwrap_or_else(|p| p.into_inner()) = slots.clone();
    {
        let mut r = shared.lock();
        *r = Recorder {
            step,
            load_start_us: u64::MAX,
            window_start_us: u64::MAX,
            window_end_us: u64::MAX,
            ..Recorder::default()
        };
    }
    shared.step.store(step, Ordering::Release);

    // The server, as a child process.
    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (bin, server_args) = match &ctx.args.server_wrapper {
        Some(w) => {
            let mut parts = w.split_whitespace().map(str::to_owned);
            let bin = parts.next().context("--server-wrapper is empty")?;
            let mut a: Vec<String> = parts.collect();
            a.push(ctx.server_bin.display().to_string());
            (bin, a)
        }
        None => (ctx.server_bin.display().to_string(), Vec::new()),
    };
    let mut server = Process::spawn(
        ctx.stack.dir(),
        &format!("server-step{step}"),
        &bin,
        &server_args,
        &[
            ("REDIS_SENTINELS", ctx.stack.sentinels_csv()),
            ("GRPC_ADDR", format!("127.0.0.1:{grpc_port}")),
            ("WAIT_REPLICAS", cfg.wait_replicas.to_string()),
            ("RUST_LOG", ctx.args.server_log.clone()),
        ],
    );
    let pid = server.pid();
    let ready_limit = if ctx.args.server_wrapper.is_some() {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(30)
    };
    wait_server_ready(admin_conn, &mut server, grpc_port, ready_limit).await?;
    let mut admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;

    // Open the auctions, all with (about) the same deadline after the load, or with
    // auction i's deadline `deadline_spread × i / n` after it. Every deadline falls after the
    // load and the drain, so queued bids are not judged `deadline_passed`; the close is then
    // measured on its own.
    let open_budget = Duration::from_millis(1000 + 2 * cfg.auctions as u64);
    let load_len = cfg.warmup + cfg.duration;
    let after_load = ctx.args.drain + ctx.args.close_margin;
    let planned_deadline_ms =
        now_ms() + (open_budget + load_len + after_load).as_millis() as u64 + 200;
    let open_started = Instant::now();
    let deadlines = open_auctions(
        &mut admin,
        step,
        cfg.auctions,
        planned_deadline_ms,
        cfg.deadline_spread.as_millis() as u64,
    )
    .await?;
    let open_phase = open_started.elapsed();
    let load_end_limit = deadlines
        .iter()
        .min()
        .copied()
        .unwrap_or(planned_deadline_ms)
        .saturating_sub(after_load.as_millis() as u64 + 200);
    let mut duration = cfg.duration;
    let latest_end = now_ms() + load_len.as_millis() as u64;
    if latest_end > load_end_limit {
        let cut = Duration::from_millis(latest_end - load_end_limit);
        duration = duration.saturating_sub(cut).max(Duration::from_secs(1));
        eprintln!(
            "          opening took {:.1}s (> budget): measurement window cut to {duration:?}",
            open_phase.as_secs_f64()
        );
    }

    // Bidders and their connections.
    let conns = connect_bid_conns(ctx.master, cfg.bidders).await?;
    let load_start = Instant::now() + Duration::from_millis(200);
    let window_start = load_start + cfg.warmup;
    let window_end = window_start + duration;
    {
        let mut r = shared.lock();
        r.load_start_us = shared.us(load_start);
        r.window_start_us = shared.us(window_start);
        r.window_end_us = shared.us(window_end);
    }
    let counters = Arc::new(LoadCounters::default());
    let amounts: Arc<Vec<AtomicU64>> =
        Arc::new((0..cfg.auctions).map(|_| AtomicU64::new(0)).collect());
    let next_auction = Arc::new(AtomicU64::new(0));
    let auction_ids: Arc<Vec<AuctionId>> = Arc::new(
        (0..cfg.auctions)
            .map(|i| AuctionId::parse(&auction_id(step, i)))
            .collect::<Result<_, _>>()?,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for (b, conn) in conns.into_iter().enumerate() {
        let load = BidderLoad {
            step,
            bidder: b as u32,
            bidders: cfg.bidders,
            rate: cfg.rate,
            window: cfg.window,
            load_start,
            window_start,
            window_end,
            shared: shared.clone(),
            slots: slots.clone(),
            counters: counters.clone(),
            amounts: amounts.clone(),
            next_auction: next_auction.clone(),
            auction_ids: auction_ids.clone(),
            master: ctx.master.clone(),
        };
        tasks.spawn(bidder(load, conn));
    }

    // Samples at the window's edges.
    tokio::time::sleep_until(window_start.into()).await;
    let mut attach = match &ctx.args.attach {
        Some(cmd) => {
            let cmd = cmd
                .replace("{pid}", &pid.to_string())
                .replace("{master_pid}", &master_pid(admin_conn).await.to_string());
            let log =
                std::fs::File::create(ctx.stack.dir().join(format!("attach-step{step}.log")))?;
            // Its own process group, so that the signal reaches every process it started.
            Some(
                tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {cmd}"))
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .process_group(0)
                    .kill_on_drop(true)
                    .spawn()
                    .context("--attach command")?,
            )
        }
        None => None,
    };
    let probe = tokio::spawn(probe(
        ctx.master.clone(),
        cfg.wait_replicas.max(1),
        window_end,
    ));
    let lag = tokio::spawn(loop_lag(window_end));
    let machine0 = machine_busy_s(ctx.clk_tck);
    let cpu0 = proc_cpu_s(pid, ctx.clk_tck);
    let self0 = proc_cpu_s(std::process::id(), ctx.clk_tck);
    // RESETSTAT first: it also zeroes the fork and fsync counters sampled next.
    let _ = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(admin_conn)
        .await;
    let nodes0 = node_stats(ctx.stack, true).await;
    tokio::time::sleep_until(window_end.into()).await;
    let machine1 = machine_busy_s(ctx.clk_tck);
    let cpu1 = proc_cpu_s(pid, ctx.clk_tck);
    let self1 = proc_cpu_s(std::process::id(), ctx.clk_tck);
    let nodes1 = node_stats(ctx.stack, false).await;
    let commandstats = read_commandstats(admin_conn).await.unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    let probe = probe.await.unwrap_or_default();
    let bench_loop_lag_ms = lag.await.unwrap_or(0.0);
    if let Some(child) = attach.as_mut() {
        let group = child.id().map(|id| format!("-{id}"));
        let signal = |sig: &str| {
            if let Some(g) = &group {
                let _ = std::process::Command::new("kill")
                    .args([sig, "--", g])
                    .status();
            }
        };
        signal("-INT");
        if tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .is_err()
        {
            eprintln!("warning: the --attach command did not stop within 60s; killed");
            signal("-KILL");
        }
    }

    // Load ends with the window; then drain outstanding outcomes.
    let bound = Instant::now() + Duration::from_secs(10);
    while tasks.join_next().await.is_some() {
        if Instant::now() > bound {
            tasks.abort_all();
        }
    }
    let published = counters.published.load(Ordering::Acquire);
    let drain_started = Instant::now();
    while drain_started.elapsed() < ctx.args.drain {
        if shared.lock().first_outcomes >= published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();

    // Closing: every auction's close, by its deadline.
    let _ = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(admin_conn)
        .await;
    let close_cpu0 = proc_cpu_s(pid, ctx.clk_tck);
    let last_deadline = deadlines.iter().max().copied().unwrap_or(0);
    let close_bound = Instant::now()
        + Duration::from_millis(last_deadline.saturating_sub(now_ms()))
        + CLOSE_GRACE;
    loop {
        let closed = shared.lock().closed.len();
        if closed >= cfg.auctions || Instant::now() > close_bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak_rss_mb = proc_peak_rss_mb(pid);
    let cpu_total = proc_cpu_s(pid, ctx.clk_tck);
    let close_commandstats = read_commandstats(admin_conn).await.unwrap_or_default();

    // Snapshot what was recorded; stop recording this step.
    shared.step.store(0, Ordering::Release);
    let mut r = std::mem::take(&mut *shared.lock());
    let mut closing = closing_stats(admin_conn, &r, step, &deadlines).await;
    closing.server_cpu_s = cpu_total - close_cpu0;
    closing.commandstats = close_commandstats;
    let unconfirmed = unconfirmed(admin_conn, &r, step).await?;
    let master_mem = info_field(admin_conn, "memory", "used_memory")
        .await
        .unwrap_or(0.0)
        / 1e6;

    server.terminate();
    let exit_code = server.wait_exit(Duration::from_secs(60)).await.ok();
    let counters_line = server
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("auction server stopped"))
        .map(|l| {
            let l = l.find("counters").map(|i| &l[i..]).unwrap_or(l);
            l.chars().take(2000).collect::<String>()
        });
    drop(server);

    let window_s = duration.as_secs_f64();
    let accepted_per_s = r.accepted_in_window as f64 / window_s;
    let outcomes_per_s = r.outcomes_in_window as f64 / window_s;
    let cpu_window = cpu1 - cpu0;
    let evalsha = commandstats
        .get("evalsha")
        .and_then(|m| m.get("calls"))
        .copied()
        .unwrap_or(0.0)
        + commandstats
            .get("eval")
            .and_then(|m| m.get("calls"))
            .copied()
            .unwrap_or(0.0);
    let published_in_window = counters.published_in_window.load(Ordering::Acquire);
    Ok(StepResult {
        step,
        label: cfg.label(),
        config: cfg.clone(),
        published,
        published_in_window,
        not_sent: counters.not_sent.load(Ordering::Acquire),
        publish_errors: counters.errors.load(Ordering::Acquire),
        no_receiver: counters.no_receiver.load(Ordering::Acquire),
        published_per_s: published_in_window as f64 / window_s,
        accepted_per_s,
        outcomes_per_s,
        accepted: r.accepted,
        rejected: r.rejected.clone(),
        latency_accepted_ms: percentiles_ms(&mut r.lat_accepted_us),
        latency_outcome_ms: percentiles_ms(&mut r.lat_outcome_us),
        lost: published.saturating_sub(r.first_outcomes),
        unconfirmed,
        repeated_outcomes: r.repeats,
        seq_gaps: r.seq_gaps,
        per_second_accepted: r.per_second.iter().map(|p| p.0).collect(),
        per_second_outcomes: r.per_second.iter().map(|p| p.1).collect(),
        open_phase_s: open_phase.as_secs_f64(),
        opens_per_s: cfg.auctions as f64 / open_phase.as_secs_f64().max(1e-3),
        drain_s,
        closing,
        server: ServerStats {
            pid,
            cpu_s_window: cpu_window,
            cpu_s_total: cpu_total,
            cores_window: cpu_window / window_s,
            peak_rss_mb,
            cpu_us_per_accepted: if r.accepted_in_window > 0 {
                cpu_window * 1e6 / r.accepted_in_window as f64
            } else {
                0.0
            },
            exit_code,
            counters: counters_line,
        },
        redis: RedisStats {
            master_cpu_s_window: nodes1.first().map_or(0.0, |n| n.cpu_s)
                - nodes0.first().map_or(0.0, |n| n.cpu_s),
            replicas_cpu_s_window: nodes1.iter().skip(1).map(|n| n.cpu_s).sum::<f64>()
                - nodes0.iter().skip(1).map(|n| n.cpu_s).sum::<f64>(),
            commandstats,
            master_used_memory_mb: master_mem,
            nodes: nodes0
                .iter()
                .zip(&nodes1)
                .map(|(a, b)| NodeWindow {
                    port: b.port,
                    cpu_s: b.cpu_s - a.cpu_s,
                    aof_delayed_fsync: b.aof_delayed_fsync - a.aof_delayed_fsync,
                    forks: b.forks - a.forks,
                    aof_rewrites: b.aof_rewrites - a.aof_rewrites,
                    latency_events: b.latency.clone(),
                })
                .collect(),
        },
        bench_cpu_s_window: self1 - self0,
        bench_loop_lag_ms,
        probe,
        machine: MachineWindow {
            busy_cores: (machine1 - machine0) / window_s,
            other_cores: ((machine1 - machine0)
                - cpu_window
                - (self1 - self0)
                - nodes1.iter().map(|n| n.cpu_s).sum::<f64>()
                + nodes0.iter().map(|n| n.cpu_s).sum::<f64>())
                / window_s,
            loadavg_1m: loadavg,
        },
        script_calls_per_outcome: if r.outcomes_in_window > 0 {
            evalsha / r.outcomes_in_window as f64
        } else {
            0.0
        },
        eval_p1_adjacent: None,
    })
}

async fn wait_server_ready(
    conn: &mut MultiplexedConnection,
    server: &mut Process,
    grpc_port: u16,
    limit: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        anyhow::ensure!(
            server.running(),
            "the server exited during start-up; its log:\n{}",
            server.log()
        );
        let subs: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(DEFAULT_COMMAND_CHANNEL)
            .query_async(conn)
            .await?;
        let subscribed = subs.first().is_some_and(|s| s.1 >= 1);
        let listening = std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_ok();
        if subscribed && listening {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "the server was not ready within {limit:?}; its log:\n{}",
                server.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `n` auctions so that auction i's deadline is about
/// `deadline_ms + spread_ms × i / n`; returns the deadlines (Redis clock, ms) in index order.
async fn open_auctions(
    admin: &mut AuctionAdminClient<tonic::transport::Channel>,
    step: u32,
    n: usize,
    deadline_ms: u64,
    spread_ms: u64,
) -> anyhow::Result<Vec<u64>> {
    let client = admin.clone();
    let results: Vec<anyhow::Result<(usize, u64)>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let mut client = client.clone();
            let deadline_ms = deadline_ms + spread_ms.saturating_mul(i as u64) / n as u64;
            async move {
                let mut attempt = 0;
                loop {
                    let ms = deadline_ms.saturating_sub(now_ms()).max(1000);
                    let req = pb::OpenAuctionRequest {
                        item: format!("bench item {i}"),
                        duration: Some(prost_types::Duration {
                            seconds: (ms / 1000) as i64,
                            nanos: ((ms % 1000) * 1_000_000) as i32,
                        }),
                        starting_price: STARTING_PRICE as i64,
                        min_increment: 1,
                        reserve_price: 0,
                        auction_id: auction_id(step, i),
                    };
                    match client.open_auction(req).await {
                        Ok(resp) => {
                            let deadline = resp
                                .into_inner()
                                .auction
                                .and_then(|a| a.deadline)
                                .map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
                                .context("OpenAuction answered without a deadline")?;
                            return Ok((i, deadline));
                        }
                        Err(s) if s.code() == tonic::Code::Unavailable && attempt < 20 => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(s) => return Err(anyhow!("OpenAuction {}: {s}", auction_id(step, i))),
                    }
                }
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .collect()
        .await;
    let mut deadlines = vec![0; n];
    for r in results {
        let (i, d) = r?;
        deadlines[i] = d;
    }
    Ok(deadlines)
}

/// A dedicated connection to the master (for the probe).
async fn dedicated_connection(master: &Master) -> anyhow::Result<MultiplexedConnection> {
    let link = master.link(Duration::from_secs(10)).await?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    link.client()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("probe connection to the master")
}

/// A connection to the master speaking RESP directly, for the simulated bidders (one
/// `PUBLISH` at a time, as `redis-benchmark`'s clients do) and the event subscriber. (A
/// redis-rs multiplexed connection per bidder adds a driver task, a channel hop and
/// allocations per command; with 1,000 bidders that load generator used as much CPU as the
/// Redis master, on the same 2 cores as the system under test.)
struct RespConn {
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
    async fn connect(master: &Master) -> anyhow::Result<RespConn> {
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

    async fn write_command(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
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
    async fn read_push(&mut self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
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
    async fn publish(&mut self, channel: &str, payload: &[u8]) -> anyhow::Result<()> {
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
    async fn publish_reply(&mut self) -> anyhow::Result<Option<i64>> {
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

async fn connect_bid_conns(master: &Master, n: usize) -> anyhow::Result<Vec<RespConn>> {
    futures_util::stream::iter(0..n)
        .map(|_| RespConn::connect(master))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[derive(Default)]
struct LoadCounters {
    published: AtomicU64,
    published_in_window: AtomicU64,
    not_sent: AtomicU64,
    errors: AtomicU64,
    no_receiver: AtomicU64,
}

struct BidderLoad {
    step: u32,
    bidder: u32,
    bidders: usize,
    rate: u64,
    window: u64,
    load_start: Instant,
    window_start: Instant,
    window_end: Instant,
    shared: Shared,
    slots: Arc<Vec<BidderSlot>>,
    counters: Arc<LoadCounters>,
    amounts: Arc<Vec<AtomicU64>>,
    next_auction: Arc<AtomicU64>,
    auction_ids: Arc<Vec<AuctionId>>,
    master: Master,
}

/// One simulated bidder: open loop on its share of the rate, or closed loop (flat out).
async fn bidder(load: BidderLoad, mut conn: RespConn) {
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
            let bid = Bid {
                auction_id: load.auction_ids[index].clone(),
                bid_id: bid_id(load.step, load.bidder, n, load.shared.us(sent)),
                bidder: name.clone(),
                amount,
                traceparent: None,
            };
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
                load.master.invalidate(conn.generation);
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(c) = RespConn::connect(&load.master).await {
                    conn = c;
                }
            }
        }
    }
    if let Ok(Some(0)) = conn.publish_reply().await {
        load.counters.no_receiver.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// After a step

async fn closing_stats(
    conn: &mut MultiplexedConnection,
    r: &Recorder,
    step: u32,
    deadlines: &[u64],
) -> Closing {
    let mut late: Vec<u32> = Vec::new();
    let mut announce: Vec<u32> = Vec::new();
    let (mut closed_unannounced, mut still_open) = (0, 0);
    for (i, &deadline) in deadlines.iter().enumerate() {
        match r.closed.get(&(i as u32)) {
            Some(&(closed_at, seen_at)) => {
                late.push((closed_at.saturating_sub(deadline) * 1000) as u32);
                announce.push((seen_at.saturating_sub(deadline) * 1000) as u32);
            }
            None => {
                let Ok(id) = AuctionId::parse(&auction_id(step, i)) else {
                    continue;
                };
                let state: Option<String> = redis::cmd("HGET")
                    .arg(id.state_key())
                    .arg("state")
                    .query_async(conn)
                    .await
                    .unwrap_or(None);
                if state.as_deref() == Some("closed") {
                    closed_unannounced += 1;
                } else {
                    still_open += 1;
                }
            }
        }
    }
    Closing {
        auctions: deadlines.len(),
        closed_seen: r.closed.len(),
        missing_announced_closed: closed_unannounced,
        missing_still_open: still_open,
        lateness_ms: percentiles_ms(&mut late),
        announce_lateness_ms: percentiles_ms(&mut announce),
        deadline_spread_ms: deadlines.iter().max().unwrap_or(&0)
            - deadlines.iter().min().unwrap_or(&0),
        ..Closing::default()
    }
}

/// Announced `bid_accepted` events whose bid is missing from the stored history.
async fn unconfirmed(
    conn: &mut MultiplexedConnection,
    r: &Recorder,
    step: u32,
) -> anyhow::Result<u64> {
    let mut by_auction: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
    for &(a, b, n) in &r.accepted_bids {
        by_auction.entry(a).or_default().push((b, n));
    }
    let mut missing = 0u64;
    for (a, announced) in by_auction {
        let id = AuctionId::parse(&auction_id(step, a as usize))?;
        let mut stored: HashSet<(u32, u32)> = HashSet::with_capacity(announced.len());
        let mut after = "-".to_owned();
        // Bounded: at most as many pages as the stream can hold at 10,000 per page.
        for _ in 0..10_000 {
            let page = auction::store::ledger::history(conn, &id, &after, 10_000).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            for (_, e) in &page {
                if let Some((_, b, n, _)) = parse_bid_id(&e.bid_id) {
                    stored.insert((b, n));
                }
            }
            if page.len() < 10_000 {
                break;
            }
        }
        missing += announced.iter().filter(|k| !stored.contains(k)).count() as u64;
    }
    Ok(missing)
}

// ---------------------------------------------------------------------------------------
// Process and Redis statistics

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, seconds (0 when unreadable).
fn proc_cpu_s(pid: u32, clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime is field 14, stime 15 (1-based); here field 3 is index 0.
    (tick(11) + tick(12)) / clk_tck
}

/// VmHWM of `pid` in MB (0 when unreadable).
fn proc_peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn direct(port: u16) -> anyhow::Result<MultiplexedConnection> {
    use redis::IntoConnectionInfo as _;
    let client = redis::Client::open(
        redis::ConnectionAddr::Tcp("127.0.0.1".into(), port)
            .into_connection_info()?
            .set_redis_settings(redis::RedisConnectionInfo::default().set_skip_set_lib_name()),
    )?;
    Ok(client.get_multiplexed_async_connection().await?)
}

struct NodeSample {
    port: u16,
    cpu_s: f64,
    aof_delayed_fsync: f64,
    forks: f64,
    aof_rewrites: f64,
    latency: Vec<(String, u64, u64)>,
}

/// CPU and persistence counters of every data node (index 0 = the initial master); at the
/// window's start (`reset`) the latency monitor is reset, at its end it is read.
async fn node_stats(stack: &DevStack, reset: bool) -> Vec<NodeSample> {
    let mut out = Vec::new();
    for port in stack.redis_ports() {
        let mut sample = NodeSample {
            port,
            cpu_s: 0.0,
            aof_delayed_fsync: 0.0,
            forks: 0.0,
            aof_rewrites: 0.0,
            latency: Vec::new(),
        };
        if let Ok(mut c) = direct(port).await {
            let info: String = redis::cmd("INFO")
                .arg("everything")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            sample.cpu_s = field("used_cpu_user") + field("used_cpu_sys");
            sample.aof_delayed_fsync = field("aof_delayed_fsync");
            sample.forks = field("total_forks");
            sample.aof_rewrites = field("aof_rewrites");
            if reset {
                let _ = redis::cmd("LATENCY")
                    .arg("RESET")
                    .query_async::<i64>(&mut c)
                    .await;
            } else {
                let latest: Vec<(String, u64, u64, u64)> = redis::cmd("LATENCY")
                    .arg("LATEST")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                sample.latency = latest
                    .into_iter()
                    .map(|(event, _, last, max)| (event, last, max))
                    .collect();
            }
        }
        out.push(sample);
    }
    out
}

/// Gives process `pid` the nice value `nice` (unless 0) and returns the value it has now,
/// read back from /proc (None if unreadable). A refusal (not root) is a warning, not an error.
fn set_nice(pid: u64, nice: i32) -> Option<i32> {
    if pid == 0 {
        // `renice -p 0` would renice the benchmark itself.
        eprintln!("warning: INFO did not give the Redis master's pid; it stays at nice 0");
        return None;
    }
    if nice != 0 {
        let result = std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !matches!(result, Ok(s) if s.success()) {
            eprintln!(
                "warning: could not renice the Redis master (pid {pid}) to {nice}: it needs root or \
                 CAP_SYS_NICE. Going on at nice 0; expect lower and noisier figures (README, Benchmarks)."
            );
        }
    }
    // Field 19 of /proc/PID/stat, counted after the parenthesised command name.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(16)?.parse().ok()
}

async fn master_pid(conn: &mut MultiplexedConnection) -> u64 {
    info_field(conn, "server", "process_id")
        .await
        .map_or(0, |p| p as u64)
}

/// Busy time of the whole machine (all CPUs), seconds, from /proc/stat.
fn machine_busy_s(clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle) / clk_tck
}

/// PING and SET + WAIT round trips on a separate connection, every 10 ms until `end`.
async fn probe(master: Master, replicas: u32, end: Instant) -> Probe {
    let Ok(mut conn) = dedicated_connection(&master).await else {
        return Probe::default();
    };
    let (mut ping, mut wait) = (Vec::new(), Vec::new());
    // Bounded by `end` and by the number of 10 ms ticks in a window.
    for i in 0..1_000_000u64 {
        if Instant::now() >= end {
            break;
        }
        let t = Instant::now();
        if redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
        {
            ping.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        let _ = redis::cmd("SET")
            .arg("bench:probe")
            .arg(i)
            .query_async::<()>(&mut conn)
            .await;
        let t = Instant::now();
        if redis::cmd("WAIT")
            .arg(replicas)
            .arg(1000)
            .query_async::<i64>(&mut conn)
            .await
            .is_ok()
        {
            wait.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Probe {
        ping_ms: percentiles_ms(&mut ping),
        wait_ms: percentiles_ms(&mut wait),
    }
}

/// Largest lateness of a 5 ms sleep in this process until `end`, ms.
async fn loop_lag(end: Instant) -> f64 {
    let mut worst = Duration::ZERO;
    while Instant::now() < end {
        let due = Instant::now() + Duration::from_millis(5);
        tokio::time::sleep_until(due.into()).await;
        worst = worst.max(Instant::now().saturating_duration_since(due));
    }
    worst.as_secs_f64() * 1000.0
}

async fn info_field(conn: &mut MultiplexedConnection, section: &str, field: &str) -> Option<f64> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

async fn read_commandstats(
    conn: &mut MultiplexedConnection,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut out = BTreeMap::new();
    // cmdstat_evalsha:calls=1,usec=2,usec_per_call=2.00,rejected_calls=0,failed_calls=0
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let m: BTreeMap<String, f64> = fields
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
            .collect();
        out.insert(name.to_owned(), m);
    }
    Ok(out)
}

#[derive(Serialize, Clone)]
struct RedisBenchmark {
    requests_p1: u64,
    requests_p16: u64,
    p1_rps: f64,
    p16_rps: f64,
    p1_csv: String,
    p16_csv: String,
}

/// `redis-benchmark -c 50 -P pipeline -n n EVAL "return 1" 0` on the master: requests/s
/// and its CSV output.
async fn eval_rps(port: u16, pipeline: u32, n: u64) -> anyhow::Result<(f64, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "50"])
            .args(["-n", &n.to_string(), "-P", &pipeline.to_string(), "--csv"])
            .args(["EVAL", "return 1", "0"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("redis-benchmark did not finish within 120s")?
    .context("cannot run redis-benchmark (it comes with redis-server)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "test","rps",...  then  "EVAL return 1 0","33840.95",...
    let rps = text
        .lines()
        .find(|l| l.starts_with("\"EVAL"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
        .with_context(|| {
            format!(
                "cannot parse redis-benchmark output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok((rps, text.trim().to_owned()))
}

async fn redis_benchmark(port: u16, n: u64) -> anyhow::Result<RedisBenchmark> {
    let run = |pipeline: u32, n: u64| eval_rps(port, pipeline, n);
    let (p1_rps, p1_csv) = run(1, n).await?;
    let (p16_rps, p16_csv) = run(16, n * 5).await?;
    Ok(RedisBenchmark {
        requests_p1: n,
        requests_p16: n * 5,
        p1_rps,
        p16_rps,
        p1_csv,
        p16_csv,
    })
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({ "cpus": cpus, "cpu_model": model, "redis": redis })
}

// ---------------------------------------------------------------------------------------
// Report

#[derive(Serialize, Clone)]
struct Target {
    name: &'static str,
    goal: String,
    measured: String,
    /// Always false for an informational row.
    pass: bool,
    /// Not a target: a figure reported next to the targets (JSON `informational`).
    informational: bool,
    /// The figures behind `measured`, when there are some worth keeping as numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

/// 10000 → "10,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The closing figures of a step, as reported beside a closing target.
fn closing_data(r: &StepResult) -> Value {
    let c = &r.closing;
    json!({
        "step": r.step,
        "deadline_spread_ms": c.deadline_spread_ms,
        "closed_seen": c.closed_seen,
        "auctions": c.auctions,
        "lateness_ms": c.lateness_ms,
    })
}

fn evaluate_targets(results: &[StepResult], rb: Option<&RedisBenchmark>) -> Vec<Target> {
    let mut out = Vec::new();
    let clean = |r: &&StepResult| r.lost == 0 && r.unconfirmed == 0;
    let one_auction_w1 = |r: &&StepResult| r.config.auctions == 1 && r.config.wait_replicas == 1;
    let best = results
        .iter()
        .filter(one_auction_w1)
        .filter(clean)
        .max_by(|a, b| a.accepted_per_s.total_cmp(&b.accepted_per_s));
    // A fixed offered rate below saturation says nothing about the ceiling.
    let ceiling_measured = results
        .iter()
        .any(|r| one_auction_w1(&r) && (r.config.rate == 0 || r.saturated()));
    if let Some(b) = best.filter(|_| ceiling_measured) {
        out.push(Target {
            name: "throughput",
            goal: "≥ 10,000 accepted bids/s sustained on one auction, 0 lost (WAIT 1, 2 replicas)"
                .into(),
            measured: format!(
                "{:.0} accepted/s ({:.0} outcomes/s) at step {} ({}), 0 lost",
                b.accepted_per_s, b.outcomes_per_s, b.step, b.label
            ),
            pass: b.accepted_per_s >= 10_000.0,
            informational: false,
            data: None,
        });
        if let Some(rb) = rb {
            // Each step against its own baseline: the neighbouring one where it was measured.
            let ratio_of = |r: &StepResult| r.accepted_per_s / r.eval_baseline(rb.p1_rps);
            let b = results
                .iter()
                .filter(one_auction_w1)
                .filter(clean)
                .max_by(|x, y| ratio_of(x).total_cmp(&ratio_of(y)))
                .unwrap_or(b);
            let baseline = b.eval_baseline(rb.p1_rps);
            let ratio = ratio_of(b);
            let which = match &b.eval_p1_adjacent {
                Some(a) => format!(
                    "EVAL -P 1 mean of {:.0} just before and {:.0} just after step {}; {:.0} at the run's start",
                    a.before_rps, a.after_rps, b.step, rb.p1_rps
                ),
                None => "EVAL -P 1 at the run's start".to_owned(),
            };
            out.push(Target {
                name: "ratio_to_eval",
                goal: "≥ 0.3 × same-run redis-benchmark EVAL -P 1".into(),
                measured: format!(
                    "{ratio:.3} × at step {} ({}): {:.0} / {:.0} req/s ({which}); outcomes {:.3} ×",
                    b.step,
                    b.label,
                    b.accepted_per_s,
                    baseline,
                    b.outcomes_per_s / baseline
                ),
                pass: ratio >= 0.3,
                informational: false,
                data: None,
            });
        }
    } else if ceiling_measured {
        out.push(Target {
            name: "throughput",
            goal: "≥ 10,000 accepted bids/s sustained on one auction, 0 lost (WAIT 1, 2 replicas)"
                .into(),
            measured: "no one-auction WAIT 1 step without lost or unconfirmed bids".into(),
            pass: false,
            informational: false,
            data: None,
        });
    }
    if let Some(r) = results
        .iter()
        .find(|r| r.config.rate == 1000 && one_auction_w1(r))
    {
        out.push(Target {
            name: "p99_at_1000",
            goal: "p99 publish → bid_accepted ≤ 10 ms at 1,000 bids/s".into(),
            measured: format!(
                "p99 {:.2} ms (p50 {:.2}, p99.9 {:.2}) over {} bids",
                r.latency_accepted_ms.p99,
                r.latency_accepted_ms.p50,
                r.latency_accepted_ms.p999,
                r.latency_accepted_ms.n
            ),
            pass: r.latency_accepted_ms.n > 0 && r.latency_accepted_ms.p99 <= 10.0,
            informational: false,
            data: None,
        });
    }
    if let Some(r) = results.iter().find(|r| r.config.bidders >= 1000) {
        out.push(Target {
            name: "rss_1000_bidders",
            goal: "server peak RSS ≤ 50 MB with 1,000 bidders".into(),
            measured: format!("{:.1} MB (VmHWM) at step {}", r.server.peak_rss_mb, r.step),
            pass: r.server.peak_rss_mb > 0.0 && r.server.peak_rss_mb <= 50.0,
            informational: false,
            data: None,
        });
    }
    // 10,000 open auctions: judged on the step with spread deadlines (each auction closing
    // on its own deadline while the others stay open); the burst step (every deadline in the
    // same millisecond) is reported beside it, not judged.
    let burst = results
        .iter()
        .find(|r| r.config.auctions >= 10_000 && r.config.deadline_spread.is_zero());
    let spread = results
        .iter()
        .find(|r| r.config.auctions >= 10_000 && !r.config.deadline_spread.is_zero());
    if let Some(r) = spread.or(burst) {
        let c = &r.closing;
        let how = if r.config.deadline_spread.is_zero() {
            format!(
                "step {} (burst: every deadline within {} ms; no spread step run)",
                r.step, c.deadline_spread_ms
            )
        } else {
            format!(
                "step {} (deadlines over {}: first to last {} ms, {:.0} due per second)",
                r.step,
                fmt_spread(r.config.deadline_spread),
                c.deadline_spread_ms,
                c.auctions as f64 / r.config.deadline_spread.as_secs_f64()
            )
        };
        out.push(Target {
            name: "close_10000",
            goal: "10,000 open auctions each closed within 100 ms of its deadline".into(),
            measured: format!(
                "{how}: {} of {} closes seen; closed_at − deadline p50 {:.0} / p99 {:.0} / max {:.0} ms; {} closed unannounced, {} still open",
                c.closed_seen,
                c.auctions,
                c.lateness_ms.p50,
                c.lateness_ms.p99,
                c.lateness_ms.max,
                c.missing_announced_closed,
                c.missing_still_open
            ),
            pass: c.closed_seen == c.auctions && c.lateness_ms.max <= 100.0,
            informational: false,
            data: Some(closing_data(r)),
        });
    }
    if let Some(r) = burst {
        let c = &r.closing;
        // Every close was due at (about) the same instant, so the last one's lateness is the
        // time the server took to close them all.
        let per_s =
            (c.lateness_ms.max > 0.0).then(|| c.closed_seen as f64 * 1000.0 / c.lateness_ms.max);
        out.push(Target {
            name: "close_10000_burst",
            goal: format!(
                "burst: {} deadlines in the same millisecond — last close after",
                thousands(c.auctions)
            ),
            measured: format!(
                "step {} (deadlines within {} ms): max {:.0} ms (p50 {:.0} / p99 {:.0}), {} of {} closes seen; {}",
                r.step,
                c.deadline_spread_ms,
                c.lateness_ms.max,
                c.lateness_ms.p50,
                c.lateness_ms.p99,
                c.closed_seen,
                c.auctions,
                match per_s {
                    Some(v) => format!(
                        "≈ {:.0} closes/s ({} closes / {:.0} ms)",
                        v, c.closed_seen, c.lateness_ms.max
                    ),
                    None => "closes/s not measurable (max lateness 0 ms)".to_owned(),
                }
            ),
            pass: false,
            informational: true,
            data: Some({
                let mut data = closing_data(r);
                data["closes_per_s"] = json!(per_s);
                data
            }),
        });
    }
    out
}

fn markdown_table(
    results: &[StepResult],
    rb: Option<&RedisBenchmark>,
    master_nice: Option<i32>,
) -> String {
    let mut s = String::new();
    if let Some(rb) = rb {
        s.push_str(&format!(
            "redis-benchmark on the same master, `EVAL \"return 1\" 0`, `-c 50`: **{:.0} req/s** with `-P 1`, **{:.0} req/s** with `-P 16` at the run's start. One-auction WAIT 1 steps flat out or offered ≥ 10,000/s are divided by the mean of `-P 1` runs just before and just after the step; other steps by the run's start.\n\n",
            rb.p1_rps, rb.p16_rps
        ));
    }
    s.push_str(&match master_nice {
        Some(0) | None => "The Redis master ran at nice 0, sharing the cores evenly with everything else.\n\n".to_owned(),
        Some(n) => format!("The Redis master ran at nice {n} (`--master-nice`), in the baseline and in every step alike.\n\n"),
    });
    s.push_str("| step | offered | bidders | auctions | WAIT | published/s | accepted/s | outcomes/s | × EVAL -P 1 | p50 ms | p99 ms | p99.9 ms | lost | unconf. | server CPU (cores) | server µs/accepted | peak RSS MB | Redis master CPU (cores) | WAIT probe p50/p99 ms | other load (cores) | close late p50/p99/max ms |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in results {
        let window = r.config.duration.as_secs_f64();
        let ratio = rb
            .map(|rb| format!("{:.2}", r.accepted_per_s / r.eval_baseline(rb.p1_rps)))
            .unwrap_or_else(|| "–".into());
        let c = &r.closing;
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} | {:.0} | {:.1} | {:.2} | {:.1}/{:.1} | {:.2} | {:.0}/{:.0}/{:.0} ({}/{}) |\n",
            r.step,
            if r.config.rate == 0 {
                "flat out".to_owned()
            } else {
                r.config.rate.to_string()
            },
            r.config.bidders,
            if r.config.deadline_spread.is_zero() {
                r.config.auctions.to_string()
            } else {
                format!(
                    "{} (deadlines over {})",
                    r.config.auctions,
                    fmt_spread(r.config.deadline_spread)
                )
            },
            r.config.wait_replicas,
            r.published_per_s,
            r.accepted_per_s,
            r.outcomes_per_s,
            ratio,
            r.latency_accepted_ms.p50,
            r.latency_accepted_ms.p99,
            r.latency_accepted_ms.p999,
            r.lost,
            r.unconfirmed,
            r.server.cores_window,
            r.server.cpu_us_per_accepted,
            r.server.peak_rss_mb,
                        r.redis.master_cpu_s_window / window,
            r.probe.wait_ms.p50,
            r.probe.wait_ms.p99,
            r.machine.other_cores.max(0.0),
            c.lateness_ms.p50,
            c.lateness_ms.p99,
            c.lateness_ms.max,
            c.closed_seen,
            c.auctions,
        ));
    }
    s
}

fn targets_table(targets: &[Target]) -> String {
    if targets.is_empty() {
        return String::new();
    }
    let mut s = String::from("| target | measured | |\n|---|---|---|\n");
    for t in targets {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            t.goal,
            t.measured,
            if t.informational {
                "informational"
            } else if t.pass {
                "**met**"
            } else {
                "**not met**"
            }
        ));
    }
    s
}
