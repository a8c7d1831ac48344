//! The live demo: the seven-days incident, played on the bus and averted.
//!
//! A modelled system ([`system`]) runs as an executor and publishes its
//! liveness, application-level health, queue depth and database connections
//! as observations on a local NATS server every tick; the three agents of the
//! story ([`agents`]) see it only through those observations and submit
//! plans. Coordinated, the plans go to a coordinator on that server (as
//! `concord dev` runs it) and the coordination log is printed as it happens;
//! uncoordinated, the same agents apply their plans straight to the system. [`run`] plays either and
//! returns a [`Report`] that [`Report::check`] judges: the outcome the story
//! expects, reached within the run's tick and wall-clock limits.
//!
//! ```
//! use concord_demo::system::{State, LEAKY};
//!
//! let mut s = State { version: LEAKY.into(), ..State::default() };
//! for _ in 0..10 { s.tick(); }
//! assert_eq!((s.liveness(), s.app_health()), ("ok", "failing"));
//! ```

pub mod agents;
pub mod system;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_agent::{Agent, AgentConfig, Executor, ExecutorConfig};
use concord_core::coordinator::{Event, Record};
use concord_nats::config::RuntimeConfig;
use concord_nats::log::Batch;
use concord_nats::runtime::Health;
use concord_nats::server::{ServerOptions, ServerProcess, find_nats_server};
use concord_nats::subjects::Subjects;
use concord_proto::limits::PROTOCOL_VERSION;
use concord_proto::{Observation, ResourcePath, StepKind, Value};
use tokio::sync::watch;

use crate::agents::{Ledger, Observed, Pace, Proposal, Route, UptimeChecks};
use crate::system::{APP_HEALTH, LEAKY, Shared, State};

/// Why the demo could not run (not: the outcome was wrong; see [`Report::check`]).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// NATS, the coordinator, the executor or an agent's connection did not start.
    #[error("{0}")]
    Setup(String),
}

/// How to play it.
#[derive(Clone, Debug)]
pub struct Options {
    /// Through concord (true) or straight onto the system.
    pub coordinated: bool,
    /// One tick of the system's time.
    pub tick: Duration,
    /// The workspace root (policy, world).
    pub root: PathBuf,
    /// Ticks to play once the agents are done (deploy done; the resource
    /// agent out of rungs or the service healthy again): the end of the story,
    /// where a leak given room reaches the database.
    pub settle_ticks: u64,
    /// The most ticks in all: a story not over by then failed.
    pub ticks_max: u64,
    /// The longest the run may take, start to end, on the wall clock: the
    /// run stops there, and a run that took longer failed. `make demo` plays
    /// two runs and must end within two minutes.
    pub wall_clock_max: Duration,
    /// What the uptime agent trusts (heartbeats only in the story).
    pub uptime_checks: UptimeChecks,
}

impl Options {
    /// The demo's defaults: 100 ms ticks, 400 of them at most, 55 s.
    pub fn new(root: &Path, coordinated: bool) -> Options {
        Options {
            coordinated,
            tick: Duration::from_millis(100),
            root: root.to_path_buf(),
            settle_ticks: 40,
            ticks_max: 400,
            wall_clock_max: Duration::from_secs(55),
            uptime_checks: UptimeChecks::default(),
        }
    }
}

/// What happened.
#[derive(Clone, Debug)]
pub struct Report {
    /// Coordinated or not.
    pub coordinated: bool,
    /// Every proposal, in order.
    pub proposals: Vec<Proposal>,
    /// The system at the end.
    pub end: State,
    /// The rule ids behind the verdicts that stopped the resource agent's
    /// pool increases (empty uncoordinated: nothing stops them).
    pub findings: BTreeSet<String>,
    /// Ticks played.
    pub ticks: u64,
    /// Why the story was not over when the run stopped (out of ticks or
    /// out of time); `None`: it was.
    pub unfinished: Option<String>,
    /// How long it took.
    pub elapsed: Duration,
    /// How long it could take ([`Options::wall_clock_max`]).
    pub wall_clock_max: Duration,
}

