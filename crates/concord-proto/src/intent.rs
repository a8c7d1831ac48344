//! Intents: versioned, declarative plans of steps, each with its compensation.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{DecodeError, Rule, classify, field_of, join, rule_error};
use crate::limits::*;
use crate::path::{Id, ResourcePath, Short, Text};
use crate::value::{Value, check_float};

/// A plan an agent proposes. The proposing agent is never named here: the
/// runtime takes it from the subject the intent arrived on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// Protocol version; this build speaks `1`.
    #[schemars(range(min = 1, max = 1))]
    pub protocol: u32,
    /// Lineage id: every version of one plan shares it.
    pub lineage: Id,
    /// Version within the lineage, from 1; version n+1 supersedes version n.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub version: u32,
    /// Request idempotency key: a retried request with the same key gets the
    /// original decision. Not part of the plan's content hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<Id>,
    /// What the plan is for.
    pub goal: Text,
    /// Why the agent believes it helps.
    #[serde(default)]
    pub rationale: Text,
    /// Preconditions on the world that concord checks before admitting.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub assumptions: Vec<Condition>,
    /// What the agent is unsure of, shown to humans.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub unknowns: Vec<Text>,
    /// The ordered steps.
    #[schemars(length(min = 1, max = 64))]
    pub steps: Vec<Step>,
    /// What to do when the plan conflicts with another agent's in-flight plan.
    #[serde(default)]
    pub on_conflict: OnConflict,
}

/// What a conflicting plan asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// Reject at once, naming the other plan.
    #[default]
    Reject,
    /// Wait until the conflicting plan ends, then be previewed again.
    Queue,
}

/// A condition on one path of the world: used by assumptions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The path the condition reads.
    pub path: ResourcePath,
    /// The comparison.
    pub op: CmpOp,
    /// The value compared with; required for every operator but `exists` and `absent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    /// Equal (numbers compare by value: `1 == 1.0`).
    Eq,
    /// Not equal.
    Ne,
    /// Less than.
    Lt,
    /// Less than or equal.
    Le,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
    /// The path holds a value.
    Exists,
    /// The path holds no value.
    Absent,
}

impl CmpOp {
    /// The operator as written in reports.
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Exists => "exists",
            CmpOp::Absent => "absent",
        }
    }

    /// Evaluates the operator on an actual value (`None`: the path holds nothing).
    pub fn holds(self, actual: Option<&Value>, expected: Option<&Value>) -> bool {
        use std::cmp::Ordering::*;
        match (self, actual, expected) {
            (CmpOp::Exists, a, _) => a.is_some(),
            (CmpOp::Absent, a, _) => a.is_none(),
            (_, None, _) | (_, _, None) => false,
            (CmpOp::Eq, Some(a), Some(e)) => a.equals(e),
            (CmpOp::Ne, Some(a), Some(e)) => !a.equals(e),
            (op, Some(a), Some(e)) => match (op, a.partial_cmp_value(e)) {
                (CmpOp::Lt, Some(o)) => o == Less,
                (CmpOp::Le, Some(o)) => o != Greater,
                (CmpOp::Gt, Some(o)) => o == Greater,
                (CmpOp::Ge, Some(o)) => o != Less,
                _ => false,
            },
        }
    }
}

/// What must be observed after a step for it to count as succeeded, e.g.
/// application-level health `ok` within a bake time (not a heartbeat).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// The observation path, e.g. `svc/api/health/app`.
    pub path: ResourcePath,
    /// The comparison.
    pub op: CmpOp,
    /// The expected value (omit for `exists` / `absent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// How long the condition must hold after the step before it succeeds (bake time).
    pub bake_ms: u64,
    /// How recent the observation must be to count.
    pub fresh_ms: u64,
}

/// The kinds of step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Set the value at a path.
    Set,
    /// Deploy a version of the service at the path.
    Deploy,
    /// Scale the service at the path to a replica count.
    Scale,
    /// Restart the service at the path.
    Restart,
    /// Delete the path and everything under it.
    Delete,
    /// Run one program with arguments (never a shell string).
    Exec,
    /// Grant a role on the path's scope to a principal.
    Grant,
    /// Revoke a role on the path's scope from a principal.
    Revoke,
    /// Add or remove a network rule on the path.
    Network,
}

impl StepKind {
    /// Every kind, in order.
    pub const ALL: [StepKind; 9] = [
        StepKind::Set,
        StepKind::Deploy,
        StepKind::Scale,
        StepKind::Restart,
        StepKind::Delete,
        StepKind::Exec,
        StepKind::Grant,
        StepKind::Revoke,
        StepKind::Network,
    ];

