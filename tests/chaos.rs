//! Chaos: several auctions, 2 servers, 10 bidders (6 `auction-client` processes and 4
//! in-process bidders that record every bid they send), while the test SIGKILLs the Redis
//! master three times, triggers `SENTINEL FAILOVER` once, SIGKILLs and restarts a server,
//! and SIGSTOPs the holder of an auction's lease past its lease. A history checker then
//! holds the result against ARCHITECTURE.md's guarantees 1-6 and prints the figures
//! (also written to `target/chaos/figures.json`).
//!
//! Loopback only, bounded in time (≈2 minutes), stops by itself.

mod chaos_common;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auction::keyspace::AuctionId;
use auction::link::sentinel::{Master, Settings};
use auction::proto::v1 as pb;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction::runtime::config::RedisArgs;
use auction::runtime::task::TaskGuard;
use auction::store::ledger;
use auction::wire::Event;
use auction_testkit::{DevStack, DevStackConfig, eventually};
use chaos_common::*;
use support::*;

const AUCTIONS: usize = 3;
const AUCTION_SECONDS: i64 = 95;
const LEASE: &str = "3s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_history_checker() {
    tokio::time::timeout(Duration::from_secs(300), run())
        .await
        .expect("the chaos test exceeded its 300 s bound");
}

