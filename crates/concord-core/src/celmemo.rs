//! Results of CEL rules over the plan alone, remembered by what they read.
//!
//! A rule's expression or figure that reads neither `before` nor `after` is
//! a function of the plan (and the agent) only, and most read a few fields
//! of each step:
//! `plan.steps.all(s, !(s.kind in [...]) || s.confidence >= 0.9)` reads each
//! step's kind and confidence, never a value the step sets. An agent's plans
//! mostly repeat those fields while the values change, so the rule's verdict
//! and each figure are remembered under the fields each can read, found by
//! reading the compiled expressions once: if every use of `plan` and of a
//! step is one of the forms below, nothing else of the plan can reach the
//! result. The verdict of the shipped confidence rule reads kinds and
//! confidences; its figure reads step ids besides.
//!
//! - `plan.lineage`, `plan.version`, `plan.goal` (and `has(plan.x)`);
//! - `plan.steps`, or a `filter` of it, as the range of a macro (`all`,
//!   `exists`, `exists_one`, `filter`, `map`) or in `size(..)`;
//! - inside such a macro, its step variable only as `s.id`, `s.kind`,
//!   `s.path` or `s.confidence` (and `has(s.x)`).
//!
//! `agent` may be used in any way: its whole value (id, autonomy) is part of
//! the key. Anything else (a step or `plan` as a whole, `plan.steps[0]`, a
//! step's `args`, a two-variable comprehension, `before` or `after`, a name
//! with a leading dot, a map literal) leaves that expression unremembered.
//! A remembered result is the one a fresh evaluation gives: debug builds
//! evaluate again on every hit and compare.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cel::common::ast::{Expr, IdedExpr};
use concord_proto::{Intent, Value};

/// The step fields a rule may read and be remembered: in key order.
const STEP_FIELDS: [&str; 4] = ["id", "kind", "path", "confidence"];
/// The plan fields a rule may read and be remembered: in key order.
const PLAN_FIELDS: [&str; 3] = ["lineage", "version", "goal"];
/// The most keys a rule remembers; past it, it starts over (results do not
/// depend on what is remembered, only the time to find them does).
pub(crate) const MEMO_ENTRIES_MAX: usize = 256;

/// What of the plan and the agent a rule's expressions can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reads {
    plan: [bool; PLAN_FIELDS.len()],
    step: [bool; STEP_FIELDS.len()],
    agent: bool,
}

/// A rule's remembered results: for its expression and each figure that
/// can be keyed, what it gave under each key.
#[derive(Debug)]
pub(crate) struct Memo {
    /// What each program reads, if it can be keyed: the rule's expression
    /// first, then each figure's, in the rule's figure order.
    reads: Vec<Option<Reads>>,
    entries: Mutex<BTreeMap<Box<[u8]>, Remembered>>,
}

/// What one program gave for one key.
#[derive(Clone, Debug)]
pub(crate) enum Remembered {
    /// The rule's verdict.
    Verdict(crate::preview::Eval),
    /// A figure's value.
    Figure(Value),
}

/// A plan as a memo keys it: the intent, and the agent with its autonomy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keyed<'a> {
    pub(crate) intent: &'a Intent,
    pub(crate) agent: &'a str,
    pub(crate) autonomy: &'a str,
}

