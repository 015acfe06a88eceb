//! How long a closed auction is kept ([`Retention`]), and taking auctions whose retention
//! ran out of the indexes ([`forget_expired`]). The close itself sets every key of the
//! auction to expire (`close.lua`); what is left here is the index entries, which do not
//! expire by themselves.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Script};

use crate::keyspace;

/// Takes closed auctions whose retention ran out out of the indexes (writes no auction).
static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("forget.lua")));

/// Shortest and longest time a closed auction is kept (`RETENTION`).
pub const RETENTION_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(365 * 24 * 3600));

/// How long a closed auction is kept after its close: a whole number of milliseconds within
/// [`RETENTION_RANGE`], checked when built (the close script checks it again, since an
/// expiry of zero would delete the auction on the spot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention(Duration);

/// A retention outside [`RETENTION_RANGE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "retention must be between {min} and {max}, got {got}",
    min = short(RETENTION_RANGE.0),
    max = short(RETENTION_RANGE.1),
    got = short(*got)
)]
pub struct InvalidRetention {
    /// The rejected value.
    pub got: Duration,
}

/// `d` the way operators write it: `7d`, `90s`, `1500ms`.
fn short(d: Duration) -> String {
    const DAY: u64 = 24 * 3600;
    match (d.as_secs(), d.subsec_nanos()) {
        (s, 0) if s > 0 && s % DAY == 0 => format!("{}d", s / DAY),
        (s, 0) => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}

impl Retention {
    /// `d`, if it lies within [`RETENTION_RANGE`] (sub-millisecond parts are dropped).
    pub fn new(d: Duration) -> Result<Self, InvalidRetention> {
        let (lo, hi) = RETENTION_RANGE;
        if d < lo || d > hi {
            return Err(InvalidRetention { got: d });
        }
        Ok(Self(Duration::from_millis(d.as_millis() as u64)))
    }

    /// The retention as a duration.
    pub fn duration(self) -> Duration {
        self.0
    }

    pub(super) fn millis(self) -> u64 {
        self.0.as_millis() as u64
    }
}

/// Takes up to `limit` closed auctions whose retention has run out (by Redis time) out of
/// `auctions:all` and `auctions:closed`; their keys have expired by themselves. Returns how
/// many; fewer than `limit` means none is left due. Idempotent: any server may call it.
pub async fn forget_expired<C: ConnectionLike + Send>(
    conn: &mut C,
    limit: usize,
) -> Result<usize, RedisError> {
    FORGET
        .key(keyspace::CLOSED_AUCTIONS)
        .key(keyspace::ALL_AUCTIONS)
        .arg(limit.max(1))
        .invoke_async(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_whole_ms_within_its_range_and_says_so_otherwise() {
        let ms = |r: Result<Retention, InvalidRetention>| r.map(|r| r.millis());
        assert_eq!(ms(Retention::new(Duration::from_secs(1))), Ok(1000));
        assert_eq!(
            ms(Retention::new(Duration::from_micros(1_500_999))),
            Ok(1500)
        );
        assert_eq!(
            ms(Retention::new(Duration::from_secs(365 * 24 * 3600))),
            Ok(365 * 24 * 3600 * 1000)
        );
        let err = Retention::new(Duration::from_millis(999)).expect_err("too short");
        assert_eq!(
            err.to_string(),
            "retention must be between 1s and 365d, got 999ms"
        );
        let err = Retention::new(Duration::from_secs(400 * 24 * 3600)).expect_err("too long");
        assert!(err.to_string().ends_with("got 400d"), "{err}");
    }
}
