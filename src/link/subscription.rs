//! A Pub/Sub subscription that survives failover.
//!
//! A subscription on a demoted master stays open and silently receives nothing, and one on
//! a dead master just ends; neither tells the caller. This task therefore re-subscribes on
//! every master change (new [`Link`](crate::link::sentinel::Link) generation), on stream end, and
//! when a periodic `PING` goes unanswered, and reports whether it is live right now so that
//! health checks can say so. Messages published while no subscription is live are lost
//! (Pub/Sub is at-most-once): bidders retry unanswered bids, and subscribers resync on a
//! `seq` gap.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::link::sentinel::Master;
use crate::runtime::backoff::Backoff;
use crate::runtime::task::TaskGuard;

/// One message received on a subscribed channel.
#[derive(Debug, Clone)]
pub struct Message {
    /// The channel it arrived on.
    pub channel: String,
    /// Raw payload; decoding is the receiver's business.
    pub payload: Vec<u8>,
}

/// A live subscription; dropping it unsubscribes and stops its task.
pub struct Subscription {
    live: watch::Receiver<bool>,
    _task: TaskGuard,
}

impl Subscription {
    /// Subscribes to `channels` on the current master and keeps them subscribed, delivering
    /// every message to `tx` in arrival order. When `tx` is full the task waits; note that
    /// redis-rs reads the socket into an unbounded queue of its own, so under sustained
    /// overload the backlog grows in this process's memory rather than in Redis's output
    /// buffer (measured by the benchmark at 2× saturation; see the README's Benchmarks).
    pub fn start(master: Master, channels: Vec<String>, tx: mpsc::Sender<Message>) -> Self {
        let (live_tx, live) = watch::channel(false);
        let task = tokio::spawn(run(master, channels, tx, live_tx));
        Self {
            live,
            _task: TaskGuard::new("pubsub subscription", task),
        }
    }

    /// Whether the channels are subscribed on the current master right now.
    pub fn is_live(&self) -> bool {
        *self.live.borrow()
    }

    /// Watches liveness.
    pub fn watch_live(&self) -> watch::Receiver<bool> {
        self.live.clone()
    }
}

const PING_EVERY: Duration = Duration::from_secs(1);

async fn run(
    master: Master,
    channels: Vec<String>,
    tx: mpsc::Sender<Message>,
    live: watch::Sender<bool>,
) {
    let mut links = master.watch();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let settings = master.settings().clone();
    loop {
        live.send_replace(false);
        let link = {
            let waited = links.wait_for(Option::is_some).await;
            match waited {
                Ok(l) => match l.clone() {
                    Some(l) => l,
                    None => continue,
                },
                // The supervisor is gone: the owner is shutting down.
                Err(_) => return,
            }
        };
        let subscribed = async {
            let mut pubsub = timeout(settings.connect_timeout, link.client().get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| {
                    master.report(link.generation, &e);
                    e.to_string()
                })?;
            for ch in &channels {
                timeout(settings.response_timeout, pubsub.subscribe(ch))
                    .await
                    .map_err(|_| format!("SUBSCRIBE {ch} timed out"))?
                    .map_err(|e| format!("SUBSCRIBE {ch}: {e}"))?;
            }
            Ok::<_, String>(pubsub)
        }
        .await;
        let pubsub = match subscribed {
            Ok(p) => p,
            Err(e) => {
                warn!(master = %link.addr, error = %e, ?channels, "cannot subscribe; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        info!(master = %link.addr, ?channels, "subscribed");
        live.send_replace(true);
        let (mut sink, mut stream) = pubsub.split();
        let mut heard = tokio::time::Instant::now();
        let reason = loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => {
                        heard = tokio::time::Instant::now();
                        let message = Message {
                            channel: msg.get_channel_name().to_owned(),
                            payload: msg.get_payload_bytes().to_vec(),
                        };
                        if tx.send(message).await.is_err() {
                            debug!("subscriber's receiver dropped; stopping");
                            return;
                        }
                    }
                    None => break "the connection closed",
                },
                changed = links.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let same = links.borrow().as_ref().map(|l| l.generation) == Some(link.generation);
                    if !same {
                        break "the master changed";
                    }
                }
                // A message is proof of life: PING only a quiet connection. Under a backlog
                // (a flood) the PONG queues behind every message already sent to us, so a
                // PING then would time out and the resubscription would drop the backlog.
                _ = tokio::time::sleep_until(heard + PING_EVERY) => {
                    let pong = timeout(settings.response_timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break "PING went unanswered";
                    }
                    heard = tokio::time::Instant::now();
                }
            }
        };
        warn!(master = %link.addr, reason, ?channels, "subscription lost; resubscribing");
    }
}
