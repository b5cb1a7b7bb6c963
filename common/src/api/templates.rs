//! The contracts of message templates (spec §1.13, §3.7): reusable texts an app sends to a
//! user's agent conversation. Served by push-dispatcher.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::clock::Millis;
use crate::ids::{AgentKey, CompanyId, ConsumerUserId, MessageId, MessageTemplateId};

/// `createMessageTemplate` (spec §3.7).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateMessageTemplateArgs {
    /// Trimmed; must not be blank (`Template title is required`). The template key is derived
    /// from it: lower-cased, runs outside `[a-z0-9]` become `-` (`status-update`), made unique
    /// globally with `-2`, `-3`, …
    pub title: String,
    /// Trimmed; must not be blank (`Template text is required`).
    pub text: String,
    /// Trimmed, lower-cased, blanks dropped, de-duplicated and sorted.
    pub tags: Vec<String>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Who creates it (recorded as createdBy and updatedBy); at most 256 bytes.
    pub actor_user_id: String,
    /// The company whose template this is (an addition, spec §6.7 P6): listing with a
    /// `companyId` shows only that company's templates. Keys stay globally unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<CompanyId>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `updateMessageTemplate` (spec §3.7): fields not given are kept; the key is regenerated only
/// when the normalised title changes.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateMessageTemplateArgs {
    pub template_id: MessageTemplateId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Recorded as updatedBy; at most 256 bytes.
    pub actor_user_id: String,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// Arguments naming one message template.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageTemplateIdArgs {
    pub template_id: MessageTemplateId,
}

/// `listMessageTemplatesByCompany` (spec §3.7).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListMessageTemplatesArgs {
    /// Only this company's templates (spec §6.7 P6). Absent: every template, as the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<CompanyId>,
    /// Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_disabled: Option<bool>,
    /// Default 100, clamped to 1..200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// A message template, as stored and as every operation shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageTemplateView {
    #[serde(rename = "_id")]
    pub id: MessageTemplateId,
    /// Globally unique slug derived from the title.
    pub template_key: String,
    pub title: String,
    pub text: String,
    pub tags: Vec<String>,
    /// Messages sent from this template; exactly one per successful send.
    pub usage_count: u64,
    pub enabled: bool,
    /// The company the template belongs to, or null (a global template).
    pub company_id: Option<String>,
    pub created_by: String,
    pub updated_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// `sendMessageTemplateToUserAgent` (spec §3.7): enqueues the template's text into the
/// conversation of the user's active binding with the agent.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessageTemplateArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    pub template_id: MessageTemplateId,
    /// Extra metadata for the message (the template's own keys win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored: the provider configuration is stored runtime configuration
    /// (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendMessageTemplateResult {
    pub message_id: MessageId,
    /// The template's usage count after this send.
    pub usage_count: u64,
}
