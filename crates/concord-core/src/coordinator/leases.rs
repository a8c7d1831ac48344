//! Agents' explicit leases: reservations on resource paths with a time to
//! live and a bounded, fair queue of waiters.
//!
//! A lease on `db/primary` covers `db/primary/pool_size`. Exclusive leases
//! conflict with every overlapping lease; shared ones only with exclusive
//! ones. Plans hold coordinator-owned leases on the paths they touch for the
//! whole saga (the in-flight index); an agent's lease conflicts with them too.
//! Fencing tokens go to executors with each dispatch, never to lease holders.

use std::collections::{BTreeMap, VecDeque};

use concord_proto::ResourcePath;
use concord_proto::coord::LeaseMode;

/// One lease.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// Its id.
    pub id: u64,
    /// The agent holding (or waiting for) it.
    pub agent: String,
    /// The path it covers.
    pub path: ResourcePath,
    /// Exclusive or shared.
    pub mode: LeaseMode,
    /// The time to live it asked for.
    pub ttl_ms: u64,
    /// When it lapses (for held leases).
    pub expires_at_ms: u64,
}

impl Lease {
    /// Whether `self` and a lease `(path, mode)` of another holder cannot both be held.
    pub fn conflicts(&self, path: &ResourcePath, mode: LeaseMode) -> bool {
        self.path.overlaps(path) && (self.mode == LeaseMode::Exclusive || mode == LeaseMode::Exclusive)
    }
}

/// Held leases and the queue of waiters.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LeaseTable {
    pub(crate) held: BTreeMap<u64, Lease>,
    pub(crate) waiting: VecDeque<Lease>,
    pub(crate) next_id: u64,
}

impl LeaseTable {
    /// A new lease id.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Held leases of other agents that conflict with `(path, mode)`.
    pub fn conflicting<'a>(
        &'a self,
        agent: &'a str,
        path: &'a ResourcePath,
        mode: LeaseMode,
    ) -> impl Iterator<Item = &'a Lease> + 'a {
        self.held
            .values()
            .filter(move |l| l.agent != agent && l.conflicts(path, mode))
    }

    /// Held leases overlapping `path`, of any agent but `agent`.
    pub fn held_over<'a>(&'a self, agent: &'a str, path: &'a ResourcePath) -> impl Iterator<Item = &'a Lease> + 'a {
        self.held
            .values()
            .filter(move |l| l.agent != agent && l.path.overlaps(path))
    }

    /// Number of held leases.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Held leases, by id.
    pub fn held(&self) -> impl Iterator<Item = &Lease> {
        self.held.values()
    }
}
