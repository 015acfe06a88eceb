//! The announcer: makes outcomes durable with `WAIT` (a group commit), then publishes them,
//! in the order they were handed over, for every worker of the server.
//!
//! A worker judges a batch, hands its events here and goes straight on to its next batch;
//! it never waits for replicas or for the publish round trip. That pipelines each auction's
//! cycle (script N+1 is already sent while batch N is being acknowledged; Redis runs it as
//! soon as that `WAIT`, which blocks the shared connection, returns) without reordering
//! anything: requests are served strictly first in, first out, so one auction's events
//! leave in `seq` order, and a request is published only after a `WAIT` issued after its
//! write.
//!
//! `WAIT` covers every write made earlier on the same connection, and all writers share one
//! multiplexed connection per master generation, so one `WAIT` vouches for every request
//! queued while the previous one was in flight. It counts only that connection's own
//! writes, though, and an answer may have been read rather than written (an `already`
//! close, a batch of duplicates or refusals): so each group's `WAIT` is preceded, in the
//! same pipeline, by a marker write (`INCR` of [`COMMIT_MARKER`]) whose offset is past
//! everything the master held when the group's answers were read. A request made against an older generation
//! (the master changed since the write) cannot be vouched for by a `WAIT` on the new
//! connection and is not announced; the bidder's retry (same `bid_id`) gets the stored
//! outcome announced later. The same holds when replicas fall short after a few tries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{Span, debug, info_span, warn};

use crate::keyspace::COMMIT_MARKER;
use crate::link::sentinel::Master;
use crate::runtime::metrics::{Metrics, add};
use crate::runtime::task::TaskGuard;
use crate::wire::Event;

/// Most requests served by one `WAIT` and one publish pipeline.
const MAX_GROUP: usize = 4096;
/// `WAIT` attempts before a group is given up as not durable.
const WAIT_ATTEMPTS: u32 = 3;

/// Why events were not announced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnnounced {
    /// Fewer replicas acknowledged than required within the timeout.
    #[error("only {acked} of {wanted} replicas acknowledged in time")]
    Shortfall {
        /// Replicas that acknowledged.
        acked: u32,
        /// Replicas required.
        wanted: u32,
    },
    /// The master changed after the write; its fate is unknown.
    #[error("the master changed after the write")]
    MasterChanged,
    /// `WAIT` or `PUBLISH` failed, or the announcer stopped.
    #[error("{0}")]
    Failed(String),
}

/// What to announce once durable.
pub struct Announcement {
    /// Generation of the master link the events' writes were made on.
    pub generation: u64,
    /// Events to publish, in order (may be empty: then this only waits for durability).
    pub events: Vec<Event>,
    /// Bid outcomes among `events`, counted as deferred if they cannot be announced.
    pub outcomes: u64,
    /// When the work began, for the processing-time histogram (None: not a bid batch).
    pub started: Option<Instant>,
    /// Parent of the `wait_and_publish` span.
    pub span: Span,
    /// Told the result, when someone waits for it.
    pub done: Option<oneshot::Sender<Result<(), NotAnnounced>>>,
}

/// Where events go: the event channel and, with `SEED_DIALECT`, also each event's
/// counterpart in the prototype's dialect, right after it on the same channel.
#[derive(Clone, Debug)]
pub struct EventChannel {
    /// The channel (`EVENT_CHANNEL`).
    pub name: String,
    /// Whether dialect events go out too.
    pub seed_dialect: bool,
}

/// Handle to the announcer task; clone freely.
#[derive(Clone)]
pub struct Announcer {
    tx: mpsc::Sender<Announcement>,
}

impl Announcer {
    /// Starts the task. With `replicas == 0` nothing waits for replicas. The task ends when
    /// every handle is dropped and the queue is empty; the guard aborts it when dropped.
    pub fn start(
        master: Master,
        channel: EventChannel,
        replicas: u32,
        wait_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> (Self, TaskGuard) {
        let (tx, rx) = mpsc::channel(MAX_GROUP);
        let task = tokio::spawn(
            Task {
                master,
                channel,
                replicas,
                wait_timeout,
                metrics,
            }
            .run(rx),
        );
        (Self { tx }, TaskGuard::new("announcer", task))
    }

    /// Queues `a`; waits only while the queue is full (backpressure on the workers).
    pub async fn announce(&self, a: Announcement) {
        if let Err(mpsc::error::SendError(a)) = self.tx.send(a).await
            && let Some(done) = a.done
        {
            let _ = done.send(Err(stopped()));
        }
    }

    /// Announces `events` and waits until they are published (or could not be).
    pub async fn announce_and_wait(
        &self,
        generation: u64,
        events: Vec<Event>,
    ) -> Result<(), NotAnnounced> {
        let (done, rx) = oneshot::channel();
        self.announce(Announcement {
            generation,
            events,
            outcomes: 0,
            started: None,
            span: Span::none(),
            done: Some(done),
        })
        .await;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Waits until everything queued before is announced (or given up); for shutdown.
    pub async fn drain(&self) {
        let _ = self.announce_and_wait(0, Vec::new()).await;
    }

    /// Waits until everything written so far on the link of `generation` is durable and
    /// everything queued before is published.
    pub async fn flush(&self, generation: u64) -> Result<(), NotAnnounced> {
        self.announce_and_wait(generation, Vec::new()).await
    }
}

fn stopped() -> NotAnnounced {
    NotAnnounced::Failed("announcer stopped (server shutting down)".into())
}

struct Task {
    master: Master,
    channel: EventChannel,
    replicas: u32,
    wait_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<Announcement>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
            let spans: Vec<Span> = group
                .iter()
                .map(|a| {
                    if a.span.is_none() {
                        Span::none()
                    } else {
                        info_span!(parent: &a.span, "wait_and_publish", events = a.events.len())
                    }
                })
                .collect();
            let (generation, result) = self.durable_then_publish(&group).await;
            debug!(requests = group.len(), ?result, "announced a group");
            for (a, span) in group.drain(..).zip(spans) {
                drop(span);
                let v = match generation {
                    Some(g) if g == a.generation => result.clone(),
                    _ => Err(NotAnnounced::MasterChanged),
                };
                match &v {
                    Ok(()) => {
                        if let Some(started) = a.started {
                            self.metrics
                                .processing_seconds
                                .observe(started.elapsed().as_secs_f64());
                        }
                    }
                    Err(_) => add(&self.metrics.bids_deferred, a.outcomes),
                }
                if let Some(done) = a.done {
                    let _ = done.send(v);
                }
            }
        }
    }

