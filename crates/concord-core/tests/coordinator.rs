//! The coordinator state machine: sagas, approvals, conflicts, halts, leases,
//! verification, idempotency, and replay of the recorded inputs.

use concord_core::coordinator::{Config, Coordinator, Effect, Event, Input, Reply};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{
    Control, DispatchKey, HaltGrade, HaltScope, LeaseMode, LeaseReply, LeaseRequest, Phase, SagaAction, StepDispatch,
    StepOutcome, StepResult,
};
use concord_proto::{Id, Intent, Observation, ObservationKind, ResourcePath, Short, Value, Verdict, decode_intent};
use serde_json::{Value as Json, json};

const WORLD: &str = r#"
[resources]
"svc/api/pool_size" = 50
"svc/api/replicas" = 4
"svc/api/version" = "v1"
"svc/api/artifact" = "reg/api:v1.0.0"
"svc/web/pool_size" = 20
"svc/web/replicas" = 2
"db/primary/max_connections" = 1000

[services.api]
path = "svc/api"
depends_on = ["db/primary"]
[services.web]
path = "svc/web"
depends_on = ["db/primary"]
"#;

const POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[agents.careful]
autonomy = "propose"
[[rules.cel]]
id = "coupling.db"
reads = ["svc/*/pool_size", "svc/*/replicas", "db/primary/max_connections"]
expr = "sum(keys(after.svc).map(s, after.svc[s].pool_size * after.svc[s].replicas)) * 10 <= after.db.primary.max_connections * 8"
outcome = "reject"
"#;

/// Drives a coordinator and records every input, as the log would.
struct H {
    c: Coordinator,
    now: u64,
    req: u64,
    inputs: Vec<(u64, Input)>,
    effects: Vec<Effect>,
}

impl H {
    fn new() -> H {
        H::with(WORLD, POLICY)
    }
    fn with(world: &str, policy: &str) -> H {
        H {
            c: Coordinator::new(
                Config::default(),
                Policy::from_toml_str(policy).unwrap(),
                World::from_toml_str(world).unwrap(),
            ),
            now: 1_000,
            req: 0,
            inputs: Vec::new(),
            effects: Vec::new(),
        }
    }
    fn feed(&mut self, input: Input) -> Vec<Effect> {
        self.inputs.push((self.now, input.clone()));
        let fx = self.c.handle(self.now, input);
        self.effects.extend(fx.clone());
        fx
    }
    fn propose(&mut self, agent: &str, intent: Intent) -> Vec<Effect> {
        self.req += 1;
        let request = self.req;
        self.feed(Input::Intent {
            request,
            agent: agent.into(),
            intent,
        })
    }
    fn control(&mut self, operator: &str, control: Control) -> Vec<Effect> {
        self.req += 1;
        let request = self.req;
        self.feed(Input::Control {
            request,
            operator: operator.into(),
            control,
        })
    }
    fn lease(&mut self, agent: &str, lease: LeaseRequest) -> LeaseReply {
        self.req += 1;
        let request = self.req;
        let fx = self.feed(Input::Lease {
            request,
            agent: agent.into(),
            lease,
        });
        fx.into_iter()
            .find_map(|e| match e {
                Effect::Reply {
                    reply: Reply::Lease(l), ..
                } => Some(l),
                _ => None,
            })
            .unwrap()
    }
    fn outcome(&mut self, key: &DispatchKey, result: StepResult) -> Vec<Effect> {
        self.feed(Input::Outcome {
            executor: "exec".into(),
            outcome: StepOutcome {
                key: key.clone(),
                result,
            },
        })
    }
    fn observe(&mut self, path: &str, kind: ObservationKind, value: Value) {
        self.feed(Input::Observe {
            agent: "probe".into(),
            observation: Observation {
                protocol: 1,
                path: ResourcePath::parse(path).unwrap(),
                kind,
                value,
                observed_at_ms: None,
            },
        });
    }
    fn advance(&mut self, ms: u64) -> Vec<Effect> {
        self.now += ms;
        self.feed(Input::Tick)
    }
}

fn decision(fx: &[Effect]) -> &concord_proto::coord::Decision {
    fx.iter()
        .find_map(|e| match e {
            Effect::Reply {
                reply: Reply::Decision(d),
                ..
            } => Some(d.as_ref()),
            _ => None,
        })
        .expect("a decision reply")
}

fn dispatches(fx: &[Effect]) -> Vec<&StepDispatch> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Dispatch(d) => Some(d.as_ref()),
            _ => None,
        })
        .collect()
}

fn events(fx: &[Effect]) -> Vec<&Event> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Event(ev) => Some(ev),
            _ => None,
        })
        .collect()
}

fn control_reply(fx: &[Effect]) -> (bool, String) {
    fx.iter()
        .find_map(|e| match e {
            Effect::Reply {
                reply: Reply::Control { ok, message },
                ..
            } => Some((*ok, message.clone())),
            _ => None,
        })
        .unwrap()
}

fn plan(lineage: &str, version: u32, steps: Json) -> Intent {
    plan_with(lineage, version, steps, json!({}))
}

fn plan_with(lineage: &str, version: u32, steps: Json, extra: Json) -> Intent {
    let mut j = json!({ "protocol": 1, "lineage": lineage, "version": version, "goal": "test", "steps": steps });
    for (k, v) in extra.as_object().unwrap() {
        j[k] = v.clone();
    }
    decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap()
}

fn set(id: &str, path: &str, value: Json) -> Json {
    json!({ "id": id, "kind": "set", "path": path, "args": { "value": value }, "confidence": 0.9,
            "compensation": { "mode": "restore" } })
}

