//! The world model: observation merge rate into the Automerge document, a
//! preview reading the materialized view against reading the same values
//! from Automerge, rotation, one sync round, and memory per day of
//! observations.
//!
//! Groups (criterion):
//! - `worldmodel/observe`: one `Coordinator::handle(Observe)` per iteration,
//!   100 metric series in turn. `written`: every value moves beyond the
//!   deadband (one Automerge change of two ops, accepted; it is applied to
//!   Automerge when the document is next read); `written-applied`: the same,
//!   with the document read after each input (the write applied at once, as
//!   a sync step after every input does); `suppressed`: every value stays
//!   within the deadband (series state only). On a 1k-path and a 100k-path
//!   world; document rotation on its default schedule (every 50,000 changes)
//!   is amortized in.
//! - `worldmodel/preview/100k`: the 5-step admit plan of the preview bench
//!   (built-ins, a native connection budget and ceilings: 12 rules) on the
//!   materialized `World` (`view`), and on a `World` rebuilt per preview from
//!   the values the preview reads (`svc/`, `db/`), read from the Automerge
//!   document (`automerge`). `reads/*`: the reads alone.
//! - `worldmodel/materialize/100k`: the whole world read back from the
//!   document (the cold path: after a load, in checks).
//! - `worldmodel/rotate/100k`: the observation whose write triggers a
//!   rotation of a 100k-path document (a fresh document of the current
//!   state, kept to be built when read), and the first read after it (the
//!   build).
//! - `worldmodel/step/100k`: a step success on a 100k-path world (the
//!   outcome alone is timed): the materialized view and one change (the
//!   resource and its provenance) in the document.
//! - `worldmodel/sync/round`: one written observation and the sync round that
//!   carries it to one replica (generate, receive, answer, receive).
//!
//! Memory per day (printed before the groups, from a counting allocator):
//! 100 series (20 services x liveness, app health, queue depth, connections
//! in use, latency) reporting once a minute for 24 h of coordinator time,
//! rotation off, under three write policies.
//!
//! Run: `cargo bench -p concord-core --bench worldmodel`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::Duration;

use concord_core::coordinator::{Config, Coordinator, Input};
use concord_core::policy::Policy;
use concord_core::preview::{PreviewInput, preview};
use concord_core::world::{Service, World};
use concord_core::worlddoc::{WorldDocConfig, WorldReplica};
use concord_proto::{Intent, Observation, ObservationKind, ResourcePath, Value, Verdict, decode_intent};
use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};

#[path = "workload/counting.rs"]
mod counting;
use counting::LIVE;

const SERVICES: usize = 40;
const MINUTE_MS: u64 = 60_000;

fn path(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap_or_else(|(_, e)| panic!("bench path `{s}`: {e}"))
}

/// `total` paths: 40 services with six leaves each, the database, then bulk
/// fleet nodes (the preview bench's shape, without the volumes half).
fn world(total: usize) -> World {
    let mut w = World::default();
    for i in 0..SERVICES {
        let name = format!("svc-{i:02}");
        let p = |leaf: &str| path(&format!("svc/{name}/{leaf}"));
        w.resources.insert(p("pool_size"), Value::Int(10));
        w.resources.insert(p("replicas"), Value::Int(2));
        w.resources.insert(p("version"), Value::Str(format!("v1.{i}.0")));
        w.resources
            .insert(p("artifact"), Value::Str(format!("registry/{name}:v1.{i}.0")));
        w.resources.insert(p("cpu_limit"), Value::Float(2.0));
        w.resources.insert(p("mem_limit"), Value::Str("4Gi".into()));
        w.services.insert(
            name.clone(),
            Service {
                path: path(&format!("svc/{name}")),
                depends_on: vec![path("db/primary")],
            },
        );
    }
    w.resources.insert(path("db/primary/max_connections"), Value::Int(1250));
    w.resources.insert(path("db/primary/schema/version"), Value::Int(42));
    let mut n = 0;
    while w.resources.len() < total {
        for k in ["cpu", "mem", "disk", "zone", "kernel"] {
            if w.resources.len() < total {
                w.resources
                    .insert(path(&format!("fleet/node-{n:07}/{k}")), Value::Int(1));
            }
        }
        n += 1;
    }
    w
}

