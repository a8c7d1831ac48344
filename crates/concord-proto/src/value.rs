//! Typed values held at resource paths.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Rule, rule_error};
use crate::limits::{FLOAT_ABS_MAX, INT_ABS_MAX, VALUE_DEPTH_MAX, VALUE_ITEMS_MAX};

/// A value in the world model: a number, string, bool, list or map.
///
/// There is no `null`: a path either holds a value or does not exist.
/// Maps are ordered by key so that every rendering is deterministic.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// `true` or `false`.
    Bool(bool),
    /// An integer within ±(2^53 - 1).
    Int(i64),
    /// A finite float within ±1e15.
    Float(f64),
    /// A string.
    Str(String),
    /// A list of values (also used as a set, e.g. grants, network rules).
    List(Vec<Value>),
    /// A map from string keys to values.
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// The number as a float, for ints and floats.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The integer, for ints.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The string, for strings.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items, for lists.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// The JSON type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }

    /// Checks the numeric, depth and size limits (for values built in code
    /// rather than decoded, e.g. by the Rust SDK).
    pub fn check(&self) -> Result<(), (Rule, String)> {
        check_value(self, 1)
    }

    /// Compares two values when both are numbers or both are strings.
    pub fn partial_cmp_value(&self, other: &Value) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
            (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
            _ => self.as_f64()?.partial_cmp(&other.as_f64()?),
        }
    }

    /// Equality that treats `1` and `1.0` as equal.
    pub fn equals(&self, other: &Value) -> bool {
        match (self.as_f64(), other.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => self == other,
        }
    }
}

fn check_value(v: &Value, depth: usize) -> Result<(), (Rule, String)> {
    // Same rule as the decoder: a list or map may not start at level 8 or deeper.
    if matches!(v, Value::List(_) | Value::Map(_)) && depth >= VALUE_DEPTH_MAX {
        return Err((
            Rule::ValueDepthMax,
            format!("value nests deeper than {VALUE_DEPTH_MAX} levels"),
        ));
    }
    match v {
        Value::Int(i) => check_int(*i),
        Value::Float(f) => check_float(*f),
        Value::List(items) => {
            check_items(items.len())?;
            items.iter().try_for_each(|i| check_value(i, depth + 1))
        }
        Value::Map(m) => {
            check_items(m.len())?;
            m.values().try_for_each(|i| check_value(i, depth + 1))
        }
        Value::Bool(_) | Value::Str(_) => Ok(()),
    }
}

fn check_items(n: usize) -> Result<(), (Rule, String)> {
    if n > VALUE_ITEMS_MAX {
        return Err((
            Rule::ItemsMax,
            format!("value has {n} items; at most {VALUE_ITEMS_MAX} allowed"),
        ));
    }
    Ok(())
}

fn check_int(i: i64) -> Result<(), (Rule, String)> {
    if !(-INT_ABS_MAX..=INT_ABS_MAX).contains(&i) {
        return Err((Rule::NumericRange, format!("integer {i} is outside ±{INT_ABS_MAX}")));
    }
    Ok(())
}

/// Checks that a float is finite and within ±1e15.
pub fn check_float(f: f64) -> Result<(), (Rule, String)> {
    if !f.is_finite() {
        return Err((Rule::NotFinite, format!("{f} is not a finite number")));
    }
    if f.abs() > FLOAT_ABS_MAX {
        return Err((Rule::NumericRange, format!("{f} is outside ±{FLOAT_ABS_MAX:e}")));
    }
    Ok(())
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s:?}"),
            other => f.write_str(&serde_json::to_string(other).map_err(|_| fmt::Error)?),
        }
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ValueSeed { depth: 1 }.deserialize(d)
    }
}

/// Deserializes a value while counting depth and items, so that an oversize
/// value is refused while it is read rather than after it was built.
struct ValueSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, string, bool, list or map")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        check_int(v).map_err(|(r, d)| rule_error("", r, d))?;
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        let i = i64::try_from(v)
            .map_err(|_| rule_error("", Rule::NumericRange, format!("integer {v} is outside ±{INT_ABS_MAX}")))?;
        self.visit_i64(i)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        check_float(v).map_err(|(r, d)| rule_error("", r, d))?;
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Err(rule_error(
            "",
            Rule::NullValue,
            "null is not a value; remove a path with a `delete` step",
        ))
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= VALUE_DEPTH_MAX {
            return Err(rule_error(
                "",
                Rule::ValueDepthMax,
                format!("value nests deeper than {VALUE_DEPTH_MAX} levels"),
            ));
        }
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(ValueSeed { depth: self.depth + 1 })? {
            if items.len() == VALUE_ITEMS_MAX {
                return Err(rule_error(
                    "",
                    Rule::ItemsMax,
                    format!("list has more than {VALUE_ITEMS_MAX} items"),
                ));
            }
            items.push(v);
        }
        Ok(Value::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= VALUE_DEPTH_MAX {
            return Err(rule_error(
                "",
                Rule::ValueDepthMax,
                format!("value nests deeper than {VALUE_DEPTH_MAX} levels"),
            ));
        }
        let mut out = BTreeMap::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.len() == VALUE_ITEMS_MAX {
                return Err(rule_error(
                    "",
                    Rule::ItemsMax,
                    format!("map has more than {VALUE_ITEMS_MAX} entries"),
                ));
            }
            let v = map.next_value_seed(ValueSeed { depth: self.depth + 1 })?;
            out.insert(k, v);
        }
        Ok(Value::Map(out))
    }
}

impl schemars::JsonSchema for Value {
    fn schema_name() -> Cow<'static, str> {
        "Value".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A value at a resource path: bool, integer within ±(2^53-1), finite number within ±1e15, string, list or map (at most 8 levels deep and 1024 items per level). null is not a value.",
            "type": ["boolean", "integer", "number", "string", "array", "object"]
        })
    }
}
