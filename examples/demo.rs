//! A complete local auction on real processes: a Redis master, 2 replicas and 3 Sentinels,
//! one `auction-server`, five `auction-client` bidders. Opens the auction through the gRPC
//! admin API, prints every event live and the winner, then stops everything. Run it with `bash scripts/demo.sh`.
//!
//! The last bidder bids by proxy (`PROXY_MAX`), and the auction has a soft close, so the
//! run shows proxy raises and, when bids come late, the deadline moving.
//!
//! Environment: `DEMO_CLIENTS` (default 5), `AUCTION_DURATION` (default 30s),
//! `SOFT_CLOSE` (default 10s, 0 = off), `BID_INTERVAL` (default 3s), `DEMO_KEEP_LOGS=1` to
//! keep the logs directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use auction::bidder::args::DEFAULT_BID_INTERVAL;
use auction::proto::v1 as pb;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction::runtime::config::{DEFAULT_EVENT_CHANNEL, parse_duration, parse_duration_or_off};
use auction::server::args::DEFAULT_AUCTION_DURATION;
use auction::wire::Event;
use auction_testkit::{DevStack, DevStackConfig, Process, Recorder, free_port};

type Admin = AuctionAdminClient<tonic::transport::Channel>;

fn bin_dir() -> anyhow::Result<PathBuf> {
    // Examples live in target/<profile>/examples; the binaries one level up.
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("cannot locate the target directory")?
        .to_path_buf();
    for bin in ["auction-server", "auction-client"] {
        anyhow::ensure!(
            dir.join(bin).exists(),
            "{} not found: build the binaries first (`cargo build --release --bins`)",
            dir.join(bin).display()
        );
    }
    Ok(dir)
}

fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn describe(e: &Event) -> String {
    match e {
        Event::AuctionOpened {
            auction_id,
            item,
            starting_price,
            min_increment,
            deadline_ms,
            opened_at_ms,
            ..
        } => format!(
            "OPENED   {auction_id} {item:?}: starting at {}, step {}, closes in {:.0}s",
            money(*starting_price),
            money(*min_increment),
            (deadline_ms - opened_at_ms) as f64 / 1000.0
        ),
        Event::BidAccepted {
            bidder,
            amount,
            next_min,
            proxy,
            deadline_ms,
            ..
        } => {
            let by = if *proxy { "  by proxy" } else { "" };
            let moved = deadline_ms.map_or(String::new(), |d| {
                let left = d.saturating_sub(auction::runtime::process::unix_ms());
                format!(
                    "; SOFT CLOSE: deadline moved, closes in {:.1}s",
                    left as f64 / 1000.0
                )
            });
            format!(
                "ACCEPTED {bidder:<10} {:>9}   (next bid at least {}{by}{moved})",
                money(*amount),
                money(*next_min)
            )
        }
        Event::BidRejected {
            bidder,
            amount,
            reason,
            ..
        } => format!(
            "rejected {:<10} {:>9}   ({})",
            bidder.as_deref().unwrap_or("?"),
            amount.map(money).unwrap_or_default(),
            reason.as_str()
        ),
        Event::AuctionClosed {
            winner,
            amount,
            bid_count,
            ..
        } => match (winner, amount) {
            (Some(w), Some(a)) => format!(
                "CLOSED   winner {w} with {} after {bid_count} accepted bids",
                money(*a)
            ),
            _ => format!("CLOSED   no winner ({bid_count} accepted bids, reserve not met)"),
        },
    }
}

