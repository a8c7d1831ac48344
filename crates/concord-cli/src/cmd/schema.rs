//! `concord schema`: the JSON Schema agents validate against.

use anyhow::Result;

/// Which schema.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// What agents send.
    Intent,
    /// What the coordinator answers.
    Preview,
    /// The error reply to a malformed intent or observation.
    DecodeError,
    /// What agents publish about the world.
    Observation,
    /// The answer to an intent.
    Decision,
    /// What any request may get instead of its answer.
    ErrorReply,
    /// Push notices to an agent (`notify.<agent>`).
    Notice,
}

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which schema to print.
    #[arg(value_enum, default_value = "intent")]
    which: Which,
}

/// Prints the schema.
pub fn run(a: Args) -> Result<u8> {
    let schema = match a.which {
        Which::Intent => concord_proto::intent_schema(),
        Which::Preview => concord_proto::preview_schema(),
        Which::DecodeError => concord_proto::decode_error_schema(),
        Which::Observation => concord_proto::observation_schema(),
        Which::Decision => concord_proto::decision_schema(),
        Which::ErrorReply => concord_nats::wire::error_reply_schema(),
        Which::Notice => concord_proto::notice_schema(),
    };
    super::out(&format!("{}\n", serde_json::to_string_pretty(&schema)?))?;
    Ok(0)
}
