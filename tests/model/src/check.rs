//! Running the checker: exhaustively for the unmutated model, until the broken property's
//! counterexample for a mutation. Breadth first, so a counterexample is a shortest one.
//!
//! Stateright keeps every explored state's fingerprint (8 bytes and its parent's, in a
//! concurrent map) and the frontier's full states: memory grows with the state count, so
//! every run is capped in states and time here, and in memory by `ulimit -v` around it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stateright::{Checker, HasDiscoveries, Model};

use crate::system::Protocol;
use crate::trace;

/// Bounds on one run, so that a model that grew too big fails instead of eating the
/// machine (the process should also run under `ulimit -v`; see NOTES.md).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Stop after generating this many states (repeats included, as stateright counts).
    pub max_states: usize,
    /// Stop after this long.
    pub timeout: Duration,
    /// Checker threads.
    pub threads: usize,
}

impl Limits {
    /// From `MODEL_MAX_STATES`, `MODEL_TIMEOUT_SECS` and `MODEL_THREADS`, with defaults
    /// sized for CI (the CI configuration needs a fraction of them).
    pub fn from_env() -> Self {
        Self::with_defaults(100_000_000, 600)
    }

    /// As [`Limits::from_env`], with defaults for the bigger configuration (an hour; the
    /// memory cap is `ulimit -v`'s job).
    pub fn big_from_env() -> Self {
        Self::with_defaults(4_000_000_000, 3600)
    }

    fn with_defaults(max_states: usize, timeout_secs: usize) -> Self {
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            max_states: var("MODEL_MAX_STATES", max_states),
            timeout: Duration::from_secs(var("MODEL_TIMEOUT_SECS", timeout_secs) as u64),
            threads: var("MODEL_THREADS", 2).max(1),
        }
    }
}

/// What one run found.
#[derive(Clone, Debug)]
pub struct Run {
    /// Unique states explored.
    pub states: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The deepest path explored.
    pub max_depth: usize,
    /// Whether every reachable state was explored (or, when stopping at a property, that
    /// property's counterexample was found) within the limits.
    pub done: bool,
    /// Counterexamples found, by property, as readable lines.
    pub counterexamples: BTreeMap<&'static str, Vec<String>>,
}

impl Run {
    /// Whether `property` held on everything explored.
    pub fn holds(&self, property: &str) -> bool {
        !self.counterexamples.contains_key(property)
    }
}

/// Checks `model` exhaustively (within `limits`).
pub fn run(model: Protocol, limits: Limits) -> Run {
    explore(model, None, None, limits)
}

/// Searches `model` for a shortest counterexample to `property`: breadth first, one level
/// deeper at a time (the first discovery at the shallowest level is then the only kind
/// recorded; see [`trace::discovery`]). Stops at `limits` or at `max_steps` steps.
pub fn counterexample(
    model: Protocol,
    property: &'static str,
    max_steps: usize,
    limits: Limits,
) -> Run {
    let started = Instant::now();
    let mut last = None;
    for steps in 1..=max_steps {
        // Stateright counts the initial state as depth 1 and skips states at the target.
        let run = explore(model.clone(), Some(property), Some(steps + 2), limits);
        let found = run.counterexamples.contains_key(property);
        let exhausted = run.max_depth < steps + 1;
        last = Some(run);
        if found || exhausted || started.elapsed() > limits.timeout {
            break;
        }
    }
    let mut run = last.unwrap_or_else(|| explore(model, Some(property), None, limits));
    run.seconds = started.elapsed().as_secs_f64();
    run.done = run.counterexamples.contains_key(property);
    run
}

fn explore(
    model: Protocol,
    stop_at: Option<&'static str>,
    max_depth: Option<usize>,
    limits: Limits,
) -> Run {
    let names: Vec<&'static str> = model.properties().iter().map(|p| p.name).collect();
    let started = Instant::now();
    // A search for one counterexample runs on one thread: stateright's breadth-first
    // search is strictly level by level only then.
    let threads = if stop_at.is_some() { 1 } else { limits.threads };
    let mut builder = model
        .checker()
        .threads(threads)
        .target_state_count(limits.max_states)
        .timeout(limits.timeout);
    if let Some(property) = stop_at {
        builder = builder.finish_when(HasDiscoveries::AnyOf([property].into()));
    }
    if let Some(depth) = max_depth {
        builder = builder.target_max_depth(depth);
    }
    // The exhaustive run goes depth first with symmetry reduction: its memory is the
    // explored states' fingerprints and one path's pending siblings, where breadth first
    // holds a whole level of full states. Counterexample searches go breadth first (and
    // without the reduction), for shortest traces.
    if stop_at.is_none() {
        let checker = builder
            .symmetry_fn(crate::symmetry::representative)
            .spawn_dfs()
            .join();
        collect(&checker, names, stop_at, started, limits)
    } else {
        let checker = builder.spawn_bfs().join();
        collect(&checker, names, stop_at, started, limits)
    }
}

fn collect(
    checker: &impl Checker<Protocol>,
    names: Vec<&'static str>,
    stop_at: Option<&'static str>,
    started: Instant,
    limits: Limits,
) -> Run {
    let seconds = started.elapsed().as_secs_f64();
    let states = checker.unique_state_count();
    let mut counterexamples = BTreeMap::new();
    for name in names {
        if stop_at.is_some_and(|p| p != name) {
            continue;
        }
        if let Some(lines) = trace::discovery(checker, name) {
            counterexamples.insert(name, lines);
        }
    }
    // The state cap counts generated states, repeats included.
    let done = checker.is_done()
        && checker.state_count() < limits.max_states
        && started.elapsed() < limits.timeout;
    Run {
        states,
        seconds,
        max_depth: checker.max_depth(),
        done,
        counterexamples,
    }
}
