//! What a model run explores: how many servers, replicas, bids, failovers and crashes, and
//! the bounds on tokens and replication lag that keep it finite.

use crate::redis::{BidId, MAX_BIDS};

/// A bid in the configuration: who places it and for how much (amounts are 1..=3, the
/// starting price 1 and the increment 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bid {
    /// The bidder, numbered from 0.
    pub bidder: u8,
    /// The amount.
    pub amount: u8,
}

/// The bounds of one exploration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Auction servers.
    pub servers: u8,
    /// Redis replicas beside the master.
    pub replicas: u8,
    /// Every bid, in each bidder's order (a bidder places its next bid once its previous
    /// one has an outcome, and republishes the outstanding one until then).
    pub bids: Vec<Bid>,
    /// Sentinel failovers allowed.
    pub failovers: u8,
    /// Server crashes (each followed at once by a restart with an empty memory) allowed.
    pub crashes: u8,
    /// Leases that may expire while their holder still counts on them (a holder paused
    /// past its lease, or whose renewals do not get through). A lease whose holder crashed
    /// or already knows it lost it always expires in the end; these are the adversarial
    /// ones, and bounding them bounds the handovers, and so the tokens.
    pub expiries: u8,
    /// Most writes the master may be ahead of its slowest replica: bounds the replication
    /// backlog (a write that would exceed it waits until a replica catches up), and so
    /// what one failover can lose.
    pub max_lag: u8,
}

impl Config {
    /// The configuration CI checks exhaustively: 2 servers, a master and 1 replica,
    /// 2 bidders with 3 bids (two of them equal), 1 failover, 1 crash.
    pub fn ci() -> Self {
        Self {
            servers: 2,
            replicas: 1,
            bids: vec![
                Bid {
                    bidder: 0,
                    amount: 2,
                },
                Bid {
                    bidder: 1,
                    amount: 2,
                },
                Bid {
                    bidder: 1,
                    amount: 3,
                },
            ],
            failovers: 1,
            crashes: 1,
            expiries: 1,
            max_lag: 3,
        }
    }

    /// The opt-in bigger configuration: 3 servers and 2 replicas (so a failover chooses
    /// between replicas at different offsets and a group commit's `WAIT 1` may be answered
    /// by either), otherwise as [`Config::ci`]. Override any bound with `MODEL_BIG_*`
    /// variables (see NOTES.md).
    pub fn big() -> Self {
        let mut c = Self::ci();
        c.servers = 3;
        c.replicas = 2;
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u8>().ok());
        if let Some(n) = var("MODEL_BIG_FAILOVERS") {
            c.failovers = n;
        }
        if let Some(n) = var("MODEL_BIG_CRASHES") {
            c.crashes = n;
        }
        if let Some(n) = var("MODEL_BIG_EXPIRIES") {
            c.expiries = n;
        }
        if var("MODEL_BIG_FOURTH_BID").is_some_and(|n| n > 0) {
            c.bids.push(Bid {
                bidder: 0,
                amount: 3,
            });
        }
        c
    }

    /// The number of bidders.
    pub fn bidders(&self) -> u8 {
        self.bids.iter().map(|b| b.bidder + 1).max().unwrap_or(0)
    }

    /// Bidder `k`'s bids, in order.
    pub fn script(&self, k: u8) -> impl Iterator<Item = BidId> + '_ {
        self.bids
            .iter()
            .enumerate()
            .filter(move |(_, b)| b.bidder == k)
            .map(|(i, _)| i as BidId)
    }

    /// Checks the bounds the model's fixed-size fields rely on.
    pub fn validate(&self) -> Result<(), String> {
        if self.bids.len() > MAX_BIDS {
            return Err(format!("at most {MAX_BIDS} bids, got {}", self.bids.len()));
        }
        if self.servers == 0 || self.replicas == 0 || self.max_lag == 0 {
            return Err("needs a server, a replica and a lag of at least one write".into());
        }
        Ok(())
    }
}
