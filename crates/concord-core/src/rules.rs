//! The built-in invariants. Each yields a [`RuleResult`] with its figures.

use std::collections::{BTreeMap, BTreeSet};

use concord_proto::preview::{AssumptionResult, PlanDiff, RuleResult, RuleStatus};
use concord_proto::{Compensation, Intent, Op, Value, Verdict};

use crate::policy::{Autonomy, Globs, Policy};
use crate::preview::{Run, outcome_verdict, preflight_failed};
use crate::world::World;

fn figure(s: impl Into<String>) -> Value {
    Value::Str(s.into())
}

fn list(items: &[String]) -> Value {
    Value::List(items.iter().map(|s| Value::Str(s.clone())).collect())
}

/// One broken rule: where (the state label, if the rule is about a state) and what.
struct Violation {
    at: Option<String>,
    what: String,
}

fn violation(at: &str, what: String) -> Violation {
    Violation {
        at: Some(at.to_string()),
        what,
    }
}

fn plain(what: String) -> Violation {
    Violation { at: None, what }
}

/// The label of the state right after the step a spec label names
/// (`step s1` -> `after step s1`); compensation specs have no single state.
fn spec_violation(label: &SpecLabel<'_>, what: String) -> Violation {
    Violation {
        at: match label {
            SpecLabel::Step(id) => Some(format!("after step {id}")),
            SpecLabel::Compensation(_) => None,
        },
        what,
    }
}

/// Builds a result from a list of violations: none is a pass.
fn verdict_of(id: &str, outcome: Verdict, violations: Vec<Violation>, pass: &str) -> RuleResult {
    let mut figures = BTreeMap::new();
    let at = violations.first().and_then(|v| v.at.clone());
    let (status, message) = if violations.is_empty() {
        (RuleStatus::Pass, pass.to_string())
    } else {
        let texts: Vec<String> = violations.iter().map(|v| v.what.clone()).collect();
        if texts.len() > 1 {
            figures.insert("violations".into(), list(&texts));
        }
        let more = if texts.len() > 1 {
            format!(" (+{} more)", texts.len() - 1)
        } else {
            String::new()
        };
        (RuleStatus::Fail, format!("{}{more}", texts[0]))
    };
    RuleResult {
        id: id.to_string(),
        status,
        outcome,
        at,
        pre_existing: false,
        figures,
        message,
    }
}

/// Where a spec comes from: a step, or a step's `undo` compensation. Shown
/// as `step s1` or `compensation of step s1`; written only when a rule
/// reports it.
#[derive(Clone, Copy)]
enum SpecLabel<'a> {
    Step(&'a concord_proto::Id),
    Compensation(&'a concord_proto::Id),
}

impl std::fmt::Display for SpecLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecLabel::Step(id) => write!(f, "step {id}"),
            SpecLabel::Compensation(id) => write!(f, "compensation of step {id}"),
        }
    }
}

/// A spec the plan may run, borrowed from the intent.
#[derive(Clone, Copy)]
struct SpecRef<'a> {
    path: &'a concord_proto::ResourcePath,
    op: &'a Op,
}

/// Every spec the plan may run, labelled: its steps, then its `undo` compensations.
fn all_specs(intent: &Intent) -> Vec<(SpecLabel<'_>, SpecRef<'_>)> {
    let mut out: Vec<(SpecLabel<'_>, SpecRef<'_>)> = intent
        .steps
        .iter()
        .map(|s| {
            (
                SpecLabel::Step(&s.id),
                SpecRef {
                    path: &s.path,
                    op: &s.op,
                },
            )
        })
        .collect();
    for s in &intent.steps {
        if let Compensation::Undo(u) = &s.compensation {
            out.push((
                SpecLabel::Compensation(&s.id),
                SpecRef {
                    path: &u.path,
                    op: &u.op,
                },
            ));
        }
    }
    out
}

/// Members of a permission-like value, as strings.
fn members(v: Option<&Value>) -> BTreeSet<String> {
    match v {
        None => BTreeSet::new(),
        Some(Value::List(items)) => items.iter().map(|i| i.to_string()).collect(),
        Some(Value::Map(m)) => m.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        Some(other) => std::iter::once(other.to_string()).collect(),
    }
}

