//! `concord check` on the example plans: the real binary, its exit code, and
//! the fields of its `--json` preview (verdict, reasons, invariants with their
//! state and figures, the diff, the plan diff).

use std::path::PathBuf;

use concord_tests::{EXAMPLES, EXAMPLES_DIR, Example, Run, WORLD, check, concord, example};
use serde_json::{Value, json};

/// Runs an example in both modes, asserts both exit with `code`, and returns the JSON preview.
fn preview(e: &Example, code: i32) -> Value {
    let text = check(e, &[]);
    assert_eq!(
        text.code, code,
        "`concord check` of {} as `{}`: exit code\n{}{}",
        e.name, e.agent, text.stdout, text.stderr
    );
    let json = check(e, &["--json"]);
    assert_eq!(json.code, code, "`--json` changed the exit code of {}", e.name);
    assert_eq!(json.stderr, "", "{} printed to stderr", e.name);
    json.json()
}

/// `(rule, outcome)` of every reason, in the order given.
fn reasons(p: &Value) -> Vec<(String, String)> {
    p["reasons"]
        .as_array()
        .expect("reasons is a list")
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().expect("reason.rule").to_string(),
                r["outcome"].as_str().expect("reason.outcome").to_string(),
            )
        })
        .collect()
}

fn reason_rules(p: &Value) -> Vec<String> {
    reasons(p).into_iter().map(|(rule, _)| rule).collect()
}

/// The invariant with this id; panics if the preview has none.
fn invariant<'a>(p: &'a Value, id: &str) -> &'a Value {
    p["invariants"]
        .as_array()
        .expect("invariants is a list")
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no invariant `{id}` in the preview"))
}

