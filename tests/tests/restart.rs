//! nats-server restarts under the coordinator: a stream of intents, each
//! retried with its idempotency key until answered, gets exactly one
//! decision each; a following log reader resumes after the restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_nats::client::read_log;
use concord_tests::live::{Answers, Live, decisions_per_plan, spawn_proposer};

const INTENTS: usize = 40;

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

    let answers: Answers = Arc::default();
    let proposer = spawn_proposer(url.clone(), "n", INTENTS, Duration::from_secs(60), answers.clone());
    // Restart the server while intents flow.
    while answers.lock().unwrap().len() < INTENTS / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    live.server.restart();
    proposer.await.unwrap();
    assert_eq!(answers.lock().unwrap().len(), INTENTS);

    // Exactly one decision per intent in the log.
    let nats = live.nats().await;
    let (decided, last) = decisions_per_plan(&nats, "CONCORD_LOG").await;
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
