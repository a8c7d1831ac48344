//! The committed JSON Schemas in `schema/` are what `concord schema` prints
//! today, the example plans validate against the intent schema, and every
//! preview `concord check --json` prints validates against the preview schema.

use concord_tests::schema::validate;
use concord_tests::{EXAMPLES, Example, check, concord, example, workspace_root};
use serde_json::Value;

/// `(argument of concord schema, committed file)`.
const SCHEMAS: [(&str, &str); 7] = [
    ("intent", "schema/intent.schema.json"),
    ("preview", "schema/preview.schema.json"),
    ("decode-error", "schema/decode-error.schema.json"),
    ("observation", "schema/observation.schema.json"),
    ("decision", "schema/decision.schema.json"),
    ("error-reply", "schema/error-reply.schema.json"),
    ("notice", "schema/notice.schema.json"),
];

fn committed(file: &str) -> Value {
    let path = workspace_root().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn read_example(e: &Example) -> Value {
    let path = workspace_root().join(e.plan());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

#[test]
fn committed_schemas_are_current() {
    for (which, file) in SCHEMAS {
        let run = concord(["schema", which]);
        assert_eq!(run.code, 0, "concord schema {which}: {run:?}");
        let on_disk = std::fs::read_to_string(workspace_root().join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}; create it with the command below"));
        assert!(
            on_disk == run.stdout,
            "{file} is not what `concord schema {which}` prints today. If the change is meant, regenerate it:\n\n    \
             cargo run -q -p concord-cli -- schema {which} > {file}\n\nand review the diff: agents in other languages validate against it."
        );
    }
}

#[test]
fn intent_schema_is_strict_at_the_top() {
    let schema = committed("schema/intent.schema.json");
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert_eq!(schema["type"], "object");
    assert_eq!(
        schema["additionalProperties"], false,
        "requests are strict: unknown fields are refused"
    );
    let required: Vec<&str> = schema["required"]
        .as_array()
        .expect("required is a list")
        .iter()
        .map(|v| v.as_str().expect("a field name"))
        .collect();
    for field in ["protocol", "lineage", "version", "goal", "steps"] {
        assert!(required.contains(&field), "`{field}` is not required: {required:?}");
    }
    assert_eq!(required.len(), 5, "{required:?}");
}

#[test]
fn intent_schema_has_one_branch_per_step_kind() {
    let schema = committed("schema/intent.schema.json");
    let kinds: Vec<&str> = schema["$defs"]["Step"]["oneOf"]
        .as_array()
        .expect("Step is a oneOf")
        .iter()
        .map(|b| b["properties"]["kind"]["const"].as_str().expect("a branch per kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "set", "deploy", "scale", "restart", "delete", "exec", "grant", "revoke", "network"
        ]
    );
    // A delete cannot be expressed without its confirmation, nor restored.
    let delete = &schema["$defs"]["DeleteArgs"];
    assert_eq!(delete["required"], serde_json::json!(["confirm"]));
    let delete_branch = &schema["$defs"]["Step"]["oneOf"][4];
    assert_eq!(
        delete_branch["properties"]["compensation"]["properties"]["mode"]["const"],
        "irreversible"
    );
}

/// restart-api is left out: see `restart_without_args_validates`.
#[test]
fn example_plans_validate_against_the_intent_schema() {
    let schema = committed("schema/intent.schema.json");
    for e in EXAMPLES.iter().filter(|e| e.name != "restart-api") {
        let errors = validate(&schema, &read_example(e));
        assert!(
            errors.is_empty(),
            "{} breaks the intent schema:\n{}",
            e.plan(),
            errors.join("\n")
        );
    }
}

/// The decoder accepts a `restart` step without `args` (they default to `{}`)
/// and config/examples/restart-api.json has none, but the schema requires
/// `args` on every step: an agent that validates against the schema refuses
/// a plan the coordinator accepts.
#[test]

fn restart_without_args_validates() {
    let schema = committed("schema/intent.schema.json");
    let errors = validate(&schema, &read_example(&example("restart-api")));
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// A change to a valid plan.
type Edit = fn(&mut Value);

#[test]
fn the_intent_schema_refuses_what_the_decoder_refuses() {
    let schema = committed("schema/intent.schema.json");
    let base = read_example(&example("pool-60"));
    let cases: [(&str, Edit); 5] = [
        ("unknown top-level field", |p| {
            p["agent"] = "resource".into();
        }),
        ("missing goal", |p| {
            p.as_object_mut().expect("object").remove("goal");
        }),
        ("unknown step kind", |p| {
            p["steps"][0]["kind"] = "reboot".into();
        }),
        ("delete without confirmation", |p| {
            p["steps"][0] = serde_json::json!({
                "id": "s1", "kind": "delete", "path": "db/replica", "confidence": 1.0,
                "compensation": { "mode": "irreversible", "reason": "data is gone" }
            });
        }),
        ("path with an empty segment", |p| {
            p["steps"][0]["path"] = "svc//pool_size".into();
        }),
    ];
    for (what, edit) in cases {
        let mut plan = base.clone();
        edit(&mut plan);
        let bytes = serde_json::to_vec(&plan).expect("serializing");
        assert!(
            concord_proto::decode_intent(&bytes).is_err(),
            "the decoder accepts a plan with {what}"
        );
        assert!(
            !validate(&schema, &plan).is_empty(),
            "the schema accepts a plan with {what}"
        );
    }
    assert!(validate(&schema, &base).is_empty(), "the unedited plan is valid");
}

#[test]
fn every_preview_validates_against_the_preview_schema() {
    let schema = committed("schema/preview.schema.json");
    let others = ["newcomer", "metrics"].map(|agent| Example {
        agent,
        ..example("pool-60")
    });
    for e in EXAMPLES.iter().chain(&others) {
        let preview = check(e, &["--json"]).json();
        let errors = validate(&schema, &preview);
        assert!(
            errors.is_empty(),
            "the preview of {} as `{}` breaks the preview schema:\n{}",
            e.name,
            e.agent,
            errors.join("\n")
        );
    }
}

#[test]
fn decode_errors_validate_against_the_decode_error_schema() {
    let schema = committed("schema/decode-error.schema.json");
    let bad = br#"{
      "protocol": 1, "lineage": "cleanup", "version": 1, "goal": "tidy",
      "steps": [{ "id": "s1", "kind": "delete", "path": "db/replica", "confidence": 1.0,
                  "compensation": { "mode": "irreversible", "reason": "data is gone" } }]
    }"#;
    let err = concord_proto::decode_intent(bad).expect_err("a delete needs its confirmation");
    let reply = serde_json::to_value(&err).expect("a decode error serializes");
    assert_eq!(reply["field"], "steps[0].args.confirm");
    assert_eq!(reply["rule"], "required");
    let errors = validate(&schema, &reply);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let mut wrong = reply.clone();
    wrong["rule"] = "no_such_rule".into();
    assert!(!validate(&schema, &wrong).is_empty(), "the schema names every rule");
}
