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

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::future::{join_all, try_join_all};
use redis::IntoConnectionInfo as _;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

/// Every process binds here and only here: the stack must never be reachable
/// from outside the machine, and Sentinel announces what it sees, so a single
/// address keeps the announced and the configured addresses identical.
const LOOPBACK: &str = "127.0.0.1";
/// How often readiness conditions are re-checked.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Fresh-port attempts per process before giving up; a collision needs another
/// test to grab the same port in the few milliseconds between our probe bind
/// and the server's bind, so more than one retry in a row means something else.
const PORT_ATTEMPTS: usize = 5;
/// Lines of each log shown by [`DevStack::logs`] and in start-up errors.
const LOG_TAIL_LINES: usize = 60;
/// Per-probe bounds. Short, because a probe that does not answer quickly is
/// simply retried on the next poll until the overall readiness deadline.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const PROBE_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const INSTALL_HINT: &str = "install it with `apt-get install -y redis-server redis-sentinel`, \
     or point DevStackConfig::redis_server at the binary";

/// Shape and tuning of the topology started by [`DevStack::start`].
#[derive(Clone, Debug)]
pub struct DevStackConfig {
    /// Number of replicas started alongside the master (default 2).
    pub replicas: usize,
    /// Number of Sentinel processes (default 3).
    pub sentinels: usize,
    /// Name under which the Sentinels monitor the master (default `mymaster`).
    pub master_name: String,
    /// Sentinels that must agree the master is down before a failover (default 2).
    pub quorum: usize,
    /// Sentinel `down-after-milliseconds` (default 2000 ms).
    pub down_after: Duration,
    /// Sentinel `failover-timeout` (default 10 s).
    pub failover_timeout: Duration,
    /// `min-replicas-to-write` on every data node (default 1), so a master cut
    /// off from its replicas stops accepting writes.
    pub min_replicas_to_write: u32,
    /// `min-replicas-max-lag` in seconds on every data node (default 10).
    pub min_replicas_max_lag: u32,
    /// Whether data nodes use the append-only file (default true).
    pub appendonly: bool,
    /// Extra lines appended verbatim to every data node's config (e.g. ACL
    /// `user` lines). If these lock out the `default` user, set
    /// [`DevStackConfig::probe_credentials`] so readiness probes can still log in.
    pub extra_redis_conf: Vec<String>,
    /// Extra lines appended verbatim to every Sentinel's config, e.g.
    /// `sentinel auth-user mymaster NAME` when the data nodes require auth.
    pub extra_sentinel_conf: Vec<String>,
    /// Username and password the stack's own probes use against data nodes
    /// (default `None`: unauthenticated). Sentinels are always probed without auth.
    pub probe_credentials: Option<(String, String)>,
    /// Bound on every readiness wait during start and restart (default 20 s).
    pub ready_timeout: Duration,
    /// The `redis-server` binary (default `redis-server`, looked up in PATH).
    /// Sentinels are started from it with `--sentinel`, so no separate
    /// `redis-sentinel` binary is needed.
    pub redis_server: PathBuf,
}

impl Default for DevStackConfig {
    fn default() -> Self {
        Self {
            replicas: 2,
            sentinels: 3,
            master_name: "mymaster".to_owned(),
            quorum: 2,
            down_after: Duration::from_millis(2000),
            failover_timeout: Duration::from_secs(10),
            min_replicas_to_write: 1,
            min_replicas_max_lag: 10,
            appendonly: true,
            extra_redis_conf: Vec::new(),
            extra_sentinel_conf: Vec::new(),
            probe_credentials: None,
            ready_timeout: Duration::from_secs(20),
            redis_server: PathBuf::from("redis-server"),
        }
    }
}

