//! The agent's side: connect as one identity, propose plans, await a human's
//! decision by push notice, re-plan, publish observations, read the world
//! from its replica.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_proto::coord::{Decision, LeaseReply, LeaseRequest, Notice, NoticeKind};
use concord_proto::{Id, Intent, Observation, ObservationKind, ResourcePath, Value, Verdict};
use futures::StreamExt;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use serde::Deserialize;
use tokio::sync::{Notify, broadcast};
use tracing::{Instrument, debug, info_span, warn};

use crate::error::AgentError;
use crate::trace;
use crate::world::WorldReplica;

/// How many plans' notices an agent keeps (oldest forgotten first).
pub const NOTICE_PLANS_MAX: usize = 1024;
/// How many lease notices a slow lease watcher may fall behind by.
pub const LEASE_NOTICES_MAX: usize = 256;
/// The most requests one call sends (the first and its retries).
pub const ATTEMPTS_MAX: u32 = 16;

/// How an agent connects.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// NATS URLs, comma-separated.
    pub url: String,
    /// The agent's identity: one subject token; its subjects end with it.
    pub name: String,
    /// The domain (`default` unless the coordinator is configured otherwise).
    pub domain: String,
    /// The agent's nkey seed file (from `concord nats-config`), if the server asks for one.
    pub nkey_seed_file: Option<PathBuf>,
    /// How long one request waits for its answer.
    pub request_timeout: Duration,
    /// How many requests one call sends at most, all with the same idempotency key.
    pub attempts: u32,
    /// The world replica says `hello` after this long without a frame from
    /// the coordinator (a lost frame or a restarted coordinator otherwise
    /// stalls it); keep it well under the coordinator's `limits.sync_idle_ms`.
    pub world_keepalive: Duration,
}

impl AgentConfig {
    /// An agent called `name` on `url`, domain `default`, no credentials,
    /// 5 s per request, 4 attempts, a world keepalive of 15 s.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> AgentConfig {
        AgentConfig {
            url: url.into(),
            name: name.into(),
            domain: "default".into(),
            nkey_seed_file: None,
            request_timeout: Duration::from_secs(5),
            attempts: 4,
            world_keepalive: Duration::from_secs(15),
        }
    }
}

/// What a human (or the clock) decided about a plan held for approval.
#[derive(Clone, Debug, PartialEq)]
pub enum HumanDecision {
    /// Approved: the plan is admitted and runs.
    Approved {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// Rejected by an operator.
    Rejected {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// Nobody decided before the approval expired.
    Expired,
    /// A newer version of the lineage replaced it.
    Withdrawn,
}

/// How an admitted plan's saga ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SagaEnd {
    /// Every step succeeded.
    Completed,
    /// A step failed; the completed steps were compensated.
    Compensated {
        /// Why it compensated.
        reason: String,
    },
    /// A compensation failed; an operator decides.
    CompensationFailed {
        /// Why.
        reason: String,
    },
}

/// The notices received, by plan: an awaiting call finds a notice that came
/// before it started waiting. Also the span each plan was proposed in, so
/// waiting on it joins its trace.
#[derive(Debug, Default)]
struct Board {
    plans: BTreeMap<(String, u32), Vec<Notice>>,
    traces: BTreeMap<(String, u32), opentelemetry::trace::SpanContext>,
    order: VecDeque<(String, u32)>,
}

impl Board {
    /// Makes room for plan `k`, forgetting the oldest beyond [`NOTICE_PLANS_MAX`].
    fn keep(&mut self, k: &(String, u32)) {
        if self.plans.contains_key(k) || self.traces.contains_key(k) {
            return;
        }
        self.order.push_back(k.clone());
        while self.order.len() > NOTICE_PLANS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.plans.remove(&old);
                self.traces.remove(&old);
            }
        }
    }

    fn push(&mut self, n: Notice) {
        let (Some(l), Some(v)) = (&n.lineage, n.version) else {
            return;
        };
        let k = (l.to_string(), v);
        self.keep(&k);
        let kept = self.plans.entry(k).or_default();
        // A notice fetched again after a reconnect is kept once.
        if !kept.contains(&n) {
            kept.push(n);
        }
    }
}

