//! What each kind of step does to the world model.
//!
//! The step's path names the resource; kinds with structured effects write
//! well-known children: `deploy` writes `<path>/version` and
//! `<path>/artifact`, `scale` writes `<path>/replicas`, `grant`/`revoke` edit
//! the set `<path>/grants`, `network` edits `<path>/ingress` or
//! `<path>/egress`. `restart` and `exec` change no modelled value.

use std::collections::BTreeMap;

use concord_proto::{NetChange, NetRule, Op, ResourcePath, StepSpec, Value};

use crate::world::State;

/// A change one step makes to one path.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PathChange {
    /// The path.
    pub path: ResourcePath,
    /// Before the step.
    pub before: Option<Value>,
    /// After the step.
    pub after: Option<Value>,
}

/// A step that cannot be applied to the world as it is.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub String);

/// Applies `spec` to `state` and returns what it changed.
pub fn apply(state: &mut State<'_>, spec: &StepSpec) -> Result<Vec<PathChange>, ApplyError> {
    apply_op(state, &spec.path, &spec.op)
}

/// [`apply`] of `op` at `path`, without a [`StepSpec`] to own them.
pub(crate) fn apply_op(state: &mut State<'_>, path: &ResourcePath, op: &Op) -> Result<Vec<PathChange>, ApplyError> {
    let writes: Vec<(ResourcePath, Option<Value>)> = match op {
        Op::Set(a) => vec![(path.clone(), Some(a.value.clone()))],
        Op::Deploy(a) => vec![
            (child(path, "version")?, Some(Value::Str(a.version.to_string()))),
            (child(path, "artifact")?, Some(Value::Str(a.artifact.to_string()))),
        ],
        Op::Scale(a) => vec![(child(path, "replicas")?, Some(Value::Int(a.replicas.into())))],
        Op::Restart(_) | Op::Exec(_) => Vec::new(),
        Op::Delete(_) => {
            let mut doomed: Vec<(ResourcePath, Option<Value>)> = state
                .scan_prefix(&path.descendant_prefix())
                .into_iter()
                .map(|(p, _)| (p, None))
                .collect();
            if state.get(path).is_some() {
                doomed.push((path.clone(), None));
            }
            if doomed.is_empty() {
                return Err(ApplyError(format!("nothing exists at `{path}` to delete")));
            }
            doomed
        }
        Op::Grant(a) | Op::Revoke(a) => {
            let at = child(path, "grants")?;
            let member = format!("{}:{}", a.principal, a.role);
            let mut set = string_set(state.get(&at), &at)?;
            if matches!(op, Op::Grant(_)) {
                set.insert(member);
            } else if !set.remove(&member) {
                return Err(ApplyError(format!("`{member}` is not granted at `{at}`")));
            }
            vec![(at, list_or_none(set.into_iter().map(Value::Str).collect()))]
        }
        Op::Network(a) => {
            let at = child(path, a.direction.segment())?;
            let mut rules = match state.get(&at) {
                None => Vec::new(),
                Some(Value::List(items)) => items.clone(),
                Some(other) => {
                    return Err(ApplyError(format!(
                        "`{at}` holds a {} where a list of network rules belongs",
                        other.type_name()
                    )));
                }
            };
            let rule = rule_value(&a.rule);
            match a.change {
                NetChange::Add if !rules.contains(&rule) => rules.push(rule),
                NetChange::Add => {}
                NetChange::Remove => {
                    let n = rules.len();
                    rules.retain(|r| r != &rule);
                    if rules.len() == n {
                        return Err(ApplyError(format!("no such rule at `{at}` to remove")));
                    }
                }
            }
            vec![(at, list_or_none(rules))]
        }
    };
    let mut changes = Vec::with_capacity(writes.len());
    for (p, after) in writes {
        if after.is_some() {
            if let Some(anc) = state.valued_ancestor(&p) {
                return Err(ApplyError(format!(
                    "cannot write `{p}`: `{anc}` holds a value (values live only at leaves)"
                )));
            }
            if state.has_descendants(&p) {
                return Err(ApplyError(format!(
                    "cannot write `{p}`: paths exist under it (values live only at leaves)"
                )));
            }
        }
        let before = state.get(&p).cloned();
        if before != after {
            state.put(p.clone(), after.clone());
            changes.push(PathChange { path: p, before, after });
        }
    }
    Ok(changes)
}

/// Undoes `changes` (as returned by [`apply`]) in reverse, restoring before-values.
pub fn restore(state: &mut State<'_>, changes: &[PathChange]) -> Vec<PathChange> {
    changes
        .iter()
        .rev()
        .filter_map(|c| {
            let now = state.get(&c.path).cloned();
            (now != c.before).then(|| {
                state.put(c.path.clone(), c.before.clone());
                PathChange {
                    path: c.path.clone(),
                    before: now,
                    after: c.before.clone(),
                }
            })
        })
        .collect()
}

/// The canonical value of a network rule in the world model.
pub fn rule_value(rule: &NetRule) -> Value {
    let mut m = BTreeMap::new();
    m.insert(
        "protocol".to_string(),
        Value::Str(
            serde_json::to_value(rule.protocol)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
    );
    m.insert("port_from".to_string(), Value::Int(rule.port_from.into()));
    m.insert("port_to".to_string(), Value::Int(rule.port_to.into()));
    m.insert("cidr".to_string(), Value::Str(rule.cidr.to_string()));
    Value::Map(m)
}

fn child(path: &ResourcePath, name: &str) -> Result<ResourcePath, ApplyError> {
    path.child(name)
        .map_err(|(_, detail)| ApplyError(format!("`{path}/{name}`: {detail}")))
}

fn string_set(v: Option<&Value>, at: &ResourcePath) -> Result<std::collections::BTreeSet<String>, ApplyError> {
    match v {
        None => Ok(Default::default()),
        Some(Value::List(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApplyError(format!("`{at}` holds a non-string member {i}")))
            })
            .collect(),
        Some(other) => Err(ApplyError(format!(
            "`{at}` holds a {} where a list of grants belongs",
            other.type_name()
        ))),
    }
}

fn list_or_none(items: Vec<Value>) -> Option<Value> {
    (!items.is_empty()).then_some(Value::List(items))
}
