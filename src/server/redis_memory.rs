//! Redis memory as metrics: the master's `used_memory` and `maxmemory`, read with
//! `INFO memory` every [`POLL_EVERY`], exported as `auction_redis_used_memory_bytes` and
//! `auction_redis_maxmemory_bytes`, with a warning in the log when use crosses
//! [`WARN_AT`] of `maxmemory`.
//!
//! The system is meant to run for months on one master, so memory is what ends it if
//! something grows without bound (retention set too long for the load, a flood of bids on
//! real auctions). At `maxmemory` Redis refuses writes (`noeviction`) and every bid is
//! refused with it; the warning comes early enough to act. It is logged once per crossing,
//! not at every poll, and re-armed only when use falls back below [`REARM_AT`], so a level
//! hovering at the threshold does not flood the log. One `INFO` every few seconds costs the
//! master nothing measurable.

use std::sync::Arc;
use std::time::Duration;

use redis::InfoDict;
use tracing::{debug, info, warn};

use crate::link::sentinel::Master;
use crate::runtime::metrics::Metrics;

/// How often the master's memory is read.
pub const POLL_EVERY: Duration = Duration::from_secs(5);
/// Share of `maxmemory` above which a warning is logged.
pub const WARN_AT: f64 = 0.80;
/// Share of `maxmemory` below which the warning is armed again.
pub const REARM_AT: f64 = 0.75;

/// The master's memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// `used_memory`.
    pub used: u64,
    /// `maxmemory`; 0 means no limit.
    pub max: u64,
}

impl Memory {
    /// Reads the two fields of an `INFO memory` answer.
    pub fn from_info(info: &InfoDict) -> Result<Memory, String> {
        let field = |name: &str| {
            info.get::<u64>(name)
                .ok_or_else(|| format!("INFO memory has no numeric {name} field"))
        };
        Ok(Memory {
            used: field("used_memory")?,
            max: field("maxmemory")?,
        })
    }

    /// Used memory as a share of `maxmemory`; `None` without a limit.
    pub fn share(&self) -> Option<f64> {
        (self.max > 0).then(|| self.used as f64 / self.max as f64)
    }
}

/// Whether the warning is due: raised once when use goes above [`WARN_AT`], armed again
/// when it falls below [`REARM_AT`].
#[derive(Debug, Default)]
pub struct Alarm {
    raised: bool,
}

/// A change [`Alarm::observe`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossing {
    /// Use went above [`WARN_AT`] of `maxmemory`.
    Above,
    /// Use fell back below [`REARM_AT`] (or the limit was lifted).
    Below,
}

impl Alarm {
    /// Takes one reading; returns the crossing it makes, if any.
    pub fn observe(&mut self, memory: Memory) -> Option<Crossing> {
        let share = memory.share().unwrap_or(0.0);
        if !self.raised && share > WARN_AT {
            self.raised = true;
            return Some(Crossing::Above);
        }
        if self.raised && share < REARM_AT {
            self.raised = false;
            return Some(Crossing::Below);
        }
        None
    }
}

/// Polls the master's memory until dropped (its owner aborts it).
pub async fn run(master: Master, metrics: Arc<Metrics>) {
    let mut alarm = Alarm::default();
    let mut told_noperm = false;
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let memory = match read(&master).await {
            Ok(memory) => memory,
            // A refusal by the ACL is this task's alone to report, once; an unreachable
            // master is reported by health already.
            Err(Unread::NoPerm(e)) if !told_noperm => {
                told_noperm = true;
                warn!(error = %e, "INFO refused: the server's Redis ACL user needs +info for the memory metrics (deploy/base/redis/users.acl); the metrics stay at their last value");
                continue;
            }
            Err(e) => {
                debug!(error = %e, "could not read the Redis master's memory; retrying at the next poll");
                continue;
            }
        };
        metrics.redis_used_memory.set(clamp(memory.used));
        metrics.redis_maxmemory.set(clamp(memory.max));
        match alarm.observe(memory) {
            Some(Crossing::Above) => warn!(
                used_bytes = memory.used,
                maxmemory_bytes = memory.max,
                "Redis master memory above {:.0}% of maxmemory: at maxmemory it refuses writes and every bid fails; shorten RETENTION, raise maxmemory, or look for what grows (auction_redis_used_memory_bytes)",
                WARN_AT * 100.0
            ),
            Some(Crossing::Below) => info!(
                used_bytes = memory.used,
                maxmemory_bytes = memory.max,
                "Redis master memory back below {:.0}% of maxmemory",
                REARM_AT * 100.0
            ),
            None => {}
        }
    }
}

/// Why a poll read nothing.
#[derive(Debug, thiserror::Error)]
enum Unread {
    #[error("{0}")]
    NoPerm(redis::RedisError),
    #[error("{0}")]
    Other(String),
}

async fn read(master: &Master) -> Result<Memory, Unread> {
    let link = master
        .link(POLL_EVERY)
        .await
        .map_err(|e| Unread::Other(e.to_string()))?;
    let mut conn = link.conn.clone();
    // The connection's response timeout bounds this call.
    let info: InfoDict = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .map_err(|e| {
            master.report(link.generation, &e);
            if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) {
                Unread::NoPerm(e)
            } else {
                Unread::Other(e.to_string())
            }
        })?;
    Memory::from_info(&info).map_err(Unread::Other)
}

fn clamp(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn at(used: u64, max: u64) -> Memory {
        Memory { used, max }
    }

    #[test]
    fn reads_the_two_fields_of_info_memory() {
        let info = InfoDict::new(
            "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nmaxmemory:67108864\r\nmaxmemory_policy:noeviction\r\n",
        );
        assert_eq!(Memory::from_info(&info), Ok(at(MB, 64 * MB)));
        let err = Memory::from_info(&InfoDict::new("# Memory\r\nused_memory:12\r\n"))
            .expect_err("no maxmemory");
        assert!(err.contains("maxmemory"), "{err}");
    }

    #[test]
    fn warns_once_per_crossing_not_at_every_poll() {
        let mut alarm = Alarm::default();
        let readings = [
            (50, None),
            (81, Some(Crossing::Above)),
            (90, None),
            (99, None),
            (78, None), // between the thresholds: still raised, no flapping
            (85, None),
            (70, Some(Crossing::Below)),
            (60, None),
            (82, Some(Crossing::Above)),
        ];
        for (percent, want) in readings {
            assert_eq!(
                alarm.observe(at(percent * MB, 100 * MB)),
                want,
                "{percent}%"
            );
        }
    }

    #[test]
    fn no_limit_means_no_warning() {
        let mut alarm = Alarm::default();
        assert_eq!(alarm.observe(at(u64::MAX / 2, 0)), None);
        assert_eq!(at(10, 0).share(), None);
    }
}
