//! The fenced lease and the auction scripts, on a real Redis master (no mocks).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use auction::keyspace::AuctionId;
use auction::store::ledger::{
    self, AuctionSpec, CloseAs, CloseMode, Closed, LedgerError, Listed, Retention,
};
use auction::store::lock::{self, Acquire, Lease};
use auction::wire::{Bid, Event, RejectReason};
use auction_testkit::{DevStack, DevStackConfig, eventually};
use redis::aio::MultiplexedConnection;
use support::master_conn;

/// One Redis node and one Sentinel are enough for script semantics.
async fn single() -> DevStack {
    DevStack::start(DevStackConfig {
        replicas: 0,
        sentinels: 1,
        quorum: 1,
        min_replicas_to_write: 0,
        ..DevStackConfig::default()
    })
    .await
    .expect("start redis")
}

fn spec() -> AuctionSpec {
    AuctionSpec {
        item: "lamp".into(),
        duration: Duration::from_secs(60),
        starting_price: 100,
        min_increment: 10,
        reserve_price: 0,
        soft_close: Duration::ZERO,
    }
}

/// The default retention (`RETENTION`), for tests that do not wait for it.
fn week() -> Retention {
    Retention::new(Duration::from_secs(7 * 24 * 3600)).expect("a valid retention")
}

fn bid(id: &AuctionId, bid_id: &str, bidder: &str, amount: u64) -> Bid {
    support::plain_bid(id, bid_id, bidder, amount)
}

async fn take(
    conn: &mut MultiplexedConnection,
    id: &AuctionId,
    owner: &str,
    ttl: Duration,
    must_exist: bool,
) -> Lease {
    match lock::acquire(conn, id, owner, ttl, must_exist)
        .await
        .expect("acquire")
    {
        Acquire::Acquired(l) => l,
        other => panic!("{owner} expected to acquire, got {other:?}"),
    }
}

