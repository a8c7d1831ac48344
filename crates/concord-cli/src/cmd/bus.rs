//! What every live command shares: where the bus is and who is speaking.

use std::path::PathBuf;

use anyhow::{Context, Result};
use concord_nats::client::ConcordClient;
use concord_nats::config::Credentials;

/// Where to reach the coordinator, and as whom.
#[derive(Debug, Clone, clap::Args)]
pub struct Bus {
    /// NATS URL(s), comma-separated.
    #[arg(long, env = "CONCORD_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The coordinated domain.
    #[arg(long, env = "CONCORD_DOMAIN", default_value = "default")]
    pub domain: String,
    /// A file with your nkey seed (as `concord nats-config` writes them).
    #[arg(long, env = "CONCORD_CREDS")]
    pub creds: Option<PathBuf>,
    /// User name (with --password).
    #[arg(long, env = "CONCORD_USER")]
    pub user: Option<String>,
    /// Password.
    #[arg(long, env = "CONCORD_PASSWORD")]
    pub password: Option<String>,
    /// Your identity on the bus (the last token of the subjects you use;
    /// under permissions your credentials allow only your own).
    #[arg(long = "as", env = "CONCORD_AS", default_value = "operator")]
    pub who: String,
}

impl Bus {
    /// Connects; replies come to a per-user inbox prefix.
    pub async fn connect(&self) -> Result<ConcordClient> {
        let creds = Credentials {
            nkey_seed_file: self.creds.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
        };
        let inbox = format!("_INBOX_{}", self.who);
        ConcordClient::connect(&self.nats, &creds, &self.domain, Some(&inbox))
            .await
            .with_context(|| format!("connecting to {}", self.nats))
    }
}

/// A tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Logs to stderr, `RUST_LOG` or `info`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
