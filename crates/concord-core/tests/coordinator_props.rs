//! Safety properties of the coordinator under random input sequences,
//! checked from outside on the effects it emits.

use std::collections::{BTreeMap, BTreeSet};

use concord_core::coordinator::{Config, Coordinator, Effect, Event, Input};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{
    Control, DispatchKey, HaltGrade, HaltScope, LeaseMode, LeaseRequest, Phase, StepOutcome, StepResult,
};
use concord_proto::{Intent, ResourcePath, Short, decode_intent};
use proptest::prelude::*;
use serde_json::json;

const PATHS: [&str; 4] = ["a/x", "a/y", "b/x", "b/y"];
const AGENTS: [&str; 3] = ["p", "q", "r"];

#[derive(Clone, Debug)]
enum Act {
    Propose {
        agent: usize,
        lineage: u8,
        steps: Vec<(usize, i64)>,
    },
    Outcome {
        pick: usize,
        result: u8,
    },
    Tick {
        ms: u64,
    },
    Halt {
        scope: u8,
        grade: u8,
    },
    Resume {
        scope: u8,
    },
    Lease {
        agent: usize,
        path: usize,
        exclusive: bool,
    },
    Release {
        agent: usize,
        lease: u64,
    },
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => (0..3usize, 0..6u8, prop::collection::vec((0..4usize, 1..100i64), 1..4))
            .prop_map(|(agent, lineage, steps)| Act::Propose { agent, lineage, steps }),
        6 => (0..8usize, 0..10u8).prop_map(|(pick, result)| Act::Outcome { pick, result }),
        2 => (1..20_000u64).prop_map(|ms| Act::Tick { ms }),
        1 => (0..4u8, 0..3u8).prop_map(|(scope, grade)| Act::Halt { scope, grade }),
        1 => (0..4u8).prop_map(|scope| Act::Resume { scope }),
        2 => (0..3usize, 0..4usize, any::<bool>()).prop_map(|(agent, path, exclusive)| Act::Lease { agent, path, exclusive }),
        1 => (0..3usize, 1..6u64).prop_map(|(agent, lease)| Act::Release { agent, lease }),
    ]
}

fn scope(s: u8) -> HaltScope {
    match s {
        0 => HaltScope::All,
        1 => HaltScope::Agent("p".into()),
        2 => HaltScope::Path(ResourcePath::parse("a").unwrap()),
        _ => HaltScope::Path(ResourcePath::parse("b/y").unwrap()),
    }
}

fn intent(lineage: u8, version: u32, steps: &[(usize, i64)]) -> Intent {
    let steps: Vec<_> = steps
        .iter()
        .enumerate()
        .map(|(i, (p, v))| {
            json!({ "id": format!("s{i}"), "kind": "set", "path": PATHS[*p], "args": { "value": v },
                    "confidence": 0.9, "timeout_ms": 10_000, "compensation": { "mode": "restore" } })
        })
        .collect();
    let j = json!({ "protocol": 1, "lineage": format!("l{lineage}"), "version": version, "goal": "g", "steps": steps });
    decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap()
}

fn world() -> World {
    World::from_toml_str("[resources]\n\"a/x\" = 1\n\"a/y\" = 1\n\"b/x\" = 1\n\"b/y\" = 1\n").unwrap()
}

