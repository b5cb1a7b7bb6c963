//! `enqueueMessage`, served by every replica (no leader needed, so ingestion keeps working
//! while leadership moves). It validates against the agent profile, binds the conversation to
//! its agent once (create-only CAS), rewrites the payload as the original does, and publishes
//! the job to the conversation's inbox; the leader learns of it by tailing the inbox stream.
//!
//! A payload's attachments (spec §3.4.1 step 6) are recorded by hydration
//! (`recordPayloadAttachments`, create-only records keyed by messageId + storageId) *before* the
//! message is published, under the id it is about to be published with. A crash between the two
//! leaves records of a message that was never stored: nobody was given that id, so they are
//! invisible, and they expire (deleting their files) with the retention like any record. A crash
//! after the publish loses nothing, since the records were already written. The stored payload
//! carries the recorded values (`status`, `sizeBytes`, `expiresAt`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use bytes::Bytes;
use common::OpError;
use common::api::history::BundleAttachment;
use common::api::queue::PayloadAttachment;
use common::ids::MessageId;
use common::model::{AgentProfile, ConversationRecord, MESSAGE_CONFIG_KEY, MessageConfig, RuntimeConfigRow};
use common::service::ServiceContext;
use common::store::{JsonStore, PublishError};
use futures::StreamExt;

use crate::model::{EnqueueArgs, Job};

/// Conversation bindings never change once made, so they are cached; the cache is simply
/// cleared when it grows past this many entries.
const BINDING_CACHE_LIMIT: usize = 100_000;
const MAX_ID_BYTES: usize = 256;
/// How far ahead a message may be scheduled.
const MAX_SCHEDULE_AHEAD_MS: i64 = 366 * 24 * 60 * 60 * 1000;

/// A KV bucket mirrored in memory through a watch; misses fall back to a read.
#[derive(Clone)]
pub struct WatchedBucket<T> {
    store: JsonStore,
    map: Arc<Mutex<HashMap<String, Option<T>>>>,
}

impl<T: serde::de::DeserializeOwned + Clone + Send + 'static> WatchedBucket<T> {
    pub async fn start(store: JsonStore) -> anyhow::Result<Self> {
        let map: Arc<Mutex<HashMap<String, Option<T>>>> = Arc::default();
        let mut watch = store.raw().watch_all().await?;
        let shared = map.clone();
        tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                let value = match entry.operation {
                    async_nats::jetstream::kv::Operation::Put => serde_json::from_slice(&entry.value).ok(),
                    _ => None,
                };
                if let Ok(mut m) = shared.lock() {
                    m.insert(entry.key, value);
                }
            }
        });
        Ok(Self { store, map })
    }

    pub async fn get(&self, key: &str) -> Result<Option<T>, OpError> {
        if let Some(hit) = self.map.lock().ok().and_then(|m| m.get(key).cloned()) {
            return Ok(hit);
        }
        let value = self.store.get::<T>(key).await?.map(|v| v.value);
        if let Ok(mut m) = self.map.lock() {
            m.entry(key.to_string()).or_insert_with(|| value.clone());
        }
        Ok(value)
    }
}

#[derive(Clone)]
pub struct Enqueuer {
    ctx: ServiceContext,
    profiles: WatchedBucket<AgentProfile>,
    runtime: WatchedBucket<RuntimeConfigRow<MessageConfig>>,
    bindings: Arc<Mutex<HashMap<String, String>>>,
}

impl Enqueuer {
    pub async fn start(ctx: ServiceContext) -> anyhow::Result<Self> {
        Ok(Self {
            profiles: WatchedBucket::start(ctx.buckets.profiles.clone()).await?,
            runtime: WatchedBucket::start(ctx.buckets.runtime_config.clone()).await?,
            bindings: Arc::default(),
            ctx,
        })
    }

