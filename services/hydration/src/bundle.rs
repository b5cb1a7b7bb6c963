//! The hydration bundle (spec §3.5.2–3.5.4): everything a worker needs to process the job it
//! claimed — payload with attachment links and attached metadata, recent history, bot token, bridge configuration —
//! and the bridge environment the scheduler forwards to spawned workers.
//!
//! The bundle carries secrets, so only the worker holding the job's lease (or an admin) gets it
//! (fix S2). The lease is read from `af_queue_state`, which the queue leader writes before the
//! job is handed out, so a worker asking right after its claim always finds it.

use std::sync::Arc;

use common::OpError;
use common::api;
pub use common::api::history::BridgeRuntimeConfig;
use common::api::history::{Bundle, BundleArgs, ConversationState, ModelRuntimeConfig, SpawnEnv};
use common::auth::{Caller, Role};
use common::crypto::SecretCipher;
use common::model::{AgentProfile, QueueState, WorkerRow};
use common::ops::OpRegistry;
use common::secrets::active_secret;
use common::service::ServiceContext;
use common::token::escape;
use common::topology::INBOX_STREAM;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use crate::secrets::{bot_token_refs, first_active_secret, scoped_candidates};
use crate::{attachments, fence, history, profiles};

/// The part of an inbox message the bundle needs (the queue's `Job`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InboxJob {
    message_id: String,
    conversation_id: String,
    agent_key: String,
    payload: serde_json::Map<String, Value>,
}

pub(crate) fn register(ctx: &ServiceContext, cipher: Arc<SecretCipher>, ops: &mut OpRegistry) {
    let state = (ctx.clone(), cipher);
    ops.handle::<api::GetHydrationBundleForClaimedJob, _, _, _, _>(
        &state,
        |(ctx, cipher), caller: Caller, args| async move { bundle(&ctx, &cipher, &caller, args).await },
    );
    ops.handle::<api::GetWorkerSpawnOpenClawEnv, _, _, _, _>(&state, |(ctx, cipher), _: Caller, _| async move {
        spawn_env(&ctx, &cipher).await
    });
}

async fn bundle(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    caller: &Caller,
    args: BundleArgs,
) -> Result<Option<Bundle>, OpError> {
    let message_id = args.message_id.as_str();
    let Some((conversation_id, state)) = find_head(ctx, caller, message_id, args.conversation_id.as_deref()).await?
    else {
        return Ok(None);
    };
    // Only a processing job has a bundle (spec §3.5.2), and only its lease holder may see it.
    let Some(head) = state.head.as_ref().filter(|h| h.message_id == message_id && h.lease.is_some()) else {
        return Ok(None);
    };
    if caller.role == Role::Worker {
        let worker_id = caller.worker_id.as_deref().unwrap_or_default();
        if !fence::holds_lease(&state, worker_id, ctx.clock.now_ms()) {
            return Err(fence::not_holder(worker_id, &conversation_id));
        }
    }
    let stream = ctx.js.get_stream_no_info(INBOX_STREAM).await.map_err(OpError::internal)?;
    let message = stream.direct_get(head.seq).await.map_err(OpError::internal)?;
    let job: InboxJob = serde_json::from_slice(&message.payload).map_err(OpError::internal)?;
    if job.message_id != message_id {
        return Err(OpError::internal(format!("inbox sequence {} does not hold message {message_id}", head.seq)));
    }
    let Some(conversation) = fence::conversation(ctx, &job.conversation_id).await? else {
        return Ok(None);
    };
    let Some(profile) = profiles::get_profile(ctx, &job.agent_key).await? else {
        return Ok(None);
    };
    let context_history = history::current_cache(ctx, &conversation).await?.map(|c| c.delta_context);
    let bot_token = first_active_secret(ctx, cipher, &bot_token_refs(&profile.secrets_ref)).await?;
    let mut payload = job.payload;
    attachments::hydrate_payload(ctx, message_id, &mut payload).await?;
    // Keys attached after enqueue (`attachMessageMetadata`) win over the enqueued ones.
    let extra = common::extras::metadata_of(&ctx.buckets, &job.conversation_id, message_id).await?;
    common::extras::merge_metadata(&mut payload, &extra.unwrap_or_default());
    Ok(Some(Bundle {
        message_id: job.message_id,
        conversation_id: job.conversation_id,
        agent_key: job.agent_key,
        payload,
        conversation_state: ConversationState {
            context_history: context_history.unwrap_or_default(),
            pending_tool_calls: Vec::new(),
        },
        telegram_bot_token: bot_token.map(|(_, v)| v.expose_secret().to_string()),
        bridge_runtime_config: bridge_runtime_config(ctx, cipher, &profile).await?,
        model_runtime_config: model_runtime_config(ctx, cipher, &profile.agent_key).await?,
    }))
}

