//! The preview: what a plan would change, every rule's result, and the verdict.
//!
//! Rules are evaluated in every state the plan can leave the world in: after
//! each step prefix, and after each prefix of the compensation that would run
//! if the plan failed there. A plan that raises replicas before it lowers the
//! pool breaks a connection budget in between, and that is caught.
//!
//! Cost grows with the paths the plan touches and the paths rules declare
//! they read, never with the size of the world: states are change sets over
//! the base world, and rules read the base through prefix range scans.

use std::collections::{BTreeMap, BTreeSet};

use cel::common::types::{CelDouble, CelInt, CelList, CelNull};
use cel::{Context, Value as CelValue};
use concord_proto::preview::*;
use concord_proto::{Compensation, Intent, Op, PreflightResult, ResourcePath, StepKind, Value};

use crate::apply::{PathChange, apply_op, restore};
use crate::celx;
use crate::plandiff::plan_diff;
use crate::policy::{CelRule, Outcome, Policy};
use crate::rules;
use crate::world::{Base, Keyed, Memo, Overlay, State, World};

/// Most world paths one CEL rule's `reads` may reach (scanned by prefix):
/// the rule's evaluation budget.
pub const CEL_SCAN_PATHS_MAX: usize = 10_000;

/// The core's version, recorded in every preview.
pub const CORE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything a preview is computed from.
#[derive(Clone, Copy, Debug)]
pub struct PreviewInput<'a> {
    /// The world before the plan (assumptions are checked against it).
    pub world: &'a World,
    /// The plan.
    pub intent: &'a Intent,
    /// The proposing agent (from its credentials, never the payload).
    pub agent: &'a str,
    /// The policy.
    pub policy: &'a Policy,
    /// An earlier version of the plan, for the plan diff and scope expansion.
    pub previous: Option<&'a Intent>,
}

/// One state the world may pass through.
#[derive(Clone, Debug)]
pub(crate) struct EvalState {
    pub label: StateLabel,
    pub changes: BTreeMap<ResourcePath, Option<Value>>,
}

/// A state's name in reports (`after step s2`), written only when a rule
/// reports the state.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StateLabel {
    /// After the plan's step `0` (and the steps before it).
    AfterStep(concord_proto::Id),
    /// After undoing `step`, in the rollback after step `after`.
    Undoing {
        step: concord_proto::Id,
        after: concord_proto::Id,
    },
}

impl std::fmt::Display for StateLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateLabel::AfterStep(id) => write!(f, "after step {id}"),
            StateLabel::Undoing { step, after } => {
                write!(f, "after undoing step {step} (rollback after step {after})")
            }
        }
    }
}

/// The simulated run of a plan and of its compensations.
pub(crate) struct Run<'w> {
    /// What the plan is previewed against (the current or the projected world).
    pub base: Base<'w>,
    /// Distinct states, forward ones first, in the order they can occur.
    pub states: Vec<EvalState>,
    /// Per step: what it changed when applied in order.
    pub step_changes: Vec<Vec<PathChange>>,
    /// Compensations that would run after the whole plan, in order.
    pub compensation: Vec<CompensationEntry>,
    /// Steps or compensations that cannot be applied.
    pub apply_errors: Vec<String>,
    /// Every path any state changes.
    pub touched: BTreeSet<ResourcePath>,
    /// The final state's changes.
    pub final_changes: BTreeMap<ResourcePath, Option<Value>>,
}

fn to_changes(changes: &[PathChange], step: &concord_proto::Id) -> Vec<Change> {
    changes
        .iter()
        .map(|c| Change {
            path: c.path.clone(),
            before: c.before.clone(),
            after: c.after.clone(),
            step: step.clone(),
        })
        .collect()
}

impl<'w> Run<'w> {
    /// Every change of a state to a path matching `globs`, as (state, path,
    /// value after), states in order: the globs are matched once per touched
    /// path, not once per state that changes it.
    pub(crate) fn changes_matching(
        &self,
        globs: &crate::policy::Globs,
    ) -> impl Iterator<Item = (&EvalState, &ResourcePath, &Option<Value>)> {
        let hits: Vec<&ResourcePath> = self.touched.iter().filter(|p| globs.matches(p.as_str())).collect();
        // No state changes a matching path when no touched path matches.
        let states = if hits.is_empty() {
            &self.states[..0]
        } else {
            &self.states[..]
        };
        states
            .iter()
            .flat_map(|s| s.changes.iter().map(move |(p, v)| (s, p, v)))
            .filter(move |(_, p, _)| hits.contains(p))
    }

