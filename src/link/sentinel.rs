//! Finding and keeping the Redis master through Sentinel.
//!
//! redis-rs resolves a master once and then trusts its connection; after a failover that
//! connection either breaks forever or keeps talking to the demoted node (`READONLY`). So
//! this module owns re-resolution: a supervisor task asks the configured Sentinels in turn,
//! confirms the answer with `ROLE`, publishes the live [`Link`] on a watch channel, and
//! drops it (re-resolving with capped jittered backoff) when a caller reports a connection
//! error, `READONLY` or `LOADING`, when a probe finds the node is no longer master, or when a
//! Sentinel announces `+switch-master`. Each link carries a generation so a stale report
//! about an old master never tears down a new one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, ServerErrorKind, Value,
};
use tokio::sync::{Notify, watch};
use tokio::time::timeout;
use tracing::{Instrument, debug, info, warn};

use crate::runtime::backoff::Backoff;
use crate::runtime::config::{HostPort, RedisArgs};
use crate::runtime::task::TaskGuard;

/// Timeouts and credentials for reaching Redis through Sentinel.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Sentinels, asked in this order.
    pub sentinels: Vec<HostPort>,
    /// The monitored master's name.
    pub master_name: String,
    /// Credentials for data nodes.
    pub redis_auth: Auth,
    /// Credentials for Sentinels.
    pub sentinel_auth: Auth,
    /// Bound on establishing a TCP connection and handshake.
    pub connect_timeout: Duration,
    /// Bound on every command's reply.
    pub response_timeout: Duration,
    /// How often the supervisor checks that the link still reaches the master.
    pub probe_interval: Duration,
}

/// Optional ACL user and password.
#[derive(Clone, Default)]
pub struct Auth {
    /// ACL user name; `None` means the default user.
    pub username: Option<String>,
    /// Password; never printed.
    pub password: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How long a command on a master link may take before the link counts as broken.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Settings {
    /// Settings from the command line, with the default timeouts.
    pub fn from_args(args: &RedisArgs) -> Self {
        Self {
            sentinels: args.sentinels.clone(),
            master_name: args.master_name.clone(),
            redis_auth: Auth {
                username: args.redis_username.clone(),
                password: args.redis_password.clone(),
            },
            sentinel_auth: Auth {
                username: args.sentinel_username.clone(),
                password: args.sentinel_password.clone(),
            },
            connect_timeout: Duration::from_secs(1),
            response_timeout: RESPONSE_TIMEOUT,
            probe_interval: Duration::from_millis(500),
        }
    }

    fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
    }
}

/// Why the master could not be found. Operators see these verbatim.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// Not one configured Sentinel answered.
    #[error(
        "no Sentinel reachable ({0}); check REDIS_SENTINELS and that the Sentinels are running"
    )]
    NoSentinelReachable(String),
    /// Sentinels answered but none monitors this master name.
    #[error(
        "no Sentinel knows master name {name:?} (asked {asked}); check REDIS_MASTER_NAME against `sentinel monitor` in sentinel.conf"
    )]
    MasterUnknown {
        /// The configured name.
        name: String,
        /// How many Sentinels said so.
        asked: usize,
    },
    /// The address Sentinel gave does not answer or is not a master (failover in progress).
    #[error("master {addr} named by Sentinel is not usable: {problem}")]
    MasterUnusable {
        /// Where Sentinel pointed.
        addr: String,
        /// What went wrong there.
        problem: String,
    },
}

/// A live connection to the current master.
#[derive(Clone)]
pub struct Link {
    /// Increases every time the master is (re-)resolved.
    pub generation: u64,
    /// The master's address as Sentinel announced it.
    pub addr: HostPort,
    /// Multiplexed connection; cheap to clone, shared by all callers of this generation.
    pub conn: MultiplexedConnection,
    client: Client,
}

