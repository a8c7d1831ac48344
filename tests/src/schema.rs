//! A small JSON Schema (draft 2020-12) validator, for the keywords concord's
//! schemas use.
//!
//! Why not the `jsonschema` crate: it is heavy for a 2-core build and not a
//! workspace dependency. This one knows exactly the keywords `concord schema`
//! emits today; any other keyword (and any `pattern` it has not been taught)
//! is reported as an error, so a schema that grows a new keyword fails the
//! tests loudly instead of passing unchecked.
//!
//! ```
//! use serde_json::json;
//!
//! let schema = json!({
//!     "type": "object",
//!     "required": ["n"],
//!     "additionalProperties": false,
//!     "properties": { "n": { "type": "integer", "minimum": 1 } }
//! });
//! assert!(concord_tests::schema::validate(&schema, &json!({ "n": 3 })).is_empty());
//! let errors = concord_tests::schema::validate(&schema, &json!({ "n": 0, "m": 1 }));
//! assert_eq!(errors.len(), 2);
//! ```

use serde_json::{Map, Value};

/// Keywords that only annotate and never make an instance invalid.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "title",
    "description",
    "default",
    "examples",
    "format",
    "deprecated",
    "readOnly",
    "writeOnly",
];

/// Validates `instance` against `schema` (whose `$ref`s point into itself).
/// Returns one line per error, `at <field path>: <what>`; empty if valid.
pub fn validate(schema: &Value, instance: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    Validator { root: schema }.check(schema, instance, "", &mut errors);
    errors
}

struct Validator<'s> {
    root: &'s Value,
}

fn child(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

fn err(errors: &mut Vec<String>, at: &str, what: String) {
    let at = if at.is_empty() { "(root)" } else { at };
    errors.push(format!("at {at}: {what}"));
}

fn is_integer(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => false,
    }
}

fn type_matches(name: &str, v: &Value) -> Option<bool> {
    Some(match name {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => is_integer(v),
        _ => return None,
    })
}

/// JSON equality where numbers compare by value (`1 == 1.0`), as JSON Schema's `const` and `enum` do.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                x == y
            } else if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                x == y
            } else {
                x.as_f64() == y.as_f64()
            }
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

