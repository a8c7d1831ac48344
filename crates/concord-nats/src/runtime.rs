//! The coordinator daemon: one task owns the [`Coordinator`], drives it from
//! the bus, and performs the effects it returns — after the log has them.
//!
//! The loop, in priority order: operators' commands (a lane of their own, so
//! a halt overtakes queued intents), the log's acks, executors' outcomes,
//! timers, then agents' requests and replicas' world sync frames (two lanes
//! that take turns). The world document's writes are held until something
//! reads it (each costs an Automerge change): a replica's frame or a status
//! query that finds many held waits while the loop applies a few per turn.
//! Each input is handled at once (the core is fast) and its record joins the
//! *open batch*; while one batch is being appended the next one fills (group commit: one append, one ack, one fsync
//! carries many decisions). When an append is acknowledged its replies and
//! dispatches go out; nothing leaves before its events are in the log. An
//! append that fails (a deposed writer, a lost connection, a full stream)
//! drops the in-memory state: the coordinator restores from snapshot + log,
//! answers nothing it had not logged, and goes on.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;

use opentelemetry::KeyValue;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{Client, Subject};
use bytes::Bytes;
use concord_core::coordinator::{Coordinator, Effect, Event, Genesis, Input, RECORD_VERSION, Record, Reply};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_core::worlddoc::{Frame, SyncError};
use concord_proto::coord::{Notice, StepDispatch, StepOutcome, StepResult};
use concord_proto::{Short, decode_intent, decode_observation};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::RuntimeConfig;
use crate::follower::{Follower, Rebuilt, Sealed};
use crate::log::{GENESIS_PREV, Signer, batch_subject};
use crate::notify::{NoticeBacklog, Notifier};
use crate::store::{Head, Store, StoreError};
use crate::subjects::{Addressed, Subjects};
use crate::telemetry::{self, PlanTraces, Telemetry, TraceContext};
use crate::wire::{Answer, ErrorReply, Query, Status, WorldStatus};
use crate::worldsync::{PART_HEADER, Replicas, parts};

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The NATS connection could not be made.
    #[error("cannot connect to NATS at {urls}: {detail}")]
    Connect {
        /// The URLs.
        urls: String,
        /// Why.
        detail: String,
    },
    /// The log or its companions failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log does not verify or cannot be applied.
    #[error("recovery failed: {0}")]
    Recovery(String),
    /// The configuration cannot be used.
    #[error("configuration: {0}")]
    Config(String),
    /// A subscription failed.
    #[error("cannot subscribe to {subject}: {detail}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        detail: String,
    },
}

/// What the health endpoints read.
#[derive(Debug, Default)]
pub struct Health {
    /// Connected, log writable, state recovered: the coordinator admits.
    pub ready: AtomicBool,
    /// Wall-clock ms of the loop's last turn (liveness).
    pub beat_ms: AtomicU64,
    /// The last log sequence acknowledged.
    pub log_seq: AtomicU64,
}

/// Effect boundaries where the fault tests kill the process (as SIGKILL
/// would: no cleanup, nothing flushed). Set with the environment variable
/// `CONCORD_CRASH_AT=<point>:<n>` — the n-th time the point is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// An append was acknowledged; its replies and dispatches were not sent.
    AfterAppend,
    /// A dispatch was sent; its outcome was not handled.
    AfterDispatch,
    /// A snapshot was taken and is being stored.
    DuringSnapshot,
}

#[derive(Debug)]
pub(crate) struct CrashHook {
    pub(crate) point: CrashPoint,
    left: AtomicU64,
}

impl CrashHook {
    fn from_env() -> Option<Arc<CrashHook>> {
        let v = std::env::var("CONCORD_CRASH_AT").ok()?;
        let (p, n) = v.split_once(':').unwrap_or((v.as_str(), "1"));
        let point = match p {
            "after_append" => CrashPoint::AfterAppend,
            "after_dispatch" => CrashPoint::AfterDispatch,
            "during_snapshot" => CrashPoint::DuringSnapshot,
            _ => {
                warn!("CONCORD_CRASH_AT={v}: unknown point; ignored");
                return None;
            }
        };
        warn!("test hook: the process will abort at {point:?} #{n}");
        Some(Arc::new(CrashHook {
            point,
            left: AtomicU64::new(n.parse().unwrap_or(1)),
        }))
    }

    pub(crate) fn reached(hook: &Option<Arc<CrashHook>>, point: CrashPoint) {
        if let Some(h) = hook
            && h.point == point
            && h.left.fetch_sub(1, Ordering::SeqCst) == 1
        {
            eprintln!("concord: test hook: aborting at {point:?}");
            std::process::abort();
        }
    }
}

/// Connects to NATS with the configured credentials.
pub async fn connect(cfg: &RuntimeConfig, name: &str) -> Result<Client, RuntimeError> {
    connect_counting(cfg, name, Arc::default()).await
}

/// Connects, counting the messages the client drops because a
/// subscription's buffer was full (a slow consumer) in `dropped`.
async fn connect_counting(cfg: &RuntimeConfig, name: &str, dropped: Arc<AtomicU64>) -> Result<Client, RuntimeError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .subscription_capacity(cfg.limits.subscription_capacity)
        .retry_on_initial_connect()
        .event_callback(move |ev| {
            let dropped = dropped.clone();
            async move {
                match ev {
                    async_nats::Event::Disconnected => warn!("nats: disconnected"),
                    async_nats::Event::Connected => info!("nats: connected"),
                    async_nats::Event::SlowConsumer(sid) => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("concord_slow_consumer_total").increment(1);
                        error!(sid, "nats: slow consumer: messages were dropped");
                    }
                    other => debug!("nats: {other}"),
                }
            }
        });
    if let Some(seed) = &cfg.credentials.nkey_seed_file {
        let seed = std::fs::read_to_string(seed).map_err(|e| RuntimeError::Connect {
            urls: cfg.nats.join(","),
            detail: format!("cannot read {}: {e}", seed.display()),
        })?;
        opts = opts.nkey(seed.trim().to_string());
    } else if let (Some(u), Some(p)) = (&cfg.credentials.user, &cfg.credentials.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    let urls = cfg.nats.join(",");
    let connect = opts.connect(crate::config::url_list(&cfg.nats));
    let client = tokio::time::timeout(Duration::from_secs(30), connect)
        .await
        .map_err(|_| RuntimeError::Connect {
            urls: urls.clone(),
            detail: "timed out".into(),
        })?
        .map_err(|e| RuntimeError::Connect {
            urls: urls.clone(),
            detail: e.to_string(),
        })?;
    Ok(client)
}

