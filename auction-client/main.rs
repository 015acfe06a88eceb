//! `auction-client`: an automatic bidder that bids through Redis Pub/Sub.

use clap::Parser;

/// Automatic bidder for the Redis auction system.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    bidder: auction::bidder::BidderArgs,
    /// Validate the configuration (flags and environment) and exit: 0 if it is usable.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let args = cli.bidder.clone();
    auction::runtime::process::main_of(
        "auction-client",
        cli.check_config,
        || cli.bidder.validate(),
        |shutdown| async move {
            let summary = auction::bidder::run(args, shutdown).await?;
            for (auction, winner, amount) in &summary.closed {
                println!(
                    "auction {auction} closed: winner {} amount {}",
                    winner.as_deref().unwrap_or("(none)"),
                    amount.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        },
    )
    .await
}
