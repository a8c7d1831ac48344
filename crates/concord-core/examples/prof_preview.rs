//! Instruction counts for the preview bench's workload, under callgrind:
//! the world of 100k paths, the admit plan and the policies of
//! `benches/preview.rs` (shared with it through `benches/workload/preview.rs`), previewed `N` times by
//! `run_one`, which callgrind can isolate. Counts are reproducible on a
//! loaded machine where wall-clock medians are not.
//!
//! ```text
//! cargo build --release --example prof_preview -p concord-core
//! valgrind --tool=callgrind --toggle-collect='*run_one*' \
//!     target/release/examples/prof_preview native 100   # or cel, sum_product, builtin, indexed, budget-indexed, sum_product-indexed
//! ```
//! Instructions per preview = the collected total / N.

#![allow(dead_code)]
// The workload, as the bench describes it:
// Preview cost against world size: diff, every rule over every step prefix
// and compensation prefix, and the verdict, for a 5-step plan.
//
// The requirement: a median under 20 µs at 100k paths with 20 rules, and a
// cost that grows with the paths the plan touches and the paths rules
// declare they read, not with the size of the world. So the same plan and
// policy run against worlds of 1k, 100k and 1M paths; the figures should be
// flat across the three (apart from the log-n of a B-tree lookup).
//
// World shape: 40 services under `svc/<name>/{pool_size,replicas,version,
// artifact,cpu_limit,mem_limit}`, a database under `db/primary/`, a few
// protected paths (`auth/`, `config/prod/`, `iam/`), and the bulk split in
// two halves: `fleet/node-<i>/{cpu,mem,disk,zone,kernel}`, which sorts
// before `svc/`, and `volumes/vol-<i>/{size_gb,iops,zone,class,attached_to}`,
// which sorts after it. Rules read `svc/` and `db/` only, so a rule that
// scans more than its literal prefix shows up as a cost that grows with the
// bulk; and because part of the bulk sorts after the paths the plan writes,
// so does any ordered scan that runs past the end of its prefix (a world
// whose bulk all sorts first would hide that).
//
// Cases (the verdict is in the name, and asserted before timing):
// - `admit`: pools and replicas on three services, all within policy, so
//   every state is evaluated by every rule (the expensive path).
// - `reject-at-step-3`: scales a service up before shrinking its pool; the
//   state after step 3 breaks the connection budget, so the coupling rule
//   fails there and the plan is rejected even though it ends within budget.
//
// Group `preview/5-step/9-builtin-rules` runs the admitted plan under the
// built-ins alone at 100k paths; its difference from the 20-rule figure is
// roughly what ceilings, rates, protected prefixes and CEL cost.
//
// Run: `cargo bench -p concord-core --bench preview`.

use std::hint::black_box;

use concord_core::budget::BudgetIndex;
use concord_core::celindex::CelIndex;
use concord_core::policy::Policy;
use concord_core::preview::{PreviewInput, preview, preview_on};
use concord_core::world::{Base, PathIndex, World};
use concord_proto::{Intent, Verdict};

#[path = "../benches/workload/preview.rs"]
mod workload;
use workload::*;

/// The binaries' allocator (see `concord-cli`'s main).
#[global_allocator]
static GLOBAL: concord_alloc::Alloc = concord_alloc::Alloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("native");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    let pol = match which {
        "cel" => policy(POLICY_20, 20),
        "builtin" => policy(POLICY_BUILTIN, 9),
        "sum_product" | "sum_product-indexed" => policy(&policy_20_sum_product(), 20),
        // `native`, and `indexed` and `budget-indexed`: the same with indexes.
        _ => policy(&policy_20_native(), 20),
    };
    let admit = intent(PLAN_ADMIT);
    let _ = intent(PLAN_REJECT);
    let world = world(100_000);
    let _ = Case {
        name: "",
        intent: &admit,
        verdict: Verdict::Admit,
        because: None,
    };
    check(&world, &admit, &pol, Verdict::Admit, None);
    // `indexed` (and `sum_product-indexed`): the budget, path and CEL
    // indexes the coordinator keeps; `budget-indexed`: the budget index alone.
    let all = matches!(which, "indexed" | "sum_product-indexed");
    let index = (all || which == "budget-indexed").then(|| BudgetIndex::build(&pol, &world));
    let paths = if all {
        PathIndex::build(&world)
    } else {
        PathIndex::default()
    };
    let cel = if all {
        CelIndex::build(&pol, &world)
    } else {
        CelIndex::default()
    };
    for _ in 0..n {
        black_box(run_one(&world, &admit, &pol, index.as_ref(), &paths, &cel));
    }
}

#[inline(never)]
fn run_one(
    world: &World,
    i: &Intent,
    p: &Policy,
    index: Option<&BudgetIndex>,
    paths: &PathIndex,
    cel: &CelIndex,
) -> concord_proto::preview::Preview {
    let input = black_box(PreviewInput {
        world,
        intent: i,
        agent: "resource",
        policy: p,
        previous: None,
    });
    match index {
        Some(ix) => preview_on(
            input,
            Base::current(world).with_index(ix).with_paths(paths).with_cel(cel),
        ),
        None => preview(input),
    }
}
