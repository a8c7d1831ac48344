//! Talking to a coordinator: what the CLI, operators' tools and tests call.
//! (Agents in Rust use the `concord-agent` SDK; other languages speak the
//! same JSON on the same subjects.)

use std::time::Duration;

use async_nats::jetstream;
use concord_proto::Observation;
use concord_proto::coord::{Control, Decision, LeaseReply, LeaseRequest};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::Credentials;
use crate::log::{Batch, ChainError, Verifier};
use crate::store::{CHAIN_BUCKET, Head};
use crate::subjects::Subjects;
use crate::wire::{Answer, BusError, ErrorReply, Query};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator answered with a typed error.
    #[error("{}: {}{}", .0.code, .0.message, .0.field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
    Bus(BusError),
    /// No coordinator listens on the subject.
    #[error("no coordinator answers on `{0}` (is `concord up` or `concord dev` running?)")]
    NoCoordinator(String),
    /// No answer in time.
    #[error("no answer on `{0}` in time")]
    TimedOut(String),
    /// Connecting or talking to NATS failed.
    #[error("nats: {0}")]
    Nats(String),
    /// The answer could not be read.
    #[error("cannot read the answer: {0}")]
    Decode(String),
}

/// An operator command's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlAnswer {
    /// Whether it took effect.
    pub ok: bool,
    /// What happened.
    pub message: String,
}

/// A connection to a coordinator's domain.
#[derive(Clone, Debug)]
pub struct ConcordClient {
    /// The NATS client.
    pub nats: async_nats::Client,
    /// The domain's subjects.
    pub subjects: Subjects,
    /// How long a request waits.
    pub timeout: Duration,
}

impl ConcordClient {
    /// Connects to `urls` (comma-separated) with `credentials`; replies come
    /// to `inbox_prefix` if given (per-user inboxes under permissions).
    pub async fn connect(
        urls: &str,
        credentials: &Credentials,
        domain: &str,
        inbox_prefix: Option<&str>,
    ) -> Result<ConcordClient, ClientError> {
        let mut opts = async_nats::ConnectOptions::new().name("concord-client");
        if let Some(p) = inbox_prefix {
            opts = opts.custom_inbox_prefix(p);
        }
        if let Some(seed) = &credentials.nkey_seed_file {
            let seed =
                std::fs::read_to_string(seed).map_err(|e| ClientError::Nats(format!("{}: {e}", seed.display())))?;
            opts = opts.nkey(seed.trim().to_string());
        } else if let (Some(u), Some(p)) = (&credentials.user, &credentials.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        let nats = opts
            .connect(crate::config::url_list(&[urls]))
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        Ok(ConcordClient {
            nats,
            subjects: Subjects::new(domain),
            timeout: Duration::from_secs(10),
        })
    }

    /// Sends a request and reads the typed answer or the error reply.
    pub async fn request<T: DeserializeOwned>(&self, subject: String, payload: Vec<u8>) -> Result<T, ClientError> {
        let req = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(self.timeout));
        let msg = self
            .nats
            .send_request(subject.clone(), req)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => ClientError::NoCoordinator(subject.clone()),
                async_nats::RequestErrorKind::TimedOut => ClientError::TimedOut(subject.clone()),
                _ => ClientError::Nats(e.to_string()),
            })?;
        // An error reply is `{"error": ...}`: only a reply that opens so is
        // decoded as one (a decision is read once, not twice).
        if opens_with_error(&msg.payload)
            && let Ok(err) = serde_json::from_slice::<ErrorReply>(&msg.payload)
        {
            return Err(ClientError::Bus(err.error));
        }
        serde_json::from_slice(&msg.payload).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Proposes an intent (its JSON) as `agent`.
    pub async fn propose(&self, agent: &str, intent_json: &[u8]) -> Result<Decision, ClientError> {
        self.request(self.subjects.intent(agent), intent_json.to_vec()).await
    }

    /// Asks the lease service as `agent`.
    pub async fn lease(&self, agent: &str, req: &LeaseRequest) -> Result<LeaseReply, ClientError> {
        self.request(self.subjects.lease(agent), serde_json::to_vec(req).expect("serializes"))
            .await
    }

    /// Publishes an observation as `agent`.
    pub async fn observe(&self, agent: &str, obs: &Observation) -> Result<(), ClientError> {
        self.nats
            .publish(
                self.subjects.observe(agent),
                serde_json::to_vec(obs).expect("serializes").into(),
            )
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))
    }

    /// Sends an operator's command as `operator`.
    pub async fn control(&self, operator: &str, control: &Control) -> Result<ControlAnswer, ClientError> {
        self.request(
            self.subjects.ctl(operator),
            serde_json::to_vec(control).expect("serializes"),
        )
        .await
    }

    /// Asks a read-only question as `caller`.
    pub async fn query(&self, caller: &str, query: &Query) -> Result<Answer, ClientError> {
        self.request(
            self.subjects.query(caller),
            serde_json::to_vec(query).expect("serializes"),
        )
        .await
    }
}