    pub(crate) fn simulate(base: Base<'w>, intent: &Intent) -> Run<'w> {
        let n = intent.steps.len();
        let mut apply_errors = Vec::new();
        let mut step_changes = Vec::with_capacity(n);
        let mut states: Vec<EvalState> = Vec::new();
        // A state is kept only if it is new; its label is written only then
        // (most compensation states repeat forward ones). Returns its index.
        let find_or_push = |states: &mut Vec<EvalState>, changes: &Overlay, label: &dyn Fn() -> StateLabel| {
            states.iter().position(|e| &e.changes == changes).unwrap_or_else(|| {
                states.push(EvalState {
                    label: label(),
                    changes: changes.clone(),
                });
                states.len() - 1
            })
        };
        // Per forward state (after 0..=n steps): the index of the equal state
        // in `states` (none yet for the unchanged world).
        let mut forward_at: Vec<Option<usize>> = Vec::with_capacity(n + 1);
        forward_at.push(None);
        let mut failed: Vec<usize> = Vec::new();
        let mut s = State::on(base);
        for step in &intent.steps {
            match apply_op(&mut s, &step.path, &step.op) {
                Ok(ch) => step_changes.push(ch),
                Err(e) => {
                    apply_errors.push(format!("step {}: {e}", step.id));
                    step_changes.push(Vec::new());
                    // A step can fail after some of its writes: its changes
                    // are not all known, so its restore proves nothing.
                    failed.push(step_changes.len() - 1);
                }
            }
            let at = find_or_push(&mut states, s.changes(), &|| StateLabel::AfterStep(step.id.clone()));
            forward_at.push(Some(at));
        }
        let final_changes = s.changes().clone();
        drop(s);
        let empty = Overlay::new();
        let forward = |k: usize, states: &[EvalState]| -> Overlay {
            forward_at[k].map(|i| states[i].changes.clone()).unwrap_or_default()
        };
        // A failure can come after any step (a failed verification leaves the
        // step applied), so undo steps f..1 from each forward state f.
        //
        // Restoring step j in the state the forward run reached after step
        // j+1 gives back the forward state after step j: every path the step
        // changed returns to its value before it, and no other path differs
        // between the two. While compensation stays on that track, the state
        // is known without building it, and is already among the states
        // (the unchanged world excepted).
        let mut compensation = Vec::new();
        for f in 1..=n {
            // `Some(k)`: the state equals the forward state after k steps.
            let mut track: Option<usize> = Some(f);
            let mut cur: Option<State<'w>> = None;
            for j in (0..f).rev() {
                let step = &intent.steps[j];
                let (mode, changes, note) = match &step.compensation {
                    Compensation::Restore if track == Some(j + 1) && !failed.contains(&j) => {
                        // The changes are only reported for the rollback after the last step.
                        let changes = if f == n {
                            let at = forward_at[j + 1].map(|i| &states[i].changes).unwrap_or(&empty);
                            let now = |p: &ResourcePath| match at.get(p) {
                                Some(v) => v.as_ref(),
                                None => base.get(p),
                            };
                            step_changes[j]
                                .iter()
                                .rev()
                                .filter_map(|c: &PathChange| {
                                    let now = now(&c.path);
                                    (now != c.before.as_ref()).then(|| PathChange {
                                        path: c.path.clone(),
                                        before: now.cloned(),
                                        after: c.before.clone(),
                                    })
                                })
                                .collect()
                        } else {
                            Vec::new()
                        };
                        track = Some(j);
                        ("restore", changes, None)
                    }
                    Compensation::Restore => {
                        let s = materialize(&mut cur, track.take(), base, &|k| forward(k, &states));
                        ("restore", restore(s, &step_changes[j]), None)
                    }
                    Compensation::Undo(u) => {
                        let s = materialize(&mut cur, track.take(), base, &|k| forward(k, &states));
                        match apply_op(s, &u.path, &u.op) {
                            Ok(ch) => ("undo", ch, None),
                            Err(e) => {
                                let msg = format!("compensation of step {}: {e}", step.id);
                                if !apply_errors.contains(&msg) {
                                    apply_errors.push(msg);
                                }
                                ("undo", Vec::new(), None)
                            }
                        }
                    }
                    Compensation::Irreversible { reason } => ("irreversible", Vec::new(), Some(reason.to_string())),
                };
                if f == n {
                    compensation.push(CompensationEntry {
                        step: step.id.clone(),
                        mode: mode.to_string(),
                        changes: to_changes(&changes, &step.id),
                        note,
                    });
                }
                let label = || StateLabel::Undoing {
                    step: step.id.clone(),
                    after: intent.steps[f - 1].id.clone(),
                };
                match (track, &cur) {
                    // A forward state after at least one step is already kept.
                    (Some(k), _) if k > 0 => {}
                    (Some(_), _) => {
                        find_or_push(&mut states, &empty, &label);
                    }
                    (None, Some(s)) => {
                        find_or_push(&mut states, s.changes(), &label);
                    }
                    (None, None) => {}
                }
            }
        }
        let touched = states.iter().flat_map(|s| s.changes.keys().cloned()).collect();
        Run {
            base,
            states,
            step_changes,
            compensation,
            apply_errors,
            touched,
            final_changes,
        }
    }
}

/// The compensation state as a [`State`] to apply to: built from the forward
/// state after `track` steps if it is still only known as that.
fn materialize<'s, 'w>(
    cur: &'s mut Option<State<'w>>,
    track: Option<usize>,
    base: Base<'w>,
    forward: &dyn Fn(usize) -> Overlay,
) -> &'s mut State<'w> {
    if let Some(k) = track {
        *cur = Some(State::with_changes(base, forward(k)));
    }
    cur.get_or_insert_with(|| State::on(base))
}

/// Computes the preview of a plan against the world as it is.
pub fn preview(input: PreviewInput<'_>) -> Preview {
    preview_on(input, Base::current(input.world))
}

/// Computes the preview of a plan against `base` (e.g. the projected world:
/// the current world plus in-flight plans' effects). Assumptions are still
/// checked against `input.world`, the world as it is.
pub fn preview_on(input: PreviewInput<'_>, base: Base<'_>) -> Preview {
    let memo = Memo::default();
    let mut run = Run::simulate(base.with_memo(&memo), input.intent);
    let diff = input.previous.map(|p| plan_diff(p, input.intent));
    preview_of_run(input, &mut run, None, diff)
}

/// The preview of a plan whose run is already simulated (the coordinator
/// simulates it once for the preview, conflicts and compounding), with its
/// content hash if already known, and the plan diff against
/// `input.previous` (none without one). Takes the run's compensation entries.
pub(crate) fn preview_of_run(
    input: PreviewInput<'_>,
    run: &mut Run<'_>,
    hash: Option<String>,
    plan_diff: Option<PlanDiff>,
) -> Preview {
    let PreviewInput {
        world,
        intent,
        agent,
        policy,
        previous: _,
    } = input;
    let base = run.base;

    let diff: Vec<Change> = run
        .final_changes
        .iter()
        .map(|(path, after)| Change {
            path: path.clone(),
            before: base.get(path).cloned(),
            after: after.clone(),
            // The last step that changed the path.
            step: intent
                .steps
                .iter()
                .zip(&run.step_changes)
                .rev()
                .find(|(_, ch)| ch.iter().any(|c| &c.path == path))
                .map_or_else(|| intent.steps[0].id.clone(), |(s, _)| s.id.clone()),
        })
        .collect();
    let actions: Vec<Action> = intent
        .steps
        .iter()
        .filter_map(|s| {
            let note = match &s.op {
                Op::Restart(_) => "restarts the service; no modelled value changes".to_string(),
                Op::Exec(a) => format!(
                    "runs `{}` with {} argument(s); its effects are opaque to concord",
                    a.program,
                    a.args.len()
                ),
                _ => return None,
            };
            Some(Action {
                step: s.id.clone(),
                kind: s.kind(),
                path: s.path.clone(),
                note,
            })
        })
        .collect();

    let mut touched_all: Vec<&ResourcePath> = run.touched.iter().chain(actions.iter().map(|a| &a.path)).collect();
    touched_all.sort_unstable();
    touched_all.dedup();
    let blast_radius = blast_radius(world, &touched_all);

    let Judged {
        plan_diff,
        invariants,
        assumptions,
        reasons,
    } = judge(input, run, plan_diff, None);
    let verdict = reasons.first().map(|r| r.outcome).unwrap_or(Verdict::Admit);

    let steps = intent
        .steps
        .iter()
        .map(|s| StepSummary {
            id: s.id.clone(),
            kind: s.kind(),
            path: s.path.clone(),
            confidence: s.confidence,
            compensation: match s.compensation {
                Compensation::Restore => "restore",
                Compensation::Undo(_) => "undo",
                Compensation::Irreversible { .. } => "irreversible",
            }
            .to_string(),
        })
        .collect::<Vec<_>>();
    let risk = risk(intent, &blast_radius, &reasons);
    let compensation = std::mem::take(&mut run.compensation);

    Preview {
        preview_version: PREVIEW_VERSION,
        core_version: CORE_VERSION.to_string(),
        policy_hash: policy.hash.clone(),
        plan: PlanRef {
            agent: agent.to_string(),
            lineage: intent.lineage.clone(),
            version: intent.version,
            hash: hash.unwrap_or_else(|| intent.content_hash()),
            goal: intent.goal.to_string(),
        },
        verdict,
        reasons,
        diff,
        actions,
        blast_radius,
        compensation,
        invariants,
        assumptions,
        unknowns: intent.unknowns.iter().map(|u| u.to_string()).collect(),
        steps,
        plan_diff,
        risk,
    }
}

/// What the rules make of a simulated run.
pub(crate) struct Judged {
    /// The plan diff against the earlier version, if one was given.
    pub plan_diff: Option<PlanDiff>,
    /// Every rule's result, in policy order.
    pub invariants: Vec<RuleResult>,
    /// Each assumption, held or broken.
    pub assumptions: Vec<AssumptionResult>,
    /// The failed rules' reasons, strictest first.
    pub reasons: Vec<Reason>,
}

/// The coordinator's second look at a plan: the same rules on the world as
/// it is, when the projected preview read something the plans in flight
/// change. A rule whose inputs are the same in both worlds gives the result
/// it gave on the projected one, so it is not evaluated again.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SecondLook<'o> {
    /// What the plans in flight change: the projected world is the world
    /// with it applied.
    pub overlay: &'o Overlay,
    /// Whether `overlay` changes no path the plan touches, nor an ancestor
    /// or descendant of one: the simulated states, and every value the
    /// built-in rules read, are then the same in both worlds.
    pub states_same: bool,
}

