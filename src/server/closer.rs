//! The closer: closes every auction whose deadline passed, by Redis time.
//!
//! Every server runs one. Each tick it reads Redis `TIME` and the due entries of
//! `auctions:open`, and asks its router to close them; the close itself runs under the
//! auction's lease (its worker's, or one taken and given back inside the script when nobody
//! holds it; see [`crate::server::router`]), batched across auctions, and the script re-checks the
//! deadline against `TIME`, so several closers racing (or a closer racing an admin close)
//! still close exactly once.
//! Between ticks it sleeps until the next deadline, capped so newly opened auctions and
//! closes left unfinished by a crashed server are picked up promptly.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::keyspace::{self, AuctionId};
use crate::link::sentinel::Master;
use crate::server::router::Router;

/// Longest sleep between ticks.
pub const MAX_TICK: Duration = Duration::from_millis(200);
/// Due auctions read per tick; with more due, the next tick reads the next page at once.
const BATCH: usize = 2000;
/// A close request is repeated after this long if the auction is still open.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Redis server time in ms since the epoch.
pub async fn redis_now_ms(conn: &mut MultiplexedConnection) -> redis::RedisResult<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

/// Runs until `shutdown` resolves.
pub async fn run(
    master: Master,
    router: Router,
    metrics: std::sync::Arc<crate::runtime::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut requested: HashMap<AuctionId, Instant> = HashMap::new();
    let mut pass = Pass::default();
    loop {
        let sleep = match tick(&master, &router, &metrics, &mut requested, &mut pass).await {
            Ok(next) => next,
            Err(e) => {
                debug!(error = %e, "closer tick failed; retrying");
                MAX_TICK
            }
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Where the closer is in its pass through the due auctions.
#[derive(Default)]
struct Pass {
    /// Index of the next page.
    offset: usize,
    /// Whether this pass asked for any close.
    asked: bool,
}

async fn tick(
    master: &Master,
    router: &Router,
    metrics: &crate::runtime::metrics::Metrics,
    requested: &mut HashMap<AuctionId, Instant>,
    pass: &mut Pass,
) -> Result<Duration, String> {
    let link = master.link(MAX_TICK).await.map_err(|e| e.to_string())?;
    let mut conn = link.conn.clone();
    let fail = |e: redis::RedisError| {
        master.report(link.generation, &e);
        e.to_string()
    };
    let now = redis_now_ms(&mut conn).await.map_err(fail)?;
    let due: Vec<String> = redis::cmd("ZRANGE")
        .arg(keyspace::OPEN_AUCTIONS)
        .arg("-inf")
        .arg(now)
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(pass.offset)
        .arg(BATCH)
        .query_async(&mut conn)
        .await
        .map_err(fail)?;
    let local_now = Instant::now();
    requested.retain(|_, at| local_now.duration_since(*at) < RETRY_AFTER);
    let mut ask = Vec::new();
    for raw in &due {
        let Ok(id) = AuctionId::parse(raw) else {
            warn!(member = %raw, "ignoring an invalid id in {}", keyspace::OPEN_AUCTIONS);
            continue;
        };
        if requested.contains_key(&id) {
            continue;
        }
        requested.insert(id.clone(), local_now);
        ask.push(id);
    }
    if !ask.is_empty() {
        debug!(
            due = due.len(),
            asking = ask.len(),
            now,
            "asking for closes"
        );
        pass.asked = true;
        router.close_due(ask).await;
    }
    if due.len() >= BATCH {
        // A full page: page on through the due auctions at once.
        pass.offset += BATCH;
        return Ok(Duration::from_millis(1));
    }
    // Closes remove members while we page, so a paged pass may have skipped some: go
    // through again at once until a pass finds nothing new to ask.
    let again = pass.offset > 0 && pass.asked;
    *pass = Pass::default();
    if again {
        return Ok(Duration::from_millis(1));
    }
    let open: i64 = redis::cmd("ZCARD")
        .arg(keyspace::OPEN_AUCTIONS)
        .query_async(&mut conn)
        .await
        .map_err(fail)?;
    metrics.open_auctions.set(open);
    let next: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(keyspace::OPEN_AUCTIONS)
        .arg(format!("({now}"))
        .arg("+inf")
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .map_err(fail)?;
    Ok(match next.first() {
        Some((_, deadline)) => {
            Duration::from_millis((*deadline as u64).saturating_sub(now)).min(MAX_TICK)
        }
        None => MAX_TICK,
    })
}
