//! [`Network`]: hosts in network namespaces of their own, for partition tests.
//!
//! Each host is a namespace with two links. Its *data* link (address `10.R.0.N/24`) goes to
//! a hub namespace holding two bridges: every data link starts on the `main` bridge, where
//! all hosts reach one another; [`Network::cut`] moves some hosts to the `cut` bridge, where
//! they reach only each other, and [`Network::heal`] moves them back. Its *management* link
//! is a point-to-point veth to the test's own namespace, so the test process (its probes,
//! its recorder, its in-process bidders) reaches every host at its data address whatever
//! the partition, like an observer that no partition separates: only what the hosts say to
//! one another is cut. `ip link set … down` is not used, because the kernel then drops the
//! address routes and a healed host would need them rebuilt.
//!
//! Everything is made inside the test (a private `10.R.0.0/16` claimed by creating the hub's
//! namespace, so parallel networks never share a range) and deleted on drop, also when the
//! test panics. Creating a namespace needs root; [`Network::create`] says plainly when the
//! machine refuses.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, anyhow, bail};

/// Second octets tried for the private range `10.R.0.0/16`, claimed by namespace name.
const RANGES: std::ops::RangeInclusive<u8> = 200..=250;

/// One host of a [`Network`]: a namespace and the address its processes bind.
#[derive(Clone, Debug)]
pub struct Host {
    /// Namespace name (`ip netns`; processes enter it through [`command_in`]).
    pub netns: String,
    /// The host's address on the data network, reachable from the test's own namespace too.
    pub ip: String,
    /// The data link's end in the hub, moved between the bridges to cut and heal.
    hub_link: String,
}

/// Hosts in network namespaces joined by a hub that [`Network::cut`] can split. Deleted on
/// drop.
#[derive(Debug)]
pub struct Network {
    range: u8,
    hub: String,
    hosts: BTreeMap<String, Host>,
    /// The hosts now on the `cut` bridge.
    cut: Mutex<Vec<String>>,
    /// Root-namespace link names, deleted on drop (their peers go with the namespaces).
    links: Vec<String>,
}