const POLICY: &str = r#"
[defaults]
autonomy = "propose"

[agents.resource]
autonomy = "bounded"
allow = [
  { kinds = ["set"], paths = ["svc/*/pool_size"] },
  { kinds = ["scale"], paths = ["svc/*"] },
]

[[rules.budget]]
id = "coupling.db_connections"
terms = ["svc/*/pool_size", "svc/*/replicas"]
limit = "db/primary/max_connections"
max_fraction = 0.8
outcome = "reject"

[[rules.ceiling]]
id = "ceiling.pool_size"
paths = ["svc/*/pool_size"]
approve_above = 200
reject_above = 1000

[[rules.ceiling]]
id = "ceiling.replicas"
paths = ["svc/*/replicas"]
approve_above = 32
reject_above = 128
"#;

const PLAN_ADMIT: &str = r#"{
  "protocol": 1, "lineage": "bench-admit", "version": 1,
  "goal": "more headroom for three services",
  "assumptions": [{ "path": "db/primary/max_connections", "op": "eq", "value": 1250 }],
  "steps": [
    { "id": "s1", "kind": "set", "path": "svc/svc-00/pool_size", "args": { "value": 20 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s2", "kind": "scale", "path": "svc/svc-00", "args": { "replicas": 4 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s3", "kind": "set", "path": "svc/svc-01/pool_size", "args": { "value": 20 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s4", "kind": "scale", "path": "svc/svc-01", "args": { "replicas": 3 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s5", "kind": "set", "path": "svc/svc-02/pool_size", "args": { "value": 15 },
      "confidence": 0.9, "compensation": { "mode": "restore" } }
  ]
}"#;

fn metric(series: usize, v: f64) -> Input {
    Input::Observe {
        agent: "probe".into(),
        observation: Observation {
            protocol: 1,
            path: path(&format!("svc/svc-{:02}/metrics/m{}", series % SERVICES, series)),
            kind: ObservationKind::Metric,
            value: Value::Float(v),
            observed_at_ms: None,
        },
    }
}

fn coordinator(world: World, config: Config) -> Coordinator {
    Coordinator::new(config, Policy::from_toml_str(POLICY).unwrap(), world)
}

/// The values a preview of the admit plan reads, read from the document
/// into a small world: the services' subtrees and the database.
fn world_from_doc(c: &Coordinator, services: &BTreeMap<String, Service>) -> World {
    let d = c.world_doc();
    let mut w = World {
        resources: BTreeMap::new(),
        services: services.clone(),
    };
    for prefix in ["svc/", "db/"] {
        w.resources.extend(d.scan_prefix(prefix));
    }
    w
}

fn world_from_view(world: &World) -> World {
    let mut w = World {
        resources: BTreeMap::new(),
        services: world.services.clone(),
    };
    for prefix in ["svc/", "db/"] {
        w.resources
            .extend(world.scan_prefix(prefix).map(|(p, v)| (p.clone(), v.clone())));
    }
    w
}

// ---- memory per day ---------------------------------------------------------------

/// A deterministic generator.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() % 2_000_000) as f64 / 1_000_000.0 - 1.0
    }
}

