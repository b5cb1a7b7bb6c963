//! Attachments (spec §1.6, §3.6): inbound media files stored in the `af_media` object store, one
//! record per (message, file) in `af_attachments` under `<message token>.<storage token>`.
//!
//! A file is uploaded first (`POST /v1/media` on ingress streams it into the object store and
//! answers its storageId), then attached to a message: in its enqueue payload
//! (`payload.attachments`, recorded by `recordPayloadAttachments`, which queue-manager calls
//! *before* it publishes the message, so a stored message always has its records), or later
//! with `attachMessageMedia`. The Telegram download that feeds this comes with the Telegram
//! ingress. A hydration bundle shows a message's attachments with the record's status, and a
//! download link only while `ready`.
//!
//! `expireOldTelegramAttachments` deletes the file first and then marks the record `expired`,
//! so a crash in between leaves a record that the next sweep finishes. A file may be named by
//! records of several messages (an enqueue retried after a crash records it under the new
//! message id too); it is deleted when the last of its ready records expires. Files that no
//! record references (uploaded, never attached) are removed once older than the upload timeout.

use async_nats::jetstream::stream::DirectGetErrorKind;
use common::OpError;
use common::api;
use common::api::attachments::{AttachMediaArgs, MediaUploadUrl, RecordPayloadAttachmentsArgs};
pub use common::api::attachments::{Attachment, AttachmentStatus};
use common::auth::{Caller, Role};
use common::clock::Millis;
use common::extras::{apply_attachment_records, attachment_key};
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
const KINDS: [&str; 8] = common::api::attachments::AttachmentKind::NAMES;
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
    ops.handle::<api::RecordPayloadAttachments, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        record_payload(&ctx, args).await
    });
    ops.handle::<api::GenerateMediaUploadUrl, _, _, _, _>(ctx, |ctx, _: Caller, _| async move {
        Ok(MediaUploadUrl { upload_url: upload_url(&ctx) })
    });
    ops.handle::<api::GetStorageFileUrl, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        Ok(stored_file(&ctx, &args.storage_id).await?.map(|_| download_url(&ctx, &args.storage_id)))
    });
}

/// The link a worker downloads an attachment from (through ingress).
pub fn download_url(ctx: &ServiceContext, storage_id: &str) -> String {
    format!("{}/v1/media/{storage_id}", ctx.settings.http.public_base_url())
}

/// Where files are uploaded (`generateMediaUploadUrl`): ingress's `POST /v1/media`, absolute
/// when `http.public_url` is configured, else the path alone (the caller knows the host it
/// reaches ingress at).
pub fn upload_url(ctx: &ServiceContext) -> String {
    upload_url_at(&ctx.settings.http.public_url)
}

fn upload_url_at(public_url: &str) -> String {
    let public = public_url.trim();
    if public.is_empty() { "/v1/media".to_string() } else { format!("{}/v1/media", public.trim_end_matches('/')) }
}

