//! Property tests of `decode_intent`: every valid intent survives encoding
//! and decoding unchanged, and no input, however broken, makes it panic.

use concord_proto::limits::*;
use concord_proto::{
    CmpOp, Compensation, Condition, DeleteArgs, DeleteConfirm, DeployArgs, Direction, ExecArgs, GrantArgs, Id, Intent,
    NetChange, NetRule, NetworkArgs, OnConflict, Op, Preflight, PreflightResult, Protocol, ResourcePath, RestartArgs,
    ScaleArgs, SetArgs, Short, Step, StepKind, StepSpec, Text, Value, Verification, decode_intent,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;

// ---- atoms -------------------------------------------------------------------------

fn id() -> impl Strategy<Value = Id> {
    "[A-Za-z0-9_.:@-]{1,24}".prop_map(|s| Id::parse(&s).unwrap())
}

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:-]{1,10}".prop_filter("`.` and `..` are not segments", |s| s != "." && s != "..")
}

fn resource_path() -> impl Strategy<Value = ResourcePath> {
    vec(segment(), 1..=PATH_DEPTH_MAX).prop_map(|segs| ResourcePath::parse(&segs.join("/")).unwrap())
}

/// Any text, control characters and non-ASCII included.
fn any_text(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("(?s).{{0,{max_chars}}}")).unwrap()
}

fn short() -> impl Strategy<Value = Short> {
    any_text(24).prop_map(|s| Short::parse(&s).unwrap())
}

/// A short string with at least one non-blank character (reasons, checks).
fn reason() -> impl Strategy<Value = Short> {
    (any_text(8), "[a-z]", any_text(8)).prop_map(|(a, b, c)| Short::parse(&format!("{a}{b}{c}")).unwrap())
}

fn text() -> impl Strategy<Value = Text> {
    any_text(40).prop_map(|s| Text::parse(&s).unwrap())
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        -FLOAT_ABS_MAX..=FLOAT_ABS_MAX,
        -1.0..1.0f64,
        any::<f64>().prop_filter("finite and within the limit", |f| f.is_finite()
            && f.abs() <= FLOAT_ABS_MAX),
        select(vec![0.0, -0.0, 1.0, 0.1, 1e15, -1e15, 5e-324, f64::MIN_POSITIVE]),
    ]
}

/// A value that nests at most `VALUE_DEPTH_MAX - 1` containers deep, the
/// deepest the decoder accepts.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-INT_ABS_MAX..=INT_ABS_MAX).prop_map(Value::Int),
        select(vec![0, -1, INT_ABS_MAX, -INT_ABS_MAX]).prop_map(Value::Int),
        float().prop_map(Value::Float),
        any_text(12).prop_map(Value::Str),
    ];
    leaf.prop_recursive((VALUE_DEPTH_MAX - 1) as u32, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::List),
            btree_map(any_text(6), inner, 0..6).prop_map(Value::Map),
        ]
    })
}

fn cmp_op() -> impl Strategy<Value = CmpOp> {
    select(vec![
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
        CmpOp::Exists,
        CmpOp::Absent,
    ])
}

/// An operator with a value exactly when the operator takes one.
fn op_and_value() -> impl Strategy<Value = (CmpOp, Option<Value>)> {
    (cmp_op(), value()).prop_map(|(op, v)| match op {
        CmpOp::Exists | CmpOp::Absent => (op, None),
        _ => (op, Some(v)),
    })
}

fn condition() -> impl Strategy<Value = Condition> {
    (resource_path(), op_and_value()).prop_map(|(path, (op, value))| Condition { path, op, value })
}

fn verification() -> impl Strategy<Value = Verification> {
    (
        resource_path(),
        op_and_value(),
        0..=DURATION_MS_MAX,
        0..=DURATION_MS_MAX,
    )
        .prop_map(|(path, (op, value), bake_ms, fresh_ms)| Verification {
            path,
            op,
            value,
            bake_ms,
            fresh_ms,
        })
}

fn cidr() -> impl Strategy<Value = Short> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
        (any::<u128>(), 0u8..=128).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
    ]
    .prop_map(|s| Short::parse(&s).unwrap())
}

fn net_rule() -> impl Strategy<Value = NetRule> {
    (
        select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Any]),
        1u16..=65535,
        cidr(),
    )
        .prop_flat_map(|(protocol, port_from, cidr)| {
            (port_from..=65535).prop_map(move |port_to| NetRule {
                protocol,
                port_from,
                port_to,
                cidr: cidr.clone(),
            })
        })
}

// ---- steps ---------------------------------------------------------------------------