/// One day of 100 series reporting once a minute: per service, liveness and
/// app health (`ok`, with rare short `failing` / `degraded` spells), queue
/// depth (a mean-reverting random walk of small integers), connections in
/// use (a daily cycle of +-25% with 2% noise) and latency (a daily cycle of
/// +-20% with 10% noise).
fn day_of_observations(mut f: impl FnMut(u64, Input)) -> usize {
    const SVC: usize = 20;
    let mut rng = Lcg(42);
    let mut down = [0u32; SVC];
    let mut degraded = [0u32; SVC];
    let mut queue = [20i64; SVC];
    let mut n = 0;
    for minute in 0..24 * 60u64 {
        let phase = (minute as f64) / (24.0 * 60.0) * std::f64::consts::TAU;
        for s in 0..SVC {
            let t = minute * MINUTE_MS + s as u64 * 100;
            let obs = |suffix: &str, kind, value| Input::Observe {
                agent: "probe".into(),
                observation: Observation {
                    protocol: 1,
                    path: path(&format!("svc/svc-{s:02}/{suffix}")),
                    kind,
                    value,
                    observed_at_ms: None,
                },
            };
            if down[s] == 0 && rng.next().is_multiple_of(2_000) {
                down[s] = 2;
            }
            if degraded[s] == 0 && rng.next().is_multiple_of(1_000) {
                degraded[s] = 10;
            }
            let live = if down[s] > 0 { "failing" } else { "ok" };
            let app = if down[s] > 0 {
                "failing"
            } else if degraded[s] > 0 {
                "degraded"
            } else {
                "ok"
            };
            down[s] = down[s].saturating_sub(1);
            degraded[s] = degraded[s].saturating_sub(1);
            queue[s] = (queue[s] + (rng.next() % 5) as i64 - 2 + (20 - queue[s]).signum()).max(0);
            let conns = 200.0 * (1.0 + 0.25 * (phase + s as f64).sin()) * (1.0 + 0.02 * rng.unit());
            let latency = 50.0 * (1.0 + 0.2 * (phase + s as f64).cos()) * (1.0 + 0.1 * rng.unit());
            let inputs = [
                obs("health/live", ObservationKind::Liveness, Value::Str(live.into())),
                obs("health/app", ObservationKind::AppHealth, Value::Str(app.into())),
                obs("queue_depth", ObservationKind::Metric, Value::Int(queue[s])),
                obs("conns_in_use", ObservationKind::Metric, Value::Float(conns.round())),
                obs(
                    "latency_ms",
                    ObservationKind::Metric,
                    Value::Float((latency * 10.0).round() / 10.0),
                ),
            ];
            for input in inputs {
                f(t, input);
                n += 1;
            }
        }
    }
    n
}

fn memory_per_day() {
    let base = WorldDocConfig {
        rotate_changes_max: u64::MAX,
        rotate_after_ms: u64::MAX,
        ..WorldDocConfig::default()
    };
    let cases = [
        ("deadband 5%, refresh 15 min (default)", base.clone()),
        (
            "deadband 5%, no refresh",
            WorldDocConfig {
                observation_refresh_ms: 0,
                ..base.clone()
            },
        ),
        (
            "no deadband (every changed value written)",
            WorldDocConfig {
                metric_deadband_rel: 0.0,
                metric_deadband_abs: -1.0,
                observation_refresh_ms: 0,
                ..base.clone()
            },
        ),
        (
            "series state only (metrics never rewritten)",
            WorldDocConfig {
                metric_deadband_abs: f64::MAX,
                observation_refresh_ms: 0,
                ..base
            },
        ),
    ];
    for (name, wd) in cases {
        let config = Config {
            world_doc: wd,
            ..Config::default()
        };
        let mut c = coordinator(world(1_000), config);
        let (changes0, ops0) = (c.world_doc().change_count(), c.world_doc().op_count());
        let before = LIVE.load(Ordering::Relaxed);
        // Wall time of the day's run, for the record; the bench, not the core, reads the clock.
        #[allow(clippy::disallowed_methods)]
        let start = std::time::Instant::now();
        let n = day_of_observations(|t, input| {
            c.handle(t, input);
        });
        let took = start.elapsed();
        let heap = LIVE.load(Ordering::Relaxed) as i64 - before as i64;
        let d = c.world_doc();
        let (changes, ops) = (d.change_count() - changes0, d.op_count() - ops0);
        let saved = d.save().len();
        eprintln!(
            "memory/day [{name}]: {n} observations in {:.2} s, {changes} changes ({:.1}%), {ops} ops, \
             saved document {saved} bytes, heap +{heap} bytes ({} bytes per change)",
            took.as_secs_f64(),
            100.0 * changes as f64 / n as f64,
            if changes > 0 { heap / changes as i64 } else { 0 },
        );
    }
}

