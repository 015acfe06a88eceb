//! Finding the master through Sentinel and following it through a real failover.

mod support;

use std::time::Duration;

use auction::link::sentinel::{self, Master, ResolveError, Settings};
use auction::link::subscription::Subscription;
use auction::runtime::config::HostPort;
use auction_testkit::eventually;
use support::*;
use tokio::sync::mpsc;

fn settings(sentinels: &[String], name: &str) -> Settings {
    let mut args = auction::runtime::config::RedisArgs::local(sentinels).expect("addrs");
    args.master_name = name.into();
    Settings::from_args(&args)
}

#[tokio::test]
async fn no_sentinel_reachable_and_unknown_master_name_are_distinct_errors() {
    // A port nothing listens on: bind, learn the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let err = sentinel::resolve(&settings(&[format!("127.0.0.1:{dead}")], "mymaster"), 1)
        .await
        .err()
        .expect("nothing to resolve");
    assert!(matches!(err, ResolveError::NoSentinelReachable(_)), "{err}");
    assert!(
        err.to_string().contains("REDIS_SENTINELS"),
        "says what to check: {err}"
    );

    let stack = stack().await;
    let err = sentinel::resolve(&settings(&stack.sentinel_addrs(), "othermaster"), 1)
        .await
        .err()
        .expect("unknown name");
    assert!(
        matches!(err, ResolveError::MasterUnknown { asked: 3, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("REDIS_MASTER_NAME"),
        "says what to check: {err}"
    );

    // A dead Sentinel first in the list is skipped.
    let mut addrs = vec![format!("127.0.0.1:{dead}")];
    addrs.extend(stack.sentinel_addrs());
    let link = sentinel::resolve(&settings(&addrs, "mymaster"), 7)
        .await
        .expect("resolves");
    assert_eq!(
        link.addr,
        HostPort {
            host: "127.0.0.1".into(),
            port: stack.node_port(0)
        }
    );
    assert_eq!(link.generation, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_handle_and_subscriptions_follow_a_failover() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut stack = stack().await;
        let master = Master::start(settings(&stack.sentinel_addrs(), "mymaster"));
        let first = master
            .link(Duration::from_secs(10))
            .await
            .expect("first link");
        assert_eq!(first.addr.port, stack.node_port(0));
        let (tx, rx) = mpsc::channel(16);
        let sub = Subscription::start(master.clone(), vec!["probe".into()], tx);
        let mut live = sub.watch_live();
        tokio::time::timeout(Duration::from_secs(10), live.wait_for(|l| *l))
            .await
            .expect("subscribed")
            .expect("live");

        stack.kill_node(0).expect("kill master");
        let new_port = stack
            .wait_for_master_change(first.addr.port, Duration::from_secs(30))
            .await
            .expect("failover");
        // The handle re-resolves by itself (probe failure, +switch-master, or both).
        let what = format!("the handle to move to the new master on {new_port}");
        let second = eventually(&what, Duration::from_secs(30), || async {
            match master.link(Duration::from_secs(1)).await {
                Ok(l) if l.addr.port == new_port => Ok(l),
                Ok(l) => Err(format!(
                    "linked to {} (generation {})",
                    l.addr, l.generation
                )),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(second.generation > first.generation);
        // The new master refuses writes (NOREPLICAS) until the surviving replica has
        // been repointed at it and synced.
        stack
            .wait_writable(new_port, Duration::from_secs(30))
            .await
            .expect("new master accepts writes");
        let mut conn = second.conn.clone();
        let _: () = redis::cmd("SET")
            .arg("after-failover")
            .arg("1")
            .query_async(&mut conn)
            .await
            .expect("write to new master");

        // The subscription is re-established on the new master: publish until it arrives
        // (Pub/Sub is at-most-once, so a message sent before resubscription is lost).
        // (The receiver sits behind a lock because each probe borrows it anew.)
        let rx = tokio::sync::Mutex::new(rx);
        let msg = eventually(
            "the subscription to come back after failover",
            Duration::from_secs(30),
            || async {
                let mut conn = conn.clone();
                let _: u64 = redis::cmd("PUBLISH")
                    .arg("probe")
                    .arg("hello")
                    .query_async(&mut conn)
                    .await
                    .expect("publish");
                match tokio::time::timeout(Duration::from_millis(200), rx.lock().await.recv()).await
                {
                    Ok(Some(msg)) => Ok(msg),
                    Ok(None) => Err("the subscription's channel closed".to_owned()),
                    Err(_) => Err("published; nothing delivered within 200 ms".to_owned()),
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(msg.payload, b"hello");
        assert!(sub.is_live());
    })
    .await
    .expect("bounded");
}
