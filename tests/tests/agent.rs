//! The agent SDK against a real NATS server and a live coordinator:
//! propose, await a human's decision by notice, approve and reject, re-plan,
//! lease loss (refused, lapsed, and cut off from the coordinator), executors
//! that refuse stale tokens and dedupe on keys across a restart and across
//! two members of a queue group, a key left claimed by a member that died
//! mid-apply taken over, compensation on failure, retry with the same key
//! across a server restart; the typed errors of a coordinator nobody hears
//! (none listening, one partitioned away unnoticed, the agent itself cut
//! off); a plan's trace from the agent through the decision to its executor;
//! the world replica: it converges after plans run, catches up after a
//! partition with only what it missed, follows a rotation and a coordinator
//! restart, and cannot write.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_agent::executor::{Executor, ExecutorConfig, Step, StepError, StepHandler};
use concord_agent::{
    Agent, AgentConfig, AgentError, HumanDecision, LeaseGuard, LeaseLost, SagaEnd, WorldReplica, next_version,
};
use concord_core::worlddoc::{Frame, FrameKind};
use concord_nats::client::ConcordClient;
use concord_nats::wire::{Answer, ErrorReply, Query, WorldStatus};
use concord_proto::coord::{
    Control, DispatchKey, LeaseMode, LeaseReply, LeaseRequest, Phase, StepDispatch, StepOutcome, StepResult,
};
use concord_proto::{Id, Intent, Op, ResourcePath, Short, StepKind, Value, Verdict};
use concord_tests::live::{Live, Relay, example, root};
use futures::future::BoxFuture;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
/// For the runs that feed the coordinator thousands of inputs (a debug build
/// on a loaded machine takes its time).
const SLOW_WAIT: Duration = Duration::from_secs(90);

/// A live coordinator whose log stream reserves little of the server's store
/// (JetStream refuses a stream whose bound exceeds the free disk).
async fn start() -> Live {
    Live::start_with(|c| c.log.max_bytes = 256 * 1024 * 1024).await
}

/// A system of named values: `set` writes one, `deploy` writes `<path>/version`.
/// Steps on a path listed in `failing` fail. Each applied step's trace
/// context is kept in `traces`.
#[derive(Default)]
struct Values {
    values: Mutex<BTreeMap<String, Value>>,
    applied: Mutex<Vec<String>>,
    traces: Mutex<Vec<Option<String>>>,
    failing: Vec<String>,
}

impl Values {
    fn new(init: &[(&str, Value)], failing: &[&str]) -> Arc<Values> {
        Arc::new(Values {
            values: Mutex::new(init.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()),
            applied: Mutex::new(Vec::new()),
            traces: Mutex::new(Vec::new()),
            failing: failing.iter().map(|s| s.to_string()).collect(),
        })
    }
    fn get(&self, path: &str) -> Option<Value> {
        self.values.lock().unwrap().get(path).cloned()
    }
}

impl StepHandler for Values {
    fn read<'a>(&'a self, path: &'a ResourcePath) -> BoxFuture<'a, Option<Value>> {
        Box::pin(async move { self.get(path.as_str()) })
    }
    fn apply<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let path = step.path().to_string();
            if self.failing.contains(&path) {
                return Err(StepError::from(format!("{path} refused the change")));
            }
            self.applied.lock().unwrap().push(step.dispatch.key.text());
            self.traces.lock().unwrap().push(step.traceparent.clone());
            let mut v = self.values.lock().unwrap();
            match &step.op {
                Op::Set(a) => {
                    v.insert(path, a.value.clone());
                }
                Op::Deploy(a) => {
                    v.insert(format!("{path}/version"), Value::Str(a.version.to_string()));
                }
                other => return Err(format!("cannot apply {:?}", other.kind()).into()),
            }
            Ok(())
        })
    }
}

fn world() -> Vec<(&'static str, Value)> {
    vec![
        ("svc/api/pool_size", Value::Int(50)),
        ("svc/worker/pool_size", Value::Int(20)),
        ("svc/api/version", Value::Str("v1.4.0".into())),
    ]
}

async fn executor(live: &Live, values: &Arc<Values>) -> concord_agent::executor::Running {
    Executor::new(ExecutorConfig::new(live.server.url(), "default"))
        .handle(StepKind::Set, values.clone())
        .handle(StepKind::Deploy, values.clone())
        .start()
        .await
        .expect("the executor starts")
}

async fn agent(live: &Live, name: &str) -> Agent {
    Agent::connect(AgentConfig::new(live.server.url(), name))
        .await
        .expect("the agent connects")
}

fn plan(v: serde_json::Value) -> Intent {
    concord_proto::decode_intent(v.to_string().as_bytes()).expect("a valid plan")
}

fn pool_plan(lineage: &str, value: i64) -> Intent {
    plan(json!({
        "protocol": 1, "lineage": lineage, "version": 1, "goal": "more headroom",
        "steps": [{ "id": "s1", "kind": "set", "path": "svc/api/pool_size", "args": { "value": value },
                    "confidence": 0.9, "compensation": { "mode": "restore" } }]
    }))
}

