//! Rendering previews for people: the report `concord check` prints.

use std::fmt::Write;

use concord_proto::preview::{Change, Preview, RuleStatus};
use concord_proto::{Value, Verdict};

fn value(v: &Option<Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(v) => v.to_string(),
    }
}

fn change(c: &Change) -> String {
    format!("{} -> {}", value(&c.before), value(&c.after))
}

fn figures(f: &std::collections::BTreeMap<String, Value>) -> String {
    f.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Renders a preview as the readable report of `concord check`.
pub fn render(p: &Preview) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "plan {} v{} by agent `{}`  hash {}",
        p.plan.lineage,
        p.plan.version,
        p.plan.agent,
        &p.plan.hash[..16.min(p.plan.hash.len())]
    );
    let _ = writeln!(o, "goal: {}", p.plan.goal);
    let _ = writeln!(o);
    let _ = writeln!(o, "VERDICT: {}", p.verdict.name().to_uppercase());
    if p.reasons.is_empty() {
        let _ = writeln!(o, "  every rule holds");
    } else {
        let rows: Vec<Vec<String>> = p
            .reasons
            .iter()
            .map(|r| vec![r.outcome.name().into(), r.rule.clone(), r.message.clone()])
            .collect();
        o.push_str(&table(&rows));
    }

    let _ = writeln!(
        o,
        "\ndiff ({} path{})",
        p.diff.len(),
        if p.diff.len() == 1 { "" } else { "s" }
    );
    if p.diff.is_empty() {
        let _ = writeln!(o, "  no modelled value changes");
    }
    let rows: Vec<Vec<String>> = p
        .diff
        .iter()
        .map(|c| vec![c.path.to_string(), change(c), format!("(step {})", c.step)])
        .collect();
    o.push_str(&table(&rows));
    if !p.actions.is_empty() {
        let _ = writeln!(o, "\nactions");
        for a in &p.actions {
            let _ = writeln!(o, "  {} {} (step {}): {}", a.kind, a.path, a.step, a.note);
        }
    }

    let _ = writeln!(o, "\nblast radius");
    if p.blast_radius.is_empty() {
        let _ = writeln!(o, "  no declared service is affected");
    }
    for a in &p.blast_radius {
        let _ = writeln!(o, "  {} ({} {})", a.service, a.relation, a.via);
    }

    let _ = writeln!(o, "\ninvariants");
    let mut rows = vec![vec![
        "status".to_string(),
        "rule".into(),
        "on failure".into(),
        "detail".into(),
    ]];
    for r in &p.invariants {
        let status = match r.status {
            RuleStatus::Pass => "pass",
            RuleStatus::Fail => "FAIL",
            RuleStatus::Error => "ERROR",
            RuleStatus::Skipped => "skip",
        };
        let mut detail = r.message.clone();
        if !r.figures.is_empty() {
            let _ = write!(detail, " [{}]", figures(&r.figures));
        }
        rows.push(vec![status.into(), r.id.clone(), r.outcome.name().into(), detail]);
    }
    o.push_str(&table(&rows));

    if !p.assumptions.is_empty() {
        let _ = writeln!(o, "\nassumptions");
        for a in &p.assumptions {
            let expected = a.expected.as_ref().map(|v| format!(" {v}")).unwrap_or_default();
            let _ = writeln!(
                o,
                "  {:<6}  {} {}{expected}  (world: {})",
                if a.held { "held" } else { "BROKEN" },
                a.path,
                a.op.symbol(),
                value(&a.actual)
            );
        }
    }
    if !p.unknowns.is_empty() {
        let _ = writeln!(o, "\nunknowns (the agent is unsure of)");
        for u in &p.unknowns {
            let _ = writeln!(o, "  - {u}");
        }
    }

    let _ = writeln!(o, "\nsteps");
    let rows: Vec<Vec<String>> = p
        .steps
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.kind.to_string(),
                s.path.to_string(),
                format!("confidence {:.2}", s.confidence),
                format!("compensation {}", s.compensation),
            ]
        })
        .collect();
    o.push_str(&table(&rows));

    let _ = writeln!(
        o,
        "\ncompensation (if the plan fails after its last step, in this order)"
    );
    for (i, c) in p.compensation.iter().enumerate() {
        let what = if c.mode == "irreversible" {
            format!("IRREVERSIBLE: {}", c.note.clone().unwrap_or_default())
        } else if c.changes.is_empty() {
            "nothing to change".into()
        } else {
            c.changes
                .iter()
                .map(|ch| format!("{} {}", ch.path, change(ch)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(o, "  {}. step {} {}: {what}", i + 1, c.step, c.mode);
    }

    if let Some(d) = &p.plan_diff {
        let _ = writeln!(
            o,
            "\nplan diff against {} v{} (hash {})",
            d.previous_lineage,
            d.previous_version,
            &d.previous_hash[..16.min(d.previous_hash.len())]
        );
        let ids = |v: &[concord_proto::Id]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
            }
        };
        let _ = writeln!(o, "  added: {}", ids(&d.added));
        let _ = writeln!(o, "  removed: {}", ids(&d.removed));
        if d.changed.is_empty() {
            let _ = writeln!(o, "  changed: -");
        }
        for c in &d.changed {
            let _ = writeln!(o, "  changed: {} ({})", c.step, c.fields.join(", "));
        }
        if d.scope_expansion.is_empty() {
            let _ = writeln!(o, "  scope expansion: none");
        } else {
            let _ = writeln!(o, "  SCOPE EXPANSION:");
            for e in &d.scope_expansion {
                let _ = writeln!(o, "    {} (step {}): {}", e.kind, e.step, e.detail);
            }
        }
    }

    let _ = writeln!(o, "\nrisk: {}", p.risk.level);
    for f in &p.risk.factors {
        let _ = writeln!(o, "  - {f}");
    }
    let _ = writeln!(
        o,
        "\ndecided by concord-core {} under policy {}",
        p.core_version,
        &p.policy_hash[..16.min(p.policy_hash.len())]
    );
    let _ = writeln!(o, "verdict: {}", p.verdict);
    o
}

/// The exit status `concord check` and `concord propose` use for a verdict.
pub fn exit_code(v: Verdict) -> i32 {
    match v {
        Verdict::Admit => 0,
        Verdict::NeedsApproval => 2,
        Verdict::Reject => 3,
    }
}
