//! concord's SDK for agents and executors, in Rust. (Other languages speak
//! the same JSON on the same subjects; see `schema/` and `examples/python/`.)
//!
//! An agent never touches the system it operates: it *proposes* plans, and
//! the coordinator previews each one and admits it, holds it for a human, or
//! rejects it with reasons. Executors apply the admitted steps.
//!
//! Layout: [`agent`] (connect, propose, await a human, re-plan, observe),
//! [`world`] (the read-only world replica, synced over the bus),
//! [`lease`] (a lease held while a guard lives), [`executor`] (serve a kind
//! of step with dedupe, fencing and compare-and-set), [`trace`] (spans and
//! their context in NATS headers), [`error`].
//!
//! What the SDK does for you:
//! - every request is retried with the *same* idempotency key (a plan without
//!   one gets `<lineage>@<version>`), so a retry after a timeout, a reconnect
//!   or a coordinator restart gets the original decision;
//! - `needs_approval` is awaited without polling: the coordinator pushes
//!   notices to `notify.<agent>` once the event is in its log;
//! - a lease guard renews in the background and reports a loss at once;
//! - an executor keeps the highest fencing token per path and the answered
//!   idempotency keys in the KV bucket `CONCORD_FENCING_<name>`, so a
//!   restarted member, or another member of the queue group, still refuses a
//!   stale token and never applies a key twice;
//! - `agent.world()` is a read-only replica of the coordinator's world
//!   document, kept in step over `sync.<agent>` / `world.<agent>` in the
//!   background: it catches up after a reconnect with what it missed, starts
//!   over when the document is rotated, and never writes.
//!
//! - trace context travels in NATS headers (W3C `traceparent`): a proposal
//!   is a span that the coordinator's decision continues, and each step the
//!   coordinator dispatches carries the plan's trace to the executor, whose
//!   span continues it (see [`trace`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use concord_agent::{Agent, AgentConfig, HumanDecision, next_version};
//! use concord_proto::{Verdict, decode_intent};
//!
//! # async fn walkthrough() -> Result<(), Box<dyn std::error::Error>> {
//! // `concord dev` prints the URL; agents connect as themselves.
//! let agent = Agent::connect(AgentConfig::new("nats://127.0.0.1:4222", "resource")).await?;
//! let plan = decode_intent(br#"{
//!   "protocol": 1, "lineage": "raise-pool", "version": 1, "goal": "drain the queue",
//!   "steps": [{ "id": "s1", "kind": "set", "path": "svc/api/pool_size",
//!               "args": { "value": 120 }, "confidence": 0.8,
//!               "compensation": { "mode": "restore" } }]
//! }"#)?;
//! // The world as the coordinator wrote it, from the agent's replica.
//! let world = agent.world().await?;
//! world.await_in_sync(Duration::from_secs(10)).await?;
//! println!("pool size now: {:?}", world.resource("svc/api/pool_size"));
//! let decision = agent.propose(&plan).await?;
//! match decision.verdict {
//!     Verdict::Admit => println!("admitted: the saga runs"),
//!     Verdict::NeedsApproval => {
//!         // Woken by the coordinator's notice, not by polling.
//!         match agent.await_decision(&plan.lineage, plan.version, Duration::from_secs(600)).await? {
//!             HumanDecision::Approved { operator, .. } => println!("{operator} approved"),
//!             other => println!("not approved: {other:?}"),
//!         }
//!     }
//!     Verdict::Reject => {
//!         for r in &decision.reasons {
//!             println!("{}: {}", r.rule, r.message);
//!         }
//!         // Re-plan: version 2 of the same lineage supersedes version 1.
//!         let mut v2 = next_version(&plan);
//!         v2.goal = concord_proto::Text::parse("drain the queue, smaller step").expect("short text");
//!         let _ = agent.propose(&v2).await?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! An executor for `set` steps on an in-memory map:
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use std::sync::{Arc, Mutex};
//! use concord_agent::executor::{Executor, ExecutorConfig, Step, StepError, StepHandler};
//! use concord_proto::{Op, ResourcePath, StepKind, Value};
//! use futures::future::BoxFuture;
//!
//! struct Settings(Mutex<BTreeMap<String, Value>>);
//!
//! impl StepHandler for Settings {
//!     fn read<'a>(&'a self, path: &'a ResourcePath) -> BoxFuture<'a, Option<Value>> {
//!         Box::pin(async move { self.0.lock().unwrap().get(path.as_str()).cloned() })
//!     }
//!     fn apply<'a>(&'a self, step: &'a Step) -> BoxFuture<'a, Result<(), StepError>> {
//!         Box::pin(async move {
//!             let Op::Set(args) = &step.op else { return Err("only `set`".into()) };
//!             self.0.lock().unwrap().insert(step.path().to_string(), args.value.clone());
//!             Ok(())
//!         })
//!     }
//! }
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let running = Executor::new(ExecutorConfig::new("nats://127.0.0.1:4222", "default"))
//!     .handle(StepKind::Set, Arc::new(Settings(Mutex::new(BTreeMap::new()))))
//!     .start()
//!     .await?;
//! # drop(running);
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod error;
pub mod executor;
pub mod lease;
pub mod trace;
pub mod world;

pub use agent::{Agent, AgentConfig, HumanDecision, SagaEnd, Traced, idempotency_key, next_version};
pub use error::{AgentError, ExecutorError};
pub use executor::{Executor, ExecutorConfig, Step, StepError, StepHandler};
pub use lease::{LeaseError, LeaseGuard, LeaseLost};
pub use world::{Progress, ReplicaStats, WorldReplica};
