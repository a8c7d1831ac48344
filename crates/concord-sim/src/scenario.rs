//! Scenario files: the initial world, the system's dynamics, the agents,
//! the faults, the policy and the expected outcome, in TOML.
//!
//! A bad file is refused with the field that is wrong, e.g.
//! `agents[1].ladder: invalid type: string "x", expected i64`. The format is
//! documented in `simulations/README.md`; every shipped scenario is an
//! executable specification that `cargo test` runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use concord_core::policy::{Policy, PolicyConfig};
use concord_core::world::World;
use concord_proto::coord::{HaltGrade, HaltScope, LeaseMode};
use concord_proto::{Intent, ResourcePath, Value, decode_intent};
use serde::{Deserialize, Serialize};

use crate::time::Dur;

/// Most agents in one scenario.
pub const AGENTS_MAX: usize = 64;
/// Most scripted actions of one agent, operator actions, faults or releases.
pub const ITEMS_MAX: usize = 1_024;

/// Why a scenario was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{file}: {detail}")]
    Read {
        /// The file.
        file: String,
        /// What went wrong.
        detail: String,
    },
    /// A field is missing, of the wrong type, unknown or out of range.
    #[error("{file}: `{field}`: {detail}")]
    Field {
        /// The file.
        file: String,
        /// The field path, e.g. `agents[0].ladder`.
        field: String,
        /// What is wrong.
        detail: String,
    },
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Short name, used in reports.
    pub name: String,
    /// What the scenario shows.
    pub description: String,
    /// Seed for every random choice (delays, crash points).
    #[serde(default)]
    pub seed: u64,
    /// How much simulated time to run.
    pub duration: Dur,
    /// The policy file, relative to the scenario file.
    #[serde(default)]
    pub policy: Option<String>,
    /// Or the policy inline.
    #[serde(default)]
    pub policy_inline: Option<toml::Table>,
    /// The world: a path to a world file (relative to the scenario file) or a table.
    pub world: toml::Value,
    /// The system's dynamics.
    #[serde(default)]
    pub system: SystemSpec,
    /// How observations reach the coordinator.
    #[serde(default)]
    pub observe: ObserveSpec,
    /// Message and executor latencies.
    #[serde(default)]
    pub bus: BusSpec,
    /// The agents.
    #[serde(default)]
    pub agents: Vec<AgentSpec>,
    /// The human operator (coordinated runs only).
    #[serde(default)]
    pub operator: Option<OperatorSpec>,
    /// Injected faults.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// The expected outcome, per mode.
    #[serde(default)]
    pub expect: ExpectSpec,
}

/// The modelled system.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemSpec {
    /// Resolution of the dynamics; default one second.
    #[serde(default)]
    pub tick: Option<Dur>,
    /// The shared database, if modelled.
    #[serde(default)]
    pub database: Option<DatabaseSpec>,
    /// Modelled services, by the world's service name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    /// Release behaviour by version.
    #[serde(default)]
    pub releases: Vec<ReleaseSpec>,
    /// Things that happen to the system at given times.
    #[serde(default)]
    pub events: Vec<SystemEventSpec>,
}

/// A database that refuses connections above `max_connections` and falls
/// over when refused load lasts.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    /// Its subtree, e.g. `db/primary`; `<path>/max_connections` holds its limit.
    pub path: ResourcePath,
    /// Refused load sustained this long makes it fall over.
    pub fail_after: Dur,
    /// Down this long, then back with no connections.
    pub recovery: Dur,
}

/// A modelled service: demand, connection use, queue, latency, health.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Requests per second arriving.
    pub demand_rps: f64,
    /// How long a request holds a database connection, ms.
    pub hold_ms: f64,
    /// Latency with an empty queue, ms.
    pub latency_base_ms: f64,
    /// Application health fails above this latency, ms.
    pub latency_slo_ms: f64,
    /// How long a restart (or deploy) takes the service down.
    #[serde(default)]
    pub restart: Option<Dur>,
    /// Daily swing of demand, 0..1 (0.3: ±30% over the day).
    #[serde(default)]
    pub diurnal: f64,
}

/// What running a version does.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSpec {
    /// The service (world name).
    pub service: String,
    /// The version.
    pub version: String,
    /// Connections leaked per replica per minute (never returned until a restart).
    #[serde(default)]
    pub leak_per_min: f64,
    /// Added latency, ms.
    #[serde(default)]
    pub extra_latency_ms: f64,
}

