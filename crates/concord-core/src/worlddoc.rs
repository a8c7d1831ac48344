//! The world document: the shared world model as an Automerge document that
//! the coordinator alone writes and agents hold as read-only replicas.
//!
//! What it holds (root keys):
//! - `resources`: resource path -> value (the same values as the coordinator's
//!   [`World`], which stays the materialized view previews read);
//! - `services`: service name -> `{ path, depends_on }`;
//! - `observations`: series path -> `{ kind, value, agent, at_ms }`, the latest
//!   value *written* per series: a new value is written only when it moves
//!   beyond the deadband ([`needs_write`]), so `at_ms` is the coordinator's
//!   receive time of the value the document holds. The full series stays in
//!   the coordinator's bounded core state;
//! - `provenance`: resource path -> the JSON text of `{ lineage, version, step,
//!   phase, agent, at_ms }`, the plan step (or compensation) that last
//!   changed the path. One string, not a map: it is written on the saga's
//!   path, and each Automerge operation costs tens of microseconds;
//! - `schema`, `coordinator`, `epoch`, `doc_id`, `created_at_ms`: what this
//!   document is.
//!
//! Determinism: the writer's actor id is derived from (coordinator id,
//! incarnation, epoch) ([`coordinator_actor`]), never random; every change is
//! committed with the coordinator's time; so the same inputs give the same
//! document bytes in every process. A new incarnation (a restart) writes
//! under a new actor, so it never reuses an (actor, seq) pair that a replica
//! may already hold from a run whose last inputs were not logged.
//! Writes are accepted at once and applied to Automerge, in order and one
//! change each, when the document is next read (see [`WorldDoc`]): a replay
//! or a simulation that never syncs does not pay Automerge's cost per
//! operation for a history nobody reads.
//!
//! Rotation: Automerge keeps every change forever. Every
//! [`WorldDocConfig::rotate_changes_max`] changes (and, if set, once the
//! document is [`WorldDocConfig::rotate_after_ms`] old; both checked when the
//! document is written, so replay rotates at the same input), the coordinator
//! starts a fresh document from the current state, one change long, with the
//! next epoch, a new actor and a new document id, and logs
//! `Event::WorldRotated`. Replicas notice the new id in the next sync frame,
//! drop their copy and receive the fresh document whole.
//!
//! Sync: [`WorldDoc::sync_generate`] and [`WorldDoc::sync_receive`] are the
//! per-peer step functions of Automerge's sync protocol, wrapped in a small
//! frame ([`Frame`]) that names the document. The coordinator never asks for
//! changes (its messages carry no `have` summary); a peer message that carries
//! changes is refused ([`SyncError::ChangesRefused`]) and counted, and the
//! document is unchanged. [`WorldReplica`] is the agent's side.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, Automerge, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, ScalarValueRef, ValueRef, hydrate,
};
use concord_proto::coord::Phase;
use concord_proto::{ObservationKind, ResourcePath, Value};
use serde::{Deserialize, Serialize};

use crate::world::{Service, World};

/// Shape version of the document's root.
pub const SCHEMA_VERSION: i64 = 1;

/// Largest sync frame accepted from a peer. A replica's messages carry heads,
/// needs and a bloom filter of what it received since the last sync, never
/// changes, so they stay small.
pub const PEER_FRAME_BYTES_MAX: usize = 1 << 20;

/// The first bytes of every sync frame.
pub const FRAME_MAGIC: [u8; 3] = *b"CWS";
/// The frame layout version.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the Automerge message: magic, version, kind, document id, epoch.
pub const FRAME_HEADER_BYTES: usize = 3 + 1 + 1 + 16 + 8;

/// A document id: names one epoch of one coordinator's world document.
pub type DocId = [u8; 16];

/// Who writes the document: the coordinator's id and the incarnation of its
/// process (1 for the first, one more per restart, logged as
/// `Record::Incarnation`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The coordinator's id (one per domain).
    pub coordinator: String,
    /// The process incarnation.
    pub incarnation: u64,
}

impl Default for Identity {
    /// The identity of a coordinator that no runtime named: tests, the
    /// simulator, replays of a single process.
    fn default() -> Self {
        Identity {
            coordinator: "concord".into(),
            incarnation: 1,
        }
    }
}

/// Deadband, rotation and sync bounds of the world document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorldDocConfig {
    /// A metric is written when it moves more than this from the value the
    /// document holds (and more than the relative deadband).
    pub metric_deadband_abs: f64,
    /// ... and more than this fraction of the value the document holds.
    pub metric_deadband_rel: f64,
    /// A series is rewritten at least this often while it keeps reporting,
    /// even within its deadband, so a replica can tell a steady series from a
    /// silent one. 0: never.
    pub observation_refresh_ms: u64,
    /// Start a fresh document after this many changes: what bounds the
    /// document's memory (about 200 bytes per change in automerge 0.12).
    pub rotate_changes_max: u64,
    /// Also start a fresh document once it is this old (coordinator time),
    /// to bound the age of the history replicas hold. 0: never. Off by
    /// default: a quiet document holds little history, and each rotation
    /// rewrites the whole world.
    pub rotate_after_ms: u64,
    /// Most sync peers (agents' replicas) tracked at once.
    pub sync_peers_max: usize,
}

impl Default for WorldDocConfig {
    fn default() -> Self {
        WorldDocConfig {
            metric_deadband_abs: 0.0,
            metric_deadband_rel: 0.05,
            observation_refresh_ms: 15 * 60 * 1000,
            rotate_changes_max: 50_000,
            rotate_after_ms: 0,
            sync_peers_max: 10_000,
        }
    }
}

/// The latest observation of a series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObservationRecord {
    /// Kind.
    pub kind: ObservationKind,
    /// Value.
    pub value: Value,
    /// Reporting agent.
    pub agent: String,
    /// Coordinator receive time.
    pub at_ms: u64,
}

/// Which plan step last changed a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Plan lineage.
    pub lineage: String,
    /// Plan version.
    pub version: u32,
    /// Step id.
    pub step: String,
    /// The step itself or its compensation.
    pub phase: Phase,
    /// The agent whose plan it was.
    pub agent: String,
    /// Coordinator time of the success.
    pub at_ms: u64,
}

/// Whether a new observation must be written to the document, given what
/// the document holds for its series. Health words: on any change. Metrics:
/// when they move beyond both deadbands. Any kind: when the kind changes, or
/// when the written value is older than the refresh interval.
pub fn needs_write(cfg: &WorldDocConfig, written: Option<&ObservationRecord>, new: &ObservationRecord) -> bool {
    let Some(w) = written else { return true };
    if w.kind != new.kind {
        return true;
    }
    if cfg.observation_refresh_ms > 0 && new.at_ms.saturating_sub(w.at_ms) >= cfg.observation_refresh_ms {
        return true;
    }
    match (new.kind, w.value.as_f64(), new.value.as_f64()) {
        (ObservationKind::Metric, Some(old), Some(v)) => {
            let band = cfg.metric_deadband_abs.max(cfg.metric_deadband_rel * old.abs());
            (v - old).abs() > band
        }
        _ => w.value != new.value,
    }
}

/// Why the world document could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum WorldDocError {
    /// Automerge refused an operation or the bytes do not load.
    #[error("world document: {0}")]
    Automerge(String),
    /// The document lacks a root key or holds the wrong type there.
    #[error("world document: {0}")]
    Shape(String),
    /// An incarnation must be newer than the one in force.
    #[error("world document: incarnation {new} is not newer than {current}")]
    IncarnationNotNewer {
        /// The incarnation in force.
        current: u64,
        /// The one asked for.
        new: u64,
    },
    /// The document's resources differ from the materialized view.
    #[error("world document: its resources differ from the world at `{path}`")]
    ViewMismatch {
        /// The first path that differs.
        path: String,
    },
}

fn am(e: automerge::AutomergeError) -> WorldDocError {
    WorldDocError::Automerge(e.to_string())
}

/// Why a sync frame was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The bytes are not a world sync frame.
    #[error("world sync: malformed frame: {0}")]
    Frame(String),
    /// The frame is larger than [`PEER_FRAME_BYTES_MAX`].
    #[error("world sync: frame of {bytes} bytes; at most {max}")]
    TooLarge {
        /// Frame size.
        bytes: usize,
        /// The bound.
        max: usize,
    },
    /// The Automerge message inside does not decode.
    #[error("world sync: message: {0}")]
    Message(String),
    /// The peer sent changes. Replicas are read-only: the message is refused,
    /// counted, and the document is unchanged.
    #[error("world sync: peer `{peer}` sent {changes} change(s); replicas are read-only, refused")]
    ChangesRefused {
        /// The peer.
        peer: String,
        /// Change chunks in the message.
        changes: usize,
    },
    /// The peer's heads name changes this document never had: its replica
    /// diverged. Its next frame tells it to start over.
    #[error("world sync: peer `{peer}` holds {unknown} change(s) this document never had; it must start over")]
    Diverged {
        /// The peer.
        peer: String,
        /// Unknown heads.
        unknown: usize,
    },
    /// Too many peers are tracked.
    #[error("world sync: {max} peers are tracked; forget one first")]
    PeersFull {
        /// The bound.
        max: usize,
    },
    /// A frame of a kind this side never receives (e.g. a peer sending `reset`).
    #[error("world sync: unexpected `{0}` frame")]
    UnexpectedKind(&'static str),
    /// The replica could not apply the coordinator's message.
    #[error("world sync: could not apply: {0}")]
    Apply(String),
}

// ---- frames -------------------------------------------------------------------

