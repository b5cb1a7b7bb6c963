//! Typed JSON access to KV buckets where every write is a compare-and-set. A lost race is
//! `StoreError::Conflict`, never a string to parse; callers retry or report 409.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("compare-and-set conflict on '{key}'")]
    Conflict { key: String },
    #[error("stored value of '{key}' is not valid: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{op} '{key}': {source}")]
    Nats {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

/// A value with the KV revision it was read at; the revision is the CAS (and fencing) token.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

/// A KV bucket of JSON documents. Cheap to clone (a `kv::Store` carries the stream's whole
/// info, so it is shared rather than copied).
#[derive(Clone)]
pub struct JsonStore {
    kv: std::sync::Arc<kv::Store>,
    /// Carries compare-and-set updates itself (see `update_bytes`).
    nats: async_nats::Client,
}

impl JsonStore {
    pub fn new(kv: kv::Store, nats: async_nats::Client) -> Self {
        Self { kv: std::sync::Arc::new(kv), nats }
    }

    pub fn raw(&self) -> &kv::Store {
        &self.kv
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<Versioned<T>>, StoreError> {
        let entry = self.kv.entry(key).await.map_err(|e| nats_err("get", key, e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some(Versioned { value: decode(key, &e.value)?, revision: e.revision }))
            }
            _ => Ok(None),
        }
    }

    /// Writes `value` only if the key does not exist (or was deleted). Returns the new revision.
    pub async fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<u64, StoreError> {
        let bytes = encode(key, value)?;
        // A key never written before (every new conversation's first lease) is one publish.
        // Anything else, including a key whose last entry is a delete marker, goes through
        // the client's create, which knows those cases.
        match self.update_bytes(key, bytes.clone(), 0).await {
            Err(StoreError::Conflict { .. }) => {}
            done => return done,
        }
        self.kv.create(key, bytes).await.map_err(|e| match e.kind() {
            kv::CreateErrorKind::AlreadyExists => StoreError::Conflict { key: key.to_string() },
            _ if is_wrong_last_sequence(&e) => StoreError::Conflict { key: key.to_string() },
            _ => nats_err("create", key, e),
        })
    }

    /// Writes `value` only if the key is still at `revision`. Returns the new revision.
    pub async fn update<T: Serialize>(&self, key: &str, value: &T, revision: u64) -> Result<u64, StoreError> {
        let bytes = encode(key, value)?;
        self.update_bytes(key, bytes, revision).await
    }

    /// Published with `publish_acked` (every queue lease is one of these writes).
    pub async fn update_bytes(&self, key: &str, bytes: Bytes, revision: u64) -> Result<u64, StoreError> {
        if self.kv.use_jetstream_prefix || !is_valid_key(key) {
            return self.update_via_client(key, bytes, revision).await;
        }
        let subject = format!("{}{key}", self.kv.put_prefix.as_deref().unwrap_or(&self.kv.prefix));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string().as_str());
        match publish_acked(&self.nats, subject, headers, bytes).await {
            Ok(ack) => Ok(ack.seq),
            Err(PublishError::Rejected { code: 10071 | 10164, .. }) => {
                Err(StoreError::Conflict { key: key.to_string() })
            }
            Err(e) => Err(nats_err("update", key, e)),
        }
    }

    async fn update_via_client(&self, key: &str, bytes: Bytes, revision: u64) -> Result<u64, StoreError> {
        self.kv.update(key, bytes, revision).await.map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict { key: key.to_string() },
            _ if is_wrong_last_sequence(&e) => StoreError::Conflict { key: key.to_string() },
            _ => nats_err("update", key, e),
        })
    }

    /// Create when `revision` is `None`, update otherwise.
    pub async fn write<T: Serialize>(&self, key: &str, value: &T, revision: Option<u64>) -> Result<u64, StoreError> {
        match revision {
            None => self.create(key, value).await,
            Some(rev) => self.update(key, value, rev).await,
        }
    }

    /// Deletes only if the key is still at `revision`.
    pub async fn delete(&self, key: &str, revision: u64) -> Result<(), StoreError> {
        self.kv.delete_expect_revision(key, Some(revision)).await.map_err(|e| {
            if e.to_string().contains("wrong last sequence") {
                StoreError::Conflict { key: key.to_string() }
            } else {
                nats_err("delete", key, e)
            }
        })
    }

    /// Read-modify-write with retries on conflict. `f` gets the current value (or `None`) and
    /// returns the new value, or `Ok(None)` to leave the key unchanged.
    pub async fn modify<T, E, F>(&self, key: &str, mut f: F) -> Result<Option<Versioned<T>>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<StoreError>,
        F: FnMut(Option<T>) -> Result<Option<T>, E>,
    {
        const ATTEMPTS: usize = 64;
        for _ in 0..ATTEMPTS {
            let current = self.get::<T>(key).await?;
            let revision = current.as_ref().map(|c| c.revision);
            let Some(next) = f(current.map(|c| c.value))? else {
                return Ok(None);
            };
            match self.write(key, &next, revision).await {
                Ok(revision) => {
                    return Ok(Some(Versioned { value: next, revision }));
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict { key: key.to_string() }.into())
    }

    /// Every live key of the bucket.
    pub async fn keys(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.list(">").await?.into_keys().collect())
    }

    /// The live entries whose key matches `filter` (a NATS subject pattern relative to the
    /// bucket, e.g. `"u.*"` or `"conv.>"`), decoded, in key order.
    pub async fn scan<T: DeserializeOwned>(&self, filter: &str) -> Result<Vec<(String, Versioned<T>)>, StoreError> {
        let entries = self.list(filter).await?;
        entries
            .into_iter()
            .map(|(key, (revision, bytes))| Ok((key.clone(), Versioned { value: decode(&key, &bytes)?, revision })))
            .collect()
    }

    /// Every live entry, decoded. Entries that fail to decode are reported, not hidden.
    pub async fn all<T: DeserializeOwned>(&self) -> Result<Vec<(String, Versioned<T>)>, StoreError> {
        self.scan(">").await
    }

    /// The live entries matching `filter` with their revisions: every key that exists for the
    /// whole listing is in it, at its last revision seen, even while other processes write.
    ///
    /// A sweep of batched direct gets, each answering the next messages at or after a
    /// sequence on the filtered subjects, read from the store under the stream's isolation
    /// lock. A key always has one message (nats-server stores a rewrite before it removes the
    /// entry it replaces), and a rewrite only moves it forward, so a key the sweep has not
    /// reached yet is met ahead of it. A listing by consumer is not complete: its pending
    /// count learns of a stored message asynchronously but of a removal at once, so it can
    /// read 0 while a rewritten key's new entry is still unannounced, and a reader that stops
    /// there misses the key (up to 6 listings in 300 under one concurrent writer, with nats-server
    /// 2.15.1; `store::listings_stay_complete_while_keys_are_rewritten`).
    async fn list(&self, filter: &str) -> Result<BTreeMap<String, (u64, Bytes)>, StoreError> {
        use futures::StreamExt;
        // Below async-nats's default subscription capacity (65,536 messages), so a batch never
        // overflows it, and bounded in bytes so a bucket of large documents comes in parts.
        const BATCH: u64 = 10_000;
        const BATCH_BYTES: u64 = 8 << 20;
        let err = |e: &dyn std::fmt::Display| StoreError::Nats {
            op: "list",
            key: filter.to_string(),
            source: e.to_string().into(),
        };
        let api = format!("$JS.API.DIRECT.GET.{}", self.kv.stream_name);
        let subjects = format!("{}{filter}", self.kv.prefix);
        let inbox = self.nats.new_inbox();
        let mut replies = self.nats.subscribe(inbox.clone()).await.map_err(|e| err(&e))?;
        let mut out = BTreeMap::new();
        let mut next = 1;
        loop {
            let request =
                serde_json::json!({"seq": next, "next_by_subj": subjects, "batch": BATCH, "max_bytes": BATCH_BYTES});
            self.nats
                .publish_with_reply(api.clone(), inbox.clone(), request.to_string().into())
                .await
                .map_err(|e| err(&e))?;
            loop {
                let reply = tokio::time::timeout(LIST_REPLY_TIMEOUT, replies.next())
                    .await
                    .map_err(|_| err(&"no answer from the stream"))?
                    .ok_or_else(|| err(&"connection closed"))?;
                let header = |name: &str| reply.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str());
                match reply.status.map(|s| s.as_u16()) {
                    // Nothing at or after `next`: the sweep is done.
                    Some(404) => return Ok(out),
                    // End of this batch; none left when it began means none left now.
                    Some(204) => match header("Nats-Num-Pending") {
                        Some("0") => return Ok(out),
                        _ => break,
                    },
                    Some(code) => return Err(err(&format!("direct get answered {code}"))),
                    None => {}
                }
                let (Some(subject), Some(sequence)) = (header("Nats-Subject"), header("Nats-Sequence")) else {
                    return Err(err(&"direct get answered without a subject or sequence"));
                };
                let revision: u64 = sequence.parse().map_err(|_| err(&"direct get answered a bad sequence"))?;
                let key = subject.strip_prefix(self.kv.prefix.as_str()).unwrap_or(subject).to_string();
                if header("KV-Operation").is_some() {
                    out.remove(&key);
                } else {
                    out.insert(key, (revision, reply.payload));
                }
                next = revision + 1;
            }
        }
    }
}

