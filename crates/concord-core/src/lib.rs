//! concord's deterministic heart: the world model, previews, invariants and
//! verdicts. No I/O, no clock, no randomness: the same inputs give the same
//! preview, byte for byte, in every process.
//!
//! Layout: [`world`] (the world model and change-set states), [`apply`]
//! (what each kind of step does), [`policy`] (rules and their settings),
//! [`preview`] (diff, invariants over every step prefix, verdict),
//! [`plandiff`] (versions of a plan and scope expansion), [`report`] (the
//! human-readable rendering), [`coordinator`] (the state machine) and
//! [`worlddoc`] (the world as an Automerge document, its sync and replicas).
//!
//! ```
//! use concord_core::{policy::Policy, preview::{preview, PreviewInput}, world::World};
//! use concord_proto::{decode_intent, Verdict};
//!
//! let world = World::from_toml_str(r#"
//!     [resources]
//!     "svc/api/pool_size" = 50
//! "#).unwrap();
//! let policy = Policy::from_toml_str(r#"
//!     [defaults]
//!     autonomy = "bounded"
//!     [[rules.ceiling]]
//!     id = "ceiling.pool_size"
//!     paths = ["svc/*/pool_size"]
//!     approve_above = 200
//!     reject_above = 1000
//! "#).unwrap();
//! let intent = decode_intent(br#"{
//!     "protocol": 1, "lineage": "pool", "version": 1, "goal": "drain the queue",
//!     "steps": [{ "id": "s1", "kind": "set", "path": "svc/api/pool_size",
//!                 "args": { "value": 500 }, "confidence": 0.9,
//!                 "compensation": { "mode": "restore" } }]
//! }"#).unwrap();
//! let p = preview(PreviewInput { world: &world, intent: &intent, agent: "resource", policy: &policy, previous: None });
//! assert_eq!(p.verdict, Verdict::NeedsApproval);
//! assert_eq!(p.reasons[0].rule, "ceiling.pool_size");
//! ```

pub mod apply;
pub mod budget;
pub mod celindex;
mod celmemo;
mod celx;
pub mod coordinator;
pub mod indexes;
pub mod plandiff;
pub mod policy;
pub mod preview;
pub mod report;
mod rules;
pub mod world;
pub mod worlddoc;
