//! Push notices to agents (`notify.<agent>`): the events an agent would
//! otherwise have to poll for — a human's decision on its plan, the end of its
//! saga, a lapsed lease. They go out after the append that holds their events
//! is acknowledged (log before effect), as plain publishes: a notice that
//! nobody receives is lost, the log still has the event.
//!
//! Most events name a plan by lineage only, so the runtime keeps which agent
//! proposed each live lineage, learnt from `decided` events and, after a
//! restart, from the recovered plans.

use std::collections::{HashMap, VecDeque};

use concord_core::coordinator::{Coordinator, Event};
use concord_proto::Id;
use concord_proto::Verdict;
use concord_proto::coord::{Notice, NoticeKind};

/// How many lineages the runtime remembers the agent of. A lineage forgotten
/// early (more live plans than this) only costs its agent a notice; the
/// recovered plans fill the table again on a miss.
pub const LINEAGES_MAX: usize = 65_536;

/// Which agent each live lineage belongs to.
#[derive(Debug, Default)]
pub struct Notifier {
    agents: HashMap<Id, String>,
    order: VecDeque<Id>,
}

impl Notifier {
    /// Learns the agents of the coordinator's live plans (after recovery).
    pub fn from_coordinator(coord: &Coordinator) -> Notifier {
        let mut n = Notifier::default();
        for p in coord.plans_overview() {
            n.remember(p.lineage, p.agent);
        }
        n
    }

    fn remember(&mut self, lineage: Id, agent: String) {
        if self.agents.insert(lineage.clone(), agent).is_none() {
            self.order.push_back(lineage);
        }
        while self.agents.len() > LINEAGES_MAX {
            match self.order.pop_front() {
                Some(old) => {
                    self.agents.remove(&old);
                }
                None => break,
            }
        }
    }

    fn agent_of(&mut self, lineage: &Id, coord: &Coordinator) -> Option<String> {
        if let Some(a) = self.agents.get(lineage) {
            return Some(a.clone());
        }
        let p = coord.plans_overview().into_iter().find(|p| &p.lineage == lineage)?;
        self.remember(p.lineage, p.agent.clone());
        Some(p.agent)
    }

    /// The notices `events` give rise to, each with the agent it goes to.
    pub fn notices(&mut self, events: &[Event], coord: &Coordinator) -> Vec<(String, Notice)> {
        let mut out = Vec::new();
        for e in events {
            let (kind, lineage, version) = match e {
                Event::Decided {
                    agent,
                    lineage,
                    verdict,
                    ..
                } => {
                    if *verdict != Verdict::Reject {
                        self.remember(lineage.clone(), agent.clone());
                    }
                    continue;
                }
                Event::LeaseExpired { lease, agent } => {
                    out.push((
                        agent.clone(),
                        Notice {
                            event: NoticeKind::LeaseExpired,
                            lineage: None,
                            version: None,
                            lease: Some(*lease),
                            operator: None,
                            reason: None,
                        },
                    ));
                    continue;
                }
                Event::Approved { lineage, version, .. } => (NoticeKind::Approved, lineage, *version),
                Event::RejectedByOperator { lineage, version, .. } => {
                    (NoticeKind::RejectedByOperator, lineage, *version)
                }
                Event::ApprovalExpired { lineage, version } => (NoticeKind::ApprovalExpired, lineage, *version),
                Event::ApprovalStale { lineage, version, .. } => (NoticeKind::ApprovalStale, lineage, *version),
                Event::Withdrawn { lineage, version, .. } => (NoticeKind::Withdrawn, lineage, *version),
                Event::Admitted { lineage, version } => (NoticeKind::Admitted, lineage, *version),
                Event::Compensating { lineage, version, .. } => (NoticeKind::Compensating, lineage, *version),
                Event::Completed { lineage, version } => (NoticeKind::Completed, lineage, *version),
                Event::Compensated { lineage, version } => (NoticeKind::Compensated, lineage, *version),
                Event::CompensationFailed { lineage, version, .. } => {
                    (NoticeKind::CompensationFailed, lineage, *version)
                }
                _ => continue,
            };
            let Some(agent) = self.agent_of(lineage, coord) else {
                continue;
            };
            let mut n = Notice::plan(kind, lineage.clone(), version);
            match e {
                Event::Approved { operator, reason, .. } | Event::RejectedByOperator { operator, reason, .. } => {
                    n.operator = Some(operator.clone());
                    n.reason = Some(reason.clone());
                }
                Event::Compensating { reason, .. } | Event::CompensationFailed { reason, .. } => {
                    n.reason = Some(reason.clone());
                }
                _ => {}
            }
            out.push((agent, n));
        }
        out
    }
}

/// Each agent's latest notices, so an agent that was away when they were
/// published can ask for them (`{"op": "notices"}`). Rebuilt on recovery
/// from the snapshot (which carries it) and the log records after it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NoticeBacklog {
    agents: HashMap<String, VecDeque<Notice>>,
}

impl NoticeBacklog {
    /// Notices kept per agent (oldest forgotten first).
    pub const PER_AGENT: usize = 256;
    /// Agents whose notices are kept; notices to further agents are not.
    pub const AGENTS_MAX: usize = 10_000;

    /// Keeps `notices`; returns how many were not kept (too many agents).
    pub fn remember(&mut self, notices: &[(String, Notice)]) -> u64 {
        let mut unkept = 0;
        for (agent, n) in notices {
            if !self.agents.contains_key(agent) && self.agents.len() >= Self::AGENTS_MAX {
                unkept += 1;
                continue;
            }
            let kept = self.agents.entry(agent.clone()).or_default();
            if kept.len() >= Self::PER_AGENT {
                kept.pop_front();
            }
            kept.push_back(n.clone());
        }
        unkept
    }

    /// `agent`'s latest notices, oldest first.
    pub fn of(&self, agent: &str) -> Vec<Notice> {
        self.agents
            .get(agent)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }
}