fn path(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

fn short(s: &str) -> Short {
    Short::parse(s).unwrap()
}

#[test]
fn an_admitted_plan_runs_step_by_step_with_rising_fencing_tokens() {
    let mut h = H::new();
    let fx = h.propose(
        "resource",
        plan(
            "p",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(60)),
                set("s2", "svc/web/pool_size", json!(25))
            ]),
        ),
    );
    assert_eq!(decision(&fx).verdict, Verdict::Admit);
    let d1 = dispatches(&fx);
    assert_eq!(d1.len(), 1, "only step 1 is dispatched before it succeeds");
    assert_eq!(d1[0].key.step.as_str(), "s1");
    assert_eq!(d1[0].fencing_token, 1);
    assert_eq!(
        d1[0].expected_before,
        vec![(path("svc/api/pool_size"), Some(Value::Int(50)))]
    );
    let key1 = d1[0].key.clone();
    let fx = h.outcome(&key1, StepResult::Succeeded);
    let d2 = dispatches(&fx);
    assert_eq!(d2[0].key.step.as_str(), "s2");
    assert_eq!(h.c.world().get(&path("svc/api/pool_size")), Some(&Value::Int(60)));
    let key2 = d2[0].key.clone();
    let fx = h.outcome(&key2, StepResult::Succeeded);
    assert!(events(&fx).iter().any(|e| matches!(e, Event::Completed { .. })));
    assert_eq!(h.c.plan_count(), 0);
    // A duplicate outcome after the end is ignored, not applied twice.
    let fx = h.outcome(&key2, StepResult::Succeeded);
    assert!(matches!(events(&fx)[0], Event::OutcomeIgnored { .. }));
}

#[test]
fn a_failed_step_compensates_completed_steps_in_reverse() {
    let mut h = H::new();
    let fx = h.propose(
        "resource",
        plan(
            "p",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(60)),
                set("s2", "svc/web/pool_size", json!(25)),
                set("s3", "svc/web/replicas", json!(3)),
            ]),
        ),
    );
    let k1 = dispatches(&fx)[0].key.clone();
    let k2 = dispatches(&h.outcome(&k1, StepResult::Succeeded))[0].key.clone();
    let k3 = dispatches(&h.outcome(&k2, StepResult::Succeeded))[0].key.clone();
    let fx = h.outcome(&k3, StepResult::Failed { reason: short("quota") });
    let undo = dispatches(&fx);
    assert_eq!((undo[0].key.step.as_str(), undo[0].key.phase), ("s2", Phase::Undo));
    assert_eq!(undo[0].args, json!({ "value": 20 }), "restore sends the before-value");
    let fx = h.outcome(&undo[0].key.clone(), StepResult::Succeeded);
    let undo = dispatches(&fx);
    assert_eq!((undo[0].key.step.as_str(), undo[0].key.phase), ("s1", Phase::Undo));
    let fx = h.outcome(&undo[0].key.clone(), StepResult::Succeeded);
    assert!(events(&fx).iter().any(|e| matches!(e, Event::Compensated { .. })));
    assert_eq!(h.c.world().get(&path("svc/api/pool_size")), Some(&Value::Int(50)));
    assert_eq!(h.c.world().get(&path("svc/web/pool_size")), Some(&Value::Int(20)));
}

#[test]
fn a_timeout_compensates_with_a_higher_token_and_the_late_outcome_is_ignored() {
    let mut h = H::new();
    let mut s1 = set("s1", "svc/api/pool_size", json!(60));
    s1["timeout_ms"] = json!(5_000);
    let fx = h.propose("resource", plan("p", 1, json!([s1])));
    let first = dispatches(&fx)[0].clone();
    let fx = h.advance(5_000);
    let undo = dispatches(&fx);
    assert_eq!(undo.len(), 1, "the timed-out step may have run: it is compensated");
    assert_eq!(undo[0].key.phase, Phase::Undo);
    assert!(undo[0].fencing_token > first.fencing_token);
    let fx = h.outcome(&first.key, StepResult::Succeeded);
    assert!(matches!(events(&fx)[0], Event::OutcomeIgnored { .. }));
    h.outcome(&undo[0].key.clone(), StepResult::Succeeded);
    assert_eq!(h.c.plan_count(), 0);
}

#[test]
fn two_agents_racing_for_one_path_exactly_one_is_admitted() {
    let mut h = H::new();
    let a = h.propose("a", plan("pa", 1, json!([set("s1", "svc/api/pool_size", json!(60))])));
    let b = h.propose("b", plan("pb", 1, json!([set("s1", "svc/api/pool_size", json!(70))])));
    assert_eq!(decision(&a).verdict, Verdict::Admit);
    let db = decision(&b);
    assert_eq!(db.verdict, Verdict::Reject);
    assert_eq!(db.conflicts[0].other, "pa");
    assert_eq!(db.conflicts[0].agent, "a");
    assert!(db.reasons.iter().any(|r| r.rule == "conflict.inflight"));
    // An ancestor path conflicts too.
    let c = h.propose(
        "c",
        plan(
            "pc",
            1,
            json!([{ "id": "r", "kind": "restart", "path": "svc/api", "confidence": 0.9,
                     "compensation": { "mode": "irreversible", "reason": "restart" } }]),
        ),
    );
    assert_eq!(decision(&c).verdict, Verdict::Reject);
}

#[test]
fn a_plan_that_asks_to_queue_is_decided_when_the_conflict_ends() {
    let mut h = H::new();
    let a = h.propose("a", plan("pa", 1, json!([set("s1", "svc/api/pool_size", json!(60))])));
    let key = dispatches(&a)[0].key.clone();
    let b = h.propose(
        "b",
        plan_with(
            "pb",
            1,
            json!([set("s1", "svc/api/pool_size", json!(70))]),
            json!({ "on_conflict": "queue" }),
        ),
    );
    assert!(
        !b.iter().any(|e| matches!(e, Effect::Reply { .. })),
        "a queued plan is answered when decided"
    );
    let fx = h.outcome(&key, StepResult::Succeeded);
    let d = decision(&fx);
    assert_eq!(d.verdict, Verdict::Admit);
    assert_eq!(dispatches(&fx)[0].key.lineage.as_str(), "pb");
    assert_eq!(dispatches(&fx)[0].expected_before[0].1, Some(Value::Int(60)));
}

