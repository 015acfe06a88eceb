//! What a step measured: [`StepResult`] and its parts, as they go into the JSON summary
//! (field order is the JSON's), with the percentiles of latency samples and the one-line
//! account printed after each step.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::StepConfig;

#[derive(Serialize, Default, Clone)]
pub(crate) struct Percentiles {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

pub(crate) fn percentiles_ms(samples: &mut [u32]) -> Percentiles {
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
pub(crate) struct Closing {
    pub(crate) auctions: usize,
    pub(crate) closed_seen: usize,
    /// Not announced within the grace period: (closed in Redis but not announced, still open).
    pub(crate) missing_announced_closed: usize,
    pub(crate) missing_still_open: usize,
    /// `closed_at_ms` − deadline (both Redis clock), ms.
    pub(crate) lateness_ms: Percentiles,
    /// Arrival of `auction_closed` here (wall clock, same host) − deadline, ms.
    pub(crate) announce_lateness_ms: Percentiles,
    /// Deadlines spread (last − first), ms.
    pub(crate) deadline_spread_ms: u64,
    /// Server CPU from the end of the drain until every close was seen.
    pub(crate) server_cpu_s: f64,
    /// `INFO commandstats` of the master over the same period.
    pub(crate) commandstats: BTreeMap<String, BTreeMap<String, f64>>,
}

#[derive(Serialize, Clone, Default)]
pub(crate) struct ServerStats {
    pub(crate) pid: u32,
    pub(crate) cpu_s_window: f64,
    pub(crate) cpu_s_total: f64,
    /// Mean cores used during the window.
    pub(crate) cores_window: f64,
    pub(crate) peak_rss_mb: f64,
    pub(crate) cpu_us_per_accepted: f64,
    pub(crate) exit_code: Option<i32>,
    /// The server's own counters, from its shutdown log line.
    pub(crate) counters: Option<String>,
}

#[derive(Serialize, Clone, Default)]
pub(crate) struct RedisStats {
    pub(crate) master_cpu_s_window: f64,
    pub(crate) replicas_cpu_s_window: f64,
    /// `INFO commandstats` of the master over the window: calls, usec, usec_per_call.
    pub(crate) commandstats: BTreeMap<String, BTreeMap<String, f64>>,
    pub(crate) master_used_memory_mb: f64,
    /// Per data node over the window (index 0 = master).
    pub(crate) nodes: Vec<NodeStats>,
}

#[derive(Serialize, Clone)]
pub(crate) struct StepResult {
    pub(crate) step: u32,
    pub(crate) label: String,
    pub(crate) config: StepConfig,
    pub(crate) published: u64,
    pub(crate) published_in_window: u64,
    /// Scheduled sends skipped because the bidder was more than 1 s behind (open loop).
    pub(crate) not_sent: u64,
    pub(crate) publish_errors: u64,
    /// PUBLISH answered 0 receivers (the server was not subscribed).
    pub(crate) no_receiver: u64,
    pub(crate) published_per_s: f64,
    pub(crate) accepted_per_s: f64,
    pub(crate) outcomes_per_s: f64,
    pub(crate) accepted: u64,
    pub(crate) rejected: BTreeMap<String, u64>,
    /// Publish → bid_accepted, bids sent in the window.
    pub(crate) latency_accepted_ms: Percentiles,
    /// Publish → any outcome, bids sent in the window.
    pub(crate) latency_outcome_ms: Percentiles,
    /// Published, no outcome after the drain period.
    pub(crate) lost: u64,
    /// Announced bid_accepted, absent from the auction's stored history at the end.
    pub(crate) unconfirmed: u64,
    pub(crate) repeated_outcomes: u64,
    pub(crate) seq_gaps: u64,
    /// Accepted and all outcomes per second since the load started (warm-up included).
    pub(crate) per_second_accepted: Vec<u64>,
    pub(crate) per_second_outcomes: Vec<u64>,
    pub(crate) open_phase_s: f64,
    pub(crate) opens_per_s: f64,
    pub(crate) drain_s: f64,
    pub(crate) closing: Closing,
    pub(crate) server: ServerStats,
    pub(crate) redis: RedisStats,
    pub(crate) bench_cpu_s_window: f64,
    /// Longest lateness of a 5 ms timer in this process during the window.
    pub(crate) bench_loop_lag_ms: f64,
    /// Round trips measured on a separate connection during the window.
    pub(crate) probe: Probe,
    /// Whole-machine CPU during the window (other = not the server, Redis or this process).
    pub(crate) machine: MachineWindow,
    /// Script calls (EVAL/EVALSHA) per outcome, from commandstats.
    pub(crate) script_calls_per_outcome: f64,
    /// `redis-benchmark` `EVAL -P 1` on the same master just before and just after this
    /// step, for the steps that compete for the ratio target
    /// ([`StepConfig::competes_for_ceiling`]). This machine's speed drifts by ±15 % over
    /// minutes, so the ratio is taken against the baseline measured beside the step, not
    /// minutes earlier.
    pub(crate) eval_p1_adjacent: Option<Adjacent>,
}

impl StepResult {
    /// The `EVAL -P 1` rate this step's ratio divides by: the mean of its neighbouring runs
    /// where they were measured, else the run's start (`run_start`).
    pub(crate) fn eval_baseline(&self, run_start: f64) -> f64 {
        self.eval_p1_adjacent
            .as_ref()
            .map_or(run_start, |a| a.mean_rps)
    }

    pub(crate) fn saturated(&self) -> bool {
        self.config.rate > 0
            && (self.outcomes_per_s < 0.9 * self.config.rate as f64
                || self.lost > 0
                || self.latency_outcome_ms.p99 > 1000.0)
    }

    pub(crate) fn one_line(&self) -> String {
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

#[derive(Serialize, Clone)]
pub(crate) struct Adjacent {
    pub(crate) before_rps: f64,
    pub(crate) after_rps: f64,
    pub(crate) mean_rps: f64,
}

#[derive(Serialize, Clone, Default)]
pub(crate) struct MachineWindow {
    pub(crate) busy_cores: f64,
    pub(crate) other_cores: f64,
    pub(crate) loadavg_1m: f64,
}

#[derive(Serialize, Clone, Default)]
pub(crate) struct Probe {
    /// PING on the master.
    pub(crate) ping_ms: Percentiles,
    /// `WAIT n 1000` right after a `SET` on the master (n = max(WAIT_REPLICAS, 1)).
    pub(crate) wait_ms: Percentiles,
}

/// CPU and persistence counters of a data node: as sampled
/// ([`crate::stats::node_stats`]), or over the window ([`NodeStats::since`]).
#[derive(Serialize, Clone, Default)]
pub(crate) struct NodeStats {
    pub(crate) port: u16,
    pub(crate) cpu_s: f64,
    pub(crate) aof_delayed_fsync: f64,
    pub(crate) forks: f64,
    pub(crate) aof_rewrites: f64,
    /// `LATENCY LATEST` (threshold 10 ms): event, latest ms, max ms.
    pub(crate) latency_events: Vec<(String, u64, u64)>,
}

impl NodeStats {
    /// The counters from the sample `start` to this one; the latency events are this
    /// sample's (the monitor is reset at the window's start).
    pub(crate) fn since(&self, start: &NodeStats) -> NodeStats {
        NodeStats {
            port: self.port,
            cpu_s: self.cpu_s - start.cpu_s,
            aof_delayed_fsync: self.aof_delayed_fsync - start.aof_delayed_fsync,
            forks: self.forks - start.forks,
            aof_rewrites: self.aof_rewrites - start.aof_rewrites,
            latency_events: self.latency_events.clone(),
        }
    }
}