/// The queue state of the conversation whose head is `message_id`.
async fn find_head(
    ctx: &ServiceContext,
    caller: &Caller,
    message_id: &str,
    conversation_id: Option<&str>,
) -> Result<Option<(String, QueueState)>, OpError> {
    let conversation_id = match (conversation_id, &caller.worker_id) {
        (Some(c), _) => Some(c.to_string()),
        (None, Some(worker_id)) => {
            let row = ctx.buckets.workers.get::<WorkerRow>(&escape(worker_id)).await.map_err(OpError::internal)?;
            row.and_then(|r| r.value.assignment).map(|a| a.conversation_id)
        }
        (None, None) => None,
    };
    if let Some(conversation_id) = conversation_id {
        let state = fence::queue_state(ctx, &conversation_id).await?;
        return Ok(state.map(|s| (conversation_id, s)));
    }
    // An admin without a conversation: look through the heads (an operator's debugging path).
    let states = ctx.buckets.queue_state.scan::<Value>(">").await.map_err(OpError::internal)?;
    Ok(states.into_iter().find_map(|(_, v)| {
        let state: QueueState = serde_json::from_value(v.value).ok()?;
        let is_head = state.head.as_ref().is_some_and(|h| h.message_id == message_id);
        is_head.then(|| (state.conversation_id.clone(), state))
    }))
}

async fn secret_value(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    refs: &[String],
) -> Result<Option<(String, String)>, OpError> {
    let found = first_active_secret(ctx, cipher, refs).await?;
    Ok(found.map(|(r, v): (String, SecretString)| (r, v.expose_secret().to_string())))
}

/// Spec §3.5.3: profile fields win over secrets; `null` unless the bridge is enabled.
pub async fn bridge_runtime_config(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    profile: &AgentProfile,
) -> Result<Option<BridgeRuntimeConfig>, OpError> {
    let Some(bridge) = profile.bridge_config.as_ref().filter(|b| b.enabled) else {
        return Ok(None);
    };
    let agent = profile.agent_key.as_str();
    let scoped = |prefix: &str, preferred: Option<&str>| scoped_candidates(agent, prefix, preferred);
    let service_key =
        secret_value(ctx, cipher, &scoped("agent-bridge.serviceKey", bridge.service_key_secret_ref.as_deref())).await?;
    Ok(Some(BridgeRuntimeConfig {
        base_url: profile_or_secret(ctx, cipher, agent, &bridge.base_url, "agent-bridge.baseUrl").await?,
        app_base_url_map_json: secret_value(
            ctx,
            cipher,
            &scoped("agent-bridge.baseUrlMapJson", bridge.app_base_url_map_json_secret_ref.as_deref()),
        )
        .await?
        .map(|(_, v)| v),
        service_id: profile_or_secret(ctx, cipher, agent, &bridge.service_id, "agent-bridge.serviceId").await?,
        app_key: profile_or_secret(ctx, cipher, agent, &bridge.app_key, "agent-bridge.appKey").await?,
        service_key_secret_ref: service_key.as_ref().map(|(r, _)| r.clone()),
        service_key: service_key.map(|(_, v)| v),
        bot_identity: profile.bot_identity.clone(),
    }))
}

