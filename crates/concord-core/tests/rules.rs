//! Each built-in invariant and the CEL machinery, on worlds other than the
//! shipped seven-days story: other services, kinds and agents.

mod common;

use common::*;
use concord_proto::preview::RuleStatus;
use concord_proto::{Value, Verdict};
use serde_json::json;

/// A message-queue world: consumers hold broker channels; the broker caps them.
const QUEUE_WORLD: &str = r#"
[resources]
"app/ingest/consumers" = 6
"app/ingest/channels" = 10
"app/report/consumers" = 2
"app/report/channels" = 5
"app/report/weights" = 0.25
"broker/main/max_channels" = 200
"broker/main/grants" = ["ingest:publish"]
"broker/main/ingress" = [{ protocol = "tcp", port_from = 5672, port_to = 5672, cidr = "10.8.0.0/16" }]
"secrets/broker/password_ref" = "vault:kv/broker"

[services.ingest]
path = "app/ingest"
depends_on = ["broker/main"]
[services.report]
path = "app/report"
depends_on = ["broker/main"]
[services.billing]
path = "app/billing"
depends_on = ["broker/main/grants"]
"#;

const QUEUE_POLICY: &str = r#"
[defaults]
autonomy = "bounded"

[agents.watcher]
autonomy = "observe"
[agents.intern]
autonomy = "propose"
[agents.tuner]
autonomy = "bounded"
allow = [
  { kinds = ["set"], paths = ["app/*/channels", "app/*/consumers"] },
  { kinds = ["scale"], paths = ["app/*"] },
]

[[rules.protected]]
id = "protected.secrets"
paths = ["secrets/**"]
outcome = "reject"

[[rules.ceiling]]
id = "ceiling.channels"
paths = ["app/*/channels"]
approve_above = 40
reject_above = 100

[[rules.rate]]
id = "rate.consumers"
paths = ["app/*/consumers"]
max_factor = 2.0
outcome = "needs_approval"

[[rules.cel]]
id = "coupling.broker_channels"
reads = ["app/*/consumers", "app/*/channels", "broker/main/max_channels"]
expr = "sum(keys(after.app).map(a, after.app[a].consumers * after.app[a].channels)) <= after.broker.main.max_channels"
outcome = "reject"
[rules.cel.figures]
channels = "sum(keys(after.app).map(a, after.app[a].consumers * after.app[a].channels))"
"#;

#[test]
fn coupling_rule_holds_on_another_world_and_is_caught_via_the_other_factor() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    // 6*10 + 2*5 = 70 <= 200: raising ingest channels to 30 gives 190: fine.
    let ok = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/ingest/channels", json!(30))])),
    );
    assert_eq!(ok.verdict, Verdict::Admit, "{:#?}", ok.reasons);
    assert_eq!(status(&ok, "coupling.broker_channels"), RuleStatus::Pass);
    assert_eq!(rule(&ok, "coupling.broker_channels").figures["channels"], 190.into());
    // The channels ceiling caps channels, so the agent raises consumers instead:
    // 12*10 + 10 = 130 is fine, but 6 -> 12 and then 24 consumers breaks the budget.
    let p2 = run(
        &w,
        &p,
        "tuner",
        &plan(json!([
            scale("s1", "app/ingest", 12),
            set("s2", "app/ingest/consumers", json!(24))
        ])),
    );
    assert_eq!(p2.verdict, Verdict::Reject);
    let r = rule(&p2, "coupling.broker_channels");
    assert_eq!(r.status, RuleStatus::Fail);
    assert_eq!(r.at.as_deref(), Some("after step s2"));
    assert_eq!(r.figures["channels"], 250.into());
    assert!(!r.pre_existing);
}

#[test]
fn a_rule_broken_only_between_steps_is_caught() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    // Final: 40 consumers * 4 channels + 10 = 170 <= 200, but after s1 it is 40*10+10 = 410.
    let i = plan(json!([
        set("s1", "app/ingest/consumers", json!(40)),
        set("s2", "app/ingest/channels", json!(4)),
    ]));
    let pv = run(&w, &p, "tuner", &i);
    let r = rule(&pv, "coupling.broker_channels");
    assert_eq!(r.status, RuleStatus::Fail);
    assert_eq!(r.at.as_deref(), Some("after step s1"));
    assert_eq!(pv.verdict, Verdict::Reject);
    // The same two steps in the safe order pass the coupling rule.
    let safe = plan(json!([
        set("s1", "app/ingest/channels", json!(4)),
        set("s2", "app/ingest/consumers", json!(40)),
    ]));
    let pv = run(&w, &p, "tuner", &safe);
    assert_eq!(status(&pv, "coupling.broker_channels"), RuleStatus::Pass);
}

