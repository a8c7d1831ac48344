//! `decode_intent`: one test per limit and rule, each asserting the exact
//! field path, rule and (where the text is ours) detail of the error; and the
//! positive side: every step kind decodes, encoding round-trips, and the
//! content hash covers the steps but not the idempotency key.

use concord_proto::limits::*;
use concord_proto::{
    CmpOp, Compensation, Condition, DecodeError, DeleteArgs, DeleteConfirm, DeployArgs, Direction, ExecArgs, GrantArgs,
    Id, Intent, NetChange, NetRule, NetworkArgs, OnConflict, Op, Preflight, PreflightResult, Protocol, ResourcePath,
    RestartArgs, Rule, ScaleArgs, SetArgs, Short, Step, StepKind, StepSpec, Text, Value, Verification, decode_intent,
};
use serde_json::{Value as Json, json};

// ---- fixtures ----------------------------------------------------------------

fn intent_with(steps: Vec<Json>) -> Json {
    json!({
        "protocol": 1,
        "lineage": "raise-pool",
        "version": 1,
        "goal": "drain the queue",
        "steps": steps,
    })
}

fn set_step() -> Json {
    json!({
        "id": "s1", "kind": "set", "path": "svc/api/pool_size",
        "args": { "value": 100 }, "confidence": 0.7,
        "compensation": { "mode": "restore" }
    })
}

fn deploy_step() -> Json {
    json!({
        "id": "s2", "kind": "deploy", "path": "svc/api",
        "args": { "version": "v2.3.1", "artifact": "registry/api:v2.3.1" }, "confidence": 0.9,
        "compensation": {
            "mode": "undo", "kind": "deploy", "path": "svc/api",
            "args": { "version": "v2.3.0", "artifact": "registry/api:v2.3.0" }
        },
        "timeout_ms": 600000,
        "verification": { "path": "svc/api/health/app", "op": "eq", "value": "ok", "bake_ms": 300000, "fresh_ms": 30000 }
    })
}

fn scale_step() -> Json {
    json!({
        "id": "s3", "kind": "scale", "path": "svc/api",
        "args": { "replicas": 6 }, "confidence": 0.8,
        "compensation": { "mode": "restore" }
    })
}

fn restart_step() -> Json {
    json!({
        "id": "s4", "kind": "restart", "path": "svc/worker", "confidence": 0.6,
        "compensation": { "mode": "irreversible", "reason": "a restart cannot be taken back" }
    })
}

fn delete_step() -> Json {
    json!({
        "id": "s5", "kind": "delete", "path": "db/replica",
        "args": { "confirm": { "path": "db/replica", "reason": "replica is decommissioned" } },
        "confidence": 1.0,
        "compensation": { "mode": "irreversible", "reason": "data is gone" }
    })
}

fn exec_step() -> Json {
    json!({
        "id": "s6", "kind": "exec", "path": "db/primary",
        "args": { "program": "/usr/bin/vacuumdb", "args": ["--all", "--analyze"] },
        "confidence": 0.5,
        "compensation": { "mode": "irreversible", "reason": "vacuum cannot be undone" }
    })
}

fn grant_step() -> Json {
    json!({
        "id": "s7", "kind": "grant", "path": "db/primary",
        "args": { "principal": "agent:tuner", "role": "reader" }, "confidence": 0.9,
        "compensation": {
            "mode": "undo", "kind": "revoke", "path": "db/primary",
            "args": { "principal": "agent:tuner", "role": "reader" }
        }
    })
}

fn revoke_step() -> Json {
    json!({
        "id": "s8", "kind": "revoke", "path": "db/primary",
        "args": { "principal": "agent:old", "role": "writer" }, "confidence": 0.9,
        "compensation": { "mode": "restore" }
    })
}

fn network_step() -> Json {
    json!({
        "id": "s9", "kind": "network", "path": "net/api",
        "args": {
            "direction": "egress", "change": "add",
            "rule": { "protocol": "tcp", "port_from": 5432, "port_to": 5432, "cidr": "10.1.0.0/16" },
            "preflight": { "check": "tcp connect 10.1.2.3:5432 from svc/api", "result": "passed" }
        },
        "confidence": 0.8,
        "compensation": {
            "mode": "undo", "kind": "network", "path": "net/api",
            "args": {
                "direction": "egress", "change": "remove",
                "rule": { "protocol": "tcp", "port_from": 5432, "port_to": 5432, "cidr": "10.1.0.0/16" },
                "preflight": { "check": "none needed to remove", "result": "passed" }
            }
        }
    })
}

fn all_kinds() -> Vec<Json> {
    vec![
        set_step(),
        deploy_step(),
        scale_step(),
        restart_step(),
        delete_step(),
        exec_step(),
        grant_step(),
        revoke_step(),
        network_step(),
    ]
}

fn decode(doc: &Json) -> Result<Intent, DecodeError> {
    decode_intent(&serde_json::to_vec(doc).unwrap())
}

fn decode_ok(doc: &Json) -> Intent {
    decode(doc).unwrap_or_else(|e| panic!("expected a valid intent, got `{e}` for {doc}"))
}

/// Decodes raw bytes, expects an error at `field` for `rule`, returns it for
/// further checks on the detail.
#[track_caller]
fn expect_bytes(bytes: &[u8], field: &str, rule: Rule) -> DecodeError {
    let err = match decode_intent(bytes) {
        Ok(_) => panic!("expected {field}: {rule}, but it decoded"),
        Err(e) => e,
    };
    assert_eq!((err.field.as_str(), err.rule), (field, rule), "got `{err}`");
    err
}

#[track_caller]
fn expect(doc: &Json, field: &str, rule: Rule) -> DecodeError {
    expect_bytes(&serde_json::to_vec(doc).unwrap(), field, rule)
}

#[track_caller]
fn expect_detail(doc: &Json, field: &str, rule: Rule, detail: &str) {
    let err = expect(doc, field, rule);
    assert_eq!(err.detail, detail);
}

/// One set step, with `edit` applied to it.
fn set_with(edit: impl FnOnce(&mut Json)) -> Json {
    let mut step = set_step();
    edit(&mut step);
    intent_with(vec![step])
}

/// One step of any kind, with `edit` applied to it.
fn step_with(mut step: Json, edit: impl FnOnce(&mut Json)) -> Json {
    edit(&mut step);
    intent_with(vec![step])
}

