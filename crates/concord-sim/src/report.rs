//! Reports: the timeline, the outcome metrics, the expectation check, the
//! comparison of modes and the what-if, as text for people and as JSON.
//! Both are pure functions of the runs: the same scenario and seed give the
//! same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use concord_proto::{Value, Verdict};
use serde::Serialize;

use crate::check::Violation;
use crate::replay::WhatIf;
use crate::run::{Entry, Metrics, Mode, PlanFate, Run};
use crate::scenario::{ModeExpect, Scenario};
use crate::time::stamp;

/// Shape version of the JSON report.
pub const REPORT_VERSION: u32 = 1;

/// One mode's part of the report.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Mode.
    pub mode: Mode,
    /// Outcome figures.
    pub metrics: Metrics,
    /// Every plan version and its fate, by `lineage/version`.
    pub plans: BTreeMap<String, PlanFate>,
    /// Checker violations (first ones).
    pub violations: Vec<Violation>,
    /// All violations.
    pub violation_count: u64,
    /// Log events the checkers saw.
    pub checked_events: u64,
    /// Differences from the expected outcome (empty: as expected).
    pub expectation_failures: Vec<String>,
    /// Whether the scenario states an expectation for this mode.
    pub expectation_given: bool,
    /// The timeline.
    pub timeline: Vec<Entry>,
    /// Timeline entries dropped beyond the bound.
    pub timeline_dropped: u64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Shape version.
    pub report_version: u32,
    /// Scenario name.
    pub scenario: String,
    /// Its description.
    pub description: String,
    /// The seed.
    pub seed: u64,
    /// Simulated time, ms.
    pub duration_ms: u64,
    /// The scenario policy's hash.
    pub policy_hash: String,
    /// One per mode run.
    pub runs: Vec<RunReport>,
    /// The other policy's verdicts on the coordinated run's inputs.
    pub what_if: Option<WhatIf>,
}

impl Report {
    /// Whether every run met its expectation and every checker held.
    pub fn ok(&self) -> bool {
        self.runs
            .iter()
            .all(|r| r.expectation_failures.is_empty() && r.violation_count == 0)
    }

    /// Every problem, one per line: checker violations, then expectation differences.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.runs {
            for v in &r.violations {
                out.push(format!(
                    "{}: checker `{}` failed at {}: {}",
                    r.mode.name(),
                    v.property,
                    stamp(v.at_ms),
                    v.detail
                ));
            }
            for f in &r.expectation_failures {
                out.push(format!("{}: {f}", r.mode.name()));
            }
        }
        out
    }

    /// The JSON document.
    pub fn json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

fn set(xs: impl Iterator<Item = String>) -> BTreeSet<String> {
    xs.collect()
}

/// The differences between a run and what the scenario expects of it.
pub fn expectation(run: &Run, e: &ModeExpect) -> Vec<String> {
    let mut out = Vec::new();
    let plans = |f: &dyn Fn(&PlanFate) -> bool| set(run.plans.iter().filter(|(_, p)| f(p)).map(|(k, _)| k.clone()));
    type Named<'a> = (&'a str, &'a Option<Vec<String>>, BTreeSet<String>);
    let lists: [Named<'_>; 5] = [
        ("admitted", &e.admitted, plans(&|p| p.admitted)),
        ("held", &e.held, plans(&|p| p.verdict == Some(Verdict::NeedsApproval))),
        ("rejected", &e.rejected, plans(&|p| p.verdict == Some(Verdict::Reject))),
        (
            "compensated",
            &e.compensated,
            plans(&|p| p.ended.as_deref() == Some("compensated")),
        ),
        (
            "completed",
            &e.completed,
            plans(&|p| p.ended.as_deref() == Some("completed")),
        ),
    ];
    for (name, want, got) in lists {
        if let Some(want) = want {
            let want = set(want.iter().cloned());
            if want != got {
                let missing: Vec<_> = want.difference(&got).cloned().collect();
                let extra: Vec<_> = got.difference(&want).cloned().collect();
                out.push(format!(
                    "`{name}`: expected {want:?}, got {got:?} (missing {missing:?}, unexpected {extra:?})"
                ));
            }
        }
    }
    let m = &run.metrics;
    if let Some(s) = e.survives
        && s != m.survives
    {
        out.push(format!(
            "`survives`: expected {s}, got {} (the database fell over {} times)",
            m.survives, m.db_falls
        ));
    }
    if let Some(max) = e.downtime_minutes_max
        && m.downtime_minutes > max
    {
        out.push(format!(
            "`downtime_minutes_max`: {} minutes of downtime, expected at most {max}",
            m.downtime_minutes
        ));
    }
    if let Some(min) = e.downtime_minutes_min
        && m.downtime_minutes < min
    {
        out.push(format!(
            "`downtime_minutes_min`: {} minutes of downtime, expected at least {min}",
            m.downtime_minutes
        ));
    }
    for (name, want, got) in [
        ("approvals_needed", e.approvals_needed, m.approvals_needed),
        ("benign_blocked", e.benign_blocked, m.benign_blocked),
        ("breakers", e.breakers, m.breakers),
        ("leases_expired", e.leases_expired, m.leases_expired),
    ] {
        if let Some(w) = want
            && w != got
        {
            out.push(format!("`{name}`: expected {w}, got {got}"));
        }
    }
    for (path, want) in &e.world {
        let got: Option<&Value> = run.world.get(path);
        if got != Some(want) {
            out.push(format!(
                "`world.\"{path}\"`: expected {want}, got {}",
                got.map(|v| v.to_string()).unwrap_or_else(|| "absent".into())
            ));
        }
    }
    out
}

