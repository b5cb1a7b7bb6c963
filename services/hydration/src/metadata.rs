//! `attachMessageMetadata` (spec §3.4.8): merges keys into a message's `payload.metadata`.
//!
//! An inbox message is immutable, so the keys are stored beside it, one record per message in
//! `af_message_metadata` under `<conversation token>.<message token>` (see `common::extras`),
//! merged by compare-and-set (`JsonStore::modify`), and applied wherever the payload is served:
//! the hydration bundle here, `listQueueItemsForConversation` in queue-manager. A claim hands out
//! the payload as enqueued.
//!
//! Finding the message: the original looked it up by id. Here messages live in their
//! conversation's inbox subject, so the conversation comes from the caller (`conversationId`,
//! optional), from the lease a worker holds, from the dead-letter record, or — for an admin or
//! app that gives only the id — from the time in the id: message ids are UUIDv7, minted just
//! before the message is published, and inbox timestamps grow with the stream sequence, so a
//! binary search over the stream finds where that moment starts and a short forward scan finds
//! the message (see [`locate`]).

use std::collections::BTreeMap;

use async_nats::jetstream::stream::DirectGetErrorKind;
use common::OpError;
use common::api;
use common::api::attachments::AttachMetadataArgs;
use common::auth::{Caller, Role};
use common::extras::{MessageMetadata, metadata_key};
use common::model::WorkerRow;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::token::escape;
use common::topology::{INBOX_STREAM, INBOX_SUBJECT_PREFIX, inbox_subject};
use serde::Deserialize;

use crate::fence;

pub const MAX_KEY_BYTES: usize = 128;
pub const MAX_VALUE_BYTES: usize = 4096;
/// Bounds of the keys attached to one message, all calls together.
pub const MAX_KEYS: usize = 64;
pub const MAX_TOTAL_BYTES: usize = 16_384;
/// How far before the time in a message id its inbox message may be stamped (clock skew
/// between the enqueuing process and the NATS server).
const SEARCH_BEFORE_MS: i64 = 2_000;
/// How far after: enqueue publishes right after minting the id, within one request timeout.
const SEARCH_AFTER_MS: i64 = 60_000;
/// Inbox messages looked at in one search after the binary search, at most.
const SEARCH_MAX_SCAN: usize = 100_000;

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::AttachMessageMetadata, _, _, _, _>(ctx, |ctx, caller: Caller, args| async move {
        attach_metadata(&ctx, &caller, args).await
    });
}

fn validate(metadata: &BTreeMap<String, String>) -> Result<(), OpError> {
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
            return Err(OpError::invalid(format!(
                "metadata: keys must be 1-{MAX_KEY_BYTES} bytes without control characters (key '{}')",
                key.chars().take(40).collect::<String>().escape_debug()
            )));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(OpError::invalid(format!(
                "metadata.{key}: must be at most {MAX_VALUE_BYTES} bytes, got {}",
                value.len()
            )));
        }
    }
    Ok(())
}

fn check_totals(merged: &BTreeMap<String, String>) -> Result<(), OpError> {
    if merged.len() > MAX_KEYS {
        return Err(OpError::invalid(format!(
            "metadata: a message may carry at most {MAX_KEYS} attached keys, this would make {}",
            merged.len()
        )));
    }
    let total: usize = merged.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_TOTAL_BYTES {
        return Err(OpError::invalid(format!(
            "metadata: the keys and values attached to a message may total at most {MAX_TOTAL_BYTES} bytes, \
             this would make {total}"
        )));
    }
    Ok(())
}

