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
//!
//! This file owns the command line, the run from start to end (the Redis topology, the
//! `redis-benchmark` baseline, the steps of the plan in order) and the small helpers the
//! modules share. The modules: [`plan`] turns the scenario into steps, [`step`] runs one,
//! [`server`] starts and stops the server of a step, [`load`] generates its bids,
//! [`recording`] tallies the outcomes, [`result`] holds what a step measured, [`stats`]
//! reads process and Redis statistics, and [`report`] writes the table, the targets and
//! the JSON. The soak scenario runs apart from the steps: [`soak`] drives it (one server,
//! minutes of churn, samples over time) and [`soak_report`] writes its table, JSON and SVG.

mod load;
mod plan;
mod recording;
mod report;
mod result;
mod server;
mod soak;
mod soak_report;
mod stats;
mod step;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use auction::link::sentinel::{Master, Settings};
use auction::runtime::config::RedisArgs;
use auction_testkit::{DevStack, DevStackConfig};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use crate::plan::{Group, StepConfig};
use crate::recording::{Shared, Subscriber};
use crate::result::{Adjacent, StepResult};
use crate::stats::{RedisBenchmark, clock_ticks, direct, eval_rps, master_pid, set_nice};
use crate::step::{StepContext, run_step};

/// Starting price of every benchmark auction; amounts are this plus a per-auction counter.
pub(crate) const STARTING_PRICE: u64 = 100;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scenario {
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
    /// Minutes of churn at a small Redis `maxmemory`: short auctions opened and closed
    /// continuously with a short RETENTION, honest bidders, one flooding bidder; Redis
    /// memory, keys, OOM replies and server RSS sampled over time. Not part
    /// of `all`.
    Soak,
}

