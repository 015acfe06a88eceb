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
//!   without one command refused by an ACL.

mod deploy;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use auction_testkit::eventually;
use deploy::{Loopback, Rendered};
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

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
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

/// One pod of a StatefulSet run on loopback: each volume is a local directory.
struct LocalPod {
    name: String,
    root: PathBuf,
}

impl LocalPod {
    fn new(base: &Path, name: &str) -> LocalPod {
        LocalPod {
            name: name.to_owned(),
            root: base.join(name),
        }
    }

    fn volume(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    /// `container path -> local directory` for every mount of `container`.
    fn mounts(&self, container: &Value) -> Vec<(String, PathBuf)> {
        container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["mountPath"].as_str().expect("mountPath").to_owned(),
                    self.volume(m["name"].as_str().expect("volume name")),
                )
            })
            .collect()
    }
}

/// Maps a container path to the local directory of the mount it is under.
fn local_path(path: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount, local) in mounts {
        if path == mount {
            return local.display().to_string();
        }
        if let Some(rest) = path.strip_prefix(&format!("{mount}/")) {
            return local.join(rest).display().to_string();
        }
    }
    path.to_owned()
}

/// Starts one data node or Sentinel pod from the manifests: writes the ConfigMap's files into
/// the template volume (config made loopback: port, bind, paths), runs the init container's
/// script with its environment (host names mapped to loopback), then the main container's
/// command. `extra_env` carries what differs on one machine (every pod has its own port).
/// Which StatefulSet, its ConfigMap, and the config file in it.
struct RedisKind {
    statefulset: &'static str,
    config_map: &'static str,
    conf_file: &'static str,
}

const DATA_NODE: RedisKind = RedisKind {
    statefulset: "redis",
    config_map: "redis-config",
    conf_file: "redis.conf",
};

const SENTINEL: RedisKind = RedisKind {
    statefulset: "redis-sentinel",
    config_map: "sentinel-config",
    conf_file: "sentinel.conf",
};

