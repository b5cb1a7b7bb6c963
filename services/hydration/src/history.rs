//! Conversation history (spec §3.5.1, fix D3): `appendConversationMessages` and
//! `getConversationHistory`, plus the hydration cache the bundle reads.
//!
//! History is not one ever-growing document. Each append is one message on the conversation's
//! own subject of the `AF_HISTORY` stream, holding the batch of items and the sequence of the
//! batch before it (`prev`). Two things follow:
//!
//! - **Appends are a compare-and-set on the stream**: the batch is published with
//!   `Nats-Expected-Last-Subject-Sequence` = the sequence the appender read, so concurrent
//!   appenders are serialised and none overwrites or interleaves with another. For a worker the
//!   lease is checked before each attempt (see [`crate::fence`]).
//! - **Newest-first reads are cheap**: start at the subject's last message (one direct get) and
//!   follow `prev` pointers (one direct get per batch), never scanning the stream.
//!
//! Retention is the stream's max age (`history.retention_ms`); a walk stops where expired
//! batches were removed. The hydration cache (`af_history_cache`) holds the last 64 items and
//! their fingerprint (spec §1.12) and names the batch sequence it reflects, so a cache that lags
//! (a process died between the publish and the cache write) is detected and rebuilt.

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use common::OpError;
use common::api;
use common::api::history::{AppendMessagesArgs, AppendResult, HistoryArgs, HistoryPage};
pub use common::api::history::{HistoryItem, HistoryRole};
use common::auth::Caller;
use common::clock::Millis;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::store::{StoreError, is_wrong_last_sequence};
use common::token::escape;
use common::topology::{HISTORY_STREAM, history_subject};
use serde::{Deserialize, Serialize};

use crate::fence;

/// The hydration delta window (spec §2.3).
pub const DELTA_WINDOW: usize = 64;
/// Page size limits of `getConversationHistory`.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 200;
/// Bounded retries of the append compare-and-set before reporting a conflict.
const APPEND_ATTEMPTS: usize = 16;
/// A batch must fit a NATS message (1 MiB by default) with room for headers.
const MAX_BATCH_BYTES: usize = 1_000_000;

/// The body of one history stream message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Batch {
    /// Sequence of the previous batch of this conversation, 0 for the first.
    prev: u64,
    items: Vec<HistoryItem>,
}

/// The hydration cache row of one conversation (spec §1.12).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HydrationCache {
    pub conversation_id: String,
    pub agent_key: String,
    pub snapshot_key: String,
    pub last_hydrated_at: Millis,
    pub delta_context: Vec<HistoryItem>,
    pub delta_fingerprint: String,
    /// The history batch this row reflects.
    pub last_seq: u64,
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::AppendConversationMessages, _, _, _, _>(ctx, |ctx, caller: Caller, args| async move {
        append(&ctx, &caller, args).await
    });
    ops.handle::<api::GetConversationHistory, _, _, _, _>(
        ctx,
        |ctx, _: Caller, args| async move { page(&ctx, args).await },
    );
}

pub(crate) async fn history_stream(ctx: &ServiceContext) -> Result<Stream<()>, OpError> {
    ctx.js.get_stream_no_info(HISTORY_STREAM).await.map_err(OpError::internal)
}

async fn append(ctx: &ServiceContext, caller: &Caller, args: AppendMessagesArgs) -> Result<AppendResult, OpError> {
    let conversation_id = args.conversation_id.as_str();
    let max = ctx.settings.history.max_batch_items;
    if args.messages.len() > max {
        return Err(OpError::invalid(format!("messages: at most {max} items per call (history.max_batch_items)")));
    }
    let Some(conversation) = fence::conversation(ctx, conversation_id).await? else {
        return Ok(AppendResult { updated: false, message_count: 0 });
    };
    if args.messages.is_empty() {
        return Ok(AppendResult { updated: true, message_count: 0 });
    }
    let now = ctx.clock.now_ms();
    let items: Vec<HistoryItem> = args
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| HistoryItem { role: m.role, content: m.content, at: m.at.unwrap_or(now + i as Millis) })
        .collect();
    let count = items.len();
    let stream = history_stream(ctx).await?;
    let subject = history_subject(&escape(conversation_id));
    let mut batch = Batch { prev: 0, items };
    for _ in 0..APPEND_ATTEMPTS {
        // The lease is re-checked on every attempt: losing the race to another appender may
        // mean the lease moved on in between.
        fence::require_lease(ctx, caller, conversation_id).await?;
        batch.prev = last_seq(&stream, &subject).await?;
        let body = serde_json::to_vec(&batch).map_err(OpError::internal)?;
        if body.len() > MAX_BATCH_BYTES {
            return Err(OpError::new(
                common::ErrorCode::PayloadTooLarge,
                format!("the history batch is {} bytes; at most {MAX_BATCH_BYTES} per call", body.len()),
            ));
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", batch.prev.to_string().as_str());
        let ack = match ctx.js.publish_with_headers(subject.clone(), headers, body.into()).await {
            Ok(ack) => ack.await,
            Err(e) => return Err(OpError::internal(e)),
        };
        match ack {
            Ok(ack) => {
                let snapshot_key =
                    format!("{}:{}", args.workspace_id.as_deref().unwrap_or("default"), conversation.agent_key);
                refresh_cache(ctx, &stream, &subject, &conversation, &snapshot_key, ack.sequence, &batch).await?;
                return Ok(AppendResult { updated: true, message_count: count });
            }
            Err(e) if is_wrong_last_sequence(&e) => continue,
            Err(e) => return Err(OpError::internal(e)),
        }
    }
    Err(OpError::conflict(format!("history of '{conversation_id}' is being appended concurrently; retry")))
}

