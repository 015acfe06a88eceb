//! Reaching Redis: everything above talks to the master through this layer, which uses only
//! [`crate::runtime`].
//!
//! - [`sentinel`]: the master found through Sentinel, confirmed with `ROLE`, and found again
//!   on connection loss, `READONLY`, `LOADING` or `+switch-master`.
//! - [`subscription`]: Pub/Sub subscriptions that follow the master and say when they are live.
//! - [`script`]: Lua scripts (EVALSHA, reloaded on NOSCRIPT) and decoding their replies.

pub mod script;
pub mod sentinel;
pub mod subscription;
