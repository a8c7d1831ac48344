//! Replay and what-if over a recording (JSONL of [`Record`]s, as the
//! simulator writes and the live recorder emits).
//!
//! - [`replay`] re-feeds the recorded inputs through a fresh coordinator built
//!   from the `Genesis` record (applying `Policy` records as they come) and
//!   compares every event it produces with the recorded ones; the first
//!   difference is an error naming the record and the event.
//! - [`what_if`] does the same, and before each input that decides
//!   something, takes the decision again under another policy on a copy of
//!   the recorded state (snapshot and restore): the recorded run keeps
//!   driving state, the other policy's verdicts are computed alongside and
//!   reported as counterfactual, with the event where they first differ and
//!   how much earlier (or later) the other policy would have intervened.
//! - [`rebuild`] restores a coordinator from its log as a restarted process
//!   does (recorded decisions applied, not re-decided); the simulator's crash
//!   fault goes through it.

use std::collections::BTreeMap;

use concord_core::coordinator::{Coordinator, Effect, Event, Input, Record, first_divergence};
use concord_core::policy::{Policy, PolicyConfig};
use concord_proto::Verdict;
use serde::Serialize;

/// Longest line of a recording (one record), bytes.
pub const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Why a recording could not be replayed, or did not replay the same.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A line is not a record.
    #[error("line {line}: not a log record: {detail}")]
    Decode {
        /// 1-based line.
        line: usize,
        /// Why.
        detail: String,
    },
    /// The first record is not a genesis record.
    #[error("line 1: a recording starts with a `genesis` record")]
    NoGenesis,
    /// A policy in the log does not compile.
    #[error("line {line}: the policy does not compile: {detail}")]
    Policy {
        /// 1-based line.
        line: usize,
        /// Why.
        detail: String,
    },
    /// A policy's content hash is not the recorded one.
    #[error("line {line}: the policy hashes to {got}, the log says {recorded}")]
    PolicyHash {
        /// 1-based line.
        line: usize,
        /// Recomputed.
        got: String,
        /// Recorded.
        recorded: String,
    },
    /// Re-deciding gave other events than the log holds.
    #[error("line {line} (at {at}, input `{input}`): event {event} differs\n  replayed: {got}\n  recorded: {recorded}")]
    Divergence {
        /// 1-based line (= record index + 1).
        line: usize,
        /// Coordinator time.
        at: String,
        /// The input's kind.
        input: String,
        /// 1-based index of the first differing event of that record.
        event: usize,
        /// What the replay produced (`none` if fewer events).
        got: String,
        /// What the log holds (`none` if fewer events).
        recorded: String,
    },
}

/// The kind of the notice a recording places where its incident window
/// starts: replay and what-if report from there (the records before it
/// rebuild the state the incident started from, and are checked too).
pub const WINDOW_NOTICE: &str = "recording_window";

/// A recording of a log (its records in order, as `concord record` reads
/// them from `CONCORD_LOG`): the genesis and every record up to the first
/// one after `until` (a replay needs the whole history to rebuild the state
/// the incident started from), with a [`WINDOW_NOTICE`] placed before the
/// first record at or after `since`.
pub fn recording(records: Vec<Record>, since: Option<u64>, until: Option<u64>) -> Result<Vec<Record>, ReplayError> {
    if !matches!(records.first(), Some(Record::Genesis(_))) {
        return Err(ReplayError::NoGenesis);
    }
    let mut out = Vec::with_capacity(records.len() + 1);
    let mut window = since;
    for (i, r) in records.into_iter().enumerate() {
        if i > 0 && until.is_some_and(|u| r.now_ms() > u) {
            break;
        }
        if let Some(t) = window
            && i > 0
            && r.now_ms() >= t
        {
            out.push(window_notice(t));
            window = None;
        }
        out.push(r);
    }
    if let Some(t) = window {
        out.push(window_notice(t));
    }
    Ok(out)
}

