//! Attachments (spec §1.6, §3.6): inbound media files stored in the `af_media` object store, one
//! record per (message, file) in `af_attachments` under `<message token>.<storage token>`.
//!
//! A file is uploaded first (`POST /v1/media` on ingress streams it into the object store and
//! answers its storageId), then attached to a queued message with `attachMessageMedia`. The
//! Telegram download that feeds this comes with the Telegram ingress. A hydration bundle shows a
//! message's attachments with the record's status, and a download link only while `ready`.
//! `expireOldTelegramAttachments` deletes the file first and then marks the record `expired`,
//! so a crash in between leaves a record that the next sweep finishes; files that no record
//! references (uploaded, never attached) are removed once older than the upload timeout.

use async_nats::jetstream::stream::DirectGetErrorKind;
use common::OpError;
use common::api;
use common::api::attachments::{AttachMediaArgs, AttachmentSweep};
pub use common::api::attachments::{Attachment, AttachmentStatus};
use common::api::history::BundleAttachment;
use common::auth::{Caller, Role};
use common::clock::Millis;
use common::ops::OpRegistry;
use common::runtime_config;
use common::service::ServiceContext;
use common::store::StoreError;
use common::token::escape;
use common::topology::{INBOX_STREAM, inbox_subject};
use futures::StreamExt;
use serde_json::Value;

use crate::fence;

/// Default attachment retention when the message runtime config sets none (spec §2.3).
pub const DEFAULT_RETENTION_MS: i64 = 604_800_000;
/// The original's kinds, and the Telegram kinds it dropped (T3).
const KINDS: [&str; 8] = ["photo", "video", "audio", "voice", "document", "video_note", "animation", "sticker"];
const DEFAULT_SWEEP: usize = 100;
const MAX_SWEEP: usize = 1000;

/// A stored attachment is exactly what the operations return.
pub type AttachmentRecord = Attachment;

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::AttachMessageMedia, _, _, _, _>(
        ctx,
        |ctx, _: Caller, args| async move { attach(&ctx, args).await },
    );
    ops.handle::<api::ListMessageAttachments, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        for_message(&ctx, &args.message_id).await
    });
    ops.handle::<api::ExpireOldTelegramAttachments, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        sweep(&ctx, args.limit.unwrap_or(DEFAULT_SWEEP).clamp(1, MAX_SWEEP)).await
    });
}

fn record_key(message_id: &str, storage_id: &str) -> String {
    format!("{}.{}", escape(message_id), escape(storage_id))
}

/// The link a worker downloads an attachment from (through ingress).
pub fn download_url(ctx: &ServiceContext, storage_id: &str) -> String {
    format!("{}/v1/media/{storage_id}", ctx.settings.http.public_base_url())
}

/// A new storage id for an upload: time-ordered, and safe as a URL path segment and key token.
pub fn new_storage_id() -> String {
    format!("m{}", uuid::Uuid::now_v7().simple())
}

pub async fn for_message(ctx: &ServiceContext, message_id: &str) -> Result<Vec<AttachmentRecord>, OpError> {
    if message_id.is_empty() {
        return Err(OpError::invalid("messageId is required"));
    }
    let records = ctx.buckets.attachments.scan::<AttachmentRecord>(&format!("{}.*", escape(message_id))).await;
    let mut out: Vec<AttachmentRecord> =
        records.map_err(OpError::internal)?.into_iter().map(|(_, v)| v.value).collect();
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.storage_id.cmp(&b.storage_id)));
    Ok(out)
}

async fn by_storage_id(ctx: &ServiceContext, storage_id: &str) -> Result<Option<AttachmentRecord>, OpError> {
    let found = ctx.buckets.attachments.scan::<AttachmentRecord>(&format!("*.{}", escape(storage_id))).await;
    Ok(found.map_err(OpError::internal)?.into_iter().next().map(|(_, v)| v.value))
}

