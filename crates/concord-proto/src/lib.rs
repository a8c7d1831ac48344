//! concord's wire types: intents, steps, previews and verdicts, and their JSON Schema.
//!
//! Every agent, in any language, speaks these types as JSON over NATS.
//! Requests are strict: unknown fields are rejected, every limit in
//! [`limits`] is enforced while decoding, and every error names the field
//! path and the [`Rule`] it broke. Replies and log events carry a version,
//! and readers ignore fields they do not know.
//!
//! Layout: [`intent`] (plans and steps), [`value`] (values at resource
//! paths), [`path`] (paths and identifiers), [`preview`] (what the
//! coordinator answers), [`error`] (decode errors), [`limits`], [`parts`]
//! (large messages in parts).
//!
//! ```
//! use concord_proto::{decode_intent, Rule, StepKind};
//!
//! let json = br#"{
//!   "protocol": 1, "lineage": "raise-pool", "version": 1,
//!   "goal": "drain the queue",
//!   "steps": [{
//!     "id": "s1", "kind": "set", "path": "svc/api/pool_size",
//!     "args": { "value": 100 }, "confidence": 0.7,
//!     "compensation": { "mode": "restore" }
//!   }]
//! }"#;
//! let intent = decode_intent(json).unwrap();
//! assert_eq!(intent.steps[0].kind(), StepKind::Set);
//!
//! // A delete without its confirmation cannot be expressed.
//! let bad = br#"{
//!   "protocol": 1, "lineage": "cleanup", "version": 1, "goal": "tidy",
//!   "steps": [{ "id": "s1", "kind": "delete", "path": "db/replica",
//!               "confidence": 1.0,
//!               "compensation": { "mode": "irreversible", "reason": "data is gone" } }]
//! }"#;
//! let err = decode_intent(bad).unwrap_err();
//! assert_eq!(err.field, "steps[0].args.confirm");
//! assert_eq!(err.rule, Rule::Required);
//! ```

pub mod coord;
pub mod error;
pub mod intent;
pub mod limits;
pub mod observe;
pub mod parts;
pub mod path;
pub mod preview;
pub mod value;

pub use error::{DecodeError, Rule};
pub use intent::{
    CmpOp, Compensation, Condition, DeleteArgs, DeleteConfirm, DeployArgs, Direction, ExecArgs, GrantArgs, Intent,
    NetChange, NetRule, NetworkArgs, OnConflict, Op, Preflight, PreflightResult, Protocol, RestartArgs, ScaleArgs,
    SetArgs, Step, StepKind, StepSpec, Verification, decode_intent,
};
pub use observe::{HEALTH_WORDS, Observation, ObservationKind, decode_observation};
pub use path::{Id, ResourcePath, Short, Text};
pub use preview::{Preview, Verdict};
pub use value::Value;

/// The JSON Schema of an intent (what agents send).
pub fn intent_schema() -> schemars::Schema {
    schemars::schema_for!(Intent)
}

/// The JSON Schema of a preview (what the coordinator answers).
pub fn preview_schema() -> schemars::Schema {
    schemars::schema_for!(Preview)
}

/// The JSON Schema of an observation (what agents publish about the world).
pub fn observation_schema() -> schemars::Schema {
    schemars::schema_for!(Observation)
}

/// The JSON Schema of a decode error reply.
pub fn decode_error_schema() -> schemars::Schema {
    schemars::schema_for!(DecodeError)
}

/// The JSON Schema of a decision (the answer to an intent).
pub fn decision_schema() -> schemars::Schema {
    schemars::schema_for!(coord::Decision)
}

/// The JSON Schema of a notice (`notify.<agent>`: approvals, saga ends, lapsed leases).
pub fn notice_schema() -> schemars::Schema {
    schemars::schema_for!(coord::Notice)
}