/// Ids of the invariants with this status.
fn with_status(p: &Value, status: &str) -> Vec<String> {
    p["invariants"]
        .as_array()
        .expect("invariants is a list")
        .iter()
        .filter(|r| r["status"] == status)
        .map(|r| r["id"].as_str().expect("invariant id").to_string())
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// A file under Cargo's scratch directory for integration tests.
fn scratch(name: &str, contents: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("check_cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("writing a scratch file");
    path
}

#[test]
fn the_example_table_covers_every_example_plan() {
    let dir = concord_tests::workspace_root().join(EXAMPLES_DIR);
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("reading config/examples")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| p.file_stem().expect("a file name").to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = EXAMPLES.iter().map(|e| e.name.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "config/examples and concord_tests::EXAMPLES disagree: add the new example (and its tests)"
    );
}

#[test]
fn seven_days_pool_500_is_rejected_for_coupling_ceiling_and_rate() {
    let p = preview(&example("seven-days-pool-500"), 3);
    assert_eq!(p["verdict"], "reject");
    assert_eq!(p["plan"]["agent"], "resource");
    assert_eq!(p["plan"]["lineage"], "resource-drain-queue");
    assert_eq!(p["plan"]["version"], 1);
    // Most severe first, then by rule id.
    assert_eq!(
        reasons(&p),
        pairs(&[
            ("coupling.db_connections", "reject"),
            ("ceiling.pool_size", "needs_approval"),
            ("rate.pool_size", "needs_approval"),
        ])
    );

    // 500 x 4 (api) + 20 x 2 (worker) + 20 x 2 (billing) = 2080 > 80% of 1000.
    let coupling = invariant(&p, "coupling.db_connections");
    assert_eq!(coupling["status"], "fail");
    assert_eq!(coupling["outcome"], "reject");
    assert_eq!(coupling["at"], "after step raise-pool");
    assert_eq!(coupling["pre_existing"], false);
    assert_eq!(coupling["figures"], json!({ "connections": 2080, "budget": 800.0 }));

    // 500 is above the approval ceiling (200) but under the reject ceiling (1000).
    let ceiling = invariant(&p, "ceiling.pool_size");
    assert_eq!(ceiling["status"], "fail");
    assert_eq!(ceiling["outcome"], "needs_approval");
    assert_eq!(ceiling["at"], "after step raise-pool");
    assert_eq!(ceiling["figures"]["value"], 500);
    assert_eq!(ceiling["figures"]["before"], 50);
    assert_eq!(ceiling["figures"]["approve_above"], 200.0);
    assert_eq!(ceiling["figures"]["reject_above"], 1000.0);

    let rate = invariant(&p, "rate.pool_size");
    assert_eq!(rate["status"], "fail");
    assert_eq!(rate["figures"]["factor"], 10.0);
    assert_eq!(rate["figures"]["max_factor"], 2.0);

    assert_eq!(
        with_status(&p, "fail"),
        ["ceiling.pool_size", "rate.pool_size", "coupling.db_connections"]
    );
    assert_eq!(with_status(&p, "error"), Vec::<String>::new());

    assert_eq!(
        p["diff"],
        json!([{ "path": "svc/api/pool_size", "before": 50, "after": 500, "step": "raise-pool" }])
    );
    assert_eq!(p["compensation"][0]["mode"], "restore");
    assert_eq!(
        p["compensation"][0]["changes"],
        json!([{ "path": "svc/api/pool_size", "before": 500, "after": 50, "step": "raise-pool" }])
    );
    assert_eq!(p["assumptions"][0]["held"], true);
    assert_eq!(
        p["unknowns"],
        json!(["whether the queue is caused by the pool or by the release deployed this morning"])
    );
    assert_eq!(p["plan_diff"], Value::Null);
}

#[test]
fn pool_60_is_admitted() {
    let p = preview(&example("pool-60"), 0);
    assert_eq!(p["verdict"], "admit");
    assert_eq!(p["reasons"], json!([]));
    assert_eq!(with_status(&p, "fail"), Vec::<String>::new());
    assert_eq!(with_status(&p, "error"), Vec::<String>::new());
    assert_eq!(
        p["diff"],
        json!([{ "path": "svc/api/pool_size", "before": 50, "after": 60, "step": "nudge-pool" }])
    );
    let coupling = invariant(&p, "coupling.db_connections");
    assert_eq!(coupling["status"], "pass");
    assert_eq!(coupling["at"], Value::Null);
    // A passing rule's figures describe the plan's final state (not the
    // rollback state, which is the world before): 60 x 4 + 20 x 2 + 20 x 2.
    assert_eq!(coupling["figures"], json!({ "connections": 320, "budget": 800.0 }));
    assert_eq!(invariant(&p, "ceiling.pool_size")["status"], "pass");
    assert_eq!(invariant(&p, "rate.pool_size")["status"], "pass");
    assert_eq!(invariant(&p, "ceiling.replicas")["status"], "skipped");
}

#[test]
fn rebalance_prefix_is_rejected_for_the_state_after_its_first_step() {
    let p = preview(&example("rebalance-prefix"), 3);
    assert_eq!(p["verdict"], "reject");
    assert_eq!(reasons(&p), pairs(&[("coupling.db_connections", "reject")]));
    // The final state is within budget (20 x 25 + 80 = 580), but after the
    // first step api runs 20 replicas with the old pool of 50: 1000 + 80.
    let coupling = invariant(&p, "coupling.db_connections");
    assert_eq!(coupling["status"], "fail");
    assert_eq!(coupling["at"], "after step more-replicas");
    assert_eq!(coupling["figures"], json!({ "connections": 1080, "budget": 800.0 }));
    assert_eq!(
        p["diff"],
        json!([
            { "path": "svc/api/pool_size", "before": 50, "after": 25, "step": "smaller-pool" },
            { "path": "svc/api/replicas", "before": 4, "after": 20, "step": "more-replicas" },
        ])
    );
    assert_eq!(invariant(&p, "ceiling.replicas")["status"], "pass");
    assert_eq!(invariant(&p, "rate.pool_size")["status"], "pass");
    // Compensation runs in reverse order.
    let undone: Vec<&Value> = p["compensation"]
        .as_array()
        .expect("compensation")
        .iter()
        .map(|c| &c["step"])
        .collect();
    assert_eq!(undone, [&json!("smaller-pool"), &json!("more-replicas")]);
}

#[test]
fn deploy_v1_is_admitted() {
    let p = preview(&example("deploy-v1"), 0);
    assert_eq!(p["verdict"], "admit");
    assert_eq!(p["reasons"], json!([]));
    assert_eq!(
        p["diff"],
        json!([
            { "path": "svc/api/artifact", "before": "registry/api:v1.4.0", "after": "registry/api:v1.5.0", "step": "deploy" },
            { "path": "svc/api/version", "before": "v1.4.0", "after": "v1.5.0", "step": "deploy" },
        ])
    );
    assert_eq!(invariant(&p, "deploy.artifacts")["status"], "pass");
    assert_eq!(
        p["assumptions"],
        json!([{ "path": "svc/api/version", "op": "eq", "expected": "v1.4.0", "actual": "v1.4.0", "held": true }])
    );
    assert_eq!(p["plan_diff"], Value::Null);
}

#[test]
fn deploy_v2_grants_widens_the_scope_of_v1_and_is_rejected() {
    let v1 = preview(&example("deploy-v1"), 0);
    let p = preview(&example("deploy-v2-grants"), 3);
    assert_eq!(p["verdict"], "reject");
    assert_eq!(
        reasons(&p),
        pairs(&[
            ("agent.allowlist", "reject"),
            ("permissions.no_increase", "reject"),
            ("confidence.destructive", "needs_approval"),
            ("replan.scope_expansion", "needs_approval"),
        ])
    );

    let d = &p["plan_diff"];
    assert_eq!(d["previous_version"], 1);
    assert_eq!(
        d["previous_hash"], v1["plan"]["hash"],
        "the plan diff names v1's content hash"
    );
    assert_eq!(d["added"], json!(["grant-admin"]));
    assert_eq!(d["removed"], json!([]));
    assert_eq!(
        d["changed"],
        json!([{ "step": "deploy", "fields": ["args", "confidence"] }])
    );
    let kinds: Vec<&str> = d["scope_expansion"]
        .as_array()
        .expect("scope_expansion")
        .iter()
        .map(|e| e["kind"].as_str().expect("expansion kind"))
        .collect();
    assert!(kinds.contains(&"new_grant"), "{kinds:?}");
    assert!(kinds.contains(&"new_kind"), "{kinds:?}");
    assert_eq!(kinds, ["new_path", "new_kind", "destructive", "new_grant"]);
    assert!(
        d["scope_expansion"]
            .as_array()
            .expect("scope_expansion")
            .iter()
            .all(|e| e["step"] == "grant-admin")
    );

    let grants = p["diff"]
        .as_array()
        .expect("diff")
        .iter()
        .find(|c| c["path"] == "db/primary/grants")
        .expect("the grant shows in the diff");
    assert_eq!(
        grants["after"],
        json!(["svc-api:admin", "svc-api:reader", "svc-api:writer", "svc-worker:reader"])
    );
    assert_eq!(grants["step"], "grant-admin");
}

#[test]
fn deploy_v2_grants_without_previous_has_no_plan_diff() {
    let e = Example {
        previous: None,
        ..example("deploy-v2-grants")
    };
    let p = preview(&e, 3);
    assert_eq!(p["plan_diff"], Value::Null);
    assert_eq!(invariant(&p, "replan.scope_expansion")["status"], "skipped");
    assert_eq!(
        reason_rules(&p),
        ["agent.allowlist", "permissions.no_increase", "confidence.destructive"]
    );
}

#[test]
fn deploy_unasked_is_rejected_for_its_untagged_artifact() {
    let p = preview(&example("deploy-unasked"), 3);
    assert_eq!(p["verdict"], "reject");
    assert_eq!(reasons(&p), pairs(&[("deploy.artifacts", "reject")]));
    let rule = invariant(&p, "deploy.artifacts");
    assert_eq!(rule["status"], "fail");
    assert!(
        rule["message"]
            .as_str()
            .expect("message")
            .contains("registry/api:dev-3f2a9c1"),
        "{rule}"
    );
}

#[test]
fn restart_api_is_admitted_as_an_action() {
    let p = preview(&example("restart-api"), 0);
    assert_eq!(p["verdict"], "admit");
    assert_eq!(p["reasons"], json!([]));
    assert_eq!(p["diff"], json!([]));
    assert_eq!(p["actions"][0]["step"], "restart");
    assert_eq!(p["actions"][0]["kind"], "restart");
    assert_eq!(p["actions"][0]["path"], "svc/api");
    assert_eq!(p["compensation"][0]["mode"], "irreversible");
    assert_eq!(
        p["compensation"][0]["note"],
        "a restart cannot be undone; it is harmless to repeat"
    );
    assert_eq!(
        p["blast_radius"],
        json!([
            { "service": "api", "via": "svc/api", "relation": "owns", "through": null },
            { "service": "billing", "via": "svc/api", "relation": "shares_dependency", "through": "db/primary" },
            { "service": "worker", "via": "svc/api", "relation": "shares_dependency", "through": "db/primary" },
        ])
    );
}

#[test]
fn open_db_to_world_is_rejected_for_widening_the_network() {
    let p = preview(&example("open-db-to-world"), 3);
    assert_eq!(p["verdict"], "reject");
    assert_eq!(
        reasons(&p),
        pairs(&[("network.no_widen", "reject"), ("agent.autonomy", "needs_approval")])
    );
    let rule = invariant(&p, "network.no_widen");
    assert_eq!(rule["status"], "fail");
    assert!(
        rule["message"].as_str().expect("message").contains("0.0.0.0/0"),
        "{rule}"
    );
    // The preflight passed: widening is refused by itself.
    assert_eq!(invariant(&p, "network.preflight")["status"], "pass");
    assert_eq!(
        p["diff"][0]["after"][1],
        json!({ "protocol": "tcp", "port_from": 5432, "port_to": 5432, "cidr": "0.0.0.0/0" })
    );
    assert_eq!(invariant(&p, "agent.autonomy")["figures"]["autonomy"], "propose");
}

#[test]
fn rotate_oidc_is_rejected_for_touching_auth() {
    let p = preview(&example("rotate-oidc"), 3);
    assert_eq!(p["verdict"], "reject");
    assert_eq!(
        reasons(&p),
        pairs(&[("protected.auth", "reject"), ("agent.autonomy", "needs_approval")])
    );
    assert_eq!(invariant(&p, "protected.auth")["status"], "fail");
    assert_eq!(invariant(&p, "protected.prod_config")["status"], "pass");
    assert_eq!(
        p["diff"],
        json!([{
            "path": "auth/oidc/issuer",
            "before": "https://id.example.internal",
            "after": "https://id2.example.internal",
            "step": "issuer",
        }])
    );
}

#[test]
fn an_unlisted_agent_needs_approval_for_a_clean_plan() {
    let e = Example {
        agent: "newcomer",
        ..example("pool-60")
    };
    let p = preview(&e, 2);
    assert_eq!(p["verdict"], "needs_approval");
    assert_eq!(p["plan"]["agent"], "newcomer");
    assert_eq!(reasons(&p), pairs(&[("agent.autonomy", "needs_approval")]));
    let autonomy = invariant(&p, "agent.autonomy");
    assert_eq!(autonomy["status"], "fail");
    assert_eq!(autonomy["figures"]["agent"], "newcomer");
    assert_eq!(autonomy["figures"]["autonomy"], "propose");
}

#[test]
fn an_observe_only_agent_is_rejected() {
    let e = Example {
        agent: "metrics",
        ..example("pool-60")
    };
    let p = preview(&e, 3);
    assert_eq!(p["verdict"], "reject");
    assert_eq!(reasons(&p), pairs(&[("agent.autonomy", "reject")]));
    assert_eq!(invariant(&p, "agent.autonomy")["figures"]["autonomy"], "observe");
}

#[test]
fn text_and_json_agree_on_every_example() {
    for e in &EXAMPLES {
        let text = check(e, &[]);
        let json = check(e, &["--json"]);
        assert_eq!(text.code, json.code, "{}", e.name);
        let verdict = json.json()["verdict"].as_str().expect("verdict").to_string();
        let expected_code = match verdict.as_str() {
            "admit" => 0,
            "needs_approval" => 2,
            "reject" => 3,
            other => panic!("unknown verdict {other}"),
        };
        assert_eq!(json.code, expected_code, "{}: exit code for {verdict}", e.name);
        assert!(
            text.stdout.ends_with(&format!("verdict: {verdict}\n")),
            "{}: the text report ends with its verdict\n{}",
            e.name,
            text.stdout
        );
        assert!(
            text.stdout.contains(&format!("VERDICT: {}", verdict.to_uppercase())),
            "{}",
            e.name
        );
    }
}

#[test]
fn the_default_policy_is_config_policy_toml() {
    let e = example("seven-days-pool-500");
    let implicit = check(&e, &["--json"]).json();
    let explicit = check(&e, &["--json", "--policy", "config/policy.toml"]).json();
    assert_eq!(implicit, explicit);
    assert_eq!(implicit["policy_hash"].as_str().expect("policy_hash").len(), 64);
}

#[test]
fn a_delete_without_confirmation_is_an_input_error_naming_field_and_rule() {
    let bad = scratch(
        "delete-unconfirmed.json",
        r#"{
  "protocol": 1, "lineage": "cleanup", "version": 1, "goal": "tidy",
  "steps": [{ "id": "s1", "kind": "delete", "path": "db/replica",
              "confidence": 1.0,
              "compensation": { "mode": "irreversible", "reason": "data is gone" } }]
}"#,
    );
    let run = concord([
        "check".as_ref(),
        bad.as_os_str(),
        "--agent".as_ref(),
        "resource".as_ref(),
        "--world".as_ref(),
        WORLD.as_ref(),
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("steps[0].args.confirm"), "{}", run.stderr);
    assert!(run.stderr.contains("required"), "{}", run.stderr);
    assert!(run.stderr.contains("invalid intent"), "{}", run.stderr);
}

#[test]
fn a_missing_plan_file_is_an_input_error() {
    let run = concord(["check", "config/examples/no-such-plan.json", "--world", WORLD]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("no-such-plan.json"), "{}", run.stderr);
}

#[test]
fn a_previous_version_of_another_lineage_is_an_input_error() {
    let run = concord([
        "check",
        "config/examples/pool-60.json",
        "--agent",
        "resource",
        "--world",
        WORLD,
        "--previous",
        "config/examples/deploy-v1.json",
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("lineage"), "{}", run.stderr);
    assert!(run.stderr.contains("deploy-api-1.5"), "{}", run.stderr);
    assert!(run.stderr.contains("resource-pool-nudge"), "{}", run.stderr);
}

#[test]
fn an_unknown_flag_is_refused() {
    let run: Run = concord(["check", "config/examples/pool-60.json", "--no-such-flag"]);
    assert_ne!(run.code, 0, "{run:?}");
    assert_ne!(run.code, 3, "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("--no-such-flag"), "{}", run.stderr);
}

/// The documented contract is exit 1 for usage and input errors, but clap
/// exits 2 on a usage error, and 2 means `needs_approval`: a script that
/// routes exit 2 to a human would route a typo there.
#[test]

fn usage_errors_exit_1() {
    for args in [
        vec!["check", "config/examples/pool-60.json", "--no-such-flag"],
        vec!["check"],
        vec!["no-such-command"],
    ] {
        let run = concord(&args);
        assert_eq!(run.code, 1, "concord {args:?}: {run:?}");
    }
}

#[test]
fn a_missing_world_file_is_an_input_error() {
    let run = concord([
        "check",
        "config/examples/pool-60.json",
        "--world",
        "config/examples/no-such-world.toml",
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no-such-world.toml"), "{}", run.stderr);
}
