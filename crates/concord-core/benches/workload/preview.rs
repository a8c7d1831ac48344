//! The preview benchmark's workload, shared by `benches/preview.rs` and
//! the callgrind driver `examples/prof_preview.rs` so both measure the same
//! worlds, policies and plans. Each includes it with `#[path]`.

#![allow(dead_code)]

use std::collections::BTreeMap;

use concord_core::policy::Policy;
use concord_core::preview::{PreviewInput, preview};
use concord_core::world::{Service, World};
use concord_proto::{Intent, ResourcePath, Value, Verdict, decode_intent};

/// Services in every world: enough that CEL rules over `svc/*` iterate a
/// realistic map, few enough that they stay a fixed part of the world.
pub const SERVICES: usize = 40;

/// World sizes, in paths, with their labels.
pub const SIZES: [(usize, &str); 3] = [(1_000, "1k"), (100_000, "100k"), (1_000_000, "1M")];

/// The size the built-ins-only group runs at (the requirement's target).
pub const BUILTIN_SIZE: (usize, &str) = (100_000, "100k");

/// Largest world set-up passes through `World::validate` (see `world`).
pub const VALIDATE_PATHS_MAX: usize = 1_000;

/// Leaves under each fleet node (the half of the bulk that sorts before `svc/`).
pub const NODE_FIELDS: [&str; 5] = ["cpu", "mem", "disk", "zone", "kernel"];

/// Leaves under each volume (the half of the bulk that sorts after `svc/`).
pub const VOLUME_FIELDS: [&str; 5] = ["size_gb", "iops", "zone", "class", "attached_to"];

/// The 20-rule policy: 9 built-ins + `deploy.artifacts` + 3 protected
/// prefixes + 2 ceilings + 2 rates + 3 CEL rules (the connection budget from
/// `config/policy.toml`, a replica floor, and a rule that reads the plan).
pub const POLICY_20: &str = r#"
[defaults]
autonomy = "propose"

[agents.resource]
autonomy = "bounded"
allow = [
  { kinds = ["set"], paths = ["svc/*/pool_size"] },
  { kinds = ["scale"], paths = ["svc/*"] },
]

[rules.artifacts]
allow = ["registry/*:v[0-9]*.[0-9]*.[0-9]*"]
outcome = "reject"

[[rules.protected]]
id = "protected.auth"
paths = ["auth/**"]
outcome = "reject"

[[rules.protected]]
id = "protected.prod_config"
paths = ["config/prod/**"]
outcome = "needs_approval"

[[rules.protected]]
id = "protected.db_schema"
paths = ["db/*/schema/**"]
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

[[rules.rate]]
id = "rate.pool_size"
paths = ["svc/*/pool_size"]
max_factor = 2.0
outcome = "needs_approval"

[[rules.rate]]
id = "rate.replicas"
paths = ["svc/*/replicas"]
max_factor = 10.0
outcome = "needs_approval"

[[rules.cel]]
id = "coupling.db_connections"
description = "pool connections (pool_size x replicas over services) stay under 80% of db/primary max_connections"
reads = ["svc/*/pool_size", "svc/*/replicas", "db/primary/max_connections"]
expr = """
sum(keys(after.svc)
      .filter(s, 'pool_size' in after.svc[s] && 'replicas' in after.svc[s])
      .map(s, after.svc[s].pool_size * after.svc[s].replicas)) * 10
  <= after.db.primary.max_connections * 8
"""
outcome = "reject"

[rules.cel.figures]
connections = "sum(keys(after.svc).filter(s, 'pool_size' in after.svc[s] && 'replicas' in after.svc[s]).map(s, after.svc[s].pool_size * after.svc[s].replicas))"
budget = "double(after.db.primary.max_connections) * 0.8"

[[rules.cel]]
id = "replicas.floor"
description = "every service keeps at least 2 replicas"
reads = ["svc/*/replicas"]
expr = "keys(after.svc).all(s, after.svc[s].replicas >= 2)"
outcome = "needs_approval"

[[rules.cel]]
id = "confidence.destructive"
description = "destructive steps (delete, exec, grant, network) need agent confidence of at least 0.9"
reads = []
expr = "plan.steps.all(s, !(s.kind in ['delete', 'exec', 'grant', 'network']) || s.confidence >= 0.9)"
outcome = "needs_approval"
"#;

