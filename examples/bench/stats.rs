//! Process and Redis statistics: CPU time and peak RSS of a process and busy time of the
//! machine (from /proc), a process's nice value, `INFO` and `LATENCY` figures of every data
//! node, `INFO commandstats`, the round-trip probe and the event-loop lag sampled during a
//! window, and `redis-benchmark` on the master.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use auction::link::sentinel::Master;
use auction_testkit::{DevStack, info_field};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use serde_json::{Value, json};

use crate::result::{NodeStats, Probe, percentiles_ms};

pub(crate) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, seconds (0 when unreadable).
pub(crate) fn proc_cpu_s(pid: u32, clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime is field 14, stime 15 (1-based); here field 3 is index 0.
    (tick(11) + tick(12)) / clk_tck
}

/// VmHWM of `pid` in MB (0 when unreadable).
pub(crate) fn proc_peak_rss_mb(pid: u32) -> f64 {
    proc_status_mb(pid, "VmHWM:")
}

/// VmRSS of `pid` in MB (0 when unreadable).
pub(crate) fn proc_rss_mb(pid: u32) -> f64 {
    proc_status_mb(pid, "VmRSS:")
}

/// A `kB` figure of `/proc/PID/status` (`field` with its colon) in MB (0 when unreadable).
fn proc_status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub(crate) async fn direct(port: u16) -> anyhow::Result<MultiplexedConnection> {
    use redis::IntoConnectionInfo as _;
    let client = redis::Client::open(
        redis::ConnectionAddr::Tcp("127.0.0.1".into(), port)
            .into_connection_info()?
            .set_redis_settings(redis::RedisConnectionInfo::default().set_skip_set_lib_name()),
    )?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// CPU and persistence counters of every data node (index 0 = the initial master); at the
/// window's start (`reset`) the latency monitor is reset, at its end it is read.
pub(crate) async fn node_stats(stack: &DevStack, reset: bool) -> Vec<NodeStats> {
    let mut out = Vec::new();
    for port in stack.redis_ports() {
        let mut sample = NodeStats {
            port,
            ..NodeStats::default()
        };
        if let Ok(mut c) = direct(port).await {
            let info: String = redis::cmd("INFO")
                .arg("everything")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            let field = |name: &str| {
                info_field(&info, name)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            sample.cpu_s = field("used_cpu_user") + field("used_cpu_sys");
            sample.aof_delayed_fsync = field("aof_delayed_fsync");
            sample.forks = field("total_forks");
            sample.aof_rewrites = field("aof_rewrites");
            if reset {
                let _ = redis::cmd("LATENCY")
                    .arg("RESET")
                    .query_async::<i64>(&mut c)
                    .await;
            } else {
                let latest: Vec<(String, u64, u64, u64)> = redis::cmd("LATENCY")
                    .arg("LATEST")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                sample.latency_events = latest
                    .into_iter()
                    .map(|(event, _, last, max)| (event, last, max))
                    .collect();
            }
        }
        out.push(sample);
    }
    out
}

/// Gives process `pid` the nice value `nice` (unless 0) and returns the value it has now,
/// read back from /proc (None if unreadable). A refusal (not root) is a warning, not an error.
pub(crate) fn set_nice(pid: u64, nice: i32) -> Option<i32> {
    if pid == 0 {
        // `renice -p 0` would renice the benchmark itself.
        eprintln!("warning: INFO did not give the Redis master's pid; it stays at nice 0");
        return None;
    }
    if nice != 0 {
        let result = std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !matches!(result, Ok(s) if s.success()) {
            eprintln!(
                "warning: could not renice the Redis master (pid {pid}) to {nice}: it needs root or \
                 CAP_SYS_NICE. Going on at nice 0; expect lower and noisier figures (README, Benchmarks)."
            );
        }
    }
    // Field 19 of /proc/PID/stat, counted after the parenthesised command name.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(16)?.parse().ok()
}

pub(crate) async fn master_pid(conn: &mut MultiplexedConnection) -> u64 {
    read_info_field(conn, "server", "process_id")
        .await
        .map_or(0, |p| p as u64)
}

/// Busy time of the whole machine (all CPUs), seconds, from /proc/stat.
pub(crate) fn machine_busy_s(clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle) / clk_tck
}

/// A dedicated connection to the master (for the probe).
async fn dedicated_connection(master: &Master) -> anyhow::Result<MultiplexedConnection> {
    let link = master.link(Duration::from_secs(10)).await?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    link.client()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("probe connection to the master")
}

/// PING and SET + WAIT round trips on a separate connection, every 10 ms until `end`.
pub(crate) async fn probe(master: Master, replicas: u32, end: Instant) -> Probe {
    let Ok(mut conn) = dedicated_connection(&master).await else {
        return Probe::default();
    };
    let (mut ping, mut wait) = (Vec::new(), Vec::new());
    // Bounded by `end` and by the number of 10 ms ticks in a window.
    for i in 0..1_000_000u64 {
        if Instant::now() >= end {
            break;
        }
        let t = Instant::now();
        if redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
        {
            ping.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        let _ = redis::cmd("SET")
            .arg("bench:probe")
            .arg(i)
            .query_async::<()>(&mut conn)
            .await;
        let t = Instant::now();
        if redis::cmd("WAIT")
            .arg(replicas)
            .arg(1000)
            .query_async::<i64>(&mut conn)
            .await
            .is_ok()
        {
            wait.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Probe {
        ping_ms: percentiles_ms(&mut ping),
        wait_ms: percentiles_ms(&mut wait),
    }
}

/// Largest lateness of a 5 ms sleep in this process until `end`, ms.
pub(crate) async fn loop_lag(end: Instant) -> f64 {
    let mut worst = Duration::ZERO;
    while Instant::now() < end {
        let due = Instant::now() + Duration::from_millis(5);
        tokio::time::sleep_until(due.into()).await;
        worst = worst.max(Instant::now().saturating_duration_since(due));
    }
    worst.as_secs_f64() * 1000.0
}

/// A number from `INFO section`: `INFO` on `conn`, then [`info_field`].
pub(crate) async fn read_info_field(
    conn: &mut MultiplexedConnection,
    section: &str,
    field: &str,
) -> Option<f64> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .ok()?;
    info_field(&info, field)?.parse().ok()
}

/// The value of `key` in an `INFO` reply (its `key:value` line), trimmed.
/// `INFO commandstats`: command → its figures (calls, usec, usec_per_call, …).
pub(crate) type Commandstats = BTreeMap<String, BTreeMap<String, f64>>;

pub(crate) async fn read_commandstats(
    conn: &mut MultiplexedConnection,
) -> anyhow::Result<Commandstats> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut out = BTreeMap::new();
    // cmdstat_evalsha:calls=1,usec=2,usec_per_call=2.00,rejected_calls=0,failed_calls=0
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let m: BTreeMap<String, f64> = fields
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
            .collect();
        out.insert(name.to_owned(), m);
    }
    Ok(out)
}

#[derive(Serialize, Clone)]
pub(crate) struct RedisBenchmark {
    pub(crate) requests_p1: u64,
    pub(crate) requests_p16: u64,
    pub(crate) p1_rps: f64,
    pub(crate) p16_rps: f64,
    pub(crate) p1_csv: String,
    pub(crate) p16_csv: String,
}

/// `redis-benchmark -c 50 -P pipeline -n n EVAL "return 1" 0` on the master: requests/s
/// and its CSV output.
pub(crate) async fn eval_rps(port: u16, pipeline: u32, n: u64) -> anyhow::Result<(f64, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "50"])
            .args(["-n", &n.to_string(), "-P", &pipeline.to_string(), "--csv"])
            .args(["EVAL", "return 1", "0"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("redis-benchmark did not finish within 120s")?
    .context("cannot run redis-benchmark (it comes with redis-server)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "test","rps",...  then  "EVAL return 1 0","33840.95",...
    let rps = text
        .lines()
        .find(|l| l.starts_with("\"EVAL"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
        .with_context(|| {
            format!(
                "cannot parse redis-benchmark output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok((rps, text.trim().to_owned()))
}

pub(crate) async fn redis_benchmark(port: u16, n: u64) -> anyhow::Result<RedisBenchmark> {
    let run = |pipeline: u32, n: u64| eval_rps(port, pipeline, n);
    let (p1_rps, p1_csv) = run(1, n).await?;
    let (p16_rps, p16_csv) = run(16, n * 5).await?;
    Ok(RedisBenchmark {
        requests_p1: n,
        requests_p16: n * 5,
        p1_rps,
        p16_rps,
        p1_csv,
        p16_csv,
    })
}

pub(crate) fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({ "cpus": cpus, "cpu_model": model, "redis": redis })
}
