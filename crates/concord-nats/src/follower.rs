//! State rebuilt from the log, and snapshots made off the coordinator's loop.
//!
//! [`Rebuilt`] is what recovery makes: the latest readable snapshot, then
//! every logged batch after it applied as recorded (decisions are taken from
//! the record, never made again), with the notices those batches gave rise to.
//!
//! The [`Follower`] keeps a second such copy up to date on a thread of its
//! own: the loop hands it each batch once the log has acknowledged it, and
//! it stores a snapshot of its copy every `snapshots.every_records` records.
//! The loop never serializes its state, so a snapshot costs it nothing but
//! the hand-over; the follower's copy is the state a recovery to that point
//! would rebuild, by the same code. The loop hands over the records it
//! sealed, not the message's bytes: they are not decoded or checked again
//! (recovery and `concord log verify` check the chain as stored). What it
//! holds is bounded (`snapshots.follower_records_max`): a follower that far
//! behind is handed no more records, only told to read the batches it
//! missed from the log, as recovery does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use concord_core::coordinator::{Coordinator, Record, first_divergence};
use concord_core::policy::Policy;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::log::Verifier;
use crate::notify::{NoticeBacklog, Notifier};
use crate::runtime::{CrashHook, CrashPoint};
use crate::store::{Snapshot, SnapshotMeta, Store, StoreError};

/// A coordinator rebuilt from a snapshot and the log after it.
pub(crate) struct Rebuilt {
    /// `None` until a genesis record (or a snapshot) made one.
    pub coord: Option<Coordinator>,
    /// The chain so far (checked, or advanced through batches this
    /// process sealed); its head is the last message applied.
    pub verifier: Verifier,
    /// The highest incarnation seen.
    pub incarnation: u64,
    /// The latest record time seen.
    pub last_now: u64,
    /// Which agent each live plan belongs to (for notices).
    pub notifier: Notifier,
    /// Each agent's latest notices.
    pub backlog: NoticeBacklog,
    /// Inputs whose re-fed events differ from the record.
    pub divergences: u64,
    /// Records applied.
    pub applied: u64,
}

impl Rebuilt {
    /// From the latest snapshot at or before `last` that loads; from nothing
    /// if none does (the log alone rebuilds the state, slower).
    async fn from_snapshot(store: &Store, last: u64) -> Rebuilt {
        let mut r = Rebuilt {
            coord: None,
            verifier: Verifier::new(Vec::new()),
            incarnation: 0,
            last_now: 0,
            notifier: Notifier::default(),
            backlog: NoticeBacklog::default(),
            divergences: 0,
            applied: 0,
        };
        match store.snapshot().await {
            Ok(Some((meta, snap))) if meta.seq <= last => match Coordinator::restore(&snap.coordinator) {
                Ok(c) => {
                    r.notifier = Notifier::from_coordinator(&c);
                    r.coord = Some(c);
                    r.verifier = Verifier::resume(meta.seq, meta.hash, Vec::new());
                    r.incarnation = meta.incarnation;
                    if !snap.notices.is_empty() {
                        match serde_json::from_slice(&snap.notices) {
                            Ok(b) => r.backlog = b,
                            Err(e) => warn!(
                                "the snapshot's notice backlog does not load ({e}); agents catch up on later notices only"
                            ),
                        }
                    }
                    info!(seq = meta.seq, "restored the snapshot");
                }
                Err(e) => warn!("the snapshot does not load ({e}); rebuilding from the whole log"),
            },
            Ok(_) => {}
            Err(e) => warn!("the snapshot cannot be read ({e}); rebuilding from the whole log"),
        }
        r
    }

    /// The snapshot, then the log up to `last`.
    pub async fn from_store(store: &Store, last: u64) -> Result<Rebuilt, StoreError> {
        let mut r = Rebuilt::from_snapshot(store, last).await;
        let from = r.verifier.head().0 + 1;
        store
            .read(from, last, |seq, payload| r.apply(seq, payload).map(|_| ()))
            .await?;
        Ok(r)
    }

