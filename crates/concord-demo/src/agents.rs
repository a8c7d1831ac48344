//! The three agents of the story. Each perceives the system only through
//! the observations it publishes on the bus ([`Observed`]: the latest value
//! per path, from `observe.*`) and *submits* plans through a [`Route`]:
//! through concord (coordinated), or straight onto the system
//! (uncoordinated). The agents' code is the same either way; only the route
//! differs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_agent::{Agent, AgentError, HumanDecision, SagaEnd};
use concord_nats::subjects::Subjects;
use concord_proto::coord::Decision;
use concord_proto::{Intent, Value, Verdict, decode_intent, decode_observation};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::system::{APP_HEALTH, LEAKY, LIVENESS, QUEUE_DEPTH, Shared};

/// The most series an agent remembers; observations of further paths are
/// dropped (the demo's system publishes four).
pub const SERIES_MAX: usize = 64;

/// What an agent has seen of the system on the bus: the latest value of each
/// observed path. Fed by [`Observed::watch`] from the bus, or by
/// [`Observed::record`] (tests).
#[derive(Clone, Debug, Default)]
pub struct Observed {
    latest: Arc<Mutex<BTreeMap<String, Value>>>,
    /// The subscription feeding `latest`: it ends with the last clone.
    feed: Option<Arc<Feed>>,
}

/// Aborts the subscription task when dropped.
#[derive(Debug)]
struct Feed(JoinHandle<()>);

impl Drop for Feed {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Observed {
    /// Connects to NATS at `url` as `agent` and keeps the latest value of
    /// every observation published on `subjects`' `observe.*` from now on.
    /// Returns once the server has the subscription, so nothing published
    /// after is missed.
    pub async fn watch(url: &str, agent: &str, subjects: &Subjects) -> Result<Observed, String> {
        let nats = async_nats::ConnectOptions::new()
            .name(format!("concord-demo-{agent}-eyes"))
            .connect(url)
            .await
            .map_err(|e| e.to_string())?;
        let mut sub = nats
            .subscribe(subjects.all("observe"))
            .await
            .map_err(|e| e.to_string())?;
        nats.flush().await.map_err(|e| e.to_string())?;
        let mut seen = Observed::default();
        let latest = seen.clone();
        let task = tokio::spawn(async move {
            // The client lives as long as its subscription.
            let _nats = nats;
            while let Some(m) = sub.next().await {
                // Not an observation: nothing seen (the coordinator refuses it too).
                if let Ok(o) = decode_observation(&m.payload) {
                    latest.record(o.path.as_str(), o.value);
                }
            }
        });
        seen.feed = Some(Arc::new(Feed(task)));
        Ok(seen)
    }

    /// Takes `value` as the latest seen at `path`.
    pub fn record(&self, path: &str, value: Value) {
        let mut latest = self.latest.lock().expect("observed lock");
        if latest.len() < SERIES_MAX || latest.contains_key(path) {
            latest.insert(path.to_string(), value);
        }
    }

    /// The latest value seen at `path`, if any.
    pub fn latest(&self, path: &str) -> Option<Value> {
        self.latest.lock().expect("observed lock").get(path).cloned()
    }
}

/// Where plans go.
#[derive(Clone, Debug)]
pub enum Route {
    /// Proposed to concord, which previews and decides.
    Concord(Agent),
    /// Applied to the system at once, as the agent wrote it.
    Direct(Shared),
}

/// What happened to one submitted plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    /// The agent.
    pub agent: String,
    /// Lineage and version.
    pub plan: String,
    /// Its goal.
    pub goal: String,
    /// `applied` (uncoordinated), or concord's verdict.
    pub verdict: String,
    /// The failing rules behind the verdict.
    pub findings: Vec<Finding>,
    /// What came of it: saga end, human decision, or the direct result.
    pub outcome: String,
}

/// One failing rule behind a verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// Its rule id, e.g. `compounding.masking`.
    pub rule: String,
    /// The coordinator's line for people.
    pub message: String,
    /// The figures behind it, from the decision's preview (e.g. the masked
    /// deploy's plan, or the connections against the database's budget);
    /// empty when the answer carried no preview.
    pub figures: BTreeMap<String, Value>,
}

