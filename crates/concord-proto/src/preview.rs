//! Previews and verdicts: what the coordinator computes for a plan.
//!
//! These are replies and log contents, so they carry a version and readers
//! ignore fields they do not know (no `deny_unknown_fields` here).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::intent::{CmpOp, StepKind};
use crate::path::{Id, ResourcePath};
use crate::value::Value;

/// Version of the preview document's shape.
pub const PREVIEW_VERSION: u32 = 1;

/// The coordinator's answer to a plan. Ordered: `admit < needs_approval < reject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Run it.
    Admit,
    /// A human decides.
    NeedsApproval,
    /// Refused, with reasons.
    Reject,
}

impl Verdict {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Admit => "admit",
            Verdict::NeedsApproval => "needs_approval",
            Verdict::Reject => "reject",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The full preview of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Preview {
    /// Shape version of this document ([`PREVIEW_VERSION`]).
    pub preview_version: u32,
    /// Version of the core that decided.
    pub core_version: String,
    /// BLAKE3 of the canonical policy the decision used.
    pub policy_hash: String,
    /// Which plan.
    pub plan: PlanRef,
    /// The verdict.
    pub verdict: Verdict,
    /// The failing rules that produced the verdict, most severe first.
    pub reasons: Vec<Reason>,
    /// Every path the plan changes, with before and after.
    pub diff: Vec<Change>,
    /// Steps that act on a path without changing its value in the model (restart, exec).
    pub actions: Vec<Action>,
    /// Services affected through the paths the plan touches.
    pub blast_radius: Vec<Affected>,
    /// What would be undone, in which order, if the last step failed.
    pub compensation: Vec<CompensationEntry>,
    /// Every rule's result.
    pub invariants: Vec<RuleResult>,
    /// The plan's assumptions, checked against the current world.
    pub assumptions: Vec<AssumptionResult>,
    /// What the agent said it is unsure of.
    pub unknowns: Vec<String>,
    /// Each step with the agent's confidence.
    pub steps: Vec<StepSummary>,
    /// Changes against the previous version of the plan, if there was one.
    pub plan_diff: Option<PlanDiff>,
    /// Risk, with the factors behind it.
    pub risk: Risk,
}

/// Identifies the plan a preview is for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlanRef {
    /// The agent that proposed it (from its credentials and subject, never the payload).
    pub agent: String,
    /// Lineage id.
    pub lineage: Id,
    /// Version within the lineage.
    pub version: u32,
    /// Content hash: what an approval binds to.
    pub hash: String,
    /// The agent's stated goal.
    pub goal: String,
}

/// One failing rule behind a verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Reason {
    /// Rule id, e.g. `ceiling.pool_size`.
    pub rule: String,
    /// What its failure leads to.
    pub outcome: Verdict,
    /// One line for people.
    pub message: String,
}

/// One path's change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Change {
    /// The path.
    pub path: ResourcePath,
    /// Value before (absent: the path is created).
    pub before: Option<Value>,
    /// Value after (absent: the path is deleted).
    pub after: Option<Value>,
    /// The step that last changed it.
    pub step: Id,
}

/// A step that acts without changing a modelled value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Action {
    /// The step.
    pub step: Id,
    /// Its kind.
    pub kind: StepKind,
    /// Its path.
    pub path: ResourcePath,
    /// What it does, for people.
    pub note: String,
}

/// A service in the blast radius.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Affected {
    /// Service name.
    pub service: String,
    /// The touched path that reaches it.
    pub via: ResourcePath,
    /// `owns` (the path is under the service), `depends_on` (a declared
    /// dependency covers the path), or `shares_dependency` (the service
    /// depends on what the owner of the path depends on).
    // Borrowed when concord writes it (one of three words), owned when read.
    pub relation: std::borrow::Cow<'static, str>,
    /// For `shares_dependency`: the shared dependency.
    pub through: Option<ResourcePath>,
}

/// One entry of the compensation plan, in execution order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompensationEntry {
    /// The step being undone.
    pub step: Id,
    /// `restore`, `undo` or `irreversible`.
    pub mode: String,
    /// What undoing it changes.
    pub changes: Vec<Change>,
    /// For irreversible steps, the agent's reason.
    pub note: Option<String>,
}

/// A rule's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleStatus {
    /// Held in every state the plan and its compensation pass through.
    Pass,
    /// Broken in at least one state.
    Fail,
    /// Evaluation failed; counted as a failure (rules fail closed).
    Error,
    /// Not affected by this plan (reads no path it touches).
    Skipped,
}

/// One rule's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RuleResult {
    /// Rule id.
    pub id: String,
    /// Status.
    pub status: RuleStatus,
    /// What a failure leads to (as configured; capped at `needs_approval` for a pre-existing failure).
    pub outcome: Verdict,
    /// The state where it first failed, e.g. `after step s2` or
    /// `after undoing step s1 (rollback after step s2)`; absent for rules
    /// about the plan as a whole.
    pub at: Option<String>,
    /// The rule already failed before the plan: the outcome is capped at `needs_approval`.
    pub pre_existing: bool,
    /// The figures behind the result.
    pub figures: BTreeMap<String, Value>,
    /// One line for people.
    pub message: String,
}

/// An assumption checked against the world.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssumptionResult {
    /// The path.
    pub path: ResourcePath,
    /// The operator.
    pub op: CmpOp,
    /// The value the agent expected.
    pub expected: Option<Value>,
    /// The value the world holds.
    pub actual: Option<Value>,
    /// Whether it held.
    pub held: bool,
}

/// A step as previewed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepSummary {
    /// Step id.
    pub id: Id,
    /// Kind.
    pub kind: StepKind,
    /// Path.
    pub path: ResourcePath,
    /// The agent's confidence.
    pub confidence: f64,
    /// `restore`, `undo` or `irreversible`.
    pub compensation: String,
}

/// The difference between two versions of a plan lineage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlanDiff {
    /// The earlier plan's lineage (another lineage when concord recognised a
    /// re-plan by agent and paths).
    pub previous_lineage: Id,
    /// The earlier version.
    pub previous_version: u32,
    /// Its content hash.
    pub previous_hash: String,
    /// Step ids only in the new version.
    pub added: Vec<Id>,
    /// Step ids only in the earlier version.
    pub removed: Vec<Id>,
    /// Step ids in both whose content differs, with the differing fields.
    pub changed: Vec<StepChange>,
    /// What the new version may do that the earlier could not.
    pub scope_expansion: Vec<Expansion>,
}

/// A step present in both versions that differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepChange {
    /// Step id.
    pub step: Id,
    /// Top-level fields that differ (`kind`, `path`, `args`, ...).
    pub fields: Vec<String>,
}

/// One way a later version widens the earlier one's scope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Expansion {
    /// `new_path`, `new_kind`, `destructive`, `raised_value` or `new_grant`.
    pub kind: String,
    /// The step that widens it.
    pub step: Id,
    /// For people.
    pub detail: String,
}

/// Risk of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Risk {
    /// `low`, `medium` or `high`.
    pub level: String,
    /// What raised it.
    pub factors: Vec<String>,
}