/// Builds the report of finished runs.
pub fn report(s: &Scenario, runs: &[Run], what_if: Option<WhatIf>) -> Report {
    let policy_hash = concord_core::policy::Policy::compile(s.policy.clone())
        .map(|p| p.hash)
        .unwrap_or_default();
    Report {
        report_version: REPORT_VERSION,
        scenario: s.file.name.clone(),
        description: s.file.description.trim().to_string(),
        seed: s.file.seed,
        duration_ms: s.file.duration.ms(),
        policy_hash,
        runs: runs
            .iter()
            .map(|r| {
                let e = match r.mode {
                    Mode::Coordinated => &s.file.expect.coordinated,
                    Mode::Uncoordinated => &s.file.expect.uncoordinated,
                };
                RunReport {
                    mode: r.mode,
                    metrics: r.metrics.clone(),
                    plans: r.plans.clone(),
                    violations: r.violations.clone(),
                    violation_count: r.violation_count,
                    checked_events: r.checked_events,
                    expectation_failures: e.as_ref().map(|e| expectation(r, e)).unwrap_or_default(),
                    expectation_given: e.is_some(),
                    timeline: r.timeline.clone(),
                    timeline_dropped: r.timeline_dropped,
                }
            })
            .collect(),
        what_if,
    }
}

fn verdict_text(v: Option<Verdict>) -> &'static str {
    v.map(|v| v.name()).unwrap_or("-")
}

/// The report for people.
pub fn text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "concord sim: {} (seed {}, {} simulated, policy {})",
        r.scenario,
        r.seed,
        crate::time::Dur(r.duration_ms),
        &r.policy_hash[..r.policy_hash.len().min(12)]
    );
    for line in r.description.lines() {
        let _ = writeln!(o, "  {line}");
    }
    for run in &r.runs {
        let _ = writeln!(o, "\n== {} ==\n", run.mode.name());
        let _ = writeln!(o, "timeline:");
        for e in &run.timeline {
            let _ = writeln!(o, "  {}  {:<9} {}", stamp(e.at_ms), e.kind, e.text);
        }
        if run.timeline_dropped > 0 {
            let _ = writeln!(o, "  ... {} more entries not kept", run.timeline_dropped);
        }
        let _ = writeln!(o, "\nplans:");
        for (k, p) in &run.plans {
            let _ = writeln!(
                o,
                "  {:<28} {:<9} {:<15} {:<20} {}{}",
                k,
                p.agent,
                verdict_text(p.verdict),
                p.ended.as_deref().unwrap_or(if p.admitted { "running" } else { "-" }),
                p.reasons.join(", "),
                if p.benign { " (benign)" } else { "" }
            );
        }
        let _ = writeln!(o, "\nmetrics:");
        for (k, v) in metric_rows(&run.metrics) {
            let _ = writeln!(o, "  {k:<34} {v}");
        }
        if run.mode == Mode::Coordinated {
            if run.violation_count == 0 {
                let _ = writeln!(o, "\ncheckers: all held over {} log events", run.checked_events);
            } else {
                let _ = writeln!(o, "\ncheckers: {} VIOLATIONS", run.violation_count);
                for v in &run.violations {
                    let _ = writeln!(o, "  {} {}: {}", stamp(v.at_ms), v.property, v.detail);
                }
            }
        }
        if !run.expectation_given {
            let _ = writeln!(o, "expectation: none stated");
        } else if run.expectation_failures.is_empty() {
            let _ = writeln!(o, "expectation: met");
        } else {
            let _ = writeln!(o, "expectation: NOT MET");
            for f in &run.expectation_failures {
                let _ = writeln!(o, "  {f}");
            }
        }
    }
    if r.runs.len() == 2 {
        let _ = writeln!(o, "\n== comparison ==\n");
        let _ = writeln!(
            o,
            "  {:<34} {:>15} {:>15}",
            "",
            r.runs[0].mode.name(),
            r.runs[1].mode.name()
        );
        let a = metric_rows(&r.runs[0].metrics);
        let b = metric_rows(&r.runs[1].metrics);
        for ((k, x), (_, y)) in a.iter().zip(&b) {
            let _ = writeln!(o, "  {k:<34} {x:>15} {y:>15}");
        }
    }
    if let Some(w) = &r.what_if {
        let _ = writeln!(
            o,
            "\n== what-if: policy {} on the coordinated run's inputs ==\n",
            &w.policy_hash[..w.policy_hash.len().min(12)]
        );
        o.push_str(&what_if_text(w));
    }
    o
}