/// What a frame asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// An Automerge sync message.
    Sync,
    /// A replica starts a new session (after a reconnect, a timeout, or a
    /// reset): the coordinator forgets what it believed the peer had.
    Hello,
    /// The coordinator tells a replica to drop its copy and start over.
    Reset,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            FrameKind::Sync => 1,
            FrameKind::Hello => 2,
            FrameKind::Reset => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FrameKind::Sync => "sync",
            FrameKind::Hello => "hello",
            FrameKind::Reset => "reset",
        }
    }
}

/// A decoded sync frame: `CWS`, version, kind, document id, epoch (u64 LE),
/// then the Automerge sync message (empty for `reset`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it asks.
    pub kind: FrameKind,
    /// The document the sender holds (all zeros: none yet).
    pub doc_id: DocId,
    /// The sender's epoch.
    pub epoch: u64,
    /// The Automerge sync message.
    pub message: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Decodes a frame.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, SyncError> {
        if bytes.len() < FRAME_HEADER_BYTES {
            return Err(SyncError::Frame(format!(
                "{} bytes; a frame has at least {FRAME_HEADER_BYTES}",
                bytes.len()
            )));
        }
        if bytes[..3] != FRAME_MAGIC {
            return Err(SyncError::Frame("not a world sync frame (magic)".into()));
        }
        if bytes[3] != FRAME_VERSION {
            return Err(SyncError::Frame(format!(
                "frame version {}; this build speaks {FRAME_VERSION}",
                bytes[3]
            )));
        }
        let kind = match bytes[4] {
            1 => FrameKind::Sync,
            2 => FrameKind::Hello,
            3 => FrameKind::Reset,
            k => return Err(SyncError::Frame(format!("unknown frame kind {k}"))),
        };
        let mut doc_id = [0u8; 16];
        doc_id.copy_from_slice(&bytes[5..21]);
        let mut epoch = [0u8; 8];
        epoch.copy_from_slice(&bytes[21..29]);
        Ok(Frame {
            kind,
            doc_id,
            epoch: u64::from_le_bytes(epoch),
            message: &bytes[FRAME_HEADER_BYTES..],
        })
    }

    /// Encodes a frame.
    pub fn encode(kind: FrameKind, doc_id: &DocId, epoch: u64, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + message.len());
        out.extend_from_slice(&FRAME_MAGIC);
        out.push(FRAME_VERSION);
        out.push(kind.code());
        out.extend_from_slice(doc_id);
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(message);
        out
    }
}

// ---- identities ---------------------------------------------------------------

fn hash16(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The coordinator's actor id in `epoch` under `incarnation`: the first 16
/// bytes of a BLAKE3 of the three, never random.
pub fn coordinator_actor(coordinator: &str, incarnation: u64, epoch: u64) -> ActorId {
    ActorId::from(
        &hash16(&[
            b"concord world writer v1",
            coordinator.as_bytes(),
            &incarnation.to_le_bytes(),
            &epoch.to_le_bytes(),
        ])[..],
    )
}

/// An agent replica's actor id. Replicas never write; the id is derived only
/// so that nothing in the core asks for randomness.
pub fn replica_actor(agent: &str) -> ActorId {
    ActorId::from(&hash16(&[b"concord world replica v1", agent.as_bytes()])[..])
}

fn make_doc_id(identity: &Identity, epoch: u64, created_at_ms: u64) -> DocId {
    hash16(&[
        b"concord world document v1",
        identity.coordinator.as_bytes(),
        &identity.incarnation.to_le_bytes(),
        &epoch.to_le_bytes(),
        &created_at_ms.to_le_bytes(),
    ])
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

fn unhex16(s: &str) -> Option<DocId> {
    unhex(s)?.try_into().ok()
}

/// An empty document written by `actor`.
///
/// `Automerge::new` picks a random actor id; it is replaced here, before any
/// change exists, so no random byte ever reaches a document. This and
/// [`load_doc`] are the only places the core makes documents.
#[allow(clippy::disallowed_methods)]
fn empty_doc(actor: ActorId) -> Automerge {
    Automerge::new().with_actor(actor)
}

/// A document loaded from `bytes`, written from now on by `actor` (see [`empty_doc`]).
#[allow(clippy::disallowed_methods)]
fn load_doc(bytes: &[u8], actor: ActorId) -> Result<Automerge, WorldDocError> {
    let mut doc = Automerge::load(bytes).map_err(am)?;
    doc.set_actor(actor);
    Ok(doc)
}

fn commit_options(now_ms: u64) -> CommitOptions {
    // Automerge's change time is advisory, in seconds.
    CommitOptions::default().with_time(i64::try_from(now_ms / 1000).unwrap_or(i64::MAX))
}

// ---- values -------------------------------------------------------------------

fn scalar(v: &Value) -> Option<ScalarValue> {
    Some(match v {
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Int(i) => ScalarValue::Int(*i),
        Value::Float(f) => ScalarValue::F64(*f),
        Value::Str(s) => ScalarValue::Str(s.as_str().into()),
        Value::List(_) | Value::Map(_) => return None,
    })
}

/// A value as an Automerge hydrate value (for batch writes): scalars as
/// Automerge scalars, lists and maps as Automerge objects, so replicas read
/// typed values.
fn to_hydrate(v: &Value) -> hydrate::Value {
    match scalar(v) {
        Some(s) => hydrate::Value::Scalar(s),
        None => match v {
            Value::List(l) => hydrate::Value::from(l.iter().map(to_hydrate).collect::<Vec<_>>()),
            Value::Map(m) => hmap(m.iter().map(|(k, v)| (k.clone(), to_hydrate(v)))),
            _ => unreachable!("scalars are handled above"),
        },
    }
}

/// A hydrate map. Automerge keeps it in a hash map but writes its keys
/// sorted (`batch_bfs`), so the document does not depend on hash order.
fn hmap(entries: impl IntoIterator<Item = (String, hydrate::Value)>) -> hydrate::Value {
    let mut m = hydrate::Map::default();
    for (k, value) in entries {
        m.insert(k, hydrate::MapValue { value, conflict: false });
    }
    hydrate::Value::Map(m)
}

/// Writes `v` at `key` of map `obj`: a scalar in one operation, a list or
/// map as one batch (two splices of the op set, whatever its size).
fn put_value<T: Transactable>(tx: &mut T, obj: &ObjId, key: &str, v: &Value) -> Result<(), WorldDocError> {
    match scalar(v) {
        Some(s) => tx.put(obj, key, s).map_err(am),
        None => tx
            .batch_create_object(obj, key, &to_hydrate(v), false)
            .map(|_| ())
            .map_err(am),
    }
}

fn from_scalar(s: &ScalarValueRef<'_>) -> Option<Value> {
    Some(match s {
        ScalarValueRef::Boolean(b) => Value::Bool(*b),
        ScalarValueRef::Int(i) => Value::Int(*i),
        ScalarValueRef::Uint(u) => Value::Int(i64::try_from(*u).ok()?),
        ScalarValueRef::F64(f) => Value::Float(*f),
        ScalarValueRef::Str(s) => Value::Str(s.to_string()),
        _ => return None,
    })
}

fn from_owned_scalar(s: &ScalarValue) -> Option<Value> {
    Some(match s {
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Int(i) => Value::Int(*i),
        ScalarValue::Uint(u) => Value::Int(i64::try_from(*u).ok()?),
        ScalarValue::F64(f) => Value::Float(*f),
        ScalarValue::Str(s) => Value::Str(s.to_string()),
        _ => return None,
    })
}

/// Reads the object `obj` (a map or list) as a value.
fn read_object<D: ReadDoc>(doc: &D, obj: &ObjId, kind: ObjType) -> Option<Value> {
    match kind {
        ObjType::Map | ObjType::Table => {
            let mut out = BTreeMap::new();
            for item in doc.map_range(obj, ..) {
                let v = match &item.value {
                    ValueRef::Scalar(s) => from_scalar(s)?,
                    ValueRef::Object(k) => read_object(doc, &item.id(), *k)?,
                };
                out.insert(item.key.to_string(), v);
            }
            Some(Value::Map(out))
        }
        ObjType::List => {
            let mut out = Vec::new();
            for item in doc.list_range(obj, ..) {
                let v = match &item.value {
                    ValueRef::Scalar(s) => from_scalar(s)?,
                    ValueRef::Object(k) => read_object(doc, &item.id(), *k)?,
                };
                out.push(v);
            }
            Some(Value::List(out))
        }
        ObjType::Text => None,
    }
}

/// Reads the value at `key` of map `obj`.
fn read_value<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str) -> Option<Value> {
    match doc.get(obj, key).ok()?? {
        (automerge::Value::Scalar(s), _) => from_owned_scalar(&s),
        (automerge::Value::Object(kind), id) => read_object(doc, &id, kind),
    }
}

fn read_str<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str) -> Option<String> {
    match read_value(doc, obj, key)? {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

fn read_u64<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str) -> Option<u64> {
    read_value(doc, obj, key)?.as_i64().and_then(|i| u64::try_from(i).ok())
}

fn root_map<D: ReadDoc>(doc: &D, key: &str) -> Option<ObjId> {
    match doc.get(ROOT, key).ok()?? {
        (automerge::Value::Object(ObjType::Map), id) => Some(id),
        _ => None,
    }
}

fn kind_word(k: ObservationKind) -> &'static str {
    match k {
        ObservationKind::Liveness => "liveness",
        ObservationKind::AppHealth => "app_health",
        ObservationKind::Metric => "metric",
    }
}

fn kind_from(s: &str) -> Option<ObservationKind> {
    Some(match s {
        "liveness" => ObservationKind::Liveness,
        "app_health" => ObservationKind::AppHealth,
        "metric" => ObservationKind::Metric,
        _ => return None,
    })
}

/// The object ids of the root maps, found once per document.
#[derive(Clone, Debug)]
struct Roots {
    resources: ObjId,
    services: ObjId,
    observations: ObjId,
    provenance: ObjId,
}

