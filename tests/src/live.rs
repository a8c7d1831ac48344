//! Live fixtures: a real `nats-server` on a free port and the coordinator
//! daemon running against it in this process, stopped and restarted at will.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use concord_nats::client::ConcordClient;
use concord_nats::config::{Credentials, RuntimeConfig};
use concord_nats::runtime::{Health, run};
use concord_testkit::{NatsCluster, NatsServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The workspace root.
pub fn root() -> PathBuf {
    concord_testkit::workspace_root()
}

/// A NATS server and a coordinator on it.
#[derive(Debug)]
pub struct Live {
    /// The server (in a cluster, the first node).
    pub server: NatsServer,
    /// In a cluster, the other nodes.
    pub peers: Vec<NatsServer>,
    /// The coordinator's configuration.
    pub cfg: RuntimeConfig,
    /// Its health flags.
    pub health: Arc<Health>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), concord_nats::runtime::RuntimeError>>>,
}

impl Live {
    /// The shipped policy and example world, a fresh server, a running coordinator.
    pub async fn start() -> Live {
        Live::start_with(|_| {}).await
    }

    /// As [`Live::start`], with the configuration adjusted by `f`.
    pub async fn start_with(f: impl FnOnce(&mut RuntimeConfig)) -> Live {
        Live::start_on(NatsServer::start(), f).await
    }

    /// A coordinator on `server`, with the configuration adjusted by `f`.
    pub async fn start_on(server: NatsServer, f: impl FnOnce(&mut RuntimeConfig)) -> Live {
        let mut live = Live::start_on_unstarted(server, f);
        live.up().await;
        live
    }

    /// A coordinator on a JetStream cluster, its log and buckets replicated
    /// on every node, with the configuration adjusted by `f`.
    pub async fn start_on_cluster(cluster: NatsCluster, f: impl FnOnce(&mut RuntimeConfig)) -> Live {
        let urls = cluster.urls();
        wait_jetstream(&urls).await;
        let replicas = cluster.nodes.len();
        let mut nodes = cluster.nodes.into_iter();
        let server = nodes.next().expect("a cluster has nodes");
        let peers: Vec<NatsServer> = nodes.collect();
        let mut live = Live::start_on_unstarted(server, |cfg| {
            cfg.nats = urls.split(',').map(str::to_string).collect();
            cfg.log.replicas = replicas;
            f(cfg);
        });
        live.peers = peers;
        live.up().await;
        live
    }

    fn start_on_unstarted(server: NatsServer, f: impl FnOnce(&mut RuntimeConfig)) -> Live {
        let mut cfg = RuntimeConfig {
            log: concord_nats::config::LogConfig {
                max_bytes: 64 * 1024 * 1024,
                ..Default::default()
            },
            nats: vec![server.url()],
            policy: Some(root().join("config/policy.toml")),
            world: Some(root().join("config/examples/world.toml")),
            ..RuntimeConfig::default()
        };
        f(&mut cfg);
        Live {
            server,
            peers: Vec::new(),
            cfg,
            health: Arc::new(Health::default()),
            stop: None,
            task: None,
        }
    }

    /// The URLs of every node, comma-separated.
    pub fn urls(&self) -> String {
        self.cfg.nats.join(",")
    }