impl Memo {
    /// A memo for a rule whose expression and figures are `programs`, if
    /// any of them reads only what a key holds.
    pub(crate) fn for_programs<'p>(programs: impl IntoIterator<Item = &'p cel::Program>) -> Option<Memo> {
        let reads: Vec<Option<Reads>> = programs
            .into_iter()
            .map(|p| {
                let mut reads = Reads::default();
                walk(p.expression(), &mut Vec::new(), &mut reads).ok().map(|()| reads)
            })
            .collect();
        reads.iter().any(Option::is_some).then(|| Memo {
            reads,
            entries: Mutex::new(BTreeMap::new()),
        })
    }

    /// The rule's verdict on `plan`: remembered, or `compute`d and
    /// remembered. Debug builds compute it on a hit too, and compare.
    pub(crate) fn verdict(&self, plan: Keyed<'_>, compute: impl Fn() -> crate::preview::Eval) -> crate::preview::Eval {
        self.get_or(0, plan, compute, Remembered::Verdict, |r| match r {
            Remembered::Verdict(e) => Some(e),
            Remembered::Figure(_) => None,
        })
    }

    /// Figure `i`'s value on `plan`, as [`Memo::verdict`].
    pub(crate) fn figure(&self, i: usize, plan: Keyed<'_>, compute: impl Fn() -> Value) -> Value {
        self.get_or(1 + i, plan, compute, Remembered::Figure, |r| match r {
            Remembered::Figure(v) => Some(v),
            Remembered::Verdict(_) => None,
        })
    }

    fn get_or<T: Clone + std::fmt::Debug>(
        &self,
        program: usize,
        plan: Keyed<'_>,
        compute: impl Fn() -> T,
        wrap: fn(T) -> Remembered,
        unwrap: fn(&Remembered) -> Option<&T>,
    ) -> T {
        let Some(key) = self.key(program, plan) else {
            return compute();
        };
        if let Some(v) = self.lock().get(&key).and_then(unwrap).cloned() {
            // Compared as printed: a NaN figure is remembered as itself.
            debug_assert_eq!(format!("{v:?}"), format!("{:?}", compute()), "a remembered CEL result");
            return v;
        }
        let v = compute();
        let mut entries = self.lock();
        if entries.len() >= MEMO_ENTRIES_MAX {
            entries.clear();
        }
        entries.insert(key, wrap(v.clone()));
        v
    }

    /// The key of `plan` for `program`, if it can be keyed: the program's
    /// number, then the fields it can read, each length-prefixed, with the
    /// number of steps.
    fn key(&self, program: usize, plan: Keyed<'_>) -> Option<Box<[u8]>> {
        let reads = (*self.reads.get(program)?)?;
        let Keyed {
            intent,
            agent,
            autonomy,
        } = plan;
        let mut key = Vec::with_capacity(64);
        let text = |key: &mut Vec<u8>, s: &str| {
            key.extend_from_slice(&(s.len() as u64).to_le_bytes());
            key.extend_from_slice(s.as_bytes());
        };
        key.extend_from_slice(&(program as u64).to_le_bytes());
        if reads.agent {
            text(&mut key, agent);
            text(&mut key, autonomy);
        }
        for (field, read) in PLAN_FIELDS.iter().zip(reads.plan) {
            match (*field, read) {
                (_, false) => {}
                ("lineage", true) => text(&mut key, intent.lineage.as_str()),
                ("version", true) => key.extend_from_slice(&intent.version.to_le_bytes()),
                (_, true) => text(&mut key, intent.goal.as_str()),
            }
        }
        key.extend_from_slice(&(intent.steps.len() as u64).to_le_bytes());
        for step in &intent.steps {
            for (field, read) in STEP_FIELDS.iter().zip(reads.step) {
                match (*field, read) {
                    (_, false) => {}
                    ("id", true) => text(&mut key, step.id.as_str()),
                    ("kind", true) => text(&mut key, step.kind().name()),
                    ("path", true) => text(&mut key, step.path.as_str()),
                    // The bits: equal bits are the same number (a NaN too).
                    (_, true) => key.extend_from_slice(&step.confidence.to_bits().to_le_bytes()),
                }
            }
        }
        Some(key.into_boxed_slice())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Box<[u8]>, Remembered>> {
        // A panic while holding it cannot leave an entry half written.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn reads(&self) -> &[Option<Reads>] {
        &self.reads
    }
}

/// What a name is bound to inside an expression.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// A macro's variable over `plan.steps`.
    Step,
    /// Any other macro variable or accumulator.
    Other,
}