async fn approve(live: &Live, lineage: &str, version: u32) -> bool {
    let ops = live.client("alice").await;
    let concord_nats::wire::Answer::Plans { plans, .. } =
        ops.query("alice", &concord_nats::wire::Query::Pending).await.unwrap()
    else {
        panic!("a plans answer")
    };
    let p = plans
        .iter()
        .find(|p| p.lineage.as_str() == lineage && p.version == version)
        .expect("the plan is pending");
    ops.control(
        "alice",
        &Control::Approve {
            lineage: p.lineage.clone(),
            version,
            plan_hash: p.plan_hash.clone(),
            material_hash: p.material_hash.clone(),
            reason: Short::parse("looked at the preview").unwrap(),
        },
    )
    .await
    .unwrap()
    .ok
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admitted_plan_runs_through_the_sdk_executor_and_the_agent_hears_it_end() {
    let live = start().await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    let p = concord_proto::decode_intent(&example("pool-60")).unwrap();
    let d = resource.propose(&p).await.unwrap();
    assert_eq!(d.verdict, Verdict::Admit, "{:?}", d.reasons);
    assert!(d.preview.is_some());
    let end = resource.await_saga(&p.lineage, p.version, WAIT).await.unwrap();
    assert_eq!(end, SagaEnd::Completed);
    assert_eq!(values.get("svc/api/pool_size"), Some(Value::Int(60)));
    assert_eq!(values.applied.lock().unwrap().len(), 1);
    // The same plan again is the same request: the original decision.
    let again = resource.propose(&p).await.unwrap();
    assert!(again.duplicate, "a retry with the same key gets the original decision");
    assert_eq!(again.verdict, Verdict::Admit);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_plan_is_awaited_without_polling_and_approved_or_rejected_then_replanned() {
    let live = start().await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;

    // 50 -> 120 is 2.4x in one step: held for a human.
    let p = pool_plan("pool-120", 120);
    let d = resource.propose(&p).await.unwrap();
    assert_eq!(d.verdict, Verdict::NeedsApproval, "{:?}", d.reasons);
    // Nobody decides: the wait ends with a typed error, not a hang.
    let early = resource
        .await_decision(&p.lineage, p.version, Duration::from_millis(300))
        .await;
    assert!(matches!(early, Err(AgentError::NoDecision { .. })), "{early:?}");
    let waiting = {
        let r = resource.clone();
        let l = p.lineage.clone();
        tokio::spawn(async move { r.await_decision(&l, 1, WAIT).await })
    };
    assert!(approve(&live, "pool-120", 1).await);
    let decided = waiting.await.unwrap().unwrap();
    assert!(
        matches!(&decided, HumanDecision::Approved { operator, .. } if operator == "alice"),
        "{decided:?}"
    );
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    assert_eq!(values.get("svc/api/pool_size"), Some(Value::Int(120)));

    // An agent the policy does not list waits for a human on everything.
    // Rejected by an operator, it hears why and re-plans as v2, which is approved.
    let newbie = agent(&live, "newbie").await;
    let p = pool_plan("newbie-pool", 130);
    let d = newbie.propose(&p).await.unwrap();
    assert_eq!(d.verdict, Verdict::NeedsApproval, "{:?}", d.reasons);
    let ops = live.client("bob").await;
    let r = ops
        .control(
            "bob",
            &Control::Reject {
                lineage: p.lineage.clone(),
                version: 1,
                reason: Short::parse("too big a step").unwrap(),
            },
        )
        .await
        .unwrap();
    assert!(r.ok, "{}", r.message);
    let decided = newbie.await_decision(&p.lineage, 1, WAIT).await.unwrap();
    assert_eq!(
        decided,
        HumanDecision::Rejected {
            operator: "bob".into(),
            reason: "too big a step".into()
        }
    );
    let mut v2 = next_version(&p);
    v2.steps[0].op = Op::Set(concord_proto::SetArgs { value: Value::Int(125) });
    assert_eq!(v2.version, 2);
    let d2 = newbie.propose(&v2).await.unwrap();
    assert_eq!(d2.verdict, Verdict::NeedsApproval, "{:?}", d2.reasons);
    assert!(approve(&live, "newbie-pool", 2).await);
    assert!(matches!(
        newbie.await_decision(&v2.lineage, 2, WAIT).await.unwrap(),
        HumanDecision::Approved { .. }
    ));
    assert_eq!(
        newbie.await_saga(&v2.lineage, 2, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    assert_eq!(values.get("svc/api/pool_size"), Some(Value::Int(125)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_guard_renews_and_its_loss_is_seen_at_once() {
    let live = start().await;
    let resource = agent(&live, "resource").await;
    let deploy = agent(&live, "deploy").await;
    let path = ResourcePath::parse("svc/api").unwrap();
    let ttl = Duration::from_millis(600);
    let mut guard = LeaseGuard::acquire(&resource, &path, LeaseMode::Exclusive, ttl)
        .await
        .unwrap();
    // Held past several ttls: the renewals keep it.
    tokio::time::sleep(ttl * 3).await;
    assert!(guard.is_held());
    let other = deploy
        .lease(&LeaseRequest::Acquire {
            path: path.clone(),
            mode: LeaseMode::Exclusive,
            ttl_ms: 1000,
            wait: false,
        })
        .await
        .unwrap();
    assert!(
        matches!(&other, LeaseReply::Refused { holder: Some(h), .. } if h.contains("`resource`")),
        "{other:?}"
    );
    // The lease is released behind the guard's back: the next renewal is
    // refused and the guard says so.
    resource
        .lease(&LeaseRequest::Release { lease: guard.id() })
        .await
        .unwrap();
    let lost = tokio::time::timeout(WAIT, guard.lost())
        .await
        .expect("the loss is seen");
    assert!(matches!(lost, LeaseLost::Refused { .. }), "{lost:?}");
    assert!(!guard.is_held());

    // Without renewals the lease lapses at its ttl, and the guard says so by then.
    let mut short = LeaseGuard::acquire_with(&resource, &path, LeaseMode::Exclusive, ttl, false)
        .await
        .unwrap();
    let lost = tokio::time::timeout(WAIT, short.lost())
        .await
        .expect("the lapse is seen");
    assert_eq!(lost, LeaseLost::Unconfirmed { last_error: None });
    drop(short);

    // Dropping a held guard releases it: another agent gets the path.
    let guard = LeaseGuard::acquire(&resource, &path, LeaseMode::Exclusive, ttl)
        .await
        .unwrap();
    drop(guard);
    assert!(
        granted_within(&deploy, &path, Duration::from_secs(2)).await,
        "the dropped guard released the lease"
    );
}

/// Whether `agent` is granted an exclusive lease on `path` within `within`,
/// asking again until then.
async fn granted_within(agent: &Agent, path: &ResourcePath, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = agent
            .lease(&LeaseRequest::Acquire {
                path: path.clone(),
                mode: LeaseMode::Exclusive,
                ttl_ms: 1000,
                wait: false,
            })
            .await
            .unwrap();
        if matches!(r, LeaseReply::Granted { .. }) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_guard_cut_off_from_the_coordinator_reports_the_loss_within_the_ttl() {
    let live = start().await;
    let relay = Relay::to(live.server.port()).await;
    // Default request timeouts and retries: a renewal outlasts the lease.
    let away = agent_at(&relay.url(), "resource").await;
    let path = ResourcePath::parse("svc/api").unwrap();
    let ttl = Duration::from_millis(900);
    let mut guard = LeaseGuard::acquire(&away, &path, LeaseMode::Exclusive, ttl)
        .await
        .unwrap();
    tokio::time::sleep(ttl * 2).await;
    assert!(guard.is_held());

    // Cut off: no renewal is confirmed any more, and no notice can arrive.
    relay.cut();
    let cut = tokio::time::Instant::now();
    let lost = tokio::time::timeout(WAIT, guard.lost())
        .await
        .expect("the loss is seen while cut off");
    let after = cut.elapsed();
    assert!(matches!(lost, LeaseLost::Unconfirmed { .. }), "{lost:?}");
    assert!(!guard.is_held());
    // The last confirmed renewal was sent before the cut: its ttl ends at
    // most one ttl after it (with a little room for a loaded scheduler).
    assert!(
        after < ttl + Duration::from_millis(500),
        "reported {after:?} after the cut"
    );

    // The coordinator lets it lapse too: another agent gets the path.
    let deploy = agent(&live, "deploy").await;
    assert!(granted_within(&deploy, &path, WAIT).await, "the lease never lapsed");
}

async fn dispatch(live: &Live, d: &StepDispatch) -> StepOutcome {
    let nats = live.nats().await;
    let msg = nats
        .request(
            live.client("x").await.subjects.exec("default"),
            serde_json::to_vec(d).unwrap().into(),
        )
        .await
        .expect("the executor answers");
    serde_json::from_slice(&msg.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_executor_still_refuses_stale_tokens_and_dedupes_keys() {
    let live = start().await;
    let values = Values::new(&world(), &[]);
    let exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    let p = concord_proto::decode_intent(&example("pool-60")).unwrap();
    assert_eq!(resource.propose(&p).await.unwrap().verdict, Verdict::Admit);
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    let applied = values.applied.lock().unwrap().clone();
    assert_eq!(applied, vec!["resource-pool-nudge/1/nudge-pool/do/1".to_string()]);

    // The executor dies and a new one starts (fresh memory, same bucket).
    exec.stop();
    let fresh = Values::new(&[("svc/api/pool_size", Value::Int(60))], &[]);
    let _exec = executor(&live, &fresh).await;

    // The coordinator's dispatch again (same key): the recorded outcome, not applied again.
    let key = DispatchKey {
        lineage: Id::parse("resource-pool-nudge").unwrap(),
        version: 1,
        step: Id::parse("nudge-pool").unwrap(),
        phase: Phase::Do,
        attempt: 1,
    };
    let mut d = StepDispatch {
        key: key.clone(),
        path: ResourcePath::parse("svc/api/pool_size").unwrap(),
        kind: StepKind::Set,
        args: json!({ "value": 60 }),
        fencing_token: 1,
        expected_before: vec![],
        timeout_ms: 5000,
    };
    let o = dispatch(&live, &d).await;
    assert_eq!(o.result, StepResult::Succeeded);
    assert!(
        fresh.applied.lock().unwrap().is_empty(),
        "a deduped key is not applied again"
    );

    // A new key with a token older than the one the first executor recorded: refused.
    d.key.step = Id::parse("late-writer").unwrap();
    d.fencing_token = 0;
    let o = dispatch(&live, &d).await;
    assert!(
        matches!(o.result, StepResult::StaleToken { seen } if seen >= 1),
        "{:?}",
        o.result
    );
    assert_eq!(fresh.get("svc/api/pool_size"), Some(Value::Int(60)), "nothing applied");

    // Compare-and-set: the executor finds another value than expected.
    d.key.step = Id::parse("cas").unwrap();
    d.fencing_token = 100;
    d.expected_before = vec![(d.path.clone(), Some(Value::Int(50)))];
    let o = dispatch(&live, &d).await;
    assert_eq!(
        o.result,
        StepResult::Drift {
            actual: vec![(d.path.clone(), Some(Value::Int(60)))]
        }
    );

    // A freeze on the path: the executor reads the halt and applies nothing.
    let ops = live.client("alice").await;
    let r = ops
        .control(
            "alice",
            &Control::Halt {
                scope: concord_proto::coord::HaltScope::Path(ResourcePath::parse("svc/api").unwrap()),
                grade: concord_proto::coord::HaltGrade::Freeze,
                reason: Short::parse("incident").unwrap(),
            },
        )
        .await
        .unwrap();
    assert!(r.ok);
    d.expected_before = vec![];
    let mut halted = None;
    for i in 0..100 {
        // The halt reaches the executors' bucket just after the log.
        d.key.step = Id::parse(&format!("frozen{i}")).unwrap();
        if let StepResult::Failed { reason } = dispatch(&live, &d).await.result {
            halted = Some(reason.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let halted = halted.expect("the executor refuses under a freeze");
    assert!(halted.contains("halted (freeze): incident"), "{halted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_members_of_a_queue_group_refuse_a_stale_token_and_dedupe_a_key_whichever_gets_it() {
    let live = start().await;
    let system = Values::new(&world(), &[]);
    let (a, b) = (executor(&live, &system).await, executor(&live, &system).await);
    let members: std::collections::BTreeSet<String> = [a.member().to_string(), b.member().to_string()].into();
    assert_eq!(members.len(), 2);
    let nats = live.nats().await;
    let subject = live.client("x").await.subjects.exec("default");
    // One dispatch: which member answered, and what.
    let send = async |d: &StepDispatch| {
        let m = nats
            .request(subject.clone(), serde_json::to_vec(d).unwrap().into())
            .await
            .expect("a member answers");
        let member = m
            .headers
            .as_ref()
            .and_then(|h| h.get(concord_agent::executor::MEMBER_HEADER))
            .expect("the answer names its member")
            .to_string();
        (member, serde_json::from_slice::<StepOutcome>(&m.payload).unwrap())
    };
    let mut d = StepDispatch {
        key: DispatchKey {
            lineage: Id::parse("two-members").unwrap(),
            version: 1,
            step: Id::parse("token-5").unwrap(),
            phase: Phase::Do,
            attempt: 1,
        },
        path: ResourcePath::parse("svc/api/pool_size").unwrap(),
        kind: StepKind::Set,
        args: json!({ "value": 60 }),
        fencing_token: 5,
        expected_before: vec![],
        timeout_ms: 5000,
    };
    // Token 5, applied by whichever member gets it; the same key again
    // until both members have answered it: the recorded outcome each time.
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let (member, o) = send(&d).await;
        assert_eq!(o.result, StepResult::Succeeded);
        answered.insert(member);
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(answered, members, "both members answered the key");
    assert_eq!(
        system.applied.lock().unwrap().len(),
        1,
        "applied once across the members"
    );

    // Token 4 on new keys until both members have had one: each refuses it.
    d.fencing_token = 4;
    d.args = json!({ "value": 70 });
    let mut refused = std::collections::BTreeSet::new();
    for i in 0..64 {
        d.key.step = Id::parse(&format!("token-4-{i}")).unwrap();
        let (member, o) = send(&d).await;
        assert_eq!(o.result, StepResult::StaleToken { seen: 5 }, "{member}");
        refused.insert(member);
        if refused.len() == 2 {
            break;
        }
    }
    assert_eq!(refused, members, "both members refused a stale token");
    assert_eq!(system.get("svc/api/pool_size"), Some(Value::Int(60)));
    assert_eq!(system.applied.lock().unwrap().len(), 1);
}

/// A handler over a shared system whose first `apply` stalls for good (after
/// applying, if `after_apply`), as a member that dies mid-apply; its `verify`
/// checks that a `set` took effect.
struct Stalling {
    system: Arc<Values>,
    after_apply: bool,
    stall: std::sync::atomic::AtomicBool,
    stalled: tokio::sync::Notify,
}

impl Stalling {
    fn new(system: &Arc<Values>, after_apply: bool) -> Arc<Stalling> {
        Arc::new(Stalling {
            system: system.clone(),
            after_apply,
            stall: std::sync::atomic::AtomicBool::new(true),
            stalled: tokio::sync::Notify::new(),
        })
    }
}

impl StepHandler for Stalling {
    fn read<'a>(&'a self, path: &'a ResourcePath) -> BoxFuture<'a, Option<Value>> {
        self.system.read(path)
    }
    fn apply<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            if !self.stall.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return self.system.apply(step).await;
            }
            if self.after_apply {
                self.system.apply(step).await?;
            }
            self.stalled.notify_one();
            std::future::pending().await
        })
    }
    fn verify<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            match &step.op {
                Op::Set(a) if self.system.get(step.path().as_str()) == Some(a.value.clone()) => Ok(()),
                Op::Set(_) => Err("the value is not set".into()),
                _ => Ok(()),
            }
        })
    }
}

/// Runs a plan whose step's executor stalls in `apply` (after applying, if
/// `after_apply`) while a second member is up, then dies; returns the
/// system after the saga.
async fn a_member_dies_mid_apply(after_apply: bool) -> Arc<Values> {
    // The coordinator sends an unanswered dispatch again every 300 ms.
    let live = Live::start_with(|c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.limits.dispatch_retry_ms = 300;
    })
    .await;
    let system = Values::new(&world(), &[]);
    let handler = Stalling::new(&system, after_apply);
    let start_member = || {
        Executor::new(ExecutorConfig::new(live.server.url(), "default"))
            .handle(StepKind::Set, handler.clone())
            .start()
    };
    let first = start_member().await.unwrap();
    let resource = agent(&live, "resource").await;
    let p = pool_plan("pool-60", 60);
    assert_eq!(resource.propose(&p).await.unwrap().verdict, Verdict::Admit);
    tokio::time::timeout(WAIT, handler.stalled.notified())
        .await
        .expect("the first member claims the step and stalls in apply");

    // A second member gets some of the dispatch's retries meanwhile: the
    // first says it is applying the key, so nobody answers and nothing is
    // applied twice.
    let second = start_member().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let applied = usize::from(after_apply);
    assert_eq!(system.applied.lock().unwrap().len(), applied);
    assert!(
        resource
            .notices(&p.lineage, 1)
            .iter()
            .all(|n| n.event != concord_proto::coord::NoticeKind::Completed)
    );

    // The first member dies with the key claimed: the second takes it over
    // on the next retry, and the saga completes.
    first.stop();
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    drop(second);
    system
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_left_claimed_by_a_member_that_died_before_applying_is_applied_by_another() {
    let system = a_member_dies_mid_apply(false).await;
    assert_eq!(system.get("svc/api/pool_size"), Some(Value::Int(60)));
    assert_eq!(*system.applied.lock().unwrap(), vec!["pool-60/1/s1/do/1".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_left_claimed_by_a_member_that_died_after_applying_is_verified_not_applied_again() {
    let system = a_member_dies_mid_apply(true).await;
    assert_eq!(system.get("svc/api/pool_size"), Some(Value::Int(60)));
    assert_eq!(
        *system.applied.lock().unwrap(),
        vec!["pool-60/1/s1/do/1".to_string()],
        "applied once, by the member that died"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_step_is_compensated_by_the_executor() {
    let live = start().await;
    let values = Values::new(&world(), &["svc/worker/pool_size"]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    let p = plan(json!({
        "protocol": 1, "lineage": "two-pools", "version": 1, "goal": "a little more headroom",
        "steps": [
            { "id": "api", "kind": "set", "path": "svc/api/pool_size", "args": { "value": 55 },
              "confidence": 0.9, "compensation": { "mode": "restore" } },
            { "id": "worker", "kind": "set", "path": "svc/worker/pool_size", "args": { "value": 22 },
              "confidence": 0.9, "compensation": { "mode": "restore" } }
        ]
    }));
    let d = resource.propose(&p).await.unwrap();
    assert_eq!(d.verdict, Verdict::Admit, "{:?}", d.reasons);
    let end = resource.await_saga(&p.lineage, 1, WAIT).await.unwrap();
    assert!(
        matches!(&end, SagaEnd::Compensated { reason } if reason.contains("refused the change")),
        "{end:?}"
    );
    let applied = values.applied.lock().unwrap().clone();
    assert_eq!(applied, vec!["two-pools/1/api/do/1", "two-pools/1/api/undo/1"]);
    assert_eq!(values.get("svc/api/pool_size"), Some(Value::Int(50)), "restored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proposal_survives_a_server_restart_with_the_same_key() {
    let mut live = start().await;
    let resource = agent(&live, "resource").await;
    let p = pool_plan("pool-70", 70);
    let first = resource.propose(&p).await.unwrap();
    assert_eq!(first.verdict, Verdict::Admit, "{:?}", first.reasons);

    // The server goes away; a proposal sent meanwhile is retried with the
    // same key until the server and the coordinator are back.
    live.server.kill();
    let r = resource.clone();
    let again = tokio::spawn(async move { r.propose(&pool_plan("pool-70", 70)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    live.server.restart();
    let again = again.await.unwrap().expect("answered after the restart");
    assert!(again.duplicate, "the retry got the original decision");
    assert_eq!(again.verdict, first.verdict);
    assert_eq!(again.plan_hash, first.plan_hash);

    // A malformed plan is a typed error naming the field and the rule.
    let bad = json!({
        "protocol": 1, "lineage": "bad", "version": 1, "goal": "g",
        "steps": [{ "id": "s1", "kind": "set", "path": "svc/api/pool_size", "args": {},
                    "confidence": 0.9, "compensation": { "mode": "restore" } }]
    });
    let e = resource.propose_bytes(bad.to_string().into_bytes()).await.unwrap_err();
    assert!(
        matches!(&e, AgentError::Decode { field, rule, .. } if field == "steps[0].args.value" && rule == "required"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_halt_is_a_typed_error() {
    let live = start().await;
    let ops = live.client("alice").await;
    let r = ops
        .control(
            "alice",
            &Control::Halt {
                scope: concord_proto::coord::HaltScope::Agent("resource".into()),
                grade: concord_proto::coord::HaltGrade::Freeze,
                reason: Short::parse("incident").unwrap(),
            },
        )
        .await
        .unwrap();
    assert!(r.ok);
    let resource = agent(&live, "resource").await;
    let e = resource.propose(&pool_plan("pool-55", 55)).await.unwrap_err();
    assert!(matches!(e, AgentError::Halted { .. }), "{e:?}");
}

/// An agent at `url` that gives up quickly: two attempts of 300 ms each.
async fn impatient(url: &str, name: &str) -> Agent {
    let mut cfg = AgentConfig::new(url, name);
    cfg.request_timeout = Duration::from_millis(300);
    cfg.attempts = 2;
    Agent::connect(cfg).await.expect("the agent connects")
}

#[tokio::test(flavor = "multi_thread")]
async fn no_coordinator_listening_is_a_typed_error_and_a_retry_after_it_is_back_gets_the_decision() {
    let mut live = start().await;
    let resource = impatient(&live.server.url(), "resource").await;
    let p = pool_plan("pool-65", 65);
    let first = resource.propose(&p).await.unwrap();
    assert_eq!(first.verdict, Verdict::Admit, "{:?}", first.reasons);

    // The coordinator stops: nobody listens on the intent subject, and the
    // server says so at once (no waiting out a timeout).
    live.down().await;
    let p2 = pool_plan("pool-66", 66);
    let e = resource.propose(&p2).await.unwrap_err();
    assert_eq!(
        e,
        AgentError::NoCoordinator("concord.v1.default.intent.resource".into())
    );

    // Back up: the same plan again is decided, once.
    live.up().await;
    let d = resource.propose(&p2).await.unwrap();
    assert!(!d.duplicate, "nothing was decided while nobody listened");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_partitioned_away_unnoticed_is_a_timeout_and_the_same_key_gets_one_decision() {
    // The coordinator reaches the server through a relay that the test
    // stalls: its connection stays open, so the server still routes intents
    // to it, and nothing comes back.
    let server = concord_testkit::NatsServer::start();
    let relay = Relay::to(server.port()).await;
    let url = relay.url();
    let live = Live::start_on(server, |c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.nats = vec![url];
    })
    .await;
    let resource = impatient(&live.server.url(), "resource").await;
    let first = resource.propose(&pool_plan("pool-65", 65)).await.unwrap();
    assert_eq!(first.verdict, Verdict::Admit, "{:?}", first.reasons);

    relay.stall();
    let p = pool_plan("pool-66", 66);
    let e = resource.propose(&p).await.unwrap_err();
    assert_eq!(
        e,
        AgentError::TimedOut {
            subject: "concord.v1.default.intent.resource".into(),
            attempts: 2
        }
    );

    // The partition heals: the held requests reach the coordinator, and a
    // retry with the same key gets the decision they produced.
    relay.heal();
    let mut cfg = AgentConfig::new(live.server.url(), "resource");
    cfg.request_timeout = Duration::from_secs(5);
    let patient = Agent::connect(cfg).await.unwrap();
    let d = patient.propose(&p).await.unwrap();
    assert!(d.duplicate, "the held attempts were decided first");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cut_off_from_the_server_is_disconnected_then_retries_with_the_same_key() {
    let live = start().await;
    let relay = Relay::to(live.server.port()).await;
    let away = impatient(&relay.url(), "resource").await;
    assert_eq!(
        away.propose(&pool_plan("pool-65", 65)).await.unwrap().verdict,
        Verdict::Admit
    );

    relay.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    while away.nats().connection_state() == async_nats::connection::State::Connected {
        assert!(tokio::time::Instant::now() < deadline, "the agent never saw the cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = pool_plan("pool-66", 66);
    let e = away.propose(&p).await.unwrap_err();
    assert!(matches!(e, AgentError::Disconnected(_)), "{e:?}");

    // Reconnected, the same plan is decided once.
    relay.heal();
    let deadline = tokio::time::Instant::now() + WAIT;
    let d = loop {
        match away.propose(&p).await {
            Ok(d) => break d,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "never answered: {e:?}"),
        }
    };
    assert!(!d.plan_hash.is_empty(), "{d:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn under_generated_permissions_the_sdk_agent_and_executor_work_with_their_own_credentials() {
    use concord_nats::permissions::{AgentsFile, generate};
    let file: AgentsFile = toml::from_str(
        "[[agents]]\nname = \"resource\"\n[[agents]]\nname = \"deploy\"\n[[operators]]\nname = \"alice\"\n[[executors]]\nname = \"default\"\n",
    )
    .unwrap();
    let (users, conf) = generate(&file, false).unwrap();
    let server = concord_testkit::NatsServer::with_config(&conf);
    let dir = server.dir().to_path_buf();
    let seed = |role: &str, name: &str| {
        let u = users.iter().find(|u| u.role == role && u.name == name).unwrap();
        let p = dir.join(format!("{role}-{name}.nk"));
        std::fs::write(&p, &u.seed).unwrap();
        p
    };
    let coordinator = seed("coordinator", "concord");
    let live = Live::start_on(server, |c| {
        c.credentials.nkey_seed_file = Some(coordinator);
        // A small log: this server's store reserves what the stream asks for.
        c.log.max_bytes = 256 * 1024 * 1024;
    })
    .await;
    let url = live.server.url();

    // The executor keeps its tokens in its own KV bucket, with its own user.
    let values = Values::new(&world(), &[]);
    let mut ecfg = ExecutorConfig::new(url.clone(), "default");
    ecfg.nkey_seed_file = Some(seed("executor", "default"));
    let _exec = Executor::new(ecfg)
        .handle(StepKind::Set, values.clone())
        .start()
        .await
        .expect("the executor starts under its permissions");

    let mut cfg = AgentConfig::new(url.clone(), "resource");
    cfg.nkey_seed_file = Some(seed("agent", "resource"));
    let resource = Agent::connect(cfg).await.unwrap();
    let p = pool_plan("perm-pool", 60);
    let d = resource.propose(&p).await.unwrap();
    assert_eq!(d.verdict, Verdict::Admit, "{:?}", d.reasons);
    // The saga's end reaches the agent on its own notify subject.
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    assert_eq!(values.get("svc/api/pool_size"), Some(Value::Int(60)));

    // Another agent does not hear resource's notices: its user may not subscribe there.
    let mut cfg = AgentConfig::new(url.clone(), "deploy");
    cfg.nkey_seed_file = Some(seed("agent", "deploy"));
    let deploy = Agent::connect(cfg).await.unwrap();
    let mut snoop = deploy
        .nats()
        .subscribe("concord.v1.default.notify.resource")
        .await
        .unwrap();
    let p2 = pool_plan("perm-pool-2", 70);
    assert_eq!(resource.propose(&p2).await.unwrap().verdict, Verdict::Admit);
    assert_eq!(
        resource.await_saga(&p2.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    let got = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut snoop)).await;
    assert!(
        !matches!(got, Ok(Some(_))),
        "deploy must not read resource's notices: {got:?}"
    );

    // Each agent's world replica syncs on its own subjects; deploy cannot
    // read resource's frames.
    let mut snoop = deploy
        .nats()
        .subscribe("concord.v1.default.world.resource")
        .await
        .unwrap();
    let w = resource.world().await.unwrap();
    w.wait_for(WAIT, |r| {
        r.resource("svc/api/pool_size").filter(|v| *v == Value::Int(70))
    })
    .await
    .unwrap();
    let d = deploy.world().await.unwrap();
    d.await_in_sync(WAIT).await.unwrap();
    assert_eq!(d.resources(), w.resources());
    let got = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut snoop)).await;
    assert!(
        !matches!(got, Ok(Some(_))),
        "deploy must not read resource's world frames: {got:?}"
    );
}

// ---- the world replica ------------------------------------------------------------

async fn world_status(ops: &ConcordClient) -> WorldStatus {
    match ops.query("alice", &Query::Status).await.unwrap() {
        Answer::Status(s) => s.world.expect("the status names the world document"),
        other => panic!("a status answer: {other:?}"),
    }
}

/// Waits until the replica holds exactly the coordinator's document (same
/// id, same heads), woken by the replica's changes.
async fn converged(ops: &ConcordClient, w: &WorldReplica) -> WorldStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = world_status(ops).await;
        let mut heads = s.heads.clone();
        heads.sort();
        if w.heads() == heads && w.progress().doc_id.as_deref() == Some(s.doc_id.as_str()) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica did not converge: {:?} vs {s:?} ({:?})",
            w.progress(),
            w.stats()
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), w.changed()).await;
    }
}

fn path(p: &str) -> ResourcePath {
    ResourcePath::parse(p).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_world_replica_converges_to_the_coordinators_world_after_plans_run() {
    let live = start().await;
    let ops = live.client("alice").await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    let w = resource.world().await.unwrap();
    w.await_in_sync(WAIT).await.unwrap();
    assert_eq!(w.resource("svc/api/pool_size"), Some(Value::Int(50)));
    assert_eq!(w.world().services.len(), 3);

    // A plan runs: its write and provenance reach the replica.
    let p = pool_plan("pool-60", 60);
    assert_eq!(resource.propose(&p).await.unwrap().verdict, Verdict::Admit);
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    w.wait_for(WAIT, |r| {
        r.resource("svc/api/pool_size").filter(|v| *v == Value::Int(60))
    })
    .await
    .unwrap();
    assert_eq!(w.provenance("svc/api/pool_size").unwrap().lineage, "pool-60");

    // So do observations the coordinator wrote.
    resource
        .observe_app_health(&path("svc/api/health/app"), "failing")
        .await
        .unwrap();
    let obs = w.wait_for(WAIT, |r| r.observation("svc/api/health/app")).await.unwrap();
    assert_eq!(
        (obs.value, obs.agent.as_str()),
        (Value::Str("failing".into()), "resource")
    );

    // It holds exactly the coordinator's document and world.
    let s = converged(&ops, &w).await;
    let Answer::World { resources, .. } = ops.query("alice", &Query::World { path: None }).await.unwrap() else {
        panic!("a world answer")
    };
    assert_eq!(w.resources().into_iter().collect::<Vec<_>>(), resources);
    assert!(s.replicas >= 1 && s.changes_refused == 0, "{s:?}");

    // A second agent's replica starts empty and gets the same.
    let uptime = agent(&live, "uptime").await;
    let w2 = uptime.world().await.unwrap();
    converged(&ops, &w2).await;
    assert_eq!(w2.resources(), w.resources());
    assert_eq!(w2.observations(), w.observations());
}

/// With no replica connected the document's writes are held; a status
/// query and a replica that come when more are held than
/// `sync_catch_up_held_max` (0 here: any) wait while the loop applies them,
/// then are served, and the replica converges.
#[tokio::test(flavor = "multi_thread")]
async fn readers_that_find_held_writes_wait_for_them_and_are_served() {
    let live = Live::start_with(|c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.limits.sync_catch_up_held_max = 0;
    })
    .await;
    let ops = live.client("alice").await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    for (n, size) in [60, 70, 80].into_iter().enumerate() {
        let p = pool_plan(&format!("pool-{n}"), size);
        assert_eq!(resource.propose(&p).await.unwrap().verdict, Verdict::Admit);
        assert_eq!(
            resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
            SagaEnd::Completed
        );
    }
    let before = world_status(&ops).await;
    assert_eq!(before.replicas, 0);
    let w = resource.world().await.unwrap();
    let s = converged(&ops, &w).await;
    assert_eq!(s.changes, before.changes);
    assert_eq!(w.resource("svc/api/pool_size"), Some(Value::Int(80)));
    assert_eq!(w.provenance("svc/api/pool_size").unwrap().lineage, "pool-2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_catches_up_with_only_what_it_missed() {
    // A world of a few thousand paths, so the whole document is far larger
    // than what the agent misses.
    let server = concord_testkit::NatsServer::start();
    let world_file = server.dir().join("big-world.toml");
    let extra: String = (0..3000)
        .map(|i| format!("\"fleet/node-{i:05}/cpu\" = {i}\n"))
        .collect();
    let text = std::fs::read_to_string(root().join("config/examples/world.toml"))
        .unwrap()
        .replacen("[resources]\n", &format!("[resources]\n{extra}"), 1);
    std::fs::write(&world_file, text).unwrap();
    let live = Live::start_on(server, |c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.world = Some(world_file);
    })
    .await;
    let ops = live.client("alice").await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;

    // The uptime agent reaches the server through a relay the test can cut.
    let relay = Relay::to(live.server.port()).await;
    let away = agent_at(&relay.url(), "uptime").await;
    let w = away.world().await.unwrap();
    converged(&ops, &w).await;
    let full = w.stats();
    assert!(full.bytes_in > 10_000, "the first sync carries the document: {full:?}");

    relay.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    while away.nats().connection_state() == async_nats::connection::State::Connected {
        assert!(tokio::time::Instant::now() < deadline, "the agent never saw the cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Meanwhile a plan runs and observations arrive.
    let resource = agent(&live, "resource").await;
    let p = pool_plan("pool-60", 60);
    assert_eq!(resource.propose(&p).await.unwrap().verdict, Verdict::Admit);
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    resource.observe_metric(&path("svc/api/queue"), 42.0).await.unwrap();
    resource.flush().await.unwrap();
    let missed = converged(&ops, &resource.world().await.unwrap()).await;
    assert!(
        w.resource("svc/api/pool_size") == Some(Value::Int(50)),
        "the cut-off replica heard nothing"
    );
    let before = w.stats();

    // The link comes back: the replica says hello and gets what it missed.
    relay.heal();
    let s = converged(&ops, &w).await;
    assert_eq!(s.heads, missed.heads);
    assert_eq!(w.resource("svc/api/pool_size"), Some(Value::Int(60)));
    assert_eq!(w.observation("svc/api/queue").unwrap().value, Value::Int(42));
    let after = w.stats();
    assert!(
        after.hellos > before.hellos,
        "the reconnect started a session: {after:?}"
    );
    let caught_up = after.bytes_in - before.bytes_in;
    eprintln!(
        "first sync {} bytes in {} frames; catching up {caught_up} bytes in {} frames",
        full.bytes_in,
        full.frames_in,
        after.frames_in - before.frames_in
    );
    assert!(
        caught_up * 10 < full.bytes_in,
        "catching up took {caught_up} bytes; the whole document is {}",
        full.bytes_in
    );
    assert_eq!(w.progress().resets, 0, "it kept its copy");
}

async fn agent_at(url: &str, name: &str) -> Agent {
    Agent::connect(AgentConfig::new(url, name))
        .await
        .expect("the agent connects")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_own_change_is_refused_and_the_document_is_unchanged() {
    let live = Live::start_with(|c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.limits.sync_frame_bytes_max = 64 * 1024;
    })
    .await;
    // The only recorder in this test process.
    let metrics = concord_nats::http::install_metrics().expect("a Prometheus recorder");
    let ops = live.client("alice").await;
    let rogue = agent(&live, "rogue").await;
    let w = rogue.world().await.unwrap();
    let before = converged(&ops, &w).await;

    // The agent writes into a copy of its replica and sends the change as
    // a sync message on its own subject.
    let frame = w.read(|r| {
        use automerge::ReadDoc;
        use automerge::transaction::Transactable;
        let mut copy = r.automerge().clone();
        let Some((_, resources)) = copy.get(automerge::ROOT, "resources").unwrap() else {
            panic!("the replica holds resources")
        };
        let mut tx = copy.transaction();
        tx.put(&resources, "svc/api/pool_size", 5000_i64).unwrap();
        tx.commit();
        let change = copy.get_last_local_change().unwrap().clone();
        let msg = automerge::sync::Message {
            heads: copy.get_heads(),
            need: vec![],
            have: vec![],
            changes: change.raw_bytes().to_vec().into(),
            flags: None,
            version: automerge::sync::MessageVersion::V1,
        };
        Frame::encode(FrameKind::Sync, &r.doc_id().unwrap(), r.epoch(), &msg.encode())
    });
    let nats = live.nats().await;
    let subject = "concord.v1.default.sync.rogue";
    let code = |bytes: Vec<u8>| {
        let nats = nats.clone();
        async move {
            let answer = nats.request(subject, bytes.into()).await.unwrap();
            serde_json::from_slice::<ErrorReply>(&answer.payload)
                .unwrap()
                .error
                .code
        }
    };
    assert_eq!(code(frame).await, "changes_refused");
    // Bad frames get typed errors, and nothing stalls.
    assert_eq!(code(b"not a frame".to_vec()).await, "decode");
    assert_eq!(code(vec![0u8; 70_000]).await, "payload_too_large");
    let reset = Frame::encode(FrameKind::Reset, &[0u8; 16], 0, &[]);
    assert_eq!(code(reset).await, "decode");

    let after = world_status(&ops).await;
    assert_eq!(
        (after.heads.clone(), after.changes),
        (before.heads.clone(), before.changes)
    );
    assert_eq!(after.changes_refused, 1, "{after:?}");
    let text = metrics.render();
    assert!(
        text.contains("concord_world_sync_changes_refused_total{agent=\"rogue\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("concord_world_sync_dropped_total{reason=\"frame\"}"),
        "{text}"
    );
    let Answer::World { resources, .. } = ops
        .query(
            "alice",
            &Query::World {
                path: Some(path("svc/api/pool_size")),
            },
        )
        .await
        .unwrap()
    else {
        panic!("a world answer")
    };
    assert_eq!(resources, vec![(path("svc/api/pool_size"), Value::Int(50))]);
    assert_eq!(w.resource("svc/api/pool_size"), Some(Value::Int(50)));

    // The replica is still served.
    rogue
        .observe_app_health(&path("svc/api/health/app"), "degraded")
        .await
        .unwrap();
    w.wait_for(WAIT, |r| {
        r.observation("svc/api/health/app")
            .filter(|o| o.value == Value::Str("degraded".into()))
    })
    .await
    .unwrap();
    converged(&ops, &w).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_follow_a_rotation_and_a_coordinator_restart() {
    let mut live = Live::start_with(|c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.core.world_doc.rotate_changes_max = 6;
    })
    .await;
    let ops = live.client("alice").await;
    let mut cfg = AgentConfig::new(live.server.url(), "uptime");
    cfg.world_keepalive = Duration::from_millis(500);
    let uptime = Agent::connect(cfg).await.unwrap();
    let w = uptime.world().await.unwrap();
    let first = converged(&ops, &w).await;

    // Health words that change are written each time: the document rotates.
    let health = path("svc/api/health/app");
    for i in 0..8 {
        let word = if i % 2 == 0 { "failing" } else { "ok" };
        uptime.observe_app_health(&health, word).await.unwrap();
    }
    uptime.flush().await.unwrap();
    let s = loop {
        let s = converged(&ops, &w).await;
        if s.epoch > first.epoch
            && w.observation("svc/api/health/app").map(|o| o.value) == Some(Value::Str("ok".into()))
        {
            break s;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), w.changed()).await;
    };
    assert_ne!(s.doc_id, first.doc_id);
    let p = w.progress();
    assert!(p.resets >= 1 && p.epoch == s.epoch, "{p:?}");

    // The coordinator restarts: the replica's keepalive finds the new process.
    live.down().await;
    live.up().await;
    uptime.observe_app_health(&health, "failing").await.unwrap();
    w.wait_for(WAIT, |r| {
        r.observation("svc/api/health/app")
            .filter(|o| o.value == Value::Str("failing".into()))
    })
    .await
    .unwrap();
    converged(&ops, &w).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_larger_than_max_payload_travels_in_parts() {
    // A server that takes messages of at most 8 KiB; the log's batches stay under it.
    const MAX_PAYLOAD: u64 = 8 * 1024;
    const SERIES: u64 = 500;
    let server = concord_testkit::NatsServer::with_config(&format!("max_payload: {MAX_PAYLOAD}\n"));
    let live = Live::start_on(server, |c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.log.batch_bytes_max = 4 * 1024;
        c.snapshots.every_records = 0;
        c.policy = None;
        c.world = None;
    })
    .await;
    let ops = live.client("alice").await;
    let resource = agent(&live, "resource").await;
    let mine = resource.world().await.unwrap();
    // Series with names that do not compress make a document larger than
    // one message with a few hundred writes.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut names = Vec::new();
    for i in 0..SERIES {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let name = format!("fleet/n-{seed:016x}{:016x}/cpu", seed.rotate_left(29) ^ i);
        resource.observe_metric(&path(&name), i as f64).await.unwrap();
        names.push(name);
    }
    resource.flush().await.unwrap();
    let last = names.last().unwrap().clone();
    mine.wait_for(SLOW_WAIT, |r| r.observation(&last)).await.unwrap();
    converged(&ops, &mine).await;

    // A new replica's first sync carries the whole document: in parts.
    let deploy = agent(&live, "deploy").await;
    let w = deploy.world().await.unwrap();
    converged(&ops, &w).await;
    assert_eq!(w.observations().len(), SERIES as usize);
    let stats = w.stats();
    assert!(
        stats.largest_frame_bytes > MAX_PAYLOAD,
        "a frame above max_payload arrived whole: {stats:?}"
    );
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proposal_continues_the_agents_trace_into_the_coordinators_decision() {
    let live = start().await;
    let resource = agent(&live, "resource").await;
    let p = concord_proto::decode_intent(&example("seven-days-pool-500")).unwrap();
    // The caller's span: the coordinator's span joins its trace.
    let mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let t = resource.propose_traced(&p, Some(mine)).await.unwrap();
    assert_eq!(t.decision.verdict, Verdict::Reject);
    let theirs = t.traceparent.expect("the coordinator names its span");
    let parts: Vec<&str> = theirs.split('-').collect();
    assert_eq!(parts.len(), 4, "{theirs}");
    assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(parts[2], "b7ad6b7169203331");
    // Without one, the SDK starts a trace of its own.
    let p2 = concord_proto::decode_intent(&example("pool-60")).unwrap();
    let t2 = resource.propose_traced(&p2, None).await.unwrap();
    let theirs = t2.traceparent.expect("a new trace");
    assert_eq!(theirs.split('-').nth(1).map(str::len), Some(32));
    assert_ne!(theirs.split('-').nth(1), Some("00000000000000000000000000000000"));
}

/// The trace id and span id of a W3C `traceparent`.
fn trace_parts(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plans_trace_runs_from_the_agent_through_the_decision_to_its_executor() {
    let live = start().await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    // What the agent sends, as the server relays it.
    let nats = live.nats().await;
    let mut sent = nats.subscribe("concord.v1.default.intent.resource").await.unwrap();
    // A flush only writes the subscription out; the agent publishes on
    // another connection, so wait until the server has taken it.
    concord_tests::live::synced(&nats).await;
    let mut proposal_span = async || {
        let m = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut sent))
            .await
            .unwrap()
            .unwrap();
        let h = m.headers.expect("the proposal carries headers");
        h.get("traceparent").expect("a traceparent").as_str().to_string()
    };

    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let p = pool_plan("traced-pool", 60);
    let t = resource.propose_traced(&p, Some(caller)).await.unwrap();
    assert_eq!(t.decision.verdict, Verdict::Admit, "{:?}", t.decision.reasons);
    // The proposal is a span of its own in the caller's trace ...
    let (trace, proposal) = trace_parts(&proposal_span().await);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(proposal, "00f067aa0ba902b7");
    // ... the decision another ...
    let (trace, decision) = trace_parts(&t.traceparent.expect("the coordinator names its span"));
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(![proposal.as_str(), "00f067aa0ba902b7"].contains(&decision.as_str()));
    // ... and the executor's step, from the dispatch's headers, a third.
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    let seen = values.traces.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (trace, step) = trace_parts(seen[0].as_deref().expect("the handler sees its span"));
    assert_eq!(
        trace, "4bf92f3577b34da6a3ce929d0e0e4736",
        "the step runs in the plan's trace"
    );
    assert!(![proposal.as_str(), decision.as_str(), "00f067aa0ba902b7"].contains(&step.as_str()));

    // A plan held for a human runs in its proposal's trace, not the approval's.
    let held = pool_plan("traced-held", 150);
    let t = resource
        .propose_traced(&held, Some("00-5bf92f3577b34da6a3ce929d0e0e4737-00f067aa0ba902b8-01"))
        .await
        .unwrap();
    assert_eq!(t.decision.verdict, Verdict::NeedsApproval, "{:?}", t.decision.reasons);
    assert!(approve(&live, "traced-held", 1).await);
    assert_eq!(
        resource.await_saga(&held.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    let seen = values.traces.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (trace, _) = trace_parts(seen[1].as_deref().expect("the handler sees its span"));
    assert_eq!(trace, "5bf92f3577b34da6a3ce929d0e0e4737");
}

/// Keeps every span the application's tracer provider ends.
#[derive(Clone, Debug, Default)]
struct Collected(Arc<Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

impl opentelemetry_sdk::trace::SpanProcessor for Collected {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdks_spans_go_to_the_applications_tracer_provider_in_the_plans_trace() {
    // The application's provider (process-wide: other tests' spans land
    // here too, in traces of their own).
    let collected = Collected::default();
    opentelemetry::global::set_tracer_provider(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(collected.clone())
            .build(),
    );
    let live = start().await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    let caller = "00-6bf92f3577b34da6a3ce929d0e0e4738-00f067aa0ba902b9-01";
    let p = pool_plan("exported-pool", 60);
    let t = resource.propose_traced(&p, Some(caller)).await.unwrap();
    assert_eq!(t.decision.verdict, Verdict::Admit, "{:?}", t.decision.reasons);
    assert_eq!(
        resource.await_saga(&p.lineage, 1, WAIT).await.unwrap(),
        SagaEnd::Completed
    );
    let spans: Vec<_> = collected
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.span_context.trace_id().to_string() == "6bf92f3577b34da6a3ce929d0e0e4738")
        .map(|s| (s.name.to_string(), s.span_context.span_id(), s.parent_span_id))
        .collect();
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.0 == name)
            .unwrap_or_else(|| panic!("no span {name} in {spans:?}"))
            .clone()
    };
    let propose = find("concord.propose");
    assert_eq!(
        propose.2.to_string(),
        "00f067aa0ba902b9",
        "the caller's span is its parent"
    );
    let wait = find("concord.await_saga");
    assert_eq!(wait.2, propose.1, "waiting on the plan is a child of its proposal");
    // The executor's span: a child of the coordinator's dispatch span (a
    // child of the decision; the coordinator exports its own spans).
    let exec = find("concord.exec");
    let (_, decision) = trace_parts(&t.traceparent.expect("the coordinator names its span"));
    assert!(![propose.1, wait.1].contains(&exec.2), "{spans:?}");
    assert_ne!(exec.2.to_string(), decision, "a dispatch span lies between");
}

/// Proposes a plan that is held for a human through a relay, cuts the relay,
/// approves the plan while the agent cannot hear it, runs `meanwhile`, heals
/// the relay, and returns the decision the agent then learns.
async fn approved_while_away(live: &mut Live, lineage: &str, meanwhile: impl AsyncFnOnce(&mut Live)) -> HumanDecision {
    let values = Values::new(&world(), &[]);
    let _exec = executor(live, &values).await;
    let relay = Relay::to(live.server.port()).await;
    let away = agent_at(&relay.url(), "resource").await;
    // 50 -> 120 in one step: held for a human.
    let p = pool_plan(lineage, 120);
    let d = away.propose(&p).await.unwrap();
    assert_eq!(d.verdict, Verdict::NeedsApproval, "{:?}", d.reasons);

    relay.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    while away.nats().connection_state() == async_nats::connection::State::Connected {
        assert!(tokio::time::Instant::now() < deadline, "the agent never saw the cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The approval's notice goes out while the agent cannot hear it.
    assert!(approve(live, lineage, 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        away.notices(&p.lineage, 1)
            .iter()
            .all(|n| n.event != concord_proto::coord::NoticeKind::Approved)
    );
    meanwhile(live).await;

    relay.heal();
    // The client's reconnect backs off while cut: give it time on a busy machine.
    away.await_decision(&p.lineage, 1, SLOW_WAIT).await.unwrap()
}

/// As [`start`], with a snapshot every `records` log records (0: none).
async fn start_snapshotting_every(records: u64) -> Live {
    Live::start_with(|c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.snapshots.every_records = records;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approval_published_while_the_agent_was_away_is_caught_up_on_reconnect() {
    let mut live = start().await;
    let decision = approved_while_away(&mut live, "held-away", async |_| {}).await;
    assert!(matches!(decision, HumanDecision::Approved { .. }), "{decision:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_missed_while_away_survive_a_coordinator_restart_rebuilt_from_the_log() {
    let mut live = start_snapshotting_every(0).await;
    let decision = approved_while_away(&mut live, "held-restart", async |live| {
        live.down().await;
        live.up().await;
    })
    .await;
    assert!(matches!(decision, HumanDecision::Approved { .. }), "{decision:?}");
}

/// The agent comes back while the coordinator is still down: its first
/// catch-up finds nobody to answer, and it asks again until the coordinator
/// is back.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_back_before_the_coordinator_catches_up_once_the_coordinator_is_back() {
    let mut live = start_snapshotting_every(0).await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let relay = Relay::to(live.server.port()).await;
    let away = agent_at(&relay.url(), "resource").await;
    let p = pool_plan("held-back-first", 120);
    let d = away.propose(&p).await.unwrap();
    assert_eq!(d.verdict, Verdict::NeedsApproval, "{:?}", d.reasons);
    relay.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    while away.nats().connection_state() == async_nats::connection::State::Connected {
        assert!(tokio::time::Instant::now() < deadline, "the agent never saw the cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(approve(&live, "held-back-first", 1).await);
    live.down().await;
    relay.heal();
    let deadline = tokio::time::Instant::now() + SLOW_WAIT;
    while away.nats().connection_state() != async_nats::connection::State::Connected {
        assert!(tokio::time::Instant::now() < deadline, "the agent never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reconnected with no coordinator to answer its catch-up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        away.notices(&p.lineage, 1)
            .iter()
            .all(|n| n.event != concord_proto::coord::NoticeKind::Approved)
    );
    live.up().await;
    let decision = away.await_decision(&p.lineage, 1, SLOW_WAIT).await.unwrap();
    assert!(matches!(decision, HumanDecision::Approved { .. }), "{decision:?}");
}

/// A coordinator just back may answer the agent's catch-up with an error
/// reply (busy, unavailable): the agent asks again instead of taking it for
/// an answer. Here a stand-in answers on the coordinator's query subject:
/// `busy` first, then the notices.
#[tokio::test(flavor = "multi_thread")]
async fn an_agents_catch_up_answered_busy_is_asked_again() {
    use futures::StreamExt;
    let server = concord_testkit::NatsServer::start();
    let relay = Relay::to(server.port()).await;
    let away = agent_at(&relay.url(), "resource").await;
    let stand_in = async_nats::connect(server.url()).await.unwrap();
    let mut queries = stand_in.subscribe("concord.v1.default.query.resource").await.unwrap();
    stand_in.flush().await.unwrap();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = asked.clone();
    let answering = tokio::spawn(async move {
        while let Some(m) = queries.next().await {
            let Some(reply) = m.reply else { continue };
            let answer = if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                json!({ "error": { "code": "busy", "message": "the coordinator's inbound queue is full",
                                   "retry_after_ms": 50 } })
            } else {
                json!({ "notices": [{ "event": "approved", "lineage": "held", "version": 1,
                                      "operator": "alice", "reason": "ok" }] })
            };
            stand_in.publish(reply, answer.to_string().into()).await.unwrap();
        }
    });
    relay.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    while away.nats().connection_state() == async_nats::connection::State::Connected {
        assert!(tokio::time::Instant::now() < deadline, "the agent never saw the cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.heal();
    let decision = away.await_decision(&Id::parse("held").unwrap(), 1, WAIT).await.unwrap();
    assert!(matches!(decision, HumanDecision::Approved { .. }), "{decision:?}");
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    answering.abort();
}

/// The log stream's last sequence now.
async fn log_last_seq(js: &async_nats::jetstream::Context, live: &Live) -> u64 {
    js.get_stream(&live.cfg.log.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence
}

/// The snapshot thread applies the batches the loop sealed, as the loop
/// had them in memory: its snapshot must hold the state the log itself
/// rebuilds, record for record.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_holds_the_state_the_log_rebuilds() {
    snapshot_matches_the_log(
        concord_nats::config::SnapshotConfig::default().follower_records_max,
        SLOW_WAIT,
    )
    .await;
}

/// A follower handed no records (as one that fell too far behind) reads the
/// batches from the log, up to its end: its snapshot holds the same state,
/// and reaches the last batch without waiting for a later one.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_that_reads_the_log_snapshots_the_state_the_log_rebuilds() {
    snapshot_matches_the_log(0, WAIT).await;
}

async fn snapshot_matches_the_log(follower_records_max: usize, wait: Duration) {
    let live = Live::start_with(|c| {
        c.log.max_bytes = 256 * 1024 * 1024;
        c.snapshots.every_records = 1;
        c.snapshots.follower_records_max = follower_records_max;
    })
    .await;
    let values = Values::new(&world(), &[]);
    let _exec = executor(&live, &values).await;
    let resource = agent(&live, "resource").await;
    // One plan admitted and run to its end, one held for a human and approved.
    let p = concord_proto::decode_intent(&example("pool-60")).unwrap();
    assert_eq!(resource.propose(&p).await.unwrap().verdict, Verdict::Admit);
    let end = resource.await_saga(&p.lineage, p.version, WAIT).await.unwrap();
    assert_eq!(end, SagaEnd::Completed);
    let held = pool_plan("held-for-snapshot", 130);
    let d = resource.propose(&held).await.unwrap();
    assert_eq!(d.verdict, Verdict::NeedsApproval, "{:?}", d.reasons);
    assert!(approve(&live, "held-for-snapshot", 1).await);
    resource.await_decision(&held.lineage, 1, WAIT).await.unwrap();

    let nats = live.nats().await;
    let js = async_nats::jetstream::new(nats.clone());
    let last = log_last_seq(&js, &live).await;
    let store = concord_nats::store::Store::open(js, &live.cfg).await.unwrap();
    // Each record makes a snapshot, so reads race with replacements.
    let deadline = tokio::time::Instant::now() + wait;
    let (meta, snapshot) = loop {
        if let Ok(Some((meta, snapshot))) = store.snapshot().await
            && meta.seq >= last
        {
            break (meta, snapshot);
        }
        assert!(tokio::time::Instant::now() < deadline, "no snapshot of the whole log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut records = Vec::new();
    let mut chain = concord_nats::log::Verifier::new(Vec::new());
    let mut incarnation = 0;
    concord_nats::client::read_log(&nats, &live.cfg.log.stream, 1, false, |seq, payload| {
        if seq <= meta.seq {
            let batch = chain.check(seq, payload).unwrap();
            incarnation = incarnation.max(batch.incarnation);
            records.extend(batch.records);
        }
        seq < meta.seq
    })
    .await
    .unwrap();
    // The snapshot names the message it follows as the log has it.
    assert_eq!(chain.head(), (meta.seq, meta.hash.as_str()));
    assert_eq!(meta.incarnation, incarnation);
    // As a restarted process rebuilds it (the simulator's rebuild: the
    // genesis, each incarnation, policy and input record, decisions taken
    // from the record and the events it gives checked against it).
    use concord_core::coordinator::Coordinator;
    let from_log = concord_sim::replay::rebuild(&records).unwrap();
    let from_snapshot = Coordinator::restore(&snapshot.coordinator).unwrap();
    assert!(
        records.len() >= 6,
        "the plans' records are in the log: {}",
        records.len()
    );
    assert_eq!(from_snapshot.state_digest(), from_log.state_digest());
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_missed_while_away_survive_a_coordinator_restart_from_a_snapshot() {
    let mut live = start_snapshotting_every(1).await;
    let decision = approved_while_away(&mut live, "held-snapshot", async |live| {
        // Wait for a snapshot that holds the approval: recovery then starts
        // after it, so the notice can only come from the snapshot's backlog.
        let js = async_nats::jetstream::new(live.nats().await);
        let last = log_last_seq(&js, live).await;
        let snapshots = js.get_object_store(&live.cfg.snapshots.bucket).await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let meta = match snapshots.get("latest").await {
                Ok(o) => o
                    .info()
                    .description
                    .as_deref()
                    .and_then(|d| serde_json::from_str::<concord_nats::store::SnapshotMeta>(d).ok()),
                Err(_) => None,
            };
            if let Some(m) = meta.filter(|m| m.seq >= last) {
                assert!(m.notices_bytes > 0, "{m:?}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no snapshot after the approval");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A crash, not a clean stop: the clean stop would log more records.
        live.crash();
        live.up().await;
    })
    .await;
    assert!(matches!(decision, HumanDecision::Approved { .. }), "{decision:?}");
}