/// A change to the system's behaviour for a while (a slow dependency, a spike).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemEventSpec {
    /// When it starts.
    pub at: Dur,
    /// How long it lasts.
    #[serde(rename = "for")]
    pub lasts: Dur,
    /// The service (world name).
    pub service: String,
    /// Added latency, ms.
    #[serde(default)]
    pub extra_latency_ms: f64,
    /// Demand multiplier while it lasts.
    #[serde(default)]
    pub demand_factor: Option<f64>,
}

/// How observations reach the coordinator.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserveSpec {
    /// A series is reported at least this often.
    #[serde(default = "one_minute")]
    pub every: Dur,
    /// And earlier when a metric moves by more than this fraction (health: on any change).
    #[serde(default = "deadband")]
    pub deadband: f64,
    /// The identity observations are reported under.
    #[serde(default = "monitor")]
    pub agent: String,
}

impl Default for ObserveSpec {
    fn default() -> Self {
        ObserveSpec {
            every: one_minute(),
            deadband: deadband(),
            agent: monitor(),
        }
    }
}

fn one_minute() -> Dur {
    Dur(60_000)
}
fn deadband() -> f64 {
    0.05
}
fn monitor() -> String {
    "monitor".into()
}

/// Latencies, drawn from the seed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSpec {
    /// Shortest message latency.
    #[serde(default = "bus_min")]
    pub latency_min: Dur,
    /// Longest message latency.
    #[serde(default = "bus_max")]
    pub latency_max: Dur,
    /// Shortest time an executor takes to apply a step.
    #[serde(default = "exec_min")]
    pub executor_min: Dur,
    /// Longest.
    #[serde(default = "exec_max")]
    pub executor_max: Dur,
}

impl Default for BusSpec {
    fn default() -> Self {
        BusSpec {
            latency_min: bus_min(),
            latency_max: bus_max(),
            executor_min: exec_min(),
            executor_max: exec_max(),
        }
    }
}

fn bus_min() -> Dur {
    Dur(5)
}
fn bus_max() -> Dur {
    Dur(50)
}
fn exec_min() -> Dur {
    Dur(1_000)
}
fn exec_max() -> Dur {
    Dur(5_000)
}

/// An agent: scripted, or one of the story's rule-driven agents.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentSpec {
    /// Does what its timeline says.
    Scripted {
        /// Identity.
        name: String,
        /// The timeline.
        actions: Vec<ScriptAction>,
    },
    /// Ships releases; re-plans with the next attempt after a failure.
    Deploy {
        /// Identity.
        name: String,
        /// The service (world name).
        service: String,
        /// Lineage of its plans; default `<name>-<service>`.
        #[serde(default)]
        lineage: Option<String>,
        /// When it ships the first attempt.
        at: Dur,
        /// Attempts in order; each after the previous one was rejected or failed.
        releases: Vec<ReleaseAttempt>,
        /// How long it waits before re-planning.
        #[serde(default = "ten_minutes")]
        replan_after: Dur,
        /// Its plans are routine: a block counts as needless.
        #[serde(default)]
        benign: bool,
    },
    /// Trusts heartbeats: a live service that is slow gets restarted.
    Uptime {
        /// Identity.
        name: String,
        /// The service (world name).
        service: String,
        /// Restart when latency stays above this, ms.
        latency_above_ms: f64,
        /// For this long.
        sustain: Dur,
        /// At most one restart per cooldown.
        cooldown: Dur,
        /// Routine plans.
        #[serde(default)]
        benign: bool,
    },
    /// Answers a growing queue by raising a knob along a ladder.
    Resource {
        /// Identity.
        name: String,
        /// The service (world name).
        service: String,
        /// `pool_size` or `replicas`.
        knob: Knob,
        /// The values it raises to, in order.
        ladder: Vec<i64>,
        /// Acts when the queue stays above this.
        queue_above: f64,
        /// For this long.
        sustain: Dur,
        /// At most one plan per cooldown.
        cooldown: Dur,
        /// Lineage of its plans; default `<name>-<service>-<knob>`.
        #[serde(default)]
        lineage: Option<String>,
        /// Routine plans.
        #[serde(default)]
        benign: bool,
    },
}

fn ten_minutes() -> Dur {
    Dur(600_000)
}