/// Finds an unfinished message of a conversation in its inbox (queued or processing).
async fn pending_job(ctx: &ServiceContext, conversation_id: &str, message_id: &str) -> Result<Option<Value>, OpError> {
    let state = fence::queue_state(ctx, conversation_id).await?;
    let mut next = state.map(|s| s.done_seq + 1).unwrap_or(1);
    let stream = ctx.js.get_stream_no_info(INBOX_STREAM).await.map_err(OpError::internal)?;
    let subject = inbox_subject(&escape(conversation_id));
    loop {
        let message = match stream.direct_get_next_for_subject(&subject, Some(next)).await {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OpError::internal(e)),
        };
        let job: Value = serde_json::from_slice(&message.payload).map_err(OpError::internal)?;
        if job.get("messageId").and_then(Value::as_str) == Some(message_id) {
            return Ok(Some(job));
        }
        next = message.sequence + 1;
    }
}

pub(crate) async fn attach(ctx: &ServiceContext, args: AttachMediaArgs) -> Result<Vec<AttachmentRecord>, OpError> {
    let (message_id, conversation_id) = (args.message_id.as_str(), args.conversation_id.as_str());
    if args.attachments.is_empty() {
        return Err(OpError::invalid("attachments: at least one is required"));
    }
    for a in &args.attachments {
        if !KINDS.contains(&a.kind.as_str()) {
            return Err(OpError::invalid(format!("attachments: kind '{}' is not one of {}", a.kind, KINDS.join(", "))));
        }
    }
    let Some(job) = pending_job(ctx, conversation_id, message_id).await? else {
        return Err(OpError::not_found(format!(
            "message '{message_id}' is not queued or processing in conversation '{conversation_id}'"
        )));
    };
    let existing = for_message(ctx, message_id).await?;
    let max = ctx.settings.attachments.max_per_message;
    if existing.len() + args.attachments.len() > max {
        return Err(OpError::invalid(format!("a message may carry at most {max} attachments")));
    }
    let retention = runtime_config::message_config(ctx)
        .await?
        .and_then(|c| c.telegram_attachment_retention_ms)
        .unwrap_or(DEFAULT_RETENTION_MS);
    let now = ctx.clock.now_ms();
    let field = |name: &str| job.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
    let payload_provider = job.get("payload").and_then(|p| p.get("provider")).and_then(Value::as_str);
    let mut out = Vec::new();
    for a in args.attachments {
        let storage_id = a.storage_id.into_string();
        let info = match ctx.buckets.media.info(&storage_id).await {
            Ok(info) if !info.deleted => info,
            _ => {
                return Err(OpError::not_found(format!(
                    "no uploaded file '{storage_id}' (upload it with POST /v1/media)"
                )));
            }
        };
        if let Some(other) = by_storage_id(ctx, &storage_id).await?.filter(|r| r.message_id != message_id) {
            return Err(OpError::conflict(format!(
                "file '{storage_id}' is already attached to message '{}'",
                other.message_id
            )));
        }
        let record = AttachmentRecord {
            message_id: message_id.to_string(),
            conversation_id: conversation_id.to_string(),
            agent_key: field("agentKey"),
            provider: payload_provider.unwrap_or("telegram").to_string(),
            kind: a.kind,
            status: AttachmentStatus::Ready,
            telegram_file_id: a.telegram_file_id.unwrap_or_default(),
            file_name: a.file_name,
            mime_type: a.mime_type.map(|m| m.trim().to_ascii_lowercase()).filter(|m| !m.is_empty()),
            size_bytes: info.size as u64,
            created_at: now,
            expires_at: now + retention,
            storage_id,
        };
        match ctx.buckets.attachments.create(&record_key(message_id, &record.storage_id), &record).await {
            // Attaching the same file twice is idempotent.
            Ok(_) | Err(StoreError::Conflict { .. }) => out.push(record),
            Err(e) => return Err(OpError::internal(e)),
        }
    }
    Ok(out)
}

/// Gives the payload's attachments their current status and, while ready, a download link;
/// attachments recorded for the message but absent from the payload are added.
pub(crate) async fn hydrate_payload(
    ctx: &ServiceContext,
    message_id: &str,
    payload: &mut serde_json::Map<String, Value>,
) -> Result<(), OpError> {
    let records = for_message(ctx, message_id).await?;
    let listed = payload.get("attachments").and_then(Value::as_array).is_some();
    if records.is_empty() && !listed {
        return Ok(());
    }
    let mut items: Vec<Value> = payload.get("attachments").and_then(Value::as_array).cloned().unwrap_or_default();
    for item in &mut items {
        if let Some(obj) = item.as_object_mut() {
            obj.remove("downloadUrl"); // Never trust a stored link (spec §1.3).
        }
    }
    for record in &records {
        let view = record_view(ctx, record)?;
        let same = |v: &&mut Value| v.get("storageId").and_then(Value::as_str) == Some(record.storage_id.as_str());
        match items.iter_mut().find(|v| same(v)) {
            Some(item) => *item = view,
            None => items.push(view),
        }
    }
    payload.insert("attachments".to_string(), Value::Array(items));
    Ok(())
}

