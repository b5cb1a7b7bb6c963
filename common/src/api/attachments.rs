//! The contracts of message attachments (spec §1.6, §3.6): media files uploaded through ingress
//! (`POST /v1/media`) and attached to a message, either in its enqueue payload or afterwards;
//! and the original's worker-facing helpers around a message (spec §3.4.8): extra metadata, the
//! upload link and a stored file's link.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use super::queue::PayloadAttachment;
use crate::clock::Millis;
use crate::ids::{AgentKey, ConversationId, MessageId, StorageId};

/// What an attachment is (spec §1.3), with the Telegram kinds the original dropped (T3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentKind {
    Photo,
    Video,
    Audio,
    Voice,
    Document,
    VideoNote,
    Animation,
    Sticker,
}

impl AttachmentKind {
    pub const NAMES: [&'static str; 8] =
        ["photo", "video", "audio", "voice", "document", "video_note", "animation", "sticker"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Photo => "photo",
            Self::Video => "video",
            Self::Audio => "audio",
            Self::Voice => "voice",
            Self::Document => "document",
            Self::VideoNote => "video_note",
            Self::Animation => "animation",
            Self::Sticker => "sticker",
        }
    }
}

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
    /// `photo`, `video`, `audio`, `voice`, `document`, `video_note`, `animation` or `sticker`.
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
    /// `photo`, `video`, `audio`, `voice`, `document`, `video_note`, `animation` or `sticker`.
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
    /// Most attachments expired (and, apart from them, orphaned files removed) per call;
    /// default 100, clamped to 1–1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `recordPayloadAttachments`: queue-manager's enqueue records the attachments of a payload
/// before it publishes the message, so no crash can leave a stored message without its records.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordPayloadAttachmentsArgs {
    /// The id the message will be published under.
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub agent_key: AgentKey,
    /// The payload's provider.
    pub provider: String,
    /// The payload's attachments, already validated by their shape; each `storageId` must name
    /// an uploaded file. At most `attachments.max_per_message`.
    pub attachments: Vec<PayloadAttachment>,
}

/// `attachMessageMetadata` (spec §3.4.8): merges keys into the message's `payload.metadata`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachMetadataArgs {
    pub message_id: MessageId,
    /// Keys 1–128 bytes without control characters, values at most 4096 bytes; with the keys
    /// attached before, at most 64 keys and 16384 bytes per message. New keys win.
    pub metadata: BTreeMap<String, String>,
    /// The message's conversation (new, optional: the claim returns it). Without it a worker's
    /// message is looked up in the conversation it holds the lease of, and an admin's or app's
    /// by the time in the message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
}

/// The result of `generateMediaUploadUrl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaUploadUrl {
    /// Where to `POST` a file (with its `Content-Type` and a bearer token); the answer is
    /// `{storageId, sizeBytes, sha256, mimeType}`. Absolute when `http.public_url` is set,
    /// else the path `/v1/media`.
    pub upload_url: String,
}

/// `getStorageFileUrl` (spec §3.4.8).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageFileArgs {
    /// As `POST /v1/media` answered it.
    pub storage_id: StorageId,
}
