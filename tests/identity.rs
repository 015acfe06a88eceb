//! Bidder identity (`BID_AUTH=required`): only a bidder's key can bid in its name. Real
//! Redis processes, the real server and client binaries, the admin API over gRPC.

mod support;

use std::time::Duration;

use auction::proto::v1 as pb;
use auction::store::bidders;
use auction::wire::{Bid, Event, RejectReason};
use support::*;

fn bid_auth() -> Vec<(&'static str, String)> {
    vec![("BID_AUTH", "required".into())]
}

async fn register(admin: &mut Admin, bidder: &str) -> String {
    let reply = admin
        .register_bidder(pb::RegisterBidderRequest {
            bidder: bidder.into(),
        })
        .await
        .expect("RegisterBidder")
        .into_inner();
    assert_eq!(reply.bidder, bidder);
    assert_eq!(reply.key.len(), 64, "256 bits as hex");
    reply.key
}

async fn open(admin: &mut Admin, id: &str) {
    admin
        .open_auction(pb::OpenAuctionRequest {
            item: "Signed lot".into(),
            auction_id: id.into(),
            duration: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("OpenAuction");
}

fn bid(auction: &str, bid_id: &str, bidder: &str, amount: u64) -> Bid {
    let id = auction::keyspace::AuctionId::parse(auction).expect("id");
    plain_bid(&id, bid_id, bidder, amount)
}

fn signed(b: Bid, key: &str) -> Bid {
    let sig = bidders::sign(&b, key);
    Bid {
        sig: Some(sig),
        ..b
    }
}

async fn publish(stack: &auction_testkit::DevStack, b: &Bid) {
    publish_command(stack, &b.to_json()).await;
}

async fn outcome(rec: &Recorder, bid_id: &str, after: usize) -> Event {
    outcome_after(rec, bid_id, after).await
}

fn unauthenticated(e: &Event) -> bool {
    matches!(
        e,
        Event::BidRejected {
            reason: RejectReason::Unauthenticated,
            seq: None,
            ..
        }
    )
}

#[tokio::test]
async fn only_a_bidders_own_key_can_bid_in_its_name() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let (_server, _port, mut admin) = serving(&stack, "server", &bid_auth()).await;
        let alice = register(&mut admin, "alice").await;
        let bob = register(&mut admin, "bob").await;
        open(&mut admin, "signed-1").await;
        let a = "signed-1";

        publish(&stack, &signed(bid(a, "a1", "alice", 100), &alice)).await;
        assert!(matches!(
            outcome(&rec, "a1", 0).await,
            Event::BidAccepted { amount: 100, .. }
        ));
        // Claiming alice, signed with bob's key.
        publish(&stack, &signed(bid(a, "forged", "alice", 9_999), &bob)).await;
        assert!(unauthenticated(&outcome(&rec, "forged", 0).await));
        // Unsigned, and a signature of the right shape that is wrong.
        publish(&stack, &bid(a, "unsigned", "alice", 200)).await;
        assert!(unauthenticated(&outcome(&rec, "unsigned", 0).await));
        let bad = Bid {
            sig: Some("0".repeat(64)),
            ..bid(a, "badsig", "alice", 300)
        };
        publish(&stack, &bad).await;
        assert!(unauthenticated(&outcome(&rec, "badsig", 0).await));
        // A signature binds the amount: the same signature on another amount fails.
        let tampered = Bid {
            amount: 50_000,
            ..signed(bid(a, "tamper", "alice", 400), &alice)
        };
        publish(&stack, &tampered).await;
        assert!(unauthenticated(&outcome(&rec, "tamper", 0).await));
        // A revoked bidder's key no longer counts.
        admin
            .revoke_bidder(pb::RevokeBidderRequest {
                bidder: "bob".into(),
            })
            .await
            .expect("RevokeBidder");
        publish(&stack, &signed(bid(a, "b1", "bob", 500), &bob)).await;
        assert!(unauthenticated(&outcome(&rec, "b1", 0).await));
        // A retry of a judged bid gets its first outcome only when correctly signed.
        let seen = rec.events().len();
        publish(&stack, &bid(a, "a1", "alice", 100)).await;
        assert!(unauthenticated(&outcome(&rec, "a1", seen).await));
        let seen = rec.events().len();
        publish(&stack, &signed(bid(a, "a1", "alice", 100), &alice)).await;
        assert!(matches!(
            outcome(&rec, "a1", seen).await,
            Event::BidAccepted { seq: 2, .. }
        ));

        let bids = admin
            .list_bids(pb::ListBidsRequest {
                auction_id: a.into(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("ListBids")
            .into_inner()
            .bids;
        let ids: Vec<&str> = bids.iter().map(|b| b.bid_id.as_str()).collect();
        assert_eq!(ids, ["a1"], "no refused bid is in the history");
        let listed = admin
            .list_bidders(pb::ListBiddersRequest {})
            .await
            .expect("ListBidders")
            .into_inner();
        let names: Vec<&str> = listed.bidders.iter().map(|b| b.bidder.as_str()).collect();
        assert_eq!(names, ["alice"], "bob was revoked");
        assert!(listed.bidders[0].registered_at.is_some());
        assert!(
            !format!("{listed:?}").contains(&alice),
            "ListBidders never shows keys"
        );
    })
    .await;
}

#[tokio::test]
async fn a_registration_on_one_server_reaches_the_others_within_a_second() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let (_a, _pa, mut admin_a) = serving(&stack, "server-a", &bid_auth()).await;
        let (_b, _pb, mut admin_b) = serving(&stack, "server-b", &bid_auth()).await;
        // Opened through b, so b's worker holds the auction and judges its bids.
        open(&mut admin_b, "spread-1").await;
        let key = register(&mut admin_a, "carol").await;
        let registered = std::time::Instant::now();
        let mut n = 0u64;
        let accepted = loop {
            n += 1;
            let id = format!("c{n}");
            publish(
                &stack,
                &signed(bid("spread-1", &id, "carol", 100 + 10 * n), &key),
            )
            .await;
            if matches!(outcome(&rec, &id, 0).await, Event::BidAccepted { .. }) {
                break registered.elapsed();
            }
            assert!(
                registered.elapsed() < Duration::from_secs(3),
                "carol's key never reached the judging server"
            );
        };
        eprintln!(
            "a registration on server a was honoured by server b after {accepted:?} ({n} tries)"
        );
        assert!(accepted < Duration::from_secs(1), "{accepted:?}");
    })
    .await;
}