    /// The wire name, e.g. `deploy`.
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Set => "set",
            StepKind::Deploy => "deploy",
            StepKind::Scale => "scale",
            StepKind::Restart => "restart",
            StepKind::Delete => "delete",
            StepKind::Exec => "exec",
            StepKind::Grant => "grant",
            StepKind::Revoke => "revoke",
            StepKind::Network => "network",
        }
    }

    /// Kinds whose effects cannot be restored from the world's before-values.
    pub fn restorable(self) -> bool {
        !matches!(self, StepKind::Restart | StepKind::Delete | StepKind::Exec)
    }

    /// Kinds that destroy, run arbitrary code, or widen access.
    pub fn destructive(self) -> bool {
        matches!(
            self,
            StepKind::Delete | StepKind::Exec | StepKind::Grant | StepKind::Network
        )
    }
}

impl std::fmt::Display for StepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Arguments of `set`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetArgs {
    /// The new value.
    pub value: Value,
}

/// Arguments of `deploy`: the service is the step's path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployArgs {
    /// The version, e.g. `v2.3.1`.
    pub version: Short,
    /// The artifact, e.g. `registry/api:v2.3.1`; policies allowlist these.
    pub artifact: Short,
}

/// Arguments of `scale`: the service is the step's path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleArgs {
    /// Replica count, 0 to 100000.
    #[schemars(range(max = 100_000))]
    pub replicas: u32,
}

/// Arguments of `restart` (none).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartArgs {}

/// Arguments of `delete`: the confirmation is mandatory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteArgs {
    /// The confirmation: repeats the path being deleted.
    pub confirm: DeleteConfirm,
}

/// A delete's confirmation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteConfirm {
    /// Must equal the step's path exactly.
    pub path: ResourcePath,
    /// Why the delete is needed.
    pub reason: Short,
}

/// Arguments of `exec`: a program name and its arguments, never a shell string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// One program name or absolute path, without spaces or shell characters.
    pub program: Short,
    /// Its arguments, passed as they are (no shell expansion).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub args: Vec<Short>,
}

/// Arguments of `grant` and `revoke`: the scope is the step's path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantArgs {
    /// Who receives or loses the role.
    pub principal: Id,
    /// The role.
    pub role: Id,
}

/// Arguments of `network`: a rule change and the evidence it was tested.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkArgs {
    /// Inbound or outbound.
    pub direction: Direction,
    /// Add or remove the rule.
    pub change: NetChange,
    /// The rule.
    pub rule: NetRule,
    /// The connectivity check the agent ran before proposing, and its result.
    pub preflight: Preflight,
}

/// Traffic direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Inbound traffic; the rule lives at `<path>/ingress`.
    Ingress,
    /// Outbound traffic; the rule lives at `<path>/egress`.
    Egress,
}

impl Direction {
    /// The child path segment holding the rules.
    pub fn segment(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Add or remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetChange {
    /// Add the rule.
    Add,
    /// Remove the rule.
    Remove,
}

/// A network rule: protocol, port range, address range.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetRule {
    /// `tcp`, `udp` or `any`.
    pub protocol: Protocol,
    /// First port, 1..=65535.
    #[schemars(range(min = 1))]
    pub port_from: u16,
    /// Last port, `port_from..=65535`.
    #[schemars(range(min = 1))]
    pub port_to: u16,
    /// The peer address range in CIDR notation, e.g. `10.0.0.0/8`.
    pub cidr: Short,
}

/// A transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// Any protocol.
    Any,
}

/// The evidence of a network change's preflight check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Preflight {
    /// What was checked, e.g. `tcp connect 10.1.2.3:5432 from svc/api`.
    pub check: Short,
    /// Its result.
    pub result: PreflightResult,
    /// Anything the check printed that a human should see.
    #[serde(default)]
    pub detail: Short,
}

/// A preflight check's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PreflightResult {
    /// The check passed.
    Passed,
    /// The check failed.
    Failed,
}

/// What a step does: its kind and arguments.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Op {
    /// `set`.
    Set(SetArgs),
    /// `deploy`.
    Deploy(DeployArgs),
    /// `scale`.
    Scale(ScaleArgs),
    /// `restart`.
    Restart(RestartArgs),
    /// `delete`.
    Delete(DeleteArgs),
    /// `exec`.
    Exec(ExecArgs),
    /// `grant`.
    Grant(GrantArgs),
    /// `revoke`.
    Revoke(GrantArgs),
    /// `network`.
    Network(NetworkArgs),
}

impl Op {
    /// Builds an op from a kind and its JSON arguments, checking them as decoding does.
    pub fn from_kind_args(kind: StepKind, args: serde_json::Value) -> Result<Op, DecodeError> {
        Op::decode::<serde_json::Error>(kind, args).map_err(|e| classify("", &e.to_string()))
    }

