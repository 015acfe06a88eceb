//! The auction server. A bid's path, in order:
//!
//! 1. [`intake`] reads the command channel, validates each message at the boundary and
//!    hands bids to the [`router`]; the gRPC [`admin`] API hands it opens and closes.
//! 2. The [`router`] keeps one [`queue`] per auction (fair between bidders) and starts a
//!    [`worker`] for it, which takes the auction's lease and judges its queued bids in
//!    batches (one fenced script call each, [`crate::store`]), speaking the vocabulary of
//!    [`work`]; with `BID_AUTH=required` it first checks each bid's signature against
//!    [`bidder_keys`], every registered bidder's key cached from Redis.
//! 3. The [`announcer`] makes each batch durable with one `WAIT` (group commit) and then
//!    publishes its events in `seq` order.
//! 4. The [`closer`] closes auctions at their deadline by Redis time, through the router
//!    (or the [`close_batch`]er for auctions nobody here holds); the [`lease_keeper`]
//!    renews every held lease in batched calls.
//! 5. Running for months: the [`retention`] sweeper takes closed auctions out of the
//!    indexes once their keys expired, [`redis_memory`] exports the master's memory and
//!    warns near `maxmemory`, and the router's shadows and close queues share one cap
//!    ([`kept`]).
//!
//! Bidders get keys from an operator (`RegisterBidder`) or enroll themselves under their own
//! host name ([`enroll`]'s rule, behind `EnrollBidder`).
//!
//! [`args`] is the configuration, [`context`] what the parts share, and the private
//! `wiring` starts the parts and stops them in order. Uses every lower layer
//! ([`crate::control`], [`crate::store`], [`crate::link`], [`crate::runtime`]).

use std::future::Future;

pub mod admin;
pub mod announcer;
pub mod args;
pub mod bidder_keys;
pub mod close_batch;
pub mod closer;
pub mod context;
pub mod enroll;
pub mod intake;
pub mod kept;
pub mod lease_keeper;
pub mod queue;
pub mod redis_memory;
pub mod retention;
pub mod router;
mod wiring;
pub mod work;
pub mod worker;

pub use args::ServerArgs;

/// Runs the server until `shutdown` resolves, then drains and returns.
pub async fn run(args: ServerArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    args.validate()?;
    // Bind first: a taken port is a configuration error to report before touching Redis.
    let listener = crate::runtime::process::listen(args.grpc_addr, "GRPC_ADDR").await?;
    let mut server = wiring::Server::start(&args, listener).await?;
    let rules = intake::Rules {
        control_channel: args.control_channel.clone(),
        seed_dialect: args.seed_dialect,
    };
    intake::run(
        &mut server.messages,
        &rules,
        &server.router,
        &server.metrics,
        &server.refusals,
        shutdown,
    )
    .await;
    server.stop(args.shutdown_grace).await;
    Ok(())
}
