//! The Lua scripts, each one atomic step on the master's keys, as the code writes them
//! (`src/store/lock/*.lua`, `src/store/ledger/{place_bids,close}.lua`).
//!
//! Each takes the master's data and answers what the script answers, with the new data when
//! it writes (a script that only reads writes nothing and replicates nothing: that is what
//! the group commit's marker is for). Amounts follow `place_bids.lua` with a starting price
//! of 1 and an increment of 1, so `below_min_increment` cannot arise and is not modelled;
//! proxy bids and soft close are pure arithmetic inside the same atomic call and are left
//! out (see the architecture section).
//!
//! The ghost checks of the fence property live here too, at the one place a token is
//! handed out (`hand_out`) and the one place a fenced write lands (`land`).

use crate::mutation::Mutation;
use crate::redis::{BidId, Close, Data, LockValue, ServerId, Token, Writer};

/// Ghost flags a script can raise (the properties read them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flags {
    /// A write landed out of token order or from a non-holder, or a token was handed out
    /// twice on one node.
    pub fence_broken: bool,
    /// A bid was accepted at or after the deadline.
    pub accepted_late: bool,
}

/// `fence_ok`: the caller's exact lock value is the lock now, and its token is not older
/// than the auction's fence.
pub fn fence_ok(d: &Data, value: LockValue, m: Option<Mutation>) -> bool {
    if m == Some(Mutation::DropFenceCheck) {
        return true;
    }
    d.lock == Some(value) && value.token >= d.fence
}

/// `next_token`: above the counter and the fence, so a counter lost in a failover (or
/// left behind by a close of a free auction) never hands out a token that already wrote.
pub fn next_token(d: &Data, m: Option<Mutation>) -> Token {
    if m == Some(Mutation::TokenFromCounterOnly) {
        return d.counter + 1;
    }
    d.counter.max(d.fence) + 1
}

/// Records that `token` was handed out on this node's line of writes.
fn hand_out(d: &mut Data, token: Token, flags: &mut Flags) {
    if token <= d.issued {
        flags.fence_broken = true;
    }
    d.issued = d.issued.max(token);
}

/// A fenced write lands: checks that its writer holds the lock (the closer's own lease
/// needs the lock free) and that tokens land in order, one writer per token; then records
/// the token as the fence, as every writing script does.
fn land(d: &mut Data, writer: Writer, flags: &mut Flags) {
    let (holds, token) = match writer {
        Writer::Opener => (true, 0),
        Writer::Holder(v) => (d.lock == Some(v), v.token),
        Writer::Closer(v) => (d.lock.is_none(), v.token),
    };
    if !holds || token < d.fence || (token == d.fence && d.fence_writer != writer) {
        flags.fence_broken = true;
    }
    d.fence = token;
    d.fence_writer = writer;
}

/// `acquire.lua`'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// The lease is ours with this token.
    Token(Token),
    /// Another value holds the lock.
    Held,
}

/// `acquire.lua` (the auction exists in every model state, so "unknown" does not arise).
pub fn acquire(
    d: &Data,
    server: ServerId,
    m: Option<Mutation>,
    flags: &mut Flags,
) -> (Acquired, Option<Data>) {
    if d.lock.is_some() {
        return (Acquired::Held, None);
    }
    let mut d = *d;
    let token = next_token(&d, m);
    hand_out(&mut d, token, flags);
    d.lock = Some(LockValue { server, token });
    d.counter = token;
    (Acquired::Token(token), Some(d))
}

/// `renew.lua` for one lease: compare-and-expire; whether the lease is still ours. The
/// new expiry it sets is not data the model keeps (expiry is an action of its own).
pub fn renew(d: &Data, value: LockValue) -> bool {
    d.lock == Some(value)
}

/// Why a bid was refused without a write (nothing stored, no `seq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `x|auction_closed`.
    Closed,
    /// `x|deadline_passed`.
    DeadlinePassed,
    /// `x|equal_to_high`.
    EqualToHigh,
    /// `x|too_low`.
    TooLow,
}

/// `place_bids.lua`'s answer for one bid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged {
    /// `fenced`: the caller's lease is gone.
    Fenced,
    /// `new|accepted|seq`: written.
    Accepted(u8),
    /// `dup|…`: the stored first outcome.
    Duplicate(u8),
    /// `x|reason`.
    Refused(Refusal),
}

/// A bid as the script gets it.
#[derive(Clone, Copy, Debug)]
pub struct BidArgs {
    /// `bid_id`.
    pub bid: BidId,
    /// Its amount.
    pub amount: u8,
    /// Whether Redis `TIME` is at or past the deadline.
    pub past_deadline: bool,
}

/// `place_bids.lua` for a batch of one bid (see the architecture section on batches).
pub fn place_bid(
    d: &Data,
    value: LockValue,
    args: BidArgs,
    amount_of: impl Fn(BidId) -> u8,
    m: Option<Mutation>,
    flags: &mut Flags,
) -> (Judged, Option<Data>) {
    if !fence_ok(d, value, m) {
        return (Judged::Fenced, None);
    }
    if let Some(seq) = d.history.seq_of(args.bid) {
        return (Judged::Duplicate(seq), None);
    }
    if d.closed.is_some() {
        return (Judged::Refused(Refusal::Closed), None);
    }
    if args.past_deadline {
        return (Judged::Refused(Refusal::DeadlinePassed), None);
    }
    if let Some(high) = d.history.high().map(&amount_of) {
        if args.amount == high && m != Some(Mutation::AcceptEqualBid) {
            return (Judged::Refused(Refusal::EqualToHigh), None);
        }
        if args.amount < high {
            return (Judged::Refused(Refusal::TooLow), None);
        }
    }
    let mut d = *d;
    if args.past_deadline {
        flags.accepted_late = true;
    }
    land(&mut d, Writer::Holder(value), flags);
    let seq = d.history.push(args.bid);
    (Judged::Accepted(seq), Some(d))
}

/// Under which lease `close.lua` closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseAs {
    /// The caller's worker holds the lease.
    Holder(LockValue),
    /// Nobody holds it (as far as the router knows): take one inside the call.
    Free(ServerId),
}

/// `close.lua`'s answer for one auction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// `closed`: written now.
    ByUs(Close),
    /// `already`: the first close's event, read without a write.
    Already(Close),
    /// `fenced`.
    Fenced,
    /// `held`: the lease is not free.
    Held,
    /// `not_due`.
    NotDue,
}

/// `close.lua` for one auction, mode `due`.
pub fn close(
    d: &Data,
    by: CloseAs,
    past_deadline: bool,
    m: Option<Mutation>,
    flags: &mut Flags,
) -> (Closed, Option<Data>) {
    if let Some(c) = d.closed {
        return (Closed::Already(c), None);
    }
    let mut next = *d;
    let writer = match by {
        CloseAs::Free(server) => {
            if d.lock.is_some() {
                return (Closed::Held, None);
            }
            Writer::Closer(LockValue {
                server,
                token: next_token(d, m),
            })
        }
        CloseAs::Holder(value) => {
            if !fence_ok(d, value, m) {
                return (Closed::Fenced, None);
            }
            Writer::Holder(value)
        }
    };
    if !past_deadline {
        return (Closed::NotDue, None);
    }
    if let Writer::Closer(v) = writer {
        hand_out(&mut next, v.token, flags);
    }
    // The token written as the fence keeps later acquires above it; the counter itself
    // does not move (as in close.lua).
    land(&mut next, writer, flags);
    let c = Close {
        winner: d.history.high(),
        seq: d.history.next_seq(),
    };
    next.closed = Some(c);
    (Closed::ByUs(c), Some(next))
}