fn start_redis_pod(
    rendered: &Rendered,
    kind: &RedisKind,
    ordinal: usize,
    port: u16,
    net: &Loopback,
    extra_env: &[(&str, String)],
    base: &Path,
) -> Proc {
    let RedisKind {
        statefulset,
        config_map,
        conf_file,
    } = kind;
    let sts = rendered.get("StatefulSet", statefulset);
    let spec = &sts["spec"]["template"]["spec"];
    let pod = LocalPod::new(base, &format!("{statefulset}-{ordinal}"));
    let init = &spec["initContainers"][0];
    let main = &spec["containers"][0];
    let main_mounts = pod.mounts(main);
    let init_mounts = pod.mounts(init);

    // The ConfigMap volume, as the init container sees it.
    let template_volume = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| {
            v["configMap"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(config_map))
        })
        .expect("a ConfigMap volume");
    let template = pod.volume(template_volume["name"].as_str().expect("name"));
    let data = rendered.get("ConfigMap", config_map)["data"]
        .as_object()
        .expect("data");
    for (file, text) in data {
        let text = text.as_str().expect("text");
        let text = if file == *conf_file {
            text.lines()
                .map(|line| {
                    let mut words = line.split_whitespace();
                    match (words.next(), words.next()) {
                        (Some("port"), _) => format!("port {port}"),
                        (Some("bind"), _) => "bind 127.0.0.1".to_owned(),
                        (Some(key @ ("dir" | "aclfile")), Some(path)) => {
                            format!("{key} {}", local_path(path, &main_mounts))
                        }
                        _ => line.to_owned(),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        } else {
            text.to_owned()
        };
        std::fs::write(template.join(file), text).expect("write");
    }

    let mut env: Vec<(String, String)> = rendered
        .container_env(sts, init, &pod.name)
        .into_iter()
        .map(|(k, v)| {
            let v = local_path(&net.rewrite(&v), &init_mounts);
            (k, v)
        })
        .collect();
    env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let script = strings(&init["command"]);
    assert_eq!(script[0], "sh", "init containers run a shell script");
    let output = deploy::run_init_script(Path::new(&local_path(&script[1], &init_mounts)), &env);
    eprintln!("{}: {output}", pod.name);

    let command: Vec<String> = strings(&main["command"])
        .iter()
        .map(|a| local_path(a, &main_mounts))
        .collect();
    Proc::spawn(base, &pod.name, &command[0], &command[1..], &[])
}

/// `SENTINEL MASTER name` as a map.
fn sentinel_master(
    port: u16,
    admin: &str,
) -> Result<std::collections::HashMap<String, String>, String> {
    let mut conn = deploy::try_connect_as(port, Some(("admin", admin)))
        .map_err(|e| format!("connect to Sentinel on {port}: {e}"))?;
    let flat: Vec<String> = redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg("mymaster")
        .query(&mut conn)
        .map_err(|e| format!("SENTINEL MASTER on {port}: {e}"))?;
    Ok(flat
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect())
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
    let admin = rendered.secret("redis-users", "ADMIN_PASSWORD");
    let token = rendered.secret("auction-admin", "ADMIN_TOKEN");
    let base = tempfile::Builder::new()
        .prefix("auction-manifests-")
        .tempdir()
        .expect("tempdir");

    // In-cluster names -> loopback ports. The names are the ones the manifests use: a name
    // the test does not know makes `Loopback::port` fail loudly.
    let replicas = |kind: &str, name: &str| {
        rendered.get(kind, name)["spec"]["replicas"]
            .as_u64()
            .expect("replicas") as usize
    };
    let (nodes, sentinels) = (
        replicas("StatefulSet", "redis"),
        replicas("StatefulSet", "redis-sentinel"),
    );
    let mut net = Loopback::default();
    let node_ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    let sentinel_ports: Vec<u16> = (0..sentinels).map(|_| free_port()).collect();
    for (i, p) in node_ports.iter().enumerate() {
        net.map(&format!("redis-{i}.redis-headless"), *p);
    }
    for (i, p) in sentinel_ports.iter().enumerate() {
        net.map(&format!("redis-sentinel-{i}.redis-sentinel-headless"), *p);
    }
    let grpc = free_port();
    let health = free_port();
    net.map("auction-server", grpc);
    let initial_master = node_ports[0];

    // Data nodes, in StatefulSet order; the first is the initial master.
    let mut processes = Vec::new();
    for (i, port) in node_ports.iter().enumerate() {
        processes.push(start_redis_pod(
            &rendered,
            &DATA_NODE,
            i,
            *port,
            &net,
            &[
                ("REDIS_PORT", port.to_string()),
                ("MASTER_PORT", initial_master.to_string()),
            ],
            base.path(),
        ));
    }
    eventually(
        "the master to see its replicas online",
        Duration::from_secs(30),
        || async {
            let mut conn = deploy::try_connect_as(initial_master, Some(("admin", &admin)))
                .map_err(|e| format!("connect to the master on {initial_master}: {e}"))?;
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut conn)
                .map_err(|e| format!("INFO replication: {e}"))?;
            let online = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                .count();
            let role = auction_testkit::info_field(&info, "role");
            if role == Some("master") && online == nodes - 1 {
                Ok(())
            } else {
                Err(format!(
                    "role {role:?}, {online} of {} replicas online",
                    nodes - 1
                ))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));

    for (i, port) in sentinel_ports.iter().enumerate() {
        processes.push(start_redis_pod(
            &rendered,
            &SENTINEL,
            i,
            *port,
            &net,
            &[("MASTER_PORT", initial_master.to_string())],
            base.path(),
        ));
    }
    for port in &sentinel_ports {
        eventually(
            &format!("the Sentinel on {port} to know the master, its replicas and its peers"),
            Duration::from_secs(30),
            || async {
                let m = sentinel_master(*port, &admin)?;
                let ok = m.get("port") == Some(&initial_master.to_string())
                    && m.get("num-slaves") == Some(&(nodes - 1).to_string())
                    && m.get("num-other-sentinels") == Some(&(sentinels - 1).to_string());
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "port {:?}, num-slaves {:?}, num-other-sentinels {:?}",
                        m.get("port"),
                        m.get("num-slaves"),
                        m.get("num-other-sentinels")
                    ))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    // The server and one bidder with exactly the manifests' environment; only addresses move
    // to loopback (listeners on 127.0.0.1 instead of 0.0.0.0). Each must pass the probes
    // its manifest declares.
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
        let process = Proc::spawn(
            base.path(),
            &pod,
            local_binary(&command[0]).expect("our binary"),
            &command[1..],
            &env_refs,
        );
        let probe = |name: &str| c[name]["grpc"]["service"].as_str().unwrap_or("").to_owned();
        (
            process,
            env,
            probe("readinessProbe"),
            probe("livenessProbe"),
        )
    };
    let (_server, _, readiness, liveness) =
        spawn_pod("Deployment", "auction-server", "GRPC_ADDR", grpc);
    wait_health(grpc, &readiness, "SERVING", Duration::from_secs(30)).await;
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

    // Not one command refused anywhere: data nodes (server, bidder, Sentinels, replication)
    // and Sentinels (server, bidder, peers, init scripts).
    for port in node_ports.iter().chain(&sentinel_ports) {
        let denials = deploy::acl_denials(*port, &admin);
        assert!(
            denials.is_empty(),
            "ACL refusals on port {port}: {denials:#?}"
        );
    }
    drop(processes);
}