// ---- groups ---------------------------------------------------------------------

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(30)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

fn bench(c: &mut Criterion) {
    // The day takes a while: run it when benchmarking (not when `cargo test`
    // runs each bench once as a check), unless a filter leaves it out.
    let benching = std::env::args().any(|a| a == "--bench");
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if benching && (filters.is_empty() || filters.iter().any(|f| "worldmodel/memory-per-day".contains(f.as_str()))) {
        memory_per_day();
    }

    let mut group = c.benchmark_group("worldmodel/observe");
    configure(&mut group);
    for (size, label) in [(1_000usize, "1k-paths"), (100_000, "100k-paths")] {
        for (case, low, high, applied) in [
            ("written", 100.0, 200.0, false),
            ("written-applied", 100.0, 200.0, true),
            ("suppressed", 100.0, 101.0, false),
        ] {
            let mut coord = coordinator(world(size), Config::default());
            let mut i = 0usize;
            let mut now = 1_000u64;
            group.bench_function(BenchmarkId::new(case, label), |b| {
                b.iter(|| {
                    i += 1;
                    now += 10;
                    // 100 series in turn; each alternates between two values.
                    let v = if (i / 100).is_multiple_of(2) { low } else { high };
                    let fx = coord.handle(now, metric(i % 100, v));
                    if applied {
                        // Reading the heads applies the write to Automerge, as
                        // a sync step after every input would.
                        black_box(coord.world_doc().heads());
                    }
                    black_box(fx)
                })
            });
            let d = coord.world_doc();
            eprintln!(
                "observe/{case}/{label}: after the runs, epoch {} with {} changes",
                d.epoch(),
                d.change_count()
            );
        }
    }
    group.finish();

    let w = world(100_000);
    let policy = Policy::from_toml_str(POLICY).unwrap();
    let intent: Intent = decode_intent(PLAN_ADMIT.as_bytes()).unwrap();
    let coord = coordinator(w.clone(), Config::default());
    let run = |world: &World| {
        preview(PreviewInput {
            world,
            intent: &intent,
            agent: "resource",
            policy: &policy,
            previous: None,
        })
    };
    // Same verdict and diff whichever way the values were read.
    let (a, b) = (run(coord.world()), run(&world_from_doc(&coord, &w.services)));
    assert_eq!(a.verdict, Verdict::Admit);
    assert_eq!((a.verdict, &a.diff), (b.verdict, &b.diff));
    let mut group = c.benchmark_group("worldmodel/preview/100k");
    configure(&mut group);
    group.bench_function("view", |b| b.iter(|| black_box(run(coord.world()))));
    group.bench_function("automerge", |b| {
        b.iter(|| black_box(run(&world_from_doc(&coord, &w.services))))
    });
    group.bench_function("reads/view", |b| b.iter(|| black_box(world_from_view(coord.world()))));
    group.bench_function("reads/automerge", |b| {
        b.iter(|| black_box(world_from_doc(&coord, &w.services)))
    });
    group.finish();

    let mut group = c.benchmark_group("worldmodel/materialize/100k");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.bench_function("world-from-automerge", |b| {
        b.iter(|| black_box(coord.world_doc().world()))
    });
    group.finish();
    drop(coord);

    let mut group = c.benchmark_group("worldmodel/rotate/100k");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    let config = Config {
        world_doc: WorldDocConfig {
            rotate_changes_max: 3,
            ..WorldDocConfig::default()
        },
        ..Config::default()
    };
    group.bench_function("observation-that-rotates", |b| {
        b.iter_batched(
            || {
                let mut coord = coordinator(w.clone(), config.clone());
                coord.handle(1_000, metric(0, 1.0));
                coord
            },
            |mut coord| {
                let fx = coord.handle(2_000, metric(1, 1.0));
                assert_eq!(coord.world_doc().epoch(), 1);
                (coord, fx)
            },
            BatchSize::PerIteration,
        )
    });
    // The rotated document is built when first read (a replica's sync, a
    // snapshot, a status query): that read pays for the build.
    group.bench_function("first-read-after-rotation", |b| {
        b.iter_batched(
            || {
                let mut coord = coordinator(w.clone(), config.clone());
                coord.handle(1_000, metric(0, 1.0));
                coord.handle(2_000, metric(1, 1.0));
                assert_eq!(coord.world_doc().epoch(), 1);
                coord
            },
            |coord| {
                let heads = coord.world_doc().heads();
                (coord, heads)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    // A step success: the outcome that writes a resource and its provenance
    // (one change, two operations) into a 100k-path document. Only the
    // outcome is timed; each iteration first admits a one-step plan.
    let mut group = c.benchmark_group("worldmodel/step/100k");
    configure(&mut group);
    let mut coord = coordinator(w.clone(), Config::default());
    let mut n = 0u64;
    group.bench_function("outcome-succeeded", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let now = 1_000 + n * 10;
                let svc = n % SERVICES as u64;
                let j = serde_json::json!({ "protocol": 1, "lineage": format!("p{n}"), "version": 1, "goal": "g",
                    "steps": [{ "id": "s1", "kind": "set", "path": format!("svc/svc-{svc:02}/pool_size"),
                                "args": { "value": 10 + (n / SERVICES as u64) % 2 }, "confidence": 0.9,
                                "compensation": { "mode": "restore" } }] });
                let fx = coord.handle(
                    now,
                    Input::Intent {
                        request: n,
                        agent: "resource".into(),
                        intent: decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap(),
                    },
                );
                let key = fx
                    .iter()
                    .find_map(|e| match e {
                        concord_core::coordinator::Effect::Dispatch(d) => Some(d.key.clone()),
                        _ => None,
                    })
                    .expect("the plan is admitted and dispatched");
                let outcome = Input::Outcome {
                    executor: "bench".into(),
                    outcome: concord_proto::coord::StepOutcome {
                        key,
                        result: concord_proto::coord::StepResult::Succeeded,
                    },
                };
                // The bench, not the core, reads the clock.
                #[allow(clippy::disallowed_methods)]
                let start = std::time::Instant::now();
                black_box(coord.handle(now + 1, outcome));
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
    eprintln!(
        "step/100k: after the runs, epoch {} with {} changes",
        coord.world_doc().epoch(),
        coord.world_doc().change_count()
    );
    drop(coord);

    let mut group = c.benchmark_group("worldmodel/sync");
    configure(&mut group);
    let mut coord = coordinator(world(1_000), Config::default());
    let mut replica = WorldReplica::new("agent");
    let mut to_coord = Some(replica.hello());
    loop {
        if let Some(f) = to_coord.take() {
            coord.world_doc_mut().sync_receive("agent", &f).unwrap();
        }
        let out = coord.world_doc_mut().sync_generate("agent").unwrap();
        if let Some(f) = &out {
            replica.receive(f).unwrap();
        }
        to_coord = replica.generate();
        if out.is_none() && to_coord.is_none() {
            break;
        }
    }
    let (mut i, mut now) = (0usize, 1_000u64);
    let mut bytes = 0usize;
    group.bench_function("round", |b| {
        b.iter(|| {
            i += 1;
            now += 10;
            let v = if (i / 100).is_multiple_of(2) { 100.0 } else { 200.0 };
            coord.handle(now, metric(i % 100, v));
            let f = coord.world_doc_mut().sync_generate("agent").unwrap().unwrap();
            bytes += f.len();
            replica.receive(&f).unwrap();
            let ack = replica.generate().unwrap();
            bytes += ack.len();
            coord.world_doc_mut().sync_receive("agent", &ack).unwrap();
        })
    });
    group.finish();
    assert_eq!(replica.heads(), coord.world_doc().heads());
    if let Some(per) = bytes.checked_div(i) {
        eprintln!("sync/round: {per} bytes on the wire per written observation");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