impl Finding {
    /// The findings behind `d`'s verdict, with their figures.
    pub fn of(d: &Decision) -> Vec<Finding> {
        d.reasons
            .iter()
            .map(|r| Finding {
                rule: r.rule.clone(),
                message: r.message.clone(),
                figures: d
                    .preview
                    .as_ref()
                    .and_then(|p| p.invariants.iter().find(|i| i.id == r.rule))
                    .map(|i| i.figures.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// Every proposal, in order.
pub type Ledger = Arc<Mutex<Vec<Proposal>>>;

/// How long agents wait for things, scaled to the system's tick.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// One tick.
    pub tick: Duration,
}

impl Pace {
    fn ticks(&self, n: u32) -> Duration {
        self.tick * n
    }
}

impl Route {
    /// Submits `plan` and waits for what comes of it; the record goes to `ledger`.
    pub async fn submit(&self, agent: &str, plan: &Intent, pace: Pace, ledger: &Ledger) -> Proposal {
        let mut p = Proposal {
            agent: agent.into(),
            plan: format!("{} v{}", plan.lineage, plan.version),
            goal: plan.goal.to_string(),
            verdict: String::new(),
            findings: Vec::new(),
            outcome: String::new(),
        };
        match self {
            Route::Direct(system) => {
                let mut s = system.lock().expect("system lock");
                p.verdict = "applied".into();
                p.outcome = "done".into();
                for step in &plan.steps {
                    if let Err(e) = s.apply(step.path.as_str(), &step.op) {
                        p.outcome = format!("failed: {e}");
                        break;
                    }
                }
            }
            Route::Concord(a) => match a.propose(plan).await {
                Err(e) => {
                    p.verdict = "error".into();
                    p.outcome = e.to_string();
                }
                Ok(d) => {
                    p.verdict = d.verdict.to_string();
                    p.findings = Finding::of(&d);
                    let saga = pace.ticks(600);
                    p.outcome = match d.verdict {
                        Verdict::Reject => "not run".into(),
                        Verdict::Admit => saga_end(a.await_saga(&plan.lineage, plan.version, saga).await),
                        Verdict::NeedsApproval => {
                            // The agent waits a while for a human, then re-plans.
                            match a.await_decision(&plan.lineage, plan.version, pace.ticks(15)).await {
                                Ok(HumanDecision::Approved { operator, .. }) => format!(
                                    "approved by {operator}; {}",
                                    saga_end(a.await_saga(&plan.lineage, plan.version, saga).await)
                                ),
                                Ok(other) => format!("{other:?}").to_lowercase(),
                                Err(AgentError::NoDecision { .. }) => "no human decided while the agent waited".into(),
                                Err(e) => e.to_string(),
                            }
                        }
                    };
                }
            },
        }
        ledger.lock().expect("ledger lock").push(p.clone());
        p
    }
}

fn saga_end(r: Result<SagaEnd, AgentError>) -> String {
    match r {
        Ok(SagaEnd::Completed) => "completed".into(),
        Ok(SagaEnd::Compensated { reason }) => format!("compensated: {reason}"),
        Ok(SagaEnd::CompensationFailed { reason }) => format!("compensation failed: {reason}"),
        Err(e) => e.to_string(),
    }
}

fn plan(v: serde_json::Value) -> Intent {
    decode_intent(v.to_string().as_bytes()).expect("the demo's plans are valid")
}

/// The goal of the deploy agent's plan that ships `release`.
pub fn ship_goal(release: &str) -> String {
    format!("ship api {release}")
}

/// The deploy agent ships v1.5.0 (the leaky one) with an app-health
/// verification, and after a failed rollout re-plans the lineage with the fix.
pub async fn deploy(route: Route, pace: Pace, ledger: Ledger) {
    let bake_ms = pace.ticks(20).as_millis() as u64;
    let fresh_ms = pace.ticks(10).as_millis() as u64;
    let ship = |version: u32, release: &str| {
        plan(json!({
            "protocol": 1, "lineage": "deploy-api-1.5", "version": version,
            "goal": ship_goal(release),
            "rationale": "release train",
            "steps": [{
                "id": "deploy", "kind": "deploy", "path": "svc/api",
                "args": { "version": release, "artifact": format!("registry/api:{release}") },
                "confidence": 0.85, "compensation": { "mode": "restore" },
                "verification": { "path": "svc/api/health/app", "op": "eq", "value": "ok",
                                  "bake_ms": bake_ms, "fresh_ms": fresh_ms }
            }]
        }))
    };
    let first = route.submit("deploy", &ship(1, LEAKY), pace, &ledger).await;
    if first.outcome.starts_with("compensated") {
        // The rollout failed its health check and was rolled back: ship the fix.
        tokio::time::sleep(pace.ticks(5)).await;
        route.submit("deploy", &ship(2, "v1.5.1"), pace, &ledger).await;
    }
}

/// What the uptime agent takes as "the API is down".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UptimeChecks {
    /// Heartbeats only, as in the story: a process that answers is up, even
    /// when it serves no request.
    #[default]
    Heartbeats,
    /// Application-level health: requests are served.
    AppHealth,
}

impl UptimeChecks {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            UptimeChecks::Heartbeats => "heartbeats",
            UptimeChecks::AppHealth => "app-health",
        }
    }

    /// The setting named `name` (as [`UptimeChecks::name`] spells it).
    pub fn parse(name: &str) -> Option<UptimeChecks> {
        [UptimeChecks::Heartbeats, UptimeChecks::AppHealth]
            .into_iter()
            .find(|c| c.name() == name)
    }

    /// The observation this check reads.
    pub fn path(self) -> &'static str {
        match self {
            UptimeChecks::Heartbeats => LIVENESS,
            UptimeChecks::AppHealth => APP_HEALTH,
        }
    }