impl<'o> SecondLook<'o> {
    /// The second look of a plan touching `touched` (the paths it writes and
    /// its steps' paths) with `overlay` in flight: the states are the same in
    /// both worlds unless the overlay changes one of those paths, or one
    /// above or below it.
    pub(crate) fn new(overlay: Keyed<'o, Option<Value>>, touched: &BTreeSet<ResourcePath>) -> Self {
        let states_same = touched.iter().all(|t| crate::world::overlapping(overlay, t).is_empty());
        SecondLook {
            overlay: overlay.map,
            states_same,
        }
    }

    /// Whether a budget rule's inputs are the same in both worlds.
    fn keeps_budget(&self, budget: &crate::budget::Budget) -> bool {
        self.states_same && !budget.reads_any(self.overlay)
    }

    /// Whether a CEL rule's bindings are the same in both worlds: the paths
    /// it reads are unchanged by the overlay, and the states are the same or
    /// it reads no path at all.
    fn keeps_cel(&self, rule: &CelRule) -> bool {
        (self.states_same || rule.reads.patterns.is_empty()) && !rule.reads.any_key(self.overlay)
    }
}

/// Evaluates every rule over a simulated run: the part of a preview the
/// verdict comes from. The coordinator's second look (the world as it is,
/// when plans are in flight) needs only this, not the diff, blast radius,
/// risk and texts around it; it passes `second`, and the result then holds
/// only the rules that may differ (and no assumptions: they are checked
/// against the world as it is in both). `plan_diff` is the plan diff against
/// `input.previous` (computed once by the caller, who may know its hash).
pub(crate) fn judge(
    input: PreviewInput<'_>,
    run: &Run<'_>,
    plan_diff: Option<PlanDiff>,
    second: Option<SecondLook<'_>>,
) -> Judged {
    let PreviewInput {
        world,
        intent,
        agent,
        policy,
        previous: _,
    } = input;
    let states_same = second.is_some_and(|s| s.states_same);
    let mut invariants = Vec::new();
    if !states_same {
        invariants = rules::builtin(run, intent, agent, policy, plan_diff.as_ref());
        invariants.extend(rules::ceilings(run, policy));
        invariants.extend(rules::rates(run, intent, policy));
    }
    let mut assumptions = Vec::new();
    if second.is_none() {
        let (held, assumption_rule) = rules::assumptions(world, intent, policy);
        assumptions = held;
        invariants.push(assumption_rule);
    }
    invariants.extend(
        policy
            .budgets
            .iter()
            .enumerate()
            .filter(|(_, b)| !second.is_some_and(|s| s.keeps_budget(b)))
            .map(|(i, b)| b.evaluate(run, i)),
    );
    // The CEL rules to evaluate: on a second look, those whose bindings may
    // differ (the paths they read changed by the overlay, or the states
    // differing while they read some path).
    let cel: Vec<(usize, &CelRule)> = policy
        .cel
        .iter()
        .enumerate()
        .filter(|(_, rule)| !second.is_some_and(|s| s.keeps_cel(rule)))
        .collect();
    if !cel.is_empty() {
        // Built once, and only when some rule reads them; rules borrow them.
        let reads_plan = cel.iter().any(|(_, r)| r.vars.plan);
        // Each step's `args`, converted only if a rule reads them.
        let args: Vec<StepArgs> = if reads_plan {
            intent.steps.iter().map(|_| StepArgs::new()).collect()
        } else {
            Vec::new()
        };
        let plan_val = reads_plan.then(|| plan_val(intent, &args));
        let autonomy = policy.agent(agent).autonomy.name();
        let agent_val = cel.iter().any(|(_, r)| r.vars.agent).then(|| {
            celx::record_val(vec![
                ("id", celx::str_val(agent)),
                ("autonomy", celx::str_val(autonomy)),
            ])
        });
        // The plan as a rule's remembered results are keyed.
        let keyed = crate::celmemo::Keyed {
            intent,
            agent,
            autonomy,
        };
        for (position, rule) in cel {
            invariants.push(eval_cel(
                rule,
                position,
                policy,
                run,
                plan_val.as_ref(),
                agent_val.as_ref(),
                keyed,
            ));
        }
    }

    let mut reasons: Vec<Reason> = invariants
        .iter()
        .filter(|r| matches!(r.status, RuleStatus::Fail | RuleStatus::Error))
        .map(|r| Reason {
            rule: r.id.clone(),
            outcome: r.outcome,
            message: r.message.clone(),
        })
        .collect();
    reasons.sort_by(|a, b| b.outcome.cmp(&a.outcome).then_with(|| a.rule.cmp(&b.rule)));
    Judged {
        plan_diff,
        invariants,
        assumptions,
        reasons,
    }
}

