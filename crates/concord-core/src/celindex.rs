//! The world paths each CEL rule reads, kept beside the world.
//!
//! A CEL rule declares what it reads as globs (`svc/*/pool_size`); to bind
//! them, a preview visits every world path under each glob's literal prefix
//! (`svc/`: every field of every service) and keeps those that match. The
//! coordinator previews many plans against one world, so it keeps, per rule
//! and prefix, the matching paths with their values and how many paths lie
//! under the prefix, updated as steps apply. A preview then reads the rule's
//! paths from the index and corrects them for the plans in flight, instead
//! of visiting the world. Derived from the world and the policy alone (not
//! part of a snapshot); a preview with it binds exactly what one without it
//! binds (debug builds check every use, a property test a kept index).

use concord_proto::{ResourcePath, Value};

use crate::policy::{CelRule, Policy};
use crate::world::World;

/// Per CEL rule of a policy, in policy order, what the world holds under its
/// `reads`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CelIndex {
    /// Per rule: its globs as written (what the index was built for), and
    /// per literal prefix of them (in `reads.prefixes` order) the world's
    /// paths under it.
    rules: Vec<(Vec<String>, Vec<Under>)>,
}

/// The world's paths under one literal prefix of a rule's globs.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Under {
    /// How many world paths lie under the prefix, matching or not: what a
    /// visit of the prefix counts against the rule's scan budget.
    pub count: usize,
    /// The paths under the prefix that the rule's globs match, with their
    /// values, in path order; `None` once the prefix held more paths than a
    /// rule may scan, from then until the index is built again (a preview
    /// then visits the world, as it would without an index).
    pub matching: Option<Vec<(ResourcePath, Value)>>,
}

impl CelIndex {
    /// The index of `world` for `policy`'s CEL rules.
    pub fn build(policy: &Policy, world: &World) -> CelIndex {
        let rules = policy
            .cel
            .iter()
            .map(|rule| {
                let unders = rule
                    .reads
                    .prefixes
                    .iter()
                    .map(|prefix| {
                        let mut count = 0usize;
                        let mut matching = Vec::new();
                        for (p, v) in world.scan_prefix(prefix) {
                            count += 1;
                            if count <= crate::preview::CEL_SCAN_PATHS_MAX && rule.reads.matches(p.as_str()) {
                                matching.push((p.clone(), v.clone()));
                            }
                        }
                        Under {
                            count,
                            matching: (count <= crate::preview::CEL_SCAN_PATHS_MAX).then_some(matching),
                        }
                    })
                    .collect();
                (rule.reads.patterns.clone(), unders)
            })
            .collect();
        CelIndex { rules }
    }

    /// Whether this index was built for `policy`'s CEL rules (an empty one
    /// is, for a policy without any).
    pub fn built_for(&self, policy: &Policy) -> bool {
        self.rules.len() == policy.cel.len()
            && self
                .rules
                .iter()
                .zip(&policy.cel)
                .all(|((patterns, _), rule)| *patterns == rule.reads.patterns)
    }

    /// Records that the world now holds `value` at `path` (`None`: removed),
    /// where it held something before if `existed`. `policy` must be the
    /// one the index was built for.
    pub fn set(&mut self, policy: &Policy, path: &ResourcePath, existed: bool, value: Option<&Value>) {
        for ((_, unders), rule) in self.rules.iter_mut().zip(&policy.cel) {
            for (under, prefix) in unders.iter_mut().zip(&rule.reads.prefixes) {
                if !path.as_str().starts_with(prefix.as_str()) {
                    continue;
                }
                match (existed, value.is_some()) {
                    (false, true) => under.count += 1,
                    (true, false) => under.count -= 1,
                    _ => {}
                }
                // Past what a rule may scan, the paths are no longer held (as
                // a build would not hold them); previews then visit the world
                // until the index is built again.
                if under.count > crate::preview::CEL_SCAN_PATHS_MAX {
                    under.matching = None;
                }
                let Some(matching) = under.matching.as_mut() else {
                    continue;
                };
                if !rule.reads.matches(path.as_str()) {
                    continue;
                }
                let at = matching.binary_search_by(|(p, _)| p.cmp(path));
                match (at, value) {
                    (Ok(i), Some(v)) => matching[i].1 = v.clone(),
                    (Err(i), Some(v)) => matching.insert(i, (path.clone(), v.clone())),
                    (Ok(i), None) => {
                        matching.remove(i);
                    }
                    (Err(_), None) => {}
                }
            }
        }
    }

    /// What the world holds under the prefixes of CEL rule `position`, if
    /// this index holds it for `rule`.
    pub(crate) fn rule(&self, position: usize, rule: &CelRule) -> Option<&[Under]> {
        let (patterns, unders) = self.rules.get(position)?;
        (*patterns == rule.reads.patterns).then_some(unders.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[[rules.cel]]
id = "cel.workers"
reads = ["app/*/workers", "db/main/max"]
expr = "true"
outcome = "reject"
[[rules.cel]]
id = "cel.plan"
reads = []
expr = "plan.steps.size() > 0"
outcome = "reject"
"#;

    fn path(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// An index kept through any sequence of writes and removals is the
        /// index built from the world they leave.
        #[test]
        fn a_kept_index_is_the_fresh_one(
            start in prop::collection::vec((0usize..6, 0usize..3, 0i64..9), 0..12),
            writes in prop::collection::vec((0usize..6, 0usize..3, prop::option::weighted(0.7, 0i64..9)), 0..20),
        ) {
            let policy = Policy::from_toml_str(POLICY).unwrap();
            let field = |f: usize| ["workers", "threads", "workers_max"][f];
            let at = |a: usize, f: usize| path(&format!("app/a{a}/{}", field(f)));
            let mut world = World::default();
            world.resources.insert(path("db/main/max"), Value::Int(100));
            for (a, f, v) in start {
                world.resources.insert(at(a, f), Value::Int(v));
            }
            let mut kept = CelIndex::build(&policy, &world);
            for (a, f, v) in writes {
                let p = at(a, f);
                let existed = world.resources.contains_key(&p);
                kept.set(&policy, &p, existed, v.map(Value::Int).as_ref());
                match v {
                    Some(v) => world.resources.insert(p, Value::Int(v)),
                    None => world.resources.remove(&p),
                };
            }
            prop_assert_eq!(kept, CelIndex::build(&policy, &world));
        }
    }
}
