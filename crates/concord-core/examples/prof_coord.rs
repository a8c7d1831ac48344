//! Instruction counts for the coordinator bench's workload, under
//! callgrind: the world, policy and plans of `benches/coordinator.rs`
//! (its workload file), `K` plans in flight, then `N` admissions (each
//! plan's outcomes then run unmeasured) and `N` conflicting decisions, each
//! in a function callgrind can isolate. Also prints the memory per in-flight plan.
//!
//! ```text
//! cargo build --release --example prof_coord -p concord-core
//! valgrind --tool=callgrind --toggle-collect='*measured_*' \
//!     target/release/examples/prof_coord 1000 50 [cel|native] [new-shape]
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
// agent may run at most 1,024 plans at once. Measured cases:
// - `admit-and-run`: a 5-step plan on three services is decided (admitted),
//   then its 5 steps are dispatched and succeed, so the paths are free for
//   the next iteration: one decision plus 5 outcomes. Measured here as
//   `admit`: the decision alone (the outcomes run, unmeasured, after it).
// - `decide-conflict`: while one such plan runs, a new lineage on the same
//   paths is decided (its preview, conflicts, compounding) and rejected for
//   the conflict.
//
// Each iteration moves the clock past the compounding windows.

use std::hint::black_box;

use concord_core::coordinator::{Coordinator, Effect};
use concord_proto::Intent;

#[path = "../benches/workload/coordinator.rs"]
mod workload;
use workload::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let inflight: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let iters: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let policy = match args.get(3).map(String::as_str) {
        Some("native") => policy_native_budget(),
        _ => policy(),
    };
    // `new-shape`: admissions as the bench's `admit-new-shape` (step ids new
    // in every plan, so no CEL result is remembered).
    let make_intent: fn(u64) -> Intent = match args.get(4).map(String::as_str) {
        Some("new-shape") => admit_intent_new_shape,
        _ => admit_intent,
    };
    let mut coord = with_inflight(world(100_000), inflight, policy);
    let mut now = 10u64;
    for n in 0..iters {
        now += DAY_MS;
        let fx = measured_admit(&mut coord, now, n, make_intent(n));
        run_to_end(&mut coord, now, fx);
    }
    now += DAY_MS;
    hold_services(&mut coord, now);
    for n in 0..iters {
        let n = 1_000_000 + n;
        measured_decide_conflict(&mut coord, now, n, conflict_intent(n));
    }
}

/// One `admit` (the decision of `admit_and_run`; its outcomes are not
/// measured), in a function of its own for callgrind.
#[inline(never)]
fn measured_admit(coord: &mut Coordinator, now: u64, n: u64, intent: Intent) -> Vec<Effect> {
    admit(coord, now, n, intent)
}

/// One `decide_conflict`, in a function of its own for callgrind.
#[inline(never)]
fn measured_decide_conflict(coord: &mut Coordinator, now: u64, n: u64, intent: Intent) {
    black_box(decide_conflict(coord, now, n, intent));
}
