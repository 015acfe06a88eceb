//! The plan: which steps a scenario runs. Owns [`StepConfig`], one configuration to
//! measure, and turns the command line's [`Scenario`] into groups of steps (one group per
//! curve of the report).

use std::time::Duration;

use serde::Serialize;

use crate::{Args, Scenario, fmt_spread};

/// Deadline spread of the `auctions` scenario's second 10,000-auction step.
const SPREAD_STEP: Duration = Duration::from_secs(10);

/// One configuration to measure.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct StepConfig {
    pub(crate) bidders: usize,
    pub(crate) auctions: usize,
    /// 0 = flat out.
    pub(crate) rate: u64,
    pub(crate) window: u64,
    pub(crate) wait_replicas: u32,
    #[serde(with = "crate::secs")]
    pub(crate) warmup: Duration,
    #[serde(with = "crate::secs")]
    pub(crate) duration: Duration,
    /// Auction i of n has its deadline `spread × i / n` after the common one (0 = a burst).
    #[serde(with = "crate::secs")]
    pub(crate) deadline_spread: Duration,
    /// Bids signed by registered bidders, the server at `BID_AUTH=required`.
    pub(crate) signed: bool,
}

impl StepConfig {
    pub(crate) fn label(&self) -> String {
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
        let signed = if self.signed { ", signed" } else { "" };
        format!(
            "{rate}, {} bidders, {} auctions, WAIT {}{spread}{signed}",
            self.bidders, self.auctions, self.wait_replicas
        )
    }

    /// Whether the step can compete for the throughput and ratio targets' ceiling: one
    /// auction, `WAIT 1`, flat out or offered at least 10,000 bids/s. These steps get their
    /// own `EVAL -P 1` baseline just before and just after them.
    pub(crate) fn competes_for_ceiling(&self) -> bool {
        self.auctions == 1 && self.wait_replicas == 1 && (self.rate == 0 || self.rate >= 10_000)
    }
}

/// The steps of one curve.
pub(crate) struct Group {
    pub(crate) name: &'static str,
    pub(crate) steps: Vec<StepConfig>,
}

pub(crate) fn plan(args: &Args) -> Vec<Group> {
    let mut groups = groups(args);
    if args.signed {
        // Each step, then its signed twin: adjacent, so the machine is in the same state.
        for g in &mut groups {
            g.steps = g
                .steps
                .drain(..)
                .flat_map(|s| {
                    let signed = StepConfig {
                        signed: true,
                        ..s.clone()
                    };
                    [s, signed]
                })
                .collect();
        }
    }
    groups
}

fn groups(args: &Args) -> Vec<Group> {
    let base = StepConfig {
        bidders: args.bidders,
        auctions: args.auctions,
        rate: args.rate,
        window: args.window,
        wait_replicas: args.wait_replicas,
        warmup: args.warmup,
        duration: args.duration,
        deadline_spread: args.deadline_spread,
        signed: false,
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
        // Not steps: run by crate::soak.
        Scenario::Soak => Vec::new(),
    }
}
