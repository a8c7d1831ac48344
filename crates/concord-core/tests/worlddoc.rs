//! The world document: written by the coordinator alone, deterministic,
//! replicated to read-only replicas over the sync protocol, rotated on a
//! schedule.

use concord_core::coordinator::{Config, Coordinator, Effect, Event, Input, Record};
use concord_core::policy::Policy;
use concord_core::world::World;
use concord_core::worlddoc::{
    Frame, FrameKind, Identity, ReplicaEvent, SyncError, SyncReceipt, WorldDocConfig, WorldReplica, coordinator_actor,
};
use concord_proto::coord::{DispatchKey, Phase, StepOutcome, StepResult};
use concord_proto::{Observation, ObservationKind, ResourcePath, Value, decode_intent};
use serde_json::json;

const WORLD: &str = r#"
[resources]
"svc/api/pool_size" = 50
"svc/api/replicas" = 4
"svc/web/pool_size" = 20
"db/primary/max_connections" = 1000
[services.api]
path = "svc/api"
depends_on = ["db/primary"]
"#;

const POLICY: &str = "[defaults]\nautonomy = \"bounded\"\n";

fn path(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

fn coordinator_with(world: World, config: Config) -> Coordinator {
    Coordinator::with_identity(
        config,
        Policy::from_toml_str(POLICY).unwrap(),
        world,
        Identity {
            coordinator: "c1".into(),
            incarnation: 1,
        },
        1_000,
    )
}

fn coordinator() -> Coordinator {
    coordinator_with(World::from_toml_str(WORLD).unwrap(), Config::default())
}

fn observe(p: &str, kind: ObservationKind, value: Value) -> Input {
    Input::Observe {
        agent: "probe".into(),
        observation: Observation {
            protocol: 1,
            path: path(p),
            kind,
            value,
            observed_at_ms: None,
        },
    }
}

fn metric(p: &str, v: f64) -> Input {
    observe(p, ObservationKind::Metric, Value::Float(v))
}

fn set_plan(lineage: &str, p: &str, v: i64) -> Input {
    let j = json!({ "protocol": 1, "lineage": lineage, "version": 1, "goal": "g",
        "steps": [{ "id": "s1", "kind": "set", "path": p, "args": { "value": v }, "confidence": 0.9,
                    "compensation": { "mode": "restore" } }] });
    Input::Intent {
        request: 1,
        agent: "resource".into(),
        intent: decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap(),
    }
}

fn dispatched(fx: &[Effect]) -> Vec<DispatchKey> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Dispatch(d) => Some(d.key.clone()),
            _ => None,
        })
        .collect()
}

fn outcome(key: &DispatchKey, result: StepResult) -> Input {
    Input::Outcome {
        executor: "x".into(),
        outcome: StepOutcome {
            key: key.clone(),
            result,
        },
    }
}

/// Runs one set plan to success; returns the time after it.
fn run_set(c: &mut Coordinator, now: u64, lineage: &str, p: &str, v: i64) -> u64 {
    let fx = c.handle(now, set_plan(lineage, p, v));
    let keys = dispatched(&fx);
    assert_eq!(keys.len(), 1, "{fx:?}");
    c.handle(now + 1, outcome(&keys[0], StepResult::Succeeded));
    now + 2
}

// ---- writes ---------------------------------------------------------------------

