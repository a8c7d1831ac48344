//! The live commands: `propose` (the `nats req` of concord), the operators'
//! controls, their read-only questions, and `show`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use concord_core::report::{exit_code, render};
use concord_nats::client::ClientError;
use concord_nats::wire::{Answer, Query};
use concord_proto::coord::{Control, HaltGrade, HaltScope, SagaAction};
use concord_proto::{Id, ResourcePath, Short};

use super::bus::{Bus, runtime};
use super::out;

/// `concord propose`.
#[derive(Debug, clap::Args)]
pub struct ProposeArgs {
    /// The plan (an intent, JSON).
    plan: PathBuf,
    /// Propose as this agent (with its credentials: `--creds`).
    #[arg(long)]
    agent: String,
    /// Print the decision as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    bus: Bus,
}

/// Sends the plan and prints the decision; the exit code is the verdict's
/// (0 admit, 2 needs approval, 3 reject, 1 error).
pub fn propose(a: ProposeArgs) -> Result<u8> {
    let bytes = std::fs::read(&a.plan).with_context(|| format!("reading {}", a.plan.display()))?;
    let mut bus = a.bus.clone();
    bus.who = a.agent.clone();
    let d = runtime()?.block_on(async {
        let c = bus.connect().await?;
        c.propose(&a.agent, &bytes).await.map_err(anyhow::Error::from)
    })?;
    if a.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&d)?))?;
    } else {
        if let Some(p) = &d.preview {
            out(&render(p))?;
        } else {
            out(&format!(
                "verdict: {}{}\n",
                d.verdict,
                if d.duplicate {
                    " (the original decision: this plan was decided before)"
                } else {
                    ""
                }
            ))?;
            for r in &d.reasons {
                out(&format!("  {} [{}] {}\n", r.rule, r.outcome, r.message))?;
            }
        }
        for c in &d.conflicts {
            out(&format!(
                "conflict: {} v{} of agent `{}` on `{}` ({})\n",
                c.other, c.version, c.agent, c.path, c.kind
            ))?;
        }
        if d.queued {
            out("queued: it will be decided when the conflicting plan ends\n")?;
        }
        out(&format!(
            "plan hash {}\nmaterial hash {}\n",
            d.plan_hash, d.material_hash
        ))?;
    }
    Ok(exit_code(d.verdict) as u8)
}

/// An operator's command, each a top-level subcommand (`concord approve ...`).
#[derive(Debug, clap::Subcommand)]
pub enum ControlCmd {
    /// Approve a plan waiting for a human (binds the hashes shown by `concord pending`).
    Approve {
        /// The plan's lineage.
        lineage: String,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        bus: Bus,
    },
    /// Reject a plan waiting for a human.
    Reject {
        /// The plan's lineage.
        lineage: String,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        bus: Bus,
    },
    /// Stop admission and dispatch: everything, one agent, or one path.
    Halt {
        #[command(flatten)]
        scope: ScopeArgs,
        /// freeze (nothing admitted or dispatched), drain (nothing admitted), rollback (compensate in-flight sagas).
        #[arg(long, default_value = "freeze")]
        grade: String,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        bus: Bus,
    },
    /// Lift the halts of a scope.
    Resume {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        bus: Bus,
    },
    /// Cancel a running plan: its completed steps are compensated.
    Cancel {
        /// The plan's lineage.
        lineage: String,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        bus: Bus,
    },
    /// Decide a saga whose compensation failed: retry, skip or resolve.
    Saga {
        /// The plan's lineage.
        lineage: String,
        /// retry, skip or resolve.
        action: String,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        bus: Bus,
    },
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// Everything.
    #[arg(long)]
    all: bool,
    /// One agent's plans.
    #[arg(long)]
    agent: Option<String>,
    /// Plans touching this path or anything under it.
    #[arg(long)]
    path: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> Result<HaltScope> {
        Ok(match (&self.agent, &self.path) {
            (Some(a), _) => HaltScope::Agent(a.clone()),
            (_, Some(p)) => HaltScope::Path(ResourcePath::parse(p).map_err(|e| anyhow::anyhow!("--path: {}", e.1))?),
            _ => HaltScope::All,
        })
    }
}

