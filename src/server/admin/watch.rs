//! `WatchAuction`: the auction's stored state first, then its events live, from the hub.
//! A gap in `seq`, a lagging receiver or a quiet period ([`WATCH_RESYNC`]) makes the
//! stream re-read stored state, so a watcher never misses the outcome; the stream ends
//! after the close, when the client goes, or at shutdown (`UNAVAILABLE`, "shutting down"):
//! an open stream keeps its connection, and so the server's gRPC side, alive, and the
//! shutdown must not wait for clients to hang up.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};
use tracing::warn;

use super::messages::{event_to_proto, to_proto};
use super::{RouterGate, SHUTTING_DOWN, stored};
use crate::control::hub::Hub;
use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::proto::v1 as pb;
use crate::store::ledger::AuctionRecord;
use crate::wire::Event;

/// How often a watch re-reads stored state, to catch an event lost on the way.
const WATCH_RESYNC: Duration = Duration::from_secs(5);
/// Longest a watch's final status waits for room in the stream (a client that stopped
/// reading does not get it).
const LAST_WORD: Duration = Duration::from_secs(1);

/// The stream a `WatchAuction` call answers with.
pub(super) type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchAuctionResponse, Status>> + Send>>;

type WatchTx = mpsc::Sender<Result<pb::WatchAuctionResponse, Status>>;

/// Answers a `WatchAuction` of `id`: the stream of its snapshot, then its events, until
/// `gate` closes (shutdown).
pub(super) async fn watch(
    hub: &Hub,
    master: &Master,
    mut gate: RouterGate,
    id: AuctionId,
) -> Result<Response<WatchStream>, Status> {
    // Listen before reading the snapshot, so no event falls between the two.
    let events = hub.subscribe().await;
    let snapshot = stored::read(master, &id).await?;
    let (tx, rx) = mpsc::channel(64);
    let master = master.clone();
    // The task lives as long as the client listens: it stops when the stream's
    // receiver is dropped (client gone), when the auction closes, or at shutdown.
    tokio::spawn(async move {
        // Shutdown interrupts the pump wherever it waits (it only reads and sends).
        let result = tokio::select! {
            result = pump(&master, id, snapshot, events, &tx) => result,
            _ = gate.wait_for(Option::is_none) => Err(Status::unavailable(SHUTTING_DOWN)),
        };
        if let Err(e) = result {
            let _ = tokio::time::timeout(LAST_WORD, tx.send(Err(e))).await;
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

async fn send_snapshot(tx: &WatchTx, rec: &AuctionRecord) -> bool {
    let msg = pb::WatchAuctionResponse {
        kind: Some(pb::watch_auction_response::Kind::Snapshot(to_proto(rec))),
    };
    tx.send(Ok(msg)).await.is_ok()
}

async fn pump(
    master: &Master,
    id: AuctionId,
    snapshot: AuctionRecord,
    mut events: broadcast::Receiver<std::sync::Arc<Event>>,
    tx: &WatchTx,
) -> Result<(), Status> {
    let mut last = snapshot.seq;
    if !send_snapshot(tx, &snapshot).await || !snapshot.open {
        return Ok(());
    }
    let mut resync = tokio::time::interval(WATCH_RESYNC);
    resync.tick().await;
    loop {
        let need_snapshot = tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = resync.tick() => true,
            ev = events.recv() => match ev {
                Ok(ev) => {
                    if ev.auction_id() != Some(id.as_str()) {
                        continue;
                    }
                    match ev.seq() {
                        Some(s) if s <= last => continue,
                        Some(s) if s > last + 1 => true,
                        seq => {
                            if let Some(s) = seq {
                                last = s;
                            }
                            if let Some(pe) = event_to_proto(&ev) {
                                let msg = pb::WatchAuctionResponse { kind: Some(pb::watch_auction_response::Kind::Event(pe)) };
                                if tx.send(Ok(msg)).await.is_err() {
                                    return Ok(());
                                }
                            }
                            if matches!(&*ev, Event::AuctionClosed { .. }) {
                                return Ok(());
                            }
                            false
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(auction = %id, missed = n, "watch fell behind; resyncing from stored state");
                    true
                }
                Err(broadcast::error::RecvError::Closed) => return Err(Status::unavailable("server shutting down")),
            },
        };
        if need_snapshot {
            let rec = stored::read(master, &id).await?;
            if rec.seq > last {
                last = rec.seq;
                if !send_snapshot(tx, &rec).await {
                    return Ok(());
                }
            }
            if !rec.open {
                return Ok(());
            }
        }
    }
}
