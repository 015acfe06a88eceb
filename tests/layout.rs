//! The library's layering, checked from its source: every `crate::…` and `super::…` path
//! in code (not comments) is resolved to the file that defines the module it names, and
//!
//! - a layer uses only the layers below it (docs/ARCHITECTURE.md, "Code layout"): `runtime`,
//!   then `wire`/`keyspace`/`proto`, `link`, `store`, `control`, then `server` and `bidder`,
//!   which never use each other;
//! - no two files use each other, directly or through others (no import cycle).
//!
//! Pure file reading: no process, no network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Rank of each top-level module; a file may use modules of its own rank or lower, except
/// that equal-ranked different modules (the two programs) may not use each other.
fn rank(top: &str) -> Option<u8> {
    Some(match top {
        "runtime" => 0,
        "wire" | "keyspace" | "proto" => 1,
        "link" => 2,
        "store" => 3,
        "control" => 4,
        "server" | "bidder" => 5,
        _ => return None,
    })
}

/// `src/a/b.rs` → `[a, b]`; `src/a/mod.rs` → `[a]`; `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and its unit-test module (tests may use
/// anything of their own module, and doc links are not imports).
fn code_of(text: &str) -> String {
    let until_tests = text.split("\n#[cfg(test)]").next().unwrap_or(text);
    until_tests
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path starting at `crate::` or `super::` in `code`, as module segments from the root.
fn paths(code: &str, own: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for start in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(start) {
            let before = rest[..i].chars().last();
            rest = &rest[i + start.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let segs: Vec<String> = rest
                .split("::")
                .map(|s| {
                    s.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .take_while(|s| !s.is_empty())
                .collect();
            let mut path = if start == "crate::" {
                Vec::new()
            } else {
                // The parent module: for `a/b.rs` (`[a, b]`) and `a/mod.rs` (`[a]`) alike,
                // the module path without its last segment.
                own[..own.len().saturating_sub(1)].to_vec()
            };
            path.extend(segs);
            found.push(path);
        }
    }
    found
}

#[test]
fn layers_are_respected_and_files_do_not_use_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut violations = Vec::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("read a source file");
        for path in paths(&code_of(&text), module) {
            // The longest prefix of the path that is a module file.
            let target = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains_key(p))
                .unwrap_or_default();
            if &target == module || target.is_empty() {
                continue;
            }
            let (from, to) = (module[0].as_str(), target[0].as_str());
            if let (Some(a), Some(b)) = (rank(from), rank(to))
                && (b > a || (a == b && from != to && a == 5))
            {
                violations.push(format!(
                    "{} uses {} ({})",
                    file.display(),
                    target.join("::"),
                    path.join("::")
                ));
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    assert!(
        violations.is_empty(),
        "a lower layer uses a higher one:\n{}",
        violations.join("\n")
    );
    // Depth-first search for a cycle, reporting its files.
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut cycle: Vec<String> = stack[i..].iter().map(|m| m.join("::")).collect();
            cycle.push(node.join("::"));
            return Some(cycle);
        }
        if !done.insert(node.clone()) {
            return None;
        }
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in modules.keys() {
        if let Some(cycle) = visit(module, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle between files: {}", cycle.join(" → "));
        }
    }
    assert!(
        edges.len() > 20,
        "the scan found too few uses to be checking anything: {}",
        edges.len()
    );
}
