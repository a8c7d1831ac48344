//! The coordinator: one deterministic state machine, `handle(now, input) -> effects`.
//!
//! Inputs are intents, lease requests, observations, step outcomes, operator
//! controls and clock ticks, each with the coordinator's receive time.
//! Effects are data: replies, step dispatches, log events, timers to arm,
//! alerts. The live runtime, the simulator and incident replay drive this
//! same code, so the same inputs give the same effects, bit for bit.
//!
//! How a plan moves:
//! - **decided**: previewed against the *projected* world (the world plus
//!   every admitted, unfinished plan's effects) and, when plans are in
//!   flight, against the world as it is (an in-flight saga may compensate
//!   instead of finishing; skipped for a plan rejected for a conflict it
//!   does not wait out); checked for conflicts with in-flight plans and
//!   other agents' leases; then admitted, held for a human, queued or rejected.
//! - **pending**: waits for an operator; holds no lease; expires. An approval
//!   binds the plan hash and the material-preview hash; if the material
//!   preview changed meanwhile, the plan goes back to the human.
//! - **running** (a saga): holds coordinator-owned leases on every path it
//!   touches (the in-flight index) until it ends; dispatches one step at a
//!   time with a fencing token and the expected before-values; compensates
//!   completed steps in reverse on a failure, a timeout, a failed
//!   verification, a cancel or a rollback halt.

mod compounding;
mod leases;
pub mod record;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use concord_proto::coord::{
    Conflict, Control, Decision, DispatchKey, HaltGrade, HaltScope, LeaseMode, LeaseReply, LeaseRequest, Phase,
    SagaAction, StepDispatch, StepOutcome, StepResult,
};
use concord_proto::preview::{Preview, Reason};
use concord_proto::{
    Compensation, DeleteArgs, DeleteConfirm, DeployArgs, GrantArgs, Id, Intent, NetChange, NetworkArgs, Observation,
    OnConflict, Op, ResourcePath, ScaleArgs, SetArgs, Short, StepSpec, Value, Verdict,
};
use serde::{Deserialize, Serialize};

use crate::apply::{PathChange, apply};
use crate::indexes::WorldIndexes;
use crate::policy::Policy;
use crate::preview::{PreviewInput, preview_of_run};
use crate::world::{Base, Keyed, Memo, Overlay, PathKeys, State, World};
pub use crate::worlddoc::ObservationRecord;
use crate::worlddoc::{Identity, Provenance, WorldDoc, WorldDocConfig, WorldDocError, needs_write};
pub use compounding::{Breaker, HISTORY_MAX, HistoryEntry};
pub use leases::{Lease, LeaseTable};
pub use record::{Genesis, RECORD_VERSION, Record};

/// The runtime's id for a request awaiting a reply.
pub type RequestId = u64;

/// Bounds and times. Every table has a named maximum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How long a plan waits for a human before it expires.
    pub approval_ttl_ms: u64,
    /// Step timeout when the step names none.
    pub step_timeout_ms: u64,
    /// Most plans pending, queued or running at once.
    pub plans_max: usize,
    /// Most plans one agent may have pending or queued.
    pub pending_per_agent_max: usize,
    /// Most plans one agent may have running.
    pub running_per_agent_max: usize,
    /// Longest lease time to live.
    pub lease_ttl_ms_max: u64,
    /// Most leases held at once.
    pub leases_max: usize,
    /// Most lease requests waiting.
    pub lease_waiters_max: usize,
    /// Most remembered request idempotency keys (oldest forgotten first).
    pub idempotency_keys_max: usize,
    /// Most observation series kept.
    pub observation_series_max: usize,
    /// Most points kept per observation series (oldest dropped first).
    #[serde(default = "default_observation_points_max")]
    pub observation_points_max: usize,
    /// Points older than this are dropped from a series.
    #[serde(default = "default_observation_retention_ms")]
    pub observation_retention_ms: u64,
    /// The world document: deadband, rotation, sync bounds.
    #[serde(default)]
    pub world_doc: WorldDocConfig,
    /// Most ended lineages remembered (their last version), for re-plan diffs.
    pub ended_lineages_max: usize,
    /// A plan from the same agent touching the same paths within this window
    /// is treated as a re-plan of the earlier one whatever its lineage id, so
    /// a new id does not escape the plan diff.
    pub replan_window_ms: u64,
    /// Most recent plans remembered per agent for re-plan recognition.
    pub recent_plans_per_agent_max: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            approval_ttl_ms: 60 * 60 * 1000,
            step_timeout_ms: 60_000,
            plans_max: 100_000,
            pending_per_agent_max: 64,
            running_per_agent_max: 1_024,
            lease_ttl_ms_max: 10 * 60 * 1000,
            leases_max: 100_000,
            lease_waiters_max: 10_000,
            idempotency_keys_max: 65_536,
            observation_series_max: 100_000,
            observation_points_max: default_observation_points_max(),
            observation_retention_ms: default_observation_retention_ms(),
            world_doc: WorldDocConfig::default(),
            ended_lineages_max: 10_000,
            replan_window_ms: 60 * 60 * 1000,
            recent_plans_per_agent_max: 32,
        }
    }
}

fn default_observation_points_max() -> usize {
    // Two hours of a series reporting once a minute.
    120
}

fn default_observation_retention_ms() -> u64 {
    2 * 60 * 60 * 1000
}

/// One input, as the runtime received it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// An agent proposes a plan.
    Intent {
        /// Reply to this request.
        request: RequestId,
        /// The agent (from its credentials and subject).
        agent: String,
        /// The plan.
        intent: Intent,
    },
    /// An agent asks the lease service.
    Lease {
        /// Reply to this request.
        request: RequestId,
        /// The agent.
        agent: String,
        /// What it asks.
        lease: LeaseRequest,
    },
    /// An agent reports an observation.
    Observe {
        /// The agent.
        agent: String,
        /// The observation.
        observation: Observation,
    },
    /// An executor reports a step's outcome.
    Outcome {
        /// The executor.
        executor: String,
        /// The outcome.
        outcome: StepOutcome,
    },
    /// An operator's command.
    Control {
        /// Reply to this request.
        request: RequestId,
        /// The operator (from credentials and subject).
        operator: String,
        /// The command.
        control: Control,
    },
    /// Time passed: fire every timer due at `now`.
    Tick,
}

/// What the runtime must do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Answer a request.
    Reply {
        /// The request.
        request: RequestId,
        /// The answer.
        reply: Reply,
    },
    /// Send a step to its executor.
    Dispatch(Box<StepDispatch>),
    /// Append to the coordination log.
    Event(Event),
    /// Call `handle(at_ms, Tick)` no later than this.
    ArmTimer {
        /// When.
        at_ms: u64,
    },
    /// Page a human.
    Alert {
        /// What happened.
        message: String,
    },
}

/// An answer to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The decision on an intent.
    Decision(Box<Decision>),
    /// The lease service's answer.
    Lease(LeaseReply),
    /// The answer to an operator.
    Control {
        /// Whether it took effect.
        ok: bool,
        /// What happened.
        message: String,
    },
}

