//! The live demo: the seven-days incident, played on the bus and averted.
//!
//! A modelled system ([`system`]) runs as an executor; the three agents of
//! the story ([`agents`]) watch it and submit plans. Coordinated, the plans
//! go to a coordinator on a local NATS server (as `concord dev` runs it) and
//! the coordination log is printed as it happens; uncoordinated, the same
//! agents apply their plans straight to the system. [`run`] plays either and
//! returns a [`Report`] that [`Report::check`] judges.
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
use concord_proto::{ResourcePath, StepKind};
use tokio::sync::watch;

use crate::agents::{Ledger, Pace, Proposal, Route};
use crate::system::{LEAKY, Shared, State};

/// Why the demo could not run (not: the outcome was wrong; see [`Report::check`]).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// NATS, the coordinator or the executor did not start.
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
    /// Ticks to play once the story is over (deploy done; the resource agent
    /// out of rungs or the service healthy again).
    pub settle_ticks: u64,
    /// The most ticks in all.
    pub ticks_max: u64,
}

impl Options {
    /// The demo's defaults: 100 ms ticks.
    pub fn new(root: &Path, coordinated: bool) -> Options {
        Options {
            coordinated,
            tick: Duration::from_millis(100),
            root: root.to_path_buf(),
            settle_ticks: 40,
            ticks_max: 900,
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
    /// Every rule id behind a verdict.
    pub findings: BTreeSet<String>,
    /// How long it took.
    pub elapsed: Duration,
}

/// The rules that must have stopped the cascade in a coordinated run.
pub const EXPECTED_FINDINGS: [&str; 2] = ["compounding.masking", "coupling.db_connections"];

impl Report {
    /// What is wrong with the outcome (empty: as the story expects).
    pub fn check(&self) -> Vec<String> {
        let mut wrong = Vec::new();
        let e = &self.end;
        if self.coordinated {
            if e.db_down || e.db_peak > e.max_connections {
                wrong.push(format!(
                    "the database held {} connections (max {}), down: {}",
                    e.db_peak, e.max_connections, e.db_down
                ));
            }
            for f in EXPECTED_FINDINGS {
                if !self.findings.contains(f) {
                    wrong.push(format!("no verdict named `{f}`"));
                }
            }
            if !self
                .proposals
                .iter()
                .any(|p| p.agent == "deploy" && p.outcome.starts_with("compensated"))
            {
                wrong.push("the leaky release was not rolled back by its saga".into());
            }
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

    /// The summary, for people.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mode = if self.coordinated {
            "coordinated"
        } else {
            "uncoordinated"
        };
        s.push_str(&format!("== summary ({mode}, {:.1} s)\n", self.elapsed.as_secs_f64()));
        for p in &self.proposals {
            s.push_str(&format!(
                "{:<9} {:<26} {:<40} -> {}\n",
                p.agent, p.plan, p.goal, p.verdict
            ));
            for (rule, msg) in &p.reasons {
                s.push_str(&format!("            {rule}: {msg}\n"));
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
            s.push_str(&format!("findings behind the verdicts: {}\n", f.join(", ")));
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

    // Coordinated: a NATS server, the coordinator, the system's executor.
    let mut keep = Vec::<Box<dyn std::any::Any + Send>>::new();
    let mut url = String::new();
    let mut stop_coordinator = None;
    let mut log_task = None;
    if opts.coordinated {
        let bin = find_nats_server(Some(&opts.root)).map_err(|e| setup(&e))?;
        let server = ServerProcess::start(ServerOptions {
            bin: Some(bin),
            ..ServerOptions::default()
        })
        .map_err(|e| setup(&e))?;
        url = server.url();
        print(format!("concord: NATS with JetStream at {url}"));
        keep.push(Box::new(server));
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
    let monitor = if opts.coordinated {
        Some(route("monitor").await?)
    } else {
        None
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let deploy = tokio::spawn(agents::deploy(route("deploy").await?, pace, ledger.clone()));
    let uptime = tokio::spawn(agents::uptime(
        route("uptime").await?,
        system.clone(),
        pace,
        ledger.clone(),
        stop_rx.clone(),
    ));
    let resource = tokio::spawn(agents::resource(
        route("resource").await?,
        system.clone(),
        pace,
        ledger.clone(),
        stop_rx.clone(),
    ));

    // The system's clock; its monitor reports what it sees.
    let paths = [
        "svc/api/health/liveness",
        "svc/api/health/app",
        "svc/api/queue_depth",
        "db/primary/connections",
    ]
    .map(|p| ResourcePath::parse(p).expect("a path"));
    let mut settled_at = None;
    let mut acted = 0;
    let mut reported = (String::new(), false);
    let mut interval = tokio::time::interval(opts.tick);
    // Under load, late ticks are not made up in a burst: the agents must see
    // the system move at the pace they are written for.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for tick in 0..opts.ticks_max {
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
        if let Some(Route::Concord(m)) = &monitor {
            let _ = m.observe_liveness(&paths[0], s.liveness()).await;
            let _ = m.observe_app_health(&paths[1], s.app_health()).await;
            let _ = m.observe_metric(&paths[2], s.queue as f64).await;
            let _ = m.observe_metric(&paths[3], f64::from(s.db_connections)).await;
        }
        // The story is over when the deploy agent is done and either the
        // resource agent has run out of ideas or the service is healthy again.
        let quiet = s.queue == 0 && s.app_health() == "ok";
        if !(deploy.is_finished() && (resource.is_finished() || quiet)) {
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
        .flat_map(|p| p.reasons.iter().map(|(r, _)| r.clone()))
        .collect();
    let end = system.lock().expect("system lock").clone();
    Ok(Report {
        coordinated: opts.coordinated,
        proposals,
        end,
        findings,
        elapsed: started.elapsed(),
    })
}