/// The same 20 rules, with the connection budget written as the shipped
/// `config/policy.toml` writes it: the `sum_product` helper instead of a
/// comprehension (its figure too). Three CEL rules, as in `POLICY_20`.
pub fn policy_20_sum_product() -> String {
    let comprehension = "sum(keys(after.svc)\n      .filter(s, 'pool_size' in after.svc[s] && 'replicas' in after.svc[s])\n      .map(s, after.svc[s].pool_size * after.svc[s].replicas)) * 10";
    let figure = "sum(keys(after.svc).filter(s, 'pool_size' in after.svc[s] && 'replicas' in after.svc[s]).map(s, after.svc[s].pool_size * after.svc[s].replicas))";
    let helper = "sum_product(after.svc, ['pool_size', 'replicas'])";
    assert!(POLICY_20.contains(comprehension) && POLICY_20.contains(figure));
    POLICY_20
        .replace(comprehension, &format!("{helper} * 10"))
        .replace(figure, helper)
}

/// The same 20 rules, with the connection budget as a native `budget` rule
/// (the differential test shows it agrees with the CEL one) and the replica
/// floor replaced by a native ceiling on cpu limits; one CEL rule remains,
/// the one that reads the plan.
pub fn policy_20_native() -> String {
    let cel_start = POLICY_20
        .find("[[rules.cel]]\nid = \"coupling.db_connections\"")
        .unwrap();
    let plan_rule = POLICY_20
        .find("[[rules.cel]]\nid = \"confidence.destructive\"")
        .unwrap();
    format!(
        "{}{}{}",
        &POLICY_20[..cel_start],
        r#"[[rules.budget]]
id = "coupling.db_connections"
terms = ["svc/*/pool_size", "svc/*/replicas"]
limit = "db/primary/max_connections"
max_fraction = 0.8
outcome = "reject"

[[rules.ceiling]]
id = "ceiling.cpu_limit"
paths = ["svc/*/cpu_limit"]
approve_above = 8
reject_above = 32

"#,
        &POLICY_20[plan_rule..]
    )
}

/// The built-ins alone: the same agents, no artifacts, protected prefixes,
/// ceilings, rates or CEL.
pub const POLICY_BUILTIN: &str = r#"
[defaults]
autonomy = "propose"

[agents.resource]
autonomy = "bounded"
allow = [
  { kinds = ["set"], paths = ["svc/*/pool_size"] },
  { kinds = ["scale"], paths = ["svc/*"] },
]
"#;

/// Within policy: the connections go from 800 to 910 of a 1000 budget, no
/// pool more than doubles, no ceiling is approached.
pub const PLAN_ADMIT: &str = r#"{
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

