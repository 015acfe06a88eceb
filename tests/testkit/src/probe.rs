//! Probes: one check each against a data node or a Sentinel, answering what they saw when
//! the condition does not hold yet, and the readiness waits built from them. They take
//! owned arguments: futures that borrow through closures trip rustc's higher-ranked `Send`
//! inference and would make `DevStack::start` unusable inside `tokio::spawn`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::future::join_all;
use redis::IntoConnectionInfo as _;
use redis::aio::MultiplexedConnection;

use crate::LOG_TAIL_LINES;
use crate::config::DevStackConfig;
use crate::eventually::poll_until;
use crate::net::host_of;
use crate::node::Managed;

/// Per-probe bounds. Short, because a probe that does not answer quickly is
/// simply retried on the next poll until the overall readiness deadline.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const PROBE_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits until every replica's link is up and the master counts them all as
/// online (and, with `min-replicas-to-write`, as good enough to accept writes),
/// so the first write a test makes is not refused for lack of replicas.
pub(crate) async fn wait_for_replication(
    config: &DevStackConfig,
    nodes: &[Managed],
) -> anyhow::Result<()> {
    let Some((master, replicas)) = nodes.split_first() else {
        return Ok(());
    };
    let timeout = config.ready_timeout;
    let master_port = master.port;
    // The probes own their inputs (ports, cloned credentials): see the module doc.
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
pub(crate) async fn wait_for_sentinels(
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

pub(crate) async fn probe_replica_link(
    port: u16,
    creds: Option<(String, String)>,
    master_port: u16,
) -> Result<(), String> {
    let info = info_section(port, creds.as_ref(), "replication")
        .await
        .map_err(|e| e.to_string())?;
    check_replica_link(&info, master_port)
}

pub(crate) async fn probe_master_online(
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

pub(crate) async fn probe_sentinel_view(
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
pub(crate) async fn probe_failover(
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
pub(crate) async fn probe_rejoined(
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

pub(crate) async fn connect(
    port: u16,
    creds: Option<&(String, String)>,
) -> redis::RedisResult<MultiplexedConnection> {
    // Redis 7.0 does not know CLIENT SETINFO; skipping it keeps an error out
    // of every probe's handshake.
    let mut settings = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some((user, password)) = creds {
        settings = settings.set_username(user).set_password(password);
    }
    let info = redis::ConnectionAddr::Tcp(host_of(port), port)
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

pub(crate) async fn info_section(
    port: u16,
    creds: Option<&(String, String)>,
    section: &str,
) -> redis::RedisResult<String> {
    let mut con = connect(port, creds).await?;
    redis::cmd("INFO").arg(section).query_async(&mut con).await
}

/// PINGs the server on `port` and returns the pid it reports.
pub(crate) async fn server_pid(port: u16, creds: Option<&(String, String)>) -> anyhow::Result<u32> {
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

pub(crate) async fn sentinel_master_port(sentinel_port: u16, name: &str) -> anyhow::Result<u16> {
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

/// The value of `key` in the text of an `INFO` reply (`key:value` lines), trimmed.
pub fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Subscribers of `channel` on the node on `port` (`PUBSUB NUMSUB`).
pub(crate) async fn probe_subscribers(
    port: u16,
    creds: Option<(String, String)>,
    channel: String,
    want: u64,
) -> Result<u64, String> {
    let mut con = connect(port, creds.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut con)
        .await
        .map_err(|e| e.to_string())?;
    let count = counts.first().map_or(0, |c| c.1);
    if count >= want {
        Ok(count)
    } else {
        Err(format!("{count} of {want} subscribers on {channel}"))
    }
}