impl DevStackConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.sentinels == 0 {
            bail!(
                "DevStackConfig::sentinels is 0: at least one Sentinel is needed to monitor the master"
            );
        }
        if self.quorum == 0 || self.quorum > self.sentinels {
            bail!(
                "DevStackConfig::quorum is {} but must be between 1 and sentinels ({}): \
                 otherwise no failover can ever be authorised",
                self.quorum,
                self.sentinels
            );
        }
        if self.min_replicas_to_write as usize > self.replicas {
            bail!(
                "DevStackConfig::min_replicas_to_write is {} but only {} replicas are configured: \
                 the master would refuse every write; lower min_replicas_to_write or add replicas",
                self.min_replicas_to_write,
                self.replicas
            );
        }
        if self.master_name.is_empty()
            || self
                .master_name
                .chars()
                .any(|c| c.is_whitespace() || c == '"')
        {
            bail!(
                "DevStackConfig::master_name {:?} must be non-empty without whitespace or quotes: \
                 it is written unquoted into sentinel.conf",
                self.master_name
            );
        }
        Ok(())
    }
}

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

    /// Sentinel addresses as `127.0.0.1:PORT`, one per Sentinel.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("{LOOPBACK}:{}", s.port))
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

    /// `redis://127.0.0.1:PORT/` for data node `index`, for direct connections
    /// that bypass Sentinel (e.g. to check what a specific node holds).
    ///
    /// # Panics
    /// If `index` is out of range, as [`DevStack::node_port`].
    pub fn node_url(&self, index: usize) -> String {
        format!("redis://{LOOPBACK}:{}/", self.node_port(index))
    }

    /// Whether data node `index` is currently running (false after
    /// [`DevStack::kill_node`] or if it died on its own).
    pub fn is_node_running(&mut self, index: usize) -> bool {
        self.nodes.get_mut(index).is_some_and(Managed::is_running)
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Data,
    Sentinel,
}

/// One of our own binaries run as a child process for a demo or a test: its output goes to
/// a log file in the stack's directory; it is killed on drop, and its log tail is printed
/// if the thread is panicking (a failing test shows why).
pub struct Process {
    /// Label used in messages and as the log file's name.
    pub name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Process {
    /// Starts `bin` with `args` and extra `env`, logging to `dir/NAME.log`. The child does
    /// not inherit `REDIS_SENTINELS` or an OTLP endpoint from the caller's environment.
    pub fn spawn(
        dir: &Path,
        name: &str,
        bin: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create a log file in the stack's temp dir");
        let err = out.try_clone().expect("clone a log file handle");
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(out))
            .stderr(std::process::Stdio::from(err))
            .env("RUST_LOG", "info,auction=debug")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("REDIS_SENTINELS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e} (build it with `cargo build`)"));
        Process {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<i32> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if tokio::time::Instant::now() > until {
                anyhow::bail!("{} did not exit within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) with the system's `kill`.
    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} (last 80 lines) -----\n{}",
                self.name,
                tail(&self.log(), 80)
            );
        }
    }
}

/// One `redis-server` process: its files, its port and, while running, its
/// child handle. Dropping it kills and reaps the child, so a partially
/// started stack cleans up after itself on every error path.
struct Managed {
    label: String,
    kind: Kind,
    port: u16,
    work_dir: PathBuf,
    conf_path: PathBuf,
    log_path: PathBuf,
    /// stdout/stderr capture: Redis reports config errors there before its
    /// logfile is open.
    stdio_path: PathBuf,
    /// Config lines after `port`, kept so a port retry can rewrite the file.
    body: Vec<String>,
    program: PathBuf,
    /// Credentials for probing this process (data nodes only).
    creds: Option<(String, String)>,
    /// Lengths of the log files at the last spawn, so start-up failure
    /// detection only looks at what this attempt wrote.
    log_offsets: (u64, u64),
    child: Option<Child>,
}

