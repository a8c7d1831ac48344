//! The coordinator on a three-node JetStream cluster, its log, chain head,
//! halts and snapshots replicated on every node: nodes die and come back
//! under a stream of intents, each retried with its idempotency key until
//! answered, and every intent still gets exactly one decision, in a log
//! whose chain verifies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_nats::client::verify_log;
use concord_proto::Verdict;
use concord_testkit::NatsCluster;
use concord_tests::live::{Answers, Live, decisions_per_plan, spawn_proposer};

const INTENTS: usize = 45;

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

    let answers: Answers = Arc::default();
    let proposer = spawn_proposer(live.urls(), "c", INTENTS, Duration::from_secs(90), answers.clone());
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
    let (decided, _) = decisions_per_plan(&nats, "CONCORD_LOG").await;
    assert_eq!(decided.len(), INTENTS, "{decided:?}");
    assert!(decided.values().all(|n| *n == 1), "{decided:?}");
    let report = verify_log(&nats, "CONCORD_LOG", "default", vec![]).await.unwrap();
    assert_eq!(report.error, None, "{report:?}");
    live.down().await;
}