/// Runs the actions; returns the recorded inputs, all effects, and the final state digest.
fn drive(acts: &[Act]) -> (Vec<(u64, Input)>, Vec<Effect>, String) {
    let mut c = Coordinator::new(
        Config::default(),
        Policy::from_toml_str("[defaults]\nautonomy = \"bounded\"").unwrap(),
        world(),
    );
    let (mut now, mut req) = (0u64, 0u64);
    let mut versions: BTreeMap<u8, u32> = BTreeMap::new();
    let mut outstanding: Vec<DispatchKey> = Vec::new();
    let (mut inputs, mut effects) = (Vec::new(), Vec::new());
    let short = |s: &str| Short::parse(s).unwrap();
    for a in acts {
        req += 1;
        now += 1;
        let input = match a {
            Act::Propose { agent, lineage, steps } => {
                let v = versions.entry(*lineage).or_insert(0);
                *v += 1;
                Input::Intent {
                    request: req,
                    agent: AGENTS[*agent].into(),
                    intent: intent(*lineage, *v, steps),
                }
            }
            Act::Outcome { pick, result } => {
                if outstanding.is_empty() {
                    continue;
                }
                let key = outstanding.remove(pick % outstanding.len());
                let result = match result {
                    0 => StepResult::Failed { reason: short("no") },
                    1 => StepResult::StaleToken { seen: 99 },
                    _ => StepResult::Succeeded,
                };
                Input::Outcome {
                    executor: "e".into(),
                    outcome: StepOutcome { key, result },
                }
            }
            Act::Tick { ms } => {
                now += ms;
                Input::Tick
            }
            Act::Halt { scope: s, grade } => Input::Control {
                request: req,
                operator: "op".into(),
                control: Control::Halt {
                    scope: scope(*s),
                    grade: [HaltGrade::Freeze, HaltGrade::Drain, HaltGrade::Rollback][*grade as usize],
                    reason: short("x"),
                },
            },
            Act::Resume { scope: s } => Input::Control {
                request: req,
                operator: "op".into(),
                control: Control::Resume {
                    scope: scope(*s),
                    reason: short("x"),
                },
            },
            Act::Lease { agent, path, exclusive } => Input::Lease {
                request: req,
                agent: AGENTS[*agent].into(),
                lease: LeaseRequest::Acquire {
                    path: ResourcePath::parse(PATHS[*path]).unwrap(),
                    mode: if *exclusive {
                        LeaseMode::Exclusive
                    } else {
                        LeaseMode::Shared
                    },
                    ttl_ms: 15_000,
                    wait: true,
                },
            },
            Act::Release { agent, lease } => Input::Lease {
                request: req,
                agent: AGENTS[*agent].into(),
                lease: LeaseRequest::Release { lease: *lease },
            },
        };
        inputs.push((now, input.clone()));
        let fx = c.handle(now, input);
        for e in &fx {
            if let Effect::Dispatch(d) = e {
                outstanding.push(d.key.clone());
            }
        }
        effects.extend(fx);
    }
    (inputs, effects, c.state_digest())
}

