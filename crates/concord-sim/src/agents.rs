//! The agents: scripted timelines, and the story's rule-driven agents.
//!
//! An agent sees the system (what its own probes would tell it) and the
//! answers to what it asked, and acts by proposing plans or asking for
//! leases. It never knows whether concord stands between it and the system:
//! coordinated and uncoordinated runs use the same agents; only the routing
//! of their actions differs.

use concord_proto::coord::{LeaseReply, LeaseRequest};
use concord_proto::{Intent, ResourcePath, Verdict, decode_intent};
use serde_json::json;

use crate::scenario::{AgentSpec, Knob, ReleaseAttempt, Scenario, ScriptAction};
use crate::system::{Health, System};

/// What an agent does.
#[derive(Clone, Debug)]
pub enum Action {
    /// Propose a plan (uncoordinated: apply it).
    Propose {
        /// The plan.
        intent: Box<Intent>,
        /// Routine: being blocked is needless.
        benign: bool,
    },
    /// Ask the lease service.
    Lease(LeaseRequest),
}

/// What an agent hears back.
#[derive(Clone, Debug)]
pub enum Notice {
    /// Its plan was decided.
    Decided {
        /// Lineage.
        lineage: String,
        /// Version.
        version: u32,
        /// Verdict.
        verdict: Verdict,
    },
    /// Its plan ended: applied in full (`ok`), or not (rejected by a human,
    /// expired, failed, compensated).
    Ended {
        /// Lineage.
        lineage: String,
        /// Version.
        version: u32,
        /// Applied in full.
        ok: bool,
    },
    /// The lease service answered.
    Lease(LeaseReply),
}

#[derive(Clone, Debug)]
enum Brain {
    Scripted {
        actions: Vec<(ScriptAction, Option<Intent>)>,
        next: usize,
        lease: Option<u64>,
    },
    Deploy {
        service: ResourcePath,
        lineage: String,
        attempts: Vec<ReleaseAttempt>,
        next: usize,
        version: u32,
        replan_after_ms: u64,
        wake_ms: Option<u64>,
        benign: bool,
    },
    Uptime {
        service: String,
        path: ResourcePath,
        above_ms: f64,
        sustain_ms: u64,
        cooldown_ms: u64,
        since: Option<u64>,
        last: Option<u64>,
        count: u32,
        benign: bool,
    },
    Resource {
        service: String,
        path: ResourcePath,
        knob: Knob,
        ladder: Vec<i64>,
        rung: usize,
        above: f64,
        sustain_ms: u64,
        cooldown_ms: u64,
        since: Option<u64>,
        last: Option<u64>,
        lineage: String,
        series: u32,
        version: u32,
        busy: bool,
        benign: bool,
    },
}

/// One agent.
#[derive(Clone, Debug)]
pub struct Agent {
    /// Identity.
    pub name: String,
    brain: Brain,
    /// Paused (by a fault) until this time; notices wait.
    pub paused_until_ms: u64,
    inbox: Vec<Notice>,
}

fn intent(v: serde_json::Value) -> Intent {
    // Plans built here are well-formed by construction; a failure is a bug in this file.
    match decode_intent(&serde_json::to_vec(&v).unwrap_or_default()) {
        Ok(i) => i,
        Err(e) => panic!("an agent built an invalid plan ({e}): {v}"),
    }
}

fn child(p: &ResourcePath, name: &str) -> ResourcePath {
    p.child(name).unwrap_or_else(|_| p.clone())
}

