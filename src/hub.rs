//! The event hub: every event this server hears on the event channel, fanned out to
//! in-process listeners (gRPC watches, admin calls waiting for a close).
//!
//! A `broadcast` channel: a slow listener is told it lagged (and resyncs from stored
//! state) instead of slowing everyone down.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::wire::Event;

/// Capacity of the fan-out buffer; a listener further behind than this lags.
const CAPACITY: usize = 4096;

/// Fan-out of decoded events.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
        }
    }

    /// Delivers `event` to every current listener.
    pub fn publish(&self, event: Event) {
        // No listener is fine: nobody is watching.
        let _ = self.tx.send(Arc::new(event));
    }

    /// True while someone listens (a watch, an admin close waiting): otherwise incoming
    /// events need not even be decoded.
    pub fn has_listeners(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A new listener, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}
