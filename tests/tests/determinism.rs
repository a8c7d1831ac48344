//! The same plan gives the same bytes in two separate processes. Within one
//! process a `HashMap` iterates the same way twice; across processes its seed
//! differs, so only this comparison catches hash-order leaks into previews.

use concord_tests::{EXAMPLES, Example, check, example};

fn assert_same_bytes(e: &Example, extra: &[&str]) {
    let first = check(e, extra);
    let second = check(e, extra);
    assert_eq!(first.code, second.code, "{} {extra:?}: exit code", e.name);
    assert!(!first.stdout.is_empty(), "{} {extra:?}: empty output", e.name);
    assert!(
        first.stdout == second.stdout,
        "{} {extra:?}: two processes printed different reports\n--- first\n{}\n--- second\n{}",
        e.name,
        first.stdout,
        second.stdout
    );
}

#[test]
fn json_previews_are_byte_identical_across_processes() {
    for e in &EXAMPLES {
        assert_same_bytes(e, &["--json"]);
    }
}

#[test]
fn text_reports_are_byte_identical_across_processes() {
    for e in &EXAMPLES {
        assert_same_bytes(e, &[]);
    }
}

#[test]
fn other_agents_give_byte_identical_previews_too() {
    for agent in ["newcomer", "metrics"] {
        let e = Example {
            agent,
            ..example("pool-60")
        };
        assert_same_bytes(&e, &["--json"]);
    }
}

#[test]
fn previews_carry_their_shape_and_core_version() {
    for e in &EXAMPLES {
        let p = check(e, &["--json"]).json();
        assert_eq!(p["preview_version"], 1, "{}", e.name);
        assert_eq!(
            concord_proto::preview::PREVIEW_VERSION,
            1,
            "the preview's shape changed: update the tests and the schema"
        );
        assert_eq!(
            p["core_version"],
            concord_core::preview::CORE_VERSION,
            "{}: core_version",
            e.name
        );
        let hash = p["policy_hash"].as_str().expect("policy_hash");
        assert!(
            hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{}: policy_hash {hash}",
            e.name
        );
        let plan_hash = p["plan"]["hash"].as_str().expect("plan.hash");
        assert_eq!(plan_hash.len(), 64, "{}: plan.hash {plan_hash}", e.name);
    }
}

#[test]
fn the_idempotency_key_is_not_part_of_the_plan_hash() {
    // seven-days-pool-500 carries an idempotency key; the same plan without it
    // must hash the same (an approval binds to the content, not the request).
    let root = concord_tests::workspace_root();
    let text =
        std::fs::read_to_string(root.join("config/examples/seven-days-pool-500.json")).expect("reading the plan");
    let mut plan: serde_json::Value = serde_json::from_str(&text).expect("the plan is JSON");
    assert!(
        plan.as_object_mut()
            .expect("an object")
            .remove("idempotency_key")
            .is_some()
    );
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("determinism-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    let path = dir.join("no-key.json");
    std::fs::write(&path, serde_json::to_string(&plan).expect("serializing")).expect("writing");

    let with_key = check(&example("seven-days-pool-500"), &["--json"]).json();
    let without = concord_tests::concord([
        "check".as_ref(),
        path.as_os_str(),
        "--agent".as_ref(),
        "resource".as_ref(),
        "--world".as_ref(),
        concord_tests::WORLD.as_ref(),
        "--json".as_ref(),
    ]);
    assert_eq!(without.code, 3, "{without:?}");
    assert_eq!(without.json(), with_key);
}