#[test]
fn plans_that_pass_alone_but_not_together_are_caught_on_the_projected_world() {
    let mut h = H::new();
    // Budget 800: api 4*50 + web 2*20 = 240. Each plan alone stays under; together they do not.
    let a = h.propose("a", plan("pa", 1, json!([set("s1", "svc/api/pool_size", json!(150))])));
    assert_eq!(decision(&a).verdict, Verdict::Admit); // 600 + 40 = 640
    let b = h.propose("b", plan("pb", 1, json!([set("s1", "svc/web/pool_size", json!(100))])));
    let d = decision(&b); // 600 + 200 = 800... at the limit: allowed
    assert_eq!(d.verdict, Verdict::Admit, "{:#?}", d.reasons);
    let c = h.propose("c", plan("pc", 1, json!([set("s1", "svc/web/replicas", json!(3))])));
    let d = decision(&c); // 600 + 300 = 900 > 800 only with the in-flight plans
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(d.reasons.iter().any(|r| r.rule == "coupling.db"), "{:#?}", d.reasons);
}

#[test]
fn a_plan_admissible_only_if_an_in_flight_saga_finishes_is_rejected() {
    let mut h = H::new();
    // The in-flight plan lowers api's pool; the new one raises web's, which
    // fits only if the first plan finishes rather than compensates.
    h.propose("a", plan("pa", 1, json!([set("s1", "svc/api/pool_size", json!(10))])));
    // Projected: 4*10 + 2*350 = 740 <= 800. If pa compensates: 4*50 + 700 = 900 > 800.
    let b = h.propose("b", plan("pb", 1, json!([set("s1", "svc/web/pool_size", json!(350))])));
    let d = decision(&b);
    assert_eq!(d.verdict, Verdict::Reject);
    let r = d.reasons.iter().find(|r| r.rule == "coupling.db").unwrap();
    assert!(
        r.message.starts_with("if the in-flight plans compensate"),
        "{}",
        r.message
    );
}

#[test]
fn a_plan_rejected_for_a_conflict_is_not_judged_on_the_world_a_compensation_would_leave() {
    // The in-flight plan lowers api's pool and sets web's timeout. The new
    // plan raises web's pool (which fits only if the first plan finishes)
    // and sets web's timeout too: a conflict.
    let steps = || {
        json!([
            set("s1", "svc/web/timeout_ms", json!(600)),
            set("s2", "svc/web/pool_size", json!(350)),
        ])
    };
    let mut h = H::new();
    h.propose(
        "a",
        plan(
            "pa",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(10)),
                set("s2", "svc/web/timeout_ms", json!(500)),
            ]),
        ),
    );
    // It does not wait: rejected for the conflict, and for nothing the
    // in-flight plan's compensation would cause.
    let d = decision(&h.propose("b", plan("pb", 1, steps()))).clone();
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(
        d.reasons.iter().any(|r| r.rule == "conflict.inflight"),
        "{:#?}",
        d.reasons
    );
    assert!(
        !d.reasons
            .iter()
            .any(|r| r.message.starts_with("if the in-flight plans compensate")),
        "{:#?}",
        d.reasons
    );
    // Asked to queue, it would be admitted once the conflict ends, so the
    // world a compensation would leave is judged: it breaks the budget
    // there, and the plan is rejected instead of queued.
    let fx = h.propose("b", plan_with("pq", 1, steps(), json!({ "on_conflict": "queue" })));
    let d = decision(&fx);
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(!d.queued);
    let r = d.reasons.iter().find(|r| r.rule == "coupling.db").unwrap();
    assert!(
        r.message.starts_with("if the in-flight plans compensate"),
        "{}",
        r.message
    );
}

#[test]
fn approval_binds_the_plan_and_the_material_preview() {
    let mut h = H::new();
    let fx = h.propose(
        "careful",
        plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(60))])),
    );
    let d = decision(&fx).clone();
    assert_eq!(d.verdict, Verdict::NeedsApproval);
    assert!(dispatches(&fx).is_empty(), "a pending plan dispatches nothing");
    let approve = |hash: &str, material: &str| Control::Approve {
        lineage: Id::parse("p").unwrap(),
        version: 1,
        plan_hash: hash.into(),
        material_hash: material.into(),
        reason: short("looks fine"),
    };
    let (ok, msg) = control_reply(&h.control("op", approve("0000", &d.material_hash)));
    assert!(!ok && msg.contains("plan hash"), "{msg}");
    let (ok, msg) = control_reply(&h.control("careful", approve(&d.plan_hash, &d.material_hash)));
    assert!(!ok && msg.contains("own plan"), "{msg}");
    let fx = h.control("op", approve(&d.plan_hash, &d.material_hash));
    assert!(control_reply(&fx).0, "{:?}", control_reply(&fx));
    assert_eq!(dispatches(&fx)[0].key.lineage.as_str(), "p");
}

#[test]
fn an_approval_of_a_changed_preview_goes_back_to_the_human() {
    let mut h = H::new();
    let fx = h.propose(
        "careful",
        plan("p", 1, json!([set("s1", "svc/web/pool_size", json!(200))])),
    );
    let d = decision(&fx).clone();
    // Meanwhile another agent's plan is admitted: web's pool would now break
    // the budget (4*150 + 2*200 = 1000 > 800).
    let fx = h.propose("a", plan("pa", 1, json!([set("s1", "svc/api/pool_size", json!(150))])));
    assert_eq!(decision(&fx).verdict, Verdict::Admit);
    let fx = h.control(
        "op",
        Control::Approve {
            lineage: Id::parse("p").unwrap(),
            version: 1,
            plan_hash: d.plan_hash.clone(),
            material_hash: d.material_hash.clone(),
            reason: short("ok"),
        },
    );
    let (ok, msg) = control_reply(&fx);
    assert!(!ok, "{msg}");
    assert!(events(&fx).iter().any(|e| matches!(e, Event::ApprovalStale { .. })));
    assert!(dispatches(&fx).is_empty());
}

