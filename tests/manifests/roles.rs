//! The data nodes' role scripts, the same files the pods run, on a loopback topology started
//! from the ConfigMaps (`deploy::pods`):
//!
//! - a master killed and restarted at once, having lost what it had not fsync'd, does not
//!   serve as master again: it holds back until Sentinel has promoted the replica that
//!   acknowledged the write, then comes back as that master's replica; a Sentinel's preStop
//!   during that failover waits for it to end;
//! - a master's preStop switches over: writes paused, a new master named, this node its
//!   replica, writes resume, nothing acknowledged lost; a replica's preStop does nothing, and
//!   the stopped master's next start follows the new master;
//! - when Sentinel cannot fail over (no majority), a restarted master's hold ends in a refusal
//!   while a replica answers, and in serving as master only once no other data node does;
//! - bad input (an example password, a malformed address or number) stops the start script
//!   with a sentence saying what to do.

use std::time::Duration;

use auction_testkit::eventually;

use crate::deploy::{self, pods, pods::Topology};

/// The port a Sentinel names as master once every answering Sentinel names the same node
/// and that node is not `old`.
async fn new_master(topology: &Topology, old: u16) -> u16 {
    eventually(
        &format!("every Sentinel to name a master other than {old}"),
        Duration::from_secs(60),
        || async {
            let named = topology.named_masters();
            match named.first() {
                Some(Some(port)) if *port != old && named.iter().all(|p| *p == Some(*port)) => {
                    Ok(*port)
                }
                _ => Err(format!("Sentinels name {named:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until the data node on `port` is a replica of `master` with its link up.
async fn wait_replica_of(port: u16, master: u16, admin: &str) {
    eventually(
        &format!("{port} to replicate {master} with its link up"),
        Duration::from_secs(30),
        || async {
            let info = pods::info(port, admin, "replication")?;
            let field = |name| auction_testkit::info_field(&info, name);
            if field("role") == Some("slave")
                && field("master_port") == Some(&master.to_string())
                && field("master_link_status") == Some("up")
            {
                Ok(())
            } else {
                Err(format!(
                    "role {:?}, master_port {:?}, link {:?}",
                    field("role"),
                    field("master_port"),
                    field("master_link_status")
                ))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Writes resume on `master`: a write acknowledged by a replica (once the replicas have
/// reattached, min-replicas-to-write lets it through).
async fn writes_resume(master: u16, admin: &str, key: &str) {
    eventually(
        &format!("a write acknowledged by a replica on the new master {master}"),
        Duration::from_secs(30),
        || async {
            match pods::write_acknowledged(master, admin, key, "after") {
                Ok(n) if n >= 1 => Ok(()),
                Ok(n) => Err(format!("WAIT 1 answered {n}")),
                Err(e) => Err(e),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// The port of the Sentinel that has a failover in progress, or `None` once the failover is
/// over (a master other than `old` is named) before one was seen.
async fn sentinel_failing_over(topology: &Topology, old: u16) -> Option<usize> {
    eventually(
        "a Sentinel to start the failover",
        Duration::from_secs(60),
        || async {
            for (i, port) in topology.sentinel_ports.iter().enumerate() {
                let flags = pods::sentinel_master(*port, &topology.admin)
                    .ok()
                    .and_then(|m| m.get("flags").cloned())
                    .unwrap_or_default();
                if flags.contains("failover_in_progress") {
                    return Ok(Some(i));
                }
            }
            let named = topology.named_masters();
            if named.iter().any(|p| p.is_some_and(|p| p != old)) {
                return Ok(None);
            }
            Err(format!(
                "no failover in progress yet; Sentinels name {named:?}"
            ))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The dev overlay's data nodes and Sentinels on loopback, the `admin` password, and the
/// initial master's port.
async fn dev_topology() -> (Topology, String, u16) {
    let topology = Topology::start(&deploy::render("overlays/dev")).await;
    let admin = topology.admin.clone();
    let master = topology.node_ports[0];
    (topology, admin, master)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_at_once_holds_back_until_the_replica_with_its_writes_is_promoted() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let (mut topology, admin, old) = dev_topology().await;
        let acked = pods::write_acknowledged(old, &admin, "durable", "acknowledged")
            .expect("a write on the master");
        assert!(acked >= 1, "WAIT 1 answered {acked}");

        // OOM-killed, and its append-only file lost what it had not fsync'd: here everything,
        // the worst case. The kubelet restarts the container at once.
        topology.kill_node(0).await;
        let data = topology.nodes[0].volume("data");
        std::fs::remove_dir_all(&data).expect("lose the master's data");
        std::fs::create_dir_all(&data).expect("mkdir");
        topology.node_procs[0] = topology.nodes[0].start("redis-0-restarted");

        // Held back: the Sentinels still name it, so it does not serve (Sentinel cannot have
        // seen it down yet: down-after-milliseconds is 5 s).
        let restarted = &topology.node_procs[0];
        eventually(
            "redis-start.sh to hold the restarted master back",
            Duration::from_secs(10),
            || async {
                let log = restarted.log();
                if log.contains("holding redis-server back") {
                    Ok(())
                } else {
                    Err(log)
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            pods::role(old, &admin).is_err(),
            "the restarted master answers before a replica was promoted"
        );

        // A Sentinel stopped during the failover (its preStop) waits for the failover to end.
        if let Some(i) = sentinel_failing_over(&topology, old).await {
            let sentinel = &topology.sentinels[i];
            let out = tokio::task::block_in_place(|| sentinel.pre_stop());
            let flags = pods::sentinel_master(topology.sentinel_ports[i], &admin)
                .expect("SENTINEL MASTER")
                .get("flags")
                .cloned()
                .unwrap_or_default();
            assert!(
                !flags.contains("failover_in_progress"),
                "{} preStop returned during the failover ({flags}): {out}",
                sentinel.name
            );
        } else {
            eprintln!("the failover ended before a Sentinel's preStop could be run during it");
        }

        let promoted = new_master(&topology, old).await;
        wait_replica_of(old, promoted, &admin).await;
        let log = topology.node_procs[0].log();
        assert!(
            log.contains("holding redis-server back") && log.contains("starting as its replica"),
            "redis-start.sh did not hold back: {log}"
        );
        for port in [promoted, old] {
            assert_eq!(
                pods::read(port, &admin, "durable").expect("GET"),
                Some("acknowledged".to_owned()),
                "the acknowledged write is lost on {port}"
            );
        }
        writes_resume(promoted, &admin, "after-restart").await;
        topology.assert_no_acl_refusals();
    })
    .await
    .expect("test exceeded its time bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masters_pre_stop_switches_over_and_writes_resume() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let (mut topology, admin, old) = dev_topology().await;
        for i in 0..20 {
            let acked = pods::write_acknowledged(old, &admin, &format!("before-{i}"), "v")
                .expect("a write on the master");
            assert!(acked >= 1, "WAIT 1 answered {acked}");
        }

        let out = tokio::task::block_in_place(|| topology.nodes[1].pre_stop());
        assert!(
            out.contains("nothing to hand over"),
            "replica preStop: {out}"
        );
        assert_eq!(pods::role(old, &admin).as_deref(), Ok("master"));

        let out = tokio::task::block_in_place(|| topology.nodes[0].pre_stop());
        eprintln!("redis-0 preStop:\n{out}");
        assert!(out.contains("switched over to"), "master preStop: {out}");
        // When the hook returns, this node already follows the new master: the kubelet's
        // SIGTERM stops a replica.
        assert_eq!(pods::role(old, &admin).as_deref(), Ok("slave"), "{out}");
        let promoted = new_master(&topology, old).await;
        for i in 0..20 {
            assert_eq!(
                pods::read(promoted, &admin, &format!("before-{i}")).expect("GET"),
                Some("v".to_owned()),
                "an acknowledged write is lost in the switchover"
            );
        }
        writes_resume(promoted, &admin, "after-switchover").await;

        // The kubelet stops the container; the pod's next start follows the new master.
        topology.node_procs[0].terminate();
        topology.node_procs[0]
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("redis-0 stops on SIGTERM");
        topology.node_procs[0] = topology.nodes[0].start("redis-0-after-stop");
        wait_replica_of(old, promoted, &admin).await;
        let log = topology.node_procs[0].log();
        assert!(
            log.contains("starting as its replica") && !log.contains("holding"),
            "redis-start.sh after a switchover: {log}"
        );

        // With no failover in progress a Sentinel's preStop returns at once.
        for sentinel in &topology.sentinels {
            let out = tokio::task::block_in_place(|| sentinel.pre_stop());
            assert!(out.contains("no failover"), "{}: {out}", sentinel.name);
        }
        topology.assert_no_acl_refusals();
    })
    .await
    .expect("test exceeded its time bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_failover_a_restarted_master_serves_only_when_no_other_node_answers() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let (mut topology, admin, old) = dev_topology().await;
        // Two Sentinels of three gone: the last one still names the master but can never
        // have a failover authorised.
        for i in [1, 2] {
            topology.sentinel_procs[i].signal("KILL");
        }
        topology.kill_node(0).await;

        // The replicas answer and may hold newer writes: after its hold the node refuses to
        // serve, says why and what to check, and exits (the kubelet restarts it).
        let hold = [("MASTER_HOLD_SECONDS", "2")];
        let mut refused = topology.nodes[0].start_with("redis-0-refused", &hold);
        let code = refused
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("the held master gives up");
        let log = refused.log();
        assert_eq!(code, 1, "{log}");
        assert!(
            log.contains("refusing to serve as master") && log.contains("SENTINEL CKQUORUM"),
            "{log}"
        );
        assert!(pods::role(old, &admin).is_err(), "it must not serve");

        // With no other data node left, nobody holds newer writes: it serves as master.
        for i in [1, 2] {
            topology.kill_node(i).await;
        }
        topology.node_procs[0] = topology.nodes[0].start_with("redis-0-alone", &hold);
        eventually(
            "the lone node to serve as master",
            Duration::from_secs(30),
            || async {
                match pods::role(old, &admin) {
                    Ok(role) if role == "master" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        let log = topology.node_procs[0].log();
        assert!(log.contains("nobody holds newer writes"), "{log}");
    })
    .await
    .expect("test exceeded its time bound");
}

#[test]
fn the_start_script_refuses_bad_input_with_a_sentence() {
    let rendered = deploy::render("overlays/dev");
    let base = tempfile::tempdir().expect("tempdir");
    let mut net = deploy::Loopback::default();
    for host in [
        "redis-0.redis-headless",
        "redis-1.redis-headless",
        "redis-2.redis-headless",
    ] {
        net.map(host, 1);
    }
    for i in 0..3 {
        net.map(&format!("redis-sentinel-{i}.redis-sentinel-headless"), 1);
    }
    let pod = pods::RedisPod::prepare(&rendered, &pods::DATA_NODE, 0, 1, &net, &[], base.path());
    for (changed, says) in [
        (
            ("ADMIN_PASSWORD", "EXAMPLEadminNotASecret00000000007"),
            "public example value",
        ),
        (("BIDDER_PASSWORD", "with-dash"), "letters and digits only"),
        (("SENTINELS", "redis-sentinel-0"), "HOST:PORT"),
        (("MASTER_HOLD_SECONDS", "soon"), "whole number"),
    ] {
        let (ok, out) = pod.try_start_script(&[changed]);
        assert!(!ok, "{changed:?} accepted: {out}");
        assert!(
            out.contains(changed.0) && out.contains(says),
            "{changed:?}: {out}"
        );
    }
}
