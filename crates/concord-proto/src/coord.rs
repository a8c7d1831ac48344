//! The coordinator's other messages: leases, step dispatch and outcomes,
//! operator controls, and the decision replies.
//!
//! Requests are strict (unknown fields rejected); replies and events carry
//! what a reader needs and readers ignore fields they do not know.

use serde::{Deserialize, Serialize};

use crate::intent::{Op, StepKind};
use crate::path::{Id, ResourcePath, Short};
use crate::preview::{Preview, Reason, Verdict};
use crate::value::Value;

/// Exclusive or shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseMode {
    /// One holder; conflicts with every other lease on an overlapping path.
    Exclusive,
    /// Many holders; conflicts only with exclusive leases on overlapping paths.
    Shared,
}

/// What an agent asks of the lease service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LeaseRequest {
    /// Reserve a path (and everything under it).
    Acquire {
        /// The path.
        path: ResourcePath,
        /// Exclusive or shared.
        mode: LeaseMode,
        /// Time to live, in milliseconds.
        ttl_ms: u64,
        /// Wait in the queue if the path is taken (otherwise: refused at once).
        #[serde(default)]
        wait: bool,
    },
    /// Extend a held lease.
    Renew {
        /// The lease id.
        lease: u64,
        /// New time to live from now, in milliseconds.
        ttl_ms: u64,
    },
    /// Give a lease back.
    Release {
        /// The lease id.
        lease: u64,
    },
}

/// The lease service's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum LeaseReply {
    /// Held until `expires_at_ms` (coordinator time).
    Granted {
        /// The lease id.
        lease: u64,
        /// The path.
        path: ResourcePath,
        /// The mode.
        mode: LeaseMode,
        /// When it lapses unless renewed.
        expires_at_ms: u64,
    },
    /// Waiting behind others; a grant follows as a `lease_granted` event.
    Queued {
        /// The lease id it will have.
        lease: u64,
        /// Place in the queue, from 1.
        position: u32,
    },
    /// Released.
    Released {
        /// The lease id.
        lease: u64,
    },
    /// Refused.
    Refused {
        /// Why, for programs: `conflict`, `not_holder`, `unknown_lease`, `queue_full`, `halted`, `ttl_range`.
        code: String,
        /// For people.
        message: String,
        /// Who holds the conflicting lease, if that is the reason.
        holder: Option<String>,
    },
}

/// Identifies one dispatch: (plan lineage, version, step), plus whether it is
/// the step or its compensation. A retry after an unknown outcome reuses it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DispatchKey {
    /// Plan lineage.
    pub lineage: Id,
    /// Plan version.
    pub version: u32,
    /// Step id.
    pub step: Id,
    /// `do` or `undo`.
    pub phase: Phase,
    /// 1 for the first attempt; a new attempt only after a definite failure.
    pub attempt: u32,
}

impl DispatchKey {
    /// The key as one string, e.g. `deploy-api/2/s1/do/1`.
    pub fn text(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.lineage,
            self.version,
            self.step,
            match self.phase {
                Phase::Do => "do",
                Phase::Undo => "undo",
            },
            self.attempt
        )
    }
}

/// A step or its compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step itself.
    Do,
    /// Its compensation.
    Undo,
}

/// A step sent to an executor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepDispatch {
    /// Idempotency key: executors dedupe on it.
    pub key: DispatchKey,
    /// The path the step acts on.
    pub path: ResourcePath,
    /// The step kind.
    pub kind: StepKind,
    /// Its arguments, shaped as in an intent's step.
    pub args: serde_json::Value,
    /// Fencing token for `path`: refuse it if a higher one was seen.
    pub fencing_token: u64,
    /// The values the coordinator expects before the step (compare-and-set);
    /// a different actual value is drift and fails the step.
    pub expected_before: Vec<(ResourcePath, Option<Value>)>,
    /// How long the executor may take.
    pub timeout_ms: u64,
}

impl StepDispatch {
    /// The kind and arguments as one [`Op`].
    pub fn op(&self) -> Result<Op, crate::DecodeError> {
        Op::from_kind_args(self.kind, self.args.clone())
    }
}

/// What the executor reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepOutcome {
    /// The dispatch it answers.
    pub key: DispatchKey,
    /// The result.
    pub result: StepResult,
}

/// An executor's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum StepResult {
    /// Applied.
    Succeeded,
    /// Not applied (or applied and undone by the executor).
    Failed {
        /// Why.
        reason: Short,
    },
    /// The world held other values than expected: nothing was applied.
    Drift {
        /// What the executor found.
        actual: Vec<(ResourcePath, Option<Value>)>,
    },
    /// The fencing token was stale: nothing was applied.
    StaleToken {
        /// The highest token the executor has seen for the path.
        seen: u64,
    },
}

/// Which plans, agents or paths a halt covers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "scope", content = "name", rename_all = "snake_case")]
pub enum HaltScope {
    /// Everything.
    All,
    /// One agent's plans.
    Agent(String),
    /// Plans touching this path or anything under it.
    Path(ResourcePath),
}