#[derive(Debug)]
struct Shared {
    board: Mutex<Board>,
    changed: Notify,
    leases: broadcast::Sender<Notice>,
    /// The world replica, once asked for (one per agent).
    world: tokio::sync::Mutex<Option<WorldReplica>>,
}

#[derive(Deserialize)]
struct ErrorReply {
    error: BusError,
}

#[derive(Deserialize)]
struct BusError {
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// One agent's connection to a coordinator's domain. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Agent {
    nats: async_nats::Client,
    cfg: Arc<AgentConfig>,
    prefix: String,
    shared: Arc<Shared>,
}

fn valid_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// What became of a notice catch-up.
enum CatchUp {
    /// The coordinator answered (or refused for good): done.
    Done,
    /// Nobody answered: ask again after the caller's backoff.
    Again,
    /// The coordinator asked to be asked again after this long (busy,
    /// unavailable, rate limited: a coordinator just back may say so).
    After(Duration),
}

/// Fetches the agent's latest notices from the coordinator and merges them.
async fn catch_up_notices(client: &async_nats::Client, query: &str, shared: &std::sync::Weak<Shared>) -> CatchUp {
    #[derive(Deserialize)]
    struct Answer {
        notices: Vec<Notice>,
    }
    let answer = match client.request(query.to_string(), r#"{"op":"notices"}"#.into()).await {
        Ok(m) => match serde_json::from_slice::<ErrorReply>(&m.payload) {
            Ok(ErrorReply { error: e }) => {
                return match e.code.as_str() {
                    "busy" | "unavailable" | "rate_limited" => {
                        debug!(code = e.code, "catching up on notices: {}; asking again", e.message);
                        CatchUp::After(Duration::from_millis(e.retry_after_ms.unwrap_or(100)))
                    }
                    _ => {
                        warn!(code = e.code, "catching up on notices: refused: {}", e.message);
                        CatchUp::Done
                    }
                };
            }
            Err(_) => serde_json::from_slice::<Answer>(&m.payload),
        },
        Err(e) => {
            debug!("catching up on notices: {e}; asking again");
            return CatchUp::Again;
        }
    };
    let Some(shared) = shared.upgrade() else {
        return CatchUp::Done;
    };
    match answer {
        Ok(a) => {
            let n = a.notices.len();
            for notice in a.notices {
                if notice.event == NoticeKind::LeaseExpired {
                    let _ = shared.leases.send(notice);
                } else {
                    shared.board.lock().expect("board lock").push(notice);
                }
            }
            debug!(n, "caught up on notices after a reconnect");
            shared.changed.notify_waiters();
        }
        Err(e) => warn!("catching up on notices: an answer that does not decode: {e}"),
    }
    CatchUp::Done
}

/// A decision and the coordinator's span that made it.
#[derive(Clone, Debug)]
pub struct Traced {
    /// The decision.
    pub decision: Decision,
    /// The coordinator's span, W3C `traceparent` form, in the request's
    /// trace (`None` from a coordinator that does not trace).
    pub traceparent: Option<String>,
}

