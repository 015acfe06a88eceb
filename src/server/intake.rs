//! Intake: the one task that reads the server's subscription (the command channel, and
//! the control channel other servers forward admin closes on) in arrival order.
//!
//! It validates each message at the boundary (bad ones are counted, logged with the reason
//! and, when they name a bid, answered with `bid_rejected`) and hands good bids to the
//! router. Nothing here waits on Redis per message except the bounded hand-off, so a flood
//! of garbage cannot stall valid bids behind round trips. State-independent refusals are
//! answered in batches by [`answer_refusals`], best effort.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::warn;

use crate::keyspace::truncate;
use crate::link::sentinel::Master;
use crate::link::subscription::Message;
use crate::runtime::metrics::{Metrics, inc};
use crate::server::announcer::EventChannel;
use crate::server::router::Router;
use crate::wire::{self, CloseRequest, Event};

/// What intake accepts.
pub struct Rules {
    /// Where other servers forward closes (`CONTROL_CHANNEL`).
    pub control_channel: String,
    /// Whether the prototype's dialect is accepted too (`SEED_DIALECT`).
    pub seed_dialect: bool,
}

/// Reads `messages` until `shutdown` resolves or the subscription ends: bids to the
/// router, forwarded closes from the control channel to the router, refusals to `refusals`.
pub async fn run(
    messages: &mut mpsc::Receiver<Message>,
    rules: &Rules,
    router: &Router,
    metrics: &Metrics,
    refusals: &mpsc::Sender<Event>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = messages.recv() => {
                let Some(msg) = msg else { break };
                if msg.channel == rules.control_channel {
                    forwarded_close(&msg.payload, router).await;
                } else {
                    command(&msg.payload, rules, router, metrics, refusals).await;
                }
            }
        }
    }
}

/// A close another server forwarded because this one holds the auction's lease.
async fn forwarded_close(payload: &[u8], router: &Router) {
    match CloseRequest::from_json(payload) {
        Ok(req) => router.close_now_detached(req.auction_id).await,
        Err(e) => {
            warn!(error = %e, payload = %truncate(&String::from_utf8_lossy(payload), 200), "refused a control-channel message")
        }
    }
}

async fn command(
    payload: &[u8],
    rules: &Rules,
    router: &Router,
    metrics: &Metrics,
    reject_tx: &mpsc::Sender<Event>,
) {
    inc(&metrics.messages_received);
    match wire::decode_any(payload, rules.seed_dialect) {
        Ok(bid) => router.bid(bid).await,
        Err(bad) => {
            metrics.malformed(bad.error.reason());
            warn!(
                reason = bad.error.reason(),
                error = %bad.error,
                bid_id = ?bad.bid_id,
                payload = %truncate(&String::from_utf8_lossy(payload), 200),
                "refused a command-channel message"
            );
            if let Some(event) = Event::for_malformed(&bad) {
                // Answering is best effort: under a flood of garbage, drop answers rather
                // than slow down intake of valid bids.
                let _ = reject_tx.try_send(event);
            }
        }
    }
}

/// Publishes refusals in batches as they come, until every sender is gone.
pub async fn answer_refusals(
    master: Master,
    channel: EventChannel,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Event>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        if let Err(e) = crate::server::announcer::publish(&master, &channel, &batch, &metrics).await
        {
            warn!(error = %e, dropped = batch.len(), "could not answer refused messages; their senders retry");
        }
        batch.clear();
    }
}
