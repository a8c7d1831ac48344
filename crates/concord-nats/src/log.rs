//! The coordination log's messages: batches of records in a hash chain,
//! signed by the coordinator.
//!
//! Group commit: one JetStream message carries the records of many inputs
//! (one append, one ack, one fsync in durable mode) and is the durable record
//! of all of them; readers such as `concord tail` filter records on the client.
//! Each message carries the hash of the one before it and its own hash over
//! (previous hash, records), signed with the coordinator's nkey; the latest
//! hash is also kept in a KV key, so a rewritten or truncated chain shows.

use std::borrow::Cow;

use concord_core::coordinator::{Event, Input, Record};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Shape version of log messages.
pub const BATCH_VERSION: u32 = 1;

/// The hash before the first message.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One log message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Shape version ([`BATCH_VERSION`]).
    pub v: u32,
    /// The coordinator that wrote it.
    pub coordinator: String,
    /// Its incarnation (process start count).
    pub incarnation: u64,
    /// The previous message's hash ([`GENESIS_PREV`] for the first).
    pub prev: String,
    /// BLAKE3 over `prev` and the records' canonical JSON.
    pub hash: String,
    /// The signer's public nkey.
    pub signer: String,
    /// Ed25519 signature of `hash`, hex.
    pub sig: String,
    /// The records.
    pub records: Vec<Record>,
}

/// Why a chain does not verify.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChainError {
    /// Not a log message.
    #[error("message {seq}: not a log batch: {detail}")]
    Malformed {
        /// Stream sequence.
        seq: u64,
        /// Why.
        detail: String,
    },
    /// The message does not continue the chain.
    #[error("message {seq}: its previous hash {found} is not the hash {expected} of the message before it")]
    Broken {
        /// Stream sequence.
        seq: u64,
        /// The hash it names.
        found: String,
        /// The hash of the message before.
        expected: String,
    },
    /// Its records do not hash to its hash: they were changed.
    #[error("message {seq}: its records do not match its hash (rewritten)")]
    Tampered {
        /// Stream sequence.
        seq: u64,
    },
    /// The signature is not the coordinator's.
    #[error("message {seq}: bad signature by {signer}")]
    Signature {
        /// Stream sequence.
        seq: u64,
        /// Who it claims signed.
        signer: String,
    },
    /// A sequence is missing.
    #[error("message {seq} is missing (the chain jumps from {before} to {after})")]
    Gap {
        /// The first missing sequence.
        seq: u64,
        /// The sequence before.
        before: u64,
        /// The next present sequence.
        after: u64,
    },
    /// The chain's end is not the head recorded in the KV store.
    #[error("the recorded head is message {seq} with hash {expected}, but the log has {found}")]
    Head {
        /// The head's sequence.
        seq: u64,
        /// The head's hash.
        expected: String,
        /// What the log holds there.
        found: String,
    },
}

/// The chain hash of `records` after `prev`.
pub fn chain_hash(prev: &str, records_json: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(records_json);
    h.finalize().to_hex().to_string()
}

/// Signs log messages.
pub struct Signer {
    key: nkeys::KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public", &self.key.public_key())
            .finish()
    }
}

impl Signer {
    /// From an nkey seed.
    pub fn from_seed(seed: &str) -> Result<Signer, nkeys::error::Error> {
        Ok(Signer {
            key: nkeys::KeyPair::from_seed(seed.trim())?,
        })
    }