fn short(s: &str, field: &str) -> Result<Short> {
    Short::parse(s).map_err(|e| anyhow::anyhow!("{field}: {}", e.1))
}

fn id(s: &str) -> Result<Id> {
    Id::parse(s).map_err(|e| anyhow::anyhow!("lineage: {}", e.1))
}

impl ControlCmd {
    fn bus(&self) -> &Bus {
        match self {
            ControlCmd::Approve { bus, .. }
            | ControlCmd::Reject { bus, .. }
            | ControlCmd::Halt { bus, .. }
            | ControlCmd::Resume { bus, .. }
            | ControlCmd::Cancel { bus, .. }
            | ControlCmd::Saga { bus, .. } => bus,
        }
    }
}

/// Sends an operator's command; exit 0 if it took effect, 1 if not.
pub fn control(what: ControlCmd) -> Result<u8> {
    let bus = what.bus().clone();
    runtime()?.block_on(async move {
        let c = bus.connect().await?;
        let control = match what {
            ControlCmd::Approve { lineage, reason, .. } => {
                // Approve what a human saw: the pending plan's hashes, as `concord pending` shows them.
                let Answer::Plans { plans, .. } = c.query(&bus.who, &Query::Pending).await? else {
                    bail!("unexpected answer to `pending`");
                };
                let Some(p) = plans.into_iter().find(|p| p.lineage.as_str() == lineage) else {
                    bail!("no plan `{lineage}` waits for approval");
                };
                Control::Approve {
                    lineage: p.lineage,
                    version: p.version,
                    plan_hash: p.plan_hash,
                    material_hash: p.material_hash,
                    reason: short(&reason, "--reason")?,
                }
            }
            ControlCmd::Reject { lineage, reason, .. } => {
                let Answer::Plans { plans, .. } = c.query(&bus.who, &Query::Pending).await? else {
                    bail!("unexpected answer to `pending`");
                };
                let Some(p) = plans.into_iter().find(|p| p.lineage.as_str() == lineage) else {
                    bail!("no plan `{lineage}` waits for approval");
                };
                Control::Reject {
                    lineage: p.lineage,
                    version: p.version,
                    reason: short(&reason, "--reason")?,
                }
            }
            ControlCmd::Halt {
                scope, grade, reason, ..
            } => Control::Halt {
                scope: scope.scope()?,
                grade: match grade.as_str() {
                    "freeze" => HaltGrade::Freeze,
                    "drain" => HaltGrade::Drain,
                    "rollback" => HaltGrade::Rollback,
                    g => bail!("--grade: `{g}` is not freeze, drain or rollback"),
                },
                reason: short(&reason, "--reason")?,
            },
            ControlCmd::Resume { scope, reason, .. } => Control::Resume {
                scope: scope.scope()?,
                reason: short(&reason, "--reason")?,
            },
            ControlCmd::Cancel { lineage, reason, .. } => Control::Cancel {
                lineage: id(&lineage)?,
                reason: short(&reason, "--reason")?,
            },
            ControlCmd::Saga {
                lineage,
                action,
                reason,
                ..
            } => Control::Saga {
                lineage: id(&lineage)?,
                action: match action.as_str() {
                    "retry" => SagaAction::Retry,
                    "skip" => SagaAction::Skip,
                    "resolve" => SagaAction::Resolve,
                    x => bail!("`{x}` is not retry, skip or resolve"),
                },
                reason: short(&reason, "--reason")?,
            },
        };
        let answer = c.control(&bus.who, &control).await?;
        out(&format!("{}\n", answer.message))?;
        Ok(if answer.ok { 0 } else { 1 })
    })
}

/// A read-only question.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    bus: Bus,
}

/// Which question.
#[derive(Debug, Clone, Copy)]
pub enum Asked {
    /// `concord pending`.
    Pending,
    /// `concord sagas`.
    Plans,
    /// `concord leases`.
    Leases,
    /// `concord status`.
    Status,
}

fn ask(bus: &Bus, q: Query) -> Result<Answer> {
    runtime()?.block_on(async {
        let c = bus.connect().await?;
        c.query(&bus.who, &q).await.map_err(|e| match e {
            ClientError::Bus(b) => anyhow::anyhow!("{}: {}", b.code, b.message),
            e => e.into(),
        })
    })
}