/// The side-by-side what-if table.
pub fn what_if_text(w: &WhatIf) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "  {:<6} {:<17} {:<9} {:<28} {:<15} {:<15}",
        "line", "at", "agent", "plan", "recorded", "other policy"
    );
    for (i, row) in w.rows.iter().enumerate() {
        let mark = if row.changed {
            if w.first_change == Some(i) {
                "  <- first difference"
            } else {
                "  <- differs"
            }
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "  {:<6} {:<17} {:<9} {:<28} {:<15} {:<15}{mark}",
            row.line,
            stamp(row.at_ms),
            row.agent,
            row.plan,
            verdict_text(row.recorded),
            verdict_text(row.other),
        );
        if row.changed {
            let _ = writeln!(
                o,
                "         recorded reasons: [{}]; other: [{}]",
                row.recorded_reasons.join(", "),
                row.other_reasons.join(", ")
            );
        }
    }
    let _ = writeln!(o, "\n  verdicts that differ: {} of {}", w.changed, w.rows.len());
    let when = |t: Option<u64>| t.map(stamp).unwrap_or_else(|| "never".into());
    let _ = writeln!(
        o,
        "  first intervention (hold or reject): recorded {}, other policy {}",
        when(w.recorded_first_intervention_ms),
        when(w.other_first_intervention_ms)
    );
    match w.earlier_by_ms {
        Some(d) if d > 0 => {
            let _ = writeln!(
                o,
                "  the other policy intervenes {} earlier",
                crate::time::Dur(d as u64)
            );
        }
        Some(d) if d < 0 => {
            let _ = writeln!(
                o,
                "  the other policy intervenes {} later",
                crate::time::Dur(d.unsigned_abs())
            );
        }
        Some(_) => {
            let _ = writeln!(o, "  both intervene at the same moment");
        }
        None => {}
    }
    o
}

fn metric_rows(m: &Metrics) -> Vec<(&'static str, String)> {
    vec![
        ("downtime (minutes)", format!("{:.2}", m.downtime_minutes)),
        ("database down (minutes)", format!("{:.2}", m.db_down_minutes)),
        ("database fell over (times)", m.db_falls.to_string()),
        ("system survives", m.survives.to_string()),
        (
            "peak connections / limit",
            format!("{:.0} / {:.0}", m.peak_connections, m.connection_limit),
        ),
        ("plans proposed", m.proposed.to_string()),
        ("admitted (uncoordinated: applied)", m.admitted.to_string()),
        ("held for a human", m.held.to_string()),
        ("rejected", m.rejected.to_string()),
        ("compensated", m.compensated.to_string()),
        ("completed", m.completed.to_string()),
        ("human approvals needed", m.approvals_needed.to_string()),
        ("benign changes needlessly blocked", m.benign_blocked.to_string()),
        ("breakers tripped", m.breakers.to_string()),
        ("leases expired", m.leases_expired.to_string()),
        ("service restarts", m.restarts.to_string()),
        ("coordinator inputs", m.coordinator_inputs.to_string()),
        ("observations reported", m.observations.to_string()),
        ("coordinator crashes survived", m.crashes.to_string()),
    ]
}
