//! The executor's side: apply steps the coordinator dispatches.
//!
//! An executor serves `exec.<name>` in a queue group, so several members can
//! share the work. For each dispatch the SDK:
//!
//! 1. dedupes on the idempotency key: a key already answered gets the
//!    recorded outcome again, nothing is applied twice; a key another member
//!    is applying right now gets no answer (the coordinator sends it again);
//!    a key left claimed by a member that died mid-apply is taken over (see
//!    below);
//! 2. refuses a fencing token lower than the highest seen for the path
//!    (`stale_token`), and records a higher one by compare-and-set;
//! 3. checks `expected_before` against the handler's reading of the world
//!    (compare-and-set): a difference is `drift`, with the actual values;
//! 4. refuses a step (not a compensation) that a `freeze` halt covers, read
//!    from the coordinator's `CONCORD_HALT` bucket (the coordinator does not
//!    dispatch under a freeze; this closes the window of a halt that lands
//!    while a dispatch is on its way);
//! 5. calls the handler for the step's kind — `apply` then `verify` for a
//!    step, `compensate` for a compensation — and reports the outcome.
//!
//! Each dispatch is served in a span continuing the trace in its
//! `traceparent` header (the plan's, from the coordinator); the handler
//! finds the span's own context in [`Step::traceparent`], and the answer
//! carries it back, with the answering member's id ([`MEMBER_HEADER`]).
//!
//! The highest token per path and the answered keys live in the KV bucket
//! `CONCORD_FENCING_<name>` (which `concord nats-config` lets the executor
//! use), so a restarted executor or another member still refuses a stale
//! token and still dedupes.
//!
//! # A member that dies mid-apply
//!
//! A member claims a key before applying it (a record `pending <member>`
//! made by compare-and-set) and replaces the claim with the outcome. One
//! that dies in between (killed, crashed) leaves the key claimed. Each
//! running member (one [`Executor::start`]) has an id of its own and answers
//! on `exec.<name>.member.<id>` whether it is applying a key. A member that
//! finds another's claim asks its owner:
//!
//! - `applying`, or no answer in time: the owner is at work (or cannot be
//!   told from one that is); no answer, as before — the coordinator sends
//!   the dispatch again and gets the outcome once it is recorded;
//! - `idle`, or nobody listens there any more (the server dropped the dead
//!   member's subscriptions with its connection), or a claim by this member
//!   itself (its outcome could not be recorded): the claim is orphaned. The
//!   member takes it over by compare-and-set on the claim (one member does)
//!   and decides the step again under the same checks as a first delivery —
//!   the fencing token, a freeze, `expected_before` — with one difference:
//!   - the values are as the coordinator expected: nothing of the step shows,
//!     and it is applied and verified as on a first delivery;
//!   - they differ: the dead member may have applied the step before it died.
//!     The handler's [`verify`](StepHandler::verify) decides: the effect is
//!     in place → `succeeded`, without applying it again (the saga goes on,
//!     and compensates it like any completed step if a later one fails); not
//!     in place → `drift`, as on a first delivery. A compensation has no
//!     `verify`: there a difference is `drift`, and an operator decides.
//!
//! Why this is safe: a step is only applied when the world is as the
//! coordinator expected before it and its fencing token is current, as on
//! a first delivery; the one new outcome, `succeeded` without applying,
//! rests on the handler's own check that the effect is there. (A handler
//! that keeps the default `verify`, always `Ok`, trusts that values moved on
//! a taken-over key were moved by the step: implement `verify` if anything
//! else may write those paths.) An owner whose outcome comes late — cut off
//! from the server long enough to lose its subscriptions, then back — cannot
//! record it over the new claim (compare-and-set on the claim's revision),
//! so each key has one outcome; its handler, though, may still have been
//! running when the key was taken over, so a step whose `expected_before`
//! does not cover what it writes may then be applied twice.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use concord_proto::coord::{DispatchKey, HaltGrade, HaltScope, Phase, StepDispatch, StepOutcome, StepResult};
use concord_proto::{Op, ResourcePath, Short, StepKind, Value};
use futures::StreamExt;
use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tracing::{Instrument, debug, info_span, warn};

use crate::error::ExecutorError;
use crate::trace;

