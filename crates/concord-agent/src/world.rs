//! The agent's read-only replica of the world model, synced over the bus.
//!
//! The coordinator alone writes the world document; an agent holds a copy
//! ([`concord_core::worlddoc::WorldReplica`]) that a background task keeps
//! in step: it says `hello` on `sync.<agent>` when it starts, after a
//! reconnect and after a silence ([`AgentConfig::world_keepalive`]), takes
//! every frame the coordinator sends on `world.<agent>` (in parts when it is
//! larger than the server's `max_payload`), and answers with sync state
//! only — a replica has no way to write. A replica that was away catches up
//! with what it missed; a rotated document (a new id) makes it start over.
//!
//! Reads are local and immediate ([`WorldReplica::resource`],
//! [`WorldReplica::observation`], ...); [`WorldReplica::changed`],
//! [`WorldReplica::wait_for`] and [`WorldReplica::await_in_sync`] wait
//! without polling.
//!
//! [`AgentConfig::world_keepalive`]: crate::AgentConfig::world_keepalive

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use concord_core::world::World;
use concord_core::worlddoc::{self, Frame, FrameKind, ObservationRecord, Provenance, ReplicaEvent};
use concord_proto::parts::{PART_HEADER, Part, Reassembly};
use concord_proto::{ResourcePath, Value};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::error::AgentError;

/// How often the background task looks at the connection and the silence.
const TICK_MS_MAX: u64 = 250;
/// After a frame that does not apply, the least time before another `hello`
/// (a broken frame must not start a storm of sessions).
const RETRY_HELLO_MS: u64 = 1_000;
/// Most frames already received that are applied before one answer: a burst
/// of pushes gets one answer, not one each (each answer costs the
/// coordinator a reply, for a replica far behind the whole document).
const COALESCE_FRAMES_MAX: usize = 256;

/// Counters of one replica's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Frames received from the coordinator (whole, after reassembly).
    pub frames_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// The largest of them (a frame above the server's `max_payload` came in parts).
    pub largest_frame_bytes: u64,
    /// Frames sent to the coordinator (`hello` included).
    pub frames_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
    /// `hello`s sent (start, reconnects, silences, requests).
    pub hellos: u64,
    /// Frames or parts that did not apply (dropped; a `hello` follows).
    pub errors: u64,
}

/// Where the replica stands; changes wake [`WorldReplica::changed`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Frames applied that changed what the replica holds (or reset it).
    pub version: u64,
    /// The replica holds what the coordinator's last frame said it has.
    pub in_sync: bool,
    /// The document followed (hex), once known.
    pub doc_id: Option<String>,
    /// Its epoch.
    pub epoch: u64,
    /// Times the replica dropped its copy and started over (a rotation, a divergence).
    pub resets: u64,
}

#[derive(Debug)]
struct Inner {
    replica: Mutex<worlddoc::WorldReplica>,
    stats: Mutex<ReplicaStats>,
    progress: watch::Sender<Progress>,
    /// Set by [`WorldReplica::resync`]; the task says `hello` on its next tick.
    hello_asked: std::sync::atomic::AtomicBool,
}

/// The agent's read-only world replica. Cheap to clone; the background
/// task ends when the agent and every handle are dropped.
#[derive(Clone, Debug)]
pub struct WorldReplica {
    inner: Arc<Inner>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

impl WorldReplica {
    /// Subscribes to `world.<agent>`, says `hello`, and starts the task.
    pub(crate) async fn start(
        nats: async_nats::Client,
        agent: &str,
        prefix: &str,
        keepalive: Duration,
    ) -> Result<WorldReplica, AgentError> {
        let sub = nats
            .subscribe(format!("{prefix}.world.{agent}"))
            .await
            .map_err(|e| AgentError::Disconnected(e.to_string()))?;
        // The subscription must be in place before the coordinator answers.
        nats.flush()
            .await
            .map_err(|e| AgentError::Disconnected(e.to_string()))?;
        let (progress, _) = watch::channel(Progress::default());
        let inner = Arc::new(Inner {
            replica: Mutex::new(worlddoc::WorldReplica::new(agent)),
            stats: Mutex::new(ReplicaStats::default()),
            progress,
            hello_asked: std::sync::atomic::AtomicBool::new(false),
        });
        let mut task = Task {
            nats,
            sync_subject: format!("{prefix}.sync.{agent}"),
            inner: Arc::downgrade(&inner),
            keepalive: keepalive.max(Duration::from_millis(10)),
            reassembly: Reassembly::default(),
            coordinator_heads: None,
            last_heard: Instant::now(),
            last_hello: Instant::now(),
            retry: false,
        };
        task.hello(&inner, "start").await;
        tokio::spawn(task.run(sub));
        Ok(WorldReplica { inner })
    }

