//! The chaos run's helpers (`tests/chaos.rs`): the recording bidder, fault helpers on the
//! dev topology, and reading who holds a lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auction::keyspace::AuctionId;
use auction::link::sentinel::Master;
use auction::runtime::config::DEFAULT_COMMAND_CHANNEL;
use auction::wire::Bid;
use auction_testkit::{DevStack, eventually};

use crate::support::{Recorder, eventually_every, master_conn};

/// A bid a recording bidder sent, and whether it ever got an outcome.
#[derive(Clone, Debug)]
pub struct Sent {
    pub bid: Bid,
    pub last_sent: Instant,
}

/// A plain bidder that records everything it sends and retries (same `bid_id`) until it
/// sees an outcome.
pub async fn recording_bidder(
    name: String,
    master: Master,
    recorder: Recorder,
    auctions: Vec<String>,
    sent: Arc<Mutex<HashMap<String, Sent>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !*stop.borrow() {
        tick.tick().await;
        n += 1;
        let auction = &auctions[(n as usize) % auctions.len()];
        let amount = recorder.next_min(auction).unwrap_or(100) + fastrand::u64(0..30);
        let bid = Bid {
            auction_id: AuctionId::parse(auction).expect("id"),
            bid_id: format!("{name}-{n}"),
            bidder: name.clone(),
            amount,
            max_amount: None,
            traceparent: None,
            sig: None,
        };
        let mut to_send = vec![bid.clone()];
        {
            let mut s = sent.lock().expect("lock");
            s.insert(
                bid.bid_id.clone(),
                Sent {
                    bid,
                    last_sent: Instant::now(),
                },
            );
            for entry in s.values_mut() {
                if entry.bid.bidder == name
                    && entry.last_sent.elapsed() > Duration::from_secs(1)
                    && !recorder.outcome_of(&entry.bid.bid_id)
                {
                    entry.last_sent = Instant::now();
                    to_send.push(entry.bid.clone());
                }
            }
        }
        if let Ok(link) = master.link(Duration::from_millis(200)).await {
            let mut pipe = redis::pipe();
            for b in &to_send {
                pipe.cmd("PUBLISH")
                    .arg(DEFAULT_COMMAND_CHANNEL)
                    .arg(b.to_json())
                    .ignore();
            }
            let mut conn = link.conn.clone();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                master.report(link.generation, &e);
            }
        }
    }
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

pub async fn master_index(stack: &DevStack) -> usize {
    let port = stack.current_master_port().await.expect("master port");
    stack.node_index(port).expect("known node")
}

/// Kills the master, waits (up to `failover`) for the promotion, restarts the old node and
/// waits until it has resynced as a replica. Returns (seconds to promotion, kill instant).
pub async fn kill_master(stack: &mut DevStack, failover: Duration) -> (f64, Instant) {
    let old = master_index(stack).await;
    let old_port = stack.node_port(old);
    let t = Instant::now();
    stack.kill_node(old).expect("kill master");
    stack
        .wait_for_master_change(old_port, failover)
        .await
        .expect("failover after kill");
    let promoted = t.elapsed().as_secs_f64();
    stack.restart_node(old).await.expect("restart old master");
    wait_rejoined(stack, old, "the old master to rejoin as a replica").await;
    (promoted, t)
}

/// Waits up to 60 s until data node `index` is a connected replica of the current master.
pub async fn wait_rejoined(stack: &DevStack, index: usize, what: &str) {
    eventually(what, Duration::from_secs(60), || async {
        stack
            .wait_for_replica_link(index)
            .await
            .map_err(|e| format!("{e:#}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Waits until every Sentinel lists every replica as an up, linked replica that has
/// reported that role for at least 3 s.
pub async fn wait_sentinels_settled(stack: &DevStack) {
    let want = stack.redis_ports().len() - 1;
    let what = format!("every Sentinel to agree on {want} healthy replicas");
    // Each check opens a connection to every Sentinel: every 250 ms is often enough.
    eventually_every(
        &what,
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let mut settled = true;
            let mut seen = Vec::new();
            for addr in stack.sentinel_addrs() {
                let client = redis::Client::open(format!("redis://{addr}/")).expect("client");
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    settled = false;
                    seen.push(format!("{addr}: unreachable"));
                    continue;
                };
                let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
                    .arg("replicas")
                    .arg("mymaster")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                let healthy = replicas
                    .iter()
                    .filter(|fields| {
                        let get = |k: &str| {
                            fields
                                .chunks(2)
                                .find(|kv| kv[0] == k)
                                .and_then(|kv| kv.get(1))
                                .cloned()
                                .unwrap_or_default()
                        };
                        !get("flags").contains("down")
                            && !get("flags").contains("disconnected")
                            && get("role-reported") == "slave"
                            && get("master-link-status") == "ok"
                            && get("role-reported-time").parse::<u64>().unwrap_or(0) >= 3000
                    })
                    .count();
                settled &= healthy >= want;
                seen.push(format!("{addr}: {healthy} healthy"));
            }
            if settled {
                Ok(())
            } else {
                Err(seen.join(", "))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// The server process whose lock owner id holds `auction`'s lease (owner ids embed the pid).
pub async fn holder_pid(stack: &DevStack, auction: &str) -> Option<u32> {
    let mut conn = master_conn(stack).await;
    let id = AuctionId::parse(auction).expect("id");
    let value: Option<String> = redis::cmd("GET")
        .arg(id.lock_key())
        .query_async(&mut conn)
        .await
        .ok()?;
    // OWNER#TOKEN where OWNER = host-pid-random.N
    let owner = value?.split('#').next()?.to_owned();
    let mut parts = owner.rsplit('-');
    parts.next()?;
    parts.next()?.parse().ok()
}
