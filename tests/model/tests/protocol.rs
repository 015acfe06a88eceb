//! The model checked from `cargo test`: the unmutated protocol exhaustively (every
//! guarantee holds, every reachability example is found), every seeded mutation caught with
//! a readable counterexample, and the report written to the main repository's
//! `target/model/report.json`.
//!
//! One test function does it all, so the report is written once from one place (tests in
//! one binary run in parallel). The bigger configuration is `#[ignore]`d: run it with
//! `cargo test --release -- --ignored` (see NOTES.md).

use std::path::Path;

use auction_model::check::{self, Limits, Run};
use auction_model::properties;
use auction_model::{Config, Mutation, Protocol};
use stateright::Expectation;

/// Where the report goes: the main repository's target directory.
const REPORT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/model/report.json"
);

/// The longest counterexample searched for (the seeded ones take 3 to 6 steps).
const MAX_STEPS: usize = 30;

fn print_run(title: &str, run: &Run, only: Option<&str>) {
    println!(
        "{title}: {} states, depth {}, {:.1} s, {}",
        run.states,
        run.max_depth,
        run.seconds,
        if run.done { "complete" } else { "INCOMPLETE" }
    );
    for (property, lines) in &run.counterexamples {
        if only.is_some_and(|only| only != *property) {
            continue;
        }
        println!("  {property} ({} steps):", lines.len());
        for (i, line) in lines.iter().enumerate() {
            println!("    {:>2}. {line}", i + 1);
        }
    }
}

/// Checks `config` unmutated; asserts exhaustion, every guarantee, every example.
fn check_unmutated(title: &str, config: Config, limits: Limits) -> Run {
    config.validate().expect("a valid configuration");
    let run = check::run(Protocol::new(config, None), limits);
    print_run(title, &run, None);
    assert!(
        run.done,
        "{title}: the checker did not explore every state within the limits"
    );
    for p in properties::all() {
        let found = run.counterexamples.contains_key(p.name);
        match p.expectation {
            Expectation::Sometimes => assert!(found, "{title}: no example of {}", p.name),
            _ => assert!(!found, "{title}: {} is violated (trace above)", p.name),
        }
    }
    run
}

/// Checks `config` with `mutation` until the property it breaks has a counterexample.
fn check_mutation(config: &Config, mutation: Mutation) -> Run {
    let run = check::counterexample(
        Protocol::new(config.clone(), Some(mutation)),
        mutation.breaks(),
        MAX_STEPS,
        Limits::from_env(),
    );
    print_run(
        &format!("mutation {}", mutation.name()),
        &run,
        Some(mutation.breaks()),
    );
    run
}

fn report(clean: &Run, mutations: &[(Mutation, Run)]) -> serde_json::Value {
    let properties: Vec<serde_json::Value> = properties::guarantees()
        .iter()
        .map(|p| serde_json::json!({ "name": p.name, "holds": clean.holds(p.name) }))
        .collect();
    let mutations: serde_json::Map<String, serde_json::Value> = mutations
        .iter()
        .map(|(m, run)| {
            let trace = run.counterexamples.get(m.breaks());
            (
                m.name().to_string(),
                serde_json::json!({
                    "counterexample_found": trace.is_some(),
                    "trace_length": trace.map_or(0, Vec::len),
                }),
            )
        })
        .collect();
    serde_json::json!({
        "states": clean.states,
        "seconds": (clean.seconds * 10.0).round() / 10.0,
        "properties": properties,
        "mutations": mutations,
    })
}

#[test]
fn the_protocol_holds_and_every_seeded_mutation_is_caught() {
    let config = Config::ci();
    let clean = check_unmutated("unmutated (ci)", config.clone(), Limits::from_env());
    let mutations: Vec<(Mutation, Run)> = Mutation::ALL
        .iter()
        .map(|&m| (m, check_mutation(&config, m)))
        .collect();

    let report = report(&clean, &mutations);
    let path = Path::new(REPORT);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create target/model");
    }
    let text = serde_json::to_string_pretty(&report).expect("the report serializes");
    std::fs::write(path, text + "\n").expect("write target/model/report.json");
    println!("report: {}", path.display());

    for (m, run) in &mutations {
        assert!(
            run.counterexamples.contains_key(m.breaks()),
            "mutation {} was not caught: {} holds on all {} states",
            m.name(),
            m.breaks(),
            run.states
        );
    }
}

#[test]
#[ignore = "the bigger configuration: minutes and gigabytes; run with --ignored"]
fn the_protocol_holds_in_the_bigger_configuration() {
    check_unmutated("unmutated (big)", Config::big(), Limits::big_from_env());
}