/// How long answered keys and tokens stay in the bucket without a write:
/// far longer than any dispatch is retried (a step's deadline is at most a
/// day), so no retry outlives its record.
pub const RECORD_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many times a compare-and-set on one token is retried under contention.
pub const CAS_ATTEMPTS_MAX: u32 = 16;
/// How long a member waits for another to say whether it is applying a key
/// it claimed (no answer in time counts as "applying").
pub const MEMBER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// One step as the handler sees it: the dispatch and its decoded operation.
#[derive(Clone, Debug)]
pub struct Step {
    /// The dispatch as sent.
    pub dispatch: StepDispatch,
    /// Its kind and arguments.
    pub op: Op,
    /// The executor's span serving it, W3C `traceparent` form: a child of
    /// the coordinator's dispatch, in the plan's trace (a new trace if the
    /// dispatch carried none). A handler that calls other services passes
    /// it on, so their spans join the plan's trace too.
    pub traceparent: Option<String>,
}

impl Step {
    /// The path acted on.
    pub fn path(&self) -> &ResourcePath {
        &self.dispatch.path
    }
}

/// Why a handler did not apply a step; sent to the coordinator as the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepError(pub String);

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<S: Into<String>> From<S> for StepError {
    fn from(s: S) -> StepError {
        StepError(s.into())
    }
}

/// Applies one kind of step to the real system.
///
/// The coordinator sends a compensation as an ordinary operation (a `restore`
/// of `set` is a `set` of the old value), so [`compensate`](Self::compensate)
/// defaults to [`apply`](Self::apply).
pub trait StepHandler: Send + Sync + 'static {
    /// The current value at `path`, for `expected_before` (compare-and-set).
    fn read<'a>(&'a self, path: &'a ResourcePath) -> BoxFuture<'a, Option<Value>>;

    /// Applies the step.
    fn apply<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>>;

    /// Applies a compensation.
    fn compensate<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
        self.apply(step)
    }

    /// Checks an applied step took effect (its own check; the coordinator's
    /// verification on observations comes on top). A failure fails the step,
    /// and the coordinator compensates.
    fn verify<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
        let _ = step;
        Box::pin(async { Ok(()) })
    }
}

/// How an executor connects.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// NATS URLs.
    pub url: String,
    /// The executor's name: it serves `exec.<name>`.
    pub name: String,
    /// The domain.
    pub domain: String,
    /// Its nkey seed file, if the server asks for one.
    pub nkey_seed_file: Option<std::path::PathBuf>,
}

impl ExecutorConfig {
    /// Executor `name` on `url`, domain `default`, no credentials.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> ExecutorConfig {
        ExecutorConfig {
            url: url.into(),
            name: name.into(),
            domain: "default".into(),
            nkey_seed_file: None,
        }
    }
}

/// An executor: handlers by step kind.
pub struct Executor {
    cfg: ExecutorConfig,
    handlers: HashMap<StepKind, Arc<dyn StepHandler>>,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("cfg", &self.cfg)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A running executor; dropping it stops serving.
#[derive(Debug)]
pub struct Running {
    task: tokio::task::JoinHandle<()>,
    probes: tokio::task::JoinHandle<()>,
    member: String,
    /// The NATS connection.
    pub nats: async_nats::Client,
}

impl Running {
    /// This member's id: its claims name it, and it answers about them on
    /// `exec.<name>.member.<id>`.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// Stops serving (as a crash would: nothing is flushed).
    pub fn stop(self) {
        self.task.abort();
        self.probes.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        self.probes.abort();
    }
}

/// The header of an answer that names the member that gave it.
pub const MEMBER_HEADER: &str = "Concord-Member";

/// What a member answers when asked whether it is applying a key.
const APPLYING: &[u8] = b"applying";
const IDLE: &[u8] = b"idle";

impl Executor {
    /// An executor with no handlers yet.
    pub fn new(cfg: ExecutorConfig) -> Executor {
        Executor {
            cfg,
            handlers: HashMap::new(),
        }
    }

    /// Handles `kind` with `handler`.
    pub fn handle(mut self, kind: StepKind, handler: Arc<dyn StepHandler>) -> Executor {
        self.handlers.insert(kind, handler);
        self
    }