#[test]
fn a_rule_broken_only_while_compensating_is_caught() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    // Forward the plan lowers channels; its hand-written undo sets them to 50:
    // 6*50 + 10 = 310 > 200 while compensating.
    let i = plan(json!([{
        "id": "s1", "kind": "set", "path": "app/ingest/channels", "args": { "value": 8 },
        "confidence": 0.9,
        "compensation": { "mode": "undo", "kind": "set", "path": "app/ingest/channels", "args": { "value": 50 } }
    }]));
    let pv = run(&w, &p, "tuner", &i);
    let r = rule(&pv, "coupling.broker_channels");
    assert_eq!(r.status, RuleStatus::Fail, "{r:#?}");
    assert_eq!(r.at.as_deref(), Some("after undoing step s1 (rollback after step s1)"));
    assert_eq!(pv.verdict, Verdict::Reject);
    assert_eq!(pv.compensation[0].mode, "undo");
}

#[test]
fn ceilings_have_two_thresholds_and_never_block_a_decrease() {
    let w = world(&QUEUE_WORLD.replace("\"app/report/channels\" = 5", "\"app/report/channels\" = 150"));
    let p = policy(QUEUE_POLICY);
    let approve = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/ingest/channels", json!(41))])),
    );
    let r = rule(&approve, "ceiling.channels");
    assert_eq!((r.status, r.outcome), (RuleStatus::Fail, Verdict::NeedsApproval));
    assert_eq!(r.figures["value"], 41.into());
    let reject = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/ingest/channels", json!(101))])),
    );
    assert_eq!(rule(&reject, "ceiling.channels").outcome, Verdict::Reject);
    // 150 -> 120 is still above both thresholds but lowers the value: allowed.
    let lower = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/report/channels", json!(120))])),
    );
    assert_eq!(status(&lower, "ceiling.channels"), RuleStatus::Pass);
    let untouched = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/ingest/consumers", json!(7))])),
    );
    assert_eq!(status(&untouched, "ceiling.channels"), RuleStatus::Skipped);
}

#[test]
fn rate_limit_is_per_step_and_inclusive() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    let double = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/ingest/consumers", json!(12))])),
    );
    assert_eq!(status(&double, "rate.consumers"), RuleStatus::Pass);
    let more = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/ingest/consumers", json!(13))])),
    );
    let r = rule(&more, "rate.consumers");
    assert_eq!(r.status, RuleStatus::Fail);
    assert_eq!(r.figures["before"], 6.into());
    assert_eq!(r.figures["after"], 13.into());
    // Two steps of 2x each pass this per-step rule (cumulative drift is the
    // coordinator's compounding check, not a preview rule).
    let two = run(
        &w,
        &p,
        "tuner",
        &plan(json!([
            set("s1", "app/report/consumers", json!(4)),
            set("s2", "app/report/consumers", json!(8))
        ])),
    );
    assert_eq!(status(&two, "rate.consumers"), RuleStatus::Pass);
}

#[test]
fn permissions_cannot_increase_by_grant_or_by_set() {
    let w = world(QUEUE_WORLD);
    let p = policy("[defaults]\nautonomy = \"bounded\"");
    let grant = plan(json!([{
        "id": "g", "kind": "grant", "path": "broker/main",
        "args": { "principal": "report", "role": "consume" }, "confidence": 0.95,
        "compensation": { "mode": "restore" }
    }]));
    let pv = run(&w, &p, "ops", &grant);
    assert_eq!(status(&pv, "permissions.no_increase"), RuleStatus::Fail);
    assert_eq!(pv.verdict, Verdict::Reject);
    // billing depends on the grants path itself; ingest and report on the broker.
    let names: Vec<&str> = pv.blast_radius.iter().map(|a| a.service.as_str()).collect();
    assert_eq!(names, ["billing", "ingest", "report"]);
    let widen = plan(json!([set(
        "s1",
        "broker/main/grants",
        json!(["ingest:publish", "ingest:admin"])
    )]));
    let pv = run(&w, &p, "ops", &widen);
    let r = rule(&pv, "permissions.no_increase");
    assert_eq!(r.status, RuleStatus::Fail);
    assert!(r.message.contains("ingest:admin"), "{}", r.message);
    let revoke = plan(json!([{
        "id": "r", "kind": "revoke", "path": "broker/main",
        "args": { "principal": "ingest", "role": "publish" }, "confidence": 0.95,
        "compensation": { "mode": "restore" }
    }]));
    let pv = run(&w, &p, "ops", &revoke);
    assert_eq!(status(&pv, "permissions.no_increase"), RuleStatus::Pass);
    assert_eq!(pv.diff[0].after, None, "the last grant revoked removes the set");
}

