//! `concord check`: the offline preview of a plan, like `terraform plan`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use concord_core::policy::Policy;
use concord_core::preview::{PreviewInput, preview};
use concord_core::report::{exit_code, render};
use concord_core::world::World;
use concord_proto::decode_intent;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plan (an intent, JSON).
    plan: PathBuf,
    /// The proposing agent (live, this comes from the agent's credentials).
    #[arg(long, default_value = "cli")]
    agent: String,
    /// The world (TOML or JSON); empty if not given.
    #[arg(long)]
    world: Option<PathBuf>,
    /// The policy (TOML); `config/policy.toml` if it exists, else the built-in defaults.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// An earlier version of the plan, for the plan diff and scope expansion.
    #[arg(long)]
    previous: Option<PathBuf>,
    /// Print the preview as JSON.
    #[arg(long)]
    json: bool,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn intent(path: &Path) -> Result<concord_proto::Intent> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_intent(&bytes).map_err(|e| anyhow::anyhow!("{}: invalid intent: {e}", path.display()))
}

/// Previews the plan and prints the report; the exit code is the verdict's.
pub fn run(a: Args) -> Result<u8> {
    let plan = intent(&a.plan)?;
    let previous = a.previous.as_deref().map(intent).transpose()?;
    let world = match &a.world {
        None => World::default(),
        Some(p) => {
            let text = read(p)?;
            let parsed = if p.extension().is_some_and(|e| e == "json") {
                World::from_json_str(&text)
            } else {
                World::from_toml_str(&text)
            };
            parsed.with_context(|| format!("in {}", p.display()))?
        }
    };
    let policy_path = a
        .policy
        .clone()
        .or_else(|| Some(PathBuf::from("config/policy.toml")).filter(|p| p.exists()));
    let policy = match &policy_path {
        None => Policy::compile(Default::default())?,
        Some(p) => Policy::from_toml_str(&read(p)?).with_context(|| format!("in {}", p.display()))?,
    };
    if let Some(prev) = &previous
        && prev.lineage != plan.lineage
    {
        bail!(
            "--previous is lineage `{}` but the plan is lineage `{}`",
            prev.lineage,
            plan.lineage
        );
    }
    let p = preview(PreviewInput {
        world: &world,
        intent: &plan,
        agent: &a.agent,
        policy: &policy,
        previous: previous.as_ref(),
    });
    if a.json {
        super::out(&format!("{}\n", serde_json::to_string_pretty(&p)?))?;
    } else {
        super::out(&render(&p))?;
    }
    Ok(exit_code(p.verdict) as u8)
}