/// The rules that must have stopped the cascade in a coordinated run: the
/// compounding finding that links a pool increase to the leaky deploy, and
/// the coupling of pool × replicas to the database's connections.
pub const EXPECTED_FINDINGS: [&str; 2] = [MASKING, COUPLING];

/// The compounding finding: a remediation soon after another agent's deploy.
pub const MASKING: &str = "compounding.masking";
/// The coupling rule: pool × replicas against the database's `max_connections`.
pub const COUPLING: &str = "coupling.db_connections";

/// Whether concord stopped `p`: refused, or held and never approved.
fn stopped(p: &Proposal) -> bool {
    p.verdict == "reject" || (p.verdict == "needs_approval" && !p.outcome.starts_with("approved"))
}

impl Report {
    /// What is wrong with the outcome (empty: as the story expects).
    pub fn check(&self) -> Vec<String> {
        let mut wrong = Vec::new();
        if let Some(why) = &self.unfinished {
            wrong.push(format!("the story did not finish: {why}"));
        }
        if self.elapsed > self.wall_clock_max {
            wrong.push(format!(
                "the run took {:.1} s, over its limit of {:.1} s",
                self.elapsed.as_secs_f64(),
                self.wall_clock_max.as_secs_f64()
            ));
        }
        let e = &self.end;
        if self.coordinated {
            if e.db_down || e.db_peak > e.max_connections {
                wrong.push(format!(
                    "the database held {} connections (max {}), down: {}",
                    e.db_peak, e.max_connections, e.db_down
                ));
            }
            self.check_rollback(&mut wrong);
            self.check_pool_increases(&mut wrong);
            if e.version == LEAKY {
                wrong.push("the leaky release is still running".into());
            }
        } else if !(e.db_down && e.db_peak > e.max_connections) {
            wrong.push(format!(
                "uncoordinated, the cascade did not happen (peak {} of {}, down: {})",
                e.db_peak, e.max_connections, e.db_down
            ));
        }
        wrong
    }

    /// The deploy agent's plan that ships the leaky release.
    fn leaky_deploy(&self) -> Option<&Proposal> {
        let goal = agents::ship_goal(LEAKY);
        self.proposals.iter().find(|p| p.agent == "deploy" && p.goal == goal)
    }

    /// The leaky release was admitted, and its saga rolled it back when its
    /// application-level health check failed.
    fn check_rollback(&self, wrong: &mut Vec<String>) {
        let Some(d) = self.leaky_deploy() else {
            wrong.push(format!("the deploy agent never proposed the leaky release {LEAKY}"));
            return;
        };
        if d.verdict != "admit" || !d.outcome.starts_with("compensated") || !d.outcome.contains(APP_HEALTH) {
            wrong.push(format!(
                "the leaky release ({}) was not rolled back by its saga when `{APP_HEALTH}` failed: {} -> {}",
                d.plan, d.verdict, d.outcome
            ));
        }
    }

    /// Every pool increase was stopped, each by a masking finding that names
    /// the leaky deploy, and the coupling rule refused at least one.
    fn check_pool_increases(&self, wrong: &mut Vec<String>) {
        let raises: Vec<&Proposal> = self.proposals.iter().filter(|p| p.agent == "resource").collect();
        if raises.is_empty() {
            wrong.push("the resource agent proposed no pool increase".into());
            return;
        }
        let leaky = self.leaky_deploy().map(|d| Value::Str(d.plan.clone()));
        for p in &raises {
            if !stopped(p) {
                wrong.push(format!(
                    "the pool increase {} ({}) was not stopped: {} -> {}",
                    p.plan, p.goal, p.verdict, p.outcome
                ));
            }
            let linked = p
                .findings
                .iter()
                .any(|f| f.rule == MASKING && leaky.is_some() && f.figures.get("deploy_plan") == leaky.as_ref());
            if !linked {
                wrong.push(format!(
                    "the pool increase {} ({}) has no `{MASKING}` finding naming the leaky deploy",
                    p.plan, p.goal
                ));
            }
        }
        if !raises
            .iter()
            .any(|p| stopped(p) && p.findings.iter().any(|f| f.rule == COUPLING))
        {
            wrong.push(format!("no pool increase was refused by `{COUPLING}`"));
        }
    }

