//! Admission through `Coordinator::handle` with 0, 1k and 10k plans in
//! flight on a 100k-path world, and memory per in-flight plan.
//!
//! Workload: the shipped `config/policy.toml` (defaults made `bounded` so the
//! background plans are admitted; its rule count is printed); a world of 40
//! services plus bulk `fleet/...` paths, 100k paths in all. Each background
//! plan is 5 steps on its own fleet node (distinct paths: none conflict) and
//! stays in flight, holding its leases; they come from 100 agents, since one
//! agent may run at most 1,024 plans at once. Measured cases:
//! - `admit-and-run`: a 5-step plan on three services is decided (admitted),
//!   then its 5 steps are dispatched and succeed, so the paths are free for
//!   the next iteration: one decision plus 5 outcomes.
//! - `admit`: the same, with only the decision timed (the `handle` call that
//!   admits the plan and dispatches its first step); its 5 outcomes run
//!   after the timed call, outside the measurement. Its plans differ in the
//!   values they set, not in their steps' ids, kinds and confidences, so the
//!   CEL rule over the plan alone (`confidence.destructive`) is answered
//!   from what it gave before (`celmemo`).
//! - `admit-new-shape`: `admit` with step ids new in every iteration, so
//!   that rule is evaluated every time.
//! - `decide-conflict`: while one such plan runs, a new lineage on the same
//!   paths is decided (its preview, conflicts, compounding) and rejected for
//!   the conflict.
//!
//! Each iteration moves the clock past the compounding windows, and each
//! iteration's plan changes the values it sets (a plan equal to the world
//! changes nothing and would be judged in one state). Every case runs twice:
//! with the shipped policy (its connection budget a CEL rule over all 40
//! services) and, under `native-budget/`, with that rule as the native
//! `[[rules.budget]]`. Intents are decoded in the untimed setup.

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;

#[path = "workload/coordinator.rs"]
mod workload;
use workload::*;

fn bench(c: &mut Criterion) {
    let w = world(100_000);
    let p = policy();
    eprintln!(
        "policy: {} rules and {} compounding rules (config/policy.toml), world: {} paths",
        p.rule_count(),
        p.compounding_rule_count(),
        w.resources.len()
    );
    // The workload the admission target names: 20 rules.
    assert_eq!(p.rule_count() + p.compounding_rule_count(), 20);
    // What the coordinator keeps beside its world: the world itself, and its
    // path index (the budget index is a few values per service).
    let before = LIVE.load(std::sync::atomic::Ordering::Relaxed);
    let copy = w.clone();
    let world_bytes = LIVE.load(std::sync::atomic::Ordering::Relaxed) - before;
    let index = concord_core::world::PathIndex::build(&copy);
    let index_bytes = LIVE.load(std::sync::atomic::Ordering::Relaxed) - before - world_bytes;
    eprintln!("memory of the world: {world_bytes} bytes; of its path index: {index_bytes} bytes");
    drop((copy, index));
    let mut group = c.benchmark_group("coordinator/admission/5-step/100k-paths");
    group.sample_size(30);
    // `cargo test` runs each bench once as a check: there, 10k plans in
    // flight (minutes to set up in a debug build) are left out.
    let benching = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if benching { &[0, 1_000, 10_000] } else { &[0, 1_000] };
    // The shipped policy (a CEL connection budget), and the same with the
    // budget as the native rule.
    type MakePolicy = fn() -> concord_core::policy::Policy;
    let policies: [(&str, MakePolicy); 2] = [("", policy), ("native-budget/", policy_native_budget)];
    for (variant, policy) in policies {
        for &inflight in sizes {
            let mut coord = with_inflight(w.clone(), inflight, policy());
            let mut now = 10u64;
            let mut n = 0u64;
            // Each iteration's intent is decoded in the untimed setup.
            group.bench_with_input(
                BenchmarkId::new(format!("{variant}admit-and-run"), inflight),
                &inflight,
                |b, _| {
                    b.iter_batched(
                        || {
                            n += 1;
                            now += DAY_MS;
                            (now, n, admit_intent(n))
                        },
                        |(now, n, intent)| admit_and_run(&mut coord, now, n, intent),
                        BatchSize::SmallInput,
                    )
                },
            );
            type MakeIntent = fn(u64) -> concord_proto::Intent;
            let admits: [(&str, MakeIntent); 2] =
                [("admit", admit_intent), ("admit-new-shape", admit_intent_new_shape)];
            for (case, make_intent) in admits {
                group.bench_with_input(
                    BenchmarkId::new(format!("{variant}{case}"), inflight),
                    &inflight,
                    |b, _| {
                        b.iter_custom(|iters| {
                            let mut timed = std::time::Duration::ZERO;
                            for _ in 0..iters {
                                n += 1;
                                now += DAY_MS;
                                let intent = make_intent(n);
                                // The bench times; the core it times reads no clock.
                                #[allow(clippy::disallowed_methods)]
                                let start = std::time::Instant::now();
                                let fx = black_box(admit(&mut coord, now, n, intent));
                                timed += start.elapsed();
                                run_to_end(&mut coord, now, fx);
                            }
                            timed
                        })
                    },
                );
            }
            now += DAY_MS;
            hold_services(&mut coord, now);
            group.bench_with_input(
                BenchmarkId::new(format!("{variant}decide-conflict"), inflight),
                &inflight,
                |b, _| {
                    b.iter_batched(
                        || {
                            n += 1;
                            (n, conflict_intent(n))
                        },
                        |(n, intent)| black_box(decide_conflict(&mut coord, now, n, intent)),
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
