//! The contracts of Telegram administration (spec §3.10): bot identity from a token, the webhook
//! with its per-bot random secret (S4), readiness, and the 3.1.0 soft-reset migration.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use super::profiles::Plaintext;
use crate::ids::{AgentKey, BotIdentity, ConsumerUserId, SecretRef};

/// `importTelegramTokenForAgent` (spec §3.10): verifies the token with `getMe`, stores it as the
/// agent's bot token secret and records the bot identity on the profile.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportTelegramTokenArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// The bot token from @BotFather (trimmed; never echoed, logged or returned).
    pub plaintext_value: Plaintext,
    /// Stored with the secret version, with `telegramBotId` and `telegramUsername` added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportedTelegramToken {
    /// `<secretRef>#<version>`.
    pub secret_id: String,
    pub secret_ref: String,
    pub version: u64,
    /// The bot's numeric id from `getMe`.
    pub bot_identity: String,
    /// The bot's username from `getMe`, or null.
    pub telegram_username: Option<String>,
}

/// `configureTelegramWebhook` (spec §3.10).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigureWebhookArgs {
    /// Base URL Telegram reaches ingress at (the original's deployment site URL). Optional here:
    /// absent or blank means `telegram.public_url`, else `http.public_url`. Must be `https://`
    /// unless the host is loopback or `telegram.allow_insecure_webhook` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convex_site_url: Option<String>,
    /// The token's secret ref. Default: with `agentKey`, that agent's bot token ref; without,
    /// `telegram.botToken.default` (the original's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// The agent whose profile receives the bot identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_key: Option<AgentKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookConfigured {
    /// Always true (failures are errors).
    pub ok: bool,
    /// `<base>/<telegram.webhook_path_prefix>/telegram/webhook`.
    pub webhook_url: String,
    /// The URL `getWebhookInfo` reports after the set-up, or null.
    pub current_url: Option<String>,
    pub bot_identity: String,
    /// Always true: a random secret of this bot, kept server-side (S4).
    pub secret_token_configured: bool,
    /// Telegram reports exactly `webhookUrl`.
    pub is_ready: bool,
    pub pending_update_count: u64,
    pub last_error_message: Option<String>,
    /// Unix seconds, as Telegram reports it.
    pub last_error_date: Option<i64>,
    pub description: String,
}

/// `reconcileTelegramBotIdentityForAgent` (spec §3.10).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcileBotIdentityArgs {
    pub agent_key: AgentKey,
    /// Default `telegram.botToken.<agentKey>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReconciledBotIdentity {
    pub agent_key: String,
    pub secret_ref: String,
    pub bot_identity: String,
    pub telegram_username: Option<String>,
}

/// `getWebhookReadiness` (spec §3.10): asks Telegram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookReadiness {
    pub agent_key: String,
    /// The token's ref, or null when the agent has no token (then nothing is asked).
    pub secret_ref: Option<String>,
    pub current_url: Option<String>,
    pub pending_update_count: u64,
    pub last_error_message: Option<String>,
    pub last_error_date: Option<i64>,
    /// Telegram delivers to this deployment's webhook path (`<prefix>/telegram/webhook`) with
    /// the bot's secret configured here.
    pub webhook_ready: bool,
}

/// `softResetTelegramBindingsMissingBotIdentity` (spec §3.10): the 3.1.0 migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SoftResetArgs {
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_active_bindings: Option<bool>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_pending_pairings: Option<bool>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SoftResetReport {
    pub revoked_bindings: u64,
    pub annotated_bindings: u64,
    pub expired_pairings: u64,
    pub pending_pairings_missing_bot_identity: u64,
    pub legacy_bindings_missing_bot_identity: u64,
    pub profiles_missing_bot_identity: u64,
}

/// A bot as this deployment knows it (`af_telegram_bots`, key `bot.<botIdentity>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BotRecord {
    pub bot_identity: String,
    /// The agent whose profile carries this bot identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_key: Option<String>,
    /// The real username from `getMe` (T6: deep links use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_username: Option<String>,
    /// The secret ref of the token last verified for this bot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<String>,
    /// The webhook URL last set, and whether Telegram reported it at the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub webhook_ready: bool,
    /// SHA-256 (hex) of the webhook secret (the secret itself is an encrypted secret,
    /// `telegram.webhookSecret.<botIdentity>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_sha256: Option<String>,
    pub updated_at: crate::clock::Millis,
}

impl BotRecord {
    /// A bot seen for the first time: nothing known about it yet.
    pub fn new(bot_identity: &str, now: crate::clock::Millis) -> Self {
        Self {
            bot_identity: bot_identity.to_string(),
            agent_key: None,
            telegram_username: None,
            token_secret_ref: None,
            webhook_url: None,
            webhook_ready: false,
            webhook_secret_sha256: None,
            updated_at: now,
        }
    }
}

/// A webhook secret index entry (`af_telegram_bots`, key `wh.<sha256 hex of the secret>`):
/// the bot a presented secret belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSecretIndex {
    pub bot_identity: String,
    /// The same digest as the key, compared in constant time by ingress.
    pub secret_sha256: String,
}

/// The key of a bot's record.
pub fn bot_key(bot_identity: &str) -> String {
    format!("bot.{bot_identity}")
}

/// The key of a webhook secret's index entry.
pub fn webhook_secret_key(secret_sha256_hex: &str) -> String {
    format!("wh.{secret_sha256_hex}")
}

/// Arguments naming one bot.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BotIdentityArgs {
    pub bot_identity: BotIdentity,
}

/// One file of a Telegram message to fetch (`prepareTelegramAttachmentsForEnqueue`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelegramAttachmentCandidate {
    pub kind: super::attachments::AttachmentKind,
    /// The `file_id` Telegram gave the file (1–1024 bytes).
    pub telegram_file_id: String,
    #[serde(default)]
    pub file_name: Option<String>,
    #[serde(default)]
    pub mime_type: Option<String>,
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrepareTelegramAttachmentsArgs {
    /// Whose bot token fetches the files.
    pub agent_key: AgentKey,
    /// At most `attachments.max_per_message` (10).
    pub attachments: Vec<TelegramAttachmentCandidate>,
}