    /// The summary, for people.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mode = if self.coordinated {
            "coordinated"
        } else {
            "uncoordinated"
        };
        s.push_str(&format!(
            "== summary ({mode}, {:.1} s of at most {:.0} s, {} ticks)\n",
            self.elapsed.as_secs_f64(),
            self.wall_clock_max.as_secs_f64(),
            self.ticks
        ));
        for p in &self.proposals {
            s.push_str(&format!(
                "{:<9} {:<26} {:<40} -> {}\n",
                p.agent, p.plan, p.goal, p.verdict
            ));
            for f in &p.findings {
                s.push_str(&format!("            {}: {}\n", f.rule, f.message));
            }
            s.push_str(&format!("            outcome: {}\n", p.outcome));
        }
        let e = &self.end;
        s.push_str(&format!(
            "system: api {} (pool {} x {} replicas, {} restarts), queue {}\n",
            e.version, e.pool_size, e.replicas, e.restarts, e.queue
        ));
        s.push_str(&format!(
            "database: {} — peak {} of max_connections {}\n",
            if e.db_down { "DOWN" } else { "up" },
            e.db_peak,
            e.max_connections
        ));
        if self.coordinated {
            let f: Vec<&str> = self.findings.iter().map(String::as_str).collect();
            s.push_str(&format!("findings that stopped the pool increases: {}\n", f.join(", ")));
        }
        s
    }
}

/// One log event as a line, or nothing for the noisy ones.
pub fn event_line(e: &Event) -> Option<String> {
    Some(match e {
        Event::Decided {
            agent,
            lineage,
            version,
            verdict,
            reasons,
            ..
        } => {
            let rules: Vec<&str> = reasons.iter().map(|r| r.rule.as_str()).collect();
            format!(
                "decided      {agent}: {lineage} v{version} -> {verdict} [{}]",
                rules.join(", ")
            )
        }
        Event::Withdrawn {
            lineage,
            version,
            by_version,
        } => format!("withdrawn    {lineage} v{version} (replaced by v{by_version})"),
        Event::Approved {
            lineage,
            version,
            operator,
            ..
        } => format!("approved     {lineage} v{version} by {operator}"),
        Event::RejectedByOperator {
            lineage,
            version,
            operator,
            ..
        } => format!("rejected     {lineage} v{version} by {operator}"),
        Event::Admitted { lineage, version } => format!("admitted     {lineage} v{version}: the saga starts"),
        Event::Dispatched { key, path, token } => {
            format!("dispatched   {} on {path} (fencing token {token})", key.text())
        }
        Event::StepSucceeded { key } => format!("succeeded    {}", key.text()),
        Event::StepFailed { key, reason } => format!("failed       {}: {reason}", key.text()),
        Event::Verifying { key, .. } => format!("verifying    {}: baking", key.text()),
        Event::Compensating { lineage, reason, .. } => format!("compensating {lineage}: {reason}"),
        Event::Completed { lineage, version } => format!("completed    {lineage} v{version}"),
        Event::Compensated { lineage, version } => format!("compensated  {lineage} v{version}: rolled back"),
        _ => return None,
    })
}

