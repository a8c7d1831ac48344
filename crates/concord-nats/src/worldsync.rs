//! The world document's replicas over the bus.
//!
//! An agent's replica sends frames (`CWS` frames of
//! [`concord_core::worlddoc`]: `hello` and `sync`, never changes) on its own
//! `sync.<agent>`; the coordinator answers, and pushes what changed, on
//! `world.<agent>`. The agent's identity is the subject's last token, which
//! NATS permissions confine to that agent.
//!
//! This module holds the runtime's side that is not the core's: which
//! replicas are connected (bounded, idle ones forgotten), and how a frame
//! larger than the server's `max_payload` travels (in parts, with headers:
//! [`concord_proto::parts`]).
//! The sync sessions themselves are the core's
//! ([`concord_core::worlddoc::WorldDoc::sync_receive`] and
//! [`sync_generate`](concord_core::worlddoc::WorldDoc::sync_generate)).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use concord_proto::parts::{PART_HEADER, PART_OVERHEAD_BYTES, Part, Reassembly, parts};

/// The replicas the coordinator pushes to: agents whose frames arrived
/// within the idle time, at most a bound of them.
#[derive(Debug)]
pub struct Replicas {
    last_seen: BTreeMap<String, Instant>,
    peers_max: usize,
    idle: Duration,
}

/// The bound on connected replicas is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{max} world replicas are connected; no room for another")]
pub struct ReplicasFull {
    /// The bound.
    pub max: usize,
}

impl Replicas {
    /// At most `peers_max` replicas; one silent for `idle` is forgotten.
    pub fn new(peers_max: usize, idle: Duration) -> Replicas {
        Replicas {
            last_seen: BTreeMap::new(),
            peers_max,
            idle,
        }
    }

    /// `agent` sent a frame at `now`. A new agent when the bound is reached
    /// first makes room by forgetting idle replicas (returned, for the core
    /// to forget their sessions too); if none is idle, it is refused.
    pub fn seen(&mut self, agent: &str, now: Instant) -> Result<Vec<String>, ReplicasFull> {
        if let Some(t) = self.last_seen.get_mut(agent) {
            *t = now;
            return Ok(Vec::new());
        }
        let mut gone = Vec::new();
        if self.last_seen.len() >= self.peers_max {
            gone = self.sweep(now);
            if self.last_seen.len() >= self.peers_max {
                return Err(ReplicasFull { max: self.peers_max });
            }
        }
        self.last_seen.insert(agent.to_string(), now);
        Ok(gone)
    }

    /// Forgets the replicas silent for longer than the idle time.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let idle = self.idle;
        let gone: Vec<String> = self
            .last_seen
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > idle)
            .map(|(a, _)| a.clone())
            .collect();
        for a in &gone {
            self.last_seen.remove(a);
        }
        gone
    }

    /// Forgets one replica.
    pub fn forget(&mut self, agent: &str) {
        self.last_seen.remove(agent);
    }

    /// The connected replicas, in name order.
    pub fn agents(&self) -> impl Iterator<Item = &str> {
        self.last_seen.keys().map(String::as_str)
    }

    /// How many are connected.
    pub fn len(&self) -> usize {
        self.last_seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.last_seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use concord_core::coordinator::{Config, Coordinator};
    use concord_core::policy::Policy;
    use concord_core::world::World;
    use concord_core::worlddoc::{Frame, FrameKind, WorldReplica};
    use proptest::prelude::*;

    use super::*;

    fn coordinator() -> Coordinator {
        let world =
            World::from_toml_str("[resources]\n\"svc/api/pool_size\" = 50\n\"svc/api/replicas\" = 4\n").unwrap();
        Coordinator::new(Config::default(), Policy::from_toml_str("").unwrap(), world)
    }

    /// A replica's first frames and the coordinator's answers, for mutating.
    fn exchange() -> (Coordinator, Vec<u8>, Vec<u8>) {
        let mut c = coordinator();
        let mut r = WorldReplica::new("probe");
        let hello = r.hello();
        c.world_doc_mut().sync_receive("probe", &hello).unwrap();
        let answer = c.world_doc_mut().sync_generate("probe").unwrap().unwrap();
        r.receive(&answer).unwrap();
        let reply = r.generate().unwrap_or_else(|| r.hello());
        (c, reply, answer)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever an agent sends on its sync subject, the coordinator's
        /// side neither panics nor changes the document, and still answers
        /// the agent's next honest frame.
        #[test]
        fn agent_frames_never_panic_nor_write(
            junk in proptest::collection::vec(any::<u8>(), 0..512),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            kind in prop_oneof![Just(FrameKind::Sync), Just(FrameKind::Hello)],
        ) {
            let (mut c, honest, _) = exchange();
            let heads = c.world_doc().heads_hex();
            let mut mutated = honest.clone();
            for (at, b) in &flips {
                let i = at % mutated.len();
                mutated[i] ^= b | 1;
            }
            let doc_id = c.world_doc().doc_id();
            let framed = Frame::encode(kind, &doc_id, 0, &junk);
            for bytes in [&junk, &mutated, &framed] {
                let _ = c.world_doc_mut().sync_receive("probe", bytes);
                let _ = c.world_doc_mut().sync_generate("probe");
                prop_assert_eq!(c.world_doc().heads_hex(), heads.clone());
            }
            let mut r = WorldReplica::new("probe");
            let hello = r.hello();
            prop_assert!(c.world_doc_mut().sync_receive("probe", &hello).is_ok());
            prop_assert!(c.world_doc_mut().sync_generate("probe").unwrap().is_some());
        }

        /// Whatever arrives on its world subject, a replica neither panics
        /// nor believes garbage: it errs or starts over.
        #[test]
        fn coordinator_frames_never_panic_a_replica(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            junk in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let (_, _, answer) = exchange();
            let mut mutated = answer.clone();
            for (at, b) in &flips {
                let i = at % mutated.len();
                mutated[i] ^= b | 1;
            }
            let mut r = WorldReplica::new("probe");
            let _ = r.receive(&mutated);
            let _ = r.receive(&junk);
            let _ = r.generate();
            let _ = r.resources();
        }

        /// Part headers and parts in any order never panic the reassembly.
        #[test]
        fn parts_in_any_order_never_panic(
            headers in proptest::collection::vec(".{0,24}", 0..16),
            order in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let frame: Vec<u8> = (0..5_000u32).map(|i| i as u8).collect();
            let ps = parts(&frame, 700, 3);
            let mut r = Reassembly::default();
            for h in &headers {
                let _ = Part::decode(h).map(|p| r.push(Some(&p), b"x"));
            }
            for i in &order {
                let (h, b) = &ps[i % ps.len()];
                let _ = r.push(h.as_ref(), b);
            }
        }
    }

    #[test]
    fn replicas_are_bounded_and_idle_ones_are_forgotten() {
        let t0 = Instant::now();
        let mut r = Replicas::new(2, Duration::from_secs(10));
        assert!(r.seen("a", t0).unwrap().is_empty());
        assert!(r.seen("b", t0 + Duration::from_secs(5)).unwrap().is_empty());
        assert_eq!(r.seen("c", t0 + Duration::from_secs(6)), Err(ReplicasFull { max: 2 }));
        // `a` falls idle: it makes room.
        assert_eq!(
            r.seen("c", t0 + Duration::from_secs(11)).unwrap(),
            vec!["a".to_string()]
        );
        assert_eq!(r.agents().collect::<Vec<_>>(), vec!["b", "c"]);
        assert_eq!(r.sweep(t0 + Duration::from_secs(30)).len(), 2);
        assert!(r.is_empty());
    }
}
