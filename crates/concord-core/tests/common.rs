//! Shared helpers for the core's tests.
#![allow(dead_code)]

use concord_core::policy::Policy;
use concord_core::preview::{PreviewInput, preview};
use concord_core::world::World;
use concord_proto::preview::{Preview, RuleResult, RuleStatus};
use concord_proto::{Intent, decode_intent};
use serde_json::{Value as Json, json};

pub fn world(toml: &str) -> World {
    World::from_toml_str(toml).expect("test world parses")
}

pub fn policy(toml: &str) -> Policy {
    Policy::from_toml_str(toml).expect("test policy compiles")
}

/// An intent with these steps (JSON), as version 1 of lineage `t`.
pub fn plan(steps: Json) -> Intent {
    plan_v("t", 1, steps)
}

pub fn plan_v(lineage: &str, version: u32, steps: Json) -> Intent {
    let j = json!({ "protocol": 1, "lineage": lineage, "version": version, "goal": "test", "steps": steps });
    decode_intent(&serde_json::to_vec(&j).unwrap()).expect("test plan decodes")
}

pub fn set(id: &str, path: &str, value: Json) -> Json {
    json!({ "id": id, "kind": "set", "path": path, "args": { "value": value }, "confidence": 0.9,
            "compensation": { "mode": "restore" } })
}

pub fn scale(id: &str, path: &str, replicas: u32) -> Json {
    json!({ "id": id, "kind": "scale", "path": path, "args": { "replicas": replicas }, "confidence": 0.9,
            "compensation": { "mode": "restore" } })
}

pub fn run(world: &World, policy: &Policy, agent: &str, intent: &Intent) -> Preview {
    preview(PreviewInput {
        world,
        intent,
        agent,
        policy,
        previous: None,
    })
}

pub fn rule<'a>(p: &'a Preview, id: &str) -> &'a RuleResult {
    p.invariants
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no rule {id} in {:#?}", p.invariants))
}

pub fn status(p: &Preview, id: &str) -> RuleStatus {
    rule(p, id).status
}

pub fn reasons(p: &Preview) -> Vec<&str> {
    p.reasons.iter().map(|r| r.rule.as_str()).collect()
}
