//! SIGKILL at every effect boundary: the `concord up` process aborts (no
//! cleanup, as a kill would) after an append and before its reply, after a
//! dispatch and before its outcome, and while a snapshot is stored. A
//! restarted coordinator loses no admitted intent, runs no step twice for
//! different keys, and its saga finishes exactly once. A world replica never
//! sees a write before the log holds it.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_core::coordinator::{Event, Record};
use concord_nats::client::{ClientError, read_log, verify_log};
use concord_nats::log::Batch;
use concord_proto::Verdict;
use concord_proto::coord::{Phase, StepDispatch, StepOutcome, StepResult};
use concord_testkit::NatsServer;
use concord_tests::concord_bin;
use concord_tests::live::root;
use futures::StreamExt;
use serde_json::json;

struct Coordinator {
    child: Child,
}

impl Coordinator {
    fn start(server: &NatsServer, crash: Option<&str>) -> Coordinator {
        let cfg = server.dir().join("concord.toml");
        std::fs::write(
            &cfg,
            format!(
                "nats = [\"{}\"]\npolicy = \"{}\"\nworld = \"{}\"\n[snapshots]\nevery_records = 3\n[limits]\ndispatch_retry_ms = 500\n",
                server.url(),
                root().join("config/policy.toml").display(),
                root().join("config/examples/world.toml").display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(concord_bin());
        cmd.arg("up")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(c) = crash {
            cmd.env("CONCORD_CRASH_AT", c);
        } else {
            cmd.env_remove("CONCORD_CRASH_AT");
        }
        Coordinator {
            child: cmd.spawn().expect("run concord up"),
        }
    }

    /// Waits for the process to end by itself (the hook aborts it).
    fn wait_exit(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An executor that dedupes on the idempotency key (a re-sent dispatch gets
/// the recorded outcome, nothing is applied twice) and refuses stale tokens.
#[derive(Default)]
struct Exec {
    outcomes: BTreeMap<String, StepOutcome>,
    applied: Vec<String>,
    tokens: BTreeMap<String, u64>,
    deliveries: u64,
}

async fn executor(server: &NatsServer) -> Arc<Mutex<Exec>> {
    let state = Arc::new(Mutex::new(Exec::default()));
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut sub = nats.subscribe("concord.v1.default.exec.default").await.unwrap();
    let s = state.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let d: StepDispatch = serde_json::from_slice(&m.payload).unwrap();
            let outcome = {
                let mut e = s.lock().unwrap();
                e.deliveries += 1;
                let key = d.key.text();
                if let Some(o) = e.outcomes.get(&key) {
                    o.clone()
                } else {
                    let seen = e.tokens.get(d.path.as_str()).copied().unwrap_or(0);
                    let result = if d.fencing_token < seen {
                        StepResult::StaleToken { seen }
                    } else {
                        e.tokens.insert(d.path.to_string(), d.fencing_token);
                        e.applied.push(key.clone());
                        StepResult::Succeeded
                    };
                    let o = StepOutcome {
                        key: d.key.clone(),
                        result,
                    };
                    e.outcomes.insert(key, o.clone());
                    o
                }
            };
            if let Some(r) = m.reply {
                let _ = nats.publish(r, serde_json::to_vec(&outcome).unwrap().into()).await;
            }
        }
    });
    state
}

fn plan() -> Vec<u8> {
    json!({
        "protocol": 1, "lineage": "tune-api", "version": 1, "idempotency_key": "tune-api-1",
        "goal": "a little more capacity on svc/api",
        "steps": [
            { "id": "pool", "kind": "set", "path": "svc/api/pool_size", "args": { "value": 55 },
              "confidence": 0.9, "compensation": { "mode": "restore" } },
            { "id": "replicas", "kind": "scale", "path": "svc/api", "args": { "replicas": 5 },
              "confidence": 0.9, "compensation": { "mode": "restore" } },
            { "id": "pool-again", "kind": "set", "path": "svc/api/pool_size", "args": { "value": 58 },
              "confidence": 0.9, "compensation": { "mode": "restore" } }
        ]
    })
    .to_string()
    .into_bytes()
}

async fn records(server: &NatsServer) -> Vec<Record> {
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut out = Vec::new();
    let _ = read_log(&nats, "CONCORD_LOG", 1, false, |_, p| {
        out.extend(serde_json::from_slice::<Batch>(p).unwrap().records);
        true
    })
    .await;
    out
}

fn count(records: &[Record], f: impl Fn(&Event) -> bool) -> usize {
    records
        .iter()
        .map(|r| match r {
            Record::Input { events, .. } => events.iter().filter(|e| f(e)).count(),
            _ => 0,
        })
        .sum::<usize>()
}

/// Proposes until a decision comes back (the first attempt may meet a dying coordinator).
async fn propose(server: &NatsServer) -> concord_proto::coord::Decision {
    let mut c = concord_nats::client::ConcordClient::connect(
        &server.url(),
        &Default::default(),
        "default",
        Some("_INBOX_resource"),
    )
    .await
    .unwrap();
    c.timeout = Duration::from_secs(2);
    for _ in 0..60 {
        match c.propose("resource", &plan()).await {
            Ok(d) => return d,
            Err(ClientError::TimedOut(_) | ClientError::NoCoordinator(_)) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no decision");
}

async fn crash_and_recover(point: &str) {
    let server = NatsServer::start();
    let exec = executor(&server).await;
    let mut first = Coordinator::start(&server, Some(point));
    // The first answer may never come: the process dies at the boundary.
    let server_url = server.url();
    let early = tokio::spawn(async move {
        let mut c = concord_nats::client::ConcordClient::connect(
            &server_url,
            &Default::default(),
            "default",
            Some("_INBOX_resource"),
        )
        .await
        .unwrap();
        c.timeout = Duration::from_secs(2);
        for _ in 0..20 {
            match c.propose("resource", &plan()).await {
                Ok(_) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    assert!(
        first.wait_exit(Duration::from_secs(30)),
        "the hook {point} did not fire"
    );
    early.abort();
    let _second = Coordinator::start(&server, None);
    let d = propose(&server).await;
    assert_eq!(d.verdict, Verdict::Admit, "{:?}", d.reasons);
    // The saga ends exactly once.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let log = records(&server).await;
        if count(&log, |e| {
            matches!(e, Event::Completed { .. } | Event::Compensated { .. })
        }) > 0
        {
            break;
        }
        assert!(Instant::now() < end, "{point}: the saga did not end after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = records(&server).await;
    assert_eq!(count(&log, |e| matches!(e, Event::Completed { .. })), 1, "{point}");
    assert_eq!(
        count(&log, |e| matches!(e, Event::Admitted { .. })),
        1,
        "{point}: admitted once"
    );
    assert_eq!(
        count(&log, |e| matches!(e, Event::Decided { .. })),
        1,
        "{point}: decided once"
    );
    let applied = exec.lock().unwrap().applied.clone();
    assert_eq!(
        applied,
        vec![
            "tune-api/1/pool/do/1",
            "tune-api/1/replicas/do/1",
            "tune-api/1/pool-again/do/1"
        ],
        "{point}: every step applied once, under its first key"
    );
    assert!(
        count(
            &log,
            |e| matches!(e, Event::Dispatched { key, .. } if key.attempt > 1 || key.phase == Phase::Undo)
        ) == 0,
        "{point}: no step dispatched under a second key"
    );
    let nats = async_nats::connect(server.url()).await.unwrap();
    let report = verify_log(&nats, "CONCORD_LOG", "default", vec![]).await.unwrap();
    assert_eq!(report.error, None, "{point}: {report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_an_append_before_its_reply() {
    crash_and_recover("after_append:1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_the_first_dispatch_before_its_outcome() {
    crash_and_recover("after_dispatch:1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_the_second_dispatch_before_its_outcome() {
    crash_and_recover("after_dispatch:2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_while_a_snapshot_is_stored() {
    crash_and_recover("during_snapshot:1").await;
}

/// The process dies right after the append that holds the first step's
/// world write and before any of its effects — the frames to replicas among
/// them: the replica still holds the old value, and catches up once a new
/// coordinator runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_sees_no_write_before_the_log_has_it() {
    use concord_proto::Value;
    let server = NatsServer::start();
    let _exec = executor(&server).await;
    // Append 1 holds the decision and the first dispatch, append 2 the first step's write.
    let mut first = Coordinator::start(&server, Some("after_append:2"));
    let mut cfg = concord_agent::AgentConfig::new(server.url(), "uptime");
    cfg.world_keepalive = Duration::from_millis(300);
    let uptime = concord_agent::Agent::connect(cfg).await.unwrap();
    let w = uptime.world().await.unwrap();
    w.await_in_sync(Duration::from_secs(30)).await.unwrap();
    assert_eq!(w.resource("svc/api/pool_size"), Some(Value::Int(50)));

    let d = propose(&server).await;
    assert_eq!(d.verdict, Verdict::Admit, "{:?}", d.reasons);
    assert!(first.wait_exit(Duration::from_secs(30)), "the hook did not fire");
    let log = records(&server).await;
    assert_eq!(
        count(&log, |e| matches!(e, Event::StepSucceeded { .. })),
        1,
        "the first step's write is in the log"
    );
    // Anything the dead process had published would have arrived by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.resource("svc/api/pool_size"),
        Some(Value::Int(50)),
        "no frame with the write left before the append's effects"
    );

    let _second = Coordinator::start(&server, None);
    w.wait_for(Duration::from_secs(60), |r| {
        r.resource("svc/api/pool_size").filter(|v| *v == Value::Int(58))
    })
    .await
    .unwrap();
}
