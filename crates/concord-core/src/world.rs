//! The world model as previews see it: resource paths to values, and the
//! services with the resources they depend on.
//!
//! Values live only at leaves: a path holds a value or has descendants, never
//! both, so the tree has one meaning whichever way it is read.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Bound;

use concord_proto::{ResourcePath, Value};

use crate::budget::BudgetIndex;
use crate::celindex::CelIndex;
use serde::{Deserialize, Serialize};

/// Why a world document was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The document does not parse.
    #[error("world document: {0}")]
    Parse(String),
    /// A path holds a value and also has descendants.
    #[error("world: `{path}` holds a value but `{child}` is under it; values live only at leaves")]
    ValueAndChildren {
        /// The path with a value.
        path: ResourcePath,
        /// A descendant that also exists.
        child: ResourcePath,
    },
    /// A value breaks a limit.
    #[error("world: `{path}`: {detail}")]
    Value {
        /// The path.
        path: ResourcePath,
        /// What is wrong.
        detail: String,
    },
}

/// A service: a subtree of the world and the resources it depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The subtree the service owns, e.g. `svc/api`.
    pub path: ResourcePath,
    /// Resources it depends on, e.g. `db/primary`.
    #[serde(default)]
    pub depends_on: Vec<ResourcePath>,
}

/// The world: values at paths, and services.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct World {
    /// Values by path.
    #[serde(default)]
    pub resources: BTreeMap<ResourcePath, Value>,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
}

impl World {
    /// Parses a world from TOML.
    pub fn from_toml_str(s: &str) -> Result<World, WorldError> {
        let w: World = toml::from_str(s).map_err(|e| WorldError::Parse(e.to_string()))?;
        w.validate()?;
        Ok(w)
    }

    /// Parses a world from JSON.
    pub fn from_json_str(s: &str) -> Result<World, WorldError> {
        let w: World = serde_json::from_str(s).map_err(|e| WorldError::Parse(e.to_string()))?;
        w.validate()?;
        Ok(w)
    }

    /// Checks that values live only at leaves and respect the value limits.
    pub fn validate(&self) -> Result<(), WorldError> {
        for (path, value) in &self.resources {
            value.check().map_err(|(rule, detail)| WorldError::Value {
                path: path.clone(),
                detail: format!("{rule}: {detail}"),
            })?;
            if let Some(child) = first_descendant(&self.resources, path) {
                return Err(WorldError::ValueAndChildren {
                    path: path.clone(),
                    child,
                });
            }
        }
        Ok(())
    }

    /// The value at `path`.
    pub fn get(&self, path: &ResourcePath) -> Option<&Value> {
        self.resources.get(path)
    }

    /// Every (path, value) whose path text starts with `prefix`, in order.
    pub fn scan_prefix<'a, 'p>(
        &'a self,
        prefix: &'p str,
    ) -> impl Iterator<Item = (&'a ResourcePath, &'a Value)> + use<'a, 'p> {
        scan_prefix(&self.resources, prefix)
    }
}

/// Entries of a path-keyed map whose path text starts with `prefix`.
///
/// Paths sort as their text, so these entries form one run that starts at
/// `prefix`: the scan costs O(log n + matches), whatever the map's size.
pub(crate) fn scan_prefix<'a, 'p, V>(
    map: &'a BTreeMap<ResourcePath, V>,
    prefix: &'p str,
) -> impl Iterator<Item = (&'a ResourcePath, &'a V)> + use<'a, 'p, V> {
    map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(p, _)| p.as_str().starts_with(prefix))
}

fn first_descendant<V>(map: &BTreeMap<ResourcePath, V>, path: &ResourcePath) -> Option<ResourcePath> {
    let prefix = path.descendant_prefix();
    scan_prefix(map, &prefix).next().map(|(p, _)| p.clone())
}

/// Entries of a path-keyed map at `path`, at its ancestors and under it:
/// those a change at `path` overlaps. Ancestors are looked up by their text
/// (no path is built), descendants found by one ordered scan; with the
/// map's keys by hash, only where something is.
pub(crate) fn overlapping<'a, V>(map: Keyed<'a, V>, path: &ResourcePath) -> Vec<(&'a ResourcePath, &'a V)> {
    let text = path.as_str();
    let mut out: Vec<(&ResourcePath, &V)> = std::iter::once(text.len())
        .chain(slashes_back(text))
        .filter_map(|end| map.get_key_value(&text[..end]))
        .collect();
    let prefix = path.descendant_prefix();
    if map.any_under(&prefix) {
        out.extend(scan_prefix(map.map, &prefix));
    }
    out
}