pub(crate) fn builtin(
    run: &Run<'_>,
    intent: &Intent,
    agent: &str,
    policy: &Policy,
    plan_diff: Option<&PlanDiff>,
) -> Vec<RuleResult> {
    let r = &policy.config.rules;
    let specs = all_specs(intent);
    let rules = policy.agent(agent);
    let mut out = Vec::new();

    // Autonomy.
    let mut autonomy = match rules.autonomy {
        Autonomy::Observe => verdict_of(
            "agent.autonomy",
            Verdict::Reject,
            vec![plain(format!("agent `{agent}` may only report observations"))],
            "",
        ),
        Autonomy::Propose => verdict_of(
            "agent.autonomy",
            Verdict::NeedsApproval,
            vec![plain(format!(
                "every plan of agent `{agent}` waits for a human (autonomy `propose`)"
            ))],
            "",
        ),
        Autonomy::Bounded => verdict_of(
            "agent.autonomy",
            Verdict::NeedsApproval,
            vec![],
            "agent is `bounded`: plans within policy are admitted",
        ),
    };
    autonomy.figures.insert("agent".into(), figure(agent));
    autonomy
        .figures
        .insert("autonomy".into(), figure(rules.autonomy.name()));
    out.push(autonomy);

    // Allowlist.
    let allow_outcome = outcome_verdict(r.allowlist.outcome);
    out.push(match &rules.allow {
        None => RuleResult {
            id: "agent.allowlist".into(),
            status: RuleStatus::Skipped,
            outcome: allow_outcome,
            at: None,
            pre_existing: false,
            figures: BTreeMap::new(),
            message: format!("no allowlist configured for agent `{agent}`"),
        },
        Some(entries) => {
            let violations = specs
                .iter()
                .filter(|(_, sp)| {
                    !entries
                        .iter()
                        .any(|(kinds, globs)| kinds.contains(&sp.op.kind()) && globs.matches(sp.path.as_str()))
                })
                .map(|(label, sp)| {
                    spec_violation(
                        label,
                        format!(
                            "{label}: `{}` on `{}` is outside agent `{agent}`'s allowlist",
                            sp.op.kind(),
                            sp.path
                        ),
                    )
                })
                .collect();
            verdict_of(
                "agent.allowlist",
                allow_outcome,
                violations,
                "every step is within the agent's allowlist",
            )
        }
    });

    // Permissions cannot increase: any grant, or any state where a permission value gains members.
    let mut violations: Vec<Violation> = Vec::new();
    // Each (path, member) is reported once, at the first state that gains it;
    // a grant step already explains the member it adds.
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    for (label, sp) in &specs {
        if let Op::Grant(g) = &sp.op {
            let member = format!("{}:{}", g.principal, g.role);
            reported.insert((format!("{}/grants", sp.path), Value::Str(member.clone()).to_string()));
            violations.push(spec_violation(
                label,
                format!("{label} grants `{member}` on `{}`", sp.path),
            ));
        }
    }
    for (state, path, after) in run.changes_matching(&policy.permissions) {
        let gained: Vec<String> = members(after.as_ref())
            .difference(&members(run.base.get(path)))
            .filter(|m| reported.insert((path.to_string(), m.to_string())))
            .cloned()
            .collect();
        if !gained.is_empty() {
            violations.push(violation(
                &state.label.to_string(),
                format!("`{path}` gains {} {}", gained.join(", "), state.label),
            ));
        }
    }
    out.push(verdict_of(
        "permissions.no_increase",
        outcome_verdict(r.permissions.outcome),
        violations,
        "no permission is added in any state",
    ));

    // Network scope cannot widen.
    out.push(network_widen(run, &policy.network, outcome_verdict(r.network.outcome)));
    let preflight: Vec<Violation> = specs
        .iter()
        .filter(|(_, sp)| preflight_failed(sp.op))
        .map(|(label, sp)| spec_violation(label, format!("{label}: the preflight check for `{}` failed", sp.path)))
        .collect();
    out.push(verdict_of(
        "network.preflight",
        outcome_verdict(r.network.preflight_outcome),
        preflight,
        "every network change carries a passing preflight check",
    ));

    // Deletes carry their confirmation.
    let deletes: Vec<Violation> = specs
        .iter()
        .filter_map(|(label, sp)| match &sp.op {
            Op::Delete(d) if d.confirm.path != *sp.path || d.confirm.reason.as_str().trim().is_empty() => {
                Some(spec_violation(
                    label,
                    format!(
                        "{label}: delete of `{}` is not confirmed (confirmation names `{}`)",
                        sp.path, d.confirm.path
                    ),
                ))
            }
            _ => None,
        })
        .collect();
    out.push(verdict_of(
        "delete.confirmed",
        outcome_verdict(r.delete.outcome),
        deletes,
        "every delete repeats its path and gives a reason",
    ));

    // Protected prefixes: no step acts there and no state changes anything there.
    for (cfg, globs) in &policy.protected {
        let mut violations: Vec<Violation> = specs
            .iter()
            .filter_map(|(label, sp)| {
                globs
                    .first_match(sp.path.as_str())
                    .map(|g| spec_violation(label, format!("{label} acts on `{}`, protected by `{g}`", sp.path)))
            })
            .collect();
        // A changed path no step names (a delete's children, a deploy's version) is reported on its own.
        let acted: BTreeSet<&concord_proto::ResourcePath> = specs.iter().map(|(_, sp)| sp.path).collect();
        for p in run.touched.iter().filter(|p| !acted.contains(p)) {
            if let Some(g) = globs.first_match(p.as_str()) {
                violations.push(plain(format!("`{p}` would change, protected by `{g}`")));
            }
        }
        out.push(verdict_of(
            &cfg.id,
            outcome_verdict(cfg.outcome),
            violations,
            "nothing under the protected paths changes",
        ));
    }

    // Deploys only of allowlisted artifacts.
    if let Some((cfg, globs)) = &policy.artifacts {
        let violations = specs
            .iter()
            .filter_map(|(label, sp)| match &sp.op {
                Op::Deploy(d) if !globs.matches(d.artifact.as_str()) => Some(spec_violation(
                    label,
                    format!(
                        "{label} deploys `{}`, which no artifact allowlist entry matches",
                        d.artifact
                    ),
                )),
                _ => None,
            })
            .collect();
        out.push(verdict_of(
            "deploy.artifacts",
            outcome_verdict(cfg.outcome),
            violations,
            "every deployed artifact is allowlisted",
        ));
    }

    // Re-plans may not widen scope without a human.
    let so = outcome_verdict(r.scope_expansion.outcome).max(Verdict::NeedsApproval);
    out.push(match plan_diff {
        None => RuleResult {
            id: "replan.scope_expansion".into(),
            status: RuleStatus::Skipped,
            outcome: so,
            at: None,
            pre_existing: false,
            figures: BTreeMap::new(),
            message: "no earlier version to compare with".into(),
        },
        Some(d) => verdict_of(
            "replan.scope_expansion",
            so,
            d.scope_expansion
                .iter()
                .map(|e| plain(format!("{} (step {}): {}", e.kind, e.step, e.detail)))
                .collect(),
            "this version does nothing the earlier one could not",
        ),
    });

    // The plan applies to the world at all.
    out.push(verdict_of(
        "plan.applies",
        Verdict::Reject,
        run.apply_errors.iter().cloned().map(plain).collect(),
        "every step and compensation applies to the current world",
    ));
    out
}

