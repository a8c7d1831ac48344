//! `concord-demo [--uncoordinated] [--tick-ms N]`: the seven-days incident,
//! live. Exits 1 if the outcome is not the one the story expects.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use concord_demo::{Options, run};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let coordinated = !args.iter().any(|a| a == "--uncoordinated");
    let root = std::env::current_dir()?;
    let mut opts = Options::new(&root, coordinated);
    if let Some(i) = args.iter().position(|a| a == "--tick-ms")
        && let Some(ms) = args.get(i + 1)
    {
        opts.tick = Duration::from_millis(ms.parse()?);
    }
    println!(
        "== the seven-days incident, {} (one tick = {} ms)",
        if coordinated {
            "through concord"
        } else {
            "uncoordinated: agents act straight on the system"
        },
        opts.tick.as_millis()
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