#[test]
fn pending_plans_expire_and_newer_versions_withdraw_older_ones() {
    let mut h = H::new();
    h.propose(
        "careful",
        plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(60))])),
    );
    let fx = h.propose(
        "careful",
        plan("p", 2, json!([set("s1", "svc/api/pool_size", json!(55))])),
    );
    assert!(events(&fx).iter().any(|e| matches!(
        e,
        Event::Withdrawn {
            version: 1,
            by_version: 2,
            ..
        }
    )));
    let fx = h.advance(Config::default().approval_ttl_ms);
    assert!(
        events(&fx)
            .iter()
            .any(|e| matches!(e, Event::ApprovalExpired { version: 2, .. }))
    );
    assert_eq!(h.c.plan_count(), 0);
}

#[test]
fn a_new_version_is_refused_while_the_old_one_runs() {
    let mut h = H::new();
    h.propose("a", plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(60))])));
    let fx = h.propose("a", plan("p", 2, json!([set("s1", "svc/api/pool_size", json!(70))])));
    let d = decision(&fx);
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(d.reasons.iter().any(|r| r.rule == "replan.running"));
}

#[test]
fn a_freeze_stops_admission_and_dispatch_and_resume_lifts_it() {
    let mut h = H::new();
    let fx = h.propose(
        "a",
        plan(
            "p",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(60)),
                set("s2", "svc/api/replicas", json!(5))
            ]),
        ),
    );
    let k1 = dispatches(&fx)[0].key.clone();
    h.control(
        "op",
        Control::Halt {
            scope: HaltScope::All,
            grade: HaltGrade::Freeze,
            reason: short("incident"),
        },
    );
    let fx = h.outcome(&k1, StepResult::Succeeded);
    assert!(dispatches(&fx).is_empty(), "step 2 is held by the freeze");
    let fx = h.propose("b", plan("q", 1, json!([set("s1", "svc/web/pool_size", json!(21))])));
    let d = decision(&fx);
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(d.reasons.iter().any(|r| r.rule == "halt.active"));
    let fx = h.control(
        "op",
        Control::Resume {
            scope: HaltScope::All,
            reason: short("over"),
        },
    );
    assert_eq!(dispatches(&fx)[0].key.step.as_str(), "s2");
}

#[test]
fn a_rollback_halt_compensates_even_under_a_freeze() {
    let mut h = H::new();
    let fx = h.propose(
        "a",
        plan(
            "p",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(60)),
                set("s2", "svc/api/replicas", json!(5)),
                set("s3", "svc/web/replicas", json!(3)),
            ]),
        ),
    );
    let k1 = dispatches(&fx)[0].key.clone();
    let fx = h.outcome(&k1, StepResult::Succeeded);
    let k2 = dispatches(&fx)[0].key.clone();
    h.control(
        "op",
        Control::Halt {
            scope: HaltScope::Agent("a".into()),
            grade: HaltGrade::Freeze,
            reason: short("stop"),
        },
    );
    let fx = h.outcome(&k2, StepResult::Succeeded);
    assert!(dispatches(&fx).is_empty(), "s3 is held by the freeze");
    let fx = h.control(
        "op",
        Control::Halt {
            scope: HaltScope::Path(path("svc/api")),
            grade: HaltGrade::Rollback,
            reason: short("roll back"),
        },
    );
    let undo = dispatches(&fx);
    assert_eq!((undo[0].key.step.as_str(), undo[0].key.phase), ("s2", Phase::Undo));
}

#[test]
fn a_failed_compensation_waits_for_an_operator() {
    let mut h = H::new();
    let fx = h.propose(
        "a",
        plan(
            "p",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(60)),
                set("s2", "svc/api/replicas", json!(5))
            ]),
        ),
    );
    let k1 = dispatches(&fx)[0].key.clone();
    let k2 = dispatches(&h.outcome(&k1, StepResult::Succeeded))[0].key.clone();
    let fx = h.outcome(&k2, StepResult::Failed { reason: short("no") });
    let u1 = dispatches(&fx)[0].key.clone();
    let fx = h.outcome(
        &u1,
        StepResult::Failed {
            reason: short("db down"),
        },
    );
    assert!(fx.iter().any(|e| matches!(e, Effect::Alert { .. })));
    assert!(
        events(&fx)
            .iter()
            .any(|e| matches!(e, Event::CompensationFailed { .. }))
    );
    assert_eq!(h.c.plan_count(), 1, "it keeps its leases");
    let fx = h.control(
        "op",
        Control::Saga {
            lineage: Id::parse("p").unwrap(),
            action: SagaAction::Retry,
            reason: short("db back"),
        },
    );
    let retry = dispatches(&fx)[0].key.clone();
    assert_eq!(
        (retry.step.as_str(), retry.phase, retry.attempt),
        ("s1", Phase::Undo, 2)
    );
    h.outcome(&retry, StepResult::Succeeded);
    assert_eq!(h.c.plan_count(), 0);
}

#[test]
fn verification_judges_application_health_not_heartbeats() {
    let mut h = H::new();
    let deploy = |lineage: &str, v: &str| {
        plan(
            lineage,
            1,
            json!([{ "id": "d", "kind": "deploy", "path": "svc/api",
                     "args": { "version": v, "artifact": format!("reg/api:{v}.0.0") }, "confidence": 0.9,
                     "compensation": { "mode": "restore" },
                     "verification": { "path": "svc/api/health/app", "op": "eq", "value": "ok",
                                       "bake_ms": 60000, "fresh_ms": 10000 } }]),
        )
    };
    let fx = h.propose("deploy", deploy("good", "v2"));
    let k = dispatches(&fx)[0].key.clone();
    h.outcome(&k, StepResult::Succeeded);
    h.now += 55_000;
    h.observe(
        "svc/api/health/app",
        ObservationKind::AppHealth,
        Value::Str("ok".into()),
    );
    let fx = h.advance(5_000);
    assert!(
        events(&fx).iter().any(|e| matches!(e, Event::Completed { .. })),
        "{:#?}",
        events(&fx)
    );

    let fx = h.propose("deploy", deploy("leaky", "v3"));
    let k = dispatches(&fx)[0].key.clone();
    let deploy_token = dispatches(&fx)[0].fencing_token;
    h.outcome(&k, StepResult::Succeeded);
    h.now += 55_000;
    // Alive, but not working.
    h.observe(
        "svc/api/health/liveness",
        ObservationKind::Liveness,
        Value::Str("ok".into()),
    );
    h.observe(
        "svc/api/health/app",
        ObservationKind::AppHealth,
        Value::Str("failing".into()),
    );
    let fx = h.advance(5_000);
    let undo = dispatches(&fx);
    assert_eq!(undo[0].key.phase, Phase::Undo);
    assert_eq!(undo[0].args, json!({ "version": "v2", "artifact": "reg/api:v2.0.0" }));
    assert!(undo[0].fencing_token > deploy_token);
}