/// One log message as read back: its stream sequence and batch.
#[derive(Clone, Debug)]
pub struct LogMessage {
    /// Stream sequence.
    pub seq: u64,
    /// The batch.
    pub batch: Batch,
}

/// Reads the log stream in order from `from_seq` (an ordered consumer,
/// which resumes after reconnects and server restarts), calling `f` with
/// each message's sequence and payload until it returns `false`, or until
/// the end of the log unless `follow`.
///
/// A consumer can go silent after a server restart without an error (seen
/// with nats-server 2.9): when nothing arrives for a while although the
/// stream has moved past what was read, the reader makes a new consumer
/// from the next sequence. Nothing is read twice or skipped: `f` sees each
/// sequence once, in order.
pub async fn read_log(
    nats: &async_nats::Client,
    stream: &str,
    from_seq: u64,
    follow: bool,
    mut f: impl FnMut(u64, &[u8]) -> bool,
) -> Result<(), ClientError> {
    const SILENCE: Duration = Duration::from_secs(2);
    let js = jetstream::new(nats.clone());
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| ClientError::Nats(format!("open {stream}: {e}")))?;
    let last = s
        .info()
        .await
        .map_err(|e| ClientError::Nats(e.to_string()))?
        .state
        .last_sequence;
    let mut next = from_seq.max(1);
    if !follow && last < next {
        return Ok(());
    }
    let mut tries = 0;
    loop {
        let consumer = s
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: next },
                max_batch: crate::store::LOG_READ_BATCH,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => c
                .messages()
                .await
                .map_err(|e| ClientError::Nats(format!("read {stream}: {e}")))?,
            // The server is away, or the stream is electing a leader: try
            // again while following, or for a while.
            Err(e) if follow || tries < 30 => {
                tries += 1;
                tracing::debug!("log reader: {e}");
                tokio::time::sleep(SILENCE / 4).await;
                continue;
            }
            Err(e) => return Err(ClientError::Nats(format!("read {stream}: {e}"))),
        };
        loop {
            let m = match tokio::time::timeout(SILENCE, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                // The ordered consumer recreates itself after a reset; keep going.
                Ok(Some(Err(e))) => {
                    tracing::debug!("log reader: {e}");
                    continue;
                }
                Ok(None) => break,
                Err(_) => {
                    // Silence: fine if the stream has nothing new, else the
                    // consumer is stuck and a new one takes over.
                    match s.info().await {
                        Ok(i) if i.state.last_sequence < next => continue,
                        Ok(_) => {
                            tracing::debug!(next, "log reader: the consumer went silent; making a new one");
                            break;
                        }
                        Err(e) => {
                            tracing::debug!("log reader: {e}");
                            continue;
                        }
                    }
                }
            };
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            if seq < next {
                continue;
            }
            next = seq + 1;
            if !f(seq, &m.payload) {
                return Ok(());
            }
            if !follow && seq >= last {
                return Ok(());
            }
        }
    }
}

