//! The `auction.v1.AuctionAdmin` gRPC service: open, close, read, list and watch auctions.
//!
//! Every mutation goes through the router, so it runs in the auction's worker under its
//! lease and fence, serialized with bids. An early close of an auction whose lease another
//! server holds is forwarded to that server over the control channel, and this call waits
//! for the resulting `auction_closed` event. Requests are validated here, at the boundary;
//! errors map to `INVALID_ARGUMENT` (naming the field), `NOT_FOUND`, `ALREADY_EXISTS`,
//! `FAILED_PRECONDITION`, `UNAVAILABLE` (retryable) and `UNAUTHENTICATED`.
//!
//! The service reaches the router through a [`RouterGate`], which the server closes at
//! shutdown: from then on calls answer `UNAVAILABLE` ("shutting down") and open watches end
//! the same way, so no connection a client keeps open can keep the router (and with it
//! every worker and its lease) from draining.

use std::time::Duration;

use tokio::sync::broadcast;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::control::hub::Hub;
use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::proto::v1 as pb;
use crate::server::router::Router;
use crate::server::work::OpError;
use crate::store::bidders;
use crate::store::ledger::{self, AuctionRecord, AuctionSpec, CloseMode, Closed};
use crate::wire::{self, CloseRequest, Event};

mod messages;
mod stored;
mod watch;

use crate::server::args::AuctionDefaults;
use crate::server::bidder_keys::BidderKeys;
use crate::server::enroll::{self, Enrollment};
use messages::{
    BidsAfter, amount, auctions_after, auctions_token, bid_to_proto, bids_after, constant_time_eq,
    from_duration, invalid, page_size, parse_id, timestamp, to_proto, unavailable,
};
use watch::WatchStream;

/// Default and largest page sizes.
const AUCTIONS_PAGE: (usize, usize) = (50, 1000);
const BIDS_PAGE: (usize, usize) = (100, 1000);
/// How long an admin close may take before `UNAVAILABLE` (covers a lease takeover).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

/// The admin API's way to the router: `Some` while the server runs, `None` from the start
/// of its shutdown (the server sends `None`, which also drops the router handle it held).
pub type RouterGate = tokio::sync::watch::Receiver<Option<Router>>;

/// What a call or a watch answers once the server is shutting down.
pub const SHUTTING_DOWN: &str =
    "shutting down: this server is stopping; retry, another server replica answers";

/// The admin service.
#[derive(Clone)]
pub struct AdminService {
    /// Routes mutations to the auction's worker, until shutdown.
    pub router: RouterGate,
    /// The master handle.
    pub master: Master,
    /// Events heard on the event channel.
    pub hub: Hub,
    /// Where to forward closes for auctions another server holds.
    pub control_channel: String,
    /// When set, mutating calls require `authorization: Bearer <token>`.
    pub admin_token: Option<String>,
    /// What a request's unset fields take.
    pub defaults: AuctionDefaults,
    /// This server's cache of bidder keys, updated at once by registrations made here.
    pub bidder_keys: BidderKeys,
    /// `EnrollBidder`'s settings; `None` = enrollment off.
    pub enrollment: Option<Enrollment>,
}

impl From<OpError> for Status {
    fn from(e: OpError) -> Self {
        match e {
            OpError::HeldElsewhere => Status::unavailable(format!("{e}")),
            OpError::Unavailable(_) | OpError::NotDurable(_) => Status::unavailable(e.to_string()),
            OpError::AlreadyExists => Status::already_exists(e.to_string()),
            OpError::NotFound => Status::not_found(e.to_string()),
        }
    }
}