    /// Connects, opens (or creates) the fencing bucket, subscribes in the
    /// queue group `exec.<name>` and serves until the returned handle drops.
    pub async fn start(self) -> Result<Running, ExecutorError> {
        let name = self.cfg.name.clone();
        let nats = crate::agent::connect_nats(&self.cfg.url, &name, self.cfg.nkey_seed_file.as_ref(), None)
            .await
            .map_err(ExecutorError::Nats)?;
        let js = jetstream::new(nats.clone());
        let bucket = format!("CONCORD_FENCING_{name}");
        let store_err = |detail: String| ExecutorError::Store {
            bucket: bucket.clone(),
            detail,
        };
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                // The bucket's stream by the key-value conventions, created
                // directly: the client's bucket creation first reads the
                // account info in a shape nats-server 2.9 does not send.
                js.get_or_create_stream(jetstream::stream::Config {
                    name: format!("KV_{bucket}"),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    max_age: RECORD_MAX_AGE,
                    discard: jetstream::stream::DiscardPolicy::New,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| store_err(e.to_string()))?;
                js.get_key_value(&bucket).await.map_err(|e| store_err(e.to_string()))?
            }
        };
        let subject = format!("concord.v1.{}.exec.{name}", self.cfg.domain);
        // A fresh id per start: a restarted process is another member, and
        // its earlier self's claims are orphans.
        let member = nats.new_inbox().rsplit('.').next().unwrap_or_default().to_string();
        let serving: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let mut questions = nats
            .subscribe(format!("{subject}.member.{member}"))
            .await
            .map_err(|e| ExecutorError::Nats(e.to_string()))?;
        let mut sub = nats
            .queue_subscribe(subject.clone(), format!("concord-exec-{name}"))
            .await
            .map_err(|e| ExecutorError::Nats(e.to_string()))?;
        nats.flush().await.map_err(|e| ExecutorError::Nats(e.to_string()))?;
        // The halts, if the coordinator has published any (read-only for executors).
        let halts = js.get_key_value(HALT_BUCKET).await.ok();
        let handlers = Arc::new(self.handlers);
        // Answers about this member's claims for as long as it serves: the
        // serving task holds `alive`, so if it ends (stopped, or a handler
        // panicked) this ends too, and askers hear that nobody listens.
        let (alive, serving_ended) = tokio::sync::oneshot::channel::<()>();
        let (client, asked) = (nats.clone(), serving.clone());
        let probes = tokio::spawn(async move {
            tokio::pin!(serving_ended);
            loop {
                let m = tokio::select! {
                    _ = &mut serving_ended => return,
                    m = questions.next() => match m {
                        Some(m) => m,
                        None => return,
                    },
                };
                let Some(reply) = m.reply else { continue };
                let applying =
                    asked.lock().expect("serving lock").as_deref().map(str::as_bytes) == Some(&m.payload[..]);
                let answer = Bytes::from_static(if applying { APPLYING } else { IDLE });
                if let Err(e) = client.publish(reply, answer).await {
                    debug!("cannot answer a member's question: {e}");
                }
            }
        });
        // Nobody listening is how members tell a dead one: make sure this
        // one is heard (a server that does not let it subscribe or publish
        // there would make its claims look orphaned to the others).
        let asked = async_nats::Request::new().timeout(Some(MEMBER_PROBE_TIMEOUT));
        if let Err(e) = nats.send_request(format!("{subject}.member.{member}"), asked).await {
            probes.abort();
            return Err(ExecutorError::Nats(format!(
                "members cannot ask each other on `{subject}.member.*` ({e}): the server must let \
                 executor `{name}` publish and subscribe there (`concord nats-config` does)"
            )));
        }
        let client = nats.clone();
        let fencing = Fencing {
            kv,
            halts,
            domain: self.cfg.domain.clone(),
            nats: nats.clone(),
            members: format!("{subject}.member"),
            member: member.clone(),
        };
        let task = tokio::spawn(async move {
            let _alive = alive;
            // One dispatch at a time per member: steps on one path must not
            // interleave, and the coordinator runs a saga's steps in order.
            // More members in the queue group serve more in parallel.
            while let Some(m) = sub.next().await {
                let Some(reply) = m.reply.clone() else {
                    warn!("a dispatch without a reply subject: dropped");
                    continue;
                };
                let d: StepDispatch = match serde_json::from_slice(&m.payload) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("a dispatch that does not decode: {e}");
                        continue;
                    }
                };
                let cx = trace::start(
                    "concord.exec",
                    SpanKind::Server,
                    &trace::extract(m.headers.as_ref()),
                    vec![
                        KeyValue::new("concord.key", d.key.text()),
                        KeyValue::new("concord.path", d.path.to_string()),
                        KeyValue::new("concord.kind", d.kind.to_string()),
                    ],
                );
                let (trace_id, span_id) = trace::ids(&cx);
                let span =
                    info_span!("exec", key = %d.key.text(), path = %d.path, trace_id = %trace_id, span_id = %span_id);
                *serving.lock().expect("serving lock") = Some(d.key.text());
                let served = async {
                    match serve_one(&fencing, &handlers, d, trace::traceparent(&cx)).await {
                        Ok(Some(o)) => {
                            let bytes = serde_json::to_vec(&o).expect("outcomes serialize");
                            let mut headers = trace::inject(&cx);
                            headers.insert(MEMBER_HEADER, fencing.member.as_str());
                            if let Err(e) = client.publish_with_headers(reply, headers, bytes.into()).await {
                                warn!("cannot answer: {e}");
                            }
                            KeyValue::new("concord.outcome", format!("{:?}", o.result))
                        }
                        Ok(None) => {
                            debug!("another member is applying this key; no answer");
                            KeyValue::new("concord.outcome", "unanswered")
                        }
                        // The store is away: answer nothing, the coordinator
                        // sends the dispatch again with the same key.
                        Err(e) => {
                            warn!("{e}");
                            KeyValue::new("concord.error", e)
                        }
                    }
                };
                let outcome = served.instrument(span).await;
                *serving.lock().expect("serving lock") = None;
                trace::end(&cx, vec![outcome]);
            }
        });
        Ok(Running {
            task,
            probes,
            member,
            nats,
        })
    }
}

