//! Propose a plan as an agent and wait for the verdict (and for a human, if
//! the plan is held). Against `concord dev`, which prints the URL:
//!
//! ```text
//! cargo run -p concord-agent --example propose -- nats://127.0.0.1:PORT resource config/examples/pool-60.json
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use concord_agent::{Agent, AgentConfig, HumanDecision};
use concord_proto::{Verdict, decode_intent};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context("usage: propose URL AGENT PLAN.json [SEED_FILE]")?;
    let name = args.next().context("the agent's name")?;
    let plan_file = args.next().context("a plan file")?;
    let mut cfg = AgentConfig::new(url, name);
    cfg.nkey_seed_file = args.next().map(Into::into);
    let agent = Agent::connect(cfg).await?;
    let plan = decode_intent(&std::fs::read(&plan_file)?).map_err(|e| anyhow::anyhow!("{plan_file}: {e}"))?;
    let d = agent.propose(&plan).await?;
    println!("{} v{}: {}", plan.lineage, plan.version, d.verdict);
    for r in &d.reasons {
        println!("  {} ({}): {}", r.rule, r.outcome, r.message);
    }
    if d.verdict == Verdict::NeedsApproval {
        println!("waiting for a human (concord approve {} --reason ...)", plan.lineage);
        match agent
            .await_decision(&plan.lineage, plan.version, Duration::from_secs(600))
            .await?
        {
            HumanDecision::Approved { operator, reason } => println!("approved by {operator}: {reason}"),
            other => println!("{other:?}"),
        }
    }
    Ok(())
}
