//! Who a push goes to: the user's active binding (through hydration's `getUserAgentBinding`),
//! the agent's profile (`getAgentProfile`), and the enqueue into the queue (`enqueueMessage`).

use std::collections::BTreeMap;

use common::OpError;
use common::api;
use common::api::bindings::BindingView;
use common::ids::{AgentKey, ConsumerUserId, ConversationId, MessageId};
use common::service::ServiceContext;
use serde_json::{Map, Value, json};

/// Where a message for a user's agent goes (spec §3.8.3, §3.18.4).
#[derive(Debug, Clone)]
pub struct Target {
    pub agent_key: String,
    pub conversation_id: String,
    /// `telegram` when the binding carries a chat, else `system_push`.
    pub provider: &'static str,
    pub provider_user_id: String,
    pub telegram_chat_id: Option<String>,
    pub telegram_user_id: Option<String>,
    /// `telegram_chat` or `legacy_user` (spec §3.18.4).
    pub source: &'static str,
}

pub fn user_agent_conversation_id(agent_key: &str, consumer_user_id: &str) -> String {
    format!("user-agent:{agent_key}:{consumer_user_id}")
}

/// The target of a binding: its own (stable) conversation, Telegram ids when it has a chat.
pub fn target_of(binding: &BindingView, consumer_user_id: &str) -> Target {
    let conversation_id = Some(binding.conversation_id.trim())
        .filter(|c| !c.is_empty())
        .map_or_else(|| user_agent_conversation_id(&binding.agent_key, consumer_user_id), str::to_string);
    match &binding.telegram_chat_id {
        Some(chat) => Target {
            agent_key: binding.agent_key.clone(),
            conversation_id,
            provider: "telegram",
            provider_user_id: binding.telegram_user_id.clone().unwrap_or_else(|| chat.clone()),
            telegram_chat_id: Some(chat.clone()),
            telegram_user_id: binding.telegram_user_id.clone(),
            source: "telegram_chat",
        },
        None => Target {
            agent_key: binding.agent_key.clone(),
            conversation_id,
            provider: "system_push",
            provider_user_id: consumer_user_id.to_string(),
            telegram_chat_id: None,
            telegram_user_id: None,
            source: "legacy_user",
        },
    }
}

pub async fn active_binding(ctx: &ServiceContext, user: &str) -> Result<Option<BindingView>, OpError> {
    let args = api::bindings::ConsumerUserArgs { consumer_user_id: ConsumerUserId::trusted(user) };
    ctx.call_service::<api::GetUserAgentBinding>(&args).await
}

pub async fn agent_enabled(ctx: &ServiceContext, agent_key: &str) -> Result<bool, OpError> {
    let args = api::profiles::AgentKeyArgs { agent_key: AgentKey::trusted(agent_key) };
    Ok(ctx.call_service::<api::GetAgentProfile>(&args).await?.is_some_and(|p| p.enabled))
}

/// The user's active agent (spec §3.18.4): the agent of the active binding when its profile
/// exists and is enabled; with the target of that binding.
pub async fn active_target(ctx: &ServiceContext, user: &str) -> Result<Option<Target>, OpError> {
    let Some(binding) = active_binding(ctx, user).await? else { return Ok(None) };
    if !agent_enabled(ctx, &binding.agent_key).await? {
        return Ok(None);
    }
    Ok(Some(target_of(&binding, user)))
}

/// A message to enqueue.
pub struct Outgoing<'a> {
    pub conversation_id: &'a str,
    pub agent_key: &'a str,
    pub provider: &'a str,
    pub provider_user_id: &'a str,
    pub text: &'a str,
    pub metadata: BTreeMap<String, String>,
    /// A repeat with the same key returns the first message's id (the queue's
    /// per-conversation dedupe window, `queue.idempotency_window_ms`).
    pub idempotency_key: Option<String>,
}

pub async fn enqueue(ctx: &ServiceContext, msg: Outgoing<'_>) -> Result<MessageId, OpError> {
    let mut payload = Map::new();
    payload.insert("provider".into(), json!(msg.provider));
    payload.insert("providerUserId".into(), json!(msg.provider_user_id));
    payload.insert("messageText".into(), json!(msg.text));
    payload.insert(
        "metadata".into(),
        Value::Object(msg.metadata.into_iter().map(|(k, v)| (k, Value::String(v))).collect()),
    );
    let args = api::queue::EnqueueArgs {
        conversation_id: ConversationId::parse(msg.conversation_id)?,
        agent_key: AgentKey::parse(msg.agent_key)?,
        payload,
        priority: None,
        scheduled_for: None,
        max_attempts: None,
        idempotency_key: msg.idempotency_key,
        now_ms: Default::default(),
        provider_config: Default::default(),
    };
    ctx.call_service::<api::EnqueueMessage>(&args).await
}

/// The longest free-text identifier (actorUserId, requestedBy) kept.
pub const MAX_ACTOR_BYTES: usize = 256;

pub fn check_actor(field: &str, value: &str) -> Result<(), OpError> {
    if value.len() > MAX_ACTOR_BYTES {
        return Err(OpError::invalid(format!("{field} must be at most {MAX_ACTOR_BYTES} bytes")));
    }
    Ok(())
}

/// A fresh id with a prefix: `<prefix><uuid7 hex>` (ids minted by this service).
pub fn mint(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}
