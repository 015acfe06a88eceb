//! Close batching: every worker's close goes through one task that closes all the auctions
//! asking at that moment in one script call.
//!
//! Deadlines bunch up (10,000 auctions may end in the same millisecond), and one script call
//! per auction would make the last close wait for thousands of round trips. Each close is
//! still its own worker's step, under its own lease and fence (the script checks each), so
//! it stays ordered with that auction's bids and events; only the Redis call is shared.
//! Every close made here starts the auction's retention (`RETENTION`, see
//! [`crate::store::ledger::Retention`]).

use tokio::sync::{mpsc, oneshot};

use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::runtime::task::TaskGuard;
use crate::server::work::Failure;
use crate::store::ledger::{self, CloseAs, CloseMode, Closed, Retention};
use crate::store::lock::Lease;

/// Most auctions closed by one script call (bounds how long Redis is busy with one call).
const MAX_BATCH: usize = 500;

type Outcome = Result<(Closed, u64), Failure>;

struct Request {
    closes: Vec<(CloseAs, CloseMode)>,
    reply: oneshot::Sender<Vec<Outcome>>,
}

/// Handle to the close batcher; clone freely.
#[derive(Clone)]
pub struct CloseBatcher {
    tx: mpsc::Sender<Request>,
}

impl CloseBatcher {
    /// Starts the task; it stops when every handle is dropped (or the guard is). Closed
    /// auctions are kept for `retention`.
    pub fn start(master: Master, retention: Retention) -> (Self, TaskGuard) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let task = tokio::spawn(run(master, retention, rx));
        (Self { tx }, TaskGuard::new("close batcher", task))
    }

    /// Closes the lease's auction; returns the outcome and the master link generation the
    /// write was made on (for the announcement's `WAIT`).
    pub async fn close(&self, lease: Lease, mode: CloseMode) -> Outcome {
        let mut out = self.request(vec![(CloseAs::Holder(lease), mode)]).await;
        out.pop()
            .unwrap_or_else(|| Err(Failure::Transient("close answered nothing".into())))
    }

    /// Closes each of `auctions` whose lease nobody holds, under a lease taken and given
    /// back within the call ([`Closed::HeldElsewhere`] for the others); one result each, in order.
    pub async fn close_free_many(&self, auctions: &[AuctionId], mode: CloseMode) -> Vec<Outcome> {
        let closes = auctions
            .iter()
            .map(|id| (CloseAs::Free(id.clone()), mode))
            .collect();
        self.request(closes).await
    }

    async fn request(&self, closes: Vec<(CloseAs, CloseMode)>) -> Vec<Outcome> {
        let n = closes.len();
        let gone = || {
            (0..n)
                .map(|_| {
                    Err(Failure::Down(
                        "close batcher stopped (server shutting down)".into(),
                    ))
                })
                .collect()
        };
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request { closes, reply }).await.is_err() {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }
}

async fn run(master: Master, retention: Retention, mut rx: mpsc::Receiver<Request>) {
    let mut requests = Vec::new();
    while rx.recv_many(&mut requests, MAX_BATCH).await > 0 {
        let lens: Vec<usize> = requests.iter().map(|r| r.closes.len()).collect();
        let closes: Vec<(CloseAs, CloseMode)> = requests
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.closes))
            .collect();
        let started = std::time::Instant::now();
        let n = closes.len();
        // Chunks go out together (pipelined on the shared connection), so Redis runs them
        // back to back rather than one per round trip.
        let chunks = closes
            .chunks(MAX_BATCH)
            .map(|c| close_chunk(&master, c, retention));
        let mut outcomes = futures_util::future::join_all(chunks)
            .await
            .into_iter()
            .flatten();
        tracing::debug!(auctions = n, elapsed = ?started.elapsed(), "close batch");
        for (r, n) in requests.drain(..).zip(lens) {
            let _ = r.reply.send(outcomes.by_ref().take(n).collect());
        }
    }
}

async fn close_chunk(
    master: &Master,
    chunk: &[(CloseAs, CloseMode)],
    retention: Retention,
) -> Vec<Outcome> {
    let all = |f: &dyn Fn() -> Failure| chunk.iter().map(|_| Err(f())).collect();
    let link = match master.link(std::time::Duration::from_secs(1)).await {
        Ok(link) => link,
        Err(e) => return all(&|| Failure::Down(e.to_string())),
    };
    let mut conn = link.conn.clone();
    let failure = |e| Failure::of(e, master, link.generation);
    match ledger::close_many(&mut conn, chunk, retention).await {
        Ok(results) => results
            .into_iter()
            .map(|result| {
                result
                    .map(|closed| (closed, link.generation))
                    .map_err(failure)
            })
            .collect(),
        Err(e) => {
            let f = failure(e);
            all(&|| f.clone())
        }
    }
}
