//! Budget rules: a sum of products over matching paths must stay under a
//! fraction of a limit, e.g. pool_size x replicas over every service under
//! 80% of the database's max_connections.
//!
//! The shape is the most common coupling rule, and the one CEL evaluates
//! slowest (a comprehension over every service, in every state). Here the
//! base sum is computed once per preview and each state re-computes only the
//! terms whose paths it changes: the cost follows the paths the plan touches.
//!
//! Terms are path patterns whose `*` segments capture: `svc/*/pool_size` and
//! `svc/*/replicas` pair up by the service name. A capture whose other terms
//! are missing contributes nothing.

use std::collections::{BTreeMap, BTreeSet};

use concord_proto::ResourcePath;
use concord_proto::preview::{RuleResult, RuleStatus};
use concord_proto::{Value, Verdict};
use serde::{Deserialize, Serialize};

use crate::policy::{Outcome, PolicyError};
use crate::preview::Run;
use crate::world::Overlay;

/// A budget rule as configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Rule id.
    pub id: String,
    /// For people.
    #[serde(default)]
    pub description: String,
    /// Path patterns multiplied together per capture, e.g.
    /// `["svc/*/pool_size", "svc/*/replicas"]`. Only `*` (one whole segment).
    pub terms: Vec<String>,
    /// The path holding the limit.
    pub limit: ResourcePath,
    /// The sum may reach this fraction of the limit (e.g. 0.8).
    pub max_fraction: f64,
    /// What exceeding it leads to.
    pub outcome: Outcome,
}

/// A compiled budget rule.
#[derive(Clone, Debug)]
pub struct Budget {
    /// The configuration.
    pub config: BudgetConfig,
    terms: Vec<Vec<String>>,
    /// Per term: the literal text before its first `*` (where matches start)
    /// and after its last `*` (a cheap test before splitting a path).
    bounds: Vec<(String, String)>,
}

fn segments(p: &str) -> Vec<String> {
    p.split('/').map(str::to_string).collect()
}

impl Budget {
    /// Compiles a budget rule.
    pub fn new(config: BudgetConfig) -> Result<Budget, PolicyError> {
        let invalid = |detail: String| PolicyError::Invalid {
            rule: config.id.clone(),
            detail,
        };
        if config.terms.is_empty() {
            return Err(invalid("a budget needs at least one term".into()));
        }
        if !(config.max_fraction.is_finite() && config.max_fraction > 0.0) {
            return Err(invalid(format!(
                "max_fraction must be above 0, not {}",
                config.max_fraction
            )));
        }
        let terms: Vec<Vec<String>> = config.terms.iter().map(|t| segments(t)).collect();
        let stars = |t: &[String]| t.iter().filter(|s| *s == "*").count();
        let n = stars(&terms[0]);
        for (t, text) in terms.iter().zip(&config.terms) {
            if stars(t) != n {
                return Err(invalid(format!(
                    "every term needs the same number of `*` segments; `{text}` differs"
                )));
            }
            if let Some(bad) = t
                .iter()
                .find(|s| *s != "*" && (s.contains(['*', '?', '[', '{']) || ResourcePath::parse(s).is_err()))
            {
                return Err(invalid(format!(
                    "`{text}`: segment `{bad}` must be a plain name or `*` (a whole segment)"
                )));
            }
        }
        let bounds = config
            .terms
            .iter()
            .map(|t| {
                let head = t.split('*').next().unwrap_or_default().to_string();
                let tail = t.rsplit('*').next().unwrap_or_default().to_string();
                (head, tail)
            })
            .collect();
        Ok(Budget { config, terms, bounds })
    }

    /// The captures of `path` under term `t`, if it matches.
    fn captures(&self, t: usize, path: &str) -> Option<Vec<String>> {
        let (head, tail) = &self.bounds[t];
        if !path.starts_with(head.as_str()) || !path.ends_with(tail.as_str()) {
            return None;
        }
        let pattern = &self.terms[t];
        let segs: Vec<&str> = path.split('/').collect();
        if segs.len() != pattern.len() {
            return None;
        }
        let mut caps = Vec::new();
        for (p, s) in pattern.iter().zip(&segs) {
            if p == "*" {
                caps.push((*s).to_string());
            } else if p != s {
                return None;
            }
        }
        Some(caps)
    }

    /// Term `t`'s path for a capture.
    fn path(&self, t: usize, caps: &[String]) -> Option<ResourcePath> {
        let mut it = caps.iter();
        let text: Vec<&str> = self.terms[t]
            .iter()
            .map(|s| {
                if s == "*" {
                    it.next().map(String::as_str).unwrap_or("")
                } else {
                    s.as_str()
                }
            })
            .collect();
        ResourcePath::parse(&text.join("/")).ok()
    }

    /// Whether `path` is one this rule reads.
    pub fn reads(&self, path: &ResourcePath) -> bool {
        path == &self.config.limit || (0..self.terms.len()).any(|t| self.captures(t, path.as_str()).is_some())
    }