impl Roots {
    fn find<D: ReadDoc>(doc: &D) -> Option<Roots> {
        Some(Roots {
            resources: root_map(doc, "resources")?,
            services: root_map(doc, "services")?,
            observations: root_map(doc, "observations")?,
            provenance: root_map(doc, "provenance")?,
        })
    }
}

/// What this document is, read from its root.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    epoch: u64,
    doc_id: DocId,
    created_at_ms: u64,
}

impl Header {
    fn read<D: ReadDoc>(doc: &D) -> Option<Header> {
        if read_value(doc, &ROOT, "schema")?.as_i64()? != SCHEMA_VERSION {
            return None;
        }
        Some(Header {
            epoch: read_u64(doc, &ROOT, "epoch")?,
            doc_id: unhex16(&read_str(doc, &ROOT, "doc_id")?)?,
            created_at_ms: read_u64(doc, &ROOT, "created_at_ms")?,
        })
    }
}

/// Reads of the world document shared by the writer and the replicas.
fn resources_of<D: ReadDoc>(doc: &D, roots: &Roots) -> BTreeMap<ResourcePath, Value> {
    let mut out = BTreeMap::new();
    for item in doc.map_range(&roots.resources, ..) {
        let v = match &item.value {
            ValueRef::Scalar(s) => from_scalar(s),
            ValueRef::Object(k) => read_object(doc, &item.id(), *k),
        };
        if let (Ok(p), Some(v)) = (ResourcePath::parse(&item.key), v) {
            out.insert(p, v);
        }
    }
    out
}

fn scan_of<D: ReadDoc>(doc: &D, roots: &Roots, prefix: &str) -> Vec<(ResourcePath, Value)> {
    let mut out = Vec::new();
    for item in doc.map_range(&roots.resources, prefix.to_string()..) {
        if !item.key.starts_with(prefix) {
            break;
        }
        let v = match &item.value {
            ValueRef::Scalar(s) => from_scalar(s),
            ValueRef::Object(k) => read_object(doc, &item.id(), *k),
        };
        if let (Ok(p), Some(v)) = (ResourcePath::parse(&item.key), v) {
            out.push((p, v));
        }
    }
    out
}

fn observation_of<D: ReadDoc>(doc: &D, roots: &Roots, path: &str) -> Option<ObservationRecord> {
    let obj = match doc.get(&roots.observations, path).ok()?? {
        (automerge::Value::Object(ObjType::Map), id) => id,
        _ => return None,
    };
    Some(ObservationRecord {
        kind: kind_from(&read_str(doc, &obj, "kind")?)?,
        value: read_value(doc, &obj, "value")?,
        agent: read_str(doc, &obj, "agent")?,
        at_ms: read_u64(doc, &obj, "at_ms")?,
    })
}

fn observations_of<D: ReadDoc>(doc: &D, roots: &Roots) -> BTreeMap<ResourcePath, ObservationRecord> {
    let keys: Vec<String> = doc.keys(&roots.observations).collect();
    keys.into_iter()
        .filter_map(|k| Some((ResourcePath::parse(&k).ok()?, observation_of(doc, roots, &k)?)))
        .collect()
}

fn provenance_of<D: ReadDoc>(doc: &D, roots: &Roots, path: &str) -> Option<Provenance> {
    serde_json::from_str(&read_str(doc, &roots.provenance, path)?).ok()
}

fn provenances_of<D: ReadDoc>(doc: &D, roots: &Roots) -> BTreeMap<ResourcePath, Provenance> {
    let keys: Vec<String> = doc.keys(&roots.provenance).collect();
    keys.into_iter()
        .filter_map(|k| Some((ResourcePath::parse(&k).ok()?, provenance_of(doc, roots, &k)?)))
        .collect()
}

fn services_of<D: ReadDoc>(doc: &D, roots: &Roots) -> BTreeMap<String, Service> {
    let keys: Vec<String> = doc.keys(&roots.services).collect();
    let mut out = BTreeMap::new();
    for k in keys {
        let Some(Value::Map(m)) = read_value(doc, &roots.services, &k) else {
            continue;
        };
        let Some(path) = m
            .get("path")
            .and_then(Value::as_str)
            .and_then(|p| ResourcePath::parse(p).ok())
        else {
            continue;
        };
        let depends_on = m
            .get("depends_on")
            .and_then(Value::as_list)
            .unwrap_or_default()
            .iter()
            .filter_map(|d| ResourcePath::parse(d.as_str()?).ok())
            .collect();
        out.insert(k, Service { path, depends_on });
    }
    out
}

// ---- the writer -------------------------------------------------------------------

/// Counters of the sync side, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStats {
    /// Frames received from peers.
    pub frames_in: u64,
    /// Frames produced for peers.
    pub frames_out: u64,
    /// Bytes produced for peers.
    pub bytes_out: u64,
    /// Peer messages refused because they carried changes.
    pub changes_refused: u64,
    /// Peers found holding changes this document never had.
    pub diverged: u64,
    /// Peer frames about another document (an older epoch, or none yet).
    pub other_document: u64,
}

#[derive(Debug)]
struct Peer {
    state: sync::State,
    /// The peer's copy diverged: its next frame is a `reset`.
    reset: bool,
    /// Messages refused from this peer because they carried changes.
    refused: u64,
}

impl Peer {
    fn new() -> Self {
        Peer {
            // Read-only: even if a refusal were bypassed, Automerge would not
            // apply a peer's changes, and it never asks a peer for any.
            state: sync::State::new_read_only(),
            reset: false,
            refused: 0,
        }
    }
}

/// What a coordinator-side receive did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncReceipt {
    /// The message was taken into the peer's sync state.
    Applied,
    /// The peer holds another document (an older epoch, or none): its
    /// session starts over and its next frame carries this document.
    OtherDocument,
}

/// Most accepted writes held unapplied while nothing reads the Automerge
/// document (each holds a copy of what it writes; rotation, every 50,000
/// changes by default, drops them sooner). Past it, each new write applies
/// the oldest: the backlog is never applied in one go.
pub const PENDING_WRITES_MAX: usize = 1 << 16;

/// A write the coordinator accepted and has not yet applied to the
/// Automerge document. Applying it later, in order, makes exactly the
/// change an immediate write would have made (same ops, time and actor).
/// A snapshot keeps the writes still held as they are (see [`serde_doc`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Pending {
    /// A step's (or compensation's) changes with their provenance (JSON).
    Step {
        now_ms: u64,
        changes: Vec<(ResourcePath, Option<Value>)>,
        by: String,
    },
    /// The latest value of a series, and the record the document held.
    Observation {
        path: ResourcePath,
        obs: ObservationRecord,
        written: Option<ObservationRecord>,
    },
    /// A new incarnation writes from here on.
    Actor(#[serde(with = "actor_hex")] ActorId),
}

/// An Automerge actor id as hex text.
mod actor_hex {
    use automerge::ActorId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &ActorId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.to_hex_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ActorId, D::Error> {
        let text = String::deserialize(d)?;
        ActorId::try_from(text.as_str()).map_err(|e| serde::de::Error::custom(format!("actor id `{text}`: {e}")))
    }
}

/// The Automerge document and the writes not yet applied to it.
#[derive(Debug)]
struct Lazy {
    doc: Automerge,
    /// The root maps of `doc` (placeholders while `create` is pending).
    roots: Roots,
    /// A rotation's fresh document, not built yet: building one from a
    /// large world is the costliest write there is (about 100 ms at 100k
    /// paths on an idle machine), and nobody may ever read this epoch.
    create: Option<Box<Creation>>,
    pending: VecDeque<Pending>,
}

/// What a fresh document is built from.
#[derive(Debug)]
struct Creation {
    identity: Identity,
    epoch: u64,
    state: Snapshot,
    now_ms: u64,
}

impl Lazy {
    fn built(doc: Automerge, roots: Roots) -> Lazy {
        Lazy {
            doc,
            roots,
            create: None,
            pending: VecDeque::new(),
        }
    }

    /// Builds the document if its creation is pending.
    fn create(&mut self) {
        if let Some(c) = self.create.take() {
            let (doc, roots, _) = build(&c.identity, c.epoch, &c.state, c.now_ms);
            self.doc = doc;
            self.roots = roots;
        }
    }

    /// Builds the document if needed, then applies every pending write, in
    /// order, one change each.
    fn materialize(&mut self) {
        self.create();
        self.apply_oldest(usize::MAX);
    }

    /// Applies the oldest `n` pending writes, in order, one change each (the
    /// document is built).
    fn apply_oldest(&mut self, n: usize) {
        for _ in 0..n {
            let Some(p) = self.pending.pop_front() else { break };
            // Each write goes to a root map this document made, with keys and
            // values Automerge accepts: it cannot fail. Should it, its
            // transaction is dropped (rolled back), as an immediate write's was.
            let _ = apply_pending(&mut self.doc, &self.roots, p);
        }
    }
}

fn apply_pending(doc: &mut Automerge, roots: &Roots, p: Pending) -> Result<(), WorldDocError> {
    match p {
        Pending::Actor(actor) => {
            doc.set_actor(actor);
        }
        Pending::Step { now_ms, changes, by } => {
            let mut tx = doc.transaction();
            for (path, after) in &changes {
                match after {
                    Some(v) => put_value(&mut tx, &roots.resources, path.as_str(), v)?,
                    None => tx.delete(&roots.resources, path.as_str()).map_err(am)?,
                }
                tx.put(&roots.provenance, path.as_str(), by.as_str()).map_err(am)?;
            }
            tx.commit_with(commit_options(now_ms));
        }
        Pending::Observation { path, obs, written } => {
            let mut tx = doc.transaction();
            let existing = match &written {
                Some(w) => match tx.get(&roots.observations, path.as_str()).map_err(am)? {
                    Some((automerge::Value::Object(ObjType::Map), id)) => Some((id, w)),
                    _ => None,
                },
                None => None,
            };
            write_observation(&mut tx, &roots.observations, path.as_str(), &obs, existing)?;
            tx.commit_with(commit_options(obs.at_ms));
        }
    }
    Ok(())
}

