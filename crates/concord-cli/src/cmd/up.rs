//! `concord up` (the daemon against any NATS server with JetStream) and
//! `concord dev` (a local nats-server child in a temporary store, and the
//! coordinator on it, for a laptop).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use concord_nats::config::RuntimeConfig;
use concord_nats::runtime::{Health, load_policy, load_world, run};
use concord_nats::server::{ServerOptions, ServerProcess, find_nats_server};

use super::bus::{init_tracing, runtime};

/// `concord up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// NATS URL(s), comma-separated (overrides the configuration's).
    #[arg(long)]
    nats: Option<String>,
    /// The configuration file.
    #[arg(long, default_value = "config/concord.toml")]
    config: PathBuf,
    /// Serve /metrics, /livez and /readyz here (overrides the configuration's).
    #[arg(long)]
    metrics: Option<String>,
}

/// `concord dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The configuration file (defaults if missing).
    #[arg(long, default_value = "config/concord.toml")]
    config: PathBuf,
    /// The client port of the local server (a free one if unset).
    #[arg(long)]
    port: Option<u16>,
    /// Make the log's server sync every write to disk (`sync_interval: always`).
    #[arg(long)]
    sync_always: bool,
    /// Keep the server's store in this folder (a temporary one if unset).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Serve /metrics, /livez and /readyz here.
    #[arg(long)]
    metrics: Option<String>,
}

fn load(config: &std::path::Path, must_exist: bool) -> Result<RuntimeConfig> {
    if !must_exist && !config.exists() {
        return Ok(RuntimeConfig::default());
    }
    Ok(RuntimeConfig::load(config)?)
}

async fn serve(cfg: RuntimeConfig) -> Result<()> {
    // Read the policy and world now, so a typo fails before anything starts.
    load_policy(&cfg)?;
    load_world(&cfg)?;
    let health = Arc::new(Health::default());
    if let Some(addr) = &cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        let handle = concord_nats::http::install_metrics();
        tokio::spawn(concord_nats::http::serve(listener, handle, health.clone()));
        eprintln!("concord: metrics and health on http://{addr}/metrics, /livez, /readyz");
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("concord: stopping");
    };
    run(cfg, health, shutdown).await?;
    Ok(())
}

/// Runs `concord up`.
pub fn up(a: UpArgs) -> Result<u8> {
    init_tracing();
    let mut cfg = load(&a.config, true)?;
    if let Some(n) = a.nats {
        cfg.nats = n.split(',').map(str::to_string).collect();
    }
    if a.metrics.is_some() {
        cfg.metrics_listen = a.metrics;
    }
    runtime()?.block_on(serve(cfg))?;
    Ok(0)
}

/// Runs `concord dev`.
pub fn dev(a: DevArgs) -> Result<u8> {
    init_tracing();
    let mut cfg = load(&a.config, false)?;
    let bin = find_nats_server(Some(&std::env::current_dir()?))?;
    let config = a
        .sync_always
        .then(|| "jetstream { sync_interval: always }\n".to_string());
    let server = ServerProcess::start(ServerOptions {
        bin: Some(bin),
        config,
        port: a.port,
        dir: a.store,
        ..ServerOptions::default()
    })?;
    cfg.nats = vec![server.url()];
    if a.metrics.is_some() {
        cfg.metrics_listen = a.metrics;
    }
    println!("concord dev: NATS with JetStream at {}", server.url());
    println!(
        "concord dev: agents use CONCORD_NATS={} (domain `{}`)",
        server.url(),
        cfg.domain
    );
    println!(
        "concord dev: store in {}; Ctrl-C stops the coordinator and the server",
        server.dir().display()
    );
    let result = runtime()?.block_on(serve(cfg));
    drop(server);
    result?;
    Ok(0)
}
