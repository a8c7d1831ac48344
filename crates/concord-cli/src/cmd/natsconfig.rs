//! `concord nats-config`: users and permissions for nats-server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use concord_nats::permissions::{AgentsFile, generate};

use super::out;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Who may speak on the bus.
    #[arg(long, default_value = "config/agents.toml")]
    agents: PathBuf,
    /// Where to write `nats.conf` and one seed file per identity (`<role>-<name>.nk`).
    #[arg(long)]
    out: PathBuf,
    /// The server syncs every write to disk before acknowledging it.
    #[arg(long)]
    sync_always: bool,
}

/// Writes the configuration and the seeds.
pub fn run(a: Args) -> Result<u8> {
    let text = std::fs::read_to_string(&a.agents).with_context(|| format!("reading {}", a.agents.display()))?;
    let file: AgentsFile = toml::from_str(&text).with_context(|| format!("in {}", a.agents.display()))?;
    let (users, conf) = generate(&file, a.sync_always)?;
    std::fs::create_dir_all(&a.out)?;
    let conf_path = a.out.join("nats.conf");
    std::fs::write(&conf_path, conf)?;
    for u in &users {
        let p = a.out.join(format!("{}-{}.nk", u.role, u.name));
        std::fs::write(&p, format!("{}\n", u.seed))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    out(&format!(
        "wrote {} and {} seed files; start the server with `nats-server -js -c {}`\n",
        conf_path.display(),
        users.len(),
        conf_path.display()
    ))?;
    Ok(0)
}
