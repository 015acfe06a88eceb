//! [`DevStackConfig`]: the shape and tuning of a local topology, checked before anything
//! starts so a wrong shape fails with a sentence instead of a hung readiness wait.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::net::Network;

/// Redis's input and Pub/Sub output limits, sized for the wire: the same lines as
/// `deploy/base/redis/redis.conf` (`tests/manifests.rs` checks that they agree; the README of
/// `deploy/` explains the sizes). Every data node gets them before
/// [`DevStackConfig::extra_redis_conf`], whose lines therefore win.
pub const WIRE_LIMITS: [&str; 3] = [
    "proto-max-bulk-len 1mb",
    "client-query-buffer-limit 16mb",
    "client-output-buffer-limit pubsub 64mb 16mb 60",
];

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
    /// `user` lines), after [`WIRE_LIMITS`]. If these lock out the `default` user, set
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
    /// Run every process on this network instead of loopback (default `None`): data node
    /// `i` on the host named `redis{i}`, Sentinel `j` on `sentinel{j}`, so a test can cut
    /// them apart ([`Network::cut`]).
    pub network: Option<Arc<Network>>,
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
            network: None,
        }
    }
}

impl DevStackConfig {
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
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
