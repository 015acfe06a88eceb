//! Redis as the scripts see it: one auction's keys on every node, asynchronous replication
//! from the master, and a Sentinel failover that promotes a replica and loses what it had
//! not received.
//!
//! Replication is modelled by what it guarantees and nothing more: a replica's data is
//! always the master's data as it was after some earlier write (a prefix of the master's
//! write stream, since Redis replicates a script's effects as one unit, in order). So the
//! cluster keeps the data after every write that some node still lacks (`log`), and a
//! replica is only an offset into it. Everything every node has is folded into `base`,
//! which keeps the state finite and canonical: two histories that leave the nodes holding
//! the same data are the same state.

/// A fencing token (per auction; grows by one per acquisition).
pub type Token = u8;
/// A server (an `auction-server` process), numbered from 0.
pub type ServerId = u8;
/// A bid, numbered by its place in the configuration's bid list; its `bid_id`.
pub type BidId = u8;
/// A Redis node, numbered from 0 (node 0 is the first master).
pub type NodeId = u8;

/// Most bids any configuration has (the history is a fixed array so data stays `Copy`).
pub const MAX_BIDS: usize = 5;

/// The lock's value, `OWNER#TOKEN`.
///
/// The real value also carries the acquisition number (`OWNER.N#TOKEN`) so that a token
/// handed out again after a failover never revives an older worker of the same process.
/// A modelled server holds at most one lease and forgets it when it crashes, so (server,
/// token) already names one acquisition here; see the architecture section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockValue {
    /// The owner.
    pub server: ServerId,
    /// The fencing token it was handed.
    pub token: Token,
}

/// Who last wrote the auction's `fence` (not in Redis: a ghost for the fence property).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Writer {
    /// `open.lua` (the model starts with the auction open, fence 0).
    Opener,
    /// A lease holder's fenced script.
    Holder(LockValue),
    /// `close.lua` closing an auction nobody held, under a lease taken inside the call.
    Closer(LockValue),
}

/// The accepted bids, in `seq` order: the history stream and, since only acceptances are
/// stored, the outcomes hash too (bid `history[i]` has `seq` i + 2; the opening is 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct History {
    len: u8,
    ids: [BidId; MAX_BIDS],
}

impl History {
    /// The accepted bids, oldest first.
    pub fn bids(&self) -> &[BidId] {
        &self.ids[..self.len as usize]
    }

    /// Appends an accepted bid; returns its `seq`.
    pub fn push(&mut self, bid: BidId) -> u8 {
        // The model has at most MAX_BIDS bids and each is accepted at most once per node
        // unless a mutation breaks that; a full history then just stops growing, and the
        // property that the mutation breaks has already been violated.
        if (self.len as usize) < MAX_BIDS {
            self.ids[self.len as usize] = bid;
            self.len += 1;
        }
        self.next_seq() - 1
    }

    /// The stored outcome of `bid`: its `seq`, if it was accepted.
    pub fn seq_of(&self, bid: BidId) -> Option<u8> {
        self.bids()
            .iter()
            .position(|&b| b == bid)
            .map(|i| i as u8 + 2)
    }

    /// The leader: the last accepted bid.
    pub fn high(&self) -> Option<BidId> {
        self.bids().last().copied()
    }

    /// The `seq` the next judged event takes.
    pub fn next_seq(&self) -> u8 {
        self.len + 2
    }
}

/// A closed auction's `state`, `winner` (none without bids; the reserve is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Close {
    /// `winning_bid_id`.
    pub winner: Option<BidId>,
    /// The close's `seq`.
    pub seq: u8,
}

/// One node's copy of the auction's keys: the lock, the token counter and the state hash
/// (fence, state, high bid, seq) with its history and outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Data {
    /// `lock:auction:{ID}` (its expiry is a step of its own; see `Cluster::expire_lock`).
    pub lock: Option<LockValue>,
    /// `auction:{ID}:fence-counter` (the token counter).
    pub counter: Token,
    /// The hash's `fence`: the token of the last fenced write.
    pub fence: Token,
    /// History and outcomes (high bid and seq follow from it).
    pub history: History,
    /// `state = closed` and the close's fields.
    pub closed: Option<Close>,
    /// Ghost: who wrote `fence`.
    pub fence_writer: Writer,
    /// Ghost: the largest token handed out on this node's line of writes.
    pub issued: Token,
}