    /// Starts the coordinator and waits until it is ready.
    pub async fn up(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        self.health = Arc::new(Health::default());
        let task = tokio::spawn(run(self.cfg.clone(), self.health.clone(), async {
            let _ = rx.await;
        }));
        self.stop = Some(tx);
        self.task = Some(task);
        for _ in 0..400 {
            if self.health.ready.load(Ordering::SeqCst) {
                return;
            }
            if self.task.as_ref().is_some_and(|t| t.is_finished()) {
                let r = self.task.take().unwrap().await;
                panic!("the coordinator stopped while starting: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the coordinator did not become ready");
    }

    /// Stops the coordinator cleanly (its open batch reaches the log).
    pub async fn down(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("the coordinator stops");
            r.expect("the task ends").expect("the coordinator ends without error");
        }
    }

    /// Drops the coordinator without letting it finish anything (as a crash would).
    pub fn crash(&mut self) {
        self.stop.take();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// A client speaking as `who` (replies to its own inbox prefix).
    pub async fn client(&self, who: &str) -> ConcordClient {
        let inbox = format!("_INBOX_{who}");
        ConcordClient::connect(&self.urls(), &Credentials::default(), &self.cfg.domain, Some(&inbox))
            .await
            .expect("connect")
    }

    /// A raw NATS connection.
    pub async fn nats(&self) -> async_nats::Client {
        async_nats::connect(self.cfg.nats.clone()).await.expect("connect")
    }
}

/// Waits until JetStream answers on `urls` (a cluster elects its meta leader first).
pub async fn wait_jetstream(urls: &str) {
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(concord_nats::config::url_list(&[urls]))
        .await
        .expect("connect");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // The raw API (the client's account-info type wants fields 2.9 lacks).
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), nats.request("$JS.API.INFO", "".into())).await
            && serde_json::from_slice::<serde_json::Value>(&m.payload).is_ok_and(|v| v.get("error").is_none())
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "JetStream did not become available on {urls}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An example plan's JSON bytes.
pub fn example(name: &str) -> Vec<u8> {
    std::fs::read(root().join("config/examples").join(format!("{name}.json"))).expect("example plan")
}

/// A TCP relay between one client and the server that a test can cut,
/// stall and heal: cut, the client's connection drops (as when a peer's
/// host closes it); stalled, the connection stays open and carries nothing
/// (as in a network partition, which neither end notices until its pings go
/// unanswered). The server and everyone else stay up.
#[derive(Debug)]
pub struct Relay {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    stalled: tokio::sync::watch::Sender<bool>,
    links: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

/// Copies `from` to `to`, holding what it read while the relay is stalled
/// (as a partitioned network holds it in the sender's retransmission queue).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    /// Relays to the server on `server_port`.
    pub async fn to(server_port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let port = listener.local_addr().expect("local address").port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (stalled, _) = tokio::sync::watch::channel(false);
        let links = Arc::new(std::sync::Mutex::new(Vec::<JoinHandle<()>>::new()));
        let (o, s, l) = (open.clone(), stalled.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    // Cut: the connection is dropped at once.
                    continue;
                }
                let (up, down) = (s.subscribe(), s.subscribe());
                let link = tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", server_port)).await {
                        let (client_rx, client_tx) = client.into_split();
                        let (server_rx, server_tx) = server.into_split();
                        // Either side closing closes both.
                        tokio::select! {
                            _ = pipe(client_rx, server_tx, up) => {}
                            _ = pipe(server_rx, client_tx, down) => {}
                        }
                    }
                });
                l.lock().expect("links lock").push(link);
            }
        });
        Relay {
            port,
            open,
            stalled,
            links,
            accept,
        }
    }

    /// The URL a client connects to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every relayed connection and refuses new ones until [`Relay::heal`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().expect("links lock").drain(..) {
            link.abort();
        }
    }

    /// Keeps every connection open but carries nothing either way until
    /// [`Relay::heal`], which delivers what was held.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Relays again (what a stall held goes through).
    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.stalled.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// One `set` intent on its own path `fleet/node-<i>/weight`, lineage
/// `<tag>-<i>` and idempotency key `<tag>k-<i>`.
pub fn node_intent(tag: &str, i: usize) -> Vec<u8> {
    serde_json::json!({
        "protocol": 1, "lineage": format!("{tag}-{i}"), "version": 1, "idempotency_key": format!("{tag}k-{i}"),
        "goal": "tune a node",
        "steps": [{ "id": "s1", "kind": "set", "path": format!("fleet/node-{i}/weight"), "args": { "value": i },
                    "confidence": 0.9, "compensation": { "mode": "restore" } }]
    })
    .to_string()
    .into_bytes()
}

/// Verdicts by intent number, filled in as answers come.
pub type Answers = Arc<std::sync::Mutex<std::collections::BTreeMap<usize, concord_proto::Verdict>>>;

/// Proposes `node_intent(tag, 0..n)` in turn as agent `newbie` over `urls`,
/// each retried under its key until answered (at most `patience` each).
pub fn spawn_proposer(
    urls: String,
    tag: &'static str,
    n: usize,
    patience: Duration,
    answers: Answers,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = ConcordClient::connect(&urls, &Credentials::default(), "default", Some("_INBOX_newbie"))
            .await
            .unwrap();
        c.timeout = Duration::from_millis(1500);
        for i in 0..n {
            let deadline = std::time::Instant::now() + patience;
            loop {
                match c.propose("newbie", &node_intent(tag, i)).await {
                    Ok(d) => {
                        answers.lock().unwrap().insert(i, d.verdict);
                        break;
                    }
                    Err(e) => {
                        assert!(std::time::Instant::now() < deadline, "intent {i} never answered: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// How many `decided` events each lineage has in the log, and its last sequence.
pub async fn decisions_per_plan(
    nats: &async_nats::Client,
    stream: &str,
) -> (std::collections::BTreeMap<String, usize>, u64) {
    use concord_core::coordinator::{Event, Record};
    let mut decided = std::collections::BTreeMap::<String, usize>::new();
    let mut last = 0;
    concord_nats::client::read_log(nats, stream, 1, false, |seq, p| {
        last = seq;
        for r in serde_json::from_slice::<concord_nats::log::Batch>(p).unwrap().records {
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
    (decided, last)
}

/// Waits until the server has read everything `nats` sent before, its
/// subscriptions included (`flush` only writes them out): a request nobody
/// answers comes back as "no responders" only after that.
pub async fn synced(nats: &async_nats::Client) {
    let r = nats.request("concord-tests.synced", "".into()).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders),
        "a request nobody answers: {r:?}"
    );
}
