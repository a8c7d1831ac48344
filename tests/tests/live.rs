//! The coordinator over a real NATS server: decisions, the log before the
//! reply, approvals and halts through the control subjects, restarts, bad
//! input, retries with the same key, and the log's integrity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_core::coordinator::{Event, Input, Record};
use concord_nats::client::{ClientError, read_log, verify_log};
use concord_nats::log::Batch;
use concord_nats::wire::{Answer, Query};
use concord_proto::Verdict;
use concord_proto::coord::{Control, HaltGrade, HaltScope, StepDispatch, StepOutcome, StepResult};
use concord_proto::{Short, Value};
use concord_tests::live::{Live, decisions_per_plan, example, node_intent};
use futures::StreamExt;
use serde_json::json;

/// An executor on `exec.default` that answers every dispatch with `result`
/// and remembers what it was sent.
async fn executor(live: &Live, result: StepResult) -> Arc<Mutex<Vec<StepDispatch>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let nats = live.nats().await;
    let mut sub = nats
        .subscribe(live.client("x").await.subjects.exec("default"))
        .await
        .unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let d: StepDispatch = serde_json::from_slice(&m.payload).unwrap();
            s.lock().unwrap().push(d.clone());
            let o = StepOutcome {
                key: d.key,
                result: result.clone(),
            };
            if let Some(r) = m.reply {
                nats.publish(r, serde_json::to_vec(&o).unwrap().into()).await.unwrap();
            }
        }
    });
    seen
}

/// Every record in the log, in order.
async fn records(live: &Live) -> Vec<Record> {
    let nats = live.nats().await;
    let mut out = Vec::new();
    read_log(&nats, &live.cfg.log.stream, 1, false, |_, payload| {
        let b: Batch = serde_json::from_slice(payload).unwrap();
        out.extend(b.records);
        true
    })
    .await
    .unwrap();
    out
}

fn events(records: &[Record]) -> Vec<Event> {
    records
        .iter()
        .flat_map(|r| match r {
            Record::Input { events, .. } => events.clone(),
            _ => Vec::new(),
        })
        .collect()
}