    /// A fresh server key (its public key is in every message it signs).
    pub fn generate() -> Signer {
        Signer {
            key: nkeys::KeyPair::new_server(),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// Builds the next message after `prev`.
    pub fn seal(&self, coordinator: &str, incarnation: u64, prev: &str, records: Vec<Record>) -> Batch {
        let json = serde_json::to_vec(&records).expect("records serialize");
        let (hash, sig) = self.sign(prev, &json);
        Batch {
            v: BATCH_VERSION,
            coordinator: coordinator.to_string(),
            incarnation,
            prev: prev.to_string(),
            hash,
            signer: self.key.public_key(),
            sig,
            records,
        }
    }

    /// The chain hash of records (their JSON array) after `prev`, and its
    /// signature (hex).
    fn sign(&self, prev: &str, records_json: &[u8]) -> (String, String) {
        let hash = chain_hash(prev, records_json);
        let sig = self.key.sign(hash.as_bytes()).expect("a seeded key signs");
        (hash, hex(&sig))
    }

    /// The next message after `prev` from its records' JSON array as
    /// already written (each record serialized once, by whoever collected
    /// them): its hash and its bytes, the same bytes [`Signer::seal`] gives.
    pub fn seal_json(&self, coordinator: &str, incarnation: u64, prev: &str, records_json: &[u8]) -> (String, Vec<u8>) {
        let (hash, sig) = self.sign(prev, records_json);
        // Sized for the head and the records at once: the records are most
        // of a batch, and growing into them would copy the head's buffer.
        let mut payload = Vec::with_capacity(records_json.len() + BATCH_HEAD_BYTES);
        serde_json::to_writer(
            &mut payload,
            &BatchHead {
                v: BATCH_VERSION,
                coordinator,
                incarnation,
                prev,
                hash: &hash,
                signer: &self.key.public_key(),
                sig: &sig,
            },
        )
        .expect("batches serialize");
        // The records go last, as `Batch` writes them, in place of the
        // head's closing brace.
        payload.pop();
        payload.extend_from_slice(b",\"records\":");
        payload.extend_from_slice(records_json);
        payload.push(b'}');
        (hash, payload)
    }
}

/// About the size of a batch's head as JSON (hashes, key and signature).
const BATCH_HEAD_BYTES: usize = 512;

/// A log message's fields but its records, in [`Batch`]'s order.
#[derive(Serialize)]
struct BatchHead<'a> {
    v: u32,
    coordinator: &'a str,
    incarnation: u64,
    prev: &'a str,
    hash: &'a str,
    signer: &'a str,
    sig: &'a str,
}

/// A log message with its records as they were written: what is hashed.
#[derive(Deserialize)]
struct BatchRaw<'a> {
    v: u32,
    #[serde(borrow)]
    coordinator: Cow<'a, str>,
    incarnation: u64,
    #[serde(borrow)]
    prev: Cow<'a, str>,
    #[serde(borrow)]
    hash: Cow<'a, str>,
    #[serde(borrow)]
    signer: Cow<'a, str>,
    #[serde(borrow)]
    sig: Cow<'a, str>,
    #[serde(borrow)]
    records: &'a RawValue,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks a chain message by message.
#[derive(Debug)]
pub struct Verifier {
    prev: String,
    prev_seq: u64,
    /// Accepted signers (any signer if empty).
    signers: Vec<String>,
    /// Messages checked.
    pub checked: u64,
}

impl Verifier {
    /// A verifier from the start of the log; `signers` lists the accepted public keys (any if empty).
    pub fn new(signers: Vec<String>) -> Verifier {
        Verifier {
            prev: GENESIS_PREV.to_string(),
            prev_seq: 0,
            signers,
            checked: 0,
        }
    }

    /// A verifier that continues after message `seq` with hash `hash` (e.g. a snapshot's).
    pub fn resume(seq: u64, hash: String, signers: Vec<String>) -> Verifier {
        Verifier {
            prev: hash,
            prev_seq: seq,
            signers,
            checked: 0,
        }
    }

    /// The last message checked (or advanced to) and its hash.
    pub fn head(&self) -> (u64, &str) {
        (self.prev_seq, &self.prev)
    }

    /// Moves the head to message `seq`, sealed by this process after
    /// `prev` with hash `hash`, without hashing or decoding it again. Refuses
    /// a gap, and a `prev` that is not the head.
    pub(crate) fn advance(&mut self, seq: u64, prev: &str, hash: String) -> Result<(), ChainError> {
        self.next(seq)?;
        self.links(seq, prev)?;
        self.prev = hash;
        self.prev_seq = seq;
        Ok(())
    }

    /// Message `seq` is the one after the head.
    fn next(&self, seq: u64) -> Result<(), ChainError> {
        if seq != self.prev_seq + 1 {
            return Err(ChainError::Gap {
                seq: self.prev_seq + 1,
                before: self.prev_seq,
                after: seq,
            });
        }
        Ok(())
    }

    /// Message `seq`, naming `prev` as the hash before it, links to the head.
    fn links(&self, seq: u64, prev: &str) -> Result<(), ChainError> {
        if prev != self.prev {
            return Err(ChainError::Broken {
                seq,
                found: prev.to_string(),
                expected: self.prev.clone(),
            });
        }
        Ok(())
    }