#[test]
fn leases_reserve_paths_expire_and_grant_waiters_in_order() {
    let mut h = H::new();
    let acquire = |mode, wait| LeaseRequest::Acquire {
        path: path("db/primary"),
        mode,
        ttl_ms: 10_000,
        wait,
    };
    let LeaseReply::Granted { lease: l1, .. } = h.lease("a", acquire(LeaseMode::Exclusive, false)) else {
        panic!()
    };
    // Another agent's plan under the reserved path conflicts.
    let fx = h.propose(
        "b",
        plan("pb", 1, json!([set("s1", "db/primary/max_connections", json!(900))])),
    );
    assert_eq!(decision(&fx).conflicts[0].kind, "reserved");
    assert!(matches!(
        h.lease("b", acquire(LeaseMode::Shared, false)),
        LeaseReply::Refused { .. }
    ));
    assert!(matches!(
        h.lease("b", acquire(LeaseMode::Shared, true)),
        LeaseReply::Queued { position: 1, .. }
    ));
    assert!(matches!(
        h.lease("c", acquire(LeaseMode::Shared, true)),
        LeaseReply::Queued { position: 2, .. }
    ));
    // Not renewed: it lapses and both shared waiters get it.
    let fx = h.advance(10_000);
    let ev = events(&fx);
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::LeaseExpired { lease, .. } if *lease == l1))
    );
    assert_eq!(ev.iter().filter(|e| matches!(e, Event::LeaseGranted { .. })).count(), 2);
    assert_eq!(h.c.leases().held_count(), 2);
}

#[test]
fn a_retried_intent_gets_the_original_decision() {
    let mut h = H::new();
    let i = plan_with(
        "p",
        1,
        json!([set("s1", "svc/api/pool_size", json!(60))]),
        json!({ "idempotency_key": "k1" }),
    );
    let first = h.propose("a", i.clone());
    let again = h.propose("a", i);
    let (first, again) = (decision(&first).clone(), decision(&again).clone());
    assert!(first.preview.is_some() && !first.duplicate);
    assert!(again.duplicate, "the retry is marked as answered from the table");
    assert!(again.preview.is_none(), "the table keeps decisions without previews");
    assert_eq!(
        concord_proto::coord::Decision {
            duplicate: false,
            ..again.clone()
        },
        first.compact()
    );
    let fx = h.propose(
        "a",
        plan_with(
            "p",
            1,
            json!([set("s1", "svc/api/pool_size", json!(60))]),
            json!({ "idempotency_key": "k1" }),
        ),
    );
    assert!(events(&fx).is_empty(), "no second decision, no second dispatch");
    assert!(dispatches(&fx).is_empty());
}

#[test]
fn the_same_plan_sent_again_without_a_key_is_a_retry() {
    let mut h = H::new();
    let i = plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(60))]));
    let first = h.propose("a", i.clone());
    let again = h.propose("a", i);
    assert!(decision(&again).duplicate);
    assert_eq!(decision(&again).plan_hash, decision(&first).plan_hash);
    assert!(events(&again).is_empty() && dispatches(&again).is_empty());
    // Another agent sending the same plan is not a retry of the first.
    let other = h.propose("b", plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(60))])));
    assert!(!decision(&other).duplicate);
    // The same lineage and version with other content is decided (and refused).
    let changed = h.propose("a", plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(70))])));
    assert!(!decision(&changed).duplicate);
    assert_eq!(decision(&changed).verdict, Verdict::Reject);
}

/// A run with a decision of every kind: admitted, held and approved,
/// rejected, queued and re-decided, compensated, leases.
fn eventful_run(h: &mut H) {
    let fx = h.propose(
        "a",
        plan(
            "p",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(60)),
                set("s2", "svc/api/replicas", json!(5))
            ]),
        ),
    );
    let k1 = dispatches(&fx)[0].key.clone();
    let held = h.propose(
        "careful",
        plan("q", 1, json!([set("s1", "svc/web/pool_size", json!(30))])),
    );
    let held = decision(&held).clone();
    h.propose(
        "b",
        plan_with(
            "r",
            1,
            json!([set("s1", "svc/api/pool_size", json!(70))]),
            json!({ "on_conflict": "queue" }),
        ),
    );
    h.propose("b", plan("big", 1, json!([set("s1", "svc/web/replicas", json!(500))])));
    h.lease(
        "x",
        LeaseRequest::Acquire {
            path: path("db"),
            mode: LeaseMode::Shared,
            ttl_ms: 3_000,
            wait: false,
        },
    );
    h.control(
        "op",
        Control::Approve {
            lineage: Id::parse("q").unwrap(),
            version: 1,
            plan_hash: held.plan_hash.clone(),
            material_hash: held.material_hash.clone(),
            reason: Short::parse("ok").unwrap(),
        },
    );
    let k2 = dispatches(&h.outcome(&k1, StepResult::Succeeded))[0].key.clone();
    h.advance(4_000);
    h.outcome(
        &k2,
        StepResult::Drift {
            actual: vec![(path("svc/api/replicas"), Some(Value::Int(7)))],
        },
    );
}

fn records(h: &H) -> Vec<(u64, Input, Vec<Event>)> {
    // Re-run the inputs one by one to pair each with its events, as the log does.
    let mut c = H::new();
    h.inputs
        .iter()
        .map(|(now, input)| {
            let ev = c.c.handle(*now, input.clone()).into_iter().filter_map(|e| match e {
                Effect::Event(e) => Some(e),
                _ => None,
            });
            (*now, input.clone(), ev.collect())
        })
        .collect()
}

