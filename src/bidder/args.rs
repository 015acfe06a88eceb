//! [`BidderArgs`]: the bidder's configuration as one typed value, defaults written once.

use std::net::SocketAddr;
use std::time::Duration;

use crate::keyspace::AuctionId;
use crate::runtime::config::{RedisArgs, parse_duration};
use crate::wire;

/// Default time between bids (`BID_INTERVAL`).
pub const DEFAULT_BID_INTERVAL: &str = "3s";
/// Default budget (`MAX_BID`), minor units.
pub const DEFAULT_MAX_BID: u64 = 100_000;
/// Default wait before re-publishing an unanswered bid (`BID_RETRY_AFTER`).
pub const DEFAULT_RETRY_AFTER: &str = "2s";
/// Default wait for a close after the deadline (`CLOSE_GRACE`).
pub const DEFAULT_CLOSE_GRACE: &str = "30s";
/// Default auction server address (`SERVER_ADDR`).
pub const DEFAULT_SERVER_ADDR: &str = "127.0.0.1:50051";
/// Default address of the bidder's own health endpoint (`HEALTH_ADDR`).
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:50052";

/// Bidder configuration (flags with environment fallbacks).
#[derive(clap::Args, Clone, Debug)]
pub struct BidderArgs {
    /// Redis / Sentinel / channel settings.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// This bidder's name (default: the host name, i.e. the pod name).
    #[arg(long, env = "BIDDER_NAME")]
    pub bidder_name: Option<String>,
    /// Time between bids (±20% jitter).
    #[arg(long, env = "BID_INTERVAL", default_value = DEFAULT_BID_INTERVAL, value_parser = parse_duration)]
    pub bid_interval: Duration,
    /// Budget: never bid above this, minor units.
    #[arg(long, env = "MAX_BID", default_value_t = DEFAULT_MAX_BID)]
    pub max_bid: u64,
    /// Bid by proxy: send one bid at the current minimum with this as its `max_amount`
    /// (secret; the server raises the price for this bidder up to it as others bid), and
    /// bid again only when outbid and the price is still within it. Overrides MAX_BID.
    #[arg(long, env = "PROXY_MAX", value_name = "AMOUNT")]
    pub proxy_max: Option<u64>,
    /// This bidder's key (from `RegisterBidder`): every bid is signed with it, as servers
    /// running `BID_AUTH=required` demand. Prefer BIDDER_KEY_FILE, which keeps it out of
    /// the process environment.
    #[arg(
        long,
        env = "BIDDER_KEY",
        hide_env_values = true,
        conflicts_with = "bidder_key_file"
    )]
    pub bidder_key: Option<String>,
    /// A file holding this bidder's key (e.g. a mounted Secret); surrounding whitespace and
    /// a trailing newline are ignored.
    #[arg(long, env = "BIDDER_KEY_FILE", value_name = "PATH")]
    pub bidder_key_file: Option<std::path::PathBuf>,
    /// The server's enrollment token: at start the bidder asks the server (`EnrollBidder`)
    /// for a key of its own name and signs every bid with it. For pods, which cannot each
    /// be handed a key of their own. Prefer ENROLL_TOKEN_FILE.
    #[arg(
        long,
        env = "ENROLL_TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["enroll_token_file", "bidder_key", "bidder_key_file"]
    )]
    pub enroll_token: Option<String>,
    /// A file holding the enrollment token; surrounding whitespace is ignored.
    #[arg(
        long,
        env = "ENROLL_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with_all = ["bidder_key", "bidder_key_file"]
    )]
    pub enroll_token_file: Option<std::path::PathBuf>,
    /// Re-publish an unanswered bid (same bid_id) after this long.
    #[arg(long, env = "BID_RETRY_AFTER", default_value = DEFAULT_RETRY_AFTER, value_parser = parse_duration)]
    pub retry_after: Duration,
    /// Bid only on this auction (default: the first open one seen).
    #[arg(long, env = "AUCTION_ID")]
    pub auction_id: Option<String>,
    /// After an auction closes, wait for the next one instead of exiting.
    #[arg(long, env = "KEEP_GOING")]
    pub keep_going: bool,
    /// Give up if a tracked auction's close is not seen this long after its deadline.
    #[arg(long, env = "CLOSE_GRACE", default_value = DEFAULT_CLOSE_GRACE, value_parser = parse_duration)]
    pub close_grace: Duration,
    /// The auction server's gRPC address; no bids are sent while its health is not SERVING.
    #[arg(long, env = "SERVER_ADDR", default_value = DEFAULT_SERVER_ADDR)]
    pub server_addr: String,
    /// Where this bidder serves its own grpc.health.v1 (for readiness probes).
    #[arg(long, env = "HEALTH_ADDR", default_value = DEFAULT_HEALTH_ADDR)]
    pub health_addr: SocketAddr,
    /// Where Prometheus metrics are served (`GET /metrics`); unset = no metrics endpoint.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl BidderArgs {
    /// The effective bidder name, validated.
    pub fn name(&self) -> anyhow::Result<String> {
        let name = self
            .bidder_name
            .clone()
            .unwrap_or_else(crate::runtime::process::host_name);
        wire::check_token("BIDDER_NAME", &name, wire::MAX_BIDDER_LEN)
            .map_err(|e| anyhow::anyhow!("invalid bidder name: {e}"))?;
        Ok(name)
    }

    /// Validates everything clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.redis.validate().map_err(anyhow::Error::msg)?;
        self.name()?;
        if self.max_bid == 0 || self.max_bid > wire::MAX_AMOUNT {
            anyhow::bail!("MAX_BID must be between 1 and {}", wire::MAX_AMOUNT);
        }
        if self
            .proxy_max
            .is_some_and(|m| m == 0 || m > wire::MAX_AMOUNT)
        {
            anyhow::bail!("PROXY_MAX must be between 1 and {}", wire::MAX_AMOUNT);
        }
        self.key()?;
        self.enroll_token()?;
        if let Some(id) = &self.auction_id {
            AuctionId::parse(id)?;
        }
        self.server_endpoint()?;
        Ok(())
    }

    /// The signing key, if one is configured: read (from the file) and checked.
    pub fn key(&self) -> anyhow::Result<Option<String>> {
        let Some(key) = secret(&self.bidder_key, &self.bidder_key_file, "BIDDER_KEY")? else {
            return Ok(None);
        };
        check_key(&key).map_err(|e| {
            anyhow::anyhow!(
                "{e}: set BIDDER_KEY or BIDDER_KEY_FILE to the key RegisterBidder returned"
            )
        })?;
        Ok(Some(key))
    }

    /// The enrollment token, if one is configured: read (from the file) and checked.
    pub fn enroll_token(&self) -> anyhow::Result<Option<String>> {
        let Some(token) = secret(&self.enroll_token, &self.enroll_token_file, "ENROLL_TOKEN")?
        else {
            return Ok(None);
        };
        if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!(
                "ENROLL_TOKEN must be 16 or more printable ASCII characters without spaces: the server's ENROLL_TOKEN"
            );
        }
        Ok(Some(token))
    }

    /// The most this bidder pays: `PROXY_MAX` when bidding by proxy, else `MAX_BID`.
    pub fn budget(&self) -> u64 {
        self.proxy_max.unwrap_or(self.max_bid)
    }

    /// `SERVER_ADDR` as a gRPC endpoint (`host:port` or `http://host:port`).
    pub fn server_endpoint(&self) -> anyhow::Result<tonic::transport::Endpoint> {
        let raw = self.server_addr.trim();
        let uri = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}")
        };
        tonic::transport::Endpoint::from_shared(uri)
            .map(|e| e.connect_timeout(Duration::from_secs(2)))
            .map_err(|e| {
                anyhow::anyhow!("SERVER_ADDR {raw:?} is not a valid address (host:port): {e}")
            })
    }
}

/// A secret given directly or as a file (surrounding whitespace ignored); `name` is its
/// setting, `NAME_FILE` the file form's.
fn secret(
    value: &Option<String>,
    file: &Option<std::path::PathBuf>,
    name: &str,
) -> anyhow::Result<Option<String>> {
    match (value, file) {
        (Some(v), _) => Ok(Some(v.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_owned()))
            .map_err(|e| anyhow::anyhow!("cannot read {name}_FILE {}: {e}", path.display())),
        (None, None) => Ok(None),
    }
}

/// Checks a bidder key, configured or enrolled: non-empty printable ASCII without spaces.
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("the bidder key is empty");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the bidder key must be printable ASCII without spaces");
    }
    Ok(())
}