/// Sequence of the subject's last batch, 0 when it has none.
async fn last_seq(stream: &Stream<()>, subject: &str) -> Result<u64, OpError> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(msg) => Ok(msg.sequence),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
        Err(e) => Err(OpError::internal(e)),
    }
}

async fn batch_at(stream: &Stream<()>, seq: u64) -> Result<Option<Batch>, OpError> {
    if seq == 0 {
        return Ok(None);
    }
    match stream.direct_get(seq).await {
        Ok(msg) => serde_json::from_slice(&msg.payload).map(Some).map_err(OpError::internal),
        // Removed by retention: the history before this point is gone.
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(OpError::internal(e)),
    }
}

/// Up to `limit` items strictly before position (`seq`, `index`) — `index` counts items of the
/// batch at `seq` — newest first, with the position to continue from.
async fn walk_back(
    stream: &Stream<()>,
    mut seq: u64,
    mut index: Option<usize>,
    limit: usize,
) -> Result<(Vec<HistoryItem>, Option<(u64, usize)>), OpError> {
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(batch) = batch_at(stream, seq).await? else { return Ok((out, None)) };
        let end = index.take().unwrap_or(batch.items.len()).min(batch.items.len());
        let take = (limit - out.len()).min(end);
        out.extend(batch.items[end - take..end].iter().rev().cloned());
        if take < end {
            return Ok((out, Some((seq, end - take))));
        }
        seq = batch.prev;
    }
    Ok((out, (seq != 0).then_some((seq, usize::MAX))))
}

/// Up to the last [`DELTA_WINDOW`] items ending with the batch at `seq`, oldest first.
pub(crate) async fn tail(stream: &Stream<()>, seq: u64) -> Result<Vec<HistoryItem>, OpError> {
    let (mut items, _) = walk_back(stream, seq, None, DELTA_WINDOW).await?;
    items.reverse();
    Ok(items)
}

/// Writes the cache row for the batch just appended at `seq`: extends the cached window when
/// the row reflects the previous batch, and rebuilds it from the stream otherwise.
async fn refresh_cache(
    ctx: &ServiceContext,
    stream: &Stream<()>,
    subject: &str,
    conversation: &common::model::ConversationRecord,
    snapshot_key: &str,
    seq: u64,
    batch: &Batch,
) -> Result<(), OpError> {
    let key = escape(&conversation.conversation_id);
    let store = &ctx.buckets.history_cache;
    for _ in 0..APPEND_ATTEMPTS {
        let current = store.get::<HydrationCache>(&key).await.map_err(OpError::internal)?;
        if current.as_ref().is_some_and(|c| c.value.last_seq >= seq) {
            return Ok(()); // A later append already wrote a newer row.
        }
        let delta = match &current {
            Some(c) if c.value.last_seq == batch.prev => {
                let mut items = c.value.delta_context.clone();
                items.extend(batch.items.iter().cloned());
                let skip = items.len().saturating_sub(DELTA_WINDOW);
                items.split_off(skip)
            }
            _ => tail(stream, seq).await?,
        };
        let row = HydrationCache {
            conversation_id: conversation.conversation_id.clone(),
            agent_key: conversation.agent_key.clone(),
            snapshot_key: snapshot_key.to_string(),
            last_hydrated_at: ctx.clock.now_ms(),
            delta_fingerprint: fingerprint(&delta),
            delta_context: delta,
            last_seq: seq,
        };
        match store.write(&key, &row, current.map(|c| c.revision)).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(OpError::internal(e)),
        }
    }
    // The history itself is stored; a stale cache is detected and rebuilt by its readers.
    tracing::warn!(subject, "hydration cache not updated after repeated conflicts");
    Ok(())
}