fn network_widen(run: &Run<'_>, globs: &Globs, outcome: Verdict) -> RuleResult {
    let mut violations = Vec::new();
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    for (state, path, after) in run.changes_matching(globs) {
        let parse = |v: Option<&Value>| -> Result<Vec<Rule>, String> {
            match v {
                None => Ok(Vec::new()),
                Some(Value::List(items)) => items.iter().map(Rule::parse).collect(),
                Some(other) => Err(format!("`{path}` holds {other}, not a list of network rules")),
            }
        };
        let (before, after) = match (parse(run.base.get(path)), parse(after.as_ref())) {
            (Ok(b), Ok(a)) => (b, a),
            (Err(e), _) | (_, Err(e)) => {
                return RuleResult {
                    id: "network.no_widen".into(),
                    status: RuleStatus::Error,
                    outcome,
                    at: Some(state.label.to_string()),
                    pre_existing: false,
                    figures: BTreeMap::new(),
                    message: format!("cannot read network rules (fails closed): {e}"),
                };
            }
        };
        for rule in after.iter().filter(|r| !before.iter().any(|b| b.covers(r))) {
            // Each widening rule is reported once, at the first state that admits it.
            if reported.insert((path.to_string(), rule.text.clone())) {
                violations.push(violation(
                    &state.label.to_string(),
                    format!("`{path}` admits {} not admitted before, {}", rule.text, state.label),
                ));
            }
        }
    }
    verdict_of(
        "network.no_widen",
        outcome,
        violations,
        "no state admits traffic that was not admitted before",
    )
}

