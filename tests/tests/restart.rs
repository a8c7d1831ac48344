//! nats-server restarts under the coordinator: a stream of intents, each
//! retried with its idempotency key until answered, gets exactly one
//! decision each; a following log reader resumes after the restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_core::coordinator::{Event, Record};
use concord_nats::client::{ConcordClient, read_log};
use concord_nats::config::Credentials;
use concord_nats::log::Batch;
use concord_proto::Verdict;
use concord_tests::live::Live;
use serde_json::json;

const INTENTS: usize = 40;

fn intent(i: usize) -> Vec<u8> {
    json!({
        "protocol": 1, "lineage": format!("n-{i}"), "version": 1, "idempotency_key": format!("k-{i}"),
        "goal": "tune a node",
        "steps": [{ "id": "s1", "kind": "set", "path": format!("fleet/node-{i}/weight"), "args": { "value": i },
                    "confidence": 0.9, "compensation": { "mode": "restore" } }]
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_intent_gets_exactly_one_decision_across_a_server_restart() {
    let mut live = Live::start().await;
    let url = live.server.url();

    // A reader that follows the log through the restart.
    let followed = Arc::new(Mutex::new(0u64));
    let f2 = followed.clone();
    let reader = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .unwrap();
    let follower = tokio::spawn(async move {
        let _ = read_log(&reader, "CONCORD_LOG", 1, true, |seq, _| {
            *f2.lock().unwrap() = seq;
            true
        })
        .await;
    });

    let answers = Arc::new(Mutex::new(BTreeMap::<usize, Verdict>::new()));
    let a2 = answers.clone();
    let url2 = url.clone();
    let proposer = tokio::spawn(async move {
        let mut c = ConcordClient::connect(&url2, &Credentials::default(), "default", Some("_INBOX_newbie"))
            .await
            .unwrap();
        c.timeout = Duration::from_millis(1500);
        for i in 0..INTENTS {
            let deadline = Instant::now() + Duration::from_secs(60);
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
    // Restart the server while intents flow.
    while answers.lock().unwrap().len() < INTENTS / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    live.server.restart();
    proposer.await.unwrap();
    assert_eq!(answers.lock().unwrap().len(), INTENTS);

    // Exactly one decision per intent in the log.
    let nats = live.nats().await;
    let mut decided = BTreeMap::<String, usize>::new();
    let mut last = 0;
    read_log(&nats, "CONCORD_LOG", 1, false, |seq, p| {
        last = seq;
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
    // The follower caught up past the restart.
    let end = Instant::now() + Duration::from_secs(20);
    while *followed.lock().unwrap() < last {
        assert!(Instant::now() < end, "the log follower went silent after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follower.abort();
    live.down().await;
}