/// Scales svc-01 to 17 replicas before shrinking its pool: after step 3 the
/// connections are 800 + 60 (svc-00) + 150 (svc-01) = 1010 > 1000. It ends
/// at 800 + 60 + 65 + 10 = 935, within budget, yet it is rejected.
pub const PLAN_REJECT: &str = r#"{
  "protocol": 1, "lineage": "bench-reject", "version": 1,
  "goal": "spread svc-01 over more replicas with smaller pools",
  "assumptions": [{ "path": "db/primary/max_connections", "op": "eq", "value": 1250 }],
  "steps": [
    { "id": "s1", "kind": "set", "path": "svc/svc-00/pool_size", "args": { "value": 20 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s2", "kind": "scale", "path": "svc/svc-00", "args": { "replicas": 4 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s3", "kind": "scale", "path": "svc/svc-01", "args": { "replicas": 17 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s4", "kind": "set", "path": "svc/svc-01/pool_size", "args": { "value": 5 },
      "confidence": 0.9, "compensation": { "mode": "restore" } },
    { "id": "s5", "kind": "set", "path": "svc/svc-02/pool_size", "args": { "value": 15 },
      "confidence": 0.9, "compensation": { "mode": "restore" } }
  ]
}"#;

pub fn path(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap_or_else(|(_, e)| panic!("bench path `{s}`: {e}"))
}

/// A world of exactly `total` paths, built deterministically: the services,
/// database and protected paths, then the bulk, half fleet nodes and half
/// volumes, until the count is reached.
pub fn world(total: usize) -> World {
    let mut resources: Vec<(ResourcePath, Value)> = Vec::with_capacity(total);
    let mut services = BTreeMap::new();
    for i in 0..SERVICES {
        let name = format!("svc-{i:02}");
        let p = |leaf: &str| path(&format!("svc/{name}/{leaf}"));
        // 40 services x 10 x 2 = 800 connections, of a 1000 budget.
        resources.push((p("pool_size"), Value::Int(10)));
        resources.push((p("replicas"), Value::Int(2)));
        resources.push((p("version"), Value::Str(format!("v1.{i}.0"))));
        resources.push((p("artifact"), Value::Str(format!("registry/{name}:v1.{i}.0"))));
        resources.push((p("cpu_limit"), Value::Float(2.0)));
        resources.push((p("mem_limit"), Value::Str("4Gi".into())));
        services.insert(
            name.clone(),
            Service {
                path: path(&format!("svc/{name}")),
                depends_on: vec![path("db/primary")],
            },
        );
    }
    resources.push((path("db/primary/max_connections"), Value::Int(1250)));
    resources.push((
        path("db/primary/grants"),
        Value::List(vec![
            Value::Str("svc-00:reader".into()),
            Value::Str("svc-00:writer".into()),
        ]),
    ));
    resources.push((path("db/primary/schema/version"), Value::Int(42)));
    resources.push((
        path("auth/oidc/issuer"),
        Value::Str("https://id.example.internal".into()),
    ));
    resources.push((path("config/prod/feature_flags/new_checkout"), Value::Bool(false)));
    resources.push((
        path("iam/roles/oncall"),
        Value::List(vec![Value::Str("alice".into()), Value::Str("bob".into())]),
    ));
    assert!(
        total >= resources.len(),
        "world of {total} paths is smaller than its fixed part"
    );
    let bulk = total - resources.len();
    let fleet = bulk / 2;
    for i in 0..fleet {
        let (node, field) = (i / NODE_FIELDS.len(), NODE_FIELDS[i % NODE_FIELDS.len()]);
        let value = match field {
            "zone" => Value::Str(format!("zone-{}", node % 3)),
            "kernel" => Value::Str("6.8.0".into()),
            _ => Value::Int(i64::try_from(node % 64).unwrap_or(0)),
        };
        resources.push((path(&format!("fleet/node-{node:07}/{field}")), value));
    }
    for i in 0..bulk - fleet {
        let (vol, field) = (i / VOLUME_FIELDS.len(), VOLUME_FIELDS[i % VOLUME_FIELDS.len()]);
        let value = match field {
            "zone" => Value::Str(format!("zone-{}", vol % 3)),
            "class" => Value::Str("ssd".into()),
            "attached_to" => Value::Str(format!("fleet/node-{:07}", vol % fleet.max(1))),
            _ => Value::Int(i64::try_from(100 + vol % 900).unwrap_or(0)),
        };
        resources.push((path(&format!("volumes/vol-{vol:07}/{field}")), value));
    }
    let world = World {
        resources: resources.into_iter().collect(),
        services,
    };
    assert_eq!(world.resources.len(), total, "world paths are unique");
    // `World::validate` is quadratic on this shape (each leaf's descendant
    // check scans to the end of the map), so only the smallest world goes
    // through it; the larger ones are the same shape with more bulk.
    if total <= VALIDATE_PATHS_MAX {
        world.validate().expect("bench world is valid");
    }
    world
}

pub fn policy(toml: &str, rules: usize) -> Policy {
    let p = Policy::from_toml_str(toml).expect("bench policy compiles");
    assert_eq!(p.rule_count(), rules, "bench policy rule count");
    p
}

pub fn intent(json: &str) -> Intent {
    let i = decode_intent(json.as_bytes()).expect("bench plan decodes");
    assert_eq!(i.steps.len(), 5, "bench plans have 5 steps");
    i
}

/// One timed plan: its bench name (which states the verdict), the verdict
/// asserted before timing, and for a rejection the rule and state that cause it.
pub struct Case<'a> {
    pub name: &'static str,
    pub intent: &'a Intent,
    pub verdict: Verdict,
    pub because: Option<(&'static str, &'static str)>,
}

/// Runs one preview outside the timed loop and checks the verdict and, for
/// a rejection, the rule and state that cause it.
pub fn check(world: &World, intent: &Intent, policy: &Policy, want: Verdict, because: Option<(&str, &str)>) {
    let p = preview(PreviewInput {
        world,
        intent,
        agent: "resource",
        policy,
        previous: None,
    });
    assert_eq!(p.verdict, want, "bench verdict; reasons: {:?}", p.reasons);
    if let Some((rule, at)) = because {
        assert_eq!(p.reasons[0].rule, rule, "bench rejection rule");
        let r = p.invariants.iter().find(|r| r.id == rule).expect("rule result");
        assert_eq!(r.at.as_deref(), Some(at), "bench rejection state");
    }
}
