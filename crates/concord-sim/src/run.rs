//! The drive loop: every party stepped until idle, then the clock jumps to
//! the earliest pending message, coordinator timer or dynamics tick. No
//! sleeping: a week of simulated time takes well under a second.
//!
//! Coordinated, agents' plans go to the same [`Coordinator`] that runs live;
//! a modelled executor applies dispatched steps to the system, checking
//! fencing tokens and expected before-values; a monitor reports
//! observations (on change beyond a deadband, or once a minute).
//! Uncoordinated, the same agents apply their plans' steps to the system
//! themselves.

use std::collections::BTreeMap;

use concord_core::coordinator::{Config, Coordinator, Effect, Event, Genesis, Input, RECORD_VERSION, Record, Reply};
use concord_core::preview::CORE_VERSION;
use concord_proto::coord::{Control, LeaseReply, StepDispatch, StepOutcome, StepResult};
use concord_proto::{Intent, Observation, ObservationKind, ResourcePath, Short, StepSpec, Value, Verdict};
use serde::Serialize;

use crate::agents::{Action, Agent, Notice};
use crate::check::{Checkers, Violation};
use crate::rng::Rng;
use crate::scenario::{FaultSpec, MessageKind, OperatorOp, Scenario, halt_scope};
use crate::system::{Reading, SysEvent, System};

/// The coordinator's id in recordings of simulated runs.
pub const COORDINATOR_ID: &str = "concord-sim";
/// Most timeline entries kept per run (the count of dropped ones is reported).
pub const TIMELINE_MAX: usize = 20_000;
/// Most messages in flight at once: a scenario that floods the bus is cut short.
pub const QUEUE_MAX: usize = 1_000_000;
/// Most times the operator is asked about one plan version.
pub const APPROVAL_ROUNDS_MAX: u32 = 3;

/// Through concord, or agents acting directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Agents propose through the coordinator; an executor applies what it dispatches.
    Coordinated,
    /// Agents apply their plans' steps to the system themselves.
    Uncoordinated,
}

impl Mode {
    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Coordinated => "coordinated",
            Mode::Uncoordinated => "uncoordinated",
        }
    }
}

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The coordinator could not be rebuilt from its log after a crash.
    #[error("rebuilding the coordinator at {at_ms} ms: {detail}")]
    Rebuild {
        /// When.
        at_ms: u64,
        /// Why.
        detail: String,
    },
    /// The scenario's policy does not compile.
    #[error("policy: {0}")]
    Policy(String),
}

/// One line of the timeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    /// When.
    pub at_ms: u64,
    /// What kind of thing: `propose`, `decided`, `admitted`, `dispatch`,
    /// `outcome`, `saga`, `lease`, `operator`, `system`, `fault`, `alert`, `applied`.
    pub kind: &'static str,
    /// What happened.
    pub text: String,
}

/// What became of one plan version.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PlanFate {
    /// The proposing agent.
    pub agent: String,
    /// When it was proposed.
    pub proposed_ms: u64,
    /// The verdict (uncoordinated: none, it was simply applied).
    pub verdict: Option<Verdict>,
    /// Failing rule ids.
    pub reasons: Vec<String>,
    /// Admitted (at once or after approval); uncoordinated: started.
    pub admitted: bool,
    /// How it ended: `completed`, `compensated`, `failed`, `expired`,
    /// `rejected_by_operator`, `withdrawn`; none while running or when rejected.
    pub ended: Option<String>,
    /// A routine plan.
    pub benign: bool,
}

/// Key series sampled once a minute, for the plot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    /// Sample times, ms.
    pub t_ms: Vec<u64>,
    /// Database connections held.
    pub db_connections: Vec<f64>,
    /// Database limit.
    pub db_max: Vec<f64>,
    /// Per modelled service (name order): queue depth.
    pub queue: Vec<Vec<f64>>,
    /// Per service: pool size x replicas (connections the service may open).
    pub pool_total: Vec<Vec<f64>>,
    /// Per service: application health failing (1) or not (0).
    pub failing: Vec<Vec<u8>>,
    /// Service names.
    pub services: Vec<String>,
}

/// Outcome figures of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Minutes in which some modelled service's application health was failing.
    pub downtime_minutes: f64,
    /// Minutes the database was down.
    pub db_down_minutes: f64,
    /// Times the database fell over.
    pub db_falls: u32,
    /// The database never fell over.
    pub survives: bool,
    /// Most database connections held at once.
    pub peak_connections: f64,
    /// The database's limit at that moment.
    pub connection_limit: f64,
    /// Plans proposed.
    pub proposed: u64,
    /// Plans admitted (uncoordinated: started).
    pub admitted: u64,
    /// Plans held for a human.
    pub held: u64,
    /// Plans rejected.
    pub rejected: u64,
    /// Sagas compensated.
    pub compensated: u64,
    /// Plans applied in full.
    pub completed: u64,
    /// Decisions a human had to take.
    pub approvals_needed: u64,
    /// Benign plans not admitted at once.
    pub benign_blocked: u64,
    /// Breakers tripped.
    pub breakers: u64,
    /// Leases that lapsed.
    pub leases_expired: u64,
    /// Service restarts (restarts and deploys).
    pub restarts: u64,
    /// Inputs handled by the coordinator.
    pub coordinator_inputs: u64,
    /// Observations reported to the coordinator.
    pub observations: u64,
    /// Coordinator crashes survived.
    pub crashes: u64,
}