    /// Checks log message `seq` against the chain and applies its records;
    /// returns how many it held.
    pub fn apply(&mut self, seq: u64, payload: &[u8]) -> Result<u64, String> {
        let batch = self.verifier.check(seq, payload).map_err(|e| e.to_string())?;
        self.apply_records(seq, batch.incarnation, batch.records)
    }

    /// Applies the records of log message `seq`, which the loop had in
    /// memory and the log acknowledged with hash `hash`: the same records
    /// the message holds, without decoding and checking them again.
    pub fn apply_appended(&mut self, seq: u64, sealed: Sealed) -> Result<u64, String> {
        let Sealed {
            prev,
            hash,
            incarnation,
            records,
        } = sealed;
        self.verifier.advance(seq, &prev, hash).map_err(|e| e.to_string())?;
        self.apply_records(seq, incarnation, records)
    }

    /// Takes up one hand-over of the loop: batch `seq` with its records,
    /// or `None` ("read the log"). Batches it was not handed come from the
    /// log first: up to `seq`'s predecessor, or up to the log's end when
    /// `seq` was not handed either (a "read the log" stands for every batch
    /// after the last one handed).
    fn take_up(
        &mut self,
        rt: &tokio::runtime::Runtime,
        store: &Store,
        seq: u64,
        sealed: Option<Sealed>,
        stopping: bool,
    ) -> TakenUp {
        let head = self.verifier.head().0;
        // A batch handed over that is already applied (read from the log)
        // is skipped.
        if sealed.is_some() && seq <= head {
            return TakenUp::Applied(0);
        }
        let mut n = 0;
        let read_to = if sealed.is_some() { seq - 1 } else { u64::MAX };
        if read_to > head {
            // Stopping: no more of the log is read (a restore starts a
            // follower of its own, which this one must not hold up or race),
            // and what it was still handed would not link without the read.
            if stopping {
                return TakenUp::Stop;
            }
            match rt.block_on(store.read(head + 1, read_to, |s, payload| self.apply(s, payload).map(|k| n += k))) {
                Ok(()) => {}
                // A batch in the log that does not apply: the chain is
                // broken, and no snapshot could be trusted.
                Err(StoreError::Apply(e)) => {
                    metrics::counter!("concord_snapshot_failures_total").increment(1);
                    warn!(seq, "snapshots stop: a logged batch does not apply ({e})");
                    return TakenUp::Stop;
                }
                // The server is away or electing: what was read is applied;
                // the rest is read again at the next batch, and this one
                // waits for that read.
                Err(e) => {
                    metrics::counter!("concord_snapshot_failures_total").increment(1);
                    warn!(
                        seq,
                        "the snapshot follower could not read the log after {head}; trying again at the next batch ({e})"
                    );
                    return TakenUp::Later;
                }
            }
        }
        if let Some(sealed) = sealed {
            match self.apply_appended(seq, sealed) {
                Ok(k) => n += k,
                Err(e) => {
                    metrics::counter!("concord_snapshot_failures_total").increment(1);
                    warn!(seq, "snapshots stop: a logged batch does not apply ({e})");
                    return TakenUp::Stop;
                }
            }
        }
        TakenUp::Applied(n)
    }