#[tokio::test]
async fn an_auction_client_signs_with_its_key_and_wins() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let (_server, port, mut admin) = serving(
            &stack,
            "server",
            &[
                ("BID_AUTH", "required".into()),
                ("OPEN_ON_START", "signed lot".into()),
                ("AUCTION_DURATION", "6s".into()),
            ],
        )
        .await;
        let key = register(&mut admin, "signer").await;
        let key_file = stack.dir().join("signer.key");
        std::fs::write(&key_file, format!("{key}\n")).expect("write the key file");
        let id = rec.opened(Duration::from_secs(20)).await;
        let mut signer = client(
            &stack,
            "signer",
            port,
            &[
                ("BID_INTERVAL", "300ms".into()),
                ("BIDDER_KEY_FILE", key_file.display().to_string()),
            ],
        );
        let Event::AuctionClosed { winner, .. } = rec.closed(&id, Duration::from_secs(30)).await
        else {
            unreachable!()
        };
        assert_eq!(winner.as_deref(), Some("signer"));
        assert_eq!(
            signer
                .wait_exit(Duration::from_secs(20))
                .await
                .expect("exit"),
            0,
            "{}",
            signer.log()
        );

        // A key that cannot be a key stops the client at once, with one line saying why.
        let mut bad = client(&stack, "bad", port, &[("BIDDER_KEY", "not a key".into())]);
        assert_eq!(
            bad.wait_exit(Duration::from_secs(20)).await.expect("exit"),
            2
        );
        assert!(bad.log().contains("printable ASCII"), "{}", bad.log());
    })
    .await;
}