    /// The arguments as JSON, shaped as in an intent's step.
    pub fn args_json(&self) -> serde_json::Value {
        // Args types serialize infallibly: string keys, finite numbers.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The step kind.
    pub fn kind(&self) -> StepKind {
        match self {
            Op::Set(_) => StepKind::Set,
            Op::Deploy(_) => StepKind::Deploy,
            Op::Scale(_) => StepKind::Scale,
            Op::Restart(_) => StepKind::Restart,
            Op::Delete(_) => StepKind::Delete,
            Op::Exec(_) => StepKind::Exec,
            Op::Grant(_) => StepKind::Grant,
            Op::Revoke(_) => StepKind::Revoke,
            Op::Network(_) => StepKind::Network,
        }
    }

    /// Decodes the arguments of `kind` from JSON, naming the failing field
    /// under `args`.
    fn decode<E: serde::de::Error>(kind: StepKind, args: serde_json::Value) -> Result<Op, E> {
        fn de<T: serde::de::DeserializeOwned, E: serde::de::Error>(v: serde_json::Value) -> Result<T, E> {
            decode_at("args", v)
        }
        Ok(match kind {
            StepKind::Set => Op::Set(de(args)?),
            StepKind::Deploy => Op::Deploy(de(args)?),
            StepKind::Scale => Op::Scale(de(args)?),
            StepKind::Restart => Op::Restart(de(args)?),
            StepKind::Delete => Op::Delete(de(args)?),
            StepKind::Exec => Op::Exec(de(args)?),
            StepKind::Grant => Op::Grant(de(args)?),
            StepKind::Revoke => Op::Revoke(de(args)?),
            StepKind::Network => Op::Network(de(args)?),
        })
    }

    /// Semantic checks that the type system does not express.
    fn check(&self, path: &ResourcePath) -> Result<(), (String, Rule, String)> {
        match self {
            Op::Set(a) => a.value.check().map_err(|(r, d)| ("args.value".into(), r, d)),
            Op::Scale(a) if a.replicas > 100_000 => Err((
                "args.replicas".into(),
                Rule::NumericRange,
                format!("{} replicas is outside 0..=100000", a.replicas),
            )),
            Op::Delete(a) if &a.confirm.path != path => Err((
                "args.confirm.path".into(),
                Rule::Confirmation,
                format!("confirmation names `{}` but the step deletes `{path}`", a.confirm.path),
            )),
            Op::Delete(a) if a.confirm.reason.as_str().trim().is_empty() => Err((
                "args.confirm.reason".into(),
                Rule::Confirmation,
                "a delete's confirmation must give a reason".into(),
            )),
            Op::Exec(a) => {
                let p = a.program.as_str();
                if p.is_empty()
                    || p.chars()
                        .any(|c| c.is_whitespace() || ";|&$><`'\"(){}[]*?~!#\\".contains(c))
                {
                    return Err((
                        "args.program".into(),
                        Rule::ExecProgram,
                        format!(
                            "`{p}` is not one program name: no spaces or shell characters; put arguments in `args`"
                        ),
                    ));
                }
                if a.args.len() > EXEC_ARGS_MAX {
                    return Err((
                        "args.args".into(),
                        Rule::ItemsMax,
                        format!("{} arguments; at most {EXEC_ARGS_MAX} allowed", a.args.len()),
                    ));
                }
                Ok(())
            }
            Op::Network(a) => {
                if a.rule.port_from == 0 || a.rule.port_from > a.rule.port_to {
                    return Err((
                        "args.rule.port_from".into(),
                        Rule::PortRange,
                        format!(
                            "ports {}..={} are not a range within 1..=65535",
                            a.rule.port_from, a.rule.port_to
                        ),
                    ));
                }
                if a.rule.cidr.as_str().parse::<ipnet::IpNet>().is_err() {
                    return Err((
                        "args.rule.cidr".into(),
                        Rule::Cidr,
                        format!("`{}` is not CIDR notation such as 10.0.0.0/8", a.rule.cidr),
                    ));
                }
                if a.preflight.check.as_str().trim().is_empty() {
                    return Err((
                        "args.preflight.check".into(),
                        Rule::Preflight,
                        "a network change must say which connectivity check was run".into(),
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A step without its id and compensation: what a compensation's `undo` runs.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSpec {
    /// The resource path.
    pub path: ResourcePath,
    /// What to do there.
    pub op: Op,
}

/// How a step is undone if a later step fails.
#[derive(Clone, Debug, PartialEq)]
pub enum Compensation {
    /// concord restores the before-values of everything the step changed.
    Restore,
    /// Run this step instead.
    Undo(StepSpec),
    /// The step cannot be undone; the reason is shown to humans.
    Irreversible {
        /// Why.
        reason: Short,
    },
}

/// One operation on one resource path.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Unique within the plan.
    pub id: Id,
    /// The resource path.
    pub path: ResourcePath,
    /// The kind and its arguments.
    pub op: Op,
    /// The agent's confidence that the step does what it intends, 0..=1.
    pub confidence: f64,
    /// How to undo it.
    pub compensation: Compensation,
    /// How long the executor may take, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// What must be observed afterwards for the step to succeed.
    pub verification: Option<Verification>,
}

impl Step {
    /// The step kind.
    pub fn kind(&self) -> StepKind {
        self.op.kind()
    }
}

// ---- wire form of steps and compensations ----------------------------------

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: Id,
    kind: StepKind,
    path: ResourcePath,
    #[serde(default = "empty_args")]
    args: serde_json::Value,
    confidence: f64,
    compensation: RawCompensation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verification: Option<Verification>,
}

fn empty_args() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Decodes `v` as a `T`, naming a failing field under `prefix`.
fn decode_at<T: serde::de::DeserializeOwned, E: serde::de::Error>(prefix: &str, v: serde_json::Value) -> Result<T, E> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let err = classify(&field_of(e.path()), &e.inner().to_string());
        rule_error(&join(prefix, &err.field), err.rule, err.detail)
    })
}

#[derive(Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum RawCompensation {
    Restore,
    Undo {
        kind: StepKind,
        path: ResourcePath,
        #[serde(default = "empty_args")]
        args: serde_json::Value,
    },
    Irreversible {
        reason: Short,
    },
}

// Decoded by hand rather than by serde's internally tagged derive: that derive
// buffers the object, which loses the field path of any error inside it
// (`compensation` instead of `compensation.path`) and lets `restore` carry
// fields nobody defined.
impl<'de> Deserialize<'de> for RawCompensation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Mode {
            Restore,
            Undo,
            Irreversible,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RestoreFields {}
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct UndoFields {
            kind: StepKind,
            path: ResourcePath,
            #[serde(default = "empty_args")]
            args: serde_json::Value,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct IrreversibleFields {
            reason: Short,
        }

        let mut fields = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let mode = fields
            .remove("mode")
            .ok_or_else(|| rule_error("mode", Rule::Required, "missing field `mode`"))?;
        let mode: Mode = decode_at("mode", mode)?;
        let rest = serde_json::Value::Object(fields);
        Ok(match mode {
            Mode::Restore => {
                let RestoreFields {} = decode_at("", rest)?;
                RawCompensation::Restore
            }
            Mode::Undo => {
                let UndoFields { kind, path, args } = decode_at("", rest)?;
                RawCompensation::Undo { kind, path, args }
            }
            Mode::Irreversible => {
                let IrreversibleFields { reason } = decode_at("", rest)?;
                RawCompensation::Irreversible { reason }
            }
        })
    }
}

/// A step as written: [`RawStep`]'s fields, borrowed.
#[derive(Serialize)]
struct StepOut<'a> {
    id: &'a Id,
    kind: StepKind,
    path: &'a ResourcePath,
    args: ArgsOut<'a>,
    confidence: f64,
    compensation: CompensationOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<&'a Verification>,
}