/// How long a listing waits for each answer of the stream before it fails.
const LIST_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Replicated buckets report a lost CAS as JetStream error 10164 ("wrong last sequence") rather
/// than 10071, and async-nats maps only the latter to a typed kind (see nats-anchors §4).
pub fn is_wrong_last_sequence(e: &dyn std::error::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("10164") || text.contains("10071") || text.contains("wrong last sequence") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A stored JetStream publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
    /// The stream already held a message with this `Nats-Msg-Id`; `seq` is that message's.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Nothing received the message (no stream listens on the subject): it was not stored.
    #[error("no stream accepts this subject")]
    NotStored,
    /// The request failed in a way that leaves open whether it was stored (e.g. a timeout).
    #[error("{0}")]
    Unknown(async_nats::RequestError),
    #[error("JetStream refused the message ({code}): {description}")]
    Rejected { code: u64, description: String },
    #[error("unreadable publish ack: {0}")]
    BadAck(String),
}

/// Publishes to a stream and waits for its ack. async-nats reads acks through an untagged
/// enum that buffers the reply and formats an error for every success; this reads them into a
/// flat struct, which took a fifth off the cost of a queue lease write.
pub async fn publish_acked(
    nats: &async_nats::Client,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Bytes,
) -> Result<Ack, PublishError> {
    let reply = nats.request_with_headers(subject, headers, payload).await.map_err(|e| match e.kind() {
        async_nats::RequestErrorKind::NoResponders => PublishError::NotStored,
        _ => PublishError::Unknown(e),
    })?;
    let ack: PubAck = serde_json::from_slice(&reply.payload).map_err(|e| PublishError::BadAck(e.to_string()))?;
    match (ack.seq, ack.error) {
        (_, Some(e)) => Err(PublishError::Rejected { code: e.err_code, description: e.description }),
        (Some(seq), None) => Ok(Ack { seq, duplicate: ack.duplicate }),
        (None, None) => Err(PublishError::BadAck("no sequence".into())),
    }
}

#[derive(serde::Deserialize)]
struct PubAck {
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// async-nats's own key rule (not exported): tokens of `[-/_=.a-zA-Z0-9]`, no leading or
/// trailing dot.
fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'=' | b'.'))
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Bytes, StoreError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

fn nats_err(op: &'static str, key: &str, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Nats { op, key: key.to_string(), source: Box::new(e) }
}
