//! [`ServerArgs`]: the server's configuration as one typed value (flags with environment
//! fallbacks), every default written once as a constant here, and checked as a whole
//! before anything binds or connects.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::keyspace::AuctionId;
use crate::runtime::config::{RedisArgs, parse_channel, parse_duration, parse_duration_or_off};
use crate::server::enroll::{self, Enrollment};
use crate::store::ledger::{AuctionSpec, Retention};

/// Default auction duration (`AUCTION_DURATION`).
pub const DEFAULT_AUCTION_DURATION: &str = "30s";
/// Default bound on each `WAIT` for replicas (`WAIT_TIMEOUT`).
pub const DEFAULT_WAIT_TIMEOUT: &str = "500ms";
/// Default lease on an auction's lock (`LOCK_LEASE`).
pub const DEFAULT_LOCK_LEASE: &str = "5s";
/// Default bound on draining at shutdown (`SHUTDOWN_GRACE`).
pub const DEFAULT_SHUTDOWN_GRACE: &str = "10s";
/// Default time a closed auction is kept before all of it expires (`RETENTION`).
pub const DEFAULT_RETENTION: &str = "7d";
/// Default starting price of `--open-on-start` auctions, minor units.
pub const DEFAULT_STARTING_PRICE: u64 = 100;
/// Default minimum increment of `--open-on-start` auctions, minor units.
pub const DEFAULT_MIN_INCREMENT: u64 = 10;

/// Whether bids must be signed (`BID_AUTH`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BidAuth {
    /// Any bid counts in the name it gives (local use, trusted networks).
    #[default]
    Off,
    /// Only bids signed with their bidder's registered key count; others are refused
    /// `unauthenticated`.
    Required,
}

/// What `OpenAuction` gives the fields a request leaves unset (the server's flags).
#[derive(Clone, Debug)]
pub struct AuctionDefaults {
    /// `AUCTION_DURATION`.
    pub duration: Duration,
    /// `STARTING_PRICE`, minor units.
    pub starting_price: u64,
    /// `MIN_INCREMENT`, minor units.
    pub min_increment: u64,
}

