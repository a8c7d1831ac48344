//! `concord bench`: the live bus measured beside its physical floors, in
//! the same run on the same server, so ratios hold on a noisy machine.
//!
//! - **Round trip**: one agent, one intent at a time, against the floor
//!   "request/reply whose responder does one JetStream publish-ack".
//! - **Throughput**: many agents at once for a fixed time against the floor
//!   "concurrent request/reply whose responder does one async JetStream
//!   publish"; with the decision latency under that load.
//! - **Durable**: the same two on a server that syncs every write
//!   (`sync_interval: always`), with the raw per-message durable rate.
//! - **Halt**: an operator's halt under an intent flood, until its reply
//!   (the halt is in the log and in force). The operator sends from a
//!   thread and runtime of its own, as `concord halt` runs in a process of
//!   its own, not as one more task among the flood's.
//! - **Recovery**: a generated log of about a million events, rebuilt
//!   without a snapshot and with one.
//!
//! Workload: intents of one `set` step on a distinct path each
//! (`fleet/node-<n>/weight`), a policy of 11 rules (the built-ins plus a
//! ceiling and a rate rule) that admits 80% and rejects 20% (values above
//! the ceiling), an executor answering every dispatch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use concord_core::coordinator::{Config, Coordinator, Effect, Genesis, Input, RECORD_VERSION, Record};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::coord::{StepDispatch, StepOutcome, StepResult};
use futures::StreamExt;
use serde::Serialize;

use crate::client::ConcordClient;
use crate::config::{Credentials, RuntimeConfig};
use crate::log::{GENESIS_PREV, Signer};
use crate::runtime::{Health, run};
use crate::server::{ServerOptions, ServerProcess};
use crate::store::{Snapshot, SnapshotMeta, Store};

/// The bench's policy: 11 rules, 20% of the workload's values above the ceiling.
pub const BENCH_POLICY: &str = r#"
[defaults]
autonomy = "bounded"
[[rules.ceiling]]
id = "ceiling.weight"
paths = ["fleet/*/weight"]
approve_above = 800
reject_above = 850
[[rules.rate]]
id = "rate.weight"
paths = ["fleet/*/weight"]
max_factor = 1000.0
outcome = "reject"
"#;

/// How long and how hard.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Requests for each round-trip measurement.
    pub round_trips: usize,
    /// Seconds of each throughput measurement.
    pub seconds: u64,
    /// Concurrent requesters.
    pub concurrency: usize,
    /// Events in the generated log for recovery.
    pub recovery_events: u64,
    /// Skip the durable (fsync) runs.
    pub skip_durable: bool,
    /// Skip the recovery runs.
    pub skip_recovery: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            round_trips: 2_000,
            seconds: 5,
            concurrency: 256,
            recovery_events: 1_000_000,
            skip_durable: false,
            skip_recovery: false,
        }
    }
}

/// Latency percentiles, microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
}

impl Latency {
    fn of(mut v: Vec<Duration>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort();
        // Nearest rank: the smallest sample with at least a fraction `q` of
        // all at or below it (of 100, the p99 is the 99th, not the largest).
        let at = |q: f64| {
            let rank = (v.len() as f64 * q).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1].as_secs_f64() * 1e6
        };
        Latency {
            n: v.len(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: at(1.0),
        }
    }
}

/// A throughput run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rate {
    /// Completed requests per second.
    pub per_s: f64,
    /// Their latency.
    pub latency: Latency,
}

