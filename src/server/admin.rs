//! The `auction.v1.AuctionAdmin` gRPC service: open, close, read, list and watch auctions.
//!
//! Every mutation goes through the router, so it runs in the auction's worker under its
//! lease and fence, serialized with bids. An early close of an auction whose lease another
//! server holds is forwarded to that server over the control channel, and this call waits
//! for the resulting `auction_closed` event. Requests are validated here, at the boundary;
//! errors map to `INVALID_ARGUMENT` (naming the field), `NOT_FOUND`, `ALREADY_EXISTS`,
//! `FAILED_PRECONDITION`, `UNAVAILABLE` (retryable) and `UNAUTHENTICATED`.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::control::hub::Hub;
use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::proto::v1 as pb;
use crate::server::router::Router;
use crate::server::work::OpError;
use crate::store::ledger::{self, AuctionRecord, AuctionSpec, CloseMode, Closed, HistoryEntry};
use crate::wire::{self, CloseRequest, Event};

/// Default and largest page sizes.
const AUCTIONS_PAGE: (usize, usize) = (50, 1000);
const BIDS_PAGE: (usize, usize) = (100, 1000);
/// How long an admin close may take before `UNAVAILABLE` (covers a lease takeover).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a watch re-reads stored state, to catch an event lost on the way.
const WATCH_RESYNC: Duration = Duration::from_secs(5);

/// The admin service.
#[derive(Clone)]
pub struct AdminService {
    /// Routes mutations to the auction's worker.
    pub router: Router,
    /// The master handle.
    pub master: Master,
    /// Events heard on the event channel.
    pub hub: Hub,
    /// Where to forward closes for auctions another server holds.
    pub control_channel: String,
    /// When set, mutating calls require `authorization: Bearer <token>`.
    pub admin_token: Option<String>,
    /// Duration of auctions opened without one.
    pub default_duration: Duration,
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

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("Redis unavailable, retry: {e}"))
}

fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn parse_id(raw: &str) -> Result<AuctionId, Status> {
    AuctionId::parse(raw).map_err(|e| invalid("auction_id", e))
}

fn amount(field: &str, v: i64, min: i64) -> Result<u64, Status> {
    if v < min || v as u64 > wire::MAX_AMOUNT {
        return Err(invalid(
            field,
            format!(
                "must be between {min} and {} (minor units)",
                wire::MAX_AMOUNT
            ),
        ));
    }
    Ok(v as u64)
}