    /// Validates, binds and publishes; returns the message id (the existing one for a repeated
    /// idempotency key).
    pub async fn enqueue(&self, args: EnqueueArgs) -> Result<MessageId, OpError> {
        let q = &self.ctx.settings.queue;
        let (conversation_id, agent_key) = (args.conversation_id.into_string(), args.agent_key.into_string());
        let profile = self.profiles.get(&common::token::escape(&agent_key)).await?;
        if !profile.is_some_and(|p| p.enabled) {
            return Err(OpError::not_found(format!("Agent profile '{agent_key}' not found or disabled")));
        }
        let mut payload = args.payload;
        let provider_user_id = match payload.get("providerUserId") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            other => {
                let shown = other.map(|v| v.to_string()).unwrap_or_else(|| "undefined".to_string());
                return Err(OpError::invalid(format!(
                    "providerUserId is required but missing in payload.providerUserId={shown}"
                )));
            }
        };
        if payload.get("provider").is_none_or(|p| p.as_str().is_none_or(|s| s.trim().is_empty())) {
            return Err(OpError::invalid("payload.provider must be a non-empty string"));
        }
        let text = match payload.get("messageText") {
            Some(serde_json::Value::String(s)) => s.clone(),
            None => String::new(),
            Some(_) => return Err(OpError::invalid("payload.messageText must be a string")),
        };
        let attachments = PayloadAttachment::parse_list(payload.get("attachments"))?;
        let max_attachments = self.ctx.settings.attachments.max_per_message;
        if attachments.len() > max_attachments {
            return Err(OpError::invalid(format!(
                "payload.attachments: a message may carry at most {max_attachments} attachments, got {}",
                attachments.len()
            )));
        }
        let has_attachments = !attachments.is_empty();
        if text.trim().is_empty() && !has_attachments {
            return Err(OpError::invalid("payload.messageText must not be empty when there are no attachments"));
        }
        let max_attempts = match args.max_attempts {
            None => q.max_attempts,
            Some(n) if (1..=100).contains(&n) => n as u32,
            Some(n) => {
                return Err(OpError::invalid(format!("maxAttempts must be between 1 and 100, got {n}")));
            }
        };
        if let Some(s) = args.scheduled_for {
            if s < 0 {
                return Err(OpError::invalid("scheduledFor must not be negative"));
            }
            // A message due in the far future would hold back its conversation for good.
            if s > self.ctx.clock.now_ms().saturating_add(MAX_SCHEDULE_AHEAD_MS) {
                return Err(OpError::invalid("scheduledFor must be at most 366 days ahead"));
            }
        }
        let idempotency_key = match args.idempotency_key.as_deref().map(str::trim) {
            Some("") => {
                return Err(OpError::invalid("idempotencyKey must not be empty when given"));
            }
            Some(k) if k.len() > MAX_ID_BYTES => {
                return Err(OpError::invalid(format!("idempotencyKey is longer than {MAX_ID_BYTES} bytes")));
            }
            other => other.map(str::to_string),
        };

        // The payload rewrite of spec §3.4.1 step 3.
        let prompt = self
            .runtime
            .get(MESSAGE_CONFIG_KEY)
            .await?
            .and_then(|row| row.config.system_prompt)
            .filter(|p| !p.trim().is_empty());
        if let Some(prompt) = prompt {
            let trimmed = text.trim_end();
            let rewritten = if trimmed.is_empty() { prompt } else { format!("{trimmed}\n\n{prompt}") };
            payload.insert("messageText".into(), rewritten.into());
        }
        payload.insert("providerUserId".into(), provider_user_id.clone().into());
        let mut metadata = match payload.remove("metadata") {
            Some(serde_json::Value::Object(m)) => m,
            None | Some(serde_json::Value::Null) => Default::default(),
            Some(_) => {
                return Err(OpError::invalid("payload.metadata must be an object of strings"));
            }
        };
        metadata.insert("providerUserId".into(), provider_user_id.into());
        payload.insert("metadata".into(), metadata.into());

        if has_attachments {
            // The items as read (unknown fields refused, links dropped); replaced by the records below.
            let given = serde_json::to_value(&attachments).map_err(OpError::internal)?;
            payload.insert("attachments".into(), given);
        }

        self.bind(&conversation_id, &agent_key).await?;

