//! The whole system as one state machine: Redis (see [`crate::redis`]), the servers with
//! their leases, workers, closers and announcers, and the bidders; every action is one
//! step that the checker may interleave with any other.
//!
//! What each action stands for in the code:
//!
//! - `Acquire`, `Renew`: a worker taking the lease (`acquire.lua`) and the lease keeper
//!   renewing it (`renew.lua`; a lease found gone is marked lost and the worker stops).
//! - `Judge`: the holder's worker runs `place_bids.lua` for an outstanding bid and hands
//!   the outcome to the announcer. A bid stays outstanding, and so is judged again by any
//!   holder, until its bidder hears an outcome: that is the bidder's retry with the same
//!   `bid_id`, and the shadows a new holder judges first.
//! - `CloserScan`, `Close`: the closer reading the due auctions by Redis `TIME`, and the
//!   close it asks for (`close.lua`, under the worker's lease or a lease taken inside the
//!   call); another server may close in between, so `already` arises.
//! - `Publish`: the announcer's group commit: `INCR auctions:commit-marker` then `WAIT 1`
//!   for everything queued; what a replica has acknowledged, on a master that has not
//!   changed, is published and bidders hear their outcomes (see [`Action::Publish`]).
//! - `Replicate`, `Failover`: a replica receiving the next write; Sentinel promoting the
//!   best replica.
//! - `Expire`, `Deadline`: the clock, reduced to the two moments the protocol reads off it.
//!   A lease expires (on every node at once: Redis expires by absolute time) at any
//!   moment the checker picks, which contains every schedule of ticks, renewals and
//!   pauses; the deadline passes once, by Redis `TIME`, shared by every node.
//! - `Crash`: a server dies and restarts with an empty memory (its lease and queued
//!   announcements gone, its lock left to expire).
//!
//! A pause (a holder that stops and resumes) needs no action: a server acts on its own
//! view of its lease whenever the checker schedules it, however much the clock advanced
//! meanwhile, so every pause of every length is among the interleavings.

use stateright::{Model, Property};

use crate::config::Config;
use crate::mutation::Mutation;
use crate::properties;
use crate::redis::{BidId, Close, Cluster, Data, LockValue, MAX_BIDS, NodeId, ServerId};
use crate::scripts::{self, Acquired, BidArgs, CloseAs, Closed, Flags, Judged};

/// What a server tells the world, once durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// `bid_accepted` (first or repeated) with its `seq`.
    Accepted {
        /// The bid.
        bid: BidId,
        /// Its `seq`.
        seq: u8,
    },
    /// `bid_rejected`: any refusal (the bidder stops retrying that bid).
    Refused {
        /// The bid.
        bid: BidId,
    },
    /// `auction_closed`.
    Closed(Close),
}

/// One `auction-server` process, as far as the protocol goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Server {
    /// The lease its worker believes it holds.
    pub lease: Option<LockValue>,
    /// Handed to the announcer, not yet published (kept sorted: the order does not
    /// matter to anything checked, so one state stands for every order).
    pub pending: Vec<Event>,
    /// The closer read the auction among the due ones (`auctions:open` by Redis `TIME`)
    /// and asked for its close, which has not run yet.
    pub closing: bool,
}

impl Server {
    fn busy(&self) -> bool {
        *self != Server::default()
    }

    fn queued(&self, bid: BidId) -> bool {
        let is = |e: &Event| matches!(e, Event::Accepted { bid: b, .. } | Event::Refused { bid: b } if *b == bid);
        self.pending.iter().any(is)
    }
}

/// What a bidder was told about its bid, first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Told {
    /// `bid_accepted` with this `seq`.
    Accepted(u8),
    /// `bid_rejected`.
    Refused,
}

/// Ghost state: what was announced, and flags the scripts raised. Not part of the system;
/// the properties read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ghost {
    /// Per bid: the first outcome announced for it.
    pub announced: [Option<Told>; MAX_BIDS],
    /// The announced `auction_closed`.
    pub announced_close: Option<Close>,
    /// A bid was announced with two different outcomes (accepted twice with different
    /// `seq`s, or accepted and rejected).
    pub told_twice: bool,
    /// Two different closes were announced.
    pub closed_twice: bool,
    /// Raised by the scripts.
    pub flags: Flags,
}

