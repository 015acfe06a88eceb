//! The per-auction lease: a Redis lock with a fencing token.
//!
//! Acquire is `SET NX PX` with the value `OWNER#TOKEN`, where the token comes from a
//! per-auction counter that only grows. Renew and release are compare-and-set scripts, so a
//! holder can only extend or drop its own lease. The lease alone cannot stop a holder that
//! was paused past its expiry from writing; the fence can: every script that writes auction
//! state includes [`FENCE_PRELUDE`] and checks each auction it writes with it, refusing the
//! write inside Redis unless the caller's exact lock value is still current and its token
//! is not older than the last writer's. Renew and release take many leases per call (see
//! [`crate::server::lease_keeper`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script, Value};

use crate::keyspace::AuctionId;
use crate::link::script::Reply;

/// Lua prepended to every fenced write script (see the file for its key/arg convention).
pub const FENCE_PRELUDE: &str = include_str!("lock/fence.lua");

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[FENCE_PRELUDE, include_str!("lock/acquire.lua")].concat()));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lock/renew.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lock/release.lua")));

/// A held lease on one auction. Clones share one view of its validity, which renewals
/// (usually by the [`crate::server::lease_keeper`]) extend and a failed renewal ends.
#[derive(Clone, Debug)]
pub struct Lease {
    inner: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    auction: AuctionId,
    value: String,
    token: u64,
    ttl: Duration,
    valid_until: Mutex<Instant>,
    lost: AtomicBool,
    lost_notify: tokio::sync::Notify,
}

