//! The native budget rule against the equivalent CEL rules (a comprehension,
//! and the `sum_product` helper): same status, same failing state, same
//! total, on generated worlds and plans.

mod common;

use common::*;
use concord_core::budget::BudgetIndex;
use concord_core::preview::{PreviewInput, preview_on};
use concord_core::world::{Base, Overlay, World};
use concord_proto::preview::RuleStatus;
use concord_proto::{ResourcePath, Value, Verdict};
use proptest::prelude::*;
use serde_json::{Value as Json, json};

const POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[[rules.budget]]
id = "native"
terms = ["app/*/workers", "app/*/threads"]
limit = "db/main/max_connections"
max_fraction = 0.75
outcome = "reject"
[[rules.cel]]
id = "cel"
reads = ["app/*/workers", "app/*/threads", "db/main/max_connections"]
expr = """
double(sum(keys(after.app)
  .filter(a, 'workers' in after.app[a] && 'threads' in after.app[a])
  .map(a, after.app[a].workers * after.app[a].threads)))
  <= double(after.db.main.max_connections) * 0.75
"""
outcome = "reject"
[rules.cel.figures]
total = "sum(keys(after.app).filter(a, 'workers' in after.app[a] && 'threads' in after.app[a]).map(a, after.app[a].workers * after.app[a].threads))"
[[rules.cel]]
id = "cel_helper"
reads = ["app/*/workers", "app/*/threads", "db/main/max_connections"]
expr = "double(sum_product(after.app, ['workers', 'threads'])) <= double(after.db.main.max_connections) * 0.75"
outcome = "reject"
[rules.cel.figures]
total = "sum_product(after.app, ['workers', 'threads'])"
"#;

fn world_of(apps: &[(i64, Option<i64>)], max: i64) -> concord_core::world::World {
    let mut t = String::from("[resources]\n");
    for (i, (w, th)) in apps.iter().enumerate() {
        t.push_str(&format!("\"app/a{i}/workers\" = {w}\n"));
        if let Some(th) = th {
            t.push_str(&format!("\"app/a{i}/threads\" = {th}\n"));
        }
        t.push_str(&format!("\"app/a{i}/version\" = \"v{i}\"\n"));
    }
    t.push_str(&format!("\"db/main/max_connections\" = {max}\n"));
    world(&t)
}

/// A plan of `set` steps, each (app, threads or workers, value), on apps
/// `a0` to `a{apps - 1}` (the app index taken modulo `apps`).
fn app_plan(steps: &[(usize, bool, i64)], apps: usize) -> concord_proto::Intent {
    app_plan_with_limit(steps, apps, None)
}

/// [`app_plan`], with a step setting the limit (`db/main/max_connections`)
/// to `limit.1` inserted before step `limit.0` (or last).
fn app_plan_with_limit(
    steps: &[(usize, bool, i64)],
    apps: usize,
    limit: Option<(usize, i64)>,
) -> concord_proto::Intent {
    let mut steps: Vec<Json> = steps
        .iter()
        .enumerate()
        .map(|(i, (app, threads, v))| {
            let field = if *threads { "threads" } else { "workers" };
            set(&format!("s{i}"), &format!("app/a{}/{field}", app % apps), json!(v))
        })
        .collect();
    if let Some((at, max)) = limit {
        let at = at.min(steps.len());
        steps.insert(at, set("limit", "db/main/max_connections", json!(max)));
    }
    plan(Json::Array(steps))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn agrees_with_the_cel_rule(
        apps in prop::collection::vec((1i64..20, prop::option::weighted(0.8, 1i64..10)), 1..6),
        max in 50i64..600,
        steps in prop::collection::vec((0usize..6, any::<bool>(), 0i64..25), 1..5),
        limit in prop::option::weighted(0.3, (0usize..5, 20i64..600)),
    ) {
        let w = world_of(&apps, max);
        let p = policy(POLICY);
        let pv = run(&w, &p, "x", &app_plan_with_limit(&steps, apps.len(), limit));
        let native = rule(&pv, "native");
        // The comprehension, and the same with the `sum_product` helper.
        for cel in [rule(&pv, "cel"), rule(&pv, "cel_helper")] {
            prop_assert_eq!(native.status, cel.status, "native {:#?}\ncel {:#?}", native, cel);
            prop_assert_eq!(&native.at, &cel.at);
            prop_assert_eq!(native.pre_existing, cel.pre_existing);
            if native.status != RuleStatus::Skipped {
                let total = native.figures["total"].as_f64().unwrap();
                prop_assert_eq!(Some(total), cel.figures["total"].as_f64());
                prop_assert_eq!(&cel.figures["total"], &rule(&pv, "cel").figures["total"]);
            }
        }
    }
}

