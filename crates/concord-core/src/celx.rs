//! Binding concord's values to CEL, and the helpers rules may call.
//!
//! `before` and `after` are maps of only the paths a rule declares it reads,
//! read in place ([`Tree`]): `after.svc.api.pool_size`. CEL maps iterate in an
//! unspecified order, so rules that need an order use `keys(m)` (sorted)
//! and `sum(list)` (order-independent: it sorts floats before adding).

// CEL's own map type is a std HashMap; we build it but never iterate it.
#![allow(clippy::disallowed_types)]

use std::collections::{BTreeMap, HashMap};

use cel::common::types::{CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelString, CelUInt};
use cel::common::value::{CowVal, Val as CelVal};
use cel::context::VariableResolver;
use cel::objects::Key;
use cel::{ExecutionError, Value as CelValue};
use concord_proto::{ResourcePath, Value};

/// Converts a CEL result to a concord value for a report; maps come out sorted.
pub fn from_cel(v: &CelValue) -> Value {
    match v {
        CelValue::Bool(b) => Value::Bool(*b),
        CelValue::Int(i) => Value::Int(*i),
        CelValue::UInt(u) => i64::try_from(*u).map(Value::Int).unwrap_or(Value::Float(*u as f64)),
        CelValue::Float(f) if f.is_finite() => Value::Float(*f),
        CelValue::String(s) => Value::Str(s.to_string()),
        CelValue::List(l) => Value::List(l.iter().map(from_cel).collect()),
        CelValue::Map(m) => Value::Map(
            m.map
                .iter()
                .map(|(k, v)| (key_text(k), from_cel(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
        other => Value::Str(format!("{other:?}")),
    }
}

fn key_text(k: &Key) -> String {
    match k {
        Key::String(s) => s.to_string(),
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
    }
}

/// A CEL value as the interpreter holds it. Built straight from concord's
/// values (no intermediate `cel::Value` to convert), borrowing their text.
pub type Val<'v> = Box<dyn CelVal + 'v>;

/// Converts a concord value to an interpreter value, borrowing its strings.
pub fn to_val(v: &Value) -> Val<'_> {
    match v {
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Int(i) => Box::new(CelInt::from(*i)),
        Value::Float(f) => Box::new(CelDouble::from(*f)),
        Value::Str(s) => Box::new(CelString::from(s.as_str())),
        Value::List(l) => Box::new(CelList::from(l.iter().map(to_val).collect::<Vec<_>>())),
        Value::Map(m) => Box::new(CelMap::from(
            m.iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), to_val(v)))
                .collect::<HashMap<_, _>>(),
        )),
    }
}

/// A string value, borrowed.
pub fn str_val(s: &str) -> Val<'_> {
    Box::new(CelString::from(s))
}

/// A map value from string keys.
pub fn record_val<'v>(entries: Vec<(&'v str, Val<'v>)>) -> Val<'v> {
    Box::new(record_map(entries))
}

fn record_map<'v>(entries: Vec<(&'v str, Val<'v>)>) -> CelMap<'v> {
    CelMap::from(
        entries
            .into_iter()
            .map(|(k, v)| (CelMapKey::from(k), v))
            .collect::<HashMap<_, _>>(),
    )
}

/// The built form of a tree, for the tests' comparisons.
#[cfg(test)]
enum Node<'v> {
    Leaf(&'v Value),
    Branch(BTreeMap<&'v str, Node<'v>>),
}

#[cfg(test)]
fn insert_all<'v>(root: &mut BTreeMap<&'v str, Node<'v>>, entries: impl Iterator<Item = (&'v str, &'v Value)>) {
    for (path, value) in entries {
        let mut segs = path.split('/').peekable();
        let mut cur = &mut *root;
        while let Some(seg) = segs.next() {
            if segs.peek().is_none() {
                cur.insert(seg, Node::Leaf(value));
            } else {
                let node = cur.entry(seg).or_insert_with(|| Node::Branch(BTreeMap::new()));
                if let Node::Leaf(_) = node {
                    // Worlds keep values at leaves; a leaf here cannot have children.
                    *node = Node::Branch(BTreeMap::new());
                }
                let Node::Branch(next) = node else { unreachable!() };
                cur = next;
            }
        }
    }
}

#[cfg(test)]
fn build_node<'v>(m: &BTreeMap<&'v str, Node<'v>>) -> Val<'v> {
    Box::new(CelMap::from(
        m.iter()
            .map(|(k, n)| {
                (
                    CelMapKey::from(*k),
                    match n {
                        Node::Leaf(v) => to_val(v),
                        Node::Branch(b) => build_node(b),
                    },
                )
            })
            .collect::<HashMap<_, _>>(),
    ))
}

/// A projection's paths as a CEL map, read in place: `after.svc.api` is the
/// run of entries under `svc/api/`, found by binary search in the sorted
/// entries, and a leaf is converted only when it is read. Nothing is built
/// before the rule runs (a nested map of every path a rule reads cost more
/// than interpreting the rule).
///
/// Entries are in path order, values live only at leaves, and every entry
/// of a node starts with the node's path: `at` is where its keys begin.
///
/// A projection that only changes values of the rule's base is read as a
/// [`Patch`] of that base: the base's entries, with the changed values
/// looked up in the patch; no projection is built.
#[derive(Debug)]
pub struct Tree<'v> {
    entries: &'v [(&'v ResourcePath, &'v Value)],
    at: usize,
    /// The keys and their runs of entries, once asked for (to iterate or
    /// count): then also used to look keys up.
    keys: std::sync::OnceLock<Vec<Child<'v>>>,
    /// Where `entries` begin in the whole projection.
    origin: usize,
    /// The projection as a patch of a shared base, if it is one.
    patch: Option<&'v Patch<'v>>,
}

/// The paths a CEL rule reads of the base its projections are layered on,
/// shared by those projections so that `sum_product` runs over the base
/// once: a projection with the base's paths (values changed, none added or
/// removed) takes the product of each key it did not change from the base.
#[derive(Debug)]
pub struct Sums<'v> {
    base: &'v [(&'v ResourcePath, &'v Value)],
    /// Per node and fields summed: each key's run and what it adds.
    memo: std::sync::Mutex<Vec<SumMemo>>,
}

/// One node's `sum_product` over the base, key by key.
#[derive(Debug)]
struct SumMemo {
    origin: usize,
    len: usize,
    at: usize,
    fields: Vec<Box<str>>,
    /// Per key in order: its text's length, its run, what it adds.
    keys: Vec<(usize, usize, usize, Factor)>,
}

/// A projection that is [`Sums`]'s base with the values at `changed`
/// (indexes into the base, ascending) replaced by `values`: read through
/// the base's entries, never built.
#[derive(Debug)]
pub struct Patch<'v> {
    sums: &'v Sums<'v>,
    changed: Vec<usize>,
    values: Vec<&'v Value>,
}

