//! The protocol as it lives inside Redis: each file owns its Lua scripts (beside it in a
//! folder of the same name) and the Rust that calls them. Uses [`crate::link`],
//! [`crate::keyspace`] and [`crate::wire`]; knows nothing of servers, routers or workers.
//!
//! - [`lock`]: the per-auction lease (`SET NX PX`, value `OWNER#TOKEN`), renewed and
//!   released by compare-and-set, and the fence every write checks.
//! - [`bidders`]: bidder identities: registered keys, and the signature a bid carries.
//! - [`ledger`]: an auction's state (open, judge bids in batches, close) changed only by
//!   fenced scripts, with idempotent outcomes per `bid_id`.

pub mod bidders;
pub mod ledger;
pub mod lock;
