//! The contracts of the user-facing aggregate APIs (spec §3.12): what the consumer app shows a
//! user about their agents — the per-(user, agent) view, the onboarding state machine, the
//! conversation view and queue items of the user's conversation with an agent — and the one
//! write, `sendMessageToUserAgent`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use super::bindings::BindingStatus;
use super::history::HistoryItem;
use super::pairing::PairingStatus;
use super::queue::{JobStatus, JobView};
use crate::clock::Millis;
use crate::ids::{AgentKey, ConsumerUserId, MessageId};

/// Arguments naming one consumer user (`getUserAgentsOverview`, `getActiveUserAgent`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerUserNowArgs {
    pub consumer_user_id: ConsumerUserId,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `listUserAgents` (spec §3.12.2).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListUserAgentsArgs {
    pub consumer_user_id: ConsumerUserId,
    /// Default true; false leaves out the agents whose status is `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_disabled: Option<bool>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// Where a (user, agent) pair stands (spec §3.12.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UserAgentStatus {
    /// Never bound, no pending pairing.
    Draft,
    /// A pairing code is pending and not yet expired.
    Pairing,
    /// The latest binding is active and the profile enabled.
    Active,
    /// The latest binding is active but the profile is disabled (or gone).
    Failed,
    /// The latest binding was revoked, or the profile is disabled.
    Disabled,
}

/// One agent of a user, as the overview and the lookups show it (spec §3.12.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserAgentView {
    pub consumer_user_id: String,
    pub agent_key: String,
    /// The latest binding's `metadata.displayName`, or null.
    pub display_name: Option<String>,
    /// The bot's real username from `getMe`, else the latest binding's
    /// `metadata.telegramUsername`, else null (T6: never guessed from the secret ref).
    pub telegram_username: Option<String>,
    /// The profile's version, or null when the profile is gone.
    pub version: Option<String>,
    pub status: UserAgentStatus,
    /// The status of the latest binding of the pair, or null.
    pub binding_status: Option<BindingStatus>,
    /// `used` when the latest binding is active; else the newest pending code's status
    /// (`pending` or `expired`); else null.
    pub pairing_status: Option<PairingStatus>,
    /// The latest binding's conversation, else `user-agent:<agentKey>:<consumerUserId>`.
    pub conversation_id: String,
    /// The user has no active binding (one active agent per user, spec §6.5 T9).
    pub can_create_new_agent: bool,
    /// `status == active`.
    pub can_disable: bool,
    /// `status == active`.
    pub can_chat: bool,
    /// `status == active`.
    pub can_manage_push_jobs: bool,
}

/// `getUserAgentsOverview` (spec §3.12.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserAgentsOverview {
    /// The agents of the user's bindings (newest first), then those of pending pairing codes.
    pub agents: Vec<UserAgentView>,
    /// The agent of the user's active binding, or null.
    pub active_agent_key: Option<String>,
    /// `activeAgentKey == null`.
    pub can_create_new_agent: bool,
}

/// The onboarding step the user should take next (spec §3.12.2). Every value is reachable
/// (T5): `import_token → configure_webhook → create_pairing → complete_pairing → ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NextAction {
    ImportToken,
    ConfigureWebhook,
    CreatePairing,
    CompletePairing,
    Ready,
}

/// `getUserAgentOnboardingState` (spec §3.12.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OnboardingState {
    pub agent_key: String,
    pub telegram_username: Option<String>,
    /// The first non-blank of the profile's, the latest binding's, the latest pairing code's.
    pub bot_identity: Option<String>,
    /// The profile's first telegram ref, else `telegram.botToken.<agentKey>`.
    pub token_secret_ref: String,
    /// An active secret exists at `tokenSecretRef`.
    pub token_imported: bool,
    /// Telegram reported this deployment's webhook URL for the bot, with the bot's secret set
    /// here, at the last `configureTelegramWebhook` or `getWebhookReadiness` (which asks
    /// Telegram). Unlike the original it does not depend on a pairing (T5).
    pub webhook_ready: bool,
    /// The pending code, only while `pairingStatus` is `pending`.
    pub pairing_code: Option<String>,
    pub pairing_status: Option<PairingStatus>,
    /// `https://t.me/<telegramUsername>?start=<pairingCode>` when both are known.
    pub pairing_deep_link: Option<String>,
    pub next_action: NextAction,
}

/// `getConversationViewForUserAgent` (spec §3.12.2).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConversationViewArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// Queue items, newest first: default 100, clamped to 1–500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// History items: the newest `historyLimit` (default 200, clamped to 1–1000); older ones
    /// are paged with `getConversationHistory` (spec §6.4 D3: the original returned the whole,
    /// unbounded history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// A pending tool call of a conversation (spec §1.2). Never written, by the original either:
/// `pendingToolCalls` is always empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingToolCall {
    pub tool_name: String,
    pub call_id: String,
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationView {
    pub conversation_id: String,
    /// The newest `historyLimit` items, oldest first (the original's order).
    pub context_history: Vec<HistoryItem>,
    /// Always empty.
    pub pending_tool_calls: Vec<PendingToolCall>,
    /// Newest first, at most `limit`.
    pub queue_items: Vec<JobView>,
    /// Any of `queueItems` is queued or processing.
    pub has_queued_jobs: bool,
    /// The id of the first of `queueItems`, or null.
    pub latest_message_id: Option<MessageId>,
    /// The latest `at` of a `user` item of `contextHistory`, or null.
    pub last_user_message_at: Option<Millis>,
    /// The latest `at` of an `assistant` item of `contextHistory`, or null.
    pub last_assistant_message_at: Option<Millis>,
}

/// `listQueueItemsForUserAgent` (spec §3.12.2).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListUserAgentQueueItemsArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// Keep only these statuses. As in the original the filter applies to the newest `limit`
    /// items, so fewer than `limit` may be returned while older matching items exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statuses: Option<Vec<JobStatus>>,
    /// Default 100, clamped to 1–500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `sendMessageToUserAgent` (spec §3.12.2): enqueues `content` into the user's conversation
/// with the agent. The user's latest binding to the agent must be active.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessageToUserAgentArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// The message text; must not be blank (spec §6.2 Q7).
    pub content: String,
    /// Added to the message's metadata; `consumerUserId`, `source` and the Telegram ids of the
    /// binding override keys of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// A repeat with the same key returns the first message's id and queues nothing (the
    /// queue's per-conversation idempotency window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored: the provider configuration is stored runtime configuration
    /// (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}