#[test]
fn step_successes_write_resources_and_provenance() {
    let mut c = coordinator();
    let now = run_set(&mut c, 10_000, "pool", "svc/api/pool_size", 60);
    let d = c.world_doc();
    assert_eq!(d.resource("svc/api/pool_size"), Some(Value::Int(60)));
    let p = d.provenance("svc/api/pool_size").unwrap();
    assert_eq!(
        (
            p.lineage.as_str(),
            p.version,
            p.step.as_str(),
            p.phase,
            p.agent.as_str(),
            p.at_ms
        ),
        ("pool", 1, "s1", Phase::Do, "resource", 10_001)
    );
    assert_eq!(d.provenance("svc/web/pool_size"), None);
    // The materialized view and the document agree.
    d.check_view(c.world()).unwrap();

    // A failing second step compensates the first: the document records the undo.
    let j = json!({ "protocol": 1, "lineage": "two", "version": 1, "goal": "g", "steps": [
        { "id": "a", "kind": "set", "path": "svc/web/pool_size", "args": { "value": 25 }, "confidence": 0.9,
          "compensation": { "mode": "restore" } },
        { "id": "b", "kind": "set", "path": "svc/api/replicas", "args": { "value": 5 }, "confidence": 0.9,
          "compensation": { "mode": "restore" } } ] });
    let fx = c.handle(
        now,
        Input::Intent {
            request: 2,
            agent: "tuner".into(),
            intent: decode_intent(&serde_json::to_vec(&j).unwrap()).unwrap(),
        },
    );
    let a = dispatched(&fx)[0].clone();
    let b = dispatched(&c.handle(now + 1, outcome(&a, StepResult::Succeeded)))[0].clone();
    assert_eq!(c.world_doc().resource("svc/web/pool_size"), Some(Value::Int(25)));
    let undo = dispatched(&c.handle(
        now + 2,
        outcome(
            &b,
            StepResult::Failed {
                reason: concord_proto::Short::parse("no").unwrap(),
            },
        ),
    ))[0]
        .clone();
    c.handle(now + 3, outcome(&undo, StepResult::Succeeded));
    let d = c.world_doc();
    assert_eq!(d.resource("svc/web/pool_size"), Some(Value::Int(20)));
    let p = d.provenance("svc/web/pool_size").unwrap();
    assert_eq!(
        (p.lineage.as_str(), p.phase, p.agent.as_str()),
        ("two", Phase::Undo, "tuner")
    );
    d.check_view(c.world()).unwrap();
}

#[test]
fn observations_keep_a_bounded_series_and_write_beyond_the_deadband() {
    let config = Config {
        observation_points_max: 10,
        observation_retention_ms: 60_000,
        world_doc: WorldDocConfig {
            metric_deadband_rel: 0.1,
            observation_refresh_ms: 0,
            ..WorldDocConfig::default()
        },
        ..Config::default()
    };
    let mut c = coordinator_with(World::from_toml_str(WORLD).unwrap(), config);
    let changes = c.world_doc().change_count();
    // 100 within 10% of 100: one write (the first).
    for i in 0..30u64 {
        c.handle(2_000 + i * 1_000, metric("svc/api/queue", 100.0 + (i % 5) as f64));
    }
    assert_eq!(c.world_doc().change_count(), changes + 1);
    let s = c.series(&path("svc/api/queue")).unwrap();
    assert_eq!(s.points.len(), 10, "at most observation_points_max points");
    assert_eq!(s.latest.value, Value::Float(104.0));
    assert_eq!(s.written.as_ref().unwrap().value, Value::Float(100.0));
    assert_eq!(c.observation(&path("svc/api/queue")).unwrap().at_ms, 31_000);
    let o = c.world_doc().observation("svc/api/queue").unwrap();
    assert_eq!(
        (o.value, o.at_ms, o.kind),
        (Value::Float(100.0), 2_000, ObservationKind::Metric)
    );

    // Beyond the band: written.
    c.handle(40_000, metric("svc/api/queue", 120.0));
    assert_eq!(c.world_doc().change_count(), changes + 2);
    assert_eq!(
        c.world_doc().observation("svc/api/queue").unwrap().value,
        Value::Float(120.0)
    );
    // Retention: a report long after drops every older point.
    c.handle(200_000, metric("svc/api/queue", 121.0));
    assert_eq!(c.series(&path("svc/api/queue")).unwrap().points.len(), 1);

    // Health words: any change is written, a repeat is not.
    let health = |w: &str| observe("svc/api/health/app", ObservationKind::AppHealth, Value::Str(w.into()));
    let before = c.world_doc().change_count();
    for (t, w) in [
        (201_000, "ok"),
        (202_000, "ok"),
        (203_000, "failing"),
        (204_000, "failing"),
    ] {
        c.handle(t, health(w));
    }
    assert_eq!(c.world_doc().change_count(), before + 2);
    let o = c.world_doc().observation("svc/api/health/app").unwrap();
    assert_eq!(
        (o.value, o.agent.as_str(), o.kind),
        (Value::Str("failing".into()), "probe", ObservationKind::AppHealth)
    );
}

#[test]
fn the_same_inputs_give_the_same_document_bytes() {
    let run = || {
        let mut c = coordinator();
        let now = run_set(&mut c, 10_000, "pool", "svc/api/pool_size", 60);
        for i in 0..20u64 {
            c.handle(now + i * 60_000, metric("svc/api/queue", (i * i) as f64));
        }
        (c.world_doc().save(), c.state_digest())
    };
    let (a, da) = run();
    let (b, db) = run();
    assert_eq!(a, b);
    assert_eq!(da, db);
}