impl<'v> Sums<'v> {
    /// The base, in path order.
    pub fn new(base: &'v [(&'v ResourcePath, &'v Value)]) -> Self {
        Sums {
            base,
            memo: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The base with `changes` (path order) applied, as a patch: `None`
    /// when a change adds or removes a path.
    pub fn patch(
        &'v self,
        changes: impl IntoIterator<Item = (&'v ResourcePath, &'v Option<Value>)>,
    ) -> Option<Patch<'v>> {
        let (mut changed, mut values) = (Vec::new(), Vec::new());
        for (p, v) in changes {
            values.push(v.as_ref()?);
            changed.push(self.base.binary_search_by(|e| e.0.cmp(p)).ok()?);
        }
        Some(Patch {
            sums: self,
            changed,
            values,
        })
    }
}

/// What one key of a map adds to a `sum_product`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Factor {
    /// Nothing: not a map, or a field is missing.
    Skip,
    /// The product of its fields.
    Product(Number),
    /// Only the general path can tell (a field that is a subtree or not a
    /// number, a map value, an overflow).
    General,
}

/// The sum of what the keys add, in key order, as [`Total`] adds.
fn sum_of(factors: impl Iterator<Item = Factor>) -> Option<Number> {
    let mut total = Total::default();
    for f in factors {
        match f {
            Factor::Skip => {}
            Factor::Product(p) => total.add(p, "sum_product").ok()?,
            Factor::General => return None,
        }
    }
    Some(total.number())
}

impl<'v> Patch<'v> {
    /// `tree`'s [`Tree::sum_product`]: the keys with a changed entry are
    /// worked out on `tree`, the others taken from the base.
    fn sum_product(&self, tree: &Tree<'v>, fields: &[&str]) -> Option<Number> {
        // A patched tree reads the base's entries: `tree.entries` are the
        // base's, from `origin`.
        let (origin, len, at) = (tree.origin, tree.entries.len(), tree.at);
        // CEL values must be Sync; one rule's evaluation is single-threaded.
        let mut memo = self.sums.memo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = |m: &SumMemo| {
            m.origin == origin && m.len == len && m.at == at && m.fields.iter().map(|f| &**f).eq(fields.iter().copied())
        };
        let i = match memo.iter().position(same) {
            Some(i) => i,
            None => {
                let on_base = Tree {
                    entries: tree.entries,
                    at,
                    keys: std::sync::OnceLock::new(),
                    origin,
                    patch: None,
                };
                let keys = on_base
                    .keys()
                    .iter()
                    .map(|c| {
                        let n = c.text.len();
                        (n, c.from, c.to, on_base.factor(n, c.from, c.to, fields))
                    })
                    .collect();
                memo.push(SumMemo {
                    origin,
                    len,
                    at,
                    fields: fields.iter().map(|f| Box::from(*f)).collect(),
                    keys,
                });
                memo.len() - 1
            }
        };
        let changed = &self.changed;
        sum_of(memo[i].keys.iter().map(|&(n, from, to, base_factor)| {
            let first = changed.partition_point(|&c| c < origin + from);
            if changed.get(first).is_some_and(|&c| c < origin + to) {
                tree.factor(n, from, to, fields)
            } else {
                base_factor
            }
        }))
    }
}

/// A key of a [`Tree`] and its run of entries.
#[derive(Clone, Debug)]
struct Child<'v> {
    key: CelString<'v>,
    text: &'v str,
    from: usize,
    to: usize,
}

/// How `text` compares with `key` followed by `/`, without building it.
fn cmp_dir(text: &str, key: &str) -> std::cmp::Ordering {
    let (t, k) = (text.as_bytes(), key.as_bytes());
    let n = t.len().min(k.len());
    t[..n].cmp(&k[..n]).then_with(|| {
        if t.len() <= k.len() {
            // `text` is `key` or a prefix of it: before `key/`.
            std::cmp::Ordering::Less
        } else {
            // Under `key/` when the next byte is the separator.
            t[k.len()].cmp(&b'/')
        }
    })
}

impl<'v> Tree<'v> {
    /// The whole projection: `entries` in path order.
    pub fn new(entries: &'v [(&'v ResourcePath, &'v Value)]) -> Self {
        Tree {
            entries,
            at: 0,
            keys: std::sync::OnceLock::new(),
            origin: 0,
            patch: None,
        }
    }

    /// The whole projection that `patch` makes of its base.
    pub fn patched(patch: &'v Patch<'v>) -> Self {
        Tree {
            patch: Some(patch),
            ..Tree::new(patch.sums.base)
        }
    }

