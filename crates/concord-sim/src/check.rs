//! Checkers: the core's safety properties, verified from outside on every
//! coordinated run, from the coordinator's log events and the executor's
//! writes. They keep their own state, so they hold across a coordinator
//! crash and rebuild. A violation fails the run.
//!
//! - no two holders of conflicting leases (exclusive, overlapping paths) at once;
//! - no admission while a halt covers the plan;
//! - compensations run in reverse order of the steps, each at most once;
//! - no write applied by the executor with a fencing token older than one it had seen.

use std::collections::{BTreeMap, BTreeSet};

use concord_core::coordinator::{Event, Lease};
use concord_proto::ResourcePath;
use concord_proto::coord::{HaltScope, LeaseMode, Phase};

/// Most violations kept (the first ones matter; the count is kept in full).
pub const VIOLATIONS_MAX: usize = 100;

/// One violation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Violation {
    /// When.
    pub at_ms: u64,
    /// Which property: `lease.exclusive`, `halt.admission`, `compensation.order`,
    /// `compensation.once`, `fencing.stale_write`, `recovery.state`.
    pub property: String,
    /// What happened.
    pub detail: String,
}

#[derive(Debug, Default)]
struct SagaTrack {
    /// Step ids in the order they were first dispatched forward.
    forward: Vec<String>,
    /// Index (in `forward`) of the last compensated-or-compensating step.
    last_undo: Option<usize>,
    /// Steps whose compensation succeeded.
    undone: BTreeSet<String>,
}

/// The checkers' state.
#[derive(Debug, Default)]
pub struct Checkers {
    leases: BTreeMap<u64, Lease>,
    halts: Vec<HaltScope>,
    /// (lineage, version) -> the plan's agent and step paths.
    plans: BTreeMap<(String, u32), (String, Vec<ResourcePath>)>,
    sagas: BTreeMap<(String, u32), SagaTrack>,
    /// Per path: the highest fencing token the executor has received.
    tokens_seen: BTreeMap<ResourcePath, u64>,
    /// Violations found (at most [`VIOLATIONS_MAX`]).
    pub violations: Vec<Violation>,
    /// How many in all.
    pub count: u64,
    /// Events checked.
    pub events: u64,
}

fn covers(scope: &HaltScope, agent: &str, paths: &[ResourcePath]) -> bool {
    match scope {
        HaltScope::All => true,
        HaltScope::Agent(a) => a == agent,
        HaltScope::Path(p) => paths.iter().any(|t| t.overlaps(p)),
    }
}

impl Checkers {
    fn fail(&mut self, at_ms: u64, property: &str, detail: String) {
        self.count += 1;
        if self.violations.len() < VIOLATIONS_MAX {
            self.violations.push(Violation {
                at_ms,
                property: property.into(),
                detail,
            });
        }
    }

    /// A plan was proposed: its agent and the paths its steps touch.
    pub fn proposed(&mut self, lineage: &str, version: u32, agent: &str, paths: Vec<ResourcePath>) {
        self.plans
            .insert((lineage.to_string(), version), (agent.to_string(), paths));
    }