/// The patterns concord's schemas use, checked by hand (no regex engine here).
fn pattern_matches(pattern: &str, s: &str) -> Option<bool> {
    let segment_char = |c: char| c.is_ascii_alphanumeric() || "_.:-".contains(c);
    match pattern {
        // Id
        "^[A-Za-z0-9_.:@-]+$" => Some(!s.is_empty() && s.chars().all(|c| segment_char(c) || c == '@')),
        // ResourcePath: 1 to 16 non-empty segments
        "^[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+){0,15}$" => {
            let segments: Vec<&str> = s.split('/').collect();
            Some(segments.len() <= 16 && segments.iter().all(|g| !g.is_empty() && g.chars().all(segment_char)))
        }
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64()
}

impl<'s> Validator<'s> {
    fn resolve(&self, reference: &str) -> Option<&'s Value> {
        let pointer = reference.strip_prefix('#')?;
        self.root.pointer(pointer)
    }

    fn valid(&self, schema: &Value, instance: &Value) -> bool {
        let mut errors = Vec::new();
        self.check(schema, instance, "", &mut errors);
        errors.is_empty()
    }

    fn check(&self, schema: &Value, instance: &Value, at: &str, errors: &mut Vec<String>) {
        let keywords = match schema {
            Value::Bool(true) => return,
            Value::Bool(false) => return err(errors, at, "the schema `false` admits nothing".into()),
            Value::Object(k) => k,
            other => return err(errors, at, format!("not a schema: {other}")),
        };
        for (keyword, arg) in keywords {
            self.keyword(keywords, keyword, arg, instance, at, errors);
        }
    }

    fn keyword(
        &self,
        keywords: &Map<String, Value>,
        keyword: &str,
        arg: &Value,
        instance: &Value,
        at: &str,
        errors: &mut Vec<String>,
    ) {
        match keyword {
            k if ANNOTATIONS.contains(&k) => {}
            "$ref" => match arg.as_str().and_then(|r| self.resolve(r)) {
                Some(target) => self.check(target, instance, at, errors),
                None => err(errors, at, format!("cannot resolve $ref {arg}")),
            },
            "type" => {
                let names: Vec<&str> = match arg {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => vec![],
                };
                let mut any = false;
                for name in &names {
                    match type_matches(name, instance) {
                        Some(m) => any |= m,
                        None => return err(errors, at, format!("unknown type `{name}`")),
                    }
                }
                if !any {
                    err(errors, at, format!("{instance} is not of type {arg}"));
                }
            }
            "const" => {
                if !json_eq(arg, instance) {
                    err(errors, at, format!("{instance} is not the constant {arg}"));
                }
            }
            "enum" => {
                if !arg.as_array().is_some_and(|a| a.iter().any(|v| json_eq(v, instance))) {
                    err(errors, at, format!("{instance} is not one of {arg}"));
                }
            }
            "properties" => {
                if let (Some(props), Some(obj)) = (arg.as_object(), instance.as_object()) {
                    for (name, sub) in props {
                        if let Some(v) = obj.get(name) {
                            self.check(sub, v, &child(at, name), errors);
                        }
                    }
                }
            }
            "required" => {
                if let Some(obj) = instance.as_object() {
                    for name in arg.as_array().into_iter().flatten().filter_map(Value::as_str) {
                        if !obj.contains_key(name) {
                            err(errors, &child(at, name), "required but missing".into());
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(obj) = instance.as_object() {
                    let declared = keywords.get("properties").and_then(Value::as_object);
                    for (name, v) in obj {
                        if declared.is_some_and(|d| d.contains_key(name)) {
                            continue;
                        }
                        if arg == &Value::Bool(false) {
                            err(
                                errors,
                                &child(at, name),
                                "not allowed (additionalProperties is false)".into(),
                            );
                        } else {
                            self.check(arg, v, &child(at, name), errors);
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = instance.as_array() {
                    for (i, v) in items.iter().enumerate() {
                        self.check(arg, v, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            "minItems" | "maxItems" => {
                if let (Some(items), Some(n)) = (instance.as_array(), arg.as_u64()) {
                    let len = items.len() as u64;
                    if (keyword == "minItems" && len < n) || (keyword == "maxItems" && len > n) {
                        err(errors, at, format!("{len} items breaks {keyword} {n}"));
                    }
                }
            }
            "minLength" | "maxLength" => {
                if let (Some(s), Some(n)) = (instance.as_str(), arg.as_u64()) {
                    let len = s.chars().count() as u64;
                    if (keyword == "minLength" && len < n) || (keyword == "maxLength" && len > n) {
                        err(errors, at, format!("length {len} breaks {keyword} {n}"));
                    }
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if let (Some(x), Some(limit)) = (number(instance), number(arg)) {
                    let ok = match keyword {
                        "minimum" => x >= limit,
                        "maximum" => x <= limit,
                        "exclusiveMinimum" => x > limit,
                        _ => x < limit,
                    };
                    if !ok {
                        err(errors, at, format!("{instance} breaks {keyword} {arg}"));
                    }
                }
            }
            "pattern" => {
                if let (Some(s), Some(p)) = (instance.as_str(), arg.as_str()) {
                    match pattern_matches(p, s) {
                        Some(true) => {}
                        Some(false) => err(errors, at, format!("`{s}` does not match {p}")),
                        None => err(
                            errors,
                            at,
                            format!("pattern {p} is unknown to concord_tests::schema; teach pattern_matches"),
                        ),
                    }
                }
            }
            "anyOf" | "oneOf" | "allOf" => {
                let branches = arg.as_array().map(Vec::as_slice).unwrap_or_default();
                if keyword == "allOf" {
                    for b in branches {
                        self.check(b, instance, at, errors);
                    }
                    return;
                }
                let results: Vec<Vec<String>> = branches
                    .iter()
                    .map(|b| {
                        let mut e = Vec::new();
                        self.check(b, instance, at, &mut e);
                        e
                    })
                    .collect();
                let passing = results.iter().filter(|e| e.is_empty()).count();
                // When nothing matches, the branch with the fewest errors is
                // most likely the one meant (e.g. the step's `kind`): show them.
                let closest = results
                    .iter()
                    .min_by_key(|e| e.len())
                    .map(|e| e.join("; "))
                    .unwrap_or_default();
                if passing == 0 {
                    err(
                        errors,
                        at,
                        format!("matches no branch of {keyword}; closest: [{closest}]"),
                    );
                } else if keyword == "oneOf" && passing > 1 {
                    err(
                        errors,
                        at,
                        format!("matches {passing} branches of oneOf, not exactly one"),
                    );
                }
            }
            "not" => {
                if self.valid(arg, instance) {
                    err(errors, at, format!("{instance} matches the `not` schema"));
                }
            }
            other => err(
                errors,
                at,
                format!("keyword `{other}` is unknown to concord_tests::schema; teach it"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::validate;

    #[test]
    fn refs_one_of_and_patterns() {
        let schema = json!({
            "$defs": {
                "Id": { "type": "string", "pattern": "^[A-Za-z0-9_.:@-]+$", "maxLength": 4 },
                "Path": { "type": "string", "pattern": "^[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+){0,15}$" }
            },
            "type": "array",
            "items": {
                "oneOf": [
                    { "type": "object", "required": ["id"], "additionalProperties": false,
                      "properties": { "id": { "$ref": "#/$defs/Id" } } },
                    { "$ref": "#/$defs/Path" }
                ]
            }
        });
        assert_eq!(
            validate(&schema, &json!([{ "id": "a@b" }, "svc/api"])),
            Vec::<String>::new()
        );
        let errors = validate(&schema, &json!([{ "id": "a b" }, "svc//api", { "id": "toolong" }, 3]));
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors[0].starts_with("at [0]: "), "{errors:#?}");
    }

    #[test]
    fn numbers_compare_by_value() {
        let schema = json!({ "type": "integer", "const": 1, "minimum": 1, "maximum": 1.0 });
        assert!(validate(&schema, &json!(1.0)).is_empty());
        assert_eq!(validate(&schema, &json!(1.5)).len(), 3);
    }

    #[test]
    fn unknown_keywords_and_patterns_fail() {
        assert_eq!(validate(&json!({ "patternProperties": {} }), &json!({})).len(), 1);
        assert_eq!(validate(&json!({ "pattern": "^x+$" }), &json!("x")).len(), 1);
    }

    #[test]
    fn required_and_additional_properties_name_the_field() {
        let schema = json!({
            "type": "object",
            "properties": { "steps": { "type": "array", "items": {
                "type": "object", "required": ["args"], "properties": { "args": true } } } },
            "additionalProperties": false
        });
        let mut errors = validate(&schema, &json!({ "steps": [{}], "extra": 1 }));
        errors.sort();
        assert_eq!(
            errors,
            vec![
                "at extra: not allowed (additionalProperties is false)".to_string(),
                "at steps[0].args: required but missing".to_string(),
            ]
        );
    }
}
