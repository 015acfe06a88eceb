//! The auction server of a step: started as a child process (under --server-wrapper if
//! given) on a free port, ready once it listens for gRPC and is subscribed to the command
//! channel, the step's auctions opened through its admin API, and stopped at the end with
//! the counters of its shutdown log line.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use auction::proto::v1 as pb;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction::runtime::config::DEFAULT_COMMAND_CHANNEL;
use auction_testkit::{Process, free_port};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;

use crate::recording::auction_id;
use crate::step::StepContext;
use crate::{STARTING_PRICE, now_ms};

/// Concurrent OpenAuction calls.
const OPEN_CONCURRENCY: usize = 32;

/// Starts the server, as a child process, with `WAIT_REPLICAS` = `wait_replicas` and
/// `extra_env` added to its environment, and waits until it is ready; returns it and its
/// gRPC port.
pub(crate) async fn start_server(
    ctx: &StepContext<'_>,
    admin_conn: &mut MultiplexedConnection,
    step: u32,
    wait_replicas: u32,
    extra_env: &[(&str, String)],
) -> anyhow::Result<(Process, u16)> {
    let grpc_port = free_port()?;
    let (bin, server_args) = match &ctx.args.server_wrapper {
        Some(w) => {
            let mut parts = w.split_whitespace().map(str::to_owned);
            let bin = parts.next().context("--server-wrapper is empty")?;
            let mut a: Vec<String> = parts.collect();
            a.push(ctx.server_bin.display().to_string());
            (bin, a)
        }
        None => (ctx.server_bin.display().to_string(), Vec::new()),
    };
    let mut env = vec![
        ("REDIS_SENTINELS", ctx.stack.sentinels_csv()),
        ("GRPC_ADDR", format!("127.0.0.1:{grpc_port}")),
        ("WAIT_REPLICAS", wait_replicas.to_string()),
        ("RUST_LOG", ctx.args.server_log.clone()),
    ];
    env.extend(extra_env.iter().cloned());
    let mut server = Process::spawn(
        ctx.stack.dir(),
        &format!("server-step{step}"),
        &bin,
        &server_args,
        &env,
    );
    let ready_limit = if ctx.args.server_wrapper.is_some() {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(30)
    };
    wait_server_ready(admin_conn, &mut server, grpc_port, ready_limit).await?;
    Ok((server, grpc_port))
}

async fn wait_server_ready(
    conn: &mut MultiplexedConnection,
    server: &mut Process,
    grpc_port: u16,
    limit: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        anyhow::ensure!(
            server.running(),
            "the server exited during start-up; its log:\n{}",
            server.log()
        );
        let subs: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(DEFAULT_COMMAND_CHANNEL)
            .query_async(conn)
            .await?;
        let subscribed = subs.first().is_some_and(|s| s.1 >= 1);
        let listening = std::net::TcpStream::connect(("127.0.0.1", grpc_port)).is_ok();
        if subscribed && listening {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "the server was not ready within {limit:?}; its log:\n{}",
                server.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `n` auctions so that auction i's deadline is about
/// `deadline_ms + spread_ms × i / n`; returns the deadlines (Redis clock, ms) in index order.
pub(crate) async fn open_auctions(
    admin: &mut AuctionAdminClient<tonic::transport::Channel>,
    step: u32,
    n: usize,
    deadline_ms: u64,
    spread_ms: u64,
) -> anyhow::Result<Vec<u64>> {
    let client = admin.clone();
    let results: Vec<anyhow::Result<(usize, u64)>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let mut client = client.clone();
            let deadline_ms = deadline_ms + spread_ms.saturating_mul(i as u64) / n as u64;
            async move {
                let mut attempt = 0;
                loop {
                    let ms = deadline_ms.saturating_sub(now_ms()).max(1000);
                    match client.open_auction(open_request(step, i, ms)).await {
                        Ok(resp) => {
                            let deadline = deadline_of(resp.into_inner())
                                .context("OpenAuction answered without a deadline")?;
                            return Ok((i, deadline));
                        }
                        Err(s) if s.code() == tonic::Code::Unavailable && attempt < 20 => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(s) => return Err(anyhow!("OpenAuction {}: {s}", auction_id(step, i))),
                    }
                }
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .collect()
        .await;
    let mut deadlines = vec![0; n];
    for r in results {
        let (i, d) = r?;
        deadlines[i] = d;
    }
    Ok(deadlines)
}

/// `OpenAuction` for auction `index` of `step`, lasting `ms`, at [`STARTING_PRICE`] with a
/// minimum increment of 1.
pub(crate) fn open_request(step: u32, index: usize, ms: u64) -> pb::OpenAuctionRequest {
    pb::OpenAuctionRequest {
        item: format!("bench item {index}"),
        duration: Some(prost_types::Duration {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        starting_price: STARTING_PRICE as i64,
        min_increment: 1,
        reserve_price: 0,
        auction_id: auction_id(step, index),
        soft_close: None,
    }
}

/// The deadline (Redis clock, ms) of the auction an `OpenAuction` answered with.
pub(crate) fn deadline_of(resp: pb::OpenAuctionResponse) -> Option<u64> {
    resp.auction
        .and_then(|a| a.deadline)
        .map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}

/// Stops the server; returns its exit code and the counters of its shutdown log line.
pub(crate) async fn stop_server(mut server: Process) -> (Option<i32>, Option<String>) {
    server.terminate();
    let exit_code = server.wait_exit(Duration::from_secs(60)).await.ok();
    let counters_line = server
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("auction server stopped"))
        .map(|l| {
            let l = l.find("counters").map(|i| &l[i..]).unwrap_or(l);
            l.chars().take(2000).collect::<String>()
        });
    (exit_code, counters_line)
}

/// Registers bidders `bench0..bench{n-1}` (the names the load generator bids under) and
/// returns their keys, in order.
pub(crate) async fn register_bidders(
    admin: &mut AuctionAdminClient<tonic::transport::Channel>,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::with_capacity(n);
    for b in 0..n {
        let reply = admin
            .register_bidder(pb::RegisterBidderRequest {
                bidder: format!("bench{b}"),
            })
            .await
            .with_context(|| format!("RegisterBidder bench{b}"))?;
        keys.push(reply.into_inner().key);
    }
    Ok(keys)
}