/// A filter over the keys of a path-keyed map: the hashes of the
/// descendant prefixes its keys lie under (`a/` and `a/b/` for `a/b/c`),
/// each counted, and the number of keys with no `/`. It tells that a map
/// holds nothing under a prefix, nor a key whose parent holds nothing,
/// without descending the map; a hash it holds means "maybe", answered by
/// the map. Prefix hashes only: a few bytes per directory, not per key
/// (memory per plan in flight is a target). Kept beside the map by whoever
/// changes it (one [`PathKeys::insert`] when the map gains a key, one
/// [`PathKeys::remove`] when it loses one), derived from it (not part of a
/// snapshot). Keys of a larger map filter a smaller one too (the paths in
/// flight filter their projected changes). Debug builds check every "no"
/// against the map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathKeys {
    /// Whether it was built (an empty map also has empty keys).
    built: bool,
    /// Hash of a descendant prefix -> how many keys lie under it (never zero).
    under: rustc_hash::FxHashMap<u64, u32>,
    /// How many keys have no `/` (no prefix to count them under).
    top: u32,
}

impl PathKeys {
    /// The keys of an empty map.
    pub fn empty() -> Self {
        PathKeys {
            built: true,
            ..PathKeys::default()
        }
    }

    /// The keys of `map`.
    pub fn build<V>(map: &BTreeMap<ResourcePath, V>) -> Self {
        let mut keys = PathKeys::empty();
        for path in map.keys() {
            keys.insert(path);
        }
        keys
    }

    /// Whether it was built (a default one is not, and is not used).
    pub fn is_built(&self) -> bool {
        self.built
    }

    /// Records that the map gained `path`.
    pub fn insert(&mut self, path: &ResourcePath) {
        self.count(path.as_str(), true);
    }

    /// Records that the map lost `path`.
    pub fn remove(&mut self, path: &ResourcePath) {
        self.count(path.as_str(), false);
    }

    fn count(&mut self, text: &str, added: bool) {
        if !text.contains('/') {
            self.top = if added {
                self.top + 1
            } else {
                self.top.saturating_sub(1)
            };
        }
        for (end, _) in text.match_indices('/') {
            let h = key_hash(&text[..=end]);
            if added {
                *self.under.entry(h).or_insert(0) += 1;
            } else if let Some(n) = self.under.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    self.under.remove(&h);
                }
            }
        }
    }

    /// Whether the map may hold a key under `prefix` (text ending in `/`).
    fn may_hold_under(&self, prefix: &str) -> bool {
        self.under.contains_key(&key_hash(prefix))
    }

    /// Whether the map may hold the key whose text is `text`: only if its
    /// parent holds something.
    fn may_hold(&self, text: &str) -> bool {
        match slashes_back(text).next() {
            Some(i) => self.may_hold_under(&text[..=i]),
            None => self.top > 0,
        }
    }
}

/// The offsets of the `/`s in `text`, the last first: a plain scan (paths
/// are short, and `str::rfind` calls `memrchr`, whose setup costs more
/// than scanning them).
fn slashes_back(text: &str) -> impl Iterator<Item = usize> + '_ {
    text.bytes()
        .enumerate()
        .rev()
        .filter_map(|(i, b)| (b == b'/').then_some(i))
}

/// The hash [`PathKeys`] keeps of a text: fixed, seedless.
fn key_hash(text: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(text)
}

/// A path-keyed map, with its [`PathKeys`] if they are kept.
#[derive(Debug)]
pub(crate) struct Keyed<'a, V> {
    /// The map.
    pub map: &'a BTreeMap<ResourcePath, V>,
    keys: Option<&'a PathKeys>,
}

impl<V> Clone for Keyed<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for Keyed<'_, V> {}

impl<'a, V> Keyed<'a, V> {
    /// `map`, with `keys` if they were built (they must be `map`'s).
    pub fn new(map: &'a BTreeMap<ResourcePath, V>, keys: &'a PathKeys) -> Self {
        Keyed {
            map,
            keys: keys.is_built().then_some(keys),
        }
    }

    /// `map` alone.
    #[cfg(test)]
    pub fn plain(map: &'a BTreeMap<ResourcePath, V>) -> Self {
        Keyed { map, keys: None }
    }