    /// Reads the replica's document with `f` (anything the methods below do
    /// not cover: [`worlddoc::WorldReplica::automerge`] gives the Automerge
    /// document itself). Hold it briefly: the sync task waits meanwhile.
    pub fn read<T>(&self, f: impl FnOnce(&worlddoc::WorldReplica) -> T) -> T {
        f(&self.inner.replica.lock().expect("replica lock"))
    }

    /// The value at `path`.
    pub fn resource(&self, path: &str) -> Option<Value> {
        self.read(|r| r.resource(path))
    }

    /// Every resource.
    pub fn resources(&self) -> BTreeMap<ResourcePath, Value> {
        self.read(|r| r.resources())
    }

    /// Resources whose path text starts with `prefix`, in order.
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(ResourcePath, Value)> {
        self.read(|r| r.scan_prefix(prefix))
    }

    /// The latest observation of a series the coordinator wrote (beyond the deadband).
    pub fn observation(&self, path: &str) -> Option<ObservationRecord> {
        self.read(|r| r.observation(path))
    }

    /// Every series' latest written observation.
    pub fn observations(&self) -> BTreeMap<ResourcePath, ObservationRecord> {
        self.read(|r| r.observations())
    }

    /// Which step last changed `path`.
    pub fn provenance(&self, path: &str) -> Option<Provenance> {
        self.read(|r| r.provenance(path))
    }

    /// The world held (resources and services).
    pub fn world(&self) -> World {
        self.read(|r| r.world())
    }

    /// The replica's heads (hex, sorted): the coordinator's once caught up.
    pub fn heads(&self) -> Vec<String> {
        let mut h: Vec<String> = self.read(|r| r.heads().iter().map(|h| h.to_string()).collect());
        h.sort();
        h
    }

    /// Where it stands.
    pub fn progress(&self) -> Progress {
        self.inner.progress.borrow().clone()
    }

    /// Whether it holds what the coordinator's last frame said it has.
    pub fn in_sync(&self) -> bool {
        self.inner.progress.borrow().in_sync
    }

    /// Traffic counters.
    pub fn stats(&self) -> ReplicaStats {
        *self.inner.stats.lock().expect("stats lock")
    }

