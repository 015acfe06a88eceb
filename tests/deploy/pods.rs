//! The manifests' Redis data nodes and Sentinels as real processes on loopback: each pod's
//! ConfigMap files in its template volume (only `port`, `bind` and mount paths made local),
//! its init containers run, then its main container's command started with exactly the
//! container's environment (in-cluster host names mapped to loopback ports), so the start
//! scripts decide roles as they do in a pod. A pod can be started again (a container
//! restart: init containers do not run again) and its preStop hook run, as the kubelet does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use auction_testkit::eventually;
use serde_json::Value;

use super::{Loopback, Rendered, strings};
use crate::support::{Proc, free_port};

/// Which StatefulSet, its ConfigMap, and the config file in it.
pub struct RedisKind {
    statefulset: &'static str,
    config_map: &'static str,
    conf_file: &'static str,
}

/// The data nodes (StatefulSet `redis`).
pub const DATA_NODE: RedisKind = RedisKind {
    statefulset: "redis",
    config_map: "redis-config",
    conf_file: "redis.conf",
};

/// The Sentinels (StatefulSet `redis-sentinel`).
pub const SENTINEL: RedisKind = RedisKind {
    statefulset: "redis-sentinel",
    config_map: "sentinel-config",
    conf_file: "sentinel.conf",
};

