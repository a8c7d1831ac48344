//! The checkers can fail, bad files name their field, and a recording that
//! does not replay names the first differing record.

use std::path::{Path, PathBuf};

use concord_sim::replay::{ReplayError, parse_jsonl, replay, to_jsonl, what_if};
use concord_sim::run::{Mode, run};
use concord_sim::{Scenario, ScenarioError, simulate};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations")
}

fn racing_with(extra: &str) -> Scenario {
    let text = std::fs::read_to_string(dir().join("racing.toml")).unwrap() + extra;
    Scenario::parse(&text, "racing+", &dir()).unwrap()
}

#[test]
fn an_executor_that_ignores_fencing_fails_the_run() {
    // Racing has a slow executor: the late original write reaches the
    // executor after its compensation. A broken executor applies it anyway.
    let s = racing_with("\n[[faults]]\nkind = \"ignore_fencing\"\n");
    let r = run(&s, Mode::Coordinated).unwrap();
    assert_eq!(r.violation_count, 1, "{:?}", r.violations);
    assert_eq!(r.violations[0].property, "fencing.stale_write");
    let o = simulate(&s, &[Mode::Coordinated], None).unwrap();
    assert!(!o.report.ok());
    assert!(o.report.failures()[0].contains("fencing.stale_write"));
}

#[test]
fn a_crash_at_every_point_of_a_run_rebuilds_the_same_state() {
    // The racing run, crashed at points through its busy minutes: the rebuilt
    // coordinator has the lost one's digest (a checker), and the run ends
    // consistently. A restart resends the unanswered dispatch (as the live
    // runtime does), and the resent copy is not slowed by the fault, so the
    // saga may now complete instead of timing out: either way the system
    // holds exactly what the saga's fate says.
    let pool = concord_proto::ResourcePath::parse("svc/api/pool_size").unwrap();
    let base = run(&racing_with(""), Mode::Coordinated).unwrap();
    assert_eq!(base.plans["tune-b/1"].ended.as_deref(), Some("compensated"));
    let mut fates = std::collections::BTreeSet::new();
    for t in (600..=740).step_by(7) {
        let s = racing_with(&format!("\n[[faults]]\nkind = \"crash\"\nat = \"{t}s\"\n"));
        let r = run(&s, Mode::Coordinated).unwrap();
        assert_eq!(r.violation_count, 0, "crash at {t}s: {:?}", r.violations);
        assert_eq!(r.metrics.crashes, 1);
        assert_eq!(r.plans["tune-a/1"], base.plans["tune-a/1"], "crash at {t}s");
        let fate = r.plans["tune-b/1"].ended.clone().unwrap_or_default();
        let want = match fate.as_str() {
            "completed" => 120,
            "compensated" => 50,
            other => panic!("crash at {t}s: tune-b ended `{other}`"),
        };
        assert_eq!(r.world[&pool], concord_proto::Value::Int(want), "crash at {t}s: {fate}");
        fates.insert(fate);
    }
    assert_eq!(
        fates.len(),
        2,
        "crashes before and after the timeout both happened: {fates:?}"
    );
}

#[test]
fn a_rebuilt_coordinator_writes_its_world_document_as_the_live_runtime_does() {
    // Started from the genesis record (the coordinator's id, incarnation 1),
    // then each incarnation record as the restarted process wrote it: the
    // replay's document identity is the one the log names.
    let s = racing_with("\n[[faults]]\nkind = \"crash\"\nat = \"650s\"\n");
    let r = run(&s, Mode::Coordinated).unwrap();
    assert_eq!(r.violation_count, 0, "{:?}", r.violations);
    let c = concord_sim::replay::rebuild(&r.records).unwrap();
    let id = c.world_doc().identity();
    assert_eq!(
        (id.coordinator.as_str(), id.incarnation),
        (concord_sim::run::COORDINATOR_ID, 2)
    );
    // Up to before the crash's incarnation record, the first incarnation's.
    let crash = r
        .records
        .iter()
        .rposition(|rec| matches!(rec, concord_core::coordinator::Record::Incarnation { .. }))
        .unwrap();
    let before = concord_sim::replay::rebuild(&r.records[..crash]).unwrap();
    assert_eq!(before.world_doc().identity().incarnation, 1);
}

fn err(text: &str) -> String {
    match Scenario::parse(text, "bad.toml", &dir()) {
        Err(ScenarioError::Field { field, detail, .. }) => format!("{field}: {detail}"),
        Err(e) => format!("{e}"),
        Ok(_) => panic!("accepted:\n{text}"),
    }
}

