//! `auction-server`: judges bids arriving over Redis Pub/Sub under per-auction fenced
//! leases, announces events, and closes auctions at their deadlines.

use clap::Parser;

/// Real-time auction server on Redis Sentinel.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    server: auction::server::ServerArgs,
    /// Validate the configuration (flags and environment) and exit: 0 if it is usable.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let args = cli.server.clone();
    auction::runtime::process::main_of(
        "auction-server",
        cli.check_config,
        || cli.server.validate(),
        |shutdown| auction::server::run(args, shutdown),
    )
    .await
}