/// The coordinator's world document: the only writer.
///
/// Writes are accepted at once (the deadband, the change count that drives
/// rotation, the latest observations and provenance are kept beside the
/// document) and applied to Automerge when something reads the document:
/// a sync step, a save (but a snapshot's: it keeps them held), a read, or
/// one write past [`PENDING_WRITES_MAX`] (the oldest). Each write is
/// still its own change, applied in order with its own time and actor, so
/// every reader sees the bytes and heads an immediate write would have made.
/// What is saved is the Automerge work for a history nobody reads: a replay
/// or a simulation that never syncs, and an epoch retired by rotation before
/// anyone asked for it (the fresh document is built from the kept state).
pub struct WorldDoc {
    lazy: Mutex<Lazy>,
    identity: Identity,
    config: WorldDocConfig,
    header: Header,
    peers: BTreeMap<String, Peer>,
    stats: SyncStats,
    /// Changes in this epoch's document, applied or pending.
    changes: u64,
    /// The latest record per series, as the document holds it.
    observations_view: BTreeMap<ResourcePath, ObservationRecord>,
    /// The provenance per path, as the document holds it.
    provenance_view: BTreeMap<ResourcePath, Provenance>,
    /// A running BLAKE3 over the document's creation and every write since:
    /// names the whole history (ops, times, actors) without building it.
    history: [u8; 32],
}

impl fmt::Debug for WorldDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorldDoc")
            .field("identity", &self.identity)
            .field("epoch", &self.header.epoch)
            .field("doc_id", &hex(&self.header.doc_id))
            .field("changes", &self.changes)
            .field("history", &self.history_digest())
            .field("peers", &self.peers.len())
            .finish()
    }
}

/// The Automerge document of a [`WorldDoc`], every accepted write applied.
pub struct DocRef<'a>(MutexGuard<'a, Lazy>);

impl std::ops::Deref for DocRef<'_> {
    type Target = Automerge;
    fn deref(&self) -> &Automerge {
        &self.0.doc
    }
}

impl fmt::Debug for DocRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DocRef").finish_non_exhaustive()
    }
}

