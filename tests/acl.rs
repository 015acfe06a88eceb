//! The Redis ACL users of `deploy/` on real Redis: the data nodes load the ACL file exactly
//! as a pod renders it (the ConfigMap's `redis-start.sh`, the Secret's generated passwords).
//! A bidder can bid and listen and nothing else; the server touches only auction keys and
//! its channels; and the real binaries, logged in as those users, run an auction to its
//! winner and the server keeps it for its retention, then forgets it, without a single
//! command refused (`ACL LOG` stays empty).

mod deploy;
mod support;

use std::time::Duration;

use auction_testkit::{DevStack, DevStackConfig};
use support::*;

/// The users of the rendered manifests, with the example passwords of the Secret.
struct Users {
    rendered: deploy::Rendered,
}

impl Users {
    fn load() -> Users {
        Users {
            rendered: deploy::render("base"),
        }
    }

    fn password(&self, key: &str) -> String {
        self.rendered.secret("redis-users", key)
    }
}

/// A master, 2 replicas and 3 Sentinels whose data nodes run the deployed ACL file.
async fn acl_stack(users: &Users, dir: &std::path::Path) -> DevStack {
    let aclfile = deploy::render_acl_file(&users.rendered, dir);
    let config = DevStackConfig {
        extra_redis_conf: vec![
            format!("aclfile {}", aclfile.display()),
            "masteruser replica".to_owned(),
            format!("masterauth {}", users.password("REPLICA_PASSWORD")),
        ],
        extra_sentinel_conf: vec![
            "sentinel auth-user mymaster sentinel".to_owned(),
            format!(
                "sentinel auth-pass mymaster {}",
                users.password("SENTINEL_PASSWORD")
            ),
        ],
        probe_credentials: Some(("admin".to_owned(), users.password("ADMIN_PASSWORD"))),
        ..DevStackConfig::default()
    };
    DevStack::start(config)
        .await
        .expect("start a topology with the deployed ACL file")
}