    /// A log event.
    pub fn event(&mut self, now_ms: u64, e: &Event) {
        self.events += 1;
        match e {
            Event::LeaseGranted { lease } => {
                let clash = self
                    .leases
                    .values()
                    .find(|l| {
                        l.agent != lease.agent
                            && l.path.overlaps(&lease.path)
                            && (l.mode == LeaseMode::Exclusive || lease.mode == LeaseMode::Exclusive)
                    })
                    .map(|l| (l.id, l.agent.clone(), l.path.clone()));
                if let Some((id, agent, path)) = clash {
                    self.fail(
                        now_ms,
                        "lease.exclusive",
                        format!(
                            "lease {} on `{}` granted to `{}` while lease {id} on `{path}` of `{agent}` is held",
                            lease.id, lease.path, lease.agent
                        ),
                    );
                }
                self.leases.insert(lease.id, lease.clone());
            }
            Event::LeaseReleased { lease } | Event::LeaseExpired { lease, .. } => {
                self.leases.remove(lease);
            }
            Event::LeaseRenewed { .. } => {}
            Event::Halted { scope, .. } => self.halts.push(scope.clone()),
            Event::Resumed { scope, .. } => self.halts.retain(|h| h != scope),
            Event::Admitted { lineage, version } => {
                let key = (lineage.to_string(), *version);
                if let Some((agent, paths)) = self.plans.get(&key)
                    && let Some(h) = self.halts.iter().find(|h| covers(h, agent, paths))
                {
                    let detail = format!("{lineage} v{version} of `{agent}` admitted under a halt on {h:?}");
                    self.fail(now_ms, "halt.admission", detail);
                }
            }
            Event::Dispatched { key, .. } => {
                let saga = self.sagas.entry((key.lineage.to_string(), key.version)).or_default();
                let step = key.step.to_string();
                match key.phase {
                    Phase::Do => {
                        if !saga.forward.contains(&step) {
                            saga.forward.push(step);
                        }
                    }
                    Phase::Undo => {
                        let index = saga.forward.iter().position(|s| *s == step);
                        let detail = match index {
                            None => Some((
                                "compensation.order",
                                format!("{} undoes a step never dispatched", key.text()),
                            )),
                            Some(_) if saga.undone.contains(&step) => Some((
                                "compensation.once",
                                format!("{} compensates `{step}` a second time", key.text()),
                            )),
                            Some(i) if saga.last_undo.is_some_and(|j| i > j) => Some((
                                "compensation.order",
                                format!(
                                    "{} compensates `{step}` after a step dispatched before it was compensated",
                                    key.text()
                                ),
                            )),
                            Some(i) => {
                                saga.last_undo = Some(i);
                                None
                            }
                        };
                        if let Some((p, d)) = detail {
                            self.fail(now_ms, p, d);
                        }
                    }
                }
            }
            Event::StepSucceeded { key } if key.phase == Phase::Undo => {
                let saga = self.sagas.entry((key.lineage.to_string(), key.version)).or_default();
                if !saga.undone.insert(key.step.to_string()) {
                    let detail = format!("{}: `{}` compensated twice", key.text(), key.step);
                    self.fail(now_ms, "compensation.once", detail);
                }
            }
            Event::Completed { lineage, version } | Event::Compensated { lineage, version } => {
                self.sagas.remove(&(lineage.to_string(), *version));
            }
            _ => {}
        }
    }

    /// The executor received a dispatch with `token` for `path`.
    pub fn delivered(&mut self, path: &ResourcePath, token: u64) -> u64 {
        let seen = self.tokens_seen.entry(path.clone()).or_insert(0);
        let before = *seen;
        *seen = (*seen).max(token);
        before
    }

    /// The executor applied a write with `token` for `path`; `seen_before`
    /// is the highest token it had received for the path before this one.
    pub fn applied(&mut self, now_ms: u64, path: &ResourcePath, token: u64, seen_before: u64) {
        if token < seen_before {
            self.fail(
                now_ms,
                "fencing.stale_write",
                format!("a write to `{path}` with token {token} was applied after token {seen_before}"),
            );
        }
    }

