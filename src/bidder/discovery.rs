//! Finding an auction that is already open: a bidder that starts (or resubscribes) after
//! its auction's `auction_opened` went out would otherwise wait for an event that never
//! comes while nobody else bids. It asks the server's admin API (`SERVER_ADDR`), which it
//! reaches anyway for health: `GetAuction` of `AUCTION_ID` when one is configured,
//! otherwise `ListAuctions` with state OPEN, taking the open auction that closes first.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use crate::keyspace::AuctionId;
use crate::proto::v1 as pb;
use crate::proto::v1::auction_admin_client::AuctionAdminClient;

/// While a bidder has no auction, it looks again this often (a lost `auction_opened`
/// between two resubscriptions is found this way).
pub(crate) const DISCOVER_EVERY: Duration = Duration::from_secs(5);
/// Bound on one discovery call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Open auctions looked at per discovery.
const PAGE: i32 = 100;

/// When the next discovery is due.
#[derive(Debug, Default)]
pub(crate) struct Discovery {
    /// Set at start and on every resubscription of the event channel.
    pub(crate) due: bool,
    /// When the last discovery ran.
    pub(crate) last: Option<Instant>,
}

impl Discovery {
    /// Whether to look now (`idle`: no auction tracked).
    pub(crate) fn is_due(&self, idle: bool) -> bool {
        idle && (self.due || self.last.is_none_or(|at| at.elapsed() >= DISCOVER_EVERY))
    }

    /// Records a look.
    pub(crate) fn ran(&mut self) {
        self.due = false;
        self.last = Some(Instant::now());
    }
}

/// The open auction to bid on, if any: `only` when given and open, otherwise the open
/// auction with the earliest deadline; auctions in `closed` are skipped.
pub(crate) async fn find_open(
    admin: &mut AuctionAdminClient<tonic::transport::Channel>,
    only: Option<&AuctionId>,
    closed: &HashMap<String, ()>,
) -> Result<Option<pb::Auction>, Status> {
    let candidates = match only {
        Some(id) => {
            let request = pb::GetAuctionRequest {
                auction_id: id.to_string(),
            };
            match bounded(admin.get_auction(request)).await {
                Ok(reply) => reply.into_inner().auction.into_iter().collect(),
                // Not opened yet: its auction_opened event will come.
                Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
                Err(status) => return Err(status),
            }
        }
        None => {
            let request = pb::ListAuctionsRequest {
                state: pb::AuctionState::Open as i32,
                page_size: PAGE,
                page_token: String::new(),
            };
            bounded(admin.list_auctions(request))
                .await?
                .into_inner()
                .auctions
        }
    };
    Ok(candidates
        .into_iter()
        .filter(|a| a.state == pb::AuctionState::Open as i32 && !closed.contains_key(&a.auction_id))
        .min_by_key(|a| a.deadline.as_ref().map(|d| (d.seconds, d.nanos))))
}

async fn bounded<T>(
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<tonic::Response<T>, Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "the server did not answer in time",
            ))
        })
}