    /// Makes the group durable and publishes it. Returns the generation it served (requests
    /// of any other generation are stale) and the result for those requests.
    async fn durable_then_publish(
        &self,
        group: &[Announcement],
    ) -> (Option<u64>, Result<(), NotAnnounced>) {
        let Some(link) = self.master.current() else {
            return (None, Err(NotAnnounced::MasterChanged));
        };
        let generation = link.generation;
        let result = self.on_link(group, generation, link.conn.clone()).await;
        (Some(generation), result)
    }

    async fn on_link(
        &self,
        group: &[Announcement],
        generation: u64,
        mut conn: redis::aio::MultiplexedConnection,
    ) -> Result<(), NotAnnounced> {
        if self.replicas > 0 {
            let mut attempt = 1;
            loop {
                // `WAIT` counts only this connection's own writes. What the group vouches
                // for may have been read, not written, here (an `already` close, a batch of
                // duplicates or refusals, another server's write seen after a reconnect):
                // a marker write first makes the `WAIT` cover everything the master held
                // when the group was answered. One pipelined command per group.
                let mut pipe = redis::pipe();
                if attempt == 1 {
                    pipe.cmd("INCR").arg(COMMIT_MARKER).ignore();
                }
                pipe.cmd("WAIT")
                    .arg(self.replicas)
                    .arg(self.wait_timeout.as_millis() as u64);
                let result = pipe
                    .query_async::<(u32,)>(&mut conn)
                    .await
                    .map(|(acked,)| acked);
                match result {
                    Ok(acked) if acked >= self.replicas => break,
                    Ok(acked) => {
                        warn!(
                            acked,
                            wanted = self.replicas,
                            attempt,
                            "replicas did not acknowledge in time; holding announcements back"
                        );
                        if attempt >= WAIT_ATTEMPTS {
                            return Err(NotAnnounced::Shortfall {
                                acked,
                                wanted: self.replicas,
                            });
                        }
                        attempt += 1;
                    }
                    // The marker was refused: the master has too few replicas to write.
                    Err(e) if e.code() == Some("NOREPLICAS") => {
                        warn!(error = %e, "the commit marker was refused; holding announcements back");
                        return Err(NotAnnounced::Shortfall {
                            acked: 0,
                            wanted: self.replicas,
                        });
                    }
                    Err(e) => {
                        self.master.report(generation, &e);
                        return Err(NotAnnounced::Failed(format!("marker and WAIT: {e}")));
                    }
                }
            }
            // A failover may have started while WAIT was in flight: the replica that
            // acknowledged may be one the promoted replica will overwrite. The link is
            // dropped the moment a Sentinel announces the failover, so check again now.
            if self
                .master
                .current()
                .is_none_or(|l| l.generation != generation)
            {
                return Err(NotAnnounced::MasterChanged);
            }
        }
        let events = group
            .iter()
            .filter(|a| a.generation == generation)
            .flat_map(|a| &a.events);
        publish_on(
            &self.master,
            generation,
            conn,
            &self.channel,
            events,
            &self.metrics,
        )
        .await
        .map_err(|e| NotAnnounced::Failed(format!("PUBLISH: {e}")))
    }
}

/// Publishes `events` now, in order, pipelined, on the current master, without waiting for
/// replicas: for refusals, which store nothing.
pub async fn publish(
    master: &Master,
    channel: &EventChannel,
    events: &[Event],
    metrics: &Metrics,
) -> Result<(), String> {
    if events.is_empty() {
        return Ok(());
    }
    let link = master
        .link(Duration::from_secs(1))
        .await
        .map_err(|e| e.to_string())?;
    publish_on(
        master,
        link.generation,
        link.conn.clone(),
        channel,
        events,
        metrics,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Publishes `events` in order in one pipeline on `conn` (a link of `generation`), counts
/// them, and reports a failure to the master supervisor.
async fn publish_on<'a>(
    master: &Master,
    generation: u64,
    mut conn: redis::aio::MultiplexedConnection,
    channel: &EventChannel,
    events: impl IntoIterator<Item = &'a Event>,
    metrics: &Metrics,
) -> Result<(), redis::RedisError> {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for e in events {
        pipe.cmd("PUBLISH")
            .arg(&channel.name)
            .arg(e.to_json())
            .ignore();
        n += 1;
        if channel.seed_dialect
            && let Some(dialect) = crate::wire::dialect::event_json(e)
        {
            pipe.cmd("PUBLISH").arg(&channel.name).arg(dialect).ignore();
            n += 1;
        }
    }
    if n == 0 {
        return Ok(());
    }
    match pipe.query_async::<()>(&mut conn).await {
        Ok(()) => {
            add(&metrics.events_published, n);
            Ok(())
        }
        Err(e) => {
            master.report(generation, &e);
            Err(e)
        }
    }
}
