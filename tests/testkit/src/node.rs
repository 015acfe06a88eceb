//! One Redis process (a data node or a Sentinel) owned by the kit: its directory, config
//! file, port and child handle. A node is started on a fresh port and retried on another
//! when it loses the race for it; dropping it kills and reaps the child. On a
//! [`Network`](crate::net::Network) it runs in its host's namespace and binds its address.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::time::Instant;

use crate::config::{DevStackConfig, WIRE_LIMITS};
use crate::eventually::POLL_INTERVAL;
use crate::logfile::{file_len, read_from, tail};
use crate::net::{command_in, host_of, register};
use crate::port::free_port;
use crate::probe::server_pid;
use crate::{LOG_TAIL_LINES, LOOPBACK};

/// Fresh-port attempts per process before giving up; a collision needs another
/// test to grab the same port in the few milliseconds between our probe bind
/// and the server's bind, so more than one retry in a row means something else.
const PORT_ATTEMPTS: usize = 5;
const INSTALL_HINT: &str = "install it with `apt-get install -y redis-server redis-sentinel`, \
     or point DevStackConfig::redis_server at the binary";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Data,
    Sentinel,
}

/// One `redis-server` process: its files, its port and, while running, its
/// child handle. Dropping it kills and reaps the child, so a partially
/// started stack cleans up after itself on every error path.
pub(crate) struct Managed {
    pub(crate) label: String,
    pub(crate) kind: Kind,
    pub(crate) port: u16,
    pub(crate) work_dir: PathBuf,
    pub(crate) conf_path: PathBuf,
    pub(crate) log_path: PathBuf,
    /// stdout/stderr capture: Redis reports config errors there before its
    /// logfile is open.
    pub(crate) stdio_path: PathBuf,
    /// Config lines after `port`, kept so a port retry can rewrite the file.
    pub(crate) body: Vec<String>,
    pub(crate) program: PathBuf,
    /// Credentials for probing this process (data nodes only).
    pub(crate) creds: Option<(String, String)>,
    /// Lengths of the log files at the last spawn, so start-up failure
    /// detection only looks at what this attempt wrote.
    pub(crate) log_offsets: (u64, u64),
    pub(crate) child: Option<Child>,
    /// The address it binds: loopback, or its host's data address on a network.
    pub(crate) host: String,
    /// The namespace it runs in, on a network.
    pub(crate) netns: Option<String>,
}

impl Managed {
    pub(crate) fn new(
        label: String,
        kind: Kind,
        work_dir: PathBuf,
        program: &Path,
    ) -> anyhow::Result<Self> {
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
            host: LOOPBACK.to_owned(),
            netns: None,
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn write_config(&self) -> anyhow::Result<()> {
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

    pub(crate) fn spawn(&mut self) -> anyhow::Result<()> {
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
        let mut command = command_in(self.netns.as_deref(), program);
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
    pub(crate) fn is_running(&mut self) -> bool {
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

    pub(crate) fn kill(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            // A kill error (e.g. it already exited on its own) does not
            // matter: the goal is a dead, reaped process, and a successful
            // wait() proves exactly that.
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    pub(crate) fn kill_quietly(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(process = %self.label, error = %e, "could not kill redis process");
        }
    }

    /// Waits until this process answers PING on its port and `INFO server`
    /// shows our child's pid: another test's server answering on a port we
    /// lost the race for must not be mistaken for ours.
    pub(crate) async fn wait_answering(&mut self, timeout: Duration) -> Result<(), StartError> {
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
                    "timed out after {timeout:?} waiting for {} to answer PING on {}:{} \
                     (last error: {last})\n{}",
                    self.label,
                    self.host,
                    self.port,
                    self.log_tail(LOG_TAIL_LINES)
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub(crate) fn output_since_spawn(&self) -> String {
        let mut out = read_from(&self.log_path, self.log_offsets.0);
        out.push_str(&read_from(&self.stdio_path, self.log_offsets.1));
        out
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let state = match &self.child {
            Some(child) => format!("pid {}", child.id()),
            None => "not running".to_owned(),
        };
        let mut out = format!(
            "----- {} on {}:{} ({state}) {} -----\n",
            self.label,
            self.host,
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

pub(crate) enum StartError {
    /// Lost the race for the port; worth retrying with a fresh one.
    PortTaken(String),
    Failed(anyhow::Error),
}

/// Starts `process` on a fresh port, retrying with another port when the
/// previous one turned out to be taken.
pub(crate) async fn launch(mut process: Managed, timeout: Duration) -> anyhow::Result<Managed> {
    let mut collisions = Vec::new();
    for attempt in 1..=PORT_ATTEMPTS {
        process.port = free_port()?;
        if process.netns.is_some() && !register(process.port, &process.host) {
            continue;
        }
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

pub(crate) fn new_data_node(
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
    place(&mut node, config, &format!("redis{index}"));
    let mut body = vec![
        format!("bind {}", node.host),
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
        body.push(format!("replicaof {} {master_port}", host_of(master_port)));
    }
    body.extend(WIRE_LIMITS.iter().map(|line| (*line).to_owned()));
    body.extend(config.extra_redis_conf.iter().cloned());
    node.body = body;
    node.creds = config.probe_credentials.clone();
    Ok(node)
}

pub(crate) fn new_sentinel(
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
    place(&mut sentinel, config, &format!("sentinel{index}"));
    let name = &config.master_name;
    let mut body = vec![
        format!("bind {}", sentinel.host),
        "protected-mode no".to_owned(),
        format!("dir {}", quote_path(&sentinel.work_dir)),
        format!("logfile {}", quote_path(&sentinel.log_path)),
        "daemonize no".to_owned(),
        // `monitor` must precede the per-master settings that name it.
        format!(
            "sentinel monitor {name} {} {master_port} {}",
            host_of(master_port),
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

/// Puts `process` on the network host `name` when the stack runs on a network.
fn place(process: &mut Managed, config: &DevStackConfig, name: &str) {
    if let Some(net) = &config.network {
        let host = net.host(name);
        process.host = host.ip.clone();
        process.netns = Some(host.netns.clone());
    }
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
