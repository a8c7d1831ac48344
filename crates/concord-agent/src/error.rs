//! What can go wrong, per operation. A rejection is a verdict, not an error:
//! it comes back as a [`Decision`](concord_proto::coord::Decision) whose
//! reasons a program reads.

/// Why a call to the coordinator failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentError {
    /// No answer in time, after every retry with the same idempotency key.
    #[error("no answer on `{subject}` in time ({attempts} attempts with the same key)")]
    TimedOut {
        /// The subject asked.
        subject: String,
        /// How many requests were sent.
        attempts: u32,
    },
    /// A halt (kill switch) covers the plan: nothing in scope is admitted.
    #[error("halted: {message}")]
    Halted {
        /// The coordinator's reason.
        message: String,
    },
    /// Not connected to NATS (the client keeps reconnecting in the background).
    #[error("disconnected from NATS: {0}")]
    Disconnected(String),
    /// No coordinator listens (is `concord up` or `concord dev` running?).
    #[error("no coordinator answers on `{0}`")]
    NoCoordinator(String),
    /// The coordinator is overloaded or cannot log (`busy`, `rate_limited`,
    /// `unavailable`) and still was after every retry.
    #[error("{code}: try again in {retry_after_ms} ms")]
    Busy {
        /// The code the coordinator sent.
        code: String,
        /// When to try again.
        retry_after_ms: u64,
    },
    /// The request is malformed: the field and the rule it broke.
    #[error("field `{field}` breaks rule `{rule}`: {message}")]
    Decode {
        /// The field path, e.g. `steps[0].args.value`.
        field: String,
        /// The rule, e.g. `required`.
        rule: String,
        /// For people.
        message: String,
    },
    /// The coordinator answered with another typed error.
    #[error("{code}: {message}")]
    Refused {
        /// For programs.
        code: String,
        /// For people.
        message: String,
    },
    /// The answer could not be read.
    #[error("cannot read the answer: {0}")]
    BadAnswer(String),
    /// No human decided within the time the agent was prepared to wait.
    #[error("no decision on {lineage} v{version} within {waited_ms} ms")]
    NoDecision {
        /// The plan's lineage.
        lineage: String,
        /// Its version.
        version: u32,
        /// How long the agent waited.
        waited_ms: u64,
    },
    /// The world replica did not reach what was awaited in time.
    #[error("the world replica did not get there within {waited_ms} ms")]
    WorldTimedOut {
        /// How long the agent waited.
        waited_ms: u64,
    },
    /// Invalid configuration (a name that is not one subject token, an unreadable seed).
    #[error("configuration: {0}")]
    Config(String),
}

/// Why an executor could not start or keep serving.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecutorError {
    /// Connecting or subscribing failed.
    #[error("nats: {0}")]
    Nats(String),
    /// The fencing and dedupe bucket cannot be opened or written.
    #[error("fencing store `{bucket}`: {detail}")]
    Store {
        /// The KV bucket.
        bucket: String,
        /// Why.
        detail: String,
    },
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
}
