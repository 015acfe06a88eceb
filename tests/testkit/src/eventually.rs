//! Bounded waits on a condition: the one way tests, the demo and the benchmark wait for
//! something they cannot be told about (a replica's link, a health status, a key's TTL).
//! Every wait has a bound and, on timeout, says what it waited for and what it saw last.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is re-checked.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Re-runs `probe` until it answers `Ok` or `limit` passes. On timeout the error names
/// `what` was awaited and the probe's last complaint (its `Err` text), which is what makes
/// a failing wait explain itself.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    eventually_every(what, limit, POLL_INTERVAL, probe).await
}

/// [`eventually`] with its own pause between checks, for probes that cost a process
/// start (grpcurl) or a round trip the system under test should not see 20 times a second.
pub async fn eventually_every<T, F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    poll_every(limit, every, probe).await.map_err(|last| {
        anyhow::anyhow!("timed out after {limit:?} waiting for {what} (last seen: {last})")
    })
}

/// Re-runs `probe` every [`POLL_INTERVAL`] until it succeeds or `timeout`
/// passes; on timeout returns the probe's last complaint, which is what makes
/// readiness errors actionable. A probe still running at the deadline is
/// abandoned, so the bound is strict.
pub(crate) async fn poll_until<T, F, Fut>(timeout: Duration, probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    poll_every(timeout, POLL_INTERVAL, probe).await
}

async fn poll_every<T, F, Fut>(
    timeout: Duration,
    every: Duration,
    mut probe: F,
) -> Result<T, String>
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
        tokio::time::sleep(every).await;
    }
}
