//! The contracts of pairing codes (spec §1.10, §3.9): a consumer user gets a one-time code, sends
//! `/start <code>` to the agent's bot, and the webhook binds the Telegram identity to the user.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use super::bindings::BindingView;
use crate::clock::Millis;
use crate::ids::{AgentKey, BotIdentity, ConsumerUserId, PairingCode, TelegramId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PairingStatus {
    Pending,
    Used,
    Expired,
}

/// `createPairingCode` and `createUserAgentPairing` (spec §3.9).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePairingArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// Lifetime of the code; default 900000 (15 min), clamped to 60000..86400000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<f64>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `consumePairingCode` (spec §3.9): what the webhook does for `/start <code>`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumePairingArgs {
    pub code: PairingCode,
    /// The bot the code was sent to; must be the bot of the code's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<BotIdentity>,
    pub telegram_user_id: TelegramId,
    pub telegram_chat_id: TelegramId,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `getPairingCodeStatus` (spec §3.9).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PairingCodeArgs {
    pub code: PairingCode,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// Arguments naming a (user, agent) pair.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserAgentArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// A pairing code as every operation shows it (spec §3.9); absent fields are null.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PairingView {
    pub code: String,
    pub consumer_user_id: String,
    pub agent_key: String,
    pub bot_identity: Option<String>,
    /// A pending code past its expiry is shown `expired`.
    pub status: PairingStatus,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub used_at: Option<Millis>,
    pub telegram_user_id: Option<String>,
    pub telegram_chat_id: Option<String>,
}

/// `createUserAgentPairing` (spec §3.9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserAgentPairing {
    pub pairing: PairingView,
    /// `https://t.me/<bot username>?start=<code>` with the bot's real username from `getMe`
    /// (T6), or null when it is not known.
    pub deep_link: Option<String>,
}

/// The result of `consumePairingCode`: the used code and the binding it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumedPairing {
    #[serde(flatten)]
    pub pairing: PairingView,
    pub binding: BindingView,
}