fn chain(history: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(history);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

fn heads_digest(doc: &Automerge) -> [u8; 32] {
    let heads: Vec<u8> = doc.get_heads().iter().flat_map(|h| h.0).collect();
    chain(&[0u8; 32], &[b"concord world history v1", &heads])
}

fn value_bytes(v: &Value) -> Vec<u8> {
    // Values are plain data: serialization cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// What rotating the document did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The new epoch.
    pub epoch: u64,
    /// The new document id (hex).
    pub doc_id: String,
    /// Changes in the retired document.
    pub retired_changes: u64,
}

impl WorldDoc {
    /// A new document (epoch 0) holding `world`, written at `now_ms`.
    pub fn new(identity: Identity, config: WorldDocConfig, world: &World, now_ms: u64) -> Self {
        let state = Snapshot {
            resources: world.resources.clone(),
            services: world.services.clone(),
            observations: BTreeMap::new(),
            provenance: BTreeMap::new(),
        };
        let (doc, roots, header) = build(&identity, 0, &state, now_ms);
        WorldDoc {
            changes: doc.stats().num_changes,
            history: heads_digest(&doc),
            lazy: Mutex::new(Lazy::built(doc, roots)),
            identity,
            config,
            header,
            peers: BTreeMap::new(),
            stats: SyncStats::default(),
            observations_view: state.observations,
            provenance_view: state.provenance,
        }
    }

    /// Loads a saved document (a snapshot) to be written by `identity` from
    /// now on. The actor is the one of `identity` in the saved epoch: pass
    /// the incarnation of the loading process, never an earlier one.
    pub fn load(bytes: &[u8], identity: Identity, config: WorldDocConfig) -> Result<Self, WorldDocError> {
        // Read the header with a throwaway actor (nothing is written), then
        // set the real one.
        let probe = load_doc(bytes, replica_actor("load"))?;
        let header = Header::read(&probe).ok_or_else(|| WorldDocError::Shape("no valid header at the root".into()))?;
        let roots = Roots::find(&probe).ok_or_else(|| WorldDocError::Shape("missing root maps".into()))?;
        let mut doc = probe;
        doc.set_actor(coordinator_actor(
            &identity.coordinator,
            identity.incarnation,
            header.epoch,
        ));
        Ok(WorldDoc {
            changes: doc.stats().num_changes,
            history: heads_digest(&doc),
            observations_view: observations_of(&doc, &roots),
            provenance_view: provenances_of(&doc, &roots),
            lazy: Mutex::new(Lazy::built(doc, roots)),
            identity,
            config,
            header,
            peers: BTreeMap::new(),
            stats: SyncStats::default(),
        })
    }

    /// The document with every accepted write applied.
    fn doc(&self) -> MutexGuard<'_, Lazy> {
        // A panic while applying leaves at worst some writes unapplied: the
        // document is still a valid prefix of the history, so go on.
        let mut lazy = self.lazy.lock().unwrap_or_else(PoisonError::into_inner);
        lazy.materialize();
        lazy
    }

    /// The document with every accepted write applied, to write or sync.
    fn doc_mut(&mut self) -> &mut Automerge {
        let lazy = self.lazy.get_mut().unwrap_or_else(PoisonError::into_inner);
        lazy.materialize();
        &mut lazy.doc
    }

    /// Applies the oldest held writes, at most `max` of them; returns how
    /// many are still held. Who applies a write, and when, changes nothing
    /// (the same changes in the same order): a runtime calls this a little
    /// at a time, so that a read after many writes (a snapshot, a replica's
    /// first sync) does not apply them all at once.
    ///
    /// While a rotation's fresh document is not built, nothing is applied:
    /// building it is the one write that cannot be split, and it waits for
    /// a reader (or for a write past [`PENDING_WRITES_MAX`]).
    pub fn apply_held(&mut self, max: usize) -> usize {
        let lazy = self.lazy.get_mut().unwrap_or_else(PoisonError::into_inner);
        if lazy.create.is_none() {
            lazy.apply_oldest(max);
        }
        lazy.pending.len()
    }

    /// How many held writes [`WorldDoc::apply_held`] would apply now: none
    /// while a rotation's fresh document is not built.
    pub fn held_applicable(&self) -> usize {
        let lazy = self.lazy.lock().unwrap_or_else(PoisonError::into_inner);
        if lazy.create.is_some() { 0 } else { lazy.pending.len() }
    }

    /// Holds a write until the document is read.
    fn defer(&mut self, write: Pending) {
        let lazy = self.lazy.get_mut().unwrap_or_else(PoisonError::into_inner);
        lazy.pending.push_back(write);
        if lazy.pending.len() > PENDING_WRITES_MAX {
            lazy.create();
            lazy.apply_oldest(lazy.pending.len() - PENDING_WRITES_MAX);
        }
    }

    /// The document's bytes (for snapshots): the same inputs give the same bytes.
    pub fn save(&self) -> Vec<u8> {
        self.doc().doc.save()
    }

    /// The document's heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc().doc.get_heads()
    }

    /// The heads as hex, in order.
    pub fn heads_hex(&self) -> Vec<String> {
        self.doc().doc.get_heads().iter().map(|h| h.to_string()).collect()
    }

    /// A digest of the document's whole history in this process line: its
    /// creation (or the heads it was loaded with) and every write since, with
    /// its time and actor. Equal histories give equal digests without building
    /// the document (the state digest uses it).
    pub fn history_digest(&self) -> String {
        hex(&self.history)
    }

    /// The epoch (0 for the first document, one more per rotation).
    pub fn epoch(&self) -> u64 {
        self.header.epoch
    }

    /// The document id.
    pub fn doc_id(&self) -> DocId {
        self.header.doc_id
    }

    /// When this epoch's document was created (coordinator time).
    pub fn created_at_ms(&self) -> u64 {
        self.header.created_at_ms
    }

    /// Changes in this epoch's document.
    pub fn change_count(&self) -> u64 {
        self.changes
    }

    /// Operations in this epoch's document.
    pub fn op_count(&self) -> u64 {
        self.doc().doc.stats().num_ops
    }

    /// The writer's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The bounds in force.
    pub fn config(&self) -> &WorldDocConfig {
        &self.config
    }

    /// The Automerge document, for reads (benchmarks, tools). Reads only:
    /// the coordinator is the one writer, through its inputs.
    pub fn automerge(&self) -> DocRef<'_> {
        DocRef(self.doc())
    }

    /// A new process incarnation writes from now on.
    pub(crate) fn set_incarnation(&mut self, incarnation: u64) -> Result<(), WorldDocError> {
        if incarnation <= self.identity.incarnation {
            return Err(WorldDocError::IncarnationNotNewer {
                current: self.identity.incarnation,
                new: incarnation,
            });
        }
        self.identity.incarnation = incarnation;
        let actor = coordinator_actor(&self.identity.coordinator, incarnation, self.header.epoch);
        self.history = chain(&self.history, &[b"actor", actor.to_bytes()]);
        self.defer(Pending::Actor(actor));
        Ok(())
    }

    // ---- reads (cold path: previews read the materialized `World`) ----

    /// The value at `path`.
    pub fn resource(&self, path: &str) -> Option<Value> {
        let l = self.doc();
        read_value(&l.doc, &l.roots.resources, path)
    }

    /// Every resource.
    pub fn resources(&self) -> BTreeMap<ResourcePath, Value> {
        let l = self.doc();
        resources_of(&l.doc, &l.roots)
    }

    /// The resources as [`WorldDoc::resources`] gives them, without applying
    /// the held writes: the applied document's, then the held steps' changes
    /// over them.
    fn resources_held(&self) -> BTreeMap<ResourcePath, Value> {
        let mut l = self.lazy.lock().unwrap_or_else(PoisonError::into_inner);
        l.create();
        let mut out = resources_of(&l.doc, &l.roots);
        for p in &l.pending {
            if let Pending::Step { changes, .. } = p {
                for (path, after) in changes {
                    match after {
                        Some(v) => out.insert(path.clone(), v.clone()),
                        None => out.remove(path),
                    };
                }
            }
        }
        out
    }

    /// Resources whose path text starts with `prefix`, in order.
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(ResourcePath, Value)> {
        let l = self.doc();
        scan_of(&l.doc, &l.roots, prefix)
    }

    /// The services.
    pub fn services(&self) -> BTreeMap<String, Service> {
        let l = self.doc();
        services_of(&l.doc, &l.roots)
    }

    /// The world the document holds (resources and services).
    pub fn world(&self) -> World {
        World {
            resources: self.resources(),
            services: self.services(),
        }
    }

    /// The latest written observation of a series.
    pub fn observation(&self, path: &str) -> Option<ObservationRecord> {
        let l = self.doc();
        observation_of(&l.doc, &l.roots, path)
    }

    /// Every series' latest written observation.
    pub fn observations(&self) -> BTreeMap<ResourcePath, ObservationRecord> {
        let l = self.doc();
        observations_of(&l.doc, &l.roots)
    }

    /// Which step last changed `path`.
    pub fn provenance(&self, path: &str) -> Option<Provenance> {
        let l = self.doc();
        provenance_of(&l.doc, &l.roots, path)
    }

    /// Provenance of every path that has one.
    pub fn provenances(&self) -> BTreeMap<ResourcePath, Provenance> {
        let l = self.doc();
        provenances_of(&l.doc, &l.roots)
    }

    /// Checks that the document's resources equal `world`'s (cold path: after
    /// a load, in tests).
    pub fn check_view(&self, world: &World) -> Result<(), WorldDocError> {
        let mine = self.resources_held();
        let first = mine
            .iter()
            .zip(world.resources.iter())
            .find(|(a, b)| a != b)
            .map(|(a, _)| a.0.to_string());
        match first {
            Some(path) => Err(WorldDocError::ViewMismatch { path }),
            None if mine.len() != world.resources.len() => {
                let path = if mine.len() > world.resources.len() {
                    mine.keys().nth(world.resources.len()).map(|p| p.to_string())
                } else {
                    world.resources.keys().nth(mine.len()).map(|p| p.to_string())
                };
                Err(WorldDocError::ViewMismatch {
                    path: path.unwrap_or_default(),
                })
            }
            None => Ok(()),
        }
    }

    // ---- writes: the coordinator's alone ----

    /// Writes the changes a step (or compensation) made, with their
    /// provenance, as one change.
    pub(crate) fn apply_step(
        &mut self,
        now_ms: u64,
        changes: &[(ResourcePath, Option<Value>)],
        by: &Provenance,
    ) -> Result<(), WorldDocError> {
        if changes.is_empty() {
            return Ok(());
        }
        let json = provenance_json(by);
        let mut history = chain(&self.history, &[b"step", &now_ms.to_le_bytes(), json.as_bytes()]);
        for (path, after) in changes {
            let after = after.as_ref().map(value_bytes).unwrap_or_default();
            history = chain(&history, &[path.as_str().as_bytes(), &after]);
            self.provenance_view.insert(path.clone(), by.clone());
        }
        self.history = history;
        // Every step change writes a provenance record naming its time: a new
        // one, so the change is never empty.
        self.changes += 1;
        self.defer(Pending::Step {
            now_ms,
            changes: changes.to_vec(),
            by: json,
        });
        Ok(())
    }

    /// Writes the latest value of a series (the caller applied the deadband),
    /// touching only the fields that differ from `written`.
    pub(crate) fn put_observation(
        &mut self,
        path: &ResourcePath,
        obs: &ObservationRecord,
        written: Option<&ObservationRecord>,
    ) -> Result<(), WorldDocError> {
        // Whether the write makes any operation: Automerge skips a put of
        // the value a key already holds, and a change with no operation is
        // not made (what the document holds is `observations_view`).
        let held = self.observations_view.get(path);
        let writes = match (written, held) {
            (Some(w), Some(h)) => {
                (w.kind != obs.kind && h.kind != obs.kind)
                    || (w.value != obs.value && (h.value != obs.value || scalar(&obs.value).is_none()))
                    || (w.agent != obs.agent && h.agent != obs.agent)
                    || h.at_ms != obs.at_ms
            }
            _ => true,
        };
        self.observations_view.insert(path.clone(), obs.clone());
        if !writes {
            return Ok(());
        }
        self.history = chain(
            &self.history,
            &[
                b"observation",
                path.as_str().as_bytes(),
                kind_word(obs.kind).as_bytes(),
                &value_bytes(&obs.value),
                obs.agent.as_bytes(),
                &obs.at_ms.to_le_bytes(),
                &[u8::from(written.is_some())],
            ],
        );
        self.changes += 1;
        self.defer(Pending::Observation {
            path: path.clone(),
            obs: obs.clone(),
            written: written.cloned(),
        });
        Ok(())
    }

    /// Whether the schedule calls for a fresh document at `now_ms`.
    pub fn rotation_due(&self, now_ms: u64) -> bool {
        self.change_count() >= self.config.rotate_changes_max
            || (self.config.rotate_after_ms > 0
                && now_ms.saturating_sub(self.header.created_at_ms) >= self.config.rotate_after_ms)
    }

    /// Starts a fresh document (the next epoch) from the current state:
    /// resources and services from `world` (the materialized view, equal to
    /// the document's and cheaper to read), the latest observations, and the
    /// provenance of paths that still hold a value. Every peer's session
    /// starts over.
    pub(crate) fn rotate(&mut self, now_ms: u64, world: &World) -> Rotation {
        // From the kept state, equal to the retired document's: its pending
        // writes are dropped unapplied with it.
        let resources = world.resources.clone();
        let provenance = self
            .provenance_view
            .iter()
            .filter(|(p, _)| resources.contains_key(*p))
            .map(|(p, by)| (p.clone(), by.clone()))
            .collect();
        let state = Snapshot {
            resources,
            services: world.services.clone(),
            observations: self.observations_view.clone(),
            provenance,
        };
        let retired_changes = self.change_count();
        let epoch = self.header.epoch + 1;
        // The fresh document is built when first read: until then only its
        // header, views and history are kept (a rotation on a large world
        // would otherwise stop the coordinator for as long as building takes).
        // Its history is named by what it is built from: the retired
        // document's history (which determines the state) and the rotation.
        self.history = chain(&self.history, &[b"rotate", &epoch.to_le_bytes(), &now_ms.to_le_bytes()]);
        self.header = Header {
            epoch,
            doc_id: make_doc_id(&self.identity, epoch, now_ms),
            created_at_ms: now_ms,
        };
        // One change: the transaction that writes the whole state.
        self.changes = 1;
        self.observations_view = state.observations.clone();
        self.provenance_view = state.provenance.clone();
        let placeholder = empty_doc(coordinator_actor(
            &self.identity.coordinator,
            self.identity.incarnation,
            epoch,
        ));
        self.lazy = Mutex::new(Lazy {
            doc: placeholder,
            roots: Roots {
                resources: ROOT,
                services: ROOT,
                observations: ROOT,
                provenance: ROOT,
            },
            create: Some(Box::new(Creation {
                identity: self.identity.clone(),
                epoch,
                state,
                now_ms,
            })),
            pending: VecDeque::new(),
        });
        for peer in self.peers.values_mut() {
            peer.state = sync::State::new_read_only();
            peer.reset = false;
        }
        Rotation {
            epoch: self.header.epoch,
            doc_id: hex(&self.header.doc_id),
            retired_changes,
        }
    }

    // ---- sync: the per-peer step functions ----

    fn peer(&mut self, peer: &str) -> Result<&mut Peer, SyncError> {
        if !self.peers.contains_key(peer) && self.peers.len() >= self.config.sync_peers_max {
            return Err(SyncError::PeersFull {
                max: self.config.sync_peers_max,
            });
        }
        Ok(self.peers.entry(peer.to_string()).or_insert_with(Peer::new))
    }

    /// The next frame to send to `peer`, or `None` when it is up to date or
    /// a message to it is still unanswered. Call it after every input that
    /// wrote the document, and after every frame received from the peer.
    pub fn sync_generate(&mut self, peer: &str) -> Result<Option<Vec<u8>>, SyncError> {
        let (doc_id, epoch) = (self.header.doc_id, self.header.epoch);
        self.doc_mut();
        let lazy = self.lazy.get_mut().unwrap_or_else(PoisonError::into_inner);
        let doc = &lazy.doc;
        let p = {
            if !self.peers.contains_key(peer) && self.peers.len() >= self.config.sync_peers_max {
                return Err(SyncError::PeersFull {
                    max: self.config.sync_peers_max,
                });
            }
            self.peers.entry(peer.to_string()).or_insert_with(Peer::new)
        };
        let frame = if p.reset {
            p.reset = false;
            p.state = sync::State::new_read_only();
            Frame::encode(FrameKind::Reset, &doc_id, epoch, &[])
        } else {
            let Some(mut msg) = doc.generate_sync_message(&mut p.state) else {
                return Ok(None);
            };
            // The coordinator wants nothing from a replica: no `have`
            // summary, so a conforming peer never sends changes back.
            msg.have.clear();
            Frame::encode(FrameKind::Sync, &doc_id, epoch, &msg.encode())
        };
        self.stats.frames_out += 1;
        self.stats.bytes_out += frame.len() as u64;
        Ok(Some(frame))
    }

    /// Takes a frame from `peer`. A message carrying changes is refused and
    /// counted; the document never changes here.
    pub fn sync_receive(&mut self, peer: &str, bytes: &[u8]) -> Result<SyncReceipt, SyncError> {
        if bytes.len() > PEER_FRAME_BYTES_MAX {
            return Err(SyncError::TooLarge {
                bytes: bytes.len(),
                max: PEER_FRAME_BYTES_MAX,
            });
        }
        let frame = Frame::decode(bytes)?;
        if frame.kind == FrameKind::Reset {
            return Err(SyncError::UnexpectedKind(frame.kind.name()));
        }
        let (doc_id, _) = (self.header.doc_id, self.header.epoch);
        self.peer(peer)?;
        self.stats.frames_in += 1;
        if frame.doc_id != doc_id {
            // Another document (an older epoch, another deployment, or none):
            // nothing in the message describes this one. Start over.
            self.stats.other_document += 1;
            let p = self.peer(peer)?;
            p.state = sync::State::new_read_only();
            p.reset = frame.doc_id != [0u8; 16];
            return Ok(SyncReceipt::OtherDocument);
        }
        let msg = sync::Message::decode(frame.message).map_err(|e| SyncError::Message(e.to_string()))?;
        if !msg.changes.is_empty() {
            self.stats.changes_refused += 1;
            let p = self.peer(peer)?;
            p.refused += 1;
            return Err(SyncError::ChangesRefused {
                peer: peer.to_string(),
                changes: msg.changes.len(),
            });
        }
        let unknown = msg
            .heads
            .iter()
            .filter(|h| self.doc_mut().get_change_meta_by_hash(h).is_none())
            .count();
        if unknown > 0 {
            self.stats.diverged += 1;
            let p = self.peer(peer)?;
            p.reset = true;
            return Err(SyncError::Diverged {
                peer: peer.to_string(),
                unknown,
            });
        }
        // Built, every write applied (also when the message named no heads).
        self.doc_mut();
        let doc = &mut self.lazy.get_mut().unwrap_or_else(PoisonError::into_inner).doc;
        let p = self.peers.get_mut(peer).ok_or(SyncError::PeersFull {
            max: self.config.sync_peers_max,
        })?;
        if frame.kind == FrameKind::Hello {
            p.state = sync::State::new_read_only();
        }
        let holds_some = !msg.heads.is_empty();
        // The message carries no changes, so this cannot change the document.
        doc.receive_sync_message(&mut p.state, msg)
            .map_err(|e| SyncError::Message(e.to_string()))?;
        if holds_some {
            // Automerge sends the whole document instead of the missing
            // changes when they are over a third of the document's *changes*;
            // a document starts (and restarts at each rotation) as one large
            // change, so a replica that holds it would get all of it again.
            // Forgetting the peer's advertised capabilities keeps replies to
            // the changes it lacks. An empty replica still gets the whole
            // document, compressed, in one message.
            p.state.their_capabilities = None;
        }
        Ok(SyncReceipt::Applied)
    }

    /// Forgets a peer (it disconnected for good); its next frame starts afresh.
    pub fn sync_forget(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    /// Peers tracked.
    pub fn sync_peers(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    /// Messages refused from `peer` because they carried changes.
    pub fn sync_refused(&self, peer: &str) -> u64 {
        self.peers.get(peer).map_or(0, |p| p.refused)
    }

    /// Sync counters.
    pub fn sync_stats(&self) -> SyncStats {
        self.stats
    }
}

/// A fresh document (epoch `epoch`) holding `state`, written at `now_ms` by
/// `identity`'s actor: one change.
///
/// Every write goes to an object made in the same transaction, with keys and
/// values Automerge accepts whatever they hold: building cannot fail.
fn build(identity: &Identity, epoch: u64, state: &Snapshot, now_ms: u64) -> (Automerge, Roots, Header) {
    try_build(identity, epoch, state, now_ms).expect("a fresh document accepts every write")
}

fn try_build(
    identity: &Identity,
    epoch: u64,
    state: &Snapshot,
    now_ms: u64,
) -> Result<(Automerge, Roots, Header), WorldDocError> {
    let header = Header {
        epoch,
        doc_id: make_doc_id(identity, epoch, now_ms),
        created_at_ms: now_ms,
    };
    let mut doc = empty_doc(coordinator_actor(&identity.coordinator, identity.incarnation, epoch));
    let mut tx = doc.transaction();
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    tx.put(ROOT, "schema", SCHEMA_VERSION).map_err(am)?;
    tx.put(ROOT, "coordinator", identity.coordinator.as_str()).map_err(am)?;
    tx.put(ROOT, "epoch", as_i64(epoch)).map_err(am)?;
    tx.put(ROOT, "doc_id", hex(&header.doc_id)).map_err(am)?;
    tx.put(ROOT, "created_at_ms", as_i64(now_ms)).map_err(am)?;
    // Each root map is written as one batch: a 100k-path world costs two
    // op-set splices instead of 100k.
    let str_value = |s: &str| hydrate::Value::Scalar(ScalarValue::Str(s.into()));
    let resources = hmap(state.resources.iter().map(|(p, v)| (p.to_string(), to_hydrate(v))));
    let services = hmap(state.services.iter().map(|(name, s)| {
        let depends_on: Vec<hydrate::Value> = s.depends_on.iter().map(|d| str_value(d.as_str())).collect();
        (
            name.clone(),
            hmap([
                ("path".to_string(), str_value(s.path.as_str())),
                ("depends_on".to_string(), hydrate::Value::from(depends_on)),
            ]),
        )
    }));
    let observations = hmap(state.observations.iter().map(|(p, o)| {
        (
            p.to_string(),
            hmap([
                ("kind".to_string(), str_value(kind_word(o.kind))),
                ("value".to_string(), to_hydrate(&o.value)),
                ("agent".to_string(), str_value(&o.agent)),
                (
                    "at_ms".to_string(),
                    hydrate::Value::Scalar(ScalarValue::Int(as_i64(o.at_ms))),
                ),
            ]),
        )
    }));
    let provenance = hmap(
        state
            .provenance
            .iter()
            .map(|(p, by)| (p.to_string(), str_value(&provenance_json(by)))),
    );
    let mut root = |key: &str, value: &hydrate::Value| tx.batch_create_object(ROOT, key, value, false).map_err(am);
    let resources = root("resources", &resources)?;
    let services = root("services", &services)?;
    let observations = root("observations", &observations)?;
    let provenance = root("provenance", &provenance)?;
    tx.commit_with(commit_options(now_ms));
    let roots = Roots {
        resources,
        services,
        observations,
        provenance,
    };
    Ok((doc, roots, header))
}

/// The state a fresh document starts from.
#[derive(Debug)]
struct Snapshot {
    resources: BTreeMap<ResourcePath, Value>,
    services: BTreeMap<String, Service>,
    observations: BTreeMap<ResourcePath, ObservationRecord>,
    provenance: BTreeMap<ResourcePath, Provenance>,
}

fn write_observation<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    path: &str,
    o: &ObservationRecord,
    existing: Option<(ObjId, &ObservationRecord)>,
) -> Result<(), WorldDocError> {
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    match existing {
        Some((obj, w)) => {
            if w.kind != o.kind {
                tx.put(&obj, "kind", kind_word(o.kind)).map_err(am)?;
            }
            if w.value != o.value {
                put_value(tx, &obj, "value", &o.value)?;
            }
            if w.agent != o.agent {
                tx.put(&obj, "agent", o.agent.as_str()).map_err(am)?;
            }
            tx.put(&obj, "at_ms", as_i64(o.at_ms)).map_err(am)?;
        }
        None => {
            let record = hmap([
                ("kind".to_string(), hydrate::Value::Scalar(kind_word(o.kind).into())),
                ("value".to_string(), to_hydrate(&o.value)),
                ("agent".to_string(), hydrate::Value::Scalar(o.agent.as_str().into())),
                (
                    "at_ms".to_string(),
                    hydrate::Value::Scalar(ScalarValue::Int(as_i64(o.at_ms))),
                ),
            ]);
            tx.batch_create_object(parent, path, &record, false).map_err(am)?;
        }
    }
    Ok(())
}