fn window_notice(since_ms: u64) -> Record {
    Record::Notice {
        now_ms: since_ms,
        kind: WINDOW_NOTICE.into(),
        detail: format!("the incident from {since_ms}; the records before rebuild the state it started from"),
    }
}

/// Where a recording's incident window starts, if it marks one.
pub fn window_start(records: &[Record]) -> Option<u64> {
    records.iter().find_map(|r| match r {
        Record::Notice { now_ms, kind, .. } if kind == WINDOW_NOTICE => Some(*now_ms),
        _ => None,
    })
}

/// Reads a JSONL recording.
pub fn parse_jsonl(text: &str) -> Result<Vec<Record>, ReplayError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > RECORD_BYTES_MAX {
            return Err(ReplayError::Decode {
                line: i + 1,
                detail: format!("longer than {RECORD_BYTES_MAX} bytes"),
            });
        }
        let r: Record = serde_json::from_str(line).map_err(|e| ReplayError::Decode {
            line: i + 1,
            detail: e.to_string(),
        })?;
        out.push(r);
    }
    Ok(out)
}

/// Writes records as JSONL, one per line.
pub fn to_jsonl(records: &[Record]) -> String {
    let mut s = String::new();
    for r in records {
        // Records are plain data with string keys: serialization cannot fail.
        s.push_str(&serde_json::to_string(r).unwrap_or_default());
        s.push('\n');
    }
    s
}

fn compile(line: usize, config: &PolicyConfig, recorded: &str) -> Result<Policy, ReplayError> {
    let p = Policy::compile(config.clone()).map_err(|e| ReplayError::Policy {
        line,
        detail: e.to_string(),
    })?;
    if p.hash != recorded {
        return Err(ReplayError::PolicyHash {
            line,
            got: p.hash,
            recorded: recorded.to_string(),
        });
    }
    Ok(p)
}

/// The coordinator the genesis record starts, as the live runtime starts it:
/// its world document written under the coordinator's id and incarnation 1,
/// created at the genesis time (the same document bytes as the live run's).
fn genesis(records: &[Record]) -> Result<Coordinator, ReplayError> {
    let Some(Record::Genesis(g)) = records.first() else {
        return Err(ReplayError::NoGenesis);
    };
    // Checks the recorded hash too, which starting from the record does not.
    compile(1, &g.policy, &g.policy_hash)?;
    Coordinator::from_genesis(g).map_err(|e| ReplayError::Policy {
        line: 1,
        detail: e.to_string(),
    })
}

/// An incarnation record: the world document is written under the new
/// incarnation from here on, as the restarted process wrote it.
fn incarnate(c: &mut Coordinator, line: usize, incarnation: u64) -> Result<(), ReplayError> {
    c.incarnate(incarnation).map_err(|e| ReplayError::Decode {
        line,
        detail: format!("incarnation {incarnation}: {e}"),
    })
}