        let now = self.ctx.clock.now_ms();
        let mut job = Job {
            message_id: uuid::Uuid::now_v7().to_string(),
            conversation_id: conversation_id.clone(),
            agent_key,
            payload: serde_json::value::to_raw_value(&payload).map_err(OpError::internal)?,
            priority: clamp_priority(args.priority, q.default_priority, q.max_priority),
            scheduled_for: args.scheduled_for.unwrap_or(now),
            max_attempts,
            enqueued_at: now,
        };
        let mut body = self.encode(&job)?;
        if has_attachments {
            let provider = payload.get("provider").and_then(|p| p.as_str()).unwrap_or_default().to_string();
            let record = common::api::attachments::RecordPayloadAttachmentsArgs {
                message_id: MessageId::trusted(job.message_id.clone()),
                conversation_id: common::ids::ConversationId::trusted(conversation_id.clone()),
                agent_key: common::ids::AgentKey::trusted(job.agent_key.clone()),
                provider,
                attachments,
            };
            let records = self.ctx.call_service::<common::api::RecordPayloadAttachments>(&record).await?;
            let stored: Vec<BundleAttachment> = records
                .into_iter()
                .map(|r| BundleAttachment {
                    kind: r.kind,
                    status: r.status,
                    storage_id: r.storage_id,
                    telegram_file_id: r.telegram_file_id,
                    file_name: r.file_name,
                    mime_type: r.mime_type,
                    size_bytes: r.size_bytes,
                    expires_at: r.expires_at,
                    download_url: None,
                })
                .collect();
            payload.insert("attachments".into(), serde_json::to_value(stored).map_err(OpError::internal)?);
            job.payload = serde_json::value::to_raw_value(&payload).map_err(OpError::internal)?;
            body = self.encode(&job)?;
        }
        let subject = common::topology::inbox_subject(&common::token::escape(&conversation_id));
        let mut headers = async_nats::HeaderMap::new();
        if let Some(key) = &idempotency_key {
            // Scoped per conversation so two conversations may reuse a key.
            headers.insert("Nats-Msg-Id", format!("{}:{key}", common::token::escape(&conversation_id)).as_str());
        }
        common::telemetry::inject_current_context(&mut headers);
        let ack = common::store::publish_acked(&self.ctx.nats, subject, headers, Bytes::from(body)).await.map_err(
            |e| match e {
                PublishError::Unknown(_) => OpError::unavailable(format!(
                    "the message may not have been stored: {e}; retry with the same idempotencyKey"
                )),
                _ => OpError::unavailable(format!("could not store the message: {e}")),
            },
        )?;
        if ack.duplicate {
            return self.message_id_at(ack.seq).await.map(MessageId::trusted);
        }
        metrics::counter!(common::telemetry::ENQUEUED).increment(1);
        Ok(MessageId::trusted(job.message_id))
    }

    /// The inbox message of `job`, refused when over `queue.max_message_bytes`.
    fn encode(&self, job: &Job) -> Result<Vec<u8>, OpError> {
        let body = serde_json::to_vec(job).map_err(OpError::internal)?;
        let limit = self.ctx.settings.queue.max_message_bytes;
        if body.len() > limit {
            return Err(OpError::new(
                common::ErrorCode::PayloadTooLarge,
                format!("the message is {} bytes; the limit is {limit} (queue.max_message_bytes)", body.len()),
            ));
        }
        Ok(body)
    }

    /// Binds `conversation_id` to `agent_key` on first use; refuses another agent later.
    async fn bind(&self, conversation_id: &str, agent_key: &str) -> Result<(), OpError> {
        let cached = self.bindings.lock().ok().and_then(|m| m.get(conversation_id).cloned());
        let existing = match cached {
            Some(bound) => bound,
            None => {
                let key = common::token::escape(conversation_id);
                let store = &self.ctx.buckets.conversations;
                let record = ConversationRecord {
                    conversation_id: conversation_id.to_string(),
                    agent_key: agent_key.to_string(),
                    created_at: self.ctx.clock.now_ms(),
                };
                let bound = match store.create(&key, &record).await {
                    Ok(_) => record.agent_key,
                    Err(e) if e.is_conflict() => store
                        .get::<ConversationRecord>(&key)
                        .await?
                        .map(|v| v.value.agent_key)
                        .ok_or_else(|| OpError::conflict("conversation binding changed concurrently; retry"))?,
                    Err(e) => return Err(e.into()),
                };
                if let Ok(mut m) = self.bindings.lock() {
                    if m.len() >= BINDING_CACHE_LIMIT {
                        m.clear();
                    }
                    m.insert(conversation_id.to_string(), bound.clone());
                }
                bound
            }
        };
        if existing != agent_key {
            return Err(OpError::conflict(format!(
                "Conversation '{conversation_id}' is already bound to agent '{existing}', cannot enqueue for '{agent_key}'."
            )));
        }
        Ok(())
    }

    async fn message_id_at(&self, seq: u64) -> Result<String, OpError> {
        let stream = self.ctx.js.get_stream(common::topology::INBOX_STREAM).await.map_err(OpError::internal)?;
        let msg = stream.direct_get(seq).await.map_err(OpError::internal)?;
        let job: Job = serde_json::from_slice(&msg.payload).map_err(OpError::internal)?;
        Ok(job.message_id)
    }
}

/// `clamp(priority ?? default, 0, max)`, rounding fractional priorities down.
pub fn clamp_priority(priority: Option<f64>, default: i64, max: i64) -> i64 {
    match priority {
        Some(p) if p.is_finite() => (p.floor() as i64).clamp(0, max),
        _ => default,
    }
}

/// The inbox stream, for readers that need stream-level access.
pub async fn inbox(js: &jetstream::Context) -> Result<jetstream::stream::Stream, OpError> {
    js.get_stream(common::topology::INBOX_STREAM).await.map_err(OpError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_is_clamped() {
        assert_eq!(clamp_priority(None, 50, 100), 50);
        assert_eq!(clamp_priority(Some(-5.0), 50, 100), 0);
        assert_eq!(clamp_priority(Some(1000.0), 50, 100), 100);
        assert_eq!(clamp_priority(Some(70.9), 50, 100), 70);
        assert_eq!(clamp_priority(Some(f64::NAN), 50, 100), 50);
    }
}