/// `container path -> local directory` for every mount of `container`, under `root`.
fn mounts(root: &Path, container: &Value) -> Vec<(String, PathBuf)> {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let dir = root.join(m["name"].as_str().expect("volume name"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            (m["mountPath"].as_str().expect("mountPath").to_owned(), dir)
        })
        .collect()
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

/// A container's environment on loopback: addresses rewritten by `net`, paths made local,
/// then `extra` (what differs on one machine: every pod has its own port).
fn local_env(
    rendered: &Rendered,
    workload: &Value,
    container: &Value,
    pod: &str,
    net: &Loopback,
    mounts: &[(String, PathBuf)],
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = rendered
        .container_env(workload, container, pod)
        .into_iter()
        .map(|(k, v)| (k, local_path(&net.rewrite(&v), mounts)))
        .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// One pod of the data nodes' or the Sentinels' StatefulSet, prepared on loopback.
pub struct RedisPod {
    /// The pod's name (`redis-0`, `redis-sentinel-2`).
    pub name: String,
    /// Local directory of each volume, by volume name.
    pub root: PathBuf,
    command: Vec<String>,
    env: Vec<(String, String)>,
    pre_stop: Option<Vec<String>>,
    grace: u64,
    base: PathBuf,
}

impl RedisPod {
    /// Writes the ConfigMap into the pod's template volume and runs its init containers.
    pub fn prepare(
        rendered: &Rendered,
        kind: &RedisKind,
        ordinal: usize,
        port: u16,
        net: &Loopback,
        extra_env: &[(&str, String)],
        base: &Path,
    ) -> RedisPod {
        let sts = rendered.get("StatefulSet", kind.statefulset);
        let spec = &sts["spec"]["template"]["spec"];
        let name = format!("{}-{ordinal}", kind.statefulset);
        let root = base.join(&name);
        let main = &spec["containers"][0];
        let main_mounts = mounts(&root, main);

        // The ConfigMap volume; the config file made loopback.
        let template_volume = spec["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| {
                v["configMap"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(kind.config_map))
            })
            .expect("a ConfigMap volume");
        let template = root.join(template_volume["name"].as_str().expect("name"));
        std::fs::create_dir_all(&template).expect("mkdir");
        let data = rendered.get("ConfigMap", kind.config_map)["data"]
            .as_object()
            .expect("data");
        for (file, text) in data {
            let text = text.as_str().expect("text");
            let text = if file == kind.conf_file {
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

        for init in spec["initContainers"].as_array().into_iter().flatten() {
            let init_mounts = mounts(&root, init);
            let env = local_env(rendered, sts, init, &name, net, &init_mounts, extra_env);
            let script = strings(&init["command"]);
            assert_eq!(script[0], "sh", "init containers run a shell script");
            let output =
                super::run_script(Path::new(&local_path(&script[1], &init_mounts)), &env, 60);
            eprintln!("{name} (init {}): {output}", init["name"]);
        }

        let local = |cmd: Vec<String>| -> Vec<String> {
            cmd.iter().map(|a| local_path(a, &main_mounts)).collect()
        };
        let pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .map(|_| local(strings(&main["lifecycle"]["preStop"]["exec"]["command"])));
        RedisPod {
            command: local(strings(&main["command"])),
            env: local_env(rendered, sts, main, &name, net, &main_mounts, extra_env),
            pre_stop,
            grace: spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
            name,
            root,
            base: base.to_owned(),
        }
    }

    /// Starts the main container's command with exactly its environment (and PATH); `log`
    /// names its log file. Every call is a container start.
    pub fn start(&self, log: &str) -> Proc {
        self.start_with(log, &[])
    }

    /// [`RedisPod::start`] with some variables of the environment changed.
    pub fn start_with(&self, log: &str, changed: &[(&str, &str)]) -> Proc {
        let mut args = vec![
            "-i".to_owned(),
            format!("PATH={}", std::env::var("PATH").unwrap_or_default()),
        ];
        // `env` sets its assignments in order: a changed variable's last value wins.
        args.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        args.extend(changed.iter().map(|(k, v)| format!("{k}={v}")));
        args.extend(self.command.iter().cloned());
        Proc::spawn(&self.base, log, "env", &args, &[])
    }

    /// Runs the preStop hook with the container's environment, bounded by the pod's
    /// terminationGracePeriodSeconds; returns its output, panics if it fails.
    pub fn pre_stop(&self) -> String {
        let command = self.pre_stop.as_ref().expect("the pod has a preStop hook");
        assert_eq!(command[0], "sh", "preStop hooks run a shell script");
        super::run_script(Path::new(&command[1]), &self.env, self.grace)
    }

    /// Runs the main container's script (not its `exec`: it fails first) with some variables
    /// changed; whether it succeeded, and its output.
    pub fn try_start_script(&self, changed: &[(&str, &str)]) -> (bool, String) {
        assert_eq!(
            self.command[0], "sh",
            "the main container runs a shell script"
        );
        let mut env = self.env.clone();
        env.extend(changed.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        super::try_script(Path::new(&self.command[1]), &env, 10)
    }

    /// The local directory of volume `name`.
    pub fn volume(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// The manifests' data nodes and Sentinels running on loopback, settled: the initial master
/// sees every replica online and every Sentinel knows the master, its replicas and its peers.
/// Processes are killed when this is dropped.
pub struct Topology {
    /// In-cluster names of the data nodes and Sentinels → loopback ports.
    pub net: Loopback,
    /// Data node ports; index = ordinal.
    pub node_ports: Vec<u16>,
    /// Sentinel ports; index = ordinal.
    pub sentinel_ports: Vec<u16>,
    /// The data node pods, to restart or stop.
    pub nodes: Vec<RedisPod>,
    /// The running data node processes; index = ordinal.
    pub node_procs: Vec<Proc>,
    /// The Sentinel pods.
    pub sentinels: Vec<RedisPod>,
    /// The running Sentinel processes.
    pub sentinel_procs: Vec<Proc>,
    /// The `admin` password (data nodes and Sentinels).
    pub admin: String,
    /// Pods' volumes and logs; removed after the processes (declared last).
    pub base: tempfile::TempDir,
}

impl Topology {
    /// Starts the data nodes (ordinal 0 is the initial master), waits for replication, then
    /// the Sentinels, and waits until they know everything.
    pub async fn start(rendered: &Rendered) -> Topology {
        let admin = rendered.secret("redis-users", "ADMIN_PASSWORD");
        let base = tempfile::Builder::new()
            .prefix("auction-manifests-")
            .tempdir()
            .expect("tempdir");
        // In-cluster names -> loopback ports. The names are the ones the manifests use: a
        // name the test does not know makes `Loopback::port` fail loudly.
        let replicas = |name: &str| {
            rendered.get("StatefulSet", name)["spec"]["replicas"]
                .as_u64()
                .expect("replicas") as usize
        };
        let (nodes, sentinels) = (replicas("redis"), replicas("redis-sentinel"));
        let mut net = Loopback::default();
        let node_ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
        let sentinel_ports: Vec<u16> = (0..sentinels).map(|_| free_port()).collect();
        for (i, p) in node_ports.iter().enumerate() {
            net.map(&format!("redis-{i}.redis-headless"), *p);
        }
        for (i, p) in sentinel_ports.iter().enumerate() {
            net.map(&format!("redis-sentinel-{i}.redis-sentinel-headless"), *p);
        }
        let initial_master = node_ports[0];

        let start = Start {
            rendered,
            net: &net,
            base: base.path(),
            admin: &admin,
        };
        let (node_pods, node_procs) = start
            .all(&DATA_NODE, &node_ports, |port| {
                vec![
                    ("REDIS_PORT", port.to_string()),
                    ("MASTER_PORT", initial_master.to_string()),
                ]
            })
            .await;
        eventually(
            "the master to see its replicas online",
            Duration::from_secs(30),
            || async {
                let info = info(initial_master, &admin, "replication")?;
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

        let (sentinel_pods, sentinel_procs) = start
            .all(&SENTINEL, &sentinel_ports, |port| {
                vec![
                    ("MASTER_PORT", initial_master.to_string()),
                    ("SENTINEL_PORT", port.to_string()),
                ]
            })
            .await;
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
        Topology {
            net,
            node_ports,
            sentinel_ports,
            nodes: node_pods,
            node_procs,
            sentinels: sentinel_pods,
            sentinel_procs,
            admin,
            base,
        }
    }

    /// The master port each Sentinel names (`None`: no answer).
    pub fn named_masters(&self) -> Vec<Option<u16>> {
        self.sentinel_ports
            .iter()
            .map(|port| {
                sentinel_master(*port, &self.admin)
                    .ok()
                    .and_then(|m| m.get("port").and_then(|p| p.parse().ok()))
            })
            .collect()
    }

    /// SIGKILLs data node `ordinal` (a crash, an OOM kill) and waits until it is gone.
    pub async fn kill_node(&mut self, ordinal: usize) {
        let process = &mut self.node_procs[ordinal];
        process.signal("KILL");
        process
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Asserts that no data node or Sentinel refused a command (`ACL LOG` empty): the
    /// server, the bidders, the Sentinels, replication and every script ran as users allowed
    /// to do what they did.
    pub fn assert_no_acl_refusals(&self) {
        for port in self.node_ports.iter().chain(&self.sentinel_ports) {
            let denials = super::acl_denials(*port, &self.admin);
            assert!(
                denials.is_empty(),
                "ACL refusals on port {port}: {denials:#?}"
            );
        }
    }
}

/// What starting a kind of pod needs.
struct Start<'a> {
    rendered: &'a Rendered,
    net: &'a Loopback,
    base: &'a Path,
    admin: &'a str,
}

impl Start<'_> {
    /// Prepares and starts one pod of `kind` per port (ordinal = index), with `extra(port)`
    /// added to its environment. The pods start in parallel in a cluster; here one after the
    /// other, each once the previous one answers, so that each start script finds the
    /// previous pods up (as it would a moment later).
    async fn all(
        &self,
        kind: &RedisKind,
        ports: &[u16],
        extra: impl Fn(u16) -> Vec<(&'static str, String)>,
    ) -> (Vec<RedisPod>, Vec<Proc>) {
        let mut pods = Vec::new();
        let mut procs = Vec::new();
        for (ordinal, port) in ports.iter().enumerate() {
            let pod = RedisPod::prepare(
                self.rendered,
                kind,
                ordinal,
                *port,
                self.net,
                &extra(*port),
                self.base,
            );
            procs.push(pod.start(&pod.name));
            eventually(
                &format!("{} to answer on {port}", pod.name),
                Duration::from_secs(20),
                || async { role(*port, self.admin).map(|_| ()) },
            )
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
            pods.push(pod);
        }
        (pods, procs)
    }
}

/// `SENTINEL MASTER mymaster` on the Sentinel on `port`, as a map.
pub fn sentinel_master(port: u16, admin: &str) -> Result<HashMap<String, String>, String> {
    let mut conn = super::try_connect_as(port, Some(("admin", admin)))
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

/// `INFO section` of the data node on `port`, as `admin`.
pub fn info(port: u16, admin: &str, section: &str) -> Result<String, String> {
    let mut conn = super::try_connect_as(port, Some(("admin", admin)))
        .map_err(|e| format!("connect to {port}: {e}"))?;
    redis::cmd("INFO")
        .arg(section)
        .query(&mut conn)
        .map_err(|e| format!("INFO {section} on {port}: {e}"))
}

/// The role the data node on `port` reports (`master`, `slave`).
pub fn role(port: u16, admin: &str) -> Result<String, String> {
    let mut conn = super::try_connect_as(port, Some(("admin", admin)))
        .map_err(|e| format!("connect to {port}: {e}"))?;
    let reply: Vec<redis::Value> = redis::cmd("ROLE")
        .query(&mut conn)
        .map_err(|e| format!("ROLE on {port}: {e}"))?;
    match reply.first() {
        Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(redis::Value::SimpleString(s)) => Ok(s.clone()),
        other => Err(format!("ROLE on {port} answered {other:?}")),
    }
}

/// `SET key value` on the master on `port`, then `WAIT 1`: the number of replicas that
/// acknowledged it (an error while the master cannot take writes).
pub fn write_acknowledged(port: u16, admin: &str, key: &str, value: &str) -> Result<u64, String> {
    let mut conn = super::try_connect_as(port, Some(("admin", admin)))
        .map_err(|e| format!("connect to {port}: {e}"))?;
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query::<()>(&mut conn)
        .map_err(|e| format!("SET {key} on {port}: {e}"))?;
    redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query(&mut conn)
        .map_err(|e| format!("WAIT on {port}: {e}"))
}

/// `GET key` on the data node on `port` (`None`: no such key).
pub fn read(port: u16, admin: &str, key: &str) -> Result<Option<String>, String> {
    let mut conn = super::try_connect_as(port, Some(("admin", admin)))
        .map_err(|e| format!("connect to {port}: {e}"))?;
    redis::cmd("GET")
        .arg(key)
        .query(&mut conn)
        .map_err(|e| format!("GET {key} on {port}: {e}"))
}