async fn wait_for(mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not reached in time");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seven_days_pool_increase_is_refused_and_a_small_one_runs_as_a_saga() {
    let live = Live::start().await;
    let seen = executor(&live, StepResult::Succeeded).await;
    let agent = live.client("resource").await;

    let d = agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(
        d.reasons.iter().any(|r| r.rule == "coupling.db_connections"),
        "{:?}",
        d.reasons
    );
    assert!(d.preview.is_some(), "the first answer carries the preview");
    // The decision was in the log before the reply came.
    let log = records(&live).await;
    assert!(
        events(&log).iter().any(|e| matches!(
            e,
            Event::Decided {
                verdict: Verdict::Reject,
                ..
            }
        )),
        "the rejection is logged"
    );

    let d = agent.propose("resource", &example("pool-60")).await.unwrap();
    assert_eq!(d.verdict, Verdict::Admit, "{:?}", d.reasons);
    wait_for(async || !seen.lock().unwrap().is_empty()).await;
    let sent = seen.lock().unwrap()[0].clone();
    assert_eq!(sent.key.text(), "resource-pool-nudge/1/nudge-pool/do/1");
    assert!(sent.fencing_token >= 1);
    assert_eq!(sent.expected_before[0].1, Some(Value::Int(50)));
    let ops = live.client("op").await;
    wait_for(async || {
        let log = records(&live).await;
        events(&log).iter().any(|e| matches!(e, Event::Completed { .. }))
    })
    .await;
    let Answer::World { resources, .. } = ops
        .query(
            "op",
            &Query::World {
                path: Some(concord_proto::ResourcePath::parse("svc/api/pool_size").unwrap()),
            },
        )
        .await
        .unwrap()
    else {
        panic!("world answer")
    };
    assert_eq!(resources[0].1, Value::Int(60));
    let report = verify_log(&live.nats().await, &live.cfg.log.stream, &live.cfg.domain, vec![])
        .await
        .unwrap();
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.messages >= 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn approvals_and_rejections_go_through_the_control_subjects() {
    let live = Live::start().await;
    let _exec = executor(&live, StepResult::Succeeded).await;
    let agent = live.client("resource").await;
    // 50 -> 120 is 2.4x in one step: the shipped policy's rate rule holds it for a human.
    let plan = json!({
        "protocol": 1, "lineage": "pool-120", "version": 1, "goal": "more headroom",
        "steps": [{ "id": "s1", "kind": "set", "path": "svc/api/pool_size", "args": { "value": 120 },
                    "confidence": 0.9, "compensation": { "mode": "restore" } }]
    });
    let d = agent.propose("resource", plan.to_string().as_bytes()).await.unwrap();
    assert_eq!(d.verdict, Verdict::NeedsApproval, "{:?}", d.reasons);
    let ops = live.client("alice").await;
    let Answer::Plans { plans, .. } = ops.query("alice", &Query::Pending).await.unwrap() else {
        panic!()
    };
    assert_eq!(plans.len(), 1);
    let p = &plans[0];
    assert_eq!(p.plan_hash, d.plan_hash);
    // The proposer cannot approve its own plan.
    let own = agent
        .control(
            "resource",
            &Control::Approve {
                lineage: p.lineage.clone(),
                version: p.version,
                plan_hash: p.plan_hash.clone(),
                material_hash: p.material_hash.clone(),
                reason: Short::parse("mine").unwrap(),
            },
        )
        .await
        .unwrap();
    assert!(!own.ok, "{}", own.message);
    let ok = ops
        .control(
            "alice",
            &Control::Approve {
                lineage: p.lineage.clone(),
                version: p.version,
                plan_hash: p.plan_hash.clone(),
                material_hash: p.material_hash.clone(),
                reason: Short::parse("looked at the preview").unwrap(),
            },
        )
        .await
        .unwrap();
    assert!(ok.ok, "{}", ok.message);
    // An agent the policy does not list waits for a human on everything; alice rejects it.
    let newbie = live.client("newbie").await;
    let held = newbie
        .propose(
            "newbie",
            plan.to_string()
                .replace("pool-120", "newbie-1")
                .replace("svc/api/pool_size", "svc/web/pool_size")
                .as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(held.verdict, Verdict::NeedsApproval, "{:?}", held.reasons);
    let r = ops
        .control(
            "alice",
            &Control::Reject {
                lineage: concord_proto::Id::parse("newbie-1").unwrap(),
                version: 1,
                reason: Short::parse("not today").unwrap(),
            },
        )
        .await
        .unwrap();
    assert!(r.ok, "{}", r.message);
    let log = records(&live).await;
    assert!(
        events(&log)
            .iter()
            .any(|e| matches!(e, Event::RejectedByOperator { operator, .. } if operator == "alice"))
    );
    assert!(
        events(&log)
            .iter()
            .any(|e| matches!(e, Event::Approved { operator, .. } if operator == "alice")),
        "the approval names the operator from the subject"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_halt_stops_admission_and_survives_a_restart() {
    let mut live = Live::start().await;
    let ops = live.client("alice").await;
    let r = ops
        .control(
            "alice",
            &Control::Halt {
                scope: HaltScope::All,
                grade: HaltGrade::Freeze,
                reason: Short::parse("incident").unwrap(),
            },
        )
        .await
        .unwrap();
    assert!(r.ok);
    let agent = live.client("resource").await;
    let d = agent.propose("resource", &example("pool-60")).await.unwrap();
    assert_eq!(d.verdict, Verdict::Reject);
    assert!(d.reasons.iter().any(|r| r.rule == "halt.active"));

    live.down().await;
    live.up().await;
    let d = agent
        .propose(
            "resource",
            json!({
                "protocol": 1, "lineage": "after-restart", "version": 1, "goal": "g",
                "steps": [{ "id": "s1", "kind": "set", "path": "svc/api/pool_size", "args": { "value": 55 },
                            "confidence": 0.9, "compensation": { "mode": "restore" } }]
            })
            .to_string()
            .as_bytes(),
        )
        .await
        .unwrap();
    assert!(
        d.reasons.iter().any(|r| r.rule == "halt.active"),
        "the halt survived the restart"
    );
    // Executors read the halts from the KV key too.
    let js = async_nats::jetstream::new(live.nats().await);
    let kv = js.get_key_value(concord_nats::store::HALT_BUCKET).await.unwrap();
    let halts: serde_json::Value = serde_json::from_slice(&kv.get("default").await.unwrap().unwrap()).unwrap();
    assert_eq!(halts.as_array().unwrap().len(), 1);
    let Answer::Status(s) = ops.query("alice", &Query::Status).await.unwrap() else {
        panic!()
    };
    assert_eq!(s.incarnation, 2);
    assert_eq!(s.halts.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_intent_gets_the_original_decision_even_after_a_crash() {
    let mut live = Live::start().await;
    let agent = live.client("resource").await;
    let mut plan: serde_json::Value = serde_json::from_slice(&example("seven-days-pool-500")).unwrap();
    plan["idempotency_key"] = json!("drain-1");
    let first = agent.propose("resource", plan.to_string().as_bytes()).await.unwrap();
    assert!(!first.duplicate);
    live.crash();
    live.up().await;
    let again = agent.propose("resource", plan.to_string().as_bytes()).await.unwrap();
    assert!(again.duplicate, "answered from the recovered table");
    assert_eq!(again.verdict, first.verdict);
    assert_eq!(again.reasons, first.reasons);
    assert_eq!(again.material_hash, first.material_hash);
    let decided = events(&records(&live).await)
        .iter()
        .filter(|e| matches!(e, Event::Decided { .. }))
        .count();
    assert_eq!(decided, 1, "one decision in the log, not two");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_typed_errors_and_the_coordinator_keeps_serving() {
    let live = Live::start().await;
    let agent = live.client("resource").await;
    let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
        (b"{not json".to_vec(), "decode", Some("json_syntax")),
        (
            br#"{"protocol":1,"lineage":"x","version":1,"goal":"g","agent":"root","steps":[]}"#.to_vec(),
            "decode",
            Some("unknown_field"),
        ),
        (vec![b' '; 70_000], "payload_too_large", None),
    ];
    for (payload, code, rule) in cases {
        let err = agent.propose("resource", &payload).await.unwrap_err();
        let ClientError::Bus(e) = err else { panic!("{err:?}") };
        assert_eq!(e.code, code, "{e:?}");
        assert_eq!(e.rule.as_deref(), rule, "{e:?}");
    }
    // A bad control and a bad lease name their field too.
    let err = agent
        .request::<serde_json::Value>(
            agent.subjects.ctl("alice"),
            br#"{"op":"halt","scope":{"scope":"all"}}"#.to_vec(),
        )
        .await
        .unwrap_err();
    let ClientError::Bus(e) = err else { panic!() };
    assert_eq!(
        (e.code.as_str(), e.rule.as_deref()),
        ("decode", Some("required")),
        "{e:?}"
    );
    // Still serving.
    let d = agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Reject);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_nobody_serves_fails_at_once_and_is_compensated() {
    let live = Live::start().await;
    let agent = live.client("resource").await;
    let d = agent.propose("resource", &example("pool-60")).await.unwrap();
    assert_eq!(d.verdict, Verdict::Admit);
    wait_for(async || {
        events(&records(&live).await)
            .iter()
            .any(|e| matches!(e, Event::Compensated { .. }))
    })
    .await;
    let ev = events(&records(&live).await);
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::StepFailed { reason, .. } if reason.contains("no_responders")))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn log_verify_names_the_first_message_that_does_not_fit() {
    let live = Live::start().await;
    let agent = live.client("resource").await;
    agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    agent.propose("resource", &example("deploy-unasked")).await.unwrap();
    let nats = live.nats().await;
    let ok = verify_log(&nats, &live.cfg.log.stream, "default", vec![])
        .await
        .unwrap();
    assert_eq!(ok.error, None);
    let n = ok.messages;
    // Someone with JetStream rights appends a forged record to the log.
    let js = async_nats::jetstream::new(nats.clone());
    let forged = concord_nats::log::Signer::generate().seal("concord", 1, &"f".repeat(64), vec![]);
    js.publish(
        live.client("x").await.subjects.log("intent", "resource"),
        serde_json::to_vec(&forged).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let bad = verify_log(&nats, &live.cfg.log.stream, "default", vec![])
        .await
        .unwrap();
    assert_eq!(bad.error_seq, Some(n + 1), "{bad:?}");
    assert!(bad.error.unwrap().contains("previous hash"));
}

/// Someone with full JetStream rights rewrites the log in place: the stream
/// denies deleting messages, so they delete the whole stream, create it
/// again with the same configuration and republish every message, one of
/// them changed (a rejection made an admission).
async fn rewrite_log(
    live: &Live,
    rewrite: impl FnOnce(Vec<(String, Batch)>) -> (Vec<(String, Vec<u8>)>, Option<(u64, String)>),
) {
    let nats = live.nats().await;
    let js = async_nats::jetstream::new(nats.clone());
    let mut stream = js.get_stream(&live.cfg.log.stream).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    let mut original = Vec::new();
    for seq in 1..=info.state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        original.push((
            m.subject.to_string(),
            serde_json::from_slice::<Batch>(&m.payload).unwrap(),
        ));
    }
    let (messages, head) = rewrite(original);
    js.delete_stream(&live.cfg.log.stream).await.unwrap();
    js.create_stream(info.config.clone()).await.unwrap();
    for (subject, payload) in messages {
        js.publish(subject, payload.into()).await.unwrap().await.unwrap();
    }
    if let Some((seq, hash)) = head {
        let kv = js.get_key_value(concord_nats::store::CHAIN_BUCKET).await.unwrap();
        let head = concord_nats::store::Head { seq, hash };
        kv.put("default.head", serde_json::to_vec(&head).unwrap().into())
            .await
            .unwrap();
    }
}

/// The index of the first message holding a rejection, and that message
/// with the rejection turned into an admission.
fn forge_admission(messages: &[(String, Batch)]) -> (usize, Vec<Record>) {
    let i = messages
        .iter()
        .position(|(_, b)| {
            serde_json::to_string(&b.records)
                .unwrap()
                .contains(r#""verdict":"reject""#)
        })
        .expect("the log holds a rejection");
    let text = serde_json::to_string(&messages[i].1.records).unwrap().replacen(
        r#""verdict":"reject""#,
        r#""verdict":"admit""#,
        1,
    );
    (i, serde_json::from_str(&text).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn log_verify_names_an_event_rewritten_through_the_jetstream_api() {
    let mut live = Live::start().await;
    let agent = live.client("resource").await;
    let d = agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Reject);
    agent.propose("resource", &example("deploy-unasked")).await.unwrap();
    live.down().await;
    let nats = live.nats().await;
    let before = verify_log(&nats, &live.cfg.log.stream, "default", vec![])
        .await
        .unwrap();
    assert_eq!(before.error, None, "{before:?}");
    let mut signer = None;
    read_log(&nats, &live.cfg.log.stream, 1, false, |_, p| {
        signer = Some(serde_json::from_slice::<Batch>(p).unwrap().signer);
        false
    })
    .await
    .unwrap();
    let signer = signer.unwrap();

    // A plain rewrite: the changed records no longer match the message's hash.
    let mut forged_seq = 0;
    rewrite_log(&live, |messages| {
        let (i, records) = forge_admission(&messages);
        forged_seq = i as u64 + 1;
        let out = messages
            .into_iter()
            .enumerate()
            .map(|(j, (subject, mut batch))| {
                if j == i {
                    batch.records = records.clone();
                }
                (subject, serde_json::to_vec(&batch).unwrap())
            })
            .collect();
        (out, None)
    })
    .await;
    let report = verify_log(&nats, &live.cfg.log.stream, "default", vec![])
        .await
        .unwrap();
    assert_eq!(report.error_seq, Some(forged_seq), "{report:?}");
    assert!(report.error.unwrap().contains("rewritten"));

    // A careful rewrite: the forger recomputes every hash from the changed
    // message on, signs with a key of their own and moves the recorded head.
    // The chain is whole again; only the coordinator's signature tells.
    let forger = concord_nats::log::Signer::generate();
    rewrite_log(&live, |messages| {
        // Undo the plain rewrite's damage first: start from the records as
        // they are (the forged one included) and re-chain them.
        let mut prev = concord_nats::log::GENESIS_PREV.to_string();
        let mut out = Vec::new();
        for (j, (subject, batch)) in messages.into_iter().enumerate() {
            let resealed = if (j as u64 + 1) < forged_seq {
                batch
            } else {
                forger.seal(&batch.coordinator, batch.incarnation, &prev, batch.records)
            };
            prev = resealed.hash.clone();
            out.push((subject, serde_json::to_vec(&resealed).unwrap()));
        }
        let n = out.len() as u64;
        (out, Some((n, prev)))
    })
    .await;
    let lax = verify_log(&nats, &live.cfg.log.stream, "default", vec![])
        .await
        .unwrap();
    assert_eq!(lax.error, None, "without a pinned signer any key passes: {lax:?}");
    // ... but the report names both keys: the coordinator's and the forger's.
    assert_eq!(lax.signers, vec![signer.clone(), forger.public_key()], "{lax:?}");
    let pinned = verify_log(&nats, &live.cfg.log.stream, "default", vec![signer])
        .await
        .unwrap();
    assert_eq!(pinned.error_seq, Some(forged_seq), "{pinned:?}");
    assert!(pinned.error.unwrap().contains("bad signature"));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_endpoints_say_live_and_ready_and_serve_metrics() {
    let port = concord_nats::server::free_port().unwrap();
    let live = Live::start().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let handle = concord_nats::http::install_metrics();
    tokio::spawn(concord_nats::http::serve(listener, handle, live.health.clone()));
    let agent = live.client("resource").await;
    agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    assert!(get("/livez").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"));
    assert!(metrics.contains("concord_intents_total"), "{metrics}");
    live.health.ready.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_a_slow_subscription_drops_are_a_log_event() {
    // A one-message subscription buffer cannot keep up with a burst.
    let live = Live::start_with(|c| c.limits.subscription_capacity = 1).await;
    let nats = live.nats().await;
    let subject = live.client("x").await.subjects.observe("uptime");
    for _ in 0..20_000 {
        nats.publish(subject.clone(), "{}".into()).await.unwrap();
    }
    nats.flush().await.unwrap();
    let mut notice = None;
    wait_for(async || {
        notice = records(&live).await.into_iter().find_map(|r| match r {
            Record::Notice { kind, detail, .. } if kind == "slow_consumer" => Some(detail),
            _ => None,
        });
        notice.is_some()
    })
    .await;
    assert!(notice.unwrap().contains("subscription_capacity"));
    // The coordinator still serves.
    let d = live
        .client("resource")
        .await
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Reject);
}

#[tokio::test(flavor = "multi_thread")]
async fn durable_log_server_syncing_every_write_decides_and_recovers() {
    // `sync_interval` came with nats-server 2.10.
    if concord_testkit::skip_unless(2, 10, "durable_log_server_syncing_every_write_decides_and_recovers") {
        return;
    }
    let server = concord_testkit::NatsServer::with_config("jetstream { sync_interval: always }\n");
    let mut live = Live::start_on(server, |_| {}).await;
    let agent = live.client("resource").await;
    let first = agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    assert_eq!(first.verdict, Verdict::Reject);
    live.down().await;
    live.up().await;
    let again = agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.plan_hash, first.plan_hash);
    assert_eq!(again.verdict, first.verdict);
}

/// A stand-in OTLP/HTTP collector: keeps the body of every POST.
async fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // One request: headers, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    kept.lock().unwrap().push(buf[head_end..head_end + len].to_vec());
                    buf.drain(..head_end + len);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, bodies)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_trace_continues_through_the_decision_and_is_exported() {
    let (endpoint, bodies) = collector().await;
    let mut live = Live::start_with(|c| c.telemetry.otlp_endpoint = Some(endpoint)).await;
    let nats = live.nats().await;
    let subjects = live.client("x").await.subjects;
    // The agent's own span, as its tracer would send it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let agent_span = "00f067aa0ba902b7";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace_id}-{agent_span}-01").as_str());
    let reply = nats
        .request_with_headers(
            subjects.intent("resource"),
            headers,
            example("seven-days-pool-500").into(),
        )
        .await
        .unwrap();
    let d: concord_proto::coord::Decision = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(d.verdict, Verdict::Reject);
    // The reply names the coordinator's span in the agent's trace.
    let parent = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_string())
        .expect("the reply carries a traceparent");
    let parts: Vec<&str> = parent.split('-').collect();
    assert_eq!(parts[1], trace_id, "{parent}");
    assert_ne!(parts[2], agent_span, "{parent}");
    assert_eq!(
        concord_nats::telemetry::trace_id(reply.headers.as_ref()).as_deref(),
        Some(trace_id)
    );
    // Stopping flushes the exporter: the span reached the collector, in the
    // agent's trace, with the plan's id and the verdict.
    live.down().await;
    let raw_trace: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    wait_for(async || {
        bodies.lock().unwrap().iter().any(|b| {
            b.windows(16).any(|w| w == raw_trace.as_slice())
                && b.windows(14).any(|w| w == b"concord.intent")
                && b.windows(12).any(|w| w == b"concord.plan")
                && b.windows(6).any(|w| w == b"reject")
        })
    })
    .await;
}

/// Sends `n` intents from `agent` at once; returns the decisions and the error codes.
async fn burst(live: &Live, agent: &str, n: usize, from: usize) -> (usize, Vec<(String, Option<u64>)>) {
    let c = Arc::new(live.client(agent).await);
    let mut tasks = Vec::new();
    for i in from..from + n {
        let c = c.clone();
        let agent = agent.to_string();
        tasks.push(tokio::spawn(
            async move { c.propose(&agent, &node_intent("f", i)).await },
        ));
    }
    let mut decided = 0;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => decided += 1,
            Err(ClientError::Bus(e)) => errors.push((e.code, e.retry_after_ms)),
            Err(e) => panic!("{e}"),
        }
    }
    (decided, errors)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_agent_is_rate_limited_without_starving_the_others() {
    let live = Live::start_with(|c| {
        c.limits.intents_per_agent_per_s = 5;
        c.limits.intents_burst = 5;
    })
    .await;
    let (decided, errors) = burst(&live, "flood", 60, 0).await;
    assert!(decided >= 5, "the burst allowance is served: {decided}");
    assert!(!errors.is_empty(), "a flood beyond the limit is refused");
    assert!(
        errors
            .iter()
            .all(|(code, after)| code == "rate_limited" && after.is_some_and(|ms| ms > 0)),
        "{errors:?}"
    );
    // Another agent is not held back by the flooder's limit.
    let (calm, errors) = burst(&live, "calm", 3, 1000).await;
    assert_eq!((calm, errors.len()), (3, 0), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_inbound_queue_answers_busy_with_a_retry_hint() {
    let live = Live::start_with(|c| c.limits.inbound_queue_max = 1).await;
    let (decided, errors) = burst(&live, "many", 300, 0).await;
    assert!(decided > 0);
    assert!(
        errors
            .iter()
            .any(|(code, after)| code == "busy" && after.is_some_and(|ms| ms > 0)),
        "300 intents at once into a queue of 1: {errors:?}"
    );
    assert!(errors.iter().all(|(code, _)| code == "busy"), "{errors:?}");
    // Every busy intent retried under its key is decided once.
    let c = live.client("many").await;
    for i in 0..300 {
        let mut tries = 0;
        loop {
            match c.propose("many", &node_intent("f", i)).await {
                Ok(_) => break,
                Err(ClientError::Bus(e)) if e.code == "busy" && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(e.retry_after_ms.unwrap_or(10))).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let (decided_per_plan, _) = decisions_per_plan(&live.nats().await, &live.cfg.log.stream).await;
    assert_eq!(decided_per_plan.len(), 300);
    assert!(decided_per_plan.values().all(|n| *n == 1), "{decided_per_plan:?}");
}

/// Operators' commands take their lane ahead of a stream of intents from
/// several agents: halts and resumes interleave with the intents' batches;
/// every intent is decided exactly once, every command answered, and the
/// chain verifies.
#[tokio::test(flavor = "multi_thread")]
async fn operators_commands_amid_a_stream_of_intents_keep_the_log_whole() {
    const PER_PROPOSER: usize = 40;
    let live = Live::start().await;
    let tags = ["ovt-a", "ovt-b", "ovt-c", "ovt-d"];
    let answers: Vec<concord_tests::live::Answers> = tags.iter().map(|_| Default::default()).collect();
    let proposers: Vec<_> = tags
        .iter()
        .zip(&answers)
        .map(|(tag, a)| {
            concord_tests::live::spawn_proposer(live.urls(), tag, PER_PROPOSER, Duration::from_secs(60), a.clone())
        })
        .collect();
    let ops = live.client("alice").await;
    let mut commands = 0;
    for i in 0..25 {
        let scope = HaltScope::Path(concord_proto::ResourcePath::parse(&format!("quiet/zone-{i}")).unwrap());
        let halt = Control::Halt {
            scope: scope.clone(),
            grade: HaltGrade::Freeze,
            reason: Short::parse("drill").unwrap(),
        };
        let resume = Control::Resume {
            scope,
            reason: Short::parse("drill over").unwrap(),
        };
        for c in [halt, resume] {
            assert!(ops.control("alice", &c).await.unwrap().ok, "command {i}");
            commands += 1;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    for p in proposers {
        p.await.unwrap();
    }
    for a in &answers {
        assert_eq!(a.lock().unwrap().len(), PER_PROPOSER);
    }
    let nats = live.nats().await;
    let (decided, _) = decisions_per_plan(&nats, &live.cfg.log.stream).await;
    for tag in tags {
        for i in 0..PER_PROPOSER {
            let lineage = format!("{tag}-{i}");
            assert_eq!(decided.get(&lineage), Some(&1), "{lineage}");
        }
    }
    let report = verify_log(&nats, &live.cfg.log.stream, &live.cfg.domain, vec![])
        .await
        .unwrap();
    assert_eq!(report.error, None, "{report:?}");
    let Answer::Status(s) = ops.query("alice", &Query::Status).await.unwrap() else {
        panic!("a status answer")
    };
    assert!(s.halts.is_empty(), "{:?}", s.halts);
    assert_eq!(commands, 50);
    // Commands go ahead of queued input: once a command is in a batch, no
    // other input joins that batch after it.
    let mut behind = Vec::new();
    read_log(&nats, &live.cfg.log.stream, 1, false, |seq, payload| {
        let b: Batch = serde_json::from_slice(payload).unwrap();
        let mut command_seen = false;
        for r in &b.records {
            if let Record::Input { input, .. } = r {
                let command = matches!(**input, Input::Control { .. });
                if command_seen && !command {
                    behind.push(seq);
                }
                command_seen |= command;
            }
        }
        true
    })
    .await
    .unwrap();
    assert!(
        behind.is_empty(),
        "input after a command in the same batch, at {behind:?}"
    );
}

/// `concord record` writes the live log as a recording that `concord replay`
/// re-decides exactly: `--since` marks where the incident starts (what is
/// reported from), `--until` where the recording ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_recording_of_the_live_log_replays_exactly() {
    let live = Live::start().await;
    let _seen = executor(&live, StepResult::Succeeded).await;
    let agent = live.client("resource").await;
    let d = agent
        .propose("resource", &example("seven-days-pool-500"))
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Reject);
    let d = agent.propose("resource", &example("pool-60")).await.unwrap();
    assert_eq!(d.verdict, Verdict::Admit, "{:?}", d.reasons);
    wait_for(async || {
        events(&records(&live).await)
            .iter()
            .any(|e| matches!(e, Event::Completed { .. }))
    })
    .await;
    let log = records(&live).await;
    // The admission's record: the incident window starts there.
    let admitted_at = log
        .iter()
        .find_map(|r| match r {
            Record::Input { now_ms, events, .. }
                if events.iter().any(|e| {
                    matches!(
                        e,
                        Event::Decided {
                            verdict: Verdict::Admit,
                            ..
                        }
                    )
                }) =>
            {
                Some(*now_ms)
            }
            _ => None,
        })
        .expect("the admission is logged");
    let rejected_at = log
        .iter()
        .find_map(|r| match r {
            Record::Input { now_ms, events, .. }
                if events.iter().any(|e| {
                    matches!(
                        e,
                        Event::Decided {
                            verdict: Verdict::Reject,
                            ..
                        }
                    )
                }) =>
            {
                Some(*now_ms)
            }
            _ => None,
        })
        .expect("the rejection is logged");
    assert!(rejected_at < admitted_at);

    let url = live.urls();
    let stream = live.cfg.log.stream.clone();
    let cli = move |args: Vec<String>| tokio::task::spawn_blocking(move || concord_tests::concord(args));
    let dir = std::env::temp_dir();
    let file = |name: &str| dir.join(format!("concord-record-{}-{name}.jsonl", std::process::id()));

    // The whole incident from the admission on, with the history before it.
    let rec = cli(vec![
        "record".into(),
        "--nats".into(),
        url.clone(),
        "--stream".into(),
        stream.clone(),
        "--since".into(),
        admitted_at.to_string(),
    ])
    .await
    .unwrap();
    assert_eq!(rec.code, 0, "{}", rec.stderr);
    let lines = rec.stdout.lines().count();
    assert!(lines >= log.len(), "{lines} lines for {} records", log.len());
    assert!(rec.stdout.contains("recording_window"), "{}", rec.stdout);
    let whole = file("whole");
    std::fs::write(&whole, &rec.stdout).unwrap();
    let replayed = cli(vec!["replay".into(), whole.display().to_string()]).await.unwrap();
    assert_eq!(replayed.code, 0, "{}{}", replayed.stdout, replayed.stderr);
    assert!(
        replayed.stdout.contains("reproduced every recorded event")
            && replayed.stdout.contains("in the incident window from"),
        "{}",
        replayed.stdout
    );
    // Within the window: the admission, not the rejection before it.
    assert!(
        replayed.stdout.contains("admit 1") && !replayed.stdout.contains("reject"),
        "{}",
        replayed.stdout
    );

    // Ended before the admission: the rejection only.
    let rec = cli(vec![
        "record".into(),
        "--nats".into(),
        url.clone(),
        "--stream".into(),
        stream.clone(),
        "--until".into(),
        (admitted_at - 1).to_string(),
    ])
    .await
    .unwrap();
    assert_eq!(rec.code, 0, "{}", rec.stderr);
    let early = file("early");
    std::fs::write(&early, &rec.stdout).unwrap();
    let replayed = cli(vec!["replay".into(), early.display().to_string()]).await.unwrap();
    assert_eq!(replayed.code, 0, "{}{}", replayed.stdout, replayed.stderr);
    assert!(
        replayed.stdout.contains("reject 1") && !replayed.stdout.contains("admit"),
        "{}",
        replayed.stdout
    );

    // From an export of the stream (`concord log export`: its message
    // bodies, one per line): the same recording as from the live log, up to
    // the export's last record.
    let exported_log = cli(vec![
        "log".into(),
        "--nats".into(),
        url.clone(),
        "export".into(),
        "--stream".into(),
        stream.clone(),
    ])
    .await
    .unwrap();
    assert_eq!(exported_log.code, 0, "{}", exported_log.stderr);
    let export = exported_log.stdout;
    assert!(export.lines().count() >= 2, "{export}");
    let last_ms = export
        .lines()
        .flat_map(|l| serde_json::from_str::<Batch>(l).unwrap().records)
        .map(|r| r.now_ms())
        .max()
        .unwrap();
    let exported = file("export");
    std::fs::write(&exported, &export).unwrap();
    let window = |source: Vec<String>| {
        let mut args = vec!["record".to_string()];
        args.extend(source);
        args.extend([
            "--since".to_string(),
            admitted_at.to_string(),
            "--until".to_string(),
            last_ms.to_string(),
        ]);
        cli(args)
    };
    let from_export = window(vec!["--export".into(), exported.display().to_string()])
        .await
        .unwrap();
    assert_eq!(from_export.code, 0, "{}", from_export.stderr);
    let from_live = window(vec!["--nats".into(), url.clone(), "--stream".into(), stream.clone()])
        .await
        .unwrap();
    assert_eq!(from_live.code, 0, "{}", from_live.stderr);
    assert_eq!(from_export.stdout, from_live.stdout);
    let again = file("again");
    std::fs::write(&again, &from_export.stdout).unwrap();
    let replayed = cli(vec!["replay".into(), again.display().to_string()]).await.unwrap();
    assert_eq!(replayed.code, 0, "{}{}", replayed.stdout, replayed.stderr);
    assert!(replayed.stdout.contains("admit 1"), "{}", replayed.stdout);
    // An edited export is refused, naming the line.
    let at = export
        .lines()
        .position(|l| l.contains("\"reject\""))
        .expect("the rejection is exported");
    // The first occurrence is on that line.
    let edited = export.replacen("\"reject\"", "\"admit\"", 1);
    std::fs::write(&exported, edited).unwrap();
    let refused = cli(vec!["record".into(), "--export".into(), exported.display().to_string()])
        .await
        .unwrap();
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(
        refused.stderr.contains(&format!("line {}", at + 1)),
        "{}",
        refused.stderr
    );
    for f in [whole, early, exported, again] {
        let _ = std::fs::remove_file(f);
    }
}
