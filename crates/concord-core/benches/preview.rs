//! Preview cost against world size: diff, every rule over every step prefix
//! and compensation prefix, and the verdict, for a 5-step plan.
//!
//! The requirement: a median under 20 µs at 100k paths with 20 rules, and a
//! cost that grows with the paths the plan touches and the paths rules
//! declare they read, not with the size of the world. So the same plan and
//! policy run against worlds of 1k, 100k and 1M paths; the figures should be
//! flat across the three (apart from the log-n of a B-tree lookup).
//!
//! World shape: 40 services under `svc/<name>/{pool_size,replicas,version,
//! artifact,cpu_limit,mem_limit}`, a database under `db/primary/`, a few
//! protected paths (`auth/`, `config/prod/`, `iam/`), and the bulk split in
//! two halves: `fleet/node-<i>/{cpu,mem,disk,zone,kernel}`, which sorts
//! before `svc/`, and `volumes/vol-<i>/{size_gb,iops,zone,class,attached_to}`,
//! which sorts after it. Rules read `svc/` and `db/` only, so a rule that
//! scans more than its literal prefix shows up as a cost that grows with the
//! bulk; and because part of the bulk sorts after the paths the plan writes,
//! so does any ordered scan that runs past the end of its prefix (a world
//! whose bulk all sorts first would hide that).
//!
//! Cases (the verdict is in the name, and asserted before timing):
//! - `admit`: pools and replicas on three services, all within policy, so
//!   every state is evaluated by every rule (the expensive path).
//! - `reject-at-step-3`: scales a service up before shrinking its pool; the
//!   state after step 3 breaks the connection budget, so the coupling rule
//!   fails there and the plan is rejected even though it ends within budget.
//!
//! Group `preview/5-step/20-rules-sum-product` is the same 20 rules with the
//! connection budget written as the shipped policy writes it (the
//! `sum_product` helper, not a comprehension); `20-rules-native-budget` has
//! it as a native rule. The cases of both also run `indexed`: with the
//! indexes the coordinator keeps beside its world (built before timing, as
//! the coordinator has them when a plan arrives): the budget index, so the
//! budget reads the terms of the services a plan touches instead of visiting
//! all 40; the path index, so point lookups into the world hash the path
//! instead of descending the ordered map; and the CEL index, so a CEL rule's
//! `reads` come from it instead of a visit of every path under their
//! prefixes. Without the suffix they are what `concord check` does.
//!
//! Group `preview/5-step/9-builtin-rules` runs the admitted plan under the
//! built-ins alone at 100k paths; its difference from the 20-rule figure is
//! roughly what ceilings, rates, protected prefixes and CEL cost.
//!
//! Run: `cargo bench -p concord-core --bench preview`.

use std::hint::black_box;
use std::time::Duration;

use concord_core::indexes::WorldIndexes;
use concord_core::preview::{PreviewInput, preview, preview_on};
use concord_core::world::Base;
use concord_proto::Verdict;
use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};

#[path = "workload/preview.rs"]
mod workload;
use workload::*;

/// The binaries' allocator (see `concord-cli`'s main).
#[global_allocator]
static GLOBAL: concord_alloc::Alloc = concord_alloc::Alloc;

/// Modest timing so the whole run fits in a few minutes on a shared 2-core
/// machine. Flat sampling: while a world-size dependence is present, one
/// preview at 1M paths can take tens of milliseconds, and linear sampling
/// would then need minutes per case.
fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(50)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
}

fn bench_preview(c: &mut Criterion) {
    let policy_20 = policy(POLICY_20, 20);
    let policy_builtin = policy(POLICY_BUILTIN, 9);
    let policy_native = policy(&policy_20_native(), 20);
    let admit = intent(PLAN_ADMIT);
    let reject = intent(PLAN_REJECT);
    let cases = [
        Case {
            name: "admit",
            intent: &admit,
            verdict: Verdict::Admit,
            because: None,
        },
        Case {
            name: "reject-at-step-3",
            intent: &reject,
            verdict: Verdict::Reject,
            because: Some(("coupling.db_connections", "after step s3")),
        },
    ];

    let policy_helper = policy(&policy_20_sum_product(), 20);
    // The same cases under each way of writing the 20 rules.
    let groups = [
        ("preview/5-step/20-rules", &policy_20, false),
        ("preview/5-step/20-rules-sum-product", &policy_helper, true),
        ("preview/5-step/20-rules-native-budget", &policy_native, true),
    ];
    for (name, policy, indexed) in groups {
        let mut group = c.benchmark_group(name);
        configure(&mut group);
        for (size, label) in SIZES {
            // Built once per size and dropped before the next: 1M paths take
            // a few seconds and a few hundred MB.
            let world = world(size);
            for case in &cases {
                check(&world, case.intent, policy, case.verdict, case.because);
                let input = PreviewInput {
                    world: &world,
                    intent: case.intent,
                    agent: "resource",
                    policy,
                    previous: None,
                };
                group.bench_function(BenchmarkId::new(case.name, label), |b| {
                    b.iter(|| preview(black_box(input)))
                });
                if indexed {
                    let indexes = WorldIndexes::build(policy, &world);
                    let base = Base::current(&world).with_indexes(&indexes);
                    assert_eq!(preview_on(input, base), preview(input), "an index changes no report");
                    group.bench_function(BenchmarkId::new(format!("{}-indexed", case.name), label), |b| {
                        b.iter(|| preview_on(black_box(input), base))
                    });
                }
            }
        }
        group.finish();
    }

    let mut group = c.benchmark_group("preview/5-step/9-builtin-rules");
    configure(&mut group);
    let (size, label) = BUILTIN_SIZE;
    let world = world(size);
    check(&world, &admit, &policy_builtin, Verdict::Admit, None);
    group.bench_with_input(BenchmarkId::new("admit", label), &world, |b, world| {
        b.iter(|| {
            preview(black_box(PreviewInput {
                world,
                intent: &admit,
                agent: "resource",
                policy: &policy_builtin,
                previous: None,
            }))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_preview);
criterion_main!(benches);
