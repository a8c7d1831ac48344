//! The coordinator is deterministic across processes, byte for byte: the
//! same inputs give the same effects and the same state in two separate
//! processes (std's hash-order randomness differs between processes, so a
//! difference that one process hides shows here).

use std::process::Command;

use concord_core::coordinator::{Config, Coordinator, Effect, Input};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{Control, HaltGrade, HaltScope, LeaseMode, LeaseRequest, StepOutcome, StepResult};
use concord_proto::{Observation, ObservationKind, ResourcePath, Short, Value, decode_intent};
use serde_json::json;

const CHILD: &str = "CONCORD_DETERMINISM_CHILD";

/// A fixed run through the shipped policy and example world: decisions with
/// CEL rules and figures, sagas, compensation, observations, leases, halts.
fn run() -> (String, String, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let policy =
        Policy::from_toml_str(&std::fs::read_to_string(format!("{root}/config/policy.toml")).unwrap()).unwrap();
    let world =
        World::from_toml_str(&std::fs::read_to_string(format!("{root}/config/examples/world.toml")).unwrap()).unwrap();
    let mut c = Coordinator::new(Config::default(), policy, world);
    let mut fx: Vec<Effect> = Vec::new();
    let plan = |lineage: &str, steps: serde_json::Value| {
        let j = json!({ "protocol": 1, "lineage": lineage, "version": 1, "goal": "g", "steps": steps });
        decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap()
    };
    let set = |id: &str, path: &str, v: serde_json::Value| {
        json!({ "id": id, "kind": "set", "path": path, "args": { "value": v }, "confidence": 0.9,
                "compensation": { "mode": "restore" } })
    };
    let short = |s: &str| Short::parse(s).unwrap();
    let mut t = 0;
    let mut feed = |c: &mut Coordinator, input: Input, fx: &mut Vec<Effect>| {
        t += 1_000;
        fx.extend(c.handle(t, input));
    };
    let deploy = plan(
        "ship",
        json!([{ "id": "d", "kind": "deploy", "path": "svc/api",
                 "args": { "version": "v1.5.0", "artifact": "registry/api:v1.5.0" }, "confidence": 0.9,
                 "compensation": { "mode": "restore" },
                 "verification": { "path": "svc/api/health/app", "op": "eq", "value": "ok", "bake_ms": 5000, "fresh_ms": 5000 } }]),
    );
    feed(
        &mut c,
        Input::Intent {
            request: 1,
            agent: "deploy".into(),
            intent: deploy,
        },
        &mut fx,
    );
    let key = fx
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(d) => Some(d.key.clone()),
            _ => None,
        })
        .unwrap();
    feed(
        &mut c,
        Input::Outcome {
            executor: "x".into(),
            outcome: StepOutcome {
                key,
                result: StepResult::Succeeded,
            },
        },
        &mut fx,
    );
    let obs = |v: &str| Observation {
        protocol: 1,
        path: ResourcePath::parse("svc/api/health/app").unwrap(),
        kind: ObservationKind::AppHealth,
        value: Value::Str(v.into()),
        observed_at_ms: None,
    };
    feed(
        &mut c,
        Input::Observe {
            agent: "probe".into(),
            observation: obs("failing"),
        },
        &mut fx,
    );
    feed(&mut c, Input::Tick, &mut fx);
    for _ in 0..5 {
        feed(&mut c, Input::Tick, &mut fx);
    }
    feed(
        &mut c,
        Input::Intent {
            request: 2,
            agent: "resource".into(),
            intent: plan("pool", json!([set("s1", "svc/api/pool_size", json!(500))])),
        },
        &mut fx,
    );
    feed(
        &mut c,
        Input::Intent {
            request: 3,
            agent: "resource".into(),
            intent: plan("pool2", json!([set("s1", "svc/worker/pool_size", json!(30))])),
        },
        &mut fx,
    );
    feed(
        &mut c,
        Input::Lease {
            request: 4,
            agent: "uptime".into(),
            lease: LeaseRequest::Acquire {
                path: ResourcePath::parse("svc/billing").unwrap(),
                mode: LeaseMode::Exclusive,
                ttl_ms: 3000,
                wait: false,
            },
        },
        &mut fx,
    );
    feed(
        &mut c,
        Input::Control {
            request: 5,
            operator: "alice".into(),
            control: Control::Halt {
                scope: HaltScope::All,
                grade: HaltGrade::Freeze,
                reason: short("drill"),
            },
        },
        &mut fx,
    );
    feed(
        &mut c,
        Input::Intent {
            request: 6,
            agent: "ops".into(),
            intent: plan(
                "cfg",
                json!([set("s1", "config/prod/feature_flags/new_checkout", json!(true))]),
            ),
        },
        &mut fx,
    );
    feed(
        &mut c,
        Input::Control {
            request: 7,
            operator: "alice".into(),
            control: Control::Resume {
                scope: HaltScope::All,
                reason: short("done"),
            },
        },
        &mut fx,
    );
    for _ in 0..5 {
        feed(&mut c, Input::Tick, &mut fx);
    }
    // The world document's bytes too: derived actors and injected times.
    // The run wrote a deploy's changes and an observation into it.
    assert!(c.world_doc().change_count() >= 3, "{}", c.world_doc().change_count());
    let doc = blake3::hash(&c.world_doc().save()).to_hex().to_string();
    (serde_json::to_string(&fx).unwrap(), c.state_digest(), doc)
}

#[test]
fn determinism_across_processes() {
    let (effects, digest, doc) = run();
    if std::env::var_os(CHILD).is_some() {
        println!("EFFECTS {}", blake3::hash(effects.as_bytes()).to_hex());
        println!("DIGEST {digest}");
        println!("BYTES {}", effects.len());
        println!("DOC {doc}");
        return;
    }
    let child = || {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "determinism_across_processes",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            // libtest may print "test name ... " before the first line.
            .filter_map(|l| {
                ["EFFECTS ", "DIGEST ", "BYTES ", "DOC "]
                    .iter()
                    .find_map(|m| l.find(m).map(|i| l[i..].to_string()))
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (child(), child());
    assert_eq!(a.len(), 4, "{a:?}");
    assert_eq!(a, b, "two processes disagree");
    let here = vec![
        format!("EFFECTS {}", blake3::hash(effects.as_bytes()).to_hex()),
        format!("DIGEST {digest}"),
        format!("BYTES {}", effects.len()),
        format!("DOC {doc}"),
    ];
    assert_eq!(a, here, "a child process and this one disagree");
    // The run exercised what it claims to.
    for needle in [
        "\"compensating\"",
        "\"halted\"",
        "\"lease_granted\"",
        "coupling.db_connections",
    ] {
        assert!(effects.contains(needle), "{needle} missing from the run");
    }
}

#[test]
fn replaying_inputs_rebuilds_the_same_state() {
    let (_, a, _) = run();
    let (_, b, _) = run();
    assert_eq!(a, b);
}
