//! Compounding: findings that link plans over time. Each passes or fails
//! with its figures and the plan ids involved, mapped to an outcome by the
//! policy (`[[rules.drift]]`, `[rules.masking]`, `[rules.loop]`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use concord_proto::preview::{RuleResult, RuleStatus};
use concord_proto::{Intent, Op, ResourcePath, StepKind, Value, Verdict};
use serde::{Deserialize, Serialize};

use super::Coordinator;
use crate::preview::Run;

/// One admitted step, remembered for compounding checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Admission time.
    pub at_ms: u64,
    /// Plan lineage and version (shared by the plan's steps).
    pub plan: Arc<str>,
    /// Agent (shared by the plan's steps).
    pub agent: Arc<str>,
    /// Step kind.
    pub kind: StepKind,
    /// Step path.
    pub path: ResourcePath,
    /// What it changes: (path, before, after).
    pub changes: Vec<(ResourcePath, Option<Value>, Option<Value>)>,
}

/// A tripped circuit breaker: `agent` may not act on `path` until resumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Breaker {
    /// The agent.
    pub agent: String,
    /// The path.
    pub path: ResourcePath,
    /// The step kind that looped.
    pub kind: StepKind,
    /// When it tripped.
    pub at_ms: u64,
}

/// Most admitted steps remembered for compounding checks.
pub const HISTORY_MAX: usize = 100_000;

/// A step that treats a symptom: more replicas, a raised number, a restart.
fn remediation(op: &Op, before: Option<&Value>) -> bool {
    match op {
        Op::Restart(_) => true,
        Op::Scale(a) => before.and_then(Value::as_i64).is_none_or(|b| i64::from(a.replicas) > b),
        Op::Set(a) => match (a.value.as_f64(), before.and_then(Value::as_f64)) {
            (Some(new), Some(old)) => new > old,
            _ => false,
        },
        _ => false,
    }
}

fn result(id: &str, outcome: Verdict, fail: Option<(String, BTreeMap<String, Value>)>, pass: &str) -> RuleResult {
    match fail {
        Some((message, figures)) => RuleResult {
            id: id.to_string(),
            status: RuleStatus::Fail,
            outcome,
            at: None,
            pre_existing: false,
            figures,
            message,
        },
        None => RuleResult {
            id: id.to_string(),
            status: RuleStatus::Pass,
            outcome,
            at: None,
            pre_existing: false,
            figures: BTreeMap::new(),
            message: pass.to_string(),
        },
    }
}

fn plans_value(plans: &BTreeSet<String>) -> Value {
    Value::List(plans.iter().map(|p| Value::Str(p.clone())).collect())
}

/// Remembers an admitted plan's steps.
pub(super) fn remember_history(
    history: &mut VecDeque<HistoryEntry>,
    now: u64,
    agent: &str,
    intent: &Intent,
    step_changes: &[Vec<crate::apply::PathChange>],
) {
    let plan: Arc<str> = Arc::from(format!("{} v{}", intent.lineage, intent.version));
    let agent: Arc<str> = Arc::from(agent);
    for (step, changes) in intent.steps.iter().zip(step_changes) {
        history.push_back(HistoryEntry {
            at_ms: now,
            plan: plan.clone(),
            agent: agent.clone(),
            kind: step.kind(),
            path: step.path.clone(),
            changes: changes
                .iter()
                .map(|c| (c.path.clone(), c.before.clone(), c.after.clone()))
                .collect(),
        });
    }
    while history.len() > HISTORY_MAX {
        history.pop_front();
    }
}

impl Coordinator {
    fn recent(&self, now: u64, window_ms: u64) -> impl Iterator<Item = &HistoryEntry> {
        let from = now.saturating_sub(window_ms);
        // History is in admission order: walk back from the newest.
        self.history.iter().rev().take_while(move |h| h.at_ms >= from)
    }

