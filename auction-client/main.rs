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
    if cli.check_config {
        return match cli.bidder.validate() {
            Ok(()) => {
                println!("auction-client: configuration OK");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("auction-client: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let _telemetry = match auction::telemetry::init("auction-client") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("auction-client: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    match auction::bidder::run(cli.bidder, auction::telemetry::shutdown_signal()).await {
        Ok(summary) => {
            for (auction, winner, amount) in &summary.closed {
                println!(
                    "auction {auction} closed: winner {} amount {}",
                    winner.as_deref().unwrap_or("(none)"),
                    amount.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
                );
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("auction-client: {e:#}");
            eprintln!("auction-client: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
