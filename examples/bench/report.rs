//! The report: the markdown table of the steps, the targets (met or not, and the
//! informational rows beside them) and the JSON summary, printed and written under
//! `target/bench` (or beside `--json`).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::plan::StepConfig;
use crate::result::StepResult;
use crate::stats::{RedisBenchmark, machine};
use crate::{Args, Curves, Topology, fmt_spread, now_ms};

/// Prints the table and the targets, and writes the JSON summary to `json_path` and the
/// markdown beside it.
pub(crate) fn publish(
    args: &Args,
    json_path: &Path,
    topology: &Topology,
    rb: Option<&RedisBenchmark>,
    results: &[StepResult],
    curves: &Curves,
    started: Instant,
) -> anyhow::Result<()> {
    let targets = evaluate_targets(results, rb);
    let table = markdown_table(results, rb, topology.master_nice);
    println!();
    println!("{table}");
    if !targets.is_empty() {
        println!("{}", targets_table(&targets));
    }
    let summary = json!({
        "generated_at_unix_ms": now_ms(),
        "machine": machine(),
        "args": args,
        "topology": {
            "master_port": topology.master_port,
            "master_nice": topology.master_nice,
            "replicas": topology.stack.redis_ports().len() - 1,
            "sentinels": topology.stack.sentinel_addrs().len(),
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
    std::fs::write(json_path, serde_json::to_string_pretty(&summary)?)?;
    let md = json_path.with_extension("md");
    std::fs::write(&md, format!("{table}\n{}", targets_table(&targets)))?;
    println!("JSON: {}   markdown: {}", json_path.display(), md.display());
    Ok(())
}

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

impl Target {
    /// A target, met (`pass`) or not, without figures kept as numbers.
    fn judged(name: &'static str, goal: &str, measured: String, pass: bool) -> Target {
        Target {
            name,
            goal: goal.to_owned(),
            measured,
            pass,
            informational: false,
            data: None,
        }
    }
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

const THROUGHPUT_GOAL: &str =
    "≥ 10,000 accepted bids/s sustained on one auction, 0 lost (WAIT 1, 2 replicas)";

/// No bid lost, none unconfirmed.
fn clean(r: &StepResult) -> bool {
    r.lost == 0 && r.unconfirmed == 0
}

/// One auction at `WAIT 1`: where the throughput targets are measured.
fn one_auction_w1(r: &StepResult) -> bool {
    r.config.auctions == 1 && r.config.wait_replicas == 1
}

fn evaluate_targets(results: &[StepResult], rb: Option<&RedisBenchmark>) -> Vec<Target> {
    let mut out = throughput(results, rb);
    out.extend(signed_cost(results));
    out.extend(p99_at_1000(results));
    out.extend(rss_1000_bidders(results));
    // 10,000 open auctions: judged on the step with spread deadlines (each auction closing
    // on its own deadline while the others stay open); the burst step (every deadline in the
    // same millisecond) is reported beside it, not judged.
    let burst = results
        .iter()
        .find(|r| r.config.auctions >= 10_000 && r.config.deadline_spread.is_zero());
    let spread = results
        .iter()
        .find(|r| r.config.auctions >= 10_000 && !r.config.deadline_spread.is_zero());
    out.extend(spread.or(burst).map(close_10000));
    out.extend(burst.map(close_10000_burst));
    out
}

/// With `--signed`: each flat-out signed step against its unsigned twin just before it, the
/// worst pair judged (≥ 90 % of the unsigned accepted/s).
fn signed_cost(results: &[StepResult]) -> Option<Target> {
    let pairs: Vec<(&StepResult, &StepResult)> = results
        .windows(2)
        .filter(|w| w[1].config.signed && w[1].config.rate == 0)
        .filter(|w| {
            w[0].config
                == StepConfig {
                    signed: false,
                    ..w[1].config.clone()
                }
        })
        .map(|w| (&w[0], &w[1]))
        .collect();
    let ratio = |(u, s): &(&StepResult, &StepResult)| s.accepted_per_s / u.accepted_per_s.max(1.0);
    let worst = pairs.iter().min_by(|a, b| ratio(a).total_cmp(&ratio(b)))?;
    let (u, s) = worst;
    Some(Target::judged(
        "signed_cost",
        "signed flat-out step ≥ 90 % of the unsigned one's accepted/s, same run",
        format!(
            "{:.3} × at step {} ({}): {:.0} signed vs {:.0} unsigned accepted/s (step {})",
            ratio(worst),
            s.step,
            s.label,
            s.accepted_per_s,
            u.accepted_per_s,
            u.step
        ),
        ratio(worst) >= 0.9,
    ))
}

/// `throughput` and, with a `redis-benchmark` baseline, `ratio_to_eval`; none when no step
/// measured the ceiling.
fn throughput(results: &[StepResult], rb: Option<&RedisBenchmark>) -> Vec<Target> {
    // A fixed offered rate below saturation says nothing about the ceiling.
    let ceiling_measured = results
        .iter()
        .any(|r| one_auction_w1(r) && (r.config.rate == 0 || r.saturated()));
    if !ceiling_measured {
        return Vec::new();
    }
    let best = results
        .iter()
        .filter(|r| one_auction_w1(r))
        .filter(|r| clean(r))
        .max_by(|a, b| a.accepted_per_s.total_cmp(&b.accepted_per_s));
    let Some(b) = best else {
        return vec![Target::judged(
            "throughput",
            THROUGHPUT_GOAL,
            "no one-auction WAIT 1 step without lost or unconfirmed bids".into(),
            false,
        )];
    };
    let mut out = vec![Target::judged(
        "throughput",
        THROUGHPUT_GOAL,
        format!(
            "{:.0} accepted/s ({:.0} outcomes/s) at step {} ({}), 0 lost",
            b.accepted_per_s, b.outcomes_per_s, b.step, b.label
        ),
        b.accepted_per_s >= 10_000.0,
    )];
    out.extend(rb.map(|rb| ratio_to_eval(results, rb, b)));
    out
}

/// The best ratio of accepted bids/s to `EVAL -P 1` among the clean one-auction `WAIT 1`
/// steps (`best`, the highest throughput, if none compares).
fn ratio_to_eval(results: &[StepResult], rb: &RedisBenchmark, best: &StepResult) -> Target {
    // Each step against its own baseline: the neighbouring one where it was measured.
    let ratio_of = |r: &StepResult| r.accepted_per_s / r.eval_baseline(rb.p1_rps);
    let b = results
        .iter()
        .filter(|r| one_auction_w1(r))
        .filter(|r| clean(r))
        .max_by(|x, y| ratio_of(x).total_cmp(&ratio_of(y)))
        .unwrap_or(best);
    let baseline = b.eval_baseline(rb.p1_rps);
    let ratio = ratio_of(b);
    let which = match &b.eval_p1_adjacent {
        Some(a) => format!(
            "EVAL -P 1 mean of {:.0} just before and {:.0} just after step {}; {:.0} at the run's start",
            a.before_rps, a.after_rps, b.step, rb.p1_rps
        ),
        None => "EVAL -P 1 at the run's start".to_owned(),
    };
    Target::judged(
        "ratio_to_eval",
        "≥ 0.3 × same-run redis-benchmark EVAL -P 1",
        format!(
            "{ratio:.3} × at step {} ({}): {:.0} / {:.0} req/s ({which}); outcomes {:.3} ×",
            b.step,
            b.label,
            b.accepted_per_s,
            baseline,
            b.outcomes_per_s / baseline
        ),
        ratio >= 0.3,
    )
}

fn p99_at_1000(results: &[StepResult]) -> Option<Target> {
    let r = results
        .iter()
        .find(|r| r.config.rate == 1000 && one_auction_w1(r))?;
    Some(Target::judged(
        "p99_at_1000",
        "p99 publish → bid_accepted ≤ 10 ms at 1,000 bids/s",
        format!(
            "p99 {:.2} ms (p50 {:.2}, p99.9 {:.2}) over {} bids",
            r.latency_accepted_ms.p99,
            r.latency_accepted_ms.p50,
            r.latency_accepted_ms.p999,
            r.latency_accepted_ms.n
        ),
        r.latency_accepted_ms.n > 0 && r.latency_accepted_ms.p99 <= 10.0,
    ))
}

fn rss_1000_bidders(results: &[StepResult]) -> Option<Target> {
    let r = results.iter().find(|r| r.config.bidders >= 1000)?;
    Some(Target::judged(
        "rss_1000_bidders",
        "server peak RSS ≤ 50 MB with 1,000 bidders",
        format!("{:.1} MB (VmHWM) at step {}", r.server.peak_rss_mb, r.step),
        r.server.peak_rss_mb > 0.0 && r.server.peak_rss_mb <= 50.0,
    ))
}

/// Judged on step `r`: the spread step, else the burst step.
fn close_10000(r: &StepResult) -> Target {
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
    Target {
        data: Some(closing_data(r)),
        ..Target::judged(
            "close_10000",
            "10,000 open auctions each closed within 100 ms of its deadline",
            format!(
                "{how}: {} of {} closes seen; closed_at − deadline p50 {:.0} / p99 {:.0} / max {:.0} ms; {} closed unannounced, {} still open",
                c.closed_seen,
                c.auctions,
                c.lateness_ms.p50,
                c.lateness_ms.p99,
                c.lateness_ms.max,
                c.missing_announced_closed,
                c.missing_still_open
            ),
            c.closed_seen == c.auctions && c.lateness_ms.max <= 100.0,
        )
    }
}

/// Informational: how long the burst step's closes took, and so how many closes a second.
fn close_10000_burst(r: &StepResult) -> Target {
    let c = &r.closing;
    // Every close was due at (about) the same instant, so the last one's lateness is the
    // time the server took to close them all.
    let per_s =
        (c.lateness_ms.max > 0.0).then(|| c.closed_seen as f64 * 1000.0 / c.lateness_ms.max);
    Target {
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
    }
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
