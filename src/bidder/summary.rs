//! [`Summary`]: what a bidder did, for its caller (and its last log line).

/// What a bidder did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Bids published (first attempts).
    pub sent: u64,
    /// Re-publications of unanswered bids.
    pub retries: u64,
    /// Bids accepted.
    pub accepted: u64,
    /// Bids rejected.
    pub rejected: u64,
    /// Bids without an outcome when their auction closed.
    pub unconfirmed: u64,
    /// Closes seen: (auction, winner, amount).
    pub closed: Vec<(String, Option<String>, Option<u64>)>,
    /// `seq` gaps observed.
    pub gaps: u64,
}