/// Polls until the lock key is gone (the lease expired), bounded.
async fn wait_expired(conn: &MultiplexedConnection, id: &AuctionId) {
    eventually("the lease to expire", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(id.lock_key())
                .query_async(&mut conn)
                .await
                .expect("PTTL");
            if pttl == -2 {
                Ok(())
            } else {
                Err(format!("pttl {pttl}"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test]
async fn contenders_never_both_hold_the_lease_and_tokens_only_grow() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    let id = AuctionId::parse("contended").expect("id");
    let a = take(&mut conn, &id, "a", Duration::from_secs(10), false).await;
    match lock::acquire(&mut conn, &id, "b", Duration::from_secs(10), false)
        .await
        .expect("acquire")
    {
        Acquire::HeldElsewhere(ttl) => assert!(ttl > Duration::from_secs(5)),
        other => panic!("b must not acquire while a holds it: {other:?}"),
    }
    assert!(lock::release(&mut conn, &a).await.expect("release"));
    let b = take(&mut conn, &id, "b", Duration::from_secs(10), false).await;
    assert!(b.token() > a.token(), "tokens only grow");
    assert!(lock::release(&mut conn, &b).await.expect("release"));

    // Many tasks race for the lease; each holder checks it is alone while it holds it.
    let holders = Arc::new(AtomicU64::new(0));
    let max_seen = Arc::new(AtomicU64::new(0));
    let acquired = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (mut conn, id) = (conn.clone(), id.clone());
        let (holders, max_seen, acquired) = (holders.clone(), max_seen.clone(), acquired.clone());
        tasks.push(tokio::spawn(async move {
            let mut last_token = 0;
            for _ in 0..60 {
                if let Acquire::Acquired(lease) = lock::acquire(
                    &mut conn,
                    &id,
                    &format!("t{t}"),
                    Duration::from_secs(5),
                    false,
                )
                .await
                .expect("acquire")
                {
                    assert!(lease.token() > last_token);
                    last_token = lease.token();
                    let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                    max_seen.fetch_max(now, Ordering::SeqCst);
                    acquired.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    holders.fetch_sub(1, Ordering::SeqCst);
                    assert!(lock::release(&mut conn, &lease).await.expect("release"));
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        max_seen.load(Ordering::SeqCst),
        1,
        "two contenders held the lease at once"
    );
    assert!(
        acquired.load(Ordering::SeqCst) > 8,
        "the lease changed hands many times"
    );
}

#[tokio::test]
async fn a_holder_whose_lease_expired_cannot_write_and_cannot_release_the_new_lease() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    let id = AuctionId::parse("expiring").expect("id");
    let old = take(&mut conn, &id, "old", Duration::from_secs(10), false).await;
    ledger::open(&mut conn, &old, &spec())
        .await
        .expect("open")
        .expect("opened");
    // Simulate a pause past the lease: expire it now rather than sleeping for it.
    let _: () = redis::cmd("PEXPIRE")
        .arg(id.lock_key())
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("PEXPIRE");
    wait_expired(&conn, &id).await;

    // Nobody holds it: the old holder's write is still refused inside Redis.
    let r = ledger::place_bids(&mut conn, &old, &[bid(&id, "x1", "old", 500)]).await;
    assert!(
        matches!(r, Err(LedgerError::Fenced)),
        "expired holder wrote: {r:?}"
    );

    let new = take(&mut conn, &id, "new", Duration::from_secs(10), true).await;
    assert!(new.token() > old.token());
    for attempt in [
        ledger::place_bids(&mut conn, &old, &[bid(&id, "x2", "old", 600)])
            .await
            .map(|_| ()),
        ledger::close(&mut conn, &old, CloseMode::Forced, week())
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(attempt, Err(LedgerError::Fenced)),
            "stale holder wrote: {attempt:?}"
        );
    }
    assert!(
        !lock::release(&mut conn, &old).await.expect("release"),
        "non-owner release reports false"
    );
    let value: Option<String> = redis::cmd("GET")
        .arg(id.lock_key())
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(
        value.as_deref(),
        Some(new.value()),
        "non-owner release changed nothing"
    );
    let stale = old.clone();
    assert!(
        !lock::renew(&mut conn, &stale).await.expect("renew"),
        "non-owner renew fails"
    );

    let rec = ledger::get(&mut conn, &id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(rec.bid_count, 0, "no stale write landed");
    assert_eq!(
        rec.fence,
        old.token(),
        "only the opener's token wrote so far"
    );
    let judged = ledger::place_bids(&mut conn, &new, &[bid(&id, "n1", "new", 500)])
        .await
        .expect("new holder writes");
    assert!(matches!(judged[0].event, Event::BidAccepted { .. }));
    assert_eq!(
        ledger::get(&mut conn, &id)
            .await
            .expect("get")
            .expect("exists")
            .fence,
        new.token()
    );
}

#[tokio::test]
async fn bids_are_judged_in_order_with_reasons_and_duplicates_return_the_first_outcome() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    let id = AuctionId::parse("judged").expect("id");
    let lease = take(&mut conn, &id, "s", Duration::from_secs(30), false).await;
    let opened = ledger::open(&mut conn, &lease, &spec())
        .await
        .expect("open")
        .expect("new");
    assert!(matches!(opened, Event::AuctionOpened { seq: 1, .. }));
    assert!(
        ledger::open(&mut conn, &lease, &spec())
            .await
            .expect("open again")
            .is_none(),
        "open is once"
    );

    let bids = [
        bid(&id, "b1", "ann", 99),  // below starting price
        bid(&id, "b2", "ann", 100), // accepted (first bid at the starting price)
        bid(&id, "b3", "bob", 100), // equal to high: earlier wins
        bid(&id, "b4", "bob", 105), // above high but below the increment
        bid(&id, "b5", "bob", 50),  // below high
        bid(&id, "b6", "bob", 110), // accepted
        bid(&id, "b2", "ann", 999), // duplicate of b2 (different amount): first outcome, no change
    ];
    let judged = ledger::place_bids(&mut conn, &lease, &bids)
        .await
        .expect("judge");
    let reason = |e: &Event| match e {
        Event::BidRejected { reason, .. } => Some(*reason),
        _ => None,
    };
    assert_eq!(reason(&judged[0].event), Some(RejectReason::TooLow));
    assert!(matches!(
        judged[1].event,
        Event::BidAccepted {
            amount: 100,
            seq: 2,
            next_min: 110,
            ..
        }
    ));
    assert_eq!(reason(&judged[2].event), Some(RejectReason::EqualToHigh));
    assert_eq!(
        reason(&judged[3].event),
        Some(RejectReason::BelowMinIncrement)
    );
    assert_eq!(reason(&judged[4].event), Some(RejectReason::TooLow));
    assert!(matches!(
        judged[5].event,
        Event::BidAccepted {
            amount: 110,
            seq: 3,
            ..
        }
    ));
    assert_eq!(
        judged[6].event, judged[1].event,
        "a duplicate returns its first outcome"
    );
    assert!(!judged[6].fresh && judged[1].fresh);
    let seqs: Vec<u64> = judged[..6].iter().filter_map(|j| j.event.seq()).collect();
    assert_eq!(
        seqs,
        vec![2, 3],
        "accepted bids take the next seq; price refusals store nothing and take none"
    );
    let next_mins: Vec<Option<u64>> = [0, 2, 3, 4]
        .iter()
        .map(|&i| match &judged[i].event {
            Event::BidRejected { next_min, .. } => *next_min,
            _ => None,
        })
        .collect();
    assert_eq!(
        next_mins,
        [Some(100), Some(110), Some(110), Some(110)],
        "a price refusal says what the next bid must reach"
    );
    let stored: Vec<String> = redis::cmd("HKEYS")
        .arg(id.outcomes_key())
        .query_async(&mut conn)
        .await
        .expect("HKEYS");
    assert_eq!(
        stored.len(),
        2,
        "only the accepted bids' outcomes are stored: {stored:?}"
    );

    let rec = ledger::get(&mut conn, &id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(rec.high, Some((110, "bob".into(), "b6".into())));
    assert_eq!((rec.bid_count, rec.seq), (2, 3));
    let history = ledger::history(&mut conn, &id, "-", 100)
        .await
        .expect("history");
    assert_eq!(
        history
            .iter()
            .map(|(_, h)| h.bid_id.as_str())
            .collect::<Vec<_>>(),
        vec!["b2", "b6"]
    );

    // Not due yet: the deadline is judged by Redis TIME, 60 s away.
    assert!(matches!(
        ledger::close(&mut conn, &lease, CloseMode::Due, week())
            .await
            .expect("close"),
        Closed::NotDue(_)
    ));
    let Closed::ByUs(closed) = ledger::close(&mut conn, &lease, CloseMode::Forced, week())
        .await
        .expect("close")
    else {
        panic!("first close closes");
    };
    assert!(
        matches!(&closed, Event::AuctionClosed { winner: Some(w), amount: Some(110), seq: 4, bid_count: 2, .. } if w == "bob")
    );
    let Closed::Already(again) = ledger::close(&mut conn, &lease, CloseMode::Forced, week())
        .await
        .expect("close")
    else {
        panic!("second close reports the first");
    };
    assert_eq!(
        again, closed,
        "exactly once: a second close repeats the first"
    );
    let late = ledger::place_bids(
        &mut conn,
        &lease,
        &[bid(&id, "late", "cy", 5000), bid(&id, "b6", "bob", 110)],
    )
    .await
    .expect("judge");
    assert_eq!(reason(&late[0].event), Some(RejectReason::AuctionClosed));
    assert_eq!(
        late[0].event.seq(),
        None,
        "refusals after close are not part of history"
    );
    assert!(
        matches!(late[1].event, Event::BidAccepted { seq: 3, .. }),
        "a retry after close still gets its first outcome"
    );
    let open: Vec<String> = redis::cmd("ZRANGE")
        .arg("auctions:open")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("ZRANGE");
    assert!(open.is_empty(), "closed auctions leave the closer's list");
}

#[tokio::test]
async fn the_deadline_is_judged_by_redis_time_and_the_reserve_decides_the_winner() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    let id = AuctionId::parse("reserve").expect("id");
    let lease = take(&mut conn, &id, "s", Duration::from_secs(30), false).await;
    let spec = AuctionSpec {
        duration: Duration::from_secs(1),
        reserve_price: 1000,
        ..spec()
    };
    let Event::AuctionOpened { deadline_ms, .. } = ledger::open(&mut conn, &lease, &spec)
        .await
        .expect("open")
        .expect("new")
    else {
        panic!("opened")
    };
    ledger::place_bids(&mut conn, &lease, &[bid(&id, "r1", "ann", 500)])
        .await
        .expect("bid");
    // Wait until Redis's own clock passes the deadline (the only clock that counts).
    eventually(
        "Redis time to reach the deadline",
        Duration::from_secs(5),
        || {
            let mut conn = conn.clone();
            async move {
                let now = auction::server::closer::redis_now_ms(&mut conn)
                    .await
                    .expect("TIME");
                if now >= deadline_ms {
                    Ok(())
                } else {
                    Err(format!("Redis time {now} ms, deadline {deadline_ms} ms"))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let late = ledger::place_bids(&mut conn, &lease, &[bid(&id, "r2", "bob", 5000)])
        .await
        .expect("bid");
    assert!(
        matches!(
            late[0].event,
            Event::BidRejected {
                reason: RejectReason::DeadlinePassed,
                seq: None,
                ..
            }
        ),
        "a bid after the deadline is rejected even before the close runs: {:?}",
        late[0].event
    );
    let Closed::ByUs(closed) = ledger::close(&mut conn, &lease, CloseMode::Due, week())
        .await
        .expect("close")
    else {
        panic!("due now");
    };
    assert!(
        matches!(
            closed,
            Event::AuctionClosed {
                winner: None,
                amount: None,
                bid_count: 1,
                ..
            }
        ),
        "the high bid is under the reserve: no winner ({closed:?})"
    );
}

#[tokio::test]
async fn bids_for_unknown_auctions_create_no_keys() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    let id = AuctionId::parse("ghost").expect("id");
    let r = lock::acquire(&mut conn, &id, "s", Duration::from_secs(5), true)
        .await
        .expect("acquire");
    assert!(matches!(r, Acquire::UnknownAuction));
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn batched_renewals_releases_and_closes_answer_each_auction_under_its_own_lease() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    let ttl = Duration::from_secs(10);
    let ids: Vec<AuctionId> = ["held-by-us", "free", "held-by-other"]
        .iter()
        .map(|s| AuctionId::parse(s).expect("id"))
        .collect();
    let mut leases = Vec::new();
    for id in &ids {
        let lease = take(&mut conn, id, "us", ttl, false).await;
        ledger::open(&mut conn, &lease, &spec())
            .await
            .expect("open")
            .expect("opened");
        leases.push(lease);
    }
    let (ours, freed, given) = (&leases[0], &leases[1], &leases[2]);
    assert_eq!(
        lock::release_many(&mut conn, &[freed.clone(), given.clone()])
            .await
            .expect("release"),
        vec![true, true]
    );
    let other = take(&mut conn, &ids[2], "other", ttl, true).await;

    // One call renews what is still ours and marks the rest lost, waking whoever waits.
    assert_eq!(
        lock::renew_many(&mut conn, &[ours.clone(), freed.clone()])
            .await
            .expect("renew"),
        vec![true, false]
    );
    assert!(ours.locally_valid() && !freed.locally_valid());
    tokio::time::timeout(Duration::from_secs(1), freed.lost())
        .await
        .expect("a lease found gone resolves lost()");

    // One call closes: ours under our lease, the free one under a lease taken for the
    // call, and leaves the one another server holds to it.
    let results = ledger::close_many(
        &mut conn,
        &[
            (CloseAs::Holder(ours.clone()), CloseMode::Forced),
            (CloseAs::Free(ids[1].clone()), CloseMode::Forced),
            (CloseAs::Free(ids[2].clone()), CloseMode::Forced),
        ],
        week(),
    )
    .await
    .expect("close_many");
    assert!(
        matches!(results[0], Ok(Closed::ByUs(_))),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(results[1], Ok(Closed::ByUs(_))),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Ok(Closed::HeldElsewhere(d)) if d > Duration::ZERO),
        "{:?}",
        results[2]
    );
    let free_rec = ledger::get(&mut conn, &ids[1])
        .await
        .expect("get")
        .expect("exists");
    assert!(!free_rec.open);
    assert!(
        free_rec.fence > freed.token(),
        "a close under a free lease takes a fresh token ({} after {})",
        free_rec.fence,
        freed.token()
    );
    // The earlier holder is fenced out, and the next lease starts above the close's token.
    let late = ledger::place_bids(&mut conn, freed, &[bid(&ids[1], "late", "x", 900)]).await;
    assert!(matches!(late, Err(LedgerError::Fenced)), "{late:?}");
    let next = take(&mut conn, &ids[1], "us", ttl, true).await;
    assert!(next.token() > free_rec.fence);
    // The other server's auction is untouched and still its own.
    assert!(
        ledger::get(&mut conn, &ids[2])
            .await
            .expect("get")
            .expect("exists")
            .open
    );
    assert!(lock::renew(&mut conn, &other).await.expect("renew"));
}

/// A new auction `name` (the `spec()` one) opened under a lease of 30 s held by "s".
async fn opened(conn: &mut MultiplexedConnection, name: &str) -> (AuctionId, Lease) {
    let id = AuctionId::parse(name).expect("id");
    let lease = take(conn, &id, "s", Duration::from_secs(30), false).await;
    ledger::open(conn, &lease, &spec())
        .await
        .expect("open")
        .expect("new");
    (id, lease)
}

/// PTTL of `key` in ms (-2: gone, -1: no expiry).
async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(conn)
        .await
        .expect("PTTL")
}

async fn members(conn: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .expect("ZRANGE")
}

#[tokio::test]
async fn a_closed_auction_is_kept_for_its_retention_then_forgotten_everywhere() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let stack = single().await;
        let mut conn = master_conn(&stack).await;
        let retention = Retention::new(Duration::from_secs(2)).expect("retention");
        let (id, lease) = opened(&mut conn, "kept").await;
        let b1 = bid(&id, "b1", "ann", 100);
        ledger::place_bids(&mut conn, &lease, std::slice::from_ref(&b1))
            .await
            .expect("judge");
        // Another auction stays open, and listed, throughout.
        opened(&mut conn, "still-open").await;
        for key in [
            id.state_key(),
            id.bids_key(),
            id.outcomes_key(),
            id.fence_key(),
        ] {
            assert_eq!(
                pttl(&mut conn, &key).await,
                -1,
                "{key} has no expiry while open"
            );
        }

        let Closed::ByUs(Event::AuctionClosed { closed_at_ms, .. }) =
            ledger::close(&mut conn, &lease, CloseMode::Forced, retention)
                .await
                .expect("close")
        else {
            panic!("the close closes");
        };
        // Every key of the auction expires with its retention; the lock with its lease.
        for key in [
            id.state_key(),
            id.bids_key(),
            id.outcomes_key(),
            id.fence_key(),
        ] {
            let ttl = pttl(&mut conn, &key).await;
            assert!(
                (1..=2000).contains(&ttl),
                "{key} expires with the retention: {ttl}"
            );
        }
        let expires: u64 = redis::cmd("ZSCORE")
            .arg("auctions:closed")
            .arg(id.as_str())
            .query_async(&mut conn)
            .await
            .expect("ZSCORE");
        assert_eq!(
            expires,
            closed_at_ms + 2000,
            "recorded for the sweeper at its expiry"
        );
        // A second close changes nothing, its retention included.
        let again = ledger::close(&mut conn, &lease, CloseMode::Forced, week())
            .await
            .expect("close");
        assert!(matches!(again, Closed::Already(_)), "{again:?}");
        assert!(pttl(&mut conn, &id.state_key()).await <= 2000);
        // A server taking the closed auction's lease (a late bid) keeps the counter's expiry.
        assert!(lock::release(&mut conn, &lease).await.expect("release"));
        let late_holder = take(&mut conn, &id, "t", Duration::from_secs(30), true).await;
        let ttl = pttl(&mut conn, &id.fence_key()).await;
        assert!(
            (1..=2000).contains(&ttl),
            "the counter keeps its expiry: {ttl}"
        );
        // Not due yet: nothing is forgotten.
        assert_eq!(
            ledger::forget_expired(&mut conn, 100)
                .await
                .expect("forget"),
            0
        );

        eventually(
            "the closed auction's keys to expire",
            Duration::from_secs(10),
            || {
                let mut conn = conn.clone();
                let keys = [
                    id.state_key(),
                    id.bids_key(),
                    id.outcomes_key(),
                    id.fence_key(),
                ];
                async move {
                    let n: u64 = redis::cmd("EXISTS")
                        .arg(&keys[..])
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        Ok(())
                    } else {
                        Err(format!("{n} keys left"))
                    }
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(ledger::get(&mut conn, &id).await.expect("get").is_none());
        // A late retry of its bid: the auction is unknown now, and nothing is re-created.
        let late = ledger::place_bids(&mut conn, &late_holder, &[b1])
            .await
            .expect("judge");
        assert!(
            matches!(
                late[0].event,
                Event::BidRejected {
                    reason: RejectReason::UnknownAuction,
                    ..
                }
            ),
            "{:?}",
            late[0].event
        );
        assert!(ledger::get(&mut conn, &id).await.expect("get").is_none());

        // The sweep takes it out of every index, once.
        assert_eq!(
            members(&mut conn, "auctions:all").await,
            vec!["kept", "still-open"]
        );
        assert_eq!(
            ledger::forget_expired(&mut conn, 100)
                .await
                .expect("forget"),
            1
        );
        assert_eq!(
            ledger::forget_expired(&mut conn, 100)
                .await
                .expect("forget again"),
            0
        );
        assert_eq!(members(&mut conn, "auctions:all").await, vec!["still-open"]);
        assert!(members(&mut conn, "auctions:closed").await.is_empty());
        assert_eq!(
            members(&mut conn, "auctions:open").await,
            vec!["still-open"]
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn an_id_opened_again_after_its_retention_is_not_swept_out_with_its_old_entry() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let stack = single().await;
        let mut conn = master_conn(&stack).await;
        let retention = Retention::new(Duration::from_secs(1)).expect("retention");
        let (id, lease) = opened(&mut conn, "again").await;
        ledger::close(&mut conn, &lease, CloseMode::Forced, retention)
            .await
            .expect("close");
        eventually(
            "the closed auction to expire",
            Duration::from_secs(10),
            || {
                let mut conn = conn.clone();
                let id = id.clone();
                async move {
                    match ledger::get(&mut conn, &id)
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        None => Ok(()),
                        Some(_) => Err("still there".to_owned()),
                    }
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        // Opened again before any sweep ran: the old entry must not take the new one out.
        ledger::open(&mut conn, &lease, &spec())
            .await
            .expect("open")
            .expect("new again");
        assert_eq!(
            ledger::forget_expired(&mut conn, 100)
                .await
                .expect("forget"),
            0
        );
        assert_eq!(members(&mut conn, "auctions:all").await, vec!["again"]);
        assert!(
            ledger::get(&mut conn, &id)
                .await
                .expect("get")
                .expect("exists")
                .open
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn listing_pages_by_value_so_removals_and_ties_neither_skip_nor_repeat() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    // Three auctions opened in the same millisecond, one later.
    let _: u64 = redis::cmd("ZADD")
        .arg("auctions:all")
        .arg(&["5", "a", "5", "b", "5", "c", "6", "d"][..])
        .query_async(&mut conn)
        .await
        .expect("ZADD");
    let ids = |page: Vec<Listed>| {
        page.into_iter()
            .map(|l| l.id.to_string())
            .collect::<Vec<_>>()
    };
    let first = ledger::list_ids(&mut conn, None, 2).await.expect("list");
    let after_b = first.last().cloned().expect("a page");
    assert_eq!(ids(first), vec!["a", "b"]);
    // The sweeper takes an entry before the cursor out: the next page does not shift.
    let _: u64 = redis::cmd("ZREM")
        .arg("auctions:all")
        .arg("a")
        .query_async(&mut conn)
        .await
        .expect("ZREM");
    assert_eq!(
        ids(ledger::list_ids(&mut conn, Some(&after_b), 2)
            .await
            .expect("list")),
        vec!["c", "d"]
    );
    // Ties at the cursor are stepped over a page at a time.
    let after_c = Listed {
        opened_ms: 5,
        id: AuctionId::parse("c").expect("id"),
    };
    assert_eq!(
        ids(ledger::list_ids(&mut conn, Some(&after_c), 1)
            .await
            .expect("list")),
        vec!["d"]
    );
    let after_d = Listed {
        opened_ms: 6,
        id: AuctionId::parse("d").expect("id"),
    };
    assert!(
        ledger::list_ids(&mut conn, Some(&after_d), 1)
            .await
            .expect("list")
            .is_empty()
    );
    // A cursor far beyond every entry is just the end.
    let beyond = Listed {
        opened_ms: u64::MAX,
        id: AuctionId::parse("z").expect("id"),
    };
    assert!(
        ledger::list_ids(&mut conn, Some(&beyond), 10)
            .await
            .expect("list")
            .is_empty()
    );
}

/// Issue 16, defect 1: `WAIT` counts only the calling connection's own writes. A server that
/// reads another server's close (`already`) or answers a batch of pure duplicates writes
/// nothing, so a bare `WAIT 1` on its connection returns at once even though no replica has
/// the close or the first outcome: the announcer must not vouch for them until a write of
/// its own connection, made after they were read, reached a replica.
#[tokio::test]
async fn answers_read_but_not_written_are_announced_only_once_a_replica_has_them() {
    use auction::link::sentinel::{Master, Settings};
    use auction::runtime::config::RedisArgs;
    use auction::runtime::metrics::Metrics;
    use auction::server::announcer::{Announcer, EventChannel, NotAnnounced};

    let stack = DevStack::start(DevStackConfig {
        sentinels: 1,
        quorum: 1,
        // Writes must go through while the replicas are stopped; only WAIT may tell.
        min_replicas_to_write: 0,
        // Sentinel must not start a failover while the replicas are stopped.
        down_after: Duration::from_secs(30),
        ..DevStackConfig::default()
    })
    .await
    .expect("start redis");
    let master = Master::start(Settings::from_args(
        &RedisArgs::local(&stack.sentinel_addrs()).expect("args"),
    ));
    let link = master
        .link(Duration::from_secs(10))
        .await
        .expect("a master link");
    let (announcer, _task) = Announcer::start(
        master.clone(),
        EventChannel {
            name: "notificacao-leilao".into(),
            seed_dialect: false,
        },
        1,
        Duration::from_millis(300),
        Arc::new(Metrics::new()),
    );
    // "C": another server, on its own connection. "D": the server of this announcer; it
    // reads the answers on a connection of its own too. On Redis 7.2 (the deployed image) a
    // read does not move a connection's `WAIT` offset, so reading on the announcer's
    // connection is the same case; Redis 7.0 (these tests) moves it on every command, read
    // or not, which would hide the defect here. Either way the announcer's connection has
    // written nothing since C's writes: a bare `WAIT 1` returns at once.
    let mut other = master_conn(&stack).await;
    let mut ours = master_conn(&stack).await;
    let (id, lease) = opened(&mut other, "read-not-written").await;
    let b = bid(&id, "b-1", "alice", 100);
    let up_to_date = announcer.flush(link.generation).await;
    assert_eq!(
        up_to_date,
        Ok(()),
        "with live replicas the group commit succeeds"
    );
    // The announcer's connection last moved its offset during that flush; let every
    // replica acknowledge past it (they do once a second), so the stop below is what
    // makes them lag, not a late acknowledgement.
    let offset = info_number(&mut other, "replication", "master_repl_offset").await;
    eventually(
        "every replica to acknowledge the flush",
        Duration::from_secs(10),
        || {
            let mut other = other.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut other)
                    .await
                    .map_err(|e| e.to_string())?;
                let acked: Vec<u64> = info
                    .lines()
                    .filter(|l| l.starts_with("slave"))
                    .filter_map(|l| l.split("offset=").nth(1))
                    .filter_map(|o| o.split(',').next()?.parse().ok())
                    .collect();
                if acked.len() == 2 && acked.iter().all(|a| *a >= offset) {
                    Ok(())
                } else {
                    Err(format!(
                        "replicas acknowledged {acked:?}, master was at {offset}"
                    ))
                }
            }
        },
    )
    .await
    .expect("replicas caught up");

    let paused = stack.pause_replicas().await.expect("pause the replicas");
    // C stores the first outcome; no replica gets it.
    let first = ledger::place_bids(&mut other, &lease, std::slice::from_ref(&b))
        .await
        .expect("place");
    // D sees the retry: a duplicate, answered without a write.
    let again = ledger::place_bids(&mut ours, &lease, std::slice::from_ref(&b))
        .await
        .expect("place the retry");
    assert!(
        again.len() == 1 && !again[0].fresh && again[0].event == first[0].event,
        "the retry gets the stored outcome"
    );
    let events: Vec<Event> = again.into_iter().map(|j| j.event).collect();
    let duplicate = announcer
        .announce_and_wait(link.generation, events.clone())
        .await;
    assert!(
        matches!(duplicate, Err(NotAnnounced::Shortfall { acked: 0, .. })),
        "a duplicate's stored outcome no replica has must not be announced: {duplicate:?}"
    );

    // C closes the auction; no replica gets the close. D's close answers `already`.
    let Closed::ByUs(closed) = ledger::close(&mut other, &lease, CloseMode::Forced, week())
        .await
        .expect("close")
    else {
        panic!("C's close closes");
    };
    let Closed::Already(seen) = ledger::close(&mut ours, &lease, CloseMode::Forced, week())
        .await
        .expect("close again")
    else {
        panic!("D's close answers already");
    };
    assert_eq!(seen, closed);
    let already = announcer
        .announce_and_wait(link.generation, vec![seen.clone()])
        .await;
    assert!(
        matches!(already, Err(NotAnnounced::Shortfall { acked: 0, .. })),
        "a close no replica has must not be announced as durable: {already:?}"
    );

    // Once the replicas catch up, the same answers are announced.
    drop(paused);
    eventually("the close to be announced", Duration::from_secs(10), || {
        let (announcer, seen) = (announcer.clone(), seen.clone());
        async move {
            announcer
                .announce_and_wait(link.generation, vec![seen])
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await
    .expect("announced once a replica has the close");
}

/// A number from `INFO section`.
async fn info_number(conn: &mut MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .expect("INFO");
    auction_testkit::info_field(&info, field)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has no number {field}"))
}

/// A failover that loses the lock, the token counter and the fence (none had reached the
/// promoted replica) can hand the same process the same token again; its old lease must
/// still be refused, since a paused worker of this process may hold it.
#[tokio::test]
async fn a_token_handed_out_again_after_a_lost_counter_does_not_revive_an_old_lease() {
    let stack = single().await;
    let mut conn = master_conn(&stack).await;
    let id = AuctionId::parse("reissued").expect("id");
    let old = take(&mut conn, &id, "s", Duration::from_secs(30), false).await;
    ledger::open(&mut conn, &old, &spec())
        .await
        .expect("open")
        .expect("new");
    // What a promoted replica that had none of the lease's writes would hold.
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(id.lock_key())
        .arg(id.fence_key())
        .ignore()
        .cmd("HDEL")
        .arg(id.state_key())
        .arg("fence")
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("forget the lease, the counter and the fence");
    let new = take(&mut conn, &id, "s", Duration::from_secs(30), true).await;
    assert_eq!(
        new.token(),
        old.token(),
        "the same token is handed out again"
    );
    assert_ne!(new.value(), old.value(), "but never the same lock value");
    let stale = ledger::place_bids(&mut conn, &old, &[bid(&id, "b1", "ann", 100)]).await;
    assert!(
        matches!(stale, Err(LedgerError::Fenced)),
        "the old lease is fenced off: {stale:?}"
    );
    let judged = ledger::place_bids(&mut conn, &new, &[bid(&id, "b1", "ann", 100)])
        .await
        .expect("the new lease writes");
    assert!(matches!(judged[0].event, Event::BidAccepted { .. }));
}
