//! Admission through `Coordinator::handle` with 0, 1k and 10k plans in
//! flight on a 100k-path world, and memory per in-flight plan.
//!
//! Workload: the shipped `config/policy.toml` (defaults made `bounded` so the
//! background plans are admitted; its rule count is printed); a world of 40
//! services plus bulk `fleet/...` paths, 100k paths in all. Each background
//! plan is 5 steps on its own fleet node (distinct paths: none conflict) and
//! stays in flight, holding its leases; they come from 100 agents, since one
//! agent may run at most 1,024 plans at once. Two measured cases:
//! - `admit-and-run`: a 5-step plan on three services is decided (admitted),
//!   then its 5 steps are dispatched and succeed, so the paths are free for
//!   the next iteration: one decision plus 5 outcomes.
//! - `decide-conflict`: while one such plan runs, a new lineage on the same
//!   paths is decided in full (both previews, conflicts, compounding) and
//!   rejected for the conflict.
//!
//! Each iteration moves the clock past the compounding windows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use concord_core::coordinator::{Config, Coordinator, Effect, Input, Reply};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{StepOutcome, StepResult};
use concord_proto::{Intent, Value, Verdict, decode_intent};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::json;

/// Counts live heap bytes, to measure memory per in-flight plan.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only
// counts sizes; the one `unsafe` in the workspace, allowed for this bench.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SERVICES: usize = 40;
const DAY_MS: u64 = 86_400_000 * 2;

fn world(paths: usize) -> World {
    let mut w = World::default();
    let p = |s: String| concord_proto::ResourcePath::parse(&s).unwrap();
    for i in 0..SERVICES {
        w.resources
            .insert(p(format!("svc/svc-{i:02}/pool_size")), Value::Int(10));
        w.resources.insert(p(format!("svc/svc-{i:02}/replicas")), Value::Int(2));
    }
    w.resources
        .insert(p("db/primary/max_connections".into()), Value::Int(1250));
    let mut n = 0;
    while w.resources.len() < paths {
        for k in ["cpu", "mem", "disk", "zone", "kernel"] {
            w.resources.insert(p(format!("fleet/node-{n:06}/{k}")), Value::Int(1));
        }
        n += 1;
    }
    w
}

fn plan(lineage: &str, steps: serde_json::Value) -> Intent {
    let j = json!({ "protocol": 1, "lineage": lineage, "version": 1, "goal": "bench", "steps": steps });
    decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap()
}

fn node_plan(i: usize) -> Intent {
    let steps: Vec<_> = ["cpu", "mem", "disk", "zone", "kernel"]
        .iter()
        .enumerate()
        .map(|(s, k)| {
            json!({ "id": format!("s{s}"), "kind": "set", "path": format!("fleet/node-{i:06}/{k}"),
                    "args": { "value": 2 }, "confidence": 0.9, "compensation": { "mode": "restore" } })
        })
        .collect();
    plan(&format!("node-{i}"), json!(steps))
}

fn service_plan(lineage: &str) -> Intent {
    let set = |id: &str, path: &str, v: i64| {
        json!({ "id": id, "kind": "set", "path": path, "args": { "value": v }, "confidence": 0.9,
                "compensation": { "mode": "restore" } })
    };
    let scale = |id: &str, path: &str, r: u32| {
        json!({ "id": id, "kind": "scale", "path": path, "args": { "replicas": r }, "confidence": 0.9,
                "compensation": { "mode": "restore" } })
    };
    plan(
        lineage,
        json!([
            set("s1", "svc/svc-00/pool_size", 12),
            scale("s2", "svc/svc-00", 3),
            set("s3", "svc/svc-01/pool_size", 12),
            scale("s4", "svc/svc-01", 3),
            set("s5", "svc/svc-02/pool_size", 11),
        ]),
    )
}

fn policy() -> Policy {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/policy.toml")).unwrap();
    // The fleet agent acts alone in this bench.
    let text = text.replace(
        "[defaults]\nautonomy = \"propose\"",
        "[defaults]\nautonomy = \"bounded\"",
    );
    Policy::from_toml_str(&text).unwrap()
}

fn verdict(fx: &[Effect]) -> Verdict {
    fx.iter()
        .find_map(|e| match e {
            Effect::Reply {
                reply: Reply::Decision(d),
                ..
            } => Some(d.verdict),
            _ => None,
        })
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let w = world(100_000);
    let p = policy();
    eprintln!(
        "policy: {} rules (config/policy.toml), world: {} paths",
        p.rule_count(),
        w.resources.len()
    );
    let mut group = c.benchmark_group("coordinator/admission/5-step/100k-paths");
    group.sample_size(30);
    // `cargo test` runs each bench once as a check: there, 10k plans in
    // flight (minutes to set up in a debug build) are left out.
    let benching = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if benching { &[0, 1_000, 10_000] } else { &[0, 1_000] };
    for &inflight in sizes {
        let mut coord = Coordinator::new(Config::default(), policy(), w.clone());
        let before = LIVE.load(Ordering::Relaxed);
        for i in 0..inflight {
            let fx = coord.handle(
                1,
                Input::Intent {
                    request: i as u64,
                    // 100 agents: one agent may run at most 1,024 plans at once.
                    agent: format!("fleet-{}", i % 100),
                    intent: node_plan(i),
                },
            );
            assert_eq!(verdict(&fx), Verdict::Admit);
        }
        if let Some(per) = (LIVE.load(Ordering::Relaxed) - before).checked_div(inflight) {
            eprintln!("memory per in-flight 5-step plan at {inflight} in flight: {per} bytes");
        }
        let mut now = 10u64;
        let mut n = 0u64;
        // Runs a plan to its end: every dispatch succeeds.
        let run = |coord: &mut Coordinator, now: u64, fx: Vec<Effect>| {
            let mut fx = fx;
            while let Some(key) = fx.iter().find_map(|e| match e {
                Effect::Dispatch(d) => Some(d.key.clone()),
                _ => None,
            }) {
                fx = coord.handle(
                    now,
                    Input::Outcome {
                        executor: "bench".into(),
                        outcome: StepOutcome {
                            key,
                            result: StepResult::Succeeded,
                        },
                    },
                );
            }
        };
        group.bench_with_input(BenchmarkId::new("admit-and-run", inflight), &inflight, |b, _| {
            b.iter(|| {
                n += 1;
                now += DAY_MS;
                let fx = coord.handle(
                    now,
                    Input::Intent {
                        request: n,
                        agent: "resource".into(),
                        intent: service_plan(&format!("admit-{n}")),
                    },
                );
                assert_eq!(verdict(&fx), Verdict::Admit);
                run(&mut coord, now, fx);
            })
        });
        now += DAY_MS;
        let held = coord.handle(
            now,
            Input::Intent {
                request: 0,
                agent: "resource".into(),
                intent: service_plan("held"),
            },
        );
        assert_eq!(verdict(&held), Verdict::Admit);
        group.bench_with_input(BenchmarkId::new("decide-conflict", inflight), &inflight, |b, _| {
            b.iter(|| {
                n += 1;
                let fx = coord.handle(
                    now,
                    Input::Intent {
                        request: n,
                        agent: "resource".into(),
                        intent: service_plan(&format!("conflict-{n}")),
                    },
                );
                assert_eq!(verdict(&fx), Verdict::Reject);
                black_box(fx)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