/// Server configuration (flags with environment fallbacks).
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// Redis / Sentinel / channel settings.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Open one auction for ITEM at start, as the prototype did.
    #[arg(long, env = "OPEN_ON_START", value_name = "ITEM")]
    pub open_on_start: Option<String>,
    /// The id of the --open-on-start auction (e.g. the prototype's `produto1`); random when
    /// unset. If it already exists (a restart), nothing is opened.
    #[arg(long, env = "OPEN_ON_START_ID", value_name = "ID")]
    pub open_on_start_id: Option<String>,
    /// Soft close of the --open-on-start auction: a bid accepted less than this before the
    /// deadline moves the deadline to its time plus this (0 = off).
    #[arg(long, env = "SOFT_CLOSE", default_value = "0s", value_parser = parse_duration_or_off)]
    pub soft_close: Duration,
    /// Whether bids must be signed by their bidder's registered key (`RegisterBidder`):
    /// `off` (local use) or `required`.
    #[arg(long, env = "BID_AUTH", value_enum, default_value_t = BidAuth::Off)]
    pub bid_auth: BidAuth,
    /// Also speak the Node.js prototype's wire dialect (`{"tipo":"lance",...}` bids in,
    /// `inicio`/`lance`/`fim` events out) beside v1: see README, "Migrating from the prototype".
    #[arg(long, env = "SEED_DIALECT")]
    pub seed_dialect: bool,
    /// Duration of auctions opened without an explicit one.
    #[arg(long, env = "AUCTION_DURATION", default_value = DEFAULT_AUCTION_DURATION, value_parser = parse_duration)]
    pub auction_duration: Duration,
    /// Starting price of --open-on-start auctions and of OpenAuction calls that give none,
    /// minor units.
    #[arg(long, env = "STARTING_PRICE", default_value_t = DEFAULT_STARTING_PRICE)]
    pub starting_price: u64,
    /// Minimum increment of --open-on-start auctions and of OpenAuction calls that give
    /// none, minor units.
    #[arg(long, env = "MIN_INCREMENT", default_value_t = DEFAULT_MIN_INCREMENT)]
    pub min_increment: u64,
    /// Reserve price of --open-on-start auctions, minor units (0 = none).
    #[arg(long, env = "RESERVE_PRICE", default_value_t = 0)]
    pub reserve_price: u64,
    /// Replicas that must acknowledge a write before its outcome is announced (0 = don't wait).
    #[arg(long, env = "WAIT_REPLICAS", default_value_t = 1)]
    pub wait_replicas: u32,
    /// Bound on each WAIT for replicas.
    #[arg(long, env = "WAIT_TIMEOUT", default_value = DEFAULT_WAIT_TIMEOUT, value_parser = parse_duration)]
    pub wait_timeout: Duration,
    /// Lease on an auction's lock; another server takes over this long after a crash.
    #[arg(long, env = "LOCK_LEASE", default_value = DEFAULT_LOCK_LEASE, value_parser = parse_duration)]
    pub lock_lease: Duration,
    /// Bound on draining in-flight work at shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE, value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long a closed auction is kept: then its keys expire, it leaves every index, and
    /// reads of it answer NOT_FOUND (1s to 365d).
    #[arg(long, env = "RETENTION", default_value = DEFAULT_RETENTION, value_parser = parse_duration)]
    pub retention: Duration,
    /// Where the gRPC admin API, health and reflection listen.
    #[arg(long, env = "GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,
    /// Bearer token required by mutating admin calls (unset = no auth; set it in production).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The token bidders present to `EnrollBidder` to get a key for their own name (their
    /// pods share it; it is not the admin token). Unset = enrollment off. Needs ENROLL_HOST.
    #[arg(long, env = "ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// The host name of a bidder, `{bidder}` standing for its name (on Kubernetes
    /// `{bidder}.auction-client`, the pod's record in the bidders' headless Service):
    /// `EnrollBidder` registers a name only for a caller this name resolves to.
    #[arg(long, env = "ENROLL_HOST")]
    pub enroll_host: Option<String>,
    /// Where Prometheus metrics are served (`GET /metrics`); unset = no metrics endpoint.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Server-to-server channel (forwarded admin closes); only servers may publish on it.
    #[arg(long, env = "CONTROL_CHANNEL", default_value = DEFAULT_CONTROL_CHANNEL, value_parser = parse_channel)]
    pub control_channel: String,
}

/// Default gRPC listen address.
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:50051";
/// Default control channel.
pub const DEFAULT_CONTROL_CHANNEL: &str = "auction-control";

impl ServerArgs {
    /// What `OpenAuction` gives the fields a request leaves unset.
    pub fn auction_defaults(&self) -> AuctionDefaults {
        AuctionDefaults {
            duration: self.auction_duration,
            starting_price: self.starting_price,
            min_increment: self.min_increment,
        }
    }

    /// The id and spec of the --open-on-start auction.
    pub fn open_on_start_spec(&self) -> anyhow::Result<Option<(AuctionId, AuctionSpec)>> {
        let Some(item) = &self.open_on_start else {
            if self.open_on_start_id.is_some() {
                anyhow::bail!("OPEN_ON_START_ID is set but OPEN_ON_START (the item) is not");
            }
            return Ok(None);
        };
        let id = match &self.open_on_start_id {
            Some(id) => AuctionId::parse(id).context("invalid OPEN_ON_START_ID")?,
            None => AuctionId::random(),
        };
        let spec = AuctionSpec {
            item: item.clone(),
            duration: self.auction_duration,
            starting_price: self.starting_price,
            min_increment: self.min_increment,
            reserve_price: self.reserve_price,
            soft_close: self.soft_close,
        };
        Ok(Some((id, spec)))
    }

    /// The validated `RETENTION`.
    pub fn retention(&self) -> anyhow::Result<Retention> {
        Retention::new(self.retention).map_err(|e| {
            anyhow::anyhow!("RETENTION: {e}; closed auctions are kept this long (e.g. 7d)")
        })
    }