/// A provenance record is one JSON string: one operation on the step path
/// (a map of six fields costs six, and writes there are on the saga's way).
fn provenance_json(by: &Provenance) -> String {
    serde_json::to_string(by).unwrap_or_default()
}

/// The world document inside a coordinator snapshot: its identity, bounds
/// and saved bytes (hex). Sync sessions are not state: after a restore,
/// replicas say hello again and catch up from what they hold.
pub mod serde_doc {
    use std::collections::{BTreeMap, VecDeque};

    use concord_proto::ResourcePath;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{
        Identity, ObservationRecord, Pending, PoisonError, Provenance, WorldDoc, WorldDocConfig, actor_hex, hex, unhex,
    };

    /// What the document holds beside its bytes while writes are held: they
    /// are saved as they are, not applied (each would cost an Automerge
    /// change that nobody may ever read; a rotation retires them unapplied).
    #[derive(Serialize)]
    struct HeldOut<'a> {
        #[serde(with = "actor_hex")]
        actor: &'a automerge::ActorId,
        writes: &'a VecDeque<Pending>,
        changes: u64,
        observations: &'a BTreeMap<ResourcePath, ObservationRecord>,
        provenance: &'a BTreeMap<ResourcePath, Provenance>,
    }

    #[derive(Deserialize)]
    struct Held {
        /// The actor the first held write is made with.
        #[serde(with = "actor_hex")]
        actor: automerge::ActorId,
        /// The writes not applied to `bytes`, in order.
        writes: VecDeque<Pending>,
        /// The epoch's changes, applied or held.
        changes: u64,
        /// The views, with the held writes.
        observations: BTreeMap<ResourcePath, ObservationRecord>,
        provenance: BTreeMap<ResourcePath, Provenance>,
    }

    #[derive(Serialize)]
    struct SavedOut<'a> {
        identity: &'a Identity,
        config: &'a WorldDocConfig,
        bytes: String,
        history: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        held: Option<HeldOut<'a>>,
    }

    #[derive(Deserialize)]
    struct Saved {
        identity: Identity,
        config: WorldDocConfig,
        /// The document as applied.
        bytes: String,
        /// The history digest (absent in older snapshots: then it starts
        /// from the saved heads).
        #[serde(default)]
        history: Option<String>,
        /// Writes accepted and not yet applied to `bytes` (absent when none).
        #[serde(default)]
        held: Option<Held>,
    }

    /// Writes the document as its identity, bounds, bytes as applied, the
    /// writes it still holds, and its history digest. A rotation's fresh
    /// document not yet built is built first (one change, however large
    /// the world); held writes are not applied.
    pub fn serialize<S: Serializer>(d: &WorldDoc, s: S) -> Result<S::Ok, S::Error> {
        let mut lazy = d.lazy.lock().unwrap_or_else(PoisonError::into_inner);
        lazy.create();
        let bytes = hex(&lazy.doc.save());
        let actor = lazy.doc.get_actor().clone();
        let held = (!lazy.pending.is_empty()).then(|| HeldOut {
            actor: &actor,
            writes: &lazy.pending,
            changes: d.changes,
            observations: &d.observations_view,
            provenance: &d.provenance_view,
        });
        SavedOut {
            identity: &d.identity,
            config: &d.config,
            bytes,
            history: d.history_digest(),
            held,
        }
        .serialize(s)
    }

    /// Loads the document with the saved identity's actor (or, while writes
    /// are held, the actor the first of them is made with), holding the
    /// saved writes as they were.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WorldDoc, D::Error> {
        let saved = Saved::deserialize(d)?;
        let bytes = unhex(&saved.bytes).ok_or_else(|| serde::de::Error::custom("world document bytes: not hex"))?;
        let mut doc = WorldDoc::load(&bytes, saved.identity, saved.config).map_err(serde::de::Error::custom)?;
        if let Some(h) = saved.history {
            let h: [u8; 32] = unhex(&h)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| serde::de::Error::custom("world document history: not a 32-byte hex digest"))?;
            doc.history = h;
        }
        if let Some(held) = saved.held {
            let lazy = doc.lazy.get_mut().unwrap_or_else(PoisonError::into_inner);
            lazy.doc.set_actor(held.actor);
            lazy.pending = held.writes;
            doc.changes = held.changes;
            doc.observations_view = held.observations;
            doc.provenance_view = held.provenance;
        }
        Ok(doc)
    }
}

