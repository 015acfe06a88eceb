//! The manifests in `deploy/` and the programs agree. Everything here comes from the
//! rendered kustomizations (`kubectl kustomize`), not from copies:
//!
//! - every environment and argument that any overlay gives our containers is accepted by
//!   the binary (`--check-config`), and their probes, ports and Services line up with the
//!   addresses the binaries listen on;
//! - the Redis and Sentinel configuration in the ConfigMaps, rendered by their own start
//!   scripts with the Secret's passwords, starts real `redis-server` / `redis-sentinel`
//!   processes (in-cluster host names mapped to loopback ports; only `port`, `bind` and
//!   mount paths change), the ACL file is accepted, and the real server and bidder, with
//!   exactly the manifests' environment, become ready and run an auction to its winner
//!   without one command refused by an ACL, and without an oversized publish cutting the
//!   server's subscription; bids must be signed, and the bidder gets its key by enrolling
//!   under its pod name (which the server resolves as the cluster would, through a hosts
//!   file of its own);
//! - the rules the manifests must keep, read from the rendered objects (`rules`), and the
//!   data nodes' role scripts on loopback: a restarted master holds back until Sentinel
//!   promoted the replica with the acknowledged writes, and a master's preStop switches
//!   over (`roles`).

mod deploy;
#[path = "manifests/roles.rs"]
mod roles;
#[path = "manifests/rules.rs"]
mod rules;
mod support;

use std::path::Path;
use std::time::Duration;

use deploy::pods::Topology;
use deploy::strings;
use serde_json::Value;
use support::*;

/// Our binaries, by the name they have in the image (`/usr/local/bin/NAME`).
fn local_binary(image_path: &str) -> Option<&'static str> {
    match Path::new(image_path).file_name()?.to_str()? {
        "auction-server" => Some(SERVER),
        "auction-client" => Some(CLIENT),
        _ => None,
    }
}

fn first_pod_name(workload: &Value) -> String {
    format!("{}-0", workload["metadata"]["name"].as_str().expect("name"))
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[test]
fn every_container_config_is_accepted_and_probes_match_the_listeners() {
    let mut checked = 0;
    for dir in deploy::all_kustomizations() {
        let rendered = deploy::render(&dir);
        for workload in rendered.workloads() {
            let pod = first_pod_name(workload);
            let spec = &workload["spec"]["template"]["spec"];
            for container in spec["containers"].as_array().expect("containers") {
                let command = strings(&container["command"]);
                let Some(bin) = command.first().and_then(|c| local_binary(c)) else {
                    continue;
                };
                let env = rendered.container_env(workload, container, &pod);
                let mut args: Vec<String> = command[1..].to_vec();
                args.extend(strings(&container["args"]));
                args.push("--check-config".into());
                let out = std::process::Command::new(bin)
                    .args(&args)
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .output()
                    .expect("run the binary");
                assert!(
                    out.status.success(),
                    "{dir}: {pod} {command:?}: the binary refuses the manifest's configuration: {}",
                    String::from_utf8_lossy(&out.stderr)
                );

                // The listener the probes and Services reach is the one the binary opens.
                let listen = env_value(&env, "GRPC_ADDR")
                    .or_else(|| env_value(&env, "HEALTH_ADDR"))
                    .unwrap_or_else(|| panic!("{dir}: {pod} sets no GRPC_ADDR / HEALTH_ADDR"));
                let port: u64 = listen
                    .rsplit_once(':')
                    .expect("host:port")
                    .1
                    .parse()
                    .expect("port");
                let ports = container["ports"].as_array().expect("ports");
                assert!(
                    ports.iter().any(|p| p["containerPort"] == port),
                    "{dir}: {pod} listens on {listen}, not a declared containerPort"
                );
                for (probe, service) in [
                    ("startupProbe", "liveness"),
                    ("livenessProbe", "liveness"),
                    ("readinessProbe", ""),
                ] {
                    let grpc = &container[probe]["grpc"];
                    assert_eq!(grpc["port"], port, "{dir}: {pod} {probe} port");
                    assert_eq!(
                        grpc["service"].as_str().unwrap_or(""),
                        service,
                        "{dir}: {pod} {probe} checks the wrong health service"
                    );
                }
                checked += 1;
            }
        }
        // Every Service's targetPort is a named port of the pods it selects.
        for svc in rendered.objects.iter().filter(|o| o["kind"] == "Service") {
            let selector = svc["spec"]["selector"].as_object().expect("selector");
            let target = rendered
                .workloads()
                .into_iter()
                .find(|w| {
                    let labels = &w["spec"]["template"]["metadata"]["labels"];
                    selector.iter().all(|(k, v)| &labels[k] == v)
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{dir}: Service {} selects no workload",
                        svc["metadata"]["name"]
                    )
                });
            let names: Vec<&Value> = target["spec"]["template"]["spec"]["containers"]
                .as_array()
                .expect("containers")
                .iter()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .map(|p| &p["name"])
                .collect();
            for port in svc["spec"]["ports"].as_array().expect("ports") {
                assert!(
                    names.contains(&&port["targetPort"]),
                    "{dir}: Service {} targets port {} that its pods do not name",
                    svc["metadata"]["name"],
                    port["targetPort"]
                );
            }
        }
    }
    assert!(checked >= 6, "checked only {checked} containers of ours");
}

