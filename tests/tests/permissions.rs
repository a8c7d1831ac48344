//! `concord nats-config` permissions on a real server: each identity is
//! confined to its own subjects. An agent cannot speak as another agent, cannot
//! send operators' commands, and has no JetStream API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_nats::client::{ClientError, ConcordClient, read_log};
use concord_nats::config::Credentials;
use concord_nats::log::Batch;
use concord_nats::permissions::{AgentsFile, generate};
use concord_proto::Verdict;
use concord_testkit::NatsServer;
use concord_tests::live::{Live, example};

fn seed_file(dir: &std::path::Path, name: &str, seed: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.nk"));
    std::fs::write(&p, seed).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn each_identity_is_confined_to_its_own_subjects() {
    let file: AgentsFile =
        toml::from_str(&std::fs::read_to_string(concord_tests::live::root().join("config/agents.toml")).unwrap())
            .unwrap();
    let (users, conf) = generate(&file, false).unwrap();
    let server = NatsServer::with_config(&conf);
    let dir = server.dir().to_path_buf();
    let seed = |role: &str, name: &str| {
        let u = users.iter().find(|u| u.role == role && u.name == name).unwrap();
        seed_file(&dir, &format!("{role}-{name}"), &u.seed)
    };
    let coordinator = seed("coordinator", "concord");
    let live = Live::start_on(server, |c| c.credentials.nkey_seed_file = Some(coordinator)).await;
    let url = live.server.url();
    let creds = |p| Credentials {
        nkey_seed_file: Some(p),
        ..Credentials::default()
    };

    // The deploy agent proposes on its own subject.
    let deploy = ConcordClient::connect(&url, &creds(seed("agent", "deploy")), "default", Some("_INBOX_deploy"))
        .await
        .unwrap();
    let d = deploy.propose("deploy", &example("deploy-unasked")).await.unwrap();
    assert_eq!(d.verdict, Verdict::Reject, "an artifact nobody asked for");

    // It cannot speak as another agent, nor as an operator: the server refuses the publish.
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let e2 = errors.clone();
    let raw = async_nats::ConnectOptions::with_nkey(std::fs::read_to_string(seed("agent", "deploy")).unwrap())
        .custom_inbox_prefix("_INBOX_deploy")
        .event_callback(move |ev| {
            let e2 = e2.clone();
            async move {
                if let async_nats::Event::ServerError(e) = ev {
                    e2.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(&url)
        .await
        .unwrap();
    raw.publish("concord.v1.default.intent.uptime", example("restart-api").into())
        .await
        .unwrap();
    raw.publish(
        "concord.v1.default.ctl.alice",
        br#"{"op":"resume","scope":{"scope":"all"},"reason":"x"}"#.to_vec().into(),
    )
    .await
    .unwrap();
    raw.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errs = errors.lock().unwrap().clone();
    assert!(
        errs.iter()
            .filter(|e| e.to_lowercase().contains("permissions violation"))
            .count()
            >= 2,
        "{errs:?}"
    );
    // Nor may it read another agent's replies or use JetStream.
    assert!(
        raw.subscribe("_INBOX_uptime.>").await.is_ok(),
        "subscribing is sent; the server refuses it"
    );
    // Nor another agent's world replica: its sync frames can be neither
    // read nor sent.
    assert!(raw.subscribe("concord.v1.default.world.uptime").await.is_ok());
    let hello = concord_core::worlddoc::WorldReplica::new("uptime").hello();
    raw.publish("concord.v1.default.sync.uptime", hello.clone().into())
        .await
        .unwrap();
    raw.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errs = errors.lock().unwrap().clone();
    for subject in ["concord.v1.default.world.uptime", "concord.v1.default.sync.uptime"] {
        assert!(
            errs.iter()
                .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject)),
            "{subject}: {errs:?}"
        );
    }
    // Its own replica's subjects are open to it: a hello is answered on world.deploy.
    let mut own = raw.subscribe("concord.v1.default.world.deploy").await.unwrap();
    raw.flush().await.unwrap();
    let hello = concord_core::worlddoc::WorldReplica::new("deploy").hello();
    raw.publish("concord.v1.default.sync.deploy", hello.into())
        .await
        .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut own))
        .await
        .expect("the coordinator answers the replica")
        .unwrap();
    assert!(frame.payload.starts_with(b"CWS"));
    let js = async_nats::jetstream::new(raw.clone());
    assert!(
        tokio::time::timeout(Duration::from_secs(3), js.get_stream("CONCORD_LOG"))
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "agents have no JetStream API"
    );

    // An operator approves and reads the log with its own credentials.
    let mut alice = ConcordClient::connect(&url, &creds(seed("operator", "alice")), "default", Some("_INBOX_alice"))
        .await
        .unwrap();
    let status = alice.query("alice", &concord_nats::wire::Query::Status).await.unwrap();
    assert!(matches!(status, concord_nats::wire::Answer::Status(_)));
    let mut kinds = Vec::new();
    read_log(&alice.nats, "CONCORD_LOG", 1, false, |_, p| {
        for r in serde_json::from_slice::<Batch>(p).unwrap().records {
            kinds.push(concord_nats::log::record_kind(&r).0.to_string() + ":" + concord_nats::log::record_kind(&r).1);
        }
        true
    })
    .await
    .unwrap();
    assert!(kinds.contains(&"intent:deploy".to_string()), "{kinds:?}");
    assert!(
        !kinds.iter().any(|k| k == "intent:uptime" || k.starts_with("control:")),
        "nothing the deploy agent sent as someone else reached the coordinator: {kinds:?}"
    );
    // An operator cannot propose as an agent.
    alice.timeout = Duration::from_secs(1);
    let as_agent = alice.propose("deploy", &example("restart-api")).await;
    assert!(
        matches!(
            as_agent,
            Err(ClientError::TimedOut(_) | ClientError::Nats(_) | ClientError::NoCoordinator(_))
        ),
        "{as_agent:?}"
    );
}