// ---- the replica --------------------------------------------------------------

/// What a replica-side receive did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaEvent {
    /// The message was applied.
    Synced,
    /// The replica dropped its copy (told to, or the coordinator moved to a
    /// new document) and started over.
    Reset,
}

/// An agent's read-only copy of the world document. It applies the
/// coordinator's sync frames and answers them; it has no way to write.
///
/// Drive it: call [`WorldReplica::hello`] on connect (and after a silence
/// longer than the runtime's sync timeout: a lost frame otherwise stalls the
/// session), send what it returns to the coordinator, pass every frame from
/// the coordinator to [`WorldReplica::receive`], and send whatever
/// [`WorldReplica::generate`] returns after it.
pub struct WorldReplica {
    agent: String,
    doc: Automerge,
    state: sync::State,
    doc_id: Option<DocId>,
    epoch: u64,
    roots: Option<Roots>,
    resets: u64,
}

impl fmt::Debug for WorldReplica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorldReplica")
            .field("agent", &self.agent)
            .field("doc_id", &self.doc_id.map(|d| hex(&d)))
            .field("epoch", &self.epoch)
            .field("changes", &self.doc.stats().num_changes)
            .finish()
    }
}

impl WorldReplica {
    /// An empty replica for `agent`.
    pub fn new(agent: &str) -> Self {
        WorldReplica {
            agent: agent.to_string(),
            doc: empty_doc(replica_actor(agent)),
            state: sync::State::new(),
            doc_id: None,
            epoch: 0,
            roots: None,
            resets: 0,
        }
    }

    fn drop_copy(&mut self) {
        self.doc = empty_doc(replica_actor(&self.agent));
        self.state = sync::State::new();
        self.doc_id = None;
        self.roots = None;
        self.resets += 1;
    }

    fn frame(&mut self, kind: FrameKind) -> Option<Vec<u8>> {
        let msg = self.doc.generate_sync_message(&mut self.state)?;
        Some(Frame::encode(
            kind,
            &self.doc_id.unwrap_or_default(),
            self.epoch,
            &msg.encode(),
        ))
    }

    /// Starts a new session (on connect, or when the coordinator fell
    /// silent): keeps what the replica holds, forgets what is in flight.
    pub fn hello(&mut self) -> Vec<u8> {
        // Only the shared heads survive an encode/decode: what a new session keeps.
        self.state = sync::State::decode(&self.state.encode()).unwrap_or_default();
        self.frame(FrameKind::Hello)
            .unwrap_or_else(|| Frame::encode(FrameKind::Hello, &self.doc_id.unwrap_or_default(), self.epoch, &[]))
    }

    /// The next frame for the coordinator, if any. The first frame of a
    /// session is a `hello`.
    pub fn generate(&mut self) -> Option<Vec<u8>> {
        let kind = if self.state.have_responded {
            FrameKind::Sync
        } else {
            FrameKind::Hello
        };
        self.frame(kind)
    }