    /// The value of entry `i`: the patch's where it changes it.
    fn value(&self, i: usize) -> &'v Value {
        if let Some(patch) = self.patch
            && let Ok(k) = patch.changed.binary_search(&(self.origin + i))
        {
            return patch.values[k];
        }
        self.entries[i].1
    }

    fn rest(&self, i: usize) -> &'v str {
        &self.entries[i].0.as_str()[self.at..]
    }

    /// The value at `key`: a leaf's value, or the subtree under it.
    fn child(&self, key: &str) -> Option<Box<dyn CelVal + 'v>> {
        if let Some(keys) = self.keys.get() {
            let i = keys.binary_search_by(|c| c.text.cmp(key)).ok()?;
            return Some(self.node(key, keys[i].from, keys[i].to));
        }
        let n = self.entries.len();
        // A leaf: the entry whose rest is exactly `key`.
        let i = self.entries.partition_point(|e| &e.0.as_str()[self.at..] < key);
        if i < n && self.rest(i) == key {
            return Some(to_val(self.value(i)));
        }
        // A subtree: the run of entries whose rest starts with `key/`.
        let lo = self
            .entries
            .partition_point(|e| cmp_dir(&e.0.as_str()[self.at..], key) == std::cmp::Ordering::Less);
        let hi = lo
            + self.entries[lo..]
                .partition_point(|e| cmp_dir(&e.0.as_str()[self.at..], key) == std::cmp::Ordering::Equal);
        (hi > lo).then(|| self.node(key, lo, hi))
    }

    /// The value of key `key` whose run is `from..to`: a leaf, or a subtree.
    fn node(&self, key: &str, from: usize, to: usize) -> Box<dyn CelVal + 'v> {
        if to == from + 1 && self.rest(from).len() == key.len() {
            return to_val(self.value(from));
        }
        Box::new(Tree {
            entries: &self.entries[from..to],
            at: self.at + key.len() + 1,
            keys: std::sync::OnceLock::new(),
            origin: self.origin + from,
            patch: self.patch,
        })
    }

    /// The keys in order, each with its run: one pass over the entries.
    fn keys(&self) -> &[Child<'v>] {
        self.keys.get_or_init(|| {
            let mut keys: Vec<Child<'v>> = Vec::new();
            for i in 0..self.entries.len() {
                let rest = self.rest(i);
                let text = rest
                    .as_bytes()
                    .iter()
                    .position(|&b| b == b'/')
                    .map_or(rest, |end| &rest[..end]);
                match keys.last_mut() {
                    Some(last) if last.text == text => last.to = i + 1,
                    _ => keys.push(Child {
                        key: CelString::from(text),
                        text,
                        from: i,
                        to: i + 1,
                    }),
                }
            }
            // Entries sort by their whole text (`a-b/..` before `a/..`), keys
            // by theirs; a key's entries are one run (values only at leaves).
            keys.sort_by(|a, b| a.text.cmp(b.text));
            keys
        })
    }

    /// [`sum_product`] over this map, read in place: per key (in order) the
    /// product of its `fields`, summed as [`Total`] does. `None` where the
    /// general path must answer (a field that is a subtree or not a number,
    /// an entry that is a map value, an overflow): it gives the same answer
    /// or error, value by value, and only this common case is made fast.
    fn sum_product(&self, fields: &[&str]) -> Option<Number> {
        let plain = || {
            sum_of(
                self.keys()
                    .iter()
                    .map(|c| self.factor(c.text.len(), c.from, c.to, fields)),
            )
        };
        let Some(patch) = self.patch else {
            return plain();
        };
        let sum = patch.sum_product(self, fields);
        debug_assert_eq!(sum, plain(), "a patched sum_product differs from the plain one");
        sum
    }

    /// What the key whose text is `n` bytes long, with the run `from..to`,
    /// adds to a [`sum_product`]: the product of its `fields`.
    fn factor(&self, n: usize, from: usize, to: usize, fields: &[&str]) -> Factor {
        if to == from + 1 && self.rest(from).len() == n {
            // A leaf: not a map (skipped), unless it holds a map value.
            return match self.value(from) {
                Value::Map(_) => Factor::General,
                _ => Factor::Skip,
            };
        }
        let at = self.at + n + 1;
        let mut product = Number::Int(1);
        for field in fields {
            let found = (from..to).find_map(|i| {
                let rest = &self.entries[i].0.as_str()[at..];
                let tail = rest.strip_prefix(*field)?;
                Some((tail.is_empty(), self.value(i)))
            });
            let v = match found {
                None => return Factor::Skip,
                Some((true, v)) => v,
                // `field/...`, or a longer key sharing its start: the
                // general path tells a subtree from a missing field.
                Some((false, _)) => return Factor::General,
            };
            let factor = match v {
                Value::Int(i) => Number::Int(*i),
                Value::Float(f) => Number::Float(*f),
                _ => return Factor::General,
            };
            product = match product.times(factor) {
                Some(p) => p,
                None => return Factor::General,
            };
        }
        Factor::Product(product)
    }

    /// The same map, built: what the tests compare it with.
    #[cfg(test)]
    fn built(&self) -> Val<'v> {
        let mut root: BTreeMap<&'v str, Node<'v>> = BTreeMap::new();
        insert_all(
            &mut root,
            self.entries
                .iter()
                .enumerate()
                .map(|(i, (p, _))| (&p.as_str()[self.at..], self.value(i))),
        );
        build_node(&root)
    }
}

impl<'v> CelVal for Tree<'v> {
    fn get_type(&self) -> &cel::common::types::Type {
        <Self as CelVal>::cel_type()
    }

    fn cel_type() -> &'static cel::common::types::Type
    where
        Self: Sized,
    {
        <CelMap<'_> as CelVal>::cel_type()
    }

    fn as_container(&self) -> Option<&dyn cel::common::traits::Container> {
        Some(self)
    }

    fn as_indexer<'b, 'w>(&'b self) -> Option<&'b (dyn cel::common::traits::Indexer + 'w)>
    where
        Self: 'w,
    {
        Some(self)
    }

    fn into_indexer<'w>(self: Box<Self>) -> Option<Box<dyn cel::common::traits::Indexer + 'w>>
    where
        Self: 'w,
    {
        Some(self)
    }

    fn as_iterable<'b, 'w>(&'b self) -> Option<&'b (dyn cel::common::traits::Iterable + 'w)>
    where
        Self: 'w,
    {
        Some(self)
    }

    fn as_sizer(&self) -> Option<&dyn cel::common::traits::Sizer> {
        Some(self)
    }

    fn equals(&self, other: &dyn CelVal) -> bool {
        equals_map(
            self.keys().iter().map(|c| (c.text, self.node(c.text, c.from, c.to))),
            other,
        )
    }

    fn clone_as_boxed<'w>(&self) -> Box<dyn CelVal + 'w>
    where
        Self: 'w,
    {
        Box::new(Tree {
            entries: self.entries,
            at: self.at,
            keys: self.keys.clone(),
            origin: self.origin,
            patch: self.patch,
        })
    }
}

/// A map key as text: the tree's keys are strings.
fn key_str(key: &dyn CelVal) -> Option<&str> {
    key.downcast_ref::<CelString>().map(|s| s.inner())
}

/// Whether the map of entries `mine` equals `other`: `other` is a map with
/// as many keys, each of `mine` found there with an equal value. Read
/// through `other`'s map traits, so a map read in place (a [`Tree`], a lazy
/// record) compares with any map, built or read in place. (cel's own map
/// downcasts the other side: with a map literal on the left, only a built
/// map compares equal.)
fn equals_map<'v>(mine: impl Iterator<Item = (&'v str, Val<'v>)>, other: &dyn CelVal) -> bool {
    let (Some(size), Some(index)) = (other.as_sizer(), other.as_indexer()) else {
        return false;
    };
    if other.get_type() != <CelMap<'_> as CelVal>::cel_type() {
        return false;
    }
    let mut count = 0;
    for (key, mine) in mine {
        count += 1;
        if !index
            .get(&CelString::from(key))
            .is_ok_and(|theirs| mine.equals(theirs.as_ref()))
        {
            return false;
        }
    }
    size.size() == CelInt::from(count)
}

/// Indexing a map of text keys with another key: other key types are
/// valid map keys that it does not hold; anything else is no key at all.
fn not_a_text_key(key: &dyn CelVal) -> ExecutionError {
    match key_order(key) {
        Some(KeyOrder::Int(i)) => ExecutionError::no_such_key(&i.to_string()),
        Some(KeyOrder::UInt(u)) => ExecutionError::no_such_key(&u.to_string()),
        Some(KeyOrder::Bool(b)) => ExecutionError::no_such_key(&b.to_string()),
        _ => ExecutionError::UnexpectedType {
            got: key.get_type().name().to_owned(),
            want: "map key".to_owned(),
        },
    }
}

/// A record whose fields are converted when a rule reads them: a plan's
/// step, say, of which a rule reads one or two fields. Indexing converts
/// the one field; anything that needs the whole map (iterating, counting,
/// comparing) builds it once, as [`record_val`] would have.
pub trait Fields<'v>: Copy + std::fmt::Debug + Send + Sync + 'v {
    /// The field names, in the order the built map is given them.
    const NAMES: &'static [&'static str];
    /// The value of field `name`, one of [`Fields::NAMES`].
    fn field(self, name: &str) -> Option<Val<'v>>;
}

/// A [`Fields`] record as a CEL map.
pub fn lazy_record_val<'v, F: Fields<'v>>(fields: F) -> Val<'v> {
    Box::new(Lazy {
        fields,
        built: std::sync::OnceLock::new(),
    })
}