/// Benchmark of the auction server on a local Redis Sentinel topology.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(about, long_about = None)]
pub(crate) struct Args {
    /// Which steps to run.
    #[arg(long, value_enum, default_value = "single")]
    pub(crate) scenario: Scenario,
    /// Simulated bidders (each a tokio task with its own Redis connection).
    #[arg(long, default_value_t = 100)]
    pub(crate) bidders: usize,
    /// Auctions open during the load; bids go round-robin over them.
    #[arg(long, default_value_t = 1)]
    pub(crate) auctions: usize,
    /// Aggregate offered rate in bids/s, open loop; 0 = flat out (closed loop: each bidder
    /// keeps --window bids outstanding and publishes the next one when an outcome arrives).
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    /// Outstanding bids per bidder when flat out.
    #[arg(long, default_value_t = 1)]
    pub(crate) window: u64,
    /// Measurement window.
    #[arg(long, default_value = "8s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    pub(crate) duration: Duration,
    /// Load before the measurement window (not counted).
    #[arg(long, default_value = "2s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    pub(crate) warmup: Duration,
    /// After the load, how long to wait for outstanding outcomes before counting bids lost.
    #[arg(long, default_value = "5s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    pub(crate) drain: Duration,
    /// Passed to the server as WAIT_REPLICAS.
    #[arg(long, default_value_t = 1)]
    pub(crate) wait_replicas: u32,
    /// Offered rates of the sweep (bids/s); it stops after two saturated steps.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,300,1000,3000,10000,20000,40000"
    )]
    pub(crate) rates: Vec<u64>,
    /// Gap between the end of the load and the common deadline of the step's auctions.
    #[arg(long, default_value = "1500ms", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    pub(crate) close_margin: Duration,
    /// Spread the deadlines: auction i of n closes at `common deadline + spread × i / n`
    /// (0 = every auction shares the deadline). The `auctions` scenario's two 10,000-auction
    /// steps ignore it (one at 0, one at 10s).
    #[arg(long, default_value = "0", value_parser = parse_spread)]
    #[serde(with = "secs")]
    pub(crate) deadline_spread: Duration,
    /// Also run every step with signed bids (the server at `BID_AUTH=required`, every
    /// bidder registered and signing), right after its unsigned twin, and compare them.
    #[arg(long)]
    pub(crate) signed: bool,
    /// `redis-benchmark -n` for `-P 1` (`-P 16` uses 5x as many); 0 skips redis-benchmark.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) rb_requests: u64,
    /// The server binary (default: auction-server next to this example's directory).
    #[arg(long)]
    pub(crate) server_bin: Option<PathBuf>,
    /// Run the server under this command, e.g. "valgrind --tool=callgrind".
    #[arg(long)]
    pub(crate) server_wrapper: Option<String>,
    /// A command run (sh -c) during each measurement window, `{pid}` = the server's pid,
    /// `{master_pid}` = the Redis master's; stopped with SIGINT at the window's end, e.g.
    /// "perf record -e cpu-clock -g -p {pid} -o perf.data".
    #[arg(long)]
    pub(crate) attach: Option<String>,
    /// Nice value given to the Redis master, in the redis-benchmark baseline and in every
    /// step alike (0 = leave it). In production the master has a host or a core of its own;
    /// here it shares two cores with the replicas, the server and the load generator, and
    /// a master waiting for a core stalls every bid in flight. Needs root (CAP_SYS_NICE);
    /// without it the run goes on at nice 0 and says so.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    pub(crate) master_nice: i32,
    /// RUST_LOG of the server.
    #[arg(long, default_value = "info")]
    pub(crate) server_log: String,
    /// Where the JSON summary goes (default: target/bench/summary.json).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Keep the stack's directory (Redis and server logs) under target/bench/logs.
    #[arg(long)]
    pub(crate) keep_logs: bool,
    /// Soak: auctions opened per second (each lasts 2 to 5 s).
    #[arg(long, default_value_t = 20.0)]
    pub(crate) open_rate: f64,
    /// Soak: the flooding bidder's junk bids per second (amount 1, long unique bid_ids).
    #[arg(long, default_value_t = 5000)]
    pub(crate) flood_rate: u64,
    /// Soak: RETENTION given to the server (closed auctions expire this long after closing).
    #[arg(long, default_value = "15s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    pub(crate) retention: Duration,
    /// Soak: `maxmemory` of every Redis data node (`maxmemory-policy noeviction`).
    #[arg(long, default_value = "64mb")]
    pub(crate) maxmemory: String,
    /// Soak: time between samples of memory, keys and counts.
    #[arg(long, default_value = "1s", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    pub(crate) sample_every: Duration,
    /// Soak: sampling goes on this long after the load stops (default: RETENTION + 10 s),
    /// to see the closed auctions expire.
    #[arg(long, value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "option_secs")]
    pub(crate) tail: Option<Duration>,
    /// Hard bound on the whole run; everything is stopped when it expires.
    #[arg(long, default_value = "20m", value_parser = auction::runtime::config::parse_duration)]
    #[serde(with = "secs")]
    pub(crate) max_time: Duration,
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
pub(crate) fn fmt_spread(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

pub(crate) mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

pub(crate) mod option_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

/// The command line; the soak scenario has its own defaults for `--duration` (3 minutes)
/// and `--rate` (500 bids/s) when they are not given.
fn parse_args() -> Args {
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if args.scenario == Scenario::Soak {
        let default = |id: &str| matches.value_source(id) == Some(ValueSource::DefaultValue);
        if default("duration") {
            args.duration = soak::DEFAULT_DURATION;
        }
        if default("rate") {
            args.rate = soak::DEFAULT_RATE;
        }
    }
    args
}

fn main() -> anyhow::Result<()> {
    let args = parse_args();
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

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = target_dir()?;
    let server_bin = server_bin(&args, &target)?;
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the benchmark; use `bash scripts/bench.sh`");
    }
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| target.join("bench").join("summary.json"));
    let clk_tck = clock_ticks();
    if args.scenario == Scenario::Soak {
        return soak::run(&args, &target, &server_bin, clk_tck).await;
    }
    let started = Instant::now();

    let mut topology = Topology::start(args.master_nice, Vec::new()).await?;
    let rb = baseline(&args, topology.master_port).await?;

    let shared = Shared::new();
    let subscriber = Subscriber::start(&topology.master, shared.clone()).await?;
    let ctx = StepContext {
        args: &args,
        stack: &topology.stack,
        master: &topology.master,
        server_bin: &server_bin,
        shared: &shared,
        clk_tck,
    };
    let plan = plan::plan(&args);
    let (results, curves) = run_plan(
        &ctx,
        &mut topology.admin_conn,
        &plan,
        rb.is_some(),
        topology.master_port,
        started,
    )
    .await?;
    drop(subscriber);

    report::publish(
        &args,
        &json_path,
        &topology,
        rb.as_ref(),
        &results,
        &curves,
        started,
    )?;
    finish(&args, &target, &topology.stack, started)
}

