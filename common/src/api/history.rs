//! The contracts of conversation history and hydration (spec §3.5): appending and paging the
//! history, the hydration bundle of a claimed job, and the bridge environment of spawned workers.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::clock::Millis;
use crate::ids::{ConversationId, MessageId};

/// Who wrote a history item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HistoryRole {
    System,
    User,
    Assistant,
    Tool,
}

impl HistoryRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One item of a conversation's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryItem {
    pub role: HistoryRole,
    pub content: String,
    /// When it was written (ms since the epoch).
    pub at: Millis,
}

/// `appendConversationMessages` (spec §3.5.1). A worker must hold the conversation's lease.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppendMessagesArgs {
    pub conversation_id: ConversationId,
    /// Names the hydration cache's `snapshotKey` (`<workspaceId>:<agentKey>`); default
    /// `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// At most `history.max_batch_items` per call.
    pub messages: Vec<NewHistoryItem>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// A history item to append.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHistoryItem {
    pub role: HistoryRole,
    pub content: String,
    /// Default: now plus the item's index in the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppendResult {
    /// False when the conversation does not exist (nothing is stored then).
    pub updated: bool,
    pub message_count: usize,
}

/// `getConversationHistory`: a page of a conversation's history, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryArgs {
    pub conversation_id: ConversationId,
    /// Page size, default 50, clamped to 1–200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Continue before this position (the `nextCursor` of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub conversation_id: String,
    /// Newest first.
    pub items: Vec<HistoryItem>,
    /// Pass back as `cursor` for the next (older) page; null at the start of the history.
    pub next_cursor: Option<String>,
}

/// `getHydrationBundleForClaimedJob` (spec §3.5.2). A worker must hold the job's lease.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleArgs {
    pub message_id: MessageId,
    /// Accepted and ignored: history is one stream per conversation and its hydration cache
    /// always reflects it (spec §6.4 D3), so the workspace no longer chooses between the cache
    /// and the full history.
    #[serde(default, skip_serializing)]
    pub workspace_id: Ignored,
    /// The conversation of the job (the claim returns it). Optional for callers written
    /// against the original; without it the conversation is found through the worker row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
}

/// Everything a worker needs to process the job it claimed (spec §3.5.2).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    pub message_id: String,
    pub conversation_id: String,
    pub agent_key: String,
    /// The payload as enqueued; its `attachments` carry their current status and, while
    /// `ready`, a `downloadUrl` (see [`BundleAttachment`]).
    pub payload: serde_json::Map<String, serde_json::Value>,
    pub conversation_state: ConversationState,
    /// The agent's Telegram bot token, or null.
    pub telegram_bot_token: Option<String>,
    /// Null unless the agent's bridge is enabled.
    pub bridge_runtime_config: Option<BridgeRuntimeConfig>,
    /// The agent's model provider (an OpenAI-compatible endpoint) from its scoped secrets
    /// `model.baseUrl`, `model.name`, `model.apiKey`, `model.api` (each `<ref>.<agentKey>` first,
    /// then `<ref>`); null when none of them is set. The `openclaw` engine writes it into the
    /// OpenClaw configuration. Not in the original's bundle: absent when null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_runtime_config: Option<ModelRuntimeConfig>,
}

/// An agent's model provider as its secrets describe it; every field is a string or null.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRuntimeConfig {
    /// Base URL of an OpenAI-compatible API, e.g. `https://api.openai.com/v1` (`model.baseUrl`).
    pub base_url: Option<String>,
    /// The model id the provider knows, e.g. `gpt-4o-mini` (`model.name`).
    pub model: Option<String>,
    /// The provider's API key (`model.apiKey`).
    pub api_key: Option<String>,
    /// The provider's API flavour for OpenClaw: `openai-completions` (the default,
    /// `POST <base>/chat/completions`) or `openai-responses` (`model.api`).
    pub api: Option<String>,
}

impl std::fmt::Debug for ModelRuntimeConfig {
    /// The API key is left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRuntimeConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api", &self.api)
            .finish()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationState {
    /// The last 64 history items, oldest first.
    pub context_history: Vec<HistoryItem>,
    /// Always empty, as in the original (spec §1.2).
    pub pending_tool_calls: Vec<PendingToolCall>,
}

/// The original's pending tool call shape; never produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingToolCall {
    pub tool_name: String,
    pub call_id: String,
    pub status: String,
}

/// An attachment as a bundle's payload shows it (spec §3.5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleAttachment {
    pub kind: String,
    pub status: super::attachments::AttachmentStatus,
    pub storage_id: String,
    pub telegram_file_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    pub size_bytes: u64,
    pub expires_at: Millis,
    /// Only while `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
}

/// The agent bridge configuration of a bundle (spec §3.5.3); every field is a string or null.
/// Profile fields win over secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BridgeRuntimeConfig {
    pub base_url: Option<String>,
    pub app_base_url_map_json: Option<String>,
    pub service_id: Option<String>,
    pub app_key: Option<String>,
    pub service_key: Option<String>,
    /// The secret ref the service key was found under.
    pub service_key_secret_ref: Option<String>,
    pub bot_identity: Option<String>,
}

/// The bridge environment every spawned worker gets (spec §3.5.4). A global secret wins;
/// otherwise a value is forwarded only when every bridge-enabled profile agrees on it. Variables
/// without a value are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SpawnEnv {
    #[serde(rename = "OPENCLAW_SERVICE_ID", default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    #[serde(rename = "OPENCLAW_SERVICE_KEY", default, skip_serializing_if = "Option::is_none")]
    pub service_key: Option<String>,
    #[serde(rename = "OPENCLAW_LINKING_SHARED_SECRET", default, skip_serializing_if = "Option::is_none")]
    pub linking_shared_secret: Option<String>,
}

impl SpawnEnv {
    /// The variables that have a value, by name.
    pub fn vars(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("OPENCLAW_SERVICE_ID", &self.service_id),
            ("OPENCLAW_SERVICE_KEY", &self.service_key),
            ("OPENCLAW_LINKING_SHARED_SECRET", &self.linking_shared_secret),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|v| (name.to_string(), v)))
        .collect()
    }
}