fn events(fx: Vec<Effect>) -> Vec<Event> {
    fx.into_iter()
        .filter_map(|f| match f {
            Effect::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn text(e: Option<&Event>) -> String {
    match e {
        None => "none".into(),
        Some(e) => {
            let t = serde_json::to_string(e).unwrap_or_default();
            if t.len() > 400 {
                let cut = (0..=400).rev().find(|&i| t.is_char_boundary(i)).unwrap_or(0);
                format!("{}...", &t[..cut])
            } else {
                t
            }
        }
    }
}

fn input_kind(i: &Input) -> &'static str {
    match i {
        Input::Intent { .. } => "intent",
        Input::Lease { .. } => "lease",
        Input::Observe { .. } => "observe",
        Input::Outcome { .. } => "outcome",
        Input::Control { .. } => "control",
        Input::Tick => "tick",
    }
}

/// Compares replayed events with recorded ones.
fn compare(line: usize, now_ms: u64, input: &Input, got: &[Event], recorded: &[Event]) -> Result<(), ReplayError> {
    if got == recorded {
        return Ok(());
    }
    let i = got.iter().zip(recorded).take_while(|(a, b)| a == b).count();
    Err(ReplayError::Divergence {
        line,
        at: crate::time::stamp(now_ms),
        input: input_kind(input).into(),
        event: i + 1,
        got: text(got.get(i)),
        recorded: text(recorded.get(i)),
    })
}

/// Restores a coordinator from its log, as a restarted process does: every
/// recorded input is re-fed to a fresh coordinator from the genesis record
/// with [`Coordinator::recover_input`], which takes each decision from the
/// recorded events instead of deciding again, and the events it produces
/// must match the record. The simulator's crash fault goes through here.
pub fn rebuild(records: &[Record]) -> Result<Coordinator, ReplayError> {
    let mut c = genesis(records)?;
    for (i, r) in records.iter().enumerate().skip(1) {
        match r {
            Record::Input { now_ms, input, events } => {
                let fx = c.recover_input(*now_ms, (**input).clone(), events);
                if let Some(d) = first_divergence(events, &fx) {
                    return Err(ReplayError::Divergence {
                        line: i + 1,
                        at: crate::time::stamp(*now_ms),
                        input: input_kind(input).into(),
                        event: d.index + 1,
                        got: text(d.produced.as_ref()),
                        recorded: text(d.recorded.as_ref()),
                    });
                }
            }
            other => {
                step(&mut c, i + 1, other)?;
            }
        }
    }
    Ok(c)
}

fn step(c: &mut Coordinator, line: usize, r: &Record) -> Result<Option<Vec<Event>>, ReplayError> {
    match r {
        Record::Genesis(_) => Err(ReplayError::Decode {
            line,
            detail: "a second genesis record".into(),
        }),
        Record::Incarnation { incarnation, .. } => {
            incarnate(c, line, *incarnation)?;
            Ok(None)
        }
        Record::Notice { .. } => Ok(None),
        Record::Policy {
            policy, policy_hash, ..
        } => {
            c.set_policy(compile(line, policy, policy_hash)?);
            Ok(None)
        }
        Record::Input {
            now_ms,
            input,
            events: recorded,
        } => {
            let got = events(c.handle(*now_ms, (**input).clone()));
            compare(line, *now_ms, input, &got, recorded)?;
            Ok(Some(got))
        }
    }
}

/// What a replay went through.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReplaySummary {
    /// Records read.
    pub records: usize,
    /// Inputs re-fed.
    pub inputs: usize,
    /// Intents re-decided.
    pub intents: usize,
    /// Events compared, all equal.
    pub events: usize,
    /// Verdicts reproduced, by verdict (within the incident window, if the
    /// recording marks one).
    pub verdicts: BTreeMap<String, usize>,
    /// Where the recording's incident window starts, if it marks one.
    pub window_from_ms: Option<u64>,
    /// Coordinator time of the last record.
    pub until_ms: u64,
    /// The final state digest.
    pub state_digest: String,
}

/// Re-decides a recording and checks every event is reproduced.
pub fn replay(records: &[Record]) -> Result<ReplaySummary, ReplayError> {
    let mut c = genesis(records)?;
    let window = window_start(records);
    let mut s = ReplaySummary {
        records: records.len(),
        window_from_ms: window,
        ..ReplaySummary::default()
    };
    for (i, r) in records.iter().enumerate().skip(1) {
        if let Some(evs) = step(&mut c, i + 1, r)? {
            s.inputs += 1;
            if let Record::Input { input, now_ms, .. } = r {
                s.intents += usize::from(matches!(**input, Input::Intent { .. }));
                s.until_ms = *now_ms;
            }
            s.events += evs.len();
            if window.is_some_and(|t| r.now_ms() < t) {
                continue;
            }
            for e in &evs {
                if let Event::Decided { verdict, .. } = e {
                    *s.verdicts.entry(verdict.name().to_string()).or_default() += 1;
                }
            }
        }
    }
    s.state_digest = c.state_digest();
    Ok(s)
}

/// One decision, under the recorded policy and under the other.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WhatIfRow {
    /// 1-based line of the record whose input led to the decision.
    pub line: usize,
    /// Coordinator time.
    pub at_ms: u64,
    /// Agent.
    pub agent: String,
    /// `lineage/version`.
    pub plan: String,
    /// The recorded verdict (none: the recorded run did not decide it here).
    pub recorded: Option<Verdict>,
    /// Its failing rules.
    pub recorded_reasons: Vec<String>,
    /// The other policy's verdict (none: it did not decide it here).
    pub other: Option<Verdict>,
    /// Its failing rules.
    pub other_reasons: Vec<String>,
    /// The verdicts differ.
    pub changed: bool,
    /// At or after the first difference.
    pub after_divergence: bool,
}

