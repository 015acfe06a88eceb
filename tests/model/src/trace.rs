//! Readable traces: one line per step, in the protocol's words (`s1 acquire -> token 2`,
//! `master redis0 dies; redis1 promoted (lost: lock, counter)`).
//!
//! Servers, bids and Redis nodes are numbered from 1 here (`s1`, `bid1`, `redis1`); the
//! model numbers them from 0.

use stateright::{Checker, Expectation, Model, Path};

use crate::redis::{Data, LockValue};
use crate::scripts::{Acquired, Closed, Judged, Refusal};
use crate::system::{Action, Event, Protocol, Said, State};

/// The lines of a counterexample path.
pub fn lines(model: &Protocol, path: Path<State, Action>) -> Vec<String> {
    path.into_vec()
        .into_iter()
        .filter_map(|(s, a)| a.map(|a| describe(model, &s, a)))
        .collect()
}

/// The counterexample (or, for a `sometimes` property, the example) to `property` that a
/// finished checker holds, as lines, if any.
///
/// Stateright's breadth-first search records the first discovery, but goes on with the
/// block of states it is working through and records later ones over it; and a violation
/// the model records in its ghost state stays violated in every later state. So the path
/// is cut at its first state where the property's verdict is reached.
pub fn discovery(checker: &impl Checker<Protocol>, property: &'static str) -> Option<Vec<String>> {
    let model = checker.model();
    let path = checker.discovery(property)?;
    let verdict = model
        .properties()
        .into_iter()
        .find(|p| p.name == property)
        .and_then(|p| match p.expectation {
            Expectation::Always => Some((p.condition, false)),
            Expectation::Sometimes => Some((p.condition, true)),
            Expectation::Eventually => None,
        });
    let mut steps = path.into_vec();
    if let Some((condition, reached)) = verdict
        && let Some(first) = steps
            .iter()
            .position(|(s, _)| condition(model, s) == reached)
    {
        // The actions before the first state with the verdict are the ones leading to it.
        steps.truncate(first);
    }
    Some(
        steps
            .into_iter()
            .filter_map(|(s, a)| a.map(|a| describe(model, &s, a)))
            .collect(),
    )
}

fn value(v: LockValue) -> String {
    format!("s{}#{}", v.server + 1, v.token)
}

fn bid(model: &Protocol, b: u8) -> String {
    let spec = model.config.bids[b as usize];
    format!("bid{} (bidder{} {})", b + 1, spec.bidder + 1, spec.amount)
}

fn event(model: &Protocol, e: &Event) -> String {
    match e {
        Event::Accepted { bid: b, seq } => format!("{} accepted seq {seq}", bid(model, *b)),
        Event::Refused { bid: b } => format!("{} rejected", bid(model, *b)),
        Event::Closed(c) => match c.winner {
            Some(w) => format!("closed seq {} winner bid{}", c.seq, w + 1),
            None => format!("closed seq {} no winner", c.seq),
        },
    }
}

/// What the failover lost: the keys on the old master that differ on the new one.
fn lost(before: &Data, after: &Data) -> Vec<&'static str> {
    let mut lost = Vec::new();
    if before.lock != after.lock {
        lost.push("lock");
    }
    if before.counter != after.counter {
        lost.push("counter");
    }
    if before.fence != after.fence {
        lost.push("fence");
    }
    if before.history != after.history {
        lost.push("bids");
    }
    if before.closed != after.closed {
        lost.push("close");
    }
    lost
}

/// One step as a line.
pub fn describe(model: &Protocol, s: &State, action: Action) -> String {
    let mut said = Said::Done;
    let Some(n) = model.step(s, action, &mut said) else {
        return format!("{action:?}: no change");
    };
    // Whether the step published at once instead of queueing for the announcer.
    let published = s.ghost.announced != n.ghost.announced
        || s.ghost.announced_close != n.ghost.announced_close
        || s.answered != n.answered;
    let announce_now = |what: String| -> String {
        if published {
            format!("{what}, published at once")
        } else {
            what
        }
    };
    match action {
        Action::Expire => match s.redis.data().lock {
            Some(v) => format!("lease {} expires", value(v)),
            None => "nothing expires".to_string(),
        },
        Action::Deadline => "the deadline passes (Redis TIME)".to_string(),
        Action::Replicate(node) => {
            let behind = n.redis.end() - n.redis.offsets[node as usize];
            format!("redis{} replicates a write ({behind} behind)", node + 1)
        }
        Action::Failover => {
            let lost = lost(s.redis.data(), n.redis.data());
            let lost = if lost.is_empty() {
                "nothing lost".to_string()
            } else {
                format!("lost: {}", lost.join(", "))
            };
            let dropped: usize = s.servers.iter().map(|x| x.pending.len()).sum();
            let dropped = if dropped > 0 {
                format!("; {dropped} queued announcement(s) dropped")
            } else {
                String::new()
            };
            format!(
                "master redis{} dies; redis{} promoted ({lost}){dropped}",
                s.redis.master + 1,
                n.redis.master + 1
            )
        }
        Action::Crash(i) => format!("s{} crashes and restarts (memory lost)", i + 1),
        Action::Acquire(i) => match said {
            Said::Acquired(Acquired::Token(t)) => format!("s{} acquire -> token {t}", i + 1),
            _ => format!("s{} acquire -> held", i + 1),
        },
        Action::Renew(i) => {
            let v = s.servers[i as usize].lease.map(value).unwrap_or_default();
            format!("s{} renew {v} -> lease lost", i + 1)
        }
        Action::Judge(i, b) => {
            let v = s.servers[i as usize].lease.map(value).unwrap_or_default();
            let what = match said {
                Said::Judged(Judged::Accepted(seq)) => announce_now(format!("accepted seq {seq}")),
                Said::Judged(Judged::Duplicate(seq)) => {
                    announce_now(format!("duplicate, stored seq {seq}"))
                }
                Said::Judged(Judged::Refused(r)) => announce_now(format!(
                    "rejected {}",
                    match r {
                        Refusal::Closed => "auction_closed",
                        Refusal::DeadlinePassed => "deadline_passed",
                        Refusal::EqualToHigh => "equal_to_high",
                        Refusal::TooLow => "too_low",
                    }
                )),
                _ => "fenced".to_string(),
            };
            format!("s{} judges {} as {v} -> {what}", i + 1, bid(model, b))
        }
        Action::CloserScan(i) => format!("s{} closer: the auction is due (Redis TIME)", i + 1),
        Action::Close(i) => {
            let by = match s.servers[i as usize].lease {
                Some(v) => format!("as {}", value(v)),
                None => "on a free lease".to_string(),
            };
            let what = match said {
                Said::Closed(Closed::ByUs(c)) => announce_now(format!(
                    "{} (fence {})",
                    event(model, &Event::Closed(c)),
                    n.redis.data().fence
                )),
                Said::Closed(Closed::Already(c)) => announce_now(format!(
                    "already: {} (read, no write)",
                    event(model, &Event::Closed(c))
                )),
                Said::Closed(Closed::Fenced) => "fenced".to_string(),
                Said::Closed(Closed::Held) => "held by another".to_string(),
                _ => "not due".to_string(),
            };
            format!("s{} close {by} -> {what}", i + 1)
        }
        Action::Publish(i) => {
            let events: Vec<String> = s.servers[i as usize]
                .pending
                .iter()
                .map(|e| event(model, e))
                .collect();
            format!(
                "s{} INCR marker; WAIT 1 acked -> publishes {}",
                i + 1,
                events.join(", ")
            )
        }
    }
}