#[test]
fn recovery_applies_the_recorded_decisions_and_rebuilds_the_same_state() {
    let mut h = H::new();
    eventful_run(&mut h);
    let log = records(&h);
    assert!(
        log.iter()
            .any(|(_, _, ev)| ev.iter().any(|e| matches!(e, Event::Approved { .. })))
    );
    let mut rebuilt = H::new();
    for (now, input, events) in &log {
        let fx = rebuilt.c.recover_input(*now, input.clone(), events);
        assert_eq!(concord_core::coordinator::first_divergence(events, &fx), None);
    }
    assert_eq!(rebuilt.c.state_digest(), h.c.state_digest(), "recovered state differs");
}

#[test]
fn recovery_never_re_decides_even_under_another_policy() {
    let mut h = H::new();
    eventful_run(&mut h);
    let log = records(&h);
    // A newer policy would reject everything; recovery keeps what was decided.
    let strict = "[defaults]\nautonomy = \"observe\"\n";
    let mut rebuilt = H::with(WORLD, strict);
    for (now, input, events) in &log {
        let fx = rebuilt.c.recover_input(*now, input.clone(), events);
        let decided: Vec<_> = events.iter().filter(|e| matches!(e, Event::Decided { .. })).collect();
        let produced: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Event(e @ Event::Decided { .. }) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(decided, produced);
    }
    // Re-deciding (replay) under the strict policy differs at the first intent.
    let mut replay = H::with(WORLD, strict);
    let (now, input, events) = &log[0];
    let fx = replay.c.handle(*now, input.clone());
    assert!(concord_core::coordinator::first_divergence(events, &fx).is_some());
}

#[test]
fn a_snapshot_restores_the_whole_state() {
    let mut h = H::new();
    eventful_run(&mut h);
    let bytes = h.c.snapshot().unwrap();
    let mut restored = Coordinator::restore(&bytes).unwrap();
    assert_eq!(restored.state_digest(), h.c.state_digest());
    // And it goes on exactly as the original does.
    let later = h.now + 1_000;
    let input = Input::Intent {
        request: 99,
        agent: "z".into(),
        intent: plan("late", 1, json!([set("s1", "svc/web/pool_size", json!(25))])),
    };
    let a = h.c.handle(later, input.clone());
    let b = restored.handle(later, input);
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    assert_eq!(restored.state_digest(), h.c.state_digest());
}

#[test]
fn outstanding_dispatches_are_sent_again_as_they_were() {
    let mut h = H::new();
    let fx = h.propose("a", plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(60))])));
    let sent = dispatches(&fx)[0].clone();
    let restored = Coordinator::restore(&h.c.snapshot().unwrap()).unwrap();
    assert_eq!(restored.outstanding_dispatches(), vec![sent.clone()]);
    h.outcome(&sent.key, StepResult::Succeeded);
    assert!(h.c.outstanding_dispatches().is_empty());
}

#[test]
fn replaying_the_recorded_inputs_reproduces_every_effect() {
    let mut h = H::new();
    let fx = h.propose(
        "a",
        plan(
            "p",
            1,
            json!([
                set("s1", "svc/api/pool_size", json!(60)),
                set("s2", "svc/api/replicas", json!(5))
            ]),
        ),
    );
    let k1 = dispatches(&fx)[0].key.clone();
    h.propose(
        "careful",
        plan("q", 1, json!([set("s1", "svc/web/pool_size", json!(30))])),
    );
    h.lease(
        "x",
        LeaseRequest::Acquire {
            path: path("db"),
            mode: LeaseMode::Shared,
            ttl_ms: 3_000,
            wait: false,
        },
    );
    let k2 = dispatches(&h.outcome(&k1, StepResult::Succeeded))[0].key.clone();
    h.advance(4_000);
    h.outcome(
        &k2,
        StepResult::Drift {
            actual: vec![(path("svc/api/replicas"), Some(Value::Int(7)))],
        },
    );
    let recorded = serde_json::to_string(&h.effects).unwrap();

    // The log holds the inputs as JSON; re-feed them through a fresh coordinator.
    let log = serde_json::to_string(&h.inputs).unwrap();
    let inputs: Vec<(u64, Input)> = serde_json::from_str(&log).unwrap();
    let mut fresh = H::new();
    let mut replayed = Vec::new();
    for (now, input) in inputs {
        replayed.extend(fresh.c.handle(now, input));
    }
    assert_eq!(serde_json::to_string(&replayed).unwrap(), recorded);
    assert_eq!(fresh.c.state_digest(), h.c.state_digest(), "rebuilt state differs");
}

const COMPOUNDING_POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[[rules.drift]]
id = "drift.pool"
paths = ["svc/*/pool_size", "q/*/consumers"]
window_ms = 86400000
max_factor = 2.0
outcome = "reject"
[rules.masking]
window_ms = 3600000
outcome = "needs_approval"
[rules.loop]
window_ms = 600000
max_repeats = 3
"#;

fn restart(id: &str, path: &str) -> Json {
    json!({ "id": id, "kind": "restart", "path": path, "confidence": 0.9,
            "compensation": { "mode": "irreversible", "reason": "restart" } })
}

/// Runs a plan to its end (every dispatch succeeds).
fn run_to_end(h: &mut H, agent: &str, intent: Intent) -> concord_proto::coord::Decision {
    let fx = h.propose(agent, intent);
    let d = decision(&fx).clone();
    let mut next = dispatches(&fx).first().map(|d| d.key.clone());
    while let Some(k) = next {
        let fx = h.outcome(&k, StepResult::Succeeded);
        next = dispatches(&fx).first().map(|d| d.key.clone());
    }
    d
}

