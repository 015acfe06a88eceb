//! Judging bids: one fenced script call for a batch of one auction's bids, in arrival
//! order, each answered with its first outcome ([`Judged`]).

use redis::Value;
use redis::aio::ConnectionLike;

use super::{LedgerError, PLACE_BIDS};
use crate::keyspace::{self, AuctionId};
use crate::link::script::Reply;
use crate::store::lock::Lease;
use crate::wire::{Bid, Event, RejectReason};

/// One bid's outcome from [`place_bids`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    /// The event announcing it.
    pub event: Event,
    /// For a bid outbid by the leader's proxy (`outbid_by_proxy`): the leader's raise it
    /// provoked, announced just before `event` (its `seq` is one less).
    pub raised: Option<Event>,
    /// False when this `bid_id` had been judged before and `event` repeats the first outcome.
    pub fresh: bool,
}

/// Judges `bids` (all on the lease's auction) in order, in one script call.
pub async fn place_bids<C: ConnectionLike + Send>(
    conn: &mut C,
    lease: &Lease,
    bids: &[Bid],
) -> Result<Vec<Judged>, LedgerError> {
    let id = lease.auction();
    let mut call = PLACE_BIDS.prepare_invoke();
    call.key(id.state_key())
        .key(id.lock_key())
        .key(id.bids_key())
        .key(id.outcomes_key())
        .key(keyspace::OPEN_AUCTIONS)
        .arg(lease.value())
        .arg(lease.token())
        .arg(id.as_str());
    for bid in bids {
        debug_assert_eq!(&bid.auction_id, id);
        call.arg(&bid.bid_id).arg(&bid.bidder).arg(bid.amount);
        match bid.max_amount {
            Some(max) => call.arg(max),
            None => call.arg(""),
        };
    }
    let reply: Vec<Value> = call.invoke_async(conn).await?;
    let reply = Reply::new("place_bids", reply);
    if reply.tag().ok() == Some("fenced") {
        return Err(LedgerError::Fenced);
    }
    if reply.len() != bids.len() {
        return Err(reply
            .unexpected(&format!("{} outcomes for {} bids", reply.len(), bids.len()))
            .into());
    }
    bids.iter()
        .enumerate()
        .map(|(i, bid)| {
            let line = reply.str(i)?;
            decode_outcome(id, bid, line).ok_or_else(|| reply.unexpected(line).into())
        })
        .collect()
}

/// Decodes one line of `place_bids.lua`'s answer (its header documents the format).
fn decode_outcome(id: &AuctionId, bid: &Bid, line: &str) -> Option<Judged> {
    let (kind, rest) = line.split_once('|')?;
    if kind == "x" {
        let (reason, next_min) = match rest.split_once('|') {
            Some((reason, next_min)) => (reason, Some(next_min.parse().ok()?)),
            None => (rest, None),
        };
        let mut event = Event::refusal(bid.clone(), RejectReason::from_name(reason)?, None);
        if let Event::BidRejected { next_min: n, .. } = &mut event {
            *n = next_min;
        }
        return Some(Judged {
            event,
            raised: None,
            fresh: true,
        });
    }
    let f: Vec<&str> = rest.split('|').collect();
    let (status, reason, bidder) = (*f.first()?, *f.get(2)?, *f.get(5)?);
    let number = |i: usize| f.get(i)?.parse::<u64>().ok();
    let (seq, next_min, amount) = (number(1)?, number(3)?, number(4)?);
    // Outcomes stored before soft close and proxy bids end after the bidder.
    let moved = number(6);
    let accepted =
        |seq, bid_id: String, bidder: &str, amount, proxy, deadline_ms| Event::BidAccepted {
            auction_id: id.to_string(),
            seq,
            bid_id,
            bidder: bidder.to_owned(),
            amount,
            next_min,
            traceparent: None,
            proxy,
            deadline_ms,
        };
    let reason = match status {
        "accepted" => {
            let event = accepted(seq, bid.bid_id.clone(), bidder, amount, false, moved);
            return Some(Judged {
                event,
                raised: None,
                fresh: kind == "new",
            });
        }
        "rejected" => RejectReason::from_name(reason)?,
        _ => return None,
    };
    let raised = if reason == RejectReason::OutbidByProxy {
        let (p_seq, p_amount, leader) = (number(7)?, number(8)?, *f.get(9)?);
        let raise_id = format!("{}+proxy", bid.bid_id);
        Some(accepted(p_seq, raise_id, leader, p_amount, true, moved))
    } else {
        None
    };
    let event = Event::BidRejected {
        auction_id: Some(id.to_string()),
        seq: Some(seq),
        bid_id: bid.bid_id.clone(),
        bidder: Some(bidder.to_owned()),
        amount: Some(amount),
        reason,
        detail: None,
        next_min: Some(next_min),
        traceparent: None,
    };
    Some(Judged {
        event,
        raised,
        fresh: kind == "new",
    })
}