async fn run() {
    let mut stack = DevStack::start(DevStackConfig {
        failover_timeout: Duration::from_secs(5),
        ..DevStackConfig::default()
    })
    .await
    .expect("topology");
    let master = Master::start(Settings::from_args(
        &RedisArgs::local(&stack.sentinel_addrs()).expect("args"),
    ));
    let recorder = Recorder::on(master.clone())
        .await
        .expect("start the event recorder");
    let ports = [free_port(), free_port()];
    let server_env = |_: usize| vec![("LOCK_LEASE", LEASE.to_string())];
    let mut servers: Vec<Proc> = (0..2)
        .map(|i| server(&stack, &format!("server-{i}"), ports[i], &server_env(i)))
        .collect();
    for p in ports {
        wait_health(p, "", "SERVING", Duration::from_secs(30)).await;
    }
    let mut admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{}", ports[0]))
        .await
        .expect("admin");
    let mut ids = Vec::new();
    for i in 0..AUCTIONS {
        let id = format!("chaos-{i}");
        admin
            .open_auction(pb::OpenAuctionRequest {
                item: format!("lot {i}"),
                starting_price: 100,
                min_increment: 5,
                auction_id: id.clone(),
                duration: Some(prost_types::Duration {
                    seconds: AUCTION_SECONDS,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("open");
        ids.push(id);
    }
    // Our bidders (processes) and the recording bidders (in-process).
    let mut clients: Vec<Proc> = (0..6)
        .map(|i| {
            client(
                &stack,
                &format!("client-{i}"),
                ports[i % 2],
                &[
                    ("AUCTION_ID", ids[i % AUCTIONS].clone()),
                    ("BID_INTERVAL", "300ms".into()),
                    ("BID_RETRY_AFTER", "1s".into()),
                    ("MAX_BID", "100000000".into()),
                    ("CLOSE_GRACE", "60s".into()),
                ],
            )
        })
        .collect();
    let sent: Arc<Mutex<HashMap<String, Sent>>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let _bidders: Vec<TaskGuard> = (0..4)
        .map(|i| {
            TaskGuard::new(
                "recording bidder",
                tokio::spawn(recording_bidder(
                    format!("rec-{i}"),
                    master.clone(),
                    recorder.clone(),
                    ids.clone(),
                    sent.clone(),
                    stop_rx.clone(),
                )),
            )
        })
        .collect();
    let started = Instant::now();
    let accepted_so_far = |r: &Recorder| {
        r.timed()
            .iter()
            .filter(|(_, e)| matches!(e, Event::BidAccepted { .. }))
            .count()
    };
    eventually(
        "bids to start flowing (20 accepted)",
        Duration::from_secs(20),
        || async {
            match accepted_so_far(&recorder) {
                n if n >= 20 => Ok(()),
                n => Err(format!("{n} accepted")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));

    // --- Faults -----------------------------------------------------------------------
    let mut promotions = Vec::new();
    let mut kills = Vec::new();
    for round in 0..2 {
        let (promoted, t) = kill_master(&mut stack, Duration::from_secs(40)).await;
        eprintln!(
            "chaos: master kill {} promoted after {promoted:.2}s",
            round + 1
        );
        promotions.push(promoted);
        kills.push(t);
    }
    // A manual failover while bids flow: the old master stays up.
    let old_port = stack.current_master_port().await.expect("master");
    // Sentinels must agree that every replica has been a healthy replica for a while:
    // right after a rejoin, a Sentinel that still remembers the node as a returning master
    // would demote it again the moment another Sentinel promotes it (a Sentinel race, not
    // ours to test).
    wait_sentinels_settled(&stack).await;
    // A Sentinel refuses while it still counts a previous failover (2 x failover-timeout)
    // or while no replica is fit; ask each in turn until one accepts (bounded).
    let t = Instant::now();
    eventually_every(
        "a Sentinel to accept SENTINEL FAILOVER",
        Duration::from_secs(40),
        Duration::from_millis(500),
        || async {
            let mut refusals = Vec::new();
            for addr in stack.sentinel_addrs() {
                let sentinel = redis::Client::open(format!("redis://{addr}/")).expect("client");
                let Ok(mut sconn) = sentinel.get_multiplexed_async_connection().await else {
                    refusals.push(format!("{addr}: unreachable"));
                    continue;
                };
                match redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg("mymaster")
                    .query_async::<String>(&mut sconn)
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        eprintln!("chaos: SENTINEL FAILOVER via {addr} refused: {e}");
                        refusals.push(format!("{addr} refused: {e}"));
                    }
                }
            }
            Err(refusals.join("; "))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    stack
        .wait_for_master_change(old_port, Duration::from_secs(30))
        .await
        .expect("manual failover");
    let manual_promotion = t.elapsed().as_secs_f64();
    eprintln!("chaos: SENTINEL FAILOVER promoted after {manual_promotion:.2}s");
    let old = stack.node_index(old_port).expect("node");
    wait_rejoined(
        &stack,
        old,
        "the old master to become a replica after the manual failover",
    )
    .await;
    let (promoted, t) = kill_master(&mut stack, Duration::from_secs(40)).await;
    eprintln!("chaos: master kill 3 promoted after {promoted:.2}s");
    promotions.push(promoted);
    kills.push(t);

    // Kill the server holding the most leases, restart it on the same port.
    let live: Vec<u32> = servers.iter().map(Proc::pid).collect();
    let mut held: BTreeMap<u32, HashSet<String>> = BTreeMap::new();
    for id in &ids {
        if let Some(pid) = holder_pid(&stack, id).await {
            held.entry(pid).or_default().insert(id.clone());
        }
    }
    eprintln!("chaos: leases by server pid {held:?} (servers {live:?})");
    let victim = servers
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| held.get(&s.pid()).map_or(0, HashSet::len))
        .map(|(i, _)| i)
        .expect("two servers");
    let victim_auctions = held
        .get(&servers[victim].pid())
        .cloned()
        .unwrap_or_default();
    assert!(
        !victim_auctions.is_empty(),
        "no server holds a lease while bids flow: {held:?}"
    );
    let t_server_kill = Instant::now();
    servers[victim].signal("KILL");
    servers[victim]
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed");
    let takeover = eventually(
        "a bid accepted on the killed server's auctions",
        Duration::from_secs(30),
        || async {
            recorder
                .first_accept_after(t_server_kill, Some(&victim_auctions))
                .map(|at| at.duration_since(t_server_kill).as_secs_f64())
                .ok_or_else(|| format!("none on {victim_auctions:?} since the kill"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("chaos: server kill -> first accepted bid on its auctions after {takeover:.2}s");
    servers.push(server(
        &stack,
        &format!("server-{victim}-restarted"),
        ports[victim],
        &server_env(victim),
    ));
    wait_health(ports[victim], "", "SERVING", Duration::from_secs(30)).await;

    // Pause the holder of an auction's lease for longer than the lease. Wait until a live
    // server holds it (the killed server's lease may not have expired yet).
    let target = ids[0].clone();
    let what = format!("a live server to hold the lease of {target}");
    let paused = eventually(&what, Duration::from_secs(30), || {
        let live: Vec<(usize, u32)> = servers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.running().then(|| (i, s.pid())))
            .collect();
        let (stack, target) = (&stack, &target);
        async move {
            let holder = holder_pid(stack, target).await;
            live.iter()
                .find(|(_, pid)| Some(*pid) == holder)
                .map(|(i, _)| *i)
                .ok_or_else(|| format!("holder pid {holder:?}, live servers (index, pid) {live:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let paused_token = {
        let mut conn = master_conn(&stack).await;
        let v: Option<String> = redis::cmd("GET")
            .arg(AuctionId::parse(&target).expect("id").lock_key())
            .query_async(&mut conn)
            .await
            .expect("GET");
        v.and_then(|v| v.rsplit('#').next().and_then(|t| t.parse::<u64>().ok()))
            .unwrap_or(0)
    };
    servers[paused].signal("STOP");
    tokio::time::sleep(Duration::from_secs(6)).await; // the fault itself: longer than LEASE
    servers[paused].signal("CONT");
    eprintln!("chaos: paused the holder of {target} (token {paused_token}) for 6s");

    // --- Wind down: let every auction close, then every recorded bid resolve. ------------
    // Each check opens a connection to the master: every 250 ms is often enough.
    let finals = eventually_every(
        "every auction to close",
        Duration::from_secs(AUCTION_SECONDS as u64 + 60),
        Duration::from_millis(250),
        || async {
            let mut conn = master_conn(&stack).await;
            let mut finals = HashMap::new();
            let mut open = Vec::new();
            for id in &ids {
                match ledger::get(&mut conn, &AuctionId::parse(id).expect("id")).await {
                    Ok(Some(rec)) if !rec.open => {
                        finals.insert(id.clone(), rec);
                    }
                    Ok(Some(_)) => open.push(format!("{id} open")),
                    Ok(None) => open.push(format!("{id} missing")),
                    Err(e) => open.push(format!("{id}: {e}")),
                }
            }
            if open.is_empty() {
                Ok(finals)
            } else {
                Err(open.join(", "))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    // Best effort: bids still without an outcome after 30 s are judged below.
    let resolved = eventually(
        "every recorded bid to get an outcome",
        Duration::from_secs(30),
        || async {
            let unresolved = sent
                .lock()
                .expect("lock")
                .values()
                .filter(|s| !recorder.outcome_of(&s.bid.bid_id))
                .count();
            if unresolved == 0 {
                Ok(())
            } else {
                Err(format!("{unresolved} unresolved"))
            }
        },
    )
    .await;
    if let Err(e) = resolved {
        eprintln!("chaos: {e:#}");
    }
    let _ = stop_tx.send(true);
    // Our bidders saw their auction close (by event, or by resync from stored state after
    // missing it) and exited cleanly.
    let mut gaps = 0;
    for c in clients.iter_mut() {
        let code = c
            .wait_exit(Duration::from_secs(60))
            .await
            .expect("client exits after its auction closed");
        assert_eq!(code, 0, "{} exit code", c.name);
        gaps += c.log().matches("missed events (seq gap)").count();
    }

    // --- The history checker ---------------------------------------------------------------
    let events: Vec<Event> = recorder.timed().into_iter().map(|(_, e)| e).collect();
    let mut conn = master_conn(&stack).await;
    let mut lost = Vec::new();
    let mut total_accepted = 0usize;
    for id in &ids {
        let aid = AuctionId::parse(id).expect("id");
        let rec = &finals[id];
        let history = ledger::history(&mut conn, &aid, "-", 1_000_000)
            .await
            .expect("history");
        total_accepted += history.len();
        let fences = assert_history_sound(id, &history);
        let by_bid: HashMap<&str, &ledger::HistoryEntry> = history
            .iter()
            .map(|(_, h)| (h.bid_id.as_str(), h))
            .collect();
        assert!(
            history.iter().all(|(_, h)| h.at_ms < rec.deadline_ms),
            "{id}: a bid was accepted at or after the deadline"
        );
        let best = history
            .last()
            .map(|(_, h)| (h.amount, h.bidder.clone(), h.bid_id.clone()));
        assert_eq!(
            rec.winner,
            best.filter(|(a, _, _)| *a >= rec.reserve_price),
            "{id}: the winner is the highest accepted bid"
        );
        let mut by_seq: HashMap<u64, String> = HashMap::new();
        let mut closes = HashSet::new();
        for e in of(&events, id) {
            if let Some(seq) = e.seq() {
                let json = e.to_json();
                let first = by_seq.entry(seq).or_insert_with(|| json.clone());
                assert_eq!(*first, json, "{id}: two different events carry seq {seq}");
            }
            match &e {
                Event::BidAccepted {
                    bid_id,
                    amount,
                    seq,
                    ..
                } => match by_bid.get(bid_id.as_str()) {
                    Some(h) => assert_eq!(
                        (h.amount, h.seq),
                        (*amount, *seq),
                        "{id}: announced {bid_id} differs from history"
                    ),
                    None => lost.push(bid_id.clone()),
                },
                Event::AuctionClosed { .. } => {
                    closes.insert(e.to_json());
                }
                _ => {}
            }
        }
        assert!(closes.len() <= 1, "{id}: closed more than once: {closes:?}");
        if id == &target {
            // Fences never go backwards (checked above), so once a newer holder wrote, the
            // paused holder's token never wrote again.
            let later = fences.iter().skip_while(|f| **f <= paused_token).count();
            eprintln!(
                "chaos: {id}: {later} accepted bids written with a newer token than the paused holder's {paused_token}"
            );
            assert!(
                paused_token > 0 && later > 0,
                "{id}: another server took over from the paused holder"
            );
        }
    }
    let sent = sent.lock().expect("lock");
    let unconfirmed: Vec<&String> = sent.keys().filter(|b| !recorder.outcome_of(b)).collect();
    let recorded_bids = sent.len();
    for b in &unconfirmed {
        let auction = sent[*b].bid.auction_id.to_string();
        assert!(
            !finals[&auction].open,
            "unconfirmed bid {b} on an auction that did not close"
        );
    }
    let mut first_accepts: Vec<f64> = kills
        .iter()
        .map(|t| {
            recorder
                .first_accept_after(*t + Duration::from_millis(100), None)
                .map(|a| a.duration_since(*t).as_secs_f64())
                .unwrap_or(f64::NAN)
        })
        .collect();
    let mut promo = promotions.clone();
    let figures = serde_json::json!({
        "master_kills": kills.len(),
        "sentinel_promotion_s": {"each": promotions, "median": median(&mut promo), "max": promo.iter().cloned().fold(0.0, f64::max)},
        "manual_failover_promotion_s": manual_promotion,
        "kill_to_first_accepted_bid_s": {"each": first_accepts.clone(), "median": median(&mut first_accepts), "max": first_accepts.iter().cloned().fold(0.0, f64::max)},
        "server_kill_to_first_accepted_bid_s": takeover,
        "bids_lost": lost.len(),
        "bids_unconfirmed": unconfirmed.len(),
        "recording_bidders_bids_sent": recorded_bids,
        "accepted_bids_in_history": total_accepted,
        "events_seen": events.len(),
        "seq_gaps_seen_and_resynced_by_clients": gaps,
        "run_seconds": started.elapsed().as_secs_f64(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("figures.json"),
        serde_json::to_string_pretty(&figures).unwrap_or_default(),
    );
    eprintln!(
        "chaos figures: {}",
        serde_json::to_string_pretty(&figures).unwrap_or_default()
    );
    assert!(lost.is_empty(), "acknowledged bids lost: {lost:?}");
}
