//! Observations: what agents report about the world (health, metrics).
//!
//! An observation names a series by path, says what kind of signal it is,
//! and carries a value. Health comes in two kinds that concord keeps apart on
//! purpose: `liveness` ("the process answers") and `app_health` ("it does its
//! job"). Alive is not working; verifications name which one they trust.

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, Rule};
use crate::limits::{INTENT_BYTES_MAX, PROTOCOL_VERSION};
use crate::path::ResourcePath;
use crate::value::Value;

/// What kind of signal an observation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservationKind {
    /// The process is up (a heartbeat). Value: a health word (`HEALTH_WORDS`).
    Liveness,
    /// The service does its job (application-level check). Value: a health word (`HEALTH_WORDS`).
    AppHealth,
    /// A number: queue depth, connections in use, latency, ...
    Metric,
}

/// Health words for `liveness` and `app_health` observations.
pub const HEALTH_WORDS: [&str; 4] = ["ok", "degraded", "failing", "unknown"];

/// One observation, as an agent publishes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Observation {
    /// Protocol version; this build speaks `1`.
    #[schemars(range(min = 1, max = 1))]
    pub protocol: u32,
    /// The series, e.g. `svc/api/health/app` or `svc/api/queue_depth`.
    pub path: ResourcePath,
    /// The kind of signal.
    pub kind: ObservationKind,
    /// The value: a health word (`ok`, `degraded`, `failing`, `unknown`) for
    /// health kinds, a number for metrics.
    pub value: Value,
    /// When the agent observed it, by the agent's clock: metadata only;
    /// concord orders and ages observations by its own receive time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at_ms: Option<u64>,
}

impl Observation {
    /// Checks the rules the types do not express.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.protocol != PROTOCOL_VERSION {
            return Err(DecodeError::new(
                "protocol",
                Rule::ProtocolVersion,
                format!(
                    "protocol {} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
                    self.protocol
                ),
            ));
        }
        match self.kind {
            ObservationKind::Liveness | ObservationKind::AppHealth => match self.value.as_str() {
                Some(w) if HEALTH_WORDS.contains(&w) => Ok(()),
                _ => Err(DecodeError::new(
                    "value",
                    Rule::Type,
                    format!(
                        "a health observation's value is one of {HEALTH_WORDS:?}, not {}",
                        self.value
                    ),
                )),
            },
            ObservationKind::Metric => match self.value.as_f64() {
                Some(_) => self.value.check().map_err(|(r, d)| DecodeError::new("value", r, d)),
                None => Err(DecodeError::new(
                    "value",
                    Rule::Type,
                    format!("a metric's value is a number, not {}", self.value),
                )),
            },
        }
    }
}

/// Decodes and validates an observation from its JSON bytes.
pub fn decode_observation(bytes: &[u8]) -> Result<Observation, DecodeError> {
    if bytes.len() > INTENT_BYTES_MAX {
        return Err(DecodeError::new(
            "",
            Rule::PayloadBytesMax,
            format!("payload is {} bytes; at most {INTENT_BYTES_MAX} allowed", bytes.len()),
        ));
    }
    let obs: Observation = crate::error::decode_json(bytes)?;
    obs.validate()?;
    Ok(obs)
}