/// An expression that reads more than a key holds.
struct Unkeyed;

fn lookup(scope: &[(&str, Bound)], name: &str) -> Option<Bound> {
    scope.iter().rev().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Whether `e` is `plan.steps`, `plan` being the variable.
fn is_plan_steps(e: &IdedExpr, scope: &[(&str, Bound)]) -> bool {
    matches!(&e.expr, Expr::Select(s)
        if !s.test && s.field == "steps"
            && matches!(&s.operand.expr, Expr::Ident(n) if n == "plan" && lookup(scope, n).is_none()))
}

/// The condition of `c` if it is the `filter` macro's expansion: `[]`
/// accumulates `[v]` for each `v` the condition holds for.
fn filter_condition(c: &cel::common::ast::ComprehensionExpr) -> Option<&IdedExpr> {
    let is_accu = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if *n == c.accu_var);
    let Expr::Call(step) = &c.loop_step.expr else {
        return None;
    };
    let [cond, then, otherwise] = step.args.as_slice() else {
        return None;
    };
    let Expr::Call(add) = &then.expr else { return None };
    let appends_var = matches!(add.args.as_slice(), [accu, one]
        if is_accu(accu) && matches!(&one.expr, Expr::List(l)
            if l.optional_indices.is_empty()
                && matches!(l.elements.as_slice(), [v] if matches!(&v.expr, Expr::Ident(n) if *n == c.iter_var))));
    let filters = step.func_name == "_?_:_"
        && step.target.is_none()
        && add.func_name == "_+_"
        && add.target.is_none()
        && appends_var
        && is_accu(otherwise)
        && is_accu(&c.result)
        && c.iter_var2.is_none()
        && c.iter_var != c.accu_var
        && matches!(&c.accu_init.expr, Expr::List(l) if l.elements.is_empty());
    filters.then_some(cond)
}

/// Whether `e` is a list of the plan's steps: `plan.steps`, or a `filter`
/// of one (its loop, which reads steps, is walked here).
fn step_list<'e>(e: &'e IdedExpr, scope: &mut Vec<(&'e str, Bound)>, reads: &mut Reads) -> Result<bool, Unkeyed> {
    if is_plan_steps(e, scope) {
        return Ok(true);
    }
    let Expr::Comprehension(c) = &e.expr else {
        return Ok(false);
    };
    if filter_condition(c).is_none() || !step_list(&c.iter_range, scope, reads)? {
        return Ok(false);
    }
    let depth = scope.len();
    scope.push((c.accu_var.as_str(), Bound::Other));
    scope.push((c.iter_var.as_str(), Bound::Step));
    // The step's append (`[v]`) is the list's element, not a read: only
    // the condition and the loop's own condition read the step.
    let walked = filter_condition(c)
        .map_or(Ok(()), |cond| walk(cond, scope, reads))
        .and_then(|()| walk(&c.loop_cond, scope, reads));
    scope.truncate(depth);
    walked.map(|()| true)
}

