//! The executor's side: apply steps the coordinator dispatches.
//!
//! An executor serves `exec.<name>` in a queue group, so several members can
//! share the work. For each dispatch the SDK:
//!
//! 1. dedupes on the idempotency key: a key already answered gets the
//!    recorded outcome again, nothing is applied twice; a key another member
//!    is applying right now gets no answer (the coordinator sends it again);
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
//! carries it back.
//!
//! The highest token per path and the answered keys live in the KV bucket
//! `CONCORD_FENCING_<name>` (which `concord nats-config` lets the executor
//! use), so a restarted executor or another member still refuses a stale
//! token and still dedupes.

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
    /// The NATS connection.
    pub nats: async_nats::Client,
}

impl Running {
    /// Stops serving (as a crash would: nothing is flushed).
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

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
        let nats = crate::agent::connect_nats(&self.cfg.url, &name, self.cfg.nkey_seed_file.as_ref())
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
        let mut sub = nats
            .queue_subscribe(subject.clone(), format!("concord-exec-{name}"))
            .await
            .map_err(|e| ExecutorError::Nats(e.to_string()))?;
        nats.flush().await.map_err(|e| ExecutorError::Nats(e.to_string()))?;
        // The halts, if the coordinator has published any (read-only for executors).
        let halts = js.get_key_value(HALT_BUCKET).await.ok();
        let handlers = Arc::new(self.handlers);
        let client = nats.clone();
        let domain = self.cfg.domain.clone();
        let task = tokio::spawn(async move {
            let fencing = Fencing { kv, halts, domain };
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
                let served = async {
                    match serve_one(&fencing, &handlers, d, trace::traceparent(&cx)).await {
                        Ok(Some(o)) => {
                            let bytes = serde_json::to_vec(&o).expect("outcomes serialize");
                            if let Err(e) = client
                                .publish_with_headers(reply, trace::inject(&cx), bytes.into())
                                .await
                            {
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
                trace::end(&cx, vec![outcome]);
            }
        });
        Ok(Running { task, nats })
    }
}

/// The coordinator's halt bucket.
pub const HALT_BUCKET: &str = "CONCORD_HALT";

struct Fencing {
    kv: kv::Store,
    halts: Option<kv::Store>,
    domain: String,
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

const PENDING: &[u8] = b"pending";

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
    let done_key = kv_key("done", &d.key.text());
    // 1. Dedupe: claim the key by create (compare-and-set on "absent").
    if let Err(e) = fencing.kv.create(&done_key, Bytes::from_static(PENDING)).await {
        if e.kind() != kv::CreateErrorKind::AlreadyExists {
            return Err(format!("cannot claim {}: {e}", d.key.text()));
        }
        let recorded = fencing.kv.get(&done_key).await.map_err(|e| e.to_string())?;
        return Ok(match recorded {
            Some(v) if v.as_ref() != PENDING => match serde_json::from_slice::<StepOutcome>(&v) {
                Ok(o) => Some(o),
                Err(e) => Some(failed(&d.key, format!("the recorded outcome does not decode: {e}"))),
            },
            _ => None,
        });
    }
    let outcome = decide(fencing, handlers, &d, traceparent).await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // Give the key back so a retry can try again.
            let _ = fencing.kv.delete(&done_key).await;
            return Err(e);
        }
    };
    let bytes = serde_json::to_vec(&outcome).expect("outcomes serialize");
    fencing
        .kv
        .put(&done_key, bytes.into())
        .await
        .map_err(|e| format!("cannot record the outcome of {}: {e}", d.key.text()))?;
    Ok(Some(outcome))
}

async fn decide(
    fencing: &Fencing,
    handlers: &HashMap<StepKind, Arc<dyn StepHandler>>,
    d: &StepDispatch,
    traceparent: Option<String>,
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
    if drift {
        return Ok(StepOutcome {
            key: d.key.clone(),
            result: StepResult::Drift { actual },
        });
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
}
