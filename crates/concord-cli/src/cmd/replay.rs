//! `concord replay`: re-decide a recorded log and check every event is
//! reproduced; with `--policy`, show which verdicts another policy would
//! have given (what-if).

use std::path::PathBuf;

use anyhow::{Context, Result};
use concord_sim::replay::{parse_jsonl, replay, what_if};
use concord_sim::report::what_if_text;
use concord_sim::time::stamp;

use super::out;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The recording (JSONL of log records: genesis, policy, incarnation, input).
    recording: PathBuf,
    /// What-if: the verdicts this policy would have given, side by side.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Replays; exit 0 when every recorded event is reproduced, 1 on the first divergence.
pub fn run(a: Args) -> Result<u8> {
    let text = std::fs::read_to_string(&a.recording).with_context(|| format!("reading {}", a.recording.display()))?;
    let records = parse_jsonl(&text).with_context(|| format!("in {}", a.recording.display()))?;
    let path = a.recording.display();
    match &a.policy {
        None => {
            let s = replay(&records).with_context(|| format!("{path}: replay diverged"))?;
            if a.json {
                out(&format!("{}\n", serde_json::to_string_pretty(&s)?))?;
            } else {
                let window = s
                    .window_from_ms
                    .map(|t| format!(" in the incident window from {}", stamp(t)))
                    .unwrap_or_default();
                out(&format!(
                    "{path}: replay reproduced every recorded event\n  {} records, {} inputs, {} intents re-decided, {} events equal, up to {}\n  verdicts{window}: {}\n  state digest {}\n",
                    s.records,
                    s.inputs,
                    s.intents,
                    s.events,
                    stamp(s.until_ms),
                    s.verdicts
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    s.state_digest
                ))?;
            }
        }
        Some(p) => {
            let policy_text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let policy = toml::from_str(&policy_text).with_context(|| format!("in {}", p.display()))?;
            let w = what_if(&records, policy).with_context(|| format!("{path}: replay diverged"))?;
            if a.json {
                out(&format!("{}\n", serde_json::to_string_pretty(&w)?))?;
            } else {
                out(&format!(
                    "{path}: the recorded run reproduced; verdicts under {} alongside\n\n{}",
                    p.display(),
                    what_if_text(&w)
                ))?;
            }
        }
    }
    Ok(0)
}
