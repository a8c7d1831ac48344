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

use std::collections::BTreeMap;

use concord_proto::ResourcePath;
use concord_proto::preview::{RuleResult, RuleStatus};
use concord_proto::{Value, Verdict};
use serde::{Deserialize, Serialize};

use crate::policy::{Outcome, PolicyError, Segment, segments_match, simple_segments};
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
    terms: Vec<Vec<Segment>>,
    /// Per term: the literal text before its first `*` (where matches start)
    /// and after its last `*` (a cheap test before splitting a path).
    bounds: Vec<(String, String)>,
    /// `*` segments per term (the same in every term).
    stars: usize,
    /// Per term: whether it is `head*tail` with a single `*` segment.
    single: Vec<bool>,
}

/// Whether `text` ends with `tail`, compared from the last byte: most paths
/// under a term's prefix differ from its tail at once (`.../version` is not
/// `.../pool_size`), and a byte loop rejects them without a library call.
fn ends_with(text: &str, tail: &str) -> bool {
    let (text, tail) = (text.as_bytes(), tail.as_bytes());
    text.len() >= tail.len() && text.iter().rev().zip(tail.iter().rev()).all(|(a, b)| a == b)
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
        let mut terms: Vec<Vec<Segment>> = Vec::new();
        for text in &config.terms {
            let bad = text
                .split('/')
                .find(|s| *s != "*" && (s.contains(['*', '?', '[', '{']) || ResourcePath::parse(s).is_err()));
            match (bad, simple_segments(text)) {
                (None, Some(segs)) => terms.push(segs),
                (bad, _) => {
                    return Err(invalid(format!(
                        "`{text}`: segment `{}` must be a plain name or `*` (a whole segment)",
                        bad.unwrap_or(text)
                    )));
                }
            }
        }
        let stars = |t: &[Segment]| t.iter().filter(|s| **s == Segment::Any).count();
        let n = stars(&terms[0]);
        for (t, text) in terms.iter().zip(&config.terms) {
            if stars(t) != n {
                return Err(invalid(format!(
                    "every term needs the same number of `*` segments; `{text}` differs"
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
        let single = terms.iter().map(|t| n == 1 && t.len() > 1).collect();
        Ok(Budget {
            config,
            terms,
            bounds,
            stars: n,
            single,
        })
    }

    /// Whether `path` matches term `t`; its captures, in order, go to `caps`
    /// (cleared first). Borrows from `path`: nothing is allocated.
    fn capture<'p>(&self, t: usize, path: &'p str, caps: &mut Vec<&'p str>) -> bool {
        caps.clear();
        let (head, tail) = &self.bounds[t];
        if !ends_with(path, tail) || !path.starts_with(head.as_str()) {
            return false;
        }
        if self.single[t] {
            // `head*tail` with one whole-segment `*`: the capture is what lies
            // between, if it is one non-empty segment.
            let Some(middle) = path.get(head.len()..path.len() - tail.len()) else {
                return false;
            };
            if path.len() < head.len() + tail.len() || middle.is_empty() || middle.bytes().any(|b| b == b'/') {
                return false;
            }
            caps.push(middle);
            return true;
        }
        // Segments are short: a byte loop finds their ends faster than a
        // vectorised search that must first set itself up.
        let bytes = path.as_bytes();
        let pattern = &self.terms[t];
        let mut start = 0;
        for (i, p) in pattern.iter().enumerate() {
            let mut end = start;
            while end < bytes.len() && bytes[end] != b'/' {
                end += 1;
            }
            let last = i + 1 == pattern.len();
            if last != (end == bytes.len()) {
                return false;
            }
            let seg = &path[start..end];
            match p {
                Segment::Any => caps.push(seg),
                Segment::Literal(l) if l != seg => return false,
                Segment::Literal(_) => {}
            }
            start = end + 1;
        }
        true
    }

    /// Whether `path` matches term `t`.
    fn matches(&self, t: usize, path: &str) -> bool {
        let (head, tail) = &self.bounds[t];
        if !ends_with(path, tail) || !path.starts_with(head.as_str()) {
            return false;
        }
        segments_match(&self.terms[t], path)
    }

    /// The changes to paths this rule reads, in path order.
    fn restrict<'a>(&self, changes: &'a Overlay) -> Vec<(&'a ResourcePath, &'a Option<Value>)> {
        changes.iter().filter(|(p, _)| self.reads(p)).collect()
    }

    /// Whether `path` is one this rule reads.
    pub fn reads(&self, path: &ResourcePath) -> bool {
        path == &self.config.limit || (0..self.terms.len()).any(|t| self.matches(t, path.as_str()))
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
        let base = run.base;
        // Base values per capture, from the world the plan starts in: one
        // visit per distinct term prefix, captures borrowed from the paths,
        // kept sorted by capture. Paths arrive in order, so a capture is
        // usually the last one seen or a new last one.
        let n = self.terms.len();
        let mut groups = Groups::new(self.stars, n);
        let mut caps: Vec<&str> = Vec::new();
        let mut heads: Vec<&str> = self.bounds.iter().map(|(h, _)| h.as_str()).collect();
        heads.sort_unstable();
        heads.dedup();
        for head in heads {
            let under: Vec<usize> = (0..n).filter(|&t| self.bounds[t].0 == head).collect();
            base.visit_prefix(head, |p, v| {
                for &t in &under {
                    // Most paths under the prefix end otherwise: reject them
                    // on their last byte before anything else.
                    if self.bounds[t]
                        .1
                        .as_bytes()
                        .last()
                        .is_some_and(|b| p.as_str().as_bytes().last() != Some(b))
                        || !self.capture(t, p.as_str(), &mut caps)
                    {
                        continue;
                    }
                    let i = groups.entry(&caps);
                    groups.vals_mut(i)[t] = v.as_f64();
                }
            });
        }
        let base_total: f64 = (0..groups.len)
            .filter_map(|i| groups.vals(i).iter().copied().collect::<Option<Vec<f64>>>())
            .map(|vals| vals.iter().product::<f64>())
            .sum();
        let base_limit = number(base.get(&self.config.limit));
        // A state's changes to the paths this rule reads, in path order.
        type Restricted<'a> = Vec<(&'a ResourcePath, &'a Option<Value>)>;
        let evaluate_state = |changes: &Restricted<'_>| -> Result<(f64, f64), String> {
            // The changed terms: (capture, term, new value), captures flat.
            let mut caps: Vec<&str> = Vec::new();
            let mut flat: Vec<&str> = Vec::new();
            let mut changed: Vec<(usize, usize, Option<f64>)> = Vec::new();
            for (p, v) in changes {
                for t in 0..n {
                    if self.capture(t, p.as_str(), &mut caps) {
                        changed.push((flat.len(), t, number(v.as_ref())));
                        flat.extend_from_slice(&caps);
                    }
                }
            }
            let k = self.stars;
            let key = |at: usize| &flat[at..at + k];
            // Stable: a path's terms keep their order within a capture.
            changed.sort_by(|a, b| key(a.0).cmp(key(b.0)));
            let mut total = base_total;
            let mut before: Vec<Option<f64>> = vec![None; n];
            let mut now: Vec<Option<f64>> = vec![None; n];
            let mut i = 0;
            while i < changed.len() {
                let caps = key(changed[i].0);
                match groups.find(caps) {
                    Ok(g) => before.copy_from_slice(groups.vals(g)),
                    Err(_) => before.fill(None),
                }
                now.copy_from_slice(&before);
                while i < changed.len() && key(changed[i].0) == caps {
                    now[changed[i].1] = changed[i].2;
                    i += 1;
                }
                total += product(&now) - product(&before);
            }
            let limit = match changes.binary_search_by(|(k, _)| (*k).cmp(&self.config.limit)) {
                Ok(i) => number(changes[i].1.as_ref()),
                Err(_) => base_limit,
            }
            .ok_or_else(|| format!("the limit `{}` holds no number", self.config.limit))?;
            Ok((total, limit))
        };
        let figures = |total: f64, limit: f64| {
            let mut f = BTreeMap::new();
            f.insert("total".to_string(), Value::Float(total));
            f.insert("limit".to_string(), Value::Float(limit));
            f.insert("budget".to_string(), Value::Float(limit * self.config.max_fraction));
            f
        };
        let describe = || {
            if self.config.description.is_empty() {
                format!(
                    "sum of {} stays within {} of `{}`",
                    self.config.terms.join(" x "),
                    self.config.max_fraction,
                    self.config.limit
                )
            } else {
                self.config.description.clone()
            }
        };
        let mut seen: Vec<Restricted<'_>> = Vec::new();
        for state in &run.states {
            let restricted = self.restrict(&state.changes);
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
                let pre_existing = evaluate_state(&Vec::new())
                    .map(|(t, l)| t > l * self.config.max_fraction)
                    .unwrap_or(false);
                let budget = limit * self.config.max_fraction;
                let describe = describe();
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
        let end = self.restrict(&run.final_changes);
        let f = evaluate_state(&end).map(|(t, l)| figures(t, l)).unwrap_or_default();
        result(
            RuleStatus::Pass,
            outcome,
            None,
            false,
            f,
            format!("holds in every state: {}", describe()),
        )
    }
}

/// A capture's product, multiplied in term order; a missing or non-numeric
/// term makes it contribute nothing.
fn product(vals: &[Option<f64>]) -> f64 {
    let mut product = 1.0;
    for v in vals {
        match v {
            Some(v) => product *= v,
            None => return 0.0,
        }
    }
    product
}

/// Term values per capture, sorted by capture, stored flat (`k` captures
/// and `n` values per group) so that a group costs no allocation of its own.
struct Groups<'a> {
    k: usize,
    n: usize,
    len: usize,
    caps: Vec<&'a str>,
    vals: Vec<Option<f64>>,
}

impl<'a> Groups<'a> {
    fn new(k: usize, n: usize) -> Self {
        Groups {
            k,
            n,
            len: 0,
            caps: Vec::new(),
            vals: Vec::new(),
        }
    }

    fn key(&self, i: usize) -> &[&'a str] {
        &self.caps[i * self.k..(i + 1) * self.k]
    }

    fn vals(&self, i: usize) -> &[Option<f64>] {
        &self.vals[i * self.n..(i + 1) * self.n]
    }

    fn vals_mut(&mut self, i: usize) -> &mut [Option<f64>] {
        &mut self.vals[i * self.n..(i + 1) * self.n]
    }

    /// The group of `caps`, or where it would go. Paths arrive in order, so
    /// a capture is usually the last one or a new last one.
    fn find(&self, caps: &[&str]) -> Result<usize, usize> {
        if self.len == 0 {
            return Err(0);
        }
        match self.key(self.len - 1).cmp(caps) {
            std::cmp::Ordering::Equal => Ok(self.len - 1),
            std::cmp::Ordering::Less => Err(self.len),
            std::cmp::Ordering::Greater => {
                let (mut lo, mut hi) = (0, self.len - 1);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    match self.key(mid).cmp(caps) {
                        std::cmp::Ordering::Equal => return Ok(mid),
                        std::cmp::Ordering::Less => lo = mid + 1,
                        std::cmp::Ordering::Greater => hi = mid,
                    }
                }
                Err(lo)
            }
        }
    }

    /// The group of `caps`, added (with no values) if new.
    fn entry(&mut self, caps: &[&'a str]) -> usize {
        match self.find(caps) {
            Ok(i) => i,
            Err(i) if i == self.len => {
                self.caps.extend_from_slice(caps);
                self.vals.resize(self.vals.len() + self.n, None);
                self.len += 1;
                i
            }
            Err(i) => {
                self.caps.splice(i * self.k..i * self.k, caps.iter().copied());
                self.vals
                    .splice(i * self.n..i * self.n, std::iter::repeat_n(None, self.n));
                self.len += 1;
                i
            }
        }
    }
}