#[derive(Debug)]
struct Lazy<'v, F> {
    fields: F,
    built: std::sync::OnceLock<std::sync::Arc<CelMap<'v>>>,
}

impl<'v, F: Fields<'v>> Lazy<'v, F> {
    fn built(&self) -> &CelMap<'v> {
        self.built.get_or_init(|| {
            let fields = self.fields;
            std::sync::Arc::new(record_map(
                F::NAMES
                    .iter()
                    .filter_map(|name| fields.field(name).map(|v| (*name, v)))
                    .collect(),
            ))
        })
    }
}

impl<'v, F: Fields<'v>> CelVal for Lazy<'v, F> {
    fn get_type(&self) -> &cel::common::types::Type {
        <Self as CelVal>::cel_type()
    }

    fn cel_type() -> &'static cel::common::types::Type
    where
        Self: Sized,
    {
        <CelMap<'_> as CelVal>::cel_type()
    }

    fn as_container(&self) -> Option<&dyn cel::common::traits::Container> {
        Some(self)
    }

    fn as_indexer<'b, 'w>(&'b self) -> Option<&'b (dyn cel::common::traits::Indexer + 'w)>
    where
        Self: 'w,
    {
        Some(self)
    }

    fn into_indexer<'w>(self: Box<Self>) -> Option<Box<dyn cel::common::traits::Indexer + 'w>>
    where
        Self: 'w,
    {
        Some(self)
    }

    fn as_iterable<'b, 'w>(&'b self) -> Option<&'b (dyn cel::common::traits::Iterable + 'w)>
    where
        Self: 'w,
    {
        self.built().as_iterable()
    }

    fn as_sizer(&self) -> Option<&dyn cel::common::traits::Sizer> {
        self.built().as_sizer()
    }

    fn equals(&self, other: &dyn CelVal) -> bool {
        let fields = self.fields;
        equals_map(F::NAMES.iter().filter_map(|n| fields.field(n).map(|v| (*n, v))), other)
    }

    fn clone_as_boxed<'w>(&self) -> Box<dyn CelVal + 'w>
    where
        Self: 'w,
    {
        Box::new(Lazy {
            fields: self.fields,
            built: self.built.clone(),
        })
    }

    // No `as_builtin`: the interpreter asks for it before every index into
    // an owned value (a comprehension's variable is one), and answering it
    // would build the map. As with [`Tree`], a map compares equal to this
    // record only with the record on the left: cel's own map downcasts the
    // right side.
}

impl<'v, F: Fields<'v>> cel::common::traits::Container for Lazy<'v, F> {
    fn contains(&self, key: &dyn CelVal) -> Result<bool, ExecutionError> {
        Ok(key_str(key).is_some_and(|k| F::NAMES.contains(&k) && self.fields.field(k).is_some()))
    }
}

impl<'v, F: Fields<'v>> cel::common::traits::Indexer for Lazy<'v, F> {
    fn get<'b, 'w>(&'b self, key: &dyn CelVal) -> Result<CowVal<'b, 'w>, ExecutionError>
    where
        Self: 'w,
    {
        let Some(k) = key_str(key) else {
            return Err(not_a_text_key(key));
        };
        match F::NAMES.contains(&k).then(|| self.fields.field(k)).flatten() {
            Some(v) => Ok(CowVal::Owned(v)),
            None => Err(ExecutionError::no_such_key(k)),
        }
    }

    fn steal<'w>(self: Box<Self>, key: &dyn CelVal) -> Result<Box<dyn CelVal + 'w>, ExecutionError>
    where
        Self: 'w,
    {
        self.get(key).map(CowVal::into_owned)
    }
}

impl cel::common::traits::Container for Tree<'_> {
    fn contains(&self, key: &dyn CelVal) -> Result<bool, ExecutionError> {
        Ok(key_str(key).is_some_and(|k| self.child(k).is_some()))
    }
}

impl<'t> cel::common::traits::Indexer for Tree<'t> {
    fn get<'b, 'w>(&'b self, key: &dyn CelVal) -> Result<CowVal<'b, 'w>, ExecutionError>
    where
        Self: 'w,
    {
        let Some(k) = key_str(key) else {
            return Err(not_a_text_key(key));
        };
        if let Some(fields) = k.strip_prefix(TREE_SUM_KEY) {
            let fields: Vec<&str> = fields.split('\0').collect();
            return match self.sum_product(&fields) {
                Some(n) => Ok(CowVal::owned(TreeSum(n))),
                None => Err(ExecutionError::no_such_key(k)),
            };
        }
        match self.child(k) {
            Some(v) => Ok(CowVal::Owned(v)),
            None => Err(ExecutionError::no_such_key(k)),
        }
    }

    fn steal<'w>(self: Box<Self>, key: &dyn CelVal) -> Result<Box<dyn CelVal + 'w>, ExecutionError>
    where
        Self: 'w,
    {
        self.get(key).map(CowVal::into_owned)
    }
}

struct TreeKeys<'b, 'v> {
    keys: std::slice::Iter<'b, Child<'v>>,
}

impl<'b, 'v: 'w, 'w> cel::common::traits::Iterator<'b, 'w> for TreeKeys<'b, 'v> {
    fn next(&mut self) -> Option<&'b (dyn CelVal + 'w)> {
        self.keys.next().map(|c| &c.key as &'b (dyn CelVal + 'w))
    }
}

impl<'t> cel::common::traits::Iterable for Tree<'t> {
    fn iter<'b, 'w>(&'b self) -> Box<dyn cel::common::traits::Iterator<'b, 'w> + 'b>
    where
        Self: 'w,
    {
        Box::new(TreeKeys {
            keys: self.keys().iter(),
        })
    }
}

impl cel::common::traits::Sizer for Tree<'_> {
    fn size(&self) -> CelInt {
        CelInt::from(self.keys().len() as i64)
    }
}

/// The variables one rule may read, bound by reference: a lookup borrows
/// the value instead of copying it into the context.
#[derive(Debug)]
pub struct Bindings<'a, 'v> {
    /// `plan`, if the rule reads it.
    pub plan: Option<&'a Val<'v>>,
    /// `agent`, if the rule reads it.
    pub agent: Option<&'a Val<'v>>,
}

impl VariableResolver for Bindings<'_, '_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let v = match variable {
            "plan" => self.plan,
            "agent" => self.agent,
            _ => None,
        }?;
        Some(CowVal::Borrowed(v.as_ref()))
    }
}