fn covered(scope: &HaltScope, agent: &str, paths: &BTreeSet<String>) -> bool {
    match scope {
        HaltScope::All => true,
        HaltScope::Agent(a) => a == agent,
        HaltScope::Path(p) => paths.iter().any(|t| {
            let t = ResourcePath::parse(t).unwrap();
            t.overlaps(p)
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn safety_holds_and_replay_reproduces(acts in prop::collection::vec(act(), 1..60)) {
        let (inputs, effects, digest) = drive(&acts);

        // Plans' agents and paths, from the inputs.
        let mut plan_of: BTreeMap<(String, u32), (String, BTreeSet<String>)> = BTreeMap::new();
        for (_, i) in &inputs {
            if let Input::Intent { agent, intent, .. } = i {
                let paths = intent.steps.iter().map(|s| s.path.to_string()).collect();
                plan_of.insert((intent.lineage.to_string(), intent.version), (agent.clone(), paths));
            }
        }
        let mut halts: Vec<HaltScope> = Vec::new();
        let mut tokens: BTreeMap<String, u64> = BTreeMap::new();
        let mut succeeded: BTreeSet<DispatchKey> = BTreeSet::new();
        let mut done: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        let mut undone: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        let mut leases: BTreeMap<u64, (String, ResourcePath, LeaseMode)> = BTreeMap::new();
        for e in &effects {
            let Effect::Event(ev) = e else { continue };
            match ev {
                Event::Halted { scope, .. } => halts.push(scope.clone()),
                Event::Resumed { scope, .. } => halts.retain(|h| h != scope),
                Event::Admitted { lineage, version } => {
                    let (agent, paths) = &plan_of[&(lineage.to_string(), *version)];
                    prop_assert!(!halts.iter().any(|h| covered(h, agent, paths)),
                        "{lineage} v{version} admitted under a halt {halts:?}");
                }
                Event::Dispatched { key, path, token } => {
                    // Fencing tokens strictly increase per path.
                    let last = tokens.insert(path.to_string(), *token).unwrap_or(0);
                    prop_assert!(*token > last, "token {token} after {last} on {path}");
                    let plan = (key.lineage.to_string(), key.version);
                    let n: usize = key.step.as_str()[1..].parse().unwrap();
                    match key.phase {
                        Phase::Do => {
                            // Step k+1 only after step k succeeded.
                            if n > 0 {
                                let prev = DispatchKey { step: concord_proto::Id::parse(&format!("s{}", n - 1)).unwrap(), attempt: 1, ..key.clone() };
                                prop_assert!(succeeded.contains(&prev), "{} dispatched before {} succeeded", key.text(), prev.text());
                            }
                        }
                        Phase::Undo => {
                            let u = undone.entry(plan.clone()).or_default();
                            // Each compensation at most once (no operator retries here).
                            prop_assert!(!u.contains(&key.step.to_string()), "{} compensated twice", key.text());
                            u.push(key.step.to_string());
                            // In reverse: each undo is of an earlier step than the undos before it.
                            let earlier: Vec<usize> = u[..u.len() - 1].iter().map(|s| s[1..].parse().unwrap()).collect();
                            prop_assert!(earlier.iter().all(|&e| e > n), "{} after undoing {earlier:?}", key.text());
                            // Only steps that ran (succeeded, or timed out and may have run) are undone.
                            let ran = done.get(&plan).cloned().unwrap_or_default();
                            prop_assert!(ran.iter().any(|s| s == key.step.as_str()), "{} compensates a step that never ran", key.text());
                        }
                    }
                }
                Event::StepSucceeded { key } => {
                    succeeded.insert(key.clone());
                    if key.phase == Phase::Do {
                        done.entry((key.lineage.to_string(), key.version)).or_default().push(key.step.to_string());
                    }
                }
                // A step that timed out may have run: it is compensated too.
                Event::StepFailed { key, reason } if key.phase == Phase::Do && reason.starts_with("timed out") => {
                    done.entry((key.lineage.to_string(), key.version)).or_default().push(key.step.to_string());
                }
                Event::LeaseGranted { lease } => {
                    // At most one exclusive holder per path at any instant.
                    for (agent, path, mode) in leases.values() {
                        let clash = path.overlaps(&lease.path)
                            && (*mode == LeaseMode::Exclusive || lease.mode == LeaseMode::Exclusive)
                            && *agent != lease.agent;
                        prop_assert!(!clash, "lease {} granted over {agent}'s {path}", lease.id);
                    }
                    leases.insert(lease.id, (lease.agent.clone(), lease.path.clone(), lease.mode));
                }
                Event::LeaseReleased { lease } | Event::LeaseExpired { lease, .. } => { leases.remove(lease); }
                _ => {}
            }
        }

        // Replaying the logged inputs reproduces the same effects.
        let log = serde_json::to_string(&inputs).unwrap();
        let replay: Vec<(u64, Input)> = serde_json::from_str(&log).unwrap();
        let mut c = Coordinator::new(Config::default(), Policy::from_toml_str("[defaults]\nautonomy = \"bounded\"").unwrap(), world());
        let again: Vec<Effect> = replay.into_iter().flat_map(|(now, i)| c.handle(now, i)).collect();
        prop_assert_eq!(c.state_digest(), digest, "the rebuilt state differs from the original");
        prop_assert_eq!(serde_json::to_string(&again).unwrap(), serde_json::to_string(&effects).unwrap());
    }
}