/// Everything measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Floor: request/reply with one JetStream publish-ack in the responder.
    pub floor_round_trip: Latency,
    /// Decision round trip.
    pub decision_round_trip: Latency,
    /// Floor: concurrent request/reply, responder does one async JetStream publish.
    pub floor_rate: Rate,
    /// Decided intents per second.
    pub decided_rate: Rate,
    /// Share of rejects in the decided run.
    pub reject_share: f64,
    /// Durable: raw per-message durable publish-ack rate (concurrent).
    pub durable_floor_rate: Option<Rate>,
    /// Durable: decided intents per second.
    pub durable_decided_rate: Option<Rate>,
    /// Halt reply latency under an intent flood.
    pub halt_under_flood: Latency,
    /// Events in the recovery log.
    pub recovery_events: u64,
    /// Log messages holding them.
    pub recovery_messages: u64,
    /// Recovery without a snapshot, ms.
    pub recovery_ms: Option<f64>,
    /// Recovery from a snapshot at the end of that log, ms.
    pub recovery_snapshot_ms: Option<f64>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn intent(n: u64, reject: bool) -> Vec<u8> {
    let value = if reject { 900 + n % 100 } else { n % 800 };
    format!(
        r#"{{"protocol":1,"lineage":"b-{n}","version":1,"idempotency_key":"b-{n}","goal":"bench","steps":[{{"id":"s1","kind":"set","path":"fleet/node-{n}/weight","args":{{"value":{value}}},"confidence":0.9,"compensation":{{"mode":"restore"}}}}]}}"#
    )
    .into_bytes()
}

/// An executor that answers every dispatch with success.
async fn executor(url: &str) -> Result<tokio::task::JoinHandle<()>, BoxError> {
    let nats = async_nats::connect(url).await?;
    let mut sub = nats.subscribe("concord.v1.default.exec.default").await?;
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Ok(d) = serde_json::from_slice::<StepDispatch>(&m.payload) else {
                continue;
            };
            let o = StepOutcome {
                key: d.key,
                result: StepResult::Succeeded,
            };
            if let Some(r) = m.reply {
                let _ = nats.publish(r, serde_json::to_vec(&o).unwrap_or_default().into()).await;
            }
        }
    }))
}

async fn start_coordinator(
    url: &str,
    dir: &std::path::Path,
) -> Result<
    (
        Arc<Health>,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    BoxError,
> {
    let policy = dir.join("bench-policy.toml");
    std::fs::write(&policy, BENCH_POLICY)?;
    let core = Config {
        running_per_agent_max: 1_000_000,
        pending_per_agent_max: 1_000_000,
        plans_max: 1_000_000,
        idempotency_keys_max: 1_000_000,
        ..Config::default()
    };
    let cfg = RuntimeConfig {
        nats: vec![url.to_string()],
        policy: Some(policy),
        core,
        ..RuntimeConfig::default()
    };
    let health = Arc::new(Health::default());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = health.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = run(cfg, h, async {
            let _ = rx.await;
        })
        .await
        {
            eprintln!("bench coordinator: {e}");
        }
    });
    // Long enough to measure a recovery that misses its target.
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if health.ready.load(Ordering::SeqCst) {
            return Ok((health, tx, task));
        }
        if task.is_finished() {
            return Err("the coordinator stopped while starting".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err("the coordinator did not become ready in 600 s".into())
}

/// The floor responder: one JetStream publish per request; `ack_first`
/// waits for the ack before replying (round trip), else replies when the
/// ack arrives without holding up the next request (throughput).
async fn floor_responder(
    url: &str,
    subject: &str,
    stream_subject: &str,
) -> Result<tokio::task::JoinHandle<()>, BoxError> {
    let nats = async_nats::connect(url).await?;
    let js = jetstream::new(nats.clone());
    let _ = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "BENCH_FLOOR".into(),
            subjects: vec![stream_subject.to_string()],
            ..Default::default()
        })
        .await?;
    let mut sub = nats.subscribe(subject.to_string()).await?;
    let stream_subject = stream_subject.to_string();
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Ok(ack) = js.publish(stream_subject.clone(), m.payload.clone()).await else {
                continue;
            };
            let nats = nats.clone();
            tokio::spawn(async move {
                if ack.await.is_ok()
                    && let Some(r) = m.reply
                {
                    let _ = nats.publish(r, "ok".into()).await;
                }
            });
        }
    }))
}