/// The attachment as a bundle shows it (spec §3.5.2).
fn record_view(ctx: &ServiceContext, r: &AttachmentRecord) -> Result<Value, OpError> {
    let view = BundleAttachment {
        kind: r.kind.clone(),
        status: r.status,
        storage_id: r.storage_id.clone(),
        telegram_file_id: r.telegram_file_id.clone(),
        file_name: r.file_name.clone(),
        mime_type: r.mime_type.clone(),
        size_bytes: r.size_bytes,
        expires_at: r.expires_at,
        download_url: (r.status == AttachmentStatus::Ready).then(|| download_url(ctx, &r.storage_id)),
    };
    serde_json::to_value(view).map_err(OpError::internal)
}

/// Whether `caller` may read the file `storage_id`: admins always; a worker only while it
/// holds the lease of the conversation the attachment belongs to, and only a ready one.
pub(crate) async fn authorize_read(ctx: &ServiceContext, caller: &Caller, storage_id: &str) -> Result<(), OpError> {
    let record = by_storage_id(ctx, storage_id).await?;
    match caller.role {
        Role::Admin => Ok(()),
        Role::Worker => {
            let record = record.ok_or_else(|| OpError::not_found(format!("no attachment '{storage_id}'")))?;
            if record.status != AttachmentStatus::Ready {
                return Err(OpError::not_found(format!("attachment '{storage_id}' has expired")));
            }
            fence::require_lease(ctx, caller, &record.conversation_id).await
        }
        _ => Err(OpError::forbidden("only admins and the worker holding the lease may download attachments")),
    }
}

async fn sweep(ctx: &ServiceContext, limit: usize) -> Result<AttachmentSweep, OpError> {
    let now = ctx.clock.now_ms();
    let records = ctx.buckets.attachments.scan::<AttachmentRecord>(">").await.map_err(OpError::internal)?;
    let mut result = AttachmentSweep::default();
    let due = records.iter().filter(|(_, v)| v.value.status == AttachmentStatus::Ready && v.value.expires_at <= now);
    for (key, versioned) in due.take(limit) {
        delete_file(ctx, &versioned.value.storage_id).await?;
        let mut record = versioned.value.clone();
        record.status = AttachmentStatus::Expired;
        match ctx.buckets.attachments.update(key, &record, versioned.revision).await {
            Ok(_) => result.expired += 1,
            Err(StoreError::Conflict { .. }) => {} // Another sweeper got there first.
            Err(e) => return Err(OpError::internal(e)),
        }
    }
    let referenced: std::collections::HashSet<&str> =
        records.iter().map(|(_, v)| v.value.storage_id.as_str()).collect();
    let cutoff = now - ctx.settings.snapshots.upload_timeout_ms;
    let mut objects = ctx.buckets.media.list().await.map_err(OpError::internal)?;
    let mut orphans = Vec::new();
    while let Some(info) = objects.next().await {
        let info = info.map_err(OpError::internal)?;
        let uploaded_at = info.metadata.get("uploadedAt").and_then(|v| v.parse::<Millis>().ok()).unwrap_or(Millis::MIN);
        if !info.deleted && !referenced.contains(info.name.as_str()) && uploaded_at <= cutoff {
            orphans.push(info.name);
        }
    }
    for name in orphans.into_iter().take(limit) {
        // Re-check: it may have been attached since the scan.
        if by_storage_id(ctx, &name).await?.is_none() {
            delete_file(ctx, &name).await?;
            result.orphaned_files_removed += 1;
        }
    }
    Ok(result)
}

async fn delete_file(ctx: &ServiceContext, storage_id: &str) -> Result<(), OpError> {
    use async_nats::jetstream::object_store::DeleteErrorKind;
    match ctx.buckets.media.delete(storage_id).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == DeleteErrorKind::NotFound => Ok(()),
        Err(e) => Err(OpError::internal(e)),
    }
}
