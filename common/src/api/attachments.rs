//! The contracts of message attachments (spec §1.6, §3.6): media files uploaded through ingress
//! (`POST /v1/media`) and attached to a queued message.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::clock::Millis;
use crate::ids::{ConversationId, MessageId, StorageId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentStatus {
    /// The file can be downloaded.
    Ready,
    /// Past retention: the file is deleted.
    Expired,
}

/// One attachment of a message, as stored (`af_attachments`) and returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub message_id: String,
    pub conversation_id: String,
    pub agent_key: String,
    /// The payload's provider (default `telegram`).
    pub provider: String,
    /// `photo`, `video`, `audio`, `voice` or `document`.
    pub kind: String,
    pub status: AttachmentStatus,
    pub storage_id: String,
    pub telegram_file_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Lower-cased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    pub size_bytes: u64,
    pub created_at: Millis,
    /// `createdAt` + the message configuration's `telegramAttachmentRetentionMs` (default 7 days).
    pub expires_at: Millis,
}

/// `attachMessageMedia`: attaches uploaded files to a message that is queued or processing.
/// Attaching the same file to the same message again is idempotent.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachMediaArgs {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    /// At least one; at most `attachments.max_per_message` per message in all.
    pub attachments: Vec<NewAttachment>,
}

/// An uploaded file to attach.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewAttachment {
    /// `photo`, `video`, `audio`, `voice` or `document`.
    pub kind: String,
    /// As `POST /v1/media` answered it.
    pub storage_id: StorageId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_file_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// `listMessageAttachments`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageAttachmentsArgs {
    pub message_id: MessageId,
}

/// `expireOldTelegramAttachments` (spec §3.6).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachmentSweepArgs {
    /// Most attachments expired (and orphaned files removed) per call; default 100, clamped to
    /// 1–1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentSweep {
    /// Attachments marked expired (their files deleted).
    pub expired: usize,
    /// Uploaded files no attachment references, removed after `snapshots.upload_timeout_ms`.
    pub orphaned_files_removed: usize,
}