fn net(cidr: &str, from: u16, to: u16, result: &str) -> serde_json::Value {
    json!([{
        "id": "n", "kind": "network", "path": "broker/main",
        "args": { "direction": "ingress", "change": "add",
                  "rule": { "protocol": "tcp", "port_from": from, "port_to": to, "cidr": cidr },
                  "preflight": { "check": "tcp connect broker:5672", "result": result } },
        "confidence": 0.95, "compensation": { "mode": "restore" }
    }])
}

#[test]
fn network_scope_cannot_widen_and_needs_a_passing_preflight() {
    let w = world(QUEUE_WORLD);
    let p = policy("[defaults]\nautonomy = \"bounded\"");
    let narrower = run(&w, &p, "ops", &plan(net("10.8.3.0/24", 5672, 5672, "passed")));
    assert_eq!(status(&narrower, "network.no_widen"), RuleStatus::Pass);
    assert_eq!(narrower.verdict, Verdict::Admit, "{:#?}", narrower.reasons);
    let wider_net = run(&w, &p, "ops", &plan(net("10.0.0.0/8", 5672, 5672, "passed")));
    assert_eq!(status(&wider_net, "network.no_widen"), RuleStatus::Fail);
    let wider_ports = run(&w, &p, "ops", &plan(net("10.8.3.0/24", 5672, 5700, "passed")));
    assert_eq!(status(&wider_ports, "network.no_widen"), RuleStatus::Fail);
    let failed = run(&w, &p, "ops", &plan(net("10.8.3.0/24", 5672, 5672, "failed")));
    assert_eq!(status(&failed, "network.preflight"), RuleStatus::Fail);
    assert_eq!(failed.verdict, Verdict::Reject);
}

#[test]
fn protected_paths_refuse_any_step_acting_there() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    let i = plan(json!([set(
        "s1",
        "secrets/broker/password_ref",
        json!("vault:kv/broker2")
    )]));
    let pv = run(&w, &p, "ops", &i);
    assert_eq!(status(&pv, "protected.secrets"), RuleStatus::Fail);
    let restart = plan(json!([{
        "id": "r", "kind": "restart", "path": "secrets/broker", "confidence": 0.9,
        "compensation": { "mode": "irreversible", "reason": "cannot be undone" }
    }]));
    let pv = run(&w, &p, "ops", &restart);
    assert_eq!(
        status(&pv, "protected.secrets"),
        RuleStatus::Fail,
        "a restart changes no value but acts there"
    );
    assert_eq!(pv.actions.len(), 1);
}

#[test]
fn autonomy_levels_map_to_verdicts() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    let i = plan(json!([set("s1", "app/ingest/channels", json!(12))]));
    assert_eq!(run(&w, &p, "watcher", &i).verdict, Verdict::Reject);
    assert_eq!(run(&w, &p, "intern", &i).verdict, Verdict::NeedsApproval);
    assert_eq!(run(&w, &p, "tuner", &i).verdict, Verdict::Admit);
    // An unlisted agent gets the defaults (here: bounded, no allowlist).
    let pv = run(&w, &p, "someone", &i);
    assert_eq!(status(&pv, "agent.allowlist"), RuleStatus::Skipped);
}

#[test]
fn allowlist_covers_compensation_steps_too() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    let i = plan(json!([{
        "id": "s1", "kind": "set", "path": "app/ingest/channels", "args": { "value": 12 },
        "confidence": 0.9,
        "compensation": { "mode": "undo", "kind": "set", "path": "broker/main/max_channels", "args": { "value": 400 } }
    }]));
    let pv = run(&w, &p, "tuner", &i);
    let r = rule(&pv, "agent.allowlist");
    assert_eq!(r.status, RuleStatus::Fail);
    assert!(r.message.starts_with("compensation of step s1"), "{}", r.message);
}

