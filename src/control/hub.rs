//! The event hub: events heard on the event channel, fanned out to in-process listeners
//! (gRPC watches, admin calls waiting for a close).
//!
//! The server subscribes to its own event channel only while someone here listens: every
//! event delivered to a subscriber costs Redis a write and this process a read, and most
//! of the time nobody watches. The first listener starts the subscription (and waits until
//! it is live, so a snapshot read afterwards misses nothing); it stops a while after the
//! last listener left.
//!
//! Fan-out is a `broadcast` channel: a slow listener is told it lagged (and resyncs from
//! stored state) instead of slowing everyone down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, warn};

use crate::link::sentinel::Master;
use crate::link::subscription::Subscription;
use crate::runtime::task::TaskGuard;
use crate::wire::Event;

/// Capacity of the fan-out buffer; a listener further behind than this lags.
const CAPACITY: usize = 4096;
/// The subscription stops after this long without listeners.
const LINGER: Duration = Duration::from_secs(10);
/// Longest a new listener waits for the subscription to become live.
const LIVE_WAIT: Duration = Duration::from_secs(2);

/// Fan-out of decoded events; clone freely.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    master: Master,
    channel: String,
    tx: broadcast::Sender<Arc<Event>>,
    /// The running subscription, if any.
    running: Mutex<Option<Running>>,
}

struct Running {
    live: watch::Receiver<bool>,
    _task: TaskGuard,
}

impl Hub {
    /// A hub for the events on `channel`; nothing is subscribed until someone listens.
    pub fn new(master: Master, channel: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                master,
                channel,
                tx: broadcast::channel(CAPACITY).0,
                running: Mutex::new(None),
            }),
        }
    }

    /// A new listener, seeing events from now on. Returns once the event channel is
    /// subscribed (or after a short bound, if Redis is unreachable: the listener then
    /// resyncs on the gap it sees).
    pub async fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        let (rx, mut live) = {
            let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
            // Subscribing under the lock: the task's decision to stop takes it too, so it
            // cannot miss this listener.
            let rx = self.inner.tx.subscribe();
            let live = match running.as_ref() {
                Some(r) => r.live.clone(),
                None => {
                    let r = self.start();
                    let live = r.live.clone();
                    *running = Some(r);
                    live
                }
            };
            (rx, live)
        };
        if tokio::time::timeout(LIVE_WAIT, live.wait_for(|l| *l))
            .await
            .is_err()
        {
            debug!("event subscription not live yet; the listener resyncs on gaps");
        }
        rx
    }

    fn start(&self) -> Running {
        let (msg_tx, msg_rx) = mpsc::channel(1024);
        let subscription = Subscription::start(
            self.inner.master.clone(),
            vec![self.inner.channel.clone()],
            msg_tx,
        );
        let live = subscription.watch_live();
        debug!(channel = %self.inner.channel, "subscribing to the event channel for listeners");
        let task = tokio::spawn(forward(self.inner.clone(), subscription, msg_rx));
        Running {
            live,
            _task: TaskGuard::new("event hub", task),
        }
    }
}

/// Decodes events into the fan-out until nobody has listened for [`LINGER`].
async fn forward(
    inner: Arc<Inner>,
    subscription: Subscription,
    mut rx: mpsc::Receiver<crate::link::subscription::Message>,
) {
    let mut check = tokio::time::interval(LINGER);
    check.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                if inner.tx.receiver_count() == 0 {
                    continue;
                }
                match Event::from_json(&msg.payload) {
                    // No listener left is fine: nobody is watching.
                    Ok(event) => {
                        let _ = inner.tx.send(Arc::new(event));
                    }
                    Err(e) => warn!(error = %e, "ignoring an undecodable event on the event channel"),
                }
            }
            _ = check.tick() => {
                let mut running = inner.running.lock().unwrap_or_else(|p| p.into_inner());
                if inner.tx.receiver_count() == 0 {
                    debug!("no listeners left; unsubscribing from the event channel");
                    // Dropping the guard would abort this very task: take it out and
                    // let it go when the task returns.
                    let _stopping = running.take();
                    drop(running);
                    drop(subscription);
                    return;
                }
            }
        }
    }
}
