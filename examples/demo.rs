//! A complete local auction on real processes: a Redis master, 2 replicas and 3 Sentinels,
//! one `auction-server`, five `auction-client` bidders. Opens the auction through the gRPC
//! admin API, prints every event live and the winner, then stops everything. Run it with `bash scripts/demo.sh`.
//!
//! Environment: `DEMO_CLIENTS` (default 5), `AUCTION_DURATION` (default 30s),
//! `BID_INTERVAL` (default 3s), `DEMO_KEEP_LOGS=1` to keep the logs directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use auction::proto::v1 as pb;
use auction::proto::v1::auction_admin_client::AuctionAdminClient;
use auction::wire::Event;
use auction_testkit::{DevStack, DevStackConfig, Process, Recorder, free_port};

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
            ..
        } => {
            format!(
                "ACCEPTED {bidder:<10} {:>9}   (next bid at least {})",
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clients: usize = std::env::var("DEMO_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let duration = std::env::var("AUCTION_DURATION").unwrap_or_else(|_| "30s".into());
    let interval = std::env::var("BID_INTERVAL").unwrap_or_else(|_| "3s".into());
    let bins = bin_dir()?;
    let started = Instant::now();
    let stamp = move || format!("[{:>5.1}s]", started.elapsed().as_secs_f64());

    println!(
        "{} starting Redis: 1 master, 2 replicas, 3 Sentinels (append-only, min-replicas-to-write 1)…",
        stamp()
    );
    let stack = DevStack::start(DevStackConfig::default()).await?;
    println!(
        "{} Redis up: master 127.0.0.1:{}, replicas {:?}, Sentinels {}",
        stamp(),
        stack.node_port(0),
        &stack.redis_ports()[1..],
        stack.sentinels_csv()
    );

    let recorder = Recorder::start(&stack).await?;

    let server_bin = bins.join("auction-server").display().to_string();
    let client_bin = bins.join("auction-client").display().to_string();
    let sentinels = stack.sentinels_csv();
    let grpc_port = free_port()?;
    let mut server = Process::spawn(
        stack.dir(),
        "auction-server",
        &server_bin,
        &[],
        &[
            ("REDIS_SENTINELS", sentinels.clone()),
            ("GRPC_ADDR", format!("127.0.0.1:{grpc_port}")),
            ("AUCTION_DURATION", duration.clone()),
        ],
    );
    println!(
        "{} started auction-server, gRPC on 127.0.0.1:{grpc_port}",
        stamp()
    );
    let mut bidders: Vec<Process> = (1..=clients)
        .map(|i| {
            let name = format!("bidder-{i}");
            Process::spawn(
                stack.dir(),
                &name,
                &client_bin,
                &[],
                &[
                    ("REDIS_SENTINELS", sentinels.clone()),
                    ("BIDDER_NAME", name.clone()),
                    ("BID_INTERVAL", interval.clone()),
                    ("MAX_BID", format!("{}", 2000 + 300 * i)),
                    ("SERVER_ADDR", format!("127.0.0.1:{grpc_port}")),
                    ("HEALTH_ADDR", "127.0.0.1:0".into()),
                ],
            )
        })
        .collect();
    println!(
        "{} started {clients} bidders (budgets 23.00 … {})",
        stamp(),
        money(2000 + 300 * clients as u64)
    );
    // Open the auction only once every bidder listens, so nobody misses the opening: the
    // bidders and this demo's recorder (the server subscribes to events only while a Watch
    // listens).
    stack
        .wait_subscribers(
            auction::runtime::config::DEFAULT_EVENT_CHANNEL,
            clients as u64 + 1,
            Duration::from_secs(30),
        )
        .await
        .with_context(|| {
            format!(
                "bidders did not subscribe; see logs in {}",
                stack.dir().display()
            )
        })?;
    let mut admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
    let opened = admin
        .open_auction(pb::OpenAuctionRequest {
            item: "Vintage guitar".into(),
            starting_price: 100,
            min_increment: 10,
            ..Default::default()
        })
        .await?
        .into_inner()
        .auction
        .context("OpenAuction returned no auction")?;
    println!(
        "{} opened auction {} through gRPC AuctionAdmin/OpenAuction\n",
        stamp(),
        opened.auction_id
    );

    let deadline = Instant::now()
        + auction::runtime::config::parse_duration(&duration).map_err(anyhow::Error::msg)?
        + Duration::from_secs(60);
    let mut winner = None;
    let mut seen = 0;
    while winner.is_none() {
        let limit = deadline.saturating_duration_since(Instant::now());
        let event = recorder.nth(seen, limit).await.with_context(|| {
            format!(
                "the auction did not close in time; logs in {}",
                stack.dir().display()
            )
        })?;
        seen += 1;
        println!(
            "{} seq {:>3}  {}",
            stamp(),
            event.seq().map(|s| s.to_string()).unwrap_or("-".into()),
            describe(&event)
        );
        if let Event::AuctionClosed {
            winner: w, amount, ..
        } = &event
        {
            winner = Some((w.clone(), *amount));
        }
    }
    for b in bidders.iter_mut() {
        let code = b.wait_exit(Duration::from_secs(15)).await?;
        anyhow::ensure!(
            code == 0,
            "{} exited with {code}; its log:\n{}",
            b.name,
            b.log()
        );
    }
    let fin = admin
        .get_auction(pb::GetAuctionRequest {
            auction_id: opened.auction_id.clone(),
        })
        .await?
        .into_inner()
        .auction
        .context("GetAuction returned no auction")?;
    let bids = admin
        .list_bids(pb::ListBidsRequest {
            auction_id: opened.auction_id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .bids;
    println!(
        "\n{} GetAuction: state {:?}, {} accepted bids (ListBids returned {}), winner {:?}",
        stamp(),
        pb::AuctionState::try_from(fin.state).unwrap_or(pb::AuctionState::Unspecified),
        fin.bid_count,
        bids.len(),
        fin.winner
            .as_ref()
            .map(|w| (&w.bidder, money(w.amount as u64)))
    );
    server.terminate();
    server.wait_exit(Duration::from_secs(15)).await?;
    println!();
    match winner {
        Some((Some(w), Some(a))) => println!(
            "WINNER: {w} with {} — every bidder saw the close and exited cleanly.",
            money(a)
        ),
        _ => println!("No winner (no bid reached the reserve)."),
    }
    if std::env::var("DEMO_KEEP_LOGS").is_ok_and(|v| v == "1") {
        let keep = std::env::temp_dir().join(format!("auction-demo-logs-{}", std::process::id()));
        std::fs::create_dir_all(&keep)?;
        for entry in std::fs::read_dir(stack.dir())?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                std::fs::copy(entry.path(), keep.join(entry.file_name()))?;
            }
        }
        println!("logs kept in {}", keep.display());
    }
    println!("{} stopping Redis and cleaning up.", stamp());
    Ok(())
}