/// The end of a run: keeps the logs when asked (--keep-logs), and says how long it took.
pub(crate) fn finish(
    args: &Args,
    target: &std::path::Path,
    stack: &DevStack,
    started: Instant,
) -> anyhow::Result<()> {
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

/// The server binary: --server-bin, or auction-server of this build's profile.
fn server_bin(args: &Args, target: &std::path::Path) -> anyhow::Result<PathBuf> {
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
    Ok(server_bin)
}

/// The Redis topology of the whole run, and an admin connection to its master.
pub(crate) struct Topology {
    // Declared in the order they are dropped: the connection and the Sentinel client go
    // before the stack's processes are killed.
    admin_conn: MultiplexedConnection,
    master: Master,
    pub(crate) master_port: u16,
    /// The master's nice value as read back (None if unreadable).
    pub(crate) master_nice: Option<i32>,
    pub(crate) stack: DevStack,
}

impl Topology {
    /// Starts 1 master, 2 replicas and 3 Sentinels, with `redis_conf` added to every data
    /// node's configuration, and gives the master `master_nice`.
    async fn start(master_nice: i32, redis_conf: Vec<String>) -> anyhow::Result<Topology> {
        eprintln!("starting Redis: 1 master, 2 replicas, 3 Sentinels on 127.0.0.1…");
        let stack = DevStack::start(DevStackConfig {
            extra_redis_conf: redis_conf,
            ..DevStackConfig::default()
        })
        .await?;
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
        let master_nice = set_nice(master_pid(&mut admin_conn).await, master_nice);
        eprintln!(
            "Redis up: master 127.0.0.1:{master_port}, replicas {:?}, Sentinels {}",
            &stack.redis_ports()[1..],
            stack.sentinels_csv()
        );
        Ok(Topology {
            admin_conn,
            master,
            master_port,
            master_nice,
            stack,
        })
    }
}

/// `redis-benchmark` on the master before the steps (None with `--rb-requests 0`).
async fn baseline(args: &Args, master_port: u16) -> anyhow::Result<Option<RedisBenchmark>> {
    let rb = if args.rb_requests > 0 {
        eprintln!("redis-benchmark EVAL \"return 1\" 0 on the master (-c 50, -P 1 and -P 16)…");
        Some(stats::redis_benchmark(master_port, args.rb_requests).await?)
    } else {
        None
    };
    if let Some(rb) = &rb {
        eprintln!(
            "redis-benchmark: EVAL -P 1 {:.0} req/s, -P 16 {:.0} req/s",
            rb.p1_rps, rb.p16_rps
        );
    }
    Ok(rb)
}

/// The curves of the report: group name → indices into the results, in step order.
pub(crate) type Curves = BTreeMap<&'static str, Vec<usize>>;

/// Runs every step of the plan once (a step identical to an earlier one is reused), in
/// order; the rate sweep stops after two saturated steps.
async fn run_plan(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    plan: &[Group],
    with_baseline: bool,
    master_port: u16,
    started: Instant,
) -> anyhow::Result<(Vec<StepResult>, Curves)> {
    let mut results: Vec<StepResult> = Vec::new();
    let mut curves = Curves::new();
    let mut step_no = 0u32;
    for group in plan {
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
                    let adjacent = with_baseline && cfg.competes_for_ceiling();
                    let r = if adjacent {
                        run_step_between_baselines(ctx, admin_conn, step_no, cfg, master_port)
                            .await?
                    } else {
                        run_step(ctx, admin_conn, step_no, cfg).await?
                    };
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
    Ok((results, curves))
}

/// Runs a step with `redis-benchmark` `EVAL -P 1` on the master just before and just after
/// it ([`StepResult::eval_p1_adjacent`]).
async fn run_step_between_baselines(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    step: u32,
    cfg: &StepConfig,
    master_port: u16,
) -> anyhow::Result<StepResult> {
    let requests = ctx.args.rb_requests;
    let before_rps = eval_rps(master_port, 1, requests).await?.0;
    let mut r = run_step(ctx, admin_conn, step, cfg).await?;
    let after_rps = eval_rps(master_port, 1, requests).await?.0;
    r.eval_p1_adjacent = Some(Adjacent {
        before_rps,
        after_rps,
        mean_rps: (before_rps + after_rps) / 2.0,
    });
    Ok(r)
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
