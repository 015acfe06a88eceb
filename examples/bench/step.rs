//! Running one step: a clean keyspace, a fresh server, the step's auctions, the bidders'
//! load through warm-up and measurement window, the drain of outstanding outcomes, the
//! auctions' closes, and then the figures, collected into a [`StepResult`]. Each phase is
//! a function of its own, called in that order by [`run_step`]; the server's own phases
//! are in [`crate::server`], and what the phases sample is read with the helpers of
//! [`crate::stats`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use auction::keyspace::AuctionId;
use auction::link::sentinel::Master;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction_testkit::DevStack;
use redis::aio::MultiplexedConnection;

use crate::load::{BidderLoad, LoadCounters, bidder, connect_bid_conns};
use crate::plan::StepConfig;
use crate::recording::{BidderSlot, Shared, StepTally, auction_id, parse_bid_id};
use crate::result::{
    Closing, MachineWindow, NodeStats, Probe, RedisStats, ServerStats, StepResult, percentiles_ms,
};
use crate::server::{open_auctions, register_bidders, start_server, stop_server};
use crate::stats::{
    Commandstats, loop_lag, machine_busy_s, master_pid, node_stats, probe, proc_cpu_s,
    proc_peak_rss_mb, read_commandstats, read_info_field,
};
use crate::{Args, now_ms};

/// How long after the last deadline an unclosed auction counts as missing.
const CLOSE_GRACE: Duration = Duration::from_secs(30);

/// What every step shares: the options, the Redis topology, the server binary and the
/// subscriber's state.
pub(crate) struct StepContext<'a> {
    pub(crate) args: &'a Args,
    pub(crate) stack: &'a DevStack,
    pub(crate) master: &'a Master,
    pub(crate) server_bin: &'a std::path::Path,
    pub(crate) shared: &'a Shared,
    pub(crate) clk_tck: f64,
}

/// Runs step number `step` with the configuration `cfg`, phase by phase, and collects what
/// it measured.
pub(crate) async fn run_step(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    step: u32,
    cfg: &StepConfig,
) -> anyhow::Result<StepResult> {
    // A clean keyspace per step, so each step's Redis costs are its own.
    redis::cmd("FLUSHALL")
        .query_async::<()>(admin_conn)
        .await
        .context("FLUSHALL")?;
    let slots = ctx.shared.begin_step(step, cfg.bidders);
    let auth = if cfg.signed {
        vec![("BID_AUTH", "required".to_owned())]
    } else {
        Vec::new()
    };
    let (server, grpc_port) = start_server(ctx, admin_conn, step, cfg.wait_replicas, &auth).await?;
    let pid = server.pid();
    let mut admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
    let keys = if cfg.signed {
        register_bidders(&mut admin, cfg.bidders).await?
    } else {
        Vec::new()
    };
    let opened = open_step_auctions(ctx, &mut admin, step, cfg).await?;
    let load = start_bidders(ctx, step, cfg, &slots, opened.duration, Arc::new(keys)).await?;
    let window = measure_window(ctx, admin_conn, step, cfg, pid, &load).await?;
    let (published, drain_s) = drain(ctx, load.tasks, &load.counters).await;
    let closes = await_closes(ctx, admin_conn, cfg, pid, &opened.deadlines).await;

    // Snapshot what was recorded; stop recording this step.
    let mut tally = ctx.shared.end_step();
    let mut closing = closing_stats(admin_conn, &tally, step, &opened.deadlines).await;
    closing.server_cpu_s = closes.cpu_total - closes.cpu_before;
    closing.commandstats = closes.commandstats;
    let unconfirmed = unconfirmed(admin_conn, &tally, step).await?;
    let master_mem = read_info_field(admin_conn, "memory", "used_memory")
        .await
        .unwrap_or(0.0)
        / 1e6;
    let (exit_code, counters_line) = stop_server(server).await;

    let window_s = opened.duration.as_secs_f64();
    let cpu_window = window.server_cpu_s;
    let machine = window.machine(window_s);
    let script_calls = script_calls(&window.commandstats);
    let counters = &load.counters;
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
        accepted_per_s: tally.accepted_in_window as f64 / window_s,
        outcomes_per_s: tally.outcomes_in_window as f64 / window_s,
        accepted: tally.accepted,
        rejected: tally.rejected.clone(),
        latency_accepted_ms: percentiles_ms(&mut tally.lat_accepted_us),
        latency_outcome_ms: percentiles_ms(&mut tally.lat_outcome_us),
        lost: published.saturating_sub(tally.first_outcomes),
        unconfirmed,
        repeated_outcomes: tally.repeats,
        seq_gaps: tally.seq_gaps,
        per_second_accepted: tally.per_second.iter().map(|p| p.0).collect(),
        per_second_outcomes: tally.per_second.iter().map(|p| p.1).collect(),
        open_phase_s: opened.open_phase.as_secs_f64(),
        opens_per_s: cfg.auctions as f64 / opened.open_phase.as_secs_f64().max(1e-3),
        drain_s,
        closing,
        server: ServerStats {
            pid,
            cpu_s_window: cpu_window,
            cpu_s_total: closes.cpu_total,
            cores_window: cpu_window / window_s,
            peak_rss_mb: closes.peak_rss_mb,
            cpu_us_per_accepted: per(cpu_window * 1e6, tally.accepted_in_window),
            exit_code,
            counters: counters_line,
        },
        redis: redis_stats(
            &window.nodes0,
            &window.nodes1,
            window.commandstats,
            master_mem,
        ),
        bench_cpu_s_window: window.bench_cpu_s,
        bench_loop_lag_ms: window.bench_loop_lag_ms,
        probe: window.probe,
        machine,
        script_calls_per_outcome: per(script_calls, tally.outcomes_in_window),
        eval_p1_adjacent: None,
    })
}