impl Link {
    /// A client for extra dedicated connections to the same master (Pub/Sub).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// True when `err` means this connection no longer reaches a writable master.
pub fn is_master_gone(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::BusyLoading)
                | ErrorKind::Server(ServerErrorKind::MasterDown)
        )
}

/// Handle to the current master; clone freely. Dropping the last clone stops the supervisor.
#[derive(Clone)]
pub struct Master {
    state: watch::Receiver<Option<Link>>,
    invalid: Arc<AtomicU64>,
    wake: Arc<Notify>,
    settings: Arc<Settings>,
    _supervisor: Arc<TaskGuard>,
}

impl Master {
    /// Starts the supervisor; returns at once. Use [`Master::link`] to wait for a master.
    pub fn start(settings: Settings) -> Master {
        let settings = Arc::new(settings);
        let (tx, rx) = watch::channel(None);
        let invalid = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(supervise(
            settings.clone(),
            tx,
            invalid.clone(),
            wake.clone(),
        ));
        Master {
            state: rx,
            invalid,
            wake,
            settings,
            _supervisor: Arc::new(TaskGuard::new("sentinel supervisor", task)),
        }
    }

    /// The settings this handle was started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The current link, waiting up to `wait` for one.
    pub async fn link(&self, wait: Duration) -> Result<Link, Unavailable> {
        let mut rx = self.state.clone();
        match timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(link)) => link.clone().ok_or(Unavailable(wait)),
            _ => Err(Unavailable(wait)),
        }
    }

    /// The current link, if one is up right now.
    pub fn current(&self) -> Option<Link> {
        self.state.borrow().clone()
    }

    /// Watches link changes (`None` while re-resolving).
    pub fn watch(&self) -> watch::Receiver<Option<Link>> {
        self.state.clone()
    }

    /// Reports an error seen on the link of `generation`; re-resolves if it means the
    /// master is gone. Reports about older generations are ignored.
    pub fn report(&self, generation: u64, err: &RedisError) {
        if is_master_gone(err) {
            debug!(generation, error = %err, "master link reported broken");
            self.invalidate(generation);
        }
    }

    /// Forces re-resolution of the link of `generation`.
    pub fn invalidate(&self, generation: u64) {
        self.invalid.fetch_max(generation, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// No master link became available in time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("Redis master unavailable (waited {0:?}); Sentinel re-resolution in progress")]
pub struct Unavailable(pub Duration);

fn client_for(addr: &HostPort, auth: &Auth) -> Result<Client, RedisError> {
    // Redis 7.0 does not know CLIENT SETINFO, which redis-rs sends by default.
    let mut redis = RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(u) = &auth.username {
        redis = redis.set_username(u);
    }
    if let Some(p) = &auth.password {
        redis = redis.set_password(p);
    }
    let info = ConnectionAddr::Tcp(addr.host.clone(), addr.port)
        .into_connection_info()?
        .set_redis_settings(redis);
    Client::open(info)
}

/// Opens a multiplexed connection to a Sentinel.
pub async fn connect_sentinel(
    settings: &Settings,
    addr: &HostPort,
) -> Result<MultiplexedConnection, RedisError> {
    client_for(addr, &settings.sentinel_auth)?
        .get_multiplexed_async_connection_with_config(&settings.connection_config())
        .await
}

async fn ask_sentinel(
    settings: &Settings,
    conn: &mut MultiplexedConnection,
) -> Result<Option<HostPort>, RedisError> {
    let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(&settings.master_name)
        .query_async(conn)
        .await?;
    Ok(reply.map(|(host, port)| HostPort { host, port }))
}

async fn role(conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
    let reply: Vec<Value> = redis::cmd("ROLE").query_async(conn).await?;
    Ok(match reply.first() {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        other => format!("{other:?}"),
    })
}

/// Connects to `addr` and checks it calls itself master.
async fn confirm_master(
    settings: &Settings,
    addr: HostPort,
    generation: u64,
) -> Result<Link, ResolveError> {
    let unusable = |problem: String| ResolveError::MasterUnusable {
        addr: addr.to_string(),
        problem,
    };
    let client = client_for(&addr, &settings.redis_auth).map_err(|e| unusable(e.to_string()))?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&settings.connection_config())
        .await
        .map_err(|e| unusable(format!("cannot connect: {e}")))?;
    let role = role(&mut conn)
        .await
        .map_err(|e| unusable(format!("ROLE failed: {e}")))?;
    if role != "master" {
        return Err(unusable(format!(
            "ROLE says {role:?} (a failover is probably in progress)"
        )));
    }
    Ok(Link {
        generation,
        addr,
        conn,
        client,
    })
}

/// Asks each Sentinel in turn for the master and confirms it with `ROLE`.
pub async fn resolve(settings: &Settings, generation: u64) -> Result<Link, ResolveError> {
    let mut unreachable = Vec::new();
    let mut unknown = 0;
    let mut unusable = None;
    for sentinel in &settings.sentinels {
        let mut conn = match connect_sentinel(settings, sentinel).await {
            Ok(c) => c,
            Err(e) => {
                unreachable.push(format!("{sentinel}: {e}"));
                continue;
            }
        };
        match ask_sentinel(settings, &mut conn).await {
            Ok(Some(addr)) => match confirm_master(settings, addr, generation).await {
                Ok(link) => return Ok(link),
                Err(e) => unusable = Some(e),
            },
            Ok(None) => unknown += 1,
            Err(e) => unreachable.push(format!("{sentinel}: {e}")),
        }
    }
    Err(if let Some(e) = unusable {
        e
    } else if unknown > 0 {
        ResolveError::MasterUnknown {
            name: settings.master_name.clone(),
            asked: unknown,
        }
    } else {
        ResolveError::NoSentinelReachable(unreachable.join("; "))
    })
}

/// What the Sentinels announced about our master, as running counts (a watch of counts
/// never loses an announcement to coalescing, unlike a watch of the last event).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Announcements {
    /// `+failover-state-send-slaveof-noone`: the leader is about to promote a replica.
    failover_started: u64,
    /// `+switch-master`: the new master is in place.
    switched: u64,
}

