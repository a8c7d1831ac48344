//! `concord-demo [--uncoordinated] [--tick-ms N] [--time-limit-s N] [--uptime-checks heartbeats|app-health]`:
//! the seven-days incident, live. Exits 1 if the outcome is not the one the
//! story expects, the story did not finish, or the run took longer than its
//! time limit (55 s by default: `make demo` plays two runs within two minutes).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use concord_demo::agents::UptimeChecks;
use concord_demo::{Options, run};

/// mimalloc (`concord_alloc`): decisions and previews make many short-lived
/// allocations, and glibc's malloc spent a third of their time.
#[global_allocator]
static GLOBAL: concord_alloc::Alloc = concord_alloc::Alloc;

const USAGE: &str =
    "usage: concord-demo [--uncoordinated] [--tick-ms N] [--time-limit-s N] [--uptime-checks heartbeats|app-health]";

fn options(args: &[String]) -> Result<Options> {
    let root = std::env::current_dir()?;
    let mut opts = Options::new(&root, true);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value; {USAGE}"));
        match arg.as_str() {
            "--uncoordinated" => opts.coordinated = false,
            "--tick-ms" => opts.tick = Duration::from_millis(value()?.parse().context("--tick-ms")?),
            "--time-limit-s" => {
                opts.wall_clock_max = Duration::from_secs(value()?.parse().context("--time-limit-s")?);
            }
            "--uptime-checks" => {
                let v = value()?;
                opts.uptime_checks = UptimeChecks::parse(v)
                    .with_context(|| format!("--uptime-checks {v}: not one of heartbeats, app-health"))?;
            }
            other => bail!("unknown argument `{other}`; {USAGE}"),
        }
    }
    Ok(opts)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = options(&args)?;
    println!(
        "== the seven-days incident, {} (one tick = {} ms; uptime agent checks {}; time limit {} s)",
        if opts.coordinated {
            "through concord"
        } else {
            "uncoordinated: agents act straight on the system"
        },
        opts.tick.as_millis(),
        opts.uptime_checks.name(),
        opts.wall_clock_max.as_secs()
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(run(opts, Arc::new(|line| println!("{line}"))))?;
    println!("{}", report.summary());
    let wrong = report.check();
    if wrong.is_empty() {
        println!("outcome: as expected");
        Ok(())
    } else {
        for w in &wrong {
            println!("UNEXPECTED: {w}");
        }
        std::process::exit(1)
    }
}
