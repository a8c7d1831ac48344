//! The live demo in a shortened form (faster ticks): through concord the
//! database survives and the verdicts name the findings that stopped the
//! cascade; the same agents straight on the system take it down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_demo::{EXPECTED_FINDINGS, Options, run};
use concord_tests::live::root;

async fn play(coordinated: bool) -> (concord_demo::Report, Vec<String>) {
    let mut opts = Options::new(&root(), coordinated);
    opts.tick = Duration::from_millis(50);
    opts.settle_ticks = 20;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    let report = run(opts, Arc::new(move |s| l.lock().unwrap().push(s)))
        .await
        .expect("the demo runs");
    let lines = lines.lock().unwrap().clone();
    (report, lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinated_the_database_survives_and_the_findings_are_named() {
    let (report, lines) = play(true).await;
    assert_eq!(report.check(), Vec::<String>::new(), "{}", report.summary());
    let e = &report.end;
    assert!(!e.db_down && e.db_peak <= e.max_connections, "{e:?}");
    for f in EXPECTED_FINDINGS {
        assert!(report.findings.contains(f), "{f} missing: {}", report.summary());
    }
    // No pool increase ran: every one was stopped.
    assert_eq!(e.pool_size, 50);
    let raises: Vec<_> = report.proposals.iter().filter(|p| p.agent == "resource").collect();
    assert!(!raises.is_empty(), "the resource agent proposed");
    assert!(raises.iter().all(|p| p.outcome != "completed"), "{raises:?}");
    // The log was printed as it happened: the rollback is in it.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("log  compensated  deploy-api-1.5 v1")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn uncoordinated_the_same_agents_take_the_database_down() {
    let (report, _) = play(false).await;
    assert_eq!(report.check(), Vec::<String>::new(), "{}", report.summary());
    let e = &report.end;
    assert!(e.db_down && e.db_peak > e.max_connections, "{e:?}");
    assert!(e.pool_size >= 500, "the pool escalation ran: {e:?}");
}
