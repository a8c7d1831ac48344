//! Scenario files as executable specifications: each file under
//! `tests/scenarios/` is a world, a policy, and a list of timed inputs, each
//! with the verdicts and effects it must produce. Any difference fails.
//!
//! Format (TOML):
//! ```toml
//! description = "..."
//! policy = "config/policy.toml"   # a path from the workspace root, or an inline [policy_inline] table
//! [world]                          # the world, as in a world file
//! [[step]]
//! at_ms = 0
//! propose = { agent = "deploy", plan = { ...an intent... } }
//! # or: outcome = { key = "lineage/version/step/do/1", result = "succeeded" | "failed" | "stale_token" | "drift" }
//! # or: observe = { agent = "probe", path = "...", kind = "app_health", value = "ok" }
//! # or: control = { operator = "alice", ...a control message... }
//! # or: tick = true
//! expect = { verdict = "reject", reasons = [...], conflicts = [...], dispatch = [...], events = [...], alerts = 1, ok = true }
//! ```
//! Every `expect` key given is compared exactly; `dispatch` lists dispatch
//! keys in order, `events` event names in order, `reasons` the failing rule
//! ids in the order the reply gives them.

use std::path::{Path, PathBuf};

use concord_core::coordinator::{Config, Coordinator, Effect, Input, Reply};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{Control, DispatchKey, Phase, StepOutcome, StepResult};
use concord_proto::{Id, Observation, Short, decode_intent};
use serde_json::{Value as Json, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn key(text: &str) -> DispatchKey {
    let parts: Vec<&str> = text.split('/').collect();
    assert_eq!(
        parts.len(),
        5,
        "dispatch key `{text}` is lineage/version/step/phase/attempt"
    );
    DispatchKey {
        lineage: Id::parse(parts[0]).unwrap(),
        version: parts[1].parse().unwrap(),
        step: Id::parse(parts[2]).unwrap(),
        phase: if parts[3] == "do" { Phase::Do } else { Phase::Undo },
        attempt: parts[4].parse().unwrap(),
    }
}

fn to_json(v: &toml::Value) -> Json {
    serde_json::to_value(v).unwrap()
}

fn input(step: &toml::Table, request: u64) -> Input {
    if let Some(p) = step.get("propose") {
        let agent = p["agent"].as_str().unwrap().to_string();
        let mut plan = to_json(&p["plan"]);
        plan.as_object_mut().unwrap().entry("protocol").or_insert(json!(1));
        let intent = decode_intent(&serde_json::to_vec(&plan).unwrap()).unwrap_or_else(|e| panic!("plan: {e}"));
        return Input::Intent { request, agent, intent };
    }
    if let Some(o) = step.get("outcome") {
        let result = match o["result"].as_str().unwrap() {
            "succeeded" => StepResult::Succeeded,
            "failed" => StepResult::Failed {
                reason: Short::parse(o.get("reason").and_then(|r| r.as_str()).unwrap_or("failed")).unwrap(),
            },
            "stale_token" => StepResult::StaleToken {
                seen: o.get("seen").and_then(|s| s.as_integer()).unwrap_or(0) as u64,
            },
            "drift" => StepResult::Drift { actual: Vec::new() },
            other => panic!("unknown result {other}"),
        };
        return Input::Outcome {
            executor: "exec".into(),
            outcome: StepOutcome {
                key: key(o["key"].as_str().unwrap()),
                result,
            },
        };
    }
    if let Some(o) = step.get("observe") {
        let mut obs = to_json(o);
        let agent = obs["agent"].as_str().unwrap().to_string();
        obs.as_object_mut().unwrap().remove("agent");
        obs["protocol"] = json!(1);
        let observation: Observation = serde_json::from_value(obs).unwrap();
        return Input::Observe { agent, observation };
    }
    if let Some(c) = step.get("control") {
        let mut c = to_json(c);
        let operator = c["operator"].as_str().unwrap().to_string();
        c.as_object_mut().unwrap().remove("operator");
        let control: Control = serde_json::from_value(c).unwrap_or_else(|e| panic!("control: {e}"));
        return Input::Control {
            request,
            operator,
            control,
        };
    }
    assert!(
        step.get("tick").is_some(),
        "a step needs propose, outcome, observe, control or tick"
    );
    Input::Tick
}

fn event_name(e: &concord_core::coordinator::Event) -> String {
    serde_json::to_value(e).unwrap()["event"].as_str().unwrap().to_string()
}

fn run(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).unwrap();
    let doc: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let world = World::from_toml_str(&toml::to_string(&doc["world"]).unwrap()).map_err(|e| e.to_string())?;
    let policy = match (doc.get("policy"), doc.get("policy_inline")) {
        (Some(p), _) => Policy::from_toml_str(&std::fs::read_to_string(root().join(p.as_str().unwrap())).unwrap()),
        (_, Some(t)) => Policy::from_toml_str(&toml::to_string(t).unwrap()),
        _ => Policy::compile(Default::default()),
    }
    .map_err(|e| e.to_string())?;
    let mut c = Coordinator::new(Config::default(), policy, world);
    let steps = doc["step"].as_array().unwrap();
    let mut now = 0;
    for (i, step) in steps.iter().enumerate() {
        let step = step.as_table().unwrap();
        now = step
            .get("at_ms")
            .and_then(|t| t.as_integer())
            .map(|t| t as u64)
            .unwrap_or(now);
        let fx = c.handle(now, input(step, i as u64 + 1));
        let Some(expect) = step.get("expect").and_then(|e| e.as_table()) else {
            continue;
        };
        let at = format!("{} step {} (at_ms {now})", file.display(), i + 1);
        let decision = fx.iter().find_map(|e| match e {
            Effect::Reply {
                reply: Reply::Decision(d),
                ..
            } => Some(d),
            _ => None,
        });
        for (k, want) in expect {
            let got: Json = match k.as_str() {
                "verdict" => json!(decision.ok_or(format!("{at}: no decision"))?.verdict),
                "reasons" => json!(
                    decision
                        .ok_or(format!("{at}: no decision"))?
                        .reasons
                        .iter()
                        .map(|r| &r.rule)
                        .collect::<Vec<_>>()
                ),
                "conflicts" => json!(
                    decision
                        .ok_or(format!("{at}: no decision"))?
                        .conflicts
                        .iter()
                        .map(|c| &c.other)
                        .collect::<Vec<_>>()
                ),
                "dispatch" => json!(
                    fx.iter()
                        .filter_map(|e| match e {
                            Effect::Dispatch(d) => Some(d.key.text()),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                ),
                "events" => json!(
                    fx.iter()
                        .filter_map(|e| match e {
                            Effect::Event(ev) => Some(event_name(ev)),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                ),
                "alerts" => json!(fx.iter().filter(|e| matches!(e, Effect::Alert { .. })).count()),
                "ok" => json!(fx.iter().find_map(|e| match e {
                    Effect::Reply {
                        reply: Reply::Control { ok, .. },
                        ..
                    } => Some(*ok),
                    _ => None,
                })),
                other => return Err(format!("{at}: unknown expectation `{other}`")),
            };
            if got != to_json(want) {
                return Err(format!(
                    "{at}: `{k}` expected {} but got {got}\nall effects: {fx:#?}",
                    to_json(want)
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn every_scenario_file_holds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "expected at least 7 scenarios, found {}", files.len());
    let failures: Vec<String> = files.iter().filter_map(|f| run(f).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