/// One finished run.
#[derive(Debug)]
pub struct Run {
    /// Mode.
    pub mode: Mode,
    /// The timeline.
    pub timeline: Vec<Entry>,
    /// Entries beyond [`TIMELINE_MAX`], dropped.
    pub timeline_dropped: u64,
    /// Every plan version, by `lineage/version`.
    pub plans: BTreeMap<String, PlanFate>,
    /// Outcome figures.
    pub metrics: Metrics,
    /// Checker violations (coordinated).
    pub violations: Vec<Violation>,
    /// How many in all.
    pub violation_count: u64,
    /// Log events the checkers saw.
    pub checked_events: u64,
    /// The coordinator's log (coordinated): genesis, incarnations, inputs with their events.
    pub records: Vec<Record>,
    /// The system's resource values at the end.
    pub world: BTreeMap<ResourcePath, Value>,
    /// Sampled series.
    pub series: Series,
    /// Decisions, for the plot: (time, verdict, `lineage/version`).
    pub markers: Vec<(u64, Verdict, String)>,
}

#[derive(Clone, Debug)]
enum Who {
    /// An agent; for intents, the plan's lineage and version.
    Agent(usize, Option<(String, u32)>),
    Operator,
}

#[derive(Debug)]
enum Ev {
    ToCoord(Box<Input>),
    Exec(Box<StepDispatch>),
    Notice(usize, Notice),
    Direct {
        agent: usize,
        intent: Box<Intent>,
        step: usize,
    },
    OperatorAction(usize),
    Control(Box<Control>),
    Crash,
    Pause {
        agent: usize,
        until_ms: u64,
    },
}

impl Ev {
    /// A second copy of a bus message (the duplicate fault): built only
    /// when the fault fires, not for every message sent.
    fn duplicate(&self) -> Option<Ev> {
        match self {
            Ev::ToCoord(input) => Some(Ev::ToCoord(input.clone())),
            Ev::Exec(d) => Some(Ev::Exec(d.clone())),
            _ => None,
        }
    }
}

struct Executor {
    /// Dispatch keys applied (idempotency).
    applied: std::collections::BTreeSet<String>,
    /// Highest token seen per path.
    tokens: BTreeMap<ResourcePath, u64>,
    ignore_fencing: bool,
}

struct Engine<'s> {
    s: &'s Scenario,
    mode: Mode,
    now: u64,
    sys: System,
    agents: Vec<Agent>,
    coord: Option<Coordinator>,
    records: Vec<Record>,
    incarnation: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    bus: Rng,
    exec_rng: Rng,
    requests: BTreeMap<u64, Who>,
    next_request: u64,
    lineage_agent: BTreeMap<String, usize>,
    fault_left: Vec<u32>,
    exec: Executor,
    checkers: Checkers,
    series_paths: Vec<(ResourcePath, ObservationKind)>,
    reported: Vec<Option<(Reading, u64)>>,
    readings: Vec<Reading>,
    timeline: Vec<Entry>,
    timeline_dropped: u64,
    plans: BTreeMap<String, PlanFate>,
    markers: Vec<(u64, Verdict, String)>,
    series: Series,
    metrics: Metrics,
    approval_rounds: BTreeMap<String, u32>,
    fake_lease: u64,
    breakers_seen: std::collections::BTreeSet<(String, String, ResourcePath)>,
    operator_globs: Option<(globset::GlobSet, globset::GlobSet)>,
}

fn globs(list: &[String]) -> globset::GlobSet {
    let mut b = globset::GlobSetBuilder::new();
    for g in list {
        // Checked when the scenario was loaded.
        if let Ok(g) = globset::Glob::new(g) {
            b.add(g);
        }
    }
    b.build().unwrap_or_else(|_| globset::GlobSet::empty())
}

fn lv(lineage: &str, version: u32) -> String {
    format!("{lineage}/{version}")
}

fn short(text: &str) -> Short {
    let t: String = text.chars().take(200).collect();
    Short::parse(&t).unwrap_or_else(|_| Short::parse("-").unwrap_or_else(|_| panic!("`-` is a valid short string")))
}

