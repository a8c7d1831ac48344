//! The modelled system: the real values of the world's resources, and the
//! dynamics that make an incident — connections leaked by a release, a
//! database that refuses connections above its limit and falls over when the
//! refused load lasts, a queue whose depth drives latency, and health that is
//! live (the process answers heartbeats) but not functioning (the
//! application check fails).
//!
//! It is a fluid model stepped at a fixed tick: per service, demand arrives,
//! connections serve it (each held `hold_ms` per request), what cannot be
//! served queues, and latency is the base plus the queue's wait. All
//! arithmetic is in a fixed order, so a run is the same on every machine.

use std::collections::BTreeMap;

use concord_core::apply::{PathChange, apply};
use concord_core::world::{State, World};
use concord_proto::{ResourcePath, StepSpec, Value};

use crate::scenario::{Scenario, ServiceSpec, SystemEventSpec};

/// Most requests one service may have queued, in seconds of its demand:
/// clients give up after that (a queue cannot grow without bound).
pub const QUEUE_SECONDS_MAX: f64 = 300.0;
/// Latency is reported up to this, ms (a client timeout).
pub const LATENCY_MS_MAX: f64 = 600_000.0;

/// A health word, as observations carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    /// Working.
    Ok,
    /// Slow.
    Degraded,
    /// Not working.
    Failing,
}

impl Health {
    /// The word.
    pub fn word(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Failing => "failing",
        }
    }
}

/// One modelled service.
#[derive(Clone, Debug)]
pub struct Svc {
    /// World name.
    pub name: String,
    /// Subtree.
    pub path: ResourcePath,
    spec: ServiceSpec,
    /// Cached from the resources: pool size per replica.
    pub pool: f64,
    /// Cached: replicas.
    pub replicas: f64,
    /// Cached: version.
    pub version: String,
    leak_per_min: f64,
    release_latency_ms: f64,
    /// Connections leaked and never returned (all replicas).
    pub leaked: f64,
    /// Connections serving requests now.
    pub active: f64,
    /// Requests waiting.
    pub queue: f64,
    /// Latency, ms.
    pub latency_ms: f64,
    /// Application-level health.
    pub app: Health,
    /// Liveness (heartbeats).
    pub live: Health,
    /// Restarting until this time.
    pub down_until_ms: u64,
    /// Restarts and deploys seen.
    pub restarts: u64,
}

/// The database.
#[derive(Clone, Debug)]
pub struct Db {
    /// Subtree.
    pub path: ResourcePath,
    max_path: ResourcePath,
    /// Cached limit.
    pub max_connections: f64,
    fail_after_ms: u64,
    recovery_ms: u64,
    /// Connections held.
    pub connections: f64,
    /// Connections wanted beyond the limit, refused.
    pub refused: f64,
    refused_since_ms: Option<u64>,
    /// Down (fell over) until this time.
    pub down_until_ms: Option<u64>,
    /// How many times it fell over.
    pub falls: u32,
}

/// One reading of an observed series.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reading {
    /// A health word.
    Word(&'static str),
    /// A metric, rounded.
    Num(i64),
}

impl Reading {
    /// As an observation value.
    pub fn value(self) -> Value {
        match self {
            Reading::Word(w) => Value::Str(w.to_string()),
            Reading::Num(n) => Value::Int(n),
        }
    }
}

/// Something that happened in the system, for the timeline.
#[derive(Clone, Debug, PartialEq)]
pub enum SysEvent {
    /// The database fell over.
    DbDown {
        /// Connections wanted when it fell.
        wanted: f64,
        /// Its limit.
        limit: f64,
    },
    /// The database is back.
    DbUp,
    /// A service's application health changed.
    AppHealth {
        /// Service.
        service: String,
        /// New health.
        health: Health,
    },
}