/// Runs the coordinator until `shutdown` resolves.
/// The policy and world files are read when the log is empty (the genesis)
/// and the policy again on every start (a changed policy is logged).
pub async fn run(
    cfg: RuntimeConfig,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RuntimeError> {
    let dropped = Arc::new(AtomicU64::new(0));
    let client = connect_counting(
        &cfg,
        &format!("concord-coordinator-{}", cfg.coordinator),
        dropped.clone(),
    )
    .await?;
    let store = Store::open(async_nats::jetstream::new(client.clone()), &cfg).await?;
    let signer = match &cfg.log.signing_seed_file {
        Some(p) => {
            let seed =
                std::fs::read_to_string(p).map_err(|e| RuntimeError::Recovery(format!("{}: {e}", p.display())))?;
            Signer::from_seed(&seed).map_err(|e| RuntimeError::Recovery(format!("{}: {e}", p.display())))?
        }
        None => Signer::generate(),
    };
    let subjects = Subjects::new(&cfg.domain);
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(cfg.limits.inbound_queue_max);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Inbound>(1024);
    let (sync_tx, sync_rx) = mpsc::channel::<Inbound>(cfg.limits.sync_inbound_max);
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Input>();
    let telemetry = Arc::new(Telemetry::new(&cfg.telemetry).map_err(|e| RuntimeError::Config(e.to_string()))?);
    let intake = Arc::new(Intake::new(&cfg, client.clone(), subjects.clone(), telemetry.clone()));
    let mut readers = Vec::new();
    for domain in ["intent", "lease", "observe", "ctl", "query", "sync"] {
        let subject = subjects.all(domain);
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| RuntimeError::Subscribe {
                subject: subject.clone(),
                detail: e.to_string(),
            })?;
        readers.push(tokio::spawn(intake.clone().read(
            sub,
            in_tx.clone(),
            ctl_tx.clone(),
            sync_tx.clone(),
        )));
    }
    let (frames_tx, frames_rx) = mpsc::channel::<(String, Vec<u8>)>(cfg.limits.sync_outbound_max);
    let sender = tokio::spawn(publish_frames(client.clone(), subjects.clone(), frames_rx));
    let mut daemon = Daemon {
        crash: CrashHook::from_env(),
        replicas: Replicas::new(
            cfg.limits.sync_peers_max,
            Duration::from_millis(cfg.limits.sync_idle_ms),
        ),
        frames_tx,
        cfg,
        client,
        store,
        signer,
        subjects,
        health,
        out_tx,
        in_rx,
        ctl_rx,
        sync_rx,
        sync_first: false,
        out_rx,
        dropped,
        dropped_logged: 0,
        recent_notices: NoticeBacklog::default(),
        follower: None,
        telemetry: telemetry.clone(),
        plan_traces: PlanTraces::default(),
    };
    // Fused: once it resolved it is never polled again (a failed drain
    // during shutdown must not wait on it a second time).
    let shutdown = futures::FutureExt::fuse(shutdown);
    tokio::pin!(shutdown);
    let mut failures = 0u32;
    let result = loop {
        // While the server is away (a restart, a partition) recovery cannot
        // read the log: keep trying, not ready, until it can.
        let recovered = tokio::select! {
            r = daemon.recover() => r,
            _ = shutdown.as_mut() => break Ok(()),
        };
        let mut state = match recovered {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e @ RuntimeError::Recovery(_)) => break Err(e),
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis((100u64 << failures.min(5)).min(2_000));
                warn!("recovery failed ({e}); trying again in {} ms", wait.as_millis());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.as_mut() => break Ok(()),
                }
            }
        };
        daemon.health.ready.store(true, Ordering::SeqCst);
        let outcome = daemon.serve(&mut state, &mut shutdown).await;
        if futures::future::FusedFuture::is_terminated(&*shutdown) {
            daemon.health.ready.store(false, Ordering::SeqCst);
            break outcome;
        }
        daemon.health.ready.store(false, Ordering::SeqCst);
        match outcome {
            Ok(()) => break Ok(()),
            Err(e) => {
                error!("{e}; restoring from snapshot and log");
                metrics::counter!("concord_restores_total").increment(1);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    for r in readers {
        r.abort();
    }
    if let Some(f) = daemon.follower.take() {
        f.stop(Duration::from_secs(5)).await;
    }
    drop(daemon.frames_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), sender).await;
    let _ = daemon.client.flush().await;
    // The exporter's thread blocks while it flushes what it holds.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

/// A request or message waiting for the core.
#[derive(Debug)]
enum Inbound {
    /// An input for the core; `reply` is where its answer goes.
    Input {
        input: Input,
        reply: Option<Subject>,
        received: Instant,
        /// The request's span, continuing the caller's trace.
        trace: Option<TraceContext>,
    },
    /// A read-only question from `caller`.
    Query {
        caller: String,
        query: Query,
        reply: Option<Subject>,
    },
    /// A world sync frame from `agent`'s replica (its header already checked).
    Sync {
        agent: String,
        payload: Bytes,
        reply: Option<Subject>,
    },
}

/// Publishes frames to replicas, in the order the loop released them (one
/// task, so a replica's frames never overtake each other). A frame larger
/// than the server's `max_payload` goes in parts (see [`crate::worldsync`]).
async fn publish_frames(client: Client, subjects: Subjects, mut rx: mpsc::Receiver<(String, Vec<u8>)>) {
    let mut frame_id = 0u64;
    while let Some((agent, frame)) = rx.recv().await {
        frame_id += 1;
        let part_max = client
            .server_info()
            .max_payload
            .saturating_sub(crate::worldsync::PART_OVERHEAD_BYTES)
            .max(1024);
        let subject = subjects.world(&agent);
        metrics::counter!("concord_world_sync_frames_out_total").increment(1);
        metrics::counter!("concord_world_sync_bytes_out_total").increment(frame.len() as u64);
        for (part, bytes) in parts(&frame, part_max, frame_id) {
            let sent = match part {
                None => client.publish(subject.clone(), bytes.into()).await,
                Some(p) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(PART_HEADER, p.encode().as_str());
                    client
                        .publish_with_headers(subject.clone(), headers, bytes.into())
                        .await
                }
            };
            if let Err(e) = sent {
                metrics::counter!("concord_world_sync_dropped_total", "reason" => "publish").increment(1);
                debug!(agent, "a world sync frame was not published: {e}");
                break;
            }
        }
    }
}

/// Decodes bus messages into inputs, off the core task, and answers bad
/// input, floods and overload at once.
struct Intake {
    subjects: Subjects,
    client: Client,
    payload_bytes_max: usize,
    sync_frame_bytes_max: usize,
    retry_after_ms: u64,
    limiter: governor::DefaultKeyedRateLimiter<String>,
    sync_limiter: governor::DefaultKeyedRateLimiter<String>,
    telemetry: Arc<Telemetry>,
}

impl Intake {
    fn new(cfg: &RuntimeConfig, client: Client, subjects: Subjects, telemetry: Arc<Telemetry>) -> Intake {
        let per_s = NonZeroU32::new(cfg.limits.intents_per_agent_per_s.max(1)).expect("nonzero");
        let burst = NonZeroU32::new(cfg.limits.intents_burst.max(1)).expect("nonzero");
        let sync_per_s = NonZeroU32::new(cfg.limits.sync_frames_per_agent_per_s.max(1)).expect("nonzero");
        Intake {
            telemetry,
            subjects,
            client,
            payload_bytes_max: cfg.limits.payload_bytes_max,
            sync_frame_bytes_max: cfg.limits.sync_frame_bytes_max,
            retry_after_ms: cfg.limits.retry_after_ms,
            limiter: governor::RateLimiter::keyed(governor::Quota::per_second(per_s).allow_burst(burst)),
            sync_limiter: governor::RateLimiter::keyed(governor::Quota::per_second(sync_per_s)),
        }
    }

    async fn reject(&self, reply: &Option<Subject>, err: ErrorReply) {
        metrics::counter!("concord_bad_input_total", "code" => err.error.code.clone()).increment(1);
        match reply {
            Some(r) => {
                let _ = self.client.publish(r.clone(), err.to_bytes().into()).await;
            }
            None => warn!(code = %err.error.code, "dropped a message without a reply subject: {}", err.error.message),
        }
    }

