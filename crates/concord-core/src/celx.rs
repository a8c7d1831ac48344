//! Binding concord's values to CEL, and the helpers rules may call.
//!
//! `before` and `after` are nested maps built from only the paths a rule
//! declares it reads: `after.svc.api.pool_size`. CEL maps iterate in an
//! unspecified order, so rules that need an order use `keys(m)` (sorted)
//! and `sum(list)` (order-independent: it sorts floats before adding).

// CEL's own map type is a std HashMap; we build it but never iterate it.
#![allow(clippy::disallowed_types)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::{Context, ExecutionError, Value as CelValue};
use concord_proto::{ResourcePath, Value};

/// Converts a concord value to CEL.
pub fn to_cel(v: &Value) -> CelValue {
    match v {
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Int(i) => CelValue::Int(*i),
        Value::Float(f) => CelValue::Float(*f),
        Value::Str(s) => CelValue::String(Arc::new(s.clone())),
        Value::List(l) => CelValue::List(Arc::new(l.iter().map(to_cel).collect())),
        Value::Map(m) => map(m.iter().map(|(k, v)| (k.clone(), to_cel(v)))),
    }
}

fn map(entries: impl Iterator<Item = (String, CelValue)>) -> CelValue {
    let hm: HashMap<Key, CelValue> = entries.map(|(k, v)| (Key::String(Arc::new(k)), v)).collect();
    CelValue::Map(Map { map: Arc::new(hm) })
}

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

enum Node {
    Leaf(Value),
    Branch(BTreeMap<String, Node>),
}

/// Builds the nested map of a projection: `a/b/c = 1` becomes `{a: {b: {c: 1}}}`.
pub fn nested(entries: &BTreeMap<ResourcePath, Value>) -> CelValue {
    let mut root: BTreeMap<String, Node> = BTreeMap::new();
    for (path, value) in entries {
        let segs: Vec<&str> = path.segments().collect();
        let mut cur = &mut root;
        for (i, seg) in segs.iter().enumerate() {
            if i + 1 == segs.len() {
                cur.insert(seg.to_string(), Node::Leaf(value.clone()));
            } else {
                let node = cur
                    .entry(seg.to_string())
                    .or_insert_with(|| Node::Branch(BTreeMap::new()));
                if let Node::Leaf(_) = node {
                    // Worlds keep values at leaves; a leaf here cannot have children.
                    *node = Node::Branch(BTreeMap::new());
                }
                let Node::Branch(next) = node else { unreachable!() };
                cur = next;
            }
        }
    }
    fn build(m: &BTreeMap<String, Node>) -> CelValue {
        map(m.iter().map(|(k, n)| {
            (
                k.clone(),
                match n {
                    Node::Leaf(v) => to_cel(v),
                    Node::Branch(b) => build(b),
                },
            )
        }))
    }
    build(&root)
}

/// A map value from string keys.
pub fn record(entries: Vec<(&str, CelValue)>) -> CelValue {
    map(entries.into_iter().map(|(k, v)| (k.to_string(), v)))
}

/// Registers `sum` and `keys` on a root context.
pub fn add_helpers(ctx: &mut Context<'_, '_>) -> Result<(), String> {
    ctx.add_function("sum", sum).map_err(|e| format!("{e:?}"))?;
    ctx.add_function("keys", keys).map_err(|e| format!("{e:?}"))?;
    Ok(())
}

/// `sum(list)`: ints add with overflow checked; any float makes the sum a
/// float, added in sorted order so that the result does not depend on the
/// order CEL produced the list in.
fn sum(cel::extractors::Arguments(args): cel::extractors::Arguments) -> Result<CelValue, ExecutionError> {
    let [CelValue::List(items)] = args.as_slice() else {
        return Err(ExecutionError::function_error("sum", "sum takes one list"));
    };
    let mut ints: i64 = 0;
    let mut floats: Vec<f64> = Vec::new();
    for item in items.iter() {
        match item {
            CelValue::Int(i) => {
                ints = ints
                    .checked_add(*i)
                    .ok_or_else(|| ExecutionError::function_error("sum", "integer overflow"))?
            }
            CelValue::UInt(u) => {
                let i = i64::try_from(*u).map_err(|_| ExecutionError::function_error("sum", "integer overflow"))?;
                ints = ints
                    .checked_add(i)
                    .ok_or_else(|| ExecutionError::function_error("sum", "integer overflow"))?
            }
            CelValue::Float(f) => floats.push(*f),
            other => {
                return Err(ExecutionError::function_error(
                    "sum",
                    format!("sum adds numbers, not {other:?}"),
                ));
            }
        }
    }
    if floats.is_empty() {
        return Ok(CelValue::Int(ints));
    }
    floats.sort_by(f64::total_cmp);
    Ok(CelValue::Float(floats.into_iter().fold(ints as f64, |a, b| a + b)))
}

/// `keys(map)`: the map's keys, sorted.
fn keys(cel::extractors::Arguments(args): cel::extractors::Arguments) -> Result<CelValue, ExecutionError> {
    let [CelValue::Map(m)] = args.as_slice() else {
        return Err(ExecutionError::function_error("keys", "keys takes one map"));
    };
    let mut ks: Vec<String> = m.map.keys().map(key_text).collect();
    ks.sort();
    Ok(CelValue::List(Arc::new(
        ks.into_iter().map(|k| CelValue::String(Arc::new(k))).collect(),
    )))
}