/// Whether a JSON reply's first key is `error`.
fn opens_with_error(payload: &[u8]) -> bool {
    let rest = payload.trim_ascii_start();
    rest.strip_prefix(b"{")
        .is_some_and(|r| r.trim_ascii_start().starts_with(b"\"error\""))
}

/// The outcome of `concord log verify`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Messages checked.
    pub messages: u64,
    /// Records in them.
    pub records: u64,
    /// The last sequence checked and its hash.
    pub head_seq: u64,
    /// The chain hash there.
    pub head_hash: String,
    /// The first message that does not fit, if any.
    pub error: Option<String>,
    /// Its sequence.
    pub error_seq: Option<u64>,
    /// Every key that signed a checked message, in order of first use (a
    /// coordinator signs with one key per process unless configured with a
    /// seed: more keys than restarts, or a key not the coordinator's, is a
    /// forgery's mark even when the chain holds).
    #[serde(default)]
    pub signers: Vec<String>,
}

/// Checks the whole chain and the recorded head.
pub async fn verify_log(
    nats: &async_nats::Client,
    stream: &str,
    domain: &str,
    signers: Vec<String>,
) -> Result<VerifyReport, ClientError> {
    let mut v = Verifier::new(signers);
    let mut records = 0u64;
    let mut seen: Vec<String> = Vec::new();
    let mut failure: Option<ChainError> = None;
    read_log(nats, stream, 1, false, |seq, payload| match v.check(seq, payload) {
        Ok(b) => {
            records += b.records.len() as u64;
            if !seen.contains(&b.signer) {
                seen.push(b.signer);
            }
            true
        }
        Err(e) => {
            failure = Some(e);
            false
        }
    })
    .await?;
    let (head_seq, head_hash) = {
        let (s, h) = v.head();
        (s, h.to_string())
    };
    if failure.is_none() {
        let js = jetstream::new(nats.clone());
        if let Ok(kv) = js.get_key_value(CHAIN_BUCKET).await
            && let Ok(Some(bytes)) = kv.get(format!("{domain}.head")).await
            && let Ok(head) = serde_json::from_slice::<Head>(&bytes)
        {
            // The head may lag the log by a message or two; it must lie on the chain.
            let on_chain = head.seq > head_seq || (head.seq == head_seq && head.hash == head_hash);
            if head.seq > head_seq {
                failure = Some(ChainError::Head {
                    seq: head.seq,
                    expected: head.hash,
                    found: format!("only {head_seq} messages"),
                });
            } else if !on_chain && head.seq == head_seq {
                failure = Some(ChainError::Head {
                    seq: head.seq,
                    expected: head.hash,
                    found: head_hash.clone(),
                });
            }
        }
    }
    let error_seq = failure.as_ref().map(|e| match e {
        ChainError::Malformed { seq, .. }
        | ChainError::Broken { seq, .. }
        | ChainError::Tampered { seq }
        | ChainError::Signature { seq, .. }
        | ChainError::Gap { seq, .. }
        | ChainError::Head { seq, .. } => *seq,
    });
    Ok(VerifyReport {
        messages: v.checked,
        records,
        head_seq,
        head_hash,
        error: failure.map(|e| e.to_string()),
        error_seq,
        signers: seen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_are_told_from_answers_by_their_first_key() {
        let err = ErrorReply::retry("busy", "the coordinator is busy", 50);
        assert!(opens_with_error(&err.to_bytes()));
        assert!(opens_with_error(b" {\n  \"error\": {\"code\": \"busy\"}}"));
        assert!(!opens_with_error(br#"{"verdict":"admit","error":null}"#));
        assert!(!opens_with_error(br#"{"ok":true,"message":"halted"}"#));
        assert!(!opens_with_error(b"[]"));
        assert!(!opens_with_error(b""));
    }
}
