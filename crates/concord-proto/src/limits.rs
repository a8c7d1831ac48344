//! Named maxima that decoding enforces on every intent from the bus.
//!
//! Each bound exists so that one agent's payload cannot make the coordinator
//! spend unbounded memory or time; each is named in the error that enforces it.

/// The only protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest encoded intent, in bytes (checked before parsing).
pub const INTENT_BYTES_MAX: usize = 64 * 1024;
/// Most steps one plan may carry.
pub const STEPS_MAX: usize = 64;
/// Most assumptions one plan may carry.
pub const ASSUMPTIONS_MAX: usize = 32;
/// Most unknowns one plan may list.
pub const UNKNOWNS_MAX: usize = 32;
/// Most arguments an `exec` step may pass.
pub const EXEC_ARGS_MAX: usize = 64;
/// Deepest resource path, in segments.
pub const PATH_DEPTH_MAX: usize = 16;
/// Longest resource path, in bytes.
pub const PATH_BYTES_MAX: usize = 256;
/// Longest identifier (lineage, step id, principal, role, idempotency key), in bytes.
pub const ID_BYTES_MAX: usize = 128;
/// Longest short string (versions, artifacts, programs, arguments, reasons), in bytes.
pub const STRING_BYTES_MAX: usize = 1024;
/// Longest free text (goal, rationale, unknowns), in bytes.
pub const TEXT_BYTES_MAX: usize = 4096;
/// Deepest nesting of a value (lists and maps inside lists and maps).
pub const VALUE_DEPTH_MAX: usize = 8;
/// Most items in one list or map value.
pub const VALUE_ITEMS_MAX: usize = 1024;
/// Largest magnitude of an integer value: 2^53 - 1, exact in every JSON reader.
pub const INT_ABS_MAX: i64 = (1 << 53) - 1;
/// Largest magnitude of a float value.
pub const FLOAT_ABS_MAX: f64 = 1e15;
/// Highest plan version.
pub const PLAN_VERSION_MAX: u32 = 1_000_000;
/// Longest per-step timeout and verification window: one day, in milliseconds.
pub const DURATION_MS_MAX: u64 = 86_400_000;
