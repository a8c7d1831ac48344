//! `concord sim` and `concord replay` end to end: the same scenario and seed
//! give byte-identical reports, JSON, plots and recordings in two separate
//! processes, and the recording replays.

use concord_tests::{concord, workspace_root};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir.join(name)
}

#[test]
fn seven_days_is_byte_identical_across_processes() {
    let run = |n: u32| {
        let (plot, rec) = (scratch(&format!("plot-{n}.svg")), scratch(&format!("rec-{n}.jsonl")));
        let out = concord([
            "sim".as_ref(),
            "simulations/seven-days.toml".as_ref(),
            "--json".as_ref(),
            "--plot".as_ref(),
            plot.as_os_str(),
            "--record".as_ref(),
            rec.as_os_str(),
        ]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        (
            out.stdout,
            std::fs::read(plot).expect("the plot"),
            std::fs::read(rec).expect("the recording"),
        )
    };
    let (a, b) = (run(1), run(2));
    assert!(a.0 == b.0, "two processes printed different JSON reports");
    assert!(a.1 == b.1, "two processes drew different plots");
    assert!(a.2 == b.2, "two processes recorded different logs");
    let report: serde_json::Value = serde_json::from_str(&a.0).expect("the report is JSON");
    assert_eq!(report["runs"][0]["mode"], "uncoordinated");
    assert_eq!(report["runs"][1]["metrics"]["survives"], true);
    assert_eq!(report["runs"][0]["metrics"]["survives"], false);
    assert!(String::from_utf8_lossy(&a.1).starts_with("<svg"));

    // The recording replays exactly, and the text report is stable too.
    let rec = scratch("rec-1.jsonl");
    let replayed = concord(["replay".as_ref(), rec.as_os_str()]);
    assert_eq!(replayed.code, 0, "{}", replayed.stderr);
    assert!(
        replayed.stdout.contains("reproduced every recorded event"),
        "{}",
        replayed.stdout
    );
    let t1 = concord(["sim", "simulations/racing.toml", "--seed", "4"]);
    let t2 = concord(["sim", "simulations/racing.toml", "--seed", "4"]);
    assert_eq!(t1.stdout, t2.stdout);
}

#[test]
fn replay_reports_a_divergence_and_what_if_shows_changed_verdicts() {
    let rec = scratch("scope.jsonl");
    let out = concord([
        "sim".as_ref(),
        "simulations/scope-creep.toml".as_ref(),
        "--mode".as_ref(),
        "coordinated".as_ref(),
        "--record".as_ref(),
        rec.as_os_str(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = std::fs::read_to_string(&rec).expect("the recording");
    let tampered = text.replacen("\"verdict\":\"reject\"", "\"verdict\":\"admit\"", 1);
    let bad = scratch("scope-tampered.jsonl");
    std::fs::write(&bad, tampered).expect("writing");
    let out = concord(["replay".as_ref(), bad.as_os_str()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("replay diverged") && out.stderr.contains("event 1 differs"),
        "{}",
        out.stderr
    );

    // What-if: a policy that lets the deploy agent grant rights admits v2.
    let policy = std::fs::read_to_string(workspace_root().join("config/policy.toml")).expect("the policy");
    let lax = policy
        .replace(
            "allow = [{ kinds = [\"deploy\"], paths = [\"svc/*\"] }]",
            "allow = [{ kinds = [\"deploy\", \"grant\"], paths = [\"svc/*\", \"db/**\"] }]",
        )
        .replace(
            "paths = [\"iam/**\", \"**/grants\"]\noutcome = \"reject\"",
            "paths = [\"iam/**\", \"**/grants\"]\noutcome = \"needs_approval\"",
        );
    assert_eq!(
        lax.matches("needs_approval").count(),
        policy.matches("needs_approval").count() + 1
    );
    assert_ne!(lax, policy);
    let lax_path = scratch("lax.toml");
    std::fs::write(&lax_path, lax).expect("writing");
    let out = concord([
        "replay".as_ref(),
        rec.as_os_str(),
        "--policy".as_ref(),
        lax_path.as_os_str(),
        "--json".as_ref(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let w = out.json();
    assert_eq!(w["rows"][1]["plan"], "deploy-api/2");
    assert_eq!(w["rows"][1]["recorded"], "reject");
    assert_ne!(w["rows"][1]["other"], "reject", "{w}");
    assert_eq!(w["first_change"], 1);
}

#[test]
fn a_bad_scenario_names_its_field() {
    let bad = scratch("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\ndescription = \"d\"\nduration = \"forever\"\nworld = {}\n",
    )
    .expect("writing");
    let out = concord(["sim".as_ref(), bad.as_os_str()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("`duration`"), "{}", out.stderr);
}