/// Services reached by the touched paths: those owning a path, those with a
/// declared dependency on it, and those sharing a dependency with an owner
/// (a bigger pool on `svc/api` is more load on the `db/primary` that
/// `svc/worker` also needs). Declared, never guessed.
fn blast_radius(world: &World, touched: &[&ResourcePath]) -> Vec<Affected> {
    // The touched path a service's subtree overlaps, if any: found once per
    // service, for both the owners and the services themselves.
    let owns: Vec<Option<&ResourcePath>> = world
        .services
        .values()
        .map(|svc| touched.iter().copied().find(|p| overlaps(&svc.path, p)))
        .collect();
    let owners: Vec<(&ResourcePath, &crate::world::Service)> = world
        .services
        .values()
        .zip(&owns)
        .filter_map(|(svc, p)| p.map(|p| (p, svc)))
        .collect();
    let mut out: Vec<Affected> = Vec::new();
    for ((name, svc), owns) in world.services.iter().zip(owns) {
        let (via, relation, through) = if let Some(p) = owns {
            (p, "owns", None)
        } else if let Some(p) = touched
            .iter()
            .copied()
            .find(|p| svc.depends_on.iter().any(|d| overlaps(d, p)))
        {
            (p, "depends_on", None)
        } else if let Some((p, d)) = owners.iter().find_map(|(p, owner)| {
            owner
                .depends_on
                .iter()
                .find(|od| svc.depends_on.iter().any(|d| overlaps(d, od)))
                .map(|od| (*p, od))
        }) {
            (p, "shares_dependency", Some(d.clone()))
        } else {
            continue;
        };
        out.push(Affected {
            service: name.clone(),
            via: via.clone(),
            relation: std::borrow::Cow::Borrowed(relation),
            through,
        });
    }
    out
}

/// [`ResourcePath::overlaps`] with one comparison: the shorter path must be
/// the longer one or its ancestor.
fn overlaps(a: &ResourcePath, b: &ResourcePath) -> bool {
    let (short, long) = if a.as_str().len() <= b.as_str().len() {
        (a.as_str(), b.as_str())
    } else {
        (b.as_str(), a.as_str())
    };
    // Sibling paths usually differ near the end of the shorter one (`svc/a`,
    // `svc/b/pool_size`): its last byte rejects most pairs without a call
    // to compare the whole prefix.
    let (s, l) = (short.as_bytes(), long.as_bytes());
    s.last().is_none_or(|b| l.get(s.len() - 1) == Some(b))
        && long.starts_with(short)
        && (long.len() == short.len() || l[short.len()] == b'/')
}

