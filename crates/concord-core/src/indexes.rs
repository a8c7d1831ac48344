//! The indexes kept beside a world: the budget rules' values, point lookups
//! and what the CEL rules read. Derived from the world (and the policy), so
//! never in a snapshot: built again when missing or built for another
//! policy, and kept up to date as the world changes.

use concord_proto::{ResourcePath, Value};

use crate::budget::BudgetIndex;
use crate::celindex::CelIndex;
use crate::policy::Policy;
use crate::world::{Base, PathIndex, World};

/// A world's indexes (see the module's documentation).
#[derive(Debug, Default)]
pub struct WorldIndexes {
    budget: BudgetIndex,
    paths: PathIndex,
    cel: CelIndex,
}

impl WorldIndexes {
    /// The indexes of `world` for `policy`.
    pub fn build(policy: &Policy, world: &World) -> Self {
        WorldIndexes {
            budget: BudgetIndex::build(policy, world),
            paths: PathIndex::build(world),
            cel: CelIndex::build(policy, world),
        }
    }

    /// Builds those that are missing (a restored coordinator) or were built
    /// for another policy.
    pub fn ensure(&mut self, policy: &Policy, world: &World) {
        if !self.budget.built_for(policy) {
            self.budget = BudgetIndex::build(policy, world);
        }
        if !self.paths.is_built() {
            self.paths = PathIndex::build(world);
        }
        if !self.cel.built_for(policy) {
            self.cel = CelIndex::build(policy, world);
        }
    }

    /// Drops those built for a policy other than `policy`. Not kept aside:
    /// they are not updated while `policy` holds, so a change back to their
    /// policy must build them again, not use them as they were.
    pub fn forget_other_policy(&mut self, policy: &Policy) {
        if !self.budget.built_for(policy) {
            self.budget = BudgetIndex::default();
        }
        if !self.cel.built_for(policy) {
            self.cel = CelIndex::default();
        }
    }

    /// `world` is about to hold each change's value at its path (`None`:
    /// removed; the paths distinct): the indexes built for `policy` follow.
    pub fn apply<'c>(
        &mut self,
        policy: &Policy,
        world: &World,
        changes: impl IntoIterator<Item = (&'c ResourcePath, Option<&'c Value>)>,
    ) {
        let (budget, cel, paths) = (
            self.budget.built_for(policy),
            self.cel.built_for(policy),
            self.paths.is_built(),
        );
        for (path, value) in changes {
            if budget {
                self.budget.set(policy, path, value);
            }
            if cel {
                let existed = world.resources.contains_key(path);
                self.cel.set(policy, path, existed, value);
            }
            if paths {
                self.paths.set(path, value);
            }
        }
    }
}

impl<'w> Base<'w> {
    /// The same base, reading the world through `indexes`, which must be
    /// those of this base's world (debug builds check every use).
    pub fn with_indexes(self, indexes: &'w WorldIndexes) -> Self {
        self.with_index(&indexes.budget)
            .with_paths(&indexes.paths)
            .with_cel(&indexes.cel)
    }
}