    async fn read(
        self: Arc<Self>,
        mut sub: async_nats::Subscriber,
        tx: mpsc::Sender<Inbound>,
        ctl: mpsc::Sender<Inbound>,
        sync: mpsc::Sender<Inbound>,
    ) {
        let mut since_gc = 0u32;
        while let Some(mut msg) = sub.next().await {
            since_gc += 1;
            if since_gc >= 10_000 {
                since_gc = 0;
                self.limiter.retain_recent();
                self.sync_limiter.retain_recent();
            }
            let received = Instant::now();
            let reply = msg.reply.clone();
            let headers = msg.headers.take();
            let Some(addressed) = self.subjects.parse(&msg.subject) else {
                self.reject(
                    &reply,
                    ErrorReply::new("unknown_subject", format!("`{}` is not a concord subject", msg.subject)),
                )
                .await;
                continue;
            };
            let bytes_max = if matches!(addressed, Addressed::Sync(_)) {
                self.sync_frame_bytes_max
            } else {
                self.payload_bytes_max
            };
            if msg.payload.len() > bytes_max {
                self.reject(
                    &reply,
                    ErrorReply::new(
                        "payload_too_large",
                        format!("payload is {} bytes; at most {bytes_max} allowed", msg.payload.len()),
                    ),
                )
                .await;
                continue;
            }
            // Observations and replicas' sync frames are published, not requests.
            let needs_reply = !matches!(addressed, Addressed::Observe(_) | Addressed::Sync(_));
            if needs_reply && reply.is_none() {
                self.reject(
                    &None,
                    ErrorReply::new(
                        "no_reply_subject",
                        format!("a request on `{}` needs a reply subject", msg.subject),
                    ),
                )
                .await;
                continue;
            }
            let (inbound, priority) = match addressed {
                Addressed::Intent(agent) => {
                    if self.limiter.check_key(&agent).is_err() {
                        self.reject(
                            &reply,
                            ErrorReply::retry(
                                "rate_limited",
                                format!("agent `{agent}` sends intents faster than its limit"),
                                self.retry_after_ms,
                            ),
                        )
                        .await;
                        continue;
                    }
                    match decode_intent(&msg.payload) {
                        Ok(intent) => (
                            Inbound::Input {
                                input: Input::Intent {
                                    request: 0,
                                    agent,
                                    intent,
                                },
                                reply,
                                received,
                                trace: None,
                            },
                            false,
                        ),
                        Err(e) => {
                            self.reject(&reply, ErrorReply::decode(&e)).await;
                            continue;
                        }
                    }
                }
                Addressed::Lease(agent) => match concord_proto::error::decode_json(&msg.payload) {
                    Ok(lease) => (
                        Inbound::Input {
                            input: Input::Lease {
                                request: 0,
                                agent,
                                lease,
                            },
                            reply,
                            received,
                            trace: None,
                        },
                        false,
                    ),
                    Err(e) => {
                        self.reject(&reply, ErrorReply::decode(&e)).await;
                        continue;
                    }
                },
                Addressed::Observe(agent) => match decode_observation(&msg.payload) {
                    Ok(observation) => (
                        Inbound::Input {
                            input: Input::Observe { agent, observation },
                            reply,
                            received,
                            trace: None,
                        },
                        false,
                    ),
                    Err(e) => {
                        self.reject(&reply, ErrorReply::decode(&e)).await;
                        continue;
                    }
                },
                Addressed::Control(operator) => match concord_proto::error::decode_json(&msg.payload) {
                    Ok(control) => (
                        Inbound::Input {
                            input: Input::Control {
                                request: 0,
                                operator,
                                control,
                            },
                            reply,
                            received,
                            trace: None,
                        },
                        true,
                    ),
                    Err(e) => {
                        self.reject(&reply, ErrorReply::decode(&e)).await;
                        continue;
                    }
                },
                Addressed::Query(caller) => match concord_proto::error::decode_json(&msg.payload) {
                    Ok(query) => (Inbound::Query { caller, query, reply }, false),
                    Err(e) => {
                        self.reject(&reply, ErrorReply::decode(&e)).await;
                        continue;
                    }
                },
                Addressed::Sync(agent) => {
                    if self.sync_limiter.check_key(&agent).is_err() {
                        metrics::counter!("concord_world_sync_dropped_total", "reason" => "rate_limited").increment(1);
                        self.reject(
                            &reply,
                            ErrorReply::retry(
                                "rate_limited",
                                format!("agent `{agent}` sends world sync frames faster than its limit"),
                                self.retry_after_ms,
                            ),
                        )
                        .await;
                        continue;
                    }
                    // The header is checked here, off the core task; the
                    // message inside is the core's to read.
                    if let Err(e) = Frame::decode(&msg.payload) {
                        metrics::counter!("concord_world_sync_dropped_total", "reason" => "frame").increment(1);
                        self.reject(&reply, ErrorReply::new("decode", format!("agent `{agent}`: {e}")))
                            .await;
                        continue;
                    }
                    (
                        Inbound::Sync {
                            agent,
                            payload: msg.payload,
                            reply,
                        },
                        false,
                    )
                }
            };
            let mut inbound = inbound;
            if let Inbound::Input { input, trace, .. } = &mut inbound {
                let named = match input {
                    Input::Intent { agent, intent, .. } => Some((
                        "concord.intent",
                        vec![
                            KeyValue::new("concord.caller", agent.clone()),
                            KeyValue::new("concord.plan", intent.lineage.to_string()),
                            KeyValue::new("concord.plan_version", i64::from(intent.version)),
                        ],
                    )),
                    Input::Lease { agent, .. } => {
                        Some(("concord.lease", vec![KeyValue::new("concord.caller", agent.clone())]))
                    }
                    Input::Control { operator, .. } => Some((
                        "concord.control",
                        vec![KeyValue::new("concord.caller", operator.clone())],
                    )),
                    _ => None,
                };
                if let Some((name, attrs)) = named {
                    *trace = Some(self.telemetry.request_span(name, headers.as_ref(), attrs));
                }
            }
            let lane = if priority {
                &ctl
            } else if matches!(inbound, Inbound::Sync { .. }) {
                &sync
            } else {
                &tx
            };
            if let Err(mpsc::error::TrySendError::Full(inbound)) = lane.try_send(inbound) {
                let reply = match inbound {
                    Inbound::Input { reply, .. } | Inbound::Query { reply, .. } | Inbound::Sync { reply, .. } => reply,
                };
                metrics::counter!("concord_busy_total").increment(1);
                self.reject(
                    &reply,
                    ErrorReply::retry("busy", "the coordinator's inbound queue is full", self.retry_after_ms),
                )
                .await;
            }
        }
    }
}

/// The coordinator's live state between two restores.
struct State {
    coord: Coordinator,
    incarnation: u64,
    /// Last acknowledged sequence and its chain hash.
    seq: u64,
    hash: String,
    /// Coordinator time, never going back.
    last_now: u64,
    next_request: u64,
    waiting: HashMap<u64, Waiter>,
    open: OpenBatch,
    inflight: Option<Append>,
    batches: u64,
    /// Which agent each live lineage belongs to, for its notices.
    notifier: Notifier,
    /// The world document (id, heads) replicas were last pushed; `None`
    /// after a restore, so every connected replica hears from this state.
    pushed: Option<([u8; 16], Vec<String>)>,
    /// When the last push went out, and when a held-back one is due.
    last_push: Option<Instant>,
    push_due: Option<Instant>,
    /// Readers of the world document waiting for it to catch up with its
    /// held writes (see [`Daemon::park`]).
    parked: Vec<Inbound>,
}

