//! Auction features as users meet them, on real Redis processes and the real binaries: a
//! bidder that starts after its auction opened still bids; the prototype's clients still
//! work (`SEED_DIALECT`); proxy bids (`max_amount`, `PROXY_MAX`); soft close; and
//! `OpenAuction` with only an item.

mod support;

use std::time::Duration;

use auction::proto::v1 as pb;
use auction::wire::{Event, RejectReason};
use auction_testkit::eventually;
use serde_json::Value;
use support::*;

/// Publishes `payload` on the command channel.
async fn publish(stack: &auction_testkit::DevStack, payload: &str) {
    publish_command(stack, payload).await;
}

/// A v1 bid, with `max_amount` when given.
fn bid_json(auction: &str, bid_id: &str, bidder: &str, amount: u64, max: Option<u64>) -> String {
    let mut v = serde_json::json!({"v":1,"type":"bid","auction_id":auction,"bid_id":bid_id,"bidder":bidder,"amount":amount});
    if let Some(m) = max {
        v["max_amount"] = m.into();
    }
    v.to_string()
}

/// The outcome of `bid_id` (an accepted or rejected event), waiting for it.
async fn outcome(rec: &Recorder, bid_id: &str) -> Event {
    outcome_after(rec, bid_id, 0).await
}

/// Redis time on the master, ms.
async fn redis_ms(stack: &auction_testkit::DevStack) -> u64 {
    let mut conn = master_conn(stack).await;
    let (s, us): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .expect("TIME");
    s * 1000 + us / 1000
}