/// The set fixture whose value is `value`.
fn set_value(value: Json) -> Json {
    set_with(|s| s["args"]["value"] = value)
}

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn path(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

fn short(s: &str) -> Short {
    Short::parse(s).unwrap()
}

// ---- payload_bytes_max ---------------------------------------------------------

#[test]
fn payload_bytes_max_counts_the_raw_bytes() {
    let mut bytes = serde_json::to_vec(&intent_with(vec![set_step()])).unwrap();
    bytes.resize(INTENT_BYTES_MAX, b' ');
    assert!(
        decode_intent(&bytes).is_ok(),
        "exactly INTENT_BYTES_MAX bytes is allowed"
    );

    bytes.push(b' ');
    let err = expect_bytes(&bytes, "", Rule::PayloadBytesMax);
    assert_eq!(err.detail, "payload is 65537 bytes; at most 65536 allowed");
}

#[test]
fn payload_bytes_max_is_checked_before_parsing() {
    // Not JSON at all: the size check still comes first.
    let bytes = vec![b'x'; INTENT_BYTES_MAX + 10];
    let err = expect_bytes(&bytes, "", Rule::PayloadBytesMax);
    assert_eq!(err.detail, "payload is 65546 bytes; at most 65536 allowed");
}

// ---- json_syntax ---------------------------------------------------------------

#[test]
fn json_syntax_bad_json() {
    let err = expect_bytes(b"{", "", Rule::JsonSyntax);
    assert_eq!(err.detail, "EOF while parsing an object at line 1 column 1");

    let err = expect_bytes(b"", "", Rule::JsonSyntax);
    assert_eq!(err.detail, "EOF while parsing a value at line 1 column 0");

    let err = expect_bytes(br#"{"protocol":1,}"#, "", Rule::JsonSyntax);
    assert_eq!(err.detail, "trailing comma at line 1 column 15");

    expect_bytes(&[0xff, 0xfe, b'{'], "", Rule::JsonSyntax);
}

#[test]
fn json_syntax_names_the_field_being_read() {
    // Truncated inside a step's id.
    let err = expect_bytes(
        br#"{"protocol":1,"lineage":"l","version":1,"goal":"g","steps":[{"id":"#,
        "steps[0].id",
        Rule::JsonSyntax,
    );
    assert_eq!(err.detail, "EOF while parsing a value at line 1 column 66");

    // Garbage after a key inside a value: the field is the value's path, with
    // no `?` segment for the key that could not be read.
    expect_bytes(
        br#"{"protocol":1,"lineage":"l","version":1,"goal":"g","steps":[{"id":"s1","kind":"set","args":{"value":{"a":1x"#,
        "steps[0].args.value",
        Rule::JsonSyntax,
    );
}

#[test]
fn json_syntax_trailing_garbage() {
    let mut bytes = serde_json::to_vec(&intent_with(vec![set_step()])).unwrap();
    let len = bytes.len();
    bytes.extend_from_slice(b" x");
    let err = expect_bytes(&bytes, "", Rule::JsonSyntax);
    assert_eq!(err.detail, format!("trailing characters at line 1 column {}", len + 2));

    // A second document is trailing garbage too.
    let one = serde_json::to_vec(&intent_with(vec![set_step()])).unwrap();
    let two = [one.clone(), one].concat();
    expect_bytes(&two, "", Rule::JsonSyntax);
}

#[test]
fn json_syntax_recursion_limit_is_an_error_not_a_crash() {
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let json = format!(
        r#"{{"protocol":1,"lineage":"l","version":1,"goal":"g","steps":[{{"id":"s1","kind":"set","path":"a","args":{{"value":{deep}}},"confidence":1,"compensation":{{"mode":"restore"}}}}]}}"#
    );
    let err = decode_intent(json.as_bytes()).unwrap_err();
    assert_eq!(err.rule, Rule::JsonSyntax);
    assert!(err.detail.starts_with("recursion limit exceeded"), "{err}");
}

// ---- required ------------------------------------------------------------------

#[test]
fn required_goal() {
    let mut doc = intent_with(vec![set_step()]);
    doc.as_object_mut().unwrap().remove("goal");
    expect_detail(&doc, "goal", Rule::Required, "missing field `goal`");
}

#[test]
fn required_delete_confirm() {
    let doc = step_with(delete_step(), |s| {
        s.as_object_mut().unwrap().remove("args");
    });
    expect_detail(&doc, "steps[0].args.confirm", Rule::Required, "missing field `confirm`");

    // An explicit empty args object is no better.
    let doc = step_with(delete_step(), |s| s["args"] = json!({}));
    expect(&doc, "steps[0].args.confirm", Rule::Required);

    let doc = step_with(delete_step(), |s| {
        s["args"]["confirm"].as_object_mut().unwrap().remove("reason");
    });
    expect_detail(
        &doc,
        "steps[0].args.confirm.reason",
        Rule::Required,
        "missing field `reason`",
    );
}

#[test]
fn required_set_value() {
    let doc = set_with(|s| s["args"] = json!({}));
    expect_detail(&doc, "steps[0].args.value", Rule::Required, "missing field `value`");
}

#[test]
fn required_names_the_step_index() {
    let mut second = scale_step();
    second.as_object_mut().unwrap().remove("confidence");
    let doc = intent_with(vec![set_step(), second]);
    expect_detail(
        &doc,
        "steps[1].confidence",
        Rule::Required,
        "missing field `confidence`",
    );
}

#[test]
fn required_compensation_fields() {
    let doc = set_with(|s| s["compensation"] = json!({}));
    expect_detail(
        &doc,
        "steps[0].compensation.mode",
        Rule::Required,
        "missing field `mode`",
    );

    let doc = set_with(|s| s["compensation"] = json!({ "mode": "irreversible" }));
    expect_detail(
        &doc,
        "steps[0].compensation.reason",
        Rule::Required,
        "missing field `reason`",
    );

    let doc = set_with(|s| s["compensation"] = json!({ "mode": "undo", "path": "svc/api/pool_size" }));
    expect_detail(
        &doc,
        "steps[0].compensation.kind",
        Rule::Required,
        "missing field `kind`",
    );

    // The undo's args are checked like a step's.
    let doc = set_with(|s| s["compensation"] = json!({ "mode": "undo", "kind": "set", "path": "svc/api/pool_size" }));
    expect_detail(
        &doc,
        "steps[0].compensation.args.value",
        Rule::Required,
        "missing field `value`",
    );
}

// ---- unknown_field -------------------------------------------------------------

#[test]
fn unknown_field_agent_at_top_level() {
    // The agent's identity comes from its NATS credentials, never the payload.
    let mut doc = intent_with(vec![set_step()]);
    doc["agent"] = json!("deployer");
    let err = expect(&doc, "agent", Rule::UnknownField);
    assert!(
        err.detail
            .starts_with("unknown field `agent`, expected one of `protocol`"),
        "{err}"
    );
}

#[test]
fn unknown_field_inside_args() {
    let doc = set_with(|s| s["args"]["force"] = json!(true));
    expect_detail(
        &doc,
        "steps[0].args.force",
        Rule::UnknownField,
        "unknown field `force`, expected `value`",
    );

    // Restart takes no arguments at all.
    let doc = step_with(restart_step(), |s| s["args"] = json!({ "graceful": true }));
    expect_detail(
        &doc,
        "steps[0].args.graceful",
        Rule::UnknownField,
        "unknown field `graceful`, there are no fields",
    );

    let doc = step_with(network_step(), |s| s["args"]["rule"]["comment"] = json!("x"));
    expect(&doc, "steps[0].args.rule.comment", Rule::UnknownField);
}

#[test]
fn unknown_field_inside_compensation() {
    let doc = step_with(deploy_step(), |s| s["compensation"]["force"] = json!(true));
    expect_detail(
        &doc,
        "steps[0].compensation.force",
        Rule::UnknownField,
        "unknown field `force`, expected one of `kind`, `path`, `args`",
    );

    let doc = set_with(|s| s["compensation"]["reason"] = json!("restore carries no reason"));
    expect_detail(
        &doc,
        "steps[0].compensation.reason",
        Rule::UnknownField,
        "unknown field `reason`, there are no fields",
    );

    let doc = step_with(delete_step(), |s| s["compensation"]["path"] = json!("db/replica"));
    expect_detail(
        &doc,
        "steps[0].compensation.path",
        Rule::UnknownField,
        "unknown field `path`, expected `reason`",
    );

    // Inside the undo's own args.
    let doc = step_with(deploy_step(), |s| s["compensation"]["args"]["force"] = json!(true));
    expect(&doc, "steps[0].compensation.args.force", Rule::UnknownField);
}

#[test]
fn unknown_field_in_step_assumption_and_verification() {
    let doc = set_with(|s| s["agent"] = json!("me"));
    expect(&doc, "steps[0].agent", Rule::UnknownField);

    let mut doc = intent_with(vec![set_step()]);
    doc["assumptions"] = json!([
        { "path": "db/primary/max_connections", "op": "ge", "value": 500 },
        { "path": "db/primary/up", "op": "exists", "note": "x" }
    ]);
    expect(&doc, "assumptions[1].note", Rule::UnknownField);

    let doc = step_with(deploy_step(), |s| s["verification"]["window_ms"] = json!(5));
    expect(&doc, "steps[0].verification.window_ms", Rule::UnknownField);
}

#[test]
fn unknown_field_duplicate_key_names_the_field() {
    let json = br#"{"protocol":1,"lineage":"l","version":1,"goal":"g","goal":"h","steps":[]}"#;
    let err = expect_bytes(json, "goal", Rule::UnknownField);
    assert_eq!(err.detail, "duplicate field `goal`");
}

// ---- type ----------------------------------------------------------------------

#[test]
fn type_mismatches() {
    let mut doc = intent_with(vec![set_step()]);
    doc["version"] = json!("1");
    expect_detail(&doc, "version", Rule::Type, "invalid type: string \"1\", expected u32");

    let doc = set_with(|s| s["path"] = json!(7));
    expect_detail(
        &doc,
        "steps[0].path",
        Rule::Type,
        "invalid type: integer `7`, expected a string",
    );

    let doc = step_with(scale_step(), |s| s["args"]["replicas"] = json!(-1));
    expect_detail(
        &doc,
        "steps[0].args.replicas",
        Rule::Type,
        "invalid value: integer `-1`, expected u32",
    );

    let doc = step_with(exec_step(), |s| s["args"]["args"] = json!(["--all", 1]));
    expect_detail(
        &doc,
        "steps[0].args.args[1]",
        Rule::Type,
        "invalid type: integer `1`, expected a string",
    );

    let doc = set_with(|s| s["compensation"] = json!("restore"));
    expect_detail(
        &doc,
        "steps[0].compensation",
        Rule::Type,
        "invalid type: string \"restore\", expected a map",
    );

    let doc = step_with(restart_step(), |s| s["compensation"]["reason"] = json!(7));
    expect(&doc, "steps[0].compensation.reason", Rule::Type);

    let doc = set_with(|s| s["confidence"] = json!("NaN"));
    expect(&doc, "steps[0].confidence", Rule::Type);

    expect_bytes(b"null", "", Rule::Type);
    expect_bytes(b"1", "", Rule::Type);
}

// ---- unknown_variant -----------------------------------------------------------

#[test]
fn unknown_variant_step_kind() {
    let doc = set_with(|s| s["kind"] = json!("drop_table"));
    let err = expect(&doc, "steps[0].kind", Rule::UnknownVariant);
    assert!(
        err.detail
            .starts_with("unknown variant `drop_table`, expected one of `set`"),
        "{err}"
    );

    let doc = step_with(deploy_step(), |s| s["compensation"]["kind"] = json!("rollback"));
    expect(&doc, "steps[0].compensation.kind", Rule::UnknownVariant);
}

#[test]
fn unknown_variant_operator_and_other_tags() {
    let mut doc = intent_with(vec![set_step()]);
    doc["assumptions"] = json!([{ "path": "db/primary/up", "op": "contains", "value": 1 }]);
    expect_detail(
        &doc,
        "assumptions[0].op",
        Rule::UnknownVariant,
        "unknown variant `contains`, expected one of `eq`, `ne`, `lt`, `le`, `gt`, `ge`, `exists`, `absent`",
    );

    let doc = step_with(deploy_step(), |s| s["verification"]["op"] = json!("=="));
    expect(&doc, "steps[0].verification.op", Rule::UnknownVariant);

    let doc = set_with(|s| s["compensation"]["mode"] = json!("retry"));
    expect_detail(
        &doc,
        "steps[0].compensation.mode",
        Rule::UnknownVariant,
        "unknown variant `retry`, expected one of `restore`, `undo`, `irreversible`",
    );

    let mut doc = intent_with(vec![set_step()]);
    doc["on_conflict"] = json!("force");
    expect(&doc, "on_conflict", Rule::UnknownVariant);

    let doc = step_with(network_step(), |s| s["args"]["direction"] = json!("sideways"));
    expect(&doc, "steps[0].args.direction", Rule::UnknownVariant);

    let doc = step_with(network_step(), |s| s["args"]["rule"]["protocol"] = json!("icmp"));
    expect(&doc, "steps[0].args.rule.protocol", Rule::UnknownVariant);
}

// ---- protocol_version ----------------------------------------------------------

#[test]
fn protocol_version() {
    let mut doc = intent_with(vec![set_step()]);
    doc["protocol"] = json!(2);
    expect_detail(
        &doc,
        "protocol",
        Rule::ProtocolVersion,
        "protocol 2 is not supported; this coordinator speaks 1",
    );
    doc["protocol"] = json!(0);
    expect(&doc, "protocol", Rule::ProtocolVersion);
}

// ---- id_syntax -----------------------------------------------------------------

#[test]
fn id_syntax() {
    let mut doc = intent_with(vec![set_step()]);
    doc["lineage"] = json!("raise pool");
    expect_detail(
        &doc,
        "lineage",
        Rule::IdSyntax,
        "character ' ' in `raise pool` is not allowed (use A-Z a-z 0-9 _ . : @ -)",
    );

    let doc = set_with(|s| s["id"] = json!(""));
    expect_detail(&doc, "steps[0].id", Rule::IdSyntax, "identifier is empty");

    let doc = step_with(grant_step(), |s| s["args"]["principal"] = json!("agent/tuner"));
    expect(&doc, "steps[0].args.principal", Rule::IdSyntax);

    let mut doc = intent_with(vec![set_step()]);
    doc["idempotency_key"] = json!("k\u{e9}y");
    expect(&doc, "idempotency_key", Rule::IdSyntax);
}

// ---- string_bytes_max ----------------------------------------------------------

#[test]
fn string_bytes_max_goal() {
    let mut doc = intent_with(vec![set_step()]);
    doc["goal"] = json!("x".repeat(TEXT_BYTES_MAX));
    assert!(decode(&doc).is_ok(), "exactly TEXT_BYTES_MAX bytes is allowed");

    doc["goal"] = json!("x".repeat(TEXT_BYTES_MAX + 1));
    expect_detail(
        &doc,
        "goal",
        Rule::StringBytesMax,
        "string is 4097 bytes; at most 4096 allowed",
    );

    // Bytes, not characters: 2049 two-byte characters are 4098 bytes.
    doc["goal"] = json!("\u{e9}".repeat(2049));
    expect_detail(
        &doc,
        "goal",
        Rule::StringBytesMax,
        "string is 4098 bytes; at most 4096 allowed",
    );
}

#[test]
fn string_bytes_max_id() {
    let mut doc = intent_with(vec![set_step()]);
    doc["lineage"] = json!("l".repeat(ID_BYTES_MAX));
    assert!(decode(&doc).is_ok(), "exactly ID_BYTES_MAX bytes is allowed");

    doc["lineage"] = json!("l".repeat(ID_BYTES_MAX + 1));
    expect_detail(
        &doc,
        "lineage",
        Rule::StringBytesMax,
        "identifier is 129 bytes; at most 128 allowed",
    );

    let doc = set_with(|s| s["id"] = json!("s".repeat(ID_BYTES_MAX + 1)));
    expect(&doc, "steps[0].id", Rule::StringBytesMax);
}

#[test]
fn string_bytes_max_short_and_text_fields() {
    let doc = step_with(deploy_step(), |s| {
        s["args"]["version"] = json!("v".repeat(STRING_BYTES_MAX + 1))
    });
    expect_detail(
        &doc,
        "steps[0].args.version",
        Rule::StringBytesMax,
        "string is 1025 bytes; at most 1024 allowed",
    );

    let mut doc = intent_with(vec![set_step()]);
    doc["unknowns"] = json!(["fine", "u".repeat(TEXT_BYTES_MAX + 1)]);
    expect(&doc, "unknowns[1]", Rule::StringBytesMax);

    let doc = step_with(restart_step(), |s| {
        s["compensation"]["reason"] = json!("r".repeat(STRING_BYTES_MAX + 1))
    });
    expect(&doc, "steps[0].compensation.reason", Rule::StringBytesMax);
}

// ---- path_syntax ---------------------------------------------------------------

#[test]
fn path_syntax_empty_segment() {
    let doc = set_with(|s| s["path"] = json!("svc//pool_size"));
    expect_detail(
        &doc,
        "steps[0].path",
        Rule::PathSyntax,
        "segment 2 of `svc//pool_size` is empty (no leading, trailing or doubled `/`)",
    );

    let doc = set_with(|s| s["path"] = json!("svc/api/"));
    expect(&doc, "steps[0].path", Rule::PathSyntax);

    let doc = set_with(|s| s["path"] = json!(""));
    expect_detail(&doc, "steps[0].path", Rule::PathSyntax, "path is empty");
}

#[test]
fn path_syntax_leading_slash() {
    let doc = set_with(|s| s["path"] = json!("/svc/api"));
    expect_detail(
        &doc,
        "steps[0].path",
        Rule::PathSyntax,
        "segment 1 of `/svc/api` is empty (no leading, trailing or doubled `/`)",
    );
}

#[test]
fn path_syntax_dot_segments() {
    let doc = set_with(|s| s["path"] = json!("svc/../db"));
    expect_detail(
        &doc,
        "steps[0].path",
        Rule::PathSyntax,
        "segment `..` of `svc/../db` is not allowed",
    );

    let doc = set_with(|s| s["path"] = json!("svc/./api"));
    expect(&doc, "steps[0].path", Rule::PathSyntax);

    // A dot inside a segment is fine.
    let doc = set_with(|s| s["path"] = json!("svc/api.v2/..x"));
    decode_ok(&doc);
}

#[test]
fn path_syntax_bad_character() {
    let doc = set_with(|s| s["path"] = json!("svc/api pool"));
    expect_detail(
        &doc,
        "steps[0].path",
        Rule::PathSyntax,
        "character ' ' in `svc/api pool` is not allowed (use A-Z a-z 0-9 _ . : -)",
    );

    let doc = set_with(|s| s["path"] = json!("svc/*"));
    expect(&doc, "steps[0].path", Rule::PathSyntax);

    // `@` is an identifier character, not a path character.
    let doc = set_with(|s| s["path"] = json!("svc/a@b"));
    expect(&doc, "steps[0].path", Rule::PathSyntax);
}

#[test]
fn path_syntax_everywhere_a_path_appears() {
    let doc = step_with(delete_step(), |s| s["args"]["confirm"]["path"] = json!("db//replica"));
    expect(&doc, "steps[0].args.confirm.path", Rule::PathSyntax);

    let doc = step_with(deploy_step(), |s| s["compensation"]["path"] = json!("svc/../api"));
    expect(&doc, "steps[0].compensation.path", Rule::PathSyntax);

    let doc = step_with(deploy_step(), |s| s["verification"]["path"] = json!("/health"));
    expect(&doc, "steps[0].verification.path", Rule::PathSyntax);

    let mut doc = intent_with(vec![set_step()]);
    doc["assumptions"] = json!([
        { "path": "db/up", "op": "exists" },
        { "path": "db up", "op": "exists" }
    ]);
    expect(&doc, "assumptions[1].path", Rule::PathSyntax);
}

// ---- path_depth_max / path_bytes_max -------------------------------------------

#[test]
fn path_depth_max() {
    let doc = set_with(|s| s["path"] = json!(vec!["a"; PATH_DEPTH_MAX].join("/")));
    decode_ok(&doc);

    let doc = set_with(|s| s["path"] = json!(vec!["a"; PATH_DEPTH_MAX + 1].join("/")));
    expect_detail(
        &doc,
        "steps[0].path",
        Rule::PathDepthMax,
        "path has 17 segments; at most 16 allowed",
    );
}

#[test]
fn path_bytes_max() {
    let doc = set_with(|s| s["path"] = json!("p".repeat(PATH_BYTES_MAX)));
    decode_ok(&doc);

    let doc = set_with(|s| s["path"] = json!("p".repeat(PATH_BYTES_MAX + 1)));
    expect_detail(
        &doc,
        "steps[0].path",
        Rule::PathBytesMax,
        "path is 257 bytes; at most 256 allowed",
    );

    // The byte limit is checked before the syntax: an oversize path with a
    // bad character is reported as too long.
    let doc = set_with(|s| s["path"] = json!(" ".repeat(PATH_BYTES_MAX + 1)));
    expect(&doc, "steps[0].path", Rule::PathBytesMax);
}

// ---- items_max / items_min -----------------------------------------------------

fn numbered_set_steps(n: usize) -> Vec<Json> {
    (0..n)
        .map(|i| {
            let mut s = set_step();
            s["id"] = json!(format!("s{i}"));
            s
        })
        .collect()
}

#[test]
fn items_max_steps() {
    decode_ok(&intent_with(numbered_set_steps(STEPS_MAX)));
    let doc = intent_with(numbered_set_steps(STEPS_MAX + 1));
    expect_detail(&doc, "steps", Rule::ItemsMax, "65 items; at most 64 allowed");
}

#[test]
fn items_max_assumptions() {
    let condition = json!({ "path": "db/primary/up", "op": "eq", "value": true });
    let mut doc = intent_with(vec![set_step()]);
    doc["assumptions"] = json!(vec![condition.clone(); ASSUMPTIONS_MAX]);
    decode_ok(&doc);
    doc["assumptions"] = json!(vec![condition; ASSUMPTIONS_MAX + 1]);
    expect_detail(&doc, "assumptions", Rule::ItemsMax, "33 items; at most 32 allowed");
}

#[test]
fn items_max_unknowns() {
    let mut doc = intent_with(vec![set_step()]);
    doc["unknowns"] = json!(vec!["is the queue backed up by the release?"; UNKNOWNS_MAX]);
    decode_ok(&doc);
    doc["unknowns"] = json!(vec!["is the queue backed up by the release?"; UNKNOWNS_MAX + 1]);
    expect_detail(&doc, "unknowns", Rule::ItemsMax, "33 items; at most 32 allowed");
}

#[test]
fn items_max_exec_args() {
    let doc = step_with(exec_step(), |s| s["args"]["args"] = json!(vec!["-v"; EXEC_ARGS_MAX]));
    decode_ok(&doc);
    let doc = step_with(exec_step(), |s| {
        s["args"]["args"] = json!(vec!["-v"; EXEC_ARGS_MAX + 1])
    });
    expect_detail(
        &doc,
        "steps[0].args.args",
        Rule::ItemsMax,
        "65 arguments; at most 64 allowed",
    );
}

#[test]
fn items_max_value_list_and_map() {
    decode_ok(&set_value(json!(vec![1; VALUE_ITEMS_MAX])));
    let doc = set_value(json!(vec![1; VALUE_ITEMS_MAX + 1]));
    expect_detail(
        &doc,
        "steps[0].args.value",
        Rule::ItemsMax,
        "list has more than 1024 items",
    );

    let map: serde_json::Map<String, Json> = (0..=VALUE_ITEMS_MAX).map(|i| (format!("k{i}"), json!(i))).collect();
    let doc = set_value(Json::Object(map));
    expect_detail(
        &doc,
        "steps[0].args.value",
        Rule::ItemsMax,
        "map has more than 1024 entries",
    );

    // In an assumption too.
    let mut doc = intent_with(vec![set_step()]);
    doc["assumptions"] = json!([{ "path": "svc/api/hosts", "op": "eq", "value": vec!["h"; VALUE_ITEMS_MAX + 1] }]);
    expect(&doc, "assumptions[0].value", Rule::ItemsMax);
}

#[test]
fn items_min_no_steps() {
    let doc = intent_with(vec![]);
    expect_detail(&doc, "steps", Rule::ItemsMin, "a plan needs at least one step");
}

// ---- value_depth_max -----------------------------------------------------------

fn nested_list(levels: usize) -> Json {
    (0..levels).fold(json!(1), |inner, _| json!([inner]))
}

#[test]
fn value_depth_max_lists() {
    decode_ok(&set_value(nested_list(VALUE_DEPTH_MAX - 1)));
    let doc = set_value(nested_list(VALUE_DEPTH_MAX));
    expect_detail(
        &doc,
        "steps[0].args.value[0][0][0][0][0][0][0]",
        Rule::ValueDepthMax,
        "value nests deeper than 8 levels",
    );
}

#[test]
fn value_depth_max_maps() {
    let nested = |levels: usize| (0..levels).fold(json!("leaf"), |inner, _| json!({ "k": inner }));
    decode_ok(&set_value(nested(VALUE_DEPTH_MAX - 1)));
    expect(
        &set_value(nested(VALUE_DEPTH_MAX)),
        "steps[0].args.value.k.k.k.k.k.k.k",
        Rule::ValueDepthMax,
    );

    let mut doc = intent_with(vec![set_step()]);
    doc["assumptions"] = json!([{ "path": "a", "op": "ne", "value": nested_list(VALUE_DEPTH_MAX) }]);
    expect(&doc, "assumptions[0].value[0][0][0][0][0][0][0]", Rule::ValueDepthMax);
}

// ---- numeric_range / not_finite ------------------------------------------------

#[test]
fn numeric_range_int_beyond_2_pow_53() {
    decode_ok(&set_value(json!(INT_ABS_MAX)));
    decode_ok(&set_value(json!(-INT_ABS_MAX)));

    let doc = set_value(json!(INT_ABS_MAX + 1));
    expect_detail(
        &doc,
        "steps[0].args.value",
        Rule::NumericRange,
        "integer 9007199254740992 is outside ±9007199254740991",
    );
    let doc = set_value(json!(-INT_ABS_MAX - 1));
    expect_detail(
        &doc,
        "steps[0].args.value",
        Rule::NumericRange,
        "integer -9007199254740992 is outside ±9007199254740991",
    );
    let doc = set_value(json!({ "pools": [1, 2, INT_ABS_MAX + 1] }));
    expect(&doc, "steps[0].args.value.pools[2]", Rule::NumericRange);
}

#[test]
fn numeric_range_u64_beyond_i64() {
    let doc = set_value(json!(u64::MAX));
    expect_detail(
        &doc,
        "steps[0].args.value",
        Rule::NumericRange,
        "integer 18446744073709551615 is outside ±9007199254740991",
    );
}

#[test]
fn numeric_range_confidence() {
    let doc = set_with(|s| s["confidence"] = json!(1.5));
    expect_detail(&doc, "steps[0].confidence", Rule::NumericRange, "1.5 is outside 0..=1");
    let doc = set_with(|s| s["confidence"] = json!(-0.1));
    expect_detail(&doc, "steps[0].confidence", Rule::NumericRange, "-0.1 is outside 0..=1");
    decode_ok(&set_with(|s| s["confidence"] = json!(0)));
    decode_ok(&set_with(|s| s["confidence"] = json!(1)));
}

#[test]
fn numeric_range_timeout() {
    let doc = set_with(|s| s["timeout_ms"] = json!(0));
    expect_detail(
        &doc,
        "steps[0].timeout_ms",
        Rule::NumericRange,
        "0 is outside 1..=86400000",
    );
    let doc = set_with(|s| s["timeout_ms"] = json!(DURATION_MS_MAX + 1));
    expect_detail(
        &doc,
        "steps[0].timeout_ms",
        Rule::NumericRange,
        "86400001 is outside 1..=86400000",
    );
    decode_ok(&set_with(|s| s["timeout_ms"] = json!(DURATION_MS_MAX)));
}

#[test]
fn numeric_range_verification_windows() {
    let doc = step_with(deploy_step(), |s| {
        s["verification"]["bake_ms"] = json!(DURATION_MS_MAX + 1)
    });
    expect_detail(
        &doc,
        "steps[0].verification.bake_ms",
        Rule::NumericRange,
        "86400001 is outside 0..=86400000",
    );
    let doc = step_with(deploy_step(), |s| {
        s["verification"]["fresh_ms"] = json!(DURATION_MS_MAX + 1)
    });
    expect(&doc, "steps[0].verification.fresh_ms", Rule::NumericRange);
}

#[test]
fn numeric_range_scale_replicas() {
    decode_ok(&step_with(scale_step(), |s| s["args"]["replicas"] = json!(100_000)));
    decode_ok(&step_with(scale_step(), |s| s["args"]["replicas"] = json!(0)));
    let doc = step_with(scale_step(), |s| s["args"]["replicas"] = json!(100_001));
    expect_detail(
        &doc,
        "steps[0].args.replicas",
        Rule::NumericRange,
        "100001 replicas is outside 0..=100000",
    );
    // In an undo, too.
    let doc = step_with(
        scale_step(),
        |s| {
            s["compensation"] =
                json!({ "mode": "undo", "kind": "scale", "path": "svc/api", "args": { "replicas": 100_001 } })
        },
    );
    expect(&doc, "steps[0].compensation.args.replicas", Rule::NumericRange);
}

#[test]
fn numeric_range_float() {
    decode_ok(&set_value(json!(FLOAT_ABS_MAX)));
    decode_ok(&set_value(json!(-FLOAT_ABS_MAX)));
    let doc = set_value(json!(1e16));
    expect_detail(
        &doc,
        "steps[0].args.value",
        Rule::NumericRange,
        "10000000000000000 is outside ±1e15",
    );
    let doc = set_value(json!(-1e16));
    expect(&doc, "steps[0].args.value", Rule::NumericRange);
}

#[test]
fn numeric_range_literal_beyond_f64() {
    // serde_json treats `1e999` as a syntax error; concord reports the range.
    let step = r#"{"id":"s1","kind":"set","path":"a","args":{"value":1e999},"confidence":1,"compensation":{"mode":"restore"}}"#;
    let json = format!(r#"{{"protocol":1,"lineage":"l","version":1,"goal":"g","steps":[{step}]}}"#);
    let err = expect_bytes(json.as_bytes(), "steps[0].args.value", Rule::NumericRange);
    assert_eq!(err.detail, "number out of range");

    let json = json.replace(r#""confidence":1,"#, r#""confidence":-1e999,"#);
    let json = json.replace("1e999}", "1}");
    expect_bytes(json.as_bytes(), "steps[0].confidence", Rule::NumericRange);
}

#[test]
fn numeric_range_plan_version() {
    let mut doc = intent_with(vec![set_step()]);
    doc["version"] = json!(0);
    expect_detail(&doc, "version", Rule::NumericRange, "version 0 is outside 1..=1000000");
    doc["version"] = json!(PLAN_VERSION_MAX + 1);
    expect(&doc, "version", Rule::NumericRange);
    doc["version"] = json!(PLAN_VERSION_MAX);
    decode_ok(&doc);
}

#[test]
fn not_finite_in_values_built_in_code() {
    // JSON cannot spell NaN, so the rule is reachable only through
    // `Intent::validate` on an intent built in code.
    assert_eq!(
        Value::Float(f64::NAN).check().map_err(|(rule, _)| rule),
        Err(Rule::NotFinite)
    );
    let mut intent = decode_ok(&intent_with(vec![set_step()]));
    intent.steps[0].op = Op::Set(SetArgs {
        value: Value::List(vec![Value::Float(f64::INFINITY)]),
    });
    let err = intent.validate().unwrap_err();
    assert_eq!((err.field.as_str(), err.rule), ("steps[0].args.value", Rule::NotFinite));
    assert_eq!(err.detail, "inf is not a finite number");
}

// ---- null_value ----------------------------------------------------------------

#[test]
fn null_value() {
    let doc = set_value(Json::Null);
    expect_detail(
        &doc,
        "steps[0].args.value",
        Rule::NullValue,
        "null is not a value; remove a path with a `delete` step",
    );
    let doc = set_value(json!({ "a": { "b": [1, null] } }));
    expect(&doc, "steps[0].args.value.a.b[1]", Rule::NullValue);

    let doc = step_with(deploy_step(), |s| s["verification"]["value"] = json!([null]));
    expect(&doc, "steps[0].verification.value[0]", Rule::NullValue);
}

// ---- duplicate_id --------------------------------------------------------------

#[test]
fn duplicate_id() {
    let mut second = scale_step();
    second["id"] = json!("s1");
    let doc = intent_with(vec![set_step(), second, deploy_step()]);
    expect_detail(&doc, "steps[1].id", Rule::DuplicateId, "step id `s1` is used twice");
}

// ---- confirmation --------------------------------------------------------------

#[test]
fn confirmation_path_must_repeat_the_step_path() {
    let doc = step_with(delete_step(), |s| s["args"]["confirm"]["path"] = json!("db/primary"));
    expect_detail(
        &doc,
        "steps[0].args.confirm.path",
        Rule::Confirmation,
        "confirmation names `db/primary` but the step deletes `db/replica`",
    );
    // A parent is not the same path.
    let doc = step_with(delete_step(), |s| s["args"]["confirm"]["path"] = json!("db"));
    expect(&doc, "steps[0].args.confirm.path", Rule::Confirmation);
}

#[test]
fn confirmation_needs_a_reason() {
    let doc = step_with(delete_step(), |s| s["args"]["confirm"]["reason"] = json!(""));
    expect_detail(
        &doc,
        "steps[0].args.confirm.reason",
        Rule::Confirmation,
        "a delete's confirmation must give a reason",
    );
    let doc = step_with(delete_step(), |s| s["args"]["confirm"]["reason"] = json!(" \t\n"));
    expect(&doc, "steps[0].args.confirm.reason", Rule::Confirmation);
}

#[test]
fn confirmation_is_checked_in_an_undo_too() {
    let doc = set_with(|s| {
        s["compensation"] = json!({
            "mode": "undo", "kind": "delete", "path": "svc/api/pool_size",
            "args": { "confirm": { "path": "svc/api", "reason": "undo the set" } }
        })
    });
    expect_detail(
        &doc,
        "steps[0].compensation.args.confirm.path",
        Rule::Confirmation,
        "confirmation names `svc/api` but the step deletes `svc/api/pool_size`",
    );
}

// ---- compensation --------------------------------------------------------------

#[test]
fn compensation_restore_refused_for_unrestorable_kinds() {
    for (step, kind) in [
        (delete_step(), "delete"),
        (exec_step(), "exec"),
        (restart_step(), "restart"),
    ] {
        let doc = step_with(step, |s| s["compensation"] = json!({ "mode": "restore" }));
        expect_detail(
            &doc,
            "steps[0].compensation.mode",
            Rule::Compensation,
            &format!(
                "a `{kind}` cannot be restored from before-values; give an `undo` step or mark it `irreversible` with a reason"
            ),
        );
    }
}

#[test]
fn compensation_undo_refused_for_delete() {
    let doc = step_with(delete_step(), |s| {
        s["compensation"] = json!({
            "mode": "undo", "kind": "set", "path": "db/replica", "args": { "value": "restored" }
        })
    });
    expect_detail(
        &doc,
        "steps[0].compensation.mode",
        Rule::Compensation,
        "a `delete` is irreversible and must say so: mode `irreversible` with a reason",
    );
}

#[test]
fn compensation_irreversible_needs_a_reason() {
    let doc = step_with(restart_step(), |s| s["compensation"]["reason"] = json!(""));
    expect_detail(
        &doc,
        "steps[0].compensation.reason",
        Rule::Compensation,
        "an irreversible step must give the reason",
    );
    let doc = step_with(delete_step(), |s| s["compensation"]["reason"] = json!("   "));
    expect(&doc, "steps[0].compensation.reason", Rule::Compensation);
}

#[test]
fn compensation_undo_for_exec_and_restart_is_allowed() {
    let doc = step_with(exec_step(), |s| {
        s["compensation"] = json!({
            "mode": "undo", "kind": "exec", "path": "db/primary",
            "args": { "program": "/usr/bin/reindexdb" }
        })
    });
    let intent = decode_ok(&doc);
    let Compensation::Undo(spec) = &intent.steps[0].compensation else {
        panic!("expected an undo, got {:?}", intent.steps[0].compensation);
    };
    assert_eq!(
        spec.op,
        Op::Exec(ExecArgs {
            program: short("/usr/bin/reindexdb"),
            args: vec![]
        })
    );
}

// ---- preflight -----------------------------------------------------------------

#[test]
fn preflight_check_must_be_named() {
    let doc = step_with(network_step(), |s| s["args"]["preflight"]["check"] = json!(""));
    expect_detail(
        &doc,
        "steps[0].args.preflight.check",
        Rule::Preflight,
        "a network change must say which connectivity check was run",
    );
    let doc = step_with(network_step(), |s| s["args"]["preflight"]["check"] = json!("  "));
    expect(&doc, "steps[0].args.preflight.check", Rule::Preflight);

    let doc = step_with(network_step(), |s| {
        s["args"].as_object_mut().unwrap().remove("preflight");
    });
    expect(&doc, "steps[0].args.preflight", Rule::Required);
}

// ---- exec_program --------------------------------------------------------------

#[test]
fn exec_program_refuses_shell_strings() {
    let doc = step_with(exec_step(), |s| s["args"]["program"] = json!("rm -rf /"));
    expect_detail(
        &doc,
        "steps[0].args.program",
        Rule::ExecProgram,
        "`rm -rf /` is not one program name: no spaces or shell characters; put arguments in `args`",
    );
    for program in ["a;b", "a|b", "$(id)", "`id`", "a&&b", "x>y", "", "~/bin/x", "a\tb"] {
        let doc = step_with(exec_step(), |s| s["args"]["program"] = json!(program));
        expect(&doc, "steps[0].args.program", Rule::ExecProgram);
    }
    // Arguments are passed as they are; shell characters there are not a shell.
    decode_ok(&step_with(exec_step(), |s| s["args"]["args"] = json!(["a;b", "$(id)"])));
}

// ---- cidr / port_range ---------------------------------------------------------

#[test]
fn cidr() {
    for cidr in ["10.0.0.0/33", "10.0.0.1", "not-a-cidr", "", "fe80::/129"] {
        let doc = step_with(network_step(), |s| s["args"]["rule"]["cidr"] = json!(cidr));
        let err = expect(&doc, "steps[0].args.rule.cidr", Rule::Cidr);
        assert_eq!(err.detail, format!("`{cidr}` is not CIDR notation such as 10.0.0.0/8"));
    }
    decode_ok(&step_with(network_step(), |s| {
        s["args"]["rule"]["cidr"] = json!("fd00::/8")
    }));
}

#[test]
fn port_range() {
    let doc = step_with(network_step(), |s| s["args"]["rule"]["port_from"] = json!(0));
    expect_detail(
        &doc,
        "steps[0].args.rule.port_from",
        Rule::PortRange,
        "ports 0..=5432 are not a range within 1..=65535",
    );
    let doc = step_with(network_step(), |s| {
        s["args"]["rule"]["port_from"] = json!(100);
        s["args"]["rule"]["port_to"] = json!(99);
    });
    expect_detail(
        &doc,
        "steps[0].args.rule.port_from",
        Rule::PortRange,
        "ports 100..=99 are not a range within 1..=65535",
    );
    decode_ok(&step_with(network_step(), |s| {
        s["args"]["rule"]["port_from"] = json!(1);
        s["args"]["rule"]["port_to"] = json!(65535);
    }));
}

// ---- assumption operators ------------------------------------------------------

#[test]
fn assumption_operators_need_or_refuse_a_value() {
    let mut doc = intent_with(vec![set_step()]);
    doc["assumptions"] = json!([
        { "path": "db/primary/up", "op": "exists" },
        { "path": "db/primary/max_connections", "op": "ge" }
    ]);
    expect_detail(
        &doc,
        "assumptions[1].value",
        Rule::Required,
        "`>=` needs a value to compare with",
    );

    doc["assumptions"] = json!([
        { "path": "db/primary/max_connections", "op": "ge", "value": 500 },
        { "path": "db/primary/up", "op": "exists", "value": true }
    ]);
    expect_detail(
        &doc,
        "assumptions[1].value",
        Rule::UnknownField,
        "`exists` takes no value",
    );

    doc["assumptions"] = json!([{ "path": "svc/old", "op": "absent", "value": 1 }]);
    expect_detail(
        &doc,
        "assumptions[0].value",
        Rule::UnknownField,
        "`absent` takes no value",
    );

    for op in ["eq", "ne", "lt", "le", "gt"] {
        doc["assumptions"] = json!([{ "path": "db/primary/max_connections", "op": op }]);
        expect(&doc, "assumptions[0].value", Rule::Required);
    }

    doc["assumptions"] = json!([
        { "path": "db/primary/up", "op": "exists" },
        { "path": "svc/old", "op": "absent" },
        { "path": "db/primary/max_connections", "op": "lt", "value": 2000 }
    ]);
    decode_ok(&doc);
}

#[test]
fn verification_operators_need_or_refuse_a_value() {
    let doc = step_with(deploy_step(), |s| {
        s["verification"].as_object_mut().unwrap().remove("value");
    });
    expect_detail(
        &doc,
        "steps[0].verification.value",
        Rule::Required,
        "`==` needs a value to compare with",
    );
    let doc = step_with(deploy_step(), |s| s["verification"]["op"] = json!("exists"));
    expect(&doc, "steps[0].verification.value", Rule::UnknownField);
}

// ---- the error's own shape -------------------------------------------------------

#[test]
fn decode_error_display_and_wire_form() {
    let doc = step_with(delete_step(), |s| {
        s.as_object_mut().unwrap().remove("args");
    });
    let err = decode(&doc).unwrap_err();
    assert_eq!(
        err.to_string(),
        "steps[0].args.confirm: required: missing field `confirm`"
    );
    assert_eq!(
        serde_json::to_value(&err).unwrap(),
        json!({ "field": "steps[0].args.confirm", "rule": "required", "detail": "missing field `confirm`" })
    );
    let whole = decode_intent(b"").unwrap_err();
    assert_eq!(
        whole.to_string(),
        "json_syntax: EOF while parsing a value at line 1 column 0"
    );
}

// ---- positive: every kind decodes ------------------------------------------------

#[test]
fn every_step_kind_decodes() {
    let intent = decode_ok(&intent_with(all_kinds()));
    let kinds: Vec<StepKind> = intent.steps.iter().map(Step::kind).collect();
    assert_eq!(kinds, StepKind::ALL.to_vec());

    let s = &intent.steps;
    assert_eq!(s[0].op, Op::Set(SetArgs { value: Value::Int(100) }));
    assert_eq!(s[0].path, path("svc/api/pool_size"));
    assert_eq!(s[0].confidence, 0.7);
    assert_eq!(s[0].compensation, Compensation::Restore);
    assert_eq!(s[0].timeout_ms, None);
    assert_eq!(s[0].verification, None);

    assert_eq!(
        s[1].op,
        Op::Deploy(DeployArgs {
            version: short("v2.3.1"),
            artifact: short("registry/api:v2.3.1")
        })
    );
    assert_eq!(
        s[1].compensation,
        Compensation::Undo(StepSpec {
            path: path("svc/api"),
            op: Op::Deploy(DeployArgs {
                version: short("v2.3.0"),
                artifact: short("registry/api:v2.3.0")
            }),
        })
    );
    assert_eq!(s[1].timeout_ms, Some(600_000));
    assert_eq!(
        s[1].verification,
        Some(Verification {
            path: path("svc/api/health/app"),
            op: CmpOp::Eq,
            value: Some(Value::Str("ok".into())),
            bake_ms: 300_000,
            fresh_ms: 30_000,
        })
    );

    assert_eq!(s[2].op, Op::Scale(ScaleArgs { replicas: 6 }));
    assert_eq!(s[3].op, Op::Restart(RestartArgs {}));
    assert_eq!(
        s[3].compensation,
        Compensation::Irreversible {
            reason: short("a restart cannot be taken back")
        }
    );
    assert_eq!(
        s[4].op,
        Op::Delete(DeleteArgs {
            confirm: DeleteConfirm {
                path: path("db/replica"),
                reason: short("replica is decommissioned")
            },
        })
    );
    assert_eq!(
        s[5].op,
        Op::Exec(ExecArgs {
            program: short("/usr/bin/vacuumdb"),
            args: vec![short("--all"), short("--analyze")]
        })
    );
    let tuner_reader = GrantArgs {
        principal: id("agent:tuner"),
        role: id("reader"),
    };
    assert_eq!(s[6].op, Op::Grant(tuner_reader.clone()));
    assert_eq!(
        s[6].compensation,
        Compensation::Undo(StepSpec {
            path: path("db/primary"),
            op: Op::Revoke(tuner_reader)
        })
    );
    assert_eq!(
        s[7].op,
        Op::Revoke(GrantArgs {
            principal: id("agent:old"),
            role: id("writer")
        })
    );
    assert_eq!(
        s[8].op,
        Op::Network(NetworkArgs {
            direction: Direction::Egress,
            change: NetChange::Add,
            rule: NetRule {
                protocol: Protocol::Tcp,
                port_from: 5432,
                port_to: 5432,
                cidr: short("10.1.0.0/16")
            },
            preflight: Preflight {
                check: short("tcp connect 10.1.2.3:5432 from svc/api"),
                result: PreflightResult::Passed,
                detail: short(""),
            },
        })
    );
}

#[test]
fn each_step_kind_decodes_alone() {
    for (step, kind) in all_kinds().into_iter().zip(StepKind::ALL) {
        let intent = decode_ok(&intent_with(vec![step]));
        assert_eq!(intent.steps.len(), 1);
        assert_eq!(intent.steps[0].kind(), kind);
    }
}

#[test]
fn top_level_defaults_and_optional_fields() {
    let intent = decode_ok(&intent_with(vec![set_step()]));
    assert_eq!(intent.protocol, PROTOCOL_VERSION);
    assert_eq!(intent.lineage, id("raise-pool"));
    assert_eq!(intent.version, 1);
    assert_eq!(intent.idempotency_key, None);
    assert_eq!(intent.goal, Text::parse("drain the queue").unwrap());
    assert_eq!(intent.rationale, Text::default());
    assert!(intent.assumptions.is_empty());
    assert!(intent.unknowns.is_empty());
    assert_eq!(intent.on_conflict, OnConflict::Reject);

    let mut doc = intent_with(vec![set_step()]);
    doc["idempotency_key"] = json!("req-42");
    doc["rationale"] = json!("queue depth tracks pool size");
    doc["assumptions"] = json!([{ "path": "db/primary/max_connections", "op": "ge", "value": 500 }]);
    doc["unknowns"] = json!(["why the queue grew"]);
    doc["on_conflict"] = json!("queue");
    let intent = decode_ok(&doc);
    assert_eq!(intent.idempotency_key, Some(id("req-42")));
    assert_eq!(intent.rationale.as_str(), "queue depth tracks pool size");
    assert_eq!(
        intent.assumptions,
        vec![Condition {
            path: path("db/primary/max_connections"),
            op: CmpOp::Ge,
            value: Some(Value::Int(500))
        }]
    );
    assert_eq!(intent.unknowns, vec![Text::parse("why the queue grew").unwrap()]);
    assert_eq!(intent.on_conflict, OnConflict::Queue);
}

#[test]
fn values_of_every_shape_decode() {
    let intent = decode_ok(&set_value(json!({
        "b": true, "i": -3, "f": 2.5, "s": "x", "l": [1, "two"], "m": { "k": [] }
    })));
    let Op::Set(SetArgs { value: Value::Map(m) }) = &intent.steps[0].op else {
        panic!("expected a map value, got {:?}", intent.steps[0].op);
    };
    assert_eq!(m["b"], Value::Bool(true));
    assert_eq!(m["i"], Value::Int(-3));
    assert_eq!(m["f"], Value::Float(2.5));
    assert_eq!(m["s"], Value::Str("x".into()));
    assert_eq!(m["l"], Value::List(vec![Value::Int(1), Value::Str("two".into())]));
    assert_eq!(m["m"], Value::Map([("k".to_string(), Value::List(vec![]))].into()));
    // `2.0` stays a float, `2` stays an int.
    assert_eq!(
        decode_ok(&set_value(json!(2.0))).steps[0].op,
        Op::Set(SetArgs {
            value: Value::Float(2.0)
        })
    );
    assert_eq!(
        decode_ok(&set_value(json!(2))).steps[0].op,
        Op::Set(SetArgs { value: Value::Int(2) })
    );
}

// ---- positive: round trip and content hash ---------------------------------------

fn full_intent() -> Intent {
    let mut doc = intent_with(all_kinds());
    doc["idempotency_key"] = json!("req-42");
    doc["rationale"] = json!("every kind at once");
    doc["assumptions"] = json!([
        { "path": "db/primary/max_connections", "op": "ge", "value": 500 },
        { "path": "svc/old", "op": "absent" }
    ]);
    doc["unknowns"] = json!(["whether the replica still serves reads"]);
    doc["on_conflict"] = json!("queue");
    decode_ok(&doc)
}

#[test]
fn serialize_then_decode_round_trips() {
    let intent = full_intent();
    let bytes = serde_json::to_vec(&intent).unwrap();
    let again = decode_intent(&bytes).unwrap();
    assert_eq!(again, intent);
    // The encoding is canonical: encoding the decoded copy gives the same bytes.
    assert_eq!(serde_json::to_vec(&again).unwrap(), bytes);
}

#[test]
fn round_trip_of_an_intent_built_in_code() {
    let intent = Intent {
        protocol: PROTOCOL_VERSION,
        lineage: id("built"),
        version: 7,
        idempotency_key: None,
        goal: Text::parse("built in code").unwrap(),
        rationale: Text::default(),
        assumptions: vec![],
        unknowns: vec![],
        steps: vec![Step {
            id: id("only"),
            path: path("svc/api/flags"),
            op: Op::Set(SetArgs {
                value: Value::List(vec![
                    Value::Float(1.0),
                    Value::Float(-0.5),
                    Value::Int(0),
                    Value::Str("".into()),
                ]),
            }),
            confidence: 0.25,
            compensation: Compensation::Restore,
            timeout_ms: Some(1),
            verification: None,
        }],
        on_conflict: OnConflict::Reject,
    };
    intent.validate().unwrap();
    let again = decode_intent(&serde_json::to_vec(&intent).unwrap()).unwrap();
    assert_eq!(again, intent);
}

#[test]
fn floats_round_trip_exactly() {
    // Found by `props.rs`: without serde_json's `float_roundtrip` feature the
    // parser's fast path reads 0.9553427416275435 as 0.9553427416275436, so a
    // re-encoded plan differed from the one the agent sent (and so did its
    // content hash).
    for f in [
        0.9553427416275435_f64,
        -3.151006420091884e-201,
        957323934352701.9,
        5e-324,
        0.1,
        1e15,
    ] {
        let confidence = f.abs().min(1.0);
        let doc = set_with(|s| {
            s["confidence"] = json!(confidence);
            s["args"]["value"] = json!([f]);
        });
        let step = &decode_ok(&doc).steps[0];
        assert_eq!(
            step.confidence.to_bits(),
            confidence.to_bits(),
            "confidence {confidence}"
        );
        assert_eq!(
            step.op,
            Op::Set(SetArgs {
                value: Value::List(vec![Value::Float(f)])
            }),
            "value {f}"
        );
    }
}

#[test]
fn content_hash_ignores_the_idempotency_key() {
    let intent = full_intent();
    let hash = intent.content_hash();
    assert_eq!(hash.len(), 64);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{hash}");

    let mut other_key = intent.clone();
    other_key.idempotency_key = Some(id("req-43"));
    assert_eq!(other_key.content_hash(), hash);

    let mut no_key = intent.clone();
    no_key.idempotency_key = None;
    assert_eq!(no_key.content_hash(), hash);

    // Stable across a round trip through the wire.
    let again = decode_intent(&serde_json::to_vec(&intent).unwrap()).unwrap();
    assert_eq!(again.content_hash(), hash);
}

/// A named change to an intent.
type Edit = (&'static str, Box<dyn Fn(&mut Intent)>);

#[test]
fn content_hash_changes_when_any_step_changes() {
    let intent = full_intent();
    let hash = intent.content_hash();
    let edits: Vec<Edit> = vec![
        (
            "set value",
            Box::new(|i| i.steps[0].op = Op::Set(SetArgs { value: Value::Int(101) })),
        ),
        (
            "int vs float",
            Box::new(|i| {
                i.steps[0].op = Op::Set(SetArgs {
                    value: Value::Float(100.0),
                })
            }),
        ),
        ("step id", Box::new(|i| i.steps[0].id = id("s1b"))),
        ("step path", Box::new(|i| i.steps[0].path = path("svc/api/pool"))),
        ("confidence", Box::new(|i| i.steps[0].confidence = 0.71)),
        (
            "compensation",
            Box::new(|i| i.steps[0].compensation = Compensation::Irreversible { reason: short("r") }),
        ),
        ("timeout", Box::new(|i| i.steps[1].timeout_ms = Some(600_001))),
        ("verification", Box::new(|i| i.steps[1].verification = None)),
        (
            "bake",
            Box::new(|i| i.steps[1].verification.as_mut().unwrap().bake_ms += 1),
        ),
        (
            "replicas",
            Box::new(|i| i.steps[2].op = Op::Scale(ScaleArgs { replicas: 7 })),
        ),
        (
            "undo args",
            Box::new(|i| {
                if let Compensation::Undo(spec) = &mut i.steps[1].compensation {
                    spec.op = Op::Deploy(DeployArgs {
                        version: short("v2.2.9"),
                        artifact: short("registry/api:v2.2.9"),
                    });
                }
            }),
        ),
        (
            "exec args",
            Box::new(|i| {
                i.steps[5].op = Op::Exec(ExecArgs {
                    program: short("/usr/bin/vacuumdb"),
                    args: vec![],
                })
            }),
        ),
        ("order", Box::new(|i| i.steps.swap(0, 1))),
        ("removed", Box::new(|i| drop(i.steps.pop()))),
        ("goal", Box::new(|i| i.goal = Text::parse("another goal").unwrap())),
        ("version", Box::new(|i| i.version = 2)),
        (
            "assumption",
            Box::new(|i| i.assumptions[0].value = Some(Value::Int(501))),
        ),
    ];
    for (what, edit) in edits {
        let mut changed = intent.clone();
        edit(&mut changed);
        assert_ne!(changed, intent, "{what}: the edit changed nothing");
        assert_ne!(changed.content_hash(), hash, "{what}: the hash did not change");
    }
}

#[test]
fn validate_rechecks_steps_built_in_code() {
    let json = br#"{"protocol":1,"lineage":"l","version":1,"goal":"g","steps":[
        {"id":"s1","kind":"set","path":"a/b","args":{"value":1},"confidence":0.5,"compensation":{"mode":"restore"}}]}"#;
    let good = concord_proto::decode_intent(json).unwrap();
    let mut nan = good.clone();
    nan.steps[0].confidence = f64::NAN;
    let e = nan.validate().unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("steps[0].confidence", concord_proto::Rule::NotFinite)
    );
    let mut slow = good.clone();
    slow.steps[0].timeout_ms = Some(0);
    let e = slow.validate().unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("steps[0].timeout_ms", concord_proto::Rule::NumericRange)
    );
    let mut restart = good.clone();
    restart.steps[0].op = concord_proto::Op::Restart(concord_proto::RestartArgs {});
    let e = restart.validate().unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.rule),
        ("steps[0].compensation.mode", concord_proto::Rule::Compensation)
    );
}