/// The coordinator's halt bucket.
pub const HALT_BUCKET: &str = "CONCORD_HALT";

struct Fencing {
    kv: kv::Store,
    halts: Option<kv::Store>,
    domain: String,
    /// For asking other members about their claims.
    nats: async_nats::Client,
    /// `exec.<name>.member`: a member answers on `<members>.<id>`.
    members: String,
    /// This member's id.
    member: String,
}

/// What a claim's owner said about it.
#[derive(Debug, PartialEq, Eq)]
enum Owner {
    /// It is applying the key, or did not answer in time.
    Busy,
    /// It is alive but not applying the key, or gone (nobody listens on
    /// its subject): the claim is orphaned.
    Orphaned,
}

/// A halt as the coordinator publishes it (other fields ignored).
#[derive(serde::Deserialize)]
struct Halt {
    scope: HaltScope,
    grade: HaltGrade,
    #[serde(default)]
    reason: String,
}

/// A KV key: `[A-Za-z0-9_-/]` as they are, anything else as `=XX`.
fn kv_key(prefix: &str, text: &str) -> String {
    let mut k = String::with_capacity(prefix.len() + text.len() + 1);
    k.push_str(prefix);
    k.push('.');
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/') {
            k.push(b as char);
        } else {
            k.push_str(&format!("={b:02X}"));
        }
    }
    k
}

/// A claim's value starts so; the claiming member's id follows.
const PENDING: &str = "pending";

fn claim(member: &str) -> Bytes {
    Bytes::from(format!("{PENDING} {member}"))
}

/// The member a claim names: `Some("")` for a claim that names none (made
/// by an earlier SDK), `None` if `value` is not a claim.
fn claimed_by(value: &[u8]) -> Option<&str> {
    let rest = std::str::from_utf8(value).ok()?.strip_prefix(PENDING)?;
    if rest.is_empty() {
        return Some("");
    }
    rest.strip_prefix(' ')
}

fn failed(key: &DispatchKey, reason: String) -> StepOutcome {
    StepOutcome {
        key: key.clone(),
        result: StepResult::Failed {
            reason: Short::parse(&reason.chars().take(1000).collect::<String>())
                .unwrap_or_else(|_| Short::parse("failed").expect("a short string")),
        },
    }
}

