//! The coordinator on a three-node JetStream cluster, its log, chain head,
//! halts and snapshots replicated on every node: nodes die and come back
//! under a stream of intents, each retried with its idempotency key until
//! answered, and every intent still gets exactly one decision, in a log
//! whose chain verifies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_core::coordinator::{Event, Record};
use concord_nats::client::{ConcordClient, read_log, verify_log};
use concord_nats::config::Credentials;
use concord_nats::log::Batch;
use concord_proto::Verdict;
use concord_testkit::NatsCluster;
use concord_tests::live::Live;
use serde_json::json;

const INTENTS: usize = 45;

fn intent(i: usize) -> Vec<u8> {
    json!({
        "protocol": 1, "lineage": format!("c-{i}"), "version": 1, "idempotency_key": format!("ck-{i}"),
        "goal": "tune a node",
        "steps": [{ "id": "s1", "kind": "set", "path": format!("fleet/node-{i}/weight"), "args": { "value": i },
                    "confidence": 0.9, "compensation": { "mode": "restore" } }]
    })
    .to_string()
    .into_bytes()
}

async fn wait_answers(answers: &Mutex<BTreeMap<usize, Verdict>>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while answers.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} answers",
            answers.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_lost_one_at_a_time_under_a_stream_of_intents_lose_no_decision() {
    let mut live = Live::start_on_cluster(NatsCluster::start(3), |_| {}).await;
    let nats = live.nats().await;
    let js = async_nats::jetstream::new(nats.clone());
    let mut stream = js.get_stream("CONCORD_LOG").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.cluster.as_ref().map(|c| c.replicas.len()),
        Some(2),
        "{:?}",
        info.cluster
    );

    let answers = Arc::new(Mutex::new(BTreeMap::<usize, Verdict>::new()));
    let a2 = answers.clone();
    let urls = live.urls();
    let proposer = tokio::spawn(async move {
        let mut c = ConcordClient::connect(&urls, &Credentials::default(), "default", Some("_INBOX_newbie"))
            .await
            .unwrap();
        c.timeout = Duration::from_millis(1500);
        for i in 0..INTENTS {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                match c.propose("newbie", &intent(i)).await {
                    Ok(d) => {
                        a2.lock().unwrap().insert(i, d.verdict);
                        break;
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "intent {i} never answered: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // The first node (the coordinator's first URL) dies, then comes back;
    // then a second node dies while the first catches up.
    wait_answers(&answers, INTENTS / 3).await;
    live.server.kill();
    wait_answers(&answers, INTENTS / 2).await;
    live.server.restart();
    live.peers[0].kill();
    wait_answers(&answers, 2 * INTENTS / 3).await;
    live.peers[0].restart();
    proposer.await.unwrap();
    assert_eq!(answers.lock().unwrap().len(), INTENTS);
    let verdicts = answers.lock().unwrap().clone();
    // The same plan shape from one agent: one verdict for all, failover or not.
    assert!(verdicts.values().all(|v| *v == verdicts[&0]), "{verdicts:?}");

    // Exactly one decision per intent, in a chain that verifies.
    let mut decided = BTreeMap::<String, usize>::new();
    read_log(&nats, "CONCORD_LOG", 1, false, |_, p| {
        for r in serde_json::from_slice::<Batch>(p).unwrap().records {
            if let Record::Input { events, .. } = r {
                for e in events {
                    if let Event::Decided { lineage, .. } = e {
                        *decided.entry(lineage.to_string()).or_default() += 1;
                    }
                }
            }
        }
        true
    })
    .await
    .unwrap();
    assert_eq!(decided.len(), INTENTS, "{decided:?}");
    assert!(decided.values().all(|n| *n == 1), "{decided:?}");
    let report = verify_log(&nats, "CONCORD_LOG", "default", vec![]).await.unwrap();
    assert_eq!(report.error, None, "{report:?}");
    live.down().await;
}