struct Waiter {
    reply: Subject,
    received: Option<Instant>,
    trace: Option<TraceContext>,
}

#[derive(Default)]
struct OpenBatch {
    records: Vec<Record>,
    effects: Vec<Effect>,
    /// Notices to agents, sent once the batch is in the log.
    notices: Vec<(String, Notice)>,
    /// World sync frames to replicas (agent, frame), made from a document
    /// that holds this batch's writes: sent once the batch is in the log.
    frames: Vec<(String, Vec<u8>)>,
    /// The records' JSON array as the log message will carry it (without
    /// its closing bracket): each record is serialized once, here.
    json: Vec<u8>,
    /// It holds an operator's command (a halt, say): it is sealed as soon as
    /// the append before it is in, without taking more agents' input.
    urgent: bool,
}

impl OpenBatch {
    /// Adds a record to the batch.
    fn push(&mut self, record: Record) {
        self.json.push(if self.records.is_empty() { b'[' } else { b',' });
        serde_json::to_writer(&mut self.json, &record).expect("records serialize");
        self.records.push(record);
    }
}

/// Held writes applied per loop turn while a reader of the world document
/// waits (each is one Automerge change, some tens of µs); see
/// `limits.sync_catch_up_held_max`.
const CATCH_UP_WRITES: usize = 32;

struct Append {
    /// The append itself, polled by the loop (no task of its own: its ack
    /// wakes the loop directly).
    done: std::pin::Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send>>,
    effects: Vec<Effect>,
    halts_changed: bool,
    /// Its link in the chain and its records: the snapshot follower's, once
    /// the batch is in.
    sealed: Sealed,
    notices: Vec<(String, Notice)>,
    frames: Vec<(String, Vec<u8>)>,
}

struct Daemon {
    crash: Option<Arc<CrashHook>>,
    /// Connected world replicas; kept across restores, so they hear from
    /// the restored state at once.
    replicas: Replicas,
    /// Frames released to the publishing task.
    frames_tx: mpsc::Sender<(String, Vec<u8>)>,
    cfg: RuntimeConfig,
    client: Client,
    store: Store,
    signer: Signer,
    subjects: Subjects,
    health: Arc<Health>,
    out_tx: mpsc::UnboundedSender<Input>,
    in_rx: mpsc::Receiver<Inbound>,
    ctl_rx: mpsc::Receiver<Inbound>,
    /// Replicas' sync frames: a lane of their own that takes turns with
    /// agents' requests, so a replica's answer never waits behind a burst of
    /// observations (while it waits, the document it must catch up with grows).
    sync_rx: mpsc::Receiver<Inbound>,
    /// Whose turn it is between the two lanes.
    sync_first: bool,
    out_rx: mpsc::UnboundedReceiver<Input>,
    /// Messages the client dropped for a full subscription buffer.
    dropped: Arc<AtomicU64>,
    /// How many of them the log already tells.
    dropped_logged: u64,
    /// Each agent's latest notices, for catching up (rebuilt on recovery).
    recent_notices: NoticeBacklog,
    /// Makes the snapshots, off the loop, from the batches the log holds
    /// (none when snapshots are off).
    follower: Option<Follower>,
    /// Makes the spans of dispatches.
    telemetry: Arc<Telemetry>,
    /// The decision span of each recent plan, which its dispatches continue;
    /// kept across restores (the plans are the same).
    plan_traces: PlanTraces,
}

/// The next input from agents: requests and replicas' sync frames take
/// turns when both lanes hold some.
async fn next_agent_input(
    requests: &mut mpsc::Receiver<Inbound>,
    sync: &mut mpsc::Receiver<Inbound>,
    sync_first: &mut bool,
) -> Option<Inbound> {
    let m = if *sync_first {
        tokio::select! {
            biased;
            Some(m) = sync.recv() => m,
            Some(m) = requests.recv() => m,
            else => return None,
        }
    } else {
        tokio::select! {
            biased;
            Some(m) = requests.recv() => m,
            Some(m) = sync.recv() => m,
            else => return None,
        }
    };
    *sync_first = !matches!(m, Inbound::Sync { .. });
    Some(m)
}