/// Whether a compiled expression may iterate a map literal: a macro
/// (`all`, `exists`, `map`, ..) whose range is not a list literal and may
/// hold one. cel builds map literals as std hash maps, seeded at random, so
/// their order differs from process to process: a preview that depends on
/// it would not replay. Maps concord gives a rule (`before`, `after`,
/// `plan`, `agent`) iterate in key order. Conservative: a variable bound
/// to anything that may hold a map literal counts as one.
pub(crate) fn iterates_map_literal(e: &cel::common::ast::IdedExpr) -> bool {
    use cel::common::ast::{Expr, IdedExpr, MapExpr, StructExpr};
    /// Whether `e` may evaluate to, or contain, a map literal.
    fn may_hold(e: &IdedExpr, tainted: &[(&str, bool)]) -> bool {
        let holds = |x: &IdedExpr| may_hold(x, tainted);
        match &e.expr {
            Expr::Map(_) => true,
            Expr::Ident(name) => {
                let name = name.strip_prefix('.').unwrap_or(name);
                tainted.iter().rev().find(|(n, _)| *n == name).is_some_and(|(_, t)| *t)
            }
            Expr::Unspecified | Expr::Literal(_) => false,
            Expr::Select(s) => holds(&s.operand),
            // `keys` gives a sorted list of the map's keys, never a map.
            Expr::Call(c) if c.func_name == "keys" && c.target.is_none() => false,
            Expr::Call(c) => c.target.as_deref().is_some_and(holds) || c.args.iter().any(holds),
            Expr::List(l) => l.elements.iter().any(holds),
            Expr::Struct(s) => s.entries.iter().flat_map(entry_parts).any(holds),
            Expr::Comprehension(c) => {
                holds(&c.iter_range) || holds(&c.accu_init) || holds(&c.loop_step) || holds(&c.result)
            }
        }
    }
    /// Whether a macro in `e` may iterate a map literal.
    fn walk<'e>(e: &'e IdedExpr, tainted: &mut Vec<(&'e str, bool)>) -> bool {
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) | Expr::Ident(_) => false,
            Expr::Select(s) => walk(&s.operand, tainted),
            Expr::Call(c) => {
                c.target.as_deref().is_some_and(|t| walk(t, tainted)) || c.args.iter().any(|a| walk(a, tainted))
            }
            Expr::List(l) => l.elements.iter().any(|x| walk(x, tainted)),
            Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) => {
                entries.iter().flat_map(entry_parts).any(|x| walk(x, tainted))
            }
            Expr::Comprehension(c) => {
                let range_holds = may_hold(&c.iter_range, tainted);
                if range_holds && !matches!(c.iter_range.expr, Expr::List(_)) {
                    return true;
                }
                if walk(&c.iter_range, tainted) || walk(&c.accu_init, tainted) {
                    return true;
                }
                let depth = tainted.len();
                // The accumulator may hold what its start or any step puts in it.
                let accu_holds = may_hold(&c.accu_init, tainted) || range_holds;
                tainted.push((c.accu_var.as_str(), accu_holds));
                tainted.push((c.iter_var.as_str(), range_holds));
                if let Some(v2) = &c.iter_var2 {
                    tainted.push((v2.as_str(), range_holds));
                }
                if may_hold(&c.loop_step, tainted) {
                    tainted[depth].1 = true;
                }
                let found = walk(&c.loop_cond, tainted) || walk(&c.loop_step, tainted);
                tainted.truncate(depth + 1);
                let found = found || walk(&c.result, tainted);
                tainted.truncate(depth);
                found
            }
        }
    }
    walk(e, &mut Vec::new())
}

/// The expressions an entry of a map or message literal holds: its key and
/// value, or its value.
pub(crate) fn entry_parts(
    entry: &cel::common::ast::IdedEntryExpr,
) -> impl Iterator<Item = &cel::common::ast::IdedExpr> {
    use cel::common::ast::EntryExpr;
    let (key, value) = match &entry.expr {
        EntryExpr::MapEntry(e) => (Some(&e.key), &e.value),
        EntryExpr::StructField(f) => (None, &f.value),
    };
    key.into_iter().chain(std::iter::once(value))
}

/// The environment rules compile and run in: CEL's standard library and
/// concord's helpers `sum`, `keys` and `sum_product`, declared once as
/// overloads (a helper added to each evaluation's context cost more than
/// many rules). Each helper takes any values and checks them itself, so a
/// wrong argument gets the helper's own error; it is declared for up to
/// [`HELPER_ARITY_MAX`] arguments so a wrong count does too.
pub fn env() -> cel::Env {
    let mut env = cel::Env::stdlib();
    let helpers: [(&str, cel::common::functions::Function); 3] =
        [("sum", sum), ("keys", keys), ("sum_product", sum_product)];
    for (name, op) in helpers {
        for n in 0..=HELPER_ARITY_MAX {
            env.add_overload(
                name,
                &format!("{name}_{n}"),
                (0..n).map(|_| cel::common::types::DYN_TYPE).collect(),
                op,
            )
            .expect("helper names are not in the standard library, each arity declared once");
        }
    }
    env
}

/// The most arguments a helper is declared for: calls with more are CEL's
/// "no such overload".
pub const HELPER_ARITY_MAX: usize = 3;

/// A helper's arguments, as the interpreter hands them over.
type Args<'b, 'v> = Vec<CowVal<'b, 'v>>;

/// The one argument of a helper.
fn only_arg<'x, 'b, 'v>(args: &'x Args<'b, 'v>) -> Result<&'x (dyn CelVal + 'v), ExecutionError> {
    match args.as_slice() {
        [arg] => Ok(arg.as_ref()),
        args => Err(ExecutionError::invalid_argument_count(1, args.len())),
    }
}

/// A sum as `sum` adds: ints with overflow checked; any float makes it a
/// float, the floats added in sorted order (the result does not depend on
/// the order the terms came in).
#[derive(Default)]
struct Total {
    ints: i64,
    floats: Vec<f64>,
}

impl Total {
    fn add(&mut self, term: Number, name: &str) -> Result<(), ExecutionError> {
        match term {
            Number::Int(i) => {
                self.ints = self
                    .ints
                    .checked_add(i)
                    .ok_or_else(|| ExecutionError::function_error(name, "integer overflow"))?
            }
            Number::Float(f) => self.floats.push(f),
        }
        Ok(())
    }

    fn number(mut self) -> Number {
        if self.floats.is_empty() {
            return Number::Int(self.ints);
        }
        self.floats.sort_by(f64::total_cmp);
        Number::Float(self.floats.into_iter().fold(self.ints as f64, |a, b| a + b))
    }

    fn value<'c, 'a>(self) -> CowVal<'c, 'a> {
        self.number().value()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    /// The product: an int while both are (`None` on overflow), else a float.
    fn times(self, other: Number) -> Option<Number> {
        Some(match (self, other) {
            (Number::Int(a), Number::Int(b)) => Number::Int(a.checked_mul(b)?),
            (Number::Int(a), Number::Float(b)) => Number::Float(a as f64 * b),
            (Number::Float(a), Number::Int(b)) => Number::Float(a * b as f64),
            (Number::Float(a), Number::Float(b)) => Number::Float(a * b),
        })
    }

    fn value<'c, 'a>(self) -> CowVal<'c, 'a> {
        match self {
            Number::Int(i) => CowVal::owned(CelInt::from(i)),
            Number::Float(f) => CowVal::owned(CelDouble::from(f)),
        }
    }
}

/// What `sum_product` asks a [`Tree`] for, to have it summed in place: this
/// prefix, then the field names separated by NUL (no path segment holds one).
const TREE_SUM_KEY: &str = "\0sum_product\0";

/// A [`Tree`]'s answer to [`TREE_SUM_KEY`]: the sum, handed straight back to
/// `sum_product`. A map built by an expression never holds one, so an answer
/// of another type (a user's map with such a key) is not taken for it.
#[derive(Clone, Debug)]
struct TreeSum(Number);

static TREE_SUM: cel::common::types::Type = cel::common::types::Type::new_unspecified_type("concord.tree_sum");

impl CelVal for TreeSum {
    fn get_type(&self) -> &cel::common::types::Type {
        <Self as CelVal>::cel_type()
    }