/// The state of the whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct State {
    /// The Redis nodes.
    pub redis: Cluster,
    /// The servers.
    pub servers: Vec<Server>,
    /// Per bidder: how many of its bids have an outcome (the next one is outstanding).
    pub answered: Vec<u8>,
    /// Redis `TIME` is at or past the deadline.
    pub past_deadline: bool,
    /// Failovers still allowed.
    pub failovers_left: u8,
    /// Crashes still allowed.
    pub crashes_left: u8,
    /// Expiries of a lease under a holder that counts on it, still allowed.
    pub expiries_left: u8,
    /// What the properties check.
    pub ghost: Ghost,
}

/// One step of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// The lease on the master expires.
    Expire,
    /// The deadline passes.
    Deadline,
    /// A replica receives the next write it lacks.
    Replicate(NodeId),
    /// Sentinel promotes the best replica.
    Failover,
    /// A server crashes and restarts.
    Crash(ServerId),
    /// A server's worker takes the lease.
    Acquire(ServerId),
    /// A server's lease keeper renews (or finds the lease lost).
    Renew(ServerId),
    /// A server's worker judges an outstanding bid.
    Judge(ServerId, BidId),
    /// A server's closer finds the auction due and asks for its close.
    CloserScan(ServerId),
    /// The close it asked for runs.
    Close(ServerId),
    /// A server's announcer writes the marker, its `WAIT 1` returns acknowledged, and it
    /// publishes everything queued.
    ///
    /// The model makes marker, `WAIT` and publish one step, taken only while a replica has
    /// every write the master has. In the code the marker goes after every answer it
    /// vouches for and `WAIT` returns once a replica reaches the marker; writes made after
    /// the marker by others, unreplicated at that point, do not depend on the publish and
    /// can be scheduled after it, so every publish the code makes is one this step makes
    /// in some interleaving. A failover clears every queue: a `WAIT` on the new master
    /// never vouches for an older generation's answers (`NotAnnounced::MasterChanged`).
    Publish(ServerId),
}

/// What a step did, for the readable trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Said {
    /// Nothing worth a word.
    Done,
    /// `acquire.lua` answered.
    Acquired(Acquired),
    /// The lease was found lost.
    LeaseLost,
    /// `place_bids.lua` answered.
    Judged(Judged),
    /// `close.lua` answered.
    Closed(Closed),
    /// The announcer published its queue.
    Published,
}

/// The model: a configuration and at most one seeded mutation.
#[derive(Clone, Debug)]
pub struct Protocol {
    /// The bounds.
    pub config: Config,
    /// The defect seeded, if any.
    pub mutation: Option<Mutation>,
}

impl Protocol {
    /// The model of `config`, with `mutation` seeded.
    pub fn new(config: Config, mutation: Option<Mutation>) -> Self {
        Self { config, mutation }
    }

    /// The bid bidder `k` is retrying, if any.
    pub fn outstanding_of(&self, s: &State, k: u8) -> Option<BidId> {
        self.config.script(k).nth(s.answered[k as usize] as usize)
    }

