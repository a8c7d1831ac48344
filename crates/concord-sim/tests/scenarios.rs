//! Every scenario under `simulations/` is an executable specification: it
//! runs in both modes and fails on any difference from its expected outcome
//! or any checker violation. Its coordinated log must replay exactly.

use std::path::{Path, PathBuf};

use concord_sim::run::Mode;
use concord_sim::{Scenario, simulate};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations")
}

fn files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn check(name: &str) {
    let path = dir().join(format!("{name}.toml"));
    let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        s.file.expect.coordinated.is_some() && s.file.expect.uncoordinated.is_some(),
        "{name}: a shipped scenario states what both modes must show"
    );
    let o = simulate(&s, &[Mode::Uncoordinated, Mode::Coordinated], None).unwrap();
    let failures = o.report.failures();
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
    let coordinated = &o.runs[1];
    assert!(coordinated.checked_events > 0, "{name}: the checkers saw no event");
    let summary = concord_sim::replay::replay(&coordinated.records).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(summary.inputs as u64, coordinated.metrics.coordinator_inputs, "{name}");
}

#[test]
fn every_shipped_scenario_has_a_test() {
    let names: Vec<String> = files()
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let tested = [
        "benign",
        "kill-switch",
        "lease-pause",
        "racing",
        "remediation-loop",
        "replicas-instead-of-pool",
        "salami",
        "scope-creep",
        "seven-days",
    ];
    assert_eq!(names, tested, "add a test below for each scenario file");
}

#[test]
fn seven_days() {
    check("seven-days");
}

#[test]
fn salami() {
    check("salami");
}

#[test]
fn replicas_instead_of_pool() {
    check("replicas-instead-of-pool");
}

#[test]
fn scope_creep() {
    check("scope-creep");
}

#[test]
fn remediation_loop() {
    check("remediation-loop");
}

#[test]
fn racing() {
    check("racing");
}

#[test]
fn lease_pause() {
    check("lease-pause");
}

#[test]
fn benign() {
    check("benign");
}

#[test]
fn kill_switch() {
    check("kill-switch");
}

#[test]
fn seven_days_tells_the_story() {
    // Not only the expectations in the file: the shape of the week.
    let s = Scenario::load(&dir().join("seven-days.toml")).unwrap();
    assert!(s.file.duration.ms() >= 7 * 86_400_000);
    assert_eq!(s.file.system.tick.map(|t| t.ms()), Some(1_000));
    assert_eq!(s.file.agents.len(), 3);
    let o = simulate(&s, &[Mode::Uncoordinated, Mode::Coordinated], None).unwrap();
    let (u, c) = (&o.runs[0], &o.runs[1]);
    assert!(u.metrics.db_falls > 10, "uncoordinated the database keeps falling over");
    assert!(u.metrics.peak_connections >= u.metrics.connection_limit);
    assert!(c.metrics.peak_connections < 0.5 * c.metrics.connection_limit);
    assert!(c.metrics.downtime_minutes * 10.0 < u.metrics.downtime_minutes);
    assert_eq!(c.metrics.crashes, 1, "the seeded crash happened and the run went on");
    assert!(
        c.timeline
            .iter()
            .any(|e| e.text.contains("rebuilt from") && e.text.contains("identical"))
    );
    // Uncoordinated, the resource agent climbed the whole ladder.
    let pools: Vec<&str> = u
        .timeline
        .iter()
        .filter(|e| e.kind == "applied" && e.text.contains("pool_size"))
        .map(|e| e.text.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(pools, ["500", "1500"]);
}