impl Network {
    /// Whether this machine lets the test create network namespaces (root, `ip` present).
    pub fn permitted() -> bool {
        let probe = format!("auction-probe-{}", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &probe])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if made {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        }
        made
    }

    /// For a test: the network of `hosts`, or `None` where this machine refuses network
    /// namespaces, after printing that `skipped` is skipped and why. Under CI (`CI` set) a
    /// refusal fails instead: CI runs as root and must run what needs the network.
    ///
    /// # Panics
    /// Under CI when namespaces are refused, and whenever creating the network fails.
    pub fn for_test(hosts: &[&str], skipped: &str) -> Option<Network> {
        if !Network::permitted() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run {skipped}, but this machine refuses network namespaces: run the tests as root with iproute2 installed"
            );
            eprintln!(
                "SKIPPED {skipped}: network namespaces are refused here (run as root with iproute2 for them)"
            );
            return None;
        }
        Some(Network::create(hosts).unwrap_or_else(|e| panic!("the test network: {e:#}")))
    }

    /// Creates one namespace per name in `hosts`, each with its data and management links.
    pub fn create(hosts: &[&str]) -> anyhow::Result<Network> {
        if hosts.is_empty() || hosts.len() > 60 {
            bail!(
                "Network::create: {} hosts asked for; between 1 and 60 fit the address plan",
                hosts.len()
            );
        }
        let (range, hub) = claim_range()?;
        let mut net = Network {
            range,
            hub,
            hosts: BTreeMap::new(),
            cut: Mutex::new(Vec::new()),
            links: Vec::new(),
        };
        // From here on, a failure drops `net`, which deletes what was made so far.
        ip(&["-n", &net.hub, "link", "add", "main", "type", "bridge"])?;
        ip(&["-n", &net.hub, "link", "add", "cut", "type", "bridge"])?;
        ip(&["-n", &net.hub, "link", "set", "main", "up"])?;
        ip(&["-n", &net.hub, "link", "set", "cut", "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            if net.hosts.contains_key(*name) {
                bail!("Network::create: host {name:?} is named twice");
            }
            let host = net.add_host(i + 1)?;
            net.hosts.insert((*name).to_owned(), host);
        }
        Ok(net)
    }

    fn add_host(&mut self, n: usize) -> anyhow::Result<Host> {
        let r = self.range;
        let netns = format!("auction-{r}-h{n}");
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        // Data link: host end `data`, hub end `h{n}` on the main bridge.
        let hub_link = format!("h{n}");
        let tmp = format!("a{r}d{n}");
        ip(&[
            "link", "add", &tmp, "netns", &netns, "type", "veth", "peer", "name", &hub_link,
            "netns", &self.hub,
        ])?;
        ip(&["-n", &netns, "link", "set", &tmp, "name", "data"])?;
        let data_ip = format!("10.{r}.0.{n}");
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{data_ip}/24"),
            "dev",
            "data",
        ])?;
        ip(&["-n", &netns, "link", "set", "data", "up"])?;
        ip(&["-n", &self.hub, "link", "set", &hub_link, "master", "main"])?;
        ip(&["-n", &self.hub, "link", "set", &hub_link, "up"])?;
        // Management link: `a{r}m{n}` here, `mgmt` in the host, a /30 of its own; the test
        // reaches the data address through it (a host route), never through the hub.
        let ours = format!("a{r}m{n}");
        ip(&[
            "link", "add", &ours, "type", "veth", "peer", "name", "mgmt", "netns", &netns,
        ])?;
        self.links.push(ours.clone());
        let (base, peer) = (4 * n, 4 * n + 1);
        ip(&["addr", "add", &format!("10.{r}.1.{base}/31"), "dev", &ours])?;
        ip(&["link", "set", &ours, "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("10.{r}.1.{peer}/31"),
            "dev",
            "mgmt",
        ])?;
        ip(&["-n", &netns, "link", "set", "mgmt", "up"])?;
        ip(&[
            "route",
            "add",
            &format!("{data_ip}/32"),
            "dev",
            &ours,
            "src",
            &format!("10.{r}.1.{base}"),
        ])?;
        Ok(Host {
            netns,
            ip: data_ip,
            hub_link,
        })
    }

    /// The host named `name`.
    ///
    /// # Panics
    /// If no host has that name (a test's own mistake).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("the test network has no host {name:?}"))
    }

    /// Cuts `names` off from every other host: they reach only one another until
    /// [`Network::heal`]. The test's own namespace still reaches them.
    pub fn cut(&self, names: &[&str]) -> anyhow::Result<()> {
        let mut cut = self.cut.lock().map_err(|_| anyhow!("cut list poisoned"))?;
        for name in names {
            let host = self.host(name);
            ip(&[
                "-n",
                &self.hub,
                "link",
                "set",
                &host.hub_link,
                "master",
                "cut",
            ])?;
            cut.push((*name).to_owned());
        }
        Ok(())
    }

    /// Joins every cut host to the others again.
    pub fn heal(&self) -> anyhow::Result<()> {
        let mut cut = self.cut.lock().map_err(|_| anyhow!("cut list poisoned"))?;
        for name in cut.drain(..) {
            let host = self.host(&name);
            ip(&[
                "-n",
                &self.hub,
                "link",
                "set",
                &host.hub_link,
                "master",
                "main",
            ])?;
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
        for host in self.hosts.values() {
            unregister(&host.ip);
            let _ = Command::new("ip")
                .args(["netns", "del", &host.netns])
                .status();
        }
        // Hosts not yet in the map when creation failed: delete by the name pattern.
        let prefix = format!("auction-{}-h", self.range);
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(name) = line.split_whitespace().next()
                    && name
                        .strip_prefix(&prefix)
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub])
            .status();
    }
}

