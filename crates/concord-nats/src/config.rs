//! The runtime's configuration (`config/concord.toml`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the field.
        message: String,
    },
    /// A setting breaks a rule.
    #[error("{field}: {message}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// The rule.
        message: String,
    },
}

/// The coordinator daemon's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// This coordinator's id (its Automerge actor and log signer derive from it).
    #[serde(default = "default_coordinator")]
    pub coordinator: String,
    /// The coordinated system's domain: subjects live under `concord.v1.<domain>`.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// NATS URLs (one server or the members of a cluster).
    #[serde(default = "default_nats")]
    pub nats: Vec<String>,
    /// How the coordinator authenticates to NATS.
    #[serde(default)]
    pub credentials: Credentials,
    /// The policy file.
    pub policy: Option<PathBuf>,
    /// The world the coordinator starts from when the log is empty.
    pub world: Option<PathBuf>,
    /// The coordination log.
    #[serde(default)]
    pub log: LogConfig,
    /// Snapshots of the coordinator's state.
    #[serde(default)]
    pub snapshots: SnapshotConfig,
    /// Queues and rates.
    #[serde(default)]
    pub limits: Limits,
    /// Where steps go: the first entry whose kinds and path prefixes match;
    /// `default` if none does.
    #[serde(default)]
    pub executors: Vec<ExecutorRoute>,
    /// Prometheus metrics and health endpoints, e.g. `127.0.0.1:9464` (off if unset).
    pub metrics_listen: Option<String>,
    /// The core's bounds and times (defaults if unset).
    #[serde(default)]
    pub core: concord_core::coordinator::Config,
    /// Trace export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// Where traces go. Spans are made and their context travels in NATS
/// headers either way; export is off unless an endpoint is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (protobuf to
    /// `<endpoint>/v1/traces`); off if unset.
    pub otlp_endpoint: Option<String>,
    /// The service name on exported spans (`concord` if unset).
    pub service_name: Option<String>,
}

/// How to authenticate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// A file holding an nkey seed (`SU...`), as `concord nats-config` writes.
    pub nkey_seed_file: Option<PathBuf>,
    /// A user name (with `password`).
    pub user: Option<String>,
    /// A password.
    pub password: Option<String>,
}

/// The coordination log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The stream's name.
    pub stream: String,
    /// Stream replicas (3 on a cluster).
    pub replicas: usize,
    /// The stream's size bound; when full, admission stops and an alert is raised.
    pub max_bytes: i64,
    /// The window in which a re-sent append (same message id) is stored once.
    pub duplicate_window_ms: u64,
    /// Most bytes of records in one appended message (group commit).
    pub batch_bytes_max: usize,
    /// Most records in one appended message.
    pub batch_records_max: usize,
    /// A file with the nkey seed that signs log messages; a fresh key per run if unset.
    pub signing_seed_file: Option<PathBuf>,
    /// How long an append may take before it counts as failed.
    pub append_timeout_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            stream: "CONCORD_LOG".into(),
            replicas: 1,
            max_bytes: 1024 * 1024 * 1024,
            duplicate_window_ms: 120_000,
            batch_bytes_max: 512 * 1024,
            batch_records_max: 4096,
            signing_seed_file: None,
            append_timeout_ms: 5_000,
        }
    }
}

/// Snapshots of the coordinator's state, so recovery time stays bounded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// The object store bucket.
    pub bucket: String,
    /// Take one after this many log records (0: never).
    pub every_records: u64,
    /// Most records handed to the snapshot follower and not yet taken up by
    /// it (a batch of any size is handed when none are). A follower further
    /// behind is handed no more: it reads the batches it was not handed from
    /// the log instead (0: it reads every batch from the log). Bounds the
    /// memory a lagging follower holds, in records.
    pub follower_records_max: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            bucket: "CONCORD_SNAPSHOTS".into(),
            every_records: 50_000,
            follower_records_max: 262_144,
        }
    }
}

/// Queues and rates: every one has a named maximum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Inputs waiting for the core; beyond it, requests get `busy` with `retry_after_ms`.
    pub inbound_queue_max: usize,
    /// Messages a subscription buffers before the client drops (a slow consumer).
    pub subscription_capacity: usize,
    /// Intents per second per agent (a token bucket); beyond it, `rate_limited`.
    pub intents_per_agent_per_s: u32,
    /// The token bucket's burst.
    pub intents_burst: u32,
    /// What a `busy` reply tells the caller to wait.
    pub retry_after_ms: u64,
    /// How long a dispatch request waits for one answer before it is sent again (same key).
    pub dispatch_retry_ms: u64,
    /// Most payload bytes accepted on any subject (but `sync`).
    pub payload_bytes_max: usize,
    /// Most bytes of one world sync frame from an agent's replica (`sync.<agent>`).
    pub sync_frame_bytes_max: usize,
    /// World sync frames per second per agent (a token bucket, burst the
    /// same); beyond it the frame is dropped and counted, and the replica's
    /// next `hello` resumes.
    pub sync_frames_per_agent_per_s: u32,
    /// Most replicas the coordinator syncs at once.
    pub sync_peers_max: usize,
    /// A replica that sent nothing for this long is forgotten (its session
    /// state dropped); the SDK says `hello` well within it.
    pub sync_idle_ms: u64,
    /// Pushes to replicas after the document changed are at least this far
    /// apart (changes in between travel together).
    pub sync_push_interval_ms: u64,
    /// Frames waiting to be published to replicas; beyond it a frame is
    /// dropped and its replica's session starts over.
    pub sync_outbound_max: usize,
    /// Replicas' frames waiting for the core (a lane of their own); beyond
    /// it a frame is dropped (`busy`) and the replica's next `hello` resumes.
    pub sync_inbound_max: usize,
    /// The world document holds its writes until something reads it (each
    /// is an Automerge change, tens of µs). A replica's frame or a status
    /// query that finds more than this many held waits, while the loop
    /// applies a few per turn, so that no read applies a long backlog in one
    /// go on the loop.
    pub sync_catch_up_held_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            inbound_queue_max: 8192,
            subscription_capacity: 65_536,
            intents_per_agent_per_s: 5_000,
            intents_burst: 10_000,
            retry_after_ms: 50,
            dispatch_retry_ms: 5_000,
            payload_bytes_max: concord_proto::limits::INTENT_BYTES_MAX,
            sync_frame_bytes_max: concord_core::worlddoc::PEER_FRAME_BYTES_MAX,
            sync_frames_per_agent_per_s: 1_000,
            sync_peers_max: 4_096,
            sync_idle_ms: 60_000,
            sync_push_interval_ms: 20,
            sync_outbound_max: 16_384,
            sync_inbound_max: 4_096,
            sync_catch_up_held_max: 256,
        }
    }
}