/// How long to refuse the old master after a failover started, if no `+switch-master`
/// follows (the failover was aborted).
const FAILOVER_HOLD: Duration = Duration::from_secs(10);

async fn supervise(
    settings: Arc<Settings>,
    state: watch::Sender<Option<Link>>,
    invalid: Arc<AtomicU64>,
    wake: Arc<Notify>,
) {
    let (announce_tx, mut announce_rx) = watch::channel(Announcements::default());
    let announce_tx = Arc::new(announce_tx);
    // One watcher per Sentinel: only the failover leader announces the promotion, and we
    // cannot know in advance which Sentinel leads.
    let _watchers: Vec<TaskGuard> = settings
        .sentinels
        .iter()
        .map(|addr| {
            TaskGuard::new(
                "sentinel announcements watcher",
                tokio::spawn(watch_announcements(
                    settings.clone(),
                    addr.clone(),
                    announce_tx.clone(),
                )),
            )
        })
        .collect();
    let mut generation = 0u64;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    // After a failover starts, the old master must not be used again: it may still accept
    // writes that the promoted replica will never see.
    let mut avoid: Option<(HostPort, tokio::time::Instant)> = None;
    let mut seen = *announce_rx.borrow_and_update();
    loop {
        let now = *announce_rx.borrow_and_update();
        if now.switched != seen.switched {
            avoid = None;
        }
        seen = now;
        if avoid
            .as_ref()
            .is_some_and(|(_, until)| tokio::time::Instant::now() >= *until)
        {
            avoid = None;
        }
        let resolving = tracing::info_span!("sentinel.resolve", master_name = %settings.master_name, generation = generation + 1);
        let link = match resolve_avoiding(&settings, generation + 1, avoid.as_ref().map(|(a, _)| a))
            .instrument(resolving)
            .await
        {
            Ok(link) => link,
            Err(e) => {
                // Log the first failure and then every tenth, so an outage is visible but
                // does not flood the log at the retry rate.
                if backoff.attempts().is_multiple_of(10) {
                    warn!(error = %e, attempt = backoff.attempts() + 1, "cannot reach the Redis master; retrying");
                }
                // A +switch-master ends the wait at once: the promoted replica is ready.
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = announce_rx.changed() => {}
                }
                continue;
            }
        };
        backoff.reset();
        generation = link.generation;
        info!(master = %link.addr, generation, "connected to Redis master");
        state.send_replace(Some(link.clone()));
        let (reason, failover) = watch_link(
            &settings,
            &link,
            &invalid,
            &wake,
            &mut announce_rx,
            &mut seen,
        )
        .await;
        if failover {
            avoid = Some((
                link.addr.clone(),
                tokio::time::Instant::now() + FAILOVER_HOLD,
            ));
        }
        // Drop the link before logging: callers stop using it as early as possible.
        state.send_replace(None);
        warn!(master = %link.addr, generation, %reason, "lost the Redis master; re-resolving through Sentinel");
    }
}