/// A compensation as written: [`RawCompensation`], borrowed.
#[derive(Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum CompensationOut<'a> {
    Restore,
    Undo {
        kind: StepKind,
        path: &'a ResourcePath,
        args: ArgsOut<'a>,
    },
    Irreversible {
        reason: &'a Short,
    },
}

/// An op's arguments as written: their fields in key order, as a JSON
/// value (whose maps sort their keys) wrote them when plan hashes were
/// first made, since the content hash encodes them. The kinds whose
/// arguments are declared in key order are written as they are; the others,
/// and a value holding a float that is not finite (which a JSON value
/// writes as null), through a JSON value.
enum ArgsOut<'a> {
    Direct(&'a Op),
    Json(serde_json::Value),
}

impl<'a> ArgsOut<'a> {
    fn of(op: &'a Op) -> Result<Self, serde_json::Error> {
        fn finite(v: &Value) -> bool {
            match v {
                Value::Float(f) => f.is_finite(),
                Value::List(items) => items.iter().all(finite),
                Value::Map(m) => m.values().all(finite),
                Value::Bool(_) | Value::Int(_) | Value::Str(_) => true,
            }
        }
        let in_key_order = match op {
            Op::Set(a) => finite(&a.value),
            Op::Scale(_) | Op::Restart(_) | Op::Delete(_) | Op::Grant(_) | Op::Revoke(_) => true,
            Op::Deploy(_) | Op::Exec(_) | Op::Network(_) => false,
        };
        if in_key_order {
            Ok(ArgsOut::Direct(op))
        } else {
            serde_json::to_value(op).map(ArgsOut::Json)
        }
    }
}