/// Runs `cmd` and returns the error text, panicking if it succeeded.
fn refused(conn: &mut redis::Connection, cmd: &redis::Cmd, what: &str) -> String {
    match cmd.query::<redis::Value>(conn) {
        Ok(v) => panic!("{what} was allowed: {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_noperm(conn: &mut redis::Connection, cmd: &redis::Cmd, what: &str) {
    let err = refused(conn, cmd, what);
    assert!(
        err.contains("NOPERM") || err.contains("no permissions"),
        "{what}: expected NOPERM, got {err}"
    );
}

fn cmd(parts: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(parts[0]);
    for p in &parts[1..] {
        c.arg(*p);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_may_do_its_job_and_nothing_else() {
    let users = Users::load();
    let dir = tempfile::tempdir().expect("tempdir");
    let stack = acl_stack(&users, dir.path()).await;
    let port = stack.current_master_port().await.expect("master");
    let bidder_pw = users.password("BIDDER_PASSWORD");
    let server_pw = users.password("SERVER_PASSWORD");
    let sentinel_pw = users.password("SENTINEL_PASSWORD");

    // Nobody gets in without logging in.
    let mut anonymous = deploy::connect_as(port, None);
    let err = refused(
        &mut anonymous,
        &cmd(&["GET", "auction:{a1}"]),
        "anonymous GET",
    );
    assert!(err.contains("NOAUTH"), "anonymous: {err}");

    // A bidder may bid and listen to events...
    let mut bidder = deploy::connect_as(port, Some(("auction-bidder", &bidder_pw)));
    let _: i64 = cmd(&["PUBLISH", "comando-leilao", "{}"])
        .query(&mut bidder)
        .expect("a bidder may publish bids");
    let _: redis::Value = cmd(&["PING"]).query(&mut bidder).expect("PING");
    let _: redis::Value = cmd(&["ROLE"]).query(&mut bidder).expect("ROLE");
    // ...but cannot write or read any key, run scripts, or touch the server's state...
    for c in [
        &["SET", "auction:{a1}", "x"][..],
        &["HSET", "auction:{a1}", "state", "closed"],
        &["GET", "lock:auction:{a1}"],
        &["DEL", "auctions:open"],
        &["ZADD", "auctions:open", "0", "a1"],
        &["XADD", "auction:{a1}:bids", "*", "amount", "1"],
        &[
            "EVAL",
            "return redis.call('SET', KEYS[1], 'x')",
            "1",
            "auction:{a1}",
        ],
        &["FLUSHALL"],
        &["CONFIG", "SET", "appendonly", "no"],
        &["KEYS", "*"],
    ] {
        assert_noperm(&mut bidder, &cmd(c), &format!("bidder {c:?}"));
    }
    // ...cannot publish fake events, control messages or Sentinel hellos...
    for channel in [
        "notificacao-leilao",
        "auction-control",
        "__sentinel__:hello",
    ] {
        assert_noperm(
            &mut bidder,
            &cmd(&["PUBLISH", channel, r#"{"v":1,"type":"auction_closed"}"#]),
            &format!("bidder PUBLISH {channel}"),
        );
    }
    // ...and cannot listen to other bidders' bids or the servers' channel.
    for c in [
        &["SUBSCRIBE", "comando-leilao"][..],
        &["SUBSCRIBE", "auction-control"],
        &["PSUBSCRIBE", "*"],
    ] {
        let mut fresh = deploy::connect_as(port, Some(("auction-bidder", &bidder_pw)));
        assert_noperm(&mut fresh, &cmd(c), &format!("bidder {c:?}"));
    }
    let mut listener = deploy::connect_as(port, Some(("auction-bidder", &bidder_pw)));
    let _: redis::Value = cmd(&["SUBSCRIBE", "notificacao-leilao"])
        .query(&mut listener)
        .expect("a bidder may subscribe to events");

    // The server touches auction keys only and never forges bids.
    let mut server = deploy::connect_as(port, Some(("auction-server", &server_pw)));
    let _: redis::Value = cmd(&["HGETALL", "auction:{a1}"])
        .query(&mut server)
        .expect("the server reads auctions");
    let _: redis::Value = cmd(&["EVAL", "return redis.call('TIME')", "0"])
        .query(&mut server)
        .expect("the server runs scripts");
    for c in [
        &["SET", "other-key", "x"][..],
        &[
            "EVAL",
            "return redis.call('SET', KEYS[1], 'x')",
            "1",
            "other-key",
        ],
        &["PUBLISH", "comando-leilao", "{}"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "*"],
        &["KEYS", "*"],
        &["SUBSCRIBE", "__sentinel__:hello"],
    ] {
        assert_noperm(&mut server, &cmd(c), &format!("server {c:?}"));
    }

    // Sentinel's user manages replication, not data.
    let mut sentinel = deploy::connect_as(port, Some(("sentinel", &sentinel_pw)));
    assert_noperm(
        &mut sentinel,
        &cmd(&["GET", "auction:{a1}"]),
        "sentinel GET",
    );
    assert_noperm(
        &mut sentinel,
        &cmd(&["PUBLISH", "notificacao-leilao", "x"]),
        "sentinel PUBLISH events",
    );

    // The refusals above are in ACL LOG, so an empty log elsewhere means something.
    let denials = deploy::acl_denials(port, &users.password("ADMIN_PASSWORD"));
    assert!(
        denials.iter().any(|d| d.contains("auction-bidder")),
        "ACL LOG records the bidder's refusals: {denials:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binaries_run_an_auction_as_their_acl_users() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let users = Users::load();
        let dir = tempfile::tempdir().expect("tempdir");
        let stack = acl_stack(&users, dir.path()).await;
        let master = stack.current_master_port().await.expect("master");
        let admin_pw = users.password("ADMIN_PASSWORD");
        // Denials recorded while the stack started (there should be none) are not ours to judge
        // here; start from a clean log.
        let _: () = cmd(&["ACL", "LOG", "RESET"])
            .query(&mut deploy::connect_as(master, Some(("admin", &admin_pw))))
            .expect("ACL LOG RESET");

        let grpc = free_port();
        let _server = server(
            &stack,
            "server",
            grpc,
            &[
                ("REDIS_USERNAME", "auction-server".into()),
                ("REDIS_PASSWORD", users.password("SERVER_PASSWORD")),
                // Short, so that the retention sweeper runs within the test.
                ("RETENTION", "5s".into()),
            ],
        );
        wait_health(grpc, "", "SERVING", Duration::from_secs(30)).await;
        let health = free_port();
        let mut bidder = client(
            &stack,
            "bidder-1",
            grpc,
            &[
                ("REDIS_USERNAME", "auction-bidder".into()),
                ("REDIS_PASSWORD", users.password("BIDDER_PASSWORD")),
                ("HEALTH_ADDR", format!("127.0.0.1:{health}")),
                ("BID_INTERVAL", "300ms".into()),
            ],
        );
        // SERVING: subscribed to events as auction-bidder, and the server is SERVING.
        wait_health(health, "", "SERVING", Duration::from_secs(30)).await;

        let opened = grpcurl(
            grpc,
            "auction.v1.AuctionAdmin/OpenAuction",
            Some(r#"{"item":"ACL lamp","starting_price":"100","min_increment":"10","reserve_price":"0","duration":"4s","auction_id":"acl-1"}"#),
            None,
        )
        .await;
        assert!(opened.ok, "OpenAuction: {opened:?}");
        // Without KEEP_GOING the bidder exits 0 once it has seen its auction close.
        let code = bidder.wait_exit(Duration::from_secs(40)).await.expect("bidder exits");
        assert_eq!(code, 0, "bidder log:\n{}", bidder.log());

        let got = grpcurl(
            grpc,
            "auction.v1.AuctionAdmin/GetAuction",
            Some(r#"{"auction_id":"acl-1"}"#),
            None,
        )
        .await;
        let auction = &got.json()["auction"];
        assert_eq!(auction["state"], "AUCTION_STATE_CLOSED", "{auction}");
        assert_eq!(auction["winner"]["bidder"], "bidder-1", "{auction}");

        // After its retention the auction is gone, and out of every index: the server's user
        // may run the retention sweep (and INFO, polled every 5 s for the memory metrics).
        let mut admin = deploy::connect_as(master, Some(("admin", &admin_pw)));
        auction_testkit::eventually("the closed auction to be forgotten", Duration::from_secs(20), || {
            let indexed: Result<u64, _> = cmd(&["ZCARD", "auctions:all"]).query(&mut admin);
            let gone = async { grpcurl(grpc, "auction.v1.AuctionAdmin/GetAuction", Some(r#"{"auction_id":"acl-1"}"#), None).await };
            async move {
                let listed = indexed.map_err(|e| e.to_string())?;
                let got = gone.await;
                if listed == 0 && !got.ok && got.stderr.contains("Code: NotFound") {
                    Ok(())
                } else {
                    Err(format!("{listed} in auctions:all; GetAuction: {}{}", got.stdout, got.stderr))
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

        // Not one command of either binary was refused on the master.
        let denials = deploy::acl_denials(master, &admin_pw);
        assert!(denials.is_empty(), "commands refused by ACL: {denials:#?}");
    })
    .await
    .expect("test exceeded its time bound");
}
