//! The contracts of agent profiles, secrets and the runtime configuration rows (spec §3.1–3.3).

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Ignored;
use crate::ids::{AgentKey, SecretRef};
use crate::model::{BridgeConfig, ProviderConfig, ScalingPolicy};

/// `upsertAgentProfile` (spec §3.1): creates the profile, or patches it (fields not given are
/// left as stored; `secretsRef` is replaced).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpsertAgentProfileArgs {
    /// At most 128 bytes.
    pub agent_key: AgentKey,
    /// Free-form version label, 1–64 bytes.
    pub version: String,
    /// The profile's secret refs, at most 64 including the ones added automatically: the
    /// mandatory `convex.url` and `fly.apiToken`, and with an enabled bridge its service-key
    /// and base-URL-map refs.
    pub secrets_ref: Vec<SecretRef>,
    /// The Telegram bot this agent answers as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_config: Option<BridgeConfig>,
    pub enabled: bool,
    /// The company the agent serves (an addition: the original had no link from agents to
    /// companies, so its broadcast reached every company's agents, spec §6.7 P1). Kept when
    /// omitted from a later upsert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<crate::ids::CompanyId>,
}

/// Arguments naming one agent.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentKeyArgs {
    pub agent_key: AgentKey,
}

/// A secret's plaintext as an argument. Its `Debug` is redacted, and a value of the wrong JSON
/// type is refused without echoing it (serde's own message would quote a number or a boolean).
pub struct Plaintext(SecretString);

impl Plaintext {
    pub fn new(value: SecretString) -> Self {
        Self(value)
    }

    pub fn into_secret(self) -> SecretString {
        self.0
    }
}

impl From<SecretString> for Plaintext {
    fn from(value: SecretString) -> Self {
        Self(value)
    }
}

impl<'de> Deserialize<'de> for Plaintext {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(deserializer) {
            Ok(serde_json::Value::String(s)) => Ok(Self(SecretString::from(s))),
            _ => Err(serde::de::Error::custom("plaintextValue: must be a string")),
        }
    }
}

/// The typed client sends the value; nothing else serialises arguments.
impl Serialize for Plaintext {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.expose_secret())
    }
}

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Plaintext([REDACTED])")
    }
}

impl JsonSchema for Plaintext {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Plaintext".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 65536,
            "writeOnly": true,
            "description": "The secret value (at most 64 KiB). Stored sealed; never returned, logged or echoed."
        })
    }
}

/// `importPlaintextSecret` (spec §3.2): stores a new active version of the secret.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportSecretArgs {
    pub secret_ref: SecretRef,
    pub plaintext_value: Plaintext,
    /// Kept with the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The version just stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportedSecret {
    /// `<secretRef>#<version>`.
    pub secret_id: String,
    pub secret_ref: String,
    /// One more than the highest version the ref had.
    pub version: u64,
}

/// `getSecretsStatus` (spec §3.2).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretsStatusArgs {
    pub secret_refs: Vec<SecretRef>,
}

/// Whether one secret ref has an active version; never its value. Answered in input order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretStatus {
    pub secret_ref: String,
    pub has_active: bool,
    /// The active version, or null.
    pub version: Option<u64>,
}

/// `getSecretsKeyRotationStatus`: how far a rotation of `secrets.key` has come. A previous key
/// can be removed from `secrets.previous_keys` once `pendingVersions` is 0 (and no process still
/// seals with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretsKeyRotationStatus {
    /// The id of `secrets.key` (first 8 hex digits of the SHA-256 of the key).
    pub current_key_id: String,
    /// The ids of `secrets.previous_keys`.
    pub previous_key_ids: Vec<String>,
    /// Stored versions (every kept version of every ref) by the id of the key that sealed them;
    /// `""` counts versions stored without a key id.
    pub versions_by_key_id: BTreeMap<String, u64>,
    /// Secret refs stored.
    pub secret_refs: u64,
    /// Versions not sealed with the current key.
    pub pending_versions: u64,
    /// Versions sealed with a key that is neither the current nor a previous one: they cannot be
    /// read or re-encrypted.
    pub unknown_key_versions: u64,
}

/// `reencryptSecrets`: what one pass of the re-encryption did, and the status after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReencryptedSecrets {
    /// Versions sealed again under the current key by this pass.
    pub reencrypted_versions: u64,
    /// Secret refs whose document this pass rewrote.
    pub rewritten_refs: u64,
    /// Versions this pass could not open (unknown key, or a value that does not open); left as
    /// they are.
    pub failed_versions: u64,
    pub status: SecretsKeyRotationStatus,
}

/// `setProviderRuntimeConfig` (spec §3.3): replaces the stored provider configuration, without
/// validating it (the scheduler validates it where it is used).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetProviderConfigArgs {
    pub provider_config: ProviderConfig,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `setScalingRuntimeConfig`: replaces the stored scaling policy every reconcile uses (fix L4).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetScalingPolicyArgs {
    /// `maxWorkers` ≤ 100000, `spawnStep` 1–1000, `idleTimeoutMs` ≥ 1000,
    /// `reconcileIntervalMs` ≥ 100, `drainDeadlineMs` (when given) ≥ 1000.
    pub scaling_policy: ScalingPolicy,
}

/// `setMessageRuntimeConfig` (spec §3.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetMessageConfigArgs {
    pub message_config: MessageConfigInput,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// The message configuration as given, before normalisation: `systemPrompt` is trimmed and
/// dropped when blank; the retention is floored and dropped when not positive. When both are
/// dropped the stored row is deleted; otherwise it is replaced (setting one field erases the
/// other).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageConfigInput {
    /// Appended to every enqueued message's context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// How long Telegram attachments are kept, in ms (at most 2^53 − 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_attachment_retention_ms: Option<f64>,
}
