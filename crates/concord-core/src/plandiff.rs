//! The difference between two versions of a plan, and scope expansion.

use std::collections::{BTreeMap, BTreeSet};

use concord_proto::preview::{Expansion, PlanDiff, StepChange};
use concord_proto::{Compensation, Intent, Op, ResourcePath, Step, StepKind, StepSpec};

/// Every spec a plan may run: its steps and its `undo` compensations.
fn specs(plan: &Intent) -> Vec<(&Step, StepSpec)> {
    let mut out = Vec::new();
    for s in &plan.steps {
        out.push((
            s,
            StepSpec {
                path: s.path.clone(),
                op: s.op.clone(),
            },
        ));
        if let Compensation::Undo(u) = &s.compensation {
            out.push((s, u.clone()));
        }
    }
    out
}

/// The numeric value a spec raises its target to, if any (`set` of a number, `scale`).
fn raised(op: &Op) -> Option<f64> {
    match op {
        Op::Set(a) => a.value.as_f64(),
        Op::Scale(a) => Some(a.replicas.into()),
        _ => None,
    }
}

/// Compares `new` against `old` (an earlier version of the same lineage).
pub fn plan_diff(old: &Intent, new: &Intent) -> PlanDiff {
    plan_diff_hashed(old, old.content_hash(), new)
}

/// [`plan_diff`], with `old`'s content hash already known (the coordinator
/// keeps the hash of every live plan).
pub(crate) fn plan_diff_hashed(old: &Intent, old_hash: String, new: &Intent) -> PlanDiff {
    let old_steps: BTreeMap<&str, &Step> = old.steps.iter().map(|s| (s.id.as_str(), s)).collect();
    let new_ids: BTreeSet<&str> = new.steps.iter().map(|s| s.id.as_str()).collect();
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for s in &new.steps {
        match old_steps.get(s.id.as_str()) {
            None => added.push(s.id.clone()),
            Some(o) => {
                let fields = differing_fields(o, s);
                if !fields.is_empty() {
                    changed.push(StepChange {
                        step: s.id.clone(),
                        fields,
                    });
                }
            }
        }
    }
    let removed = old
        .steps
        .iter()
        .filter(|s| !new_ids.contains(s.id.as_str()))
        .map(|s| s.id.clone())
        .collect();

    let old_specs = specs(old);
    let old_paths: Vec<&ResourcePath> = old_specs.iter().map(|(_, sp)| &sp.path).collect();
    let old_kinds: BTreeSet<StepKind> = old_specs.iter().map(|(_, sp)| sp.op.kind()).collect();
    let old_kind_paths: BTreeSet<(StepKind, &ResourcePath)> =
        old_specs.iter().map(|(_, sp)| (sp.op.kind(), &sp.path)).collect();
    let mut old_max: BTreeMap<(&ResourcePath, StepKind), f64> = BTreeMap::new();
    for (_, sp) in &old_specs {
        if let Some(v) = raised(&sp.op) {
            let e = old_max.entry((&sp.path, sp.op.kind())).or_insert(f64::NEG_INFINITY);
            *e = e.max(v);
        }
    }
    let old_grants: BTreeSet<(&ResourcePath, String)> = old_specs
        .iter()
        .filter_map(|(_, sp)| match &sp.op {
            Op::Grant(g) => Some((&sp.path, format!("{}:{}", g.principal, g.role))),
            _ => None,
        })
        .collect();

    let mut expansion = Vec::new();
    let mut push = |kind: &str, step: &Step, detail: String| {
        let e = Expansion {
            kind: kind.to_string(),
            step: step.id.clone(),
            detail,
        };
        if !expansion.contains(&e) {
            expansion.push(e);
        }
    };
    for (step, sp) in specs(new) {
        let kind = sp.op.kind();
        if !old_paths.iter().any(|p| p.covers(&sp.path)) {
            push(
                "new_path",
                step,
                format!("`{}` is not under any path of v{}", sp.path, old.version),
            );
        }
        if !old_kinds.contains(&kind) {
            push("new_kind", step, format!("`{kind}` appears only in v{}", new.version));
        }
        if kind.destructive() && !old_kind_paths.contains(&(kind, &sp.path)) {
            push("destructive", step, format!("destructive `{kind}` on `{}`", sp.path));
        }
        if let Some(v) = raised(&sp.op)
            && let Some(&was) = old_max.get(&(&sp.path, kind))
            && v > was
        {
            push(
                "raised_value",
                step,
                format!("`{}` raised to {v} (v{} went to {was})", sp.path, old.version),
            );
        }
        if let Op::Grant(g) = &sp.op {
            let member = format!("{}:{}", g.principal, g.role);
            if !old_grants.contains(&(&sp.path, member.clone())) {
                push("new_grant", step, format!("grants `{member}` on `{}`", sp.path));
            }
        }
    }
    PlanDiff {
        previous_lineage: old.lineage.clone(),
        previous_version: old.version,
        previous_hash: old_hash,
        added,
        removed,
        changed,
        scope_expansion: expansion,
    }
}