/// Publishes at once when the client's queue has room (the usual case: no
/// task to schedule), else from a task of its own.
fn publish_now(client: &Client, subject: Subject, headers: Option<async_nats::HeaderMap>, payload: Bytes) {
    use futures::FutureExt;
    let sent = match &headers {
        Some(h) => client
            .publish_with_headers(subject.clone(), h.clone(), payload.clone())
            .now_or_never(),
        None => client.publish(subject.clone(), payload.clone()).now_or_never(),
    };
    if sent.is_none() {
        // Not sent (a publish dropped before it completes sends nothing).
        let client = client.clone();
        tokio::spawn(async move {
            let _ = match headers {
                Some(h) => client.publish_with_headers(subject, h, payload).await,
                None => client.publish(subject, payload).await,
            };
        });
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Daemon {
    /// Rebuilds the state from the latest snapshot and the log after it,
    /// applying the recorded decisions, then appends a new incarnation (and a
    /// genesis on an empty log, a policy record if the policy changed) and
    /// sends the unanswered dispatches again.
    async fn recover(&mut self) -> Result<State, RuntimeError> {
        let started = Instant::now();
        let last = self.store.last_seq().await?;
        let rebuilt = Rebuilt::from_store(&self.store, last).await.map_err(|e| match e {
            StoreError::Apply(detail) => RuntimeError::Recovery(detail),
            other => RuntimeError::Store(other),
        })?;
        let Rebuilt {
            coord,
            verifier,
            incarnation,
            last_now,
            backlog,
            divergences,
            applied,
            ..
        } = rebuilt;
        let (seq, hash) = {
            let (s, h) = verifier.head();
            (s, h.to_string())
        };
        metrics::counter!("concord_recovery_divergences_total").increment(divergences);
        let mut state_records = Vec::new();
        let coord = match coord {
            Some(c) => c,
            None => {
                let policy = load_policy(&self.cfg)?;
                let world = load_world(&self.cfg)?;
                let genesis = Genesis {
                    record_version: RECORD_VERSION,
                    now_ms: wall_ms(),
                    coordinator: self.cfg.coordinator.clone(),
                    config: self.cfg.core.clone(),
                    policy: policy.config.clone(),
                    policy_hash: policy.hash.clone(),
                    world,
                };
                let c = Coordinator::from_genesis(&genesis)
                    .map_err(|e| RuntimeError::Recovery(format!("genesis policy: {e}")))?;
                state_records.push(Record::Genesis(Box::new(genesis)));
                c
            }
        };
        let mut state = State {
            coord,
            incarnation: incarnation + 1,
            seq,
            hash: if seq == 0 { GENESIS_PREV.to_string() } else { hash },
            last_now: last_now.max(wall_ms()),
            next_request: 1,
            waiting: HashMap::new(),
            open: OpenBatch::default(),
            inflight: None,
            batches: 0,
            notifier: Notifier::default(),
            pushed: None,
            last_push: None,
            push_due: None,
            parked: Vec::new(),
        };
        state.notifier = Notifier::from_coordinator(&state.coord);
        self.recent_notices = backlog;
        let now = state.last_now;
        // This process writes the world document under its own actor, so it
        // never reuses an (actor, seq) pair a replica may hold from the last one.
        state
            .coord
            .incarnate(state.incarnation)
            .map_err(|e| RuntimeError::Recovery(format!("incarnation: {e}")))?;
        state_records.push(Record::Incarnation {
            now_ms: now,
            coordinator: self.cfg.coordinator.clone(),
            incarnation: state.incarnation,
            core_version: concord_core::preview::CORE_VERSION.to_string(),
        });
        if let Some(path) = &self.cfg.policy {
            let policy = load_policy(&self.cfg)?;
            if policy.hash != state.coord.policy().hash {
                info!(policy = %path.display(), hash = %policy.hash, "loading a changed policy");
                state_records.push(Record::Policy {
                    now_ms: now,
                    policy: Box::new(policy.config.clone()),
                    policy_hash: policy.hash.clone(),
                });
                state.coord.set_policy(policy);
            }
        }
        for r in state_records {
            state.open.push(r);
        }
        self.seal(&mut state);
        let append = state
            .inflight
            .take()
            .expect("sealing a non-empty batch starts an append");
        let new_seq = append.done.await?;
        // The follower rebuilds what this recovery did (up to `seq`), then
        // follows every batch from this one on. A follower from before a
        // restore stops first: two would race to store snapshots.
        if let Some(old) = self.follower.take() {
            old.stop(Duration::from_secs(5)).await;
        }
        self.follower = (self.cfg.snapshots.every_records > 0).then(|| {
            Follower::spawn(
                self.store.clone(),
                seq,
                self.cfg.snapshots.every_records,
                self.cfg.snapshots.follower_records_max,
                self.crash.clone(),
            )
        });
        let hash = append.sealed.hash.clone();
        if let Some(f) = &self.follower {
            f.follow(new_seq, append.sealed);
        }
        state.seq = new_seq;
        state.hash = hash;
        self.health.log_seq.store(new_seq, Ordering::SeqCst);
        self.spawn_head(new_seq, state.hash.clone());
        let store = self.store.clone();
        let halts = state.coord.halts().to_vec();
        let domain = self.cfg.domain.clone();
        tokio::spawn(async move {
            let _ = store.put_halts(&domain, &halts).await;
        });
        for d in state.coord.outstanding_dispatches() {
            self.spawn_dispatch(d);
        }
        info!(
            records = applied,
            seq = new_seq,
            incarnation = state.incarnation,
            ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        Ok(state)
    }

    /// Serves until shutdown (Ok) or until the state must be restored (Err).
    async fn serve(
        &mut self,
        state: &mut State,
        shutdown: &mut std::pin::Pin<&mut futures::future::Fuse<impl Future<Output = ()>>>,
    ) -> Result<(), RuntimeError> {
        let mut beat = tokio::time::interval(Duration::from_millis(500));
        // Replicas kept across a restore hear from the restored state at once.
        self.push_world(state);
        loop {
            self.health.beat_ms.store(wall_ms(), Ordering::Relaxed);
            let timer_at = state.coord.next_timer();
            let sleep = async {
                match timer_at {
                    Some(at) => {
                        let wait = at.saturating_sub(wall_ms());
                        tokio::time::sleep(Duration::from_millis(wait)).await
                    }
                    None => std::future::pending().await,
                }
            };
            let appended = async {
                match state.inflight.as_mut() {
                    Some(a) => (&mut a.done).await,
                    None => std::future::pending().await,
                }
            };
            let push_due = state.push_due;
            let push = async {
                match push_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let room = state.open.records.len() < self.cfg.log.batch_records_max
                && state.open.json.len() < self.cfg.log.batch_bytes_max;
            // Operators' commands go ahead of queued input: once one waits in
            // the open batch, only more commands join it.
            let more = room && !state.open.urgent;
            let catching_up = !state.parked.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => {
                    // Let the open batch and the one in flight reach the log, then stop.
                    self.drain(state).await?;
                    return Ok(());
                }
                Some(m) = self.ctl_rx.recv(), if room => self.accept(state, m),
                result = appended => self.acked(state, result)?,
                Some(input) = self.out_rx.recv(), if more => {
                    self.handle(state, input, None, None, None);
                }
                _ = sleep, if more => {
                    let now = timer_at.unwrap_or(0).max(wall_ms());
                    state.last_now = state.last_now.max(now);
                    self.handle(state, Input::Tick, None, None, None);
                }
                _ = push => self.push_world(state),
                Some(m) = next_agent_input(&mut self.in_rx, &mut self.sync_rx, &mut self.sync_first), if more => {
                    self.accept(state, m)
                }
                _ = beat.tick() => self.sweep_replicas(state),
                // Frames wait for the document to catch up: a turn for it.
                _ = std::future::ready(()), if catching_up => {}
            }
            self.catch_up(state);
            self.log_drops(state);
            if state.inflight.is_none() && !state.open.records.is_empty() {
                self.push_world(state);
                self.seal(state);
            }
            metrics::gauge!("concord_plans_live").set(state.coord.plan_count() as f64);
            metrics::gauge!("concord_leases_held").set(state.coord.leases().held_count() as f64);
            metrics::gauge!("concord_halts").set(state.coord.halts().len() as f64);
        }
    }

    /// Puts messages a slow subscription dropped on the log: never silent.
    fn log_drops(&mut self, state: &mut State) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped <= self.dropped_logged {
            return;
        }
        let n = dropped - self.dropped_logged;
        self.dropped_logged = dropped;
        let now = state.last_now.max(wall_ms());
        state.last_now = now;
        let record = Record::Notice {
            now_ms: now,
            kind: "slow_consumer".into(),
            detail: format!(
                "the NATS client dropped {n} message(s): a subscription's buffer of {} was full \
                 (intents among them got no reply; raise limits.subscription_capacity)",
                self.cfg.limits.subscription_capacity
            ),
        };
        state.open.push(record);
    }

    /// Appends what is open and waits for every append to be acknowledged.
    async fn drain(&mut self, state: &mut State) -> Result<(), RuntimeError> {
        loop {
            if let Some(a) = state.inflight.as_mut() {
                let r = (&mut a.done).await;
                self.acked(state, r)?;
            }
            if state.open.records.is_empty() {
                return Ok(());
            }
            self.seal(state);
        }
    }

    fn accept(&mut self, state: &mut State, m: Inbound) {
        let Some(m) = self.park(state, m) else { return };
        match m {
            Inbound::Input {
                input,
                reply,
                received,
                trace,
            } => self.handle(state, input, reply, Some(received), trace),
            Inbound::Query { caller, query, reply } => {
                let bytes = self.answer(state, &caller, query);
                if let Some(r) = reply {
                    publish_now(&self.client, r, None, bytes.into());
                }
            }
            Inbound::Sync { agent, payload, reply } => self.sync_in(state, agent, &payload, reply),
        }
    }

    /// Whether `m` reads the world document (a replica's frame, a status
    /// query) while it holds too many unapplied writes to apply them at
    /// once: then it waits, in arrival order, while [`Daemon::catch_up`]
    /// applies them a few per turn. Returns `m` if it may go on now.
    fn park(&mut self, state: &mut State, m: Inbound) -> Option<Inbound> {
        let reads_document = matches!(
            m,
            Inbound::Sync { .. }
                | Inbound::Query {
                    query: Query::Status,
                    ..
                }
        );
        if !reads_document
            || (state.parked.is_empty()
                && state.coord.world_doc().held_applicable() <= self.cfg.limits.sync_catch_up_held_max)
        {
            return Some(m);
        }
        if state.parked.len() < self.cfg.limits.sync_inbound_max {
            state.parked.push(m);
            return None;
        }
        let err = ErrorReply::retry(
            "busy",
            "the world document is catching up with held writes",
            self.cfg.limits.retry_after_ms,
        );
        match m {
            Inbound::Sync { agent, reply, .. } => self.sync_refused(&reply, "catching_up", &agent, err),
            Inbound::Query { reply: Some(r), .. } => publish_now(&self.client, r, None, err.to_bytes().into()),
            _ => {}
        }
        None
    }

    /// The world document's held writes cost an Automerge change each and
    /// are applied only for a reader: while readers wait (see
    /// [`Daemon::park`]), a few are applied per turn. Once few are left, the
    /// waiting readers are served in the order they came.
    fn catch_up(&mut self, state: &mut State) {
        if state.parked.is_empty() {
            return;
        }
        let doc = state.coord.world_doc_mut();
        if doc.held_applicable() > self.cfg.limits.sync_catch_up_held_max {
            doc.apply_held(CATCH_UP_WRITES);
            return;
        }
        for m in std::mem::take(&mut state.parked) {
            self.accept(state, m);
        }
    }

    /// A frame from `agent`'s replica. The core takes it into the agent's
    /// session; a frame carrying changes is refused and counted and changes
    /// nothing. The answer, if any, is queued like any other frame.
    fn sync_in(&mut self, state: &mut State, agent: String, payload: &[u8], reply: Option<Subject>) {
        metrics::counter!("concord_world_sync_frames_in_total").increment(1);
        match self.replicas.seen(&agent, Instant::now()) {
            Ok(gone) => {
                for a in gone {
                    state.coord.world_doc_mut().sync_forget(&a);
                }
            }
            Err(full) => {
                self.sync_refused(
                    &reply,
                    "peers_full",
                    &agent,
                    ErrorReply::retry("busy", full.to_string(), 1_000),
                );
                return;
            }
        }
        match state.coord.world_doc_mut().sync_receive(&agent, payload) {
            Ok(_) => {}
            Err(e @ SyncError::ChangesRefused { .. }) => {
                metrics::counter!("concord_world_sync_changes_refused_total", "agent" => agent.clone()).increment(1);
                self.sync_refused(
                    &reply,
                    "changes",
                    &agent,
                    ErrorReply::new("changes_refused", e.to_string()),
                );
                return;
            }
            Err(e @ SyncError::Diverged { .. }) => {
                // Its replica holds changes this document never had: the
                // next frame (generated below) tells it to start over.
                metrics::counter!("concord_world_sync_dropped_total", "reason" => "diverged").increment(1);
                warn!(agent, "{e}");
            }
            Err(e @ SyncError::PeersFull { .. }) => {
                self.replicas.forget(&agent);
                self.sync_refused(
                    &reply,
                    "peers_full",
                    &agent,
                    ErrorReply::retry("busy", e.to_string(), 1_000),
                );
                return;
            }
            Err(e) => {
                self.sync_refused(&reply, "frame", &agent, ErrorReply::new("decode", e.to_string()));
                return;
            }
        }
        self.sync_out(state, &agent);
    }

    /// Drops a replica's frame: counted, logged, and answered when it came
    /// with a reply subject (replicas publish; a reply is for tools).
    fn sync_refused(&self, reply: &Option<Subject>, reason: &'static str, agent: &str, err: ErrorReply) {
        metrics::counter!("concord_world_sync_dropped_total", "reason" => reason).increment(1);
        warn!(agent, reason, "world sync frame refused: {}", err.error.message);
        if let Some(r) = reply {
            publish_now(&self.client, r.clone(), None, err.to_bytes().into());
        }
    }

    /// The next frame of `agent`'s session, if it needs one.
    fn sync_out(&mut self, state: &mut State, agent: &str) {
        match state.coord.world_doc_mut().sync_generate(agent) {
            Ok(Some(frame)) => self.queue_frame(state, agent.to_string(), frame),
            Ok(None) => {}
            Err(e) => {
                metrics::counter!("concord_world_sync_dropped_total", "reason" => "peers_full").increment(1);
                warn!(agent, "{e}");
                self.replicas.forget(agent);
            }
        }
    }

    /// Queues a frame behind every record handled before it was made (the
    /// document it came from holds their writes): it leaves once they are in
    /// the log. With nothing waiting for the log, it leaves now.
    fn queue_frame(&mut self, state: &mut State, agent: String, frame: Vec<u8>) {
        if !state.open.records.is_empty() {
            state.open.frames.push((agent, frame));
        } else if let Some(a) = state.inflight.as_mut() {
            a.frames.push((agent, frame));
        } else {
            self.release_frame(state, agent, frame);
        }
    }

    /// Hands a frame to the publishing task; if it is backed up, the frame
    /// is dropped and the replica's session starts over with the next push
    /// (or its next `hello`).
    fn release_frame(&mut self, state: &mut State, agent: String, frame: Vec<u8>) {
        if let Err(e) = self.frames_tx.try_send((agent, frame)) {
            let (agent, _) = e.into_inner();
            metrics::counter!("concord_world_sync_dropped_total", "reason" => "outbound_full").increment(1);
            state.coord.world_doc_mut().sync_forget(&agent);
        }
    }

    /// Sends every connected replica what the document gained since the
    /// last push (a rotation included: the new document's first frame tells
    /// a replica to start over). Pushes are at least
    /// `limits.sync_push_interval_ms` apart; one held back is due later.
    fn push_world(&mut self, state: &mut State) {
        // Nobody to push to: the document's held writes stay held (reading
        // its heads would apply them). A replica that connects asks first.
        if self.replicas.is_empty() {
            state.push_due = None;
            return;
        }
        // Within the push interval the heads are not even read: the push
        // is due at the interval's end, and looks then whether they moved.
        let now = Instant::now();
        let interval = Duration::from_millis(self.cfg.limits.sync_push_interval_ms);
        if let Some(last) = state.last_push
            && now < last + interval
        {
            state.push_due = Some(last + interval);
            return;
        }
        let doc = state.coord.world_doc();
        let current = (doc.doc_id(), doc.heads_hex());
        if state.pushed.as_ref() == Some(&current) {
            state.push_due = None;
            return;
        }
        state.push_due = None;
        state.last_push = Some(now);
        state.pushed = Some(current);
        let agents: Vec<String> = self.replicas.agents().map(str::to_string).collect();
        for agent in agents {
            self.sync_out(state, &agent);
        }
    }

    /// Forgets replicas that fell silent (their sessions too).
    fn sweep_replicas(&mut self, state: &mut State) {
        for agent in self.replicas.sweep(Instant::now()) {
            debug!(agent, "world replica idle; its sync session is dropped");
            state.coord.world_doc_mut().sync_forget(&agent);
        }
        metrics::gauge!("concord_world_replicas").set(self.replicas.len() as f64);
    }

    /// Hands one input to the core; its record joins the open batch.
    fn handle(
        &mut self,
        state: &mut State,
        mut input: Input,
        reply: Option<Subject>,
        received: Option<Instant>,
        trace: Option<TraceContext>,
    ) {
        let now = state.last_now.max(wall_ms());
        state.last_now = now;
        if let (Input::Intent { intent, .. }, Some(cx)) = (&input, &trace) {
            self.plan_traces.remember(intent.lineage.as_str(), intent.version, cx);
        }
        if let Some(reply) = reply {
            let id = state.next_request;
            state.next_request += 1;
            match &mut input {
                Input::Intent { request, .. } | Input::Lease { request, .. } | Input::Control { request, .. } => {
                    *request = id;
                    state.waiting.insert(id, Waiter { reply, received, trace });
                }
                _ => {}
            }
        }
        let effects = state.coord.handle(now, input.clone());
        let mut events = Vec::new();
        for e in effects {
            match e {
                Effect::Event(ev) => events.push(ev),
                Effect::ArmTimer { .. } => {}
                other => state.open.effects.push(other),
            }
        }
        for ev in &events {
            if let Event::WorldRotated { epoch, doc_id, .. } = ev {
                metrics::counter!("concord_world_rotations_total").increment(1);
                info!(
                    epoch,
                    doc_id, "world document rotated; replicas start over from the new one"
                );
            }
        }
        let notices = state.notifier.notices(&events, &state.coord);
        state.open.notices.extend(notices);
        if matches!(input, Input::Control { .. }) {
            state.open.urgent = true;
        }
        let record = Record::Input {
            now_ms: now,
            input: Box::new(input),
            events,
        };
        state.open.push(record);
    }

    /// Seals the open batch and starts appending it.
    fn seal(&mut self, state: &mut State) {
        let open = std::mem::take(&mut state.open);
        if open.records.is_empty() {
            return;
        }
        let n = open.records.len() as u64;
        let halts_changed = open.records.iter().any(|r| match r {
            Record::Input { events, .. } => events
                .iter()
                .any(|e| matches!(e, Event::Halted { .. } | Event::Resumed { .. })),
            _ => false,
        });
        let subject = batch_subject(&self.subjects, &self.cfg.coordinator, &open.records);
        let mut json = open.json;
        json.push(b']');
        let (hash, payload) = self
            .signer
            .seal_json(&self.cfg.coordinator, state.incarnation, &state.hash, &json);
        let appended: Bytes = payload.into();
        state.batches += 1;
        let msg_id = format!("{}-{}-{}", self.cfg.coordinator, state.incarnation, state.batches);
        let store = self.store.clone();
        let expected = state.seq;
        let timeout = Duration::from_millis(self.cfg.log.append_timeout_ms);
        let done = Box::pin(async move { store.append(subject, &msg_id, expected, appended, timeout).await });
        metrics::histogram!("concord_batch_records").record(n as f64);
        // The chain moves on now: the next batch links to this one.
        let prev = std::mem::replace(&mut state.hash, hash.clone());
        state.inflight = Some(Append {
            done,
            effects: open.effects,
            halts_changed,
            sealed: Sealed {
                prev,
                hash,
                incarnation: state.incarnation,
                records: open.records,
            },
            notices: open.notices,
            frames: open.frames,
        });
    }

    /// An append finished: on success the batch's effects go out.
    fn acked(&mut self, state: &mut State, result: Result<u64, StoreError>) -> Result<(), RuntimeError> {
        let Some(append) = state.inflight.take() else {
            return Ok(());
        };
        let seq = match result {
            Ok(seq) => seq,
            Err(e) => {
                if matches!(e, StoreError::Full { .. }) {
                    error!(alert = true, "{e}");
                }
                // Nothing of this batch or the open one was logged: answer
                // `unavailable` to their requests and restore.
                let open = std::mem::take(&mut state.open);
                for eff in append.effects.iter().chain(open.effects.iter()) {
                    if let Effect::Reply { request, .. } = eff
                        && let Some(w) = state.waiting.remove(request)
                    {
                        let err = ErrorReply::retry(
                            "unavailable",
                            "the coordination log did not take the decision; retry with the same idempotency key",
                            self.cfg.limits.retry_after_ms,
                        );
                        let headers = w
                            .trace
                            .as_ref()
                            .map(|cx| telemetry::finish(cx, vec![KeyValue::new("concord.error", "unavailable")]));
                        publish_now(&self.client, w.reply, headers, err.to_bytes().into());
                    }
                }
                return Err(e.into());
            }
        };
        state.seq = seq;
        CrashHook::reached(&self.crash, CrashPoint::AfterAppend);
        self.health.log_seq.store(seq, Ordering::Relaxed);
        metrics::counter!("concord_log_records_total").increment(append.sealed.records.len() as u64);
        if append.halts_changed {
            let store = self.store.clone();
            let halts = state.coord.halts().to_vec();
            let domain = self.cfg.domain.clone();
            tokio::spawn(async move {
                if let Err(e) = store.put_halts(&domain, &halts).await {
                    warn!("cannot publish the halts for executors: {e}");
                }
            });
        }
        // Replies first: they are what a waiting caller measures. The rest
        // (dispatches, the head, the follower) leaves right after.
        let (replies, rest): (Vec<Effect>, Vec<Effect>) = append
            .effects
            .into_iter()
            .partition(|e| matches!(e, Effect::Reply { .. }));
        for e in replies.into_iter().chain(rest) {
            self.perform(state, e);
        }
        self.spawn_head(seq, append.sealed.hash.clone());
        if let Some(f) = &self.follower {
            f.follow(seq, append.sealed);
        }
        self.remember(&append.notices);
        self.notify(append.notices);
        for (agent, frame) in append.frames {
            self.release_frame(state, agent, frame);
        }
        Ok(())
    }

    fn perform(&mut self, state: &mut State, effect: Effect) {
        match effect {
            Effect::Reply { request, reply } => {
                let Some(w) = state.waiting.remove(&request) else {
                    return;
                };
                let bytes = match &reply {
                    Reply::Decision(d) => {
                        metrics::counter!("concord_intents_total", "verdict" => d.verdict.to_string()).increment(1);
                        serde_json::to_vec(d)
                    }
                    Reply::Lease(l) => serde_json::to_vec(l),
                    Reply::Control { ok, message } => {
                        serde_json::to_vec(&serde_json::json!({ "ok": ok, "message": message }))
                    }
                }
                .expect("replies serialize");
                if let (Some(t), Reply::Decision(_)) = (w.received, &reply) {
                    metrics::histogram!("concord_decision_seconds").record(t.elapsed().as_secs_f64());
                }
                let headers = w.trace.as_ref().map(|cx| {
                    let attrs = match &reply {
                        Reply::Decision(d) => vec![
                            KeyValue::new("concord.verdict", d.verdict.to_string()),
                            KeyValue::new("concord.plan_hash", d.plan_hash.to_string()),
                            KeyValue::new("concord.duplicate", d.duplicate),
                        ],
                        Reply::Lease(_) => Vec::new(),
                        Reply::Control { ok, .. } => vec![KeyValue::new("concord.ok", *ok)],
                    };
                    telemetry::finish(cx, attrs)
                });
                publish_now(&self.client, w.reply, headers, bytes.into());
            }
            Effect::Dispatch(d) => self.spawn_dispatch(*d),
            Effect::Alert { message } => {
                metrics::counter!("concord_alerts_total").increment(1);
                error!(alert = true, "{message}");
            }
            Effect::Event(_) | Effect::ArmTimer { .. } => {}
        }
    }

    /// Publishes notices to their agents (their events are in the log).
    /// Keeps each agent's latest notices, so an agent that was away when
    /// they were published can ask for them (`{"op": "notices"}`).
    fn remember(&mut self, notices: &[(String, Notice)]) {
        let unkept = self.recent_notices.remember(notices);
        metrics::counter!("concord_notices_unkept_total").increment(unkept);
    }

    fn notify(&self, notices: Vec<(String, Notice)>) {
        if notices.is_empty() {
            return;
        }
        let client = self.client.clone();
        let subjects = self.subjects.clone();
        tokio::spawn(async move {
            for (agent, n) in notices {
                let bytes = serde_json::to_vec(&n).expect("notices serialize");
                if client.publish(subjects.notify(&agent), bytes.into()).await.is_err() {
                    metrics::counter!("concord_notices_dropped_total").increment(1);
                }
            }
        });
    }

    fn spawn_head(&self, seq: u64, hash: String) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.put_head(&Head { seq, hash }).await {
                warn!("cannot record the chain head: {e}");
            }
        });
    }

    /// Sends a step to its executor and feeds the outcome back. A request
    /// that times out is sent again with the same idempotency key until the
    /// step's deadline (the core's timer then decides); `no_responders` is a
    /// definite failure at once: nobody received the step. The dispatch is a
    /// span in the plan's trace; every attempt carries its context.
    fn spawn_dispatch(&self, d: StepDispatch) {
        let executor = self.cfg.executor_for(d.kind, d.path.as_str()).to_string();
        let subject = self.subjects.exec(&executor);
        let client = self.client.clone();
        let tx = self.out_tx.clone();
        let retry = Duration::from_millis(self.cfg.limits.dispatch_retry_ms.max(1));
        metrics::counter!("concord_dispatches_total").increment(1);
        let crash = self.crash.clone();
        let cx = self.telemetry.dispatch_span(
            self.plan_traces.get(d.key.lineage.as_str(), d.key.version),
            vec![
                KeyValue::new("concord.key", d.key.text()),
                KeyValue::new("concord.executor", executor.clone()),
                KeyValue::new("concord.path", d.path.to_string()),
            ],
        );
        let headers = telemetry::inject(&cx);
        tokio::spawn(async move {
            let ended = async {
                let payload: Bytes = serde_json::to_vec(&d).expect("dispatches serialize").into();
                let deadline = Instant::now() + Duration::from_millis(d.timeout_ms);
                let fail = |reason: String| Input::Outcome {
                    executor: executor.clone(),
                    outcome: StepOutcome {
                        key: d.key.clone(),
                        result: StepResult::Failed {
                            reason: Short::parse(&reason.chars().take(1000).collect::<String>())
                                .unwrap_or_else(|_| Short::parse("failed").expect("a short string")),
                        },
                    },
                };
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return "deadline";
                    }
                    let req = async_nats::Request::new()
                        .payload(payload.clone())
                        .headers(headers.clone())
                        .timeout(Some(left.min(retry)));
                    let answer = client.send_request(subject.clone(), req).await;
                    CrashHook::reached(&crash, CrashPoint::AfterDispatch);
                    match answer {
                        Ok(msg) => {
                            let input = match serde_json::from_slice::<StepOutcome>(&msg.payload) {
                                Ok(o) if o.key == d.key => Input::Outcome {
                                    executor: executor.clone(),
                                    outcome: o,
                                },
                                Ok(o) => fail(format!(
                                    "executor `{executor}` answered for another dispatch ({})",
                                    o.key.text()
                                )),
                                Err(e) => fail(format!("executor `{executor}` sent an invalid outcome: {e}")),
                            };
                            let _ = tx.send(input);
                            return "answered";
                        }
                        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                            let _ = tx.send(fail(format!("no_responders: no executor serves `{subject}`")));
                            return "no_responders";
                        }
                        Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                            debug!(key = %d.key.text(), "dispatch timed out; sending it again with the same key");
                        }
                        Err(e) => {
                            debug!(key = %d.key.text(), "dispatch failed ({e}); sending it again");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            .await;
            telemetry::end(&cx, vec![KeyValue::new("concord.outcome", ended)]);
        });
    }

    /// Answers a read-only question from the current state.
    fn answer(&self, state: &State, caller: &str, query: Query) -> Vec<u8> {
        let c = &state.coord;
        let answer = match query {
            Query::Notices => Answer::Notices {
                notices: self.recent_notices.of(caller),
            },
            Query::Pending => Answer::Plans {
                now_ms: state.last_now,
                plans: c
                    .plans_overview()
                    .into_iter()
                    .filter(|p| p.status == "pending")
                    .collect(),
            },
            Query::Plans => Answer::Plans {
                now_ms: state.last_now,
                plans: c.plans_overview(),
            },
            Query::Leases => Answer::Leases {
                leases: c.leases().held().cloned().collect(),
            },
            Query::World { path } => {
                let under = |p: &concord_proto::ResourcePath| path.as_ref().is_none_or(|q| q.overlaps(p));
                Answer::World {
                    resources: c
                        .world()
                        .resources
                        .iter()
                        .filter(|(p, _)| under(p))
                        .take(10_000)
                        .map(|(p, v)| (p.clone(), v.clone()))
                        .collect(),
                    observations: c
                        .observations()
                        .filter(|(p, _)| under(p))
                        .take(10_000)
                        .map(|(p, o)| (p.clone(), o.clone()))
                        .collect(),
                }
            }
            Query::Status => Answer::Status(Box::new(Status {
                coordinator: self.cfg.coordinator.clone(),
                incarnation: state.incarnation,
                log_seq: state.seq,
                log_hash: state.hash.clone(),
                plans: c.plan_count(),
                leases: c.leases().held_count(),
                halts: c.halts().to_vec(),
                ready: self.health.ready.load(Ordering::Relaxed),
                policy_hash: c.policy().hash.clone(),
                world: Some(world_status(c, self.replicas.len())),
            })),
            Query::Show { lineage } => match c.plan_intent(&lineage) {
                Some((agent, intent, previous)) => {
                    let p = concord_core::preview::preview(concord_core::preview::PreviewInput {
                        world: c.world(),
                        intent,
                        agent,
                        policy: c.policy(),
                        previous,
                    });
                    Answer::Preview(Box::new(p))
                }
                None => {
                    return ErrorReply::new("not_found", format!("no live plan {lineage}")).to_bytes();
                }
            },
        };
        serde_json::to_vec(&answer).expect("answers serialize")
    }
}