/// Answers `pending`, `sagas`, `leases` or `status`.
pub fn query(asked: Asked, a: QueryArgs) -> Result<u8> {
    let q = match asked {
        Asked::Pending => Query::Pending,
        Asked::Plans => Query::Plans,
        Asked::Leases => Query::Leases,
        Asked::Status => Query::Status,
    };
    let answer = ask(&a.bus, q)?;
    if a.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&answer)?))?;
        return Ok(0);
    }
    match answer {
        Answer::Plans { now_ms, plans } => {
            if plans.is_empty() {
                out("none\n")?;
            }
            for p in plans {
                let expiry = p
                    .expires_at_ms
                    .map(|e| format!(", expires in {} s", e.saturating_sub(now_ms) / 1000))
                    .unwrap_or_default();
                out(&format!(
                    "{} v{}  {}  agent {}  {}{}\n  goal: {}\n  paths: {}\n  plan hash {}  material {}\n",
                    p.lineage,
                    p.version,
                    p.status,
                    p.agent,
                    p.detail,
                    expiry,
                    p.goal,
                    p.paths.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
                    &p.plan_hash[..12.min(p.plan_hash.len())],
                    &p.material_hash[..12.min(p.material_hash.len())],
                ))?;
            }
        }
        Answer::Leases { leases } => {
            if leases.is_empty() {
                out("none\n")?;
            }
            for l in leases {
                out(&format!(
                    "lease {}  {}  {:?}  agent {}  expires at {}\n",
                    l.id, l.path, l.mode, l.agent, l.expires_at_ms
                ))?;
            }
        }
        Answer::Status(s) => {
            out(&format!(
                "coordinator {} (incarnation {})  {}\nlog at message {} ({})\nplans {}  leases {}  policy {}\n",
                s.coordinator,
                s.incarnation,
                if s.ready { "ready" } else { "not ready" },
                s.log_seq,
                &s.log_hash[..12.min(s.log_hash.len())],
                s.plans,
                s.leases,
                &s.policy_hash[..12.min(s.policy_hash.len())],
            ))?;
            if let Some(w) = &s.world {
                out(&format!(
                    "world document {} epoch {}  {} changes  {} replicas  {} refused changes\n",
                    &w.doc_id[..12.min(w.doc_id.len())],
                    w.epoch,
                    w.changes,
                    w.replicas,
                    w.changes_refused,
                ))?;
            }
            for h in s.halts {
                out(&format!(
                    "halt {:?} {:?} by {}: {}\n",
                    h.scope, h.grade, h.operator, h.reason
                ))?;
            }
        }
        other => out(&format!("{}\n", serde_json::to_string_pretty(&other)?))?,
    }
    Ok(0)
}

/// `concord world [PATH]`.
#[derive(Debug, clap::Args)]
pub struct WorldArgs {
    /// Only under this path.
    path: Option<String>,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    bus: Bus,
}

/// Prints world values and the latest observations.
pub fn world(a: WorldArgs) -> Result<u8> {
    let path = a
        .path
        .as_deref()
        .map(ResourcePath::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("PATH: {}", e.1))?;
    let answer = ask(&a.bus, Query::World { path })?;
    if a.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&answer)?))?;
        return Ok(0);
    }
    if let Answer::World {
        resources,
        observations,
    } = answer
    {
        for (p, v) in resources {
            out(&format!("{p} = {v}\n"))?;
        }
        for (p, o) in observations {
            out(&format!(
                "{p} ~ {} ({:?} from {} at {})\n",
                o.value, o.kind, o.agent, o.at_ms
            ))?;
        }
    }
    Ok(0)
}

/// `concord show PLAN`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The plan's lineage.
    lineage: String,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    bus: Bus,
}

/// Prints a live plan's preview (computed now), as `concord check` does.
pub fn show(a: ShowArgs) -> Result<u8> {
    let answer = ask(
        &a.bus,
        Query::Show {
            lineage: id(&a.lineage)?,
        },
    )?;
    let Answer::Preview(p) = answer else {
        bail!("unexpected answer");
    };
    if a.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&p)?))?;
    } else {
        out(&render(&p))?;
    }
    Ok(exit_code(p.verdict) as u8)
}
