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
    if cli.check_config {
        return match cli.server.validate() {
            Ok(()) => {
                println!("auction-server: configuration OK");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("auction-server: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let _telemetry = match auction::telemetry::init("auction-server") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("auction-server: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    match auction::server::run(cli.server, auction::telemetry::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("auction-server: {e:#}");
            eprintln!("auction-server: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