/// Risk from what the plan does, how far it reaches, how sure the agent is,
/// and which rules it breaks.
fn risk(intent: &Intent, blast: &[Affected], reasons: &[Reason]) -> Risk {
    let mut high = Vec::new();
    let mut medium = Vec::new();
    for r in reasons {
        let line = format!("breaks {} ({})", r.rule, r.outcome);
        match r.outcome {
            Verdict::Reject => high.push(line),
            _ => medium.push(line),
        }
    }
    for s in &intent.steps {
        if s.kind().destructive() {
            high.push(format!("step {} is a destructive `{}`", s.id, s.kind()));
        }
        if let Compensation::Irreversible { .. } = s.compensation {
            // A restart cannot be undone but is routine; other irreversible steps are not.
            if s.kind() == StepKind::Restart {
                medium.push(format!("step {} (restart) cannot be undone", s.id));
            } else {
                high.push(format!("step {} is irreversible", s.id));
            }
        }
        if s.confidence < 0.5 {
            high.push(format!("step {}: agent confidence {}", s.id, s.confidence));
        } else if s.confidence < 0.8 {
            medium.push(format!("step {}: agent confidence {}", s.id, s.confidence));
        }
        if s.kind() == StepKind::Deploy && s.verification.is_none() {
            medium.push(format!("step {}: deploy without a verification", s.id));
        }
    }
    let direct = blast.iter().filter(|a| a.relation != "shares_dependency").count();
    let shared = blast.len() - direct;
    if direct >= 3 {
        high.push(format!("{direct} services directly in the blast radius"));
    } else if direct > 0 {
        medium.push(format!("{direct} service(s) directly in the blast radius"));
    }
    if shared > 0 {
        medium.push(format!("{shared} service(s) share a dependency with a touched service"));
    }
    if !intent.unknowns.is_empty() {
        medium.push(format!("the agent lists {} unknown(s)", intent.unknowns.len()));
    }
    let level = if !high.is_empty() {
        "high"
    } else if !medium.is_empty() {
        "medium"
    } else {
        "low"
    };
    high.extend(medium);
    Risk {
        level: level.into(),
        factors: high,
    }
}

/// A step's `args` as CEL reads them (its operation's fields as a map),
/// converted at the first read: most rules read a step's kind or path only.
type StepArgs = std::sync::OnceLock<Option<Value>>;

/// A step's arguments as a concord value (`None` when they have no such
/// form), as `plan.steps[i].args` shows them.
fn step_args(op: &Op) -> Option<Value> {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| serde_json::from_value::<Value>(v).ok())
}

/// `plan`: lineage, version, goal and steps (id, kind, path, confidence,
/// args), each step's fields converted only when a rule reads them.
fn plan_val<'v>(intent: &'v Intent, args: &'v [StepArgs]) -> celx::Val<'v> {
    let steps: Vec<celx::Val<'v>> = intent
        .steps
        .iter()
        .zip(args)
        .map(|(step, args)| celx::lazy_record_val(StepFields { step, args }))
        .collect();
    celx::record_val(vec![
        ("lineage", celx::str_val(intent.lineage.as_str())),
        ("version", Box::new(CelInt::from(i64::from(intent.version)))),
        ("goal", celx::str_val(intent.goal.as_str())),
        ("steps", Box::new(CelList::from(steps))),
    ])
}

/// A step as `plan.steps` shows it to CEL.
#[derive(Clone, Copy, Debug)]
struct StepFields<'v> {
    step: &'v concord_proto::Step,
    args: &'v StepArgs,
}

impl<'v> celx::Fields<'v> for StepFields<'v> {
    const NAMES: &'static [&'static str] = &["id", "kind", "path", "confidence", "args"];

    fn field(self, name: &str) -> Option<celx::Val<'v>> {
        let s = self.step;
        Some(match name {
            "id" => celx::str_val(s.id.as_str()),
            "kind" => celx::str_val(s.kind().name()),
            "path" => celx::str_val(s.path.as_str()),
            "confidence" => Box::new(CelDouble::from(s.confidence)),
            "args" => self
                .args
                .get_or_init(|| step_args(&s.op))
                .as_ref()
                .map_or_else(|| Box::new(CelNull) as celx::Val<'v>, celx::to_val),
            _ => return None,
        })
    }
}

/// A rule's verdict on one projection.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Eval {
    Pass,
    Fail,
    Error(String),
}