/// The cache row of a conversation, rebuilt from the stream when it lags behind it.
pub(crate) async fn current_cache(
    ctx: &ServiceContext,
    conversation: &common::model::ConversationRecord,
) -> Result<Option<HydrationCache>, OpError> {
    let stream = history_stream(ctx).await?;
    let last = last_seq(&stream, &history_subject(&escape(&conversation.conversation_id))).await?;
    let cached = ctx.buckets.history_cache.get::<HydrationCache>(&escape(&conversation.conversation_id)).await;
    let cached = cached.map_err(OpError::internal)?.map(|v| v.value);
    match cached {
        Some(row) if row.last_seq == last => Ok(Some(row)),
        _ if last == 0 => Ok(None),
        row => {
            let delta = tail(&stream, last).await?;
            Ok(Some(HydrationCache {
                conversation_id: conversation.conversation_id.clone(),
                agent_key: conversation.agent_key.clone(),
                snapshot_key: row.map(|r| r.snapshot_key).unwrap_or_default(),
                last_hydrated_at: ctx.clock.now_ms(),
                delta_fingerprint: fingerprint(&delta),
                delta_context: delta,
                last_seq: last,
            }))
        }
    }
}

/// The newest `limit` items of a conversation's history, oldest first (the order of the
/// original's `contextHistory`); empty for a conversation without history.
pub(crate) async fn newest(
    ctx: &ServiceContext,
    conversation_id: &str,
    limit: usize,
) -> Result<Vec<HistoryItem>, OpError> {
    let stream = history_stream(ctx).await?;
    let seq = last_seq(&stream, &history_subject(&escape(conversation_id))).await?;
    let (mut items, _) = walk_back(&stream, seq, None, limit).await?;
    items.reverse();
    Ok(items)
}

async fn page(ctx: &ServiceContext, args: HistoryArgs) -> Result<HistoryPage, OpError> {
    let conversation_id = args.conversation_id.as_str();
    let limit = args.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let stream = history_stream(ctx).await?;
    let (seq, index) = match args.cursor.as_deref() {
        Some(cursor) => parse_cursor(cursor)?,
        None => (last_seq(&stream, &history_subject(&escape(conversation_id))).await?, None),
    };
    let (items, next) = walk_back(&stream, seq, index, limit).await?;
    Ok(HistoryPage {
        conversation_id: conversation_id.to_string(),
        items,
        next_cursor: next.map(|(seq, index)| match index {
            usize::MAX => format!("{seq}"),
            i => format!("{seq}:{i}"),
        }),
    })
}

fn parse_cursor(cursor: &str) -> Result<(u64, Option<usize>), OpError> {
    let bad = || OpError::invalid(format!("cursor '{cursor}' is not a cursor returned by getConversationHistory"));
    let (seq, index) = match cursor.split_once(':') {
        Some((seq, index)) => (seq, Some(index.parse::<usize>().map_err(|_| bad())?)),
        None => (cursor, None),
    };
    Ok((seq.parse::<u64>().map_err(|_| bad())?, index))
}

/// The delta fingerprint of spec §3.5.1: `"f"` + hex of the 32-bit FNV-1a hash, over UTF-16 code
/// units (as JavaScript strings are), of `"<role>:<at>:<content>"` joined with `"|"`.
pub fn fingerprint(items: &[HistoryItem]) -> String {
    let joined =
        items.iter().map(|i| format!("{}:{}:{}", i.role.as_str(), i.at, i.content)).collect::<Vec<_>>().join("|");
    let hash = joined.encode_utf16().fold(2_166_136_261u32, |h, unit| (h ^ u32::from(unit)).wrapping_mul(16_777_619));
    format!("f{hash:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(role: HistoryRole, at: Millis, content: &str) -> HistoryItem {
        HistoryItem { role, content: content.to_string(), at }
    }

    #[test]
    fn fingerprint_matches_the_spec_vector() {
        let items = [item(HistoryRole::User, 1, "hello"), item(HistoryRole::Assistant, 2, "world")];
        assert_eq!(fingerprint(&items), "f575ac2a3");
    }

    #[test]
    fn fingerprint_hashes_utf16_code_units() {
        // A character outside the BMP is two code units in JavaScript; hashing UTF-8 bytes or
        // chars would give different values, so pin that the two differ from a naive hash.
        let astral = [item(HistoryRole::User, 1, "🙂")];
        let naive = "user:1:🙂".bytes().fold(2_166_136_261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16_777_619));
        assert_ne!(fingerprint(&astral), format!("f{naive:x}"));
        assert_eq!(fingerprint(&[]), format!("f{:x}", 2_166_136_261u32));
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(parse_cursor("12").ok(), Some((12, None)));
        assert_eq!(parse_cursor("12:3").ok(), Some((12, Some(3))));
        assert!(parse_cursor("x").is_err());
        assert!(parse_cursor("1:y").is_err());
    }
}
