//! Chaos: 3 long auctions and 8 short ones that close one after another, 2 servers, 10
//! bidders (6 `auction-client` processes and 4 in-process bidders that record every bid
//! they send), while the test injects 23 faults, mixed (see `SCHEDULE`): master SIGKILL
//! with a promotion, master SIGKILL and an immediate restart in place, every replica
//! SIGSTOPped (lag) while auctions close, a server SIGKILLed and restarted, a lease holder
//! SIGSTOPped past its lease, `SENTINEL FAILOVER`, and three partitions: the master cut off
//! from its replicas and the Sentinels with one server on its side, a lease-holding server
//! cut off from Redis, and a bidder cut off from Redis, each healed after.
//!
//! Every Redis node, Sentinel, server and `auction-client` runs in a network namespace of
//! its own ([`auction_testkit::Network`]: a private range made inside the test, deleted
//! after); the test process reaches them all over links no partition cuts. Where network
//! namespaces are refused (not root), the run says so, keeps to loopback and skips the
//! partitions; under CI (`CI` set) that is a failure instead.
//!
//! A history checker then holds the result against ARCHITECTURE.md's guarantees 1-6, also
//! across the run (no auction closed twice with different outcomes), and writes the figures
//! to `target/chaos/figures.json`. Bounded in time (about 4-5 minutes), stops by itself.

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
use auction_testkit::{DevStack, DevStackConfig, Network, eventually};
use chaos_common::*;
use support::*;

const AUCTIONS: usize = 3;
/// The main auctions outlast the faults whatever their pace: they are closed through the
/// admin API once the last fault has healed.
const AUCTION_SECONDS: i64 = 900;
/// Short auctions that close one after another while faults are injected.
const CLOSING: usize = 8;
const LEASE: &str = "3s";
/// `auction-client` processes, each on a host of its own.
const CLIENTS: usize = 6;

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// SIGKILL of the master; Sentinel promotes a replica; the old node rejoins.
    MasterKill,
    /// SIGKILL of the master and an immediate restart on the same files (no failover).
    MasterRestartInPlace,
    /// SIGSTOP of every replica for 2.5 s (lag) while auctions close.
    ReplicaStop,
    /// SIGKILL of the server holding the most leases; restarted on its port.
    ServerKill,
    /// SIGSTOP of a lease holder for longer than its lease.
    LeaseHolderStop,
    /// `SENTINEL FAILOVER` while the old master stays up.
    SentinelFailover,
    /// The master and one server cut off from the replicas, the Sentinels and everyone
    /// else until a replica is promoted; then healed.
    MasterPartition,
    /// A lease-holding server cut off from Redis until another takes its auction over.
    ServerPartition,
    /// An `auction-client` cut off from Redis for 4 s.
    BidderPartition,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::MasterKill => "master_sigkill_promotion",
            Kind::MasterRestartInPlace => "master_sigkill_restart_in_place",
            Kind::ReplicaStop => "replica_sigstop",
            Kind::ServerKill => "server_sigkill",
            Kind::LeaseHolderStop => "lease_holder_sigstop",
            Kind::SentinelFailover => "sentinel_failover",
            Kind::MasterPartition => "partition_master_with_one_server",
            Kind::ServerPartition => "partition_lease_holder_from_redis",
            Kind::BidderPartition => "partition_bidder_from_redis",
        }
    }

    fn is_partition(self) -> bool {
        matches!(
            self,
            Kind::MasterPartition | Kind::ServerPartition | Kind::BidderPartition
        )
    }
}

/// The faults of one run, in order: 23, every kind at least once, mixed.
const SCHEDULE: [Kind; 23] = [
    Kind::MasterKill,
    Kind::ReplicaStop,
    Kind::ServerKill,
    Kind::MasterPartition,
    Kind::MasterRestartInPlace,
    Kind::LeaseHolderStop,
    Kind::SentinelFailover,
    Kind::BidderPartition,
    Kind::ReplicaStop,
    Kind::MasterKill,
    Kind::MasterRestartInPlace,
    Kind::ServerKill,
    Kind::LeaseHolderStop,
    Kind::ServerPartition,
    Kind::ReplicaStop,
    Kind::MasterKill,
    Kind::MasterRestartInPlace,
    Kind::SentinelFailover,
    Kind::ServerKill,
    Kind::ReplicaStop,
    Kind::MasterRestartInPlace,
    Kind::LeaseHolderStop,
    Kind::MasterKill,
];

