//! What travels on the bus besides the protocol's own types: error replies,
//! operators' queries and their answers.

use concord_core::coordinator::{Halt, Lease, ObservationRecord, PlanOverview};
use concord_proto::{DecodeError, Id, ResourcePath, Value};
use serde::{Deserialize, Serialize};

/// An error reply: `{"error": {...}}`. Every request that cannot be served
/// gets one; nothing is dropped silently.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorReply {
    /// The error.
    pub error: BusError,
}

/// A typed error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BusError {
    /// For programs: `decode` (with `field` and `rule`), `busy`, `rate_limited`,
    /// `unavailable`, `unknown_subject`, `payload_too_large`, `not_found`.
    pub code: String,
    /// For people.
    pub message: String,
    /// The field, for `decode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The rule, for `decode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// When to try again, for `busy`, `rate_limited` and `unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// The JSON Schema of an error reply (what any request may get instead of its answer).
pub fn error_reply_schema() -> schemars::Schema {
    schemars::schema_for!(ErrorReply)
}

impl ErrorReply {
    /// An error with a code and a message.
    pub fn new(code: &str, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            error: BusError {
                code: code.to_string(),
                message: message.into(),
                field: None,
                rule: None,
                retry_after_ms: None,
            },
        }
    }

    /// A decode error naming the field and the rule.
    pub fn decode(e: &DecodeError) -> ErrorReply {
        let mut r = ErrorReply::new("decode", e.to_string());
        r.error.field = Some(e.field.clone());
        r.error.rule = Some(
            serde_json::to_value(e.rule)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        );
        r
    }

    /// Try again after `ms`.
    pub fn retry(code: &str, message: impl Into<String>, ms: u64) -> ErrorReply {
        let mut r = ErrorReply::new(code, message);
        r.error.retry_after_ms = Some(ms);
        r
    }

    /// The JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("error replies serialize")
    }
}

/// A read-only question (`query.<caller>`). Answered from the coordinator's
/// state; not an input, not logged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Query {
    /// Plans waiting for a human, with their age and expiry.
    Pending,
    /// Every live plan (pending, queued, running).
    Plans,
    /// Leases held.
    Leases,
    /// Values and latest observations under a path (everything if none).
    World {
        /// The path.
        #[serde(default)]
        path: Option<ResourcePath>,
    },
    /// Halts, counts, the log's head.
    Status,
    /// A live plan's preview, computed now.
    Show {
        /// Its lineage.
        lineage: Id,
    },
    /// The caller's latest notices (up to 256, oldest first), as published
    /// on `notify.<caller>`: what an agent that was disconnected missed
    /// (kept across coordinator restarts: the snapshot carries them and
    /// recovery rebuilds the rest from the log).
    Notices,
}

/// The coordinator's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Its id.
    pub coordinator: String,
    /// Its incarnation.
    pub incarnation: u64,
    /// The last log sequence acknowledged.
    pub log_seq: u64,
    /// The chain hash there.
    pub log_hash: String,
    /// Live plans.
    pub plans: usize,
    /// Leases held.
    pub leases: usize,
    /// Halts in force.
    pub halts: Vec<Halt>,
    /// Whether it admits (connected, log writable, recovered).
    pub ready: bool,
    /// The policy's hash.
    pub policy_hash: String,
    /// The world document and its replicas' sync (absent from older coordinators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<WorldStatus>,
}

/// The world document as the coordinator holds it, and its sync counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorldStatus {
    /// The document's id (hex); a rotation gives a new one.
    pub doc_id: String,
    /// Its epoch (rotations so far).
    pub epoch: u64,
    /// Its heads (hex): a replica that caught up holds the same.
    pub heads: Vec<String>,
    /// Changes in it.
    pub changes: u64,
    /// Replicas connected (frames within the idle time).
    pub replicas: usize,
    /// Frames received from replicas (this process's document).
    pub frames_in: u64,
    /// Frames made for replicas.
    pub frames_out: u64,
    /// Replicas' frames refused because they carried changes.
    pub changes_refused: u64,
    /// Replicas found holding changes the document never had (told to start over).
    pub diverged: u64,
}

/// Answers to queries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// Live plans.
    Plans {
        /// Coordinator time now.
        now_ms: u64,
        /// The plans.
        plans: Vec<PlanOverview>,
    },
    /// Leases.
    Leases {
        /// Held leases.
        leases: Vec<Lease>,
    },
    /// World values and observations.
    World {
        /// Values.
        resources: Vec<(ResourcePath, Value)>,
        /// Latest observations.
        observations: Vec<(ResourcePath, ObservationRecord)>,
    },
    /// Status.
    Status(Box<Status>),
    /// A preview.
    Preview(Box<concord_proto::Preview>),
    /// The caller's latest notices.
    Notices {
        /// Oldest first.
        notices: Vec<concord_proto::coord::Notice>,
    },
}