impl AgentSpec {
    /// The agent's identity.
    pub fn name(&self) -> &str {
        match self {
            AgentSpec::Scripted { name, .. }
            | AgentSpec::Deploy { name, .. }
            | AgentSpec::Uptime { name, .. }
            | AgentSpec::Resource { name, .. } => name,
        }
    }
}

/// What a resource agent turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Knob {
    /// `<service>/pool_size`, with `set`.
    PoolSize,
    /// `<service>/replicas`, with `scale`.
    Replicas,
}

/// One attempt of a deploy agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseAttempt {
    /// Version.
    pub version: String,
    /// Artifact.
    pub artifact: String,
    /// Grants the attempt adds (scope creep).
    #[serde(default)]
    pub grants: Vec<GrantSpec>,
    /// Application-health verification after the deploy.
    #[serde(default)]
    pub verify: Option<VerifySpec>,
}

/// A grant step.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// Where.
    pub path: ResourcePath,
    /// Who.
    pub principal: String,
    /// What role.
    pub role: String,
}

/// A verification on the service's application health.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    /// Bake time.
    pub bake: Dur,
    /// Freshness of the observation.
    pub fresh: Dur,
}

/// One entry of a scripted agent's timeline: exactly one of the actions.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptAction {
    /// When.
    pub at: Dur,
    /// Propose this plan (an intent; `protocol` may be left out).
    #[serde(default)]
    pub propose: Option<toml::Value>,
    /// The proposed plan is routine (a block counts as needless).
    #[serde(default)]
    pub benign: bool,
    /// Acquire a lease.
    #[serde(default)]
    pub acquire: Option<AcquireSpec>,
    /// Renew the agent's last lease for this long.
    #[serde(default)]
    pub renew: Option<Dur>,
    /// Release the agent's last lease.
    #[serde(default)]
    pub release: bool,
}

/// A lease request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireSpec {
    /// Path.
    pub path: ResourcePath,
    /// Mode; default exclusive.
    #[serde(default = "exclusive")]
    pub mode: LeaseMode,
    /// Time to live.
    pub ttl: Dur,
    /// Wait in the queue.
    #[serde(default)]
    pub wait: bool,
}

fn exclusive() -> LeaseMode {
    LeaseMode::Exclusive
}

/// The human at the console (coordinated runs only).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSpec {
    /// Identity.
    #[serde(default = "alice")]
    pub name: String,
    /// Lineage globs of held plans the operator approves.
    #[serde(default)]
    pub approve: Vec<String>,
    /// Lineage globs of held plans the operator rejects.
    #[serde(default)]
    pub reject: Vec<String>,
    /// How long a human takes to decide.
    #[serde(default = "ten_minutes")]
    pub after: Dur,
    /// Halts and resumes at given times.
    #[serde(default)]
    pub actions: Vec<OperatorAction>,
}

fn alice() -> String {
    "alice".into()
}

/// A halt or a resume.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorAction {
    /// When.
    pub at: Dur,
    /// `halt` or `resume`.
    pub op: OperatorOp,
    /// `all`, `agent` or `path`.
    pub scope: String,
    /// The agent or path for `agent` and `path` scopes.
    #[serde(default)]
    pub name: Option<String>,
    /// For halts: `freeze`, `drain` or `rollback`.
    #[serde(default)]
    pub grade: Option<HaltGrade>,
    /// Why.
    #[serde(default = "drill")]
    pub reason: String,
}

fn drill() -> String {
    "operator action".into()
}

/// Operator commands a scenario can schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorOp {
    /// Halt.
    Halt,
    /// Resume.
    Resume,
}

/// Which messages a delay or duplicate fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Agent -> coordinator intents.
    Intent,
    /// Coordinator -> executor dispatches.
    Dispatch,
    /// Executor -> coordinator outcomes.
    Outcome,
    /// Monitor -> coordinator observations.
    Observe,
}