/// Claims a free `10.R.0.0/16` by creating its hub namespace (`ip netns add` fails when the
/// name exists, so two networks never get the same range).
fn claim_range() -> anyhow::Result<(u8, String)> {
    let mut last = String::new();
    for r in RANGES {
        let hub = format!("auction-{r}-hub");
        let out = Command::new("ip")
            .args(["netns", "add", &hub])
            .output()
            .context("cannot run `ip` (install iproute2)")?;
        if out.status.success() {
            return Ok((r, hub));
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if !last.contains("File exists") {
            break;
        }
    }
    Err(anyhow!(
        "cannot create a network namespace ({last}): partition tests need root and iproute2's `ip netns`"
    ))
}

/// A command for `program` that runs inside `netns` when one is given. `nsenter --net`
/// enters only the network namespace and execs the program, so the child's pid is the
/// program's own (signals, kills and Redis's `process_id` all name it). Not `ip netns
/// exec`: that also makes a mount namespace and remounts `/sys` for every process, which
/// stalled a Redis restart for 20 s on a loaded machine.
pub(crate) fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("nsenter");
            command
                .arg(format!("--net=/run/netns/{netns}"))
                .arg("--")
                .arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The address each Redis process of a [`Network`] listens on, by port. The kit's probes
/// and Sentinel's answers name nodes by port (unique in the test process: every port comes
/// from [`crate::free_port`] and is held by its node), so a probe finds the address here;
/// a port nobody registered is on loopback.
fn addresses() -> &'static Mutex<HashMap<u16, String>> {
    static ADDRESSES: OnceLock<Mutex<HashMap<u16, String>>> = OnceLock::new();
    ADDRESSES.get_or_init(Mutex::default)
}

/// Records that the process on `port` listens on `ip`. False when another address holds
/// the port already (the caller picks another port).
pub(crate) fn register(port: u16, ip: &str) -> bool {
    let Ok(mut map) = addresses().lock() else {
        return false;
    };
    match map.get(&port) {
        Some(held) if held != ip => false,
        _ => {
            map.insert(port, ip.to_owned());
            true
        }
    }
}

/// Forgets the addresses of `ip` (its network is gone).
fn unregister(ip: &str) {
    if let Ok(mut map) = addresses().lock() {
        map.retain(|_, held| held != ip);
    }
}

/// The address of the Redis process on `port`: its host's data address when a [`Network`]
/// runs it, loopback otherwise.
pub fn host_of(port: u16) -> String {
    addresses()
        .lock()
        .ok()
        .and_then(|map| map.get(&port).cloned())
        .unwrap_or_else(|| crate::LOOPBACK.to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::{DevStack, DevStackConfig};

    /// A stack on a network: cutting the master off from its replicas and the Sentinels gets
    /// a replica promoted, and the test still reaches the old master through its own link.
    #[tokio::test]
    async fn a_cut_master_is_replaced_and_stays_reachable_from_the_test() {
        let names = ["redis0", "redis1", "sentinel0", "sentinel1", "sentinel2"];
        let Some(net) = Network::for_test(&names, "the cut-master test") else {
            return;
        };
        let net = Arc::new(net);
        let stack = DevStack::start(DevStackConfig {
            replicas: 1,
            network: Some(net.clone()),
            ..DevStackConfig::default()
        })
        .await
        .expect("a stack on the network");
        let old = stack.node_port(0);
        assert_eq!(host_of(old), net.host("redis0").ip);
        net.cut(&["redis0"]).expect("cut");
        let new = stack
            .wait_for_master_change(old, Duration::from_secs(30))
            .await
            .expect("a failover away from the cut master");
        assert_eq!(stack.node_index(new), Some(1));
        let role = crate::probe::info_section(old, None, "replication")
            .await
            .expect("the test reaches the cut node");
        assert_eq!(crate::info_field(&role, "role"), Some("master"));
        net.heal().expect("heal");
        stack
            .wait_for_replica_link(0)
            .await
            .expect("the old master rejoins as a replica once healed");
    }
}