/// What the demo runs, from the environment.
struct Settings {
    clients: usize,
    duration: String,
    soft_close: Duration,
    interval: String,
    bins: PathBuf,
    started: Instant,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        Ok(Settings {
            clients: var("DEMO_CLIENTS", "5")
                .parse()
                .context("DEMO_CLIENTS must be a whole number")?,
            duration: var("AUCTION_DURATION", DEFAULT_AUCTION_DURATION),
            soft_close: parse_duration_or_off(&var("SOFT_CLOSE", "10s"))
                .map_err(|e| anyhow::anyhow!("SOFT_CLOSE: {e}"))?,
            interval: var("BID_INTERVAL", DEFAULT_BID_INTERVAL),
            bins: bin_dir()?,
            started: Instant::now(),
        })
    }

    /// `[  12.3s]`: time since the demo started.
    fn stamp(&self) -> String {
        format!("[{:>5.1}s]", self.started.elapsed().as_secs_f64())
    }

    fn bin(&self, name: &str) -> String {
        self.bins.join(name).display().to_string()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let demo = Settings::from_env()?;
    println!(
        "{} starting Redis: 1 master, 2 replicas, 3 Sentinels (append-only, min-replicas-to-write 1)…",
        demo.stamp()
    );
    let stack = DevStack::start(DevStackConfig::default()).await?;
    println!(
        "{} Redis up: master 127.0.0.1:{}, replicas {:?}, Sentinels {}",
        demo.stamp(),
        stack.node_port(0),
        &stack.redis_ports()[1..],
        stack.sentinels_csv()
    );
    let recorder = Recorder::start(&stack).await?;
    let (mut server, grpc_port) = start_server(&demo, &stack)?;
    let mut bidders = start_bidders(&demo, &stack, grpc_port);
    // Open the auction only once every bidder listens, so nobody misses the opening: the
    // bidders and this demo's recorder (the server subscribes to events only while a Watch
    // listens).
    let listeners = demo.clients as u64 + 1;
    stack
        .wait_subscribers(DEFAULT_EVENT_CHANNEL, listeners, Duration::from_secs(30))
        .await
        .with_context(|| {
            format!(
                "bidders did not subscribe; see logs in {}",
                stack.dir().display()
            )
        })?;
    let mut admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
    let id = open(&demo, &mut admin).await?;
    // Late bids may move the deadline (soft close) until the budgets run out.
    let limit =
        parse_duration(&demo.duration).map_err(anyhow::Error::msg)? + Duration::from_secs(120);
    let winner = follow(&demo, &recorder, limit).await.with_context(|| {
        format!(
            "the auction did not close in time; logs in {}",
            stack.dir().display()
        )
    })?;
    for b in bidders.iter_mut() {
        let code = b.wait_exit(Duration::from_secs(15)).await?;
        anyhow::ensure!(
            code == 0,
            "{} exited with {code}; its log:\n{}",
            b.name,
            b.log()
        );
    }
    report(&demo, &mut admin, &id).await?;
    server.terminate();
    server.wait_exit(Duration::from_secs(15)).await?;
    println!();
    match winner {
        (Some(w), Some(a)) => println!(
            "WINNER: {w} with {} — every bidder saw the close and exited cleanly.",
            money(a)
        ),
        _ => println!("No winner (no bid reached the reserve)."),
    }
    if std::env::var("DEMO_KEEP_LOGS").is_ok_and(|v| v == "1") {
        keep_logs(&stack)?;
    }
    println!("{} stopping Redis and cleaning up.", demo.stamp());
    Ok(())
}

/// Starts the server on a free port; returns it and the port.
fn start_server(demo: &Settings, stack: &DevStack) -> anyhow::Result<(Process, u16)> {
    let grpc_port = free_port()?;
    let env = [
        ("REDIS_SENTINELS", stack.sentinels_csv()),
        ("GRPC_ADDR", format!("127.0.0.1:{grpc_port}")),
        ("AUCTION_DURATION", demo.duration.clone()),
    ];
    let server = Process::spawn(
        stack.dir(),
        "auction-server",
        &demo.bin("auction-server"),
        &[],
        &env,
    );
    println!(
        "{} started auction-server, gRPC on 127.0.0.1:{grpc_port}",
        demo.stamp()
    );
    Ok((server, grpc_port))
}