    /// Asks for a new session now (as after a reconnect): the coordinator
    /// answers with what the replica lacks.
    pub fn resync(&self) {
        self.inner.hello_asked.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until the replica applies something new (or starts over).
    pub async fn changed(&self) -> Result<(), AgentError> {
        let mut rx = self.inner.progress.subscribe();
        let seen = rx.borrow_and_update().version;
        rx.wait_for(|p| p.version != seen)
            .await
            .map(|_| ())
            .map_err(|_| AgentError::Disconnected("the world replica stopped".into()))
    }

    /// Waits until `f` finds what it looks for in the replica, at most
    /// `timeout`; woken by each applied frame, never polling.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        f: impl Fn(&worlddoc::WorldReplica) -> Option<T>,
    ) -> Result<T, AgentError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.progress.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(t) = self.read(&f) {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(AgentError::Disconnected("the world replica stopped".into())),
                Err(_) => {
                    return Err(AgentError::WorldTimedOut {
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
            }
        }
    }

    /// Waits until the replica holds what the coordinator last said it has.
    pub async fn await_in_sync(&self, timeout: Duration) -> Result<(), AgentError> {
        let started = Instant::now();
        let mut rx = self.inner.progress.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|p| p.in_sync)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(AgentError::Disconnected("the world replica stopped".into())),
            Err(_) => Err(AgentError::WorldTimedOut {
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }
}

struct Task {
    nats: async_nats::Client,
    sync_subject: String,
    inner: Weak<Inner>,
    keepalive: Duration,
    reassembly: Reassembly,
    /// The heads the coordinator's last frame named (sorted hex).
    coordinator_heads: Option<Vec<String>>,
    last_heard: Instant,
    last_hello: Instant,
    /// A frame did not apply: a new session once [`RETRY_HELLO_MS`] passed.
    retry: bool,
}

impl Task {
    async fn send(&mut self, inner: &Inner, frame: Vec<u8>) {
        {
            let mut s = inner.stats.lock().expect("stats lock");
            s.frames_out += 1;
            s.bytes_out += frame.len() as u64;
        }
        if let Err(e) = self.nats.publish(self.sync_subject.clone(), frame.into()).await {
            debug!("world sync frame not sent: {e}");
        }
    }

    async fn hello(&mut self, inner: &Inner, why: &str) {
        debug!(why, "world replica: hello");
        self.last_hello = Instant::now();
        self.retry = false;
        self.reassembly = Reassembly::default();
        let frame = inner.replica.lock().expect("replica lock").hello();
        inner.stats.lock().expect("stats lock").hellos += 1;
        self.send(inner, frame).await;
    }

    async fn run(mut self, mut sub: async_nats::Subscriber) {
        let tick_ms = (self.keepalive.as_millis() as u64 / 4).clamp(10, TICK_MS_MAX);
        let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_connected = true;
        loop {
            tokio::select! {
                m = sub.next() => {
                    let Some(m) = m else { return };
                    let Some(inner) = self.inner.upgrade() else { return };
                    self.last_heard = Instant::now();
                    let mut answer = self.message(&inner, m).await;
                    for _ in 1..COALESCE_FRAMES_MAX {
                        match futures::FutureExt::now_or_never(sub.next()) {
                            Some(Some(m)) => answer |= self.message(&inner, m).await,
                            Some(None) => return,
                            None => break,
                        }
                    }
                    if answer {
                        let frame = inner.replica.lock().expect("replica lock").generate();
                        if let Some(f) = frame {
                            self.send(&inner, f).await;
                        }
                    }
                }
                _ = tick.tick() => {
                    let Some(inner) = self.inner.upgrade() else { return };
                    let connected = self.nats.connection_state() == async_nats::connection::State::Connected;
                    let asked = inner.hello_asked.swap(false, std::sync::atomic::Ordering::SeqCst);
                    if connected && !was_connected {
                        // The subscription is back; what was pushed meanwhile is lost.
                        self.hello(&inner, "reconnected").await;
                    } else if asked {
                        self.hello(&inner, "asked").await;
                    } else if self.retry && self.last_hello.elapsed() >= Duration::from_millis(RETRY_HELLO_MS) {
                        self.hello(&inner, "after an error").await;
                    } else if connected
                        && self.last_heard.elapsed() >= self.keepalive
                        && self.last_hello.elapsed() >= self.keepalive
                    {
                        // A lost frame (or a restarted coordinator) would
                        // otherwise stall the session.
                        self.hello(&inner, "silence").await;
                    }
                    was_connected = connected;
                }
            }
        }
    }

    /// Applies one message; `true` when a whole frame applied (an answer may be due).
    async fn message(&mut self, inner: &Inner, m: async_nats::Message) -> bool {
        let part = match m.headers.as_ref().and_then(|h| h.get(PART_HEADER)) {
            Some(v) => match Part::decode(v.as_str()) {
                Some(p) => Some(p),
                None => {
                    self.failed(inner, format!("malformed `{PART_HEADER}` header")).await;
                    return false;
                }
            },
            None => None,
        };
        let frame = match self.reassembly.push(part.as_ref(), &m.payload) {
            Ok(Some(f)) => f,
            Ok(None) => return false,
            Err(e) => {
                self.failed(inner, e.to_string()).await;
                return false;
            }
        };
        {
            let mut s = inner.stats.lock().expect("stats lock");
            s.frames_in += 1;
            s.bytes_in += frame.len() as u64;
            s.largest_frame_bytes = s.largest_frame_bytes.max(frame.len() as u64);
        }
        // The coordinator's heads travel in its sync message: the replica is
        // in sync when it holds them.
        if let Ok(f) = Frame::decode(&frame)
            && f.kind == FrameKind::Sync
            && let Ok(msg) = automerge::sync::Message::decode(f.message)
        {
            let mut h: Vec<String> = msg.heads.iter().map(|h| h.to_string()).collect();
            h.sort();
            self.coordinator_heads = Some(h);
        }
        let (result, heads_after, doc_id, epoch, resets, changed) = {
            let mut r = inner.replica.lock().expect("replica lock");
            let before = r.heads();
            let result = r.receive(&frame);
            let after = r.heads();
            let changed = before != after || matches!(result, Ok(ReplicaEvent::Reset));
            let mut heads: Vec<String> = after.iter().map(|h| h.to_string()).collect();
            heads.sort();
            (
                result,
                heads,
                r.doc_id().map(|d| hex(&d)),
                r.epoch(),
                r.resets(),
                changed,
            )
        };
        match result {
            Ok(_) => {
                let in_sync = self.coordinator_heads.as_ref() == Some(&heads_after);
                inner.progress.send_if_modified(|p| {
                    let next = Progress {
                        version: p.version + u64::from(changed),
                        in_sync,
                        doc_id,
                        epoch,
                        resets,
                    };
                    let modified = *p != next;
                    *p = next;
                    modified
                });
                true
            }
            Err(e) => {
                self.failed(inner, e.to_string()).await;
                false
            }
        }
    }

    /// A frame that does not apply: dropped and counted; a new session
    /// follows (not more than once a second).
    async fn failed(&mut self, inner: &Inner, why: String) {
        inner.stats.lock().expect("stats lock").errors += 1;
        warn!("world replica: {why}; starting a new session");
        if self.last_hello.elapsed() >= Duration::from_millis(RETRY_HELLO_MS) {
            self.hello(inner, "after an error").await;
        } else {
            self.retry = true;
        }
    }
}