/// Runs a scenario in one mode.
pub fn run(s: &Scenario, mode: Mode) -> Result<Run, RunError> {
    let policy =
        concord_core::policy::Policy::compile(s.policy.clone()).map_err(|e| RunError::Policy(e.to_string()))?;
    let rng = Rng::new(s.file.seed);
    let sys = System::new(s);
    let series_paths = sys.series_paths();
    let mut e = Engine {
        s,
        mode,
        now: 0,
        agents: Agent::all(s),
        coord: None,
        records: Vec::new(),
        incarnation: 1,
        queue: BTreeMap::new(),
        seq: 0,
        bus: rng.fork("bus"),
        exec_rng: rng.fork("executor"),
        requests: BTreeMap::new(),
        next_request: 0,
        lineage_agent: BTreeMap::new(),
        fault_left: s
            .file
            .faults
            .iter()
            .map(|f| match f {
                FaultSpec::FailStep { times, .. }
                | FaultSpec::SlowExecutor { times, .. }
                | FaultSpec::Delay { times, .. }
                | FaultSpec::Duplicate { times, .. } => *times,
                _ => 1,
            })
            .collect(),
        exec: Executor {
            applied: Default::default(),
            tokens: BTreeMap::new(),
            ignore_fencing: s.file.faults.iter().any(|f| matches!(f, FaultSpec::IgnoreFencing {})),
        },
        checkers: Checkers::default(),
        reported: vec![None; series_paths.len()],
        series_paths,
        readings: Vec::new(),
        timeline: Vec::new(),
        timeline_dropped: 0,
        plans: BTreeMap::new(),
        markers: Vec::new(),
        series: Series {
            services: sys.services.iter().map(|s| s.name.clone()).collect(),
            queue: vec![Vec::new(); sys.services.len()],
            pool_total: vec![Vec::new(); sys.services.len()],
            failing: vec![Vec::new(); sys.services.len()],
            ..Series::default()
        },
        sys,
        metrics: Metrics::default(),
        approval_rounds: BTreeMap::new(),
        fake_lease: 0,
        breakers_seen: Default::default(),
        operator_globs: s.file.operator.as_ref().map(|o| (globs(&o.approve), globs(&o.reject))),
    };
    if mode == Mode::Coordinated {
        let genesis = Genesis {
            record_version: RECORD_VERSION,
            now_ms: 0,
            coordinator: COORDINATOR_ID.into(),
            config: Config::default(),
            policy: s.policy.clone(),
            policy_hash: policy.hash.clone(),
            world: s.world.clone(),
        };
        // Started from its genesis record, as the live runtime starts it (the
        // world document under the coordinator's id and incarnation 1), so a
        // replay of the recording rebuilds the same document.
        e.coord = Some(Coordinator::from_genesis(&genesis).map_err(|err| RunError::Rebuild {
            at_ms: 0,
            detail: format!("the scenario's policy: {err}"),
        })?);
        e.records.push(Record::Genesis(Box::new(genesis)));
        e.records.push(Record::Incarnation {
            now_ms: 0,
            coordinator: COORDINATOR_ID.into(),
            incarnation: 1,
            core_version: CORE_VERSION.into(),
        });
        if let Some(op) = &s.file.operator {
            for (i, a) in op.actions.iter().enumerate() {
                e.push(a.at.ms(), Ev::OperatorAction(i));
            }
        }
        for f in &s.file.faults {
            if let FaultSpec::Crash { at, between } = f {
                let t = match (at, between) {
                    (Some(t), _) => t.ms(),
                    (None, Some([a, b])) => rng.fork("crash").between(a.ms(), b.ms()),
                    _ => continue,
                };
                e.push(t, Ev::Crash);
            }
        }
    }
    for f in &s.file.faults {
        if let FaultSpec::Pause { agent, at, lasts } = f
            && let Some(i) = e.agents.iter().position(|a| a.name == *agent)
        {
            e.push(
                at.ms(),
                Ev::Pause {
                    agent: i,
                    until_ms: at.ms() + lasts.ms(),
                },
            );
        }
    }
    e.drive()?;
    Ok(e.finish())
}

