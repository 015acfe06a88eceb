//! The per-auction lease: a Redis lock with a fencing token.
//!
//! Acquire is `SET NX PX` with the value `OWNER#TOKEN`, where the token comes from a
//! per-auction counter that only grows. Renew and release are compare-and-set scripts, so a
//! holder can only extend or drop its own lease. The lease alone cannot stop a holder that
//! was paused past its expiry from writing; the fence can: every script that writes auction
//! state starts with [`FENCE_PRELUDE`], which refuses the write inside Redis unless the
//! caller's exact lock value is still current and its token is not older than the last
//! writer's.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script, Value};

use crate::keyspace::AuctionId;
use crate::script::Reply;

/// Lua prepended to every fenced write script (see the file for its key/arg convention).
pub const FENCE_PRELUDE: &str = include_str!("lock/fence.lua");

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lock/acquire.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lock/renew.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lock/release.lua")));

/// A held lease on one auction.
#[derive(Clone, Debug)]
pub struct Lease {
    auction: AuctionId,
    value: String,
    token: u64,
    ttl: Duration,
    valid_until: Instant,
}

impl Lease {
    /// The auction this lease covers.
    pub fn auction(&self) -> &AuctionId {
        &self.auction
    }

    /// The fencing token; strictly greater than every earlier holder's.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The exact lock value (`OWNER#TOKEN`) the fence compares.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The lease duration requested at each acquire or renew.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Conservative local view of validity: the lease was last confirmed at a time no later
    /// than when we sent the request, so it cannot outlive `sent + ttl` by Redis's clock
    /// (pod clocks tick at the same rate; only their offsets differ). Used to stop early;
    /// the fence is what actually protects the data.
    pub fn locally_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// Result of trying to take a lease.
#[derive(Clone, Debug)]
pub enum Acquire {
    /// We hold it now.
    Acquired(Lease),
    /// Someone else holds it for about this long.
    Held(Duration),
    /// The auction does not exist (and existence was required).
    UnknownAuction,
}

/// Tries once to take the lease on `auction` for `owner`. With `must_exist`, an auction
/// that does not exist creates no keys at all (so bids for made-up ids cost no memory).
pub async fn acquire<C: ConnectionLike + Send>(
    conn: &mut C,
    auction: &AuctionId,
    owner: &str,
    ttl: Duration,
    must_exist: bool,
) -> RedisResult<Acquire> {
    let sent = Instant::now();
    let reply: Vec<Value> = ACQUIRE
        .key(auction.state_key())
        .key(auction.lock_key())
        .key(auction.fence_key())
        .arg(owner)
        .arg(ttl.as_millis() as u64)
        .arg(if must_exist { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    let reply = Reply::new("acquire", reply);
    Ok(match reply.tag()? {
        "acquired" => {
            let token = reply.int(1)?;
            Acquire::Acquired(Lease {
                auction: auction.clone(),
                value: format!("{owner}#{token}"),
                token,
                ttl,
                valid_until: sent + ttl,
            })
        }
        "held" => Acquire::Held(Duration::from_millis(reply.int(1).unwrap_or(0))),
        "unknown" => Acquire::UnknownAuction,
        other => return Err(reply.unexpected(other)),
    })
}

/// Extends the lease if we still own it. Returns false when it was lost.
pub async fn renew<C: ConnectionLike + Send>(conn: &mut C, lease: &mut Lease) -> RedisResult<bool> {
    let sent = Instant::now();
    let ok: i64 = RENEW
        .key(lease.auction.lock_key())
        .arg(&lease.value)
        .arg(lease.ttl.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    if ok == 1 {
        lease.valid_until = sent + lease.ttl;
    }
    Ok(ok == 1)
}

/// Releases the lease if we still own it; a non-owner's release changes nothing.
pub async fn release<C: ConnectionLike + Send>(conn: &mut C, lease: &Lease) -> RedisResult<bool> {
    let ok: i64 = RELEASE
        .key(lease.auction.lock_key())
        .arg(&lease.value)
        .invoke_async(conn)
        .await?;
    Ok(ok == 1)
}

/// A process-unique lock owner id: host, pid and a random suffix, so two incarnations of a
/// pod never share an identity.
pub fn owner_id(host: &str) -> String {
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(48)
        .collect();
    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}