impl Serialize for ArgsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ArgsOut::Direct(op) => op.serialize(s),
            ArgsOut::Json(v) => v.serialize(s),
        }
    }
}

impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Every field, named without `..`: a field added to `Step` does not
        // compile here until it is written (and so hashed) too.
        let Step {
            id,
            path,
            op,
            confidence,
            compensation,
            timeout_ms,
            verification,
        } = self;
        let args = |op| ArgsOut::of(op).map_err(serde::ser::Error::custom);
        let compensation = match compensation {
            Compensation::Restore => CompensationOut::Restore,
            Compensation::Undo(spec) => CompensationOut::Undo {
                kind: spec.op.kind(),
                path: &spec.path,
                args: args(&spec.op)?,
            },
            Compensation::Irreversible { reason } => CompensationOut::Irreversible { reason },
        };
        StepOut {
            id,
            kind: op.kind(),
            path,
            args: args(op)?,
            confidence: *confidence,
            compensation,
            timeout_ms: *timeout_ms,
            verification: verification.as_ref(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawStep::deserialize(d)?;
        let op = Op::decode(raw.kind, raw.args)?;
        let compensation = match raw.compensation {
            RawCompensation::Restore => Compensation::Restore,
            RawCompensation::Undo {
                kind: ukind,
                path,
                args,
            } => {
                let op = Op::decode(ukind, args).map_err(|e: D::Error| {
                    let err = classify("", &e.to_string());
                    rule_error(&format!("compensation.{}", err.field), err.rule, err.detail)
                })?;
                Compensation::Undo(StepSpec { path, op })
            }
            RawCompensation::Irreversible { reason } => Compensation::Irreversible { reason },
        };
        let step = Step {
            id: raw.id,
            path: raw.path,
            op,
            confidence: raw.confidence,
            compensation,
            timeout_ms: raw.timeout_ms,
            verification: raw.verification,
        };
        step.check().map_err(|(at, r, detail)| rule_error(&at, r, detail))?;
        Ok(step)
    }
}

impl Step {
    /// The rules of one step that its types do not express: argument
    /// semantics, confidence and timeout ranges, and which compensation the
    /// kind allows. Decoding applies them; [`Intent::validate`] applies them
    /// again to steps built in code. The error's field is relative to the step.
    pub fn check(&self) -> Result<(), (String, Rule, String)> {
        self.op.check(&self.path)?;
        check_float(self.confidence).map_err(|(r, d)| ("confidence".to_string(), r, d))?;
        if !(0.0..=1.0).contains(&self.confidence) {
            return Err((
                "confidence".into(),
                Rule::NumericRange,
                format!("{} is outside 0..=1", self.confidence),
            ));
        }
        if let Some(t) = self.timeout_ms
            && !(1..=DURATION_MS_MAX).contains(&t)
        {
            return Err((
                "timeout_ms".into(),
                Rule::NumericRange,
                format!("{t} is outside 1..={DURATION_MS_MAX}"),
            ));
        }
        let kind = self.kind();
        match &self.compensation {
            Compensation::Restore if !kind.restorable() => Err((
                "compensation.mode".into(),
                Rule::Compensation,
                format!(
                    "a `{kind}` cannot be restored from before-values; give an `undo` step or mark it `irreversible` with a reason"
                ),
            )),
            Compensation::Undo(_) if kind == StepKind::Delete => Err((
                "compensation.mode".into(),
                Rule::Compensation,
                "a `delete` is irreversible and must say so: mode `irreversible` with a reason".into(),
            )),
            Compensation::Undo(spec) => spec
                .op
                .check(&spec.path)
                .map_err(|(at, r, d)| (format!("compensation.{at}"), r, d)),
            Compensation::Irreversible { reason } if reason.as_str().trim().is_empty() => Err((
                "compensation.reason".into(),
                Rule::Compensation,
                "an irreversible step must give the reason".into(),
            )),
            Compensation::Restore | Compensation::Irreversible { .. } => Ok(()),
        }
    }
}

