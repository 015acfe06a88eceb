//! Durable acknowledgement: `WAIT` for replicas before an outcome is announced, as a group
//! commit.
//!
//! `WAIT` covers every write made earlier on the same connection, and all writers share one
//! multiplexed connection per master generation, so one `WAIT` can vouch for every request
//! queued while the previous one was in flight. A request made against an older generation
//! (the master changed since the write) cannot be vouched for by a `WAIT` on the new
//! connection and is answered [`NotDurable::MasterChanged`]; the caller then stays silent
//! and the bidder's retry (same `bid_id`) gets the stored outcome announced later.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::sentinel::Master;
use crate::task::TaskGuard;

/// Why a write cannot be announced yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotDurable {
    /// Fewer replicas acknowledged than required within the timeout.
    #[error("only {acked} of {wanted} replicas acknowledged in time")]
    Shortfall {
        /// Replicas that acknowledged.
        acked: u32,
        /// Replicas required.
        wanted: u32,
    },
    /// The master changed after the write; its fate is unknown.
    #[error("the master changed after the write")]
    MasterChanged,
    /// `WAIT` itself failed.
    #[error("WAIT failed: {0}")]
    Failed(String),
}

struct Request {
    generation: u64,
    reply: oneshot::Sender<Result<(), NotDurable>>,
}

/// Handle to the group-commit task.
#[derive(Clone)]
pub struct Replication {
    tx: mpsc::Sender<Request>,
    replicas: u32,
    _task: std::sync::Arc<TaskGuard>,
}

impl Replication {
    /// Starts the task. With `replicas == 0` every wait succeeds at once.
    pub fn start(master: Master, replicas: u32, wait_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let task = tokio::spawn(run(master, replicas, wait_timeout, rx));
        Self {
            tx,
            replicas,
            _task: std::sync::Arc::new(TaskGuard::new("replication group commit", task)),
        }
    }

    /// Waits until everything written so far on the link of `generation` reached the
    /// required number of replicas.
    pub async fn wait(&self, generation: u64) -> Result<(), NotDurable> {
        if self.replicas == 0 {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { generation, reply })
            .await
            .map_err(|_| NotDurable::Failed("replication task stopped".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(NotDurable::Failed("replication task stopped".into())))
    }
}

async fn run(
    master: Master,
    replicas: u32,
    wait_timeout: Duration,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let Some(link) = master.current() else {
            for r in batch.drain(..) {
                let _ = r.reply.send(Err(NotDurable::MasterChanged));
            }
            continue;
        };
        let mut conn = link.conn.clone();
        let result = redis::cmd("WAIT")
            .arg(replicas)
            .arg(wait_timeout.as_millis() as u64)
            .query_async::<u32>(&mut conn)
            .await;
        let verdict = match result {
            Ok(acked) if acked >= replicas => Ok(()),
            Ok(acked) => {
                warn!(
                    acked,
                    wanted = replicas,
                    "replicas did not acknowledge in time; holding announcements back"
                );
                Err(NotDurable::Shortfall {
                    acked,
                    wanted: replicas,
                })
            }
            Err(e) => {
                master.report(link.generation, &e);
                Err(NotDurable::Failed(e.to_string()))
            }
        };
        debug!(batch = batch.len(), ?verdict, "group commit");
        // A failover may have started while WAIT was in flight: the replica that
        // acknowledged may be one the promoted replica will overwrite. The link is dropped
        // the moment a Sentinel announces the failover, so check again now.
        let still_current = master
            .current()
            .is_some_and(|l| l.generation == link.generation);
        for r in batch.drain(..) {
            let v = if r.generation == link.generation && still_current {
                verdict.clone()
            } else {
                Err(NotDurable::MasterChanged)
            };
            let _ = r.reply.send(v);
        }
    }
}
