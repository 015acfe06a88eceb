//! A real, throw-away Redis Sentinel topology on loopback, for integration
//! tests and the demo program.
//!
//! [`DevStack`] owns every process it starts (one master, N replicas and M
//! Sentinels, all real `redis-server` processes bound to 127.0.0.1) and one
//! temporary directory holding each process's config file, data directory and
//! log. Failover behaviour is the thing this project has to get right, and
//! mocks of Sentinel do not reproduce its timing, its config rewriting or its
//! split-brain edges, so tests run against the real thing. Because many tests
//! start stacks in parallel (threads in one process and separate processes),
//! ports are picked per process at start-up and retried on collision, and
//! `start` only returns once replication and Sentinel discovery have settled,
//! so a test never races the topology it is about to exercise. Dropping the
//! stack SIGKILLs and reaps every process, and dumps the logs first if the
//! drop happens during a panic, so a failing test explains itself.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::future::try_join_all;
use tokio::time::Instant;

use crate::LOG_TAIL_LINES;
use crate::config::DevStackConfig;
use crate::eventually::poll_until;
use crate::net::host_of;
use crate::node::{Managed, StartError, launch, new_data_node, new_sentinel};
use crate::probe::{
    probe_failover, probe_master_online, probe_rejoined, probe_subscribers, sentinel_master_port,
    wait_for_replication, wait_for_sentinels,
};
use crate::process::Paused;

/// A running master + replicas + Sentinels topology on 127.0.0.1.
///
/// Every process is killed and reaped when this is dropped; the temporary
/// directory with all configs, data and logs is removed after that.
pub struct DevStack {
    config: DevStackConfig,
    /// Data nodes; index 0 is the initial master.
    nodes: Vec<Managed>,
    sentinels: Vec<Managed>,
    /// Declared last so it is removed only after the processes using it are dead.
    dir: tempfile::TempDir,
}