/// [`resolve`], refusing `avoid` (a master being failed over) as "failover in progress".
async fn resolve_avoiding(
    settings: &Settings,
    generation: u64,
    avoid: Option<&HostPort>,
) -> Result<Link, ResolveError> {
    let link = resolve(settings, generation).await?;
    match avoid {
        Some(old) if *old == link.addr => Err(ResolveError::MasterUnusable {
            addr: old.to_string(),
            problem: "a failover away from it is in progress; waiting for the promoted replica"
                .into(),
        }),
        _ => Ok(link),
    }
}

/// Returns when `link` should be abandoned: the reason, and whether a failover started.
async fn watch_link(
    settings: &Settings,
    link: &Link,
    invalid: &AtomicU64,
    wake: &Notify,
    announcements: &mut watch::Receiver<Announcements>,
    seen: &mut Announcements,
) -> (String, bool) {
    let mut probe = tokio::time::interval(settings.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sentinel_conn: Option<MultiplexedConnection> = None;
    let mut next_sentinel = 0usize;
    loop {
        if invalid.load(Ordering::SeqCst) >= link.generation {
            return (
                "a caller saw the connection fail or the node refuse writes".into(),
                false,
            );
        }
        tokio::select! {
            _ = wake.notified() => continue,
            changed = announcements.changed() => {
                if changed.is_err() {
                    continue;
                }
                let now = *announcements.borrow_and_update();
                let previous = std::mem::replace(seen, now);
                if now.failover_started != previous.failover_started {
                    return ("a Sentinel started a failover (+failover-state-send-slaveof-noone)".into(), true);
                }
                if now.switched != previous.switched {
                    return ("Sentinel announced +switch-master".into(), false);
                }
                continue;
            }
            _ = probe.tick() => {}
        }
        let mut conn = link.conn.clone();
        match timeout(settings.response_timeout, role(&mut conn)).await {
            Ok(Ok(r)) if r == "master" => {}
            Ok(Ok(r)) => return (format!("node now reports ROLE {r:?}"), false),
            Ok(Err(e)) => return (format!("probe failed: {e}"), false),
            Err(_) => return ("probe timed out".into(), false),
        }
        // Cross-check with a Sentinel; its silence is no reason to drop a working master.
        if sentinel_conn.is_none() {
            let addr = &settings.sentinels[next_sentinel % settings.sentinels.len()];
            next_sentinel += 1;
            sentinel_conn = connect_sentinel(settings, addr).await.ok();
        }
        if let Some(conn) = sentinel_conn.as_mut() {
            match ask_sentinel(settings, conn).await {
                Ok(Some(addr)) if addr != link.addr => {
                    return (format!("Sentinel now names {addr} as master"), false);
                }
                Ok(_) => {}
                Err(_) => sentinel_conn = None,
            }
        }
    }
}

/// How often the Sentinel announcement watcher checks its connection is alive.
const WATCHER_PING_EVERY: Duration = Duration::from_secs(5);

/// Watches one Sentinel's announcements about our master, reconnecting with backoff.
/// Missed announcements are caught by the periodic probe.
async fn watch_announcements(
    settings: Arc<Settings>,
    addr: HostPort,
    tx: Arc<watch::Sender<Announcements>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let subscribed = async {
            let client = client_for(&addr, &settings.sentinel_auth)?;
            let mut pubsub = timeout(settings.connect_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| {
                    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })??;
            pubsub
                .subscribe(&["+switch-master", "+failover-state-send-slaveof-noone"])
                .await?;
            Ok::<_, RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => {
                backoff.reset();
                debug!(sentinel = %addr, "watching Sentinel announcements");
                // A half-open connection would silently miss announcements: PING it
                // every few seconds and reconnect when it does not answer in time.
                let (mut sink, mut stream) = pubsub.split();
                let mut liveness = tokio::time::interval(WATCHER_PING_EVERY);
                liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let msg = tokio::select! {
                        msg = stream.next() => match msg {
                            Some(msg) => msg,
                            None => break,
                        },
                        _ = liveness.tick() => {
                            match timeout(settings.response_timeout, sink.ping::<redis::Value>()).await {
                                Ok(Ok(_)) => continue,
                                Ok(Err(e)) => warn!(sentinel = %addr, error = %e, "Sentinel announcement watcher: PING failed; reconnecting"),
                                Err(_) => warn!(sentinel = %addr, "Sentinel announcement watcher: no PONG in time; reconnecting"),
                            }
                            break;
                        }
                    };
                    let payload = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                    let channel = msg.get_channel_name().to_owned();
                    if !announcement_is_for(&channel, &payload, &settings.master_name) {
                        continue;
                    }
                    info!(sentinel = %addr, %channel, %payload, "Sentinel announcement");
                    tx.send_modify(|a| match channel.as_str() {
                        "+switch-master" => a.switched += 1,
                        _ => a.failover_started += 1,
                    });
                }
                debug!(sentinel = %addr, "Sentinel announcement subscription ended");
            }
            Err(e) => {
                debug!(sentinel = %addr, error = %e, "cannot watch this Sentinel's announcements")
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// True when a Sentinel announcement concerns `master`. `+switch-master` payloads start
/// with the master name; instance events end with `@ <master> <ip> <port>`.
fn announcement_is_for(channel: &str, payload: &str, master: &str) -> bool {
    let words: Vec<&str> = payload.split_whitespace().collect();
    if channel == "+switch-master" {
        return words.first() == Some(&master);
    }
    words
        .iter()
        .position(|w| *w == "@")
        .and_then(|i| words.get(i + 1))
        == Some(&master)
}

#[cfg(test)]
mod tests {
    use super::announcement_is_for;

    #[test]
    fn announcements_are_matched_to_the_master_name() {
        assert!(announcement_is_for(
            "+switch-master",
            "mymaster 127.0.0.1 1 127.0.0.1 2",
            "mymaster"
        ));
        assert!(!announcement_is_for(
            "+switch-master",
            "other 127.0.0.1 1 127.0.0.1 2",
            "mymaster"
        ));
        let promote = "slave 127.0.0.1:6380 127.0.0.1 6380 @ mymaster 127.0.0.1 6379";
        assert!(announcement_is_for(
            "+failover-state-send-slaveof-noone",
            promote,
            "mymaster"
        ));
        assert!(!announcement_is_for(
            "+failover-state-send-slaveof-noone",
            promote,
            "mymaster2"
        ));
    }
}
