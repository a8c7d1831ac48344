//! `concord bench`: the live bus beside its physical floors (see `concord_nats::bench`).

use anyhow::Result;
use concord_nats::bench::{BenchOptions, render, run_bench};
use concord_nats::server::find_nats_server;

use super::bus::runtime;
use super::out;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sequential requests per round-trip measurement.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent requesters.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Events in the generated recovery log.
    #[arg(long, default_value_t = 1_000_000)]
    recovery_events: u64,
    /// Skip the durable (fsync every write) runs.
    #[arg(long)]
    skip_durable: bool,
    /// Skip the recovery runs.
    #[arg(long)]
    skip_recovery: bool,
    /// Print the raw figures as JSON too.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark on local nats-server processes it starts itself.
pub fn run(a: Args) -> Result<u8> {
    let bin = find_nats_server(Some(&std::env::current_dir()?))?;
    let opts = BenchOptions {
        round_trips: a.round_trips,
        seconds: a.seconds,
        concurrency: a.concurrency,
        recovery_events: a.recovery_events,
        skip_durable: a.skip_durable,
        skip_recovery: a.skip_recovery,
    };
    let report = runtime()?
        .block_on(run_bench(bin, opts.clone()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    out(&render(&report, &opts))?;
    if a.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    }
    Ok(0)
}