    /// `EnrollBidder`'s settings, checked: both or neither of ENROLL_TOKEN and ENROLL_HOST.
    pub fn enrollment(&self) -> anyhow::Result<Option<Enrollment>> {
        match (&self.enroll_token, &self.enroll_host) {
            (None, None) => Ok(None),
            (Some(_), None) => anyhow::bail!(
                "ENROLL_TOKEN is set but ENROLL_HOST is not: set it to a bidder's host name with {{bidder}} for its name (on Kubernetes {{bidder}}.auction-client), or unset ENROLL_TOKEN"
            ),
            (None, Some(_)) => anyhow::bail!(
                "ENROLL_HOST is set but ENROLL_TOKEN is not: set the token bidders present to EnrollBidder (16 or more characters), or unset ENROLL_HOST"
            ),
            (Some(token), Some(host)) => {
                if token.trim().len() < 16 || token.trim() != token {
                    anyhow::bail!(
                        "ENROLL_TOKEN must be at least 16 characters without surrounding spaces"
                    );
                }
                if self.admin_token.as_ref() == Some(token) {
                    anyhow::bail!(
                        "ENROLL_TOKEN must differ from ADMIN_TOKEN: every bidder pod holds the enrollment token"
                    );
                }
                enroll::check_template(host).map_err(anyhow::Error::msg)?;
                Ok(Some(Enrollment {
                    token: token.clone(),
                    host: host.clone(),
                }))
            }
        }
    }

    /// Validates everything clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.redis.validate().map_err(anyhow::Error::msg)?;
        if let Some((_, spec)) = self.open_on_start_spec()? {
            spec.validate().context("invalid --open-on-start auction")?;
        }
        self.retention()?;
        if self.lock_lease < Duration::from_millis(300) {
            anyhow::bail!("LOCK_LEASE must be at least 300ms");
        }
        let channels = [
            &self.redis.command_channel,
            &self.redis.event_channel,
            &self.control_channel,
        ];
        if channels[2] == channels[0] || channels[2] == channels[1] {
            anyhow::bail!("CONTROL_CHANNEL must differ from COMMAND_CHANNEL and EVENT_CHANNEL");
        }
        if let Some(t) = &self.admin_token
            && (t.trim().len() < 16 || t.trim() != t)
        {
            anyhow::bail!("ADMIN_TOKEN must be at least 16 characters without surrounding spaces");
        }
        self.enrollment()?;
        check_wait_timeout(self.wait_timeout)?;
        if self.wait_timeout >= self.lock_lease / 3 {
            anyhow::bail!("WAIT_TIMEOUT must be shorter than a third of LOCK_LEASE");
        }
        Ok(())
    }
}

/// A `WAIT` blocks the shared master link: a command queued behind it must still be answered
/// within the link's reply timeout, or a lagging replica looks like a lost master.
fn check_wait_timeout(wait: Duration) -> anyhow::Result<()> {
    let bound = crate::link::sentinel::RESPONSE_TIMEOUT - Duration::from_millis(500);
    if wait > bound {
        anyhow::bail!(
            "WAIT_TIMEOUT must be at most {bound:?} (the {:?} reply timeout of the master link less 500ms): a longer WAIT would make a lagging replica look like a lost master",
            crate::link::sentinel::RESPONSE_TIMEOUT
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        for d in [
            DEFAULT_AUCTION_DURATION,
            DEFAULT_WAIT_TIMEOUT,
            DEFAULT_LOCK_LEASE,
            DEFAULT_SHUTDOWN_GRACE,
            DEFAULT_RETENTION,
        ] {
            assert!(parse_duration(d).is_ok(), "{d}");
        }
    }

    #[test]
    fn wait_timeout_stays_below_the_reply_timeout() {
        assert!(check_wait_timeout(Duration::from_millis(1500)).is_ok());
        let err = check_wait_timeout(Duration::from_millis(1600)).expect_err("over the bound");
        assert!(
            err.to_string().contains("WAIT_TIMEOUT must be at most"),
            "{err}"
        );
    }
}