impl DevStack {
    /// Starts the topology described by `config` and waits until it is fully
    /// settled: every node answers PING, every replica's link to the master is
    /// up, the master sees all replicas online, and every Sentinel knows the
    /// master, all replicas and all other Sentinels.
    ///
    /// Each of those waits is bounded by [`DevStackConfig::ready_timeout`]; on
    /// failure the error names the condition and includes the log tail of the
    /// process concerned. Processes already started are killed on error.
    pub async fn start(config: DevStackConfig) -> anyhow::Result<DevStack> {
        config.validate()?;
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("auction-devstack-")
            .tempdir()
            .context("could not create a temporary directory for the Redis dev stack: check that TMPDIR is writable")?;

        let master = launch(
            new_data_node(&config, dir.path(), 0, None)?,
            config.ready_timeout,
        )
        .await?;
        let master_port = master.port;

        let replicas = try_join_all(
            (1..=config.replicas)
                .map(|index| new_data_node(&config, dir.path(), index, Some(master_port)))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter()
                .map(|node| launch(node, config.ready_timeout)),
        )
        .await;
        // `master` lives in a local until pushed, so an error here still kills it via Drop.
        let replicas = replicas?;
        let mut nodes = Vec::with_capacity(replicas.len() + 1);
        nodes.push(master);
        nodes.extend(replicas);

        wait_for_replication(&config, &nodes).await?;

        let sentinels = try_join_all(
            (0..config.sentinels)
                .map(|index| new_sentinel(&config, dir.path(), index, master_port))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter()
                .map(|sentinel| launch(sentinel, config.ready_timeout)),
        )
        .await?;

        let replica_ports: Vec<u16> = nodes[1..].iter().map(|n| n.port).collect();
        wait_for_sentinels(&config, &sentinels, master_port, &replica_ports).await?;

        tracing::info!(
            dir = %dir.path().display(),
            master_port,
            ?replica_ports,
            sentinel_ports = ?sentinels.iter().map(|s| s.port).collect::<Vec<_>>(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "redis dev stack ready"
        );
        Ok(DevStack {
            config,
            nodes,
            sentinels,
            dir,
        })
    }

    /// Sentinel addresses as `HOST:PORT` (`127.0.0.1`, or data addresses on a network).
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("{}:{}", host_of(s.port), s.port))
            .collect()
    }

    /// Sentinel addresses comma-joined, the format `REDIS_SENTINELS` expects.
    pub fn sentinels_csv(&self) -> String {
        self.sentinel_addrs().join(",")
    }

    /// The name the Sentinels monitor the master under.
    pub fn master_name(&self) -> &str {
        &self.config.master_name
    }

    /// The configuration the stack was started with.
    pub fn config(&self) -> &DevStackConfig {
        &self.config
    }

    /// Ports of all data nodes; index 0 is the initial master. A node keeps
    /// its port across [`DevStack::kill_node`] / [`DevStack::restart_node`].
    pub fn redis_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Port of data node `index` (0 = initial master).
    ///
    /// # Panics
    /// If `index` is not below `replicas + 1`, like slice indexing.
    pub fn node_port(&self, index: usize) -> u16 {
        match self.nodes.get(index) {
            Some(node) => node.port,
            None => panic!(
                "DevStack has {} data nodes, there is no node {index}",
                self.nodes.len()
            ),
        }
    }

    /// Index of the data node listening on `port`, if any.
    pub fn node_index(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// `redis://HOST:PORT/` for data node `index`, for direct connections
    /// that bypass Sentinel (e.g. to check what a specific node holds).
    ///
    /// # Panics
    /// If `index` is out of range, as [`DevStack::node_port`].
    pub fn node_url(&self, index: usize) -> String {
        let port = self.node_port(index);
        format!("redis://{}:{port}/", host_of(port))
    }

    /// Whether data node `index` is currently running (false after
    /// [`DevStack::kill_node`] or if it died on its own).
    pub fn is_node_running(&mut self, index: usize) -> bool {
        self.nodes.get_mut(index).is_some_and(Managed::is_running)
    }

    /// The pid of data node `index` while it runs.
    pub fn node_pid(&self, index: usize) -> Option<u32> {
        self.nodes.get(index)?.pid()
    }

    /// SIGSTOPs every replica of the current master (replicas that lag without limit) until
    /// the returned guard is dropped, which SIGCONTs them.
    pub async fn pause_replicas(&self) -> anyhow::Result<Paused> {
        let master = self.current_master_port().await?;
        let pids = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].port != master)
            .filter_map(|i| self.node_pid(i))
            .collect();
        Ok(Paused::stop(pids))
    }

    /// Asks the Sentinels, in order, for the current master address
    /// (`SENTINEL get-master-addr-by-name`) and returns the port from the first
    /// one that answers.
    pub async fn current_master_port(&self) -> anyhow::Result<u16> {
        let mut failures = Vec::new();
        for sentinel in &self.sentinels {
            match sentinel_master_port(sentinel.port, &self.config.master_name).await {
                Ok(port) => return Ok(port),
                Err(e) => failures.push(format!("sentinel on port {}: {e}", sentinel.port)),
            }
        }
        Err(anyhow!(
            "no Sentinel reported the address of master {:?}: {}; see DevStack::logs() for the Sentinel logs",
            self.config.master_name,
            failures.join("; ")
        ))
    }

    /// Waits until some Sentinel reports a master other than `old_port` and
    /// that node confirms `role:master`, i.e. a failover away from `old_port`
    /// has been carried out. Returns the new master's port.
    pub async fn wait_for_master_change(
        &self,
        old_port: u16,
        timeout: Duration,
    ) -> anyhow::Result<u16> {
        let name = self.config.master_name.clone();
        let sentinel_ports: Vec<u16> = self.sentinels.iter().map(|s| s.port).collect();
        let creds = self.config.probe_credentials.clone();
        poll_until(timeout, move || {
            probe_failover(sentinel_ports.clone(), name.clone(), old_port, creds.clone())
        })
        .await
        .map_err(|last| {
            anyhow!(
                "no failover away from master port {old_port} within {timeout:?} (last seen: {last})\n{}",
                self.logs()
            )
        })
    }

    /// Waits until the master on `port` counts at least `min-replicas-to-write`
    /// good replicas, so it accepts writes. Right after a failover the new
    /// master refuses writes with `NOREPLICAS` until Sentinel has repointed a
    /// surviving replica at it and that replica has synced.
    pub async fn wait_writable(&self, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let min_good = self.config.min_replicas_to_write as usize;
        let creds = self.config.probe_credentials.clone();
        poll_until(timeout, move || probe_master_online(port, creds.clone(), 0, min_good))
            .await
            .map_err(|last| {
                anyhow!(
                    "the master on port {port} did not count {min_good} good replica(s) within {timeout:?} \
                     (last seen: {last})\n{}",
                    self.logs()
                )
            })
    }

    /// Waits until the current master counts at least `n` subscribers of `channel`, e.g. so
    /// that every bidder listens before an auction opens.
    pub async fn wait_subscribers(
        &self,
        channel: &str,
        n: u64,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let port = self.current_master_port().await?;
        let creds = self.config.probe_credentials.clone();
        crate::eventually(
            &format!("{n} subscribers of {channel}"),
            timeout,
            move || probe_subscribers(port, creds.clone(), channel.to_owned(), n),
        )
        .await
    }

    /// SIGKILLs data node `index` and reaps it, simulating a crash (no
    /// shutdown save, no goodbye to replicas or Sentinels).
    ///
    /// Errors if `index` is out of range or the node is not running.
    pub fn kill_node(&mut self, index: usize) -> anyhow::Result<()> {
        let count = self.nodes.len();
        let node = self
            .nodes
            .get_mut(index)
            .ok_or_else(|| anyhow!("kill_node({index}): the stack only has {count} data nodes"))?;
        if !node.is_running() {
            bail!(
                "kill_node({index}): {} is not running (already killed?)",
                node.label
            );
        }
        node.kill()
            .with_context(|| format!("could not SIGKILL {} (pid {:?})", node.label, node.pid()))?;
        tracing::info!(node = %node.label, port = node.port, "killed redis node");
        Ok(())
    }

    /// SIGKILLs every data node that is still running (Sentinels stay up),
    /// e.g. to test behaviour while Redis is entirely unavailable.
    pub fn kill_all_data_nodes(&mut self) -> anyhow::Result<()> {
        for index in 0..self.nodes.len() {
            if self.nodes[index].is_running() {
                self.kill_node(index)?;
            }
        }
        Ok(())
    }

    /// Starts data node `index` again with the same port, config file and data
    /// directory, and waits until it answers PING.
    ///
    /// It comes back in whatever role its config file says. Sentinel rewrites
    /// that file (CONFIG REWRITE) when it reconfigures a node, and also demotes
    /// a returning old master to a replica of the current master a few seconds
    /// after seeing it; use [`DevStack::wait_for_replica_link`] to wait for that.
    pub async fn restart_node(&mut self, index: usize) -> anyhow::Result<()> {
        let count = self.nodes.len();
        let timeout = self.config.ready_timeout;
        let node = self.nodes.get_mut(index).ok_or_else(|| {
            anyhow!("restart_node({index}): the stack only has {count} data nodes")
        })?;
        if node.is_running() {
            bail!(
                "restart_node({index}): {} is still running; kill_node it first",
                node.label
            );
        }
        node.spawn()?;
        match node.wait_answering(timeout).await {
            Ok(()) => Ok(()),
            Err(StartError::PortTaken(why)) => {
                node.kill_quietly();
                Err(anyhow!(
                    "could not restart {} on its old port {}: {why}. Sentinel knows the node by this port, \
                     so it cannot move; another process grabbed the port while the node was down",
                    node.label,
                    node.port
                ))
            }
            Err(StartError::Failed(e)) => {
                node.kill_quietly();
                Err(e)
            }
        }
    }

    /// Waits until data node `index` reports `role:slave` with
    /// `master_link_status:up` towards the master Sentinel currently names
    /// (bounded by `ready_timeout`). Useful after [`DevStack::restart_node`].
    pub async fn wait_for_replica_link(&self, index: usize) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get(index)
            .ok_or_else(|| anyhow!("wait_for_replica_link({index}): no such data node"))?;
        let port = node.port;
        let creds = self.config.probe_credentials.clone();
        let name = self.config.master_name.clone();
        let sentinel_ports: Vec<u16> = self.sentinels.iter().map(|s| s.port).collect();
        poll_until(self.config.ready_timeout, move || {
            probe_rejoined(sentinel_ports.clone(), name.clone(), port, creds.clone())
        })
        .await
        .map_err(|last| {
            anyhow!(
                "{} did not become a connected replica of the current master within {:?} (last seen: {last})\n{}",
                node.label,
                self.config.ready_timeout,
                node.log_tail(LOG_TAIL_LINES)
            )
        })
    }

    /// The last lines of every process's log (and of its stdout/stderr
    /// capture, where anything was written), each block labelled with the
    /// process, its port and whether it is running.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for process in self.nodes.iter().chain(&self.sentinels) {
            out.push_str(&process.log_tail(LOG_TAIL_LINES));
        }
        out
    }

    /// The temporary directory holding every process's config, data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for DevStack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== redis dev stack logs (dropped during a panic; dir {}) ====\n{}",
                self.dir.path().display(),
                self.logs()
            );
        }
        // Explicit kill + wait: std's Child does nothing on drop, so without
        // this every test would leak its servers (and zombies) until exit.
        for process in self.sentinels.iter_mut().chain(self.nodes.iter_mut()) {
            process.kill_quietly();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let future = DevStack::start(DevStackConfig::default());
        assert_send(&future);
    }

    /// Fails the test by panicking rather than returning `Err`, so the stack
    /// is dropped during a panic and prints every process's log.
    fn must<T>(what: &str, result: anyhow::Result<T>) -> T {
        result.unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }

    #[tokio::test]
    async fn failover_after_master_is_killed() {
        let started = std::time::Instant::now();
        let mut stack = must(
            "starting the dev stack",
            DevStack::start(DevStackConfig::default()).await,
        );
        eprintln!(
            "devstack started in {:?}: nodes {:?}, sentinels {}",
            started.elapsed(),
            stack.redis_ports(),
            stack.sentinels_csv()
        );

        let old_master = stack.node_port(0);
        assert_eq!(
            must(
                "asking Sentinel for the master",
                stack.current_master_port().await
            ),
            old_master
        );

        must("killing the master", stack.kill_node(0));
        let killed_at = std::time::Instant::now();
        let new_master = must(
            "waiting for a failover",
            stack
                .wait_for_master_change(old_master, Duration::from_secs(30))
                .await,
        );
        eprintln!(
            "failover to port {new_master} took {:?}",
            killed_at.elapsed()
        );
        assert_ne!(new_master, old_master);
        assert!(
            stack.node_index(new_master).is_some(),
            "new master {new_master} is not one of our nodes"
        );
    }
}