/// An entry of the coordination log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A plan was decided.
    Decided {
        /// Agent.
        agent: String,
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
        /// Content hash.
        hash: String,
        /// Verdict.
        verdict: Verdict,
        /// The failing rules, most severe first.
        reasons: Vec<Reason>,
        /// Conflicts.
        conflicts: Vec<Conflict>,
        /// Material preview hash.
        material_hash: String,
        /// Waiting for a conflicting plan to end.
        queued: bool,
        /// Policy hash.
        policy_hash: String,
        /// The core version that decided.
        core_version: String,
    },
    /// An earlier version waiting for approval was replaced by a newer one.
    Withdrawn {
        /// Lineage.
        lineage: Id,
        /// The withdrawn version.
        version: u32,
        /// The version that replaced it.
        by_version: u32,
    },
    /// An operator approved.
    Approved {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// An approval arrived for a material preview that has changed: back to the human.
    ApprovalStale {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
        /// The hash the operator approved.
        approved: String,
        /// The hash now.
        current: String,
    },
    /// An operator rejected a pending plan.
    RejectedByOperator {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// Nobody decided in time.
    ApprovalExpired {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
    },
    /// A plan became a saga.
    Admitted {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
    },
    /// A step or compensation was sent to an executor.
    Dispatched {
        /// Idempotency key.
        key: DispatchKey,
        /// Path.
        path: ResourcePath,
        /// Fencing token.
        token: u64,
    },
    /// A step or compensation succeeded.
    StepSucceeded {
        /// Key.
        key: DispatchKey,
    },
    /// A step or compensation failed.
    StepFailed {
        /// Key.
        key: DispatchKey,
        /// Why.
        reason: String,
    },
    /// A step's verification started (bake time running).
    Verifying {
        /// Key.
        key: DispatchKey,
        /// When it is judged.
        until_ms: u64,
    },
    /// A saga started compensating.
    Compensating {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
        /// Why.
        reason: String,
        /// Irreversible steps that will not be undone.
        irreversible: Vec<Id>,
    },
    /// A saga ended: every step succeeded.
    Completed {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
    },
    /// A saga ended: its completed steps were compensated.
    Compensated {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
    },
    /// A compensation failed: the saga keeps its leases and waits for an operator.
    CompensationFailed {
        /// Lineage.
        lineage: Id,
        /// Version.
        version: u32,
        /// The step whose compensation failed.
        step: Id,
        /// Why.
        reason: String,
    },
    /// An operator decided a saga whose compensation failed.
    SagaDecided {
        /// Lineage.
        lineage: Id,
        /// What.
        action: SagaAction,
        /// Who.
        operator: String,
    },
    /// An outcome matched no outstanding dispatch (late, duplicate or unknown).
    OutcomeIgnored {
        /// Key.
        key: DispatchKey,
        /// Why.
        reason: String,
    },
    /// A lease was granted.
    LeaseGranted {
        /// The lease.
        lease: Lease,
    },
    /// A lease was renewed.
    LeaseRenewed {
        /// Id.
        lease: u64,
        /// New expiry.
        expires_at_ms: u64,
    },
    /// A lease was released.
    LeaseReleased {
        /// Id.
        lease: u64,
    },
    /// A lease lapsed.
    LeaseExpired {
        /// Id.
        lease: u64,
        /// Its holder.
        agent: String,
    },
    /// A remediation loop tripped a breaker.
    BreakerTripped {
        /// The breaker.
        breaker: Breaker,
    },
    /// A halt took effect.
    Halted {
        /// Who.
        operator: String,
        /// Where.
        scope: HaltScope,
        /// How hard.
        grade: HaltGrade,
        /// Why.
        reason: String,
    },
    /// Halts were lifted.
    Resumed {
        /// Who.
        operator: String,
        /// Where.
        scope: HaltScope,
        /// Why.
        reason: String,
    },
    /// The world document was rotated: a fresh document (the next epoch)
    /// holds the current state; replicas start over from it.
    WorldRotated {
        /// The new epoch.
        epoch: u64,
        /// The new document id (hex).
        doc_id: String,
        /// Changes in the retired document.
        retired_changes: u64,
    },
}

/// A halt in force.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    /// Where.
    pub scope: HaltScope,
    /// How hard.
    pub grade: HaltGrade,
    /// Who.
    pub operator: String,
    /// Why.
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Outstanding {
    key: DispatchKey,
    index: usize,
    deadline_ms: u64,
    /// The fencing token it carries.
    token: u64,
    /// Paths the dispatch changes, with their expected after-values.
    changes: Vec<PathChange>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Phase2 {
    /// Running step `next` (or about to).
    Forward { next: usize },
    /// Verifying step `index` until `until_ms`.
    Verifying { index: usize, until_ms: u64 },
    /// Undoing `completed` from the back.
    Compensating { by_rollback: bool },
    /// A compensation failed; waits for an operator.
    CompensationFailed { index: usize },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Saga {
    phase: Phase2,
    /// Steps applied (or possibly applied), in order.
    completed: Vec<usize>,
    outstanding: Option<Outstanding>,
    #[serde(with = "pairs")]
    attempts: BTreeMap<(usize, bool), u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Status {
    Pending {
        expires_at_ms: u64,
        /// Operators who approved so far (a policy may require several).
        approvers: Vec<String>,
    },
    Queued,
    Running(Saga),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Plan {
    agent: String,
    intent: Intent,
    hash: String,
    material_hash: String,
    /// Per step: what it changes (computed at admission on the projected world).
    step_changes: Vec<Vec<PathChange>>,
    /// The plan's final effects.
    effects: Overlay,
    /// Every path it writes or acts on.
    touched: BTreeSet<ResourcePath>,
    status: Status,
    /// The request to answer when a queued plan is decided.
    queued_request: Option<RequestId>,
    /// The earlier version it was diffed against (re-previews use the same).
    previous: Option<Intent>,
}

/// A live plan, as operators see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanOverview {
    /// Lineage.
    pub lineage: Id,
    /// Version.
    pub version: u32,
    /// Proposing agent.
    pub agent: String,
    /// The agent's goal.
    pub goal: String,
    /// Content hash (what an approval binds).
    pub plan_hash: String,
    /// Material preview hash (what an approval binds besides).
    pub material_hash: String,
    /// `pending`, `queued`, `running`, `verifying`, `compensating`, `compensation_failed`.
    pub status: String,
    /// More about the status (which step).
    pub detail: String,
    /// When a pending plan expires.
    pub expires_at_ms: Option<u64>,
    /// Operators who approved so far.
    pub approvers: Vec<String>,
    /// Paths it touches.
    pub paths: Vec<ResourcePath>,
}

/// One observation series in core state: the latest observation, its
/// recent points, and what the world document holds for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// The latest observation, whatever the deadband.
    pub latest: ObservationRecord,
    /// Recent points, oldest first: (coordinator receive time, value). At most
    /// `observation_points_max`, none older than `observation_retention_ms`
    /// at the series' last report.
    pub points: VecDeque<(u64, Value)>,
    /// The value the world document holds (the last one beyond the deadband).
    pub written: Option<ObservationRecord>,
}

/// The coordinator.
///
/// It serializes whole (serde): that is its snapshot. The policy is stored
/// as its configuration and compiled again on load.
#[derive(Debug, Serialize, Deserialize)]
pub struct Coordinator {
    config: Config,
    #[serde(with = "policy_serde")]
    policy: Policy,
    world: World,
    /// Live plans by lineage (pending, queued or running).
    plans: BTreeMap<Id, Plan>,
    /// Projected effects of running plans.
    projected: Overlay,
    /// Running plans by every path they touch: the coordinator-owned leases.
    /// The lineages per path are kept sorted in a vector: nearly always one,
    /// and a set would cost a whole tree node per path.
    inflight: BTreeMap<ResourcePath, Vec<Id>>,
    /// Highest fencing token handed out per path.
    fencing: BTreeMap<ResourcePath, u64>,
    leases: LeaseTable,
    halts: Vec<Halt>,
    /// (due time, sequence) -> timer.
    #[serde(with = "pairs")]
    timers: BTreeMap<(u64, u64), Timer>,
    timer_seq: u64,
    /// (agent, idempotency key) -> the decision given.
    #[serde(with = "pairs")]
    /// (Keys shared with `decision_order`: one copy of each.)
    decisions: BTreeMap<DedupeKey, Decision>,
    decision_order: VecDeque<DedupeKey>,
    /// Observation series by path.
    observations: BTreeMap<ResourcePath, Series>,
    /// The world document: written by this coordinator alone, replicated to
    /// agents. `world` is its materialized view, updated with the same
    /// changes, so previews never read Automerge.
    #[serde(with = "crate::worlddoc::serde_doc")]
    doc: WorldDoc,
    /// Last version of ended lineages, oldest forgotten first.
    ended: BTreeMap<Id, Intent>,
    ended_order: VecDeque<Id>,
    /// Admitted steps, oldest first, for compounding checks.
    history: VecDeque<HistoryEntry>,
    /// Tripped circuit breakers.
    breakers: Vec<Breaker>,
    /// Per agent: (plans pending or queued, plans running).
    per_agent: BTreeMap<String, (usize, usize)>,
    /// Lineages waiting for a conflicting plan to end.
    queued: BTreeSet<Id>,
    /// Per agent: recently decided plans (time, lineage, version, paths),
    /// newest last. The intents themselves are found among live or ended plans.
    recent: BTreeMap<String, VecDeque<RecentPlan>>,
    /// While recovering: the recorded decisions of the input being re-fed,
    /// in order. Not state: empty outside [`Coordinator::recover_input`].
    #[serde(skip)]
    recorded: Option<VecDeque<Event>>,
    /// The indexes of `world` (derived: built again when missing or when
    /// the policy changes).
    #[serde(skip)]
    indexes: WorldIndexes,
    /// The keys of `inflight` by hash (derived, rebuilt when missing): most
    /// lookups there find nothing, and say so at once. They filter
    /// `projected` too, whose keys are among them (a running plan's effects
    /// are at paths it touches).
    #[serde(skip)]
    inflight_keys: PathKeys,
    /// The content hash of each intent in `ended` (derived: a restored
    /// coordinator has none, and hashes an ended intent when it needs to).
    #[serde(skip)]
    ended_hashes: BTreeMap<Id, String>,
}

/// A recently decided plan, for re-plan recognition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecentPlan {
    at_ms: u64,
    lineage: Id,
    version: u32,
    paths: Vec<ResourcePath>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Timer {
    ApprovalExpiry { lineage: Id, version: u32 },
    StepDeadline { key: DispatchKey },
    Verification { lineage: Id, index: usize },
    LeaseExpiry { lease: u64, expires_at_ms: u64 },
}

fn covers(scope: &HaltScope, agent: &str, touched: &BTreeSet<ResourcePath>) -> bool {
    match scope {
        HaltScope::All => true,
        HaltScope::Agent(a) => a == agent,
        HaltScope::Path(p) => touched.iter().any(|t| t.overlaps(p)),
    }
}

/// (agent, dedupe key): where a decision is remembered.
type DedupeKey = (Arc<str>, Arc<str>);

/// The key under which a decision is remembered: the request's idempotency
/// key, or else the plan itself (lineage, version and content hash), so the
/// same plan sent again is a retry, not a second proposal.
fn dedupe_key(intent: &Intent, hash: &str) -> String {
    match &intent.idempotency_key {
        Some(k) => format!("key:{k}"),
        None => format!("plan:{}/{}/{hash}", intent.lineage, intent.version),
    }
}

/// What policy decided about a plan (computed, or taken from the log while recovering).
struct Evaluation {
    verdict: Verdict,
    reasons: Vec<Reason>,
    conflicts: Vec<Conflict>,
    plan_hash: String,
    material_hash: String,
    queued: bool,
    policy_hash: String,
    core_version: String,
    /// A breaker the plan trips.
    trip: Option<Breaker>,
    /// The full preview (absent when taken from the log).
    preview: Option<Box<Preview>>,
}

fn reason(rule: &str, message: String) -> Reason {
    Reason {
        rule: rule.to_string(),
        outcome: Verdict::Reject,
        message,
    }
}

/// The hash of what a human approves besides the plan itself: verdict,
/// failing rules, conflicts, assumptions held and the before-values of the
/// touched paths. Observations that change nothing here do not invalidate an approval.
fn material_hash(p: &Preview, conflicts: &[Conflict]) -> String {
    // Written straight to bytes: a JSON object with its keys in order (and
    // a conflict's), as JSON values (maps with sorted keys) wrote them when
    // hashes were first made: a hash is bound by approvals and logged.
    #[derive(Serialize)]
    struct Material<'a> {
        assumptions: Vec<(&'a ResourcePath, bool)>,
        before: Vec<(&'a ResourcePath, &'a Option<Value>)>,
        conflicts: Vec<MaterialConflict<'a>>,
        failing: Vec<&'a str>,
        verdict: Verdict,
    }
    #[derive(Serialize)]
    struct MaterialConflict<'a> {
        agent: &'a str,
        kind: &'a str,
        other: &'a str,
        path: &'a ResourcePath,
        version: u32,
    }
    let material = Material {
        assumptions: p.assumptions.iter().map(|a| (&a.path, a.held)).collect(),
        before: p.diff.iter().map(|c| (&c.path, &c.before)).collect(),
        conflicts: conflicts
            .iter()
            .map(|c| {
                // Every field, named without `..`: a field added to
                // `Conflict` does not compile here until it is hashed too.
                let Conflict {
                    other,
                    version,
                    agent,
                    path,
                    kind,
                } = c;
                MaterialConflict {
                    agent,
                    kind,
                    other,
                    path,
                    version: *version,
                }
            })
            .collect(),
        failing: p.reasons.iter().map(|r| r.rule.as_str()).collect(),
        verdict: p.verdict,
    };
    // Serializing these types to memory cannot fail (string keys, no
    // non-finite number is written as anything but null); if it did, the
    // error's text is hashed rather than nothing (which every failure
    // would share).
    let bytes = serde_json::to_vec(&material).unwrap_or_else(|e| format!("unserializable material: {e}").into_bytes());
    blake3::hash(&bytes).to_hex().to_string()
}

/// What a plan's status counts towards: an agent's running or other plans,
/// and the queued set.
#[derive(Clone, Copy)]
struct Counted {
    running: bool,
    queued: bool,
}

impl Counted {
    fn of(status: &Status) -> Counted {
        Counted {
            running: matches!(status, Status::Running(_)),
            queued: matches!(status, Status::Queued),
        }
    }
}

/// Adds `delta` to what a plan of `agent` in a status `counted` counts
/// towards.
fn count(
    per_agent: &mut BTreeMap<String, (usize, usize)>,
    queued: &mut BTreeSet<Id>,
    agent: &str,
    lineage: &Id,
    counted: Counted,
    delta: isize,
) {
    let c = per_agent.entry(agent.to_string()).or_insert((0, 0));
    let slot = if counted.running { &mut c.1 } else { &mut c.0 };
    *slot = slot.saturating_add_signed(delta);
    if *c == (0, 0) {
        per_agent.remove(agent);
    }
    if counted.queued {
        if delta > 0 {
            queued.insert(lineage.clone());
        } else {
            queued.remove(lineage);
        }
    }
}

impl Coordinator {
    /// A coordinator over `world` under `policy`, with the default identity
    /// (coordinator `concord`, incarnation 1) and its world document created
    /// at time 0: for tests, benchmarks and the simulator. The runtime uses
    /// [`Coordinator::with_identity`] or [`Coordinator::from_genesis`].
    pub fn new(config: Config, policy: Policy, world: World) -> Self {
        Self::with_identity(config, policy, world, Identity::default(), 0)
    }

    /// A coordinator over `world` under `policy`, writing its world document
    /// as `identity`, the document created at `now_ms`.
    pub fn with_identity(config: Config, policy: Policy, world: World, identity: Identity, now_ms: u64) -> Self {
        let doc = WorldDoc::new(identity, config.world_doc.clone(), &world, now_ms);
        // The world's indexes are built here, with the world (a restored
        // coordinator builds them at its first decision).
        let indexes = WorldIndexes::build(&policy, &world);
        Coordinator {
            doc,
            config,
            policy,
            world,
            plans: BTreeMap::new(),
            projected: BTreeMap::new(),
            inflight: BTreeMap::new(),
            fencing: BTreeMap::new(),
            leases: LeaseTable::default(),
            halts: Vec::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            decisions: BTreeMap::new(),
            decision_order: VecDeque::new(),
            observations: BTreeMap::new(),
            ended: BTreeMap::new(),
            ended_order: VecDeque::new(),
            ended_hashes: BTreeMap::new(),
            history: VecDeque::new(),
            breakers: Vec::new(),
            per_agent: BTreeMap::new(),
            queued: BTreeSet::new(),
            recent: BTreeMap::new(),
            recorded: None,
            indexes,
            inflight_keys: PathKeys::empty(),
        }
    }

    /// The bounds and times in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy (a reload): later decisions use it; plans already
    /// decided keep their decisions. Log it as a [`Record::Policy`].
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
        self.indexes.forget_other_policy(&self.policy);
    }

    /// The tripped circuit breakers.
    pub fn breakers(&self) -> &[Breaker] {
        &self.breakers
    }

    /// Adjusts the per-agent counters and the queue index for a plan entering
    /// (`+1`) or leaving (`-1`) a status, so that limits and re-queueing cost
    /// nothing per plan in flight. Every status change goes through here.
    fn count(&mut self, agent: &str, lineage: &Id, status: &Status, delta: isize) {
        count(
            &mut self.per_agent,
            &mut self.queued,
            agent,
            lineage,
            Counted::of(status),
            delta,
        );
    }

    /// Inserts a plan, keeping the counters.
    fn insert_plan(&mut self, lineage: Id, plan: Plan) {
        if let Some(old) = self.plans.remove(&lineage) {
            self.count(&old.agent, &lineage, &old.status, -1);
        }
        self.count(&plan.agent, &lineage, &plan.status, 1);
        self.plans.insert(lineage, plan);
    }

    /// Removes a plan, keeping the counters.
    fn remove_plan(&mut self, lineage: &Id) -> Option<Plan> {
        let plan = self.plans.remove(lineage)?;
        self.count(&plan.agent, lineage, &plan.status, -1);
        Some(plan)
    }

    /// Changes a plan's status, keeping the counters.
    fn set_status(&mut self, lineage: &Id, status: Status) {
        let Some(p) = self.plans.get_mut(lineage) else { return };
        let (per_agent, queued) = (&mut self.per_agent, &mut self.queued);
        count(per_agent, queued, &p.agent, lineage, Counted::of(&p.status), -1);
        count(per_agent, queued, &p.agent, lineage, Counted::of(&status), 1);
        p.status = status;
    }

    /// The world as it is (steps applied so far).
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The halts in force.
    pub fn halts(&self) -> &[Halt] {
        &self.halts
    }

    /// The leases held.
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Number of live plans (pending, queued, running).
    pub fn plan_count(&self) -> usize {
        self.plans.len()
    }

    /// Every live plan (pending, queued, running) for operators, by lineage.
    pub fn plans_overview(&self) -> Vec<PlanOverview> {
        self.plans
            .iter()
            .map(|(lineage, p)| {
                let (status, detail, expires_at_ms, approvers) = match &p.status {
                    Status::Pending {
                        expires_at_ms,
                        approvers,
                    } => ("pending", String::new(), Some(*expires_at_ms), approvers.clone()),
                    Status::Queued => ("queued", String::new(), None, Vec::new()),
                    Status::Running(s) => {
                        let (name, detail) = match &s.phase {
                            Phase2::Forward { next } => (
                                "running",
                                format!(
                                    "step {} of {}",
                                    (*next + 1).min(p.intent.steps.len()),
                                    p.intent.steps.len()
                                ),
                            ),
                            Phase2::Verifying { index, until_ms } => (
                                "verifying",
                                format!("step {} until {until_ms}", p.intent.steps[*index].id),
                            ),
                            Phase2::Compensating { by_rollback } => (
                                "compensating",
                                if *by_rollback { "rollback".into() } else { String::new() },
                            ),
                            Phase2::CompensationFailed { index } => (
                                "compensation_failed",
                                format!("step {} waits for retry, skip or resolve", p.intent.steps[*index].id),
                            ),
                        };
                        (name, detail, None, Vec::new())
                    }
                };
                PlanOverview {
                    lineage: lineage.clone(),
                    version: p.intent.version,
                    agent: p.agent.clone(),
                    goal: p.intent.goal.to_string(),
                    plan_hash: p.hash.clone(),
                    material_hash: p.material_hash.clone(),
                    status: status.to_string(),
                    detail,
                    expires_at_ms,
                    approvers,
                    paths: p.touched.iter().cloned().collect(),
                }
            })
            .collect()
    }

    /// A live plan's intent and the version it was diffed against, to show
    /// its preview again (`concord show`).
    pub fn plan_intent(&self, lineage: &Id) -> Option<(&str, &Intent, Option<&Intent>)> {
        self.plans
            .get(lineage)
            .map(|p| (p.agent.as_str(), &p.intent, p.previous.as_ref()))
    }

    /// The highest fencing token handed out for `path`.
    pub fn fencing_token(&self, path: &ResourcePath) -> u64 {
        self.fencing.get(path).copied().unwrap_or(0)
    }

    /// The latest observation of every series, in path order.
    pub fn observations(&self) -> impl Iterator<Item = (&ResourcePath, &ObservationRecord)> {
        self.observations.iter().map(|(p, s)| (p, &s.latest))
    }

    /// The latest observation of a series.
    pub fn observation(&self, path: &ResourcePath) -> Option<&ObservationRecord> {
        self.observations.get(path).map(|s| &s.latest)
    }

    /// An observation series: its latest value, recent points, and what the
    /// world document holds.
    pub fn series(&self, path: &ResourcePath) -> Option<&Series> {
        self.observations.get(path)
    }

    /// The coordinator whose [`Record::Genesis`] this is, as incarnation 1.
    /// Feed the later records to it: [`Coordinator::incarnate`] for each
    /// [`Record::Incarnation`], [`Coordinator::set_policy`] for each
    /// [`Record::Policy`], [`Coordinator::recover_input`] for each input.
    pub fn from_genesis(g: &Genesis) -> Result<Self, crate::policy::PolicyError> {
        let policy = Policy::compile(g.policy.clone())?;
        let identity = Identity {
            coordinator: g.coordinator.clone(),
            incarnation: 1,
        };
        Ok(Self::with_identity(
            g.config.clone(),
            policy,
            g.world.clone(),
            identity,
            g.now_ms,
        ))
    }

    /// A new process incarnation ([`Record::Incarnation`]): the world
    /// document is written under a new actor from now on, so no (actor, seq)
    /// pair that replicas may hold is ever reused. The same incarnation again
    /// is a no-op; an older one is refused.
    pub fn incarnate(&mut self, incarnation: u64) -> Result<(), WorldDocError> {
        if incarnation == self.doc.identity().incarnation {
            return Ok(());
        }
        self.doc.set_incarnation(incarnation)
    }

    /// The world document: heads, bytes, reads, and the sync step functions
    /// ([`WorldDoc::sync_generate`], [`WorldDoc::sync_receive`]).
    pub fn world_doc(&self) -> &WorldDoc {
        &self.doc
    }

    /// The world document, for the sync step functions (which never change
    /// the document itself).
    pub fn world_doc_mut(&mut self) -> &mut WorldDoc {
        &mut self.doc
    }

    /// A digest of the coordinator's whole dynamic state (world, plans,
    /// sagas, projection, leases, fencing tokens, halts, timers, idempotency
    /// and compounding tables): two coordinators fed the same inputs have the
    /// same digest. Every table is ordered, so the text hashed is canonical.
    pub fn state_digest(&self) -> String {
        // The state's serialized form (every table ordered, so canonical)
        // goes to the hasher through a buffer, never whole into memory
        // (megabytes for a large state).
        #[derive(Serialize)]
        struct Digested<'a> {
            world: &'a World,
            plans: &'a BTreeMap<Id, Plan>,
            projected: &'a Overlay,
            inflight: &'a BTreeMap<ResourcePath, Vec<Id>>,
            fencing: &'a BTreeMap<ResourcePath, u64>,
            leases: &'a LeaseTable,
            halts: &'a [Halt],
            #[serde(with = "pairs")]
            timers: &'a BTreeMap<(u64, u64), Timer>,
            timer_seq: u64,
            #[serde(with = "pairs")]
            decisions: &'a BTreeMap<DedupeKey, Decision>,
            decision_order: &'a VecDeque<DedupeKey>,
            observations: &'a BTreeMap<ResourcePath, Series>,
            ended: &'a BTreeMap<Id, Intent>,
            ended_order: &'a VecDeque<Id>,
            history: &'a VecDeque<HistoryEntry>,
            breakers: &'a [Breaker],
            per_agent: &'a BTreeMap<String, (usize, usize)>,
            queued: &'a BTreeSet<Id>,
            recent: &'a BTreeMap<String, VecDeque<RecentPlan>>,
            // The document's history digest names its whole history
            // (actor, times, ops) without applying pending writes.
            doc: (&'a Identity, u64, String),
        }
        let digested = Digested {
            world: &self.world,
            plans: &self.plans,
            projected: &self.projected,
            inflight: &self.inflight,
            fencing: &self.fencing,
            leases: &self.leases,
            halts: &self.halts,
            timers: &self.timers,
            timer_seq: self.timer_seq,
            decisions: &self.decisions,
            decision_order: &self.decision_order,
            observations: &self.observations,
            ended: &self.ended,
            ended_order: &self.ended_order,
            history: &self.history,
            breakers: &self.breakers,
            per_agent: &self.per_agent,
            queued: &self.queued,
            recent: &self.recent,
            doc: (self.doc.identity(), self.doc.epoch(), self.doc.history_digest()),
        };
        let mut hasher = blake3::Hasher::new();
        // A self-describing binary form (CBOR: every value carries its type,
        // so `true` and `1` differ as in text) without the cost of escaping text.
        let written = {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, &mut hasher);
            ciborium::into_writer(&digested, &mut out)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    use std::io::Write as _;
                    out.flush().map_err(|e| e.to_string())
                })
        };
        // Every table serializes (snapshots are the same state) and a
        // hasher's writes cannot fail; should that change, the failure is
        // part of what is hashed rather than a state that hashes short.
        debug_assert!(written.is_ok(), "the state serializes to a hasher: {written:?}");
        if let Err(e) = written {
            hasher.update(b"serialization failed: ");
            hasher.update(e.as_bytes());
        }
        hasher.finalize().to_hex().to_string()
    }

    /// When the runtime must next call `handle(.., Tick)`.
    pub fn next_timer(&self) -> Option<u64> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// Re-feeds one logged input while recovering: like [`Coordinator::handle`],
    /// but every decision policy would make (a plan's verdict, reasons,
    /// conflicts, findings and breaker trips, also at approval and when a
    /// queued plan is re-decided) is taken from the recorded events instead
    /// of being computed again. A newer binary or policy never re-decides
    /// what already ran. The effects are returned so the caller can compare
    /// them with the record ([`first_divergence`]); none are to be performed.
    pub fn recover_input(&mut self, now_ms: u64, input: Input, events: &[Event]) -> Vec<Effect> {
        self.recorded = Some(
            events
                .iter()
                .filter(|e| matches!(e, Event::Decided { .. } | Event::BreakerTripped { .. }))
                .cloned()
                .collect(),
        );
        let fx = self.handle(now_ms, input);
        self.recorded = None;
        fx
    }

    /// The recorded evaluation of `(lineage, version)`, while recovering.
    fn take_recorded_decision(&mut self, lineage: &Id, version: u32) -> Option<Evaluation> {
        let queue = self.recorded.as_mut()?;
        let mut trip = None;
        while let Some(e) = queue.pop_front() {
            match e {
                Event::BreakerTripped { breaker } => trip = Some(breaker),
                Event::Decided {
                    lineage: l,
                    version: v,
                    hash,
                    verdict,
                    reasons,
                    conflicts,
                    material_hash,
                    queued,
                    policy_hash,
                    core_version,
                    ..
                } if &l == lineage && v == version => {
                    return Some(Evaluation {
                        verdict,
                        reasons,
                        conflicts,
                        plan_hash: hash,
                        material_hash,
                        queued,
                        policy_hash,
                        core_version,
                        trip,
                        preview: None,
                    });
                }
                _ => trip = None,
            }
        }
        None
    }

    /// The dispatches sent and not yet answered, as they were sent (same
    /// idempotency key, fencing token and expected before-values): after a
    /// restart the runtime sends them again, and executors dedupe on the key.
    pub fn outstanding_dispatches(&self) -> Vec<StepDispatch> {
        let mut out = Vec::new();
        for plan in self.plans.values() {
            let Status::Running(saga) = &plan.status else { continue };
            let Some(o) = &saga.outstanding else { continue };
            let step = &plan.intent.steps[o.index];
            let spec = match o.key.phase {
                Phase::Do => Some(StepSpec {
                    path: step.path.clone(),
                    op: step.op.clone(),
                }),
                Phase::Undo => self.compensation_spec(plan, o.index),
            };
            let Some(spec) = spec else { continue };
            out.push(StepDispatch {
                key: o.key.clone(),
                path: spec.path.clone(),
                kind: spec.op.kind(),
                args: spec.op.args_json(),
                fencing_token: o.token,
                expected_before: o.changes.iter().map(|c| (c.path.clone(), c.before.clone())).collect(),
                timeout_ms: step.timeout_ms.unwrap_or(self.config.step_timeout_ms),
            });
        }
        out
    }

    /// The step that compensates step `index` of `plan`, if any.
    fn compensation_spec(&self, plan: &Plan, index: usize) -> Option<StepSpec> {
        let step = &plan.intent.steps[index];
        match &step.compensation {
            Compensation::Restore => inverse(&step.path, &step.op, &plan.step_changes[index]),
            Compensation::Undo(u) => Some(u.clone()),
            Compensation::Irreversible { .. } => None,
        }
    }

    /// The coordinator's whole state as JSON: its snapshot.
    pub fn snapshot(&self) -> Result<Vec<u8>, serde_json::Error> {
        self.snapshot_sized(0)
    }

    /// [`Coordinator::snapshot`] into a buffer of `capacity` bytes to begin
    /// with (say, the last snapshot's size): a large state is then written
    /// without growing its buffer step by step.
    pub fn snapshot_sized(&self, capacity: usize) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(capacity);
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }

    /// A coordinator restored from [`Coordinator::snapshot`] bytes.
    ///
    /// The world document is loaded with the identity it was saved under
    /// (call [`Coordinator::incarnate`] for the new process) and checked
    /// against the materialized world: a snapshot whose two disagree is refused.
    pub fn restore(bytes: &[u8]) -> Result<Coordinator, serde_json::Error> {
        let c: Coordinator = serde_json::from_slice(bytes)?;
        c.doc.check_view(&c.world).map_err(serde::de::Error::custom)?;
        Ok(c)
    }

    /// Handles one input at coordinator time `now_ms` and returns what to do.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Effect> {
        let mut fx = Vec::new();
        match input {
            Input::Intent { request, agent, intent } => self.on_intent(now_ms, request, &agent, intent, &mut fx),
            Input::Lease { request, agent, lease } => self.on_lease(now_ms, request, &agent, lease, &mut fx),
            Input::Observe { agent, observation } => self.on_observe(now_ms, &agent, observation, &mut fx),
            Input::Outcome { outcome, .. } => self.on_outcome(now_ms, outcome, &mut fx),
            Input::Control {
                request,
                operator,
                control,
            } => self.on_control(now_ms, request, &operator, control, &mut fx),
            Input::Tick => self.on_tick(now_ms, &mut fx),
        }
        fx
    }

    fn arm(&mut self, at_ms: u64, timer: Timer, fx: &mut Vec<Effect>) {
        self.timer_seq += 1;
        let earliest = self.next_timer();
        self.timers.insert((at_ms, self.timer_seq), timer);
        if earliest.is_none_or(|e| at_ms < e) {
            fx.push(Effect::ArmTimer { at_ms });
        }
    }

    // ---- intents ---------------------------------------------------------

    fn on_intent(&mut self, now: u64, request: RequestId, agent: &str, intent: Intent, fx: &mut Vec<Effect>) {
        let hash = intent.content_hash();
        if let Some(d) = self
            .decisions
            .get(&(Arc::from(agent), Arc::from(dedupe_key(&intent, &hash))))
        {
            // A retry after a timeout or reconnect gets the original decision.
            let mut d = d.clone();
            d.duplicate = true;
            fx.push(Effect::Reply {
                request,
                reply: Reply::Decision(Box::new(d)),
            });
            return;
        }
        let previous = self
            .plans
            .get(&intent.lineage)
            .map(|p| p.intent.clone())
            .or_else(|| self.ended.get(&intent.lineage).cloned())
            .or_else(|| self.recognised_replan(now, agent, &intent));
        self.remember_recent(now, agent, &intent);
        let decision = self.decide(now, agent, intent, Some(hash), Some(request), previous, fx);
        if let Some(d) = decision {
            fx.push(Effect::Reply {
                request,
                reply: Reply::Decision(Box::new(d)),
            });
        }
    }

    /// Decides a plan; returns the decision to reply with (None when the
    /// plan was queued and will be answered later).
    ///
    /// Two halves: the *evaluation* (previews, compounding, conflicts: what
    /// policy decides) and the *commitment* (state changes that follow from
    /// the verdict). While recovering, the evaluation is taken from the
    /// recorded `decided` event instead: recovery never re-decides.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        now: u64,
        agent: &str,
        intent: Intent,
        hash: Option<String>,
        request: Option<RequestId>,
        previous: Option<Intent>,
        fx: &mut Vec<Effect>,
    ) -> Option<Decision> {
        let lineage = intent.lineage.clone();
        // Versions: a newer version withdraws a pending one (it is refused while one runs).
        let withdraw = self.plans.get(&lineage).and_then(|existing| match existing.status {
            Status::Pending { .. } | Status::Queued if intent.version > existing.intent.version => {
                Some(existing.intent.version)
            }
            _ => None,
        });
        let recorded = self.take_recorded_decision(&lineage, intent.version);
        self.index_world();
        // One simulated run serves the preview on the projected world, the
        // conflicts and the compounding checks; its memo records what it read.
        let memo = Memo::default();
        let mut run = crate::preview::Run::simulate(
            Base::projected(&self.world, &self.projected)
                .with_overlay_keys(&self.inflight_keys)
                .with_indexes(&self.indexes)
                .with_memo(&memo),
            &intent,
        );
        let mut touched: BTreeSet<ResourcePath> = run.touched.clone();
        touched.extend(intent.steps.iter().map(|s| s.path.clone()));
        let eval = match recorded {
            Some(e) => e,
            None => {
                let hash = hash.unwrap_or_else(|| intent.content_hash());
                let previous = previous.as_ref();
                self.evaluate(now, agent, &intent, previous, hash, &mut run, &memo, &touched)
            }
        };
        if let Some(b) = &eval.trip {
            fx.push(Effect::Event(Event::BreakerTripped { breaker: b.clone() }));
            fx.push(Effect::Alert {
                message: format!(
                    "breaker tripped: agent `{}` repeated `{}` on `{}`; resume with a halt scope covering it",
                    b.agent, b.kind, b.path
                ),
            });
            self.breakers.push(b.clone());
        }
        fx.push(Effect::Event(Event::Decided {
            agent: agent.to_string(),
            lineage: lineage.clone(),
            version: intent.version,
            hash: eval.plan_hash.clone(),
            verdict: eval.verdict,
            reasons: eval.reasons.clone(),
            conflicts: eval.conflicts.clone(),
            material_hash: eval.material_hash.clone(),
            queued: eval.queued,
            policy_hash: eval.policy_hash.clone(),
            core_version: eval.core_version.clone(),
        }));
        let (verdict, queued) = (eval.verdict, eval.queued);
        // The simulated run borrows the world; keep what the plan needs and let it go.
        let (final_changes, step_changes) = (
            std::mem::take(&mut run.final_changes),
            std::mem::take(&mut run.step_changes),
        );
        drop(run);
        let (version, key) = (intent.version, dedupe_key(&intent, &eval.plan_hash));
        if verdict != Verdict::Reject || queued {
            if let Some(v) = withdraw {
                self.remove_plan(&lineage);
                fx.push(Effect::Event(Event::Withdrawn {
                    lineage: lineage.clone(),
                    version: v,
                    by_version: intent.version,
                }));
            }
            // Kept while the plan lives: without the spare room the decoder
            // and the simulation grew them with (memory per plan is a target).
            let (mut intent, mut step_changes) = (intent, step_changes);
            intent.steps.shrink_to_fit();
            step_changes.shrink_to_fit();
            let plan = Plan {
                agent: agent.to_string(),
                hash: eval.plan_hash.clone(),
                material_hash: eval.material_hash.clone(),
                step_changes,
                effects: final_changes,
                touched,
                status: Status::Queued,
                queued_request: None,
                previous: previous.clone(),
                intent,
            };
            self.insert_plan(lineage.clone(), plan);
            if queued {
                if let Some(p) = self.plans.get_mut(&lineage) {
                    p.queued_request = request;
                }
            } else if verdict == Verdict::NeedsApproval {
                let expires_at_ms = now + self.config.approval_ttl_ms;
                self.set_status(
                    &lineage,
                    Status::Pending {
                        expires_at_ms,
                        approvers: Vec::new(),
                    },
                );
                self.arm(
                    expires_at_ms,
                    Timer::ApprovalExpiry {
                        lineage: lineage.clone(),
                        version,
                    },
                    fx,
                );
            } else {
                self.start_saga(now, &lineage, fx);
            }
        } else if !self.plans.contains_key(&lineage) {
            self.remember_ended(&intent, &eval.plan_hash);
        }
        let decision = Decision {
            verdict,
            reasons: eval.reasons,
            conflicts: eval.conflicts,
            plan_hash: eval.plan_hash,
            material_hash: eval.material_hash,
            queued,
            duplicate: false,
            preview: eval.preview,
        };
        self.remember(agent, &key, &decision);
        if queued { None } else { Some(decision) }
    }

    /// What policy decides about a plan: previews on the projected world
    /// (and on the world as it is, with plans in flight), bounds, halts,
    /// breakers, compounding findings and conflicts. Changes no state.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &self,
        now: u64,
        agent: &str,
        intent: &Intent,
        previous: Option<&Intent>,
        hash: String,
        run: &mut crate::preview::Run<'_>,
        memo: &Memo<'_>,
        touched: &BTreeSet<ResourcePath>,
    ) -> Evaluation {
        let lineage = &intent.lineage;
        let mut extra: Vec<Reason> = Vec::new();
        if let Some(existing) = self.plans.get(lineage) {
            let v = existing.intent.version;
            match &existing.status {
                _ if intent.version <= v => extra.push(reason(
                    "replan.version",
                    format!(
                        "version {} is not newer than version {v} of this lineage",
                        intent.version
                    ),
                )),
                Status::Running(_) => extra.push(reason(
                    "replan.running",
                    format!("version {v} of this lineage is running; cancel it or wait for it to end"),
                )),
                Status::Pending { .. } | Status::Queued => {}
            }
        }
        // Per-agent and global bounds.
        let (pending, running) = self.per_agent.get(agent).copied().unwrap_or((0, 0));
        if self.plans.len() >= self.config.plans_max {
            extra.push(reason(
                "limit.plans",
                format!("{} plans are live; at most {}", self.plans.len(), self.config.plans_max),
            ));
        }
        if pending >= self.config.pending_per_agent_max {
            extra.push(reason(
                "limit.pending",
                format!(
                    "agent `{agent}` has {pending} plans waiting; at most {}",
                    self.config.pending_per_agent_max
                ),
            ));
        }
        if running >= self.config.running_per_agent_max {
            extra.push(reason(
                "limit.running",
                format!(
                    "agent `{agent}` has {running} plans running; at most {}",
                    self.config.running_per_agent_max
                ),
            ));
        }

        // Previews: on the projected world, and, with plans in flight, on the world as it is.
        let input = PreviewInput {
            world: &self.world,
            intent,
            agent,
            policy: &self.policy,
            previous,
        };
        // The plan diff, once for both previews; the hash of a previous
        // version that is live, or that ended since this coordinator started,
        // is known.
        let plan_diff = previous.map(|p| {
            let known = match self.plans.get(&p.lineage) {
                Some(live) => Some(&live.hash).filter(|_| live.intent == *p),
                None => self
                    .ended_hashes
                    .get(&p.lineage)
                    .filter(|_| self.ended.get(&p.lineage) == Some(p)),
            }
            .cloned();
            debug_assert!(known.as_ref().is_none_or(|h| *h == p.content_hash()));
            crate::plandiff::plan_diff_hashed(p, known.unwrap_or_else(|| p.content_hash()), intent)
        });
        let mut preview = preview_of_run(input, run, Some(hash), plan_diff.clone());
        let conflicts = self.conflicts(lineage, agent, intent, touched);
        // A plan that conflicts with one in flight and does not wait for it
        // is rejected for the conflict whatever the in-flight plans' end:
        // the look at the world they would leave by compensating decides
        // nothing, and is not taken.
        let rejected_for_conflict = !conflicts.is_empty() && intent.on_conflict != OnConflict::Queue;
        // The world as it is differs from the projected one only at the paths
        // the in-flight plans change: if the projected preview read none of
        // them (nor anything under a prefix it scanned), the preview on the
        // world as it is would read the same values and reach the same
        // results, so it adds no reason and is not computed.
        if !rejected_for_conflict
            && !self.projected.is_empty()
            && memo.read_any(Keyed::new(&self.projected, &self.inflight_keys))
        {
            let current_memo = Memo::default();
            let current_run = crate::preview::Run::simulate(
                Base::current(&self.world)
                    .with_indexes(&self.indexes)
                    .with_memo(&current_memo),
                intent,
            );
            // Only its reasons are used: the rules alone, not a whole preview.
            let second = crate::preview::SecondLook::new(Keyed::new(&self.projected, &self.inflight_keys), touched);
            let current = crate::preview::judge(input, &current_run, plan_diff, Some(second));
            for r in current.reasons {
                if !preview.reasons.iter().any(|p| p.rule == r.rule) {
                    extra.push(Reason {
                        message: format!("if the in-flight plans compensate: {}", r.message),
                        ..r
                    });
                }
            }
        }

        // Halts stop admission in their scope.
        if let Some(h) = self.halts.iter().find(|h| covers(&h.scope, agent, touched)) {
            extra.push(reason(
                "halt.active",
                format!("a {:?} halt by {} covers this plan: {}", h.grade, h.operator, h.reason).to_lowercase(),
            ));
        }
        // Breakers: an agent that looped on a path may not act there until resumed.
        if let Some(b) = self
            .breakers
            .iter()
            .find(|b| b.agent == agent && touched.iter().any(|t| t.overlaps(&b.path)))
        {
            extra.push(reason(
                "breaker.open",
                format!(
                    "agent `{agent}`'s breaker on `{}` tripped (repeated `{}`); an operator must resume it",
                    b.path, b.kind
                ),
            ));
        }
        let (findings, trip) = self.compounding(now, agent, intent, run);
        for f in findings {
            if f.status == concord_proto::preview::RuleStatus::Fail {
                extra.push(Reason {
                    rule: f.id.clone(),
                    outcome: f.outcome,
                    message: f.message.clone(),
                });
            }
            preview.invariants.push(f);
        }
        let queued = !conflicts.is_empty()
            && intent.on_conflict == OnConflict::Queue
            && extra.is_empty()
            && preview.verdict != Verdict::Reject;
        if !conflicts.is_empty() && !queued {
            let c = &conflicts[0];
            extra.push(reason(
                "conflict.inflight",
                format!(
                    "conflicts with {} v{} of agent `{}` on `{}` ({})",
                    c.other, c.version, c.agent, c.path, c.kind
                ),
            ));
        }
        for r in extra {
            preview.verdict = preview.verdict.max(r.outcome);
            preview.reasons.push(r);
        }
        preview
            .reasons
            .sort_by(|a, b| b.outcome.cmp(&a.outcome).then_with(|| a.rule.cmp(&b.rule)));
        let material_hash = material_hash(&preview, &conflicts);
        Evaluation {
            verdict: preview.verdict,
            reasons: preview.reasons.clone(),
            plan_hash: preview.plan.hash.clone(),
            policy_hash: preview.policy_hash.clone(),
            core_version: preview.core_version.clone(),
            conflicts,
            material_hash,
            queued,
            trip,
            preview: Some(Box::new(preview)),
        }
    }

    /// The agent's most recent plan of another lineage, within the re-plan
    /// window, that touched any path this one touches and did not complete
    /// (rejected, failed, compensated, withdrawn, pending or running): a
    /// re-plan under a new id.
    fn recognised_replan(&self, now: u64, agent: &str, intent: &Intent) -> Option<Intent> {
        let from = now.saturating_sub(self.config.replan_window_ms);
        let r = self
            .recent
            .get(agent)?
            .iter()
            .rev()
            .take_while(|r| r.at_ms >= from)
            .find(|r| {
                r.lineage != intent.lineage && r.paths.iter().any(|a| intent.steps.iter().any(|b| a.overlaps(&b.path)))
            })?;
        self.plans
            .get(&r.lineage)
            .map(|p| &p.intent)
            .or_else(|| self.ended.get(&r.lineage))
            .filter(|i| i.version == r.version)
            .cloned()
    }

    fn remember_recent(&mut self, now: u64, agent: &str, intent: &Intent) {
        let q = self.recent.entry(agent.to_string()).or_default();
        q.push_back(RecentPlan {
            at_ms: now,
            lineage: intent.lineage.clone(),
            version: intent.version,
            paths: intent.steps.iter().map(|s| s.path.clone()).collect(),
        });
        while q.len() > self.config.recent_plans_per_agent_max {
            q.pop_front();
        }
    }

    /// Remembers the last version of a lineage that ended or was rejected,
    /// so the next version is diffed against it.
    fn remember_ended(&mut self, intent: &Intent, hash: &str) {
        let lineage = intent.lineage.clone();
        // Only hashes this process made: while recovering, `hash` is the
        // record's, which another build may have computed otherwise.
        if self.recorded.is_some() {
            self.ended_hashes.remove(&lineage);
        } else {
            self.ended_hashes.insert(lineage.clone(), hash.to_string());
        }
        if self.ended.insert(lineage.clone(), intent.clone()).is_none() {
            self.ended_order.push_back(lineage);
        }
        while self.ended_order.len() > self.config.ended_lineages_max {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
                self.ended_hashes.remove(&old);
            }
        }
    }

    /// Remembers a decision under its dedupe key, without its preview (the
    /// table is bounded by count, and previews are the bulk of a decision).
    fn remember(&mut self, agent: &str, key: &str, d: &Decision) {
        let k: DedupeKey = (Arc::from(agent), Arc::from(key));
        if self.decisions.insert(k.clone(), d.compact()).is_none() {
            self.decision_order.push_back(k);
        }
        while self.decision_order.len() > self.config.idempotency_keys_max {
            if let Some(old) = self.decision_order.pop_front() {
                self.decisions.remove(&old);
            }
        }
    }

    /// Conflicts with running plans and other agents' leases: writes to the
    /// same path or an ancestor or descendant, and assumptions that a running
    /// plan will break. Cost follows the plan's paths, not the number in flight.
    fn conflicts(&self, lineage: &Id, agent: &str, intent: &Intent, touched: &BTreeSet<ResourcePath>) -> Vec<Conflict> {
        let mut out: Vec<Conflict> = Vec::new();
        let mut push = |c: Conflict| {
            if !out.iter().any(|o| o.other == c.other && o.path == c.path) {
                out.push(c);
            }
        };
        for path in touched {
            for (p, owners) in self.inflight_overlapping(path) {
                for other in owners {
                    if other == lineage {
                        continue;
                    }
                    if let Some(o) = self.plans.get(other) {
                        push(Conflict {
                            other: other.to_string(),
                            version: o.intent.version,
                            agent: o.agent.clone(),
                            path: p.clone(),
                            kind: "writes_overlap".into(),
                        });
                    }
                }
            }
            for l in self.leases.held_over(agent, path) {
                push(Conflict {
                    other: format!("lease:{}", l.id),
                    version: 0,
                    agent: l.agent.clone(),
                    path: l.path.clone(),
                    kind: "reserved".into(),
                });
            }
        }
        for a in &intent.assumptions {
            let Some(after) = self.projected.get(&a.path) else {
                continue;
            };
            if !a.op.holds(after.as_ref(), a.value.as_ref())
                && let Some((p, owners)) = self.inflight_overlapping(&a.path).into_iter().next()
                && let Some(other) = owners.iter().find(|o| *o != lineage)
                && let Some(o) = self.plans.get(other)
            {
                push(Conflict {
                    other: other.to_string(),
                    version: o.intent.version,
                    agent: o.agent.clone(),
                    path: p.clone(),
                    kind: "assumption_broken".into(),
                });
            }
        }
        out
    }

    /// In-flight index entries for `path`, its ancestors and its descendants.
    fn inflight_overlapping(&self, path: &ResourcePath) -> Vec<(&ResourcePath, &Vec<Id>)> {
        crate::world::overlapping(Keyed::new(&self.inflight, &self.inflight_keys), path)
    }

    // ---- sagas -------------------------------------------------------------

    fn start_saga(&mut self, now: u64, lineage: &Id, fx: &mut Vec<Effect>) {
        self.set_status(
            lineage,
            Status::Running(Saga {
                phase: Phase2::Forward { next: 0 },
                completed: Vec::new(),
                outstanding: None,
                attempts: BTreeMap::new(),
            }),
        );
        let Some(plan) = self.plans.get(lineage) else {
            return;
        };
        for p in &plan.touched {
            let owners = self.inflight.entry(p.clone()).or_default();
            if owners.is_empty() && self.inflight_keys.is_built() {
                self.inflight_keys.insert(p);
            }
            if let Err(i) = owners.binary_search(lineage) {
                owners.insert(i, lineage.clone());
            }
        }
        for (p, v) in &plan.effects {
            self.projected.insert(p.clone(), v.clone());
        }
        compounding::remember_history(&mut self.history, now, &plan.agent, &plan.intent, &plan.step_changes);
        let version = plan.intent.version;
        self.check_inflight_keys();
        fx.push(Effect::Event(Event::Admitted {
            lineage: lineage.clone(),
            version,
        }));
        self.advance(now, lineage, fx);
    }

    /// Whether a halt holds this plan's next dispatch.
    fn frozen(&self, plan: &Plan, compensating_by_rollback: bool) -> bool {
        if compensating_by_rollback {
            return false;
        }
        self.halts
            .iter()
            .any(|h| h.grade == HaltGrade::Freeze && covers(&h.scope, &plan.agent, &plan.touched))
    }

    /// Dispatches the saga's next step or compensation, or ends it.
    fn advance(&mut self, now: u64, lineage: &Id, fx: &mut Vec<Effect>) {
        let Some(plan) = self.plans.get(lineage) else { return };
        let Status::Running(saga) = &plan.status else { return };
        if saga.outstanding.is_some() {
            return;
        }
        match saga.phase.clone() {
            Phase2::Verifying { .. } | Phase2::CompensationFailed { .. } => {}
            Phase2::Forward { next } => {
                if next >= plan.intent.steps.len() {
                    fx.push(Effect::Event(Event::Completed {
                        lineage: lineage.clone(),
                        version: plan.intent.version,
                    }));
                    // A plan that completed is not re-planned: the next plan on its
                    // paths is a new change (its accumulation is the drift rule's job).
                    let (agent, version) = (plan.agent.clone(), plan.intent.version);
                    if let Some(q) = self.recent.get_mut(&agent) {
                        q.retain(|r| !(&r.lineage == lineage && r.version == version));
                    }
                    self.end(now, lineage, fx);
                    return;
                }
                if self.frozen(plan, false) {
                    return;
                }
                let step = &plan.intent.steps[next];
                let spec = StepSpec {
                    path: step.path.clone(),
                    op: step.op.clone(),
                };
                let changes = plan.step_changes[next].clone();
                let timeout = step.timeout_ms.unwrap_or(self.config.step_timeout_ms);
                self.dispatch(now, lineage, next, Phase::Do, spec, changes, timeout, fx);
            }
            Phase2::Compensating { by_rollback } => {
                let Some(&index) = saga.completed.last() else {
                    fx.push(Effect::Event(Event::Compensated {
                        lineage: lineage.clone(),
                        version: plan.intent.version,
                    }));
                    self.end(now, lineage, fx);
                    return;
                };
                if self.frozen(plan, by_rollback) {
                    return;
                }
                let step = &plan.intent.steps[index];
                let Some(spec) = self.compensation_spec(plan, index) else {
                    // Nothing to undo (irreversible, or the step changed nothing).
                    if let Some(Plan {
                        status: Status::Running(s),
                        ..
                    }) = self.plans.get_mut(lineage)
                    {
                        s.completed.pop();
                    }
                    self.advance(now, lineage, fx);
                    return;
                };
                let mut state = State::new(&self.world);
                let changes = apply(&mut state, &spec).unwrap_or_default();
                let timeout = step.timeout_ms.unwrap_or(self.config.step_timeout_ms);
                self.dispatch(now, lineage, index, Phase::Undo, spec, changes, timeout, fx);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        now: u64,
        lineage: &Id,
        index: usize,
        phase: Phase,
        spec: StepSpec,
        changes: Vec<PathChange>,
        timeout_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        let Some(plan) = self.plans.get_mut(lineage) else {
            return;
        };
        let Status::Running(saga) = &mut plan.status else {
            return;
        };
        let attempt = saga.attempts.entry((index, phase == Phase::Undo)).or_insert(0);
        *attempt += 1;
        let key = DispatchKey {
            lineage: lineage.clone(),
            version: plan.intent.version,
            step: plan.intent.steps[index].id.clone(),
            phase,
            attempt: *attempt,
        };
        // Every dispatch gets a higher token than any before it on the path, so
        // a late original step is refused once its compensation was sent.
        let token = self.fencing.entry(spec.path.clone()).or_insert(0);
        *token += 1;
        let token = *token;
        let deadline_ms = now + timeout_ms;
        saga.outstanding = Some(Outstanding {
            key: key.clone(),
            index,
            deadline_ms,
            token,
            changes: changes.clone(),
        });
        fx.push(Effect::Event(Event::Dispatched {
            key: key.clone(),
            path: spec.path.clone(),
            token,
        }));
        fx.push(Effect::Dispatch(Box::new(StepDispatch {
            key: key.clone(),
            path: spec.path.clone(),
            kind: spec.op.kind(),
            args: spec.op.args_json(),
            fencing_token: token,
            expected_before: changes.iter().map(|c| (c.path.clone(), c.before.clone())).collect(),
            timeout_ms,
        })));
        self.arm(deadline_ms, Timer::StepDeadline { key }, fx);
    }

    fn on_outcome(&mut self, now: u64, outcome: StepOutcome, fx: &mut Vec<Effect>) {
        let key = outcome.key;
        let matches = self
            .plans
            .get(&key.lineage)
            .and_then(|p| match &p.status {
                Status::Running(s) => s.outstanding.as_ref(),
                _ => None,
            })
            .is_some_and(|o| o.key == key);
        if !matches {
            fx.push(Effect::Event(Event::OutcomeIgnored {
                key,
                reason: "no outstanding dispatch has this key (late, duplicate or unknown)".into(),
            }));
            return;
        }
        let lineage = key.lineage.clone();
        let (index, changes) = match self.take_outstanding(&lineage) {
            Some(o) => (o.index, o.changes),
            None => return,
        };
        match (&outcome.result, key.phase) {
            (StepResult::Succeeded, phase) => {
                fx.push(Effect::Event(Event::StepSucceeded { key: key.clone() }));
                self.apply_to_world(now, &key, &changes, fx);
                let verification = self
                    .plans
                    .get(&lineage)
                    .and_then(|p| p.intent.steps[index].verification.clone());
                let Some(Plan {
                    status: Status::Running(saga),
                    ..
                }) = self.plans.get_mut(&lineage)
                else {
                    return;
                };
                match phase {
                    Phase::Do => {
                        saga.completed.push(index);
                        if let (Phase2::Forward { .. }, Some(v)) = (&saga.phase, verification) {
                            let until_ms = now + v.bake_ms;
                            saga.phase = Phase2::Verifying { index, until_ms };
                            fx.push(Effect::Event(Event::Verifying { key, until_ms }));
                            self.arm(
                                until_ms,
                                Timer::Verification {
                                    lineage: lineage.clone(),
                                    index,
                                },
                                fx,
                            );
                            return;
                        }
                        if let Phase2::Forward { next } = &mut saga.phase {
                            *next = index + 1;
                        }
                    }
                    Phase::Undo => {
                        saga.completed.pop();
                    }
                }
                self.advance(now, &lineage, fx);
            }
            (failure, Phase::Do) => {
                let why = failure_text(failure);
                fx.push(Effect::Event(Event::StepFailed {
                    key: key.clone(),
                    reason: why.clone(),
                }));
                self.compensate(now, &lineage, format!("step {} failed: {why}", key.step), false, fx);
            }
            (failure, Phase::Undo) => {
                let why = failure_text(failure);
                fx.push(Effect::Event(Event::StepFailed {
                    key: key.clone(),
                    reason: why.clone(),
                }));
                self.compensation_failed(&lineage, index, why, fx);
            }
        }
    }

    fn take_outstanding(&mut self, lineage: &Id) -> Option<Outstanding> {
        match self.plans.get_mut(lineage) {
            Some(Plan {
                status: Status::Running(s),
                ..
            }) => s.outstanding.take(),
            _ => None,
        }
    }

    /// Applies a successful step's changes: to the world document (with
    /// their provenance) and to `world`, its materialized view.
    fn apply_to_world(&mut self, now: u64, key: &DispatchKey, changes: &[PathChange], fx: &mut Vec<Effect>) {
        let by = Provenance {
            lineage: key.lineage.to_string(),
            version: key.version,
            step: key.step.to_string(),
            phase: key.phase,
            agent: self
                .plans
                .get(&key.lineage)
                .map(|p| p.agent.clone())
                .unwrap_or_default(),
            at_ms: now,
        };
        let writes: Vec<(ResourcePath, Option<Value>)> =
            changes.iter().map(|c| (c.path.clone(), c.after.clone())).collect();
        if let Err(e) = self.doc.apply_step(now, &writes, &by) {
            fx.push(Effect::Alert {
                message: format!("world document: step {} not written: {e}", key.text()),
            });
        }
        self.indexes.apply(
            &self.policy,
            &self.world,
            changes.iter().map(|c| (&c.path, c.after.as_ref())),
        );
        for c in changes {
            match &c.after {
                Some(v) => self.world.resources.insert(c.path.clone(), v.clone()),
                None => self.world.resources.remove(&c.path),
            };
        }
        self.rotate_if_due(now, fx);
    }

    /// Builds the world's indexes if they are missing (a new or restored
    /// coordinator) or were built for another policy, and the in-flight keys
    /// if they are missing.
    fn index_world(&mut self) {
        self.indexes.ensure(&self.policy, &self.world);
        if !self.inflight_keys.is_built() {
            self.inflight_keys = PathKeys::build(&self.inflight);
        }
    }

    /// Starts a fresh world document when the schedule calls for one.
    fn rotate_if_due(&mut self, now: u64, fx: &mut Vec<Effect>) {
        if !self.doc.rotation_due(now) {
            return;
        }
        let r = self.doc.rotate(now, &self.world);
        fx.push(Effect::Event(Event::WorldRotated {
            epoch: r.epoch,
            doc_id: r.doc_id,
            retired_changes: r.retired_changes,
        }));
    }

    fn compensation_failed(&mut self, lineage: &Id, index: usize, why: String, fx: &mut Vec<Effect>) {
        let Some(plan) = self.plans.get_mut(lineage) else {
            return;
        };
        let Status::Running(saga) = &mut plan.status else {
            return;
        };
        saga.phase = Phase2::CompensationFailed { index };
        let step = plan.intent.steps[index].id.clone();
        fx.push(Effect::Event(Event::CompensationFailed {
            lineage: lineage.clone(),
            version: plan.intent.version,
            step: step.clone(),
            reason: why.clone(),
        }));
        fx.push(Effect::Alert {
            message: format!(
                "compensation of step {step} of plan {lineage} v{} failed ({why}); the saga keeps its leases and waits for `retry`, `skip` or `resolve`",
                plan.intent.version
            ),
        });
    }

    /// Starts compensating the completed steps in reverse.
    fn compensate(&mut self, now: u64, lineage: &Id, why: String, by_rollback: bool, fx: &mut Vec<Effect>) {
        let Some(plan) = self.plans.get_mut(lineage) else {
            return;
        };
        let Status::Running(saga) = &mut plan.status else {
            return;
        };
        if matches!(
            saga.phase,
            Phase2::Compensating { .. } | Phase2::CompensationFailed { .. }
        ) {
            return;
        }
        saga.phase = Phase2::Compensating { by_rollback };
        let irreversible = saga
            .completed
            .iter()
            .filter(|&&i| matches!(plan.intent.steps[i].compensation, Compensation::Irreversible { .. }))
            .map(|&i| plan.intent.steps[i].id.clone())
            .collect();
        fx.push(Effect::Event(Event::Compensating {
            lineage: lineage.clone(),
            version: plan.intent.version,
            reason: why,
            irreversible,
        }));
        // The plan will not reach its final state: drop it from the projection.
        for p in plan.effects.keys() {
            self.projected.remove(p);
        }
        self.advance(now, lineage, fx);
    }

    /// Ends a saga: frees its leases and re-decides queued plans.
    fn end(&mut self, now: u64, lineage: &Id, fx: &mut Vec<Effect>) {
        let Some(plan) = self.remove_plan(lineage) else { return };
        self.remember_ended(&plan.intent, &plan.hash);
        for p in &plan.touched {
            if let Some(set) = self.inflight.get_mut(p) {
                set.retain(|l| l != lineage);
                if set.is_empty() {
                    self.inflight.remove(p);
                    if self.inflight_keys.is_built() {
                        self.inflight_keys.remove(p);
                    }
                }
            }
        }
        for p in plan.effects.keys() {
            self.projected.remove(p);
        }
        self.check_inflight_keys();
        self.requeue(now, fx);
    }

    /// Debug builds: the in-flight keys are those of the in-flight index
    /// (checked while it is small: the check builds them afresh).
    fn check_inflight_keys(&self) {
        if cfg!(debug_assertions) && self.inflight_keys.is_built() && self.inflight.len() <= 64 {
            debug_assert_eq!(
                self.inflight_keys,
                PathKeys::build(&self.inflight),
                "in-flight keys stale"
            );
        }
    }

    /// Re-decides queued plans, oldest lineage first.
    fn requeue(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let queued: Vec<Id> = self.queued.iter().cloned().collect();
        for l in queued {
            let Some(p) = self.remove_plan(&l) else { continue };
            let request = p.queued_request;
            if let Some(d) = self.decide(now, &p.agent, p.intent, None, request, p.previous, fx)
                && let Some(request) = request
            {
                fx.push(Effect::Reply {
                    request,
                    reply: Reply::Decision(Box::new(d)),
                });
            }
        }
    }

    // ---- observations and timers --------------------------------------------

    /// Keeps the observation in its series (bounded by count and age) and
    /// writes it to the world document when it moves beyond the deadband.
    fn on_observe(&mut self, now: u64, agent: &str, obs: Observation, fx: &mut Vec<Effect>) {
        if !self.observations.contains_key(&obs.path) && self.observations.len() >= self.config.observation_series_max {
            return;
        }
        let rec = ObservationRecord {
            kind: obs.kind,
            value: obs.value,
            agent: agent.to_string(),
            at_ms: now,
        };
        let series = self.observations.entry(obs.path.clone()).or_insert_with(|| Series {
            latest: rec.clone(),
            points: VecDeque::new(),
            written: None,
        });
        series.latest = rec.clone();
        series.points.push_back((now, rec.value.clone()));
        while series.points.len() > self.config.observation_points_max
            || series
                .points
                .front()
                .is_some_and(|(t, _)| now.saturating_sub(*t) > self.config.observation_retention_ms)
        {
            series.points.pop_front();
        }
        if !needs_write(&self.config.world_doc, series.written.as_ref(), &rec) {
            return;
        }
        match self.doc.put_observation(&obs.path, &rec, series.written.as_ref()) {
            Ok(()) => series.written = Some(rec),
            Err(e) => fx.push(Effect::Alert {
                message: format!("world document: observation of `{}` not written: {e}", obs.path),
            }),
        }
        self.rotate_if_due(now, fx);
    }

    fn on_tick(&mut self, now: u64, fx: &mut Vec<Effect>) {
        while let Some((&(at, seq), _)) = self.timers.iter().next() {
            if at > now {
                break;
            }
            let Some(timer) = self.timers.remove(&(at, seq)) else {
                break;
            };
            self.fire(now, timer, fx);
        }
        if let Some(at_ms) = self.next_timer() {
            fx.push(Effect::ArmTimer { at_ms });
        }
    }

    fn fire(&mut self, now: u64, timer: Timer, fx: &mut Vec<Effect>) {
        match timer {
            Timer::ApprovalExpiry { lineage, version } => {
                if let Some(p) = self.plans.get(&lineage)
                    && p.intent.version == version
                    && matches!(p.status, Status::Pending { expires_at_ms, .. } if expires_at_ms <= now)
                {
                    self.remove_plan(&lineage);
                    fx.push(Effect::Event(Event::ApprovalExpired { lineage, version }));
                }
            }
            Timer::StepDeadline { key } => {
                let late = self
                    .plans
                    .get(&key.lineage)
                    .and_then(|p| match &p.status {
                        Status::Running(s) => s.outstanding.as_ref(),
                        _ => None,
                    })
                    .is_some_and(|o| o.key == key && o.deadline_ms <= now);
                if !late {
                    return;
                }
                let Some(o) = self.take_outstanding(&key.lineage) else {
                    return;
                };
                fx.push(Effect::Event(Event::StepFailed {
                    key: key.clone(),
                    reason: "timed out; the outcome is unknown".into(),
                }));
                match key.phase {
                    Phase::Do => {
                        // It may have been applied: compensate it too, with a new,
                        // higher fencing token that refuses the late original.
                        if let Some(Plan {
                            status: Status::Running(s),
                            ..
                        }) = self.plans.get_mut(&key.lineage)
                        {
                            s.completed.push(o.index);
                        }
                        self.compensate(now, &key.lineage, format!("step {} timed out", key.step), false, fx);
                    }
                    Phase::Undo => self.compensation_failed(&key.lineage, o.index, "timed out".into(), fx),
                }
            }
            Timer::Verification { lineage, index } => {
                let Some(plan) = self.plans.get(&lineage) else { return };
                let Status::Running(saga) = &plan.status else { return };
                if !matches!(saga.phase, Phase2::Verifying { index: i, until_ms } if i == index && until_ms <= now) {
                    return;
                }
                let step = &plan.intent.steps[index];
                let Some(v) = &step.verification else { return };
                let obs = self.observations.get(&v.path).map(|s| &s.latest);
                let fresh = obs.is_some_and(|o| now.saturating_sub(o.at_ms) <= v.fresh_ms);
                let holds = fresh && v.op.holds(obs.map(|o| &o.value), v.value.as_ref());
                let key = DispatchKey {
                    lineage: lineage.clone(),
                    version: plan.intent.version,
                    step: step.id.clone(),
                    phase: Phase::Do,
                    attempt: saga.attempts.get(&(index, false)).copied().unwrap_or(1),
                };
                if holds {
                    if let Some(Plan {
                        status: Status::Running(s),
                        ..
                    }) = self.plans.get_mut(&lineage)
                    {
                        s.phase = Phase2::Forward { next: index + 1 };
                    }
                    self.advance(now, &lineage, fx);
                } else {
                    let seen = match obs {
                        None => "no observation".to_string(),
                        Some(o) if !fresh => format!("last observation {} ms old", now.saturating_sub(o.at_ms)),
                        Some(o) => format!("observed {}", o.value),
                    };
                    let why = format!(
                        "verification `{} {} {}` failed after {} ms: {seen}",
                        v.path,
                        v.op.symbol(),
                        v.value.as_ref().map(|x| x.to_string()).unwrap_or_default(),
                        v.bake_ms
                    );
                    fx.push(Effect::Event(Event::StepFailed {
                        key,
                        reason: why.clone(),
                    }));
                    self.compensate(now, &lineage, why, false, fx);
                }
            }
            Timer::LeaseExpiry { lease, expires_at_ms } => {
                if let Some(l) = self.leases.held.get(&lease)
                    && l.expires_at_ms == expires_at_ms
                    && expires_at_ms <= now
                {
                    let agent = l.agent.clone();
                    self.leases.held.remove(&lease);
                    fx.push(Effect::Event(Event::LeaseExpired { lease, agent }));
                    self.grant_waiters(now, fx);
                }
            }
        }
    }

    // ---- leases --------------------------------------------------------------

    fn on_lease(&mut self, now: u64, request: RequestId, agent: &str, req: LeaseRequest, fx: &mut Vec<Effect>) {
        let refused = |code: &str, message: String, holder: Option<String>| LeaseReply::Refused {
            code: code.into(),
            message,
            holder,
        };
        let reply = match req {
            LeaseRequest::Acquire {
                path,
                mode,
                ttl_ms,
                wait,
            } => {
                if ttl_ms == 0 || ttl_ms > self.config.lease_ttl_ms_max {
                    refused(
                        "ttl_range",
                        format!("ttl_ms {ttl_ms} is outside 1..={}", self.config.lease_ttl_ms_max),
                        None,
                    )
                } else if self.leases.held_count() >= self.config.leases_max {
                    refused(
                        "queue_full",
                        format!("{} leases are held", self.config.leases_max),
                        None,
                    )
                } else {
                    let holder = self.lease_blocker(agent, &path, mode);
                    let id = self.leases.next_id();
                    let lease = Lease {
                        id,
                        agent: agent.to_string(),
                        path: path.clone(),
                        mode,
                        ttl_ms,
                        expires_at_ms: now + ttl_ms,
                    };
                    match holder {
                        None if self.leases.waiting.iter().any(|w| w.conflicts(&path, mode)) => {
                            // Fair: do not overtake a conflicting waiter.
                            self.enqueue(lease, wait)
                        }
                        None => {
                            self.grant(lease.clone(), fx);
                            LeaseReply::Granted {
                                lease: id,
                                path,
                                mode,
                                expires_at_ms: lease.expires_at_ms,
                            }
                        }
                        Some(h) if wait => {
                            let _ = h;
                            self.enqueue(lease, true)
                        }
                        Some(h) => refused("conflict", format!("`{path}` is held by {h}"), Some(h)),
                    }
                }
            }
            LeaseRequest::Renew { lease, ttl_ms } => match self.leases.held.get_mut(&lease) {
                Some(l) if l.agent == agent => {
                    if ttl_ms == 0 || ttl_ms > self.config.lease_ttl_ms_max {
                        refused(
                            "ttl_range",
                            format!("ttl_ms {ttl_ms} is outside 1..={}", self.config.lease_ttl_ms_max),
                            None,
                        )
                    } else {
                        l.expires_at_ms = now + ttl_ms;
                        l.ttl_ms = ttl_ms;
                        let granted = LeaseReply::Granted {
                            lease,
                            path: l.path.clone(),
                            mode: l.mode,
                            expires_at_ms: l.expires_at_ms,
                        };
                        let expires_at_ms = l.expires_at_ms;
                        fx.push(Effect::Event(Event::LeaseRenewed { lease, expires_at_ms }));
                        self.arm(expires_at_ms, Timer::LeaseExpiry { lease, expires_at_ms }, fx);
                        granted
                    }
                }
                Some(_) => refused("not_holder", format!("lease {lease} is not yours"), None),
                None => refused("unknown_lease", format!("no lease {lease} is held"), None),
            },
            LeaseRequest::Release { lease } => match self.leases.held.get(&lease) {
                Some(l) if l.agent == agent => {
                    self.leases.held.remove(&lease);
                    fx.push(Effect::Event(Event::LeaseReleased { lease }));
                    self.grant_waiters(now, fx);
                    LeaseReply::Released { lease }
                }
                Some(_) => refused("not_holder", format!("lease {lease} is not yours"), None),
                None => {
                    let before = self.leases.waiting.len();
                    self.leases.waiting.retain(|w| !(w.id == lease && w.agent == agent));
                    if self.leases.waiting.len() < before {
                        LeaseReply::Released { lease }
                    } else {
                        refused("unknown_lease", format!("no lease {lease} is held"), None)
                    }
                }
            },
        };
        fx.push(Effect::Reply {
            request,
            reply: Reply::Lease(reply),
        });
    }

    /// Who blocks `(path, mode)` for `agent`: another agent's lease or a running plan.
    fn lease_blocker(&self, agent: &str, path: &ResourcePath, mode: LeaseMode) -> Option<String> {
        if let Some(l) = self.leases.conflicting(agent, path, mode).next() {
            return Some(format!("lease {} of agent `{}`", l.id, l.agent));
        }
        self.inflight_overlapping(path)
            .into_iter()
            .flat_map(|(_, owners)| owners.iter())
            .filter_map(|l| self.plans.get(l).map(|p| (l, p)))
            .find(|(_, p)| p.agent != agent)
            .map(|(l, p)| format!("plan {l} v{} of agent `{}`", p.intent.version, p.agent))
    }

    fn enqueue(&mut self, lease: Lease, wait: bool) -> LeaseReply {
        if !wait {
            return LeaseReply::Refused {
                code: "conflict".into(),
                message: format!("`{}` has waiters ahead", lease.path),
                holder: None,
            };
        }
        if self.leases.waiting.len() >= self.config.lease_waiters_max {
            return LeaseReply::Refused {
                code: "queue_full".into(),
                message: format!("{} lease requests are waiting", self.config.lease_waiters_max),
                holder: None,
            };
        }
        let id = lease.id;
        self.leases.waiting.push_back(lease);
        LeaseReply::Queued {
            lease: id,
            position: self.leases.waiting.len() as u32,
        }
    }

    fn grant(&mut self, lease: Lease, fx: &mut Vec<Effect>) {
        let (id, expires_at_ms) = (lease.id, lease.expires_at_ms);
        self.leases.held.insert(id, lease.clone());
        fx.push(Effect::Event(Event::LeaseGranted { lease }));
        self.arm(
            expires_at_ms,
            Timer::LeaseExpiry {
                lease: id,
                expires_at_ms,
            },
            fx,
        );
    }

    /// Grants waiting leases in arrival order; a waiter that still conflicts
    /// blocks later conflicting waiters (no overtaking), not unrelated ones.
    fn grant_waiters(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let mut still: VecDeque<Lease> = VecDeque::new();
        while let Some(mut w) = self.leases.waiting.pop_front() {
            let blocked_by_earlier = still.iter().any(|e| e.conflicts(&w.path, w.mode));
            if !blocked_by_earlier && self.lease_blocker(&w.agent, &w.path, w.mode).is_none() {
                w.expires_at_ms = now + w.ttl_ms;
                self.grant(w, fx);
            } else {
                still.push_back(w);
            }
        }
        self.leases.waiting = still;
    }

    // ---- operators -------------------------------------------------------------

    fn on_control(&mut self, now: u64, request: RequestId, operator: &str, control: Control, fx: &mut Vec<Effect>) {
        let (ok, message) = match control {
            Control::Approve {
                lineage,
                version,
                plan_hash,
                material_hash,
                reason,
            } => self.approve(
                now,
                operator,
                &lineage,
                version,
                &plan_hash,
                &material_hash,
                reason.as_str(),
                fx,
            ),
            Control::Reject {
                lineage,
                version,
                reason,
            } => match self.plans.get(&lineage) {
                Some(p) if p.intent.version == version && matches!(p.status, Status::Pending { .. }) => {
                    self.remove_plan(&lineage);
                    fx.push(Effect::Event(Event::RejectedByOperator {
                        lineage: lineage.clone(),
                        version,
                        operator: operator.to_string(),
                        reason: reason.to_string(),
                    }));
                    (true, format!("{lineage} v{version} rejected"))
                }
                _ => (false, format!("{lineage} v{version} is not waiting for approval")),
            },
            Control::Halt { scope, grade, reason } => {
                self.halts.push(Halt {
                    scope: scope.clone(),
                    grade,
                    operator: operator.to_string(),
                    reason: reason.to_string(),
                });
                fx.push(Effect::Event(Event::Halted {
                    operator: operator.to_string(),
                    scope: scope.clone(),
                    grade,
                    reason: reason.to_string(),
                }));
                if grade == HaltGrade::Rollback {
                    let hit: Vec<Id> = self
                        .plans
                        .iter()
                        .filter(|(_, p)| matches!(p.status, Status::Running(_)) && covers(&scope, &p.agent, &p.touched))
                        .map(|(l, _)| l.clone())
                        .collect();
                    for l in hit {
                        self.roll_back(now, &l, format!("rollback halt by {operator}: {reason}"), fx);
                    }
                }
                (true, format!("halt ({grade:?}) in force").to_lowercase())
            }
            Control::Resume { scope, reason } => {
                let before = self.halts.len() + self.breakers.len();
                self.halts.retain(|h| h.scope != scope);
                self.breakers.retain(|b| {
                    !covers(
                        &scope,
                        &b.agent,
                        &std::iter::once(b.path.clone()).collect::<BTreeSet<_>>(),
                    )
                });
                let lifted = before - self.halts.len() - self.breakers.len();
                fx.push(Effect::Event(Event::Resumed {
                    operator: operator.to_string(),
                    scope,
                    reason: reason.to_string(),
                }));
                let running: Vec<Id> = self
                    .plans
                    .iter()
                    .filter(|(_, p)| matches!(p.status, Status::Running(_)))
                    .map(|(l, _)| l.clone())
                    .collect();
                for l in running {
                    self.advance(now, &l, fx);
                }
                (lifted > 0, format!("{lifted} halt(s) or breaker(s) lifted"))
            }
            Control::Cancel { lineage, reason } => match self.plans.get(&lineage).map(|p| &p.status) {
                Some(Status::Running(_)) => {
                    self.roll_back(now, &lineage, format!("cancelled by {operator}: {reason}"), fx);
                    (true, format!("{lineage} is being compensated"))
                }
                Some(_) => {
                    self.remove_plan(&lineage);
                    (true, format!("{lineage} withdrawn"))
                }
                None => (false, format!("no live plan {lineage}")),
            },
            Control::Saga {
                lineage,
                action,
                reason: _,
            } => self.saga_action(now, operator, &lineage, action, fx),
        };
        fx.push(Effect::Reply {
            request,
            reply: Reply::Control { ok, message },
        });
    }

    fn roll_back(&mut self, now: u64, lineage: &Id, why: String, fx: &mut Vec<Effect>) {
        // A verification in progress ends: the step is already in `completed`.
        if let Some(Plan {
            status: Status::Running(s),
            ..
        }) = self.plans.get_mut(lineage)
            && matches!(s.phase, Phase2::Verifying { .. })
        {
            s.phase = Phase2::Forward { next: usize::MAX };
        }
        self.compensate(now, lineage, why, true, fx);
    }

    #[allow(clippy::too_many_arguments)]
    fn approve(
        &mut self,
        now: u64,
        operator: &str,
        lineage: &Id,
        version: u32,
        plan_hash: &str,
        material: &str,
        reason: &str,
        fx: &mut Vec<Effect>,
    ) -> (bool, String) {
        let Some(p) = self.plans.get(lineage) else {
            return (false, format!("no plan {lineage} waits for approval"));
        };
        if !matches!(p.status, Status::Pending { .. }) || p.intent.version != version {
            return (false, format!("{lineage} v{version} is not waiting for approval"));
        }
        if p.hash != plan_hash {
            return (
                false,
                "the plan hash does not match the pending plan: approve what you saw".into(),
            );
        }
        if p.agent == operator {
            return (false, "the proposer cannot approve its own plan".into());
        }
        let mut approvers = match &p.status {
            Status::Pending { approvers, .. } => approvers.clone(),
            _ => Vec::new(),
        };
        if approvers.iter().any(|a| a == operator) {
            return (
                false,
                format!("{operator} already approved {lineage} v{version}; another operator must"),
            );
        }
        let required = self.policy.approvers_required(p.touched.iter());
        let (agent, intent, previous) = (p.agent.clone(), p.intent.clone(), p.previous.clone());
        let old_material = p.material_hash.clone();
        // Re-preview now: the world or the plans in flight may have moved.
        self.remove_plan(lineage);
        // The re-decision is logged like any other: its `decided` event
        // shows what the approval was checked against.
        let Some(d) = self.decide(now, &agent, intent.clone(), None, None, previous, fx) else {
            return (
                false,
                "the plan now conflicts with an in-flight plan and was queued".into(),
            );
        };
        if d.verdict == Verdict::Admit {
            // Nothing in the new preview needs a human any more: `decide` admitted it.
            return (
                true,
                format!("{lineage} v{version}: re-previewed at approval, it no longer needs a human and was admitted"),
            );
        }
        if d.material_hash != material || d.material_hash != old_material || d.verdict != Verdict::NeedsApproval {
            // `decide` put the plan back as pending (or rejected it); the human sees the new preview.
            fx.push(Effect::Event(Event::ApprovalStale {
                lineage: lineage.clone(),
                version,
                approved: material.to_string(),
                current: d.material_hash.clone(),
            }));
            return (
                false,
                format!(
                    "the preview changed since it was shown (verdict now {}); it goes back to the human",
                    d.verdict
                ),
            );
        }
        // Same material preview. Record the approval; admit once enough
        // distinct operators approved (the re-decision left it pending).
        approvers.push(operator.to_string());
        fx.push(Effect::Event(Event::Approved {
            lineage: lineage.clone(),
            version,
            operator: operator.to_string(),
            reason: reason.to_string(),
        }));
        if (approvers.len() as u32) < required {
            let n = approvers.len();
            if let Some(Plan {
                status: Status::Pending { approvers: a, .. },
                ..
            }) = self.plans.get_mut(lineage)
            {
                *a = approvers;
            }
            return (
                true,
                format!("{lineage} v{version}: {n} of {required} approvals; waiting for another operator"),
            );
        }
        self.start_saga(now, lineage, fx);
        (true, format!("{lineage} v{version} approved and admitted"))
    }

    fn saga_action(
        &mut self,
        now: u64,
        operator: &str,
        lineage: &Id,
        action: SagaAction,
        fx: &mut Vec<Effect>,
    ) -> (bool, String) {
        let Some(Plan {
            status: Status::Running(s),
            ..
        }) = self.plans.get_mut(lineage)
        else {
            return (false, format!("no running saga {lineage}"));
        };
        let Phase2::CompensationFailed { .. } = s.phase else {
            return (false, format!("saga {lineage} is not waiting on a failed compensation"));
        };
        match action {
            SagaAction::Retry => s.phase = Phase2::Compensating { by_rollback: true },
            SagaAction::Skip => {
                s.completed.pop();
                s.phase = Phase2::Compensating { by_rollback: true };
            }
            SagaAction::Resolve => s.completed.clear(),
        }
        if action == SagaAction::Resolve {
            s.phase = Phase2::Compensating { by_rollback: true };
        }
        fx.push(Effect::Event(Event::SagaDecided {
            lineage: lineage.clone(),
            action,
            operator: operator.to_string(),
        }));
        self.advance(now, lineage, fx);
        (true, format!("saga {lineage}: {action:?}").to_lowercase())
    }
}

fn failure_text(r: &StepResult) -> String {
    match r {
        StepResult::Succeeded => "succeeded".into(),
        StepResult::Failed { reason } => reason.to_string(),
        StepResult::Drift { actual } => format!(
            "drift: the world changed outside concord ({})",
            actual
                .iter()
                .map(|(p, v)| format!(
                    "{p} = {}",
                    v.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "absent".into())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        StepResult::StaleToken { seen } => format!("stale fencing token (executor has seen {seen})"),
    }
}

/// The step that restores what `changes` changed, for kinds concord can restore.
fn inverse(path: &ResourcePath, op: &Op, changes: &[PathChange]) -> Option<StepSpec> {
    if changes.is_empty() {
        return None;
    }
    let before = |name: &str| {
        changes
            .iter()
            .find(|c| c.path.name() == name)
            .and_then(|c| c.before.clone())
    };
    let op = match op {
        Op::Set(_) => match &changes[0].before {
            Some(v) => Op::Set(SetArgs { value: v.clone() }),
            None => Op::Delete(DeleteArgs {
                confirm: DeleteConfirm {
                    path: path.clone(),
                    reason: Short::parse("compensation: remove the path the step created").ok()?,
                },
            }),
        },
        Op::Deploy(_) => {
            let version = before("version")?;
            let artifact = before("artifact")?;
            Op::Deploy(DeployArgs {
                version: Short::parse(version.as_str()?).ok()?,
                artifact: Short::parse(artifact.as_str()?).ok()?,
            })
        }
        Op::Scale(_) => Op::Scale(ScaleArgs {
            replicas: u32::try_from(before("replicas")?.as_i64()?).ok()?,
        }),
        Op::Grant(g) => Op::Revoke(GrantArgs { ..g.clone() }),
        Op::Revoke(g) => Op::Grant(GrantArgs { ..g.clone() }),
        Op::Network(n) => Op::Network(NetworkArgs {
            change: match n.change {
                NetChange::Add => NetChange::Remove,
                NetChange::Remove => NetChange::Add,
            },
            ..n.clone()
        }),
        Op::Restart(_) | Op::Delete(_) | Op::Exec(_) => return None,
    };
    Some(StepSpec { path: path.clone(), op })
}

/// The policy travels as its configuration and is compiled again on load.
mod policy_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::policy::{Policy, PolicyConfig};

    pub fn serialize<S: Serializer>(p: &Policy, s: S) -> Result<S::Ok, S::Error> {
        p.config.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        let config = PolicyConfig::deserialize(d)?;
        Policy::compile(config).map_err(serde::de::Error::custom)
    }
}

/// Where re-fed effects first differ from the recorded events: the index in
/// the recorded list, what was recorded and what came out (`None`: missing).
#[derive(Clone, Debug, PartialEq)]
pub struct Divergence {
    /// Position in the recorded events.
    pub index: usize,
    /// The recorded event.
    pub recorded: Option<Event>,
    /// The event produced now.
    pub produced: Option<Event>,
}

/// Compares the events among `effects` with `recorded`, in order.
pub fn first_divergence(recorded: &[Event], effects: &[Effect]) -> Option<Divergence> {
    let produced: Vec<&Event> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(ev) => Some(ev),
            _ => None,
        })
        .collect();
    let n = recorded.len().max(produced.len());
    (0..n).find_map(|i| {
        let (r, p) = (recorded.get(i), produced.get(i).copied());
        (r != p).then(|| Divergence {
            index: i,
            recorded: r.cloned(),
            produced: p.cloned(),
        })
    })
}