struct Rule {
    protocol: String,
    from: i64,
    to: i64,
    net: ipnet::IpNet,
    text: String,
}

impl Rule {
    fn parse(v: &Value) -> Result<Rule, String> {
        let Value::Map(m) = v else {
            return Err(format!("{v} is not a network rule map"));
        };
        let s = |k: &str| m.get(k).and_then(|v| v.as_str()).ok_or(format!("rule {v} lacks `{k}`"));
        let i = |k: &str| m.get(k).and_then(|v| v.as_i64()).ok_or(format!("rule {v} lacks `{k}`"));
        let cidr = s("cidr")?;
        Ok(Rule {
            protocol: s("protocol")?.to_string(),
            from: i("port_from")?,
            to: i("port_to")?,
            net: cidr.parse().map_err(|_| format!("`{cidr}` is not CIDR notation"))?,
            text: format!("{} {}-{} from {cidr}", s("protocol")?, i("port_from")?, i("port_to")?),
        })
    }

    fn covers(&self, other: &Rule) -> bool {
        (self.protocol == "any" || self.protocol == other.protocol)
            && self.from <= other.from
            && other.to <= self.to
            && self.net.contains(&other.net)
    }
}

pub(crate) fn ceilings(run: &Run<'_>, policy: &Policy) -> Vec<RuleResult> {
    policy
        .ceilings
        .iter()
        .map(|(cfg, globs)| {
            let mut worst: Option<(Verdict, String, BTreeMap<String, Value>, String)> = None;
            let mut matched = false;
            for (state, path, after) in run.changes_matching(globs) {
                matched = true;
                let Some(after) = after.as_ref().filter(|v| v.as_f64().is_some()) else {
                    continue;
                };
                let v = after.as_f64().unwrap_or_default();
                let before_value = run.base.get(path);
                let before = before_value.and_then(Value::as_f64);
                // Lowering a value that is already too high is always allowed.
                if before.is_some_and(|b| v <= b) {
                    continue;
                }
                let hit = match (cfg.reject_above, cfg.approve_above) {
                    (Some(r), _) if v > r => Some((Verdict::Reject, r)),
                    (_, Some(a)) if v > a => Some((Verdict::NeedsApproval, a)),
                    _ => None,
                };
                if let Some((verdict, limit)) = hit
                    && worst.as_ref().is_none_or(|w| verdict > w.0)
                {
                    let mut f = BTreeMap::new();
                    f.insert("path".into(), figure(path.as_str()));
                    f.insert("value".into(), after.clone());
                    if let Some(b) = before_value {
                        f.insert("before".into(), b.clone());
                    }
                    if let Some(a) = cfg.approve_above {
                        f.insert("approve_above".into(), Value::Float(a));
                    }
                    if let Some(r) = cfg.reject_above {
                        f.insert("reject_above".into(), Value::Float(r));
                    }
                    let what = if verdict == Verdict::Reject {
                        "reject"
                    } else {
                        "approval"
                    };
                    worst = Some((
                        verdict,
                        format!("`{path}` = {v} is above the {what} ceiling {limit}, {}", state.label),
                        f,
                        state.label.to_string(),
                    ));
                }
            }
            match worst {
                Some((outcome, message, figures, at)) => RuleResult {
                    id: cfg.id.clone(),
                    status: RuleStatus::Fail,
                    outcome,
                    at: Some(at),
                    pre_existing: false,
                    figures,
                    message,
                },
                None => RuleResult {
                    id: cfg.id.clone(),
                    status: if matched { RuleStatus::Pass } else { RuleStatus::Skipped },
                    outcome: if cfg.reject_above.is_some() {
                        Verdict::Reject
                    } else {
                        Verdict::NeedsApproval
                    },
                    at: None,
                    pre_existing: false,
                    figures: BTreeMap::new(),
                    message: if matched {
                        "every value stays under its ceilings in every state".into()
                    } else {
                        "the plan touches no path under this ceiling".into()
                    },
                },
            }
        })
        .collect()
}