impl Agent {
    /// The agents of a scenario, in file order.
    pub fn all(s: &Scenario) -> Vec<Agent> {
        s.file
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                // Services were checked against the world when the scenario was loaded.
                let svc = |name: &str| s.service_path(name).cloned().expect("a checked service");
                let brain = match a {
                    AgentSpec::Scripted { actions, .. } => Brain::Scripted {
                        actions: actions
                            .iter()
                            .enumerate()
                            .map(|(j, act)| (act.clone(), s.plans.get(&(i, j)).cloned()))
                            .collect(),
                        next: 0,
                        lease: None,
                    },
                    AgentSpec::Deploy {
                        name,
                        service,
                        lineage,
                        at,
                        releases,
                        replan_after,
                        benign,
                    } => Brain::Deploy {
                        service: svc(service),
                        lineage: lineage.clone().unwrap_or_else(|| format!("{name}-{service}")),
                        attempts: releases.clone(),
                        next: 0,
                        version: 0,
                        replan_after_ms: replan_after.ms(),
                        wake_ms: Some(at.ms()),
                        benign: *benign,
                    },
                    AgentSpec::Uptime {
                        service,
                        latency_above_ms,
                        sustain,
                        cooldown,
                        benign,
                        ..
                    } => Brain::Uptime {
                        service: service.clone(),
                        path: svc(service),
                        above_ms: *latency_above_ms,
                        sustain_ms: sustain.ms(),
                        cooldown_ms: cooldown.ms(),
                        since: None,
                        last: None,
                        count: 0,
                        benign: *benign,
                    },
                    AgentSpec::Resource {
                        name,
                        service,
                        knob,
                        ladder,
                        queue_above,
                        sustain,
                        cooldown,
                        lineage,
                        benign,
                    } => Brain::Resource {
                        service: service.clone(),
                        path: svc(service),
                        knob: *knob,
                        ladder: ladder.clone(),
                        rung: 0,
                        above: *queue_above,
                        sustain_ms: sustain.ms(),
                        cooldown_ms: cooldown.ms(),
                        since: None,
                        last: None,
                        lineage: lineage.clone().unwrap_or_else(|| {
                            format!(
                                "{name}-{service}-{}",
                                if *knob == Knob::PoolSize { "pool" } else { "replicas" }
                            )
                        }),
                        series: 1,
                        version: 0,
                        busy: false,
                        benign: *benign,
                    },
                };
                Agent {
                    name: a.name().to_string(),
                    brain,
                    paused_until_ms: 0,
                    inbox: Vec::new(),
                }
            })
            .collect()
    }

    /// Delivers a notice (held while the agent is paused).
    pub fn notify(&mut self, n: Notice) {
        self.inbox.push(n);
    }

    /// One turn: read the inbox, look at the system, act.
    pub fn turn(&mut self, now_ms: u64, sys: &System, out: &mut Vec<Action>) {
        if now_ms < self.paused_until_ms {
            return;
        }
        for n in std::mem::take(&mut self.inbox) {
            self.hear(now_ms, n);
        }
        match &mut self.brain {
            Brain::Scripted { actions, next, lease } => {
                while let Some((a, plan)) = actions.get(*next) {
                    if a.at.ms() > now_ms {
                        break;
                    }
                    *next += 1;
                    if let Some(p) = plan {
                        out.push(Action::Propose {
                            intent: Box::new(p.clone()),
                            benign: a.benign,
                        });
                    } else if let Some(acq) = &a.acquire {
                        out.push(Action::Lease(LeaseRequest::Acquire {
                            path: acq.path.clone(),
                            mode: acq.mode,
                            ttl_ms: acq.ttl.ms(),
                            wait: acq.wait,
                        }));
                    } else if let (Some(ttl), Some(l)) = (a.renew, *lease) {
                        out.push(Action::Lease(LeaseRequest::Renew {
                            lease: l,
                            ttl_ms: ttl.ms(),
                        }));
                    } else if let (true, Some(l)) = (a.release, *lease) {
                        out.push(Action::Lease(LeaseRequest::Release { lease: l }));
                    }
                }
            }
            Brain::Deploy {
                service,
                lineage,
                attempts,
                next,
                version,
                wake_ms,
                benign,
                ..
            } => {
                if wake_ms.is_some_and(|t| t <= now_ms) {
                    *wake_ms = None;
                    if let Some(a) = attempts.get(*next) {
                        *next += 1;
                        *version += 1;
                        out.push(Action::Propose {
                            intent: Box::new(deploy_plan(service, lineage, *version, a)),
                            benign: *benign,
                        });
                    }
                }
            }
            Brain::Uptime {
                service,
                path,
                above_ms,
                sustain_ms,
                cooldown_ms,
                since,
                last,
                count,
                benign,
            } => {
                let Some(s) = sys.service(service) else { return };
                // Heartbeats say it is up, so slowness must be the process: restart it.
                if s.live == Health::Ok && s.latency_ms > *above_ms {
                    let t0 = *since.get_or_insert(now_ms);
                    let cooled = last.is_none_or(|l| now_ms >= l + *cooldown_ms);
                    if now_ms >= t0 + *sustain_ms && cooled {
                        *count += 1;
                        *last = Some(now_ms);
                        *since = None;
                        out.push(Action::Propose {
                            intent: Box::new(restart_plan(path, service, *count)),
                            benign: *benign,
                        });
                    }
                } else {
                    *since = None;
                }
            }
            Brain::Resource {
                service,
                path,
                knob,
                ladder,
                rung,
                above,
                sustain_ms,
                cooldown_ms,
                since,
                last,
                lineage,
                series,
                version,
                busy,
                benign,
            } => {
                let Some(s) = sys.service(service) else { return };
                if s.queue > *above {
                    let t0 = *since.get_or_insert(now_ms);
                    let cooled = last.is_none_or(|l| now_ms >= l + *cooldown_ms);
                    if now_ms >= t0 + *sustain_ms && cooled && !*busy && *rung < ladder.len() {
                        let target = ladder[*rung];
                        *rung += 1;
                        *version += 1;
                        *last = Some(now_ms);
                        *since = None;
                        *busy = true;
                        let current = match knob {
                            Knob::PoolSize => s.pool,
                            Knob::Replicas => s.replicas,
                        };
                        let l = if *series == 1 {
                            lineage.clone()
                        } else {
                            format!("{lineage}-{series}")
                        };
                        out.push(Action::Propose {
                            intent: Box::new(raise_plan(path, *knob, &l, *version, current as i64, target)),
                            benign: *benign,
                        });
                    }
                } else {
                    *since = None;
                }
            }
        }
    }

    fn hear(&mut self, now_ms: u64, n: Notice) {
        match (&mut self.brain, n) {
            (Brain::Scripted { lease, .. }, Notice::Lease(r)) => match r {
                LeaseReply::Granted { lease: id, .. } | LeaseReply::Queued { lease: id, .. } => *lease = Some(id),
                LeaseReply::Released { .. } => *lease = None,
                LeaseReply::Refused { .. } => {}
            },
            (
                Brain::Deploy {
                    wake_ms,
                    replan_after_ms,
                    ..
                },
                Notice::Decided {
                    verdict: Verdict::Reject,
                    ..
                }
                | Notice::Ended { ok: false, .. },
            ) => *wake_ms = Some(now_ms + *replan_after_ms),
            (
                Brain::Resource {
                    busy, series, version, ..
                },
                n,
            ) => match n {
                Notice::Decided {
                    verdict: Verdict::Reject,
                    ..
                }
                | Notice::Ended { ok: false, .. } => *busy = false,
                Notice::Ended { ok: true, .. } => {
                    // A plan that went through: the next one is a new change.
                    *busy = false;
                    *series += 1;
                    *version = 0;
                }
                _ => {}
            },
            _ => {}
        }
    }
}

