//! Replays the fuzz target's seed corpus (`fuzz/corpus/decode_intent/`)
//! through the fuzz target's own check, on stable, in every `cargo test`.
//!
//! Seed names say what to expect: `valid-*` must decode; `invalid-<rule>-*`
//! must be refused for `<rule>` (a rule id such as `path_syntax`). Files
//! with other names (inputs a fuzzing run added) need only not panic.

use std::collections::BTreeSet;
use std::panic;
use std::path::{Path, PathBuf};

use concord_proto::{StepKind, decode_intent};

/// The very check the fuzz target runs.
#[path = "../../../fuzz/src/lib.rs"]
mod fuzz_check;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/decode_intent")
}

/// Every seed file, by name, sorted.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut seeds: Vec<(String, Vec<u8>)> = entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).unwrap();
            (name, bytes)
        })
        // Hidden files are not part of the checked-in corpus (see .gitignore).
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn corpus_is_not_empty() {
    let seeds = seeds();
    assert!(!seeds.is_empty(), "no seeds in {}", corpus_dir().display());
    let valid = seeds.iter().filter(|(name, _)| name.starts_with("valid-")).count();
    let invalid = seeds.iter().filter(|(name, _)| name.starts_with("invalid-")).count();
    assert!(
        valid >= StepKind::ALL.len(),
        "{valid} valid seeds; want one per step kind at least"
    );
    assert!(invalid >= 10, "{invalid} near-miss seeds; want at least 10");
}

#[test]
fn every_seed_passes_the_fuzz_check() {
    let mut failures = Vec::new();
    for (name, bytes) in seeds() {
        if let Err(panic) = panic::catch_unwind(|| fuzz_check::decode_round_trip(&bytes)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}: {message}"));
        }
    }
    assert!(
        failures.is_empty(),
        "seeds that fail the fuzz check:\n{}",
        failures.join("\n")
    );
}

#[test]
fn valid_seeds_decode_and_cover_every_step_kind() {
    let mut kinds = BTreeSet::new();
    for (name, bytes) in seeds().into_iter().filter(|(name, _)| name.starts_with("valid-")) {
        match fuzz_check::decode_round_trip(&bytes) {
            Some(intent) => kinds.extend(intent.steps.iter().map(|s| s.kind())),
            None => panic!("{name} should decode: {}", decode_intent(&bytes).unwrap_err()),
        }
    }
    let missing: Vec<StepKind> = StepKind::ALL.into_iter().filter(|k| !kinds.contains(k)).collect();
    assert!(missing.is_empty(), "no valid seed has a step of kind {missing:?}");
}

#[test]
fn invalid_seeds_are_refused_for_the_rule_they_name() {
    for (name, bytes) in seeds() {
        let Some(rest) = name.strip_prefix("invalid-") else {
            continue;
        };
        let rule = rest.split('-').next().unwrap();
        match decode_intent(&bytes) {
            Ok(_) => panic!("{name} decoded; expected {rule}"),
            Err(e) => assert_eq!(e.rule.id(), rule, "{name}: got `{e}`"),
        }
    }
}
