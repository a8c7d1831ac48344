//! The JetStream side: the log stream, the KV keys (chain head, halts) and
//! the snapshot object store; appending with the expected last sequence;
//! reading the log back.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, object_store, stream};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::config::RuntimeConfig;

/// The KV bucket with the chain head.
pub const CHAIN_BUCKET: &str = "CONCORD_CHAIN";
/// The KV bucket with the halts in force (executors read it too).
pub const HALT_BUCKET: &str = "CONCORD_HALT";

/// Errors of the JetStream side.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A JetStream call failed.
    #[error("{what}: {detail}")]
    JetStream {
        /// What was attempted.
        what: &'static str,
        /// The server's or client's error.
        detail: String,
    },
    /// The log stream is full: admission stops.
    #[error("the log stream is full ({detail}); admission stops until an operator makes room")]
    Full {
        /// The server's words.
        detail: String,
    },
    /// The log was read but does not verify or cannot be applied.
    #[error("the log cannot be applied: {0}")]
    Apply(String),
    /// Another writer appended: this coordinator is deposed.
    #[error("another writer appended to the log (expected last sequence {expected}); restoring from the log")]
    Deposed {
        /// The sequence this writer expected.
        expected: u64,
    },
}

/// How long a snapshot read may wait for its next chunk.
pub const SNAPSHOT_READ_STALL: Duration = Duration::from_secs(5);

/// Reads of the snapshot before giving up on stalls.
const SNAPSHOT_READ_ATTEMPTS: u32 = 3;

/// Why one read of the snapshot ended without it.
enum SnapshotRead {
    /// No chunk arrived for [`SNAPSHOT_READ_STALL`], or the read failed
    /// part way: worth reading the latest snapshot again.
    Broken(String),
    Failed(StoreError),
}

impl From<StoreError> for SnapshotRead {
    fn from(e: StoreError) -> Self {
        SnapshotRead::Failed(e)
    }
}

fn js_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::JetStream {
        what,
        detail: e.to_string(),
    }
}

/// Handles to the log stream and its companions.
#[derive(Clone)]
pub struct Store {
    /// The JetStream context.
    pub js: jetstream::Context,
    /// The log stream's name.
    pub stream: String,
    /// The chain head bucket.
    pub chain: kv::Store,
    /// The halts bucket.
    pub halts: kv::Store,
    /// The snapshot bucket.
    pub snapshots: object_store::ObjectStore,
    /// The stream's subjects filter.
    pub subjects_filter: String,
    /// The chain head key for this domain.
    pub head_key: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// Log messages one pull asks for. A group-committed message can be near the
/// server's 1 MiB payload limit; the client's default of 500 per pull asks the
/// server to push hundreds of megabytes at once, past a connection's pending
/// limit (64 MiB by default), and the server then drops the reader as a slow
/// consumer and the read stalls. 16 keeps a pull under 16 MiB.
pub const LOG_READ_BATCH: i64 = 16;

/// The chain head as kept in the KV store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// Stream sequence of the last message.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// What a snapshot says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The log message it includes up to.
    pub seq: u64,
    /// That message's chain hash.
    pub hash: String,
    /// The incarnation that wrote it.
    pub incarnation: u64,
    /// Bytes at the end of the object that hold the runtime's notice backlog
    /// (see [`Snapshot::notices`]); 0 in snapshots that carry none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub notices_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A stored snapshot: the coordinator's state and, beside it, what the
/// runtime keeps outside the core that must outlive a restart.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// [`concord_core::coordinator::Coordinator::snapshot`] bytes.
    pub coordinator: Vec<u8>,
    /// The agents' latest notices (JSON), for catch-up after a restart.
    pub notices: Vec<u8>,
}