    /// The compounding findings for a plan about to be decided. Returns the
    /// results and any breaker that the plan trips.
    pub(super) fn compounding(
        &self,
        now: u64,
        agent: &str,
        intent: &Intent,
        run: &Run<'_>,
    ) -> (Vec<RuleResult>, Option<super::compounding::Breaker>) {
        let mut out = Vec::new();
        let policy = &self.policy;

        // Cumulative drift per numeric path, against the value at the window's start.
        for (cfg, globs) in &policy.drifts {
            let mut fail = None;
            for changes in &run.step_changes {
                for c in changes {
                    if fail.is_some() || !globs.matches(c.path.as_str()) {
                        continue;
                    }
                    let Some(after) = c.after.as_ref().and_then(Value::as_f64) else {
                        continue;
                    };
                    let mut plans = BTreeSet::new();
                    let mut start = c.before.as_ref().and_then(Value::as_f64);
                    for h in self.recent(now, cfg.window_ms) {
                        for (p, before, _) in &h.changes {
                            if p == &c.path {
                                start = before.as_ref().and_then(Value::as_f64);
                                plans.insert(h.plan.to_string());
                            }
                        }
                    }
                    let Some(start) = start.filter(|s| *s > 0.0) else {
                        continue;
                    };
                    let factor = after / start;
                    if factor > cfg.max_factor {
                        let mut f = BTreeMap::new();
                        f.insert("path".into(), Value::Str(c.path.to_string()));
                        f.insert("window_start".into(), Value::Float(start));
                        f.insert("after".into(), Value::Float(after));
                        f.insert("factor".into(), Value::Float(factor));
                        f.insert("max_factor".into(), Value::Float(cfg.max_factor));
                        f.insert("earlier_plans".into(), plans_value(&plans));
                        fail = Some((
                            format!(
                                "`{}` would reach {after}, {factor:.2}x its value {start} at the start of the {} ms window (at most {}x); earlier plans in the window: {}",
                                c.path,
                                cfg.window_ms,
                                cfg.max_factor,
                                plans.iter().cloned().collect::<Vec<_>>().join(", ")
                            ),
                            f,
                        ));
                    }
                }
            }
            out.push(result(
                &cfg.id,
                cfg.outcome.verdict(),
                fail,
                "no path drifts beyond its limit over the window",
            ));
        }

        // A remediation soon after another agent's deploy may hide that deploy's regression.
        if let Some(cfg) = &policy.config.rules.masking {
            let mut fail = None;
            for (step, changes) in intent.steps.iter().zip(&run.step_changes) {
                let before = changes.first().and_then(|c| c.before.as_ref());
                if fail.is_some() || !remediation(&step.op, before) {
                    continue;
                }
                // The services the step acts on, directly or through a declared dependency.
                let services: Vec<(&String, &crate::world::Service)> = self
                    .world
                    .services
                    .iter()
                    .filter(|(_, s)| s.path.overlaps(&step.path) || s.depends_on.iter().any(|d| d.overlaps(&step.path)))
                    .collect();
                let deploy = self.recent(now, cfg.window_ms).find(|h| {
                    h.kind == StepKind::Deploy
                        && &*h.agent != agent
                        && services.iter().any(|(_, s)| s.path.overlaps(&h.path))
                });
                if let Some(d) = deploy {
                    let service = services
                        .iter()
                        .find(|(_, s)| s.path.overlaps(&d.path))
                        .map(|(n, _)| n.as_str())
                        .unwrap_or_default();
                    let mut f = BTreeMap::new();
                    f.insert("remediation_step".into(), Value::Str(step.id.to_string()));
                    f.insert("deploy_plan".into(), Value::Str(d.plan.to_string()));
                    f.insert("deploy_agent".into(), Value::Str(d.agent.to_string()));
                    f.insert(
                        "deployed_ms_ago".into(),
                        Value::Int(i64::try_from(now - d.at_ms).unwrap_or(i64::MAX)),
                    );
                    f.insert("service".into(), Value::Str(service.to_string()));
                    fail = Some((
                        format!(
                            "step {} (`{}` on `{}`) remediates service `{service}` {} ms after agent `{}` deployed there ({}): it may be hiding that deploy's regression",
                            step.id,
                            step.kind(),
                            step.path,
                            now - d.at_ms,
                            d.agent,
                            d.plan
                        ),
                        f,
                    ));
                }
            }
            out.push(result(
                "compounding.masking",
                cfg.outcome.verdict(),
                fail,
                "no remediation follows another agent's recent deploy on the same service",
            ));
        }

        // Remediation loops: the same agent, kind and path too often in the window.
        let mut tripped = None;
        if let Some(cfg) = &policy.config.rules.loops {
            let mut fail = None;
            for step in &intent.steps {
                if fail.is_some() {
                    break;
                }
                let earlier: Vec<&HistoryEntry> = self
                    .recent(now, cfg.window_ms)
                    .filter(|h| &*h.agent == agent && h.kind == step.kind() && h.path == step.path)
                    .collect();
                let count = earlier.len() as u32 + 1;
                if count > cfg.max_repeats {
                    // A breaker trips once: while one is open on the path, the
                    // repeat is refused (`breaker.open`) but trips nothing new,
                    // so the log and the alerts name the loop once.
                    let open = self
                        .breakers
                        .iter()
                        .any(|b| &*b.agent == agent && b.path.overlaps(&step.path));
                    let plans: BTreeSet<String> = earlier.iter().map(|h| h.plan.to_string()).collect();
                    let mut f = BTreeMap::new();
                    f.insert("path".into(), Value::Str(step.path.to_string()));
                    f.insert("kind".into(), Value::Str(step.kind().to_string()));
                    f.insert("count".into(), Value::Int(count.into()));
                    f.insert("max_repeats".into(), Value::Int(cfg.max_repeats.into()));
                    f.insert("earlier_plans".into(), plans_value(&plans));
                    fail = Some((
                        format!(
                            "agent `{agent}` would `{}` `{}` for the {count}th time in {} ms (at most {}): {}; an operator must resume",
                            step.kind(),
                            step.path,
                            cfg.window_ms,
                            cfg.max_repeats,
                            if open { "its breaker is open" } else { "breaker tripped" }
                        ),
                        f,
                    ));
                    if !open {
                        tripped = Some(Breaker {
                            agent: agent.to_string(),
                            path: step.path.clone(),
                            kind: step.kind(),
                            at_ms: now,
                        });
                    }
                }
            }
            out.push(result(
                "compounding.loop",
                Verdict::Reject,
                fail,
                "no step repeats beyond the loop limit",
            ));
        }
        (out, tripped)
    }
}