/// Arguments of `kind` that are valid for a step on `path`.
fn op_for(kind: StepKind, path: ResourcePath) -> BoxedStrategy<Op> {
    match kind {
        StepKind::Set => value().prop_map(|value| Op::Set(SetArgs { value })).boxed(),
        StepKind::Deploy => (short(), short())
            .prop_map(|(version, artifact)| Op::Deploy(DeployArgs { version, artifact }))
            .boxed(),
        StepKind::Scale => (0u32..=100_000)
            .prop_map(|replicas| Op::Scale(ScaleArgs { replicas }))
            .boxed(),
        StepKind::Restart => Just(Op::Restart(RestartArgs {})).boxed(),
        StepKind::Delete => reason()
            .prop_map(move |reason| {
                Op::Delete(DeleteArgs {
                    confirm: DeleteConfirm {
                        path: path.clone(),
                        reason,
                    },
                })
            })
            .boxed(),
        StepKind::Exec => (
            "/?[A-Za-z0-9_.-]{1,12}(/[A-Za-z0-9_.-]{1,12}){0,3}",
            vec(short(), 0..=6),
        )
            .prop_map(|(program, args)| {
                Op::Exec(ExecArgs {
                    program: Short::parse(&program).unwrap(),
                    args,
                })
            })
            .boxed(),
        StepKind::Grant => (id(), id())
            .prop_map(|(principal, role)| Op::Grant(GrantArgs { principal, role }))
            .boxed(),
        StepKind::Revoke => (id(), id())
            .prop_map(|(principal, role)| Op::Revoke(GrantArgs { principal, role }))
            .boxed(),
        StepKind::Network => (
            select(vec![Direction::Ingress, Direction::Egress]),
            select(vec![NetChange::Add, NetChange::Remove]),
            net_rule(),
            reason(),
            select(vec![PreflightResult::Passed, PreflightResult::Failed]),
            short(),
        )
            .prop_map(|(direction, change, rule, check, result, detail)| {
                Op::Network(NetworkArgs {
                    direction,
                    change,
                    rule,
                    preflight: Preflight { check, result, detail },
                })
            })
            .boxed(),
    }
}

fn step_kind() -> impl Strategy<Value = StepKind> {
    select(StepKind::ALL.to_vec())
}

fn step_spec() -> impl Strategy<Value = StepSpec> {
    (step_kind(), resource_path()).prop_flat_map(|(kind, path)| {
        op_for(kind, path.clone()).prop_map(move |op| StepSpec { path: path.clone(), op })
    })
}

/// A compensation that `kind` allows.
fn compensation_for(kind: StepKind) -> BoxedStrategy<Compensation> {
    let irreversible = reason().prop_map(|reason| Compensation::Irreversible { reason });
    let undo = step_spec().prop_map(Compensation::Undo);
    match kind {
        StepKind::Delete => irreversible.boxed(),
        k if !k.restorable() => prop_oneof![irreversible, undo].boxed(),
        _ => prop_oneof![Just(Compensation::Restore), irreversible, undo].boxed(),
    }
}

fn step() -> impl Strategy<Value = Step> {
    (step_kind(), resource_path()).prop_flat_map(|(kind, path)| {
        (
            id(),
            op_for(kind, path.clone()),
            prop_oneof![0.0..=1.0f64, select(vec![0.0, 1.0, 0.5])],
            compensation_for(kind),
            proptest::option::of(1..=DURATION_MS_MAX),
            proptest::option::of(verification()),
        )
            .prop_map(
                move |(id, op, confidence, compensation, timeout_ms, verification)| Step {
                    id,
                    path: path.clone(),
                    op,
                    confidence,
                    compensation,
                    timeout_ms,
                    verification,
                },
            )
    })
}

prop_compose! {
    fn intent()(
        lineage in id(),
        version in 1..=PLAN_VERSION_MAX,
        idempotency_key in proptest::option::of(id()),
        goal in text(),
        rationale in text(),
        assumptions in vec(condition(), 0..=4),
        unknowns in vec(text(), 0..=4),
        steps in vec(step(), 1..=5),
        on_conflict in select(vec![OnConflict::Reject, OnConflict::Queue]),
    ) -> Intent {
        // Step ids must be unique within a plan: prefix each with its index.
        let steps = steps
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.id = Id::parse(&format!("{i}-{}", s.id)).unwrap();
                s
            })
            .collect();
        Intent {
            protocol: PROTOCOL_VERSION,
            lineage,
            version,
            idempotency_key,
            goal,
            rationale,
            assumptions,
            unknowns,
            steps,
            on_conflict,
        }
    }
}