/// Runs `concurrency` loops for `seconds`, each calling `f(n)` with a fresh number.
async fn concurrent<F, Fut>(seconds: u64, concurrency: usize, start: u64, f: F) -> Rate
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicU64::new(start));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (f, next, stop) = (f.clone(), next.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if f(n).await {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = t0.elapsed().as_secs_f64();
    Rate {
        per_s: all.len() as f64 / elapsed,
        latency: Latency::of(all),
    }
}

async fn measure_decisions(url: &str, opts: &BenchOptions, start: u64) -> Result<(Rate, f64), BoxError> {
    let client = ConcordClient::connect(url, &Credentials::default(), "default", None).await?;
    let rejects = Arc::new(AtomicU64::new(0));
    let r2 = rejects.clone();
    let rate = concurrent(opts.seconds, opts.concurrency, start, move |n| {
        let c = client.clone();
        let rejects = r2.clone();
        async move {
            let agent = format!("a{}", n % 16);
            match c.propose(&agent, &intent(n, n % 5 == 0)).await {
                Ok(d) => {
                    if d.verdict == concord_proto::Verdict::Reject {
                        rejects.fetch_add(1, Ordering::Relaxed);
                    }
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    let share = rejects.load(Ordering::Relaxed) as f64 / (rate.latency.n.max(1) as f64);
    Ok((rate, share))
}

/// Runs every measurement.
pub async fn run_bench(bin: std::path::PathBuf, opts: BenchOptions) -> Result<Report, BoxError> {
    let mut report = Report::default();
    let server = ServerProcess::start(ServerOptions {
        bin: Some(bin.clone()),
        ..ServerOptions::default()
    })?;
    let url = server.url();
    let _exec = executor(&url).await?;
    let _floor = floor_responder(&url, "bench.floor", "bench.stream").await?;
    let (_h, stop, task) = start_coordinator(&url, server.dir()).await?;
    let nats = async_nats::connect(&url).await?;
    let client = ConcordClient::connect(&url, &Credentials::default(), "default", None).await?;

    eprintln!(
        "bench: round trips ({} each), floor and decisions interleaved",
        opts.round_trips
    );
    let mut floor = Vec::new();
    let mut decided = Vec::new();
    for i in 0..opts.round_trips as u64 {
        let t = Instant::now();
        if nats.request("bench.floor", "x".into()).await.is_ok() {
            floor.push(t.elapsed());
        }
        let t = Instant::now();
        if client.propose("rt", &intent(10_000_000 + i, false)).await.is_ok() {
            decided.push(t.elapsed());
        }
    }
    report.floor_round_trip = Latency::of(floor);
    report.decision_round_trip = Latency::of(decided);

    eprintln!(
        "bench: throughput, {} s each, {} concurrent",
        opts.seconds, opts.concurrency
    );
    let n2 = nats.clone();
    report.floor_rate = concurrent(opts.seconds, opts.concurrency, 0, move |_| {
        let n = n2.clone();
        async move { n.request("bench.floor", "x".into()).await.is_ok() }
    })
    .await;
    let (rate, share) = measure_decisions(&url, &opts, 20_000_000).await?;
    report.decided_rate = rate;
    report.reject_share = share;

    eprintln!("bench: halt under an intent flood");
    report.halt_under_flood = halt_under_flood(&url, &opts).await?;
    let _ = stop.send(());
    let _ = task.await;
    drop(server);

    if !opts.skip_durable {
        eprintln!("bench: durable mode (sync_interval: always)");
        let durable = ServerProcess::start(ServerOptions {
            bin: Some(bin.clone()),
            config: Some("jetstream { sync_interval: always }\n".into()),
            ..ServerOptions::default()
        })?;
        let url = durable.url();
        let _exec = executor(&url).await?;
        let _floor = floor_responder(&url, "bench.floor", "bench.stream").await?;
        let (_h, stop, task) = start_coordinator(&url, durable.dir()).await?;
        let nats = async_nats::connect(&url).await?;
        report.durable_floor_rate = Some(
            concurrent(opts.seconds, opts.concurrency, 0, move |_| {
                let n = nats.clone();
                async move { n.request("bench.floor", "x".into()).await.is_ok() }
            })
            .await,
        );
        report.durable_decided_rate = Some(measure_decisions(&url, &opts, 40_000_000).await?.0);
        let _ = stop.send(());
        let _ = task.await;
    }

    if !opts.skip_recovery {
        eprintln!(
            "bench: recovery from a generated log of {} events",
            opts.recovery_events
        );
        recovery(&bin, &opts, &mut report).await?;
    }
    Ok(report)
}

/// Halts sent under the flood, 10 ms apart: enough that the p99 is not
/// one or two samples.
const HALTS: usize = 400;

async fn halt_under_flood(url: &str, opts: &BenchOptions) -> Result<Latency, BoxError> {
    let flood_client = ConcordClient::connect(url, &Credentials::default(), "default", None).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for k in 0..opts.concurrency.min(128) as u64 {
        let c = flood_client.clone();
        let stop = stop.clone();
        flood.push(tokio::spawn(async move {
            let mut n = 60_000_000 + k * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let _ = c.propose("flood", &intent(n, false)).await;
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The operator is a process of its own (`concord halt`), not one more
    // task among the flood's on the agents' workers: its halts are sent and
    // their replies read on a thread and runtime of their own.
    let operator_url = url.to_string();
    let operator = std::thread::Builder::new()
        .name("concord-bench-operator".into())
        .spawn(move || -> Result<Vec<Duration>, String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let client = ConcordClient::connect(&operator_url, &Credentials::default(), "default", None)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut v = Vec::new();
                for i in 0..HALTS {
                    let halt = concord_proto::coord::Control::Halt {
                        scope: concord_proto::coord::HaltScope::Agent(format!("nobody-{i}")),
                        grade: concord_proto::coord::HaltGrade::Freeze,
                        reason: concord_proto::Short::parse("bench").expect("short"),
                    };
                    let t = Instant::now();
                    if client.control("op", &halt).await.is_ok() {
                        v.push(t.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(v)
            })
        })?;
    // Waited for off the agents' workers, which keep flooding meanwhile.
    let halts = tokio::task::spawn_blocking(move || operator.join()).await;
    // The flood stops whatever became of the operator.
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        let _ = f.await;
    }
    let halts = halts
        .map_err(|e| e.to_string())?
        .map_err(|_| "the operator's thread panicked".to_string())??;
    Ok(Latency::of(halts))
}

/// Generates a log of about `opts.recovery_events` events by driving a core
/// in-process (the same records the daemon writes), appends it in batches,
/// and times a coordinator's recovery, without and with a snapshot.
async fn recovery(bin: &std::path::Path, opts: &BenchOptions, report: &mut Report) -> Result<(), BoxError> {
    let server = ServerProcess::start(ServerOptions {
        bin: Some(bin.to_path_buf()),
        ..ServerOptions::default()
    })?;
    let url = server.url();
    let policy_path = server.dir().join("bench-policy.toml");
    std::fs::write(&policy_path, BENCH_POLICY)?;
    let config = Config {
        idempotency_keys_max: 100_000,
        ..Config::default()
    };
    let cfg = RuntimeConfig {
        nats: vec![url.clone()],
        policy: Some(policy_path),
        snapshots: crate::config::SnapshotConfig {
            every_records: 0,
            ..Default::default()
        },
        core: config.clone(),
        ..RuntimeConfig::default()
    };
    let nats = async_nats::connect(&url).await?;
    let store = Store::open(jetstream::new(nats.clone()), &cfg).await?;
    let policy = Policy::from_toml_str(BENCH_POLICY)?;
    let mut core = Coordinator::new(config.clone(), Policy::from_toml_str(BENCH_POLICY)?, World::default());
    let signer = Signer::generate();
    let mut prev = GENESIS_PREV.to_string();
    let mut seq = 0u64;
    let mut batch = vec![Record::Genesis(Box::new(Genesis {
        record_version: RECORD_VERSION,
        now_ms: 1,
        coordinator: "concord".into(),
        config,
        policy: policy.config.clone(),
        policy_hash: policy.hash.clone(),
        world: World::default(),
    }))];
    let (mut events, mut now, mut n) = (0u64, 1_000u64, 0u64);
    let subjects = crate::subjects::Subjects::new("default");
    let flush = async |batch: &mut Vec<Record>, prev: &mut String, seq: &mut u64| -> Result<(), BoxError> {
        let b = signer.seal("concord", 1, prev, std::mem::take(batch));
        *prev = b.hash.clone();
        let s = store
            .append(
                subjects.log("batch", "concord"),
                &format!("gen-{}", *seq + 1),
                *seq,
                serde_json::to_vec(&b)?.into(),
                Duration::from_secs(10),
            )
            .await?;
        *seq = s;
        Ok(())
    };
    while events < opts.recovery_events {
        now += 1;
        n += 1;
        let bytes = intent(n, n % 5 == 0);
        let input = Input::Intent {
            request: n,
            agent: format!("a{}", n % 16),
            intent: concord_proto::decode_intent(&bytes)?,
        };
        let mut pending = vec![input];
        while let Some(input) = pending.pop() {
            let fx = core.handle(now, input.clone());
            let mut ev = Vec::new();
            for e in fx {
                match e {
                    Effect::Event(e) => ev.push(e),
                    Effect::Dispatch(d) => pending.push(Input::Outcome {
                        executor: "default".into(),
                        outcome: StepOutcome {
                            key: d.key.clone(),
                            result: StepResult::Succeeded,
                        },
                    }),
                    _ => {}
                }
            }
            events += ev.len() as u64;
            batch.push(Record::Input {
                now_ms: now,
                input: Box::new(input),
                events: ev,
            });
        }
        if batch.len() >= 400 {
            flush(&mut batch, &mut prev, &mut seq).await?;
        }
    }
    if !batch.is_empty() {
        flush(&mut batch, &mut prev, &mut seq).await?;
    }
    report.recovery_events = events;
    report.recovery_messages = seq;

    let t = Instant::now();
    let (_h, stop, task) = start_coordinator(&url, server.dir()).await?;
    report.recovery_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    let _ = stop.send(());
    let _ = task.await;

    // A snapshot of the same state at the end of the log.
    let last = store.last_seq().await?;
    let mut recovered_prev = String::new();
    crate::client::read_log(&nats, "CONCORD_LOG", last, false, |_, p| {
        if let Ok(b) = serde_json::from_slice::<crate::log::Batch>(p) {
            recovered_prev = b.hash;
        }
        false
    })
    .await?;
    store
        .put_snapshot(
            &SnapshotMeta {
                seq: last,
                hash: recovered_prev,
                incarnation: 1,
                notices_bytes: 0,
            },
            Snapshot {
                coordinator: core.snapshot()?,
                notices: Vec::new(),
            },
        )
        .await?;
    let t = Instant::now();
    let (_h, stop, task) = start_coordinator(&url, server.dir()).await?;
    report.recovery_snapshot_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    let _ = stop.send(());
    let _ = task.await;
    Ok(())
}

/// The report as a Markdown table, with the ratios the targets name.
pub fn render(r: &Report, opts: &BenchOptions) -> String {
    let mut s = String::new();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    s.push_str(&format!(
        "workload: 1-step intents on distinct paths, {:.0}% rejected, an executor answering every dispatch; 11 rules; {} concurrent requesters; {} s per rate\n\n",
        r.reject_share * 100.0,
        opts.concurrency,
        opts.seconds
    ));
    s.push_str("| measure | floor | concord | ratio | target |\n| --- | --- | --- | --- | --- |\n");
    s.push_str(&format!(
        "| round trip median | {:.0} µs | {:.0} µs | {:.2}x | ≤ 1.25x |\n",
        r.floor_round_trip.p50_us,
        r.decision_round_trip.p50_us,
        ratio(r.decision_round_trip.p50_us, r.floor_round_trip.p50_us)
    ));
    s.push_str(&format!(
        "| round trip p99 | {:.0} µs | {:.0} µs | {:.2}x | ≤ 2x |\n",
        r.floor_round_trip.p99_us,
        r.decision_round_trip.p99_us,
        ratio(r.decision_round_trip.p99_us, r.floor_round_trip.p99_us)
    ));
    s.push_str(&format!(
        "| decided intents/s | {:.0}/s | {:.0}/s | {:.1}% | ≥ 20% |\n",
        r.floor_rate.per_s,
        r.decided_rate.per_s,
        100.0 * ratio(r.decided_rate.per_s, r.floor_rate.per_s)
    ));
    s.push_str(&format!(
        "| decision latency under load p50 / p99 | | {:.0} / {:.0} µs | | |\n",
        r.decided_rate.latency.p50_us, r.decided_rate.latency.p99_us
    ));
    if let (Some(df), Some(dd)) = (&r.durable_floor_rate, &r.durable_decided_rate) {
        s.push_str(&format!(
            "| durable decided intents/s (vs non-durable decided) | {:.0}/s | {:.0}/s | {:.1}% | ≥ 50% |\n",
            r.decided_rate.per_s,
            dd.per_s,
            100.0 * ratio(dd.per_s, r.decided_rate.per_s)
        ));
        s.push_str(&format!(
            "| durable raw request/reply with one publish per message | | {:.0}/s | durable decided {:.1}x it | |\n",
            df.per_s,
            ratio(dd.per_s, df.per_s)
        ));
    }
    s.push_str(&format!(
        "| halt under an intent flood p50 / p99 | | {:.1} / {:.1} ms | | p99 ≤ 10 ms |\n",
        r.halt_under_flood.p50_us / 1e3,
        r.halt_under_flood.p99_us / 1e3
    ));
    if let Some(ms) = r.recovery_ms {
        s.push_str(&format!(
            "| recovery, {} events in {} messages, no snapshot | | {:.0} ms | | < 10 s |\n",
            r.recovery_events, r.recovery_messages, ms
        ));
    }
    if let Some(ms) = r.recovery_snapshot_ms {
        s.push_str(&format!(
            "| recovery from a snapshot at the end | | {ms:.0} ms | | < 2 s |\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Latency;

    /// Percentiles by nearest rank: of 100 samples the p99 is the 99th
    /// smallest, the p50 the 50th; the maximum is the largest.
    #[test]
    fn percentiles_are_nearest_ranks() {
        let l = Latency::of((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!((l.n, l.p50_us, l.p99_us, l.max_us), (100, 50.0, 99.0, 100.0));
        let one = Latency::of(vec![Duration::from_micros(7)]);
        assert_eq!((one.p50_us, one.p99_us, one.max_us), (7.0, 7.0, 7.0));
        let l = Latency::of((1..=1000).map(Duration::from_micros).collect());
        assert_eq!((l.p50_us, l.p99_us), (500.0, 990.0));
    }

    #[test]
    fn the_bench_policy_compiles_and_decides_the_stated_mix() {
        let p = concord_core::policy::Policy::from_toml_str(super::BENCH_POLICY).unwrap();
        assert_eq!(p.rule_count(), 11);
        let world = concord_core::world::World::default();
        let mut rejects = 0;
        for n in 0..100u64 {
            let i = concord_proto::decode_intent(&super::intent(n, n % 5 == 0)).unwrap();
            let d = concord_core::preview::preview(concord_core::preview::PreviewInput {
                world: &world,
                intent: &i,
                agent: "a",
                policy: &p,
                previous: None,
            });
            assert_ne!(d.verdict, concord_proto::Verdict::NeedsApproval);
            rejects += usize::from(d.verdict == concord_proto::Verdict::Reject);
        }
        assert_eq!(rejects, 20);
    }
}
