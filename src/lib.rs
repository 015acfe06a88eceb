//! Real-time auctions on Redis with a distributed mutual-exclusion protocol at the core.
//!
//! A tour, from the wire inwards:
//!
//! - [`wire`]: the versioned JSON on the two Pub/Sub channels, validated at the boundary.
//! - [`keyspace`]: every Redis key, all of an auction's keys under one hash tag.
//! - [`sentinel`]: finding the master through Sentinel and re-finding it after failover.
//! - [`subscription`]: Pub/Sub subscriptions that follow the master.
//! - [`lock`]: the per-auction lease with fencing tokens checked inside Redis.
//! - [`ledger`]: auction state changed only by fenced Lua scripts.
//! - [`announcer`]: `WAIT` as a group commit, then events published in order, pipelined.
//! - [`lease_keeper`], [`close_batch`]: lease upkeep and closes, batched across auctions.
//! - [`worker`], [`router`], [`closer`], [`server`]: the auction server.
//! - [`bidder`]: the automatic bidder behind `auction-client`.
//! - [`telemetry`]: logs and traces.
//! - [`devstack`]: a local Redis + Sentinel topology of real processes, for demos and tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod announcer;
pub mod backoff;
pub mod bidder;
pub mod close_batch;
pub mod closer;
pub mod config;
pub mod devstack;
pub mod grpc;
pub mod health;
pub mod hub;
pub mod keyspace;
pub mod lease_keeper;
pub mod ledger;
pub mod lock;
pub mod metrics;
pub mod propagation;
pub mod proto;
pub mod router;
pub mod script;
pub mod sentinel;
pub mod server;
pub mod subscription;
pub mod task;
pub mod telemetry;
pub mod wire;
pub mod worker;

/// This machine's host name (the pod name on Kubernetes), or `"localhost"`.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Local wall-clock time in ms since the epoch (only for bounds, never for judging bids).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
