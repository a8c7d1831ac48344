//! `concord sim`: run a scenario in virtual time, coordinated and
//! uncoordinated, and report the timeline, metrics, checkers and plot.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use concord_sim::run::Mode;
use concord_sim::{Scenario, simulate};

use super::out;

/// Which runs.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Modes {
    /// Through concord.
    Coordinated,
    /// Agents act directly.
    Uncoordinated,
    /// Both, compared.
    Both,
}

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The scenario file (TOML).
    scenario: PathBuf,
    /// Also show which verdicts this policy would have given on the coordinated run's inputs (what-if).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write the plot (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the coordinated run's log (JSONL of records) here, for `concord replay`.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Which runs.
    #[arg(long, value_enum, default_value = "both")]
    mode: Modes,
}

/// Runs the scenario; exit 0 when every expectation is met and every checker held, 4 otherwise.
pub fn run(a: Args) -> Result<u8> {
    let mut s = Scenario::load(&a.scenario)?;
    if let Some(seed) = a.seed {
        s.file.seed = seed;
    }
    let other = match &a.policy {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(toml::from_str(&text).with_context(|| format!("in {}", p.display()))?)
        }
        None => None,
    };
    let modes: &[Mode] = match a.mode {
        Modes::Coordinated => &[Mode::Coordinated],
        Modes::Uncoordinated => &[Mode::Uncoordinated],
        Modes::Both => &[Mode::Uncoordinated, Mode::Coordinated],
    };
    if other.is_some() && !modes.contains(&Mode::Coordinated) {
        bail!("--policy compares verdicts on the coordinated run: use --mode coordinated or both");
    }
    let o = simulate(&s, modes, other)?;
    if let Some(p) = &a.plot {
        let svg = concord_sim::plot::svg(&s.file.name, &o.runs)?;
        std::fs::write(p, svg).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.record {
        let Some(r) = o.runs.iter().find(|r| r.mode == Mode::Coordinated) else {
            bail!("--record writes the coordinated run's log: use --mode coordinated or both");
        };
        std::fs::write(p, concord_sim::replay::to_jsonl(&r.records))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        out(&o.report.json())?;
    } else {
        out(&concord_sim::report::text(&o.report))?;
    }
    let failures = o.report.failures();
    if failures.is_empty() {
        return Ok(0);
    }
    for f in failures {
        eprintln!("concord sim: {f}");
    }
    Ok(4)
}