impl Engine<'_> {
    fn push(&mut self, at_ms: u64, ev: Ev) {
        if self.queue.len() >= QUEUE_MAX {
            self.note(
                "fault",
                format!("bus full ({QUEUE_MAX} messages): a message was dropped"),
            );
            return;
        }
        self.seq += 1;
        self.queue.insert((at_ms, self.seq), ev);
    }

    fn note(&mut self, kind: &'static str, text: String) {
        if self.timeline.len() >= TIMELINE_MAX {
            self.timeline_dropped += 1;
            return;
        }
        self.timeline.push(Entry {
            at_ms: self.now,
            kind,
            text,
        });
    }

    fn latency(&mut self) -> u64 {
        let b = &self.s.file.bus;
        self.bus.between(b.latency_min.ms(), b.latency_max.ms())
    }

    fn exec_latency(&mut self) -> u64 {
        let b = &self.s.file.bus;
        self.exec_rng.between(b.executor_min.ms(), b.executor_max.ms())
    }

    /// Takes one use of the first matching fault; returns its index.
    fn fault(&mut self, matches: impl Fn(&FaultSpec) -> bool) -> Option<usize> {
        let i = self
            .s
            .file
            .faults
            .iter()
            .enumerate()
            .position(|(i, f)| self.fault_left[i] > 0 && matches(f))?;
        self.fault_left[i] -= 1;
        Some(i)
    }

    /// Sends a message over the bus, through the delay and duplicate faults.
    fn send(&mut self, kind: MessageKind, lineage: Option<&str>, base_ms: u64, ev: Ev) {
        let hits = |f: &FaultSpec, want: &str| -> bool {
            let (m, l) = match f {
                FaultSpec::Delay { message, lineage, .. } if want == "delay" => (message, lineage),
                FaultSpec::Duplicate { message, lineage, .. } if want == "dup" => (message, lineage),
                _ => return false,
            };
            *m == kind && l.as_deref().is_none_or(|l| Some(l) == lineage)
        };
        let mut at = self.now + base_ms + self.latency();
        if let Some(i) = self.fault(|f| hits(f, "delay"))
            && let FaultSpec::Delay { by, .. } = &self.s.file.faults[i]
        {
            at += by.ms();
            self.note("fault", format!("{kind:?} message delayed by {by}").to_lowercase());
        }
        if self.fault(|f| hits(f, "dup")).is_some()
            && let Some(c) = ev.duplicate()
        {
            let again = at + self.latency();
            self.note("fault", format!("{kind:?} message duplicated").to_lowercase());
            self.push(again, c);
        }
        self.push(at, ev);
    }

    fn drive(&mut self) -> Result<(), RunError> {
        let tick = self.s.file.system.tick.map(|d| d.ms()).unwrap_or(1_000);
        let end = self.s.file.duration.ms();
        let mut next_dyn = tick;
        let mut next_sample = 0;
        self.turn_agents();
        loop {
            let tq = self.queue.keys().next().map(|k| k.0);
            let tt = self.coord.as_ref().and_then(Coordinator::next_timer);
            let t = [tq, tt, Some(next_dyn)].into_iter().flatten().min().unwrap_or(next_dyn);
            if t > end {
                break;
            }
            self.now = t;
            if tq == Some(t) {
                if let Some((_, ev)) = self.queue.pop_first() {
                    self.on(ev)?;
                }
                continue;
            }
            if tt.is_some_and(|x| x <= t) {
                self.feed(Input::Tick);
                continue;
            }
            let mut happened = Vec::new();
            self.sys.step(t, tick, &mut happened);
            for h in happened {
                let text = match h {
                    SysEvent::DbDown { wanted, limit } => {
                        format!("the database fell over: {wanted:.0} connections wanted, limit {limit:.0}")
                    }
                    SysEvent::DbUp => "the database is back, with no connections".into(),
                    SysEvent::AppHealth { service, health } => {
                        format!("{service}: application health {}", health.word())
                    }
                };
                self.note("system", text);
            }
            if self.mode == Mode::Coordinated {
                self.observe();
            }
            self.turn_agents();
            if t >= next_sample {
                self.sample();
                next_sample += 60_000;
            }
            next_dyn += tick;
        }
        Ok(())
    }

    fn sample(&mut self) {
        let s = &mut self.series;
        s.t_ms.push(self.now);
        let (c, m) = self
            .sys
            .db
            .as_ref()
            .map(|d| (d.connections, d.max_connections))
            .unwrap_or((0.0, 0.0));
        s.db_connections.push(c);
        s.db_max.push(m);
        for (i, svc) in self.sys.services.iter().enumerate() {
            s.queue[i].push(svc.queue);
            s.pool_total[i].push(svc.pool * svc.replicas);
            s.failing[i].push(u8::from(svc.app == crate::system::Health::Failing));
        }
    }

    /// The monitor: report each series on change beyond the deadband, or when due.
    fn observe(&mut self) {
        let mut readings = std::mem::take(&mut self.readings);
        self.sys.series_values(&mut readings);
        let every = self.s.file.observe.every.ms();
        let band = self.s.file.observe.deadband;
        for (i, r) in readings.iter().enumerate() {
            let due = match self.reported[i] {
                None => true,
                Some((last, at)) => {
                    self.now >= at + every
                        || match (last, *r) {
                            (Reading::Word(a), Reading::Word(b)) => a != b,
                            (Reading::Num(a), Reading::Num(b)) => {
                                (b - a).unsigned_abs() as f64 > band * (a.unsigned_abs() as f64).max(1.0)
                            }
                            _ => true,
                        }
                }
            };
            if !due {
                continue;
            }
            self.reported[i] = Some((*r, self.now));
            self.metrics.observations += 1;
            let (path, kind) = self.series_paths[i].clone();
            let input = Input::Observe {
                agent: self.s.file.observe.agent.clone(),
                observation: Observation {
                    protocol: 1,
                    path,
                    kind,
                    value: r.value(),
                    observed_at_ms: Some(self.now),
                },
            };
            self.send(MessageKind::Observe, None, 0, Ev::ToCoord(Box::new(input)));
        }
        self.readings = readings;
    }

    fn turn_agents(&mut self) {
        let mut actions = Vec::new();
        for i in 0..self.agents.len() {
            self.agents[i].turn(self.now, &self.sys, &mut actions);
            for a in actions.drain(..) {
                self.act(i, a);
            }
        }
    }

    fn act(&mut self, agent: usize, a: Action) {
        let name = self.agents[agent].name.clone();
        match a {
            Action::Propose { intent, benign } => {
                let key = lv(intent.lineage.as_str(), intent.version);
                self.note(
                    "propose",
                    format!(
                        "{name} proposes {} v{}: {} ({})",
                        intent.lineage,
                        intent.version,
                        intent.goal,
                        intent
                            .steps
                            .iter()
                            .map(|s| format!("{} {}{}", s.kind().name(), s.path, args_text(&s.op)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                self.lineage_agent.insert(intent.lineage.to_string(), agent);
                self.checkers.proposed(
                    intent.lineage.as_str(),
                    intent.version,
                    &name,
                    intent.steps.iter().map(|s| s.path.clone()).collect(),
                );
                self.plans.insert(
                    key,
                    PlanFate {
                        agent: name.clone(),
                        proposed_ms: self.now,
                        benign,
                        ..PlanFate::default()
                    },
                );
                match self.mode {
                    Mode::Coordinated => {
                        let lineage = intent.lineage.to_string();
                        let request = self.request(Who::Agent(agent, Some((lineage.clone(), intent.version))));
                        let input = Input::Intent {
                            request,
                            agent: name,
                            intent: *intent,
                        };
                        self.send(MessageKind::Intent, Some(&lineage), 0, Ev::ToCoord(Box::new(input)));
                    }
                    Mode::Uncoordinated => {
                        if let Some(p) = self.plans.get_mut(&lv(intent.lineage.as_str(), intent.version)) {
                            p.admitted = true;
                        }
                        self.agents[agent].notify(Notice::Decided {
                            lineage: intent.lineage.to_string(),
                            version: intent.version,
                            verdict: Verdict::Admit,
                        });
                        let at = self.now + self.exec_latency();
                        self.push(at, Ev::Direct { agent, intent, step: 0 });
                    }
                }
            }
            Action::Lease(req) => match self.mode {
                Mode::Coordinated => {
                    let request = self.request(Who::Agent(agent, None));
                    let at = self.now + self.latency();
                    self.push(
                        at,
                        Ev::ToCoord(Box::new(Input::Lease {
                            request,
                            agent: name,
                            lease: req,
                        })),
                    );
                }
                Mode::Uncoordinated => {
                    // Nobody keeps leases: every agent believes it holds what it asked for.
                    use concord_proto::coord::LeaseRequest as L;
                    let reply = match req {
                        L::Acquire { path, mode, ttl_ms, .. } => {
                            self.fake_lease += 1;
                            LeaseReply::Granted {
                                lease: self.fake_lease,
                                path,
                                mode,
                                expires_at_ms: self.now + ttl_ms,
                            }
                        }
                        L::Renew { lease, ttl_ms } => LeaseReply::Granted {
                            lease,
                            path: ResourcePath::parse("unknown").unwrap_or_else(|_| panic!("valid path")),
                            mode: concord_proto::coord::LeaseMode::Exclusive,
                            expires_at_ms: self.now + ttl_ms,
                        },
                        L::Release { lease } => LeaseReply::Released { lease },
                    };
                    self.agents[agent].notify(Notice::Lease(reply));
                }
            },
        }
    }

    fn request(&mut self, who: Who) -> u64 {
        self.next_request += 1;
        self.requests.insert(self.next_request, who);
        self.next_request
    }

    fn on(&mut self, ev: Ev) -> Result<(), RunError> {
        match ev {
            Ev::ToCoord(input) => self.feed(*input),
            Ev::Exec(d) => self.execute(*d),
            Ev::Notice(i, n) => self.agents[i].notify(n),
            Ev::Direct { agent, intent, step } => self.direct(agent, intent, step),
            Ev::OperatorAction(i) => self.operator_action(i),
            Ev::Control(c) => {
                let request = self.request(Who::Operator);
                let operator = self
                    .s
                    .file
                    .operator
                    .as_ref()
                    .map(|o| o.name.clone())
                    .unwrap_or_default();
                self.feed(Input::Control {
                    request,
                    operator,
                    control: *c,
                });
            }
            Ev::Crash => self.crash()?,
            Ev::Pause { agent, until_ms } => {
                let name = self.agents[agent].name.clone();
                self.agents[agent].paused_until_ms = until_ms;
                self.note("fault", format!("{name} pauses until {}", crate::time::stamp(until_ms)));
            }
        }
        Ok(())
    }

    fn crash(&mut self) -> Result<(), RunError> {
        let Some(old) = self.coord.take() else { return Ok(()) };
        let before = old.state_digest();
        drop(old);
        let mut rebuilt = crate::replay::rebuild(&self.records).map_err(|e| RunError::Rebuild {
            at_ms: self.now,
            detail: e.to_string(),
        })?;
        let after = rebuilt.state_digest();
        if after != before {
            self.checkers.recovery(
                self.now,
                format!("the rebuilt coordinator's state digest {after} differs from the lost one {before}"),
            );
        }
        self.incarnation += 1;
        self.records.push(Record::Incarnation {
            now_ms: self.now,
            coordinator: COORDINATOR_ID.into(),
            incarnation: self.incarnation,
            core_version: CORE_VERSION.into(),
        });
        // As the restarted runtime does: its document's writes go under the
        // new incarnation, never reusing what the lost process wrote.
        rebuilt.incarnate(self.incarnation).map_err(|e| RunError::Rebuild {
            at_ms: self.now,
            detail: e.to_string(),
        })?;
        self.metrics.crashes += 1;
        // As the live runtime does after a restart: dispatches sent and not
        // yet answered go out again; the executor dedupes them on their key.
        for d in rebuilt.outstanding_dispatches() {
            let base = self.exec_latency();
            let at = self.now + base + self.latency();
            self.push(at, Ev::Exec(Box::new(d)));
        }
        let n = self.records.len();
        self.note(
            "fault",
            format!(
                "the coordinator crashed; rebuilt from {n} log records (incarnation {}), state {}",
                self.incarnation,
                if after == before { "identical" } else { "DIFFERENT" }
            ),
        );
        self.coord = Some(rebuilt);
        Ok(())
    }

    fn operator_action(&mut self, i: usize) {
        let Some(op) = &self.s.file.operator else { return };
        let a = &op.actions[i];
        let Ok(scope) = halt_scope(a) else { return };
        let control = match (a.op, a.grade) {
            (OperatorOp::Halt, Some(grade)) => Control::Halt {
                scope,
                grade,
                reason: short(&a.reason),
            },
            (OperatorOp::Resume, _) => Control::Resume {
                scope,
                reason: short(&a.reason),
            },
            _ => return,
        };
        let at = self.now;
        self.push(at, Ev::Control(Box::new(control)));
    }

    /// One input through the coordinator: logged with its events, effects performed.
    fn feed(&mut self, input: Input) {
        let Some(coord) = self.coord.as_mut() else { return };
        let fx = coord.handle(self.now, input.clone());
        let events: Vec<Event> = fx
            .iter()
            .filter_map(|f| match f {
                Effect::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        self.metrics.coordinator_inputs += 1;
        self.records.push(Record::Input {
            now_ms: self.now,
            input: Box::new(input),
            events: events.clone(),
        });
        for e in &events {
            self.checkers.event(self.now, e);
            self.on_event(e);
        }
        for f in fx {
            match f {
                Effect::Reply { request, reply } => self.on_reply(request, reply),
                Effect::Dispatch(d) => {
                    let lineage = d.key.lineage.to_string();
                    let base = self.exec_latency();
                    self.send(MessageKind::Dispatch, Some(&lineage), base, Ev::Exec(d));
                }
                Effect::Alert { message } => self.note("alert", message),
                Effect::Event(_) | Effect::ArmTimer { .. } => {}
            }
        }
    }

    fn notify_owner(&mut self, lineage: &str, n: Notice) {
        if let Some(&i) = self.lineage_agent.get(lineage) {
            let at = self.now + self.latency();
            self.push(at, Ev::Notice(i, n));
        }
    }

    fn end_plan(&mut self, lineage: &str, version: u32, how: &str) {
        if let Some(p) = self.plans.get_mut(&lv(lineage, version)) {
            p.ended = Some(how.to_string());
        }
        self.notify_owner(
            lineage,
            Notice::Ended {
                lineage: lineage.to_string(),
                version,
                ok: how == "completed",
            },
        );
    }

    fn on_event(&mut self, e: &Event) {
        match e {
            Event::Decided {
                agent,
                lineage,
                version,
                hash,
                verdict,
                reasons,
                conflicts,
                material_hash,
                queued,
                ..
            } => {
                let key = lv(lineage.as_str(), *version);
                if let Some(p) = self.plans.get_mut(&key) {
                    p.verdict = Some(*verdict);
                    p.reasons = reasons.iter().map(|r| r.rule.clone()).collect();
                }
                self.markers.push((self.now, *verdict, key.clone()));
                let mut text = format!("{lineage} v{version} of {agent}: {verdict}");
                if *queued {
                    text.push_str(" (queued behind a conflicting plan)");
                }
                if !reasons.is_empty() {
                    let ids: Vec<&str> = reasons.iter().map(|r| r.rule.as_str()).collect();
                    text.push_str(&format!(" [{}]", ids.join(", ")));
                }
                if let Some(c) = conflicts.first() {
                    text.push_str(&format!(" conflicts with {} of {}", c.other, c.agent));
                }
                self.note("decided", text);
                if *verdict == Verdict::NeedsApproval && !*queued {
                    self.ask_operator(lineage.as_str(), *version, hash, material_hash);
                }
            }
            Event::Admitted { lineage, version } => {
                if let Some(p) = self.plans.get_mut(&lv(lineage.as_str(), *version)) {
                    p.admitted = true;
                }
                self.note("admitted", format!("{lineage} v{version} runs as a saga"));
            }
            Event::Approved {
                lineage,
                version,
                operator,
                ..
            } => self.note("operator", format!("{operator} approves {lineage} v{version}")),
            Event::ApprovalStale { lineage, version, .. } => self.note(
                "operator",
                format!("{lineage} v{version}: the preview changed since it was shown; back to the human"),
            ),
            Event::RejectedByOperator {
                lineage,
                version,
                operator,
                ..
            } => {
                self.note("operator", format!("{operator} rejects {lineage} v{version}"));
                self.end_plan(lineage.as_str(), *version, "rejected_by_operator");
            }
            Event::ApprovalExpired { lineage, version } => {
                self.note("operator", format!("{lineage} v{version}: nobody decided in time"));
                self.end_plan(lineage.as_str(), *version, "expired");
            }
            Event::Withdrawn {
                lineage,
                version,
                by_version,
            } => {
                if let Some(p) = self.plans.get_mut(&lv(lineage.as_str(), *version)) {
                    p.ended = Some("withdrawn".into());
                }
                self.note("saga", format!("{lineage} v{version} withdrawn for v{by_version}"));
            }
            Event::Dispatched { key, path, token } => {
                self.note("dispatch", format!("{} on {path} (token {token})", key.text()))
            }
            Event::StepSucceeded { key } => self.note("outcome", format!("{} succeeded", key.text())),
            Event::StepFailed { key, reason } => self.note("outcome", format!("{} failed: {reason}", key.text())),
            Event::Verifying { key, until_ms } => self.note(
                "saga",
                format!("{} verifying until {}", key.text(), crate::time::stamp(*until_ms)),
            ),
            Event::Compensating {
                lineage,
                version,
                reason,
                ..
            } => self.note("saga", format!("{lineage} v{version} compensating: {reason}")),
            Event::Completed { lineage, version } => {
                self.note("saga", format!("{lineage} v{version} completed"));
                self.end_plan(lineage.as_str(), *version, "completed");
            }
            Event::Compensated { lineage, version } => {
                self.note("saga", format!("{lineage} v{version} compensated"));
                self.end_plan(lineage.as_str(), *version, "compensated");
            }
            Event::CompensationFailed {
                lineage,
                version,
                step,
                reason,
            } => self.note(
                "saga",
                format!("{lineage} v{version}: compensation of {step} failed: {reason}"),
            ),
            Event::OutcomeIgnored { key, reason } => self.note("outcome", format!("{} ignored: {reason}", key.text())),
            Event::LeaseGranted { lease } => self.note(
                "lease",
                format!(
                    "lease {} on {} ({:?}) granted to {} until {}",
                    lease.id,
                    lease.path,
                    lease.mode,
                    lease.agent,
                    crate::time::stamp(lease.expires_at_ms)
                )
                .to_lowercase(),
            ),
            Event::LeaseExpired { lease, agent } => {
                self.metrics.leases_expired += 1;
                self.note("lease", format!("lease {lease} of {agent} expired"));
            }
            Event::LeaseReleased { lease } => self.note("lease", format!("lease {lease} released")),
            Event::LeaseRenewed { .. } => {}
            // A world-document rotation changes no plan's fate.
            Event::WorldRotated { .. } => {}
            Event::BreakerTripped { breaker } => {
                // Counted once per (agent, kind, path): the core reports a trip
                // again for each refused repeat while the window still holds it.
                if self.breakers_seen.insert((
                    breaker.agent.clone(),
                    breaker.kind.name().to_string(),
                    breaker.path.clone(),
                )) {
                    self.metrics.breakers += 1;
                }
                self.note(
                    "saga",
                    format!(
                        "breaker tripped: {} repeated {} on {}",
                        breaker.agent, breaker.kind, breaker.path
                    ),
                );
            }
            Event::Halted {
                operator,
                scope,
                grade,
                reason,
            } => self.note(
                "operator",
                format!(
                    "{operator}: halt ({}) on {}: {reason}",
                    format!("{grade:?}").to_lowercase(),
                    scope_text(scope)
                ),
            ),
            Event::Resumed { operator, scope, .. } => {
                self.note("operator", format!("{operator}: resume {}", scope_text(scope)))
            }
            Event::SagaDecided {
                lineage,
                action,
                operator,
            } => self.note(
                "operator",
                format!("{operator}: {action:?} saga {lineage}").to_lowercase(),
            ),
        }
    }

    fn ask_operator(&mut self, lineage: &str, version: u32, hash: &str, material: &str) {
        let Some(op) = &self.s.file.operator else { return };
        let Some((approve, reject)) = &self.operator_globs else {
            return;
        };
        let rounds = self.approval_rounds.entry(lv(lineage, version)).or_insert(0);
        if *rounds >= APPROVAL_ROUNDS_MAX {
            return;
        }
        *rounds += 1;
        let Ok(id) = concord_proto::Id::parse(lineage) else {
            return;
        };
        let control = if approve.is_match(lineage) {
            Control::Approve {
                lineage: id,
                version,
                plan_hash: hash.to_string(),
                material_hash: material.to_string(),
                reason: short("looked at the preview"),
            }
        } else if reject.is_match(lineage) {
            Control::Reject {
                lineage: id,
                version,
                reason: short("looked at the preview"),
            }
        } else {
            return;
        };
        let at = self.now + op.after.ms();
        self.push(at, Ev::Control(Box::new(control)));
    }

    fn on_reply(&mut self, request: u64, reply: Reply) {
        let Some(who) = self.requests.remove(&request) else {
            return;
        };
        match (who, reply) {
            (Who::Agent(i, Some((lineage, version))), Reply::Decision(d)) => {
                let n = Notice::Decided {
                    lineage,
                    version,
                    verdict: d.verdict,
                };
                let at = self.now + self.latency();
                self.push(at, Ev::Notice(i, n));
            }
            (Who::Agent(i, _), Reply::Lease(r)) => {
                let name = self.agents[i].name.clone();
                if let LeaseReply::Refused { code, message, .. } = &r {
                    self.note("lease", format!("{name}: lease refused ({code}): {message}"));
                }
                let at = self.now + self.latency();
                self.push(at, Ev::Notice(i, Notice::Lease(r)));
            }
            (Who::Operator, Reply::Control { ok: false, message }) => {
                self.note("operator", format!("control refused: {message}"));
            }
            _ => {}
        }
    }

    /// The modelled executor: idempotent on the dispatch key, refuses stale
    /// fencing tokens, applies as a compare-and-set on the expected before-values.
    fn execute(&mut self, d: StepDispatch) {
        let lineage = d.key.lineage.to_string();
        let step = d.key.step.to_string();
        if let Some(i) = self.fault(
            |f| matches!(f, FaultSpec::SlowExecutor { lineage: l, .. } if l.as_deref().is_none_or(|l| l == lineage)),
        ) && let FaultSpec::SlowExecutor { delay, .. } = &self.s.file.faults[i]
        {
            let at = self.now + delay.ms();
            self.note(
                "fault",
                format!("the executor is slow: {} applies {delay} late", d.key.text()),
            );
            self.push(at, Ev::Exec(Box::new(d)));
            return;
        }
        let key = d.key.text();
        let seen_before = self.checkers.delivered(&d.path, d.fencing_token);
        let seen = self.exec.tokens.entry(d.path.clone()).or_insert(0);
        let result = if self.exec.applied.contains(&key) {
            StepResult::Succeeded
        } else if d.fencing_token < *seen && !self.exec.ignore_fencing {
            StepResult::StaleToken { seen: *seen }
        } else {
            *seen = (*seen).max(d.fencing_token);
            let failing = self.fault(|f| {
                matches!(f, FaultSpec::FailStep { lineage: l, step: s, .. }
                    if *l == lineage && s.as_deref().is_none_or(|s| s == step) && d.key.phase == concord_proto::coord::Phase::Do)
            });
            if let Some(i) = failing {
                let reason = match &self.s.file.faults[i] {
                    FaultSpec::FailStep { reason, .. } => reason.clone(),
                    _ => String::new(),
                };
                StepResult::Failed { reason: short(&reason) }
            } else {
                let drift: Vec<(ResourcePath, Option<Value>)> = d
                    .expected_before
                    .iter()
                    .filter(|(p, v)| self.sys.get(p) != v.as_ref())
                    .map(|(p, _)| (p.clone(), self.sys.get(p).cloned()))
                    .collect();
                if !drift.is_empty() {
                    StepResult::Drift { actual: drift }
                } else {
                    match d.op().map_err(|e| e.to_string()).and_then(|op| {
                        self.sys.apply(
                            self.now,
                            &StepSpec {
                                path: d.path.clone(),
                                op,
                            },
                        )
                    }) {
                        Ok(_) => {
                            self.exec.applied.insert(key.clone());
                            self.checkers.applied(self.now, &d.path, d.fencing_token, seen_before);
                            StepResult::Succeeded
                        }
                        Err(e) => StepResult::Failed { reason: short(&e) },
                    }
                }
            }
        };
        match &result {
            StepResult::Succeeded => {}
            StepResult::Failed { reason } => self.note("outcome", format!("executor: {key} failed: {reason}")),
            StepResult::StaleToken { seen } => self.note(
                "outcome",
                format!(
                    "executor: {key} refused: token {} is stale (seen {seen})",
                    d.fencing_token
                ),
            ),
            StepResult::Drift { actual } => self.note(
                "outcome",
                format!("executor: {key} refused: drift ({} paths differ)", actual.len()),
            ),
        }
        let input = Input::Outcome {
            executor: "executor".into(),
            outcome: StepOutcome { key: d.key, result },
        };
        self.send(MessageKind::Outcome, Some(&lineage), 0, Ev::ToCoord(Box::new(input)));
    }

    /// Uncoordinated: the agent applies step `step` of its plan itself.
    fn direct(&mut self, agent: usize, intent: Box<Intent>, step: usize) {
        let lineage = intent.lineage.to_string();
        let version = intent.version;
        let Some(s) = intent.steps.get(step) else { return };
        let sid = s.id.to_string();
        let failing = self.fault(|f| {
            matches!(f, FaultSpec::FailStep { lineage: l, step: st, .. } if *l == lineage && st.as_deref().is_none_or(|x| x == sid))
        });
        let result = match failing {
            Some(i) => Err(match &self.s.file.faults[i] {
                FaultSpec::FailStep { reason, .. } => reason.clone(),
                _ => String::new(),
            }),
            None => self
                .sys
                .apply(
                    self.now,
                    &StepSpec {
                        path: s.path.clone(),
                        op: s.op.clone(),
                    },
                )
                .map(|_| ()),
        };
        let name = self.agents[agent].name.clone();
        match result {
            Err(why) => {
                self.note(
                    "applied",
                    format!("{name}: {lineage} v{version} step {sid} failed: {why}"),
                );
                if let Some(p) = self.plans.get_mut(&lv(&lineage, version)) {
                    p.ended = Some("failed".into());
                }
                self.agents[agent].notify(Notice::Ended {
                    lineage,
                    version,
                    ok: false,
                });
            }
            Ok(()) => {
                self.note(
                    "applied",
                    format!(
                        "{name} applies {lineage} v{version} step {sid}: {} {}{}",
                        s.kind().name(),
                        s.path,
                        args_text(&s.op)
                    ),
                );
                if step + 1 < intent.steps.len() {
                    let at = self.now + self.exec_latency();
                    self.push(
                        at,
                        Ev::Direct {
                            agent,
                            intent,
                            step: step + 1,
                        },
                    );
                } else {
                    if let Some(p) = self.plans.get_mut(&lv(&lineage, version)) {
                        p.ended = Some("completed".into());
                    }
                    self.agents[agent].notify(Notice::Ended {
                        lineage,
                        version,
                        ok: true,
                    });
                }
            }
        }
    }

    fn finish(mut self) -> Run {
        let m = &mut self.metrics;
        let minutes = |ms: u64| (ms as f64 / 600.0).round() / 100.0;
        m.downtime_minutes = minutes(self.sys.downtime_ms);
        m.db_down_minutes = minutes(self.sys.db_down_ms);
        m.db_falls = self.sys.db.as_ref().map(|d| d.falls).unwrap_or(0);
        m.survives = m.db_falls == 0;
        m.peak_connections = self.sys.peak_connections.0.round();
        m.connection_limit = self.sys.peak_connections.1;
        m.restarts = self.sys.services.iter().map(|s| s.restarts).sum();
        for p in self.plans.values() {
            m.proposed += 1;
            m.admitted += u64::from(p.admitted);
            m.held += u64::from(p.verdict == Some(Verdict::NeedsApproval));
            m.rejected += u64::from(p.verdict == Some(Verdict::Reject));
            m.compensated += u64::from(p.ended.as_deref() == Some("compensated"));
            m.completed += u64::from(p.ended.as_deref() == Some("completed"));
            m.benign_blocked += u64::from(p.benign && p.verdict.is_some_and(|v| v != Verdict::Admit));
        }
        m.approvals_needed = m.held;
        Run {
            mode: self.mode,
            timeline: self.timeline,
            timeline_dropped: self.timeline_dropped,
            plans: self.plans,
            metrics: self.metrics,
            violation_count: self.checkers.count,
            violations: self.checkers.violations,
            checked_events: self.checkers.events,
            records: self.records,
            world: self.sys.world.resources,
            series: self.series,
            markers: self.markers,
        }
    }
}

fn scope_text(scope: &concord_proto::coord::HaltScope) -> String {
    use concord_proto::coord::HaltScope as H;
    match scope {
        H::All => "everything".into(),
        H::Agent(a) => format!("agent {a}"),
        H::Path(p) => format!("path {p}"),
    }
}

fn args_text(op: &concord_proto::Op) -> String {
    use concord_proto::Op;
    match op {
        Op::Set(a) => format!(" = {}", a.value),
        Op::Scale(a) => format!(" to {} replicas", a.replicas),
        Op::Deploy(a) => format!(" {} ({})", a.version, a.artifact),
        Op::Grant(g) => format!(" {}:{}", g.principal, g.role),
        _ => String::new(),
    }
}