/// Plays the story and reports. `print` gets every line as it happens.
pub async fn run(opts: Options, print: Arc<dyn Fn(String) + Send + Sync>) -> Result<Report, DemoError> {
    let started = Instant::now();
    let system: Shared = Arc::new(Mutex::new(State::default()));
    let ledger: Ledger = Arc::new(Mutex::new(Vec::new()));
    let pace = Pace { tick: opts.tick };
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());

    // Either way a NATS server: the system shows itself on it. Coordinated,
    // also the coordinator and the system's executor.
    let mut keep = Vec::<Box<dyn std::any::Any + Send>>::new();
    let mut stop_coordinator = None;
    let mut log_task = None;
    let bin = find_nats_server(Some(&opts.root)).map_err(|e| setup(&e))?;
    let server = ServerProcess::start(ServerOptions {
        bin: Some(bin),
        ..ServerOptions::default()
    })
    .map_err(|e| setup(&e))?;
    let url = server.url();
    keep.push(Box::new(server));
    let subjects = Subjects::new(&RuntimeConfig::default().domain);
    if opts.coordinated {
        print(format!("concord: NATS with JetStream at {url}"));
        let mut cfg = RuntimeConfig {
            nats: vec![url.clone()],
            policy: Some(opts.root.join("config/policy.toml")),
            world: Some(opts.root.join("config/examples/world.toml")),
            ..RuntimeConfig::default()
        };
        // A demo's log is small; JetStream reserves a stream's bound on disk.
        cfg.log.max_bytes = 256 * 1024 * 1024;
        let health = Arc::new(Health::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(concord_nats::runtime::run(cfg.clone(), health.clone(), async {
            let _ = rx.await;
        }));
        stop_coordinator = Some(tx);
        let ready_by = Instant::now() + Duration::from_secs(20);
        while !health.ready.load(Ordering::SeqCst) {
            if Instant::now() > ready_by {
                return Err(DemoError::Setup("the coordinator did not become ready".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        print("concord: coordinator ready (policy config/policy.toml)".into());
        let running = Executor::new(ExecutorConfig::new(url.clone(), "default"))
            .handle(StepKind::Deploy, Arc::new(system::Handler(system.clone())))
            .handle(StepKind::Set, Arc::new(system::Handler(system.clone())))
            .handle(StepKind::Restart, Arc::new(system::Handler(system.clone())))
            .handle(StepKind::Scale, Arc::new(system::Handler(system.clone())))
            .start()
            .await
            .map_err(|e| setup(&e))?;
        keep.push(Box::new(running));
        // The coordination log, as it happens.
        let nats = async_nats::connect(url.clone()).await.map_err(|e| setup(&e))?;
        let p = print.clone();
        log_task = Some(tokio::spawn(async move {
            let _ = concord_nats::client::read_log(&nats, &cfg.log.stream, 1, true, |_, payload| {
                if let Ok(b) = serde_json::from_slice::<Batch>(payload) {
                    for r in b.records {
                        if let Record::Input { events, .. } = r {
                            for e in &events {
                                if let Some(line) = event_line(e) {
                                    p(format!("log  {line}"));
                                }
                            }
                        }
                    }
                }
                true
            })
            .await;
        }));
    } else {
        print(format!(
            "bus: NATS at {url}: the system's observations only, no coordinator"
        ));
    }
    let route = |name: &str| {
        let url = url.clone();
        let system = system.clone();
        let name = name.to_string();
        let coordinated = opts.coordinated;
        async move {
            if coordinated {
                Agent::connect(AgentConfig::new(url, name))
                    .await
                    .map(Route::Concord)
                    .map_err(|e| DemoError::Setup(e.to_string()))
            } else {
                Ok(Route::Direct(system))
            }
        }
    };
    // The system's own connection, which publishes what it shows.
    let monitor = Agent::connect(AgentConfig::new(url.clone(), "monitor"))
        .await
        .map_err(|e| setup(&e))?;
    // What each agent sees of the system: the observations on the bus.
    let eyes = |name: &'static str| {
        let (url, subjects) = (url.clone(), subjects.clone());
        async move { Observed::watch(&url, name, &subjects).await.map_err(DemoError::Setup) }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let deploy = tokio::spawn(agents::deploy(route("deploy").await?, pace, ledger.clone()));
    let uptime = tokio::spawn(agents::uptime(
        route("uptime").await?,
        eyes("uptime").await?,
        opts.uptime_checks,
        pace,
        ledger.clone(),
        stop_rx.clone(),
    ));
    let resource = tokio::spawn(agents::resource(
        route("resource").await?,
        eyes("resource").await?,
        pace,
        ledger.clone(),
        stop_rx.clone(),
    ));

    // The system's clock; every tick it publishes what it shows.
    let mut settled_at = None;
    let mut acted = 0;
    let mut reported = (String::new(), false);
    let mut interval = tokio::time::interval(opts.tick);
    // Under load, late ticks are not made up in a burst: the agents must see
    // the system move at the pace they are written for.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = started + opts.wall_clock_max;
    let mut ticks = 0;
    let mut unfinished = None;
    // The service is healthy again: nothing left for the resource agent to drain.
    let quiet = |s: &State| s.queue == 0 && s.app_health() == "ok";
    loop {
        // What is still going on, should the run stop here.
        let busy = |s: &State| {
            let mut busy = Vec::new();
            if !deploy.is_finished() {
                busy.push("the deploy agent still waits on its plan".to_string());
            }
            if !(resource.is_finished() || quiet(s)) {
                busy.push(format!(
                    "the resource agent is still at work (queue {}, app health {})",
                    s.queue,
                    s.app_health()
                ));
            }
            busy.join("; ")
        };
        // The story is over once it has settled for `settle_ticks`: stopping
        // before (out of ticks or out of time) leaves it unfinished.
        let out_of_ticks = ticks >= opts.ticks_max;
        if out_of_ticks || Instant::now() >= deadline {
            let s = system.lock().expect("system lock").clone();
            let what = match settled_at {
                Some(t) => format!("it was settling ({} of {} ticks)", ticks - t, opts.settle_ticks),
                None => busy(&s),
            };
            unfinished = Some(if out_of_ticks {
                format!("out of ticks after {ticks}: {what}")
            } else {
                format!(
                    "out of time at the {:.1} s limit, after {ticks} ticks: {what}",
                    opts.wall_clock_max.as_secs_f64()
                )
            });
            break;
        }
        let tick = ticks;
        ticks += 1;
        interval.tick().await;
        let s = {
            let mut s = system.lock().expect("system lock");
            s.tick();
            s.clone()
        };
        let line = format!(
            "api {} pool {}x{} | heartbeats {} | app health {} | queue {} | db {}/{}{}",
            s.version,
            s.pool_size,
            s.replicas,
            s.liveness(),
            s.app_health(),
            s.queue,
            s.db_connections,
            s.max_connections,
            if s.db_down { " DOWN" } else { "" }
        );
        let state_key = (
            format!("{} {} {} {}", s.version, s.pool_size, s.app_health(), s.liveness()),
            s.db_down,
        );
        if state_key != reported || tick % 20 == 0 {
            print(format!("sys  t={tick:<4} {line}"));
            reported = state_key;
        }
        // What the agents did, as it comes back.
        {
            let l = ledger.lock().expect("ledger lock");
            for p in &l[acted..] {
                print(format!(
                    "act  {} {} ({}) -> {}: {}",
                    p.agent, p.plan, p.goal, p.verdict, p.outcome
                ));
            }
            acted = l.len();
        }
        for (path, kind, value) in s.signals() {
            let obs = Observation {
                protocol: PROTOCOL_VERSION,
                path: ResourcePath::parse(path).expect("the system's paths are valid"),
                kind,
                value,
                observed_at_ms: None,
            };
            // Fire and forget: a lost observation is made good next tick.
            let _ = monitor.observe(&obs).await;
        }
        // The story is over when the deploy agent is done and either the
        // resource agent has run out of ideas or the service is healthy again.
        if !(deploy.is_finished() && (resource.is_finished() || quiet(&s))) {
            settled_at = None;
        } else if settled_at.is_none() {
            settled_at = Some(tick);
        }
        if settled_at.is_some_and(|t| tick >= t + opts.settle_ticks) {
            break;
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = uptime.await;
        let _ = resource.await;
    })
    .await;
    deploy.abort();
    // Let the log catch up before it stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(t) = log_task {
        t.abort();
    }
    if let Some(tx) = stop_coordinator {
        let _ = tx.send(());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(keep);
    let proposals = ledger.lock().expect("ledger lock").clone();
    let findings = proposals
        .iter()
        .filter(|p| p.agent == "resource" && stopped(p))
        .flat_map(|p| p.findings.iter().map(|f| f.rule.clone()))
        .collect();
    let end = system.lock().expect("system lock").clone();
    Ok(Report {
        coordinated: opts.coordinated,
        proposals,
        end,
        findings,
        ticks,
        unfinished,
        elapsed: started.elapsed(),
        wall_clock_max: opts.wall_clock_max,
    })
}

#[cfg(test)]
mod tests {
    //! `Report::check` on reports that differ from the expected story in one
    //! way each: every one is refused with a message naming what failed.

    use std::collections::BTreeMap;

    use super::*;
    use crate::agents::Finding;

    const LEAKY_PLAN: &str = "deploy-api-1.5 v1";

    fn proposal(agent: &str, plan: &str, goal: &str, verdict: &str, outcome: &str, findings: Vec<Finding>) -> Proposal {
        Proposal {
            agent: agent.into(),
            plan: plan.into(),
            goal: goal.into(),
            verdict: verdict.into(),
            findings,
            outcome: outcome.into(),
        }
    }

    fn finding(rule: &str, figures: &[(&str, Value)]) -> Finding {
        Finding {
            rule: rule.into(),
            message: format!("{rule} failed"),
            figures: figures
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn masking(deploy_plan: &str) -> Finding {
        finding(
            MASKING,
            &[
                ("deploy_plan", Value::Str(deploy_plan.into())),
                ("deploy_agent", Value::Str("deploy".into())),
            ],
        )
    }

    fn coupling() -> Finding {
        finding(
            COUPLING,
            &[("connections", Value::Int(2080)), ("budget", Value::Float(800.0))],
        )
    }

    fn raise(version: u32, value: u32, findings: Vec<Finding>) -> Proposal {
        proposal(
            "resource",
            &format!("resource-drain-queue v{version}"),
            &format!("drain the request queue: pool_size to {value}"),
            "reject",
            "not run",
            findings,
        )
    }

    /// The coordinated story as it should go (what the live run reports).
    fn coordinated() -> Report {
        Report {
            coordinated: true,
            proposals: vec![
                raise(1, 100, vec![finding("conflict.inflight", &[]), masking(LEAKY_PLAN)]),
                raise(2, 500, vec![coupling(), masking(LEAKY_PLAN)]),
                proposal(
                    "deploy",
                    LEAKY_PLAN,
                    &agents::ship_goal(LEAKY),
                    "admit",
                    "compensated: verification `svc/api/health/app == \"ok\"` failed after 2000 ms: observed \"failing\"",
                    vec![],
                ),
                proposal(
                    "deploy",
                    "deploy-api-1.5 v2",
                    &agents::ship_goal("v1.5.1"),
                    "admit",
                    "completed",
                    vec![],
                ),
            ],
            end: State {
                version: "v1.5.1".into(),
                ..State::default()
            },
            findings: [MASKING, COUPLING, "conflict.inflight"].map(String::from).into(),
            ticks: 87,
            unfinished: None,
            elapsed: Duration::from_secs(9),
            wall_clock_max: Duration::from_secs(55),
        }
    }

    fn uncoordinated() -> Report {
        let mut r = coordinated();
        r.coordinated = false;
        r.proposals.clear();
        r.findings.clear();
        r.end = State {
            version: LEAKY.into(),
            pool_size: 500,
            db_peak: 1040,
            db_down: true,
            ..State::default()
        };
        r
    }

    /// `report.check()` refuses it, and one message contains each of `words`.
    #[track_caller]
    fn refused(report: &Report, words: &[&str]) {
        let wrong = report.check();
        assert!(!wrong.is_empty(), "accepted: {report:#?}");
        for w in words {
            assert!(
                wrong.iter().any(|m| m.contains(w)),
                "no message names `{w}`: {wrong:#?}"
            );
        }
    }

    #[test]
    fn the_expected_stories_pass() {
        assert_eq!(coordinated().check(), Vec::<String>::new());
        assert_eq!(uncoordinated().check(), Vec::<String>::new());
    }

    #[test]
    fn the_database_down_while_coordinated_is_refused() {
        let mut r = coordinated();
        r.end.db_down = true;
        refused(&r, &["database", "down: true"]);
    }

    #[test]
    fn max_connections_exceeded_while_coordinated_is_refused() {
        let mut r = coordinated();
        r.end.db_peak = r.end.max_connections + 1;
        refused(&r, &["database held 1001 connections (max 1000)"]);
    }

    #[test]
    fn a_pool_increase_without_the_masking_finding_is_refused() {
        let mut r = coordinated();
        r.proposals[0].findings.retain(|f| f.rule != MASKING);
        refused(&r, &["resource-drain-queue v1", MASKING]);
        // Linked to some other deploy than the leaky one: refused too.
        let mut r = coordinated();
        r.proposals[1].findings[1] = masking("deploy-web-2.0 v1");
        refused(&r, &["resource-drain-queue v2", MASKING, "leaky deploy"]);
    }

    #[test]
    fn no_pool_increase_refused_by_the_coupling_rule_is_refused() {
        let mut r = coordinated();
        r.proposals[1].findings.retain(|f| f.rule != COUPLING);
        refused(&r, &[COUPLING]);
    }

    #[test]
    fn a_pool_increase_that_ran_is_refused() {
        let mut r = coordinated();
        r.proposals[1].verdict = "admit".into();
        r.proposals[1].outcome = "completed".into();
        refused(&r, &["resource-drain-queue v2", "not stopped"]);
        // Held and approved by a human is not stopped either ...
        r.proposals[1].verdict = "needs_approval".into();
        r.proposals[1].outcome = "approved by alice; completed".into();
        refused(&r, &["resource-drain-queue v2", "not stopped"]);
        // ... held with nobody deciding is.
        r.proposals[1].outcome = "no human decided while the agent waited".into();
        assert_eq!(r.check(), Vec::<String>::new());
    }

    #[test]
    fn no_pool_increase_at_all_is_refused() {
        let mut r = coordinated();
        r.proposals.retain(|p| p.agent != "resource");
        refused(&r, &["proposed no pool increase"]);
    }

    #[test]
    fn the_release_not_rolled_back_is_refused() {
        let mut r = coordinated();
        r.proposals[2].outcome = "completed".into();
        refused(&r, &["not rolled back", LEAKY_PLAN]);
        // Rolled back, but not because application health failed.
        let mut r = coordinated();
        r.proposals[2].outcome = "compensated: the database is down".into();
        refused(&r, &["not rolled back", APP_HEALTH]);
        // The leaky release still running at the end.
        let mut r = coordinated();
        r.end.version = LEAKY.into();
        refused(&r, &["leaky release is still running"]);
        // Never shipped.
        let mut r = coordinated();
        r.proposals.retain(|p| p.goal != agents::ship_goal(LEAKY));
        refused(&r, &["never proposed the leaky release"]);
    }

    #[test]
    fn a_run_over_its_time_is_refused() {
        for mut r in [coordinated(), uncoordinated()] {
            r.elapsed = r.wall_clock_max + Duration::from_millis(100);
            refused(&r, &["took 55.1 s, over its limit of 55.0 s"]);
        }
    }

    #[test]
    fn a_story_that_did_not_finish_is_refused() {
        for mut r in [coordinated(), uncoordinated()] {
            r.unfinished = Some("out of ticks after 400: the deploy agent still waits on its plan".into());
            refused(&r, &["did not finish", "out of ticks after 400"]);
        }
    }

    #[test]
    fn uncoordinated_without_the_cascade_is_refused() {
        let mut r = uncoordinated();
        r.end.db_down = false;
        r.end.db_peak = 900;
        refused(&r, &["cascade did not happen", "peak 900 of 1000"]);
    }
}