impl Data {
    /// An open auction with no bids, as `open.lua` leaves it.
    pub fn opened() -> Self {
        Self {
            lock: None,
            counter: 0,
            fence: 0,
            history: History::default(),
            closed: None,
            fence_writer: Writer::Opener,
            issued: 0,
        }
    }
}

/// The Redis nodes: a master and its replicas, with what each has received.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cluster {
    /// What every node has.
    pub base: Data,
    /// The data after each later write, oldest first; the master has all of it.
    pub log: Vec<Data>,
    /// Per node: how many entries of `log` it has.
    pub offsets: Vec<u8>,
    /// The node Sentinel names as master.
    pub master: NodeId,
    /// The master's generation: one more per failover (the link generation the servers'
    /// announcers compare).
    pub epoch: u8,
}

impl Cluster {
    /// `nodes` nodes holding `data`, node 0 the master.
    pub fn new(nodes: u8, data: Data) -> Self {
        Self {
            base: data,
            log: Vec::new(),
            offsets: vec![0; nodes as usize],
            master: 0,
            epoch: 0,
        }
    }

    /// Node `n`'s copy of the keys.
    pub fn node(&self, n: NodeId) -> &Data {
        match self.offsets[n as usize] {
            0 => &self.base,
            off => &self.log[off as usize - 1],
        }
    }

    /// The master's keys: what every script reads.
    pub fn data(&self) -> &Data {
        self.node(self.master)
    }

    /// The master's replication offset (relative to `base`).
    pub fn end(&self) -> u8 {
        self.log.len() as u8
    }

    /// A write on the master: its keys become `data`. Returns the write's offset.
    ///
    /// A write that leaves the keys as they were (the commit marker, which lives in a key of
    /// its own) adds no entry: a replica lacking only such writes holds the same data, so
    /// a `WAIT` for it or a failover to it cannot be told apart from one that has them.
    pub fn write(&mut self, data: Data) -> u8 {
        if data == *self.data() {
            return self.end();
        }
        self.log.push(data);
        self.offsets[self.master as usize] = self.end();
        self.end()
    }

    /// Replicas (not the master).
    pub fn replicas(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.offsets.len() as NodeId).filter(move |&n| n != self.master)
    }

    /// Whether replica `n` lacks some write.
    pub fn behind(&self, n: NodeId) -> bool {
        self.offsets[n as usize] < self.end()
    }

    /// Replica `n` receives the next write it lacks.
    pub fn replicate(&mut self, n: NodeId) {
        self.offsets[n as usize] += 1;
    }

    /// Whether some replica has every write up to `offset` (what `WAIT 1` waits for).
    pub fn acknowledged(&self, offset: u8) -> bool {
        self.replicas().any(|n| self.offsets[n as usize] >= offset)
    }

    /// Sentinel's choice: the replica with the largest offset (the most up to date; ties
    /// hold the same data, so the lowest number stands for them all).
    pub fn best_replica(&self) -> NodeId {
        let mut best = None;
        for n in self.replicas() {
            if best.is_none_or(|b: NodeId| self.offsets[n as usize] > self.offsets[b as usize]) {
                best = Some(n);
            }
        }
        best.unwrap_or(self.master)
    }

    /// The master dies and the best replica is promoted: every write it had not received
    /// is lost. The old master comes back as a replica of the new one, resynchronised
    /// (its lost writes discarded; `redis-start.sh` makes a returning master follow).
    pub fn failover(&mut self) {
        let promoted = self.best_replica();
        let kept = self.offsets[promoted as usize];
        self.log.truncate(kept as usize);
        self.offsets[self.master as usize] = kept;
        self.master = promoted;
        self.epoch += 1;
    }

    /// The clock passes the lease's expiry: Redis expires keys by absolute time, so every
    /// node's copy of the lock is gone at the same moment (a replica hides an expired key
    /// on reads, and the master's `DEL` follows).
    pub fn expire_lock(&mut self) {
        self.base.lock = None;
        for d in &mut self.log {
            d.lock = None;
        }
    }

    /// Folds what every node has into `base`; returns how many writes were folded, by which
    /// every offset held elsewhere (a server's last write, a `WAIT` target) must shrink.
    pub fn compact(&mut self) -> u8 {
        let done = self.offsets.iter().copied().min().unwrap_or(0);
        if done > 0 {
            self.base = self.log[done as usize - 1];
            self.log.drain(..done as usize);
            for off in &mut self.offsets {
                *off -= done;
            }
        }
        done
    }
}