impl Store {
    /// Creates (or opens) the stream, buckets and object store.
    pub async fn open(js: jetstream::Context, cfg: &RuntimeConfig) -> Result<Store, StoreError> {
        let subjects = crate::subjects::Subjects::new(&cfg.domain);
        let filter = subjects.log_all();
        let stream_cfg = stream::Config {
            name: cfg.log.stream.clone(),
            subjects: vec![filter.clone()],
            max_bytes: cfg.log.max_bytes,
            duplicate_window: Duration::from_millis(cfg.log.duplicate_window_ms),
            num_replicas: cfg.log.replicas,
            storage: stream::StorageType::File,
            // The log is evidence: nothing in it may be deleted or purged.
            deny_delete: true,
            deny_purge: true,
            discard: stream::DiscardPolicy::New,
            max_message_size: (cfg.log.batch_bytes_max * 2 + 64 * 1024) as i32,
            allow_direct: true,
            ..Default::default()
        };
        js.get_or_create_stream(stream_cfg)
            .await
            .map_err(js_err("create the log stream"))?;
        let chain = open_kv(&js, CHAIN_BUCKET, cfg.log.replicas).await?;
        let halts = open_kv(&js, HALT_BUCKET, cfg.log.replicas).await?;
        let snapshots = match js.get_object_store(&cfg.snapshots.bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: cfg.snapshots.bucket.clone(),
                    num_replicas: cfg.log.replicas,
                    ..Default::default()
                })
                .await
                .map_err(js_err("create the snapshot store"))?,
        };
        Ok(Store {
            js,
            stream: cfg.log.stream.clone(),
            chain,
            halts,
            snapshots,
            subjects_filter: filter,
            head_key: format!("{}.head", cfg.domain),
        })
    }

    /// The stream's last sequence.
    pub async fn last_seq(&self) -> Result<u64, StoreError> {
        let mut s = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(js_err("open the log stream"))?;
        let info = s.info().await.map_err(js_err("read the log stream's info"))?;
        Ok(info.state.last_sequence)
    }

    /// Appends one message, expecting `expected_last` to be the stream's last
    /// sequence (so a deposed writer cannot interleave). A publish whose ack
    /// times out may still have been stored: it is sent again with the same
    /// message id, and the stream's duplicate window stores it once.
    pub async fn append(
        &self,
        subject: String,
        msg_id: &str,
        expected_last: u64,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<u64, StoreError> {
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
                expected_last.to_string().as_str(),
            );
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await;
            let ack = match sent {
                Ok(f) => tokio::time::timeout(timeout, f.into_future()).await,
                Err(e) => {
                    last_err = e.to_string();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match ack {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(e)) => {
                    use async_nats::jetstream::context::PublishErrorKind as K;
                    let text = e.to_string();
                    match e.kind() {
                        K::WrongLastSequence => {
                            return Err(StoreError::Deposed {
                                expected: expected_last,
                            });
                        }
                        K::TimedOut | K::BrokenPipe => last_err = text,
                        _ if text.contains("maximum bytes") || text.contains("resources exceeded") => {
                            return Err(StoreError::Full { detail: text });
                        }
                        _ => {
                            return Err(StoreError::JetStream {
                                what: "append to the log",
                                detail: text,
                            });
                        }
                    }
                }
                Err(_) => last_err = "timed out waiting for the ack".into(),
            }
        }
        Err(StoreError::JetStream {
            what: "append to the log",
            detail: last_err,
        })
    }

    /// Reads log messages from `from_seq` through `to_seq`, in order, calling
    /// `f(seq, payload)` for each (an ordered consumer: it resumes after
    /// reconnects and server restarts).
    pub async fn read(
        &self,
        from_seq: u64,
        to_seq: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        if from_seq > to_seq {
            return Ok(());
        }
        // The one log reader (ordered consumer, bounded pulls, a silent
        // consumer replaced) that `concord tail` and `log verify` use too.
        let mut failed = None;
        crate::client::read_log(&self.js.client(), &self.stream, from_seq, false, |seq, payload| {
            if let Err(e) = f(seq, payload) {
                failed = Some(e);
                return false;
            }
            seq < to_seq
        })
        .await
        .map_err(|e| StoreError::JetStream {
            what: "read the log",
            detail: e.to_string(),
        })?;
        match failed {
            Some(e) => Err(StoreError::Apply(e)),
            None => Ok(()),
        }
    }

    /// Records the chain head.
    pub async fn put_head(&self, head: &Head) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(head).expect("head serializes");
        self.chain
            .put(&self.head_key, bytes.into())
            .await
            .map_err(js_err("record the chain head"))?;
        Ok(())
    }

    /// The recorded chain head.
    pub async fn head(&self) -> Result<Option<Head>, StoreError> {
        let v = self
            .chain
            .get(&self.head_key)
            .await
            .map_err(js_err("read the chain head"))?;
        Ok(v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Stores a snapshot (the object `latest`, with its metadata in the
    /// description): the coordinator's bytes, then the notices'. One object,
    /// so a crash while storing it never pairs one part with another's.
    pub async fn put_snapshot(&self, meta: &SnapshotMeta, snapshot: Snapshot) -> Result<(), StoreError> {
        let meta = SnapshotMeta {
            notices_bytes: snapshot.notices.len() as u64,
            ..meta.clone()
        };
        let m = object_store::ObjectMetadata {
            name: "latest".into(),
            description: Some(serde_json::to_string(&meta).expect("meta serializes")),
            ..Default::default()
        };
        let mut bytes = snapshot.coordinator;
        bytes.extend_from_slice(&snapshot.notices);
        let mut reader = std::io::Cursor::new(bytes);
        self.snapshots
            .put(m, &mut reader)
            .await
            .map_err(js_err("store a snapshot"))?;
        Ok(())
    }

    /// The latest snapshot, if any.
    ///
    /// A snapshot replaced while it is read loses its chunks under the
    /// reader, which would then wait for them forever or fail: a read that
    /// stalls for [`SNAPSHOT_READ_STALL`] or breaks off starts over from
    /// the newer snapshot, a few times, then fails.
    pub async fn snapshot(&self) -> Result<Option<(SnapshotMeta, Snapshot)>, StoreError> {
        for attempt in 1..=SNAPSHOT_READ_ATTEMPTS {
            match self.snapshot_read().await {
                Ok(s) => return Ok(s),
                Err(SnapshotRead::Failed(e)) => return Err(e),
                Err(SnapshotRead::Broken(why)) => {
                    tracing::warn!(
                        attempt,
                        "the snapshot read {why} (replaced while read?); reading the latest one"
                    );
                }
            }
        }
        Err(StoreError::JetStream {
            what: "read the snapshot",
            detail: format!(
                "{SNAPSHOT_READ_ATTEMPTS} reads stalled (for {} s) or broke off",
                SNAPSHOT_READ_STALL.as_secs()
            ),
        })
    }

    async fn snapshot_read(&self) -> Result<Option<(SnapshotMeta, Snapshot)>, SnapshotRead> {
        let mut obj = match self.snapshots.get("latest").await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SnapshotRead::Failed(js_err("read the snapshot")(e))),
        };
        let meta: SnapshotMeta = obj
            .info()
            .description
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .ok_or_else(|| StoreError::JetStream {
                what: "read the snapshot",
                detail: "its metadata is missing".into(),
            })?;
        // Sized from the metadata, within reason.
        let mut bytes = Vec::with_capacity(obj.info().size.min(1 << 30));
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            match tokio::time::timeout(SNAPSHOT_READ_STALL, obj.read(&mut chunk)).await {
                Err(_) => return Err(SnapshotRead::Broken("stalled".into())),
                Ok(Err(e)) => return Err(SnapshotRead::Broken(format!("broke off ({e})"))),
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
        let split = usize::try_from(meta.notices_bytes)
            .ok()
            .and_then(|n| bytes.len().checked_sub(n))
            .ok_or_else(|| StoreError::JetStream {
                what: "read the snapshot",
                detail: format!(
                    "its metadata names {} bytes of notices in a {}-byte object",
                    meta.notices_bytes,
                    bytes.len()
                ),
            })?;
        let notices = bytes.split_off(split);
        Ok(Some((
            meta,
            Snapshot {
                coordinator: bytes,
                notices,
            },
        )))
    }

    /// Publishes the halts in force for executors.
    pub async fn put_halts(&self, domain: &str, halts: &[concord_core::coordinator::Halt]) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(halts).expect("halts serialize");
        self.halts
            .put(domain, bytes.into())
            .await
            .map_err(js_err("record the halts"))?;
        Ok(())
    }
}

/// Opens KV bucket `bucket` (one value per key), creating it if missing.
async fn open_kv(js: &jetstream::Context, bucket: &str, replicas: usize) -> Result<kv::Store, StoreError> {
    if let Ok(s) = js.get_key_value(bucket).await {
        return Ok(s);
    }
    js.get_or_create_stream(kv_stream_config(bucket, 1, replicas, Duration::ZERO))
        .await
        .map_err(js_err("create a KV bucket"))?;
    js.get_key_value(bucket).await.map_err(js_err("open a KV bucket"))
}

/// The stream behind KV bucket `bucket`, by the key-value conventions
/// (`KV_<bucket>` on `$KV.<bucket>.>`, rollups allowed, deletes denied,
/// direct gets, discard new). concord creates it itself rather than through
/// the client's bucket creation, which first reads the account's JetStream
/// info in a shape nats-server 2.9 does not send.
pub fn kv_stream_config(bucket: &str, history: i64, replicas: usize, max_age: Duration) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history.max(1),
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        ..Default::default()
    }
}