    /// Every bid being retried.
    pub fn outstanding(&self, s: &State) -> impl Iterator<Item = BidId> + '_ {
        let answered = s.answered.clone();
        (0..self.config.bidders())
            .filter_map(move |k| self.config.script(k).nth(answered[k as usize] as usize))
    }

    fn amount(&self, bid: BidId) -> u8 {
        self.config.bids[bid as usize].amount
    }

    /// Runs `action` on `s`; `None` when it changes nothing or would take the replication
    /// backlog past its bound. `said` tells what happened.
    pub fn step(&self, s: &State, action: Action, said: &mut Said) -> Option<State> {
        let m = self.mutation;
        let mut n = s.clone();
        *said = Said::Done;
        match action {
            Action::Expire => {
                if self.holder_counts_on_lock(s) {
                    n.expiries_left -= 1;
                }
                n.redis.expire_lock();
            }
            Action::Deadline => n.past_deadline = true,
            Action::Replicate(node) => n.redis.replicate(node),
            Action::Failover => {
                n.failovers_left -= 1;
                n.redis.failover();
                // Every announcer's queue now holds answers of an older generation: its
                // next WAIT runs on the new master and they are dropped ("master
                // changed"; the bidders' retries get them announced later).
                for server in &mut n.servers {
                    server.pending.clear();
                }
            }
            Action::Crash(i) => {
                n.crashes_left -= 1;
                n.servers[i as usize] = Server::default();
            }
            Action::Acquire(i) => {
                let data = *n.redis.data();
                let (answer, write) = scripts::acquire(&data, i, m, &mut n.ghost.flags);
                *said = Said::Acquired(answer);
                if let Acquired::Token(token) = answer {
                    n.servers[i as usize].lease = Some(LockValue { server: i, token });
                }
                self.written(&mut n, write);
            }
            Action::Renew(i) => {
                // A renewal that succeeds changes nothing the model keeps (the expiry it
                // sets is not modelled; see `Action::Expire`).
                let value = s.servers[i as usize].lease?;
                if scripts::renew(s.redis.data(), value) {
                    return None;
                }
                *said = Said::LeaseLost;
                n.servers[i as usize].lease = None;
            }
            Action::Judge(i, bid) => {
                let value = s.servers[i as usize].lease?;
                let args = BidArgs {
                    bid,
                    amount: self.amount(bid),
                    past_deadline: s.past_deadline,
                };
                let (answer, write) = scripts::place_bid(
                    s.redis.data(),
                    value,
                    args,
                    |b| self.amount(b),
                    m,
                    &mut n.ghost.flags,
                );
                *said = Said::Judged(answer);
                self.written(&mut n, write);
                let event = match answer {
                    Judged::Fenced => {
                        n.servers[i as usize].lease = None;
                        None
                    }
                    Judged::Accepted(seq) | Judged::Duplicate(seq) => {
                        Some(Event::Accepted { bid, seq })
                    }
                    Judged::Refused(_) if m == Some(Mutation::SilentRefusal) => None,
                    Judged::Refused(_) => Some(Event::Refused { bid }),
                };
                if let Some(event) = event {
                    self.hand_over(&mut n, i, event);
                }
            }
            Action::CloserScan(i) => n.servers[i as usize].closing = true,
            Action::Close(i) => {
                n.servers[i as usize].closing = false;
                let by = match s.servers[i as usize].lease {
                    Some(value) => CloseAs::Holder(value),
                    None => CloseAs::Free(i),
                };
                let (answer, write) =
                    scripts::close(s.redis.data(), by, s.past_deadline, m, &mut n.ghost.flags);
                *said = Said::Closed(answer);
                self.written(&mut n, write);
                match answer {
                    Closed::Already(c) if m == Some(Mutation::AlreadyWithoutWrite) => {
                        self.publish(&mut n, Event::Closed(c))
                    }
                    Closed::ByUs(c) | Closed::Already(c) => {
                        self.hand_over(&mut n, i, Event::Closed(c))
                    }
                    Closed::Fenced => n.servers[i as usize].lease = None,
                    Closed::Held | Closed::NotDue => {}
                }
            }
            Action::Publish(i) => {
                // The marker write and a WAIT that a replica answers at once: enabled only
                // while a replica has every write (see `Action::Publish`).
                for event in std::mem::take(&mut n.servers[i as usize].pending) {
                    self.publish(&mut n, event);
                }
            }
        }
        if n.redis.end() > self.config.max_lag {
            return None;
        }
        self.normalize(&mut n);
        // A step that changes nothing (a retry judged the same way again, say) is no step:
        // a state whose only moves are such repeats is where the system stays, which is
        // what the liveness check looks for.
        (n != *s).then_some(n)
    }

    /// A script's write lands on the master.
    fn written(&self, n: &mut State, write: Option<Data>) {
        if let Some(data) = write {
            n.redis.write(data);
        }
    }

    /// A worker hands an outcome to its server's announcer.
    fn hand_over(&self, n: &mut State, i: ServerId, event: Event) {
        if self.mutation == Some(Mutation::AnnounceBeforeWait) {
            return self.publish(n, event);
        }
        let pending = &mut n.servers[i as usize].pending;
        pending.push(event);
        pending.sort_unstable();
    }

    /// Publishes `event`: the ghost records it and its bidder stops retrying.
    fn publish(&self, n: &mut State, event: Event) {
        let (bid, told) = match event {
            Event::Accepted { bid, seq } => (bid, Told::Accepted(seq)),
            Event::Refused { bid } => (bid, Told::Refused),
            Event::Closed(c) => {
                if n.ghost.announced_close.is_some_and(|first| first != c) {
                    n.ghost.closed_twice = true;
                }
                n.ghost.announced_close = Some(c);
                return;
            }
        };
        let first = n.ghost.announced[bid as usize].get_or_insert(told);
        if *first != told {
            n.ghost.told_twice = true;
        }
        let bidder = self.config.bids[bid as usize].bidder;
        if self.outstanding_of(n, bidder) == Some(bid) {
            n.answered[bidder as usize] += 1;
        }
    }

    /// Canonical form: writes every node has are folded into the base.
    fn normalize(&self, n: &mut State) {
        n.redis.compact();
    }

    fn enabled(&self, s: &State, action: Action) -> bool {
        let data = s.redis.data();
        let server = |i: ServerId| &s.servers[i as usize];
        match action {
            Action::Expire => {
                data.lock.is_some() && (s.expiries_left > 0 || !self.holder_counts_on_lock(s))
            }
            Action::Deadline => !s.past_deadline,
            Action::Replicate(node) => node != s.redis.master && s.redis.behind(node),
            Action::Failover => s.failovers_left > 0,
            Action::Crash(i) => s.crashes_left > 0 && server(i).busy(),
            // A worker exists only while there is work: a bid being retried.
            Action::Acquire(i) => {
                server(i).lease.is_none()
                    && data.lock.is_none()
                    && self.outstanding(s).next().is_some()
            }
            // A renewal that succeeds changes nothing the model keeps; one that finds the
            // lease gone stops the worker.
            Action::Renew(i) => server(i).lease.is_some_and(|v| data.lock != Some(v)),
            Action::Judge(i, bid) => server(i).lease.is_some() && !server(i).queued(bid),
            Action::CloserScan(i) => !server(i).closing && s.past_deadline && data.closed.is_none(),
            Action::Close(i) => server(i).closing,
            Action::Publish(i) => {
                !server(i).pending.is_empty() && s.redis.replicas().any(|r| !s.redis.behind(r))
            }
        }
    }

    /// Whether the master's lock belongs to a server that still counts on it.
    fn holder_counts_on_lock(&self, s: &State) -> bool {
        s.redis
            .data()
            .lock
            .is_some_and(|v| s.servers[v.server as usize].lease == Some(v))
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            redis: Cluster::new(1 + self.config.replicas, Data::opened()),
            servers: vec![Server::default(); self.config.servers as usize],
            answered: vec![0; self.config.bidders() as usize],
            past_deadline: false,
            failovers_left: self.config.failovers,
            crashes_left: self.config.crashes,
            expiries_left: self.config.expiries,
            ghost: Ghost::default(),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let mut candidates = vec![Action::Expire, Action::Deadline, Action::Failover];
        candidates.extend((0..s.redis.offsets.len() as NodeId).map(Action::Replicate));
        for i in 0..self.config.servers {
            candidates.extend([
                Action::Crash(i),
                Action::Acquire(i),
                Action::Renew(i),
                Action::CloserScan(i),
                Action::Close(i),
                Action::Publish(i),
            ]);
            candidates.extend(self.outstanding(s).map(|bid| Action::Judge(i, bid)));
        }
        actions.extend(candidates.into_iter().filter(|&a| self.enabled(s, a)));
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        self.step(s, action, &mut Said::Done)
    }

    fn format_step(&self, s: &State, action: Action) -> Option<String> {
        Some(crate::trace::describe(self, s, action))
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties::all()
    }
}