    fn cel_type() -> &'static cel::common::types::Type
    where
        Self: Sized,
    {
        &TREE_SUM
    }

    fn equals(&self, other: &dyn CelVal) -> bool {
        other.downcast_ref::<TreeSum>().is_some_and(|o| o.0 == self.0)
    }

    fn clone_as_boxed<'w>(&self) -> Box<dyn CelVal + 'w> {
        Box::new(self.clone())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl cel::common::value::StaticVal for TreeSum {}

/// A CEL number as an int (a uint that fits) or a float.
fn number(v: &dyn CelVal, name: &str) -> Result<Number, ExecutionError> {
    if let Some(i) = v.downcast_ref::<CelInt>() {
        Ok(Number::Int(*i.inner()))
    } else if let Some(u) = v.downcast_ref::<CelUInt>() {
        i64::try_from(*u.inner())
            .map(Number::Int)
            .map_err(|_| ExecutionError::function_error(name, "integer overflow"))
    } else if let Some(f) = v.downcast_ref::<CelDouble>() {
        Ok(Number::Float(*f.inner()))
    } else {
        // Named by type: a map read in place and the same map built are
        // different values in Rust, not in CEL.
        Err(ExecutionError::function_error(
            name,
            format!("{name} takes numbers, not a {}", v.get_type().name()),
        ))
    }
}

/// `sum(list)`: ints add with overflow checked; any float makes the sum a
/// float, added in sorted order so that the result does not depend on the
/// order CEL produced the list in.
fn sum<'b, 'v>(args: Args<'b, 'v>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let arg = only_arg(&args)?;
    let Some(items) = arg.downcast_ref::<CelList>() else {
        return Err(ExecutionError::function_error("sum", "sum takes one list"));
    };
    let mut total = Total::default();
    for item in items.inner() {
        total.add(number(item.as_ref(), "sum")?, "sum")?;
    }
    Ok(total.value())
}

/// `sum_product(m, ['a', 'b'])`: over the entries of the map `m` that are
/// maps holding every named field, the sum of the fields' product —
/// `sum_product(after.svc, ['pool_size', 'replicas'])` is the connections
/// all services may open. Entries lacking a field add nothing. Products and
/// the sum are exact ints while every factor is one (overflow is an error);
/// a float factor makes them floats, summed as `sum` does. What
/// `sum(keys(m).filter(..).map(..))` computes, without interpreting a
/// comprehension over every entry.
fn sum_product<'b, 'v>(args: Args<'b, 'v>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    const NAME: &str = "sum_product";
    let (m, fields) = match args.as_slice() {
        [m, fields] => (m.as_ref(), fields.as_ref()),
        args => return Err(ExecutionError::invalid_argument_count(2, args.len())),
    };
    let Some(entries) = m
        .as_indexer()
        .filter(|_| m.get_type() == <CelMap<'_> as CelVal>::cel_type())
    else {
        return Err(ExecutionError::function_error(NAME, "the first argument must be a map"));
    };
    let Some(fields) = fields.downcast_ref::<CelList>() else {
        return Err(ExecutionError::function_error(
            NAME,
            "the second argument must be a list of field names",
        ));
    };
    let fields: Vec<&CelString<'_>> = fields
        .inner()
        .iter()
        .map(|f| f.downcast_ref::<CelString>())
        .collect::<Option<_>>()
        .ok_or_else(|| ExecutionError::function_error(NAME, "field names must be strings"))?;
    if fields.is_empty() {
        return Err(ExecutionError::function_error(NAME, "name at least one field"));
    }
    // A map read in place sums itself without a value per entry and field.
    if fields.iter().all(|f| !f.inner().contains('\0')) {
        let names: Vec<&str> = fields.iter().map(|f| f.inner()).collect();
        let key = CelString::from(format!("{TREE_SUM_KEY}{}", names.join("\0")));
        if let Ok(v) = entries.get(&key)
            && let Some(TreeSum(n)) = v.downcast_ref::<TreeSum>()
        {
            return Ok(n.value());
        }
    }
    // In key order, as `keys` gives them: the sum does not depend on it, but
    // which entry's error is reported does.
    let mut keys = map_keys(m, NAME)?;
    keys.sort_by(|a, b| key_order(*a).cmp(&key_order(*b)));
    let mut total = Total::default();
    'entries: for key in keys {
        let entry = entries.get(key)?;
        // Entries that are not maps hold no fields.
        let Some(entry) = entry
            .as_indexer()
            .filter(|_| entry.get_type() == <CelMap<'_> as CelVal>::cel_type())
        else {
            continue;
        };
        let mut product = Number::Int(1);
        for field in &fields {
            let v = match entry.get(*field) {
                Ok(v) => v,
                Err(ExecutionError::NoSuchKey(_)) => continue 'entries,
                Err(e) => return Err(e),
            };
            product = product
                .times(number(v.as_ref(), NAME)?)
                .ok_or_else(|| ExecutionError::function_error(NAME, "integer overflow"))?;
        }
        total.add(product, NAME)?;
    }
    Ok(total.value())
}

/// A map key, ordered: keys of one type by value, types in this order.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum KeyOrder<'k> {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Str(&'k str),
}

fn key_order(k: &dyn CelVal) -> Option<KeyOrder<'_>> {
    if let Some(s) = k.downcast_ref::<CelString>() {
        Some(KeyOrder::Str(s.inner()))
    } else if let Some(i) = k.downcast_ref::<CelInt>() {
        Some(KeyOrder::Int(*i.inner()))
    } else if let Some(u) = k.downcast_ref::<CelUInt>() {
        Some(KeyOrder::UInt(*u.inner()))
    } else {
        k.downcast_ref::<CelBool>().map(|b| KeyOrder::Bool(*b.inner()))
    }
}

/// The keys of a map value (built or read in place), in no order.
fn map_keys<'b, 'a>(m: &'b (dyn CelVal + 'a), name: &str) -> Result<Vec<&'b (dyn CelVal + 'a)>, ExecutionError> {
    if m.get_type() != <CelMap<'_> as CelVal>::cel_type() {
        return Err(ExecutionError::function_error(name, format!("{name} takes a map")));
    }
    let Some(it) = m.as_iterable() else {
        return Err(ExecutionError::function_error(name, format!("{name} takes a map")));
    };
    let mut it = it.iter();
    let mut out = Vec::new();
    while let Some(k) = it.next() {
        out.push(k);
    }
    Ok(out)
}