    fn apply_records(&mut self, seq: u64, incarnation: u64, records: Vec<Record>) -> Result<u64, String> {
        self.incarnation = self.incarnation.max(incarnation);
        let n = records.len() as u64;
        for record in records {
            self.last_now = self.last_now.max(record.now_ms());
            self.applied += 1;
            match record {
                Record::Genesis(g) => {
                    let c = Coordinator::from_genesis(&g).map_err(|e| format!("genesis policy: {e}"))?;
                    self.notifier = Notifier::from_coordinator(&c);
                    self.coord = Some(c);
                }
                Record::Incarnation { incarnation: n, .. } => {
                    self.incarnation = self.incarnation.max(n);
                    // The world document's writer follows the incarnation.
                    if let Some(c) = self.coord.as_mut() {
                        c.incarnate(n).map_err(|e| format!("incarnation record: {e}"))?;
                    }
                }
                Record::Policy { policy, .. } => {
                    let c = self.coord.as_mut().ok_or("a policy record before the genesis")?;
                    c.set_policy(Policy::compile(*policy).map_err(|e| format!("policy record: {e}"))?);
                }
                Record::Notice { .. } => {}
                Record::Input { now_ms, input, events } => {
                    let c = self.coord.as_mut().ok_or("an input before the genesis")?;
                    let fx = c.recover_input(now_ms, *input, &events);
                    self.backlog.remember(&self.notifier.notices(&events, c));
                    if let Some(d) = first_divergence(&events, &fx) {
                        self.divergences += 1;
                        if self.divergences == 1 {
                            warn!(seq, "re-fed events differ from the record at event {}", d.index);
                        }
                    }
                }
            }
        }
        Ok(n)
    }
}

/// What became of one hand-over to the follower.
enum TakenUp {
    /// Applied, with how many records (read from the log included).
    Applied(u64),
    /// The log could not be read: the next hand-over reads it again.
    Later,
    /// The follower ends: it is being stopped, or the log does not apply.
    Stop,
}

/// A batch as the loop sealed it: its link in the chain and its records.
/// The loop keeps it while the log takes the batch, then hands it to the
/// follower with the sequence the log gave it.
pub(crate) struct Sealed {
    /// The hash of the message before it.
    pub prev: String,
    /// Its own hash.
    pub hash: String,
    /// The coordinator's incarnation that wrote it.
    pub incarnation: u64,
    /// Its records.
    pub records: Vec<Record>,
}