fn listen_port(env: &[(String, String)], key: &str) -> u16 {
    env_value(env, key)
        .and_then(|v| v.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{key} is not host:port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmaps_start_the_topology_and_the_binaries_run_with_the_manifests_env() {
    tokio::time::timeout(Duration::from_secs(150), run_from_manifests("overlays/dev"))
        .await
        .expect("test exceeded its time bound");
}

async fn run_from_manifests(dir: &str) {
    let rendered = deploy::render(dir);
    let token = rendered.secret("auction-admin", "ADMIN_TOKEN");
    let mut topology = Topology::start(&rendered).await;
    let admin = topology.admin.clone();
    let grpc = free_port();
    let health = free_port();
    topology.net.map("auction-server", grpc);
    let net = topology.net.clone();
    let base = topology.base.path().to_owned();

    // The bidder's pod record (ENROLL_HOST) names loopback, where it calls the server from.
    let client_pod = first_pod_name(rendered.get("StatefulSet", "auction-client"));
    let service = rendered.get("StatefulSet", "auction-client")["spec"]["serviceName"]
        .as_str()
        .expect("serviceName")
        .to_owned();
    let hosts = format!("127.0.0.1 localhost\n127.0.0.1 {client_pod}.{service}\n");
    let Some(server_ns) = with_hosts(&base, "auction-server", &hosts) else {
        return;
    };

    // The server and one bidder with exactly the manifests' environment; only addresses move
    // to loopback (listeners on 127.0.0.1 instead of 0.0.0.0), and the server resolves the
    // bidder's pod name as a cluster would. Each must pass the probes its manifest declares.
    let spawn_pod = |kind: &str, workload: &str, listen_key: &str, listen: u16| {
        let w = rendered.get(kind, workload);
        let c = &w["spec"]["template"]["spec"]["containers"][0];
        let pod = first_pod_name(w);
        let env: Vec<(String, String)> = rendered
            .container_env(w, c, &pod)
            .into_iter()
            .map(|(k, v)| {
                let v = if k == listen_key {
                    format!("127.0.0.1:{listen}")
                } else if k == "METRICS_ADDR" {
                    // Both pods serve metrics on the same port; here they share one host.
                    "127.0.0.1:0".to_owned()
                } else {
                    net.rewrite(&v)
                };
                (k, v)
            })
            .collect();
        assert_eq!(listen_port(&env, listen_key), listen);
        let command = strings(&c["command"]);
        let env_refs: Vec<(&str, String)> =
            env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let binary = local_binary(&command[0]).expect("our binary");
        let process = if kind == "Deployment" {
            let (unshare, mut args) = server_ns.clone();
            args.push(binary.to_owned());
            args.extend(command[1..].iter().cloned());
            Proc::spawn(&base, &pod, &unshare, &args, &env_refs)
        } else {
            Proc::spawn(&base, &pod, binary, &command[1..], &env_refs)
        };
        let probe = |name: &str| c[name]["grpc"]["service"].as_str().unwrap_or("").to_owned();
        (
            process,
            env,
            probe("readinessProbe"),
            probe("livenessProbe"),
        )
    };
    let (_server, _, readiness_of_server, liveness) =
        spawn_pod("Deployment", "auction-server", "GRPC_ADDR", grpc);
    wait_health(
        grpc,
        &readiness_of_server,
        "SERVING",
        Duration::from_secs(30),
    )
    .await;
    wait_health(grpc, &liveness, "SERVING", Duration::from_secs(5)).await;
    let (_client, env, readiness, liveness) =
        spawn_pod("StatefulSet", "auction-client", "HEALTH_ADDR", health);
    assert_eq!(env_value(&env, "BIDDER_NAME"), Some("auction-client-0"));
    wait_health(health, &readiness, "SERVING", Duration::from_secs(30)).await;
    wait_health(health, &liveness, "SERVING", Duration::from_secs(5)).await;

    // An auction opened with the Secret's admin token closes with the bidder as winner.
    let auth = format!("authorization: Bearer {token}");
    let opened = grpcurl(
        grpc,
        "auction.v1.AuctionAdmin/OpenAuction",
        Some(r#"{"item":"Manifest lamp","starting_price":"100","min_increment":"10","reserve_price":"0","duration":"8s","auction_id":"manifests-1"}"#),
        Some(&auth),
    )
    .await;
    assert!(opened.ok, "OpenAuction with the Secret's token: {opened:?}");
    // Each check starts a grpcurl process: every 500 ms is often enough.
    let auction = eventually_every(
        "the auction manifests-1 to close",
        Duration::from_secs(40),
        Duration::from_millis(500),
        || async {
            let got = grpcurl(
                grpc,
                "auction.v1.AuctionAdmin/GetAuction",
                Some(r#"{"auction_id":"manifests-1"}"#),
                None,
            )
            .await;
            let auction = got.json()["auction"].clone();
            if auction["state"] == "AUCTION_STATE_CLOSED" {
                Ok(auction)
            } else {
                Err(auction.to_string())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(auction["winner"]["bidder"], "auction-client-0", "{auction}");
    // It won with signed bids (BID_AUTH=required), under the key it enrolled for.
    let bidders = grpcurl(grpc, "auction.v1.AuctionAdmin/ListBidders", None, None).await;
    assert_eq!(
        bidders.json()["bidders"][0]["bidder"],
        "auction-client-0",
        "{bidders:?}"
    );

    // The wire limits: a bidder's publish over proto-max-bulk-len is refused by Redis, and
    // publishes just under it fit the Pub/Sub output limit of the server's subscription
    // (the server drops them as oversized), which is never cut: same connections after.
    let master = topology.node_ports[0];
    let subscribed = server_subscriptions(master, &admin);
    assert!(!subscribed.is_empty(), "the server subscribes on {master}");
    let bidder = (
        "auction-bidder",
        rendered.secret("redis-users", "BIDDER_PASSWORD"),
    );
    let publish = |message: &str| {
        let mut conn = deploy::connect_as(master, Some((bidder.0, bidder.1.as_str())));
        redis::cmd("PUBLISH")
            .arg("comando-leilao")
            .arg(message)
            .query::<i64>(&mut conn)
    };
    let refused = publish(&"x".repeat(1024 * 1024 + 1));
    assert!(refused.is_err(), "a publish over 1 MiB: {refused:?}");
    let largest = "x".repeat(1024 * 1024 - 64);
    for _ in 0..8 {
        let receivers = publish(&largest).expect("a publish under 1 MiB");
        assert!(receivers >= 1, "the server hears the command channel");
    }
    assert_eq!(
        server_subscriptions(master, &admin),
        subscribed,
        "the server's subscriptions survive oversized publishes"
    );
    wait_health(
        grpc,
        &readiness_of_server,
        "SERVING",
        Duration::from_secs(5),
    )
    .await;

    // Not one command refused anywhere: data nodes (server, bidder, Sentinels, replication)
    // and Sentinels (server, bidder, peers, start scripts).
    topology.assert_no_acl_refusals();
}

/// Ids of the server's Pub/Sub connections on the data node on `port`.
fn server_subscriptions(port: u16, admin: &str) -> Vec<String> {
    let mut conn = deploy::connect_as(port, Some(("admin", admin)));
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .expect("CLIENT LIST");
    let mut ids: Vec<String> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == "user=auction-server"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids
}