/// One injected fault, for `figures.json`.
#[derive(serde::Serialize)]
struct Fault {
    kind: &'static str,
    at_ms: u64,
    recovered_ms: u64,
}

/// The direct children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/task");
    let Ok(tasks) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Waits (up to 30 s) until the server at `addr` reports SERVING.
async fn wait_serving(addr: &str) {
    wait_health_at(addr, "", "SERVING", Duration::from_secs(30)).await;
}

/// Waits (up to 30 s) for a bid accepted on one of `auctions` after `since`; returns the
/// seconds from `since` to its arrival.
async fn accepted_since(
    recorder: &Recorder,
    since: Instant,
    auctions: &HashSet<String>,
    what: &str,
) -> f64 {
    eventually(what, Duration::from_secs(30), || async {
        recorder
            .first_accept_after(since, Some(auctions))
            .map(|at| at.duration_since(since).as_secs_f64())
            .ok_or_else(|| format!("none on {auctions:?} yet"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until the master Sentinel names accepts writes and every other node is its
/// connected replica.
async fn wait_all_linked(stack: &DevStack) {
    let port = eventually(
        "Sentinel to name a master",
        Duration::from_secs(30),
        || async {
            stack
                .current_master_port()
                .await
                .map_err(|e| format!("{e:#}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    stack
        .wait_writable(port, Duration::from_secs(30))
        .await
        .expect("the master accepts writes");
    for index in 0..stack.redis_ports().len() {
        if stack.node_port(index) != port {
            wait_rejoined(stack, index, "every replica to be linked").await;
        }
    }
}

/// The live server holding the most leases among `ids`, and the auctions it holds.
async fn lease_heaviest(
    stack: &DevStack,
    servers: &[Proc],
    ids: &[String],
) -> (usize, HashSet<String>) {
    let mut held: BTreeMap<u32, HashSet<String>> = BTreeMap::new();
    for id in ids {
        if let Some(pid) = holder_pid(stack, id).await {
            held.entry(pid).or_default().insert(id.clone());
        }
    }
    let victim = servers
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| held.get(&s.pid()).map_or(0, HashSet::len))
        .map(|(i, _)| i)
        .expect("two servers");
    let auctions = held
        .get(&servers[victim].pid())
        .cloned()
        .unwrap_or_default();
    assert!(
        !auctions.is_empty(),
        "no server holds a lease while bids flow: {held:?}"
    );
    (victim, auctions)
}

/// Waits until a live server holds `target`'s lease; returns its index and token.
async fn live_holder(stack: &DevStack, servers: &mut [Proc], target: &str) -> (usize, u64) {
    let what = format!("a live server to hold the lease of {target}");
    let holder = eventually(&what, Duration::from_secs(30), || {
        let live: Vec<(usize, u32)> = servers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.running().then(|| (i, s.pid())))
            .collect();
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
    let mut conn = master_conn(stack).await;
    let v: Option<String> = redis::cmd("GET")
        .arg(AuctionId::parse(target).expect("id").lock_key())
        .query_async(&mut conn)
        .await
        .expect("GET");
    let token = v
        .and_then(|v| v.rsplit('#').next().and_then(|t| t.parse::<u64>().ok()))
        .unwrap_or(0);
    (holder, token)
}

/// A manual failover while bids flow (the old master stays up); returns seconds to the
/// promotion, once the old master is a replica again.
async fn sentinel_failover(stack: &DevStack) -> f64 {
    let old_port = stack.current_master_port().await.expect("master");
    // Sentinels must agree that every replica has been a healthy replica for a while:
    // right after a rejoin, a Sentinel that still remembers the node as a returning master
    // would demote it again the moment another Sentinel promotes it (a Sentinel race, not
    // ours to test).
    wait_sentinels_settled(stack).await;
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
                    Err(e) => refusals.push(format!("{addr} refused: {e}")),
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
    let promoted = t.elapsed().as_secs_f64();
    let old = stack.node_index(old_port).expect("node");
    wait_rejoined(
        stack,
        old,
        "the old master to become a replica after the manual failover",
    )
    .await;
    promoted
}

/// Host names on the test network: the stack's (`redis{i}`, `sentinel{j}`), then ours.
fn host_names() -> Vec<String> {
    let stack = (0..3).map(|i| format!("redis{i}"));
    let sentinels = (0..3).map(|j| format!("sentinel{j}"));
    let servers = (0..2).map(|i| format!("server{i}"));
    let clients = (0..CLIENTS).map(|i| format!("client{i}"));
    stack
        .chain(sentinels)
        .chain(servers)
        .chain(clients)
        .collect()
}

/// The test network, or `None` (with the reason printed) where namespaces are refused;
/// under CI that is a failure: CI runs as root and must run the partitions.
fn network() -> Option<Arc<Network>> {
    let names = host_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Network::for_test(&names, "partitions (the other faults run on loopback)").map(Arc::new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_23_faults_and_partitions() {
    tokio::time::timeout(Duration::from_secs(600), run())
        .await
        .expect("the chaos test exceeded its 600 s bound");
}

async fn run() {
    let net = network();
    let host = |name: &str| net.as_deref().map(|n| n.host(name).clone());
    let mut stack = DevStack::start(DevStackConfig {
        failover_timeout: Duration::from_secs(5),
        network: net.clone(),
        // The in-place restarts below come back with exactly what was answered only if
        // every answered write is in the file: with `everysec`, Redis may postpone a write
        // behind a slow fsync and answer anyway (a CI run lost an announced bid that way).
        // The manifests keep `everysec` and cover the restart with the start script instead,
        // which holds a restarted master back until Sentinel promotes the replica with the
        // acknowledged writes (tests/manifests/roles.rs).
        extra_redis_conf: vec!["appendfsync always".to_owned()],
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
    let server_hosts = [host("server0"), host("server1")];
    let server_addrs = [0, 1].map(|i| addr_on(server_hosts[i].as_ref(), ports[i]));
    let start_server = |stack: &DevStack, i: usize, name: &str| {
        server_on(
            stack,
            server_hosts[i].as_ref(),
            name,
            ports[i],
            &server_env(i),
        )
    };
    let mut servers: Vec<Proc> = (0..2)
        .map(|i| start_server(&stack, i, &format!("server-{i}")))
        .collect();
    for addr in &server_addrs {
        wait_serving(addr).await;
    }
    let mut admin = AuctionAdminClient::connect(format!("http://{}", server_addrs[0]))
        .await
        .expect("admin");
    // The main auctions first (`ids[..AUCTIONS]`), then the short ones, closing 22 s apart.
    let main = (0..AUCTIONS).map(|i| (format!("chaos-{i}"), format!("lot {i}"), AUCTION_SECONDS));
    let closing = (0..CLOSING).map(|k| {
        let seconds = 25 + 22 * k as i64;
        (
            format!("chaos-closing-{k}"),
            format!("closing lot {k}"),
            seconds,
        )
    });
    let mut ids = Vec::new();
    for (id, item, seconds) in main.chain(closing) {
        admin
            .open_auction(pb::OpenAuctionRequest {
                item,
                starting_price: 100,
                min_increment: 5,
                auction_id: id.clone(),
                duration: Some(prost_types::Duration { seconds, nanos: 0 }),
                ..Default::default()
            })
            .await
            .expect("open");
        ids.push(id);
    }
    // Our bidders (processes) and the recording bidders (in-process).
    let mut clients: Vec<Proc> = (0..CLIENTS)
        .map(|i| {
            client_on(
                &stack,
                host(&format!("client{i}")).as_ref(),
                &format!("client-{i}"),
                &server_addrs[i % 2],
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
    let mut faults: Vec<Fault> = Vec::new();
    let mut manual_promotions = Vec::new();
    let mut takeovers = Vec::new();
    let mut pauses: Vec<(String, u64)> = Vec::new();
    let main_ids: Vec<String> = ids[..AUCTIONS].to_vec();
    let mut skipped = Vec::new();
    for (round, kind) in SCHEDULE.iter().copied().enumerate() {
        let cuts = net.as_deref();
        if kind.is_partition() && cuts.is_none() {
            skipped.push(kind.name());
            continue;
        }
        let cuts = || cuts.expect("partitions run only on a network");
        let at = started.elapsed();
        let t = Instant::now();
        match kind {
            Kind::MasterKill => {
                wait_sentinels_settled(&stack).await;
                let (promoted, t) = kill_master(&mut stack, Duration::from_secs(60)).await;
                eprintln!("chaos: master kill promoted after {promoted:.2}s");
                promotions.push(promoted);
                kills.push(t);
            }
            Kind::MasterRestartInPlace => {
                // Killed and started again at once, well under Sentinel's down-after: no
                // failover. The process dies, the machine does not: everything it answered
                // is in its AOF file (`appendfsync always`, above), so it comes back with it,
                // under a new replication id; its replicas resync from it, and every server
                // reconnects to the same master with a new connection (whose first WAIT
                // covers only the commit marker it writes first).
                let old = master_index(&stack).await;
                // Its forked children (an RDB transfer to a replica) would outlive it and
                // keep its port: they die with it, as in a container.
                let children = children_of(stack.node_pid(old).expect("the master runs"));
                stack.kill_node(old).expect("kill master");
                for child in children {
                    let _ = std::process::Command::new("kill")
                        .arg("-KILL")
                        .arg(child.to_string())
                        .status();
                }
                // A start can fail while a child the killed process forked (an RDB
                // transfer) still holds the port: then try again (bounded); Sentinel may
                // fail over meanwhile, which the wait below accepts.
                let mut attempts = 0;
                while let Err(e) = stack.restart_node(old).await {
                    attempts += 1;
                    eprintln!("chaos: restart in place failed (attempt {attempts}): {e:#}");
                    assert!(attempts < 3, "restart in place failed {attempts} times");
                }
                wait_all_linked(&stack).await;
            }
            Kind::ReplicaStop => {
                // Every replica lags for 2.5 s (shorter than min-replicas-max-lag): writes
                // and closes go on, announcements are held back by WAIT.
                let paused = stack.pause_replicas().await.expect("pause the replicas");
                tokio::time::sleep(Duration::from_millis(2500)).await; // the fault itself
                drop(paused);
                wait_all_linked(&stack).await;
            }
            Kind::ServerKill => {
                let (victim, victim_auctions) = lease_heaviest(&stack, &servers, &main_ids).await;
                let t_server_kill = Instant::now();
                servers[victim].signal("KILL");
                servers[victim]
                    .wait_exit(Duration::from_secs(10))
                    .await
                    .expect("killed");
                let takeover = accepted_since(
                    &recorder,
                    t_server_kill,
                    &victim_auctions,
                    "a bid accepted on the killed server's auctions",
                )
                .await;
                eprintln!(
                    "chaos: server kill -> first accepted bid on its auctions after {takeover:.2}s"
                );
                takeovers.push(takeover);
                servers[victim] =
                    start_server(&stack, victim, &format!("server-{victim}-r{round}"));
                wait_serving(&server_addrs[victim]).await;
            }
            Kind::LeaseHolderStop => {
                let target = main_ids[round % AUCTIONS].clone();
                let (paused, token) = live_holder(&stack, &mut servers, &target).await;
                servers[paused].signal("STOP");
                tokio::time::sleep(Duration::from_secs(5)).await; // the fault: > LEASE
                servers[paused].signal("CONT");
                eprintln!("chaos: paused the holder of {target} (token {token}) for 5s");
                pauses.push((target, token));
            }
            Kind::SentinelFailover => {
                let promoted = sentinel_failover(&stack).await;
                eprintln!("chaos: SENTINEL FAILOVER promoted after {promoted:.2}s");
                manual_promotions.push(promoted);
            }
            Kind::MasterPartition => {
                // The master and one server on one side, everyone else on the other: the
                // Sentinels promote a replica while the cut server may still write to the
                // old master (for up to min-replicas-max-lag). Nothing it writes there can
                // reach a replica, so WAIT vouches for none of it and it announces nothing;
                // the writes vanish when the healed node becomes a replica.
                wait_sentinels_settled(&stack).await;
                let old = master_index(&stack).await;
                let old_port = stack.node_port(old);
                let side = round % 2;
                let (node, srv) = (format!("redis{old}"), format!("server{side}"));
                cuts()
                    .cut(&[&node, &srv])
                    .expect("cut the master and a server");
                let promoted = stack
                    .wait_for_master_change(old_port, Duration::from_secs(60))
                    .await
                    .expect("a replica promoted on the majority side");
                // Both sides live on for a moment: the cut server keeps its leases on the
                // old master while the others bid on the new one.
                tokio::time::sleep(Duration::from_secs(2)).await; // the fault itself
                cuts().heal().expect("heal");
                eprintln!(
                    "chaos: master {node} cut off with {srv}; node on port {promoted} promoted"
                );
                wait_rejoined(&stack, old, "the cut master to rejoin as a replica").await;
                wait_all_linked(&stack).await;
                wait_serving(&server_addrs[side]).await;
            }
            Kind::ServerPartition => {
                let target = main_ids[round % AUCTIONS].clone();
                let (victim, token) = live_holder(&stack, &mut servers, &target).await;
                let t_cut = Instant::now();
                cuts()
                    .cut(&[&format!("server{victim}")])
                    .expect("cut the lease holder");
                let only: HashSet<String> = [target.clone()].into();
                let takeover = accepted_since(
                    &recorder,
                    t_cut,
                    &only,
                    "another server to accept a bid on the cut holder's auction",
                )
                .await;
                cuts().heal().expect("heal");
                eprintln!(
                    "chaos: holder of {target} (token {token}) cut off; taken over after {takeover:.2}s"
                );
                takeovers.push(takeover);
                pauses.push((target, token));
                wait_serving(&server_addrs[victim]).await;
            }
            Kind::BidderPartition => {
                let i = round % CLIENTS;
                let name = format!("client-{i}");
                cuts().cut(&[&format!("client{i}")]).expect("cut a bidder");
                tokio::time::sleep(Duration::from_secs(4)).await; // the fault itself
                cuts().heal().expect("heal");
                let healed = Instant::now();
                eventually(
                    &format!("{name} to be answered again after the heal"),
                    Duration::from_secs(30),
                    || async {
                        if recorder.heard_from_after(&name, healed) {
                            Ok(())
                        } else {
                            Err("no outcome of its bids yet".to_owned())
                        }
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
            }
        }
        let recovered = t.elapsed();
        eprintln!(
            "chaos: fault {} of {}: {} at {:.1}s, recovered after {:.2}s",
            round + 1,
            SCHEDULE.len(),
            kind.name(),
            at.as_secs_f64(),
            recovered.as_secs_f64()
        );
        faults.push(Fault {
            kind: kind.name(),
            at_ms: at.as_millis() as u64,
            recovered_ms: recovered.as_millis() as u64,
        });
    }

    // --- Wind down: close the main auctions once bids flow on each again, let the short ones
    // close by their deadlines, then every recorded bid resolve. -------------------------
    let healed = Instant::now();
    for id in &main_ids {
        let only: HashSet<String> = [id.clone()].into();
        let what = format!("a bid accepted on {id} after the last fault");
        accepted_since(&recorder, healed, &only, &what).await;
        eventually(
            &format!("CloseAuction {id}"),
            Duration::from_secs(30),
            || {
                let mut admin = admin.clone();
                async move {
                    admin
                        .close_auction(pb::CloseAuctionRequest {
                            auction_id: id.clone(),
                        })
                        .await
                        .map_err(|status| format!("{status}"))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
    // Each check opens a connection to the master: every 250 ms is often enough.
    let finals = eventually_every(
        "every auction to close",
        Duration::from_secs(120),
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
    let timed = recorder.timed();
    let events: Vec<Event> = timed.iter().map(|(_, e)| e.clone()).collect();
    // Where in the run an event arrived: seconds, and the fault that came last before it.
    let when = |at: Instant| {
        let ms = at.duration_since(started).as_millis() as u64;
        let last = faults.iter().enumerate().rev().find(|(_, f)| f.at_ms <= ms);
        match last {
            Some((i, f)) => format!(
                "arrived at {:.1}s, {:.1}s after fault {} ({})",
                ms as f64 / 1000.0,
                (ms - f.at_ms) as f64 / 1000.0,
                i + 1,
                f.kind
            ),
            None => format!(
                "arrived at {:.1}s, before the first fault",
                ms as f64 / 1000.0
            ),
        }
    };
    let mut seq_conflicts = Vec::new();
    let mut conn = master_conn(&stack).await;
    let mut lost = Vec::new();
    let mut double_accepts = Vec::new();
    let mut wrong_winners = Vec::new();
    let mut closed_twice = Vec::new();
    let mut late_accepts = Vec::new();
    let mut total_accepted = 0usize;
    let mut fences_of: HashMap<String, Vec<u64>> = HashMap::new();
    for id in &ids {
        let aid = AuctionId::parse(id).expect("id");
        let rec = &finals[id];
        let history = ledger::history(&mut conn, &aid, "-", 1_000_000)
            .await
            .expect("history");
        total_accepted += history.len();
        fences_of.insert(id.clone(), assert_history_sound(id, &history));
        let mut by_bid: HashMap<&str, &ledger::HistoryEntry> = HashMap::new();
        for (_, h) in &history {
            if by_bid.insert(h.bid_id.as_str(), h).is_some() {
                double_accepts.push(format!("{id}: {} stored twice", h.bid_id));
            }
        }
        if history.iter().any(|(_, h)| h.at_ms >= rec.deadline_ms) {
            late_accepts.push(id.clone());
        }
        let best = history
            .last()
            .map(|(_, h)| (h.amount, h.bidder.clone(), h.bid_id.clone()));
        if rec.winner != best.filter(|(a, _, _)| *a >= rec.reserve_price) {
            wrong_winners.push(format!("{id}: stored winner {:?}", rec.winner));
        }
        let mut by_seq: HashMap<u64, (String, Instant)> = HashMap::new();
        let mut closes = HashSet::new();
        let of_id = timed
            .iter()
            .filter(|(_, e)| e.auction_id() == Some(id.as_str()));
        for (at, e) in of_id {
            let (at, e) = (*at, e.clone());
            if let Some(seq) = e.seq() {
                let json = e.to_json();
                let (first, first_at) = by_seq.entry(seq).or_insert_with(|| (json.clone(), at));
                if *first != json {
                    seq_conflicts.push(format!(
                        "{id}: seq {seq} carried by {first} ({}) and by {json} ({})",
                        when(*first_at),
                        when(at)
                    ));
                }
            }
            match &e {
                Event::BidAccepted {
                    bid_id,
                    amount,
                    seq,
                    ..
                } => match by_bid.get(bid_id.as_str()) {
                    Some(h) if (h.amount, h.seq) == (*amount, *seq) => {}
                    Some(h) => double_accepts.push(format!(
                        "{id}: announced {bid_id} at {amount} seq {seq}, stored at {} seq {}",
                        h.amount, h.seq
                    )),
                    None => lost.push(format!("{id}: {bid_id} seq {seq} {}", when(at))),
                },
                Event::AuctionClosed { winner, amount, .. } => {
                    // Every announced close is the stored one: an auction that closed again
                    // with another outcome (reopened by a lost write) shows up here.
                    let stored = rec.winner.as_ref().map(|(a, w, _)| (w.clone(), *a));
                    if stored != winner.clone().zip(*amount) {
                        closed_twice.push(format!(
                            "{id}: announced {winner:?} {amount:?}, stored {stored:?}"
                        ));
                    }
                    closes.insert(e.to_json());
                }
                _ => {}
            }
        }
        if closes.len() > 1 {
            closed_twice.push(format!("{id}: closed more than once: {closes:?}"));
        }
    }
    // Fences never go backwards (checked above), so once a newer holder wrote, a paused
    // holder's token never wrote again.
    for (id, token) in &pauses {
        let later = fences_of[id].iter().skip_while(|f| **f <= *token).count();
        eprintln!(
            "chaos: {id}: {later} accepted bids written with a newer token than the paused holder's {token}"
        );
        assert!(
            *token > 0 && later > 0,
            "{id}: another server took over from the paused holder (token {token})"
        );
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
        "faults": faults,
        "faults_total": faults.len(),
        "accepted": total_accepted,
        "lost_acknowledged": lost.len(),
        "double_accepts": double_accepts.len(),
        "seq_conflicts": seq_conflicts.len(),
        "wrong_winners": wrong_winners.len(),
        "closed_twice": closed_twice.len(),
        "unconfirmed": unconfirmed.len(),
        "auctions": ids.len(),
        "master_kills": kills.len(),
        "sentinel_promotion_s": {"each": promotions, "median": median(&mut promo), "max": promo.iter().cloned().fold(0.0, f64::max)},
        "manual_failover_promotion_s": manual_promotions,
        "kill_to_first_accepted_bid_s": {"each": first_accepts.clone(), "median": median(&mut first_accepts), "max": first_accepts.iter().cloned().fold(0.0, f64::max)},
        "server_kill_to_first_accepted_bid_s": takeovers,
        "recording_bidders_bids_sent": recorded_bids,
        "events_seen": events.len(),
        "seq_gaps_seen_and_resynced_by_clients": gaps,
        "partitions_skipped": skipped,
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
    assert!(faults.len() >= 20, "only {} faults", faults.len());
    if net.is_some() {
        assert!(
            skipped.is_empty(),
            "partitions skipped on a network: {skipped:?}"
        );
    }
    assert!(lost.is_empty(), "acknowledged bids lost: {lost:#?}");
    assert!(
        seq_conflicts.is_empty(),
        "two different events with one seq: {seq_conflicts:#?}"
    );
    assert!(
        double_accepts.is_empty(),
        "double accepts: {double_accepts:?}"
    );
    assert!(wrong_winners.is_empty(), "wrong winners: {wrong_winners:?}");
    assert!(closed_twice.is_empty(), "closed twice: {closed_twice:?}");
    assert!(
        late_accepts.is_empty(),
        "bids accepted at or after the deadline: {late_accepts:?}"
    );
}