#[test]
fn assumptions_are_checked_against_the_world() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    let j = json!({ "protocol": 1, "lineage": "a", "version": 1, "goal": "g",
        "assumptions": [
            { "path": "app/ingest/consumers", "op": "eq", "value": 6.0 },
            { "path": "app/ingest/channels", "op": "lt", "value": 10 },
            { "path": "app/nothing", "op": "absent" }
        ],
        "steps": [set("s1", "app/ingest/channels", json!(12))] });
    let i = concord_proto::decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap();
    let pv = run(&w, &p, "tuner", &i);
    let held: Vec<bool> = pv.assumptions.iter().map(|a| a.held).collect();
    assert_eq!(held, [true, false, true]);
    assert_eq!(pv.assumptions[1].actual, Some(10.into()));
    assert_eq!(status(&pv, "plan.assumptions"), RuleStatus::Fail);
    assert_eq!(pv.verdict, Verdict::Reject);
}

#[test]
fn cel_rules_fail_closed() {
    let w = world(QUEUE_WORLD);
    // Multiplying an int by a double is an error in CEL, not a number.
    let mixed = policy(
        r#"
[defaults]
autonomy = "bounded"
[[rules.cel]]
id = "mixed"
reads = ["app/ingest/channels"]
expr = "after.app.ingest.channels * 1.5 < 100.0"
outcome = "reject"
[[rules.cel]]
id = "undeclared"
reads = ["app/ingest/channels"]
expr = "after.broker.main.max_channels > 0"
outcome = "needs_approval"
[[rules.cel]]
id = "not_bool"
reads = ["app/ingest/channels"]
expr = "after.app.ingest.channels"
outcome = "needs_approval"
"#,
    );
    let pv = run(
        &w,
        &mixed,
        "x",
        &plan(json!([set("s1", "app/ingest/channels", json!(12))])),
    );
    for id in ["mixed", "undeclared", "not_bool"] {
        let r = rule(&pv, id);
        assert_eq!(r.status, RuleStatus::Error, "{id}: {r:#?}");
        assert!(r.message.contains("fails closed"), "{}", r.message);
    }
    assert_eq!(pv.verdict, Verdict::Reject);
    let ids = reasons(&pv);
    assert_eq!(ids, ["mixed", "not_bool", "undeclared"]);
}

#[test]
fn cel_rules_read_only_declared_paths_and_skip_untouched_ones() {
    let w = world(QUEUE_WORLD);
    let p = policy(QUEUE_POLICY);
    let pv = run(
        &w,
        &p,
        "ops",
        &plan(json!([set("s1", "app/report/weights", json!(0.5))])),
    );
    let r = rule(&pv, "coupling.broker_channels");
    assert_eq!(r.status, RuleStatus::Skipped);
}

#[test]
fn a_rule_already_failing_before_the_plan_goes_to_a_human() {
    // 6*10 + 2*5 = 70 channels against a cap of 50: already broken.
    let w = world(&QUEUE_WORLD.replace("max_channels\" = 200", "max_channels\" = 50"));
    let p = policy(QUEUE_POLICY);
    let pv = run(
        &w,
        &p,
        "tuner",
        &plan(json!([set("s1", "app/ingest/channels", json!(9))])),
    );
    let r = rule(&pv, "coupling.broker_channels");
    assert_eq!(r.status, RuleStatus::Fail);
    assert!(r.pre_existing);
    assert_eq!(r.outcome, Verdict::NeedsApproval);
    assert_eq!(pv.verdict, Verdict::NeedsApproval);
}