    /// Whether the system looks down to an agent checking this: the latest
    /// health word seen on [`UptimeChecks::path`] is not `ok`. Nothing seen
    /// yet is no evidence either way, so no reason to restart.
    pub fn looks_down(self, seen: &Observed) -> bool {
        seen.latest(self.path()).is_some_and(|v| v.as_str() != Some("ok"))
    }

    fn goal(self) -> &'static str {
        match self {
            UptimeChecks::Heartbeats => "restart api: heartbeats fail",
            UptimeChecks::AppHealth => "restart api: application health fails",
        }
    }
}

/// The uptime agent restarts the API when it looks down (by `checks`; the
/// story's agent trusts heartbeats only), at most three times.
pub async fn uptime(
    route: Route,
    seen: Observed,
    checks: UptimeChecks,
    pace: Pace,
    ledger: Ledger,
    mut stop: watch::Receiver<bool>,
) {
    const RESTARTS_MAX: u32 = 3;
    let mut version = 0;
    loop {
        let down = checks.looks_down(&seen);
        if down && version < RESTARTS_MAX {
            version += 1;
            let p = plan(json!({
                "protocol": 1, "lineage": "uptime-restart-api", "version": version,
                "goal": checks.goal(),
                "steps": [{ "id": "restart", "kind": "restart", "path": "svc/api", "args": {},
                            "confidence": 0.8, "compensation": { "mode": "irreversible", "reason": "a restart cannot be undone" } }]
            }));
            route.submit("uptime", &p, pace, &ledger).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(pace.ticks(3)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The queue depth past which the resource agent raises the pool.
pub const QUEUE_DEPTH_MAX: f64 = 400.0;

/// The queue depth the resource agent acts on: the latest seen on
/// [`QUEUE_DEPTH`], when it is past [`QUEUE_DEPTH_MAX`].
pub fn queue_grown(seen: &Observed) -> Option<f64> {
    seen.latest(QUEUE_DEPTH)
        .and_then(|v| v.as_f64())
        .filter(|q| *q > QUEUE_DEPTH_MAX)
}

/// The resource agent raises the pool when the queue grows: 50 -> 100 -> 500 -> 1500.
pub async fn resource(route: Route, seen: Observed, pace: Pace, ledger: Ledger, mut stop: watch::Receiver<bool>) {
    const LADDER: [u32; 3] = [100, 500, 1500];
    let mut rung = 0;
    while rung < LADDER.len() {
        if let Some(queue) = queue_grown(&seen) {
            let value = LADDER[rung];
            rung += 1;
            let p = plan(json!({
                "protocol": 1, "lineage": "resource-drain-queue", "version": rung,
                "goal": format!("drain the request queue: pool_size to {value}"),
                "rationale": format!("queue depth {queue}; requests wait for a database connection"),
                "steps": [{ "id": "raise-pool", "kind": "set", "path": "svc/api/pool_size",
                            "args": { "value": value }, "confidence": 0.7,
                            "compensation": { "mode": "restore" } }]
            }));
            route.submit("resource", &p, pace, &ledger).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(pace.ticks(3)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::State;

    /// What an agent sees of `s`: its signals, as the demo publishes them.
    fn seen(s: &State) -> Observed {
        let seen = Observed::default();
        for (path, _, value) in s.signals() {
            seen.record(path, value);
        }
        seen
    }

    /// The leaky release after a few ticks: its pool is exhausted, its
    /// processes still answer heartbeats.
    fn leaking() -> State {
        let mut s = State {
            version: LEAKY.into(),
            ..State::default()
        };
        for _ in 0..10 {
            s.tick();
        }
        s
    }

    #[test]
    fn heartbeats_miss_the_leak_and_app_health_sees_it() {
        let s = seen(&leaking());
        assert!(!UptimeChecks::Heartbeats.looks_down(&s));
        assert!(UptimeChecks::AppHealth.looks_down(&s));
        let healthy = seen(&State::default());
        assert!(!UptimeChecks::Heartbeats.looks_down(&healthy));
        assert!(!UptimeChecks::AppHealth.looks_down(&healthy));
        let down = seen(&State {
            db_down: true,
            ..State::default()
        });
        assert!(UptimeChecks::Heartbeats.looks_down(&down));
        assert!(UptimeChecks::AppHealth.looks_down(&down));
        assert_eq!(UptimeChecks::default(), UptimeChecks::Heartbeats, "as in the story");
        for c in [UptimeChecks::Heartbeats, UptimeChecks::AppHealth] {
            assert_eq!(UptimeChecks::parse(c.name()), Some(c));
        }
        assert_eq!(UptimeChecks::parse("pings"), None);
    }

    #[test]
    fn uptime_checks_read_only_the_health_word_observed_on_their_path() {
        let s = Observed::default();
        for c in [UptimeChecks::Heartbeats, UptimeChecks::AppHealth] {
            assert!(!c.looks_down(&s), "nothing seen yet: no reason to restart");
        }
        s.record(LIVENESS, Value::Str("ok".into()));
        s.record(APP_HEALTH, Value::Str("degraded".into()));
        assert!(!UptimeChecks::Heartbeats.looks_down(&s));
        assert!(UptimeChecks::AppHealth.looks_down(&s));
        // The latest observation counts.
        s.record(APP_HEALTH, Value::Str("ok".into()));
        s.record(LIVENESS, Value::Str("failing".into()));
        assert!(UptimeChecks::Heartbeats.looks_down(&s));
        assert!(!UptimeChecks::AppHealth.looks_down(&s));
    }

    #[test]
    fn the_resource_agent_acts_on_the_observed_queue_depth_past_its_limit() {
        let s = Observed::default();
        assert_eq!(queue_grown(&s), None, "nothing seen yet");
        s.record(QUEUE_DEPTH, Value::Int(400));
        assert_eq!(queue_grown(&s), None);
        s.record(QUEUE_DEPTH, Value::Int(401));
        assert_eq!(queue_grown(&s), Some(401.0));
        s.record(QUEUE_DEPTH, Value::Float(812.5));
        assert_eq!(queue_grown(&s), Some(812.5));
        // The leaking system's queue grows past it; a healthy one's does not.
        assert!(queue_grown(&seen(&leaking())).is_some());
        assert_eq!(queue_grown(&seen(&State::default())), None);
    }

    #[test]
    fn an_agent_remembers_a_bounded_number_of_series() {
        let s = Observed::default();
        for i in 0..SERIES_MAX + 10 {
            s.record(&format!("svc/s{i}/queue_depth"), Value::Int(1));
        }
        assert_eq!(s.latest.lock().unwrap().len(), SERIES_MAX);
        // A series already seen still takes new values.
        s.record("svc/s0/queue_depth", Value::Int(2));
        assert_eq!(s.latest("svc/s0/queue_depth"), Some(Value::Int(2)));
    }

    /// The uptime agent's restarts of the leaking system (straight onto it)
    /// over `ticks` ticks, seeing its signals as they were when it started
    /// (nobody publishes newer ones here).
    async fn run_uptime(checks: UptimeChecks, ticks: u32) -> (Vec<Proposal>, u32) {
        let system: Shared = Arc::new(Mutex::new(leaking()));
        let ledger: Ledger = Arc::default();
        let pace = Pace {
            tick: Duration::from_millis(5),
        };
        let (stop, stopped) = watch::channel(false);
        let agent = tokio::spawn(uptime(
            Route::Direct(system.clone()),
            seen(&leaking()),
            checks,
            pace,
            ledger.clone(),
            stopped,
        ));
        tokio::time::sleep(pace.ticks(ticks)).await;
        stop.send(true).expect("the agent listens");
        agent.await.expect("the agent ends");
        let restarts = system.lock().expect("system lock").restarts;
        let proposals = ledger.lock().expect("ledger lock").clone();
        (proposals, restarts)
    }

    #[tokio::test]
    async fn the_uptime_agent_restarts_the_leaking_api_only_when_it_checks_app_health() {
        let (proposals, restarts) = run_uptime(UptimeChecks::Heartbeats, 20).await;
        assert!(proposals.is_empty(), "heartbeats are fine: {proposals:?}");
        assert_eq!(restarts, 0);
        let (proposals, restarts) = run_uptime(UptimeChecks::AppHealth, 20).await;
        assert!(!proposals.is_empty(), "the failing app health is seen");
        assert!(proposals.len() <= 3, "at most three restarts: {proposals:?}");
        assert_eq!(restarts as usize, proposals.len());
        assert!(
            proposals.iter().all(|p| p.agent == "uptime"
                && p.goal == "restart api: application health fails"
                && p.outcome == "done")
        );
    }
}