/// Held writes applied a few at a time (as the runtime does between
/// batches) make the document that applying them all at once makes.
#[test]
fn held_writes_applied_a_few_at_a_time_make_the_same_document() {
    let mut chunked = coordinator();
    let mut at_once = coordinator();
    let mut held_seen = 0;
    for i in 0..30u64 {
        let now = 10_000 + i * 60_000;
        for c in [&mut chunked, &mut at_once] {
            if i % 3 == 0 {
                run_set(c, now, &format!("pool-{i}"), "svc/api/pool_size", 50 + i as i64);
            }
            // Two series, each moving well past the deadband: two writes.
            c.handle(now + 5, metric("svc/api/queue", ((i + 1) * 100) as f64));
            c.handle(now + 5, metric("svc/api/latency", ((i + 1) * 1000) as f64));
        }
        let left = chunked.world_doc_mut().apply_held(1);
        held_seen = held_seen.max(left);
    }
    assert!(held_seen > 0, "every write was applied at once: nothing was held");
    assert_eq!(chunked.world_doc().save(), at_once.world_doc().save());
    assert_eq!(chunked.state_digest(), at_once.state_digest());
    assert_eq!(chunked.world_doc_mut().apply_held(usize::MAX), 0);
}

/// Writes are applied to Automerge when the document is read. A coordinator
/// whose document is read after every input and one read only at the end
/// hold the same bytes, count the same changes, and rotate at the same input
/// into a fresh document holding what the retired one held.
#[test]
fn writes_applied_when_read_make_the_document_immediate_writes_make() {
    let config = Config {
        world_doc: WorldDocConfig {
            rotate_changes_max: 9,
            ..WorldDocConfig::default()
        },
        ..Config::default()
    };
    let mut eager = coordinator_with(World::from_toml_str(WORLD).unwrap(), config.clone());
    let mut lazy = coordinator_with(World::from_toml_str(WORLD).unwrap(), config);
    let health = |w: &str| observe("svc/api/health/app", ObservationKind::AppHealth, Value::Str(w.into()));
    let mut rotations = 0;
    for i in 0..40u64 {
        let now = 10_000 + i * 1_000;
        let before = (eager.world_doc().observations(), eager.world_doc().provenances());
        let epoch = eager.world_doc().epoch();
        match i % 8 {
            0 => {
                run_set(
                    &mut eager,
                    now,
                    &format!("pool-{i}"),
                    "svc/api/pool_size",
                    50 + i as i64,
                );
                run_set(&mut lazy, now, &format!("pool-{i}"), "svc/api/pool_size", 50 + i as i64);
            }
            1 | 5 => {
                let w = if i % 16 < 8 { "degraded" } else { "ok" };
                eager.handle(now, health(w));
                lazy.handle(now, health(w));
            }
            // Two values of one series at the same instant: the second write
            // changes the value and leaves `at_ms` as it is.
            2 => {
                for v in [1.0, 100.0] {
                    eager.handle(now, metric("svc/api/queue", v * i as f64));
                    lazy.handle(now, metric("svc/api/queue", v * i as f64));
                }
            }
            3 if i == 19 => {
                eager.incarnate(2).unwrap();
                lazy.incarnate(2).unwrap();
            }
            _ => {
                eager.handle(now, metric("svc/api/latency", (i * i) as f64));
                lazy.handle(now, metric("svc/api/latency", (i * i) as f64));
            }
        }
        // Reading applies every write: the eager document is always built.
        let changes = eager.world_doc().automerge().get_changes(&[]).len() as u64;
        assert_eq!(eager.world_doc().change_count(), changes, "input {i}");
        assert_eq!(lazy.world_doc().change_count(), changes, "input {i}");
        if eager.world_doc().epoch() != epoch {
            rotations += 1;
            let d = eager.world_doc();
            // What the retired document held, but for what this input wrote.
            let obs = d.observations();
            for (p, o) in &obs {
                assert!(before.0.get(p) == Some(o) || o.at_ms >= now, "input {i}: {p}");
            }
            for p in before.0.keys() {
                assert!(obs.contains_key(p), "input {i}: {p}");
            }
            // Provenance as before, but for what this input's step wrote.
            let world = d.world();
            let after = d.provenances();
            for (p, by) in &before.1 {
                if world.resources.contains_key(p) {
                    assert!(
                        after.get(p).is_some_and(|a| a == by || a.at_ms >= now),
                        "input {i}: {p}"
                    );
                }
            }
            for (p, by) in &after {
                assert!(before.1.get(p) == Some(by) || by.at_ms >= now, "input {i}: {p}");
            }
        }
    }
    assert!(rotations >= 2, "{rotations} rotations");
    assert_eq!(lazy.world_doc().save(), eager.world_doc().save());
    assert_eq!(lazy.state_digest(), eager.state_digest());
}