#[test]
fn sum_of_floats_does_not_depend_on_map_order() {
    let mut toml = String::from("[resources]\n");
    for i in 0..40 {
        toml.push_str(&format!("\"w/s{i:02}/x\" = {}\n", 0.1 + f64::from(i) * 1e-3));
    }
    let w = world(&toml);
    let p = policy(
        r#"
[defaults]
autonomy = "bounded"
[[rules.cel]]
id = "sum"
reads = ["w/*/x"]
expr = "sum(keys(after.w).map(k, after.w[k].x)) < 100.0"
outcome = "reject"
[rules.cel.figures]
total = "sum(after.w.map(k, after.w[k].x))"
"#,
    );
    let i = plan(json!([set("s1", "w/s00/x", json!(0.2))]));
    let first = run(&w, &p, "x", &i);
    let total = rule(&first, "sum").figures["total"].clone();
    for _ in 0..20 {
        // A fresh CEL map each time: std HashMap randomises its order per map.
        let again = run(&w, &p, "x", &i);
        assert_eq!(rule(&again, "sum").figures["total"], total);
    }
}

#[test]
fn sum_product_adds_the_products_of_entries_holding_every_field() {
    // a: 3 x 4, b: 2 x 0.5 (a float factor), c lacks `y` (adds nothing),
    // d is a leaf (no fields: adds nothing).
    let w = world(
        r#"[resources]
"m/a/x" = 3
"m/a/y" = 4
"m/b/x" = 2
"m/b/y" = 0.5
"m/c/x" = 7
"m/d" = 1
"n/a/x" = 4000000000000000
"n/a/y" = 4000
"s/a/x" = "three"
"s/a/y" = 2
"#,
    );
    let p = policy(
        r#"
[defaults]
autonomy = "bounded"
[[rules.cel]]
id = "sum"
reads = ["m/**"]
expr = "sum_product(after.m, ['x', 'y']) == 13.0"
outcome = "reject"
[rules.cel.figures]
total = "sum_product(after.m, ['x', 'y'])"
only_x = "sum_product(after.m, ['x'])"
[[rules.cel]]
id = "overflow"
reads = ["n/**"]
expr = "sum_product(after.n, ['x', 'y']) > 0"
outcome = "reject"
[[rules.cel]]
id = "not_a_number"
reads = ["s/**"]
expr = "sum_product(after.s, ['x', 'y']) > 0"
outcome = "reject"
[[rules.cel]]
id = "no_fields"
reads = ["m/**"]
expr = "sum_product(after.m, []) > 0"
outcome = "reject"
"#,
    );
    let pv = run(
        &w,
        &p,
        "x",
        &plan(json!([
            set("s1", "m/c/x", json!(8)),
            set("s2", "n/a/y", json!(4001)),
            set("s3", "s/a/y", json!(3)),
        ])),
    );
    let r = rule(&pv, "sum");
    assert_eq!(r.status, RuleStatus::Pass, "{r:#?}");
    assert_eq!(r.figures["total"], Value::Float(13.0), "{r:#?}");
    // Ints stay ints: 3 + 2 + 8 (m/d is a leaf and has no `x` field).
    assert_eq!(r.figures["only_x"], Value::Int(13), "{r:#?}");
    for (id, why) in [
        ("overflow", "integer overflow"),
        ("not_a_number", "takes numbers"),
        ("no_fields", "at least one field"),
    ] {
        let r = rule(&pv, id);
        assert_eq!(r.status, RuleStatus::Error, "{id}: {r:#?}");
        assert!(r.message.contains(why), "{id}: {}", r.message);
    }
}

#[test]
fn steps_that_do_not_apply_reject_the_plan() {
    let w = world(QUEUE_WORLD);
    let p = policy("[defaults]\nautonomy = \"bounded\"");
    // `app/ingest` has children: a value cannot live there.
    let pv = run(&w, &p, "x", &plan(json!([set("s1", "app/ingest", json!(1))])));
    assert_eq!(status(&pv, "plan.applies"), RuleStatus::Fail);
    assert_eq!(pv.verdict, Verdict::Reject);
    // Nor under a path that holds a value.
    let pv = run(
        &w,
        &p,
        "x",
        &plan(json!([set("s1", "app/ingest/channels/x", json!(1))])),
    );
    assert_eq!(status(&pv, "plan.applies"), RuleStatus::Fail);
    let del = plan(json!([{
        "id": "d", "kind": "delete", "path": "app/nothing", "args": { "confirm": { "path": "app/nothing", "reason": "tidy" } },
        "confidence": 0.95, "compensation": { "mode": "irreversible", "reason": "gone" }
    }]));
    let pv = run(&w, &p, "x", &del);
    assert_eq!(status(&pv, "plan.applies"), RuleStatus::Fail);
}

