//! The gRPC side both binaries share, below the server and the bidder; uses
//! [`crate::link`], [`crate::wire`] and [`crate::runtime`].
//!
//! - [`grpc`]: one listener serving `grpc.health.v1`, reflection (v1 and v1alpha) and any
//!   extra services until shutdown.
//! - [`health`]: health that follows the data plane (master reachable, subscriptions live).
//! - [`hub`]: the event channel fanned out to live `WatchAuction` streams, subscribed only
//!   while someone watches.

pub mod grpc;
pub mod health;
pub mod hub;
