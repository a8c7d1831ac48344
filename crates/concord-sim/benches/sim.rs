//! Simulator and replay speed (`make bench`; figures in docs/BENCHMARKS.md).
//!
//! - `seven-days/<mode>`: the shipped `simulations/seven-days.toml`, 7 days
//!   at one-second dynamics, three agents, one mode per iteration.
//! - `replay/intents`: re-deciding a recording of 2,000 one-step intents
//!   (3 of 4 admitted and run, each changing a pool: intent + outcome; 1 of
//!   4 rejected by the ceiling)
//!   under the shipped policy and the seven-days world; throughput in intents.
//!   `replay/intents-native-budget`: the same with the policy's CEL
//!   connection-budget rule as the native `[[rules.budget]]`.
//! - `replay/observations`: re-feeding 100,000 observations and timer ticks;
//!   throughput in inputs.
//! - `replay/decode`: parsing the observation recording from JSONL.

use std::path::Path;

use concord_core::coordinator::{Config, Coordinator, Effect, Genesis, Input, RECORD_VERSION, Record, Reply};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{StepOutcome, StepResult};
use concord_proto::{Observation, ObservationKind, ResourcePath, Value, decode_intent};
use concord_sim::Scenario;
use concord_sim::replay::{parse_jsonl, replay, to_jsonl};
use concord_sim::run::{Mode, run};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// The binaries' allocator (see `concord-cli`'s main).
#[global_allocator]
static GLOBAL: concord_alloc::Alloc = concord_alloc::Alloc;
use serde_json::json;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Drives a coordinator with `inputs` and records them as a log.
fn record(policy_text: &str, world: World, inputs: impl Iterator<Item = (u64, Input)>) -> Vec<Record> {
    let policy = Policy::from_toml_str(policy_text).unwrap();
    let mut records = vec![Record::Genesis(Box::new(Genesis {
        record_version: RECORD_VERSION,
        now_ms: 0,
        coordinator: "bench".into(),
        config: Config::default(),
        policy: policy.config.clone(),
        policy_hash: policy.hash.clone(),
        world: world.clone(),
    }))];
    let mut c = Coordinator::new(Config::default(), policy, world);
    let mut pending = Vec::new();
    let feed = |c: &mut Coordinator, now: u64, input: Input, records: &mut Vec<Record>| {
        let fx = c.handle(now, input.clone());
        let events = fx
            .iter()
            .filter_map(|f| match f {
                Effect::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        records.push(Record::Input {
            now_ms: now,
            input: Box::new(input),
            events,
        });
        fx
    };
    let mut verdicts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for (now, input) in inputs {
        for fx in feed(&mut c, now, input, &mut records) {
            match fx {
                Effect::Dispatch(d) => pending.push(d.key),
                Effect::Reply {
                    reply: Reply::Decision(d),
                    ..
                } => *verdicts.entry(format!("{:?}", d.verdict)).or_default() += 1,
                _ => {}
            }
        }
        for key in std::mem::take(&mut pending) {
            let outcome = Input::Outcome {
                executor: "x".into(),
                outcome: StepOutcome {
                    key,
                    result: StepResult::Succeeded,
                },
            };
            feed(&mut c, now + 1_000, outcome, &mut records);
        }
    }
    if !verdicts.is_empty() {
        eprintln!("recorded decisions: {verdicts:?}");
    }
    records
}

/// The shipped policy with its CEL connection-budget rule replaced by the
/// native budget rule that checks the same thing.
fn native_budget(policy: &str) -> String {
    let start = policy.find("[[rules.cel]]\nid = \"coupling.db_connections\"").unwrap();
    let end = start + policy[start..].find("# Destructive steps").unwrap();
    format!(
        "{}[[rules.budget]]\nid = \"coupling.db_connections\"\nterms = [\"svc/*/pool_size\", \"svc/*/replicas\"]\nlimit = \"db/primary/max_connections\"\nmax_fraction = 0.8\noutcome = \"reject\"\n\n{}",
        &policy[..start],
        &policy[end..]
    )
}

fn intents(n: u64, native: bool) -> Vec<Record> {
    let mut policy = std::fs::read_to_string(root().join("config/policy.toml")).unwrap();
    if native {
        policy = native_budget(&policy);
    }
    let world =
        World::from_toml_str(&std::fs::read_to_string(root().join("config/examples/world.toml")).unwrap()).unwrap();
    let inputs = (0..n).map(|i| {
        // 3 of 4 within policy, each a value its service's pool does not
        // hold yet (the plans on one service are 3 apart: i % 20 differs),
        // so every admitted plan changes the world; 1 of 4 over the ceiling.
        let value = if i % 4 == 3 { 5000 } else { 36 + (i % 20) as i64 };
        let svc = ["api", "worker", "billing"][(i % 3) as usize];
        let plan = json!({ "protocol": 1, "lineage": format!("bench-{i}"), "version": 1, "goal": "tune",
            "steps": [{ "id": "s1", "kind": "set", "path": format!("svc/{svc}/pool_size"), "args": { "value": value },
                        "confidence": 0.9, "compensation": { "mode": "restore" } }] });
        let intent = decode_intent(&serde_json::to_vec(&plan).unwrap()).unwrap();
        // An hour apart: no rate, drift or loop rule links them.
        (
            i * 3_600_000,
            Input::Intent {
                request: i,
                agent: "resource".into(),
                intent,
            },
        )
    });
    record(&policy, world, inputs)
}

fn observations(n: u64) -> Vec<Record> {
    let policy = std::fs::read_to_string(root().join("config/policy.toml")).unwrap();
    let world =
        World::from_toml_str(&std::fs::read_to_string(root().join("config/examples/world.toml")).unwrap()).unwrap();
    let series: Vec<(ResourcePath, ObservationKind)> = ["api", "worker", "billing"]
        .iter()
        .flat_map(|s| {
            [
                (format!("svc/{s}/health/app"), ObservationKind::AppHealth),
                (format!("svc/{s}/health/liveness"), ObservationKind::Liveness),
                (format!("svc/{s}/queue_depth"), ObservationKind::Metric),
                (format!("svc/{s}/latency_ms"), ObservationKind::Metric),
            ]
        })
        .map(|(p, k)| (ResourcePath::parse(&p).unwrap(), k))
        .collect();
    let inputs = (0..n).map(move |i| {
        if i % 15 == 14 {
            return (i * 4_000, Input::Tick);
        }
        let (path, kind) = series[(i % series.len() as u64) as usize].clone();
        let value = match kind {
            ObservationKind::Metric => Value::Int((i % 1000) as i64),
            _ => Value::Str(if i % 7 == 0 { "degraded" } else { "ok" }.into()),
        };
        (
            i * 4_000,
            Input::Observe {
                agent: "monitor".into(),
                observation: Observation {
                    protocol: 1,
                    path,
                    kind,
                    value,
                    observed_at_ms: Some(i * 4_000),
                },
            },
        )
    });
    record(&policy, world, inputs)
}

fn bench(c: &mut Criterion) {
    let s = Scenario::load(&root().join("simulations/seven-days.toml")).unwrap();
    let mut g = c.benchmark_group("seven-days");
    g.sample_size(10);
    for m in [Mode::Coordinated, Mode::Uncoordinated] {
        g.bench_function(m.name(), |b| b.iter(|| run(&s, m).unwrap()));
    }
    g.finish();

    let mut g = c.benchmark_group("replay");
    g.sample_size(10);
    for (name, native) in [("intents", false), ("intents-native-budget", true)] {
        let rec = intents(2_000, native);
        let n = rec
            .iter()
            .filter(|r| matches!(r, Record::Input { input, .. } if matches!(**input, Input::Intent { .. })))
            .count();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(name, |b| b.iter(|| replay(&rec).unwrap()));
    }
    let rec = observations(100_000);
    g.throughput(Throughput::Elements(rec.len() as u64 - 1));
    g.bench_function("observations", |b| b.iter(|| replay(&rec).unwrap()));
    let text = to_jsonl(&rec);
    g.throughput(Throughput::Elements(rec.len() as u64));
    g.bench_function("decode", |b| b.iter(|| parse_jsonl(&text).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
