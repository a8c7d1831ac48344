//! An executor that keeps `set` values in memory and prints each step it
//! applies. Against `concord dev` (its default executor is `default`):
//!
//! ```text
//! cargo run -p concord-agent --example executor -- nats://127.0.0.1:PORT default
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use concord_agent::{Executor, ExecutorConfig, Step, StepError, StepHandler};
use concord_proto::{Op, ResourcePath, StepKind, Value};
use futures::future::BoxFuture;

#[derive(Default)]
struct Settings(Mutex<BTreeMap<String, Value>>);

impl StepHandler for Settings {
    fn read<'a>(&'a self, path: &'a ResourcePath) -> BoxFuture<'a, Option<Value>> {
        Box::pin(async move { self.0.lock().expect("lock").get(path.as_str()).cloned() })
    }

    fn apply<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let Op::Set(a) = &step.op else {
                return Err("this executor only sets values".into());
            };
            println!("{} {} = {}", step.dispatch.key.text(), step.path(), a.value);
            self.0
                .lock()
                .expect("lock")
                .insert(step.path().to_string(), a.value.clone());
            Ok(())
        })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context("usage: executor URL NAME [SEED_FILE]")?;
    let name = args.next().unwrap_or_else(|| "default".into());
    let mut cfg = ExecutorConfig::new(url, name);
    cfg.nkey_seed_file = args.next().map(Into::into);
    // The pools of `config/examples/world.toml`, which `concord dev` starts from:
    // the coordinator's `expected_before` is checked against them.
    let settings = Settings::default();
    for (path, v) in [
        ("svc/api/pool_size", 50),
        ("svc/worker/pool_size", 20),
        ("svc/billing/pool_size", 20),
    ] {
        settings.0.lock().expect("lock").insert(path.into(), Value::Int(v));
    }
    let _running = Executor::new(cfg)
        .handle(StepKind::Set, Arc::new(settings))
        .start()
        .await?;
    println!("serving; Ctrl-C stops");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
