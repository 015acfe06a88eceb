//! The soak's report: the plateau (memory in the steady state, first half against second
//! half), a table of the samples every 10 s on stdout and in markdown, the JSON with every
//! sample, and an SVG chart of memory and keys over time drawn by hand (polylines, axes,
//! labels). Files: `soak.json`, `soak.md` and `soak.svg` under `target/bench/` (or beside
//! `--json`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::recording::StepTally;
use crate::result::percentiles_ms;
use crate::soak::{Sample, SoakCounters};
use crate::stats::machine;
use crate::{Args, Topology, now_ms};

/// Seconds between the rows of the table.
const TABLE_EVERY_S: f64 = 10.0;

/// Everything the report needs of a finished soak.
pub(crate) struct SoakRun<'a> {
    pub(crate) args: &'a Args,
    pub(crate) topology: &'a Topology,
    pub(crate) samples: &'a [Sample],
    pub(crate) counters: &'a SoakCounters,
    pub(crate) tally: &'a StepTally,
    pub(crate) server_peak_rss_mb: f64,
    pub(crate) server_exit_code: Option<i32>,
    pub(crate) server_counters: Option<String>,
    pub(crate) started: Instant,
}

/// Memory in the steady state of the load: from RETENTION + 10 s after the start (the
/// first closed auctions have expired by then) to the load's end, split in two halves.
#[derive(Serialize, Default)]
struct Plateau {
    steady_from_s: f64,
    /// Master `used_memory`, MB.
    first_half_max_mb: f64,
    second_half_max_mb: f64,
    second_half_min_mb: f64,
    /// second half max − first half max.
    growth_mb: f64,
    peak_mb: f64,
    /// At the last sample (after the tail).
    end_mb: f64,
    first_half_max_keys: u64,
    second_half_max_keys: u64,
    peak_keys: u64,
    end_keys: u64,
    peak_server_rss_mb: f64,
    oom_errors: u64,
    /// Growth at most 1 MB or 5 % of the first half's max.
    plateaued: bool,
}

fn plateau(samples: &[Sample], retention_s: f64) -> Plateau {
    let master = |s: &Sample| s.used_memory_mb.first().copied().unwrap_or(0.0);
    let steady_from_s = retention_s + 10.0;
    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.load && s.t_s >= steady_from_s)
        .collect();
    let (first, second) = steady.split_at(steady.len() / 2);
    let max_mb = |v: &[&Sample]| v.iter().map(|s| master(s)).fold(0.0, f64::max);
    let max_keys = |v: &[&Sample]| v.iter().map(|s| s.keys).max().unwrap_or(0);
    let last = samples.last();
    let (a, b) = (max_mb(first), max_mb(second));
    Plateau {
        steady_from_s,
        first_half_max_mb: a,
        second_half_max_mb: b,
        second_half_min_mb: second.iter().map(|s| master(s)).fold(b, f64::min),
        growth_mb: b - a,
        peak_mb: samples.iter().map(master).fold(0.0, f64::max),
        end_mb: last.map_or(0.0, master),
        first_half_max_keys: max_keys(first),
        second_half_max_keys: max_keys(second),
        peak_keys: samples.iter().map(|s| s.keys).max().unwrap_or(0),
        end_keys: last.map_or(0, |s| s.keys),
        peak_server_rss_mb: samples.iter().map(|s| s.server_rss_mb).fold(0.0, f64::max),
        oom_errors: last.map_or(0, |s| s.oom_errors),
        plateaued: !second.is_empty() && b - a <= (0.05 * a).max(1.0),
    }
}

