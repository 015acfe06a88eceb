//! "Runs forever: bounded Redis memory", its definition of done: with every data node at
//! `maxmemory 48mb` / `noeviction`, a flood of 300,000 unique junk bids from one bidder on
//! an auction, an honest bidder bidding on it every 200 ms, and 100+ short auctions opening
//! and closing with a short `RETENTION`: the master never answers OOM, every honest bid is
//! accepted, the server stays up and SERVING, and after the retention no key of the closed
//! auctions is left.
//!
//! The event channel carries an answer to every junk bid, so this test does not use the
//! [`Recorder`] (which keeps and clones every decoded event): a tally counts the flood's
//! answers by reason and keeps only the other events.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auction::link::sentinel::{Master, Settings};
use auction::link::subscription::Subscription;
use auction::proto::v1 as pb;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction::runtime::config::{DEFAULT_COMMAND_CHANNEL, DEFAULT_EVENT_CHANNEL, RedisArgs};
use auction::wire::{Event, RejectReason};
use auction_testkit::{DevStack, DevStackConfig, eventually, info_field};
use support::*;
use tokio::sync::{Notify, mpsc};

type Admin = AuctionAdminClient<tonic::transport::Channel>;

/// Junk bids in the flood.
const FLOOD: usize = 300_000;
/// PUBLISHes per pipelined round trip of the flooder.
const CHUNK: usize = 2_000;
/// The flooder's connections to the master, each sending its share of the chunks.
const FLOODERS: usize = 2;
/// The one name every junk bid carries.
const FLOODER: &str = "flooder";
const HONEST: &str = "honest";
/// Short auctions opened and closed during the flood, `AT_ONCE` at a time.
const SHORT: usize = 102;
const AT_ONCE: usize = 6;
const MAXMEMORY: u64 = 48 * 1024 * 1024;
/// The whole test, start to finish.
const LIMIT: Duration = Duration::from_secs(180);

/// Every event but the flood's answers, and those counted by reason.
#[derive(Default)]
struct Tally {
    flood_answers: AtomicU64,
    flood_reasons: Mutex<BTreeMap<String, u64>>,
    /// The latest outcome of each non-flood bid.
    outcomes: Mutex<HashMap<String, Event>>,
    closed: Mutex<HashMap<String, Event>>,
    notify: Notify,
}

impl Tally {
    fn take(&self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        if text.contains(&format!("\"bidder\":\"{FLOODER}\"")) {
            self.flood_answers.fetch_add(1, Ordering::Relaxed);
            let reason = text
                .split_once("\"reason\":\"")
                .and_then(|(_, r)| r.split_once('"'))
                .map_or("accepted?", |(r, _)| r)
                .to_owned();
            *lock(&self.flood_reasons).entry(reason).or_default() += 1;
            return;
        }
        let Ok(event) = Event::from_json(payload) else {
            return;
        };
        match &event {
            Event::AuctionClosed { auction_id, .. } => {
                lock(&self.closed).insert(auction_id.clone(), event);
            }
            e => {
                if let Some(bid_id) = e.bid_id() {
                    lock(&self.outcomes).insert(bid_id.to_owned(), event);
                }
            }
        }
        self.notify.notify_waiters();
    }

    /// Waits up to `limit` for an outcome of `bid_id` (taking it out of the record).
    async fn outcome(&self, bid_id: &str, limit: Duration) -> Option<Event> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = lock(&self.outcomes).remove(bid_id) {
                return Some(e);
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits up to `limit` for the close of every one of `ids`.
    async fn closes(&self, ids: &[String], limit: Duration) -> Vec<Event> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let closed = lock(&self.closed);
                if ids.iter().all(|id| closed.contains_key(id)) {
                    return ids.iter().map(|id| closed[id].clone()).collect();
                }
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                let closed = lock(&self.closed);
                let missing: Vec<&String> =
                    ids.iter().filter(|id| !closed.contains_key(*id)).collect();
                panic!("no auction_closed within {limit:?} for {missing:?}");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Subscribes to the event channel (through the Sentinels, as the recorder does) and feeds
/// `tally`; returns once the subscription is live.
async fn tally(stack: &DevStack) -> (Arc<Tally>, Subscription, tokio::task::JoinHandle<()>) {
    let args = RedisArgs::local(&stack.sentinel_addrs()).expect("sentinel addresses");
    let (tx, mut rx) = mpsc::channel(65_536);
    let sub = Subscription::start(
        Master::start(Settings::from_args(&args)),
        vec![DEFAULT_EVENT_CHANNEL.into()],
        tx,
    );
    let t = Arc::new(Tally::default());
    let fed = t.clone();
    let task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            fed.take(&msg.payload);
        }
    });
    let mut live = sub.watch_live();
    tokio::time::timeout(Duration::from_secs(20), live.wait_for(|l| *l))
        .await
        .expect("the tally's subscription is live within 20 s")
        .expect("subscription task");
    (t, sub, task)
}