fn differing_fields(a: &Step, b: &Step) -> Vec<String> {
    // Most steps of a re-plan are unchanged: no need to compare their fields.
    if a == b {
        return Vec::new();
    }
    // Same kind: each wire field compares as its typed value does (the
    // fields in wire-name order, as the comparison of their JSON gives).
    if a.kind() == b.kind() {
        let fields: [(&str, bool); 8] = [
            ("args", a.op != b.op),
            ("compensation", a.compensation != b.compensation),
            ("confidence", a.confidence != b.confidence),
            ("id", a.id != b.id),
            ("kind", false),
            ("path", a.path != b.path),
            ("timeout_ms", a.timeout_ms != b.timeout_ms),
            ("verification", a.verification != b.verification),
        ];
        return fields
            .into_iter()
            .filter(|(_, differs)| *differs)
            .map(|(k, _)| k.to_string())
            .collect();
    }
    differing_wire_fields(a, b)
}

/// The fields whose wire form (JSON) differs.
fn differing_wire_fields(a: &Step, b: &Step) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["step".into()];
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use concord_proto::decode_intent;
    use serde_json::json;

    use super::*;

    fn step(v: serde_json::Value) -> Step {
        let j = json!({ "protocol": 1, "lineage": "l", "version": 1, "goal": "g", "steps": [v] });
        decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap().steps.remove(0)
    }

    /// The typed comparison names the fields the JSON comparison names.
    #[test]
    fn typed_field_comparison_agrees_with_the_wire_form() {
        let base = json!({ "id": "s1", "kind": "set", "path": "svc/a/pool_size", "args": { "value": 10 },
                           "confidence": 0.9, "compensation": { "mode": "restore" } });
        let variants = [
            json!({ "id": "s2" }),
            json!({ "path": "svc/b/pool_size" }),
            json!({ "args": { "value": 11 } }),
            json!({ "args": { "value": 10.5 } }),
            json!({ "confidence": 0.5 }),
            json!({ "compensation": { "mode": "irreversible", "reason": "r" } }),
            json!({ "timeout_ms": 5000 }),
            json!({ "verification": { "path": "svc/a/health", "op": "eq", "value": "ok", "bake_ms": 1000, "fresh_ms": 5000 } }),
            json!({ "id": "s3", "args": { "value": 12 }, "confidence": 0.8, "timeout_ms": 10 }),
        ];
        let a = step(base.clone());
        for v in variants {
            let mut j = base.clone();
            for (k, x) in v.as_object().unwrap() {
                j[k] = x.clone();
            }
            let b = step(j.clone());
            assert_eq!(differing_fields(&a, &b), differing_wire_fields(&a, &b), "{j}");
            assert!(!differing_fields(&a, &b).is_empty(), "{j}");
        }
    }
}