fn page_size(raw: i32, (default, max): (usize, usize)) -> Result<usize, Status> {
    match raw {
        0 => Ok(default),
        n if n < 0 || n as usize > max => {
            Err(invalid("page_size", format!("must be between 0 and {max}")))
        }
        n => Ok(n as usize),
    }
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn high_bid((amount, bidder, bid_id): &(u64, String, String)) -> pb::HighBid {
    pb::HighBid {
        amount: *amount as i64,
        bidder: bidder.clone(),
        bid_id: bid_id.clone(),
    }
}

/// The protobuf view of a stored auction.
pub fn to_proto(r: &AuctionRecord) -> pb::Auction {
    let next_min = match &r.high {
        Some((amount, _, _)) => amount + r.min_increment,
        None => r.starting_price,
    };
    pb::Auction {
        auction_id: r.auction_id.to_string(),
        item: r.item.clone(),
        state: if r.open {
            pb::AuctionState::Open
        } else {
            pb::AuctionState::Closed
        } as i32,
        starting_price: r.starting_price as i64,
        min_increment: r.min_increment as i64,
        reserve_price: r.reserve_price as i64,
        high_bid: r.high.as_ref().map(high_bid),
        bid_count: r.bid_count as i64,
        opened_at: Some(timestamp(r.opened_ms)),
        deadline: Some(timestamp(r.deadline_ms)),
        closed_at: r.closed_ms.map(timestamp),
        winner: r.winner.as_ref().map(high_bid),
        seq: r.seq,
        next_min: if r.open { next_min as i64 } else { 0 },
    }
}

fn bid_to_proto(h: &HistoryEntry) -> pb::Bid {
    pb::Bid {
        bid_id: h.bid_id.clone(),
        bidder: h.bidder.clone(),
        amount: h.amount as i64,
        seq: h.seq,
        accepted_at: Some(timestamp(h.at_ms)),
        fencing_token: h.fence,
    }
}

/// The protobuf view of a live event (`None` for `auction_opened`, which a watch shows as
/// its snapshot).
pub fn event_to_proto(e: &Event) -> Option<pb::AuctionEvent> {
    use pb::auction_event::Kind;
    let (seq, kind) = match e {
        Event::AuctionOpened { .. } => return None,
        Event::BidAccepted {
            seq,
            bid_id,
            bidder,
            amount,
            next_min,
            ..
        } => (
            *seq,
            Kind::BidAccepted(pb::BidAccepted {
                bid_id: bid_id.clone(),
                bidder: bidder.clone(),
                amount: *amount as i64,
                next_min: *next_min as i64,
            }),
        ),
        Event::BidRejected {
            seq,
            bid_id,
            bidder,
            amount,
            reason,
            next_min,
            ..
        } => (
            seq.unwrap_or(0),
            Kind::BidRejected(pb::BidRejected {
                bid_id: bid_id.clone(),
                bidder: bidder.clone().unwrap_or_default(),
                amount: amount.unwrap_or(0) as i64,
                reason: reason.as_str().to_owned(),
                next_min: next_min.unwrap_or(0) as i64,
            }),
        ),
        Event::AuctionClosed {
            seq,
            winner,
            amount,
            bid_id,
            bid_count,
            closed_at_ms,
            ..
        } => (
            *seq,
            Kind::AuctionClosed(pb::AuctionClosed {
                winner: winner.clone().unwrap_or_default(),
                amount: amount.unwrap_or(0) as i64,
                bid_id: bid_id.clone().unwrap_or_default(),
                bid_count: *bid_count as i64,
                closed_at: Some(timestamp(*closed_at_ms)),
            }),
        ),
    };
    Some(pb::AuctionEvent {
        seq,
        kind: Some(kind),
    })
}

impl AdminService {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.admin_token else {
            return Ok(());
        };
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` metadata (this server requires ADMIN_TOKEN for mutations)")
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
            Err(Status::unauthenticated("invalid admin token"))
        }
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, Status> {
        let link = self
            .master
            .link(Duration::from_secs(1))
            .await
            .map_err(unavailable)?;
        Ok(link.conn)
    }

    async fn read(&self, id: &AuctionId) -> Result<AuctionRecord, Status> {
        let mut conn = self.conn().await?;
        ledger::get(&mut conn, id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no auction {id}")))
    }

    fn spec(&self, r: &pb::OpenAuctionRequest) -> Result<AuctionSpec, Status> {
        let duration = match &r.duration {
            None => self.default_duration,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(invalid("duration", "must be positive"));
            }
            Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
        };
        let spec = AuctionSpec {
            item: r.item.clone(),
            duration,
            starting_price: amount("starting_price", r.starting_price, 1)?,
            min_increment: amount("min_increment", r.min_increment, 1)?,
            reserve_price: amount("reserve_price", r.reserve_price, 0)?,
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

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchAuctionResponse, Status>> + Send>>;

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
        self.watch_auction_impl(req).instrument(span).await
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
        self.router.open(id.clone(), spec).await?;
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
            match self.router.close(id.clone(), CloseMode::Forced).await {
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
        let mut offset = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .strip_prefix("o")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    invalid(
                        "page_token",
                        "not a token from a previous ListAuctions response",
                    )
                })?
        };
        let mut conn = self.conn().await?;
        let mut auctions = Vec::new();
        // Scan in opening order; a filter may need several chunks to fill a page.
        let next = loop {
            let chunk = size.max(100);
            let ids = ledger::list_ids(&mut conn, offset, chunk)
                .await
                .map_err(unavailable)?;
            let records = ledger::get_many(&mut conn, &ids)
                .await
                .map_err(unavailable)?;
            let mut consumed = 0;
            for rec in records {
                consumed += 1;
                if filter.is_none_or(|open| rec.open == open) {
                    auctions.push(to_proto(&rec));
                    if auctions.len() == size {
                        break;
                    }
                }
            }
            offset += consumed;
            if auctions.len() == size {
                let more = !ledger::list_ids(&mut conn, offset, 1)
                    .await
                    .map_err(unavailable)?
                    .is_empty();
                break more.then(|| format!("o{offset}"));
            }
            if ids.len() < chunk {
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
        let after = if r.page_token.is_empty() {
            "-".to_owned()
        } else {
            let ok = r.page_token.split_once('-').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
            });
            if !ok {
                return Err(invalid(
                    "page_token",
                    "not a token from a previous ListBids response",
                ));
            }
            r.page_token.clone()
        };
        self.read(&id).await?;
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

    async fn watch_auction_impl(
        &self,
        req: Request<pb::WatchAuctionRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = parse_id(&req.get_ref().auction_id)?;
        // Listen before reading the snapshot, so no event falls between the two.
        let events = self.hub.subscribe().await;
        let snapshot = self.read(&id).await?;
        let (tx, rx) = mpsc::channel(64);
        let service = self.clone();
        // The task lives as long as the client listens: it stops when the stream's
        // receiver is dropped (client gone), when the auction closes, or at shutdown.
        tokio::spawn(async move {
            if let Err(e) = service.pump(id, snapshot, events, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type WatchTx = mpsc::Sender<Result<pb::WatchAuctionResponse, Status>>;

impl AdminService {
    async fn send_snapshot(tx: &WatchTx, rec: &AuctionRecord) -> bool {
        let msg = pb::WatchAuctionResponse {
            kind: Some(pb::watch_auction_response::Kind::Snapshot(to_proto(rec))),
        };
        tx.send(Ok(msg)).await.is_ok()
    }

    async fn pump(
        &self,
        id: AuctionId,
        snapshot: AuctionRecord,
        mut events: broadcast::Receiver<std::sync::Arc<Event>>,
        tx: &WatchTx,
    ) -> Result<(), Status> {
        let mut last = snapshot.seq;
        if !Self::send_snapshot(tx, &snapshot).await || !snapshot.open {
            return Ok(());
        }
        let mut resync = tokio::time::interval(WATCH_RESYNC);
        resync.tick().await;
        loop {
            let need_snapshot = tokio::select! {
                _ = tx.closed() => return Ok(()),
                _ = resync.tick() => true,
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if ev.auction_id() != Some(id.as_str()) {
                            continue;
                        }
                        match ev.seq() {
                            Some(s) if s <= last => continue,
                            Some(s) if s > last + 1 => true,
                            seq => {
                                if let Some(s) = seq {
                                    last = s;
                                }
                                if let Some(pe) = event_to_proto(&ev) {
                                    let msg = pb::WatchAuctionResponse { kind: Some(pb::watch_auction_response::Kind::Event(pe)) };
                                    if tx.send(Ok(msg)).await.is_err() {
                                        return Ok(());
                                    }
                                }
                                if matches!(&*ev, Event::AuctionClosed { .. }) {
                                    return Ok(());
                                }
                                false
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(auction = %id, missed = n, "watch fell behind; resyncing from stored state");
                        true
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(Status::unavailable("server shutting down")),
                },
            };
            if need_snapshot {
                let rec = self.read(&id).await?;
                if rec.seq > last {
                    last = rec.seq;
                    if !Self::send_snapshot(tx, &rec).await {
                        return Ok(());
                    }
                }
                if !rec.open {
                    return Ok(());
                }
            }
        }
    }
}