    /// Takes a frame from the coordinator.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<ReplicaEvent, SyncError> {
        let frame = Frame::decode(bytes)?;
        match frame.kind {
            FrameKind::Hello => Err(SyncError::UnexpectedKind(frame.kind.name())),
            FrameKind::Reset => {
                self.drop_copy();
                Ok(ReplicaEvent::Reset)
            }
            FrameKind::Sync => {
                let mut event = ReplicaEvent::Synced;
                if self.doc_id.is_some_and(|d| d != frame.doc_id) {
                    self.drop_copy();
                    event = ReplicaEvent::Reset;
                }
                self.doc_id = Some(frame.doc_id);
                self.epoch = frame.epoch;
                let msg = sync::Message::decode(frame.message).map_err(|e| SyncError::Message(e.to_string()))?;
                self.doc
                    .receive_sync_message(&mut self.state, msg)
                    .map_err(|e| SyncError::Apply(e.to_string()))?;
                if self.roots.is_none() {
                    self.roots = Roots::find(&self.doc);
                }
                Ok(event)
            }
        }
    }

    /// The agent this replica belongs to.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The document id it follows, once it has one.
    pub fn doc_id(&self) -> Option<DocId> {
        self.doc_id
    }

    /// The epoch it follows.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many times it dropped its copy.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Its heads: equal to the coordinator's once caught up.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The Automerge document, for reads.
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    /// Its document's bytes.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// The value at `path`.
    pub fn resource(&self, path: &str) -> Option<Value> {
        read_value(&self.doc, &self.roots.as_ref()?.resources, path)
    }

    /// Every resource.
    pub fn resources(&self) -> BTreeMap<ResourcePath, Value> {
        self.roots
            .as_ref()
            .map(|r| resources_of(&self.doc, r))
            .unwrap_or_default()
    }

    /// Resources whose path text starts with `prefix`, in order.
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(ResourcePath, Value)> {
        self.roots
            .as_ref()
            .map(|r| scan_of(&self.doc, r, prefix))
            .unwrap_or_default()
    }

    /// The world it holds (resources and services).
    pub fn world(&self) -> World {
        World {
            resources: self.resources(),
            services: self
                .roots
                .as_ref()
                .map(|r| services_of(&self.doc, r))
                .unwrap_or_default(),
        }
    }

    /// The latest written observation of a series.
    pub fn observation(&self, path: &str) -> Option<ObservationRecord> {
        observation_of(&self.doc, self.roots.as_ref()?, path)
    }

    /// Every series' latest written observation.
    pub fn observations(&self) -> BTreeMap<ResourcePath, ObservationRecord> {
        self.roots
            .as_ref()
            .map(|r| observations_of(&self.doc, r))
            .unwrap_or_default()
    }

    /// Which step last changed `path`.
    pub fn provenance(&self, path: &str) -> Option<Provenance> {
        provenance_of(&self.doc, self.roots.as_ref()?, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World::from_toml_str(
            r#"
            [resources]
            "svc/api/pool_size" = 50
            "svc/api/version" = "v1"
            "svc/api/tags" = ["a", "b"]
            "svc/api/limits" = { cpu = 2.5, mem = 512, on = true }
            [services.api]
            path = "svc/api"
            depends_on = ["db/primary"]
            "#,
        )
        .unwrap()
    }

    fn by(step: &str, at_ms: u64) -> Provenance {
        Provenance {
            lineage: "pool".into(),
            version: 1,
            step: step.into(),
            phase: Phase::Do,
            agent: "resource".into(),
            at_ms,
        }
    }

    /// A rotation keeps the fresh document's state and builds it when it
    /// is first read: held writes are not applied meanwhile (that would
    /// build it), and the document then read is the one an immediate build
    /// makes, with the same change count, views and bytes.
    #[test]
    fn a_rotated_document_is_built_when_first_read() {
        let w = world();
        let mut lazy = WorldDoc::new(Identity::default(), WorldDocConfig::default(), &w, 1_000);
        let mut eager = WorldDoc::new(Identity::default(), WorldDocConfig::default(), &w, 1_000);
        for d in [&mut lazy, &mut eager] {
            d.rotate(2_000, &w);
        }
        // Read at once: built.
        let built_heads = eager.heads();
        assert!(eager.lazy.get_mut().unwrap().create.is_none());
        assert!(
            lazy.lazy.get_mut().unwrap().create.is_some(),
            "rotation built the document"
        );
        assert_eq!(lazy.change_count(), eager.change_count());
        assert_eq!(lazy.doc_id(), eager.doc_id());
        // Held-write application leaves a pending build alone.
        let pool = ResourcePath::parse("svc/api/pool_size").unwrap();
        for d in [&mut lazy, &mut eager] {
            d.set_incarnation(2).unwrap();
            d.apply_step(3_000, &[(pool.clone(), Some(Value::Int(60)))], &by("s1", 3_000))
                .unwrap();
        }
        assert_eq!(lazy.apply_held(usize::MAX), 2);
        assert!(lazy.lazy.get_mut().unwrap().create.is_some());
        assert_eq!(eager.apply_held(usize::MAX), 0);
        assert_eq!(lazy.history_digest(), eager.history_digest());
        // First read: built, then the held writes applied, as eagerly.
        assert_eq!(lazy.save(), eager.save());
        assert_eq!(lazy.heads(), eager.heads());
        assert_ne!(lazy.heads(), built_heads);
        let mut changed = w.clone();
        changed.resources.insert(pool, Value::Int(60));
        assert_eq!(lazy.world(), changed);
        assert_eq!(lazy.provenance("svc/api/pool_size"), Some(by("s1", 3_000)));
        assert_eq!(lazy.change_count(), eager.change_count());
    }

    /// A snapshot keeps held writes held: saving does not apply them, and
    /// the document restored from it holds them still, with the views and
    /// change count they make; applied later (after a new incarnation's
    /// writes too), they give the bytes of a document that never stopped.
    #[test]
    fn a_snapshot_keeps_held_writes_held() {
        #[derive(Serialize, Deserialize)]
        struct Wrapped(#[serde(with = "serde_doc")] WorldDoc);
        let w = world();
        let pool = ResourcePath::parse("svc/api/pool_size").unwrap();
        let tags = ResourcePath::parse("svc/api/tags").unwrap();
        let cpu = ResourcePath::parse("host/a/cpu").unwrap();
        let obs = |v: f64, at_ms| ObservationRecord {
            kind: ObservationKind::Metric,
            value: Value::Float(v),
            agent: "probe".into(),
            at_ms,
        };
        let id = Identity {
            coordinator: "c1".into(),
            incarnation: 1,
        };
        // One write applied, then held: an observation, a step, a new
        // incarnation (its actor), a deletion under it.
        let build = || {
            let mut d = WorldDoc::new(id.clone(), WorldDocConfig::default(), &w, 1_000);
            d.apply_step(2_000, &[(pool.clone(), Some(Value::Int(60)))], &by("s1", 2_000))
                .unwrap();
            assert_eq!(d.apply_held(usize::MAX), 0);
            d.put_observation(&cpu, &obs(0.5, 2_500), None).unwrap();
            d.apply_step(3_000, &[(pool.clone(), Some(Value::Int(70)))], &by("s2", 3_000))
                .unwrap();
            d.set_incarnation(2).unwrap();
            d.apply_step(3_500, &[(tags.clone(), None)], &by("s3", 3_500)).unwrap();
            d
        };
        let mut d = build();
        assert_eq!(d.held_applicable(), 4);
        let saved = Wrapped(build());
        let json = serde_json::to_vec(&saved).unwrap();
        assert_eq!(saved.0.held_applicable(), 4, "saving applied the held writes");
        let Wrapped(mut restored) = serde_json::from_slice(&json).unwrap();
        assert_eq!(restored.held_applicable(), 4, "the restored document applied them");
        assert_eq!(restored.change_count(), d.change_count());
        assert_eq!(restored.history_digest(), d.history_digest());
        assert_eq!(restored.observations_view, d.observations_view);
        assert_eq!(restored.provenance_view, d.provenance_view);
        let mut expected = w.clone();
        expected.resources.insert(pool.clone(), Value::Int(70));
        expected.resources.remove(&tags);
        restored.check_view(&expected).unwrap();
        assert!(restored.check_view(&w).is_err(), "the held writes are not in the check");
        assert_eq!(restored.held_applicable(), 4, "the check applied the held writes");
        // A new incarnation writes on both, then everything is applied.
        for doc in [&mut d, &mut restored] {
            doc.set_incarnation(3).unwrap();
            doc.apply_step(4_000, &[(pool.clone(), Some(Value::Int(80)))], &by("s4", 4_000))
                .unwrap();
        }
        assert_eq!(restored.save(), d.save());
        assert_eq!(restored.heads(), d.heads());
        assert_eq!(restored.observation("host/a/cpu"), Some(obs(0.5, 2_500)));
        assert_eq!(restored.provenance("svc/api/tags"), Some(by("s3", 3_500)));
        // The saved form without held writes is the older one, and loads.
        let again = serde_json::to_value(Wrapped(restored)).unwrap();
        assert!(again.get("held").is_none());
    }

    /// Past the bound, each new write applies the oldest held one: the
    /// backlog stays at the bound and is never applied in one go.
    #[test]
    fn past_the_bound_each_write_applies_the_oldest() {
        let w = world();
        let mut d = WorldDoc::new(Identity::default(), WorldDocConfig::default(), &w, 1_000);
        let pool = ResourcePath::parse("svc/api/pool_size").unwrap();
        let changes_before = d.change_count();
        for n in 0..=PENDING_WRITES_MAX as i64 {
            d.apply_step(2_000, &[(pool.clone(), Some(Value::Int(n)))], &by("s", 2_000))
                .unwrap();
        }
        assert_eq!(d.held_applicable(), PENDING_WRITES_MAX);
        assert_eq!(d.change_count(), changes_before + PENDING_WRITES_MAX as u64 + 1);
        // The applied one is the oldest: the document holds the first value.
        let l = d.lazy.get_mut().unwrap();
        assert_eq!(resources_of(&l.doc, &l.roots).get(&pool), Some(&Value::Int(0)));
    }

    #[test]
    fn values_round_trip_with_their_types() {
        let w = world();
        let d = WorldDoc::new(Identity::default(), WorldDocConfig::default(), &w, 1_000);
        assert_eq!(d.world(), w);
        assert_eq!(d.resource("svc/api/limits"), w.resources.get("svc/api/limits").cloned());
        assert_eq!(d.scan_prefix("svc/api/t").len(), 1);
        d.check_view(&w).unwrap();
    }

    #[test]
    fn same_inputs_same_bytes_and_actor_follows_identity() {
        let run = |inc: u64| {
            let id = Identity {
                coordinator: "c1".into(),
                incarnation: inc,
            };
            let mut d = WorldDoc::new(id, WorldDocConfig::default(), &world(), 5_000);
            let p = ResourcePath::parse("svc/api/pool_size").unwrap();
            d.apply_step(6_000, &[(p, Some(Value::Int(60)))], &by("s1", 6_000))
                .unwrap();
            d
        };
        assert_eq!(run(1).save(), run(1).save());
        assert_ne!(run(1).save(), run(2).save());
        let d = run(1);
        assert_eq!(d.automerge().get_actor(), &coordinator_actor("c1", 1, 0));
        assert_eq!(d.provenance("svc/api/pool_size"), Some(by("s1", 6_000)));
    }

    #[test]
    fn deadband() {
        let cfg = WorldDocConfig {
            metric_deadband_abs: 1.0,
            metric_deadband_rel: 0.1,
            observation_refresh_ms: 60_000,
            ..WorldDocConfig::default()
        };
        let rec = |kind, value: Value, at_ms| ObservationRecord {
            kind,
            value,
            agent: "probe".into(),
            at_ms,
        };
        let m = |v: f64, at| rec(ObservationKind::Metric, Value::Float(v), at);
        assert!(needs_write(&cfg, None, &m(1.0, 0)));
        // 100 -> 109: within 10%; -> 111: beyond.
        assert!(!needs_write(&cfg, Some(&m(100.0, 0)), &m(109.0, 1)));
        assert!(needs_write(&cfg, Some(&m(100.0, 0)), &m(111.0, 1)));
        // Near zero the absolute band holds: 0 -> 1 stays, 0 -> 1.5 goes.
        assert!(!needs_write(&cfg, Some(&m(0.0, 0)), &m(1.0, 1)));
        assert!(needs_write(&cfg, Some(&m(0.0, 0)), &m(1.5, 1)));
        // Refresh.
        assert!(needs_write(&cfg, Some(&m(100.0, 0)), &m(100.0, 60_000)));
        // Health words: any change.
        let h = |w: &str, at| rec(ObservationKind::AppHealth, Value::Str(w.into()), at);
        assert!(!needs_write(&cfg, Some(&h("ok", 0)), &h("ok", 1)));
        assert!(needs_write(&cfg, Some(&h("ok", 0)), &h("degraded", 1)));
    }

    #[test]
    fn frames_round_trip_and_refuse_garbage() {
        let id = [7u8; 16];
        let f = Frame::encode(FrameKind::Hello, &id, 3, b"xyz");
        let d = Frame::decode(&f).unwrap();
        assert_eq!(
            (d.kind, d.doc_id, d.epoch, d.message),
            (FrameKind::Hello, id, 3, &b"xyz"[..])
        );
        assert!(matches!(Frame::decode(b"CWS"), Err(SyncError::Frame(_))));
        let mut bad = f.clone();
        bad[4] = 9;
        assert!(matches!(Frame::decode(&bad), Err(SyncError::Frame(_))));
        bad = f;
        bad[0] = b'X';
        assert!(matches!(Frame::decode(&bad), Err(SyncError::Frame(_))));
    }
}
