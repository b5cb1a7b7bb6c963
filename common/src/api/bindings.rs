//! The contracts of identity bindings (spec §1.9, §3.8): which agent a consumer user talks to.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::clock::Millis;
use crate::ids::{AgentKey, ConsumerUserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BindingStatus {
    Active,
    Revoked,
}

/// How a binding came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BindingSource {
    Manual,
    TelegramPairing,
    #[default]
    Api,
}

/// `bindUserAgent` (spec §3.8.2): revokes every active binding of the user and of other users
/// holding the same Telegram identity under the bot, then binds the user to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BindArgs {
    pub consumer_user_id: ConsumerUserId,
    /// At most 128 bytes; the profile must exist.
    pub agent_key: AgentKey,
    /// Trimmed; blank counts as absent, and then the profile's is used. Required (here or on
    /// the profile) when a Telegram id is given. At most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<String>,
    /// Default `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<BindingSource>,
    /// Trimmed, non-blank, at most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_user_id: Option<String>,
    /// Trimmed, non-blank, at most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_chat_id: Option<String>,
    /// At most 16 entries; keys 1–64 bytes, values up to 512 bytes, 2048 bytes in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `revokeUserAgentBinding` (spec §3.8.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeBindingArgs {
    pub consumer_user_id: ConsumerUserId,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// Arguments naming one consumer user (`resolveAgentForUser`, `getUserAgentBinding`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerUserArgs {
    pub consumer_user_id: ConsumerUserId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokeResult {
    /// How many active bindings were revoked.
    pub revoked: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentForUser {
    pub consumer_user_id: String,
    /// The agent of the user's active binding, or null.
    pub agent_key: Option<String>,
}

/// A binding as every operation shows it (spec §3.8.2); absent fields are null.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BindingView {
    pub consumer_user_id: String,
    pub agent_key: String,
    /// `user-agent:<agentKey>:<consumerUserId>`.
    pub conversation_id: String,
    pub bot_identity: Option<String>,
    pub status: BindingStatus,
    pub source: BindingSource,
    pub telegram_user_id: Option<String>,
    pub telegram_chat_id: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub bound_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// `resolveAgentForTelegram` (spec §3.8.3): the active binding a Telegram user (tried first) or
/// chat of one bot resolves to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelegramResolveArgs {
    /// The bot the update came to (trimmed). Required: the original's lookup without a bot is
    /// ambiguous across bots (spec §6.5 T9) and is refused with a 400; there is no fallback to
    /// another bot's binding or to a default agent (spec §6.1 S8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<String>,
    /// Trimmed; blank counts as absent. At most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_user_id: Option<String>,
    /// Trimmed; blank counts as absent. At most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_chat_id: Option<String>,
}

/// The result of `resolveAgentForTelegram`: every field null when nothing resolves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelegramResolution {
    pub consumer_user_id: Option<String>,
    pub agent_key: Option<String>,
    /// The binding's conversation (`user-agent:<agentKey>:<consumerUserId>`).
    pub conversation_id: Option<String>,
}
