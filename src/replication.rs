//! Durable acknowledgement: `WAIT` for replicas before an outcome is announced, as a group
//! commit.
//!
//! `WAIT` waits for the replication offset of the calling connection's last write. The
//! master has one replication stream, so a tiny write made *after* a caller's write — on
//! any connection — has a higher offset, and `WAIT` after it vouches for both. The group
//! commit therefore runs on its own connection: per round it writes a marker key
//! (`auctions:commit:OWNER`, expiring) and `WAIT`s, vouching for every request queued
//! before the round, across auctions, without ever blocking the shared data connection
//! (a `WAIT` blocks every later command on its connection). A request made against an older
//! master generation cannot be vouched for on the new master and is answered
//! [`NotDurable::MasterChanged`]; the caller then stays silent and the bidder's retry (same
//! `bid_id`) gets the stored outcome announced later.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
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
    /// Starts the task. With `replicas == 0` every wait succeeds at once. `owner` names
    /// this process's marker key.
    pub fn start(master: Master, replicas: u32, wait_timeout: Duration, owner: &str) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let marker = format!("auctions:commit:{owner}");
        let task = tokio::spawn(run(master, replicas, wait_timeout, marker, rx));
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
    marker: String,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut batch = Vec::new();
    let mut round = 0u64;
    // The dedicated connection, for one master generation.
    let mut commit: Option<(u64, MultiplexedConnection)> = None;
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
        if commit.as_ref().is_none_or(|(g, _)| *g != link.generation) {
            let opened = link
                .client()
                .get_multiplexed_async_connection_with_config(&master.settings().connection_config())
                .await;
            commit = match opened {
                Ok(conn) => Some((link.generation, conn)),
                Err(e) => {
                    master.report(link.generation, &e);
                    for r in batch.drain(..) {
                        let _ = r.reply.send(Err(NotDurable::Failed(e.to_string())));
                    }
                    continue;
                }
            };
        }
        let Some((_, conn)) = commit.as_mut() else { continue };
        round += 1;
        let result = redis::pipe()
            .cmd("SET")
            .arg(&marker)
            .arg(round)
            .arg("PX")
            .arg(60_000)
            .ignore()
            .cmd("WAIT")
            .arg(replicas)
            .arg(wait_timeout.as_millis() as u64)
            .query_async::<(u32,)>(conn)
            .await;
        let verdict = match result {
            Ok((acked,)) if acked >= replicas => Ok(()),
            Ok((acked,)) => {
                warn!(acked, wanted = replicas, "replicas did not acknowledge in time; holding announcements back");
                Err(NotDurable::Shortfall { acked, wanted: replicas })
            }
            Err(e) => {
                master.report(link.generation, &e);
                commit = None;
                Err(NotDurable::Failed(e.to_string()))
            }
        };
        debug!(batch = batch.len(), ?verdict, "group commit");
        // A failover may have started while WAIT was in flight: the replica that
        // acknowledged may be one the promoted replica will overwrite. The link is dropped
        // the moment a Sentinel announces the failover, so check again now.
        let still_current = master.current().is_some_and(|l| l.generation == link.generation);
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
