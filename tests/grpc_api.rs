//! The gRPC control plane, driven the way operators drive it: with the real grpcurl
//! (reflection, no .proto files), against real servers on a real Sentinel topology.

mod support;

use std::time::Duration;

use auction::runtime::config::DEFAULT_COMMAND_CHANNEL;
use auction::wire::Event;
use serde_json::Value;
use support::*;

const TOKEN: &str = "test-admin-token-0123456789";
const AUTH: &str = "authorization: Bearer test-admin-token-0123456789";

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("test exceeded its time bound");
}

fn bid_json(id: &str, bid_id: &str, amount: u64) -> String {
    format!(
        r#"{{"v":1,"type":"bid","auction_id":"{id}","bid_id":"{bid_id}","bidder":"{bid_id}","amount":{amount}}}"#
    )
}

fn int(v: &Value) -> i64 {
    // grpcurl prints int64 as JSON strings.
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_drives_every_rpc_with_reflection_auth_and_precise_errors() {
    bounded(async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let (guarded, open) = (free_port(), free_port());
        let _a = server(&stack, "server-auth", guarded, &[("ADMIN_TOKEN", TOKEN.into())]);
        let _b = server(&stack, "server-open", open, &[]);
        wait_health(guarded, "", "SERVING", Duration::from_secs(20)).await;
        wait_health(open, "auction.v1.AuctionAdmin", "SERVING", Duration::from_secs(20)).await;
        assert_eq!(health(guarded, "liveness").await, "SERVING");

        // Reflection: list and describe without any .proto file.
        let list = grpcurl(guarded, "list", None, None).await;
        for svc in ["auction.v1.AuctionAdmin", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"] {
            assert!(list.stdout.contains(svc), "list shows {svc}: {list:?}");
        }
        let described = grpcurl(guarded, "describe auction.v1.AuctionAdmin", None, None).await;
        for rpc in ["OpenAuction", "CloseAuction", "GetAuction", "ListAuctions", "ListBids", "WatchAuction"] {
            assert!(described.stdout.contains(&format!("rpc {rpc}")), "describe shows {rpc}: {described:?}");
        }
        let msg = grpcurl(guarded, "describe auction.v1.Auction", None, None).await;
        assert!(msg.stdout.contains("reserve_price") && msg.stdout.contains("google.protobuf.Timestamp deadline"), "{msg:?}");

        // Auth on: mutations need the token; reads do not.
        let open_req = r#"{"item":"Lamp","starting_price":"100","min_increment":"10","duration":"60s","auction_id":"lamp-1"}"#;
        grpcurl(guarded, "auction.v1.AuctionAdmin/OpenAuction", Some(open_req), None).await.assert_code("Unauthenticated");
        grpcurl(guarded, "auction.v1.AuctionAdmin/OpenAuction", Some(open_req), Some("authorization: Bearer wrong-token-wrong-token"))
            .await
            .assert_code("Unauthenticated");
        let opened = grpcurl(guarded, "auction.v1.AuctionAdmin/OpenAuction", Some(open_req), Some(AUTH)).await;
        assert!(opened.ok, "{opened:?}");
        let auction = &opened.json()["auction"];
        assert_eq!(auction["auctionId"], "lamp-1");
        assert_eq!(auction["state"], "AUCTION_STATE_OPEN");
        assert_eq!(int(&auction["nextMin"]), 100);
        grpcurl(guarded, "auction.v1.AuctionAdmin/OpenAuction", Some(open_req), Some(AUTH)).await.assert_code("AlreadyExists");

        // Validation names the offending field.
        for (req, field) in [
            (r#"{"item":"x","starting_price":"-5","min_increment":"1"}"#, "starting_price"),
            (r#"{"item":"","starting_price":"1","min_increment":"1"}"#, "item"),
            (r#"{"item":"x","starting_price":"1","min_increment":"-1"}"#, "min_increment"),
            (r#"{"item":"x","starting_price":"1","min_increment":"1","duration":"0.1s"}"#, "duration"),
            (r#"{"item":"x","starting_price":"1","min_increment":"1","auction_id":"a:b"}"#, "auction_id"),
        ] {
            let out = grpcurl(open, "auction.v1.AuctionAdmin/OpenAuction", Some(req), None).await;
            out.assert_code("InvalidArgument");
            assert!(out.stderr.contains(field), "error names {field}: {}", out.stderr);
        }
        let got = grpcurl(open, "auction.v1.AuctionAdmin/GetAuction", Some(r#"{"auction_id":"lamp-1"}"#), None).await;
        assert_eq!(got.json()["auction"]["item"], "Lamp");
        grpcurl(open, "auction.v1.AuctionAdmin/GetAuction", Some(r#"{"auction_id":"nope"}"#), None).await.assert_code("NotFound");
        grpcurl(open, "auction.v1.AuctionAdmin/GetAuction", Some(r#"{"auction_id":"no}pe"}"#), None).await.assert_code("InvalidArgument");
        grpcurl(open, "auction.v1.AuctionAdmin/ListBids", Some(r#"{"auction_id":"lamp-1","page_size":-1}"#), None)
            .await
            .assert_code("InvalidArgument");
        grpcurl(open, "auction.v1.AuctionAdmin/ListAuctions", Some(r#"{"page_token":"garbage"}"#), None)
            .await
            .assert_code("InvalidArgument");

        // Watch while bids arrive over Pub/Sub; the stream ends by itself after the close.
        let mut watch = tokio::process::Command::new(grpcurl_bin());
        watch
            .args(["-plaintext", "-max-time", "60", "-d", r#"{"auction_id":"lamp-1"}"#])
            .arg(format!("127.0.0.1:{open}"))
            .arg("auction.v1.AuctionAdmin/WatchAuction")
            .kill_on_drop(true)
            .stdout(std::process::Stdio::piped());
        let watch = watch.spawn().expect("start grpcurl watch");
        // Let the watch subscribe: its snapshot is sent once it is registered.
        let mut conn = master_conn(&stack).await;
        let mut amounts = vec![];
        for (i, amount) in [100u64, 150, 120, 400, 410].iter().enumerate() {
            let _: u64 = redis::cmd("PUBLISH")
                .arg(DEFAULT_COMMAND_CHANNEL)
                .arg(bid_json("lamp-1", &format!("bidder-{i}"), *amount))
                .query_async(&mut conn)
                .await
                .expect("publish");
            amounts.push(*amount);
        }
        tap.wait_until("5 outcomes", Duration::from_secs(20), |evs| {
            (of(evs, "lamp-1").iter().filter(|e| e.bid_id().is_some()).count() >= 5).then_some(())
        })
        .await;
        let page1 = grpcurl(open, "auction.v1.AuctionAdmin/ListBids", Some(r#"{"auction_id":"lamp-1","page_size":2}"#), None).await.json();
        let bids1 = page1["bids"].as_array().expect("bids").clone();
        assert_eq!(bids1.iter().map(|b| int(&b["amount"])).collect::<Vec<_>>(), vec![100, 150]);
        let token = page1["nextPageToken"].as_str().expect("a next page").to_owned();
        let page2 = grpcurl(
            open,
            "auction.v1.AuctionAdmin/ListBids",
            Some(&format!(r#"{{"auction_id":"lamp-1","page_size":2,"page_token":"{token}"}}"#)),
            None,
        )
        .await
        .json();
        let bids2: Vec<i64> = page2["bids"].as_array().expect("bids").iter().map(|b| int(&b["amount"])).collect();
        assert_eq!(bids2, vec![400, 410], "120 was rejected (too low)");
        assert!(page2.get("nextPageToken").is_none(), "last page: {page2}");

        // A second auction, so the state filter and paging have something to do.
        let other = grpcurl(open, "auction.v1.AuctionAdmin/OpenAuction", Some(r#"{"item":"Vase","starting_price":"5","min_increment":"1"}"#), None).await;
        assert!(other.ok, "auth off: mutations need no token: {other:?}");
        let other_id = other.json()["auction"]["auctionId"].as_str().expect("id").to_owned();
        assert!(other.json()["auction"]["deadline"].is_string());

        // Auth on the closing server is off; the lease is held by the other server (it
        // opened lamp-1), so the close is forwarded over the control channel.
        grpcurl(guarded, "auction.v1.AuctionAdmin/CloseAuction", Some(r#"{"auction_id":"lamp-1"}"#), None).await.assert_code("Unauthenticated");
        let closed = grpcurl(open, "auction.v1.AuctionAdmin/CloseAuction", Some(r#"{"auction_id":"lamp-1"}"#), None).await;
        assert!(closed.ok, "{closed:?}");
        let fin = &closed.json()["auction"];
        assert_eq!(fin["state"], "AUCTION_STATE_CLOSED");
        assert_eq!(int(&fin["winner"]["amount"]), 410);
        assert_eq!(fin["winner"]["bidder"], "bidder-4");
        grpcurl(guarded, "auction.v1.AuctionAdmin/CloseAuction", Some(r#"{"auction_id":"lamp-1"}"#), Some(AUTH))
            .await
            .assert_code("FailedPrecondition");
        grpcurl(open, "auction.v1.AuctionAdmin/CloseAuction", Some(r#"{"auction_id":"ghost"}"#), None).await.assert_code("NotFound");

        let closed_list = grpcurl(open, "auction.v1.AuctionAdmin/ListAuctions", Some(r#"{"state":"AUCTION_STATE_CLOSED"}"#), None).await.json();
        let ids: Vec<&str> = closed_list["auctions"].as_array().expect("list").iter().filter_map(|a| a["auctionId"].as_str()).collect();
        assert_eq!(ids, vec!["lamp-1"]);
        let open_list = grpcurl(open, "auction.v1.AuctionAdmin/ListAuctions", Some(r#"{"state":"AUCTION_STATE_OPEN"}"#), None).await.json();
        let ids: Vec<&str> = open_list["auctions"].as_array().expect("list").iter().filter_map(|a| a["auctionId"].as_str()).collect();
        assert_eq!(ids, vec![other_id.as_str()]);
        let first = grpcurl(open, "auction.v1.AuctionAdmin/ListAuctions", Some(r#"{"page_size":1}"#), None).await.json();
        assert_eq!(first["auctions"][0]["auctionId"], "lamp-1", "opening order");
        let tok = first["nextPageToken"].as_str().expect("next page").to_owned();
        let second = grpcurl(open, "auction.v1.AuctionAdmin/ListAuctions", Some(&format!(r#"{{"page_size":1,"page_token":"{tok}"}}"#)), None).await.json();
        assert_eq!(second["auctions"][0]["auctionId"], other_id.as_str());
        assert!(second.get("nextPageToken").is_none());

        let out = tokio::time::timeout(Duration::from_secs(20), watch.wait_with_output())
            .await
            .expect("the watch ends after the close")
            .expect("watch output");
        assert!(out.status.success(), "watch ended cleanly");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\"snapshot\""), "{text}");
        assert!(text.contains("\"auctionClosed\""), "{text}");
        assert!(text.contains("\"bidder-4\""), "{text}");
        let closes = tap.events().iter().filter(|e| matches!(e, Event::AuctionClosed { auction_id, .. } if auction_id == "lamp-1")).count();
        assert!(closes >= 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_redis_down_and_back_while_liveness_stays_serving() {
    bounded(async {
        // Every node dies at once below. With `appendfsync everysec` Redis may postpone the
        // write of the last second's commands to its file while an fsync is slow (a loaded
        // machine) and still answer them, so a crash of every node together can lose them;
        // `always` writes and syncs before answering, which is what the check below needs.
        let mut stack = auction_testkit::DevStack::start(auction_testkit::DevStackConfig {
            extra_redis_conf: vec!["appendfsync always".to_owned()],
            ..auction_testkit::DevStackConfig::default()
        })
        .await
        .expect("start the local Redis topology");
        let port = free_port();
        let mut srv = server(&stack, "server", port, &[]);
        wait_health(port, "", "SERVING", Duration::from_secs(20)).await;
        let opened = grpcurl(
            port,
            "auction.v1.AuctionAdmin/OpenAuction",
            Some(r#"{"item":"x","starting_price":"1","min_increment":"1","auction_id":"h1"}"#),
            None,
        )
        .await;
        assert!(opened.ok, "{opened:?}");

        stack.kill_all_data_nodes().expect("stop redis");
        wait_health(port, "", "NOT_SERVING", Duration::from_secs(20)).await;
        assert_eq!(health(port, "auction.v1.AuctionAdmin").await, "NOT_SERVING");
        assert_eq!(
            health(port, "liveness").await,
            "SERVING",
            "a Redis outage must not fail liveness"
        );
        grpcurl(
            port,
            "auction.v1.AuctionAdmin/GetAuction",
            Some(r#"{"auction_id":"h1"}"#),
            None,
        )
        .await
        .assert_code("Unavailable");

        for i in 0..stack.redis_ports().len() {
            stack.restart_node(i).await.expect("restart redis");
        }
        wait_health(port, "", "SERVING", Duration::from_secs(60)).await;
        let got = grpcurl(
            port,
            "auction.v1.AuctionAdmin/GetAuction",
            Some(r#"{"auction_id":"h1"}"#),
            None,
        )
        .await;
        assert!(got.ok, "the auction survived (append-only file): {got:?}");

        srv.terminate();
        let code = srv
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("exits within the grace period");
        assert_eq!(code, 0);
        assert!(srv.log().contains("shutting down: NOT_SERVING"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_not_serving_until_the_server_is() {
    bounded(async {
        let stack = stack().await;
        let (server_port, client_health) = (free_port(), free_port());
        let _client = client(
            &stack,
            "bidder",
            server_port,
            &[("HEALTH_ADDR", format!("127.0.0.1:{client_health}"))],
        );
        wait_health(
            client_health,
            "liveness",
            "SERVING",
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(
            health(client_health, "").await,
            "NOT_SERVING",
            "no server yet"
        );
        let _srv = server(&stack, "server", server_port, &[]);
        wait_health(server_port, "", "SERVING", Duration::from_secs(20)).await;
        wait_health(client_health, "", "SERVING", Duration::from_secs(20)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_close_racing_bids_and_another_close_happens_exactly_once() {
    use auction::proto::v1 as pb;
    use pb::auction_admin_client::AuctionAdminClient;
    bounded(async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let ports = [free_port(), free_port()];
        let _servers: Vec<Proc> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| server(&stack, &format!("server-{i}"), *p, &[]))
            .collect();
        for p in ports {
            wait_health(p, "", "SERVING", Duration::from_secs(20)).await;
        }
        let mut a = AuctionAdminClient::connect(format!("http://127.0.0.1:{}", ports[0]))
            .await
            .expect("connect a");
        let mut b = AuctionAdminClient::connect(format!("http://127.0.0.1:{}", ports[1]))
            .await
            .expect("connect b");
        a.open_auction(pb::OpenAuctionRequest {
            item: "race".into(),
            starting_price: 1,
            min_increment: 1,
            auction_id: "race".into(),
            duration: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("open");
        let mut conn = master_conn(&stack).await;
        let mut pipe = redis::pipe();
        for n in 1..=1500u64 {
            pipe.cmd("PUBLISH")
                .arg(DEFAULT_COMMAND_CHANNEL)
                .arg(bid_json("race", &format!("r{n}"), n))
                .ignore();
        }
        let close_a = a.close_auction(pb::CloseAuctionRequest {
            auction_id: "race".into(),
        });
        let close_b = b.close_auction(pb::CloseAuctionRequest {
            auction_id: "race".into(),
        });
        let (published, ra, rb) = tokio::join!(pipe.query_async::<()>(&mut conn), close_a, close_b);
        published.expect("publish");
        let finals: Vec<pb::Auction> = [ra, rb]
            .into_iter()
            .filter_map(|r| match r {
                Ok(resp) => resp.into_inner().auction,
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
                    None
                }
            })
            .collect();
        assert!(!finals.is_empty(), "one close succeeded");
        assert!(
            finals.windows(2).all(|w| w[0] == w[1]),
            "both callers see the same final auction"
        );
        let close = tap.closed("race", Duration::from_secs(20)).await;
        // Let stragglers (bids judged after the close, re-announcements) arrive, bounded.
        tap.wait_until("1500 outcomes", Duration::from_secs(30), |evs| {
            (of(evs, "race")
                .iter()
                .filter(|e| e.bid_id().is_some())
                .count()
                >= 1500)
                .then_some(())
        })
        .await;
        let events = tap.events();
        let closes: std::collections::HashSet<String> = of(&events, "race")
            .iter()
            .filter(|e| matches!(e, Event::AuctionClosed { .. }))
            .map(Event::to_json)
            .collect();
        assert_eq!(closes.len(), 1, "exactly one close: {closes:?}");
        let Event::AuctionClosed {
            seq: close_seq,
            amount,
            ..
        } = close
        else {
            unreachable!()
        };
        let accepted: Vec<(u64, u64)> = of(&events, "race")
            .iter()
            .filter_map(|e| match e {
                Event::BidAccepted { seq, amount, .. } => Some((*seq, *amount)),
                _ => None,
            })
            .collect();
        assert!(
            accepted.iter().all(|(s, _)| *s < close_seq),
            "no bid accepted after the close"
        );
        assert_eq!(
            amount,
            accepted.iter().map(|(_, a)| *a).max(),
            "the winner is the highest accepted bid"
        );
        let fin = &finals[0];
        assert_eq!(fin.winner.as_ref().map(|w| w.amount as u64), amount);
        assert_eq!(fin.bid_count as usize, accepted.len());
        assert_gapless(&events, "race");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_auction_is_forgotten_after_its_retention_and_page_tokens_are_checked() {
    bounded(async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let port = free_port();
        let _srv = server(&stack, "server", port, &[("RETENTION", "3s".into())]);
        wait_health(port, "", "SERVING", Duration::from_secs(20)).await;

        // Page tokens are checked at the boundary: no overflow, no Redis error.
        for token in ["o18446744073709551615", "c18446744073709551616:a", "c1:a}b", "c-1:a"] {
            let req = format!(r#"{{"page_token":"{token}"}}"#);
            let out = grpcurl(port, "auction.v1.AuctionAdmin/ListAuctions", Some(&req), None).await;
            out.assert_code("InvalidArgument");
            assert!(out.stderr.contains("page_token"), "{token}: {}", out.stderr);
        }
        for token in ["18446744073709551616-0", "0-18446744073709551616", "1-x"] {
            let req = format!(r#"{{"auction_id":"gone","page_token":"{token}"}}"#);
            grpcurl(port, "auction.v1.AuctionAdmin/ListBids", Some(&req), None).await.assert_code("InvalidArgument");
        }

        for id in ["brief", "lasting"] {
            let req = format!(r#"{{"item":"{id}","starting_price":"100","min_increment":"10","duration":"60s","auction_id":"{id}"}}"#);
            let opened = grpcurl(port, "auction.v1.AuctionAdmin/OpenAuction", Some(&req), None).await;
            assert!(opened.ok, "{opened:?}");
        }
        let mut conn = master_conn(&stack).await;
        let bid = bid_json("brief", "early-1", 100);
        let _: u64 = redis::cmd("PUBLISH").arg(DEFAULT_COMMAND_CHANNEL).arg(&bid).query_async(&mut conn).await.expect("publish");
        tap.wait_until("the bid accepted", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| matches!(e, Event::BidAccepted { bid_id, .. } if bid_id == "early-1")).then_some(())
        })
        .await;
        let closed = grpcurl(port, "auction.v1.AuctionAdmin/CloseAuction", Some(r#"{"auction_id":"brief"}"#), None).await;
        assert!(closed.ok, "{closed:?}");
        // Still kept right after the close.
        let got = grpcurl(port, "auction.v1.AuctionAdmin/GetAuction", Some(r#"{"auction_id":"brief"}"#), None).await;
        assert_eq!(got.json()["auction"]["state"], "AUCTION_STATE_CLOSED", "{got:?}");

        // RETENTION after the close it is gone: reads answer NOT_FOUND, and it is listed no more.
        eventually_every("the closed auction to be forgotten", Duration::from_secs(20), Duration::from_millis(300), || async {
            let get = grpcurl(port, "auction.v1.AuctionAdmin/GetAuction", Some(r#"{"auction_id":"brief"}"#), None).await;
            let bids = grpcurl(port, "auction.v1.AuctionAdmin/ListBids", Some(r#"{"auction_id":"brief"}"#), None).await;
            let list = grpcurl(port, "auction.v1.AuctionAdmin/ListAuctions", None, None).await;
            let listed: Vec<String> = serde_json::from_str::<Value>(&list.stdout)
                .ok()
                .and_then(|v| v["auctions"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|a| a["auctionId"].as_str().map(str::to_owned))
                .collect();
            // Listed no more may come before the sweep (a gone auction is skipped); the
            // indexes themselves must be swept too.
            let mut conn = conn.clone();
            let indexed: Vec<String> = redis::cmd("ZRANGE").arg("auctions:all").arg(0).arg(-1).query_async(&mut conn).await.map_err(|e| e.to_string())?;
            let closed: Vec<String> = redis::cmd("ZRANGE").arg("auctions:closed").arg(0).arg(-1).query_async(&mut conn).await.map_err(|e| e.to_string())?;
            let not_found = |g: &Grpcurl| !g.ok && g.stderr.contains("Code: NotFound");
            if not_found(&get) && not_found(&bids) && listed == ["lasting"] && indexed == ["lasting"] && closed.is_empty() {
                Ok(())
            } else {
                Err(format!("GetAuction {get:?}; ListBids {bids:?}; listed {listed:?}; auctions:all {indexed:?}; auctions:closed {closed:?}"))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

        // A late retry of its bid is answered unknown_auction.
        let _: u64 = redis::cmd("PUBLISH").arg(DEFAULT_COMMAND_CHANNEL).arg(&bid).query_async(&mut conn).await.expect("publish");
        tap.wait_until("the late retry refused", Duration::from_secs(20), |evs| {
            evs.iter()
                .any(|e| matches!(e, Event::BidRejected { bid_id, reason: auction::wire::RejectReason::UnknownAuction, .. } if bid_id == "early-1"))
                .then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_watch_open_ends_the_stream_drains_and_releases_the_lease() {
    use auction::proto::v1 as pb;
    use pb::auction_admin_client::AuctionAdminClient;
    bounded(async {
        let stack = stack().await;
        let port = free_port();
        let grace = Duration::from_secs(10);
        // A long lease, so that only a release (not an expiry) can remove it right after exit.
        let mut srv = server(
            &stack,
            "server",
            port,
            &[
                ("SHUTDOWN_GRACE", "10s".into()),
                ("LOCK_LEASE", "30s".into()),
            ],
        );
        wait_health(port, "", "SERVING", Duration::from_secs(20)).await;
        let mut admin = AuctionAdminClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .expect("connect");
        admin
            .open_auction(pb::OpenAuctionRequest {
                item: "drain".into(),
                starting_price: 1,
                min_increment: 1,
                auction_id: "drain".into(),
                duration: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("open");
        let lock_key = "lock:auction:{drain}";
        let mut conn = master_conn(&stack).await;
        let held: u64 = redis::cmd("EXISTS")
            .arg(lock_key)
            .query_async(&mut conn)
            .await
            .expect("EXISTS");
        assert_eq!(held, 1, "the server holds the auction's lease");

        let mut stream = admin
            .watch_auction(pb::WatchAuctionRequest {
                auction_id: "drain".into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the snapshot arrives")
            .expect("a message")
            .expect("not the end");
        assert!(
            matches!(
                first.kind,
                Some(pb::watch_auction_response::Kind::Snapshot(_))
            ),
            "{first:?}"
        );

        let asked = std::time::Instant::now();
        srv.terminate();
        let code = srv
            .wait_exit(grace)
            .await
            .expect("exits within SHUTDOWN_GRACE");
        let took = asked.elapsed();
        // Right after exit: released, not left to expire.
        let held: u64 = redis::cmd("EXISTS")
            .arg(lock_key)
            .query_async(&mut conn)
            .await
            .expect("EXISTS");
        assert_eq!(
            held,
            0,
            "the lease was released at shutdown; log:\n{}",
            srv.log()
        );
        assert_eq!(code, 0, "log:\n{}", srv.log());
        assert!(
            took < grace / 2,
            "exited in {took:?}, well under SHUTDOWN_GRACE ({grace:?}); log:\n{}",
            srv.log()
        );
        let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the stream ends");
        let status = end.expect_err("the stream ends with a status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shutting down"), "{status:?}");
        let log = srv.log();
        for sign in [
            "did not stop in time",
            "did not finish within the drain period",
        ] {
            assert!(!log.contains(sign), "{sign}:\n{log}");
        }
    })
    .await;
}