    /// The entry whose path text is `text`.
    pub fn get_key_value(&self, text: &str) -> Option<(&'a ResourcePath, &'a V)> {
        if let Some(keys) = self.keys
            && !keys.may_hold(text)
        {
            debug_assert!(!self.map.contains_key(text), "path keys stale at `{text}`");
            return None;
        }
        self.map.get_key_value(text)
    }

    /// Whether the map holds the path whose text is `text`.
    pub fn contains(&self, text: &str) -> bool {
        self.get_key_value(text).is_some()
    }

    /// Whether the map holds a path whose text starts with `prefix`.
    pub fn any_under(&self, prefix: &str) -> bool {
        if let Some(keys) = self.keys
            && prefix.ends_with('/')
            && !keys.may_hold_under(prefix)
        {
            debug_assert!(
                scan_prefix(self.map, prefix).next().is_none(),
                "path keys stale under `{prefix}`"
            );
            return false;
        }
        scan_prefix(self.map, prefix).next().is_some()
    }
}

/// Point lookups into a world without descending its ordered map: each
/// path's value by the hash of its text, and the world's [`PathKeys`]. In a
/// large world a lookup in the ordered map is a descent through a B-tree of
/// text keys, comparing long shared prefixes at every level; here it is one
/// hash of the text.
///
/// The coordinator keeps one beside its world, updated as it applies steps;
/// previews that are given one read the world through it. Derived from the
/// world alone (not part of a snapshot), and only ever equal to a fresh
/// build: debug builds check every answer against the ordered map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathIndex {
    values: rustc_hash::FxHashMap<ResourcePath, Value>,
    /// The world's keys (built exactly when the index is).
    keys: PathKeys,
}

impl PathIndex {
    /// The index of `world`.
    pub fn build(world: &World) -> Self {
        let mut index = PathIndex {
            values: rustc_hash::FxHashMap::default(),
            keys: PathKeys::empty(),
        };
        index.values.reserve(world.resources.len());
        for (path, value) in &world.resources {
            index.set(path, Some(value));
        }
        index
    }

    /// Whether it was built (a default one is not, and answers nothing).
    pub fn is_built(&self) -> bool {
        self.keys.is_built()
    }

    /// Records that the world now holds `value` at `path` (`None`: removed).
    pub fn set(&mut self, path: &ResourcePath, value: Option<&Value>) {
        let existed = match value {
            Some(v) => self.values.insert(path.clone(), v.clone()).is_some(),
            None => self.values.remove(path.as_str()).is_some(),
        };
        match (existed, value.is_some()) {
            (false, true) => self.keys.insert(path),
            (true, false) => self.keys.remove(path),
            _ => {}
        }
    }

    /// The value at `path`.
    fn get(&self, path: &str) -> Option<&Value> {
        self.values.get(path)
    }
}

/// Changes layered over a world: path -> new value (`None`: removed).
pub type Overlay = BTreeMap<ResourcePath, Option<Value>>;

/// What a plan is previewed against: the world, optionally with the effects
/// of in-flight plans layered over it (the projected world). Borrowed, never
/// copied: cost follows the paths a preview reads, not the world's size.
#[derive(Clone, Copy, Debug)]
pub struct Base<'w> {
    world: &'w World,
    overlay: Option<&'w Overlay>,
    /// Keys that filter the overlay's (see [`Base::with_overlay_keys`]).
    overlay_keys: Option<&'w PathKeys>,
    memo: Option<&'w Memo<'w>>,
    index: Option<&'w BudgetIndex>,
    paths: Option<&'w PathIndex>,
    cel: Option<&'w CelIndex>,
}

/// Lookups in a base, remembered for the length of one preview. A plan's
/// steps, its states and the rules read the same few paths again and again,
/// and in a large world each lookup is a descent through a B-tree of text
/// keys (some 1,500 instructions at 100k paths); a remembered one is a scan
/// of a few hashes.
///
/// It also records what the preview read (every lookup, and the prefixes it
/// scanned), so that the coordinator can tell whether the effects of the
/// plans in flight could have changed anything the preview saw.
#[derive(Debug, Default)]
pub(crate) struct Memo<'w> {
    entries: RefCell<Vec<MemoEntry<'w>>>,
    /// Prefixes scanned in full (visits and scans), at most [`MEMO_SCANS_MAX`].
    scans: RefCell<Vec<Box<str>>>,
    /// Some read was not recorded (a table was full): what was read is unknown.
    overflowed: std::cell::Cell<bool>,
}