impl AdminService {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match &self.admin_token {
            Some(token) => bearer(req, token, "ADMIN_TOKEN", "admin token"),
            None => Ok(()),
        }
    }

    /// The router, or `UNAVAILABLE` once the server is shutting down. The handle is held
    /// only for the call.
    fn router(&self) -> Result<Router, Status> {
        self.router
            .borrow()
            .clone()
            .ok_or_else(|| Status::unavailable(SHUTTING_DOWN))
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, Status> {
        stored::conn(&self.master).await
    }

    async fn read(&self, id: &AuctionId) -> Result<AuctionRecord, Status> {
        stored::read(&self.master, id).await
    }

    /// The auction a request asks for; fields it leaves unset take the server's defaults
    /// (`AUCTION_DURATION`, `STARTING_PRICE`, `MIN_INCREMENT`; no reserve, no soft close).
    fn spec(&self, r: &pb::OpenAuctionRequest) -> Result<AuctionSpec, Status> {
        let or_default = |field, v: i64, default: u64| match v {
            0 => Ok(default),
            v => amount(field, v, 1),
        };
        let spec = AuctionSpec {
            item: r.item.clone(),
            duration: match &r.duration {
                None => self.defaults.duration,
                Some(d) => from_duration("duration", d)?,
            },
            starting_price: or_default(
                "starting_price",
                r.starting_price,
                self.defaults.starting_price,
            )?,
            min_increment: or_default(
                "min_increment",
                r.min_increment,
                self.defaults.min_increment,
            )?,
            reserve_price: amount("reserve_price", r.reserve_price, 0)?,
            soft_close: match &r.soft_close {
                None => Duration::ZERO,
                Some(d) => from_duration("soft_close", d)?,
            },
        };
        spec.validate().map_err(|e| invalid(e.field, e.problem))?;
        Ok(spec)
    }

    /// Forwards a close to the lease holder and waits for its `auction_closed`.
    async fn close_elsewhere(
        &self,
        id: &AuctionId,
        events: &mut broadcast::Receiver<std::sync::Arc<Event>>,
    ) -> Result<bool, Status> {
        let mut conn = self.conn().await?;
        let _: u64 = redis::cmd("PUBLISH")
            .arg(&self.control_channel)
            .arg(
                CloseRequest {
                    auction_id: id.clone(),
                }
                .to_json(),
            )
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let wait = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => return Ok(false),
                ev = events.recv() => match ev {
                    Ok(ev) if matches!(&*ev, Event::AuctionClosed { auction_id, .. } if auction_id == id.as_str()) => return Ok(true),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(Status::unavailable("server shutting down")),
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::auction_admin_server::AuctionAdmin for AdminService {
    async fn open_auction(
        &self,
        req: Request<pb::OpenAuctionRequest>,
    ) -> Result<Response<pb::OpenAuctionResponse>, Status> {
        let span = rpc_span("OpenAuction", &req);
        self.open_auction_impl(req).instrument(span).await
    }

    async fn close_auction(
        &self,
        req: Request<pb::CloseAuctionRequest>,
    ) -> Result<Response<pb::CloseAuctionResponse>, Status> {
        let span = rpc_span("CloseAuction", &req);
        self.close_auction_impl(req).instrument(span).await
    }

    async fn get_auction(
        &self,
        req: Request<pb::GetAuctionRequest>,
    ) -> Result<Response<pb::GetAuctionResponse>, Status> {
        let span = rpc_span("GetAuction", &req);
        self.get_auction_impl(req).instrument(span).await
    }

    async fn list_auctions(
        &self,
        req: Request<pb::ListAuctionsRequest>,
    ) -> Result<Response<pb::ListAuctionsResponse>, Status> {
        let span = rpc_span("ListAuctions", &req);
        self.list_auctions_impl(req).instrument(span).await
    }

    async fn list_bids(
        &self,
        req: Request<pb::ListBidsRequest>,
    ) -> Result<Response<pb::ListBidsResponse>, Status> {
        let span = rpc_span("ListBids", &req);
        self.list_bids_impl(req).instrument(span).await
    }

    type WatchAuctionStream = WatchStream;

    async fn watch_auction(
        &self,
        req: Request<pb::WatchAuctionRequest>,
    ) -> Result<Response<Self::WatchAuctionStream>, Status> {
        let span = rpc_span("WatchAuction", &req);
        let watching = async {
            let id = parse_id(&req.get_ref().auction_id)?;
            watch::watch(&self.hub, &self.master, self.router.clone(), id).await
        };
        watching.instrument(span).await
    }

    async fn register_bidder(
        &self,
        req: Request<pb::RegisterBidderRequest>,
    ) -> Result<Response<pb::RegisterBidderResponse>, Status> {
        let span = rpc_span("RegisterBidder", &req);
        self.register_bidder_impl(req).instrument(span).await
    }

    async fn revoke_bidder(
        &self,
        req: Request<pb::RevokeBidderRequest>,
    ) -> Result<Response<pb::RevokeBidderResponse>, Status> {
        let span = rpc_span("RevokeBidder", &req);
        self.revoke_bidder_impl(req).instrument(span).await
    }

    async fn enroll_bidder(
        &self,
        req: Request<pb::EnrollBidderRequest>,
    ) -> Result<Response<pb::RegisterBidderResponse>, Status> {
        let span = rpc_span("EnrollBidder", &req);
        self.enroll_bidder_impl(req).instrument(span).await
    }

    async fn list_bidders(
        &self,
        req: Request<pb::ListBiddersRequest>,
    ) -> Result<Response<pb::ListBiddersResponse>, Status> {
        let span = rpc_span("ListBidders", &req);
        let listing = async {
            let mut conn = self.conn().await?;
            let all = bidders::list(&mut conn).await.map_err(unavailable)?;
            let bidders = all
                .into_iter()
                .map(|(bidder, ms)| pb::RegisteredBidder {
                    bidder,
                    registered_at: Some(timestamp(ms)),
                })
                .collect();
            Ok(Response::new(pb::ListBiddersResponse { bidders }))
        };
        listing.instrument(span).await
    }
}

impl AdminService {
    async fn register_bidder_impl(
        &self,
        req: Request<pb::RegisterBidderRequest>,
    ) -> Result<Response<pb::RegisterBidderResponse>, Status> {
        self.authorize(&req)?;
        let bidder = req.into_inner().bidder;
        wire::check_token("bidder", &bidder, wire::MAX_BIDDER_LEN)
            .map_err(|e| invalid("bidder", e))?;
        let key = self.issue_key(&bidder).await?;
        info!(%bidder, "bidder registered (a new key replaces any earlier one)");
        Ok(Response::new(pb::RegisterBidderResponse { bidder, key }))
    }

    async fn enroll_bidder_impl(
        &self,
        req: Request<pb::EnrollBidderRequest>,
    ) -> Result<Response<pb::RegisterBidderResponse>, Status> {
        let Some(enrollment) = &self.enrollment else {
            return Err(Status::failed_precondition(
                "enrollment is off on this server: set ENROLL_TOKEN and ENROLL_HOST, or have an operator call RegisterBidder and give the bidder BIDDER_KEY",
            ));
        };
        bearer(&req, &enrollment.token, "ENROLL_TOKEN", "enrollment token")?;
        let peer = req.remote_addr();
        let bidder = req.into_inner().bidder;
        enroll::check_name(&bidder).map_err(|e| invalid("bidder", e))?;
        let host = enroll::host_of(&enrollment.host, &bidder);
        if let Err(refused) = enroll::check_caller(&host, peer).await {
            warn!(%bidder, peer = ?peer, reason = refused.message(), "enrollment refused");
            return Err(refused);
        }
        let key = self.issue_key(&bidder).await?;
        info!(%bidder, peer = ?peer, "bidder enrolled (a new key replaces any earlier one)");
        Ok(Response::new(pb::RegisterBidderResponse { bidder, key }))
    }

    /// Draws a fresh key for `bidder`, stores it (replacing any earlier one) and updates
    /// this server's cache at once; other servers see it within their poll.
    async fn issue_key(&self, bidder: &str) -> Result<String, Status> {
        let key = bidders::new_key().map_err(|e| {
            Status::internal(format!("the operating system gave no random bytes: {e}"))
        })?;
        let mut conn = self.conn().await?;
        bidders::register(&mut conn, bidder, &key)
            .await
            .map_err(unavailable)?;
        self.bidder_keys.registered(bidder, &key);
        Ok(key)
    }

    async fn revoke_bidder_impl(
        &self,
        req: Request<pb::RevokeBidderRequest>,
    ) -> Result<Response<pb::RevokeBidderResponse>, Status> {
        self.authorize(&req)?;
        let bidder = req.into_inner().bidder;
        wire::check_token("bidder", &bidder, wire::MAX_BIDDER_LEN)
            .map_err(|e| invalid("bidder", e))?;
        let mut conn = self.conn().await?;
        let had = bidders::revoke(&mut conn, &bidder)
            .await
            .map_err(unavailable)?;
        self.bidder_keys.revoked(&bidder);
        if !had {
            return Err(Status::not_found(format!("no registered bidder {bidder}")));
        }
        info!(%bidder, "bidder revoked");
        Ok(Response::new(pb::RevokeBidderResponse {}))
    }
}

/// Checks that `req` carries `authorization: Bearer <token>`; `setting` and `what` name the
/// token in the refusal.
fn bearer<T>(req: &Request<T>, token: &str, setting: &str, what: &str) -> Result<(), Status> {
    let header = req.metadata().get("authorization").ok_or_else(|| {
        Status::unauthenticated(format!(
            "missing `authorization: Bearer <token>` metadata (this call needs the server's {setting})"
        ))
    })?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("authorization metadata must be `Bearer <token>`")
        })?;
    if constant_time_eq(presented.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated(format!("invalid {what}")))
    }
}