/// Connects to NATS as `name`: its credentials, its inbox prefix
/// `_INBOX_<name>`. Counts every loss of the connection in `disconnects`,
/// if given: a reconnect faster than anyone polls the connection's state
/// is still seen.
pub(crate) async fn connect_nats(
    url: &str,
    name: &str,
    seed: Option<&PathBuf>,
    disconnects: Option<Arc<AtomicU64>>,
) -> Result<async_nats::Client, String> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("concord-agent-{name}"))
        .custom_inbox_prefix(format!("_INBOX_{name}"))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5));
    if let Some(count) = disconnects {
        opts = opts.event_callback(move |event| {
            let count = count.clone();
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    if let Some(p) = seed {
        let seed = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        opts = opts.nkey(seed.trim().to_string());
    }
    // `retry_on_initial_connect` makes `connect` return at once; a server
    // that is not there yet shows as `Disconnected` on the first request.
    opts.connect(url).await.map_err(|e| e.to_string())
}

impl Agent {
    /// Connects and subscribes to the agent's notices.
    pub async fn connect(cfg: AgentConfig) -> Result<Agent, AgentError> {
        if !valid_token(&cfg.name) {
            return Err(AgentError::Config(format!(
                "agent name `{}` is not one subject token ([A-Za-z0-9_-])",
                cfg.name
            )));
        }
        if !valid_token(&cfg.domain) {
            return Err(AgentError::Config(format!(
                "domain `{}` is not one subject token",
                cfg.domain
            )));
        }
        let disconnects = Arc::new(AtomicU64::new(0));
        let nats = connect_nats(
            &cfg.url,
            &cfg.name,
            cfg.nkey_seed_file.as_ref(),
            Some(disconnects.clone()),
        )
        .await
        .map_err(AgentError::Disconnected)?;
        let prefix = format!("concord.v1.{}", cfg.domain);
        let (leases, _) = broadcast::channel(LEASE_NOTICES_MAX);
        let shared = Arc::new(Shared {
            board: Mutex::new(Board::default()),
            changed: Notify::new(),
            leases,
            world: tokio::sync::Mutex::new(None),
        });
        let mut sub = nats
            .subscribe(format!("{prefix}.notify.{}", cfg.name))
            .await
            .map_err(|e| AgentError::Disconnected(e.to_string()))?;
        let s = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Some(shared) = s.upgrade() else { return };
                match serde_json::from_slice::<Notice>(&m.payload) {
                    Ok(n) if n.event == NoticeKind::LeaseExpired => {
                        let _ = shared.leases.send(n);
                    }
                    Ok(n) => {
                        shared.board.lock().expect("board lock").push(n);
                        shared.changed.notify_waiters();
                    }
                    Err(e) => warn!("a notice that does not decode: {e}"),
                }
            }
        });
        // Notices published while the connection was down are lost on the
        // subscription: after every reconnect, ask the coordinator for the
        // latest ones (`query.<agent>`, `{"op": "notices"}`) and merge them.
        let s = Arc::downgrade(&shared);
        let client = nats.clone();
        let query = format!("{prefix}.query.{}", cfg.name);
        // The coordinator may not answer at once (it may be restarting too):
        // the catch-up is asked again, backing off up to 2 s, until it does;
        // one that answers busy is asked again when it says.
        tokio::spawn(async move {
            let mut seen_disconnects = 0;
            let mut owed = false;
            let mut backoff = Duration::from_millis(100);
            let mut next_try = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if s.strong_count() == 0 {
                    return;
                }
                let connected = client.connection_state() == async_nats::connection::State::Connected;
                // Connected again after a loss (however short): catch up.
                let lost = disconnects.load(Ordering::SeqCst);
                if connected && lost != seen_disconnects {
                    seen_disconnects = lost;
                    owed = true;
                    backoff = Duration::from_millis(100);
                    next_try = tokio::time::Instant::now();
                }
                if connected && owed && tokio::time::Instant::now() >= next_try {
                    match catch_up_notices(&client, &query, &s).await {
                        CatchUp::Done => owed = false,
                        CatchUp::Again => {
                            next_try = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                        CatchUp::After(wait) => next_try = tokio::time::Instant::now() + wait,
                    }
                }
            }
        });
        // The subscription must be in place before any plan is proposed.
        nats.flush()
            .await
            .map_err(|e| AgentError::Disconnected(e.to_string()))?;
        Ok(Agent {
            nats,
            cfg: Arc::new(cfg),
            prefix,
            shared,
        })
    }

    /// The agent's identity.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The NATS connection (for anything the SDK does not cover).
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    fn subject(&self, domain: &str) -> String {
        format!("{}.{domain}.{}", self.prefix, self.cfg.name)
    }

    /// Sends `payload` on `subject` and decodes the answer, retrying the
    /// same bytes (so the same idempotency key) after a timeout, a lost
    /// connection or an overloaded coordinator.
    pub(crate) async fn request<T: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        payload: Vec<u8>,
    ) -> Result<T, AgentError> {
        self.request_with(subject, payload, None).await.map(|(t, _)| t)
    }

    /// As [`Agent::request`], sending `headers` with every attempt and
    /// returning the answer's headers too.
    async fn request_with<T: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        payload: Vec<u8>,
        headers: Option<async_nats::HeaderMap>,
    ) -> Result<(T, Option<async_nats::HeaderMap>), AgentError> {
        let attempts = self.cfg.attempts.clamp(1, ATTEMPTS_MAX);
        let mut last = AgentError::TimedOut {
            subject: subject.clone(),
            attempts: 0,
        };
        for attempt in 1..=attempts {
            let mut req = async_nats::Request::new()
                .payload(payload.clone().into())
                .timeout(Some(self.cfg.request_timeout));
            if let Some(h) = &headers {
                req = req.headers(h.clone());
            }
            let mut wait = Duration::from_millis((100u64 << attempt.min(5)).min(2_000));
            match self.nats.send_request(subject.clone(), req).await {
                Ok(msg) => {
                    if let Ok(err) = serde_json::from_slice::<ErrorReply>(&msg.payload) {
                        let e = err.error;
                        match e.code.as_str() {
                            "busy" | "rate_limited" | "unavailable" => {
                                let after = e.retry_after_ms.unwrap_or(100);
                                wait = Duration::from_millis(after);
                                last = AgentError::Busy {
                                    code: e.code,
                                    retry_after_ms: after,
                                };
                            }
                            "decode" => {
                                return Err(AgentError::Decode {
                                    field: e.field.unwrap_or_default(),
                                    rule: e.rule.unwrap_or_default(),
                                    message: e.message,
                                });
                            }
                            _ => {
                                return Err(AgentError::Refused {
                                    code: e.code,
                                    message: e.message,
                                });
                            }
                        }
                    } else {
                        return serde_json::from_slice(&msg.payload)
                            .map(|t| (t, msg.headers))
                            .map_err(|e| AgentError::BadAnswer(e.to_string()));
                    }
                }
                Err(e) => {
                    last = match e.kind() {
                        async_nats::RequestErrorKind::TimedOut => AgentError::TimedOut {
                            subject: subject.clone(),
                            attempts: attempt,
                        },
                        async_nats::RequestErrorKind::NoResponders => AgentError::NoCoordinator(subject.clone()),
                        _ => AgentError::Disconnected(e.to_string()),
                    };
                    if self.nats.connection_state() != async_nats::connection::State::Connected {
                        last = AgentError::Disconnected(format!("{e} (the client is reconnecting)"));
                    }
                }
            }
            debug!(attempt, "{last}; sending the same request again");
            if attempt < attempts {
                tokio::time::sleep(wait).await;
            }
        }
        Err(last)
    }

    /// Proposes `plan` and returns the coordinator's decision (with its
    /// preview on the first answer). A plan without an idempotency key gets
    /// `<lineage>@<version>`, so every retry, also after a reconnect or a
    /// coordinator restart, gets the original decision. A rejection is a
    /// decision; a halt in force is [`AgentError::Halted`].
    pub async fn propose(&self, plan: &Intent) -> Result<Decision, AgentError> {
        self.propose_traced(plan, None).await.map(|t| t.decision)
    }

    /// As [`Agent::propose`], in a trace. The proposal is a span of its own
    /// (see [`crate::trace`]), a child of `traceparent` (W3C,
    /// `00-<trace id>-<span id>-<flags>`) if given, else of the caller's
    /// current OpenTelemetry span, else the first of a new trace. The
    /// request carries the proposal span's context; the answer names the
    /// coordinator's span, its child, so the agent's spans, the decision and
    /// the executors' steps that follow it join one trace in whatever
    /// backend they export to.
    pub async fn propose_traced(&self, plan: &Intent, traceparent: Option<&str>) -> Result<Traced, AgentError> {
        let mut plan = plan.clone();
        if plan.idempotency_key.is_none() {
            plan.idempotency_key = Some(idempotency_key(&plan.lineage, plan.version));
        }
        let parent = traceparent.map(trace::parse).unwrap_or_else(trace::current);
        let bytes = serde_json::to_vec(&plan).map_err(|e| AgentError::BadAnswer(e.to_string()))?;
        self.propose_with(bytes, parent, Some((plan.lineage.to_string(), plan.version)))
            .await
    }

    /// Proposes a plan given as JSON bytes, unchanged (no key is added).
    pub async fn propose_bytes(&self, bytes: Vec<u8>) -> Result<Decision, AgentError> {
        self.propose_with(bytes, trace::current(), None)
            .await
            .map(|t| t.decision)
    }

    /// Sends a proposal in its own span, a child of `parent`.
    async fn propose_with(
        &self,
        bytes: Vec<u8>,
        parent: opentelemetry::Context,
        plan: Option<(String, u32)>,
    ) -> Result<Traced, AgentError> {
        let (lineage, version) = plan.clone().unwrap_or_default();
        let cx = trace::start(
            "concord.propose",
            SpanKind::Client,
            &parent,
            vec![
                KeyValue::new("concord.agent", self.cfg.name.clone()),
                KeyValue::new("concord.plan", lineage.clone()),
                KeyValue::new("concord.plan_version", i64::from(version)),
            ],
        );
        let (trace_id, span_id) = trace::ids(&cx);
        let span = info_span!("propose", agent = %self.cfg.name, lineage = %lineage, version, trace_id = %trace_id, span_id = %span_id);
        let r = self.propose_answer(bytes, trace::inject(&cx)).instrument(span).await;
        trace::end(
            &cx,
            vec![match &r {
                Ok(t) => KeyValue::new("concord.verdict", t.decision.verdict.to_string()),
                Err(e) => KeyValue::new("concord.error", e.to_string()),
            }],
        );
        if let Some(k) = plan {
            let mut board = self.shared.board.lock().expect("board lock");
            board.keep(&k);
            board.traces.insert(k, cx.span().span_context().clone());
        }
        r
    }

    async fn propose_answer(&self, bytes: Vec<u8>, headers: async_nats::HeaderMap) -> Result<Traced, AgentError> {
        let (d, answer): (Decision, _) = self.request_with(self.subject("intent"), bytes, Some(headers)).await?;
        if d.verdict == Verdict::Reject
            && let Some(r) = d.reasons.iter().find(|r| r.rule == "halt.active")
        {
            return Err(AgentError::Halted {
                message: r.message.clone(),
            });
        }
        let traceparent = answer
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.as_str().to_string());
        Ok(Traced {
            decision: d,
            traceparent,
        })
    }

    /// Waits for the human's decision on a plan held for approval, woken by
    /// the coordinator's notices (no polling), at most `timeout`. The wait is
    /// a span in the plan's trace if this agent proposed it.
    pub async fn await_decision(
        &self,
        lineage: &Id,
        version: u32,
        timeout: Duration,
    ) -> Result<HumanDecision, AgentError> {
        self.await_notice("concord.await_decision", lineage, version, timeout, |n| match n.event {
            NoticeKind::Approved => Some(HumanDecision::Approved {
                operator: n.operator.clone().unwrap_or_default(),
                reason: n.reason.clone().unwrap_or_default(),
            }),
            NoticeKind::RejectedByOperator => Some(HumanDecision::Rejected {
                operator: n.operator.clone().unwrap_or_default(),
                reason: n.reason.clone().unwrap_or_default(),
            }),
            NoticeKind::ApprovalExpired => Some(HumanDecision::Expired),
            NoticeKind::Withdrawn => Some(HumanDecision::Withdrawn),
            _ => None,
        })
        .await
    }

    /// Waits for an admitted plan's saga to end, at most `timeout`. The
    /// wait is a span in the plan's trace if this agent proposed it.
    pub async fn await_saga(&self, lineage: &Id, version: u32, timeout: Duration) -> Result<SagaEnd, AgentError> {
        self.await_notice("concord.await_saga", lineage, version, timeout, |n| match n.event {
            NoticeKind::Completed => Some(SagaEnd::Completed),
            NoticeKind::Compensated => Some(SagaEnd::Compensated { reason: String::new() }),
            NoticeKind::CompensationFailed => Some(SagaEnd::CompensationFailed {
                reason: n.reason.clone().unwrap_or_default(),
            }),
            _ => None,
        })
        .await
        .map(|end| match end {
            // The reason is on the `compensating` notice that came first.
            SagaEnd::Compensated { .. } => SagaEnd::Compensated {
                reason: self
                    .notices(lineage, version)
                    .iter()
                    .rev()
                    .find_map(|n| (n.event == NoticeKind::Compensating).then(|| n.reason.clone().unwrap_or_default()))
                    .unwrap_or_default(),
            },
            other => other,
        })
    }

    /// The notices received so far about one plan.
    pub fn notices(&self, lineage: &Id, version: u32) -> Vec<Notice> {
        let board = self.shared.board.lock().expect("board lock");
        board
            .plans
            .get(&(lineage.to_string(), version))
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for the first notice `pick` takes, in a span `name`: a child of
    /// the plan's proposal span if this agent proposed it, else of the
    /// caller's current span.
    async fn await_notice<T: std::fmt::Debug>(
        &self,
        name: &'static str,
        lineage: &Id,
        version: u32,
        timeout: Duration,
        pick: impl Fn(&Notice) -> Option<T>,
    ) -> Result<T, AgentError> {
        let proposed = {
            let board = self.shared.board.lock().expect("board lock");
            board.traces.get(&(lineage.to_string(), version)).cloned()
        };
        let parent = match proposed {
            Some(sc) => opentelemetry::Context::new().with_remote_span_context(sc),
            None => trace::current(),
        };
        let cx = trace::start(
            name,
            SpanKind::Internal,
            &parent,
            vec![
                KeyValue::new("concord.plan", lineage.to_string()),
                KeyValue::new("concord.plan_version", i64::from(version)),
            ],
        );
        let (trace_id, span_id) = trace::ids(&cx);
        let span =
            info_span!("await", op = name, lineage = %lineage, version, trace_id = %trace_id, span_id = %span_id);
        let r = self.wait_notice(lineage, version, timeout, pick).instrument(span).await;
        trace::end(
            &cx,
            vec![match &r {
                Ok(t) => KeyValue::new("concord.outcome", format!("{t:?}")),
                Err(e) => KeyValue::new("concord.error", e.to_string()),
            }],
        );
        r
    }

    async fn wait_notice<T>(
        &self,
        lineage: &Id,
        version: u32,
        timeout: Duration,
        pick: impl Fn(&Notice) -> Option<T>,
    ) -> Result<T, AgentError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register for the wake-up before looking, so a notice that
            // arrives in between is not missed.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(t) = self.notices(lineage, version).iter().find_map(&pick) {
                return Ok(t);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(AgentError::NoDecision {
                    lineage: lineage.to_string(),
                    version,
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
        }
    }

    /// Publishes an observation (fire and forget; the coordinator validates it).
    pub async fn observe(&self, obs: &Observation) -> Result<(), AgentError> {
        let bytes = serde_json::to_vec(obs).map_err(|e| AgentError::BadAnswer(e.to_string()))?;
        self.nats
            .publish(self.subject("observe"), bytes.into())
            .await
            .map_err(|e| AgentError::Disconnected(e.to_string()))
    }

    /// Reports liveness ("the process answers"): a health word.
    pub async fn observe_liveness(&self, path: &ResourcePath, word: &str) -> Result<(), AgentError> {
        self.observe(&observation(path, ObservationKind::Liveness, Value::Str(word.into())))
            .await
    }

    /// Reports application-level health ("it does its job"): a health word.
    pub async fn observe_app_health(&self, path: &ResourcePath, word: &str) -> Result<(), AgentError> {
        self.observe(&observation(path, ObservationKind::AppHealth, Value::Str(word.into())))
            .await
    }

    /// Reports a metric.
    pub async fn observe_metric(&self, path: &ResourcePath, value: f64) -> Result<(), AgentError> {
        let v = if value.fract() == 0.0 && value.abs() < 9.0e15 {
            Value::Int(value as i64)
        } else {
            Value::Float(value)
        };
        self.observe(&observation(path, ObservationKind::Metric, v)).await
    }

    /// Asks the lease service (see [`crate::LeaseGuard`] for the managed form).
    pub async fn lease(&self, req: &LeaseRequest) -> Result<LeaseReply, AgentError> {
        let bytes = serde_json::to_vec(req).map_err(|e| AgentError::BadAnswer(e.to_string()))?;
        self.request(self.subject("lease"), bytes).await
    }

    /// Lease notices (lapsed leases), for lease guards.
    pub(crate) fn lease_notices(&self) -> broadcast::Receiver<Notice> {
        self.shared.leases.subscribe()
    }

    /// The agent's read-only replica of the world model: started on the
    /// first call (it subscribes to `world.<agent>` and says `hello` on
    /// `sync.<agent>`), then synced in the background for as long as the
    /// agent lives; later calls return the same replica.
    pub async fn world(&self) -> Result<WorldReplica, AgentError> {
        let mut slot = self.shared.world.lock().await;
        if let Some(w) = slot.as_ref() {
            return Ok(w.clone());
        }
        let w = WorldReplica::start(
            self.nats.clone(),
            &self.cfg.name,
            &self.prefix,
            self.cfg.world_keepalive,
        )
        .await?;
        *slot = Some(w.clone());
        Ok(w)
    }

    /// Flushes what was published.
    pub async fn flush(&self) -> Result<(), AgentError> {
        self.nats
            .flush()
            .await
            .map_err(|e| AgentError::Disconnected(e.to_string()))
    }
}

fn observation(path: &ResourcePath, kind: ObservationKind, value: Value) -> Observation {
    Observation {
        protocol: 1,
        path: path.clone(),
        kind,
        value,
        observed_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64),
    }
}

/// The idempotency key the SDK gives a plan without one: `<lineage>@<version>`
/// (a lineage's version is one plan: a retry is the same request).
pub fn idempotency_key(lineage: &Id, version: u32) -> Id {
    let suffix = format!("@{version}");
    let mut base = lineage.to_string();
    // Identifiers have a length limit; keep the version whatever happens.
    base.truncate(concord_proto::limits::ID_BYTES_MAX.saturating_sub(suffix.len()));
    Id::parse(&format!("{base}{suffix}")).expect("a lineage with `@<n>` is an identifier")
}

/// Version n+1 of `plan` (same lineage), without its idempotency key, for
/// re-planning after a rejection or a failed saga.
pub fn next_version(plan: &Intent) -> Intent {
    Intent {
        version: plan.version + 1,
        idempotency_key: None,
        ..plan.clone()
    }
}