fn eval_cel<'r>(
    rule: &CelRule,
    position: usize,
    policy: &Policy,
    run: &'r Run<'_>,
    plan: Option<&celx::Val<'_>>,
    agent: Option<&celx::Val<'_>>,
    keyed: crate::celmemo::Keyed<'_>,
) -> RuleResult {
    let outcome = rule.config.outcome.verdict();
    let affected = run.touched.iter().any(|p| rule.reads.matches(p.as_str()));
    if !affected && !rule.reads_plan_or_agent {
        return RuleResult {
            id: rule.config.id.clone(),
            status: RuleStatus::Skipped,
            outcome,
            at: None,
            pre_existing: false,
            figures: BTreeMap::new(),
            message: "reads no path this plan touches".into(),
        };
    }
    // The paths the rule reads, borrowed from the base, in path order.
    let mut base: Vec<(&'r ResourcePath, &'r Value)> = Vec::new();
    let mut scanned = 0usize;
    // The rule's evaluation budget: CEL has no step counter, so bound what a
    // rule may bind (and what concord scans to find it). A visit counts every
    // path under the prefix: the world's the overlay leaves, then the
    // overlay's values.
    let visit = |prefix: &str, scanned: &mut usize, base: &mut Vec<(&'r ResourcePath, &'r Value)>| {
        run.base.visit_prefix(prefix, |p, v| {
            *scanned += 1;
            if *scanned <= CEL_SCAN_PATHS_MAX && rule.reads.matches(p.as_str()) {
                base.push((p, v));
            }
        });
    };
    let indexed = run.base.cel_index().and_then(|ix| ix.rule(position, rule));
    for (k, prefix) in rule.reads.prefixes.iter().enumerate() {
        let from = base.len();
        match indexed.and_then(|unders| unders.get(k)) {
            // What the visit finds, from the index: what it kept of the
            // world under the prefix, corrected for the plans in flight (a
            // rule over the scan budget fails below, whatever it bound).
            Some(crate::celindex::Under {
                count,
                matching: Some(kept),
            }) => {
                let wanted = |p: &ResourcePath| rule.reads.matches(p.as_str());
                let n = run
                    .base
                    .visit_kept(prefix, *count, kept, wanted, |p, v| base.push((p, v)));
                if cfg!(debug_assertions) {
                    let (mut visited, mut counted) = (Vec::new(), scanned);
                    visit(prefix, &mut counted, &mut visited);
                    debug_assert_eq!(
                        counted - scanned,
                        n,
                        "CEL index of `{}`: count under `{prefix}`",
                        rule.config.id
                    );
                    if counted <= CEL_SCAN_PATHS_MAX {
                        debug_assert_eq!(
                            &base[from..],
                            &visited[..],
                            "CEL index of `{}` is out of date",
                            rule.config.id
                        );
                    }
                }
                scanned += n;
            }
            _ => visit(prefix, &mut scanned, &mut base),
        }
        if scanned > CEL_SCAN_PATHS_MAX {
            return RuleResult {
                id: rule.config.id.clone(),
                status: RuleStatus::Error,
                outcome,
                at: None,
                pre_existing: false,
                figures: BTreeMap::new(),
                message: format!(
                    "evaluation failed (fails closed): budget exhausted: the rule's `reads` ({}) reach more than \
                     {CEL_SCAN_PATHS_MAX} paths; give them narrower literal prefixes",
                    rule.reads.patterns.join(", ")
                ),
            };
        }
        // The world's run, then the overlay's: one stable sort merges them.
        base[from..].sort_by(|a, b| a.0.cmp(b.0));
    }
    // Each distinct projection the rule is evaluated on: the base with a
    // state's changes (to paths the rule reads) applied, in path order. Read
    // in place by the rule (`celx::Tree`), never built into nested maps.
    type Restricted<'r> = Vec<(&'r ResourcePath, &'r Option<Value>)>;
    let restrict = |changes: &'r BTreeMap<ResourcePath, Option<Value>>| -> Restricted<'r> {
        changes.iter().filter(|(p, _)| rule.reads.matches(p.as_str())).collect()
    };
    let mut seen: Vec<Restricted<'r>> = Vec::new();
    // Per state: the index of its projection in `seen`, or none if a state
    // before it had the same one.
    let mut first_at: Vec<Option<usize>> = Vec::with_capacity(run.states.len());
    for state in &run.states {
        let restricted = restrict(&state.changes);
        if seen.contains(&restricted) {
            first_at.push(None);
        } else {
            first_at.push(Some(seen.len()));
            seen.push(restricted);
        }
    }
    // The world the plan ends in: its figures, if the rule holds.
    let end_changes: Restricted<'r> = if rule.figures.is_empty() {
        Vec::new()
    } else {
        restrict(&run.final_changes)
    };
    // Each projection (and the base itself) as a patch of the base where it
    // is one (values changed, no path added or removed): read through the
    // base, with sums over the base worked out once for them all. Built
    // only where it is not one.
    let sums = celx::Sums::new(&base);
    let patches: Vec<Option<celx::Patch<'_>>> = seen.iter().map(|r| sums.patch(r.iter().copied())).collect();
    let (base_patch, end_patch) = (sums.patch([]), sums.patch(end_changes.iter().copied()));
    let built = |changes: &Restricted<'r>, patch: &Option<celx::Patch<'_>>| -> Vec<(&'r ResourcePath, &'r Value)> {
        match patch {
            Some(_) => Vec::new(),
            None => merge(&base, changes).collect(),
        }
    };
    let projections: Vec<Vec<(&'r ResourcePath, &'r Value)>> = seen
        .iter()
        .zip(&patches)
        .map(|(changes, patch)| built(changes, patch))
        .collect();
    let end_projection = if rule.figures.is_empty() {
        Vec::new()
    } else {
        built(&end_changes, &end_patch)
    };
    /// The projection `after` as a tree, or read through `patch` if it is one.
    fn tree<'t>(after: &'t [(&'t ResourcePath, &'t Value)], patch: Option<&'t celx::Patch<'t>>) -> celx::Tree<'t> {
        match patch {
            Some(patch) => celx::Tree::patched(patch),
            None => celx::Tree::new(after),
        }
    }
    let bindings = celx::Bindings {
        plan: plan.filter(|_| rule.vars.plan),
        agent: agent.filter(|_| rule.vars.agent),
    };
    let mut root = Context::with_env(policy.env.clone());
    root.set_variable_resolver(&bindings);
    // `before` is the base: bound (read in place) only if the rule reads it.
    if rule.vars.before {
        root.add_variable_as_val("before", Box::new(tree(&base, base_patch.as_ref())));
    }
    let run_program = |program: &cel::Program, after: &[(&ResourcePath, &Value)], patch: Option<&celx::Patch<'_>>| {
        let mut ctx = root.new_inner_scope();
        if rule.vars.after {
            ctx.add_variable_as_val("after", Box::new(tree(after, patch)));
        }
        program.execute(&ctx).map_err(|e| e.to_string())
    };
    let evaluate = |after: &[(&ResourcePath, &Value)], patch: Option<&celx::Patch<'_>>| match run_program(
        &rule.program,
        after,
        patch,
    ) {
        Ok(CelValue::Bool(true)) => Eval::Pass,
        Ok(CelValue::Bool(false)) => Eval::Fail,
        Ok(other) => Eval::Error(format!("the rule must give a bool, it gave {other:?}")),
        Err(e) => Eval::Error(e),
    };
    // What of the rule reads the plan alone gives the same in every
    // projection: what it gave before under the plan's key (`celmemo`).
    let eval = |after: &[(&ResourcePath, &Value)], patch: Option<&celx::Patch<'_>>| match &rule.memo {
        Some(memo) => memo.verdict(keyed, || evaluate(after, patch)),
        None => evaluate(after, patch),
    };
    let figures = |after: &[(&ResourcePath, &Value)], patch: Option<&celx::Patch<'_>>| -> BTreeMap<String, Value> {
        rule.figures
            .iter()
            .enumerate()
            .map(|(i, (name, p))| {
                let compute = || match run_program(p, after, patch) {
                    Ok(v) => celx::from_cel(&v),
                    Err(e) => Value::Str(format!("error: {e}")),
                };
                let v = match &rule.memo {
                    Some(memo) => memo.figure(i, keyed, compute),
                    None => compute(),
                };
                (name.clone(), v)
            })
            .collect()
    };
    // Evaluate each distinct projection once, in the order the states occur.
    for (state, at) in run.states.iter().zip(&first_at) {
        let Some(i) = *at else { continue };
        let (restricted, after, patch) = (&seen[i], &projections[i], patches[i].as_ref());
        match eval(after, patch) {
            Eval::Pass => {}
            Eval::Fail => {
                let figs = figures(after, patch);
                let shown = if figs.is_empty() {
                    String::new()
                } else {
                    let list: Vec<String> = figs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!(" ({})", list.join(", "))
                };
                // A rule that reads the plan or the agent fails because of the
                // plan itself; only a rule over the world alone can already be
                // failing before the plan.
                let pre_existing = !rule.reads_plan_or_agent
                    && (restricted.is_empty() || matches!(eval(&base, base_patch.as_ref()), Eval::Fail));
                return RuleResult {
                    id: rule.config.id.clone(),
                    status: RuleStatus::Fail,
                    outcome: if pre_existing {
                        Verdict::NeedsApproval.min(outcome)
                    } else {
                        outcome
                    },
                    // A rule over the plan alone is not about any one state.
                    at: (!restricted.is_empty() || !rule.reads_plan_or_agent).then(|| state.label.to_string()),
                    pre_existing,
                    figures: figs,
                    message: if pre_existing {
                        format!(
                            "already failing before this plan, a human decides{shown}: {}",
                            describe(rule)
                        )
                    } else {
                        let at = if restricted.is_empty() && rule.reads_plan_or_agent {
                            String::new()
                        } else {
                            format!(" {}", state.label)
                        };
                        format!("broken{at}{shown}: {}", describe(rule))
                    },
                };
            }
            Eval::Error(e) => {
                return RuleResult {
                    id: rule.config.id.clone(),
                    status: RuleStatus::Error,
                    outcome,
                    at: Some(state.label.to_string()),
                    pre_existing: false,
                    figures: BTreeMap::new(),
                    message: format!("evaluation failed {} (fails closed): {e}", state.label),
                };
            }
        }
    }
    RuleResult {
        id: rule.config.id.clone(),
        status: RuleStatus::Pass,
        outcome,
        at: None,
        pre_existing: false,
        // Figures of a rule that holds are those of the world the plan ends in.
        figures: if rule.figures.is_empty() {
            BTreeMap::new()
        } else {
            figures(&end_projection, end_patch.as_ref())
        },
        message: format!("holds in every state: {}", describe(rule)),
    }
}