#[derive(Debug)]
struct MemoEntry<'w> {
    hash: u64,
    text: Box<str>,
    kind: MemoKind<'w>,
}

#[derive(Clone, Copy, Debug)]
enum MemoKind<'w> {
    /// The base's value at a path.
    Get(Option<&'w Value>),
    /// Whether the world, and the overlay, hold anything under a prefix.
    Under { world: bool, overlay: bool },
}

/// Most entries a memo keeps: beyond it lookups are simply not remembered,
/// so a plan that reads many paths costs what it did without one.
const MEMO_ENTRIES_MAX: usize = 64;

/// Most scanned prefixes a memo records; beyond it, it only notes that it
/// lost count.
const MEMO_SCANS_MAX: usize = 32;

/// FNV-1a: short keys, no allocation, the same in every process.
fn text_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl<'w> Memo<'w> {
    fn find(&self, is: fn(&MemoKind<'w>) -> bool, hash: u64, text: &str) -> Option<MemoKind<'w>> {
        self.entries
            .borrow()
            .iter()
            .find(|e| e.hash == hash && is(&e.kind) && &*e.text == text)
            .map(|e| e.kind)
    }

    fn remember(&self, hash: u64, text: &str, kind: MemoKind<'w>) {
        let mut entries = self.entries.borrow_mut();
        if entries.len() < MEMO_ENTRIES_MAX {
            entries.push(MemoEntry {
                hash,
                text: text.into(),
                kind,
            });
        } else {
            self.overflowed.set(true);
        }
    }

    fn scanned(&self, prefix: &str) {
        let mut scans = self.scans.borrow_mut();
        if scans.iter().any(|p| &**p == prefix) {
            return;
        }
        if scans.len() < MEMO_SCANS_MAX {
            scans.push(prefix.into());
        } else {
            self.overflowed.set(true);
        }
    }

    /// Whether `overlay` holds a path any read through this memo could have
    /// seen (a path looked up, or one under a prefix scanned or tested), or
    /// whether what was read is not known. When it is false, the same reads
    /// against a base with or without `overlay` gave the same answers.
    pub(crate) fn read_any(&self, overlay: Keyed<'_, Option<Value>>) -> bool {
        if self.overflowed.get() {
            return true;
        }
        self.entries.borrow().iter().any(|e| match e.kind {
            MemoKind::Get(_) => overlay.contains(&e.text),
            MemoKind::Under { .. } => overlay.any_under(&e.text),
        }) || self.scans.borrow().iter().any(|p| overlay.any_under(p))
    }
}

impl<'w> Base<'w> {
    /// The world as it is.
    pub fn current(world: &'w World) -> Self {
        Base {
            world,
            overlay: None,
            overlay_keys: None,
            memo: None,
            index: None,
            paths: None,
            cel: None,
        }
    }

    /// The world with `overlay` applied.
    pub fn projected(world: &'w World, overlay: &'w Overlay) -> Self {
        Base {
            world,
            overlay: Some(overlay),
            overlay_keys: None,
            memo: None,
            index: None,
            paths: None,
            cel: None,
        }
    }

    /// The same base, remembering its lookups in `memo`.
    pub(crate) fn with_memo<'m>(self, memo: &'m Memo<'m>) -> Base<'m>
    where
        'w: 'm,
    {
        Base {
            world: self.world,
            overlay: self.overlay,
            overlay_keys: self.overlay_keys,
            memo: Some(memo),
            index: self.index,
            paths: self.paths,
            cel: self.cel,
        }
    }

    /// The same base, reading budget rules' values of the world from
    /// `index`, which must be `index` of this base's world (a stale one gives
    /// wrong sums; debug builds check it at every use).
    pub fn with_index(self, index: &'w BudgetIndex) -> Self {
        Base {
            index: Some(index),
            ..self
        }
    }

    /// The same base, reading the world's values through `paths`, which
    /// must be the index of this base's world (debug builds check every
    /// answer against the world). An index not built is not used.
    pub fn with_paths(self, paths: &'w PathIndex) -> Self {
        Base {
            paths: paths.is_built().then_some(paths),
            ..self
        }
    }

    /// The same base, asking `keys` whether the overlay may hold a path
    /// before looking it up: `keys` must be those of a map whose keys
    /// include the overlay's (debug builds check every "no" against the
    /// overlay). Keys not built are not used.
    pub(crate) fn with_overlay_keys(self, keys: &'w PathKeys) -> Self {
        Base {
            overlay_keys: keys.is_built().then_some(keys),
            ..self
        }
    }

    /// The overlay, with its keys if they were given.
    fn overlay_keyed(&self) -> Option<Keyed<'w, Option<Value>>> {
        self.overlay.map(|map| Keyed {
            map,
            keys: self.overlay_keys,
        })
    }

    /// The same base, reading what CEL rules read of the world from `cel`,
    /// which must be the index of this base's world (debug builds check it
    /// at every use). Rules it holds nothing for are read from the world.
    pub fn with_cel(self, cel: &'w CelIndex) -> Self {
        Base { cel: Some(cel), ..self }
    }

    /// The budget index of the world, if one was given.
    pub(crate) fn budget_index(&self) -> Option<&'w BudgetIndex> {
        self.index
    }

    /// The CEL rules' index of the world, if one was given.
    pub(crate) fn cel_index(&self) -> Option<&'w CelIndex> {
        self.cel
    }

    /// The changes layered over the world, if any.
    pub(crate) fn overlay(&self) -> Option<&'w Overlay> {
        self.overlay
    }

    /// Notes that what lies under `prefix` was read: by a visit or a scan,
    /// or by a reader that found it elsewhere (an index and the overlay).
    pub(crate) fn note_scanned(&self, prefix: &str) {
        if let Some(memo) = self.memo {
            memo.scanned(prefix);
        }
    }

    /// The underlying world, without the overlay.
    pub fn world(&self) -> &'w World {
        self.world
    }

    /// The value at `path`.
    pub fn get(&self, path: &ResourcePath) -> Option<&'w Value> {
        self.get_str(path.as_str())
    }

    /// The value at the path whose text is `path` (no path is built to look it up).
    pub fn get_str(&self, path: &str) -> Option<&'w Value> {
        let Some(memo) = self.memo else {
            return self.lookup(path);
        };
        let hash = text_hash(path);
        if let Some(MemoKind::Get(v)) = memo.find(|k| matches!(k, MemoKind::Get(_)), hash, path) {
            return v;
        }
        let v = self.lookup(path);
        memo.remember(hash, path, MemoKind::Get(v));
        v
    }

    fn lookup(&self, path: &str) -> Option<&'w Value> {
        match self.overlay_keyed().and_then(|o| o.get_key_value(path)).map(|(_, v)| v) {
            Some(v) => v.as_ref(),
            None => self.world_get(path),
        }
    }

    /// The world's value at `path`, through the path index if there is one.
    fn world_get(&self, path: &str) -> Option<&'w Value> {
        let Some(paths) = self.paths else {
            return self.world.resources.get(path);
        };
        let v = paths.get(path);
        debug_assert_eq!(v, self.world.resources.get(path), "path index stale at `{path}`");
        v
    }

    /// Whether the world holds any path whose text starts with `prefix`.
    fn world_holds_under(&self, prefix: &str) -> bool {
        let keyed = Keyed {
            map: &self.world.resources,
            keys: self.paths.map(|p| &p.keys),
        };
        keyed.any_under(prefix)
    }

    /// Whether the world, and the overlay, hold any path whose text starts
    /// with `prefix` (removals in the overlay included).
    pub(crate) fn holds_under(&self, prefix: &str) -> (bool, bool) {
        let look = || {
            (
                self.world_holds_under(prefix),
                self.overlay_keyed().is_some_and(|o| o.any_under(prefix)),
            )
        };
        let Some(memo) = self.memo else {
            return look();
        };
        let hash = text_hash(prefix);
        if let Some(MemoKind::Under { world, overlay }) =
            memo.find(|k| matches!(k, MemoKind::Under { .. }), hash, prefix)
        {
            return (world, overlay);
        }
        let (world, overlay) = look();
        memo.remember(hash, prefix, MemoKind::Under { world, overlay });
        (world, overlay)
    }

    /// Calls `f` for every existing (path, value) whose path text starts with
    /// `prefix`, without copying: world entries first (those the overlay does
    /// not change), then the overlay's values, each run in path order.
    pub fn visit_prefix(&self, prefix: &str, f: impl FnMut(&'w ResourcePath, &'w Value)) {
        self.note_scanned(prefix);
        self.over_overlay(prefix, self.world.scan_prefix(prefix), |_| true, f);
    }

    /// [`Base::visit_prefix`], for a reader that wants only the paths
    /// `wanted` accepts, from what an index kept of the world under
    /// `prefix`: `count` paths lie there, of which `kept` (in path order)
    /// are the wanted ones. Calls `f` for the kept ones the overlay leaves,
    /// then for the overlay's wanted values under the prefix, and returns
    /// how many paths a visit would have come across.
    pub(crate) fn visit_kept(
        &self,
        prefix: &str,
        count: usize,
        kept: &'w [(ResourcePath, Value)],
        wanted: impl Fn(&ResourcePath) -> bool,
        f: impl FnMut(&'w ResourcePath, &'w Value),
    ) -> usize {
        self.note_scanned(prefix);
        // The overlay's paths replace the world's (a `None` removes one).
        let under = self.overlay.map_or(count, |o| {
            scan_prefix(o, prefix).fold(count, |n, (p, v)| {
                n - usize::from(self.world.resources.contains_key(p)) + usize::from(v.is_some())
            })
        });
        self.over_overlay(prefix, kept.iter().map(|(p, v)| (p, v)), wanted, f);
        under
    }

    /// Calls `f` for the world's `run` under `prefix` (in path order) but
    /// the paths the overlay changes, then for the overlay's values there
    /// that `wanted` accepts.
    fn over_overlay(
        &self,
        prefix: &str,
        run: impl Iterator<Item = (&'w ResourcePath, &'w Value)>,
        wanted: impl Fn(&ResourcePath) -> bool,
        mut f: impl FnMut(&'w ResourcePath, &'w Value),
    ) {
        // Both runs are in path order: walk the overlay's alongside the
        // world's instead of searching the overlay for every world path.
        let mut changed = self.overlay.map(|o| scan_prefix(o, prefix).peekable());
        for (p, v) in run {
            let overridden = changed.as_mut().is_some_and(|o| {
                while o.next_if(|(q, _)| q.as_str() < p.as_str()).is_some() {}
                o.peek().is_some_and(|(q, _)| *q == p)
            });
            if !overridden {
                f(p, v);
            }
        }
        if let Some(o) = self.overlay {
            for (p, v) in scan_prefix(o, prefix) {
                if let Some(v) = v.as_ref().filter(|_| wanted(p)) {
                    f(p, v);
                }
            }
        }
    }

    /// Every existing (path, value) whose path text starts with `prefix`, in order.
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(ResourcePath, Value)> {
        self.note_scanned(prefix);
        let base = self.world.scan_prefix(prefix).map(|(p, v)| (p.clone(), v.clone()));
        let Some(overlay) = self.overlay else {
            return base.collect();
        };
        let mut out: BTreeMap<ResourcePath, Value> = base.collect();
        for (p, v) in scan_prefix(overlay, prefix) {
            match v {
                Some(v) => out.insert(p.clone(), v.clone()),
                None => out.remove(p),
            };
        }
        out.into_iter().collect()
    }
}