impl Lease {
    fn new(auction: AuctionId, value: String, token: u64, ttl: Duration, sent: Instant) -> Self {
        Self {
            inner: Arc::new(Held {
                auction,
                value,
                token,
                ttl,
                valid_until: Mutex::new(sent + ttl),
                lost: AtomicBool::new(false),
                lost_notify: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The auction this lease covers.
    pub fn auction(&self) -> &AuctionId {
        &self.inner.auction
    }

    /// The fencing token; strictly greater than every earlier holder's.
    pub fn token(&self) -> u64 {
        self.inner.token
    }

    /// The exact lock value (`OWNER#TOKEN`) the fence compares.
    pub fn value(&self) -> &str {
        &self.inner.value
    }

    /// The lease duration requested at each acquire or renew.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Conservative local view of validity: the lease was last confirmed at a time no later
    /// than when we sent the request, so it cannot outlive `sent + ttl` by Redis's clock
    /// (pod clocks tick at the same rate; only their offsets differ). Used to stop early;
    /// the fence is what actually protects the data.
    pub fn locally_valid(&self) -> bool {
        !self.is_lost() && Instant::now() < self.valid_until()
    }

    fn valid_until(&self) -> Instant {
        *self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A renewal sent at `sent` succeeded.
    fn renewed(&self, sent: Instant) {
        let mut until = self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *until = (*until).max(sent + self.inner.ttl);
    }

    /// True once a renewal found the lease gone (expired or taken over).
    pub fn is_lost(&self) -> bool {
        self.inner.lost.load(Ordering::Acquire)
    }

    /// Marks the lease lost and wakes [`Lease::lost`].
    pub fn mark_lost(&self) {
        self.inner.lost.store(true, Ordering::Release);
        self.inner.lost_notify.notify_one();
    }

    /// Resolves once the lease is known lost.
    pub async fn lost(&self) {
        while !self.is_lost() {
            self.inner.lost_notify.notified().await;
        }
    }
}

/// Result of trying to take a lease.
#[derive(Clone, Debug)]
pub enum Acquire {
    /// We hold it now.
    Acquired(Lease),
    /// Another owner holds it, for about this long.
    HeldElsewhere(Duration),
    /// The auction does not exist (and existence was required).
    UnknownAuction,
}

/// Acquisitions made by this process, numbered into every lock value it sets.
static ACQUISITIONS: AtomicU64 = AtomicU64::new(0);

/// Tries once to take the lease on `auction` for `owner`. With `must_exist`, an auction
/// that does not exist creates no keys at all (so bids for made-up ids cost no memory).
pub async fn acquire<C: ConnectionLike + Send>(
    conn: &mut C,
    auction: &AuctionId,
    owner: &str,
    ttl: Duration,
    must_exist: bool,
) -> RedisResult<Acquire> {
    // Every acquisition gets a value of its own, even when a failover lost both the token
    // counter and the fence and this process is handed a token it held before: a stale
    // lease of ours then differs from the new one and is refused by the fence.
    let owner = format!("{owner}.{}", ACQUISITIONS.fetch_add(1, Ordering::Relaxed));
    let sent = Instant::now();
    let reply: Vec<Value> = ACQUIRE
        .key(auction.state_key())
        .key(auction.lock_key())
        .key(auction.fence_key())
        .arg(&owner)
        .arg(ttl.as_millis() as u64)
        .arg(if must_exist { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    let reply = Reply::new("acquire", reply);
    Ok(match reply.tag()? {
        "acquired" => {
            let token = reply.int(1)?;
            Acquire::Acquired(Lease::new(
                auction.clone(),
                format!("{owner}#{token}"),
                token,
                ttl,
                sent,
            ))
        }
        "held" => Acquire::HeldElsewhere(Duration::from_millis(reply.int(1).unwrap_or(0))),
        "unknown" => Acquire::UnknownAuction,
        other => return Err(reply.unexpected(other)),
    })
}

/// Extends the lease if we still own it. Returns false when it was lost (and marks it so).
pub async fn renew<C: ConnectionLike + Send>(conn: &mut C, lease: &Lease) -> RedisResult<bool> {
    let ok = renew_many(conn, std::slice::from_ref(lease)).await?;
    Ok(ok.first().copied().unwrap_or(false))
}

/// Extends every lease still ours, in one script call; one answer each, in order. A lease
/// found gone is marked lost. The locks need not share a hash slot (one Redis, not a
/// cluster).
pub async fn renew_many<C: ConnectionLike + Send>(
    conn: &mut C,
    leases: &[Lease],
) -> RedisResult<Vec<bool>> {
    let sent = Instant::now();
    let oks = per_lease(conn, &RENEW, "renew", leases, |call, lease| {
        call.key(lease.auction().lock_key())
            .arg(lease.value())
            .arg(lease.ttl().as_millis() as u64);
    })
    .await?;
    for (lease, &ok) in leases.iter().zip(&oks) {
        if ok {
            lease.renewed(sent);
        } else {
            lease.mark_lost();
        }
    }
    Ok(oks)
}

/// Releases the lease if we still own it; a non-owner's release changes nothing.
pub async fn release<C: ConnectionLike + Send>(conn: &mut C, lease: &Lease) -> RedisResult<bool> {
    let ok = release_many(conn, std::slice::from_ref(lease)).await?;
    Ok(ok.first().copied().unwrap_or(false))
}

/// Releases every lease still ours, in one script call; one answer each, in order.
pub async fn release_many<C: ConnectionLike + Send>(
    conn: &mut C,
    leases: &[Lease],
) -> RedisResult<Vec<bool>> {
    per_lease(conn, &RELEASE, "release", leases, |call, lease| {
        call.key(lease.auction().lock_key()).arg(lease.value());
    })
    .await
}

/// Runs `script` once for all `leases` (`add` gives it each lease's keys and arguments);
/// one answer per lease, in order: whether the script answered 1 for it.
async fn per_lease<C: ConnectionLike + Send>(
    conn: &mut C,
    script: &Script,
    what: &str,
    leases: &[Lease],
    add: impl Fn(&mut redis::ScriptInvocation<'_>, &Lease),
) -> RedisResult<Vec<bool>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let mut call = script.prepare_invoke();
    for lease in leases {
        add(&mut call, lease);
    }
    let oks: Vec<i64> = call.invoke_async(conn).await?;
    if oks.len() != leases.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "a lease script answered the wrong number of results",
            format!("{what}: {} for {} leases", oks.len(), leases.len()),
        )));
    }
    Ok(oks.into_iter().map(|ok| ok == 1).collect())
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
