//! The test kit: real processes on loopback for the integration tests, the demo and the
//! benchmark. A dev-dependency only, so nothing here (temporary directories, panicking
//! helpers) reaches the shipped binaries.
//!
//! - [`DevStack`] ([`stack`]): a Redis master, replicas and Sentinels of real `redis-server`
//!   processes, shaped by [`DevStackConfig`] ([`config`]), each process a `node` started on
//!   a [`free_port`] ([`port`]) and checked ready by the probes in `probe`.
//! - [`Process`] ([`process`]): our own binaries as child processes, logs kept, killed on drop.
//! - [`Network`] ([`net`]): hosts in network namespaces of their own that a test can cut
//!   apart and heal (partitions); a stack, servers and bidders can run on it.
//! - [`Recorder`] ([`recorder`]): every event on the event channel, through failovers.
//! - [`eventually`] ([`mod@eventually`]): the one bounded wait with a reason; [`info_field`]
//!   reads an `INFO` reply.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod eventually;
mod logfile;
pub mod net;
mod node;
pub mod port;
mod probe;
pub mod process;
pub mod recorder;
pub mod stack;

pub use config::{DevStackConfig, WIRE_LIMITS};
pub use eventually::{eventually, eventually_every};
pub use net::{Host, Network, host_of};
pub use port::free_port;
pub use probe::info_field;
pub use process::{Paused, Process};
pub use recorder::Recorder;
pub use stack::DevStack;

/// Every process binds here and only here: the stack must never be reachable
/// from outside the machine, and Sentinel announces what it sees, so a single
/// address keeps the announced and the configured addresses identical.
const LOOPBACK: &str = "127.0.0.1";
/// Lines of each log shown by [`DevStack::logs`] and in start-up errors.
const LOG_TAIL_LINES: usize = 60;