/// Maps whose keys are not strings travel as lists of pairs (JSON object
/// keys are strings). Small enough not to need a helper crate.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(m: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod material_tests {
    use super::*;

    /// The material hash is what it was when it was hashed from a JSON
    /// value: an approval binds it, and logs hold it.
    #[test]
    fn the_material_hash_is_the_hash_of_the_material_as_a_json_value() {
        let world = World::from_toml_str(
            r#"
[resources]
"svc/api/pool_size" = 50
"svc/api/ratio" = 0.5
"svc/api/labels" = { tier = "gold", zone = "b" }
"#,
        )
        .unwrap();
        let intent = concord_proto::decode_intent(
            serde_json::json!({
                "protocol": 1, "lineage": "l", "version": 1, "goal": "g",
                "assumptions": [
                    { "path": "svc/api/pool_size", "op": "eq", "value": 50 },
                    { "path": "svc/api/ratio", "op": "gt", "value": 1.5 }
                ],
                "steps": [
                    { "id": "s1", "kind": "set", "path": "svc/api/pool_size", "args": { "value": 60 },
                      "confidence": 0.9, "compensation": { "mode": "restore" } },
                    { "id": "s2", "kind": "set", "path": "svc/api/ratio", "args": { "value": 0.75 },
                      "confidence": 0.9, "compensation": { "mode": "restore" } },
                    { "id": "s3", "kind": "set", "path": "svc/api/labels", "args": { "value": "none" },
                      "confidence": 0.9, "compensation": { "mode": "restore" } },
                    { "id": "s4", "kind": "set", "path": "svc/api/new", "args": { "value": true },
                      "confidence": 0.9, "compensation": { "mode": "restore" } }
                ]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let policy = Policy::from_toml_str("[defaults]\nautonomy = \"bounded\"\n").unwrap();
        let p = crate::preview::preview(PreviewInput {
            world: &world,
            intent: &intent,
            agent: "a",
            policy: &policy,
            previous: None,
        });
        assert!(
            !p.reasons.is_empty() && p.assumptions.len() == 2 && p.diff.len() == 4,
            "{p:#?}"
        );
        let conflict = |other: &str, kind: &str| Conflict {
            other: other.into(),
            version: 3,
            agent: "b\"q".into(),
            path: ResourcePath::parse("svc/api/pool_size").unwrap(),
            kind: kind.into(),
        };
        for conflicts in [
            vec![],
            vec![conflict("x", "writes_overlap"), conflict("lease:7", "reserved")],
        ] {
            let material = serde_json::json!({
                "verdict": p.verdict,
                "failing": p.reasons.iter().map(|r| &r.rule).collect::<Vec<_>>(),
                "conflicts": conflicts,
                "assumptions": p.assumptions.iter().map(|a| (&a.path, a.held)).collect::<Vec<_>>(),
                "before": p.diff.iter().map(|c| (&c.path, &c.before)).collect::<Vec<_>>(),
            });
            let as_value = blake3::hash(material.to_string().as_bytes()).to_hex().to_string();
            assert_eq!(material_hash(&p, &conflicts), as_value, "{material}");
        }
    }
}
