//! The coordination log's records: what the coordinator was given, in order.
//!
//! The log records *inputs* (with the coordinator's receive time) and the
//! events each produced. Recovery re-feeds the inputs and applies the
//! recorded decisions; replay re-decides them and compares; the simulator
//! writes the same records, so a simulated run and a live one can be
//! replayed by the same code. A recording file is one record per line (JSONL).

use serde::{Deserialize, Serialize};

use super::{Config, Event, Input};
use crate::policy::PolicyConfig;
use crate::world::World;

/// Shape version of records; readers ignore fields they do not know.
pub const RECORD_VERSION: u32 = 1;

/// One entry of the coordination log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// A coordinator's state begins: its bounds, policy and world. Everything
    /// after it is relative to this state.
    Genesis(Box<Genesis>),
    /// A coordinator process started on the existing state (a restart): the
    /// incarnation numbers the processes, so a restored coordinator never
    /// reuses an identity that replicas already saw.
    Incarnation {
        /// Coordinator receive time.
        now_ms: u64,
        /// The coordinator's id.
        coordinator: String,
        /// 1 for the first process, then one more per restart.
        incarnation: u64,
        /// The core version of this process.
        core_version: String,
    },
    /// A policy was loaded (at start or on reload); later decisions use it.
    Policy {
        /// Coordinator receive time.
        now_ms: u64,
        /// The policy.
        policy: Box<PolicyConfig>,
        /// BLAKE3 of its canonical form, as previews report it.
        policy_hash: String,
    },
    /// One input handled, and the log events it produced.
    Input {
        /// Coordinator receive time.
        now_ms: u64,
        /// The input.
        input: Box<Input>,
        /// The events it produced, in order.
        events: Vec<Event>,
    },
    /// Something the runtime saw that is not an input and changes no state
    /// (messages a slow subscription dropped, say): logged so that nothing
    /// is lost silently. Recovery and replay pass over it.
    Notice {
        /// Coordinator receive time.
        now_ms: u64,
        /// What happened, as a stable name (`slow_consumer`).
        kind: String,
        /// Details for operators.
        detail: String,
    },
}

/// The state a log starts from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Genesis {
    /// Shape version ([`RECORD_VERSION`]).
    pub record_version: u32,
    /// Coordinator receive time.
    pub now_ms: u64,
    /// The coordinator's id.
    pub coordinator: String,
    /// Bounds and times.
    pub config: Config,
    /// The policy.
    pub policy: PolicyConfig,
    /// BLAKE3 of the policy's canonical form.
    pub policy_hash: String,
    /// The world the coordinator starts from.
    pub world: World,
}

impl Record {
    /// The coordinator time of the record.
    pub fn now_ms(&self) -> u64 {
        match self {
            Record::Genesis(g) => g.now_ms,
            Record::Incarnation { now_ms, .. }
            | Record::Policy { now_ms, .. }
            | Record::Input { now_ms, .. }
            | Record::Notice { now_ms, .. } => *now_ms,
        }
    }
}