/// Decodes `bytes`; when they decode, encoding and decoding again must give
/// the same intent. Any panic fails the property.
fn decode_and_recheck(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(intent) = decode_intent(bytes) {
        let encoded = serde_json::to_vec(&intent).unwrap();
        if encoded.len() <= INTENT_BYTES_MAX {
            let again = decode_intent(&encoded);
            prop_assert_eq!(
                again.as_ref(),
                Ok(&intent),
                "re-encoded: {}",
                String::from_utf8_lossy(&encoded)
            );
        }
    }
    Ok(())
}

// ---- properties ------------------------------------------------------------------------

proptest! {
    // Cases: proptest's default (256), or `PROPTEST_CASES`. Failures are not
    // persisted to a regressions file: a failure prints its minimal input,
    // which belongs in `tests/decode.rs` as a plain test.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_intents_round_trip(intent in intent()) {
        prop_assert_eq!(intent.validate(), Ok(()), "the generator made an invalid intent");
        let bytes = serde_json::to_vec(&intent).unwrap();
        prop_assume!(bytes.len() <= INTENT_BYTES_MAX);
        let decoded = decode_intent(&bytes);
        prop_assert_eq!(decoded.as_ref(), Ok(&intent), "encoded: {}", String::from_utf8_lossy(&bytes));
        prop_assert_eq!(decoded.unwrap().content_hash(), intent.content_hash());
    }

    /// A child is the path its text parses to, and refused as that text is.
    #[test]
    fn a_child_is_its_parsed_text(
        parent in resource_path(),
        name in prop_oneof![segment(), "[A-Za-z0-9/. ]{0,4}", "[a-z]{200,260}"],
    ) {
        let text = format!("{parent}/{name}");
        prop_assert_eq!(parent.child(&name), ResourcePath::parse(&text));
    }

    #[test]
    fn pretty_printed_intents_decode_the_same(intent in intent()) {
        let bytes = serde_json::to_vec_pretty(&intent).unwrap();
        prop_assume!(bytes.len() <= INTENT_BYTES_MAX);
        prop_assert_eq!(decode_intent(&bytes), Ok(intent));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..1024)) {
        decode_and_recheck(&bytes)?;
    }

    #[test]
    fn mutated_encodings_never_panic(
        intent in intent(),
        edits in vec((any::<prop::sample::Index>(), 0u8..3, select(b"{}[]\",:0123456789.eE-+ntfaslue\\/ x".to_vec())), 1..8),
    ) {
        // Near-miss inputs: a valid encoding with a few bytes deleted,
        // replaced or inserted, so the decoder gets past the JSON syntax.
        let mut bytes = serde_json::to_vec(&intent).unwrap();
        for (at, how, byte) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match how {
                0 => { bytes.remove(i); }
                1 => bytes[i] = byte,
                _ => bytes.insert(i, byte),
            }
        }
        decode_and_recheck(&bytes)?;
    }

    #[test]
    fn arbitrary_json_in_any_field_never_panics(
        intent in intent(),
        pick in any::<prop::sample::Index>(),
        replacement in arbitrary_json(),
    ) {
        // Replace one node of a valid intent's JSON tree with arbitrary JSON.
        let mut doc = serde_json::to_value(&intent).unwrap();
        let mut nodes = Vec::new();
        collect_pointers(&doc, String::new(), &mut nodes);
        let target = pick.get(&nodes).clone();
        *doc.pointer_mut(&target).unwrap() = replacement;
        decode_and_recheck(&serde_json::to_vec(&doc).unwrap())?;
    }
}

fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value as J;
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::from),
        any::<u64>().prop_map(J::from),
        any::<f64>().prop_map(J::from),
        any_text(8).prop_map(J::String),
        select(vec![
            "restore",
            "undo",
            "irreversible",
            "set",
            "delete",
            "exec",
            "eq",
            "exists",
            "a/b",
            ""
        ])
        .prop_map(J::from),
    ];
    leaf.prop_recursive(10, 64, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(J::Array),
            btree_map(
                prop_oneof![
                    any_text(6),
                    select(vec![
                        "mode", "kind", "path", "args", "value", "reason", "confirm", "agent"
                    ])
                    .prop_map(String::from),
                ],
                inner,
                0..6
            )
            .prop_map(|m| J::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON pointers to every node of `doc` (the root included).
fn collect_pointers(doc: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match doc {
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_pointers(item, format!("{at}/{i}"), out);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = k.replace('~', "~0").replace('/', "~1");
                collect_pointers(v, format!("{at}/{key}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}