/// Starts the bidders, each with a budget of its own; the last one bids by proxy (one bid
/// with its budget as a secret `max_amount`; the server raises its price as others bid).
fn start_bidders(demo: &Settings, stack: &DevStack, grpc_port: u16) -> Vec<Process> {
    let budget = |i: usize| 1000 + 250 * i as u64;
    let bidders = (1..=demo.clients)
        .map(|i| {
            let name = format!("bidder-{i}");
            let limit = if i == demo.clients {
                "PROXY_MAX"
            } else {
                "MAX_BID"
            };
            let env = [
                ("REDIS_SENTINELS", stack.sentinels_csv()),
                ("BIDDER_NAME", name.clone()),
                ("BID_INTERVAL", demo.interval.clone()),
                (limit, budget(i).to_string()),
                ("SERVER_ADDR", format!("127.0.0.1:{grpc_port}")),
                ("HEALTH_ADDR", "127.0.0.1:0".into()),
            ];
            Process::spawn(stack.dir(), &name, &demo.bin("auction-client"), &[], &env)
        })
        .collect();
    println!(
        "{} started {} bidders (budgets {} … {}); bidder-{} bids by proxy, up to {}",
        demo.stamp(),
        demo.clients,
        money(budget(1)),
        money(budget(demo.clients)),
        demo.clients,
        money(budget(demo.clients))
    );
    bidders
}

/// Opens the demo's auction through the admin API; returns its id.
async fn open(demo: &Settings, admin: &mut Admin) -> anyhow::Result<String> {
    let request = pb::OpenAuctionRequest {
        item: "Vintage guitar".into(),
        starting_price: 100,
        min_increment: 25,
        soft_close: Some(prost_types::Duration {
            seconds: demo.soft_close.as_secs() as i64,
            nanos: demo.soft_close.subsec_nanos() as i32,
        }),
        ..Default::default()
    };
    let opened = admin
        .open_auction(request)
        .await?
        .into_inner()
        .auction
        .context("OpenAuction returned no auction")?;
    println!(
        "{} opened auction {} through gRPC AuctionAdmin/OpenAuction (soft close {:?}: a bid in its last {:?} moves the deadline)\n",
        demo.stamp(),
        opened.auction_id,
        demo.soft_close,
        demo.soft_close
    );
    Ok(opened.auction_id)
}

/// Prints every event as it arrives until the close; returns the winner and amount.
async fn follow(
    demo: &Settings,
    recorder: &Recorder,
    limit: Duration,
) -> anyhow::Result<(Option<String>, Option<u64>)> {
    let deadline = Instant::now() + limit;
    let mut seen = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = recorder.nth(seen, left).await.context("no close seen")?;
        seen += 1;
        let seq = event.seq().map_or("-".into(), |s| s.to_string());
        println!("{} seq {seq:>3}  {}", demo.stamp(), describe(&event));
        if let Event::AuctionClosed { winner, amount, .. } = event {
            return Ok((winner, amount));
        }
    }
}

/// What the admin API says after the close.
async fn report(demo: &Settings, admin: &mut Admin, id: &str) -> anyhow::Result<()> {
    let auction_id = id.to_owned();
    let fin = admin
        .get_auction(pb::GetAuctionRequest {
            auction_id: auction_id.clone(),
        })
        .await?
        .into_inner()
        .auction
        .context("GetAuction returned no auction")?;
    let bids = admin
        .list_bids(pb::ListBidsRequest {
            auction_id,
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .bids;
    let winner = fin.winner.as_ref().map_or("none".to_owned(), |w| {
        format!("{} with {}", w.bidder, money(w.amount as u64))
    });
    let proxied = bids.iter().filter(|b| b.proxy).count();
    println!(
        "\n{} GetAuction: state {:?}, {} accepted bids (ListBids returned {}, {proxied} of them proxy raises), winner {winner}",
        demo.stamp(),
        pb::AuctionState::try_from(fin.state).unwrap_or(pb::AuctionState::Unspecified),
        fin.bid_count,
        bids.len(),
    );
    Ok(())
}

/// Copies every process's log out of the stack's directory before it is removed.
fn keep_logs(stack: &DevStack) -> anyhow::Result<()> {
    let keep = std::env::temp_dir().join(format!("auction-demo-logs-{}", std::process::id()));
    std::fs::create_dir_all(&keep)?;
    for entry in std::fs::read_dir(stack.dir())?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            std::fs::copy(entry.path(), keep.join(entry.file_name()))?;
        }
    }
    println!("logs kept in {}", keep.display());
    Ok(())
}