/// A world as a plan would leave it: the base plus the changes of the steps
/// applied so far. Changes equal to the base are dropped, so two states are
/// the same exactly when their change maps are equal.
#[derive(Clone, Debug)]
pub struct State<'w> {
    base: Base<'w>,
    /// Path -> new value (`None`: removed).
    changes: Overlay,
}

impl<'w> State<'w> {
    /// The current world, unchanged.
    pub fn new(world: &'w World) -> Self {
        State::on(Base::current(world))
    }

    /// `base`, unchanged.
    pub fn on(base: Base<'w>) -> Self {
        State {
            base,
            changes: BTreeMap::new(),
        }
    }

    /// What the changes are layered on.
    pub fn base(&self) -> Base<'w> {
        self.base
    }

    /// The changes against the base.
    pub fn changes(&self) -> &BTreeMap<ResourcePath, Option<Value>> {
        &self.changes
    }

    /// `base` with `changes` already applied (changes equal to the base
    /// must have been dropped, as [`State::put`] does).
    pub(crate) fn with_changes(base: Base<'w>, changes: Overlay) -> Self {
        State { base, changes }
    }

    /// The value at `path` in this state.
    pub fn get(&self, path: &ResourcePath) -> Option<&Value> {
        self.get_str(path.as_str())
    }

    /// The value at the path whose text is `path`.
    pub fn get_str(&self, path: &str) -> Option<&Value> {
        match self.changes.get(path) {
            Some(v) => v.as_ref(),
            None => self.base.get_str(path),
        }
    }

    /// Writes (`Some`) or removes (`None`) the value at `path`.
    pub fn put(&mut self, path: ResourcePath, value: Option<Value>) {
        let same_as_base = match (&value, self.base.get(&path)) {
            (None, None) => true,
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        if same_as_base {
            self.changes.remove(&path);
        } else {
            self.changes.insert(path, value);
        }
    }

    /// Every existing (path, value) whose path text starts with `prefix`, in order.
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(ResourcePath, Value)> {
        let mut out: BTreeMap<ResourcePath, Value> = self.base.scan_prefix(prefix).into_iter().collect();
        for (p, v) in scan_prefix(&self.changes, prefix) {
            match v {
                Some(v) => out.insert(p.clone(), v.clone()),
                None => out.remove(p),
            };
        }
        out.into_iter().collect()
    }

    /// The nearest ancestor of `path` that holds a value, if any.
    pub fn valued_ancestor(&self, path: &ResourcePath) -> Option<ResourcePath> {
        // Ancestors are prefixes of the path's text: look them up by slice
        // and build a path only for the one found.
        let text = path.as_str();
        for end in slashes_back(text) {
            if self.get_str(&text[..end]).is_some() {
                return ResourcePath::parse(&text[..end]).ok();
            }
        }
        None
    }

    /// Whether anything exists strictly under `path`. Stops at the first
    /// existing descendant instead of collecting the subtree.
    pub fn has_descendants(&self, path: &ResourcePath) -> bool {
        let prefix = path.descendant_prefix();
        let overlay = self.base.overlay;
        let removed = |p: &ResourcePath| {
            matches!(self.changes.get(p), Some(None))
                || (!self.changes.contains_key(p) && matches!(overlay.and_then(|o| o.get(p)), Some(None)))
        };
        if scan_prefix(&self.changes, &prefix).any(|(_, v)| v.is_some()) {
            return true;
        }
        // Most written paths are leaves: the base holds nothing under them,
        // which it answers (and remembers) without a scan.
        let (in_world, in_overlay) = self.base.holds_under(&prefix);
        (in_overlay && overlay.is_some_and(|o| scan_prefix(o, &prefix).any(|(p, v)| v.is_some() && !removed(p))))
            || (in_world && scan_prefix(&self.base.world.resources, &prefix).any(|(p, _)| !removed(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap_or_else(|(_, e)| panic!("`{s}`: {e}"))
    }

    /// What `memo` says of `overlay`, read plainly and through the
    /// overlay's keys: the two must agree.
    fn read_any(memo: &Memo<'_>, overlay: &Overlay) -> bool {
        let keys = PathKeys::build(overlay);
        let plain = memo.read_any(Keyed::plain(overlay));
        assert_eq!(plain, memo.read_any(Keyed::new(overlay, &keys)));
        plain
    }

    fn overlay(paths: &[&str]) -> Overlay {
        paths.iter().map(|p| (path(p), Some(Value::Int(1)))).collect()
    }

    /// What a memo says was read decides whether the coordinator previews a
    /// plan a second time on the world as it is: every path looked up, every
    /// prefix tested or scanned counts, and nothing else does.
    #[test]
    fn a_memo_knows_which_overlays_could_change_what_was_read() {
        let world = World {
            resources: [("svc/api/pool_size", 10), ("svc/web/pool_size", 20), ("db/max", 100)]
                .into_iter()
                .map(|(p, v)| (path(p), Value::Int(v)))
                .collect(),
            services: BTreeMap::new(),
        };
        let inflight = overlay(&["fleet/node-1/cpu"]);
        let memo = Memo::default();
        let base = Base::projected(&world, &inflight).with_memo(&memo);
        assert_eq!(base.get_str("db/max"), Some(&Value::Int(100)));
        assert!(base.holds_under("svc/api/pool_size/") == (false, false));
        let mut seen = 0;
        base.visit_prefix("svc/", |_, _| seen += 1);
        assert_eq!(seen, 2);
        // Looked up, tested, scanned: each is read.
        assert!(read_any(&memo, &overlay(&["db/max"])));
        assert!(read_any(&memo, &overlay(&["svc/api/pool_size/x"])));
        assert!(read_any(&memo, &overlay(&["svc/new/replicas"])));
        // Beside them, an ancestor of a looked-up path, or elsewhere: not read.
        assert!(!read_any(&memo, &overlay(&["db/max2"])));
        assert!(!read_any(&memo, &overlay(&["db/other"])));
        assert!(!read_any(&memo, &overlay(&["fleet/node-2/cpu", "volumes/v/size"])));
        assert!(!read_any(&memo, &Overlay::new()));
    }

    /// A memo that could not record every read says so: anything may have been read.
    #[test]
    fn a_full_memo_assumes_everything_was_read() {
        let world = World::default();
        let memo = Memo::default();
        let base = Base::current(&world).with_memo(&memo);
        for i in 0..=MEMO_ENTRIES_MAX {
            assert_eq!(base.get_str(&format!("a/p{i}")), None);
        }
        assert!(read_any(&memo, &overlay(&["z/elsewhere"])));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]

        /// A path index and path keys kept through writes and removals are
        /// the ones built fresh from the world they leave, and answer every
        /// lookup, prefix test and overlap as the world itself does.
        #[test]
        fn kept_path_indexes_are_the_fresh_ones(
            start in proptest::collection::vec((0usize..4, 0usize..4, 0usize..3), 0..12),
            writes in proptest::collection::vec((0usize..4, 0usize..4, 0usize..3, proptest::option::of(0i64..3)), 0..24),
        ) {
            // Paths of depth 1 to 3 (`a0`, `a0/b1`, `a0/b1/c2`): a write
            // above or below an existing value takes its place, as steps do.
            let name = |a: usize, b: usize, depth: usize| match depth {
                0 => format!("a{a}"),
                1 => format!("a{a}/b{b}"),
                _ => format!("a{a}/b{b}/c{}", (a + b) % 3),
            };
            let mut world = World::default();
            let put = |world: &mut World, index: Option<&mut (PathIndex, PathKeys)>, p: ResourcePath, v: Option<Value>| {
                // Values live only at leaves: clear what the write overlaps.
                let overlapping: Vec<ResourcePath> = world
                    .resources
                    .keys()
                    .filter(|q| *q != &p && (q.as_str().starts_with(&p.descendant_prefix()) || p.as_str().starts_with(&q.descendant_prefix())))
                    .cloned()
                    .collect();
                let mut index = index;
                for q in overlapping {
                    world.resources.remove(&q);
                    if let Some((ix, keys)) = index.as_deref_mut() {
                        ix.set(&q, None);
                        keys.remove(&q);
                    }
                }
                if let Some((ix, keys)) = index {
                    ix.set(&p, v.as_ref());
                    // Keys change when the map gains or loses one.
                    match (world.resources.contains_key(&p), v.is_some()) {
                        (false, true) => keys.insert(&p),
                        (true, false) => keys.remove(&p),
                        _ => {}
                    }
                }
                match v {
                    Some(v) => world.resources.insert(p, v),
                    None => world.resources.remove(&p),
                };
            };
            for (a, b, d) in start {
                put(&mut world, None, path(&name(a, b, d)), Some(Value::Int(0)));
            }
            let mut kept = (PathIndex::build(&world), PathKeys::build(&world.resources));
            for (a, b, d, v) in writes {
                put(&mut world, Some(&mut kept), path(&name(a, b, d)), v.map(Value::Int));
            }
            let (index, keys) = kept;
            proptest::prop_assert_eq!(&index, &PathIndex::build(&world));
            proptest::prop_assert_eq!(&keys, &PathKeys::build(&world.resources));
            let keyed = Keyed::new(&world.resources, &keys);
            let base = Base::current(&world).with_paths(&index);
            for a in 0..4 {
                for b in 0..4 {
                    for d in 0..3 {
                        let p = name(a, b, d);
                        proptest::prop_assert_eq!(base.get_str(&p), world.resources.get(p.as_str()));
                        let prefix = format!("{p}/");
                        let held = scan_prefix(&world.resources, &prefix).next().is_some();
                        proptest::prop_assert_eq!(base.holds_under(&prefix), (held, false));
                        proptest::prop_assert_eq!(keyed.any_under(&prefix), held);
                        proptest::prop_assert_eq!(keyed.contains(&p), world.resources.contains_key(p.as_str()));
                        let plain = overlapping(Keyed::plain(&world.resources), &path(&p));
                        proptest::prop_assert_eq!(overlapping(keyed, &path(&p)), plain);
                    }
                }
            }
        }
    }
}