/// `base` (path order) with `changes` (path order) applied: a changed path
/// takes its new value or is gone.
fn merge<'s, 'r>(
    base: &'s [(&'r ResourcePath, &'r Value)],
    changes: &'s [(&'r ResourcePath, &'r Option<Value>)],
) -> impl Iterator<Item = (&'r ResourcePath, &'r Value)> + 's
where
    'r: 's,
{
    let mut b = base.iter().copied().peekable();
    let mut c = changes.iter().copied().peekable();
    std::iter::from_fn(move || {
        loop {
            let take_base = match (b.peek(), c.peek()) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((bp, _)), Some((cp, _))) => bp < cp,
            };
            if take_base {
                return b.next();
            }
            let (p, v) = c.next()?;
            if b.peek().is_some_and(|(bp, _)| *bp == p) {
                b.next();
            }
            if let Some(v) = v {
                return Some((p, v));
            }
        }
    })
}

fn describe(rule: &CelRule) -> String {
    if rule.config.description.is_empty() {
        format!("`{}`", rule.config.expr)
    } else {
        rule.config.description.clone()
    }
}

/// Whether an `Outcome` is the stricter of two.
pub(crate) fn outcome_verdict(o: Outcome) -> Verdict {
    o.verdict()
}

/// A step's network preflight failed.
pub(crate) fn preflight_failed(op: &Op) -> bool {
    matches!(op, Op::Network(a) if a.preflight.result == PreflightResult::Failed)
}

