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

use cel::common::types::{CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelString};
use cel::common::value::{CowVal, Val as CelVal};
use cel::context::VariableResolver;
use cel::objects::Key;
use cel::{Context, ExecutionError, Value as CelValue};
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
    Box::new(CelMap::from(
        entries
            .into_iter()
            .map(|(k, v)| (CelMapKey::from(k), v))
            .collect::<HashMap<_, _>>(),
    ))
}

enum Node<'v> {
    Leaf(&'v Value),
    Branch(BTreeMap<&'v str, Node<'v>>),
}

/// Builds the nested map of a projection: `a/b/c = 1` becomes `{a: {b: {c: 1}}}`.
/// `entries` come in path order.
pub fn nested_val<'v>(entries: impl Iterator<Item = (&'v ResourcePath, &'v Value)>) -> Val<'v> {
    let mut root: BTreeMap<&'v str, Node<'v>> = BTreeMap::new();
    for (path, value) in entries {
        let mut segs = path.as_str().split('/').peekable();
        let mut cur = &mut root;
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
    fn build<'v>(m: &BTreeMap<&'v str, Node<'v>>) -> Val<'v> {
        Box::new(CelMap::from(
            m.iter()
                .map(|(k, n)| {
                    (
                        CelMapKey::from(*k),
                        match n {
                            Node::Leaf(v) => to_val(v),
                            Node::Branch(b) => build(b),
                        },
                    )
                })
                .collect::<HashMap<_, _>>(),
        ))
    }
    build(&root)
}

/// The variables one rule may read, bound by reference: a lookup borrows
/// the value instead of copying it into the context.
#[derive(Debug)]
pub struct Bindings<'a, 'v> {
    /// `before`, if the rule reads it.
    pub before: Option<&'a Val<'v>>,
    /// `plan`, if the rule reads it.
    pub plan: Option<&'a Val<'v>>,
    /// `agent`, if the rule reads it.
    pub agent: Option<&'a Val<'v>>,
}

impl VariableResolver for Bindings<'_, '_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let v = match variable {
            "before" => self.before,
            "plan" => self.plan,
            "agent" => self.agent,
            _ => None,
        }?;
        Some(CowVal::Borrowed(v.as_ref()))
    }
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