/// A what-if over a recording.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WhatIf {
    /// The other policy's hash.
    pub policy_hash: String,
    /// Every decision, side by side.
    pub rows: Vec<WhatIfRow>,
    /// Index in `rows` of the first changed verdict.
    pub first_change: Option<usize>,
    /// When the recorded policy first held or rejected a plan.
    pub recorded_first_intervention_ms: Option<u64>,
    /// When the other policy first would have.
    pub other_first_intervention_ms: Option<u64>,
    /// How much earlier the other policy intervenes (negative: later).
    pub earlier_by_ms: Option<i64>,
    /// Verdicts that differ.
    pub changed: usize,
}

fn decided(evs: &[Event]) -> Vec<(String, String, Verdict, Vec<String>)> {
    evs.iter()
        .filter_map(|e| match e {
            Event::Decided {
                agent,
                lineage,
                version,
                verdict,
                reasons,
                ..
            } => Some((
                format!("{lineage}/{version}"),
                agent.clone(),
                *verdict,
                reasons.iter().map(|r| r.rule.clone()).collect(),
            )),
            _ => None,
        })
        .collect()
}

/// Replays `records` (checking them as [`replay`] does) and computes the
/// verdicts `other` would have given, side by side. Each decision is taken
/// again on a copy of the recorded state just before it (a snapshot
/// restored under the other policy), so every counterfactual verdict is
/// about the world as it really was at that moment.
pub fn what_if(records: &[Record], other: PolicyConfig) -> Result<WhatIf, ReplayError> {
    let mut a = genesis(records)?;
    let compiled = Policy::compile(other.clone()).map_err(|e| ReplayError::Policy {
        line: 0,
        detail: e.to_string(),
    })?;
    let mut w = WhatIf {
        policy_hash: compiled.hash.clone(),
        ..WhatIf::default()
    };
    drop(compiled);
    // Before the recording's incident window the recorded run only rebuilds
    // its state (and is checked); the other policy is asked from there on.
    let window = window_start(records).unwrap_or(0);
    for (i, r) in records.iter().enumerate().skip(1) {
        // Only inputs that decide something need the other policy's view.
        let alt = match r {
            Record::Input {
                now_ms,
                input,
                events: recorded,
            } if *now_ms >= window
                && (matches!(**input, Input::Intent { .. } | Input::Control { .. })
                    || recorded.iter().any(|e| matches!(e, Event::Decided { .. }))) =>
            {
                let bytes = a.snapshot().map_err(|e| ReplayError::Decode {
                    line: i + 1,
                    detail: format!("snapshot: {e}"),
                })?;
                let mut fork = Coordinator::restore(&bytes).map_err(|e| ReplayError::Decode {
                    line: i + 1,
                    detail: format!("restore: {e}"),
                })?;
                let policy = Policy::compile(other.clone()).map_err(|e| ReplayError::Policy {
                    line: 0,
                    detail: e.to_string(),
                })?;
                fork.set_policy(policy);
                Some(events(fork.handle(*now_ms, (**input).clone())))
            }
            _ => None,
        };
        let Some(rec) = step(&mut a, i + 1, r)? else { continue };
        let (Some(alt), Record::Input { now_ms, .. }) = (alt, r) else {
            continue;
        };
        let now_ms = *now_ms;
        let (ra, rb) = (decided(&rec), decided(&alt));
        let mut seen = std::collections::BTreeSet::new();
        for k in ra.iter().map(|x| &x.0).chain(rb.iter().map(|x| &x.0)) {
            if !seen.insert(k.clone()) {
                continue;
            }
            let x = ra.iter().find(|d| &d.0 == k);
            let y = rb.iter().find(|d| &d.0 == k);
            let changed = x.map(|d| d.2) != y.map(|d| d.2);
            if changed && w.first_change.is_none() {
                w.first_change = Some(w.rows.len());
            }
            let row = WhatIfRow {
                line: i + 1,
                at_ms: now_ms,
                agent: x.or(y).map(|d| d.1.clone()).unwrap_or_default(),
                plan: k.clone(),
                recorded: x.map(|d| d.2),
                recorded_reasons: x.map(|d| d.3.clone()).unwrap_or_default(),
                other: y.map(|d| d.2),
                other_reasons: y.map(|d| d.3.clone()).unwrap_or_default(),
                changed,
                after_divergence: w.first_change.is_some(),
            };
            if row.recorded.is_some_and(|v| v != Verdict::Admit) && w.recorded_first_intervention_ms.is_none() {
                w.recorded_first_intervention_ms = Some(now_ms);
            }
            if row.other.is_some_and(|v| v != Verdict::Admit) && w.other_first_intervention_ms.is_none() {
                w.other_first_intervention_ms = Some(now_ms);
            }
            w.changed += usize::from(changed);
            w.rows.push(row);
        }
    }
    if let (Some(r), Some(o)) = (w.recorded_first_intervention_ms, w.other_first_intervention_ms) {
        w.earlier_by_ms = Some(r as i64 - o as i64);
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use concord_core::coordinator::{Config, Genesis, RECORD_VERSION};
    use concord_core::policy::Policy;
    use concord_core::world::World;

    use super::*;

    fn log(times: &[u64]) -> Vec<Record> {
        let policy = Policy::from_toml_str("").unwrap();
        let mut out = vec![Record::Genesis(Box::new(Genesis {
            record_version: RECORD_VERSION,
            now_ms: 0,
            coordinator: "c".into(),
            config: Config::default(),
            policy: policy.config.clone(),
            policy_hash: policy.hash.clone(),
            world: World::default(),
        }))];
        out.extend(times.iter().map(|&t| Record::Input {
            now_ms: t,
            input: Box::new(Input::Tick),
            events: Vec::new(),
        }));
        out
    }

    fn shape(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| match r {
                Record::Genesis(_) => "genesis".to_string(),
                Record::Notice { now_ms, kind, .. } => format!("{kind}@{now_ms}"),
                other => other.now_ms().to_string(),
            })
            .collect()
    }

    #[test]
    fn a_recording_keeps_the_history_marks_the_window_and_ends_at_until() {
        let all = log(&[10, 20, 30, 40]);
        assert_eq!(
            shape(&recording(all.clone(), None, None).unwrap()),
            ["genesis", "10", "20", "30", "40"]
        );
        assert_eq!(
            shape(&recording(all.clone(), Some(20), Some(30)).unwrap()),
            ["genesis", "10", "recording_window@20", "20", "30"]
        );
        assert_eq!(
            shape(&recording(all.clone(), Some(25), None).unwrap()),
            ["genesis", "10", "20", "recording_window@25", "30", "40"]
        );
        // A window after the last record: marked at the end, nothing in it.
        assert_eq!(
            shape(&recording(all.clone(), Some(50), Some(15)).unwrap()),
            ["genesis", "10", "recording_window@50"]
        );
        let r = recording(all.clone(), Some(25), None).unwrap();
        assert_eq!(window_start(&r), Some(25));
        let s = replay(&r).unwrap();
        assert_eq!(s.window_from_ms, Some(25));
        assert_eq!(s.inputs, 4);
        assert!(matches!(
            recording(all[1..].to_vec(), None, None),
            Err(ReplayError::NoGenesis)
        ));
    }
}