#[test]
fn bad_scenarios_name_the_field() {
    let head = "name = \"x\"\ndescription = \"d\"\nduration = \"1h\"\nworld = \"../config/examples/world.toml\"\n";
    let e = err(&format!(
        "{head}[[agents]]\nkind = \"resource\"\nname = \"r\"\nservice = \"api\"\nknob = \"pool_size\"\nladder = [\"x\"]\nqueue_above = 1.0\nsustain = \"1m\"\ncooldown = \"1m\"\n"
    ));
    assert!(e.starts_with("agents[0].ladder[0]"), "{e}");
    let e = err(&format!("{head}seeed = 3\n"));
    assert!(e.contains("seeed"), "{e}");
    let e = err("name = \"x\"\ndescription = \"d\"\nduration = \"1 hour\"\nworld = {}\n");
    assert!(e.starts_with("duration"), "{e}");
    let e = err(&format!(
        "{head}[system.services.nope]\ndemand_rps = 1.0\nhold_ms = 1.0\nlatency_base_ms = 1.0\nlatency_slo_ms = 1.0\n"
    ));
    assert!(e.starts_with("system.services.nope"), "{e}");
    let e = err(&format!(
        "{head}[[agents]]\nkind = \"scripted\"\nname = \"a\"\nactions = [{{ at = \"1m\", propose = {{ lineage = \"l\", version = 1, goal = \"g\", steps = [] }} }}]\n"
    ));
    assert!(e.starts_with("agents[0].actions[0].propose.steps"), "{e}");
    let e = err(&format!(
        "{head}[[faults]]\nkind = \"pause\"\nagent = \"ghost\"\nat = \"1m\"\nfor = \"1m\"\n"
    ));
    assert!(e.starts_with("faults[0].agent"), "{e}");
    let e = err(&format!("{head}[[agents]]\nkind = \"telepath\"\nname = \"t\"\n"));
    assert!(e.starts_with("agents[0]") && e.contains("telepath"), "{e}");
}

#[test]
fn a_tampered_recording_names_the_first_differing_record() {
    let s = Scenario::load(&dir().join("scope-creep.toml")).unwrap();
    let r = run(&s, Mode::Coordinated).unwrap();
    let text = to_jsonl(&r.records);
    assert_eq!(replay(&parse_jsonl(&text).unwrap()).unwrap().intents, 2);
    // Flip the recorded verdict of the first rejection.
    let (line, _) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("\"verdict\":\"reject\""))
        .unwrap();
    let tampered: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let l = if i == line {
                l.replacen("\"verdict\":\"reject\"", "\"verdict\":\"admit\"", 1)
            } else {
                l.to_string()
            };
            l + "\n"
        })
        .collect();
    match replay(&parse_jsonl(&tampered).unwrap()) {
        Err(ReplayError::Divergence {
            line: l,
            event,
            got,
            recorded,
            ..
        }) => {
            assert_eq!(l, line + 1);
            assert_eq!(event, 1);
            assert!(
                got.contains("\"reject\"") && recorded.contains("\"admit\""),
                "{got}\n{recorded}"
            );
        }
        other => panic!("expected a divergence, got {other:?}"),
    }
    assert!(matches!(
        parse_jsonl("{\"record\":\"nope\"}"),
        Err(ReplayError::Decode { line: 1, .. })
    ));
    assert!(matches!(replay(&r.records[1..]), Err(ReplayError::NoGenesis)));
}

#[test]
fn what_if_a_laxer_policy_shows_which_verdicts_change_and_when() {
    let s = Scenario::load(&dir().join("seven-days.toml")).unwrap();
    // Without the artifact allowlist, the branch build would have been admitted.
    let mut lax = s.policy.clone();
    lax.rules.artifacts = None;
    let o = simulate(&s, &[Mode::Coordinated], Some(lax)).unwrap();
    let w = o.report.what_if.as_ref().unwrap();
    let first = &w.rows[w.first_change.unwrap()];
    assert_eq!(first.plan, "deploy-api/1");
    assert_eq!(first.recorded, Some(concord_proto::Verdict::Reject));
    assert_eq!(first.other, Some(concord_proto::Verdict::Admit));
    assert!(w.earlier_by_ms.unwrap() < 0, "the laxer policy intervenes later: {w:?}");
    // The same policy changes nothing.
    let w = what_if(&o.runs[0].records, s.policy.clone()).unwrap();
    assert_eq!(w.changed, 0);
    assert_eq!(w.earlier_by_ms, Some(0));
}