/// `total / n`, or 0 when there is nothing to divide by.
fn per(total: f64, n: u64) -> f64 {
    if n > 0 { total / n as f64 } else { 0.0 }
}

/// The step's auctions once open.
struct Opened {
    /// Deadlines (Redis clock, ms) in index order.
    deadlines: Vec<u64>,
    /// How long opening them took.
    open_phase: Duration,
    /// The measurement window: the step's, cut if opening took so long that the load would
    /// otherwise run into the first deadline.
    duration: Duration,
}

async fn open_step_auctions(
    ctx: &StepContext<'_>,
    admin: &mut AuctionAdminClient<tonic::transport::Channel>,
    step: u32,
    cfg: &StepConfig,
) -> anyhow::Result<Opened> {
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
        admin,
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
    Ok(Opened {
        deadlines,
        open_phase,
        duration,
    })
}

/// The bidders of a step, running.
struct Load {
    tasks: tokio::task::JoinSet<()>,
    counters: Arc<LoadCounters>,
    window_start: Instant,
    window_end: Instant,
}

/// Connects the bidders and starts them: the load starts 200 ms from now, and the
/// measurement window of `duration` after the warm-up.
async fn start_bidders(
    ctx: &StepContext<'_>,
    step: u32,
    cfg: &StepConfig,
    slots: &Arc<Vec<BidderSlot>>,
    duration: Duration,
    keys: Arc<Vec<String>>,
) -> anyhow::Result<Load> {
    let conns = connect_bid_conns(ctx.master, cfg.bidders).await?;
    let load_start = Instant::now() + Duration::from_millis(200);
    let window_start = load_start + cfg.warmup;
    let window_end = window_start + duration;
    ctx.shared.set_window(load_start, window_start, window_end);
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
            shared: ctx.shared.clone(),
            slots: slots.clone(),
            counters: counters.clone(),
            amounts: amounts.clone(),
            next_auction: next_auction.clone(),
            auction_ids: auction_ids.clone(),
            master: ctx.master.clone(),
            keys: keys.clone(),
        };
        tasks.spawn(bidder(load, conn));
    }
    Ok(Load {
        tasks,
        counters,
        window_start,
        window_end,
    })
}

/// What was sampled over the measurement window.
struct WindowSamples {
    /// Busy seconds of the whole machine, of the server and of this process.
    machine_cpu_s: f64,
    server_cpu_s: f64,
    bench_cpu_s: f64,
    /// Every data node at the window's start and at its end.
    nodes0: Vec<NodeStats>,
    nodes1: Vec<NodeStats>,
    /// The master's, over the window.
    commandstats: Commandstats,
    loadavg_1m: f64,
    probe: Probe,
    bench_loop_lag_ms: f64,
}

impl WindowSamples {
    /// The whole machine's CPU over the window (other = not the server, Redis or this
    /// process).
    fn machine(&self, window_s: f64) -> MachineWindow {
        MachineWindow {
            busy_cores: self.machine_cpu_s / window_s,
            other_cores: (self.machine_cpu_s
                - self.server_cpu_s
                - self.bench_cpu_s
                - self.nodes1.iter().map(|n| n.cpu_s).sum::<f64>()
                + self.nodes0.iter().map(|n| n.cpu_s).sum::<f64>())
                / window_s,
            loadavg_1m: self.loadavg_1m,
        }
    }
}

/// Samples at the window's edges, with the probe, the loop-lag timer and the --attach
/// command running in between.
async fn measure_window(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    step: u32,
    cfg: &StepConfig,
    pid: u32,
    load: &Load,
) -> anyhow::Result<WindowSamples> {
    let (window_start, window_end) = (load.window_start, load.window_end);
    tokio::time::sleep_until(window_start.into()).await;
    let mut attach = start_attach(ctx, admin_conn, step, pid).await?;
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
    reset_stats(admin_conn).await;
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
        stop_attach(child).await;
    }
    Ok(WindowSamples {
        machine_cpu_s: machine1 - machine0,
        server_cpu_s: cpu1 - cpu0,
        bench_cpu_s: self1 - self0,
        nodes0,
        nodes1,
        commandstats,
        loadavg_1m: loadavg,
        probe,
        bench_loop_lag_ms,
    })
}