#[test]
fn salami_slicing_is_caught_at_the_step_that_crosses_the_window_limit() {
    // A queue world this time: consumers instead of pools.
    let world = r#"
[resources]
"q/orders/consumers" = 10
"q/orders/prefetch" = 5
"#;
    let mut h = H::with(world, COMPOUNDING_POLICY);
    // 10 -> 13 -> 16 -> 19: each step is +30% or less; the window allows 2x (20).
    for (i, v) in [13, 16, 19].iter().enumerate() {
        let d = run_to_end(
            &mut h,
            "tuner",
            plan(&format!("c{i}"), 1, json!([set("s1", "q/orders/consumers", json!(v))])),
        );
        assert_eq!(d.verdict, Verdict::Admit, "{v}: {:#?}", d.reasons);
        h.now += 3_600_000;
    }
    let d = run_to_end(
        &mut h,
        "tuner",
        plan("c3", 1, json!([set("s1", "q/orders/consumers", json!(22))])),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    let r = d
        .preview
        .as_ref()
        .unwrap()
        .invariants
        .iter()
        .find(|r| r.id == "drift.pool")
        .unwrap();
    assert_eq!(r.figures["window_start"], Value::Float(10.0));
    assert_eq!(
        r.figures["earlier_plans"],
        Value::List(vec!["c0 v1".into(), "c1 v1".into(), "c2 v1".into()])
    );
    // A day later the window has moved on: 19 -> 22 is fine.
    h.now += 86_400_000;
    let d = run_to_end(
        &mut h,
        "tuner",
        plan("c4", 1, json!([set("s1", "q/orders/consumers", json!(22))])),
    );
    assert_eq!(d.verdict, Verdict::Admit, "{:#?}", d.reasons);
}

#[test]
fn a_remediation_after_another_agents_deploy_is_flagged_and_linked() {
    let world = r#"
[resources]
"app/ingest/version" = "v7"
"app/ingest/artifact" = "reg/ingest:v7.0.0"
"app/ingest/replicas" = 3
"broker/main/max_channels" = 100
[services.ingest]
path = "app/ingest"
depends_on = ["broker/main"]
"#;
    let mut h = H::with(world, COMPOUNDING_POLICY);
    let deploy = plan(
        "ship-v8",
        1,
        json!([{ "id": "d", "kind": "deploy", "path": "app/ingest",
                 "args": { "version": "v8", "artifact": "reg/ingest:v8.0.0" }, "confidence": 0.9,
                 "compensation": { "mode": "restore" } }]),
    );
    run_to_end(&mut h, "shipper", deploy);
    h.now += 600_000;
    // Ten minutes later another agent scales the service up.
    let fx = h.propose(
        "scaler",
        plan(
            "more",
            1,
            json!([{ "id": "s", "kind": "scale", "path": "app/ingest",
        "args": { "replicas": 6 }, "confidence": 0.9, "compensation": { "mode": "restore" } }]),
        ),
    );
    let d = decision(&fx);
    assert_eq!(d.verdict, Verdict::NeedsApproval);
    let r = d
        .preview
        .as_ref()
        .unwrap()
        .invariants
        .iter()
        .find(|r| r.id == "compounding.masking")
        .unwrap();
    assert_eq!(r.status, concord_proto::preview::RuleStatus::Fail);
    assert_eq!(r.figures["deploy_plan"], Value::Str("ship-v8 v1".into()));
    assert_eq!(r.figures["deploy_agent"], Value::Str("shipper".into()));
    // Raising the broker the service depends on counts too; the same agent's own change does not.
    let fx = h.propose(
        "scaler",
        plan("broker", 1, json!([set("s", "broker/main/max_channels", json!(150))])),
    );
    assert_eq!(decision(&fx).verdict, Verdict::NeedsApproval);
    let fx = h.propose("shipper", plan("own", 1, json!([restart("r", "app/ingest")])));
    assert_eq!(decision(&fx).verdict, Verdict::Admit);
}

#[test]
fn a_remediation_loop_trips_a_breaker_until_an_operator_resumes() {
    let mut h = H::with(WORLD, COMPOUNDING_POLICY);
    for i in 0..3 {
        let d = run_to_end(
            &mut h,
            "uptime",
            plan(&format!("r{i}"), 1, json!([restart("r", "svc/web")])),
        );
        assert_eq!(d.verdict, Verdict::Admit);
        h.now += 60_000;
    }
    let fx = h.propose("uptime", plan("r3", 1, json!([restart("r", "svc/web")])));
    assert_eq!(decision(&fx).verdict, Verdict::Reject);
    assert!(fx.iter().any(|e| matches!(e, Effect::Alert { .. })));
    assert!(events(&fx).iter().any(|e| matches!(e, Event::BreakerTripped { .. })));
    assert_eq!(h.c.breakers().len(), 1);
    // A repeat while the breaker is open is refused with its reasons, and
    // trips nothing new: the log and the alerts name the loop once.
    h.now += 60_000;
    let fx = h.propose("uptime", plan("r3b", 1, json!([restart("r", "svc/web")])));
    let d = decision(&fx);
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(d.reasons.iter().any(|r| r.rule == "breaker.open"), "{:#?}", d.reasons);
    let looped = d
        .reasons
        .iter()
        .find(|r| r.rule == "compounding.loop")
        .expect("loop reason");
    assert!(looped.message.contains("its breaker is open"), "{}", looped.message);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Alert { .. })), "{fx:#?}");
    assert!(!events(&fx).iter().any(|e| matches!(e, Event::BreakerTripped { .. })));
    assert_eq!(h.c.breakers().len(), 1);
    // Hours later the breaker still holds: only an operator lifts it.
    h.now += 7_200_000;
    let fx = h.propose("uptime", plan("r4", 1, json!([restart("r", "svc/web")])));
    let d = decision(&fx);
    assert!(d.reasons.iter().any(|r| r.rule == "breaker.open"), "{:#?}", d.reasons);
    // Other agents and other paths are not affected.
    let fx = h.propose("uptime", plan("r5", 1, json!([restart("r", "svc/api")])));
    assert_eq!(decision(&fx).verdict, Verdict::Admit);
    let fx = h.control(
        "op",
        Control::Resume {
            scope: HaltScope::Agent("uptime".into()),
            reason: short("fixed the probe"),
        },
    );
    assert!(control_reply(&fx).0);
    assert!(h.c.breakers().is_empty());
}