/// The system.
#[derive(Clone, Debug)]
pub struct System {
    /// The real resource values (and services).
    pub world: World,
    /// Modelled services, in name order.
    pub services: Vec<Svc>,
    /// The database.
    pub db: Option<Db>,
    releases: Vec<(String, String, f64, f64)>,
    events: Vec<SystemEventSpec>,
    /// Seconds any modelled service's application health was failing.
    pub downtime_ms: u64,
    /// Milliseconds the database was down.
    pub db_down_ms: u64,
    /// Highest connections held at once, and the limit then.
    pub peak_connections: (f64, f64),
}

fn num(world: &World, path: &ResourcePath, default: f64) -> f64 {
    world.get(path).and_then(Value::as_f64).unwrap_or(default)
}

fn child(p: &ResourcePath, name: &str) -> ResourcePath {
    // Names here are fixed, valid segments; a path at the depth limit has no children.
    p.child(name).unwrap_or_else(|_| p.clone())
}

impl System {
    /// The system at the start of `scenario`.
    pub fn new(scenario: &Scenario) -> System {
        let sys = &scenario.file.system;
        let world = scenario.world.clone();
        let services = sys
            .services
            .iter()
            .filter_map(|(name, spec)| {
                let path = scenario.service_path(name)?.clone();
                Some(Svc {
                    name: name.clone(),
                    path,
                    spec: spec.clone(),
                    pool: 0.0,
                    replicas: 0.0,
                    version: String::new(),
                    leak_per_min: 0.0,
                    release_latency_ms: 0.0,
                    leaked: 0.0,
                    active: 0.0,
                    queue: 0.0,
                    latency_ms: spec.latency_base_ms,
                    app: Health::Ok,
                    live: Health::Ok,
                    down_until_ms: 0,
                    restarts: 0,
                })
            })
            .collect();
        let db = sys.database.as_ref().map(|d| Db {
            path: d.path.clone(),
            max_path: child(&d.path, "max_connections"),
            max_connections: 0.0,
            fail_after_ms: d.fail_after.ms(),
            recovery_ms: d.recovery.ms(),
            connections: 0.0,
            refused: 0.0,
            refused_since_ms: None,
            down_until_ms: None,
            falls: 0,
        });
        let mut s = System {
            world,
            services,
            db,
            releases: sys
                .releases
                .iter()
                .map(|r| (r.service.clone(), r.version.clone(), r.leak_per_min, r.extra_latency_ms))
                .collect(),
            events: sys.events.clone(),
            downtime_ms: 0,
            db_down_ms: 0,
            peak_connections: (0.0, 0.0),
        };
        s.refresh();
        s
    }

    /// Re-reads the cached knobs from the resources (after any write).
    fn refresh(&mut self) {
        for svc in &mut self.services {
            svc.pool = num(&self.world, &child(&svc.path, "pool_size"), 0.0);
            svc.replicas = num(&self.world, &child(&svc.path, "replicas"), 1.0);
            svc.version = self
                .world
                .get(&child(&svc.path, "version"))
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let rel = self
                .releases
                .iter()
                .find(|(s, v, _, _)| *s == svc.name && *v == svc.version);
            svc.leak_per_min = rel.map(|r| r.2).unwrap_or(0.0);
            svc.release_latency_ms = rel.map(|r| r.3).unwrap_or(0.0);
        }
        if let Some(db) = &mut self.db {
            db.max_connections = num(&self.world, &db.max_path, 0.0);
        }
    }

    /// A service by world name.
    pub fn service(&self, name: &str) -> Option<&Svc> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The value at a path.
    pub fn get(&self, path: &ResourcePath) -> Option<&Value> {
        self.world.get(path)
    }