/// Prints the table and the plateau, and writes the JSON to `json_path`, the markdown and
/// the SVG beside it.
pub(crate) fn publish(run: &SoakRun, json_path: &Path) -> anyhow::Result<()> {
    let args = run.args;
    let p = plateau(run.samples, args.retention.as_secs_f64());
    let table = markdown_table(run.samples);
    let svg_path = json_path.with_extension("svg");
    let md_path = json_path.with_extension("md");
    let verdict = format!(
        "Master used_memory in the steady state (t ≥ {:.0} s): max {:.2} MB in the first half, {:.2} MB in the second (min {:.2}): growth {:+.2} MB, {}. Peak {:.2} MB of maxmemory {}; {:.2} MB at the end of the tail. Keys: max {} / {} (halves), {} at the end. OOM replies: {}. Server RSS peak {:.1} MB.",
        p.steady_from_s,
        p.first_half_max_mb,
        p.second_half_max_mb,
        p.second_half_min_mb,
        p.growth_mb,
        if p.plateaued {
            "plateau"
        } else {
            "NOT a plateau"
        },
        p.peak_mb,
        args.maxmemory,
        p.end_mb,
        p.first_half_max_keys,
        p.second_half_max_keys,
        p.end_keys,
        p.oom_errors,
        p.peak_server_rss_mb,
    );
    println!();
    println!("{table}");
    println!("{verdict}");
    let c = run.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let mut latency = run.tally.lat_accepted_us.clone();
    let summary = json!({
        "generated_at_unix_ms": now_ms(),
        "machine": machine(),
        "args": args,
        "topology": {
            "master_port": run.topology.master_port,
            "master_nice": run.topology.master_nice,
            "replicas": run.topology.stack.redis_ports().len() - 1,
            "maxmemory": args.maxmemory,
            "maxmemory_policy": "noeviction",
        },
        "plateau": p,
        "auctions": {
            "opened": load(&c.opened),
            "open_failed": load(&c.open_failed),
            "closed_seen": run.tally.closed.len(),
        },
        "honest": {
            "sent": load(&c.honest_sent),
            "publish_errors": load(&c.honest_errors),
            "not_sent_no_open_auction": load(&c.no_open_auction),
            "accepted": run.tally.accepted,
            "rejected": run.tally.rejected,
            "latency_accepted_ms": percentiles_ms(&mut latency),
        },
        "flood": { "sent": load(&c.flood_sent), "publish_errors": load(&c.flood_errors) },
        "skipped_sends": load(&c.skipped),
        "server": {
            "peak_rss_mb": run.server_peak_rss_mb,
            "exit_code": run.server_exit_code,
            "counters": run.server_counters,
        },
        "samples": run.samples,
        "svg": svg_path.display().to_string(),
        "elapsed_s": run.started.elapsed().as_secs_f64(),
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(json_path, serde_json::to_string_pretty(&summary)?)?;
    std::fs::write(&md_path, format!("{table}\n{verdict}\n"))?;
    std::fs::write(&svg_path, svg(run.samples, args))?;
    println!(
        "JSON: {}   markdown: {}   chart: {}",
        json_path.display(),
        md_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// One row every [`TABLE_EVERY_S`] seconds, and the last sample.
fn markdown_table(samples: &[Sample]) -> String {
    let mut out = String::from(
        "| t (s) | phase | used_memory MB (master / replicas) | keys | OOM | server RSS MB | auctions opened / closed / open | honest sent | accepted | shed | other rejections | flood sent |\n|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    let mut next_row = 0.0;
    for (i, s) in samples.iter().enumerate() {
        let last = i + 1 == samples.len();
        if s.t_s + 0.5 < next_row && !last {
            continue;
        }
        next_row += TABLE_EVERY_S;
        let mem: Vec<String> = s.used_memory_mb.iter().map(|m| format!("{m:.1}")).collect();
        let _ = writeln!(
            out,
            "| {:.0} | {} | {} | {} | {} | {:.1} | {} / {} / {} | {} | {} | {} | {} | {} |",
            s.t_s,
            if s.load { "load" } else { "tail" },
            mem.join(" / "),
            s.keys,
            s.oom_errors,
            s.server_rss_mb,
            s.auctions_opened,
            s.auctions_closed,
            s.auctions_live,
            s.honest_sent,
            s.honest_accepted,
            s.honest_shed,
            s.honest_rejected_other,
            s.flood_sent
        );
    }
    out
}

/// Chart geometry: the plot area inside the SVG.
const WIDTH: f64 = 900.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const GAP: f64 = 60.0;

/// A line of the chart: label, colour and one value per sample.
struct Series<'a> {
    label: &'a str,
    colour: &'a str,
    values: Vec<f64>,
}

/// Two panels over time: memory (master and replicas `used_memory`, server RSS, MB) and
/// the master's keys; a dashed line where the load stops.
fn svg(samples: &[Sample], args: &Args) -> String {
    let t: Vec<f64> = samples.iter().map(|s| s.t_s).collect();
    let t_max = t.last().copied().unwrap_or(1.0).max(1.0);
    let node = |i: usize| -> Vec<f64> {
        samples
            .iter()
            .map(|s| s.used_memory_mb.get(i).copied().unwrap_or(0.0))
            .collect()
    };
    let memory = [
        Series {
            label: "master used_memory",
            colour: "#1f77b4",
            values: node(0),
        },
        Series {
            label: "replica 1 used_memory",
            colour: "#9ecae1",
            values: node(1),
        },
        Series {
            label: "replica 2 used_memory",
            colour: "#c6dbef",
            values: node(2),
        },
        Series {
            label: "server RSS",
            colour: "#ff7f0e",
            values: samples.iter().map(|s| s.server_rss_mb).collect(),
        },
    ];
    let keys = [Series {
        label: "keys (DBSIZE)",
        colour: "#2ca02c",
        values: samples.iter().map(|s| s.keys as f64).collect(),
    }];
    let height = TOP + 2.0 * PANEL_H + GAP + 50.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"24\" font-size=\"15\">Soak: {:.0} s of load, {:.0} s of tail; maxmemory {} (noeviction), RETENTION {} s</text>\n",
        args.duration.as_secs_f64(),
        t_max - args.duration.as_secs_f64(),
        args.maxmemory,
        args.retention.as_secs_f64()
    );
    let load_end = args.duration.as_secs_f64();
    panel(&mut out, TOP, "MB", &t, t_max, load_end, &memory);
    panel(
        &mut out,
        TOP + PANEL_H + GAP,
        "keys",
        &t,
        t_max,
        load_end,
        &keys,
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since the load started (s)</text>\n</svg>",
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        height - 12.0
    );
    out
}

/// One panel at `top`: axes with 5 ticks each, the y label, a polyline per series and
/// its legend, and the dashed end-of-load line.
fn panel(
    out: &mut String,
    top: f64,
    y_label: &str,
    t: &[f64],
    t_max: f64,
    load_end: f64,
    series: &[Series],
) {
    let w = WIDTH - LEFT - RIGHT;
    let y_max = nice_ceiling(
        series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .fold(0.0, f64::max),
    );
    let x = |v: f64| LEFT + w * v / t_max;
    let y = |v: f64| top + PANEL_H - PANEL_H * v / y_max;
    let bottom = top + PANEL_H;
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{w}\" height=\"{PANEL_H}\" fill=\"none\" stroke=\"#444\"/>"
    );
    for k in 0..=5 {
        let (tv, yv) = (t_max * k as f64 / 5.0, y_max * k as f64 / 5.0);
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" y1=\"{bottom}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#444\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{tv:.0}</text>\n<line x1=\"{LEFT}\" y1=\"{3:.1}\" x2=\"{4}\" y2=\"{3:.1}\" stroke=\"#ddd\"/><text x=\"{5}\" y=\"{6:.1}\" text-anchor=\"end\">{7}</text>",
            x(tv),
            bottom + 5.0,
            bottom + 18.0,
            y(yv),
            LEFT + w,
            LEFT - 6.0,
            y(yv) + 4.0,
            fmt_tick(yv)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{0:.1}\" transform=\"rotate(-90 18 {0:.1})\" text-anchor=\"middle\">{y_label}</text>\n<line x1=\"{1:.1}\" y1=\"{top}\" x2=\"{1:.1}\" y2=\"{bottom}\" stroke=\"#888\" stroke-dasharray=\"5,4\"/><text x=\"{2:.1}\" y=\"{3}\" fill=\"#888\">load ends</text>",
        top + PANEL_H / 2.0,
        x(load_end),
        x(load_end) + 4.0,
        top + 14.0
    );
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> = t
            .iter()
            .zip(&s.values)
            .map(|(&tv, &v)| format!("{:.1},{:.1}", x(tv), y(v)))
            .collect();
        let ly = top + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{0}\" stroke-width=\"1.5\" points=\"{1}\"/>\n<line x1=\"{2}\" y1=\"{3:.1}\" x2=\"{4}\" y2=\"{3:.1}\" stroke=\"{0}\" stroke-width=\"3\"/><text x=\"{5}\" y=\"{6:.1}\">{7}</text>",
            s.colour,
            points.join(" "),
            LEFT + w + 10.0,
            ly - 4.0,
            LEFT + w + 30.0,
            LEFT + w + 36.0,
            ly,
            s.label
        );
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `v` (1 for 0).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * mag)
}

/// A tick label: no decimals from 10 up, else one.
fn fmt_tick(v: f64) -> String {
    if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