/// `CONFIG RESETSTAT` on the master (best effort).
async fn reset_stats(admin_conn: &mut MultiplexedConnection) {
    let _ = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(admin_conn)
        .await;
}

/// Starts the --attach command, if there is one, with `{pid}` and `{master_pid}` filled in.
async fn start_attach(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    step: u32,
    pid: u32,
) -> anyhow::Result<Option<tokio::process::Child>> {
    let Some(cmd) = &ctx.args.attach else {
        return Ok(None);
    };
    let cmd = cmd
        .replace("{pid}", &pid.to_string())
        .replace("{master_pid}", &master_pid(admin_conn).await.to_string());
    let log = std::fs::File::create(ctx.stack.dir().join(format!("attach-step{step}.log")))?;
    // Its own process group, so that the signal reaches every process it started.
    Ok(Some(
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
    ))
}

/// Stops the --attach command: SIGINT to its process group, SIGKILL if it is still
/// running 60 s later.
async fn stop_attach(child: &mut tokio::process::Child) {
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

/// Waits for the bidders to stop (the load ends with the window), then drains outstanding
/// outcomes for up to --drain. Returns the bids published and the drain's length, seconds.
async fn drain(
    ctx: &StepContext<'_>,
    mut tasks: tokio::task::JoinSet<()>,
    counters: &LoadCounters,
) -> (u64, f64) {
    let bound = Instant::now() + Duration::from_secs(10);
    while tasks.join_next().await.is_some() {
        if Instant::now() > bound {
            tasks.abort_all();
        }
    }
    let published = counters.published.load(Ordering::Acquire);
    let drain_started = Instant::now();
    while drain_started.elapsed() < ctx.args.drain {
        if ctx.shared.lock().first_outcomes >= published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (published, drain_started.elapsed().as_secs_f64())
}

/// What the closes cost, from the end of the drain until every close was seen.
struct Closes {
    /// The server's CPU seconds at the start and at the end (its total).
    cpu_before: f64,
    cpu_total: f64,
    peak_rss_mb: f64,
    /// The master's, over the same period.
    commandstats: Commandstats,
}

/// Closing: waits for every auction's close, by its deadline (at most [`CLOSE_GRACE`]
/// after the last one).
async fn await_closes(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    cfg: &StepConfig,
    pid: u32,
    deadlines: &[u64],
) -> Closes {
    reset_stats(admin_conn).await;
    let cpu_before = proc_cpu_s(pid, ctx.clk_tck);
    let last_deadline = deadlines.iter().max().copied().unwrap_or(0);
    let close_bound = Instant::now()
        + Duration::from_millis(last_deadline.saturating_sub(now_ms()))
        + CLOSE_GRACE;
    loop {
        let closed = ctx.shared.lock().closed.len();
        if closed >= cfg.auctions || Instant::now() > close_bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak_rss_mb = proc_peak_rss_mb(pid);
    let cpu_total = proc_cpu_s(pid, ctx.clk_tck);
    let commandstats = read_commandstats(admin_conn).await.unwrap_or_default();
    Closes {
        cpu_before,
        cpu_total,
        peak_rss_mb,
        commandstats,
    }
}

/// Script calls (EVALSHA and EVAL) in `INFO commandstats`.
fn script_calls(commandstats: &Commandstats) -> f64 {
    let calls = |name: &str| {
        commandstats
            .get(name)
            .and_then(|m| m.get("calls"))
            .copied()
            .unwrap_or(0.0)
    };
    calls("evalsha") + calls("eval")
}

/// The Redis figures of the window, from the data nodes' samples at its edges.
fn redis_stats(
    nodes0: &[NodeStats],
    nodes1: &[NodeStats],
    commandstats: Commandstats,
    master_mem: f64,
) -> RedisStats {
    RedisStats {
        master_cpu_s_window: nodes1.first().map_or(0.0, |n| n.cpu_s)
            - nodes0.first().map_or(0.0, |n| n.cpu_s),
        replicas_cpu_s_window: nodes1.iter().skip(1).map(|n| n.cpu_s).sum::<f64>()
            - nodes0.iter().skip(1).map(|n| n.cpu_s).sum::<f64>(),
        commandstats,
        master_used_memory_mb: master_mem,
        nodes: nodes0.iter().zip(nodes1).map(|(a, b)| b.since(a)).collect(),
    }
}

// ---------------------------------------------------------------------------------------
// After a step

/// The lateness of every close seen, and why the others were not seen.
async fn closing_stats(
    conn: &mut MultiplexedConnection,
    r: &StepTally,
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
    r: &StepTally,
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
