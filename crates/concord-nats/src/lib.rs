//! concord's runtime: drives the deterministic coordinator core over NATS
//! and JetStream.
//!
//! Layout: [`subjects`] (the bus), [`config`] (`config/concord.toml`),
//! [`wire`] (error replies, operators' queries), [`log`] (the hash-chained,
//! signed log messages), [`store`] (the log stream, KV keys, snapshots),
//! [`runtime`] (the coordinator daemon), [`client`] (what agents, operators
//! and the CLI call), [`server`] (a local `nats-server` child for `concord dev`
//! and the tests), [`worldsync`] (agents' world replicas over the bus).
//!
//! The runtime is thin: it decodes, calls the core, performs the effects the
//! core returns once the log holds them, and records everything. No policy
//! lives here.
//!
//! ```
//! use concord_nats::subjects::Subjects;
//!
//! let s = Subjects::new("default");
//! assert_eq!(s.intent("resource"), "concord.v1.default.intent.resource");
//! ```

pub mod bench;
pub mod client;
pub mod config;
mod follower;
pub mod http;
pub mod log;
pub mod notify;
pub mod permissions;
pub mod runtime;
pub mod server;
pub mod store;
pub mod subjects;
pub mod telemetry;
pub mod wire;
pub mod worldsync;