/// A value for `app/a<i>/<field>` in the index tests: a number, text (not
/// a number: the term counts as missing) or removed.
fn change(app: usize, field: u8, v: Option<i64>) -> (ResourcePath, Option<Value>) {
    let name = ["workers", "threads", "version"][usize::from(field % 3)];
    let path = ResourcePath::parse(&format!("app/a{app}/{name}")).unwrap();
    let value = v.map(|v| {
        if v % 7 == 6 {
            Value::Str(format!("x{v}"))
        } else {
            Value::Int(v)
        }
    });
    (path, value)
}

fn put(w: &mut World, (path, value): (ResourcePath, Option<Value>)) {
    match value {
        Some(v) => w.resources.insert(path, v),
        None => w.resources.remove(&path),
    };
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The coordinator keeps a budget index as it changes the world: kept
    /// through any changes, it equals one built afresh, and a preview that
    /// reads it gives the same report as one that visits the world, on a
    /// projected world too; the overlay's corrections give what the
    /// projected world made real gives.
    #[test]
    fn a_kept_index_is_the_fresh_one_and_changes_no_report(
        apps in prop::collection::vec((1i64..20, prop::option::weighted(0.8, 1i64..10)), 1..6),
        max in 50i64..600,
        changes in prop::collection::vec((0usize..7, 0u8..3, prop::option::weighted(0.8, 0i64..30)), 0..12),
        overlay in prop::collection::vec((0usize..7, 0u8..3, prop::option::weighted(0.8, 0i64..30)), 0..6),
        steps in prop::collection::vec((0usize..7, any::<bool>(), 0i64..25), 1..5),
    ) {
        let mut w = world_of(&apps, max);
        let p = policy(POLICY);
        let mut ix = BudgetIndex::build(&p, &w);
        for (app, field, v) in changes {
            let (path, value) = change(app, field, v);
            ix.set(&p, &path, value.as_ref());
            put(&mut w, (path, value));
        }
        prop_assert_eq!(&ix, &BudgetIndex::build(&p, &w));
        let overlay: Overlay = overlay.into_iter().map(|(a, f, v)| change(a, f, v)).collect();
        let intent = app_plan(&steps, 7);
        let input = PreviewInput { world: &w, intent: &intent, agent: "x", policy: &p, previous: None };
        let visited = preview_on(input, Base::projected(&w, &overlay));
        let indexed = preview_on(input, Base::projected(&w, &overlay).with_index(&ix));
        prop_assert_eq!(&visited, &indexed);
        let mut real = w.clone();
        for (path, value) in &overlay {
            put(&mut real, (path.clone(), value.clone()));
        }
        let direct = run(&real, &p, "x", &intent);
        let (a, b) = (rule(&indexed, "native"), rule(&direct, "native"));
        prop_assert_eq!((a.status, &a.at, a.pre_existing), (b.status, &b.at, b.pre_existing));
        prop_assert_eq!(&a.figures, &b.figures);
    }
}

#[test]
fn the_shipped_coupling_budget_matches_the_story() {
    let w = world(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/examples/world.toml")).unwrap(),
    );
    let p = policy(
        r#"
[defaults]
autonomy = "bounded"
[[rules.budget]]
id = "budget.db_connections"
terms = ["svc/*/pool_size", "svc/*/replicas"]
limit = "db/primary/max_connections"
max_fraction = 0.8
outcome = "reject"
"#,
    );
    let pv = run(
        &w,
        &p,
        "resource",
        &plan(json!([set("s1", "svc/api/pool_size", json!(500))])),
    );
    assert_eq!(pv.verdict, Verdict::Reject);
    let r = rule(&pv, "budget.db_connections");
    assert_eq!(r.figures["total"], Value::Float(2080.0));
    assert_eq!(r.figures["budget"], Value::Float(800.0));
    assert_eq!(r.at.as_deref(), Some("after step s1"));
}

#[test]
fn budget_settings_are_checked() {
    let bad = |body: &str| {
        concord_core::policy::Policy::from_toml_str(&format!(
            "[[rules.budget]]\nid = \"b\"\nlimit = \"db/x\"\noutcome = \"reject\"\n{body}"
        ))
        .unwrap_err()
        .to_string()
    };
    assert!(bad("terms = []\nmax_fraction = 0.5").contains("at least one term"));
    assert!(bad("terms = [\"a/*/x\", \"a/y\"]\nmax_fraction = 0.5").contains("same number of `*`"));
    assert!(bad("terms = [\"a/**/x\"]\nmax_fraction = 0.5").contains("plain name or `*`"));
    assert!(bad("terms = [\"a/*/x\"]\nmax_fraction = 0").contains("max_fraction"));
}