/// The stored file `storage_id`, if it exists (not deleted).
async fn stored_file(
    ctx: &ServiceContext,
    storage_id: &str,
) -> Result<Option<async_nats::jetstream::object_store::ObjectInfo>, OpError> {
    use async_nats::jetstream::object_store::InfoErrorKind;
    match ctx.buckets.media.info(storage_id).await {
        Ok(info) if !info.deleted => Ok(Some(info)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(OpError::unavailable(format!("object store: {e}"))),
    }
}

/// A new storage id for an upload: time-ordered, and safe as a URL path segment and key token.
pub fn new_storage_id() -> String {
    format!("m{}", uuid::Uuid::now_v7().simple())
}

pub async fn for_message(ctx: &ServiceContext, message_id: &str) -> Result<Vec<AttachmentRecord>, OpError> {
    if message_id.is_empty() {
        return Err(OpError::invalid("messageId is required"));
    }
    common::extras::attachments_of(&ctx.buckets, message_id).await.map_err(OpError::internal)
}

/// Every record naming the file `storage_id` (usually one).
async fn by_storage_id(ctx: &ServiceContext, storage_id: &str) -> Result<Vec<AttachmentRecord>, OpError> {
    let found = ctx.buckets.attachments.scan::<AttachmentRecord>(&format!("*.{}", escape(storage_id))).await;
    Ok(found.map_err(OpError::internal)?.into_iter().map(|(_, v)| v.value).collect())
}

pub(crate) async fn retention_ms(ctx: &ServiceContext) -> Result<i64, OpError> {
    Ok(runtime_config::message_config(ctx)
        .await?
        .and_then(|c| c.telegram_attachment_retention_ms)
        .unwrap_or(DEFAULT_RETENTION_MS))
}

/// `recordPayloadAttachments`: one record per attachment of an enqueue payload (spec §3.4.1 step
/// 6), written create-only under (message, file), so a retried call is idempotent. Every file is
/// checked before anything is written; a missing one is a 400 naming its place in the payload.
async fn record_payload(ctx: &ServiceContext, args: RecordPayloadAttachmentsArgs) -> Result<Vec<Attachment>, OpError> {
    let max = ctx.settings.attachments.max_per_message;
    if args.attachments.len() > max {
        return Err(OpError::invalid(format!("payload.attachments: a message may carry at most {max} attachments")));
    }
    let mut files = Vec::with_capacity(args.attachments.len());
    for (i, a) in args.attachments.iter().enumerate() {
        let Some(info) = stored_file(ctx, &a.storage_id).await? else {
            return Err(OpError::invalid(format!(
                "payload.attachments[{i}].storageId: no uploaded file '{}' (upload it with POST /v1/media)",
                a.storage_id
            )));
        };
        files.push(info);
    }
    let retention = retention_ms(ctx).await?;
    let now = ctx.clock.now_ms();
    let mut out = Vec::with_capacity(files.len());
    for (a, info) in args.attachments.into_iter().zip(files) {
        let uploaded_type = info.metadata.get("contentType").cloned();
        let record = AttachmentRecord {
            message_id: args.message_id.to_string(),
            conversation_id: args.conversation_id.to_string(),
            agent_key: args.agent_key.to_string(),
            provider: args.provider.clone(),
            kind: a.kind.as_str().to_string(),
            status: AttachmentStatus::Ready,
            storage_id: a.storage_id.into_string(),
            telegram_file_id: a.telegram_file_id,
            file_name: a.file_name,
            mime_type: a.mime_type.or(uploaded_type).map(|m| m.trim().to_ascii_lowercase()).filter(|m| !m.is_empty()),
            size_bytes: info.size as u64,
            created_at: now,
            expires_at: a.expires_at.unwrap_or(now + retention),
        };
        let key = attachment_key(&record.message_id, &record.storage_id);
        match ctx.buckets.attachments.create(&key, &record).await {
            Ok(_) => out.push(record),
            // Written by an earlier attempt of the same enqueue: that record stands.
            Err(StoreError::Conflict { .. }) => match ctx.buckets.attachments.get::<AttachmentRecord>(&key).await? {
                Some(existing) => out.push(existing.value),
                None => {
                    return Err(OpError::conflict(format!("attachment record '{key}' changed concurrently; retry")));
                }
            },
            Err(e) => return Err(OpError::internal(e)),
        }
    }
    Ok(out)
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

async fn attach(ctx: &ServiceContext, args: AttachMediaArgs) -> Result<Vec<AttachmentRecord>, OpError> {
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
    let retention = retention_ms(ctx).await?;
    let now = ctx.clock.now_ms();
    let field = |name: &str| job.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
    let payload_provider = job.get("payload").and_then(|p| p.get("provider")).and_then(Value::as_str);
    let mut out = Vec::new();
    for a in args.attachments {
        let storage_id = a.storage_id.into_string();
        let Some(info) = stored_file(ctx, &storage_id).await? else {
            return Err(OpError::not_found(format!("no uploaded file '{storage_id}' (upload it with POST /v1/media)")));
        };
        if let Some(other) = by_storage_id(ctx, &storage_id).await?.into_iter().find(|r| r.message_id != message_id) {
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
        match ctx.buckets.attachments.create(&attachment_key(message_id, &record.storage_id), &record).await {
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
    apply_attachment_records(payload, &records, |r| Some(download_url(ctx, &r.storage_id)));
    Ok(())
}

/// Whether `caller` may read the file `storage_id`: admins always; a worker only while it
/// holds the lease of a conversation a ready attachment of that file belongs to.
pub(crate) async fn authorize_read(ctx: &ServiceContext, caller: &Caller, storage_id: &str) -> Result<(), OpError> {
    match caller.role {
        Role::Admin => Ok(()),
        Role::Worker => {
            let records = by_storage_id(ctx, storage_id).await?;
            if records.is_empty() {
                return Err(OpError::not_found(format!("no attachment '{storage_id}'")));
            }
            let mut conversations: Vec<&str> = records
                .iter()
                .filter(|r| r.status == AttachmentStatus::Ready)
                .map(|r| r.conversation_id.as_str())
                .collect();
            conversations.dedup();
            if conversations.is_empty() {
                return Err(OpError::not_found(format!("attachment '{storage_id}' has expired")));
            }
            let mut refused = None;
            for conversation_id in conversations {
                match fence::require_lease(ctx, caller, conversation_id).await {
                    Ok(()) => return Ok(()),
                    Err(e) => refused = Some(e),
                }
            }
            Err(refused.unwrap_or_else(|| OpError::forbidden("not the lease holder")))
        }
        _ => Err(OpError::forbidden("only admins and the worker holding the lease may download attachments")),
    }
}

/// `expireOldTelegramAttachments` (spec §3.6): answers how many attachments it expired, as the
/// original's count.
async fn sweep(ctx: &ServiceContext, limit: usize) -> Result<usize, OpError> {
    let now = ctx.clock.now_ms();
    let records = ctx.buckets.attachments.scan::<AttachmentRecord>(">").await.map_err(OpError::internal)?;
    let mut expired = 0;
    let is_due = |r: &AttachmentRecord| r.status == AttachmentStatus::Ready && r.expires_at <= now;
    // A file still named by a ready record that is not due stays (it is shared with another
    // message); its last record deletes it.
    let in_use: std::collections::HashSet<&str> = records
        .iter()
        .filter(|(_, v)| v.value.status == AttachmentStatus::Ready && !is_due(&v.value))
        .map(|(_, v)| v.value.storage_id.as_str())
        .collect();
    for (key, versioned) in records.iter().filter(|(_, v)| is_due(&v.value)).take(limit) {
        let storage_id = versioned.value.storage_id.as_str();
        // Re-checked right before deleting: a record may have been written since the scan.
        if !in_use.contains(storage_id)
            && !by_storage_id(ctx, storage_id).await?.iter().any(|r| r.status == AttachmentStatus::Ready && !is_due(r))
        {
            delete_file(ctx, storage_id).await?;
        }
        let mut record = versioned.value.clone();
        record.status = AttachmentStatus::Expired;
        match ctx.buckets.attachments.update(key, &record, versioned.revision).await {
            Ok(_) => expired += 1,
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
    let mut orphans_removed = 0;
    for name in orphans.into_iter().take(limit) {
        // Re-check: it may have been attached since the scan.
        if by_storage_id(ctx, &name).await?.is_empty() {
            delete_file(ctx, &name).await?;
            orphans_removed += 1;
        }
    }
    if expired > 0 || orphans_removed > 0 {
        tracing::info!(expired, orphans_removed, "attachment retention");
    }
    Ok(expired)
}

async fn delete_file(ctx: &ServiceContext, storage_id: &str) -> Result<(), OpError> {
    use async_nats::jetstream::object_store::DeleteErrorKind;
    match ctx.buckets.media.delete(storage_id).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == DeleteErrorKind::NotFound => Ok(()),
        Err(e) => Err(OpError::internal(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::upload_url_at;

    #[test]
    fn the_upload_url_is_absolute_only_with_a_public_url() {
        assert_eq!(upload_url_at(""), "/v1/media");
        assert_eq!(upload_url_at("  "), "/v1/media");
        assert_eq!(upload_url_at("https://api.example.com/"), "https://api.example.com/v1/media");
        assert_eq!(upload_url_at("https://api.example.com/af"), "https://api.example.com/af/v1/media");
    }
}
