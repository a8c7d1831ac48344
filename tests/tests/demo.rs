//! The live demo in a shortened form (faster ticks): through concord the
//! database survives, every pool increase is stopped by the findings that
//! tie it to the leaky deploy and to the database's connections, and the
//! release is rolled back by its saga; the same agents straight on the
//! system take the database down. A story cut short by the tick or time
//! limit fails. The agents see the system only through the observations it
//! publishes on the bus.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_agent::{Agent, AgentConfig};
use concord_demo::agents::{Observed, Proposal, UptimeChecks, queue_grown, ship_goal};
use concord_demo::system::{APP_HEALTH, LEAKY, LIVENESS, QUEUE_DEPTH};
use concord_demo::{COUPLING, EXPECTED_FINDINGS, MASKING, Options, Report, run};
use concord_nats::subjects::Subjects;
use concord_proto::{ResourcePath, Value};
use concord_testkit::NatsServer;
use concord_tests::live::root;

fn options(coordinated: bool) -> Options {
    let mut opts = Options::new(&root(), coordinated);
    opts.tick = Duration::from_millis(50);
    opts.settle_ticks = 20;
    opts
}

async fn play(opts: Options) -> (Report, Vec<String>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    let report = run(opts, Arc::new(move |s| l.lock().unwrap().push(s)))
        .await
        .expect("the demo runs");
    let lines = lines.lock().unwrap().clone();
    (report, lines)
}

fn figure(p: &Proposal, rule: &str, name: &str) -> Option<Value> {
    p.findings
        .iter()
        .find(|f| f.rule == rule)
        .and_then(|f| f.figures.get(name).cloned())
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinated_the_database_survives_and_the_findings_are_named() {
    let (report, lines) = play(options(true)).await;
    let summary = report.summary();
    assert_eq!(report.check(), Vec::<String>::new(), "{summary}");
    assert_eq!(report.unfinished, None);
    let e = &report.end;
    assert!(!e.db_down && e.db_peak <= e.max_connections, "{e:?}");
    for f in EXPECTED_FINDINGS {
        assert!(report.findings.contains(f), "{f} missing: {summary}");
    }

    // The leaky release was admitted, failed its application-level health
    // check, and its saga rolled it back.
    let leaky = report
        .proposals
        .iter()
        .find(|p| p.agent == "deploy" && p.goal == ship_goal(LEAKY))
        .expect("the deploy agent shipped the leaky release");
    assert_eq!(leaky.verdict, "admit", "{summary}");
    assert!(
        leaky
            .outcome
            .starts_with("compensated: verification `svc/api/health/app == \"ok\"` failed"),
        "{summary}"
    );
    assert_ne!(e.version, LEAKY);

    // Every pool increase was stopped, none ran, and each names the leaky
    // deploy as the one it would mask.
    assert_eq!(e.pool_size, 50);
    let raises: Vec<&Proposal> = report.proposals.iter().filter(|p| p.agent == "resource").collect();
    assert!(!raises.is_empty(), "the resource agent proposed");
    for p in &raises {
        assert!(
            p.verdict == "reject" || (p.verdict == "needs_approval" && !p.outcome.starts_with("approved")),
            "{} was not stopped: {summary}",
            p.plan
        );
        assert_eq!(
            figure(p, MASKING, "deploy_plan"),
            Some(Value::Str(leaky.plan.clone())),
            "{}: {summary}",
            p.plan
        );
        assert_eq!(figure(p, MASKING, "deploy_agent"), Some(Value::Str("deploy".into())));
    }
    // The coupling rule refused the escalation, with pool × replicas past
    // the database's budget.
    let coupled: Vec<&&Proposal> = raises
        .iter()
        .filter(|p| p.verdict == "reject" && p.findings.iter().any(|f| f.rule == COUPLING))
        .collect();
    assert!(!coupled.is_empty(), "{summary}");
    for p in coupled {
        let n = |name| match figure(p, COUPLING, name) {
            Some(Value::Int(n)) => n as f64,
            Some(Value::Float(x)) => x,
            other => panic!("{}: {COUPLING} figure {name}: {other:?}", p.plan),
        };
        assert!(n("connections") > n("budget"), "{}: {summary}", p.plan);
    }

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
    let (report, _) = play(options(false)).await;
    assert_eq!(report.check(), Vec::<String>::new(), "{}", report.summary());
    let e = &report.end;
    assert!(e.db_down && e.db_peak > e.max_connections, "{e:?}");
    assert!(e.pool_size >= 500, "the pool escalation ran: {e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_story_cut_short_by_the_tick_limit_fails() {
    let mut opts = options(false);
    opts.ticks_max = 5;
    let (report, _) = play(opts).await;
    assert_eq!(report.ticks, 5);
    let wrong = report.check();
    assert!(
        wrong
            .iter()
            .any(|w| w.starts_with("the story did not finish: out of ticks after 5")),
        "{wrong:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_story_cut_short_by_the_time_limit_fails() {
    let mut opts = options(false);
    opts.wall_clock_max = Duration::from_millis(300);
    let (report, _) = play(opts).await;
    let wrong = report.check();
    assert!(
        wrong
            .iter()
            .any(|w| w.starts_with("the story did not finish: out of time at the 0.3 s limit")),
        "{wrong:#?}"
    );
    assert!(
        wrong.iter().any(|w| w.contains("over its limit of 0.3 s")),
        "{wrong:#?}"
    );
}

/// What the system publishes as observations through the SDK reaches an
/// agent's view on the bus, and its decisions follow it: heartbeats fine,
/// application health failing, the queue past the resource agent's limit.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_decides_from_the_observations_on_the_bus() {
    let server = NatsServer::start();
    let seen = Observed::watch(&server.url(), "uptime", &Subjects::new("default"))
        .await
        .expect("the agent watches the bus");
    assert_eq!(seen.latest(LIVENESS), None, "nothing published yet");
    let system = Agent::connect(AgentConfig::new(server.url(), "monitor"))
        .await
        .expect("the system connects");
    let path = |p| ResourcePath::parse(p).expect("a path");
    system.observe_liveness(&path(LIVENESS), "ok").await.expect("published");
    system
        .observe_app_health(&path(APP_HEALTH), "failing")
        .await
        .expect("published");
    system
        .observe_metric(&path(QUEUE_DEPTH), 480.0)
        .await
        .expect("published");
    system.flush().await.expect("flushed");
    // One publisher, one subscriber: in order, so the last one seen means all were.
    let by = Instant::now() + Duration::from_secs(5);
    while seen.latest(QUEUE_DEPTH).is_none() {
        assert!(Instant::now() < by, "the observations never reached the agent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.latest(LIVENESS), Some(Value::Str("ok".into())));
    assert!(!UptimeChecks::Heartbeats.looks_down(&seen));
    assert!(UptimeChecks::AppHealth.looks_down(&seen));
    assert_eq!(queue_grown(&seen), Some(480.0));
}
