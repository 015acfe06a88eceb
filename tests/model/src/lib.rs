//! A model of the auction protocol, checked exhaustively with [`stateright`] (issue 17).
//!
//! The chaos test samples a few interleavings per run; this crate checks all of them, for
//! small bounds. A tour, bottom up:
//!
//! - [`redis`]: one auction's keys on each Redis node, asynchronous replication as a
//!   prefix of the master's writes, Sentinel failover, the shared clock.
//! - [`scripts`]: the Lua scripts (`acquire`, `renew`, `place_bids`, `close`, and the
//!   fence functions every writing script starts with), each one atomic step.
//! - [`system`]: servers (worker, lease keeper, closer, announcer with its group commit),
//!   bidders that retry the same `bid_id`, and the actions the checker interleaves.
//! - [`properties`]: what must hold in every reachable state (and the one liveness claim).
//! - [`mutation`]: seeded one-line defects the checker must catch.
//! - [`symmetry`]: servers are interchangeable; one state per renaming class.
//! - [`check`]: runs the checker and collects state counts and readable traces.
//!
//! It uses stateright's `Model` trait rather than its actor framework: the protocol's
//! messages all go through Redis, whose scripts are atomic steps, so a plain state machine
//! says the same with far fewer states.

#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod mutation;
pub mod properties;
pub mod redis;
pub mod scripts;
pub mod symmetry;
pub mod system;
pub mod trace;

pub use config::Config;
pub use mutation::Mutation;
pub use system::Protocol;