    /// Evaluates the rule in every distinct state of `run`.
    pub(crate) fn evaluate(&self, run: &Run<'_>) -> RuleResult {
        let id = self.config.id.clone();
        let outcome = self.config.outcome.verdict();
        let result = |status, outcome, at: Option<String>, pre_existing, figures, message| RuleResult {
            id: id.clone(),
            status,
            outcome,
            at,
            pre_existing,
            figures,
            message,
        };
        if !run.touched.iter().any(|p| self.reads(p)) {
            return result(
                RuleStatus::Skipped,
                outcome,
                None,
                false,
                BTreeMap::new(),
                "reads no path this plan touches".to_string(),
            );
        }
        let number = |v: Option<&Value>| v.and_then(Value::as_f64);
        // Base contributions per capture, from the world the plan starts in.
        let contribution = |get: &dyn Fn(&ResourcePath) -> Option<f64>, caps: &[String]| -> f64 {
            let mut product = 1.0;
            for t in 0..self.terms.len() {
                match self.path(t, caps).and_then(|p| get(&p)) {
                    Some(v) => product *= v,
                    None => return 0.0,
                }
            }
            product
        };
        let base_get = |p: &ResourcePath| number(run.base.get(p));
        // One visit per term prefix, grouping the terms' values by capture.
        let n = self.terms.len();
        let mut grouped: BTreeMap<Vec<String>, Vec<Option<f64>>> = BTreeMap::new();
        for (t, (head, _)) in self.bounds.iter().enumerate() {
            run.base.visit_prefix(head, |p, v| {
                if let Some(caps) = self.captures(t, p.as_str()) {
                    grouped.entry(caps).or_insert_with(|| vec![None; n])[t] = v.as_f64();
                }
            });
        }
        let base_total: f64 = grouped
            .values()
            .filter_map(|vals| vals.iter().copied().collect::<Option<Vec<f64>>>())
            .map(|vals| vals.iter().product::<f64>())
            .sum();
        let evaluate_state = |changes: &Overlay| -> Result<(f64, f64), String> {
            let get = |p: &ResourcePath| match changes.get(p) {
                Some(v) => number(v.as_ref()),
                None => base_get(p),
            };
            let mut touched: BTreeSet<Vec<String>> = BTreeSet::new();
            for p in changes.keys() {
                for t in 0..self.terms.len() {
                    if let Some(c) = self.captures(t, p.as_str()) {
                        touched.insert(c);
                    }
                }
            }
            let mut total = base_total;
            for caps in &touched {
                total += contribution(&get, caps) - contribution(&base_get, caps);
            }
            let limit =
                get(&self.config.limit).ok_or_else(|| format!("the limit `{}` holds no number", self.config.limit))?;
            Ok((total, limit))
        };
        let figures = |total: f64, limit: f64| {
            let mut f = BTreeMap::new();
            f.insert("total".to_string(), Value::Float(total));
            f.insert("limit".to_string(), Value::Float(limit));
            f.insert("budget".to_string(), Value::Float(limit * self.config.max_fraction));
            f
        };
        let describe = if self.config.description.is_empty() {
            format!(
                "sum of {} stays within {} of `{}`",
                self.config.terms.join(" x "),
                self.config.max_fraction,
                self.config.limit
            )
        } else {
            self.config.description.clone()
        };
        let mut seen: Vec<Overlay> = Vec::new();
        for state in &run.states {
            let restricted: Overlay = state
                .changes
                .iter()
                .filter(|(p, _)| self.reads(p))
                .map(|(p, v)| (p.clone(), v.clone()))
                .collect();
            if seen.contains(&restricted) {
                continue;
            }
            let (total, limit) = match evaluate_state(&restricted) {
                Ok(x) => x,
                Err(e) => {
                    return result(
                        RuleStatus::Error,
                        outcome,
                        Some(state.label.clone()),
                        false,
                        BTreeMap::new(),
                        format!("evaluation failed {} (fails closed): {e}", state.label),
                    );
                }
            };
            if total > limit * self.config.max_fraction {
                let pre_existing = evaluate_state(&Overlay::new())
                    .map(|(t, l)| t > l * self.config.max_fraction)
                    .unwrap_or(false);
                let budget = limit * self.config.max_fraction;
                return result(
                    RuleStatus::Fail,
                    if pre_existing {
                        Verdict::NeedsApproval.min(outcome)
                    } else {
                        outcome
                    },
                    Some(state.label.clone()),
                    pre_existing,
                    figures(total, limit),
                    if pre_existing {
                        format!(
                            "already over budget before this plan, a human decides (total={total}, budget={budget}): {describe}"
                        )
                    } else {
                        format!("broken {} (total={total}, budget={budget}): {describe}", state.label)
                    },
                );
            }
            seen.push(restricted);
        }
        let end: Overlay = run
            .final_changes
            .iter()
            .filter(|(p, _)| self.reads(p))
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect();
        let f = evaluate_state(&end).map(|(t, l)| figures(t, l)).unwrap_or_default();
        result(
            RuleStatus::Pass,
            outcome,
            None,
            false,
            f,
            format!("holds in every state: {describe}"),
        )
    }
}
