//! The contracts of workspace snapshots (spec §1.7, §3.13) and of `authorizeBlobTransfer`, which
//! ingress asks before it streams a snapshot archive or a media file.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::clock::Millis;
use crate::ids::{AgentKey, ConsumerUserId, ConversationId, SnapshotId, WorkerId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    Uploading,
    Ready,
    Failed,
    Expired,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uploading => "uploading",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }
}

/// Why a worker took a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotReason {
    Drain,
    Signal,
    Manual,
}

/// `prepareDataSnapshotUpload` (spec §3.13). A worker may prepare only as itself, and only for
/// a conversation it owns.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrepareSnapshotArgs {
    pub worker_id: WorkerId,
    /// Default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    pub agent_key: AgentKey,
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    pub reason: SnapshotReason,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// Where and how to upload the archive.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreparedUpload {
    pub snapshot_id: SnapshotId,
    /// HTTP upload through ingress: `PUT` the archive with the worker's bearer token.
    pub upload_url: String,
    /// When the snapshot expires once ready.
    pub expires_at: Millis,
    /// For workers on NATS: put the archive into this object store under this name.
    pub object_store: String,
    pub object_name: String,
    pub chunk_bytes: usize,
    pub max_bytes: u64,
}

/// `finalizeDataSnapshotUpload` (spec §3.13, fix D2): the stored archive is read back and must
/// have the reported sha256 and size, else the snapshot fails and the archive is deleted.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FinalizeSnapshotArgs {
    pub worker_id: WorkerId,
    pub snapshot_id: SnapshotId,
    /// Accepted for the original's signature; the archive is always the object named by the
    /// snapshot id, so a non-empty value other than the snapshotId is refused. Only compared,
    /// never used as a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_id: Option<String>,
    /// Lower-case hex (compared case-insensitively).
    pub sha256: String,
    pub size_bytes: u64,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `failDataSnapshotUpload` (spec §3.13): the partial archive is deleted.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailSnapshotArgs {
    pub worker_id: WorkerId,
    pub snapshot_id: SnapshotId,
    /// Kept (its first 2000 characters) with the snapshot.
    pub error: String,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `getLatestDataSnapshotForRestore` (spec §3.13, fix D1): the newest *ready, unexpired*
/// snapshot of the exact workspace, agent and conversation.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreArgs {
    /// Default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    pub agent_key: AgentKey,
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// The archive to restore.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    pub snapshot_id: SnapshotId,
    /// HTTP download through ingress with the caller's bearer token.
    pub download_url: String,
    /// For workers on NATS: the object store and object holding the archive.
    pub object_store: String,
    pub object_name: String,
    pub sha256: Option<String>,
    pub size_bytes: Option<u64>,
    pub created_at: Millis,
}

/// `listSnapshotsForConversation` (spec §3.13).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConversationSnapshotsArgs {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    /// Default 50, clamped to 1–200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `listSnapshotsForUserAgent` and `getLatestSnapshotForUserAgent` (spec §3.13): snapshots of
/// workspace `default` for the agent in the user-agent target conversation (spec §3.8.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserAgentSnapshotsArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// Default 50, clamped to 1–200 (`getLatestSnapshotForUserAgent` always uses 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// A snapshot as the list operations show it (spec §3.13), newest first.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    pub snapshot_id: String,
    pub created_at: Millis,
    pub size_bytes: Option<u64>,
    pub sha256: Option<String>,
    /// Only for admins, and only for a ready, unexpired snapshot: archives hold the workspace's
    /// credentials (fix S7).
    pub download_url: Option<String>,
    pub status: SnapshotStatus,
    pub conversation_id: String,
    pub workspace_id: String,
    pub agent_key: String,
    pub reason: SnapshotReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `expireOldDataSnapshots` (spec §3.13, fix D2).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSweepArgs {
    /// Most snapshots ended per call (and records purged); default 100, clamped to 1–1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSweep {
    /// Ready snapshots past retention: record expired, archive deleted.
    pub expired: usize,
    /// Uploads still `uploading` past the upload timeout: record failed, partial archive deleted.
    pub abandoned: usize,
    /// Archives deleted: those of the snapshots just ended, and any left behind earlier.
    pub archives_deleted: usize,
    /// Ended (expired or failed) records older than another retention period, removed.
    pub purged: usize,
}

/// What kind of blob a transfer moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    /// A snapshot archive (`id` = the snapshot id).
    Snapshot,
    /// A media file (`id` = the storage id).
    Media,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BlobMode {
    Read,
    Write,
}

/// `authorizeBlobTransfer`: may the caller move this archive or file?
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlobTransferArgs {
    pub kind: BlobKind,
    pub mode: BlobMode,
    /// The snapshot id (kind `snapshot`) or storage id (kind `media`), validated as that kind
    /// of id; absent for a media upload, which gets a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// What ingress may do: which object of which store, and how many bytes at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlobTransfer {
    pub object_store: String,
    pub object_name: String,
    pub max_bytes: u64,
    pub chunk_bytes: usize,
    /// For a snapshot download: the sha256 the archive must have.
    pub sha256: Option<String>,
    pub content_type: Option<String>,
}
