//! concord's deterministic simulator: modelled systems and agents in virtual
//! time, driving the same [`concord_core::coordinator::Coordinator`] as the
//! live runtime; incident replay and what-if policies over recordings.
//!
//! Layout: [`scenario`] (the TOML scenario files and their checks),
//! [`system`] (the modelled system and its dynamics), [`agents`] (scripted
//! and rule-driven agents), [`run`] (the drive loop, the executor, faults,
//! both modes), [`check`] (safety checkers from outside), [`report`] (timeline,
//! metrics, expectations, text and JSON), [`plot`] (SVG), [`replay`]
//! (recordings: replay, what-if, rebuild), [`rng`] and [`time`].
//!
//! A run is a pure function of the scenario and its seed: no wall clock, no
//! unseeded randomness, ordered maps only, so the same inputs give the same
//! report, byte for byte, in every process.
//!
//! ```
//! use concord_sim::{Scenario, simulate, run::Mode};
//!
//! let scenario = Scenario::parse(r#"
//!     name = "tiny"
//!     description = "a routine pool nudge goes through"
//!     duration = "10m"
//!     policy_inline = { defaults = { autonomy = "bounded" } }
//!     [world.resources]
//!     "svc/api/pool_size" = 50
//!     "svc/api/replicas" = 2
//!     [world.services.api]
//!     path = "svc/api"
//!     [[agents]]
//!     kind = "scripted"
//!     name = "resource"
//!     actions = [{ at = "1m", benign = true, propose = { lineage = "nudge", version = 1, goal = "more room", steps = [
//!         { id = "s1", kind = "set", path = "svc/api/pool_size", args = { value = 60 }, confidence = 0.9,
//!           compensation = { mode = "restore" } } ] } }]
//!     [expect.coordinated]
//!     admitted = ["nudge/1"]
//!     completed = ["nudge/1"]
//!     benign_blocked = 0
//! "#, "tiny.toml", std::path::Path::new(".")).unwrap();
//! let out = simulate(&scenario, &[Mode::Coordinated], None).unwrap();
//! assert!(out.report.ok(), "{:?}", out.report.failures());
//! let pool = concord_proto::ResourcePath::parse("svc/api/pool_size").unwrap();
//! assert_eq!(out.runs[0].world[&pool], concord_proto::Value::Int(60));
//! // The coordinated run wrote its log: replaying it reproduces every event.
//! let summary = concord_sim::replay::replay(&out.runs[0].records).unwrap();
//! assert_eq!(summary.intents, 1);
//! ```

pub mod agents;
pub mod check;
pub mod plot;
pub mod replay;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenario;
pub mod system;
pub mod time;

pub use report::Report;
pub use scenario::{Scenario, ScenarioError};

use concord_core::policy::PolicyConfig;

use crate::run::{Mode, Run, RunError};

/// Why a simulation could not be run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A run could not go on.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The what-if over the coordinated run's log failed.
    #[error("what-if: {0}")]
    WhatIf(#[from] replay::ReplayError),
}

/// Finished runs and their report.
#[derive(Debug)]
pub struct Outcome {
    /// One per mode, in the order asked.
    pub runs: Vec<Run>,
    /// The report.
    pub report: Report,
}

/// Runs `scenario` in each of `modes`; with `other_policy`, also computes
/// that policy's verdicts on the coordinated run's inputs (what-if).
pub fn simulate(scenario: &Scenario, modes: &[Mode], other_policy: Option<PolicyConfig>) -> Result<Outcome, SimError> {
    let mut runs = Vec::new();
    for &m in modes {
        runs.push(run::run(scenario, m)?);
    }
    let what_if = match (other_policy, runs.iter().find(|r| r.mode == Mode::Coordinated)) {
        (Some(p), Some(r)) => Some(replay::what_if(&r.records, p)?),
        _ => None,
    };
    let report = report::report(scenario, &runs, what_if);
    Ok(Outcome { runs, report })
}