#[test]
fn a_replan_under_a_new_lineage_id_is_still_diffed() {
    let mut h = H::new();
    let fx = h.propose(
        "a",
        plan("first", 1, json!([set("s1", "svc/api/pool_size", json!(60))])),
    );
    let k = dispatches(&fx)[0].key.clone();
    h.outcome(&k, StepResult::Failed { reason: short("no") });
    h.now += 60_000;
    // Same agent, same path, new id, a raised value: scope expansion against `first`.
    let fx = h.propose(
        "a",
        plan("second", 1, json!([set("s1", "svc/api/pool_size", json!(90))])),
    );
    let d = decision(&fx);
    let diff = d
        .preview
        .as_ref()
        .unwrap()
        .plan_diff
        .as_ref()
        .expect("recognised as a re-plan");
    assert_eq!(diff.previous_lineage.as_str(), "first");
    assert_eq!(d.verdict, Verdict::NeedsApproval);
    assert!(d.reasons.iter().any(|r| r.rule == "replan.scope_expansion"));
    // Another agent on the same path is not a re-plan of `first`.
    h.now += 1;
    let fx = h.propose(
        "b",
        plan("third", 1, json!([set("s1", "svc/web/pool_size", json!(21))])),
    );
    assert!(decision(&fx).preview.as_ref().unwrap().plan_diff.is_none());
    // Nor is the same agent much later.
    h.now += Config::default().replan_window_ms + 1;
    let fx = h.propose(
        "a",
        plan("fourth", 1, json!([set("s1", "svc/api/pool_size", json!(55))])),
    );
    assert!(decision(&fx).preview.as_ref().unwrap().plan_diff.is_none());
}

#[test]
fn a_policy_can_require_two_approvers() {
    let policy = format!("{POLICY}\n[[rules.approvals]]\npaths = [\"svc/api/**\"]\napprovers = 2\n");
    let mut h = H::with(WORLD, &policy);
    let fx = h.propose(
        "careful",
        plan("p", 1, json!([set("s1", "svc/api/pool_size", json!(60))])),
    );
    let d = decision(&fx).clone();
    let approve = || Control::Approve {
        lineage: Id::parse("p").unwrap(),
        version: 1,
        plan_hash: d.plan_hash.clone(),
        material_hash: d.material_hash.clone(),
        reason: short("ok"),
    };
    let fx = h.control("alice", approve());
    let (ok, msg) = control_reply(&fx);
    assert!(ok && msg.contains("1 of 2"), "{msg}");
    assert!(dispatches(&fx).is_empty());
    let (ok, msg) = control_reply(&h.control("alice", approve()));
    assert!(!ok && msg.contains("another operator"), "{msg}");
    let fx = h.control("bob", approve());
    assert!(control_reply(&fx).0);
    assert_eq!(dispatches(&fx)[0].key.lineage.as_str(), "p");
}

/// A policy change drops the world's indexes built for the policy before
/// it: changing back must not bring back an index that missed the steps
/// applied in between (a stale index gives CEL rules and budgets old values;
/// debug builds check every use of an index against the world).
#[test]
fn a_policy_changed_and_changed_back_judges_the_world_as_it_is() {
    let mut h = H::new();
    let fx = h.propose(
        "resource",
        plan("web", 1, json!([set("s1", "svc/web/pool_size", json!(60))])),
    );
    assert_eq!(decision(&fx).verdict, Verdict::Admit);
    let key = dispatches(&fx)[0].key.clone();
    // The step succeeds under another policy, with no CEL rule and no budget.
    h.c.set_policy(Policy::from_toml_str("[defaults]\nautonomy = \"bounded\"\n").unwrap());
    h.outcome(&key, StepResult::Succeeded);
    h.c.set_policy(Policy::from_toml_str(POLICY).unwrap());
    // api 50 x 4 + web 60 x 2 = 320 connections, within 800. Raising the
    // api's pool to 170 makes 800: within; to 171, 804: over. Both judged on
    // the web pool of 60 the step left.
    let fx = h.propose(
        "resource",
        plan("api", 1, json!([set("s1", "svc/api/pool_size", json!(170))])),
    );
    assert_eq!(decision(&fx).verdict, Verdict::Admit, "{:?}", decision(&fx).reasons);
    let key = dispatches(&fx)[0].key.clone();
    h.outcome(&key, StepResult::Succeeded);
    let fx = h.propose(
        "resource",
        plan("api", 2, json!([set("s1", "svc/api/pool_size", json!(171))])),
    );
    assert_eq!(decision(&fx).verdict, Verdict::Reject, "{:?}", decision(&fx).reasons);
}

/// A CEL rule binds only what its `reads` match, from the world and from
/// the plans in flight alike: a running plan's change to another path under
/// the same prefix is not bound (debug builds check every binding against a
/// visit of the projected world).
#[test]
fn a_cel_rule_binds_only_what_it_reads_of_the_plans_in_flight() {
    let mut h = H::new();
    let fx = h.propose(
        "deploy",
        plan("ver", 1, json!([set("s1", "svc/api/version", json!("v2"))])),
    );
    assert_eq!(decision(&fx).verdict, Verdict::Admit);
    // Still running when the next plan is decided: its change is projected.
    let fx = h.propose(
        "resource",
        plan("web", 1, json!([set("s1", "svc/web/pool_size", json!(30))])),
    );
    assert_eq!(decision(&fx).verdict, Verdict::Admit, "{:?}", decision(&fx).reasons);
    // With the web pool at 30 (projected), 20 web replicas make 50 x 4 +
    // 30 x 20 = 800 connections, the most the rule allows; 21 make 830.
    let fx = h.propose(
        "scaler",
        plan("web-r", 1, json!([set("s1", "svc/web/replicas", json!(20))])),
    );
    assert_eq!(decision(&fx).verdict, Verdict::Admit, "{:?}", decision(&fx).reasons);
    let fx = h.propose(
        "scaler2",
        plan("web-r2", 1, json!([set("s1", "svc/web/replicas", json!(21))])),
    );
    let d = decision(&fx);
    assert_eq!(d.verdict, Verdict::Reject, "{:?}", d.reasons);
    assert!(d.reasons.iter().any(|r| r.rule == "coupling.db"), "{:?}", d.reasons);
}