/// The agent's model provider from its scoped secrets (`model.baseUrl`, `model.name`,
/// `model.apiKey`, `model.api`); `None` when none is set.
pub async fn model_runtime_config(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    agent_key: &str,
) -> Result<Option<ModelRuntimeConfig>, OpError> {
    let get = |prefix: &'static str| async move {
        Ok::<_, OpError>(secret_value(ctx, cipher, &scoped_candidates(agent_key, prefix, None)).await?.map(|(_, v)| v))
    };
    let config = ModelRuntimeConfig {
        base_url: get("model.baseUrl").await?,
        model: get("model.name").await?,
        api_key: get("model.apiKey").await?,
        api: get("model.api").await?,
    };
    Ok((config != ModelRuntimeConfig::default()).then_some(config))
}

/// A profile field when present (even empty: spec §3.5.3), else the first active scoped secret.
async fn profile_or_secret(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    agent_key: &str,
    field: &Option<String>,
    prefix: &str,
) -> Result<Option<String>, OpError> {
    match field {
        Some(v) => Ok(Some(v.clone())),
        None => Ok(secret_value(ctx, cipher, &scoped_candidates(agent_key, prefix, None)).await?.map(|(_, v)| v)),
    }
}

/// Spec §3.5.4: the bridge variables every spawned worker gets. A global secret wins; otherwise
/// a value is forwarded only when every bridge-enabled profile agrees on it.
async fn spawn_env(ctx: &ServiceContext, cipher: &SecretCipher) -> Result<SpawnEnv, OpError> {
    let global = |secret_ref: &'static str| async move {
        Ok::<_, OpError>(active_secret(ctx, cipher, secret_ref).await?.map(|v| v.expose_secret().to_string()))
    };
    let profiles: Vec<AgentProfile> = ctx
        .buckets
        .profiles
        .scan::<AgentProfile>(">")
        .await
        .map_err(OpError::internal)?
        .into_iter()
        .map(|(_, v)| v.value)
        .filter(|p| p.enabled && p.bridge_config.as_ref().is_some_and(|b| b.enabled))
        .collect();
    let service_id = match global("agent-bridge.serviceId").await? {
        Some(v) => Some(v),
        None => {
            let mut values = Vec::new();
            for p in &profiles {
                let preferred = p.bridge_config.as_ref().and_then(|b| b.service_id.clone());
                values.push(profile_or_secret(ctx, cipher, &p.agent_key, &preferred, "agent-bridge.serviceId").await?);
            }
            unambiguous(values)
        }
    };
    let service_key = match global("agent-bridge.serviceKey").await? {
        Some(v) => Some(v),
        None => {
            let mut values = Vec::new();
            for p in &profiles {
                let preferred = p.bridge_config.as_ref().and_then(|b| b.service_key_secret_ref.as_deref());
                let refs = scoped_candidates(&p.agent_key, "agent-bridge.serviceKey", preferred);
                values.push(secret_value(ctx, cipher, &refs).await?.map(|(_, v)| v));
            }
            unambiguous(values)
        }
    };
    let linking = global("agent-bridge.linkingSharedSecret").await?;
    let present = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
    Ok(SpawnEnv {
        service_id: present(service_id),
        service_key: present(service_key),
        linking_shared_secret: present(linking),
    })
}

/// The single distinct non-empty value, if there is exactly one.
fn unambiguous(values: Vec<Option<String>>) -> Option<String> {
    let mut distinct: Vec<String> = values.into_iter().flatten().filter(|v| !v.trim().is_empty()).collect();
    distinct.sort();
    distinct.dedup();
    (distinct.len() == 1).then(|| distinct.remove(0))
}

#[cfg(test)]
mod tests {
    use super::unambiguous;

    #[test]
    fn only_one_distinct_value_is_forwarded() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(unambiguous(vec![s("a"), s("a"), None]), s("a"));
        assert_eq!(unambiguous(vec![s("a"), s("b")]), None);
        assert_eq!(unambiguous(vec![None, s(" ")]), None);
        assert_eq!(unambiguous(vec![]), None);
    }
}