#[tokio::test]
async fn a_bidder_started_after_its_auction_opened_bids() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let port = free_port();
        let _server = server(
            &stack,
            "server",
            port,
            &[
                ("OPEN_ON_START", "late lot".into()),
                ("AUCTION_DURATION", "60s".into()),
            ],
        );
        let id = rec.opened(Duration::from_secs(30)).await;
        // The scenario itself, not a synchronisation: the bidder comes up two seconds
        // after the auction opened, when its auction_opened event is long gone.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let interval = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let _client = client(&stack, "late-1", port, &[("BID_INTERVAL", "500ms".into())]);
        // The client starts, connects, sees the server SERVING and its own subscription
        // live, finds the open auction and bids within half an interval: a few intervals
        // on top of the process start.
        let judged = rec
            .wait_until("a judged bid from late-1", interval * 20, |evs| {
                of(evs, &id).into_iter().find(|e| match e {
                    Event::BidAccepted { bidder, .. } => bidder == "late-1",
                    Event::BidRejected { bidder, .. } => bidder.as_deref() == Some("late-1"),
                    _ => false,
                })
            })
            .await;
        eprintln!(
            "late-1's first bid judged {:?} after it started",
            started.elapsed()
        );
        assert!(
            matches!(judged, Event::BidAccepted { .. }),
            "the only bidder's first bid is accepted: {judged:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_prototype_client_bids_follows_the_price_and_sees_the_winner() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let (_server, _port, mut admin) = serving(
            &stack,
            "server",
            &[
                ("SEED_DIALECT", "true".into()),
                ("OPEN_ON_START", "Notebook".into()),
                ("OPEN_ON_START_ID", "produto1".into()),
                ("AUCTION_DURATION", "60s".into()),
            ],
        )
        .await;
        assert_eq!(rec.opened(Duration::from_secs(20)).await, "produto1");
        let inicio: Value = rec
            .wait_for(
                "the dialect's inicio",
                Duration::from_secs(10),
                |_, others| others.iter().find(|o| o.contains("\"inicio\"")).cloned(),
            )
            .await
            .parse::<Value>()
            .expect("inicio is JSON");
        assert_eq!(inicio["productId"], "produto1");
        assert_eq!(inicio["lanceAtual"], 0);
        assert!(inicio.get("v").is_none());

        // What the prototype's clients sent, recorded: a duplicate delivery, a bid too low,
        // an inexact amount, a name with a space, and the admin commands it no longer obeys.
        let recorded = include_str!("data/seed_dialect.jsonl");
        for line in recorded.lines() {
            publish(&stack, line).await;
        }
        let ids = [
            "seed-cliente-1-1200",
            "seed-cliente-2-5750",
            "seed-cliente-3-4025",
            "seed-cliente-1-10199",
        ];
        for id in ids {
            outcome(&rec, id).await;
        }
        let events = of(&rec.events(), "produto1");
        // By seq: a duplicate delivery is answered again with its first outcome.
        let accepted: Vec<(String, u64)> = events
            .iter()
            .filter_map(|e| match e {
                Event::BidAccepted {
                    seq,
                    bidder,
                    amount,
                    ..
                } => Some((*seq, (bidder.clone(), *amount))),
                _ => None,
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_values()
            .collect();
        assert_eq!(
            accepted,
            [
                ("cliente-1".to_owned(), 1200),
                ("cliente-2".to_owned(), 5750),
                ("cliente-1".to_owned(), 10199)
            ]
        );
        let reason_of = |id: &str| {
            events.iter().find_map(|e| match e {
                Event::BidRejected { bid_id, reason, .. } if bid_id == id => Some(*reason),
                _ => None,
            })
        };
        assert_eq!(reason_of("seed-cliente-3-4025"), Some(RejectReason::TooLow));
        let judged_twice = events
            .iter()
            .filter(|e| e.bid_id() == Some("seed-cliente-2-5750") && e.seq().is_some())
            .filter_map(Event::seq)
            .collect::<std::collections::BTreeSet<_>>();
        assert_eq!(
            judged_twice.len(),
            1,
            "a duplicate delivery is judged once: {events:#?}"
        );
        let got = admin
            .get_auction(pb::GetAuctionRequest {
                auction_id: "produto1".into(),
            })
            .await
            .expect("GetAuction")
            .into_inner()
            .auction
            .expect("auction");
        assert_eq!(
            got.state,
            pb::AuctionState::Open as i32,
            "finalizar from the channel closes nothing"
        );
        assert_eq!(got.bid_count, 3);

        // A duplicate delivery is answered again with its first outcome (as any retry is),
        // so its lance may show twice in a row.
        let mut lances: Vec<Value> = rec
            .others()
            .iter()
            .filter_map(|o| serde_json::from_str::<Value>(o).ok())
            .filter(|v| v["tipo"] == "lance")
            .collect();
        lances.dedup();
        let shown: Vec<(String, String)> = lances
            .iter()
            .map(|v| {
                (
                    v["valor"].to_string(),
                    v["mensagem"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("12".to_owned(), "Novo lance de cliente-1: R$12".to_owned()),
                (
                    "57.5".to_owned(),
                    "Novo lance de cliente-2: R$57.5".to_owned()
                ),
                (
                    "101.99".to_owned(),
                    "Novo lance de cliente-1: R$101.99".to_owned()
                ),
            ]
        );
        assert!(
            lances
                .iter()
                .all(|v| v["lanceAtual"] == v["valor"] && v["productId"] == "produto1")
        );

        admin
            .close_auction(pb::CloseAuctionRequest {
                auction_id: "produto1".into(),
            })
            .await
            .expect("CloseAuction");
        let fim: Value = rec
            .wait_for("the dialect's fim", Duration::from_secs(20), |_, others| {
                others.iter().find(|o| o.contains("\"fim\"")).cloned()
            })
            .await
            .parse()
            .expect("fim is JSON");
        assert_eq!(fim["vencedor"], "cliente-1");
        assert_eq!(fim["lance"], 101.99);
        assert_eq!(
            fim["mensagem"],
            "Leilão finalizado! Vencedor: cliente-1 com R$101.99"
        );
    })
    .await;
}

#[tokio::test]
async fn a_proxy_bid_defends_its_leader_up_to_a_max_nobody_sees() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let (server, _port, mut admin) = serving(&stack, "server", &[]).await;
        admin
            .open_auction(pb::OpenAuctionRequest {
                item: "Proxy lot".into(),
                starting_price: 100,
                min_increment: 10,
                auction_id: "proxy-1".into(),
                ..Default::default()
            })
            .await
            .expect("OpenAuction");
        let a = "proxy-1";
        // alice leads with a secret max; bob's plain bid loses at once, alice's price rises
        // to just above it.
        publish(&stack, &bid_json(a, "b1", "alice", 100, Some(4_321_987))).await;
        assert!(matches!(outcome(&rec, "b1").await, Event::BidAccepted { amount: 100, .. }));
        publish(&stack, &bid_json(a, "b2", "bob", 200, None)).await;
        let raised = outcome(&rec, "b2+proxy").await;
        assert!(
            matches!(&raised, Event::BidAccepted { bidder, amount: 210, proxy: true, .. } if bidder == "alice"),
            "{raised:?}"
        );
        let lost = outcome(&rec, "b2").await;
        assert!(
            matches!(lost, Event::BidRejected { reason: RejectReason::OutbidByProxy, next_min: Some(220), .. }),
            "{lost:?}"
        );
        assert_eq!(raised.seq().map(|s| s + 1), lost.seq(), "the raise is announced first");
        // bob's max beats alice's: he leads at one increment above her max.
        publish(&stack, &bid_json(a, "b3", "bob", 300, Some(9_876_543))).await;
        assert!(matches!(outcome(&rec, "b3").await, Event::BidAccepted { amount: 4_321_997, .. }));
        // alice's new max does not beat his: bob rises to just above it.
        publish(&stack, &bid_json(a, "b4", "alice", 4_322_007, Some(5_555_555))).await;
        assert!(matches!(outcome(&rec, "b4").await, Event::BidRejected { reason: RejectReason::OutbidByProxy, .. }));
        assert!(matches!(outcome(&rec, "b4+proxy").await, Event::BidAccepted { amount: 5_555_565, .. }));
        // The leader bidding on itself is judged as before, and keeps its larger max.
        publish(&stack, &bid_json(a, "b5", "bob", 5_555_575, Some(6_000_000))).await;
        assert!(matches!(outcome(&rec, "b5").await, Event::BidAccepted { amount: 5_555_575, .. }));
        publish(&stack, &bid_json(a, "b6", "alice", 7_000_000, None)).await;
        assert!(matches!(outcome(&rec, "b6").await, Event::BidRejected { reason: RejectReason::OutbidByProxy, .. }));
        assert!(matches!(outcome(&rec, "b6+proxy").await, Event::BidAccepted { amount: 7_000_010, .. }));

        let bids = admin
            .list_bids(pb::ListBidsRequest { auction_id: a.into(), page_size: 100, ..Default::default() })
            .await
            .expect("ListBids")
            .into_inner()
            .bids;
        let listed: Vec<(&str, &str, i64, bool)> =
            bids.iter().map(|b| (b.bid_id.as_str(), b.bidder.as_str(), b.amount, b.proxy)).collect();
        assert_eq!(
            listed,
            [
                ("b1", "alice", 100, false),
                ("b2+proxy", "alice", 210, true),
                ("b3", "bob", 4_321_997, false),
                ("b4+proxy", "bob", 5_555_565, true),
                ("b5", "bob", 5_555_575, false),
                ("b6+proxy", "bob", 7_000_010, true),
            ]
        );
        // The maxes never leave the server: not in events, reads or logs.
        let secrets = ["4321987", "9876543", "5555555"];
        let got = format!("{:?}", admin.get_auction(pb::GetAuctionRequest { auction_id: a.into() }).await.expect("GetAuction").into_inner());
        let events: Vec<String> = rec.events().iter().map(Event::to_json).collect();
        let log = server.log();
        for secret in secrets {
            assert!(!got.contains(secret), "GetAuction shows a max: {got}");
            assert!(events.iter().all(|e| !e.contains(secret)), "an event shows a max");
            assert!(!log.contains(secret), "the server log shows max {secret}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_proxy_bidder_bids_once_and_wins_against_a_plain_one() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let port = free_port();
        let _server = server(
            &stack,
            "server",
            port,
            &[
                ("OPEN_ON_START", "contest".into()),
                ("AUCTION_DURATION", "12s".into()),
                ("MIN_INCREMENT", "100".into()),
            ],
        );
        let id = rec.opened(Duration::from_secs(30)).await;
        let env = |extra: (&'static str, &'static str)| {
            vec![
                ("BID_INTERVAL", "200ms".to_owned()),
                (extra.0, extra.1.to_owned()),
            ]
        };
        let mut proxy = client(&stack, "prox", port, &env(("PROXY_MAX", "5000")));
        let mut plain = client(&stack, "plain", port, &env(("MAX_BID", "3000")));
        let closed = rec.closed(&id, Duration::from_secs(40)).await;
        let Event::AuctionClosed { winner, amount, .. } = closed else {
            unreachable!()
        };
        assert_eq!(winner.as_deref(), Some("prox"));
        let amount = amount.expect("a winning amount");
        assert!(
            amount <= 3100,
            "the proxy paid at most one increment above the other's budget: {amount}"
        );
        // Once its bid leads, the proxy bidder never bids again: its max defends it.
        let events = of(&rec.events(), &id);
        let own = |e: &Event| match e {
            Event::BidAccepted {
                bidder,
                proxy: false,
                ..
            } => bidder == "prox",
            Event::BidRejected { bidder, .. } => bidder.as_deref() == Some("prox"),
            _ => false,
        };
        let led_at = events
            .iter()
            .find(|e| own(e) && matches!(e, Event::BidAccepted { .. }))
            .and_then(Event::seq)
            .expect("the proxy bidder's bid was accepted");
        let later: Vec<&Event> = events
            .iter()
            .filter(|e| own(e) && e.seq().is_some_and(|s| s > led_at))
            .collect();
        assert!(
            later.is_empty(),
            "the proxy bidder bid again after leading: {later:?}"
        );
        let defended = events
            .iter()
            .filter(
                |e| matches!(e, Event::BidAccepted { bidder, proxy: true, .. } if bidder == "prox"),
            )
            .count();
        assert!(defended > 0, "its proxy raised its price for it");
        for c in [&mut proxy, &mut plain] {
            assert_eq!(
                c.wait_exit(Duration::from_secs(20)).await.expect("exit"),
                0,
                "{}",
                c.log()
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_late_bid_moves_the_deadline_under_soft_close() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let (_server, _port, mut admin) = serving(&stack, "server", &[]).await;
        let opened = admin
            .open_auction(pb::OpenAuctionRequest {
                item: "Sniped lot".into(),
                duration: Some(prost_types::Duration {
                    seconds: 4,
                    nanos: 0,
                }),
                soft_close: Some(prost_types::Duration {
                    seconds: 3,
                    nanos: 0,
                }),
                auction_id: "soft-1".into(),
                ..Default::default()
            })
            .await
            .expect("OpenAuction")
            .into_inner()
            .auction
            .expect("auction");
        assert_eq!(opened.soft_close.map(|d| d.seconds), Some(3));
        let a = "soft-1";
        let deadline0 = {
            let d = opened.deadline.expect("deadline");
            d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000
        };
        // Early: more than the window before the deadline, nothing moves.
        publish(&stack, &bid_json(a, "early", "ann", 100, None)).await;
        assert!(matches!(
            outcome(&rec, "early").await,
            Event::BidAccepted {
                deadline_ms: None,
                ..
            }
        ));
        // Inside the window: the deadline moves to the bid's time plus the window.
        eventually(
            "Redis time inside the soft-close window",
            Duration::from_secs(5),
            || async {
                let now = redis_ms(&stack).await;
                if now + 2500 >= deadline0 {
                    Ok(())
                } else {
                    Err(format!("{} ms to go", deadline0 - now))
                }
            },
        )
        .await
        .expect("time passes");
        publish(&stack, &bid_json(a, "late", "ben", 200, None)).await;
        let Event::BidAccepted {
            deadline_ms: Some(moved),
            ..
        } = outcome(&rec, "late").await
        else {
            panic!("the late bid moves the deadline");
        };
        assert!(moved > deadline0, "{moved} > {deadline0}");
        // After the original deadline a bid is still accepted, and moves it again.
        eventually(
            "Redis time past the original deadline",
            Duration::from_secs(5),
            || async {
                let now = redis_ms(&stack).await;
                if now > deadline0 + 100 {
                    Ok(())
                } else {
                    Err(format!("{} ms to go", deadline0 + 100 - now))
                }
            },
        )
        .await
        .expect("time passes");
        publish(&stack, &bid_json(a, "later", "ann", 300, None)).await;
        let Event::BidAccepted {
            deadline_ms: Some(moved_again),
            ..
        } = outcome(&rec, "later").await
        else {
            panic!("a bid after the original deadline is accepted and moves it again");
        };
        assert!(moved_again > moved);
        let got = admin
            .get_auction(pb::GetAuctionRequest {
                auction_id: a.into(),
            })
            .await
            .expect("GetAuction")
            .into_inner()
            .auction
            .expect("auction");
        let d = got.deadline.expect("deadline");
        assert_eq!(
            d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000,
            moved_again,
            "GetAuction follows"
        );
        let Event::AuctionClosed {
            closed_at_ms,
            winner,
            ..
        } = rec.closed(a, Duration::from_secs(20)).await
        else {
            unreachable!()
        };
        assert!(
            closed_at_ms >= moved_again,
            "closed at {closed_at_ms}, before the moved deadline {moved_again}"
        );
        assert_eq!(winner.as_deref(), Some("ann"));
    })
    .await;
}

#[tokio::test]
async fn open_auction_with_only_an_item_takes_the_servers_defaults() {
    bounded(async {
        let stack = stack().await;
        let (_server, _port, mut admin) = serving(
            &stack,
            "server",
            &[
                ("STARTING_PRICE", "250".into()),
                ("MIN_INCREMENT", "25".into()),
            ],
        )
        .await;
        let a = admin
            .open_auction(pb::OpenAuctionRequest {
                item: "Just an item".into(),
                ..Default::default()
            })
            .await
            .expect("OpenAuction with only an item")
            .into_inner()
            .auction
            .expect("auction");
        assert_eq!(
            (a.starting_price, a.min_increment, a.reserve_price),
            (250, 25, 0)
        );
        assert_eq!(a.next_min, 250);
        assert!(a.soft_close.is_none());
    })
    .await;
}
