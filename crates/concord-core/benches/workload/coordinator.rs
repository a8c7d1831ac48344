//! The coordinator benchmark's workload, shared by `benches/coordinator.rs`
//! and the callgrind driver `examples/prof_coord.rs` so both measure the same
//! world, policy and plans. Each includes it with `#[path]`.

#![allow(dead_code)]

use std::sync::atomic::Ordering;

use concord_core::coordinator::{Config, Coordinator, Effect, Input, Reply};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{StepOutcome, StepResult};
use concord_proto::{Intent, Value, Verdict, decode_intent};
use serde_json::json;

#[path = "counting.rs"]
mod counting;
pub use counting::LIVE;

pub const SERVICES: usize = 40;
pub const DAY_MS: u64 = 86_400_000 * 2;

pub fn world(paths: usize) -> World {
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

pub fn plan(lineage: &str, steps: serde_json::Value) -> Intent {
    let j = json!({ "protocol": 1, "lineage": lineage, "version": 1, "goal": "bench", "steps": steps });
    decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap()
}

pub fn node_plan(i: usize) -> Intent {
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

/// A 5-step plan on three services. `bump` moves its values, so that each
/// iteration's plan changes the world it is decided against (the held plan
/// uses 0, the measured ones 1 to 7 and never the same twice running): a plan
/// equal to the world would change nothing and be judged in one state.
pub fn service_plan(lineage: &str, bump: i64) -> Intent {
    service_plan_named(lineage, bump, "")
}

/// [`service_plan`] with `suffix` after each step id.
pub fn service_plan_named(lineage: &str, bump: i64, suffix: &str) -> Intent {
    let set = |id: &str, path: &str, v: i64| {
        let id = format!("{id}{suffix}");
        json!({ "id": id, "kind": "set", "path": path, "args": { "value": v }, "confidence": 0.9,
                "compensation": { "mode": "restore" } })
    };
    let scale = |id: &str, path: &str, r: u32| {
        let id = format!("{id}{suffix}");
        json!({ "id": id, "kind": "scale", "path": path, "args": { "replicas": r }, "confidence": 0.9,
                "compensation": { "mode": "restore" } })
    };
    plan(
        lineage,
        json!([
            set("s1", "svc/svc-00/pool_size", 12 + bump),
            scale("s2", "svc/svc-00", 3 + (bump % 2) as u32),
            set("s3", "svc/svc-01/pool_size", 12 + bump),
            scale("s4", "svc/svc-01", 3 + (bump % 2) as u32),
            set("s5", "svc/svc-02/pool_size", 11 + bump),
        ]),
    )
}

/// The shipped `config/policy.toml`, defaults made `bounded`: the fleet
/// agent acts alone in this bench.
fn shipped_policy_text() -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/policy.toml")).unwrap();
    text.replace(
        "[defaults]\nautonomy = \"propose\"",
        "[defaults]\nautonomy = \"bounded\"",
    )
}

/// The shipped policy (its connection budget a CEL rule over every service).
pub fn policy() -> Policy {
    Policy::from_toml_str(&shipped_policy_text()).unwrap()
}

/// The shipped policy with its CEL connection budget written as the native
/// `[[rules.budget]]` (same rule id, same limit; a property test in
/// `tests/budget.rs` shows the two agree): the same rule count.
pub fn policy_native_budget() -> Policy {
    let text = shipped_policy_text();
    let from = text.find("[[rules.cel]]\nid = \"coupling.db_connections\"").unwrap();
    let to = text.find("[[rules.cel]]\nid = \"confidence.destructive\"").unwrap();
    let text = format!(
        "{}{}{}",
        &text[..from],
        r#"[[rules.budget]]
id = "coupling.db_connections"
terms = ["svc/*/pool_size", "svc/*/replicas"]
limit = "db/primary/max_connections"
max_fraction = 0.8
outcome = "reject"

"#,
        &text[to..]
    );
    let p = Policy::from_toml_str(&text).unwrap();
    assert_eq!(p.rule_count(), policy().rule_count());
    p
}

pub fn verdict(fx: &[Effect]) -> Verdict {
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

/// A coordinator on `w` with `inflight` background plans admitted and
/// running (5 steps each on its own fleet node, from 100 agents); prints the
/// memory each takes.
pub fn with_inflight(w: World, inflight: usize, policy: Policy) -> Coordinator {
    let mut coord = Coordinator::new(Config::default(), policy, w);
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
        // The target, held wherever this runs at the bench's sizes (`cargo
        // test` runs the bench once, at 1k in flight): bytes counted, not
        // timed, so the same on every machine and build. Fewer plans share
        // the fixed costs among fewer.
        assert!(
            inflight < 1_000 || per <= 8 * 1024,
            "memory per in-flight plan: {per} bytes, over the 8 KiB target"
        );
    }
    coord
}

fn propose(coord: &mut Coordinator, now: u64, n: u64, intent: Intent) -> Vec<Effect> {
    coord.handle(
        now,
        Input::Intent {
            request: n,
            agent: "resource".into(),
            intent,
        },
    )
}

/// 1 to 7, different for consecutive iterations.
fn bump(n: u64) -> i64 {
    (n % 7) as i64 + 1
}

/// The intent `admit_and_run` proposes in iteration `n`, decoded from its
/// JSON as the runtime would (outside the measured part: decoding belongs
/// to the bus, not to `Coordinator::handle`).
pub fn admit_intent(n: u64) -> Intent {
    service_plan(&format!("admit-{n}"), bump(n))
}

/// The intent of `admit-new-shape` in iteration `n`: [`admit_intent`] with
/// step ids of its own, so no CEL rule's result is remembered for it (the
/// shipped confidence rule's figure reads step ids).
pub fn admit_intent_new_shape(n: u64) -> Intent {
    service_plan_named(&format!("admit-{n}"), bump(n), &format!("-{n}"))
}

/// The intent `decide_conflict` proposes in iteration `n`.
pub fn conflict_intent(n: u64) -> Intent {
    service_plan(&format!("conflict-{n}"), bump(n))
}

/// `admit-and-run`: a 5-step service plan is admitted, then every dispatch
/// succeeds (one decision plus 5 outcomes), freeing its paths.
pub fn admit_and_run(coord: &mut Coordinator, now: u64, n: u64, intent: Intent) {
    let fx = admit(coord, now, n, intent);
    run_to_end(coord, now, fx);
}

/// `admit`: the decision alone of `admit-and-run` (the plan is admitted and
/// its first step dispatched); returns its effects for [`run_to_end`].
pub fn admit(coord: &mut Coordinator, now: u64, n: u64, intent: Intent) -> Vec<Effect> {
    let fx = propose(coord, now, n, intent);
    assert_eq!(verdict(&fx), Verdict::Admit);
    fx
}

/// Reports every dispatch in `fx`, and each next one, as succeeded, until
/// the saga has ended and its paths are free.
pub fn run_to_end(coord: &mut Coordinator, now: u64, mut fx: Vec<Effect>) {
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

/// Admits the service plan that `decide_conflict` then conflicts with.
pub fn hold_services(coord: &mut Coordinator, now: u64) {
    assert_eq!(
        verdict(&propose(coord, now, 0, service_plan("held", 0))),
        Verdict::Admit
    );
}

/// `decide-conflict`: a new lineage on the held plan's paths, decided in
/// full and rejected for the conflict.
pub fn decide_conflict(coord: &mut Coordinator, now: u64, n: u64, intent: Intent) -> Vec<Effect> {
    let fx = propose(coord, now, n, intent);
    assert_eq!(verdict(&fx), Verdict::Reject);
    fx
}