impl Fencing {
    /// Asks the member that claimed `key` whether it is applying it.
    async fn ask(&self, owner: &str, key: &str) -> Owner {
        let valid = !owner.is_empty()
            && owner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !valid {
            // No member to ask: a claim no running SDK answers for.
            return Owner::Orphaned;
        }
        let req = async_nats::Request::new()
            .payload(Bytes::copy_from_slice(key.as_bytes()))
            .timeout(Some(MEMBER_PROBE_TIMEOUT));
        match self.nats.send_request(format!("{}.{owner}", self.members), req).await {
            Ok(m) if m.payload.as_ref() == APPLYING => Owner::Busy,
            Ok(_) => Owner::Orphaned,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Owner::Orphaned,
            Err(e) => {
                debug!(owner, "a member did not say whether it applies {key}: {e}");
                Owner::Busy
            }
        }
    }

    /// The freeze that covers `path`, if any.
    async fn frozen(&self, path: &ResourcePath) -> Option<String> {
        let kv = self.halts.as_ref()?;
        let bytes = kv.get(&self.domain).await.ok()??;
        let halts: Vec<Halt> = serde_json::from_slice(&bytes).ok()?;
        let p = path.as_str();
        halts.into_iter().find_map(|h| {
            let covers = match &h.scope {
                HaltScope::All => true,
                HaltScope::Path(s) => p == s.as_str() || p.starts_with(&format!("{}/", s.as_str())),
                // The executor does not know the plan's agent; the coordinator checks those.
                HaltScope::Agent(_) => false,
            };
            (covers && h.grade == HaltGrade::Freeze).then(|| format!("halted (freeze): {}", h.reason))
        })
    }

    /// Raises the path's token to `token` unless a higher one is recorded;
    /// returns the highest seen when `token` is stale.
    async fn admit_token(&self, path: &ResourcePath, token: u64) -> Result<Option<u64>, String> {
        let key = kv_key("token", path.as_str());
        for _ in 0..CAS_ATTEMPTS_MAX {
            let entry = self.kv.entry(key.clone()).await.map_err(|e| e.to_string())?;
            let (seen, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0),
                    Some(e.revision),
                ),
                _ => (0, None),
            };
            if token < seen {
                return Ok(Some(seen));
            }
            if token == seen {
                return Ok(None);
            }
            let value = Bytes::from(token.to_string());
            let written = match revision {
                Some(r) => self
                    .kv
                    .update(&key, value, r)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => self.kv.create(&key, value).await.map(|_| ()).map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => return Ok(None),
                // Another member moved it first: read again and compare.
                Err(e) => debug!("token compare-and-set lost ({e}); reading again"),
            }
        }
        Err(format!("the token of `{path}` kept changing under contention"))
    }
}

async fn serve_one(
    fencing: &Fencing,
    handlers: &HashMap<StepKind, Arc<dyn StepHandler>>,
    d: StepDispatch,
    traceparent: Option<String>,
) -> Result<Option<StepOutcome>, String> {
    let key = d.key.text();
    let done_key = kv_key("done", &key);
    // 1. Dedupe: claim the key by create (compare-and-set on "absent").
    let (revision, taken_over) = match fencing.kv.create(&done_key, claim(&fencing.member)).await {
        Ok(revision) => (revision, false),
        Err(e) if e.kind() != kv::CreateErrorKind::AlreadyExists => {
            return Err(format!("cannot claim {key}: {e}"));
        }
        Err(_) => {
            let entry = fencing.kv.entry(&done_key).await.map_err(|e| e.to_string())?;
            // Given back in between: the next delivery claims it.
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                return Ok(None);
            };
            let Some(owner) = claimed_by(&entry.value) else {
                return Ok(Some(match serde_json::from_slice::<StepOutcome>(&entry.value) {
                    Ok(o) => o,
                    Err(e) => failed(&d.key, format!("the recorded outcome does not decode: {e}")),
                }));
            };
            // This member serves one key at a time: its own claim of
            // another delivery is orphaned.
            if owner != fencing.member && fencing.ask(owner, &key).await == Owner::Busy {
                return Ok(None);
            }
            match fencing
                .kv
                .update(&done_key, claim(&fencing.member), entry.revision)
                .await
            {
                Ok(revision) => {
                    warn!(owner, "{key} was left claimed by a member that is gone: taken over");
                    (revision, true)
                }
                // Another member took it over first.
                Err(_) => return Ok(None),
            }
        }
    };
    let outcome = match decide(fencing, handlers, &d, traceparent, taken_over).await {
        Ok(o) => o,
        Err(e) => {
            // Only the store failed, before anything was applied. A fresh
            // claim is given back so a retry starts over; a claim taken over
            // stays this member's (which answers `idle` for it), so the next
            // delivery takes it over again with the same care.
            if !taken_over {
                let _ = fencing.kv.delete_expect_revision(&done_key, Some(revision)).await;
            }
            return Err(e);
        }
    };
    let bytes = serde_json::to_vec(&outcome).expect("outcomes serialize");
    // Compare-and-set on this member's claim: if another member took the key
    // over meanwhile (it found this one gone), its outcome stands.
    fencing
        .kv
        .update(&done_key, bytes.into(), revision)
        .await
        .map_err(|e| format!("cannot record the outcome of {key}: {e}"))?;
    Ok(Some(outcome))
}