/// The world document's identity, heads and sync counters.
fn world_status(c: &Coordinator, replicas: usize) -> WorldStatus {
    let d = c.world_doc();
    let stats = d.sync_stats();
    WorldStatus {
        doc_id: d.doc_id().iter().map(|b| format!("{b:02x}")).collect(),
        epoch: d.epoch(),
        heads: d.heads_hex(),
        changes: d.change_count(),
        replicas,
        frames_in: stats.frames_in,
        frames_out: stats.frames_out,
        changes_refused: stats.changes_refused,
        diverged: stats.diverged,
    }
}

/// Reads the configured policy (the built-in defaults if none).
pub fn load_policy(cfg: &RuntimeConfig) -> Result<Policy, RuntimeError> {
    match &cfg.policy {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| RuntimeError::Recovery(format!("{}: {e}", p.display())))?;
            Policy::from_toml_str(&text).map_err(|e| RuntimeError::Recovery(format!("{}: {e}", p.display())))
        }
        None => Policy::from_toml_str("").map_err(|e| RuntimeError::Recovery(e.to_string())),
    }
}

/// Reads the configured world (empty if none).
pub fn load_world(cfg: &RuntimeConfig) -> Result<World, RuntimeError> {
    match &cfg.world {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| RuntimeError::Recovery(format!("{}: {e}", p.display())))?;
            let w = if p.extension().is_some_and(|e| e == "json") {
                World::from_json_str(&text)
            } else {
                World::from_toml_str(&text)
            };
            w.map_err(|e| RuntimeError::Recovery(format!("{}: {e}", p.display())))
        }
        None => Ok(World::default()),
    }
}