/// How hard a halt stops things.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HaltGrade {
    /// Nothing in scope is admitted and no step in scope is dispatched (compensations too).
    Freeze,
    /// Nothing new is admitted; running sagas finish.
    Drain,
    /// In-flight sagas in scope are compensated (even under a freeze).
    Rollback,
}

/// An operator's command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Approve a plan waiting for a human: binds the plan's content hash and
    /// the hash of the material preview the human saw.
    Approve {
        /// Plan lineage.
        lineage: Id,
        /// Plan version.
        version: u32,
        /// The plan's content hash.
        plan_hash: String,
        /// The material preview's hash, as shown with the pending plan.
        material_hash: String,
        /// Why.
        reason: Short,
    },
    /// Reject a plan waiting for a human.
    Reject {
        /// Plan lineage.
        lineage: Id,
        /// Plan version.
        version: u32,
        /// Why.
        reason: Short,
    },
    /// Stop admission and dispatch in a scope.
    Halt {
        /// Where.
        scope: HaltScope,
        /// How hard.
        grade: HaltGrade,
        /// Why.
        reason: Short,
    },
    /// Lift the halts of a scope.
    Resume {
        /// Where.
        scope: HaltScope,
        /// Why.
        reason: Short,
    },
    /// Cancel a running plan: its completed steps are compensated.
    Cancel {
        /// Plan lineage.
        lineage: Id,
        /// Why.
        reason: Short,
    },
    /// Decide a saga whose compensation failed.
    Saga {
        /// Plan lineage.
        lineage: Id,
        /// `retry` the failed compensation, `skip` it, or `resolve` (fixed by hand: end the saga).
        action: SagaAction,
        /// Why.
        reason: Short,
    },
}

/// What an operator does with a saga whose compensation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SagaAction {
    /// Dispatch the failed compensation again (a new attempt).
    Retry,
    /// Leave that step as it is and go on compensating the rest.
    Skip,
    /// The operator fixed the world by hand: end the saga and free its leases.
    Resolve,
}

/// The answer to an intent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// The failing rules behind the verdict, most severe first (as in the preview).
    pub reasons: Vec<Reason>,
    /// Conflicts with other agents' in-flight plans.
    pub conflicts: Vec<Conflict>,
    /// The plan's content hash (what an approval binds).
    pub plan_hash: String,
    /// The hash of the material preview (what an approval binds besides the plan hash).
    pub material_hash: String,
    /// `queued` when the plan asked to wait for a conflicting plan to end.
    pub queued: bool,
    /// True when this answers a retry with the original decision (same
    /// idempotency key, or the same plan again): nothing was decided anew.
    #[serde(default)]
    pub duplicate: bool,
    /// The full preview. Only the first answer carries it: a retry's answer
    /// and a decision restored from the log do not (`concord show` recomputes one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<Box<Preview>>,
}

impl Decision {
    /// The decision without its preview: what the idempotency table keeps.
    pub fn compact(&self) -> Decision {
        // Field by field: cloning the whole decision would copy the preview
        // only to drop it.
        Decision {
            verdict: self.verdict,
            reasons: self.reasons.clone(),
            conflicts: self.conflicts.clone(),
            plan_hash: self.plan_hash.clone(),
            material_hash: self.material_hash.clone(),
            queued: self.queued,
            duplicate: self.duplicate,
            preview: None,
        }
    }
}

/// A conflict with another agent's in-flight plan or lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Conflict {
    /// The other plan's lineage (or `lease:<id>` for an agent's reservation).
    pub other: String,
    /// The other plan's version (0 for a lease).
    pub version: u32,
    /// Its agent.
    pub agent: String,
    /// The overlapping or affected path.
    pub path: ResourcePath,
    /// `writes_overlap`, `assumption_broken` or `reserved`.
    pub kind: String,
}

/// What a notice reports about one of the agent's plans or leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// An operator approved a plan that waited for a human.
    Approved,
    /// An operator rejected it.
    RejectedByOperator,
    /// Nobody decided in time.
    ApprovalExpired,
    /// The approval bound a material preview that has changed: back to the human.
    ApprovalStale,
    /// A newer version of the lineage replaced this one while it waited.
    Withdrawn,
    /// The plan became a saga.
    Admitted,
    /// The saga started compensating.
    Compensating,
    /// The saga ended: every step succeeded.
    Completed,
    /// The saga ended: its completed steps were compensated.
    Compensated,
    /// A compensation failed; an operator decides.
    CompensationFailed,
    /// A lease lapsed: its holder no longer holds it.
    LeaseExpired,
}

/// A push notice to the agent a plan or lease belongs to, published on
/// `notify.<agent>` after the event behind it is in the log, so an agent
/// awaits a human's decision or sees a lease lapse without polling.
/// A notice is a hint that wakes the agent, not the record: the log is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Notice {
    /// What happened.
    pub event: NoticeKind,
    /// The plan's lineage (plan events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Id>,
    /// The plan's version (plan events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The lease (lease events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
    /// The operator who decided, for approvals and rejections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Why, where the event says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Notice {
    /// A notice about plan `lineage` version `version`.
    pub fn plan(event: NoticeKind, lineage: Id, version: u32) -> Notice {
        Notice {
            event,
            lineage: Some(lineage),
            version: Some(version),
            lease: None,
            operator: None,
            reason: None,
        }
    }
}