/// Routes steps to an executor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorRoute {
    /// The executor's name (`exec.<name>`).
    pub name: String,
    /// Step kinds it serves (all if empty).
    #[serde(default)]
    pub kinds: Vec<concord_proto::StepKind>,
    /// Path prefixes it serves (all if empty).
    #[serde(default)]
    pub paths: Vec<String>,
}

fn default_coordinator() -> String {
    "concord".into()
}

fn default_domain() -> String {
    "default".into()
}

fn default_nats() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".into()]
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            coordinator: default_coordinator(),
            domain: default_domain(),
            nats: default_nats(),
            credentials: Credentials::default(),
            policy: None,
            world: None,
            log: LogConfig::default(),
            snapshots: SnapshotConfig::default(),
            limits: Limits::default(),
            executors: Vec::new(),
            metrics_listen: None,
            core: concord_core::coordinator::Config::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl RuntimeConfig {
    /// Reads and checks a configuration file. Relative paths in it are
    /// relative to the file's folder.
    pub fn load(path: &Path) -> Result<RuntimeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: RuntimeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.policy,
            &mut cfg.world,
            &mut cfg.credentials.nkey_seed_file,
            &mut cfg.log.signing_seed_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the rules the types do not express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: String| Err(ConfigError::Invalid { field, message });
        if !crate::subjects::valid_token(&self.domain) {
            return bad("domain", format!("`{}` is not one subject token", self.domain));
        }
        if !crate::subjects::valid_token(&self.coordinator) {
            return bad(
                "coordinator",
                format!("`{}` is not one subject token", self.coordinator),
            );
        }
        if self.nats.is_empty() {
            return bad("nats", "at least one URL".into());
        }
        for e in &self.executors {
            if !crate::subjects::valid_token(&e.name) {
                return bad("executors.name", format!("`{}` is not one subject token", e.name));
            }
        }
        if self.log.batch_records_max == 0 || self.log.batch_bytes_max < 1024 {
            return bad(
                "log.batch_records_max",
                "batches need room for at least one record".into(),
            );
        }
        if self.limits.inbound_queue_max == 0 {
            return bad("limits.inbound_queue_max", "must be at least 1".into());
        }
        if self.limits.sync_peers_max == 0 || self.limits.sync_outbound_max == 0 || self.limits.sync_inbound_max == 0 {
            return bad(
                "limits.sync_peers_max",
                "sync_peers_max, sync_outbound_max and sync_inbound_max must be at least 1".into(),
            );
        }
        if self.limits.sync_frame_bytes_max > concord_core::worlddoc::PEER_FRAME_BYTES_MAX {
            return bad(
                "limits.sync_frame_bytes_max",
                format!(
                    "at most {} (the core refuses larger frames)",
                    concord_core::worlddoc::PEER_FRAME_BYTES_MAX
                ),
            );
        }
        Ok(())
    }

    /// The executor that serves a step.
    pub fn executor_for(&self, kind: concord_proto::StepKind, path: &str) -> &str {
        self.executors
            .iter()
            .find(|e| {
                (e.kinds.is_empty() || e.kinds.contains(&kind))
                    && (e.paths.is_empty()
                        || e.paths
                            .iter()
                            .any(|p| path == p || path.starts_with(&format!("{}/", p.trim_end_matches('/')))))
            })
            .map(|e| e.name.as_str())
            .unwrap_or("default")
    }
}

/// The server URLs in `urls` (comma-separated, blanks ignored): what the
/// NATS client takes to fail over between a cluster's nodes.
pub fn url_list<S: AsRef<str>>(urls: &[S]) -> Vec<String> {
    urls.iter()
        .flat_map(|u| u.as_ref().split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped configuration loads, and says what the defaults say
    /// where it names a setting.
    #[test]
    fn the_shipped_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/concord.toml");
        let cfg = RuntimeConfig::load(&path).unwrap();
        assert_eq!(cfg.snapshots, SnapshotConfig::default());
    }
}
