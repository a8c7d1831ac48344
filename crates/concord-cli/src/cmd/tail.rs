//! `concord tail` (the coordination log, as it happens) and `concord log verify`.

use anyhow::Result;
use concord_core::coordinator::{Event, Input, Record};
use concord_nats::client::{read_log, verify_log};
use concord_nats::log::{Batch, Verifier, event_name, record_kind};

use super::bus::{Bus, runtime};
use super::out;

/// `concord tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Only records about this agent (or operator, or executor).
    #[arg(long)]
    agent: Option<String>,
    /// Only records of this input kind (intent, lease, observe, outcome,
    /// control, tick, genesis, incarnation, policy) or holding an event of this name (decided, dispatched, ...).
    #[arg(long)]
    kind: Option<String>,
    /// Only records at or after this coordinator time (ms since the epoch).
    #[arg(long)]
    since: Option<u64>,
    /// Keep reading as the log grows.
    #[arg(long)]
    follow: bool,
    /// One JSON record per line.
    #[arg(long)]
    json: bool,
    /// The log stream.
    #[arg(long, default_value = "CONCORD_LOG")]
    stream: String,
    #[command(flatten)]
    bus: Bus,
}

fn describe(r: &Record) -> String {
    match r {
        Record::Genesis(g) => format!(
            "genesis of coordinator {} (policy {})",
            g.coordinator,
            &g.policy_hash[..12]
        ),
        Record::Incarnation {
            coordinator,
            incarnation,
            core_version,
            ..
        } => format!("coordinator {coordinator} started, incarnation {incarnation}, core {core_version}"),
        Record::Policy { policy_hash, .. } => format!("policy loaded ({})", &policy_hash[..12]),
        Record::Notice { kind, detail, .. } => format!("notice {kind}: {detail}"),
        Record::Input { input, events, .. } => {
            let what = match input.as_ref() {
                Input::Intent { agent, intent, .. } => {
                    format!(
                        "{agent} proposes {} v{}: {}",
                        intent.lineage, intent.version, intent.goal
                    )
                }
                Input::Lease { agent, lease, .. } => {
                    format!("{agent} lease {}", serde_json::to_string(lease).unwrap_or_default())
                }
                Input::Observe { agent, observation } => format!(
                    "{agent} observes {} = {} ({:?})",
                    observation.path, observation.value, observation.kind
                ),
                Input::Outcome { executor, outcome } => format!(
                    "{executor} reports {}: {}",
                    outcome.key.text(),
                    serde_json::to_string(&outcome.result).unwrap_or_default()
                ),
                Input::Control { operator, control, .. } => {
                    format!("{operator} {}", serde_json::to_string(control).unwrap_or_default())
                }
                Input::Tick => "timers".to_string(),
            };
            let mut s = what;
            for e in events {
                s.push_str("\n    ");
                s.push_str(&event_line(e));
            }
            s
        }
    }
}

fn event_line(e: &Event) -> String {
    match e {
        Event::Decided {
            lineage,
            version,
            verdict,
            reasons,
            conflicts,
            ..
        } => {
            let mut s = format!("decided {lineage} v{version}: {verdict}");
            for r in reasons {
                s.push_str(&format!("\n      {} [{}]: {}", r.rule, r.outcome, r.message));
            }
            for c in conflicts {
                s.push_str(&format!(
                    "\n      conflicts with {} of {} on {}",
                    c.other, c.agent, c.path
                ));
            }
            s
        }
        Event::Dispatched { key, path, token } => format!("dispatched {} on {path} (token {token})", key.text()),
        other => {
            let v = serde_json::to_value(other).unwrap_or_default();
            let mut s = event_name(other);
            if let Some(m) = v.as_object() {
                for (k, val) in m.iter().filter(|(k, _)| k.as_str() != "event") {
                    s.push_str(&format!(" {k}={val}"));
                }
            }
            s
        }
    }
}

fn matches(r: &Record, a: &TailArgs) -> bool {
    let (kind, who) = record_kind(r);
    if a.since.is_some_and(|t| r.now_ms() < t) {
        return false;
    }
    if let Some(agent) = &a.agent
        && who != agent
    {
        return false;
    }
    if let Some(k) = &a.kind
        && kind != k
    {
        let has_event = matches!(r, Record::Input { events, .. } if events.iter().any(|e| &event_name(e) == k));
        if !has_event {
            return false;
        }
    }
    true
}

/// Prints the log's records, filtered on the client (a log message can carry many).
pub fn tail(a: TailArgs) -> Result<u8> {
    runtime()?.block_on(async {
        let c = a.bus.connect().await?;
        let mut failure = None;
        read_log(&c.nats, &a.stream, 1, a.follow, |seq, payload| {
            let batch: Batch = match serde_json::from_slice(payload) {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(format!("message {seq} is not a log batch: {e}"));
                    return false;
                }
            };
            for r in batch.records.iter().filter(|r| matches(r, &a)) {
                let line = if a.json {
                    serde_json::to_string(r).unwrap_or_default()
                } else {
                    format!("[{seq}] {} {}", r.now_ms(), describe(r))
                };
                if out(&format!("{line}\n")).is_err() {
                    return false;
                }
            }
            true
        })
        .await?;
        match failure {
            Some(f) => anyhow::bail!(f),
            None => Ok(0),
        }
    })
}