#[cfg(test)]
mod second_look_tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[[rules.budget]]
id = "budget"
terms = ["app/*/workers", "app/*/threads"]
limit = "db/main/max_connections"
max_fraction = 0.75
outcome = "reject"
[[rules.ceiling]]
id = "ceiling.workers"
paths = ["app/*/workers"]
approve_above = 12
reject_above = 20
[[rules.rate]]
id = "rate.threads"
paths = ["app/*/threads"]
max_factor = 2.0
outcome = "needs_approval"
[[rules.cel]]
id = "cel.workers"
reads = ["app/*/workers"]
expr = "keys(after.app).all(a, !('workers' in after.app[a]) || after.app[a].workers <= 15)"
outcome = "needs_approval"
[[rules.cel]]
id = "cel.threads_left"
reads = ["app/*/threads"]
expr = "sum_product(after.app, ['threads']) >= 4"
outcome = "reject"
[[rules.cel]]
id = "cel.plan"
reads = []
expr = "plan.steps.all(s, s.confidence >= 0.8)"
outcome = "needs_approval"
"#;

    fn path(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap()
    }

    fn app_path(app: usize, threads: bool) -> ResourcePath {
        path(&format!("app/a{app}/{}", if threads { "threads" } else { "workers" }))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// The second look skips the rules whose inputs the plans in flight
        /// leave alone; the reasons it adds to the projected preview's are
        /// those a full evaluation on the world as it is would add.
        #[test]
        fn skipping_rules_adds_the_reasons_a_full_look_adds(
            values in prop::collection::vec((1i64..20, 1i64..8), 4),
            max in 20i64..200,
            overlay in prop::collection::vec((0usize..4, any::<bool>(), prop::option::weighted(0.9, 0i64..25)), 0..5),
            steps in prop::collection::vec((0usize..4, any::<bool>(), 0i64..25, prop::bool::weighted(0.8)), 1..4),
        ) {
            let mut world = World::default();
            for (i, (w, t)) in values.iter().enumerate() {
                world.resources.insert(app_path(i, false), Value::Int(*w));
                world.resources.insert(app_path(i, true), Value::Int(*t));
            }
            world.resources.insert(path("db/main/max_connections"), Value::Int(max));
            let overlay: Overlay = overlay
                .into_iter()
                .map(|(a, t, v)| (app_path(a, t), v.map(Value::Int)))
                .collect();
            let steps: Vec<serde_json::Value> = steps
                .iter()
                .enumerate()
                .map(|(i, (a, t, v, sure))| json!({
                    "id": format!("s{i}"), "kind": "set", "path": app_path(*a, *t).as_str(),
                    "args": { "value": v }, "confidence": if *sure { 0.9 } else { 0.5 },
                    "compensation": { "mode": "restore" } }))
                .collect();
            let intent = concord_proto::decode_intent(&serde_json::to_vec(&json!({
                "protocol": 1, "lineage": "l", "version": 1, "goal": "g", "steps": steps })).unwrap()).unwrap();
            let policy = Policy::from_toml_str(POLICY).unwrap();
            let input = PreviewInput { world: &world, intent: &intent, agent: "x", policy: &policy, previous: None };
            let projected = judge(input, &Run::simulate(Base::projected(&world, &overlay), &intent), None, None);
            let current_run = Run::simulate(Base::current(&world), &intent);
            let mut touched = current_run.touched.clone();
            touched.extend(intent.steps.iter().map(|s| s.path.clone()));
            let full = judge(input, &current_run, None, None);
            let keys = crate::world::PathKeys::build(&overlay);
            let second = judge(input, &current_run, None, Some(SecondLook::new(Keyed::new(&overlay, &keys), &touched)));
            let added = |j: &Judged| -> Vec<(String, Verdict, String)> {
                j.reasons
                    .iter()
                    .filter(|r| !projected.reasons.iter().any(|p| p.rule == r.rule))
                    .map(|r| (r.rule.clone(), r.outcome, r.message.clone()))
                    .collect()
            };
            prop_assert_eq!(added(&second), added(&full));
        }
    }
}

#[cfg(test)]
mod plan_binding_tests {
    use serde_json::json;

    use super::*;

    const POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[[rules.cel]]
id = "cel.args"
reads = []
expr = "plan.steps.all(s, s.kind != 'set' || s.args.value <= 10) && plan.steps.all(s, s.kind != 'deploy' || s.args.version.startsWith('v2'))"
outcome = "needs_approval"
"#;

    fn verdict(steps: serde_json::Value) -> (Verdict, Vec<String>) {
        let mut world = World::default();
        world
            .resources
            .insert(ResourcePath::parse("app/a/workers").unwrap(), Value::Int(4));
        let intent = concord_proto::decode_intent(
            &serde_json::to_vec(&json!({ "protocol": 1, "lineage": "l", "version": 1, "goal": "g", "steps": steps }))
                .unwrap(),
        )
        .unwrap();
        let policy = Policy::from_toml_str(POLICY).unwrap();
        let p = preview(PreviewInput {
            world: &world,
            intent: &intent,
            agent: "x",
            policy: &policy,
            previous: None,
        });
        (p.verdict, p.reasons.iter().map(|r| r.rule.clone()).collect())
    }

    fn set(value: i64) -> serde_json::Value {
        json!({ "id": "s1", "kind": "set", "path": "app/a/workers", "args": { "value": value },
                "confidence": 0.9, "compensation": { "mode": "restore" } })
    }

    fn deploy(version: &str) -> serde_json::Value {
        json!({ "id": "s2", "kind": "deploy", "path": "app/a", "args": { "version": version, "artifact": "reg/a:1" },
                "confidence": 0.9, "compensation": { "mode": "irreversible", "reason": "test" } })
    }

    /// `plan.steps[i].args` holds the step's operation fields, converted when
    /// a rule first reads them.
    #[test]
    fn a_rule_reads_a_steps_args() {
        assert_eq!(verdict(json!([set(8)])), (Verdict::Admit, vec![]));
        assert_eq!(
            verdict(json!([set(12)])),
            (Verdict::NeedsApproval, vec!["cel.args".to_string()])
        );
        assert_eq!(verdict(json!([set(8), deploy("v2.1")])), (Verdict::Admit, vec![]));
        assert_eq!(
            verdict(json!([set(8), deploy("v1.9")])),
            (Verdict::NeedsApproval, vec!["cel.args".to_string()])
        );
    }
}