#[test]
fn delete_removes_the_subtree_and_is_irreversible() {
    let w = world(QUEUE_WORLD);
    let p = policy("[defaults]\nautonomy = \"bounded\"");
    let del = plan(json!([{
        "id": "d", "kind": "delete", "path": "app/report", "args": { "confirm": { "path": "app/report", "reason": "retired" } },
        "confidence": 0.95, "compensation": { "mode": "irreversible", "reason": "data is gone" }
    }]));
    let pv = run(&w, &p, "x", &del);
    let paths: Vec<String> = pv.diff.iter().map(|c| c.path.to_string()).collect();
    assert_eq!(
        paths,
        ["app/report/channels", "app/report/consumers", "app/report/weights"]
    );
    assert!(pv.diff.iter().all(|c| c.after.is_none()));
    assert_eq!(pv.compensation[0].mode, "irreversible");
    assert_eq!(pv.risk.level, "high");
    assert_eq!(status(&pv, "delete.confirmed"), RuleStatus::Pass);
}

#[test]
fn scope_expansion_needs_a_human_even_when_v1_was_admitted() {
    let w = world(QUEUE_WORLD);
    let p = policy("[defaults]\nautonomy = \"bounded\"");
    let v1 = plan_v("l", 1, json!([set("s1", "app/ingest/channels", json!(12))]));
    let v2 = plan_v("l", 2, json!([set("s1", "app/ingest/channels", json!(14))]));
    let pv = concord_core::preview::preview(concord_core::preview::PreviewInput {
        world: &w,
        intent: &v2,
        agent: "x",
        policy: &p,
        previous: Some(&v1),
    });
    let d = pv.plan_diff.as_ref().unwrap();
    assert_eq!(d.changed[0].fields, ["args"]);
    let kinds: Vec<&str> = d.scope_expansion.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["raised_value"]);
    assert_eq!(pv.verdict, Verdict::NeedsApproval);
    // Lowering the value in v2 is not an expansion.
    let v2 = plan_v("l", 2, json!([set("s1", "app/ingest/channels", json!(11))]));
    let pv = concord_core::preview::preview(concord_core::preview::PreviewInput {
        world: &w,
        intent: &v2,
        agent: "x",
        policy: &p,
        previous: Some(&v1),
    });
    assert_eq!(pv.verdict, Verdict::Admit, "{:#?}", pv.reasons);
}

#[test]
fn policy_errors_name_the_rule() {
    let e = concord_core::policy::Policy::from_toml_str(
        "[[rules.cel]]\nid = \"bad\"\nreads = []\nexpr = \"1 +\"\noutcome = \"reject\"",
    )
    .unwrap_err();
    assert!(e.to_string().contains("rule `bad`"), "{e}");
    let e = concord_core::policy::Policy::from_toml_str(
        "[[rules.ceiling]]\nid = \"c\"\npaths = [\"a\"]\napprove_above = 10\nreject_above = 5",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("approve_above (10) is above reject_above (5)"),
        "{e}"
    );
    let e = concord_core::policy::Policy::from_toml_str("[rules.bogus]\nx = 1").unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
}

#[test]
fn worlds_keep_values_at_leaves() {
    let e = concord_core::world::World::from_toml_str("[resources]\n\"a/b\" = 1\n\"a/b/c\" = 2").unwrap_err();
    assert_eq!(
        e.to_string(),
        "world: `a/b` holds a value but `a/b/c` is under it; values live only at leaves"
    );
}

#[test]
fn a_rule_that_reads_too_much_exhausts_its_budget_and_fails_closed() {
    let mut toml = String::from("[resources]\n");
    for i in 0..=concord_core::preview::CEL_SCAN_PATHS_MAX {
        toml.push_str(&format!("\"fleet/n{i}/cpu\" = 1\n"));
    }
    let w = world(&toml);
    let p = policy(
        r#"
[defaults]
autonomy = "bounded"
[[rules.cel]]
id = "fleet"
reads = ["fleet/*/cpu"]
expr = "true"
outcome = "needs_approval"
"#,
    );
    let pv = run(&w, &p, "x", &plan(json!([set("s1", "fleet/n1/cpu", json!(2))])));
    let r = rule(&pv, "fleet");
    assert_eq!(r.status, RuleStatus::Error);
    assert!(r.message.contains("budget exhausted"), "{}", r.message);
    assert_eq!(pv.verdict, Verdict::NeedsApproval);
}