/// `concord record`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Where the incident starts (coordinator time, ms since the epoch):
    /// replay and what-if report from there. The records before it are kept:
    /// they rebuild the state the incident started from.
    #[arg(long)]
    since: Option<u64>,
    /// Where the recording ends: no record after this time (ms since the epoch).
    #[arg(long)]
    until: Option<u64>,
    /// The log stream.
    #[arg(long, default_value = "CONCORD_LOG")]
    stream: String,
    /// Read an export of the log stream instead of the live one: the
    /// stream's message bodies (each a batch, as stored) one per line, in
    /// stream order, from its first message. Its hash chain and signatures
    /// are checked as `concord log verify` checks the live log.
    #[arg(long, value_name = "FILE")]
    export: Option<std::path::PathBuf>,
    #[command(flatten)]
    bus: Bus,
}

/// Writes the log, from its genesis up to `--until`, as a JSONL recording
/// that `concord replay` re-decides.
pub fn record(a: RecordArgs) -> Result<u8> {
    let mut log = Collected::new(a.until);
    let source = match &a.export {
        Some(path) => {
            let source = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let seq = log.verifier.head().0 + 1;
                if !log
                    .add(seq, line.trim().as_bytes())
                    .map_err(|e| anyhow::anyhow!("{source}: line {}: {e}", i + 1))?
                {
                    break;
                }
            }
            source
        }
        None => {
            runtime()?.block_on(async {
                let c = a.bus.connect().await?;
                let mut failure = None;
                read_log(&c.nats, &a.stream, 1, false, |seq, payload| {
                    match log.add(seq, payload) {
                        Ok(more) => more,
                        Err(e) => {
                            failure = Some(e);
                            false
                        }
                    }
                })
                .await?;
                match failure {
                    Some(f) => anyhow::bail!("{}: {f}", a.stream),
                    None => Ok(()),
                }
            })?;
            a.stream.clone()
        }
    };
    let recording =
        concord_sim::replay::recording(log.records, a.since, a.until).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    out(&concord_sim::replay::to_jsonl(&recording))?;
    Ok(0)
}

/// A log's records, read a message at a time with its chain checked, up to
/// the first record after `until`.
struct Collected {
    verifier: Verifier,
    records: Vec<Record>,
    until: Option<u64>,
}

impl Collected {
    fn new(until: Option<u64>) -> Self {
        Collected {
            verifier: Verifier::new(Vec::new()),
            records: Vec::new(),
            until,
        }
    }

    /// Takes in message `seq`; false once past `until` (the rest is not needed).
    fn add(&mut self, seq: u64, payload: &[u8]) -> Result<bool, String> {
        let batch = self.verifier.check(seq, payload).map_err(|e| e.to_string())?;
        self.records.extend(batch.records);
        Ok(self
            .until
            .is_none_or(|u| self.records.last().is_none_or(|r| r.now_ms() <= u)))
    }
}

/// `concord log verify`.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    #[command(subcommand)]
    what: LogCmd,
    #[command(flatten)]
    bus: Bus,
}

#[derive(Debug, clap::Subcommand)]
enum LogCmd {
    /// Check the hash chain, the signatures and the recorded head; name the first message that does not fit.
    Verify {
        /// Accept only these signers' public keys (any valid signature if none).
        #[arg(long)]
        signer: Vec<String>,
        /// The log stream.
        #[arg(long, default_value = "CONCORD_LOG")]
        stream: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the log stream's message bodies (each a batch, as stored), one
    /// per line in stream order: an archive that `concord record --export`
    /// turns into a recording, its chain checked.
    Export {
        /// The log stream.
        #[arg(long, default_value = "CONCORD_LOG")]
        stream: String,
    },
}

/// Writes every message body of the log stream, one per line.
fn export(bus: &Bus, stream: &str) -> Result<u8> {
    runtime()?.block_on(async {
        let c = bus.connect().await?;
        let mut failure = None;
        read_log(&c.nats, stream, 1, false, |seq, payload| {
            // Bodies are compact JSON: one line each. Anything else would
            // break the line format, so it is refused rather than written.
            match std::str::from_utf8(payload) {
                Ok(text) if !text.contains('\n') => out(&format!("{text}\n")).is_ok(),
                _ => {
                    failure = Some(format!("message {seq} is not a one-line log batch"));
                    false
                }
            }
        })
        .await?;
        match failure {
            Some(f) => anyhow::bail!(f),
            None => Ok(0),
        }
    })
}

/// Verifies the log; exit 0 if it holds, 4 if not.
pub fn log(a: LogArgs) -> Result<u8> {
    let (signer, stream, json) = match a.what {
        LogCmd::Verify { signer, stream, json } => (signer, stream, json),
        LogCmd::Export { stream } => return export(&a.bus, &stream),
    };
    let pinned = !signer.is_empty();
    let report = runtime()?.block_on(async {
        let c = a.bus.connect().await?;
        verify_log(&c.nats, &stream, &a.bus.domain, signer)
            .await
            .map_err(anyhow::Error::from)
    })?;
    if json {
        out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else if let Some(e) = &report.error {
        out(&format!(
            "log does NOT verify: {e}\n({} messages checked before it)\n",
            report.messages
        ))?;
    } else {
        out(&format!(
            "log verifies: {} messages, {} records, head {} ({})\nsigned by: {}\n",
            report.messages,
            report.records,
            report.head_seq,
            report.head_hash,
            report.signers.join(", ")
        ))?;
        if !pinned {
            out(
                "no signer pinned: any key's signature passes; pass --signer <the coordinator's public key> \
                 (from its signing seed) to refuse a re-signed log\n",
            )?;
        }
    }
    Ok(if report.error.is_some() { 4 } else { 0 })
}