/// The span of one admin call, child of the caller's trace when it sent `traceparent`.
fn rpc_span<T>(method: &'static str, req: &Request<T>) -> tracing::Span {
    let span = info_span!("admin_rpc", method, otel.kind = "server");
    crate::runtime::propagation::set_parent_from_metadata(&span, req.metadata());
    span
}

impl AdminService {
    async fn open_auction_impl(
        &self,
        req: Request<pb::OpenAuctionRequest>,
    ) -> Result<Response<pb::OpenAuctionResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let spec = self.spec(&r)?;
        let id = if r.auction_id.is_empty() {
            AuctionId::random()
        } else {
            parse_id(&r.auction_id)?
        };
        self.router()?.open(id.clone(), spec).await?;
        info!(auction = %id, "opened through the admin API");
        let auction = self.read(&id).await?;
        Ok(Response::new(pb::OpenAuctionResponse {
            auction: Some(to_proto(&auction)),
        }))
    }

    async fn close_auction_impl(
        &self,
        req: Request<pb::CloseAuctionRequest>,
    ) -> Result<Response<pb::CloseAuctionResponse>, Status> {
        self.authorize(&req)?;
        let id = parse_id(&req.get_ref().auction_id)?;
        let before = self.read(&id).await?;
        if !before.open {
            return Err(Status::failed_precondition(format!(
                "auction {id} is already closed"
            )));
        }
        let mut events = self.hub.subscribe().await;
        let until = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        loop {
            match self.router()?.close(id.clone(), CloseMode::Forced).await {
                Ok(Closed::ByUs(_)) => break,
                Ok(Closed::Already(_)) => {
                    return Err(Status::failed_precondition(format!(
                        "auction {id} closed before this request took effect (deadline or another close)"
                    )));
                }
                Ok(Closed::Unknown) | Err(OpError::NotFound) => {
                    return Err(Status::not_found(format!("no auction {id}")));
                }
                Ok(Closed::NotDue(_)) => {
                    return Err(Status::internal("an immediate close reported not due"));
                }
                Ok(Closed::HeldElsewhere(_)) | Err(OpError::HeldElsewhere) => {
                    // Another server holds the lease: ask it, through the control channel.
                    if self.close_elsewhere(&id, &mut events).await? {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
            if tokio::time::Instant::now() > until {
                return Err(Status::unavailable(format!(
                    "could not close {id} within {CLOSE_TIMEOUT:?}; the lease holder did not answer; retry"
                )));
            }
        }
        let after = self.read(&id).await?;
        info!(auction = %id, "closed early through the admin API");
        Ok(Response::new(pb::CloseAuctionResponse {
            auction: Some(to_proto(&after)),
        }))
    }

    async fn get_auction_impl(
        &self,
        req: Request<pb::GetAuctionRequest>,
    ) -> Result<Response<pb::GetAuctionResponse>, Status> {
        let id = parse_id(&req.get_ref().auction_id)?;
        let auction = self.read(&id).await?;
        Ok(Response::new(pb::GetAuctionResponse {
            auction: Some(to_proto(&auction)),
        }))
    }

    async fn list_auctions_impl(
        &self,
        req: Request<pb::ListAuctionsRequest>,
    ) -> Result<Response<pb::ListAuctionsResponse>, Status> {
        let r = req.into_inner();
        let size = page_size(r.page_size, AUCTIONS_PAGE)?;
        let filter = match pb::AuctionState::try_from(r.state) {
            Ok(pb::AuctionState::Unspecified) => None,
            Ok(pb::AuctionState::Open) => Some(true),
            Ok(pb::AuctionState::Closed) => Some(false),
            Err(_) => return Err(invalid("state", format!("unknown value {}", r.state))),
        };
        let mut after = auctions_after(&r.page_token)?;
        let mut conn = self.conn().await?;
        let mut auctions = Vec::new();
        // Scan in opening order; a filter may need several chunks to fill a page.
        let next = loop {
            let chunk = size.max(100);
            let listed = ledger::list_ids(&mut conn, after.as_ref(), chunk)
                .await
                .map_err(unavailable)?;
            let last_chunk = listed.len() < chunk;
            let ids: Vec<AuctionId> = listed.iter().map(|l| l.id.clone()).collect();
            let records = ledger::get_many(&mut conn, &ids)
                .await
                .map_err(unavailable)?;
            for (place, rec) in listed.into_iter().zip(records) {
                after = Some(place);
                // `None`: its retention ran out and the sweeper has not taken it out yet.
                let Some(rec) = rec else { continue };
                if filter.is_none_or(|open| rec.open == open) {
                    auctions.push(to_proto(&rec));
                    if auctions.len() == size {
                        break;
                    }
                }
            }
            if auctions.len() == size {
                let more = !ledger::list_ids(&mut conn, after.as_ref(), 1)
                    .await
                    .map_err(unavailable)?
                    .is_empty();
                break after.as_ref().filter(|_| more).map(auctions_token);
            }
            if last_chunk {
                break None;
            }
        };
        Ok(Response::new(pb::ListAuctionsResponse {
            auctions,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn list_bids_impl(
        &self,
        req: Request<pb::ListBidsRequest>,
    ) -> Result<Response<pb::ListBidsResponse>, Status> {
        let r = req.into_inner();
        let id = parse_id(&r.auction_id)?;
        let size = page_size(r.page_size, BIDS_PAGE)?;
        let after = bids_after(&r.page_token)?;
        self.read(&id).await?;
        let after = match after {
            BidsAfter::Start => "-".to_owned(),
            BidsAfter::Entry(last) => last,
            // No stream id follows the largest one: an empty last page.
            BidsAfter::End => return Ok(Response::new(pb::ListBidsResponse::default())),
        };
        let mut conn = self.conn().await?;
        let mut page = ledger::history(&mut conn, &id, &after, size + 1)
            .await
            .map_err(unavailable)?;
        let more = page.len() > size;
        page.truncate(size);
        let next = if more {
            page.last().map(|(sid, _)| sid.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListBidsResponse {
            bids: page.iter().map(|(_, h)| bid_to_proto(h)).collect(),
            next_page_token: next,
        }))
    }
}