    /// Applies one step to the real resources; restarts and deploys restart
    /// the service they name (connections it leaked are returned).
    pub fn apply(&mut self, now_ms: u64, spec: &StepSpec) -> Result<Vec<PathChange>, String> {
        let changes = {
            let mut state = State::new(&self.world);
            apply(&mut state, spec).map_err(|e| e.0)?
        };
        for c in &changes {
            match &c.after {
                Some(v) => self.world.resources.insert(c.path.clone(), v.clone()),
                None => self.world.resources.remove(&c.path),
            };
        }
        let restarts = matches!(
            spec.op.kind(),
            concord_proto::intent::StepKind::Restart | concord_proto::intent::StepKind::Deploy
        );
        if restarts {
            for svc in &mut self.services {
                if svc.path == spec.path {
                    let restart_ms = svc.spec.restart.map(|d| d.ms()).unwrap_or(30_000);
                    svc.leaked = 0.0;
                    svc.queue = 0.0;
                    svc.down_until_ms = now_ms + restart_ms;
                    svc.restarts += 1;
                }
            }
        }
        self.refresh();
        Ok(changes)
    }

    /// Advances the dynamics by `dt_ms` ending at `now_ms`; returns what happened.
    pub fn step(&mut self, now_ms: u64, dt_ms: u64, out: &mut Vec<SysEvent>) {
        let dt = dt_ms as f64 / 1000.0;
        let db_up = match &mut self.db {
            Some(db) => match db.down_until_ms {
                Some(t) if now_ms >= t => {
                    db.down_until_ms = None;
                    out.push(SysEvent::DbUp);
                    true
                }
                Some(_) => false,
                None => true,
            },
            None => true,
        };
        // Pass 1: leaks, and the connections each service wants.
        let day_ms = 86_400_000.0;
        let phase = (now_ms as f64 % day_ms) / day_ms * std::f64::consts::TAU;
        let mut wants: Vec<(f64, f64)> = Vec::with_capacity(self.services.len()); // (demand rps, active wanted)
        for svc in &mut self.services {
            let (mut extra, mut factor) = (svc.release_latency_ms, 1.0);
            for e in &self.events {
                if e.service == svc.name && now_ms >= e.at.ms() && now_ms < e.at.ms() + e.lasts.ms() {
                    extra += e.extra_latency_ms;
                    factor *= e.demand_factor.unwrap_or(1.0);
                }
            }
            let demand = svc.spec.demand_rps * factor * (1.0 + svc.spec.diurnal * phase.sin());
            let restarting = now_ms < svc.down_until_ms;
            let pool_total = (svc.pool * svc.replicas).max(0.0);
            if !restarting && db_up {
                svc.leaked = (svc.leaked + svc.leak_per_min * svc.replicas * dt / 60.0).min(pool_total);
            }
            let hold_s = svc.spec.hold_ms / 1000.0;
            let want = if restarting || !db_up {
                0.0
            } else {
                ((demand + svc.queue / dt) * hold_s)
                    .min(pool_total - svc.leaked)
                    .max(0.0)
            };
            wants.push((demand, want));
            svc.latency_ms = extra; // completed below
        }
        // The database grants what it can: leaked connections are held already.
        let leaked: f64 = self.services.iter().map(|s| s.leaked).sum();
        let wanted: f64 = leaked + wants.iter().map(|w| w.1).sum::<f64>();
        let mut share = 1.0;
        if let Some(db) = &mut self.db {
            if db_up {
                let room = (db.max_connections - leaked).max(0.0);
                let active_wanted = wanted - leaked;
                if active_wanted > room {
                    share = if active_wanted > 0.0 { room / active_wanted } else { 0.0 };
                }
                db.refused = (wanted - db.max_connections).max(0.0);
                if db.refused > 0.0 {
                    let since = *db.refused_since_ms.get_or_insert(now_ms);
                    if now_ms - since >= db.fail_after_ms {
                        out.push(SysEvent::DbDown {
                            wanted,
                            limit: db.max_connections,
                        });
                        db.down_until_ms = Some(now_ms + db.recovery_ms);
                        db.refused_since_ms = None;
                        db.falls += 1;
                        db.connections = 0.0;
                        // Every connection dies with it, leaked ones too.
                        for s in &mut self.services {
                            s.leaked = 0.0;
                        }
                        share = 0.0;
                    }
                } else {
                    db.refused_since_ms = None;
                }
            } else {
                db.refused = 0.0;
                share = 0.0;
            }
        }
        let db_down = self.db.as_ref().is_some_and(|d| d.down_until_ms.is_some());
        // Pass 2: serve, queue, latency, health.
        let mut any_failing = false;
        let mut held = 0.0;
        for (svc, (demand, want)) in self.services.iter_mut().zip(wants) {
            let restarting = now_ms < svc.down_until_ms;
            let active = if db_down { 0.0 } else { want * share };
            svc.active = active;
            held += svc.leaked + active;
            let hold_s = (svc.spec.hold_ms / 1000.0).max(1e-3);
            let capacity = active / hold_s;
            let served = if restarting {
                0.0
            } else {
                capacity.min(demand + svc.queue / dt)
            };
            let queue_max = demand.max(1.0) * QUEUE_SECONDS_MAX;
            svc.queue = if restarting {
                0.0
            } else {
                (svc.queue + (demand - served) * dt).clamp(0.0, queue_max)
            };
            let wait_ms = if svc.queue <= 0.0 {
                0.0
            } else if served > 0.0 {
                svc.queue / served * 1000.0
            } else {
                LATENCY_MS_MAX
            };
            svc.latency_ms = (svc.spec.latency_base_ms + svc.latency_ms + wait_ms).min(LATENCY_MS_MAX);
            let app = if restarting || db_down || svc.latency_ms > svc.spec.latency_slo_ms {
                Health::Failing
            } else if svc.latency_ms > svc.spec.latency_slo_ms / 2.0 {
                Health::Degraded
            } else {
                Health::Ok
            };
            // The timeline notes when a service stops or starts working, not every wobble.
            if (app == Health::Failing) != (svc.app == Health::Failing) {
                out.push(SysEvent::AppHealth {
                    service: svc.name.clone(),
                    health: app,
                });
            }
            svc.app = app;
            // Heartbeats come from the process: only a restart stops them.
            svc.live = if restarting { Health::Failing } else { Health::Ok };
            any_failing |= app == Health::Failing;
        }
        if let Some(db) = &mut self.db {
            db.connections = if db_down { 0.0 } else { held };
            if db.connections > self.peak_connections.0 {
                self.peak_connections = (db.connections, db.max_connections);
            }
        }
        if any_failing {
            self.downtime_ms += dt_ms;
        }
        if db_down {
            self.db_down_ms += dt_ms;
        }
    }

