//! End-to-end: the real binaries on a real master + 2 replicas + 3 Sentinels.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use auction::keyspace::AuctionId;
use auction::runtime::config::{DEFAULT_COMMAND_CHANNEL, DEFAULT_EVENT_CHANNEL};
use auction::store::ledger;
use auction::wire::{Event, RejectReason};
use support::*;

const LIMIT: Duration = Duration::from_secs(90);

/// Runs a test body under an overall bound so a hang fails with a message.
async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test exceeded its overall time bound");
}

/// Checks the stored auction against the events: winner = highest accepted bid, history
/// holds every accepted bid exactly once, fences never go backwards.
async fn check_consistency(
    stack: &auction_testkit::DevStack,
    tap: &Recorder,
    id: &str,
) -> ledger::AuctionRecord {
    let events = tap.events();
    let mut conn = master_conn(stack).await;
    let aid = AuctionId::parse(id).expect("id");
    let rec = ledger::get(&mut conn, &aid)
        .await
        .expect("read")
        .expect("auction exists");
    let history = ledger::history(&mut conn, &aid, "-", 100_000)
        .await
        .expect("history");
    assert_history_sound(id, &history);
    let seen: HashSet<String> = history.iter().map(|(_, h)| h.bid_id.clone()).collect();
    let mut accepted_ids: HashMap<String, u64> = HashMap::new();
    for e in of(&events, id) {
        if let Event::BidAccepted { bid_id, seq, .. } = e {
            let first = accepted_ids.entry(bid_id.clone()).or_insert(seq);
            assert_eq!(
                *first, seq,
                "bid {bid_id} announced accepted with two different seqs"
            );
            assert!(
                seen.contains(&bid_id),
                "announced bid {bid_id} missing from history"
            );
        }
    }
    assert_eq!(rec.bid_count as usize, history.len());
    if let Some((_, last)) = history.last() {
        assert_eq!(rec.high.as_ref().map(|h| h.0), Some(last.amount));
    }
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_one_auction_highest_bid_wins_and_everyone_sees_the_close() {
    bounded(async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let fast = [
            ("BID_INTERVAL", "300ms".to_string()),
            ("MAX_BID", "5000".to_string()),
        ];
        let port = free_port();
        let mut clients: Vec<Proc> = (0..5)
            .map(|i| client(&stack, &format!("bidder-{i}"), port, &fast))
            .collect();
        wait_subscribers(&stack, DEFAULT_EVENT_CHANNEL, 6, Duration::from_secs(20)).await;
        let _server = server(
            &stack,
            "server",
            port,
            &[
                ("OPEN_ON_START", "Vintage guitar".into()),
                ("AUCTION_DURATION", "4s".into()),
            ],
        );
        let id = tap.opened(Duration::from_secs(20)).await;
        let closed = tap.closed(&id, Duration::from_secs(30)).await;
        for c in clients.iter_mut() {
            let code = c
                .wait_exit(Duration::from_secs(15))
                .await
                .expect("client exits after the close");
            assert_eq!(code, 0, "{} exit code", c.name);
            assert!(
                c.log().contains("my auction closed"),
                "{} saw the close",
                c.name
            );
        }
        let events = tap.events();
        let accepted: Vec<(u64, String)> = of(&events, &id)
            .into_iter()
            .filter_map(|e| match e {
                Event::BidAccepted { amount, bidder, .. } => Some((amount, bidder)),
                _ => None,
            })
            .collect();
        assert!(accepted.len() >= 3, "clients bid: {accepted:?}");
        let best = accepted
            .iter()
            .max_by_key(|(a, _)| *a)
            .cloned()
            .expect("a best bid");
        let Event::AuctionClosed { winner, amount, .. } = &closed else {
            unreachable!()
        };
        assert_eq!(
            (amount.expect("amount"), winner.clone().expect("winner")),
            best
        );
        assert_gapless(&events, &id);
        let rec = check_consistency(&stack, &tap, &id).await;
        assert!(!rec.open);
        assert_eq!(rec.winner.map(|w| w.0), Some(best.0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_five_clients_no_bid_accepted_twice() {
    bounded(async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let fast = [
            ("BID_INTERVAL", "200ms".to_string()),
            ("BID_RETRY_AFTER", "500ms".to_string()),
        ];
        let ports = [free_port(), free_port()];
        let mut clients: Vec<Proc> = (0..5)
            .map(|i| client(&stack, &format!("bidder-{i}"), ports[i % 2], &fast))
            .collect();
        wait_subscribers(&stack, DEFAULT_EVENT_CHANNEL, 6, Duration::from_secs(20)).await;
        let servers: Vec<Proc> = (0..2)
            .map(|i| {
                server(
                    &stack,
                    &format!("server-{i}"),
                    ports[i],
                    &[
                        ("OPEN_ON_START", format!("lot {i}")),
                        ("AUCTION_DURATION", "5s".into()),
                    ],
                )
            })
            .collect();
        let ids = tap
            .wait_until("two auctions opened", Duration::from_secs(20), |evs| {
                let ids: Vec<String> = evs
                    .iter()
                    .filter_map(|e| match e {
                        Event::AuctionOpened { auction_id, .. } => Some(auction_id.clone()),
                        _ => None,
                    })
                    .collect();
                (ids.len() == 2).then_some(ids)
            })
            .await;
        for id in &ids {
            tap.closed(id, Duration::from_secs(30)).await;
        }
        for c in clients.iter_mut() {
            assert_eq!(
                c.wait_exit(Duration::from_secs(15)).await.expect("exit"),
                0,
                "{}",
                c.name
            );
        }
        let events = tap.events();
        let mut accepted = HashSet::new();
        for e in &events {
            if let Event::BidAccepted { bid_id, seq, .. } = e {
                accepted.insert((bid_id.clone(), *seq));
            }
        }
        let mut per_bid: HashMap<String, usize> = HashMap::new();
        for (bid_id, _) in &accepted {
            *per_bid.entry(bid_id.clone()).or_default() += 1;
        }
        assert!(
            per_bid.values().all(|n| *n == 1),
            "a bid was accepted twice: {per_bid:?}"
        );
        assert!(!accepted.is_empty());
        for id in &ids {
            assert_gapless(&events, id);
            let closes: HashSet<String> = of(&events, id)
                .iter()
                .filter(|e| matches!(e, Event::AuctionClosed { .. }))
                .map(Event::to_json)
                .collect();
            assert_eq!(
                closes.len(),
                1,
                "{id} closed exactly once (repeats identical): {closes:?}"
            );
            check_consistency(&stack, &tap, id).await;
        }
        drop(servers);
    })
    .await;
}

fn bid_json(id: &str, bid_id: &str, amount: u64) -> String {
    format!(
        r#"{{"v":1,"type":"bid","auction_id":"{id}","bid_id":"{bid_id}","bidder":"tester","amount":{amount}}}"#
    )
}

async fn one_open_auction(
    stack: &auction_testkit::DevStack,
    tap: &Recorder,
    duration: &str,
) -> (Proc, String) {
    let server = server(
        stack,
        "server",
        free_port(),
        &[
            ("OPEN_ON_START", "burst lot".into()),
            ("AUCTION_DURATION", duration.into()),
            ("STARTING_PRICE", "1".into()),
            ("MIN_INCREMENT", "1".into()),
        ],
    );
    let id = tap.opened(Duration::from_secs(20)).await;
    (server, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_2000_increasing_bids_is_accepted_completely_and_in_order() {
    bounded(async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let (_server, id) = one_open_auction(&stack, &tap, "60s").await;
        let mut conn = master_conn(&stack).await;
        let mut pipe = redis::pipe();
        for n in 1..=2000u64 {
            pipe.cmd("PUBLISH")
                .arg(DEFAULT_COMMAND_CHANNEL)
                .arg(bid_json(&id, &format!("b{n}"), n))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .expect("publish burst");
        let accepted = tap
            .wait_until("2000 bid outcomes", Duration::from_secs(60), |evs| {
                let outcomes: Vec<&Event> = evs.iter().filter(|e| e.bid_id().is_some()).collect();
                (outcomes.len() >= 2000).then(|| outcomes.into_iter().cloned().collect::<Vec<_>>())
            })
            .await;
        let amounts: Vec<u64> = accepted
            .iter()
            .map(|e| match e {
                Event::BidAccepted { amount, .. } => *amount,
                other => panic!("every bid must be accepted, got {}", other.to_json()),
            })
            .collect();
        assert_eq!(
            amounts,
            (1..=2000).collect::<Vec<_>>(),
            "accepted in publication order"
        );
        let rec = check_consistency(&stack, &tap, &id).await;
        assert_eq!(rec.bid_count, 2000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_malformed_messages_never_stop_valid_bids() {
    bounded(async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let (mut server, id) = one_open_auction(&stack, &tap, "60s").await;
        let mut conn = master_conn(&stack).await;
        let huge = "x".repeat(64 * 1024);
        let bad: Vec<String> = vec![
            "not json".into(),
            "[1,2,3]".into(),
            "{}".into(),
            r#"{"v":2,"type":"bid","bid_id":"v2"}"#.into(),
            r#"{"v":1,"type":"auction_closed","auction_id":"x"}"#.into(),
            format!(r#"{{"v":1,"type":"bid","auction_id":"{id}","bid_id":"float","bidder":"t","amount":12.5}}"#),
            format!(r#"{{"v":1,"type":"bid","auction_id":"{id}","bid_id":"neg","bidder":"t","amount":-5}}"#),
            format!(r#"{{"v":1,"type":"bid","auction_id":"{id}","bid_id":"huge","bidder":"t","amount":1e30}}"#),
            r#"{"v":1,"type":"bid","auction_id":"a}b","bid_id":"badid","bidder":"t","amount":5}"#.into(),
            format!(r#"{{"v":1,"type":"bid","auction_id":"{id}","bid_id":"big","bidder":"{huge}","amount":5}}"#),
            "\u{0}\u{1}\u{2}".into(),
            format!(r#"{{"v":1,"type":"bid","auction_id":"nosuch","bid_id":"ghost","bidder":"t","amount":5}}"#),
        ];
        let mut pipe = redis::pipe();
        let mut valid = 0u64;
        for n in 0..1000usize {
            pipe.cmd("PUBLISH").arg(DEFAULT_COMMAND_CHANNEL).arg(&bad[n % bad.len()]).ignore();
            if n % 5 == 0 {
                valid += 1;
                pipe.cmd("PUBLISH").arg(DEFAULT_COMMAND_CHANNEL).arg(bid_json(&id, &format!("ok{valid}"), valid)).ignore();
            }
        }
        pipe.query_async::<()>(&mut conn).await.expect("publish mix");
        let outcomes = tap
            .wait_until("an outcome for every valid bid", Duration::from_secs(60), |evs| {
                let ok: Vec<Event> = evs
                    .iter()
                    .filter(|e| e.bid_id().is_some_and(|b| b.starts_with("ok")))
                    .cloned()
                    .collect();
                (ok.len() as u64 >= valid).then_some(ok)
            })
            .await;
        assert!(outcomes.iter().all(|e| matches!(e, Event::BidAccepted { .. })), "valid increasing bids are all accepted");
        assert!(server.running(), "the server survived the garbage");
        let events = tap.events();
        let malformed = events
            .iter()
            .filter(|e| matches!(e, Event::BidRejected { reason: RejectReason::Malformed, .. }))
            .count();
        assert!(malformed > 0, "malformed messages that name a bid are answered");
        let ghost = events.iter().find(|e| e.bid_id() == Some("ghost"));
        assert!(
            matches!(ghost, Some(Event::BidRejected { reason: RejectReason::UnknownAuction, .. })),
            "a bid on an unknown auction is answered: {ghost:?}"
        );
        assert!(server.log().contains("refused a command-channel message"), "refusals are logged");
        let mut conn = master_conn(&stack).await;
        let ghost_keys: Vec<String> = redis::cmd("KEYS").arg("*nosuch*").query_async(&mut conn).await.expect("KEYS");
        assert!(ghost_keys.is_empty(), "bids on unknown auctions create no keys: {ghost_keys:?}");
        check_consistency(&stack, &tap, &id).await;
    })
    .await;
}