impl schemars::JsonSchema for Step {
    fn schema_name() -> Cow<'static, str> {
        "Step".into()
    }

    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let id = g.subschema_for::<Id>();
        let path = g.subschema_for::<ResourcePath>();
        let verification = g.subschema_for::<Verification>();
        let short = g.subschema_for::<Short>();
        let branches: Vec<serde_json::Value> = StepKind::ALL
            .iter()
            .map(|&kind| {
                let args = args_schema(g, kind);
                let compensation = compensation_schema(g, kind, &short, &path);
                // `restart` takes no arguments: `args` may be left out, as the decoder allows.
                let required: &[&str] = if kind == StepKind::Restart {
                    &["id", "kind", "path", "confidence", "compensation"]
                } else {
                    &["id", "kind", "path", "args", "confidence", "compensation"]
                };
                serde_json::json!({
                    "type": "object",
                    "additionalProperties": false,
                    "required": required,
                    "properties": {
                        "id": id,
                        "kind": { "const": kind.name() },
                        "path": path,
                        "args": args,
                        "confidence": { "type": "number", "minimum": 0.0, "maximum": 1.0 },
                        "compensation": compensation,
                        "timeout_ms": { "type": "integer", "minimum": 1, "maximum": DURATION_MS_MAX },
                        "verification": verification,
                    }
                })
            })
            .collect();
        schemars::json_schema!({
            "description": "One operation on one resource path, with its compensation. `kind` selects the shape of `args`.",
            "oneOf": branches,
        })
    }
}

fn args_schema(g: &mut schemars::SchemaGenerator, kind: StepKind) -> schemars::Schema {
    match kind {
        StepKind::Set => g.subschema_for::<SetArgs>(),
        StepKind::Deploy => g.subschema_for::<DeployArgs>(),
        StepKind::Scale => g.subschema_for::<ScaleArgs>(),
        StepKind::Restart => g.subschema_for::<RestartArgs>(),
        StepKind::Delete => g.subschema_for::<DeleteArgs>(),
        StepKind::Exec => g.subschema_for::<ExecArgs>(),
        StepKind::Grant | StepKind::Revoke => g.subschema_for::<GrantArgs>(),
        StepKind::Network => g.subschema_for::<NetworkArgs>(),
    }
}

fn compensation_schema(
    g: &mut schemars::SchemaGenerator,
    kind: StepKind,
    short: &schemars::Schema,
    path: &schemars::Schema,
) -> serde_json::Value {
    let irreversible = serde_json::json!({
        "type": "object", "additionalProperties": false, "required": ["mode", "reason"],
        "properties": { "mode": { "const": "irreversible" }, "reason": short }
    });
    if kind == StepKind::Delete {
        return irreversible;
    }
    let undo: Vec<serde_json::Value> = StepKind::ALL
        .iter()
        .map(|&k| {
            let required: &[&str] = if k == StepKind::Restart {
                &["mode", "kind", "path"]
            } else {
                &["mode", "kind", "path", "args"]
            };
            serde_json::json!({
                "type": "object", "additionalProperties": false, "required": required,
                "properties": {
                    "mode": { "const": "undo" }, "kind": { "const": k.name() }, "path": path, "args": args_schema(g, k)
                }
            })
        })
        .collect();
    let mut options = vec![irreversible];
    if kind.restorable() {
        options.push(serde_json::json!({
            "type": "object", "additionalProperties": false, "required": ["mode"],
            "properties": { "mode": { "const": "restore" } }
        }));
    }
    options.extend(undo);
    serde_json::json!({ "oneOf": options })
}

// ---- decoding and validation ------------------------------------------------

/// Decodes and validates an intent from its JSON bytes.
///
/// Enforces every limit in [`crate::limits`]; the error names the field path
/// (e.g. `steps[1].args.replicas`) and the [`Rule`].
pub fn decode_intent(bytes: &[u8]) -> Result<Intent, DecodeError> {
    if bytes.len() > INTENT_BYTES_MAX {
        return Err(DecodeError::new(
            "",
            Rule::PayloadBytesMax,
            format!("payload is {} bytes; at most {INTENT_BYTES_MAX} allowed", bytes.len()),
        ));
    }
    let intent: Intent = crate::error::decode_json(bytes)?;
    intent.validate()?;
    Ok(intent)
}