    /// Checks message `seq` and returns it decoded.
    pub fn check(&mut self, seq: u64, payload: &[u8]) -> Result<Batch, ChainError> {
        self.next(seq)?;
        let malformed = |e: serde_json::Error| ChainError::Malformed {
            seq,
            detail: e.to_string(),
        };
        // The records are hashed as they were written, then decoded once.
        let raw: BatchRaw = serde_json::from_slice(payload).map_err(malformed)?;
        self.links(seq, &raw.prev)?;
        if chain_hash(&raw.prev, raw.records.get().as_bytes()) != raw.hash {
            return Err(ChainError::Tampered { seq });
        }
        let signed = (self.signers.is_empty() || self.signers.iter().any(|s| *s == raw.signer))
            && nkeys::KeyPair::from_public_key(&raw.signer)
                .ok()
                .zip(unhex(&raw.sig))
                .is_some_and(|(k, sig)| k.verify(raw.hash.as_bytes(), &sig).is_ok());
        if !signed {
            return Err(ChainError::Signature {
                seq,
                signer: raw.signer.into_owned(),
            });
        }
        let batch = Batch {
            records: serde_json::from_str(raw.records.get()).map_err(malformed)?,
            v: raw.v,
            coordinator: raw.coordinator.into_owned(),
            incarnation: raw.incarnation,
            prev: raw.prev.into_owned(),
            hash: raw.hash.into_owned(),
            signer: raw.signer.into_owned(),
            sig: raw.sig.into_owned(),
        };
        self.prev = batch.hash.clone();
        self.prev_seq = seq;
        self.checked += 1;
        Ok(batch)
    }
}

/// The subject a batch is appended on: `log.<kind>.<who>` for a batch of
/// one input record (so a stream filter can pick kinds and agents), else
/// `log.batch.<coordinator>`.
pub fn batch_subject(subjects: &crate::subjects::Subjects, coordinator: &str, records: &[Record]) -> String {
    if let [record] = records {
        let (kind, who) = record_kind(record);
        let who = if crate::subjects::valid_token(who) { who } else { "_" };
        return subjects.log(kind, who);
    }
    subjects.log("batch", coordinator)
}

/// A record's kind and the identity it concerns, for subjects and filters.
pub fn record_kind(record: &Record) -> (&'static str, &str) {
    match record {
        Record::Genesis(g) => ("genesis", g.coordinator.as_str()),
        Record::Incarnation { coordinator, .. } => ("incarnation", coordinator.as_str()),
        Record::Policy { .. } => ("policy", "_"),
        Record::Notice { .. } => ("notice", "_"),
        Record::Input { input, .. } => match input.as_ref() {
            Input::Intent { agent, .. } => ("intent", agent.as_str()),
            Input::Lease { agent, .. } => ("lease", agent.as_str()),
            Input::Observe { agent, .. } => ("observe", agent.as_str()),
            Input::Outcome { executor, .. } => ("outcome", executor.as_str()),
            Input::Control { operator, .. } => ("control", operator.as_str()),
            Input::Tick => ("tick", "_"),
        },
    }
}

/// An event's name as it appears in the log (`decided`, `dispatched`, ...).
pub fn event_name(e: &Event) -> String {
    serde_json::to_value(e)
        .ok()
        .and_then(|v| v.get("event").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::coordinator::Input;

    fn tick(now_ms: u64) -> Record {
        Record::Input {
            now_ms,
            input: Box::new(Input::Tick),
            events: Vec::new(),
        }
    }

    /// Sealing records already written as JSON gives the bytes and hash of
    /// sealing the records; the verifier hashes the records as written, so
    /// the same records re-spaced are a rewrite.
    #[test]
    fn sealed_json_is_sealed_records_and_is_hashed_as_written() {
        let s = Signer::generate();
        let records = vec![tick(1), tick(2)];
        let json = serde_json::to_vec(&records).unwrap();
        let (hash, payload) = s.seal_json("c", 1, GENESIS_PREV, &json);
        let b = s.seal("c", 1, GENESIS_PREV, records);
        assert_eq!(hash, b.hash);
        assert_eq!(payload, serde_json::to_vec(&b).unwrap());
        let mut v = Verifier::new(vec![s.public_key()]);
        assert_eq!(v.check(1, &payload).unwrap(), b);
        let text = String::from_utf8(payload).unwrap();
        let spaced = text.replacen("[{", "[ {", 1);
        assert_ne!(spaced, text);
        let mut v = Verifier::new(vec![s.public_key()]);
        assert_eq!(v.check(1, spaced.as_bytes()), Err(ChainError::Tampered { seq: 1 }));
    }

    #[test]
    fn a_chain_verifies_and_names_the_first_message_that_does_not_fit() {
        let s = Signer::generate();
        let b1 = s.seal("c", 1, GENESIS_PREV, vec![tick(1)]);
        let b2 = s.seal("c", 1, &b1.hash, vec![tick(2), tick(3)]);
        let b3 = s.seal("c", 1, &b2.hash, vec![tick(4)]);
        let bytes = |b: &Batch| serde_json::to_vec(b).unwrap();
        let mut v = Verifier::new(vec![s.public_key()]);
        for (i, b) in [&b1, &b2, &b3].into_iter().enumerate() {
            v.check(i as u64 + 1, &bytes(b)).unwrap();
        }
        assert_eq!(v.head(), (3, b3.hash.as_str()));

        // Rewrite the second message's records, keeping its hash: tampered.
        let mut forged = b2.clone();
        forged.records = vec![tick(2)];
        let mut v = Verifier::new(vec![s.public_key()]);
        v.check(1, &bytes(&b1)).unwrap();
        assert_eq!(v.check(2, &bytes(&forged)), Err(ChainError::Tampered { seq: 2 }));

        // Re-hash it too: the signature no longer fits (another key signed it).
        let other = Signer::generate();
        let resealed = other.seal("c", 1, &b1.hash, vec![tick(2)]);
        let mut v = Verifier::new(vec![s.public_key()]);
        v.check(1, &bytes(&b1)).unwrap();
        assert!(matches!(
            v.check(2, &bytes(&resealed)),
            Err(ChainError::Signature { seq: 2, .. })
        ));

        // Drop a message: a gap; reorder: broken.
        let mut v = Verifier::new(vec![]);
        v.check(1, &bytes(&b1)).unwrap();
        assert!(matches!(v.check(3, &bytes(&b3)), Err(ChainError::Gap { seq: 2, .. })));
        let mut v = Verifier::new(vec![]);
        v.check(1, &bytes(&b1)).unwrap();
        assert!(matches!(
            v.check(2, &bytes(&b3)),
            Err(ChainError::Broken { seq: 2, .. })
        ));
    }
}