impl Managed {
    fn new(label: String, kind: Kind, work_dir: PathBuf, program: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(&work_dir).with_context(|| {
            format!(
                "could not create directory {} for {label}",
                work_dir.display()
            )
        })?;
        let conf_name = match kind {
            Kind::Data => "redis.conf",
            Kind::Sentinel => "sentinel.conf",
        };
        Ok(Self {
            conf_path: work_dir.join(conf_name),
            log_path: work_dir.join("server.log"),
            stdio_path: work_dir.join("stdio.log"),
            work_dir,
            label,
            kind,
            port: 0,
            body: Vec::new(),
            program: program.to_owned(),
            creds: None,
            log_offsets: (0, 0),
            child: None,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let mut text = format!("port {}\n", self.port);
        for line in &self.body {
            text.push_str(line);
            text.push('\n');
        }
        fs::write(&self.conf_path, text).with_context(|| {
            format!(
                "could not write config {} for {}",
                self.conf_path.display(),
                self.label
            )
        })
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let program = &self.program;
        self.log_offsets = (file_len(&self.log_path), file_len(&self.stdio_path));
        let stdio = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stdio_path)
            .with_context(|| {
                format!(
                    "could not open {} for {}",
                    self.stdio_path.display(),
                    self.label
                )
            })?;
        let stderr = stdio.try_clone().with_context(|| {
            format!(
                "could not duplicate the stdio log handle for {}",
                self.label
            )
        })?;
        let mut command = Command::new(program);
        command.arg(&self.conf_path);
        if self.kind == Kind::Sentinel {
            command.arg("--sentinel");
        }
        // Never inherit the test's stdio: the harness captures it per test and
        // a child holding it open would also keep `cargo test` pipes alive.
        command
            .current_dir(&self.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdio))
            .stderr(Stdio::from(stderr));
        let child = command.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                anyhow!("{} not found in PATH: {INSTALL_HINT}", program.display())
            } else {
                anyhow::Error::new(e).context(format!(
                    "could not start {} for {}",
                    program.display(),
                    self.label
                ))
            }
        })?;
        tracing::debug!(process = %self.label, port = self.port, pid = child.id(), "spawned redis process");
        self.child = Some(child);
        Ok(())
    }

    /// Reaps the child if it exited on its own, so state reflects reality.
    fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) => {
                self.child = None;
                false
            }
            // try_wait failing means we cannot tell; assume alive so Drop still kills it.
            Some(Err(_)) => true,
            None => false,
        }
    }

    fn kill(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            // A kill error (e.g. it already exited on its own) does not
            // matter: the goal is a dead, reaped process, and a successful
            // wait() proves exactly that.
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    fn kill_quietly(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(process = %self.label, error = %e, "could not kill redis process");
        }
    }

    /// Waits until this process answers PING on its port and `INFO server`
    /// shows our child's pid: another test's server answering on a port we
    /// lost the race for must not be mistaken for ours.
    async fn wait_answering(&mut self, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(StartError::Failed(anyhow!(
                    "{} was not spawned",
                    self.label
                )));
            };
            let our_pid = child.id();
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    let output = self.output_since_spawn();
                    if output.contains("Address already in use") {
                        return Err(StartError::PortTaken(format!(
                            "port {} already in use",
                            self.port
                        )));
                    }
                    return Err(StartError::Failed(anyhow!(
                        "{} exited during start-up ({status}) on port {}; its output:\n{output}\n\
                         check the config in {}",
                        self.label,
                        self.port,
                        self.conf_path.display()
                    )));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(StartError::Failed(
                        anyhow::Error::new(e)
                            .context(format!("could not poll the state of {}", self.label)),
                    ));
                }
            }
            let probe =
                tokio::time::timeout_at(deadline, server_pid(self.port, self.creds.as_ref())).await;
            match probe {
                Ok(Ok(pid)) if pid == our_pid => return Ok(()),
                Ok(Ok(pid)) => {
                    return Err(StartError::PortTaken(format!(
                        "port {} is answered by another process (pid {pid}, ours is {our_pid})",
                        self.port
                    )));
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_elapsed) => {}
            }
            if Instant::now() >= deadline {
                return Err(StartError::Failed(anyhow!(
                    "timed out after {timeout:?} waiting for {} to answer PING on {LOOPBACK}:{} \
                     (last error: {last})\n{}",
                    self.label,
                    self.port,
                    self.log_tail(LOG_TAIL_LINES)
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn output_since_spawn(&self) -> String {
        let mut out = read_from(&self.log_path, self.log_offsets.0);
        out.push_str(&read_from(&self.stdio_path, self.log_offsets.1));
        out
    }

    fn log_tail(&self, lines: usize) -> String {
        let state = match &self.child {
            Some(child) => format!("pid {}", child.id()),
            None => "not running".to_owned(),
        };
        let mut out = format!(
            "----- {} on port {} ({state}) {} -----\n",
            self.label,
            self.port,
            self.log_path.display()
        );
        out.push_str(&tail(&read_from(&self.log_path, 0), lines));
        let stdio = read_from(&self.stdio_path, 0);
        if !stdio.trim().is_empty() {
            out.push_str(&format!("----- {} stdout/stderr -----\n", self.label));
            out.push_str(&tail(&stdio, lines));
        }
        out
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.kill_quietly();
    }
}

enum StartError {
    /// Lost the race for the port; worth retrying with a fresh one.
    PortTaken(String),
    Failed(anyhow::Error),
}

/// Starts `process` on a fresh port, retrying with another port when the
/// previous one turned out to be taken.
async fn launch(mut process: Managed, timeout: Duration) -> anyhow::Result<Managed> {
    let mut collisions = Vec::new();
    for attempt in 1..=PORT_ATTEMPTS {
        process.port = pick_free_port()?;
        process.write_config()?;
        process.spawn()?;
        match process.wait_answering(timeout).await {
            Ok(()) => return Ok(process),
            Err(StartError::PortTaken(why)) => {
                tracing::debug!(process = %process.label, attempt, %why, "port collision, retrying with a fresh port");
                process.kill_quietly();
                collisions.push(why);
            }
            Err(StartError::Failed(e)) => return Err(e),
        }
    }
    Err(anyhow!(
        "could not start {} after {PORT_ATTEMPTS} attempts, every port was taken by someone else ({}); \
         something on this machine is binding loopback ports aggressively",
        process.label,
        collisions.join("; ")
    ))
}

fn new_data_node(
    config: &DevStackConfig,
    root: &Path,
    index: usize,
    master_port: Option<u16>,
) -> anyhow::Result<Managed> {
    let label = match master_port {
        None => format!("node{index} (initial master)"),
        Some(_) => format!("node{index} (initial replica)"),
    };
    let mut node = Managed::new(
        label,
        Kind::Data,
        root.join(format!("node{index}")),
        &config.redis_server,
    )?;
    let mut body = vec![
        format!("bind {LOOPBACK}"),
        "protected-mode no".to_owned(),
        format!("dir {}", quote_path(&node.work_dir)),
        format!("logfile {}", quote_path(&node.log_path)),
        "daemonize no".to_owned(),
        format!(
            "appendonly {}",
            if config.appendonly { "yes" } else { "no" }
        ),
        "save \"\"".to_owned(),
        // Streaming the snapshot straight to the socket with no delay makes
        // replicas (and nodes rejoining after a failover) sync in milliseconds.
        "repl-diskless-sync yes".to_owned(),
        "repl-diskless-sync-delay 0".to_owned(),
        format!("min-replicas-to-write {}", config.min_replicas_to_write),
        format!("min-replicas-max-lag {}", config.min_replicas_max_lag),
    ];
    if let Some(master_port) = master_port {
        body.push(format!("replicaof {LOOPBACK} {master_port}"));
    }
    body.extend(config.extra_redis_conf.iter().cloned());
    node.body = body;
    node.creds = config.probe_credentials.clone();
    Ok(node)
}

fn new_sentinel(
    config: &DevStackConfig,
    root: &Path,
    index: usize,
    master_port: u16,
) -> anyhow::Result<Managed> {
    let mut sentinel = Managed::new(
        format!("sentinel{index}"),
        Kind::Sentinel,
        root.join(format!("sentinel{index}")),
        &config.redis_server,
    )?;
    let name = &config.master_name;
    let mut body = vec![
        format!("bind {LOOPBACK}"),
        "protected-mode no".to_owned(),
        format!("dir {}", quote_path(&sentinel.work_dir)),
        format!("logfile {}", quote_path(&sentinel.log_path)),
        "daemonize no".to_owned(),
        // `monitor` must precede the per-master settings that name it.
        format!(
            "sentinel monitor {name} {LOOPBACK} {master_port} {}",
            config.quorum
        ),
        format!(
            "sentinel down-after-milliseconds {name} {}",
            config.down_after.as_millis()
        ),
        format!(
            "sentinel failover-timeout {name} {}",
            config.failover_timeout.as_millis()
        ),
        format!("sentinel parallel-syncs {name} 1"),
    ];
    body.extend(config.extra_sentinel_conf.iter().cloned());
    sentinel.body = body;
    Ok(sentinel)
}

/// Waits until every replica's link is up and the master counts them all as
/// online (and, with `min-replicas-to-write`, as good enough to accept writes),
/// so the first write a test makes is not refused for lack of replicas.
async fn wait_for_replication(config: &DevStackConfig, nodes: &[Managed]) -> anyhow::Result<()> {
    let Some((master, replicas)) = nodes.split_first() else {
        return Ok(());
    };
    let timeout = config.ready_timeout;
    let master_port = master.port;
    // The probes own their inputs (ports, cloned credentials): futures that
    // borrow through closures trip rustc's higher-ranked Send inference and
    // would make `DevStack::start` unusable inside `tokio::spawn`.
    let waits: Vec<_> = replicas
        .iter()
        .map(|replica| {
            let (port, creds) = (replica.port, config.probe_credentials.clone());
            poll_until(timeout, move || {
                probe_replica_link(port, creds.clone(), master_port)
            })
        })
        .collect();
    for (replica, result) in replicas.iter().zip(join_all(waits).await) {
        result.map_err(|last| {
            anyhow!(
                "timed out after {timeout:?} waiting for {} to report master_link_status:up towards port \
                 {master_port} (last seen: {last})\n{}",
                replica.label,
                replica.log_tail(LOG_TAIL_LINES)
            )
        })?;
    }

    let expected = replicas.len();
    let min_good = config.min_replicas_to_write as usize;
    let creds = config.probe_credentials.clone();
    poll_until(timeout, move || probe_master_online(master_port, creds.clone(), expected, min_good))
        .await
        .map_err(|last| {
            anyhow!(
                "timed out after {timeout:?} waiting for {} to report connected_slaves:{expected} all online \
                 (last seen: {last})\n{}",
                master.label,
                master.log_tail(LOG_TAIL_LINES)
            )
        })
}

/// Waits until every Sentinel agrees on the master, knows every replica as
/// reachable, and has discovered the other Sentinels through their hello
/// messages (published every 2 s, so this is the slow part of start-up).
async fn wait_for_sentinels(
    config: &DevStackConfig,
    sentinels: &[Managed],
    master_port: u16,
    replica_ports: &[u16],
) -> anyhow::Result<()> {
    let timeout = config.ready_timeout;
    let others = sentinels.len().saturating_sub(1);
    let waits: Vec<_> = sentinels
        .iter()
        .map(|sentinel| {
            let (port, name, replica_ports) = (
                sentinel.port,
                config.master_name.clone(),
                replica_ports.to_vec(),
            );
            poll_until(timeout, move || {
                probe_sentinel_view(
                    port,
                    name.clone(),
                    master_port,
                    replica_ports.clone(),
                    others,
                )
            })
        })
        .collect();
    for (sentinel, result) in sentinels.iter().zip(join_all(waits).await) {
        result.map_err(|last| {
            anyhow!(
                "timed out after {timeout:?} waiting for {} to see master port {master_port}, replicas \
                 {replica_ports:?} and {others} other sentinels (last seen: {last})\n{}",
                sentinel.label,
                sentinel.log_tail(LOG_TAIL_LINES)
            )
        })?;
    }
    Ok(())
}

/// Re-runs `probe` every [`POLL_INTERVAL`] until it succeeds or `timeout`
/// passes; on timeout returns the probe's last complaint, which is what makes
/// readiness errors actionable. A probe still running at the deadline is
/// abandoned, so the bound is strict.
async fn poll_until<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not checked yet");
    loop {
        match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(complaint)) => last = complaint,
            Err(_elapsed) => {
                return Err(format!(
                    "{last}; the final check was still running at the deadline"
                ));
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// Probes: one check each, returning what they saw when the condition does
// not hold yet. They take owned arguments; see `wait_for_replication`.

async fn probe_replica_link(
    port: u16,
    creds: Option<(String, String)>,
    master_port: u16,
) -> Result<(), String> {
    let info = info_section(port, creds.as_ref(), "replication")
        .await
        .map_err(|e| e.to_string())?;
    check_replica_link(&info, master_port)
}

async fn probe_master_online(
    port: u16,
    creds: Option<(String, String)>,
    expected: usize,
    min_good: usize,
) -> Result<(), String> {
    let info = info_section(port, creds.as_ref(), "replication")
        .await
        .map_err(|e| e.to_string())?;
    let online = info
        .lines()
        .filter(|line| line.starts_with("slave") && line.contains("state=online"))
        .count();
    if online < expected {
        return Err(format!("{online} of {expected} replicas online"));
    }
    // Only reported when min-replicas-to-write is set; Redis recomputes it
    // about once per second, so it can trail the online count briefly.
    if min_good > 0 {
        let good: usize = info_field(&info, "min_slaves_good_slaves")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if good < min_good {
            return Err(format!("min_slaves_good_slaves:{good}, need {min_good}"));
        }
    }
    Ok(())
}

fn check_replica_link(info: &str, master_port: u16) -> Result<(), String> {
    let role = info_field(info, "role");
    let port = info_field(info, "master_port");
    let link = info_field(info, "master_link_status");
    if role == Some("slave") && port == Some(master_port.to_string().as_str()) && link == Some("up")
    {
        Ok(())
    } else {
        Err(format!(
            "role:{role:?} master_port:{port:?} master_link_status:{link:?}"
        ))
    }
}

async fn probe_sentinel_view(
    port: u16,
    name: String,
    master_port: u16,
    replica_ports: Vec<u16>,
    other_sentinels: usize,
) -> Result<(), String> {
    let mut con = connect(port, None).await.map_err(|e| e.to_string())?;
    let reported = sentinel_master_port_on(&mut con, &name)
        .await
        .map_err(|e| e.to_string())?;
    if reported != master_port {
        return Err(format!(
            "get-master-addr-by-name gives port {reported}, expected {master_port}"
        ));
    }
    let replicas = sentinel_entries(&mut con, "REPLICAS", &name)
        .await
        .map_err(|e| e.to_string())?;
    let healthy: BTreeSet<u16> = replicas
        .iter()
        .filter(|r| {
            let flags = entry_field(r, "flags").unwrap_or("");
            !flags.contains("s_down") && !flags.contains("disconnected")
        })
        .filter_map(|r| entry_field(r, "port")?.parse().ok())
        .collect();
    if let Some(missing) = replica_ports.iter().find(|p| !healthy.contains(p)) {
        return Err(format!(
            "replica on port {missing} not (yet) known and healthy; known: {healthy:?}"
        ));
    }
    let peers = sentinel_entries(&mut con, "SENTINELS", &name)
        .await
        .map_err(|e| e.to_string())?;
    if peers.len() < other_sentinels {
        return Err(format!(
            "knows {} other sentinels, expected {other_sentinels}",
            peers.len()
        ));
    }
    Ok(())
}

/// Succeeds with the new master's port once any Sentinel names a master other
/// than `old_port` and that node confirms it is a master.
async fn probe_failover(
    sentinel_ports: Vec<u16>,
    name: String,
    old_port: u16,
    creds: Option<(String, String)>,
) -> Result<u16, String> {
    let mut seen = Vec::new();
    for sentinel_port in sentinel_ports {
        match sentinel_master_port(sentinel_port, &name).await {
            Ok(port) if port != old_port => {
                let info = info_section(port, creds.as_ref(), "replication")
                    .await
                    .map_err(|e| {
                        format!("sentinel {sentinel_port} names {port}, which does not answer: {e}")
                    })?;
                return match info_field(&info, "role") {
                    Some("master") => Ok(port),
                    role => Err(format!(
                        "sentinel {sentinel_port} names {port}, which says role:{role:?}"
                    )),
                };
            }
            Ok(port) => seen.push(format!("sentinel {sentinel_port}: still {port}")),
            Err(e) => seen.push(format!("sentinel {sentinel_port}: {e}")),
        }
    }
    Err(seen.join("; "))
}

/// Succeeds once the node on `port` replicates, with a live link, from the
/// master the first answering Sentinel names.
async fn probe_rejoined(
    sentinel_ports: Vec<u16>,
    name: String,
    port: u16,
    creds: Option<(String, String)>,
) -> Result<(), String> {
    let mut master = Err(String::from("no Sentinel answered"));
    for sentinel_port in sentinel_ports {
        match sentinel_master_port(sentinel_port, &name).await {
            Ok(p) => {
                master = Ok(p);
                break;
            }
            Err(e) => master = Err(format!("sentinel {sentinel_port}: {e}")),
        }
    }
    probe_replica_link(port, creds, master?).await
}

async fn connect(
    port: u16,
    creds: Option<&(String, String)>,
) -> redis::RedisResult<MultiplexedConnection> {
    // Redis 7.0 does not know CLIENT SETINFO; skipping it keeps an error out
    // of every probe's handshake.
    let mut settings = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some((user, password)) = creds {
        settings = settings.set_username(user).set_password(password);
    }
    let info = redis::ConnectionAddr::Tcp(LOOPBACK.to_owned(), port)
        .into_connection_info()?
        .set_redis_settings(settings);
    let client = redis::Client::open(info)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_CONNECT_TIMEOUT))
        .set_response_timeout(Some(PROBE_RESPONSE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

async fn info_section(
    port: u16,
    creds: Option<&(String, String)>,
    section: &str,
) -> redis::RedisResult<String> {
    let mut con = connect(port, creds).await?;
    redis::cmd("INFO").arg(section).query_async(&mut con).await
}

/// PINGs the server on `port` and returns the pid it reports.
async fn server_pid(port: u16, creds: Option<&(String, String)>) -> anyhow::Result<u32> {
    let mut con = connect(port, creds).await?;
    let pong: String = redis::cmd("PING").query_async(&mut con).await?;
    if pong != "PONG" {
        bail!("PING answered {pong:?}");
    }
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await?;
    info_field(&info, "process_id")
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| anyhow!("INFO server has no process_id"))
}

async fn sentinel_master_port(sentinel_port: u16, name: &str) -> anyhow::Result<u16> {
    let mut con = connect(sentinel_port, None).await?;
    sentinel_master_port_on(&mut con, name).await
}

async fn sentinel_master_port_on(
    con: &mut MultiplexedConnection,
    name: &str,
) -> anyhow::Result<u16> {
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query_async(con)
        .await?;
    let (_, port) =
        addr.ok_or_else(|| anyhow!("this Sentinel does not monitor a master named {name:?}"))?;
    port.parse()
        .with_context(|| format!("Sentinel returned a non-numeric master port {port:?}"))
}

/// `SENTINEL REPLICAS|SENTINELS name`: under RESP2 each entry is a flat
/// field/value array.
async fn sentinel_entries(
    con: &mut MultiplexedConnection,
    subcommand: &str,
    name: &str,
) -> redis::RedisResult<Vec<Vec<String>>> {
    redis::cmd("SENTINEL")
        .arg(subcommand)
        .arg(name)
        .query_async(con)
        .await
}

fn entry_field<'a>(entry: &'a [String], key: &str) -> Option<&'a str> {
    entry
        .chunks_exact(2)
        .find(|pair| pair[0] == key)
        .map(|pair| pair[1].as_str())
}

fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Ports this process has already handed out. The OS may return the same
/// ephemeral port to two bind(0) probes once the first probe socket is closed;
/// remembering them rules out collisions between stacks in the same process,
/// leaving only cross-process races for the retry in [`launch`].
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

fn pick_free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).context(
            "could not bind 127.0.0.1:0 to find a free port: is the loopback interface up?",
        )?;
        let port = listener
            .local_addr()
            .context("could not read the address of a probe socket on 127.0.0.1")?
            .port();
        drop(listener);
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!(
        "the OS kept returning loopback ports this process already uses; the ephemeral port range is too small"
    )
}

/// Quotes a path for a Redis config file, which splits on whitespace and
/// understands C-style escapes inside double quotes.
fn quote_path(path: &Path) -> String {
    let raw = path.to_string_lossy();
    let mut out = String::with_capacity(raw.len() + 2);
    out.push('"');
    for c in raw.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The content of `path` from byte `offset`, lossily decoded; empty if the
/// file does not exist (yet), since logs are diagnostics, not data.
fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_end(&mut bytes)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => format!("(could not read {}: {e})\n", path.display()),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    out.push('\n');
    out
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
