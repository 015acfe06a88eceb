//! Real-time auctions on Redis with a distributed mutual-exclusion protocol at the core.
//!
//! The library is layered; each folder's own tour says what lives there, and a layer uses
//! only the layers above it in this list:
//!
//! - [`runtime`]: the process around everything: configuration, `main` and shutdown,
//!   telemetry, trace propagation, metrics, owned tasks, backoff.
//! - [`wire`]: the versioned JSON on the Pub/Sub channels, validated at the boundary;
//!   [`keyspace`]: every Redis key, all of an auction's keys under one hash tag;
//!   [`proto`]: the generated gRPC API (`proto/auction/v1`).
//! - [`link`]: reaching Redis: the master found (and re-found) through Sentinel,
//!   subscriptions that follow it, script replies.
//! - [`store`]: the protocol inside Redis: the fenced per-auction lease ([`store::lock`]),
//!   the auction state changed only by fenced Lua scripts ([`store::ledger`]), and bidder
//!   keys and bid signatures ([`store::bidders`]).
//! - [`control`]: gRPC plumbing both binaries serve (health that follows the data plane,
//!   reflection) and the event hub behind live watches.
//! - [`server`]: the auction server: a bid's path from intake through the router to the
//!   worker that judges it and the announcer that publishes the outcome; closes, leases,
//!   and the admin API.
//! - [`bidder`]: the automatic bidder behind `auction-client`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bidder;
pub mod control;
pub mod keyspace;
pub mod link;
pub mod proto;
pub mod runtime;
pub mod server;
pub mod store;
pub mod wire;