fn deploy_plan(service: &ResourcePath, lineage: &str, version: u32, a: &ReleaseAttempt) -> Intent {
    let mut steps = Vec::new();
    for (i, g) in a.grants.iter().enumerate() {
        steps.push(json!({
            "id": format!("grant-{}", i + 1), "kind": "grant", "path": g.path,
            "args": { "principal": g.principal, "role": g.role }, "confidence": 0.6,
            "compensation": { "mode": "restore" }
        }));
    }
    let mut d = json!({
        "id": "deploy", "kind": "deploy", "path": service,
        "args": { "version": a.version, "artifact": a.artifact }, "confidence": 0.9,
        "compensation": { "mode": "restore" }
    });
    if let Some(v) = &a.verify {
        d["verification"] = json!({
            "path": child(&child(service, "health"), "app"), "op": "eq", "value": "ok",
            "bake_ms": v.bake.ms(), "fresh_ms": v.fresh.ms()
        });
    }
    steps.push(d);
    intent(json!({
        "protocol": 1, "lineage": lineage, "version": version,
        "idempotency_key": format!("{lineage}-{version}"),
        "goal": format!("ship {service} {}", a.version),
        "rationale": "a newer build is available",
        "steps": steps
    }))
}

fn restart_plan(path: &ResourcePath, service: &str, n: u32) -> Intent {
    intent(json!({
        "protocol": 1, "lineage": format!("restart-{service}-{n}"), "version": 1,
        "idempotency_key": format!("restart-{service}-{n}-1"),
        "goal": format!("restart slow {service}"),
        "rationale": "heartbeats are fine but responses are slow: the process must be stuck",
        "steps": [{ "id": "restart", "kind": "restart", "path": path, "confidence": 0.9,
                    "compensation": { "mode": "irreversible", "reason": "a restart cannot be undone" } }]
    }))
}

fn raise_plan(path: &ResourcePath, knob: Knob, lineage: &str, version: u32, current: i64, target: i64) -> Intent {
    let (kind, leaf, args) = match knob {
        Knob::PoolSize => ("set", "pool_size", json!({ "value": target })),
        Knob::Replicas => ("scale", "replicas", json!({ "replicas": target })),
    };
    let step_path = if knob == Knob::PoolSize {
        child(path, leaf)
    } else {
        path.clone()
    };
    intent(json!({
        "protocol": 1, "lineage": lineage, "version": version,
        "idempotency_key": format!("{lineage}-{version}"),
        "goal": format!("drain the request queue on {path}"),
        "rationale": "requests wait for a database connection",
        "assumptions": [{ "path": child(path, leaf), "op": "eq", "value": current }],
        "steps": [{ "id": format!("raise-{leaf}"), "kind": kind, "path": step_path, "args": args,
                    "confidence": 0.7, "compensation": { "mode": "restore" } }]
    }))
}
