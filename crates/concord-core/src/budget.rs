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
//!
//! The base sum is taken from the world alone, then corrected for the paths
//! the base's overlay (the plans in flight) changes, then for each state's
//! changes. The world's term values can come from a [`BudgetIndex`] that
//! the coordinator keeps up to date as it applies steps, so a decision does
//! not visit every service: with or without one, the same values are summed
//! in the same order, and the figures agree to the bit.

use std::collections::BTreeMap;

use concord_proto::ResourcePath;
use concord_proto::preview::{RuleResult, RuleStatus};
use concord_proto::{Value, Verdict};
use serde::{Deserialize, Serialize};

use crate::policy::{Outcome, Policy, PolicyError, Segment, segments_match, simple_segments};
use crate::preview::Run;
use crate::world::{Overlay, World, scan_prefix};

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
    /// The distinct term prefixes, sorted: where the rule's paths lie.
    heads: Vec<String>,
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
        let bounds: Vec<(String, String)> = config
            .terms
            .iter()
            .map(|t| {
                let head = t.split('*').next().unwrap_or_default().to_string();
                let tail = t.rsplit('*').next().unwrap_or_default().to_string();
                (head, tail)
            })
            .collect();
        let single = terms.iter().map(|t| n == 1 && t.len() > 1).collect();
        let mut heads: Vec<String> = bounds.iter().map(|(h, _)| h.clone()).collect();
        heads.sort_unstable();
        heads.dedup();
        Ok(Budget {
            config,
            terms,
            bounds,
            stars: n,
            single,
            heads,
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

    /// The distinct term prefixes.
    fn heads(&self) -> impl Iterator<Item = &str> {
        self.heads.iter().map(String::as_str)
    }

    /// The world's term values per capture: one visit per distinct term
    /// prefix. Paths arrive in order, so a capture is usually the last one
    /// seen or a new last one.
    fn world_groups(&self, world: &World) -> Groups<Box<str>> {
        let n = self.terms.len();
        let mut groups: Groups<Box<str>> = Groups::new(self.stars, n);
        let mut caps: Vec<&str> = Vec::new();
        for head in self.heads() {
            let under: Vec<usize> = (0..n).filter(|&t| self.bounds[t].0 == head).collect();
            for (p, v) in world.scan_prefix(head) {
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
                    let (i, _) = groups.entry(&caps);
                    groups.vals_mut(i)[t] = v.as_f64();
                }
            }
        }
        groups.prune();
        groups
    }

    /// Sets the value of `path` in the world's term values (`None`: removed
    /// or not a number), if the rule reads it.
    fn update(&self, groups: &mut Groups<Box<str>>, path: &ResourcePath, value: Option<f64>) {
        let mut caps: Vec<&str> = Vec::new();
        for t in 0..self.terms.len() {
            if !self.capture(t, path.as_str(), &mut caps) {
                continue;
            }
            let (i, _) = groups.entry(&caps);
            groups.vals_mut(i)[t] = value;
            if groups.vals(i).iter().all(Option::is_none) {
                groups.remove(i);
            }
        }
    }

    /// Whether `path` matches term `t`.
    fn matches(&self, t: usize, path: &str) -> bool {
        let (head, tail) = &self.bounds[t];
        if !ends_with(path, tail) || !path.starts_with(head.as_str()) {
            return false;
        }
        segments_match(&self.terms[t], path)
    }

    /// Whether `overlay` changes a path this rule reads.
    pub(crate) fn reads_any(&self, overlay: &Overlay) -> bool {
        overlay.contains_key(&self.config.limit)
            || self
                .heads()
                .any(|head| scan_prefix(overlay, head).any(|(p, _)| self.reads(p)))
    }

    /// Whether `path` is one this rule reads.
    pub fn reads(&self, path: &ResourcePath) -> bool {
        path == &self.config.limit || (0..self.terms.len()).any(|t| self.matches(t, path.as_str()))
    }

    /// Evaluates the rule in every distinct state of `run`.
    pub(crate) fn evaluate(&self, run: &Run<'_>, position: usize) -> RuleResult {
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
        let n = self.terms.len();
        // The world's term values per capture: kept by the index, or found
        // with one visit per distinct term prefix.
        let built;
        let world: &Groups<Box<str>> = match base.budget_index().and_then(|ix| ix.rule(position, self)) {
            Some(g) => {
                debug_assert!(
                    *g == self.world_groups(base.world()),
                    "budget index of `{}` is out of date",
                    self.config.id
                );
                g
            }
            None => {
                built = self.world_groups(base.world());
                &built
            }
        };
        // Either way the rule read these prefixes (the coordinator asks
        // whether a preview read anything the plans in flight change).
        for head in self.heads() {
            base.note_scanned(head);
        }
        // The plans in flight change some of those values: their captures,
        // with the values as the base holds them.
        let mut patch: Groups<&str> = Groups::new(self.stars, n);
        if let Some(overlay) = base.overlay() {
            let mut caps: Vec<&str> = Vec::new();
            for head in self.heads() {
                for (p, v) in scan_prefix(overlay, head) {
                    for t in (0..n).filter(|&t| self.bounds[t].0 == head) {
                        if !self.capture(t, p.as_str(), &mut caps) {
                            continue;
                        }
                        let (i, new) = patch.entry(&caps);
                        if new {
                            world.copy_vals(&caps, patch.vals_mut(i));
                        }
                        patch.vals_mut(i)[t] = number(v.as_ref());
                    }
                }
            }
        }
        // A capture's values in the base: the overlay's, else the world's.
        let base_vals = |caps: &[&str], out: &mut [Option<f64>]| {
            if !patch.copy_vals(caps, out) {
                world.copy_vals(caps, out);
            }
        };
        let mut base_total = world.total();
        let mut was: Vec<Option<f64>> = vec![None; n];
        for i in 0..patch.len {
            world.copy_vals(patch.key(i), &mut was);
            base_total += product(patch.vals(i)) - product(&was);
        }
        let base_limit = number(base.get(&self.config.limit));
        // What the states can change, found once: the touched paths this
        // rule reads (a state changes only touched paths), each with the
        // (capture, term) pairs it holds, and each capture's values in the
        // base. Captures are kept in key order, the order the sum runs in.
        let mut caps: Vec<&str> = Vec::new();
        let mut keys: Vec<Vec<&str>> = Vec::new();
        let mut read: Vec<(&ResourcePath, Vec<(usize, usize)>)> = Vec::new();
        for p in &run.touched {
            let mut terms = Vec::new();
            for t in 0..n {
                if self.capture(t, p.as_str(), &mut caps) {
                    let c = match keys.iter().position(|k| *k == caps) {
                        Some(c) => c,
                        None => {
                            keys.push(caps.clone());
                            keys.len() - 1
                        }
                    };
                    terms.push((c, t));
                }
            }
            if !terms.is_empty() || *p == self.config.limit {
                read.push((p, terms));
            }
        }
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&a, &b| keys[a].cmp(&keys[b]));
        let mut rank = vec![0; keys.len()];
        for (r, &c) in order.iter().enumerate() {
            rank[c] = r;
        }
        for (_, terms) in &mut read {
            for (c, _) in terms.iter_mut() {
                *c = rank[*c];
            }
        }
        let mut before: Vec<Option<f64>> = vec![None; n * keys.len()];
        for (&c, vals) in order.iter().zip(before.chunks_mut(n.max(1))) {
            base_vals(&keys[c], vals);
        }
        let before_product: Vec<f64> = before.chunks(n.max(1)).map(product).collect();
        let limit_at = read.iter().position(|(p, _)| **p == self.config.limit);
        // A state's changes to the paths this rule reads, as (position in
        // `read`, new value), in path order.
        type Restricted<'a> = Vec<(usize, &'a Option<Value>)>;
        let restrict = |changes| restrict(&read, changes);
        let mut now: Vec<Option<f64>> = Vec::with_capacity(before.len());
        let mut changed: Vec<bool> = vec![false; keys.len()];
        let mut evaluate_state = |changes: &Restricted<'_>| -> Result<(f64, f64), String> {
            now.clear();
            now.extend_from_slice(&before);
            changed.fill(false);
            let mut limit = base_limit;
            for &(i, v) in changes {
                for &(c, t) in &read[i].1 {
                    now[c * n + t] = number(v.as_ref());
                    changed[c] = true;
                }
                if Some(i) == limit_at {
                    limit = number(v.as_ref());
                }
            }
            let mut total = base_total;
            for c in (0..keys.len()).filter(|&c| changed[c]) {
                total += product(&now[c * n..(c + 1) * n]) - before_product[c];
            }
            let limit = limit.ok_or_else(|| format!("the limit `{}` holds no number", self.config.limit))?;
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
            let restricted = restrict(&state.changes);
            if seen.contains(&restricted) {
                continue;
            }
            let (total, limit) = match evaluate_state(&restricted) {
                Ok(x) => x,
                Err(e) => {
                    return result(
                        RuleStatus::Error,
                        outcome,
                        Some(state.label.to_string()),
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
                    Some(state.label.to_string()),
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
        let end = restrict(&run.final_changes);
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

/// `changes` to the paths of `read` (both in path order), as (position in
/// `read`, new value).
fn restrict<'c, T>(read: &[(&ResourcePath, T)], changes: &'c Overlay) -> Vec<(usize, &'c Option<Value>)> {
    let mut out = Vec::new();
    let mut at = 0;
    for (p, v) in changes {
        while at < read.len() && read[at].0 < p {
            at += 1;
        }
        if at < read.len() && read[at].0 == p {
            out.push((at, v));
        }
    }
    out
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
/// Captures are borrowed (`&str`, for one evaluation) or owned (`Box<str>`,
/// in the index).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Groups<S> {
    k: usize,
    n: usize,
    len: usize,
    caps: Vec<S>,
    vals: Vec<Option<f64>>,
}

impl<S: AsRef<str>> Groups<S> {
    fn new(k: usize, n: usize) -> Self {
        Groups {
            k,
            n,
            len: 0,
            caps: Vec::new(),
            vals: Vec::new(),
        }
    }

    fn key(&self, i: usize) -> &[S] {
        &self.caps[i * self.k..(i + 1) * self.k]
    }

    fn vals(&self, i: usize) -> &[Option<f64>] {
        &self.vals[i * self.n..(i + 1) * self.n]
    }

    fn vals_mut(&mut self, i: usize) -> &mut [Option<f64>] {
        &mut self.vals[i * self.n..(i + 1) * self.n]
    }

    fn cmp_key(&self, i: usize, caps: &[impl AsRef<str>]) -> std::cmp::Ordering {
        self.key(i)
            .iter()
            .map(AsRef::as_ref)
            .cmp(caps.iter().map(AsRef::as_ref))
    }

    /// The group of `caps`, or where it would go. Paths arrive in order, so
    /// a capture is usually the last one or a new last one.
    fn find(&self, caps: &[impl AsRef<str>]) -> Result<usize, usize> {
        if self.len == 0 {
            return Err(0);
        }
        match self.cmp_key(self.len - 1, caps) {
            std::cmp::Ordering::Equal => Ok(self.len - 1),
            std::cmp::Ordering::Less => Err(self.len),
            std::cmp::Ordering::Greater => {
                let (mut lo, mut hi) = (0, self.len - 1);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    match self.cmp_key(mid, caps) {
                        std::cmp::Ordering::Equal => return Ok(mid),
                        std::cmp::Ordering::Less => lo = mid + 1,
                        std::cmp::Ordering::Greater => hi = mid,
                    }
                }
                Err(lo)
            }
        }
    }

    /// Copies the values of `caps` into `out` (all `None` if it has no
    /// group); whether it has one.
    fn copy_vals(&self, caps: &[impl AsRef<str>], out: &mut [Option<f64>]) -> bool {
        match self.find(caps) {
            Ok(g) => {
                out.copy_from_slice(self.vals(g));
                true
            }
            Err(_) => {
                out.fill(None);
                false
            }
        }
    }

    /// The group of `caps`, and whether it is new (added with no values).
    fn entry<'a>(&mut self, caps: &[&'a str]) -> (usize, bool)
    where
        S: From<&'a str>,
    {
        match self.find(caps) {
            Ok(i) => (i, false),
            Err(i) => {
                self.caps
                    .splice(i * self.k..i * self.k, caps.iter().map(|c| S::from(*c)));
                self.vals
                    .splice(i * self.n..i * self.n, std::iter::repeat_n(None, self.n));
                self.len += 1;
                (i, true)
            }
        }
    }

    /// Removes group `i`.
    fn remove(&mut self, i: usize) {
        self.caps.drain(i * self.k..(i + 1) * self.k);
        self.vals.drain(i * self.n..(i + 1) * self.n);
        self.len -= 1;
    }

    /// Removes the groups with no value: what [`Budget::update`] leaves
    /// after a removal, so that a kept index and a fresh one are equal.
    fn prune(&mut self) {
        let mut i = 0;
        while i < self.len {
            if self.vals(i).iter().all(Option::is_none) {
                self.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// The sum of the products, in capture order.
    fn total(&self) -> f64 {
        (0..self.len).map(|i| product(self.vals(i))).sum()
    }
}

/// The world's term values for every budget rule of a policy. The
/// coordinator keeps one, updated as it applies steps, so that a decision
/// reads the values of the services a budget sums instead of visiting them
/// all; with none, a preview visits them. Derived from the world and the
/// policy alone, and rebuilt from them (it is not part of a snapshot).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetIndex {
    /// Per budget rule, in policy order: its terms (what the values were
    /// found for) and the values.
    rules: Vec<(Vec<String>, Groups<Box<str>>)>,
}

impl BudgetIndex {
    /// The index of `world` for `policy`'s budget rules.
    pub fn build(policy: &Policy, world: &World) -> Self {
        BudgetIndex {
            rules: policy
                .budgets
                .iter()
                .map(|b| (b.config.terms.clone(), b.world_groups(world)))
                .collect(),
        }
    }

    /// Whether this index was built for `policy`'s budget rules.
    pub fn built_for(&self, policy: &Policy) -> bool {
        self.rules.len() == policy.budgets.len()
            && self
                .rules
                .iter()
                .zip(&policy.budgets)
                .all(|((terms, _), b)| *terms == b.config.terms)
    }

    /// Records that the world now holds `value` at `path` (`None`: removed).
    /// `policy` must be the one the index was built for.
    pub fn set(&mut self, policy: &Policy, path: &ResourcePath, value: Option<&Value>) {
        let number = value.and_then(Value::as_f64);
        for ((_, groups), b) in self.rules.iter_mut().zip(&policy.budgets) {
            b.update(groups, path, number);
        }
    }

    /// The values of budget rule `position`, if this index holds them for `rule`.
    fn rule(&self, position: usize, rule: &Budget) -> Option<&Groups<Box<str>>> {
        self.rules
            .get(position)
            .filter(|(terms, _)| *terms == rule.config.terms)
            .map(|(_, g)| g)
    }
}
