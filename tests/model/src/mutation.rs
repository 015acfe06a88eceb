//! Seeded mutations: each is a one-line change to the model, applied at exactly one place
//! (search for its variant name), that the checker must catch. They show the model has
//! teeth: if the checker stopped finding one, the property it breaks would have gone blind.

/// One deliberate defect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// `fence_ok` answers true: scripts write without checking the lock and the fence
    /// (`scripts::fence_ok`).
    DropFenceCheck,
    /// A judged outcome is published at once instead of being handed to the announcer
    /// (`system::Protocol::hand_over`).
    AnnounceBeforeWait,
    /// An `already` close, read without a write, is announced at once: the defect the
    /// commit marker fixed, where `WAIT` counted only the connection's own writes and so
    /// vouched for an answer read from another server's unreplicated close by nothing
    /// (`system::Protocol::step`, `Action::Close`).
    AlreadyWithoutWrite,
    /// A bid equal to the high bid is accepted (`scripts::place_bid`).
    AcceptEqualBid,
    /// A new token is one more than the counter, ignoring the fence
    /// (`scripts::next_token`).
    TokenFromCounterOnly,
    /// A refusal (`x|…`: closed, past the deadline, too low), which stores nothing, is not
    /// announced either, so its bidder retries for ever (`system::Protocol::step`,
    /// `Action::Judge`). Shows the liveness property has teeth.
    SilentRefusal,
}

impl Mutation {
    /// Every seeded mutation.
    pub const ALL: [Mutation; 6] = [
        Mutation::DropFenceCheck,
        Mutation::AnnounceBeforeWait,
        Mutation::AlreadyWithoutWrite,
        Mutation::AcceptEqualBid,
        Mutation::TokenFromCounterOnly,
        Mutation::SilentRefusal,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::DropFenceCheck => "drop_fence_check",
            Mutation::AnnounceBeforeWait => "announce_before_wait",
            Mutation::AlreadyWithoutWrite => "announce_already_without_write",
            Mutation::AcceptEqualBid => "accept_equal_bid",
            Mutation::TokenFromCounterOnly => "token_from_counter_only",
            Mutation::SilentRefusal => "silent_refusal",
        }
    }

    /// The property it must break.
    pub fn breaks(self) -> &'static str {
        use crate::properties::names;
        match self {
            Mutation::DropFenceCheck | Mutation::TokenFromCounterOnly => names::FENCE,
            Mutation::AnnounceBeforeWait | Mutation::AlreadyWithoutWrite => names::DURABLE,
            Mutation::AcceptEqualBid => names::WINNER,
            Mutation::SilentRefusal => names::OUTCOME,
        }
    }
}
