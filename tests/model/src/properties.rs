//! The properties the checker verifies on every reachable state.
//!
//! Every property is an invariant over the *master's* data in each state. That covers every
//! node: a replica's data is the master's data after some earlier write, so it was the
//! master's data in an earlier state on the same path. "Every announced event is in the
//! final state of whichever node is master at the end" is checked as the stronger "in the
//! state of whichever node is master now", in every state.

use stateright::Property;

use crate::redis::{Data, Writer};
use crate::system::{Protocol, State, Told};

/// The property names, as the report spells them.
pub mod names {
    /// Writes land only from the lock's holder, in token order, one writer per token; no
    /// token is handed out twice on a node.
    pub const FENCE: &str = "fence_monotone";
    /// No `bid_id` is accepted twice: once in the history, and one outcome announced.
    pub const ACCEPTED_ONCE: &str = "bid_accepted_once";
    /// Every announced `bid_accepted` and `auction_closed` is in the current master's data
    /// (and no bid announced rejected is in its history).
    pub const DURABLE: &str = "announced_is_durable";
    /// Accepted bids strictly rise, and the close names the last (highest) one.
    pub const WINNER: &str = "winner_is_highest_accepted";
    /// One close: every announced `auction_closed` is the same close.
    pub const CLOSES_ONCE: &str = "auction_closes_once";
    /// No bid is accepted at or after the deadline (by Redis time).
    pub const DEADLINE: &str = "no_accept_after_deadline";
    /// Eventually, every bid being retried gets an outcome (checked on terminal paths).
    pub const OUTCOME: &str = "every_bid_gets_an_outcome";
    /// Reachable: an `auction_closed` announced in a run with a failover.
    pub const REACH_CLOSED_AFTER_FAILOVER: &str = "reachable_close_with_failover";
    /// Reachable: every bid answered, one accepted, and the close announced.
    pub const REACH_ALL_ANSWERED: &str = "reachable_all_answered_and_closed";
    /// Reachable: two accepted bids, the later under a second lease (a handover).
    pub const REACH_HANDOVER: &str = "reachable_handover";
}

/// Every property: the protocol's guarantees (safety first, then the liveness claim),
/// then the reachability checks.
pub fn all() -> Vec<Property<Protocol>> {
    let mut all = guarantees();
    all.extend(reachable());
    all
}

/// Scenarios the model must be able to reach, so that the guarantees are not vacuous (a
/// model that never fails over, say, would satisfy them trivially). Each is a
/// `sometimes` property: the checker must find an example.
pub fn reachable() -> Vec<Property<Protocol>> {
    vec![
        Property::sometimes(names::REACH_CLOSED_AFTER_FAILOVER, |_, s: &State| {
            s.ghost.announced_close.is_some() && s.failovers_left == 0
        }),
        Property::sometimes(names::REACH_ALL_ANSWERED, |m: &Protocol, s: &State| {
            s.ghost.announced_close.is_some()
                && m.outstanding(s).next().is_none()
                && s.ghost.announced.iter().any(Option::is_some)
        }),
        Property::sometimes(names::REACH_HANDOVER, |_, s: &State| {
            s.redis.data().history.bids().len() >= 2
                && matches!(s.redis.data().fence_writer, Writer::Holder(v) if v.token >= 2)
        }),
    ]
}

/// The protocol's guarantees.
pub fn guarantees() -> Vec<Property<Protocol>> {
    vec![
        Property::always(names::FENCE, |_, s: &State| !s.ghost.flags.fence_broken),
        Property::always(names::ACCEPTED_ONCE, accepted_once),
        Property::always(names::DURABLE, durable),
        Property::always(names::WINNER, winner_is_highest),
        Property::always(names::CLOSES_ONCE, |_, s: &State| !s.ghost.closed_twice),
        Property::always(names::DEADLINE, |_, s: &State| !s.ghost.flags.accepted_late),
        Property::eventually(names::OUTCOME, |m: &Protocol, s: &State| {
            m.outstanding(s).next().is_none()
        }),
    ]
}

fn accepted_once(_: &Protocol, s: &State) -> bool {
    let bids = s.redis.data().history;
    let bids = bids.bids();
    let unique = bids.iter().enumerate().all(|(i, b)| !bids[..i].contains(b));
    unique && !s.ghost.told_twice
}

fn durable(_: &Protocol, s: &State) -> bool {
    let data: &Data = s.redis.data();
    let bids_kept = s.ghost.announced.iter().enumerate().all(|(bid, told)| {
        let stored = data.history.seq_of(bid as u8);
        match told {
            None => true,
            Some(Told::Accepted(seq)) => stored == Some(*seq),
            Some(Told::Refused) => stored.is_none(),
        }
    });
    let close_kept = s
        .ghost
        .announced_close
        .is_none_or(|c| data.closed == Some(c));
    bids_kept && close_kept
}

fn winner_is_highest(m: &Protocol, s: &State) -> bool {
    let data = s.redis.data();
    let amounts: Vec<u8> = data
        .history
        .bids()
        .iter()
        .map(|&b| m.config.bids[b as usize].amount)
        .collect();
    let rising = amounts.windows(2).all(|w| w[0] < w[1]);
    rising && data.closed.is_none_or(|c| c.winner == data.history.high())
}
