//! The modelled system: an API service with versions (v1.5.0 leaks
//! connections), replicas, a connection pool per replica, and a database
//! that accepts `max_connections`. It advances one tick at a time.
//!
//! Each replica needs `NEEDED` connections to serve its traffic. A leaking
//! release keeps `LEAK_PER_TICK` more connections per replica open every tick,
//! until the pool is exhausted: requests queue, application health fails, but
//! the process still answers heartbeats. A bigger pool only gives the leak
//! more room: the connections held open reach the database, and past its
//! `max_connections` the database falls over and takes every service with it.

use std::sync::{Arc, Mutex};

use concord_agent::{Step, StepError, StepHandler};
use concord_proto::{ObservationKind, Op, ResourcePath, Value};
use futures::future::BoxFuture;

/// Connections one replica needs for its traffic.
pub const NEEDED: u32 = 30;
/// Connections a leaking release strands per replica per tick.
pub const LEAK_PER_TICK: u32 = 10;
/// Connections the other services (worker, billing) hold.
pub const OTHERS: u32 = 80;
/// The release that leaks.
pub const LEAKY: &str = "v1.5.0";

/// Heartbeats (a `liveness` observation): the processes answer.
pub const LIVENESS: &str = "svc/api/health/liveness";
/// Application-level health (an `app_health` observation): requests are
/// served. The deploy's verification checks it too.
pub const APP_HEALTH: &str = "svc/api/health/app";
/// Requests waiting (a metric).
pub const QUEUE_DEPTH: &str = "svc/api/queue_depth";
/// Connections the database holds (a metric).
pub const DB_CONNECTIONS: &str = "db/primary/connections";

/// The system's state.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// The API's version.
    pub version: String,
    /// Its artifact.
    pub artifact: String,
    /// Replicas.
    pub replicas: u32,
    /// Pool size per replica.
    pub pool_size: u32,
    /// Connections stranded per replica by a leak.
    pub leaked: u32,
    /// Requests waiting.
    pub queue: u64,
    /// The database's limit.
    pub max_connections: u32,
    /// Connections the database holds now.
    pub db_connections: u32,
    /// The most it ever held.
    pub db_peak: u32,
    /// The database fell over (it stays down).
    pub db_down: bool,
    /// Restarts of the API.
    pub restarts: u32,
    /// Ticks so far.
    pub ticks: u64,
}

impl Default for State {
    fn default() -> State {
        State {
            version: "v1.4.0".into(),
            artifact: "registry/api:v1.4.0".into(),
            replicas: 4,
            pool_size: 50,
            leaked: 0,
            queue: 0,
            max_connections: 1000,
            db_connections: 4 * NEEDED + OTHERS,
            db_peak: 4 * NEEDED + OTHERS,
            db_down: false,
            restarts: 0,
            ticks: 0,
        }
    }
}

impl State {
    /// Connections a replica can still use.
    pub fn available(&self) -> u32 {
        self.pool_size.saturating_sub(self.leaked)
    }

    /// One tick of time.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if self.db_down {
            self.queue += u64::from(NEEDED * self.replicas);
            return;
        }
        if self.version == LEAKY {
            self.leaked = (self.leaked + LEAK_PER_TICK).min(self.pool_size);
        }
        let open = (self.leaked + NEEDED).min(self.pool_size);
        self.db_connections = open * self.replicas + OTHERS;
        self.db_peak = self.db_peak.max(self.db_connections);
        if self.db_connections > self.max_connections {
            self.db_down = true;
        }
        let avail = self.available();
        if avail < NEEDED {
            self.queue += u64::from((NEEDED - avail) * self.replicas) * 4;
        } else {
            self.queue = self
                .queue
                .saturating_sub(u64::from((avail - NEEDED + 10) * self.replicas) * 4);
        }
    }

    /// Heartbeats: the processes answer (unless the database took them down).
    pub fn liveness(&self) -> &'static str {
        if self.db_down { "failing" } else { "ok" }
    }

    /// Application-level health: requests are served.
    pub fn app_health(&self) -> &'static str {
        if self.db_down || self.available() < NEEDED {
            "failing"
        } else {
            "ok"
        }
    }

    /// What the system shows of itself, as observations (path, kind,
    /// value): all an agent can know of it.
    pub fn signals(&self) -> [(&'static str, ObservationKind, Value); 4] {
        [
            (LIVENESS, ObservationKind::Liveness, Value::Str(self.liveness().into())),
            (
                APP_HEALTH,
                ObservationKind::AppHealth,
                Value::Str(self.app_health().into()),
            ),
            // Within ±2^53 for any run: at most 480 more a tick.
            (QUEUE_DEPTH, ObservationKind::Metric, Value::Int(self.queue as i64)),
            (
                DB_CONNECTIONS,
                ObservationKind::Metric,
                Value::Int(self.db_connections.into()),
            ),
        ]
    }

    /// The value at a world-model path, as the coordinator names them.
    pub fn read(&self, path: &str) -> Option<Value> {
        Some(match path {
            "svc/api/version" => Value::Str(self.version.clone()),
            "svc/api/artifact" => Value::Str(self.artifact.clone()),
            "svc/api/replicas" => Value::Int(self.replicas.into()),
            "svc/api/pool_size" => Value::Int(self.pool_size.into()),
            "db/primary/max_connections" => Value::Int(self.max_connections.into()),
            _ => return None,
        })
    }

    /// Applies an operation on `path`.
    pub fn apply(&mut self, path: &str, op: &Op) -> Result<(), String> {
        if self.db_down {
            return Err("the database is down".into());
        }
        match (path, op) {
            ("svc/api", Op::Deploy(a)) => {
                self.version = a.version.to_string();
                self.artifact = a.artifact.to_string();
                // New pods: fresh pools.
                self.leaked = 0;
            }
            ("svc/api/pool_size", Op::Set(a)) => {
                self.pool_size = a
                    .value
                    .as_f64()
                    .filter(|v| *v >= 1.0 && *v <= 100_000.0)
                    .ok_or("pool_size is a positive number")? as u32;
            }
            ("svc/api", Op::Scale(a)) => self.replicas = a.replicas,
            ("svc/api", Op::Restart(_)) => {
                self.leaked = 0;
                self.restarts += 1;
            }
            (p, op) => return Err(format!("the system has no `{:?}` on `{p}`", op.kind())),
        }
        Ok(())
    }
}

/// The system shared between its clock, its executor and its observers.
pub type Shared = Arc<Mutex<State>>;

/// The system's executor: steps the coordinator dispatches land here.
#[derive(Debug, Clone)]
pub struct Handler(pub Shared);

impl StepHandler for Handler {
    fn read<'a>(&'a self, path: &'a ResourcePath) -> BoxFuture<'a, Option<Value>> {
        Box::pin(async move { self.0.lock().expect("system lock").read(path.as_str()) })
    }

    fn apply<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            self.0
                .lock()
                .expect("system lock")
                .apply(step.path().as_str(), &step.op)
                .map_err(StepError::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leak_with_a_big_pool_takes_the_database_down_and_a_small_one_does_not() {
        let mut s = State {
            version: LEAKY.into(),
            ..State::default()
        };
        for _ in 0..50 {
            s.tick();
        }
        assert_eq!(s.app_health(), "failing");
        assert_eq!(s.liveness(), "ok", "heartbeats look fine");
        assert!(!s.db_down && s.db_peak <= s.max_connections);
        s.pool_size = 500;
        for _ in 0..50 {
            s.tick();
        }
        assert!(s.db_down && s.db_peak > s.max_connections);
    }
}
