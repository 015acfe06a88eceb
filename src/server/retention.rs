//! The retention sweeper: takes closed auctions whose retention ran out out of the indexes.
//!
//! A close sets every key of the auction to expire `RETENTION` later and records the auction
//! in `auctions:closed`, scored by that time (`store/ledger/close.lua`). Redis deletes the
//! keys by itself; the index entries are this task's job: every [`period`] it forgets the
//! due ones (`ledger::forget_expired`, one script call per [`BATCH`], by Redis time), so
//! `auctions:all` and `auctions:closed` hold only auctions that still exist, and Redis
//! memory stays bounded by the auctions closed within one retention. Every server runs one;
//! the script is idempotent, so several at once cost a few round trips and nothing else.
//! A tick forgets at most [`BATCH`] × [`CALLS_PER_TICK`], so a backlog (say, after every
//! server was down for a day) is worked off in short steps instead of one long call.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::link::sentinel::Master;
use crate::runtime::metrics::{Metrics, add};
use crate::store::ledger::{self, Retention};

/// Most auctions forgotten by one script call (bounds how long Redis is busy with it).
pub const BATCH: usize = 1000;
/// Most script calls per tick.
pub const CALLS_PER_TICK: usize = 20;

/// Time between sweeps: a tenth of the retention, between 1 s and 1 min, so an index entry
/// outlives its auction's keys by a small fraction of the retention.
pub fn period(retention: Retention) -> Duration {
    (retention.duration() / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Sweeps every [`period`] until dropped (its owner aborts it; an interrupted sweep is
/// simply done again by the next one).
pub async fn run(master: Master, retention: Retention, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(period(retention));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told_failure = false;
    loop {
        tick.tick().await;
        match sweep(&master).await {
            Ok(n) => {
                // A refusal is reported once per spell of refusals.
                told_failure = false;
                if n > 0 {
                    add(&metrics.auctions_forgotten, n as u64);
                    debug!(
                        forgotten = n,
                        "closed auctions past their retention taken out of the indexes"
                    );
                }
            }
            Err(Failure::MasterGone(e)) => {
                debug!(error = %e, "retention sweep skipped (no master); the next one catches up");
            }
            Err(Failure::Refused(e)) if !told_failure => {
                told_failure = true;
                warn!(error = %e, "retention sweep refused by Redis: closed auctions stay listed after their keys expired; check that the server's ACL user may use the key auctions:closed (deploy/base/redis/users.acl)");
            }
            Err(Failure::Refused(e)) => debug!(error = %e, "retention sweep refused again"),
        }
    }
}

/// Why a sweep did not complete.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    MasterGone(String),
    #[error("{0}")]
    Refused(redis::RedisError),
}

/// One sweep: forget due auctions, a batch at a time, until none is left or the tick's
/// share is done. Returns how many were forgotten.
async fn sweep(master: &Master) -> Result<usize, Failure> {
    let link = master
        .link(Duration::from_secs(1))
        .await
        .map_err(|e| Failure::MasterGone(e.to_string()))?;
    let mut conn = link.conn.clone();
    let mut total = 0;
    for _ in 0..CALLS_PER_TICK {
        let n = ledger::forget_expired(&mut conn, BATCH)
            .await
            .map_err(|e| {
                master.report(link.generation, &e);
                if crate::link::sentinel::is_master_gone(&e) {
                    Failure::MasterGone(e.to_string())
                } else {
                    Failure::Refused(e)
                }
            })?;
        total += n;
        if n < BATCH {
            break;
        }
    }
    if total >= BATCH * CALLS_PER_TICK {
        info!(
            forgotten = total,
            "retention backlog: more closed auctions are due; the next sweeps continue"
        );
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_a_tenth_of_the_retention_within_bounds() {
        let every = |s| period(Retention::new(Duration::from_secs(s)).expect("valid"));
        assert_eq!(every(1), Duration::from_secs(1));
        assert_eq!(every(100), Duration::from_secs(10));
        assert_eq!(every(7 * 24 * 3600), Duration::from_secs(60));
    }
}
