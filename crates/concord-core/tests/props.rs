//! Properties of previews over generated worlds and plans.

mod common;

use std::collections::BTreeMap;

use common::*;
use concord_core::plandiff::plan_diff;
use concord_core::world::World;
use concord_proto::preview::RuleStatus;
use concord_proto::{ResourcePath, Value, Verdict};
use proptest::prelude::*;
use serde_json::{Value as Json, json};

const POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[[rules.ceiling]]
id = "ceiling.pool"
paths = ["svc/*/pool_size"]
approve_above = 300
reject_above = 900
[[rules.rate]]
id = "rate.pool"
paths = ["svc/*/pool_size"]
max_factor = 3.0
outcome = "needs_approval"
[[rules.cel]]
id = "budget"
reads = ["svc/*/pool_size", "svc/*/replicas", "db/max"]
expr = "sum(keys(after.svc).map(s, after.svc[s].pool_size * after.svc[s].replicas)) <= after.db.max"
outcome = "reject"
"#;

#[derive(Clone, Debug)]
enum S {
    Pool(usize, i64),
    Scale(usize, u32),
    New(usize, i64),
    DeleteNew(usize),
}

fn world_strategy() -> impl Strategy<Value = World> {
    (prop::collection::vec((1i64..100, 1i64..10), 1..5), 100i64..5000).prop_map(|(svcs, max)| {
        let mut t = String::from("[resources]\n");
        for (i, (pool, reps)) in svcs.iter().enumerate() {
            t.push_str(&format!(
                "\"svc/s{i}/pool_size\" = {pool}\n\"svc/s{i}/replicas\" = {reps}\n"
            ));
        }
        t.push_str(&format!("\"db/max\" = {max}\n\"x/k0\" = 1\n"));
        World::from_toml_str(&t).unwrap()
    })
}

fn step_strategy() -> impl Strategy<Value = S> {
    prop_oneof![
        (0usize..4, 1i64..1200).prop_map(|(s, v)| S::Pool(s, v)),
        (0usize..4, 0u32..20).prop_map(|(s, v)| S::Scale(s, v)),
        (0usize..6, -50i64..50).prop_map(|(k, v)| S::New(k, v)),
        (0usize..6).prop_map(S::DeleteNew),
    ]
}

fn to_json(i: usize, s: &S, nsvc: usize) -> Json {
    let id = format!("s{i}");
    match s {
        S::Pool(svc, v) => set(&id, &format!("svc/s{}/pool_size", svc % nsvc), json!(v)),
        S::Scale(svc, r) => scale(&id, &format!("svc/s{}", svc % nsvc), *r),
        S::New(k, v) => set(&id, &format!("x/k{k}"), json!(v)),
        S::DeleteNew(k) => json!({
            "id": id, "kind": "delete", "path": format!("x/k{k}"),
            "args": { "confirm": { "path": format!("x/k{k}"), "reason": "tidy" } },
            "confidence": 0.9, "compensation": { "mode": "irreversible", "reason": "gone" }
        }),
    }
}

fn nsvc(w: &World) -> usize {
    w.resources
        .keys()
        .filter(|p| p.as_str().ends_with("/pool_size"))
        .count()
}