/// A fault.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// A step fails (the system refuses it), in both modes.
    FailStep {
        /// Plan lineage.
        lineage: String,
        /// Step id; any step if absent.
        #[serde(default)]
        step: Option<String>,
        /// The reason reported.
        #[serde(default = "injected")]
        reason: String,
        /// How many times.
        #[serde(default = "once")]
        times: u32,
    },
    /// The executor applies the step, but reports only after `delay`.
    SlowExecutor {
        /// Plan lineage; any if absent.
        #[serde(default)]
        lineage: Option<String>,
        /// Delay of the outcome.
        delay: Dur,
        /// How many times.
        #[serde(default = "once")]
        times: u32,
    },
    /// A message arrives late.
    Delay {
        /// Which messages.
        message: MessageKind,
        /// Plan lineage; any if absent.
        #[serde(default)]
        lineage: Option<String>,
        /// By how much.
        by: Dur,
        /// How many times.
        #[serde(default = "once")]
        times: u32,
    },
    /// A message arrives twice.
    Duplicate {
        /// Which messages.
        message: MessageKind,
        /// Plan lineage; any if absent.
        #[serde(default)]
        lineage: Option<String>,
        /// How many times.
        #[serde(default = "once")]
        times: u32,
    },
    /// An agent stops (GC pause, partition) and resumes later.
    Pause {
        /// The agent.
        agent: String,
        /// When.
        at: Dur,
        /// How long.
        #[serde(rename = "for")]
        lasts: Dur,
    },
    /// The coordinator process dies and is rebuilt from its log.
    Crash {
        /// When; or a seeded point in `between`.
        #[serde(default)]
        at: Option<Dur>,
        /// A seeded point between these two times.
        #[serde(default)]
        between: Option<[Dur; 2]>,
    },
    /// A broken executor that applies writes whatever their fencing token
    /// (to show that the checkers catch it).
    IgnoreFencing {},
}

fn injected() -> String {
    "injected failure".into()
}
fn once() -> u32 {
    1
}

/// The expected outcome.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// Through concord.
    #[serde(default)]
    pub coordinated: Option<ModeExpect>,
    /// Agents acting directly.
    #[serde(default)]
    pub uncoordinated: Option<ModeExpect>,
}

/// What a run must show; every field given is compared, lists exactly (as
/// sets of `lineage/version`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModeExpect {
    /// Plans admitted (at once or after approval).
    #[serde(default)]
    pub admitted: Option<Vec<String>>,
    /// Plans held for a human.
    #[serde(default)]
    pub held: Option<Vec<String>>,
    /// Plans rejected.
    #[serde(default)]
    pub rejected: Option<Vec<String>>,
    /// Sagas that compensated.
    #[serde(default)]
    pub compensated: Option<Vec<String>>,
    /// Plans applied in full (uncoordinated) or completed (coordinated).
    #[serde(default)]
    pub completed: Option<Vec<String>>,
    /// Whether the system survives (the database never falls over).
    #[serde(default)]
    pub survives: Option<bool>,
    /// Downtime bounds, minutes.
    #[serde(default)]
    pub downtime_minutes_max: Option<f64>,
    /// Downtime bounds, minutes.
    #[serde(default)]
    pub downtime_minutes_min: Option<f64>,
    /// Plans that needed a human.
    #[serde(default)]
    pub approvals_needed: Option<u64>,
    /// Benign plans not admitted without a human.
    #[serde(default)]
    pub benign_blocked: Option<u64>,
    /// Breakers tripped.
    #[serde(default)]
    pub breakers: Option<u64>,
    /// Leases that lapsed.
    #[serde(default)]
    pub leases_expired: Option<u64>,
    /// Final values in the modelled system.
    #[serde(default)]
    pub world: BTreeMap<ResourcePath, Value>,
}

/// A scenario, checked and ready to run.
#[derive(Debug)]
pub struct Scenario {
    /// As written.
    pub file: ScenarioFile,
    /// Where it came from (for messages).
    pub source: String,
    /// The initial world.
    pub world: World,
    /// The policy configuration.
    pub policy: PolicyConfig,
    /// Scripted plans, by (agent index, action index).
    pub plans: BTreeMap<(usize, usize), Intent>,
}

fn field(file: &str, field: impl Into<String>, detail: impl Into<String>) -> ScenarioError {
    ScenarioError::Field {
        file: file.to_string(),
        field: field.into(),
        detail: detail.into(),
    }
}

fn read(path: &Path) -> Result<String, ScenarioError> {
    std::fs::read_to_string(path).map_err(|e| ScenarioError::Read {
        file: path.display().to_string(),
        detail: e.to_string(),
    })
}