/// `keys(map)`: the map's keys, sorted.
fn keys<'b, 'v>(args: Args<'b, 'v>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let arg = only_arg(&args)?;
    let mut ks: Vec<(KeyOrder<'_>, &dyn CelVal)> = map_keys(arg, "keys")?
        .into_iter()
        .map(|k| key_order(k).map(|o| (o, k)))
        .collect::<Option<_>>()
        .ok_or_else(|| ExecutionError::function_error("keys", "map keys are strings, ints, uints or bools"))?;
    ks.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(CowVal::owned(CelList::from(
        ks.into_iter().map(|(_, k)| k.clone_as_boxed()).collect::<Vec<_>>(),
    )))
}

#[cfg(test)]
mod tests {
    use cel::{Context, Program};

    use super::*;

    #[test]
    fn a_policy_whose_rule_iterates_a_map_literal_is_refused() {
        let err = crate::policy::Policy::from_toml_str(
            r#"
            [[rules.cel]]
            id = "x"
            reads = []
            expr = "true"
            outcome = "reject"
            [rules.cel.figures]
            order = "{'b': 1, 'a': 2}.map(k, k)"
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rule `x`") && err.contains("map literal"), "{err}");
    }

    /// Macros over a map literal (or anything that may hold one) are found;
    /// over lists, concord's maps and sorted keys they are not.
    #[test]
    fn a_macro_over_a_map_literal_is_found() {
        let finds = |e: &str| iterates_map_literal(env().compile(e).unwrap().expression());
        for e in [
            "{'a': 1, 'b': 2}.map(k, k)",
            "{'a': 1}.all(k, k == 'a')",
            "size({'a': {'b': 1}}.a.filter(k, true)) == 1",
            "[{'a': 1}].all(m, m.exists(k, k == 'a'))",
            "[1].map(x, {'a': x}).all(m, m.all(k, true))",
            "[1].map(x, {'a': x})[0].all(k, true)",
            "true ? {'a': 1}.map(k, k) == ['a'] : false",
        ] {
            assert!(finds(e), "{e}");
        }
        for e in [
            "[1, 2].all(x, x > 0)",
            "plan.steps.all(s, {'set': true}[s.kind])",
            "[{'a': 1}].all(m, m.a == 1)",
            "keys({'b': 1, 'a': 2}).map(k, k) == ['a', 'b']",
            "keys(after.svc).all(s, after.svc[s].replicas > 0)",
            "after.svc.all(s, true)",
            "[1].map(x, {'a': x}).size() == 1",
        ] {
            assert!(!finds(e), "{e}");
        }
    }

    /// Every expression gives the same result on the tree read in place as
    /// on the same map built.
    #[test]
    fn a_tree_reads_as_the_built_map() {
        let p = |s: &str| ResourcePath::parse(s).unwrap();
        let paths = [
            (p("a/b-x/c"), Value::Int(3)),
            (p("a/b/c"), Value::Int(1)),
            (p("a/b/d"), Value::Int(2)),
            (p("a/e"), Value::Str("s".into())),
            (p("ab/c"), Value::Int(9)),
            (p("f"), Value::Bool(true)),
        ];
        let mut sorted: Vec<(&ResourcePath, &Value)> = paths.iter().map(|(p, v)| (p, v)).collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let tree = Tree::new(&sorted);
        let built = tree.built();
        let exprs = [
            "after.a.b.c",
            "after.a['b-x'].c",
            "after.ab.c",
            "'c' in after.a.b",
            "'z' in after.a.b",
            "'b' in after.a",
            "'a' in after",
            "has(after.a.b.d)",
            "has(after.a.b.z)",
            "size(after.a)",
            "size(after)",
            "keys(after.a)",
            "keys(after)",
            "after.a.e",
            "after.f",
            "after.a.b == {'c': 1, 'd': 2}",
            "after.a.b == {'c': 1}",
            "after.a == after.a",
            "after.a.b == after.a['b-x']",
            // In a list, equality is the elements' own.
            "[after.a] == [after.a]",
            "[after.a.b] == [{'c': 1, 'd': 2}]",
            "keys(after.a.b).map(k, after.a.b[k])",
            "after.a.b.all(k, after.a.b[k] > 0)",
            "after.a.exists(k, k == 'e')",
            "sum_product(after.a, ['c'])",
            "sum_product(after, ['c'])",
            "sum(keys(after.a.b).map(k, after.a.b[k]))",
            "after.a.zz",
            "after.a.b.c.d",
            "after.a[1]",
            "after.a[true]",
            "1 in after.a",
            "after.a[[1]]",
        ];
        for e in exprs {
            let program = Program::compile(e).unwrap();
            let run = |after: Val<'_>| -> Result<CelValue, String> {
                let mut ctx = Context::with_env(std::sync::Arc::new(env()));
                ctx.add_variable_as_val("after", after);
                program.execute(&ctx).map_err(|e| e.to_string())
            };
            let read = run(Box::new(Tree::new(&sorted)));
            let whole = run(built.clone());
            assert_eq!(read, whole, "{e}");
        }
    }

    /// A record of every kind of field, one of them absent.
    #[derive(Clone, Copy, Debug)]
    struct Sample<'v>(&'v Value);

    impl<'v> Fields<'v> for Sample<'v> {
        const NAMES: &'static [&'static str] = &["n", "s", "m", "gone"];

        fn field(self, name: &str) -> Option<Val<'v>> {
            match name {
                "n" => Some(Box::new(CelInt::from(1))),
                "s" => Some(str_val("text")),
                "m" => Some(to_val(self.0)),
                _ => None,
            }
        }
    }

    /// Every expression gives the same result on a record whose fields are
    /// converted when read as on the same record built whole.
    #[test]
    fn a_lazy_record_reads_as_the_built_map() {
        let m = Value::Map(BTreeMap::from([("x".to_string(), Value::Int(2))]));
        let fields = Sample(&m);
        let built = record_val(
            Sample::NAMES
                .iter()
                .filter_map(|n| fields.field(n).map(|v| (*n, v)))
                .collect(),
        );
        let exprs = [
            "r.n",
            "r.s",
            "r.m.x",
            "r['s']",
            "'n' in r",
            "'gone' in r",
            "'z' in r",
            "has(r.n)",
            "has(r.gone)",
            "size(r)",
            "keys(r)",
            "r.all(k, k != 'z')",
            "r.exists(k, k == 'm')",
            "r == {'n': 1, 's': 'text', 'm': {'x': 2}}",
            "r == {'n': 1}",
            "r == {'n': 1, 's': 'text', 'm': {'x': 2}, 'gone': 0}",
            // Not `{...} == r`: cel's own map, on the left, downcasts the
            // right side and finds no map (see `Lazy`).
            "r.gone",
            "r.z",
            "r[1]",
            "r[true]",
            "r[[1]]",
            "[r, r].all(e, e.n == 1 && e.m.x == 2)",
            "[r].map(e, e.s + '!')",
            "[r].filter(e, e.s == 'text').size()",
            "[r] == [r]",
            "[r] == [{'n': 1, 's': 'text', 'm': {'x': 2}}]",
            "type(r) == map",
            "sum_product({'k': r}, ['n'])",
        ];
        for e in exprs {
            let program = Program::compile(e).unwrap();
            let run = |r: Val<'_>| -> Result<CelValue, String> {
                let mut ctx = Context::with_env(std::sync::Arc::new(env()));
                ctx.add_variable_as_val("r", r);
                program.execute(&ctx).map_err(|e| e.to_string())
            };
            let read = run(lazy_record_val(fields));
            let whole = run(built.clone());
            assert_eq!(read, whole, "{e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

        /// `sum_product` over a tree read in place (summed by the tree
        /// itself) gives what it gives over the same map built (entry by
        /// entry, field by field): value, type and error. So does a tree
        /// that is a patch of a base (two patches sharing the base's sums).
        #[test]
        fn a_tree_sums_as_the_built_map(
            shapes in proptest::collection::vec((0u8..4, proptest::collection::vec((0u8..4, 0u8..5), 0..4)), 0..5),
            fields in proptest::sample::subsequence(vec!["x", "y", "x_max"], 1..3),
            patches in proptest::collection::vec(
                proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), 0u8..5), 0..3),
                2,
            ),
        ) {
            let p = |s: String| ResourcePath::parse(&s).unwrap();
            let value = |v: u8| match v {
                0 => Value::Int(3),
                1 => Value::Float(0.5),
                2 => Value::Int(1 << 40),
                3 => Value::Str("s".into()),
                _ => Value::Map(BTreeMap::from([("x".to_string(), Value::Int(2))])),
            };
            // Keys that sort otherwise than their entries (`k` before `k-b`,
            // whose entries come first), so the tree's key order is tested.
            const KEYS: [&str; 5] = ["k", "k-b", "k.c", "kb", "k-b-c"];
            let mut paths: BTreeMap<ResourcePath, Value> = BTreeMap::new();
            for (i, (shape, leaves)) in shapes.iter().enumerate() {
                match shape {
                    // A leaf: a number, or a map value.
                    0 => { paths.insert(p(format!("a/{}", KEYS[i])), Value::Int(7)); }
                    1 => { paths.insert(p(format!("a/{}", KEYS[i])), value(4)); }
                    // A subtree of fields, some deeper.
                    _ => {
                        for (f, v) in leaves {
                            let name = ["x", "y", "x_max", "x/z"][usize::from(*f)];
                            if name == "x/z" && paths.contains_key(&p(format!("a/{}/x", KEYS[i]))) { continue; }
                            if name == "x" && paths.contains_key(&p(format!("a/{}/x/z", KEYS[i]))) { continue; }
                            paths.insert(p(format!("a/{}/{name}", KEYS[i])), value(*v));
                        }
                    }
                }
            }
            let sorted: Vec<(&ResourcePath, &Value)> = paths.iter().collect();
            let tree = Tree::new(&sorted);
            let list = fields.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(", ");
            for e in [format!("sum_product(after.a, [{list}])"), format!("sum_product(after.a, [{list}]) * 2")] {
                let program = Program::compile(&e).unwrap();
                let run = |after: Val<'_>| -> Result<CelValue, String> {
                    let mut ctx = Context::with_env(std::sync::Arc::new(env()));
                    ctx.add_variable_as_val("after", after);
                    program.execute(&ctx).map_err(|e| e.to_string())
                };
                if paths.is_empty() {
                    continue;
                }
                proptest::prop_assert_eq!(run(Box::new(Tree::new(&sorted))), run(tree.built()), "{}", e);
                // Each patch: values replaced at some of the base's paths.
                let sums = Sums::new(&sorted);
                for changes in &patches {
                    let mut projected = paths.clone();
                    for (at, v) in changes {
                        let path = at.get(&sorted).0.clone();
                        projected.insert(path, value(*v));
                    }
                    let changed: Vec<(ResourcePath, Option<Value>)> =
                        projected.iter().map(|(p, v)| (p.clone(), Some(v.clone()))).filter(|(p, v)| paths.get(p) != v.as_ref()).collect();
                    let patch = sums.patch(changed.iter().map(|(p, v)| (p, v))).unwrap();
                    let entries: Vec<(&ResourcePath, &Value)> = projected.iter().collect();
                    let patched = Tree::patched(&patch);
                    proptest::prop_assert_eq!(run(Box::new(patched)), run(Tree::new(&entries).built()), "{} patched", e);
                    // The patch reads in every other way as the projection
                    // it stands for, read in place.
                    for read in [
                        "keys(after.a)",
                        "size(after.a)",
                        "'k' in after.a",
                        "after.a.k",
                        "after.a['k-b'].x",
                        "after.a == after.a",
                        "keys(after.a).map(k, after.a[k])",
                    ] {
                        let program = Program::compile(read).unwrap();
                        let run = |after: Val<'_>| -> Result<CelValue, String> {
                            let mut ctx = Context::with_env(std::sync::Arc::new(env()));
                            ctx.add_variable_as_val("after", after);
                            program.execute(&ctx).map_err(|e| e.to_string())
                        };
                        proptest::prop_assert_eq!(
                            run(Box::new(Tree::patched(&patch))),
                            run(Box::new(Tree::new(&entries))),
                            "{} patched", read
                        );
                    }
                }
            }
        }
    }

    /// A patch is a base with values changed: one that adds or removes a
    /// path is none.
    #[test]
    fn a_patch_changes_values_at_the_base_paths_only() {
        let p = |s: &str| ResourcePath::parse(s).unwrap();
        let (a, b) = (p("s/a/x"), p("s/b/x"));
        let one = Value::Int(1);
        let base = [(&a, &one)];
        let sums = Sums::new(&base);
        assert_eq!(
            sums.patch([(&a, &Some(Value::Int(2)))]).map(|p| p.changed),
            Some(vec![0])
        );
        assert!(sums.patch([(&a, &None)]).is_none());
        assert!(sums.patch([(&b, &Some(Value::Int(2)))]).is_none());
    }

    /// Helpers check their arguments themselves: a wrong count or type gets
    /// the helper's error, not the interpreter's "no such overload".
    #[test]
    fn helpers_name_their_own_argument_errors() {
        let env = std::sync::Arc::new(env());
        let run = |e: &str| {
            let program = env.compile(e).unwrap();
            program
                .execute(&Context::with_env(env.clone()))
                .map_err(|e| e.to_string())
        };
        assert!(
            run("sum([1], [2])").unwrap_err().contains("argument"),
            "{:?}",
            run("sum([1], [2])")
        );
        assert!(run("keys()").unwrap_err().contains("argument"), "{:?}", run("keys()"));
        assert!(run("sum('x')").unwrap_err().contains("sum takes one list"));
        assert!(run("sum_product({}, 'a')").unwrap_err().contains("list of field names"));
        assert_eq!(run("sum([1, 2, 3])"), Ok(CelValue::Int(6)));
    }
}
