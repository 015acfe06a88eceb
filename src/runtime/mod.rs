//! The process around the library, used by every other layer and using none of them.
//!
//! - [`config`]: the settings both binaries share (Sentinels, master name, channels) and
//!   the parsers for durations and channel names.
//! - [`process`]: the body of both `main`s, the shutdown signal, listen addresses, host facts.
//! - [`telemetry`]: logs and traces (OTLP export when configured);
//!   [`propagation`]: W3C trace context carried inside Pub/Sub messages.
//! - [`metrics`]: Prometheus metrics and their endpoint.
//! - [`task`]: every spawned task has an owner that stops it; [`backoff`]: capped, jittered
//!   retry delays.

pub mod backoff;
pub mod config;
pub mod metrics;
pub mod process;
pub mod propagation;
pub mod task;
pub mod telemetry;
