//! Instruction counts for the coordinator bench's workload, under
//! callgrind: the world, policy and plans of `benches/coordinator.rs`
//! (copied from it), `K` plans in flight, then `N` admit-and-run
//! iterations and `N` conflicting decisions, each in a function callgrind
//! can isolate. Also prints the memory per in-flight plan.
//!
//! ```text
//! cargo build --release --example prof_coord -p concord-core
//! valgrind --tool=callgrind --toggle-collect='*admit_and_run*' \
//!     --toggle-collect='*decide_conflict*' target/release/examples/prof_coord 1000 50
//! callgrind_annotate --inclusive=yes callgrind.out.<pid> | grep 'Coordinator::handle'
//! ```

#![allow(dead_code, unsafe_code)]
// The workload, as the bench describes it:
// Admission through `Coordinator::handle` with 0, 1k and 10k plans in
// flight on a 100k-path world, and memory per in-flight plan.
//
// Workload: the shipped `config/policy.toml` (defaults made `bounded` so the
// background plans are admitted; its rule count is printed); a world of 40
// services plus bulk `fleet/...` paths, 100k paths in all. Each background
// plan is 5 steps on its own fleet node (distinct paths: none conflict) and
// stays in flight, holding its leases; they come from 100 agents, since one
// agent may run at most 1,024 plans at once. Two measured cases:
// - `admit-and-run`: a 5-step plan on three services is decided (admitted),
//   then its 5 steps are dispatched and succeed, so the paths are free for
//   the next iteration: one decision plus 5 outcomes.
// - `decide-conflict`: while one such plan runs, a new lineage on the same
//   paths is decided in full (both previews, conflicts, compounding) and
//   rejected for the conflict.
//
// Each iteration moves the clock past the compounding windows.

use std::hint::black_box;
use std::sync::atomic::Ordering;

use concord_core::coordinator::{Config, Coordinator, Effect, Input};
use concord_proto::Verdict;
use concord_proto::coord::{StepOutcome, StepResult};

#[path = "../benches/workload/coordinator.rs"]
mod workload;
use workload::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let inflight: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let iters: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let w = world(100_000);
    let mut coord = Coordinator::new(Config::default(), policy(), w.clone());
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..inflight {
        let fx = coord.handle(
            1,
            Input::Intent {
                request: i as u64,
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
    for n in 0..iters {
        now += DAY_MS;
        admit_and_run(&mut coord, now, n);
    }
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
    for n in 0..iters {
        decide_conflict(&mut coord, now, 1_000_000 + n);
    }
}

#[inline(never)]
fn admit_and_run(coord: &mut Coordinator, now: u64, n: u64) {
    let fx = coord.handle(
        now,
        Input::Intent {
            request: n,
            agent: "resource".into(),
            intent: service_plan(&format!("admit-{n}")),
        },
    );
    assert_eq!(verdict(&fx), Verdict::Admit);
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
}

#[inline(never)]
fn decide_conflict(coord: &mut Coordinator, now: u64, n: u64) {
    let fx = coord.handle(
        now,
        Input::Intent {
            request: n,
            agent: "resource".into(),
            intent: service_plan(&format!("conflict-{n}")),
        },
    );
    assert_eq!(verdict(&fx), Verdict::Reject);
    black_box(fx);
}
