//! The coordinator benchmark's workload, shared by `benches/coordinator.rs`
//! and the callgrind driver `examples/prof_coord.rs` so both measure the same
//! world, policy and plans. Each includes it with `#[path]`.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use concord_core::coordinator::{Effect, Reply};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_proto::{Intent, Value, Verdict, decode_intent};
use serde_json::json;

/// Counts live heap bytes, to measure memory per in-flight plan.
pub struct Counting;
pub static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only
// counts sizes; the one `unsafe` in the workspace, allowed for this bench.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
pub static GLOBAL: Counting = Counting;

pub const SERVICES: usize = 40;
pub const DAY_MS: u64 = 86_400_000 * 2;

pub fn world(paths: usize) -> World {
    let mut w = World::default();
    let p = |s: String| concord_proto::ResourcePath::parse(&s).unwrap();
    for i in 0..SERVICES {
        w.resources
            .insert(p(format!("svc/svc-{i:02}/pool_size")), Value::Int(10));
        w.resources.insert(p(format!("svc/svc-{i:02}/replicas")), Value::Int(2));
    }
    w.resources
        .insert(p("db/primary/max_connections".into()), Value::Int(1250));
    let mut n = 0;
    while w.resources.len() < paths {
        for k in ["cpu", "mem", "disk", "zone", "kernel"] {
            w.resources.insert(p(format!("fleet/node-{n:06}/{k}")), Value::Int(1));
        }
        n += 1;
    }
    w
}

pub fn plan(lineage: &str, steps: serde_json::Value) -> Intent {
    let j = json!({ "protocol": 1, "lineage": lineage, "version": 1, "goal": "bench", "steps": steps });
    decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap()
}

pub fn node_plan(i: usize) -> Intent {
    let steps: Vec<_> = ["cpu", "mem", "disk", "zone", "kernel"]
        .iter()
        .enumerate()
        .map(|(s, k)| {
            json!({ "id": format!("s{s}"), "kind": "set", "path": format!("fleet/node-{i:06}/{k}"),
                    "args": { "value": 2 }, "confidence": 0.9, "compensation": { "mode": "restore" } })
        })
        .collect();
    plan(&format!("node-{i}"), json!(steps))
}

pub fn service_plan(lineage: &str) -> Intent {
    let set = |id: &str, path: &str, v: i64| {
        json!({ "id": id, "kind": "set", "path": path, "args": { "value": v }, "confidence": 0.9,
                "compensation": { "mode": "restore" } })
    };
    let scale = |id: &str, path: &str, r: u32| {
        json!({ "id": id, "kind": "scale", "path": path, "args": { "replicas": r }, "confidence": 0.9,
                "compensation": { "mode": "restore" } })
    };
    plan(
        lineage,
        json!([
            set("s1", "svc/svc-00/pool_size", 12),
            scale("s2", "svc/svc-00", 3),
            set("s3", "svc/svc-01/pool_size", 12),
            scale("s4", "svc/svc-01", 3),
            set("s5", "svc/svc-02/pool_size", 11),
        ]),
    )
}

pub fn policy() -> Policy {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/policy.toml")).unwrap();
    // The fleet agent acts alone in this bench.
    let text = text.replace(
        "[defaults]\nautonomy = \"propose\"",
        "[defaults]\nautonomy = \"bounded\"",
    );
    Policy::from_toml_str(&text).unwrap()
}

pub fn verdict(fx: &[Effect]) -> Verdict {
    fx.iter()
        .find_map(|e| match e {
            Effect::Reply {
                reply: Reply::Decision(d),
                ..
            } => Some(d.verdict),
            _ => None,
        })
        .unwrap()
}