impl Intent {
    /// Checks the rules that span fields: protocol, version, counts, unique
    /// step ids, values required by operators. [`decode_intent`] calls it; call
    /// it yourself for an intent built in code.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.protocol != PROTOCOL_VERSION {
            return Err(DecodeError::new(
                "protocol",
                Rule::ProtocolVersion,
                format!(
                    "protocol {} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
                    self.protocol
                ),
            ));
        }
        if !(1..=PLAN_VERSION_MAX).contains(&self.version) {
            return Err(DecodeError::new(
                "version",
                Rule::NumericRange,
                format!("version {} is outside 1..={PLAN_VERSION_MAX}", self.version),
            ));
        }
        if self.steps.is_empty() {
            return Err(DecodeError::new(
                "steps",
                Rule::ItemsMin,
                "a plan needs at least one step",
            ));
        }
        for (field, n, max) in [
            ("steps", self.steps.len(), STEPS_MAX),
            ("assumptions", self.assumptions.len(), ASSUMPTIONS_MAX),
            ("unknowns", self.unknowns.len(), UNKNOWNS_MAX),
        ] {
            if n > max {
                return Err(DecodeError::new(
                    field,
                    Rule::ItemsMax,
                    format!("{n} items; at most {max} allowed"),
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !ids.insert(step.id.as_str()) {
                return Err(DecodeError::new(
                    format!("steps[{i}].id"),
                    Rule::DuplicateId,
                    format!("step id `{}` is used twice", step.id),
                ));
            }
            // Re-check what decoding checks, for steps built in code.
            step.check()
                .map_err(|(at, r, d)| DecodeError::new(format!("steps[{i}].{at}"), r, d))?;
            if let Some(v) = &step.verification {
                check_condition(&format!("steps[{i}].verification"), v.op, v.value.as_ref())?;
                for (name, ms) in [("bake_ms", v.bake_ms), ("fresh_ms", v.fresh_ms)] {
                    if ms > DURATION_MS_MAX {
                        return Err(DecodeError::new(
                            format!("steps[{i}].verification.{name}"),
                            Rule::NumericRange,
                            format!("{ms} is outside 0..={DURATION_MS_MAX}"),
                        ));
                    }
                }
            }
        }
        for (i, a) in self.assumptions.iter().enumerate() {
            check_condition(&format!("assumptions[{i}]"), a.op, a.value.as_ref())?;
        }
        Ok(())
    }

    /// The plan's content hash: what a human approves. BLAKE3 of the plan's
    /// CBOR encoding (RFC 8949, through serde: the fields of [`Intent`] in
    /// declaration order, maps in key order, so the same plan always gives
    /// the same bytes), without the idempotency key. CBOR rather than JSON:
    /// no escaping or number formatting, a third of the cost per decision.
    pub fn content_hash(&self) -> String {
        // Every field but the key, named without `..`: a field added to
        // `Intent` does not compile here until it is hashed too.
        let Intent {
            protocol,
            lineage,
            version,
            idempotency_key: _,
            goal,
            rationale,
            assumptions,
            unknowns,
            steps,
            on_conflict,
        } = self;
        let content = Content {
            protocol: *protocol,
            lineage,
            version: *version,
            goal,
            rationale,
            assumptions,
            unknowns,
            steps,
            on_conflict: *on_conflict,
        };
        let mut bytes = Vec::with_capacity(CONTENT_BYTES_HINT);
        if ciborium::into_writer(&content, &mut bytes).is_err() {
            // Writing to memory fails only on a value serde cannot encode,
            // which these types do not hold; never hash a partial encoding.
            bytes.clear();
            bytes.extend_from_slice(format!("{content:?}").as_bytes());
        }
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// What [`Intent::content_hash`] encodes: the intent without its key.
#[derive(Debug, Serialize)]
struct Content<'a> {
    protocol: u32,
    lineage: &'a Id,
    version: u32,
    goal: &'a Text,
    rationale: &'a Text,
    assumptions: &'a [Condition],
    unknowns: &'a [Text],
    steps: &'a [Step],
    on_conflict: OnConflict,
}

/// A plan's usual size as CBOR: the buffer it is encoded into starts this
/// large (it grows past it if it must).
const CONTENT_BYTES_HINT: usize = 1024;

fn check_condition(field: &str, op: CmpOp, value: Option<&Value>) -> Result<(), DecodeError> {
    match (op, value) {
        (CmpOp::Exists | CmpOp::Absent, Some(_)) => Err(DecodeError::new(
            format!("{field}.value"),
            Rule::UnknownField,
            format!("`{}` takes no value", op.symbol()),
        )),
        (CmpOp::Exists | CmpOp::Absent, None) => Ok(()),
        (_, None) => Err(DecodeError::new(
            format!("{field}.value"),
            Rule::Required,
            format!("`{}` needs a value to compare with", op.symbol()),
        )),
        (_, Some(v)) => v
            .check()
            .map_err(|(r, d)| DecodeError::new(format!("{field}.value"), r, d)),
    }
}

#[cfg(test)]
mod step_out_tests {
    use super::*;

    /// A step as it was written before: [`RawStep`] owned, its arguments
    /// (and its compensation's) converted to a JSON value.
    fn through_json_value(step: &Step) -> RawStep {
        let args = |op: &Op| serde_json::to_value(op).unwrap();
        RawStep {
            id: step.id.clone(),
            kind: step.kind(),
            path: step.path.clone(),
            args: args(&step.op),
            confidence: step.confidence,
            compensation: match &step.compensation {
                Compensation::Restore => RawCompensation::Restore,
                Compensation::Undo(spec) => RawCompensation::Undo {
                    kind: spec.op.kind(),
                    path: spec.path.clone(),
                    args: args(&spec.op),
                },
                Compensation::Irreversible { reason } => RawCompensation::Irreversible { reason: reason.clone() },
            },
            timeout_ms: step.timeout_ms,
            verification: step.verification.clone(),
        }
    }

    /// Every kind of step, every compensation, values of every type: the
    /// JSON and the CBOR (what the content hash encodes) are byte for byte
    /// what they were through a JSON value.
    #[test]
    fn a_step_is_written_as_it_was_through_a_json_value() {
        let restore = serde_json::json!({ "mode": "restore" });
        let set = |value: serde_json::Value| {
            serde_json::json!({ "id": "s", "kind": "set", "path": "a/b", "args": { "value": value },
                "confidence": 0.5, "compensation": restore })
        };
        let steps = [
            set(serde_json::json!(-7)),
            set(serde_json::json!(2.5)),
            set(serde_json::json!(1e15)),
            set(serde_json::json!({ "z": [1, 2.0, "x", true], "a": { "m": -1.25, "b": false } })),
            serde_json::json!({ "id": "s2", "kind": "deploy", "path": "svc/api",
                "args": { "version": "v2", "artifact": "reg/api:v2" }, "confidence": 0.9,
                "compensation": { "mode": "undo", "kind": "deploy", "path": "svc/api",
                    "args": { "version": "v1", "artifact": "reg/api:v1" } },
                "timeout_ms": 600000,
                "verification": { "path": "svc/api/health/app", "op": "eq", "value": "ok",
                    "bake_ms": 300000, "fresh_ms": 30000 } }),
            serde_json::json!({ "id": "s3", "kind": "scale", "path": "svc/api", "args": { "replicas": 6 },
                "confidence": 0.8, "compensation": restore }),
            serde_json::json!({ "id": "s4", "kind": "restart", "path": "svc/w", "confidence": 0.6,
                "compensation": { "mode": "irreversible", "reason": "cannot" } }),
            serde_json::json!({ "id": "s5", "kind": "delete", "path": "db/r",
                "args": { "confirm": { "path": "db/r", "reason": "gone" } }, "confidence": 1.0,
                "compensation": { "mode": "irreversible", "reason": "data" } }),
            serde_json::json!({ "id": "s6", "kind": "exec", "path": "db/p",
                "args": { "program": "/usr/bin/vacuumdb", "args": ["--all"] }, "confidence": 0.5,
                "compensation": { "mode": "irreversible", "reason": "no" } }),
            serde_json::json!({ "id": "s7", "kind": "grant", "path": "db/p",
                "args": { "principal": "agent:t", "role": "reader" }, "confidence": 0.9,
                "compensation": { "mode": "undo", "kind": "revoke", "path": "db/p",
                    "args": { "principal": "agent:t", "role": "reader" } } }),
            serde_json::json!({ "id": "s9", "kind": "network", "path": "net/api",
                "args": { "direction": "egress", "change": "add",
                    "rule": { "protocol": "tcp", "port_from": 5432, "port_to": 5432, "cidr": "10.1.0.0/16" },
                    "preflight": { "check": "tcp connect", "result": "passed" } },
                "confidence": 0.8, "compensation": restore }),
        ];
        for json in steps {
            let step: Step = serde_json::from_value(json.clone()).unwrap();
            let before = through_json_value(&step);
            assert_eq!(
                String::from_utf8(serde_json::to_vec(&step).unwrap()).unwrap(),
                String::from_utf8(serde_json::to_vec(&before).unwrap()).unwrap(),
                "{json}"
            );
            assert_eq!(cbor(&step), cbor(&before), "{json}");
        }
        // A value a decoder never lets in, built in code: a float that is
        // not finite, which a JSON value holds as null.
        let step = Step {
            id: Id::parse("s").unwrap(),
            path: ResourcePath::parse("a/b").unwrap(),
            op: Op::Set(SetArgs {
                value: Value::List(vec![Value::Int(1), Value::Float(f64::NAN)]),
            }),
            confidence: 0.5,
            compensation: Compensation::Restore,
            timeout_ms: None,
            verification: None,
        };
        let before = through_json_value(&step);
        assert_eq!(serde_json::to_vec(&step).unwrap(), serde_json::to_vec(&before).unwrap());
        assert_eq!(cbor(&step), cbor(&before));
    }

    /// CBOR bytes of a value, as the content hash encodes it.
    fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }
}