#[test]
fn an_incarnation_writes_under_a_new_actor_and_never_an_older_one() {
    let mut c = coordinator();
    c.handle(2_000, metric("svc/api/queue", 1.0));
    assert_eq!(c.world_doc().automerge().get_actor(), &coordinator_actor("c1", 1, 0));
    c.incarnate(2).unwrap();
    c.incarnate(2).unwrap();
    assert!(c.incarnate(1).is_err());
    c.handle(3_000, metric("svc/api/queue", 10.0));
    let doc = c.world_doc().automerge();
    let last = doc.get_last_local_change().unwrap();
    assert_eq!(last.actor_id(), &coordinator_actor("c1", 2, 0));
}

#[test]
fn recovery_from_genesis_and_log_rebuilds_the_same_document() {
    // A first process: genesis, incarnation 1, some inputs; then a restart
    // (incarnation 2) and more inputs. The log holds all of it.
    let policy = Policy::from_toml_str(POLICY).unwrap();
    let genesis = Record::Genesis(Box::new(concord_core::coordinator::Genesis {
        record_version: concord_core::coordinator::RECORD_VERSION,
        now_ms: 500,
        coordinator: "c1".into(),
        config: Config::default(),
        policy: policy.config.clone(),
        policy_hash: policy.hash.clone(),
        world: World::from_toml_str(WORLD).unwrap(),
    }));
    let Record::Genesis(g) = &genesis else { unreachable!() };
    let mut live = Coordinator::from_genesis(g).unwrap();
    let mut log: Vec<Record> = vec![genesis.clone()];
    let feed = |c: &mut Coordinator, log: &mut Vec<Record>, now: u64, input: Input| {
        let events = c
            .handle(now, input.clone())
            .into_iter()
            .filter_map(|e| match e {
                Effect::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        log.push(Record::Input {
            now_ms: now,
            input: Box::new(input),
            events,
        });
    };
    feed(&mut live, &mut log, 1_000, metric("svc/api/queue", 5.0));
    let fx = live.handle(2_000, set_plan("pool", "svc/api/pool_size", 60));
    let key = dispatched(&fx)[0].clone();
    log.push(Record::Input {
        now_ms: 2_000,
        input: Box::new(set_plan("pool", "svc/api/pool_size", 60)),
        events: fx
            .into_iter()
            .filter_map(|e| match e {
                Effect::Event(e) => Some(e),
                _ => None,
            })
            .collect(),
    });
    // Restart: a new incarnation is logged, then the process goes on.
    live.incarnate(2).unwrap();
    log.push(Record::Incarnation {
        now_ms: 3_000,
        coordinator: "c1".into(),
        incarnation: 2,
        core_version: "test".into(),
    });
    feed(&mut live, &mut log, 4_000, outcome(&key, StepResult::Succeeded));
    feed(&mut live, &mut log, 5_000, metric("svc/api/queue", 50.0));

    // Rebuild from the log alone.
    let mut rebuilt: Option<Coordinator> = None;
    for r in &log {
        match r {
            Record::Genesis(g) => rebuilt = Some(Coordinator::from_genesis(g).unwrap()),
            Record::Incarnation { incarnation, .. } => rebuilt.as_mut().unwrap().incarnate(*incarnation).unwrap(),
            Record::Policy { .. } | Record::Notice { .. } => {}
            Record::Input { now_ms, input, events } => {
                let c = rebuilt.as_mut().unwrap();
                let fx = c.recover_input(*now_ms, (**input).clone(), events);
                assert_eq!(concord_core::coordinator::first_divergence(events, &fx), None);
            }
        }
    }
    let rebuilt = rebuilt.unwrap();
    assert_eq!(rebuilt.world_doc().save(), live.world_doc().save());
    assert_eq!(rebuilt.state_digest(), live.state_digest());
    // The changes after the restart carry incarnation 2's actor.
    let actors: Vec<_> = live
        .world_doc()
        .automerge()
        .get_changes(&[])
        .iter()
        .map(|c| c.actor_id().clone())
        .collect();
    assert!(actors.contains(&coordinator_actor("c1", 1, 0)));
    assert!(actors.contains(&coordinator_actor("c1", 2, 0)));
}

#[test]
fn a_snapshot_keeps_the_document_and_refuses_a_disagreeing_view() {
    let mut c = coordinator();
    run_set(&mut c, 10_000, "pool", "svc/api/pool_size", 60);
    let bytes = c.snapshot().unwrap();
    let restored = Coordinator::restore(&bytes).unwrap();
    assert_eq!(restored.world_doc().save(), c.world_doc().save());
    assert_eq!(
        restored.world_doc().automerge().get_actor(),
        &coordinator_actor("c1", 1, 0)
    );
    // A snapshot whose world says something else than its document is refused.
    let mut j: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    j["world"]["resources"]["svc/api/pool_size"] = json!(61);
    let err = Coordinator::restore(&serde_json::to_vec(&j).unwrap()).unwrap_err();
    assert!(err.to_string().contains("svc/api/pool_size"), "{err}");
}

// ---- sync -----------------------------------------------------------------------

/// Frames moved between the coordinator and replicas, with byte counts.
#[derive(Default)]
struct Wire {
    frames: usize,
    bytes: usize,
}

/// Exchanges frames between the coordinator and `r` until both are idle.
fn pump(c: &mut Coordinator, r: &mut WorldReplica, first: Option<Vec<u8>>, wire: &mut Wire) {
    let peer = r.agent().to_string();
    let mut to_coord = first;
    for _ in 0..100 {
        if let Some(f) = to_coord.take() {
            wire.frames += 1;
            wire.bytes += f.len();
            c.world_doc_mut().sync_receive(&peer, &f).unwrap();
        }
        let out = c.world_doc_mut().sync_generate(&peer).unwrap();
        if let Some(f) = &out {
            wire.frames += 1;
            wire.bytes += f.len();
            r.receive(f).unwrap();
        }
        to_coord = r.generate();
        if out.is_none() && to_coord.is_none() {
            return;
        }
    }
    panic!("sync did not settle in 100 rounds");
}

fn caught_up(c: &Coordinator, r: &WorldReplica) -> bool {
    r.heads() == c.world_doc().heads()
}

#[test]
fn a_replica_catches_up_and_reads_the_world() {
    let mut c = coordinator();
    let now = run_set(&mut c, 10_000, "pool", "svc/api/pool_size", 60);
    c.handle(now, metric("svc/api/queue", 7.0));
    let mut r = WorldReplica::new("uptime");
    let hello = r.hello();
    pump(&mut c, &mut r, Some(hello), &mut Wire::default());
    assert!(caught_up(&c, &r));
    assert_eq!(r.world(), c.world_doc().world());
    assert_eq!(r.world().resources, c.world().resources);
    assert_eq!(
        r.observation("svc/api/queue"),
        c.world_doc().observation("svc/api/queue")
    );
    assert_eq!(
        r.provenance("svc/api/pool_size"),
        c.world_doc().provenance("svc/api/pool_size")
    );
    assert_eq!(r.resource("svc/api/pool_size"), Some(Value::Int(60)));
    assert_eq!(r.scan_prefix("svc/api/").len(), 2);
    // Each later write reaches it incrementally.
    c.handle(now + 60_000, metric("svc/api/queue", 70.0));
    pump(&mut c, &mut r, None, &mut Wire::default());
    assert!(caught_up(&c, &r));
    assert_eq!(r.observation("svc/api/queue").unwrap().value, Value::Float(70.0));
}

/// The bytes a replica needs to catch up after missing `missed` writes to a
/// document of `resources` paths.
fn catch_up_bytes(resources: usize, missed: u64) -> (Wire, usize) {
    let mut world = World::from_toml_str(WORLD).unwrap();
    for i in 0..resources {
        world
            .resources
            .insert(path(&format!("fleet/node-{i:06}/cpu")), Value::Int(i as i64));
    }
    let mut c = coordinator_with(world, Config::default());
    let mut r = WorldReplica::new("uptime");
    let hello = r.hello();
    pump(&mut c, &mut r, Some(hello), &mut Wire::default());
    // The replica goes offline; the coordinator keeps writing.
    for i in 0..missed {
        c.handle(2_000 + i * 60_000, metric("svc/api/queue", (10 * (i + 1)) as f64));
    }
    // The coordinator's next frame is lost (the replica is away).
    let _lost = c.world_doc_mut().sync_generate("uptime").unwrap();
    let mut wire = Wire::default();
    let hello = r.hello();
    pump(&mut c, &mut r, Some(hello), &mut wire);
    assert!(caught_up(&c, &r));
    assert_eq!(
        r.observation("svc/api/queue"),
        c.world_doc().observation("svc/api/queue")
    );
    (wire, c.world_doc().save().len())
}

#[test]
fn catching_up_costs_what_was_missed_not_the_document_size() {
    let (small_10, small_doc) = catch_up_bytes(1_000, 10);
    let (big_10, big_doc) = catch_up_bytes(10_000, 10);
    let (big_100, _) = catch_up_bytes(10_000, 100);
    eprintln!(
        "catch-up bytes: 10 missed on {small_doc} B doc: {} B in {} frames; 10 missed on {big_doc} B doc: {} B; 100 missed: {} B",
        small_10.bytes, small_10.frames, big_10.bytes, big_100.bytes
    );
    // A 10x larger document costs (nearly) the same to catch up on.
    assert!(big_doc > 5 * small_doc, "the big document is big");
    assert!(
        big_10.bytes <= small_10.bytes + small_10.bytes / 4,
        "{} vs {}",
        big_10.bytes,
        small_10.bytes
    );
    // ... far less than the document.
    assert!(big_10.bytes * 20 < big_doc, "{} vs {big_doc}", big_10.bytes);
    // Ten times as many missed writes cost more, about in proportion.
    assert!(
        big_100.bytes > 3 * big_10.bytes,
        "{} vs {}",
        big_100.bytes,
        big_10.bytes
    );
    assert!(
        big_100.bytes < 15 * big_10.bytes,
        "{} vs {}",
        big_100.bytes,
        big_10.bytes
    );
}

/// A deterministic generator for the lossy network.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[test]
fn replicas_converge_over_a_lossy_reordering_network() {
    for seed in 1..=8u64 {
        let mut rng = Lcg(seed);
        let mut c = coordinator();
        let mut replicas: Vec<WorldReplica> = ["a", "b", "c"].iter().map(|a| WorldReplica::new(a)).collect();
        // In-flight frames: (to coordinator?, replica index, bytes).
        let mut net: Vec<(bool, usize, Vec<u8>)> = Vec::new();
        for (i, r) in replicas.iter_mut().enumerate() {
            net.push((true, i, r.hello()));
        }
        let mut now = 2_000;
        for round in 0..400u64 {
            // The coordinator writes now and then.
            if round < 300 && rng.chance(30) {
                now += 60_000;
                c.handle(now, metric("svc/api/queue", (rng.next() % 1_000) as f64));
            }
            // Replicas go offline and come back with a hello (a reconnect or a timeout).
            for (i, r) in replicas.iter_mut().enumerate() {
                if rng.chance(3) {
                    net.push((true, i, r.hello()));
                }
            }
            for (i, r) in replicas.iter().enumerate() {
                if let Some(f) = c.world_doc_mut().sync_generate(r.agent()).unwrap() {
                    net.push((false, i, f));
                }
            }
            // Deliver some frames in a shuffled order; lose or duplicate a few.
            let mut next = Vec::new();
            while !net.is_empty() {
                let k = (rng.next() as usize) % net.len();
                let (to_coord, i, f) = net.swap_remove(k);
                if rng.chance(10) {
                    continue; // lost
                }
                if rng.chance(5) {
                    next.push((to_coord, i, f.clone())); // delivered again later
                }
                if rng.chance(20) {
                    next.push((to_coord, i, f)); // delayed
                    continue;
                }
                if to_coord {
                    let peer = replicas[i].agent().to_string();
                    // Lost, late or repeated frames are never mistaken for writes or divergence.
                    c.world_doc_mut().sync_receive(&peer, &f).unwrap();
                } else {
                    replicas[i].receive(&f).unwrap();
                    if let Some(reply) = replicas[i].generate() {
                        next.push((true, i, reply));
                    }
                }
            }
            net = next;
        }
        let stats = c.world_doc().sync_stats();
        assert_eq!((stats.changes_refused, stats.diverged), (0, 0), "seed {seed}");
        // The network heals: every replica says hello once more and settles.
        for r in replicas.iter_mut() {
            let hello = r.hello();
            pump(&mut c, r, Some(hello), &mut Wire::default());
            assert!(caught_up(&c, r), "seed {seed}: replica {} did not converge", r.agent());
            assert_eq!(r.observations(), c.world_doc().observations(), "seed {seed}");
        }
    }
}

#[test]
fn an_agents_own_change_is_refused_and_counted() {
    let mut c = coordinator();
    run_set(&mut c, 10_000, "pool", "svc/api/pool_size", 60);
    let mut r = WorldReplica::new("rogue");
    let hello = r.hello();
    pump(&mut c, &mut r, Some(hello), &mut Wire::default());

    // The agent writes into a copy of its replica and sends the change.
    let mut copy = r.automerge().clone();
    let resources = match automerge::ReadDoc::get(&copy, automerge::ROOT, "resources").unwrap() {
        Some((_, id)) => id,
        None => unreachable!(),
    };
    let mut tx = copy.transaction();
    automerge::transaction::Transactable::put(&mut tx, &resources, "svc/api/pool_size", 5000_i64).unwrap();
    tx.commit();
    let change = copy.get_last_local_change().unwrap();
    let msg = automerge::sync::Message {
        heads: copy.get_heads(),
        need: vec![],
        have: vec![],
        changes: change.raw_bytes().to_vec().into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    let frame = Frame::encode(FrameKind::Sync, &c.world_doc().doc_id(), 0, &msg.encode());
    let before = (c.world_doc().save(), c.state_digest());
    let err = c.world_doc_mut().sync_receive("rogue", &frame).unwrap_err();
    assert!(matches!(err, SyncError::ChangesRefused { changes: 1, .. }), "{err}");
    assert_eq!(c.world_doc().sync_refused("rogue"), 1);
    assert_eq!(c.world_doc().sync_stats().changes_refused, 1);
    assert_eq!(
        (c.world_doc().save(), c.state_digest()),
        before,
        "the document is unchanged"
    );
    assert_eq!(c.world_doc().resource("svc/api/pool_size"), Some(Value::Int(60)));

    // Sent without the change, the heads still name a change the coordinator
    // never made: the peer diverged, and its next frame tells it to start over.
    let msg = automerge::sync::Message {
        heads: copy.get_heads(),
        need: vec![],
        have: vec![],
        changes: automerge::sync::ChunkList::empty(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    let frame = Frame::encode(FrameKind::Sync, &c.world_doc().doc_id(), 0, &msg.encode());
    assert!(matches!(
        c.world_doc_mut().sync_receive("rogue", &frame),
        Err(SyncError::Diverged { unknown: 1, .. })
    ));
    let reset = c.world_doc_mut().sync_generate("rogue").unwrap().unwrap();
    assert_eq!(Frame::decode(&reset).unwrap().kind, FrameKind::Reset);
    assert_eq!(r.receive(&reset).unwrap(), ReplicaEvent::Reset);
    let first = r.generate();
    pump(&mut c, &mut r, first, &mut Wire::default());
    assert!(caught_up(&c, &r));
    assert_eq!(r.resource("svc/api/pool_size"), Some(Value::Int(60)));
    assert_eq!(c.world_doc().save(), before.0);
}

#[test]
fn garbage_and_oversized_frames_are_refused() {
    let mut c = coordinator();
    assert!(matches!(
        c.world_doc_mut().sync_receive("x", b"hello"),
        Err(SyncError::Frame(_))
    ));
    let big = vec![0u8; concord_core::worlddoc::PEER_FRAME_BYTES_MAX + 1];
    assert!(matches!(
        c.world_doc_mut().sync_receive("x", &big),
        Err(SyncError::TooLarge { .. })
    ));
    let bad = Frame::encode(FrameKind::Sync, &c.world_doc().doc_id(), 0, b"\x42\xff\xff");
    assert!(matches!(
        c.world_doc_mut().sync_receive("x", &bad),
        Err(SyncError::Message(_))
    ));
    let reset = Frame::encode(FrameKind::Reset, &c.world_doc().doc_id(), 0, &[]);
    assert!(matches!(
        c.world_doc_mut().sync_receive("x", &reset),
        Err(SyncError::UnexpectedKind("reset"))
    ));
}

#[test]
fn sync_peers_are_bounded() {
    let config = Config {
        world_doc: WorldDocConfig {
            sync_peers_max: 2,
            ..WorldDocConfig::default()
        },
        ..Config::default()
    };
    let mut c = coordinator_with(World::from_toml_str(WORLD).unwrap(), config);
    for p in ["a", "b"] {
        assert!(c.world_doc_mut().sync_generate(p).unwrap().is_some());
    }
    assert!(matches!(
        c.world_doc_mut().sync_generate("c"),
        Err(SyncError::PeersFull { max: 2 })
    ));
    c.world_doc_mut().sync_forget("a");
    assert!(c.world_doc_mut().sync_generate("c").unwrap().is_some());
}

// ---- rotation -------------------------------------------------------------------

#[test]
fn rotation_starts_a_fresh_document_and_replicas_follow() {
    let config = Config {
        world_doc: WorldDocConfig {
            rotate_changes_max: 20,
            metric_deadband_rel: 0.0,
            ..WorldDocConfig::default()
        },
        ..Config::default()
    };
    let mut c = coordinator_with(World::from_toml_str(WORLD).unwrap(), config);
    let mut now = run_set(&mut c, 10_000, "pool", "svc/api/pool_size", 60);
    let mut r = WorldReplica::new("uptime");
    let hello = r.hello();
    pump(&mut c, &mut r, Some(hello), &mut Wire::default());
    let (old_id, old_epoch) = (c.world_doc().doc_id(), c.world_doc().epoch());
    let mut rotated = Vec::new();
    for i in 0..25u64 {
        now += 60_000;
        for e in c.handle(now, metric("svc/api/queue", i as f64)) {
            if let Effect::Event(Event::WorldRotated {
                epoch, retired_changes, ..
            }) = e
            {
                rotated.push((epoch, retired_changes));
            }
        }
    }
    assert_eq!(rotated, vec![(old_epoch + 1, 20)]);
    let d = c.world_doc();
    assert_ne!(d.doc_id(), old_id);
    assert!(
        d.change_count() < 10,
        "the fresh document is short: {}",
        d.change_count()
    );
    // It holds the current state: resources, latest observations, provenance.
    d.check_view(c.world()).unwrap();
    assert_eq!(d.observation("svc/api/queue").unwrap().value, Value::Float(24.0));
    assert_eq!(d.provenance("svc/api/pool_size").unwrap().lineage, "pool");
    assert_eq!(d.automerge().get_actor(), &coordinator_actor("c1", 1, old_epoch + 1));

    // The replica, holding the old document, is moved to the new one.
    let first = r.generate().or_else(|| Some(r.hello()));
    pump(&mut c, &mut r, first, &mut Wire::default());
    assert!(caught_up(&c, &r));
    assert_eq!(r.doc_id(), Some(c.world_doc().doc_id()));
    assert_eq!(r.epoch(), old_epoch + 1);
    assert!(r.resets() >= 1);
    assert_eq!(r.observation("svc/api/queue").unwrap().value, Value::Float(24.0));

    // A frame about the old document from a replica that missed all of it
    // restarts its session.
    let stale = Frame::encode(FrameKind::Hello, &old_id, old_epoch, &[]);
    assert_eq!(
        c.world_doc_mut().sync_receive("late", &stale).unwrap(),
        SyncReceipt::OtherDocument
    );
}

#[test]
fn rotation_by_time_and_its_determinism() {
    let config = Config {
        world_doc: WorldDocConfig {
            rotate_after_ms: 3_600_000,
            ..WorldDocConfig::default()
        },
        ..Config::default()
    };
    let run = || {
        let mut c = coordinator_with(World::from_toml_str(WORLD).unwrap(), config.clone());
        let mut events = 0;
        for i in 0..200u64 {
            let fx = c.handle(2_000 + i * 60_000, metric("svc/api/queue", (i * 7 % 13) as f64));
            events += fx
                .iter()
                .filter(|e| matches!(e, Effect::Event(Event::WorldRotated { .. })))
                .count();
        }
        (events, c.world_doc().save(), c.world_doc().epoch())
    };
    let (events, a, epoch) = run();
    assert_eq!(events, 3, "200 minutes with a rotation every hour");
    assert_eq!(epoch, 3);
    assert_eq!(run().1, a);
}