    /// A rebuilt coordinator's state differs from the one that crashed.
    pub fn recovery(&mut self, now_ms: u64, detail: String) {
        self.fail(now_ms, "recovery.state", detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_proto::Id;
    use concord_proto::coord::{DispatchKey, HaltGrade};

    fn p(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap()
    }

    fn key(step: &str, phase: Phase) -> DispatchKey {
        DispatchKey {
            lineage: Id::parse("l").unwrap(),
            version: 1,
            step: Id::parse(step).unwrap(),
            phase,
            attempt: 1,
        }
    }

    fn lease(id: u64, agent: &str, path: &str, mode: LeaseMode) -> Event {
        Event::LeaseGranted {
            lease: Lease {
                id,
                agent: agent.into(),
                path: p(path),
                mode,
                ttl_ms: 1000,
                expires_at_ms: 1000,
            },
        }
    }

    #[test]
    fn two_exclusive_holders_are_caught_and_shared_ones_are_not() {
        let mut c = Checkers::default();
        c.event(0, &lease(1, "a", "db/primary", LeaseMode::Shared));
        c.event(0, &lease(2, "b", "db/primary/pool", LeaseMode::Shared));
        assert_eq!(c.count, 0);
        c.event(1, &lease(3, "c", "db", LeaseMode::Exclusive));
        assert_eq!(c.count, 1);
        assert_eq!(c.violations[0].property, "lease.exclusive");
        c.event(
            2,
            &Event::LeaseExpired {
                lease: 1,
                agent: "a".into(),
            },
        );
        c.event(2, &Event::LeaseReleased { lease: 2 });
        c.event(2, &Event::LeaseReleased { lease: 3 });
        c.event(3, &lease(4, "d", "db", LeaseMode::Exclusive));
        assert_eq!(c.count, 1);
    }

    #[test]
    fn admission_under_a_halt_is_caught() {
        let mut c = Checkers::default();
        c.proposed("l", 1, "deploy", vec![p("svc/api")]);
        c.event(
            0,
            &Event::Halted {
                operator: "o".into(),
                scope: HaltScope::Path(p("svc")),
                grade: HaltGrade::Freeze,
                reason: "r".into(),
            },
        );
        c.event(
            1,
            &Event::Admitted {
                lineage: Id::parse("l").unwrap(),
                version: 1,
            },
        );
        assert_eq!(c.violations[0].property, "halt.admission");
        c.event(
            2,
            &Event::Resumed {
                operator: "o".into(),
                scope: HaltScope::Path(p("svc")),
                reason: "r".into(),
            },
        );
        c.event(
            3,
            &Event::Admitted {
                lineage: Id::parse("l").unwrap(),
                version: 1,
            },
        );
        assert_eq!(c.count, 1);
    }

    #[test]
    fn compensations_out_of_order_or_twice_are_caught() {
        let d = |c: &mut Checkers, s: &str, ph| {
            c.event(
                0,
                &Event::Dispatched {
                    key: key(s, ph),
                    path: p("x"),
                    token: 1,
                },
            )
        };
        let mut c = Checkers::default();
        d(&mut c, "s1", Phase::Do);
        d(&mut c, "s2", Phase::Do);
        d(&mut c, "s2", Phase::Undo);
        d(&mut c, "s1", Phase::Undo);
        assert_eq!(c.count, 0, "{:?}", c.violations);
        let mut c = Checkers::default();
        d(&mut c, "s1", Phase::Do);
        d(&mut c, "s2", Phase::Do);
        d(&mut c, "s1", Phase::Undo);
        d(&mut c, "s2", Phase::Undo);
        assert_eq!(c.violations[0].property, "compensation.order");
        let mut c = Checkers::default();
        d(&mut c, "s1", Phase::Do);
        d(&mut c, "s1", Phase::Undo);
        c.event(
            0,
            &Event::StepSucceeded {
                key: key("s1", Phase::Undo),
            },
        );
        d(&mut c, "s1", Phase::Undo);
        assert_eq!(c.violations[0].property, "compensation.once");
    }

    #[test]
    fn a_stale_write_is_caught() {
        let mut c = Checkers::default();
        let before = c.delivered(&p("x"), 2);
        c.applied(0, &p("x"), 2, before);
        let before = c.delivered(&p("x"), 1);
        c.applied(1, &p("x"), 1, before);
        assert_eq!(c.violations[0].property, "fencing.stale_write");
    }
}