    /// The observed series, in a fixed order: (path, kind). Their values
    /// come from [`System::series_values`] in the same order.
    pub fn series_paths(&self) -> Vec<(ResourcePath, concord_proto::ObservationKind)> {
        use concord_proto::ObservationKind as K;
        let mut out = Vec::new();
        for s in &self.services {
            out.push((child(&child(&s.path, "health"), "app"), K::AppHealth));
            out.push((child(&child(&s.path, "health"), "liveness"), K::Liveness));
            out.push((child(&s.path, "queue_depth"), K::Metric));
            out.push((child(&s.path, "latency_ms"), K::Metric));
        }
        if let Some(db) = &self.db {
            out.push((child(&db.path, "connections"), K::Metric));
            out.push((child(&child(&db.path, "health"), "app"), K::AppHealth));
        }
        out
    }

    /// The series' current values (no allocation: this runs every tick).
    pub fn series_values(&self, out: &mut Vec<Reading>) {
        out.clear();
        for s in &self.services {
            out.push(Reading::Word(s.app.word()));
            out.push(Reading::Word(s.live.word()));
            out.push(Reading::Num(s.queue.round() as i64));
            out.push(Reading::Num(s.latency_ms.round() as i64));
        }
        if let Some(db) = &self.db {
            out.push(Reading::Num(db.connections.round() as i64));
            out.push(Reading::Word(if db.down_until_ms.is_some() { "failing" } else { "ok" }));
        }
    }

    /// The resource values, for expectations and reports.
    pub fn resources(&self) -> &BTreeMap<ResourcePath, Value> {
        &self.world.resources
    }
}