/// Hands acknowledged batches to the snapshot thread. Dropping it ends the
/// thread (after the snapshot it may be storing); [`Follower::stop`] also
/// waits for it.
pub(crate) struct Follower {
    /// A batch with its records, or `None`: "read it from the log".
    tx: mpsc::UnboundedSender<(u64, Option<Sealed>)>,
    /// Records handed over and not yet taken up by the thread.
    queued: Arc<AtomicUsize>,
    /// Set while a "read it from the log" is on its way; cleared by the
    /// thread before it reads, so one such message stands for many batches.
    behind: Arc<AtomicBool>,
    records_max: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    /// Starts a follower that first rebuilds the state up to log message
    /// `upto` (as recovery did), then applies what [`Follower::follow`]
    /// hands it and stores a snapshot every `every_records` records.
    pub fn spawn(
        store: Store,
        upto: u64,
        every_records: u64,
        records_max: usize,
        crash: Option<Arc<CrashHook>>,
    ) -> Follower {
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Option<Sealed>)>();
        let queued = Arc::new(AtomicUsize::new(0));
        let behind = Arc::new(AtomicBool::new(false));
        let (queued_t, behind_t) = (queued.clone(), behind.clone());
        let spawned = std::thread::Builder::new()
            .name("concord-snapshots".into())
            .spawn(move || {
                // A runtime of its own for its reads and uploads (the NATS
                // client is a handle to the connection's task, wherever it
                // runs): when the coordinator's runtime goes away first, the
                // thread's requests fail instead of panicking on a driver
                // that shut down.
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!("snapshots off: no runtime for the snapshot thread ({e})");
                        return;
                    }
                };
                let mut r = match rt.block_on(Rebuilt::from_store(&store, upto)) {
                    Ok(r) => r,
                    Err(e) => {
                        metrics::counter!("concord_snapshot_failures_total").increment(1);
                        warn!("snapshots stop: the log up to {upto} cannot be read ({e})");
                        return;
                    }
                };
                let mut since = 0u64;
                let mut last_size = 0usize;
                while let Some((seq, sealed)) = rx.blocking_recv() {
                    if let Some(s) = &sealed {
                        queued_t.fetch_sub(s.records.len(), Ordering::AcqRel);
                    } else {
                        // Before reading: a batch sealed from now on asks again.
                        behind_t.swap(false, Ordering::AcqRel);
                    }
                    match r.take_up(&rt, &store, seq, sealed, rx.is_closed()) {
                        TakenUp::Applied(n) => since += n,
                        TakenUp::Later => continue,
                        TakenUp::Stop => return,
                    }
                    // Behind the loop: catch up first, snapshot after (but
                    // not forever, should it never quite catch up).
                    if since < every_records || (!rx.is_empty() && since < every_records.saturating_mul(4)) {
                        continue;
                    }
                    let Some(c) = r.coord.as_ref() else { continue };
                    since = 0;
                    // A little over the last one's size: the state grows.
                    let sized = last_size + last_size / 8;
                    let snapshot = match (c.snapshot_sized(sized), serde_json::to_vec(&r.backlog)) {
                        (Ok(coordinator), Ok(notices)) => {
                            last_size = coordinator.len();
                            Snapshot { coordinator, notices }
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            metrics::counter!("concord_snapshot_failures_total").increment(1);
                            warn!("snapshot not made: {e}");
                            continue;
                        }
                    };
                    let (seq, hash) = r.verifier.head();
                    let meta = SnapshotMeta {
                        seq,
                        hash: hash.to_string(),
                        incarnation: r.incarnation,
                        notices_bytes: 0,
                    };
                    rt.block_on(async {
                        let store_it = store.put_snapshot(&meta, snapshot);
                        tokio::pin!(store_it);
                        // The hook fires while the upload is under way.
                        if crash.as_ref().is_some_and(|c| c.point == CrashPoint::DuringSnapshot) {
                            let _ = tokio::time::timeout(std::time::Duration::from_millis(1), &mut store_it).await;
                            CrashHook::reached(&crash, CrashPoint::DuringSnapshot);
                        }
                        match store_it.await {
                            Ok(()) => {
                                metrics::counter!("concord_snapshots_total").increment(1);
                                info!(seq, "snapshot stored");
                            }
                            Err(e) => {
                                metrics::counter!("concord_snapshot_failures_total").increment(1);
                                warn!("snapshot not stored: {e}");
                            }
                        }
                    });
                }
            });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("snapshots off: the snapshot thread does not start ({e})");
                None
            }
        };
        Follower {
            tx,
            queued,
            behind,
            records_max,
            thread,
        }
    }

    /// Lets the thread apply what it was handed and finish the snapshot it
    /// may be storing, waiting at most `wait` for it.
    pub async fn stop(self, wait: std::time::Duration) {
        let Follower { tx, thread, .. } = self;
        drop(tx);
        let Some(thread) = thread else { return };
        // Polled, not joined on a blocking task: a runtime shutting down
        // waits for its blocking tasks, and this one must not hold it.
        let deadline = tokio::time::Instant::now() + wait;
        while !thread.is_finished() {
            if tokio::time::Instant::now() >= deadline {
                warn!(
                    "the snapshot thread is still busy after {} ms; leaving it",
                    wait.as_millis()
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if thread.join().is_err() {
            warn!("the snapshot thread ended abnormally");
        }
    }

    /// The batch `sealed` is in the log as message `seq`. Handed over with
    /// its records while the records handed and not yet taken up stay
    /// within the limit with it (a batch of any size when there are none);
    /// otherwise the thread is only told to read the log, once for however
    /// many batches it was not handed.
    pub fn follow(&self, seq: u64, sealed: Sealed) {
        let n = sealed.records.len();
        let queued = self.queued.load(Ordering::Acquire);
        let fits = self.records_max > 0 && (queued == 0 || queued + n <= self.records_max);
        if fits {
            self.queued.fetch_add(n, Ordering::AcqRel);
            let _ = self.tx.send((seq, Some(sealed)));
            return;
        }
        metrics::counter!("concord_snapshot_follower_batches_read_total").increment(1);
        if !self.behind.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send((seq, None));
        }
    }
}