async fn attach_metadata(ctx: &ServiceContext, caller: &Caller, args: AttachMetadataArgs) -> Result<bool, OpError> {
    validate(&args.metadata)?;
    let message_id = args.message_id.as_str();
    let conversation_id = if caller.role == Role::Worker {
        // A worker attaches to the message it holds the lease of, and nothing else.
        let worker_id = caller.worker_id.as_deref().unwrap_or_default();
        let conversation_id = match args.conversation_id.as_deref() {
            Some(c) => Some(c.to_string()),
            None => assigned_conversation(ctx, worker_id).await?,
        };
        let Some(conversation_id) = conversation_id else {
            return Err(OpError::forbidden(format!("worker '{worker_id}' holds no lease of message '{message_id}'")));
        };
        let state = fence::queue_state(ctx, &conversation_id).await?;
        let leased = state.as_ref().is_some_and(|s| {
            s.head.as_ref().is_some_and(|h| h.message_id == message_id)
                && fence::holds_lease(s, worker_id, ctx.clock.now_ms())
        });
        if !leased {
            return Err(OpError::forbidden(format!(
                "worker '{worker_id}' does not hold the lease of message '{message_id}' (expired, finished or \
                 never its own)"
            )));
        }
        conversation_id
    } else {
        match locate(ctx, message_id, args.conversation_id.as_deref()).await? {
            Some(conversation_id) => conversation_id,
            None => return Ok(false),
        }
    };
    if args.metadata.is_empty() {
        return Ok(true);
    }
    let now = ctx.clock.now_ms();
    let key = metadata_key(&conversation_id, message_id);
    ctx.buckets
        .message_metadata
        .modify::<MessageMetadata, OpError, _>(&key, |current| {
            let mut record = current.unwrap_or_else(|| MessageMetadata {
                message_id: message_id.to_string(),
                conversation_id: conversation_id.clone(),
                metadata: BTreeMap::new(),
                updated_at: now,
            });
            record.metadata.extend(args.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
            check_totals(&record.metadata)?;
            record.updated_at = now;
            Ok(Some(record))
        })
        .await?;
    Ok(true)
}

async fn assigned_conversation(ctx: &ServiceContext, worker_id: &str) -> Result<Option<String>, OpError> {
    let row = ctx.buckets.workers.get::<WorkerRow>(&escape(worker_id)).await.map_err(OpError::internal)?;
    Ok(row.and_then(|r| r.value.assignment).map(|a| a.conversation_id))
}

/// The conversation of message `message_id` (in `conversation_id` when given), or `None` when
/// the queue does not have it: never enqueued, or aged out of the inbox
/// (`queue.inbox_max_age_ms`).
pub(crate) async fn locate(
    ctx: &ServiceContext,
    message_id: &str,
    conversation_id: Option<&str>,
) -> Result<Option<String>, OpError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Ids {
        message_id: String,
        conversation_id: String,
    }
    #[derive(Deserialize)]
    struct DeadLetter {
        job: Ids,
    }
    let in_scope = |found: &str| conversation_id.is_none_or(|c| c == found);
    if let Some(dead) = ctx.buckets.dead_letters.get::<DeadLetter>(message_id).await.map_err(OpError::internal)? {
        let found = dead.value.job.conversation_id;
        return Ok(in_scope(&found).then_some(found));
    }
    let Some(minted_ms) = uuid7_millis(message_id) else {
        return Ok(None); // Not an id enqueue mints.
    };
    let stream = ctx.js.get_stream(INBOX_STREAM).await.map_err(OpError::internal)?;
    let (first, last) = (stream.cached_info().state.first_sequence, stream.cached_info().state.last_sequence);
    let filter = match conversation_id {
        Some(c) => inbox_subject(&escape(c)),
        None => format!("{INBOX_SUBJECT_PREFIX}.>"),
    };
    let next = |seq: u64| {
        let (stream, filter) = (&stream, &filter);
        async move {
            match stream.direct_get_next_for_subject(filter.as_str(), Some(seq)).await {
                Ok(message) => Ok(Some(message)),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(OpError::internal(e)),
            }
        }
    };
    let stamped =
        |m: &async_nats::jetstream::message::StreamMessage| (m.time.unix_timestamp_nanos() / 1_000_000) as i64;
    // The first sequence whose (next matching) message is stamped at or after the search start.
    let start = minted_ms - SEARCH_BEFORE_MS;
    let (mut lo, mut hi) = (first.max(1), last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match next(mid).await? {
            Some(m) if stamped(&m) < start => lo = m.sequence + 1,
            _ => hi = mid,
        }
    }
    let mut seq = lo;
    for _ in 0..SEARCH_MAX_SCAN {
        let Some(m) = next(seq).await? else { break };
        if stamped(&m) > minted_ms + SEARCH_AFTER_MS {
            break;
        }
        if let Ok(ids) = serde_json::from_slice::<Ids>(&m.payload)
            && ids.message_id == message_id
        {
            return Ok(Some(ids.conversation_id));
        }
        seq = m.sequence + 1;
    }
    Ok(None)
}

/// The time (ms since the epoch) a UUIDv7 was minted at.
fn uuid7_millis(id: &str) -> Option<i64> {
    let uuid = uuid::Uuid::parse_str(id).ok().filter(|u| u.get_version_num() == 7)?;
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    Some(secs as i64 * 1000 + i64::from(nanos / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid7_ids_carry_their_minting_time() {
        let id = uuid::Uuid::now_v7().to_string();
        let ms = uuid7_millis(&id).expect("v7");
        assert!(ms > 1_700_000_000_000, "{ms}");
        assert_eq!(uuid7_millis(&uuid::Uuid::new_v4().to_string()), None);
        assert_eq!(uuid7_millis("m-nope"), None);
    }

    #[test]
    fn metadata_bounds() {
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(validate(&one("k", "v")).is_ok());
        assert!(validate(&one("", "v")).is_err());
        assert!(validate(&one("a\nb", "v")).is_err());
        assert!(validate(&one(&"k".repeat(129), "v")).is_err());
        assert!(validate(&one("k", &"v".repeat(4097))).unwrap_err().message.starts_with("metadata.k:"));
        let many: BTreeMap<String, String> = (0..65).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(check_totals(&many).is_err());
        let big: BTreeMap<String, String> = (0..5).map(|i| (format!("k{i}"), "v".repeat(4000))).collect();
        assert!(check_totals(&big).is_err());
    }
}