fn bid_json(auction: &str, bid_id: &str, bidder: &str, amount: u64) -> String {
    serde_json::json!({"v":1,"type":"bid","auction_id":auction,"bid_id":bid_id,"bidder":bidder,"amount":amount}).to_string()
}

async fn publish(conn: &mut redis::aio::MultiplexedConnection, payload: &str) {
    let _: u64 = redis::cmd("PUBLISH")
        .arg(DEFAULT_COMMAND_CHANNEL)
        .arg(payload)
        .query_async(conn)
        .await
        .expect("PUBLISH");
}

/// The server's overall health (`""`) over gRPC.
async fn serving(port: u16) -> Result<(), String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut c = HealthClient::new(channel);
    let status = c
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .status;
    if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

async fn info(conn: &mut redis::aio::MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .expect("INFO")
}

fn field(info: &str, name: &str) -> u64 {
    info_field(info, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in INFO: {info}"))
}

/// The largest output buffer of a Pub/Sub client on the master (`omem`), bytes.
async fn pubsub_omem(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(conn)
        .await
        .expect("CLIENT LIST");
    list.split_whitespace()
        .filter_map(|kv| kv.strip_prefix("omem="))
        .filter_map(|v| v.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Publishes the flood: `FLOOD` unique junk bids (`amount: 1`, ids of 100+ characters, all
/// from [`FLOODER`]) pipelined in chunks of [`CHUNK`] over [`FLOODERS`] connections.
async fn flood(stack: &DevStack, auction: &str) -> Duration {
    let pad = "x".repeat(100);
    let started = Instant::now();
    let mut senders = Vec::new();
    for f in 0..FLOODERS {
        let mut conn = master_conn(stack).await;
        let (auction, pad) = (auction.to_owned(), pad.clone());
        senders.push(tokio::spawn(async move {
            let mut i = f * CHUNK;
            while i < FLOOD {
                let mut pipe = redis::pipe();
                for n in i..(i + CHUNK).min(FLOOD) {
                    let id = format!("junk-{n:07}-{pad}");
                    pipe.cmd("PUBLISH")
                        .arg(DEFAULT_COMMAND_CHANNEL)
                        .arg(bid_json(&auction, &id, FLOODER, 1))
                        .ignore();
                }
                let () = pipe.query_async(&mut conn).await.expect("PUBLISH chunk");
                i += CHUNK * FLOODERS;
            }
        }));
    }
    for s in senders {
        s.await.expect("flooder");
    }
    started.elapsed()
}

/// What the honest bidder saw.
#[derive(Debug, Default)]
struct Honest {
    sent: u64,
    accepted: u64,
    retries_unanswered: u64,
    retries_shed: u64,
    /// Bids not accepted: their id and outcome (none: never answered).
    failed: Vec<(String, Option<Event>)>,
    /// From a bid's first publish to its acceptance.
    slowest: Duration,
    total_wait: Duration,
}

/// Bids on `auction` until `stop` like `auction-client`: one bid in flight, the next 200 ms
/// after the previous one was accepted, at its `next_min` with a fresh `bid_id`. An
/// unanswered bid is published again (same message) after 5 s, a shed one (`overloaded`,
/// `too_many_pending`) after 100 ms; a bid still not accepted after 60 s is a failure.
/// (Several bids in flight cannot work: a shed bid retried after a later one was accepted
/// is too low by then.)
async fn honest(
    stack: &DevStack,
    t: &Tally,
    auction: &str,
    first_min: u64,
    stop: &AtomicBool,
) -> Honest {
    let mut conn = master_conn(stack).await;
    let mut h = Honest::default();
    let mut next_min = first_min;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let bid_id = format!("{HONEST}-{}", h.sent);
        h.sent += 1;
        let msg = bid_json(auction, &bid_id, HONEST, next_min);
        let first = Instant::now();
        let outcome = loop {
            if first.elapsed() > Duration::from_secs(60) {
                break None;
            }
            publish(&mut conn, &msg).await;
            match t.outcome(&bid_id, Duration::from_secs(5)).await {
                None => h.retries_unanswered += 1,
                Some(Event::BidRejected {
                    reason: RejectReason::Overloaded | RejectReason::TooManyPending,
                    ..
                }) => {
                    h.retries_shed += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(e) => break Some(e),
            }
        };
        match outcome {
            Some(Event::BidAccepted { next_min: n, .. }) => {
                next_min = n;
                h.accepted += 1;
                let waited = first.elapsed();
                h.slowest = h.slowest.max(waited);
                h.total_wait += waited;
            }
            other => h.failed.push((bid_id, other)),
        }
    }
    h
}

/// Opens and lets close [`SHORT`] auctions of 1 s, [`AT_ONCE`] at a time, each with one or
/// two bids; returns their ids.
async fn churn(
    stack: &DevStack,
    t: &Tally,
    admin: &mut Admin,
    stats: &mut BTreeMap<String, u64>,
) -> Vec<String> {
    let mut conn = master_conn(stack).await;
    let mut all = Vec::new();
    let mut n = 0;
    while n < SHORT {
        let mut round = Vec::new();
        for _ in 0..AT_ONCE.min(SHORT - n) {
            let id = format!("short-{n:03}");
            n += 1;
            admin
                .open_auction(pb::OpenAuctionRequest {
                    item: format!("short lot {id}"),
                    duration: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    auction_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("OpenAuction {id}: {e}"));
            publish(
                &mut conn,
                &bid_json(&id, &format!("{id}-a"), "shorty-a", 100),
            )
            .await;
            if n % 2 == 0 {
                publish(
                    &mut conn,
                    &bid_json(&id, &format!("{id}-b"), "shorty-b", 110),
                )
                .await;
            }
            round.push(id);
        }
        for closed in t.closes(&round, Duration::from_secs(20)).await {
            let Event::AuctionClosed { winner, .. } = &closed else {
                unreachable!()
            };
            *stats
                .entry(if winner.is_some() { "won" } else { "no winner" }.to_owned())
                .or_default() += 1;
        }
        for id in &round {
            for b in ["a", "b"] {
                let bid_id = format!("{id}-{b}");
                if b == "b" && !lock(&t.outcomes).contains_key(&bid_id) {
                    continue;
                }
                let what = match t.outcome(&bid_id, Duration::from_millis(1)).await {
                    Some(Event::BidAccepted { .. }) => "bid accepted".to_owned(),
                    Some(Event::BidRejected { reason, .. }) => format!("bid {}", reason.as_str()),
                    _ => "bid unanswered".to_owned(),
                };
                *stats.entry(what).or_default() += 1;
            }
        }
        all.extend(round);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_flood_and_churning_auctions_stay_within_maxmemory_and_leave_no_keys() {
    tokio::time::timeout(LIMIT, run())
        .await
        .expect("test exceeded its overall time bound");
}

async fn run() {
    let stack = DevStack::start(DevStackConfig {
        extra_redis_conf: vec![
            "maxmemory 48mb".to_owned(),
            "maxmemory-policy noeviction".to_owned(),
        ],
        ..Default::default()
    })
    .await
    .expect("start the local Redis topology");
    let mut probe = master_conn(&stack).await;
    let max = field(&info(&mut probe, "memory").await, "maxmemory");
    assert_eq!(max, MAXMEMORY, "every data node at maxmemory 48mb");
    let (t, _sub, _feed) = tally(&stack).await;
    let port = free_port();
    let mut server = server(&stack, "server", port, &[("RETENTION", "3s".into())]);
    eventually("the server SERVING", Duration::from_secs(30), || {
        serving(port)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect to the admin API");
    let long = "long-lot";
    let opened = admin
        .open_auction(pb::OpenAuctionRequest {
            item: "Flooded lot".into(),
            duration: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            starting_price: 100,
            min_increment: 10,
            auction_id: long.into(),
            ..Default::default()
        })
        .await
        .expect("OpenAuction")
        .into_inner()
        .auction
        .expect("auction");

    // Used memory and the largest Pub/Sub output buffer on the master, sampled every 100 ms.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let (peak_used, peak_omem) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let mut conn = master_conn(&stack).await;
        let (stop, used, omem) = (stop_sampling.clone(), peak_used.clone(), peak_omem.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                used.fetch_max(
                    field(&info(&mut conn, "memory").await, "used_memory"),
                    Ordering::Relaxed,
                );
                omem.fetch_max(pubsub_omem(&mut conn).await, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let flood_done = AtomicBool::new(false);
    let started = Instant::now();
    let (flood_took, honest, (short, churn_took)) = tokio::join!(
        async {
            let took = flood(&stack, long).await;
            eprintln!("flood of {FLOOD} junk bids published in {took:?}");
            // The honest bidder goes on until the server has answered the flood: every junk
            // bid, or no new answer for 3 s (a `too_many_pending` answer may be dropped when
            // the server's refusal queue is full; an unjudged bid's bidder retries), at most 90 s.
            let (mut last, mut still) = (0, 0);
            let until = Instant::now() + Duration::from_secs(90);
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = t.flood_answers.load(Ordering::Relaxed);
                still = if n == last { still + 1 } else { 0 };
                last = n;
                if n >= FLOOD as u64 || still >= 3 {
                    break;
                }
            }
            flood_done.store(true, Ordering::Relaxed);
            took
        },
        honest(&stack, &t, long, opened.next_min as u64, &flood_done),
        async {
            let mut stats = BTreeMap::new();
            let ids = churn(&stack, &t, &mut admin, &mut stats).await;
            eprintln!("short auctions: {stats:?}");
            (ids, started.elapsed())
        },
    );
    let answered_after = started.elapsed();
    stop_sampling.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");

    let errorstats = info(&mut probe, "errorstats").await;
    let memory = info(&mut probe, "memory").await;
    let oom: u64 = errorstats
        .lines()
        .find_map(|l| l.strip_prefix("errorstat_OOM:count="))
        .map_or(0, |n| n.trim().parse().unwrap_or(u64::MAX));
    let reasons = lock(&t.flood_reasons).clone();
    eprintln!(
        "flood: {FLOOD} junk bids published in {flood_took:?} ({:.0}/s); {} answered within {answered_after:?}, by reason {reasons:?}",
        FLOOD as f64 / flood_took.as_secs_f64(),
        t.flood_answers.load(Ordering::Relaxed),
    );
    eprintln!(
        "honest: {} sent, {} accepted, {} retried unanswered, {} retried shed, publish-to-accept mean {:?} max {:?}",
        honest.sent,
        honest.accepted,
        honest.retries_unanswered,
        honest.retries_shed,
        honest.total_wait / honest.accepted.max(1) as u32,
        honest.slowest
    );
    eprintln!(
        "short auctions: {} opened and closed in {churn_took:?}",
        short.len()
    );
    eprintln!(
        "master: used_memory peak sampled {} B ({:.1} MiB), INFO used_memory_peak {} B, largest pubsub omem sampled {} B, maxmemory {MAXMEMORY} B; errorstat_OOM {oom}",
        peak_used.load(Ordering::Relaxed),
        peak_used.load(Ordering::Relaxed) as f64 / 1048576.0,
        field(&memory, "used_memory_peak"),
        peak_omem.load(Ordering::Relaxed),
    );

    let cuts = server.log().matches("subscription lost").count();
    eprintln!("server subscriptions lost: {cuts}");
    assert_eq!(oom, 0, "the master answered OOM: {errorstats}");
    assert!(
        t.flood_answers.load(Ordering::Relaxed) >= FLOOD as u64 * 99 / 100,
        "the flood answered (none lost to a cut subscription): {}",
        t.flood_answers.load(Ordering::Relaxed)
    );
    assert_eq!(cuts, 0, "the server's subscription was cut under the flood");
    assert!(
        field(&memory, "used_memory_peak") < MAXMEMORY,
        "used memory reached maxmemory: {memory}"
    );
    assert!(
        !server.log().contains("OOM"),
        "the server saw an OOM answer"
    );
    assert!(
        honest.sent >= 1,
        "the honest bidder bid through the flood: {honest:?}"
    );
    assert!(
        honest.failed.is_empty() && honest.accepted == honest.sent,
        "every honest bid is accepted: {honest:?}"
    );
    assert!(short.len() >= 100);
    assert!(server.running(), "the server is still running");
    serving(port)
        .await
        .unwrap_or_else(|e| panic!("the server is SERVING at the end: {e}"));

    // After the retention (3 s) and a sweep (every 1 s), nothing of the short auctions is
    // left: no key, no index entry.
    let short_set: HashSet<&str> = short.iter().map(String::as_str).collect();
    let forgotten = Instant::now();
    eventually(
        "every key and index entry of the closed short auctions gone",
        Duration::from_secs(30),
        || async {
            let mut conn = master_conn(&stack).await;
            let mut keys: Vec<String> = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("*{short-*")
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            let mut listed = Vec::new();
            for index in ["auctions:all", "auctions:closed", "auctions:open"] {
                let members: Vec<String> = redis::cmd("ZRANGE")
                    .arg(index)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                listed.extend(
                    members
                        .into_iter()
                        .filter(|m| short_set.contains(m.as_str()))
                        .map(|m| format!("{index}:{m}")),
                );
            }
            if keys.is_empty() && listed.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} keys left (e.g. {:?}), {} index entries left (e.g. {:?})",
                    keys.len(),
                    keys.iter().take(5).collect::<Vec<_>>(),
                    listed.len(),
                    listed.iter().take(5).collect::<Vec<_>>()
                ))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "short auctions forgotten within {:?} of the checks starting; whole test {:?}",
        forgotten.elapsed(),
        started.elapsed()
    );
    assert!(
        server.running(),
        "the server is still running after the sweep"
    );
}