/// The plain model of what a plan does: apply each step to a map.
fn model(w: &World, steps: &[S]) -> BTreeMap<ResourcePath, Value> {
    let n = nsvc(w);
    let mut m = w.resources.clone();
    let p = |s: &str| ResourcePath::parse(s).unwrap();
    for s in steps {
        match s {
            S::Pool(svc, v) => {
                m.insert(p(&format!("svc/s{}/pool_size", svc % n)), Value::Int(*v));
            }
            S::Scale(svc, r) => {
                m.insert(p(&format!("svc/s{}/replicas", svc % n)), Value::Int((*r).into()));
            }
            S::New(k, v) => {
                m.insert(p(&format!("x/k{k}")), Value::Int(*v));
            }
            S::DeleteNew(k) => {
                m.remove(&p(&format!("x/k{k}")));
            }
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn same_inputs_same_preview(w in world_strategy(), steps in prop::collection::vec(step_strategy(), 1..6)) {
        let n = nsvc(&w);
        let i = plan(Json::Array(steps.iter().enumerate().map(|(k, s)| to_json(k, s, n)).collect()));
        let p = policy(POLICY);
        let a = serde_json::to_vec(&run(&w, &p, "a", &i)).unwrap();
        let b = serde_json::to_vec(&run(&w, &policy(POLICY), "a", &i.clone())).unwrap();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn verdict_is_the_worst_failing_outcome(w in world_strategy(), steps in prop::collection::vec(step_strategy(), 1..6)) {
        let n = nsvc(&w);
        let i = plan(Json::Array(steps.iter().enumerate().map(|(k, s)| to_json(k, s, n)).collect()));
        let pv = run(&w, &policy(POLICY), "a", &i);
        let failing: Vec<_> = pv.invariants.iter()
            .filter(|r| matches!(r.status, RuleStatus::Fail | RuleStatus::Error)).collect();
        let worst = failing.iter().map(|r| r.outcome).max().unwrap_or(Verdict::Admit);
        prop_assert_eq!(pv.verdict, worst);
        if failing.iter().any(|r| r.outcome == Verdict::Reject) {
            prop_assert_eq!(pv.verdict, Verdict::Reject);
        }
        if !failing.is_empty() {
            prop_assert_ne!(pv.verdict, Verdict::Admit);
        }
    }

    #[test]
    fn diff_applied_to_before_gives_after(w in world_strategy(), steps in prop::collection::vec(step_strategy(), 1..6)) {
        let n = nsvc(&w);
        // Deleting a missing path does not apply; keep plans that apply.
        let mut m = w.resources.clone();
        let mut applicable = Vec::new();
        for s in &steps {
            if let S::DeleteNew(k) = s && !m.contains_key(&ResourcePath::parse(&format!("x/k{k}")).unwrap()) {
                continue;
            }
            m = model(&World { resources: m.clone(), services: Default::default() }, std::slice::from_ref(s));
            applicable.push(s.clone());
        }
        prop_assume!(!applicable.is_empty());
        let i = plan(Json::Array(applicable.iter().enumerate().map(|(k, s)| to_json(k, s, n)).collect()));
        let pv = run(&w, &policy(POLICY), "a", &i);
        prop_assert_eq!(pv.invariants.iter().find(|r| r.id == "plan.applies").unwrap().status, RuleStatus::Pass);
        let mut after = w.resources.clone();
        for c in &pv.diff {
            prop_assert_eq!(w.resources.get(&c.path), c.before.as_ref());
            match &c.after {
                Some(v) => { after.insert(c.path.clone(), v.clone()); }
                None => { after.remove(&c.path); }
            }
        }
        prop_assert_eq!(after, model(&w, &applicable));
    }

    #[test]
    fn a_plan_diffed_with_itself_is_empty(w in world_strategy(), steps in prop::collection::vec(step_strategy(), 1..6)) {
        let n = nsvc(&w);
        let i = plan(Json::Array(steps.iter().enumerate().map(|(k, s)| to_json(k, s, n)).collect()));
        let d = plan_diff(&i, &i);
        prop_assert!(d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty());
        prop_assert!(d.scope_expansion.is_empty());
    }

    #[test]
    fn a_step_on_a_new_path_or_kind_is_scope_expansion(
        steps in prop::collection::vec(step_strategy(), 1..5),
        extra in prop_oneof![Just("new_path"), Just("new_kind")],
    ) {
        let v1 = plan_v("l", 1, Json::Array(steps.iter().enumerate().map(|(k, s)| to_json(k, s, 4)).collect()));
        let mut v2_steps: Vec<Json> = steps.iter().enumerate().map(|(k, s)| to_json(k, s, 4)).collect();
        let added = match extra {
            // A path no v1 step covers.
            "new_path" => set("extra", "fresh/area/value", json!(1)),
            // A kind v1 never uses (v1 uses set, scale and delete).
            _ => json!({ "id": "extra", "kind": "restart", "path": "svc/s0", "confidence": 0.9,
                         "compensation": { "mode": "irreversible", "reason": "restart" } }),
        };
        v2_steps.push(added);
        let v2 = plan_v("l", 2, Json::Array(v2_steps));
        let d = plan_diff(&v1, &v2);
        prop_assert!(d.scope_expansion.iter().any(|e| e.kind == extra && e.step.as_str() == "extra"),
            "{:?}", d.scope_expansion);
        prop_assert_eq!(d.added.iter().map(|i| i.as_str()).collect::<Vec<_>>(), vec!["extra"]);
    }
}