/// Decides a claimed dispatch; `taken_over` if the claim was taken over
/// from a member that died mid-apply (see the module's docs).
async fn decide(
    fencing: &Fencing,
    handlers: &HashMap<StepKind, Arc<dyn StepHandler>>,
    d: &StepDispatch,
    traceparent: Option<String>,
    taken_over: bool,
) -> Result<StepOutcome, String> {
    // 2. Fencing.
    if let Some(seen) = fencing.admit_token(&d.path, d.fencing_token).await? {
        return Ok(StepOutcome {
            key: d.key.clone(),
            result: StepResult::StaleToken { seen },
        });
    }
    if d.key.phase == Phase::Do
        && let Some(why) = fencing.frozen(&d.path).await
    {
        return Ok(failed(&d.key, why));
    }
    let Some(handler) = handlers.get(&d.kind) else {
        return Ok(failed(
            &d.key,
            format!("this executor has no handler for `{}` steps", d.kind),
        ));
    };
    // 3. Compare-and-set on the values the coordinator expects.
    let mut actual = Vec::new();
    let mut drift = false;
    for (path, expected) in &d.expected_before {
        let now = handler.read(path).await;
        if !same(&now, expected) {
            drift = true;
        }
        actual.push((path.clone(), now));
    }
    let op = match d.op() {
        Ok(op) => op,
        Err(e) => return Ok(failed(&d.key, format!("the step does not decode: {e}"))),
    };
    let step = Step {
        dispatch: d.clone(),
        op,
        traceparent,
    };
    if drift {
        // The member that died mid-apply may have moved them: is the
        // step's effect in place?
        if taken_over && d.key.phase == Phase::Do {
            match handler.verify(&step).await {
                Ok(()) => {
                    warn!(key = %d.key.text(), "taken over: the step's effect is in place; not applied again");
                    return Ok(StepOutcome {
                        key: d.key.clone(),
                        result: StepResult::Succeeded,
                    });
                }
                Err(e) => debug!(key = %d.key.text(), "taken over: the step's effect is not in place ({e})"),
            }
        }
        return Ok(StepOutcome {
            key: d.key.clone(),
            result: StepResult::Drift { actual },
        });
    }
    // 4. Apply (and verify) or compensate.
    let r = match d.key.phase {
        Phase::Do => match handler.apply(&step).await {
            Ok(()) => handler.verify(&step).await,
            Err(e) => Err(e),
        },
        Phase::Undo => handler.compensate(&step).await,
    };
    Ok(match r {
        Ok(()) => StepOutcome {
            key: d.key.clone(),
            result: StepResult::Succeeded,
        },
        Err(e) => failed(&d.key, e.0),
    })
}

/// Values compare as numbers where both are numbers (50 and 50.0 agree).
fn same(a: &Option<Value>, b: &Option<Value>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) => p == q,
            _ => x == y,
        },
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keys_escape_what_kv_does_not_take() {
        assert_eq!(kv_key("token", "db/primary/pool_size"), "token.db/primary/pool_size");
        assert_eq!(kv_key("done", "a:b@1/2/s1/do/1"), "done.a=3Ab=401/2/s1/do/1");
        assert!(same(&Some(Value::Int(50)), &Some(Value::Float(50.0))));
        assert!(!same(&Some(Value::Int(50)), &None));
    }

    #[test]
    fn a_claim_names_its_member_and_an_outcome_is_no_claim() {
        assert_eq!(claimed_by(&claim("m1")), Some("m1"));
        assert_eq!(claimed_by(b"pending"), Some(""));
        assert_eq!(claimed_by(br#"{"key":{},"result":{"status":"succeeded"}}"#), None);
        assert_eq!(claimed_by(b"pendingx"), None);
    }
}