fn walk<'e>(e: &'e IdedExpr, scope: &mut Vec<(&'e str, Bound)>, reads: &mut Reads) -> Result<(), Unkeyed> {
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => Ok(()),
        // `.plan` names the root scope's `plan` whatever shadows it: not
        // worth telling apart.
        Expr::Ident(name) if name.starts_with('.') => Err(Unkeyed),
        Expr::Ident(name) => match (lookup(scope, name), name.as_str()) {
            (Some(Bound::Step), _) => Err(Unkeyed),
            (Some(Bound::Other), _) => Ok(()),
            (None, "plan" | "before" | "after") => Err(Unkeyed),
            (None, "agent") => {
                reads.agent = true;
                Ok(())
            }
            // Any other name is no variable a rule is given: an error, the
            // same for every plan.
            (None, _) => Ok(()),
        },
        Expr::Select(s) => {
            if let Expr::Ident(name) = &s.operand.expr {
                match (lookup(scope, name), name.as_str()) {
                    (Some(Bound::Step), _) => {
                        let i = STEP_FIELDS.iter().position(|f| *f == s.field).ok_or(Unkeyed)?;
                        // `has(s.x)` is the same for every step.
                        reads.step[i] |= !s.test;
                        return Ok(());
                    }
                    (None, "plan") => {
                        if s.test {
                            return Ok(());
                        }
                        if let Some(i) = PLAN_FIELDS.iter().position(|f| *f == s.field) {
                            reads.plan[i] = true;
                            return Ok(());
                        }
                        // `plan.steps` outside a range, or a field a plan
                        // does not have (the error could name it: unkeyed).
                        return Err(Unkeyed);
                    }
                    _ => {}
                }
            }
            walk(&s.operand, scope, reads)
        }
        Expr::Call(c) => {
            if c.func_name == "size" {
                let list = match (&c.target, c.args.as_slice()) {
                    (None, [arg]) => Some(arg),
                    (Some(target), []) => Some(&**target),
                    _ => None,
                };
                if let Some(list) = list
                    && step_list(list, scope, reads)?
                {
                    return Ok(());
                }
            }
            if let Some(target) = &c.target {
                walk(target, scope, reads)?;
            }
            c.args.iter().try_for_each(|a| walk(a, scope, reads))
        }
        Expr::Comprehension(c) => {
            if c.iter_var2.is_some() {
                return Err(Unkeyed);
            }
            let over_steps = step_list(&c.iter_range, scope, reads)?;
            if !over_steps {
                walk(&c.iter_range, scope, reads)?;
            }
            walk(&c.accu_init, scope, reads)?;
            let depth = scope.len();
            scope.push((c.accu_var.as_str(), Bound::Other));
            scope.push((c.iter_var.as_str(), if over_steps { Bound::Step } else { Bound::Other }));
            let looped = walk(&c.loop_cond, scope, reads).and_then(|()| walk(&c.loop_step, scope, reads));
            scope.pop();
            let result = looped.and_then(|()| walk(&c.result, scope, reads));
            scope.truncate(depth);
            result
        }
        Expr::List(l) => l.elements.iter().try_for_each(|x| walk(x, scope, reads)),
        // cel's map literals are std hash maps, iterated in a random order:
        // a result that depends on it is not the same twice, remembered or not.
        Expr::Map(_) => Err(Unkeyed),
        Expr::Struct(s) => s
            .entries
            .iter()
            .flat_map(crate::celx::entry_parts)
            .try_for_each(|x| walk(x, scope, reads)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `expr` reads, if it can be keyed.
    fn reads(expr: &str) -> Option<Reads> {
        let program = crate::celx::env().compile(expr).unwrap();
        Memo::for_programs([&program]).map(|m| m.reads()[0].expect("the only program"))
    }

    fn step(fields: &[&str]) -> [bool; 4] {
        STEP_FIELDS.map(|f| fields.contains(&f))
    }

    #[test]
    fn a_rule_over_step_kinds_and_confidences_is_keyed_on_them() {
        let r = reads("plan.steps.all(s, !(s.kind in ['delete', 'exec']) || s.confidence >= 0.9)").expect("keyed");
        assert_eq!(r.step, step(&["kind", "confidence"]));
        let r = reads("plan.steps.filter(s, s.kind in ['delete']).map(s, s.id + '=' + string(s.confidence))")
            .expect("keyed");
        assert_eq!(r.step, step(&["id", "kind", "confidence"]));
        assert_eq!(r.plan, [false; 3]);
        assert!(!r.agent);
        let r = reads("size(plan.steps) < 10 && plan.version > 1 && agent.autonomy == 'bounded'").expect("keyed");
        assert_eq!(r.step, step(&[]));
        assert_eq!(r.plan, [false, true, false]);
        assert!(r.agent);
        // `has` reads no value; a macro variable over another list is not a step.
        let r = reads("plan.steps.exists(s, has(s.path)) && [1, 2].all(s, s > 0)").expect("keyed");
        assert_eq!(r.step, step(&[]));
        // Filters of filters, counted or ranged over.
        let r = reads("size(plan.steps.filter(s, s.path == 'a').filter(t, t.id != 'x')) == 0").expect("keyed");
        assert_eq!(r.step, step(&["id", "path"]));
    }

    #[test]
    fn a_rule_that_can_read_more_than_the_key_is_not_remembered() {
        for expr in [
            // The world.
            "after.db.primary.max_connections > 0",
            "before == after",
            // A step's arguments, a whole step, a step by index, the plan whole.
            "plan.steps.all(s, s.args.value < 100)",
            "plan.steps.map(s, s).size() > 0",
            "plan.steps[0].kind == 'set'",
            "plan.steps == []",
            "plan != null",
            "plan.targets == 1",
            // A step variable that escapes into a nested macro's range, or a
            // list of steps kept whole.
            "plan.steps.all(s, [s].all(t, t.kind == 'set'))",
            "plan.steps.filter(s, s.kind == 'set') == []",
            "plan.steps.filter(s, s.kind == 'set').map(s, s)[0] != null",
            "plan.steps.map(s, s).filter(s, true).all(s, s.kind == 'set')",
            // Two-variable comprehensions.
            "plan.steps.all(i, s, s.kind == 'set')",
            // Root-scope names: `.plan` is the plan, `.before` the world.
            ".plan.steps[0].path == 'svc/a'",
            "plan.version > 0 && .plan.steps.all(s, s.args.value < 100)",
            ".before.svc.a.pool_size < 10",
            ".agent.id == 'a'",
            "plan.steps.all(s, .s.kind == 'set')",
            // A map literal, iterated in a random order.
            "{'a': 1, 'b': 2}.map(k, k)",
            "plan.steps.all(s, {'set': true}[s.kind])",
        ] {
            assert_eq!(reads(expr), None, "{expr}");
        }
        // A name bound by an inner macro shadows the step variable: `s` there
        // is the inner list's element (used whole), not a step.
        let r = reads("plan.steps.all(s, [[1]].all(s, size(s) == 1))").expect("keyed");
        assert_eq!(r.step, step(&[]));
        // And a macro variable named `plan` shadows the plan.
        assert!(reads("[[1]].all(plan, size(plan) == 1)").is_some());
        // A rule is remembered in the parts that can be keyed.
        let env = crate::celx::env();
        let programs = ["plan.steps.size() < 3", "after.x"].map(|e| env.compile(e).unwrap());
        let memo = Memo::for_programs(&programs).expect("the verdict can be keyed");
        assert!(memo.reads()[0].is_some() && memo.reads()[1].is_none());
    }

    /// A policy whose CEL rules are remembered: the shipped confidence rule
    /// and its figure, and one over the plan's version and the agent whose
    /// figure reads the world.
    fn remembered_policy() -> crate::policy::Policy {
        let p = crate::policy::Policy::from_toml_str(
            r#"
            [defaults]
            autonomy = "bounded"
            [[rules.cel]]
            id = "confidence.destructive"
            reads = []
            expr = "plan.steps.all(s, !(s.kind in ['delete', 'restart']) || s.confidence >= 0.9)"
            outcome = "needs_approval"
            [rules.cel.figures]
            destructive_confidence = "plan.steps.filter(s, s.kind in ['delete', 'restart']).map(s, s.id + '=' + string(s.confidence))"
            [[rules.cel]]
            id = "versions"
            reads = []
            expr = "plan.version < 3 || agent.id == 'b' || size(plan.steps.filter(s, s.path == 'svc/a')) == 0"
            outcome = "reject"
            [rules.cel.figures]
            pool = "after.svc.a.pool_size"
            "#,
        )
        .unwrap();
        let keyed: Vec<Vec<bool>> = p
            .cel
            .iter()
            .map(|r| {
                r.memo
                    .as_ref()
                    .map_or(Vec::new(), |m| m.reads.iter().map(Option::is_some).collect())
            })
            .collect();
        // The second rule's figure reads the world: only its verdict is remembered.
        assert_eq!(keyed, [vec![true, true], vec![true, false]]);
        p
    }

    fn intent(version: u32, steps: &[(usize, usize, u8)]) -> concord_proto::Intent {
        let steps: Vec<serde_json::Value> = steps
            .iter()
            .enumerate()
            .map(|(i, &(kind, id, confidence))| {
                let confidence = f64::from(confidence) / 10.0;
                let id = format!("s{id}-{i}");
                match kind {
                    0 => serde_json::json!({"id": id, "kind": "set", "path": "svc/a/pool_size",
                        "args": {"value": 10 + i}, "confidence": confidence, "compensation": {"mode": "restore"}}),
                    1 => serde_json::json!({"id": id, "kind": "restart", "path": "svc/a",
                        "args": {}, "confidence": confidence, "compensation": {"mode": "irreversible", "reason": "a restart"}}),
                    _ => serde_json::json!({"id": id, "kind": "delete", "path": "svc/b/cache",
                        "args": {"confirm": {"path": "svc/b/cache", "reason": "stale"}}, "confidence": confidence,
                        "compensation": {"mode": "irreversible", "reason": "a cache"}}),
                }
            })
            .collect();
        let json = serde_json::json!({"protocol": 1, "lineage": "l", "version": version, "goal": "g", "steps": steps});
        concord_proto::decode_intent(json.to_string().as_bytes()).unwrap()
    }

    proptest::proptest! {
        /// Previews with a policy that remembers, one plan after another,
        /// are those of a policy that has seen nothing.
        #[test]
        fn remembered_results_are_fresh_ones(
            plans in proptest::collection::vec(
                (1u32..5, 0usize..2, proptest::collection::vec((0usize..3, 0usize..2, 5u8..11), 1..4)),
                1..12,
            ),
        ) {
            let world = crate::world::World::from_toml_str(
                "[resources]\n\"svc/a/pool_size\" = 5\n\"svc/b/cache\" = 1\n",
            )
            .unwrap();
            let remembering = remembered_policy();
            for (version, agent, steps) in &plans {
                let intent = intent(*version, steps);
                let agent = ["a", "b"][*agent];
                let input = |policy| crate::preview::PreviewInput { world: &world, intent: &intent, agent, policy, previous: None };
                let fresh = remembered_policy();
                proptest::prop_assert_eq!(
                    serde_json::to_string(&crate::preview::preview(input(&remembering))).unwrap(),
                    serde_json::to_string(&crate::preview::preview(input(&fresh))).unwrap()
                );
            }
        }
    }

    #[test]
    fn a_memo_starts_over_past_its_bound() {
        let m = Memo::for_programs(&[crate::celx::env().compile("plan.version > 0").unwrap()]).unwrap();
        let intents: Vec<concord_proto::Intent> = (1..=MEMO_ENTRIES_MAX as u32 + 1)
            .map(|v| intent(v, &[(0, 0, 9)]))
            .collect();
        let keyed = |i: usize| Keyed {
            intent: &intents[i],
            agent: "a",
            autonomy: "bounded",
        };
        for i in 0..intents.len() {
            m.verdict(keyed(i), || crate::preview::Eval::Pass);
        }
        assert_eq!(m.lock().len(), 1);
        let held = |i: usize| m.lock().contains_key(&m.key(0, keyed(i)).unwrap());
        assert!(held(MEMO_ENTRIES_MAX));
        assert!(!held(0));
    }
}