impl Scenario {
    /// Reads and checks a scenario file; relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = read(path)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Scenario::parse(&text, &path.display().to_string(), &dir)
    }

    /// Checks a scenario given as text; `dir` resolves relative paths.
    pub fn parse(text: &str, source: &str, dir: &Path) -> Result<Scenario, ScenarioError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ScenarioError::Read {
            file: source.to_string(),
            detail: e.to_string(),
        })?;
        // Agents and faults are tagged by `kind`; serde reads a tagged entry
        // whole before choosing its variant and loses the path inside it, so
        // each entry is read on its own, under its own name.
        let mut table = table;
        let agents = take_list(&mut table, "agents");
        let faults = take_list(&mut table, "faults");
        let mut file: ScenarioFile = typed(source, "", toml::Value::Table(table))?;
        file.agents = agents
            .into_iter()
            .enumerate()
            .map(|(i, v)| tagged(source, &format!("agents[{i}]"), v))
            .collect::<Result<_, _>>()?;
        file.faults = faults
            .into_iter()
            .enumerate()
            .map(|(i, v)| tagged(source, &format!("faults[{i}]"), v))
            .collect::<Result<_, _>>()?;
        let world = match &file.world {
            toml::Value::String(p) => {
                let f: PathBuf = dir.join(p);
                World::from_toml_str(&read(&f)?).map_err(|e| field(source, "world", format!("{}: {e}", f.display())))?
            }
            toml::Value::Table(t) => {
                let text = toml::to_string(t).map_err(|e| field(source, "world", e.to_string()))?;
                World::from_toml_str(&text).map_err(|e| field(source, "world", e.to_string()))?
            }
            _ => return Err(field(source, "world", "a path to a world file or a table")),
        };
        let policy_text = match (&file.policy, &file.policy_inline) {
            (Some(_), Some(_)) => return Err(field(source, "policy", "give `policy` or `policy_inline`, not both")),
            (Some(p), None) => read(&dir.join(p))?,
            (None, Some(t)) => toml::to_string(t).map_err(|e| field(source, "policy_inline", e.to_string()))?,
            (None, None) => String::new(),
        };
        let policy: PolicyConfig = toml::from_str(&policy_text).map_err(|e| field(source, "policy", e.to_string()))?;
        Policy::compile(policy.clone()).map_err(|e| field(source, "policy", e.to_string()))?;
        let mut s = Scenario {
            file,
            source: source.to_string(),
            world,
            policy,
            plans: BTreeMap::new(),
        };
        s.check()?;
        Ok(s)
    }

    /// The path of a world service's subtree.
    pub fn service_path(&self, name: &str) -> Option<&ResourcePath> {
        self.world.services.get(name).map(|s| &s.path)
    }

    fn check(&mut self) -> Result<(), ScenarioError> {
        let src = self.source.clone();
        let f = &self.file;
        if f.duration.ms() == 0 {
            return Err(field(&src, "duration", "must be longer than 0s"));
        }
        if f.agents.len() > AGENTS_MAX {
            return Err(field(&src, "agents", format!("at most {AGENTS_MAX} agents")));
        }
        if f.faults.len() > ITEMS_MAX {
            return Err(field(&src, "faults", format!("at most {ITEMS_MAX} faults")));
        }
        if let Some(t) = f.system.tick
            && !(1..=60_000).contains(&t.ms())
        {
            return Err(field(&src, "system.tick", "between 1ms and 1m"));
        }
        if !(0.0..1.0).contains(&f.observe.deadband) {
            return Err(field(&src, "observe.deadband", "a fraction in 0..1"));
        }
        if f.observe.every.ms() == 0 {
            return Err(field(&src, "observe.every", "must be longer than 0s"));
        }
        if f.bus.latency_min > f.bus.latency_max {
            return Err(field(&src, "bus.latency_min", "longer than bus.latency_max"));
        }
        if f.bus.executor_min > f.bus.executor_max {
            return Err(field(&src, "bus.executor_min", "longer than bus.executor_max"));
        }
        for (name, s) in &f.system.services {
            let at = format!("system.services.{name}");
            if !self.world.services.contains_key(name) {
                return Err(field(&src, at, "no service of that name in the world"));
            }
            for (k, v) in [
                ("demand_rps", s.demand_rps),
                ("hold_ms", s.hold_ms),
                ("latency_base_ms", s.latency_base_ms),
                ("latency_slo_ms", s.latency_slo_ms),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(field(&src, format!("{at}.{k}"), "a finite number, at least 0"));
                }
            }
            if !(0.0..1.0).contains(&s.diurnal) {
                return Err(field(&src, format!("{at}.diurnal"), "a fraction in 0..1"));
            }
        }
        for (i, r) in f.system.releases.iter().enumerate() {
            if !f.system.services.contains_key(&r.service) {
                return Err(field(
                    &src,
                    format!("system.releases[{i}].service"),
                    "not a modelled service",
                ));
            }
            if !r.leak_per_min.is_finite() || r.leak_per_min < 0.0 {
                return Err(field(&src, format!("system.releases[{i}].leak_per_min"), "at least 0"));
            }
        }
        for (i, e) in f.system.events.iter().enumerate() {
            if !f.system.services.contains_key(&e.service) {
                return Err(field(
                    &src,
                    format!("system.events[{i}].service"),
                    "not a modelled service",
                ));
            }
        }
        if let Some(db) = &f.system.database {
            let max = db.path.child("max_connections").ok();
            if max
                .as_ref()
                .and_then(|p| self.world.get(p))
                .and_then(Value::as_f64)
                .is_none()
            {
                return Err(field(
                    &src,
                    "system.database.path",
                    format!("the world has no number at `{}/max_connections`", db.path),
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, a) in f.agents.iter().enumerate() {
            let at = format!("agents[{i}]");
            if !names.insert(a.name().to_string()) {
                return Err(field(
                    &src,
                    format!("{at}.name"),
                    format!("`{}` is used twice", a.name()),
                ));
            }
            if a.name() == f.observe.agent {
                return Err(field(&src, format!("{at}.name"), "the monitor's name"));
            }
            match a {
                AgentSpec::Scripted { actions, .. } => {
                    if actions.len() > ITEMS_MAX {
                        return Err(field(&src, format!("{at}.actions"), format!("at most {ITEMS_MAX}")));
                    }
                    for (j, act) in actions.iter().enumerate() {
                        let at = format!("{at}.actions[{j}]");
                        let n = usize::from(act.propose.is_some())
                            + usize::from(act.acquire.is_some())
                            + usize::from(act.renew.is_some())
                            + usize::from(act.release);
                        if n != 1 {
                            return Err(field(
                                &src,
                                at,
                                "exactly one of `propose`, `acquire`, `renew`, `release`",
                            ));
                        }
                        if let Some(p) = &act.propose {
                            let mut j_plan = serde_json::to_value(p).map_err(|e| field(&src, &at, e.to_string()))?;
                            if let Some(o) = j_plan.as_object_mut() {
                                o.entry("protocol").or_insert(serde_json::json!(1));
                            }
                            let bytes = serde_json::to_vec(&j_plan).map_err(|e| field(&src, &at, e.to_string()))?;
                            let intent = decode_intent(&bytes)
                                .map_err(|e| field(&src, format!("{at}.propose.{}", e.field), e.detail.clone()))?;
                            self.plans.insert((i, j), intent);
                        }
                    }
                }
                AgentSpec::Deploy { service, releases, .. } => {
                    self.check_service(&src, &at, service)?;
                    if releases.is_empty() || releases.len() > ITEMS_MAX {
                        return Err(field(&src, format!("{at}.releases"), "1 or more attempts"));
                    }
                }
                AgentSpec::Uptime { service, .. } => {
                    self.check_service(&src, &at, service)?;
                    if !f.system.services.contains_key(service) {
                        return Err(field(&src, format!("{at}.service"), "not a modelled service"));
                    }
                }
                AgentSpec::Resource {
                    service, ladder, knob, ..
                } => {
                    self.check_service(&src, &at, service)?;
                    if !f.system.services.contains_key(service) {
                        return Err(field(&src, format!("{at}.service"), "not a modelled service"));
                    }
                    if ladder.is_empty() || ladder.len() > ITEMS_MAX {
                        return Err(field(&src, format!("{at}.ladder"), "1 or more values"));
                    }
                    if *knob == Knob::Replicas && ladder.iter().any(|v| !(0..=100_000).contains(v)) {
                        return Err(field(&src, format!("{at}.ladder"), "replicas are 0..=100000"));
                    }
                }
            }
        }
        if let Some(op) = &f.operator {
            for (k, globs) in [("approve", &op.approve), ("reject", &op.reject)] {
                for (i, g) in globs.iter().enumerate() {
                    globset::Glob::new(g).map_err(|e| field(&src, format!("operator.{k}[{i}]"), e.to_string()))?;
                }
            }
            for (i, a) in op.actions.iter().enumerate() {
                halt_scope(a).map_err(|e| field(&src, format!("operator.actions[{i}]"), e))?;
                if a.op == OperatorOp::Halt && a.grade.is_none() {
                    return Err(field(
                        &src,
                        format!("operator.actions[{i}].grade"),
                        "a halt needs a grade",
                    ));
                }
            }
        }
        for (i, fault) in f.faults.iter().enumerate() {
            let at = format!("faults[{i}]");
            match fault {
                FaultSpec::Pause { agent, .. } if !names.contains(agent) => {
                    return Err(field(&src, format!("{at}.agent"), format!("no agent `{agent}`")));
                }
                FaultSpec::Crash { at: t, between } => match (t, between) {
                    (Some(_), None) => {}
                    (None, Some([a, b])) if a <= b => {}
                    (None, Some(_)) => return Err(field(&src, format!("{at}.between"), "the first time comes first")),
                    _ => return Err(field(&src, at, "a crash needs `at` or `between`, not both")),
                },
                _ => {}
            }
        }
        Ok(())
    }

    fn check_service(&self, src: &str, at: &str, service: &str) -> Result<(), ScenarioError> {
        if self.world.services.contains_key(service) {
            Ok(())
        } else {
            Err(field(
                src,
                format!("{at}.service"),
                format!("no service `{service}` in the world"),
            ))
        }
    }
}

fn take_list(table: &mut toml::Table, key: &str) -> Vec<toml::Value> {
    match table.remove(key) {
        Some(toml::Value::Array(a)) => a,
        Some(other) => {
            // Put it back: the typed read reports the wrong type with the field.
            table.insert(key.to_string(), other);
            Vec::new()
        }
        None => Vec::new(),
    }
}

/// Reads a table `{ kind = "x", ... }` as the variant `x` of `T`: written
/// with its tag inside, read as `{ x = { ... } }` so that serde goes straight
/// to the variant and the path of a bad field survives.
fn tagged<T: serde::de::DeserializeOwned>(source: &str, prefix: &str, v: toml::Value) -> Result<T, ScenarioError> {
    let toml::Value::Table(mut t) = v else {
        return Err(field(source, prefix, "a table with a `kind`"));
    };
    let Some(toml::Value::String(kind)) = t.remove("kind") else {
        return Err(field(
            source,
            format!("{prefix}.kind"),
            "missing: which kind this entry is",
        ));
    };
    let mut outer = toml::Table::new();
    outer.insert(kind.clone(), toml::Value::Table(t));
    typed::<T>(source, prefix, toml::Value::Table(outer)).map_err(|e| match e {
        // The variant's name is the path's first segment: drop it.
        ScenarioError::Field { file, field: f, detail } => {
            let rest = f
                .strip_prefix(prefix)
                .unwrap_or(&f)
                .trim_start_matches('.')
                .strip_prefix(kind.as_str())
                .map(|r| r.trim_start_matches('.').to_string());
            let f = match rest {
                Some(r) if !r.is_empty() => format!("{prefix}.{r}"),
                Some(_) => prefix.to_string(),
                None => f,
            };
            let detail = if detail.starts_with("unknown variant") {
                format!("unknown kind `{kind}`: {detail}")
            } else {
                detail
            };
            ScenarioError::Field { file, field: f, detail }
        }
        other => other,
    })
}

/// Reads `v` as a `T`, naming the field at fault under `prefix`.
fn typed<T: serde::de::DeserializeOwned>(source: &str, prefix: &str, v: toml::Value) -> Result<T, ScenarioError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (prefix, inner.as_str()) {
            (p, ".") => p.to_string(),
            ("", i) => i.to_string(),
            (p, i) => format!("{p}.{i}"),
        };
        field(source, path, e.into_inner().message().to_string())
    })
}

/// The halt scope an operator action names.
pub fn halt_scope(a: &OperatorAction) -> Result<HaltScope, String> {
    match (a.scope.as_str(), &a.name) {
        ("all", None) => Ok(HaltScope::All),
        ("agent", Some(n)) => Ok(HaltScope::Agent(n.clone())),
        ("path", Some(p)) => ResourcePath::parse(p)
            .map(HaltScope::Path)
            .map_err(|(_, d)| format!("name: {d}")),
        ("all", Some(_)) => Err("scope `all` takes no name".into()),
        (s, _) => Err(format!("scope `{s}`: `all`, or `agent`/`path` with a `name`")),
    }
}
