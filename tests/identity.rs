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

/// An auction-client bidding every 300 ms, given `secret` as a file through `setting`
/// (`BIDDER_KEY_FILE`, `ENROLL_TOKEN_FILE`), with a trailing newline as editors write it.
fn quick_bidder(
    stack: &auction_testkit::DevStack,
    name: &str,
    port: u16,
    setting: &str,
    secret: &str,
) -> Proc {
    let file = stack.dir().join(format!("{name}.secret"));
    std::fs::write(&file, format!("{secret}\n")).expect("write the secret file");
    let env = [
        ("BID_INTERVAL", "300ms".to_owned()),
        (setting, file.display().to_string()),
    ];
    client(stack, name, port, &env)
}

/// `client` wins auction `id` and exits cleanly after its close.
async fn wins_and_exits(rec: &Recorder, id: &str, client: &mut Proc) {
    let Event::AuctionClosed { winner, .. } = rec.closed(id, Duration::from_secs(30)).await else {
        unreachable!()
    };
    assert_eq!(winner.as_deref(), Some(client.name.as_str()));
    let code = client
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exit");
    assert_eq!(code, 0, "{}", client.log());
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
        // This server has no ENROLL_TOKEN: enrollment is off, and says how to turn it on.
        let off = admin
            .enroll_bidder(pb::EnrollBidderRequest {
                bidder: "signer".into(),
            })
            .await
            .expect_err("enrollment off");
        assert_eq!(off.code(), tonic::Code::FailedPrecondition, "{off:?}");
        assert!(off.message().contains("ENROLL_TOKEN"), "{off:?}");
        let id = rec.opened(Duration::from_secs(20)).await;
        let mut signer = quick_bidder(&stack, "signer", port, "BIDDER_KEY_FILE", &key);
        wins_and_exits(&rec, &id, &mut signer).await;

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

/// A bidder enrolls under its own host name and no other: the server's `/etc/hosts` (in a
/// mount namespace of its own) maps `enrolled-0.bidders` to 127.0.0.1, where the test and
/// its clients call from, and `other-1.bidders` to 127.0.0.2.
#[tokio::test]
async fn a_bidder_enrolls_its_own_name_and_no_other() {
    bounded(async {
        let stack = stack().await;
        let rec = recorder(&stack).await;
        let port = free_port();
        let enroll_token = "enroll-token-0123456789";
        let admin_token = "admin-token-0123456789";
        let hosts =
            "127.0.0.1 localhost\n127.0.0.1 enrolled-0.bidders\n127.0.0.2 other-1.bidders\n";
        let env = [
            ("BID_AUTH", "required".to_owned()),
            ("ADMIN_TOKEN", admin_token.to_owned()),
            ("ENROLL_TOKEN", enroll_token.to_owned()),
            ("ENROLL_HOST", "{bidder}.bidders".to_owned()),
            ("OPEN_ON_START", "enrolled lot".to_owned()),
            ("AUCTION_DURATION", "10s".to_owned()),
        ];
        let Some(_server) = server_with_hosts(&stack, "server", port, &env, hosts) else {
            return;
        };
        wait_health(port, "", "SERVING", Duration::from_secs(30)).await;
        let mut admin = Admin::connect(format!("http://127.0.0.1:{port}"))
            .await
            .expect("connect to the admin API");
        let enroll = |bidder: &str, token: Option<&str>| {
            let mut req = tonic::Request::new(pb::EnrollBidderRequest {
                bidder: bidder.into(),
            });
            if let Some(t) = token {
                let bearer = format!("Bearer {t}").parse().expect("metadata");
                req.metadata_mut().insert("authorization", bearer);
            }
            req
        };
        let refused = |r: Result<tonic::Response<pb::RegisterBidderResponse>, tonic::Status>| {
            r.expect_err("refused")
        };

        // Another bidder's name: it resolves to 127.0.0.2, and the call comes from 127.0.0.1.
        let e = refused(
            admin
                .enroll_bidder(enroll("other-1", Some(enroll_token)))
                .await,
        );
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("127.0.0.2"), "{e:?}");
        // No token, or the admin token in its place.
        for token in [None, Some(admin_token)] {
            let e = refused(admin.enroll_bidder(enroll("enrolled-0", token)).await);
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
        // A name that resolves to nothing yet (a DNS record not published): retry later.
        let e = refused(
            admin
                .enroll_bidder(enroll("ghost-2", Some(enroll_token)))
                .await,
        );
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        // A name that is not a host name.
        let e = refused(
            admin
                .enroll_bidder(enroll("Bad_Name", Some(enroll_token)))
                .await,
        );
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

        // An auction-client with the token file enrolls under its own name and wins.
        let id = rec.opened(Duration::from_secs(20)).await;
        let mut enrolled = quick_bidder(
            &stack,
            "enrolled-0",
            port,
            "ENROLL_TOKEN_FILE",
            enroll_token,
        );
        // One claiming other-1's name is never granted a key: it keeps asking, never bids.
        let impostor = client(
            &stack,
            "other-1",
            port,
            &[
                ("BID_INTERVAL", "300ms".into()),
                ("ENROLL_TOKEN", enroll_token.into()),
            ],
        );
        wins_and_exits(&rec, &id, &mut enrolled).await;
        assert!(
            impostor.log().contains("enrollment not granted yet"),
            "{}",
            impostor.log()
        );
        let bidders_of = |events: &[Event]| -> Vec<String> {
            events
                .iter()
                .filter_map(|e| match e {
                    Event::BidAccepted { bidder, .. } => Some(bidder.clone()),
                    _ => None,
                })
                .collect()
        };
        assert!(
            !bidders_of(&rec.events()).iter().any(|b| b == "other-1"),
            "the impostor never bid"
        );
        let listed = admin
            .list_bidders(pb::ListBiddersRequest {})
            .await
            .expect("ListBidders")
            .into_inner();
        let names: Vec<&str> = listed.bidders.iter().map(|b| b.bidder.as_str()).collect();
        assert_eq!(names, ["enrolled-0"]);

        // A wrong token is for an operator to fix: the client stops, saying why.
        let mut wrong = client(
            &stack,
            "enrolled-0",
            port,
            &[("ENROLL_TOKEN", "not-the-enroll-token".into())],
        );
        assert_ne!(
            wrong
                .wait_exit(Duration::from_secs(20))
                .await
                .expect("exit"),
            0
        );
        assert!(
            wrong.log().contains("enrollment refused"),
            "{}",
            wrong.log()
        );
    })
    .await;
}