pub(crate) fn rates(run: &Run<'_>, intent: &Intent, policy: &Policy) -> Vec<RuleResult> {
    policy
        .rates
        .iter()
        .map(|(cfg, globs)| {
            let outcome = outcome_verdict(cfg.outcome);
            let mut matched = false;
            let mut worst: Option<(f64, BTreeMap<String, Value>, String, String)> = None;
            for (step, changes) in intent.steps.iter().zip(&run.step_changes) {
                for c in changes {
                    if !globs.matches(c.path.as_str()) {
                        continue;
                    }
                    matched = true;
                    let (Some(before), Some(after)) = (c.before.as_ref(), c.after.as_ref()) else {
                        continue;
                    };
                    let (Some(b), Some(a)) = (before.as_f64(), after.as_f64()) else {
                        continue;
                    };
                    if b <= 0.0 {
                        continue;
                    }
                    let factor = a / b;
                    if factor > cfg.max_factor && worst.as_ref().is_none_or(|w| factor > w.0) {
                        let mut f = BTreeMap::new();
                        f.insert("path".into(), figure(c.path.as_str()));
                        f.insert("before".into(), before.clone());
                        f.insert("after".into(), after.clone());
                        f.insert("factor".into(), Value::Float(factor));
                        f.insert("max_factor".into(), Value::Float(cfg.max_factor));
                        worst = Some((
                            factor,
                            f,
                            format!(
                                "step {} changes `{}` {b} -> {a}, {factor:.2}x in one step (at most {}x)",
                                step.id, c.path, cfg.max_factor
                            ),
                            format!("after step {}", step.id),
                        ));
                    }
                }
            }
            match worst {
                Some((_, figures, message, at)) => RuleResult {
                    id: cfg.id.clone(),
                    status: RuleStatus::Fail,
                    outcome,
                    at: Some(at),
                    pre_existing: false,
                    figures,
                    message,
                },
                None => RuleResult {
                    id: cfg.id.clone(),
                    status: if matched { RuleStatus::Pass } else { RuleStatus::Skipped },
                    outcome,
                    at: None,
                    pre_existing: false,
                    figures: BTreeMap::new(),
                    message: if matched {
                        format!("no step changes a value by more than {}x", cfg.max_factor)
                    } else {
                        "the plan touches no path under this limit".into()
                    },
                },
            }
        })
        .collect()
}

pub(crate) fn assumptions(world: &World, intent: &Intent, policy: &Policy) -> (Vec<AssumptionResult>, RuleResult) {
    let results: Vec<AssumptionResult> = intent
        .assumptions
        .iter()
        .map(|a| {
            let actual = world.get(&a.path).cloned();
            AssumptionResult {
                path: a.path.clone(),
                op: a.op,
                expected: a.value.clone(),
                held: a.op.holds(actual.as_ref(), a.value.as_ref()),
                actual,
            }
        })
        .collect();
    let broken = results
        .iter()
        .filter(|r| !r.held)
        .map(|r| {
            plain(format!(
                "assumption `{} {} {}` does not hold: the world has {}",
                r.path,
                r.op.symbol(),
                r.expected.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                r.actual
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "nothing".into())
            ))
        })
        .collect();
    let rule = verdict_of(
        "plan.assumptions",
        outcome_verdict(policy.config.rules.assumptions.outcome),
        broken,
        "every assumption holds in the current world",
    );
    (results, rule)
}
