//! Every server's cache of the registered bidders' keys, for `BID_AUTH=required`: a bid is
//! checked against it in intake, without a Redis read per bid.
//!
//! One task polls `bidders:version` (a counter every registration and revocation bumps)
//! every [`POLL`] and reloads all keys when it changed, so a registration or revocation on
//! any server is seen by every server within about that long, also after a Pub/Sub or
//! failover hiccup (a version that went backwards after a failover still differs). The
//! server that made the change updates its own cache at once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::{info, warn};

use crate::link::sentinel::Master;
use crate::runtime::task::TaskGuard;
use crate::store::bidders;
use crate::wire::Bid;

/// How often the version counter is read.
pub const POLL: Duration = Duration::from_millis(250);

type Keys = Arc<HashMap<String, String>>;

/// The cache; clone freely.
#[derive(Clone, Default)]
pub struct BidderKeys {
    keys: Arc<RwLock<Keys>>,
}

impl BidderKeys {
    /// Starts the polling task; the cache is empty until its first load.
    pub fn start(master: Master) -> (Self, TaskGuard) {
        let cache = Self::default();
        let task = tokio::spawn(cache.clone().follow(master));
        (cache, TaskGuard::new("bidder keys", task))
    }

    fn read(&self) -> Keys {
        // Never poisoned in practice: nothing panics while holding it.
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, keys: HashMap<String, String>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    fn edit(&self, change: impl FnOnce(&mut HashMap<String, String>)) {
        let mut keys = (*self.read()).clone();
        change(&mut keys);
        self.replace(keys);
    }

    /// Whether `bid` carries a valid signature by its bidder's registered key.
    pub fn verify(&self, bid: &Bid) -> Result<(), &'static str> {
        let Some(sig) = &bid.sig else {
            return Err("this server requires signed bids (BID_AUTH=required): add \"sig\"");
        };
        let keys = self.read();
        let Some(key) = keys.get(&bid.bidder) else {
            return Err("this bidder is not registered (or was revoked)");
        };
        if bidders::verify(bid, sig, key) {
            Ok(())
        } else {
            Err("the signature does not match this bid and its bidder's key")
        }
    }

    /// Records a registration made through this server.
    pub fn registered(&self, bidder: &str, key: &str) {
        self.edit(|k| {
            k.insert(bidder.to_owned(), key.to_owned());
        });
    }

    /// Records a revocation made through this server.
    pub fn revoked(&self, bidder: &str) {
        self.edit(|k| {
            k.remove(bidder);
        });
    }

    async fn follow(self, master: Master) {
        let mut seen: Option<u64> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(link) = master.link(POLL * 4).await else {
                continue;
            };
            let mut conn = link.conn.clone();
            let version = match bidders::version(&mut conn).await {
                Ok(v) => v,
                Err(e) => {
                    master.report(link.generation, &e);
                    continue;
                }
            };
            if seen == Some(version) {
                continue;
            }
            match bidders::keys(&mut conn).await {
                Ok(keys) => {
                    if seen.is_some() {
                        info!(bidders = keys.len(), "bidder keys changed; cache reloaded");
                    }
                    self.replace(keys);
                    seen = Some(version);
                }
                Err(e) => {
                    master.report(link.generation, &e);
                    warn!(error = %e, "could not load bidder keys; signed bids from new bidders are refused until it works");
                }
            }
        }
    }
}
