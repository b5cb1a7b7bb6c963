//! The user-facing aggregate APIs (spec §3.12): `getUserAgentsOverview`, `listUserAgents`,
//! `getUserAgent`, `getActiveUserAgent`, `getUserAgentOnboardingState`,
//! `getConversationViewForUserAgent`, `listQueueItemsForUserAgent` and
//! `sendMessageToUserAgent`.
//!
//! Everything here is read from what the other modules store — the user's bindings document
//! ([`crate::bindings`]), the user's pairing codes ([`crate::pairing`]), the agent profile, the
//! bot record and token secret ([`crate::telegram`]), the history stream ([`crate::history`])
//! — and, for queue items and the one write, from the queue through its operations
//! (`listQueueItemsForConversation`, `enqueueMessage`). Nothing is written here: the send is an
//! enqueue, whose idempotency key makes a retried call safe.
//!
//! Departures from the original (docs/deviations.md): the onboarding state machine reaches
//! every `nextAction` because `webhookReady` is what Telegram reported for the bot, not a proxy
//! that needs a finished pairing (T5); the bot username comes from `getMe`, never guessed from
//! the token's secret ref (T6); the conversation view carries the newest history items, not the
//! whole unbounded history (D3).

use std::collections::BTreeMap;

use common::OpError;
use common::api;
use common::api::pairing::PairingStatus;
use common::api::queue::{ConversationArgs, EnqueueArgs, JobStatus, JobView};
use common::api::user_agents::{
    ConversationView, ConversationViewArgs, ListUserAgentQueueItemsArgs, NextAction, OnboardingState,
    SendMessageToUserAgentArgs, UserAgentStatus, UserAgentView, UserAgentsOverview,
};
use common::auth::Caller;
use common::clock::Millis;
use common::ids::{AgentKey, ConversationId, MessageId};
use common::model::AgentProfile;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use serde_json::{Map, Value, json};

use crate::bindings::{self, Binding, BindingStatus, UserBindings};
use crate::history::{HistoryItem, HistoryRole};
use crate::pairing::{self, PairingRecord};
use crate::profiles::get_profile;

/// Pairing codes of one pair looked at (spec §3.12.1: the newest 20).
const CODES_PER_PAIR: usize = 20;
/// Queue items of a view: default and bounds (spec §3.12.2).
const DEFAULT_ITEMS: usize = 100;
const MAX_ITEMS: usize = 500;
/// History items of a conversation view: default and bound (D3).
const DEFAULT_HISTORY: usize = 200;
const MAX_HISTORY: usize = 1000;

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::GetUserAgentsOverview, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        overview(&ctx, &args.consumer_user_id).await
    });
    ops.handle::<api::ListUserAgents, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let mut agents = overview(&ctx, &args.consumer_user_id).await?.agents;
        if !args.include_disabled.unwrap_or(true) {
            agents.retain(|a| a.status != UserAgentStatus::Disabled);
        }
        Ok(agents)
    });
    ops.handle::<api::GetUserAgent, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let overview = overview(&ctx, &args.consumer_user_id).await?;
        Ok(overview.agents.into_iter().find(|a| a.agent_key == args.agent_key.as_str()))
    });
    ops.handle::<api::GetActiveUserAgent, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let overview = overview(&ctx, &args.consumer_user_id).await?;
        let Some(active) = overview.active_agent_key else { return Ok(None) };
        Ok(overview.agents.into_iter().find(|a| a.agent_key == active))
    });
    ops.handle::<api::GetUserAgentOnboardingState, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        onboarding(&ctx, &args.consumer_user_id, &args.agent_key).await
    });
    ops.handle::<api::GetConversationViewForUserAgent, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        conversation_view(&ctx, args).await
    });
    ops.handle::<api::ListQueueItemsForUserAgent, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        list_queue_items(&ctx, args).await
    });
    ops.handle::<api::SendMessageToUserAgent, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        send_message(&ctx, args).await
    });
}

/// Spec §3.12.1's "details" of a (user, agent) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Details {
    bot_identity: Option<String>,
    telegram_username: Option<String>,
    display_name: Option<String>,
    version: Option<String>,
    conversation_id: String,
    status: UserAgentStatus,
    binding_status: Option<BindingStatus>,
    pairing_status: Option<PairingStatus>,
    /// The newest code of the pair stored `pending` (possibly past its expiry).
    pending_code: Option<String>,
}

/// What [`derive`] reads about one pair.
struct Inputs<'a> {
    consumer_user_id: &'a str,
    agent_key: &'a str,
    now: Millis,
    /// Every kept binding of the user, newest first.
    bindings: &'a [Binding],
    /// The pair's codes, newest first.
    codes: &'a [PairingRecord],
    profile: Option<&'a AgentProfile>,
}

fn non_blank(value: Option<&str>) -> Option<String> {
    value.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)
}

/// The latest binding of the pair by `boundAt` (ties: the one written last, first in the
/// document), as spec §3.8.3 picks it.
fn latest_binding<'a>(bindings: &'a [Binding], agent_key: &str) -> Option<&'a Binding> {
    let mut latest: Option<&Binding> = None;
    for binding in bindings.iter().filter(|b| b.agent_key == agent_key) {
        if latest.is_none_or(|l| binding.bound_at > l.bound_at) {
            latest = Some(binding);
        }
    }
    latest
}

/// The bot identity of a pair: the first non-blank of the profile's, the latest binding's, the
/// latest code's and the latest pending code's.
fn bot_identity_of(inputs: &Inputs<'_>) -> Option<String> {
    let binding = latest_binding(inputs.bindings, inputs.agent_key);
    let pending = inputs.codes.iter().find(|c| c.status == PairingStatus::Pending);
    [
        inputs.profile.and_then(|p| p.bot_identity.as_deref()),
        binding.and_then(|b| b.bot_identity.as_deref()),
        inputs.codes.first().and_then(|c| c.bot_identity.as_deref()),
        pending.and_then(|c| c.bot_identity.as_deref()),
    ]
    .into_iter()
    .find_map(non_blank)
}

/// Spec §3.12.1 over loaded inputs. `bot_username` is the bot's real username from `getMe`
/// (T6), when the bot is known. A missing profile counts as a disabled one: nothing can be
/// enqueued for it.
fn derive(inputs: &Inputs<'_>, bot_username: Option<String>) -> Details {
    let binding = latest_binding(inputs.bindings, inputs.agent_key);
    let pending = inputs.codes.iter().find(|c| c.status == PairingStatus::Pending);
    let metadata =
        |key: &str| non_blank(binding.and_then(|b| b.metadata.as_ref()).and_then(|m| m.get(key)).map(|v| v.as_str()));
    let active = binding.is_some_and(Binding::is_active);
    let enabled = inputs.profile.is_some_and(|p| p.enabled);
    let pending_live = pending.is_some_and(|c| inputs.now < c.expires_at);
    let status = if active {
        if enabled { UserAgentStatus::Active } else { UserAgentStatus::Failed }
    } else if pending_live {
        UserAgentStatus::Pairing
    } else if binding.is_some() || !enabled {
        // The latest binding exists and is not active: it was revoked.
        UserAgentStatus::Disabled
    } else {
        UserAgentStatus::Draft
    };
    let pairing_status = match pending {
        _ if active => Some(PairingStatus::Used),
        None => None,
        Some(_) if !pending_live => Some(PairingStatus::Expired),
        Some(_) => Some(PairingStatus::Pending),
    };
    let conversation_id = non_blank(binding.map(|b| b.conversation_id.as_str()))
        .unwrap_or_else(|| bindings::user_agent_conversation_id(inputs.agent_key, inputs.consumer_user_id));
    Details {
        bot_identity: bot_identity_of(inputs),
        telegram_username: bot_username.or_else(|| metadata("telegramUsername")),
        display_name: metadata("displayName"),
        version: inputs.profile.map(|p| p.version.clone()),
        conversation_id,
        status,
        binding_status: binding.map(|b| b.status),
        pairing_status,
        pending_code: pending.map(|c| c.code.clone()),
    }
}

/// The user's pairing codes as their index lists them, newest first.
async fn user_codes(ctx: &ServiceContext, consumer_user_id: &str) -> Result<Vec<PairingRecord>, OpError> {
    let mut codes = Vec::new();
    for entry in pairing::user_index(ctx, consumer_user_id).await?.codes {
        if let Some(record) = pairing::load_code(ctx, &entry.code).await? {
            codes.push(record);
        }
    }
    Ok(codes)
}

/// The pair's details, with the profile they were derived from.
async fn details(
    ctx: &ServiceContext,
    consumer_user_id: &str,
    agent_key: &str,
    doc: Option<&UserBindings>,
    user_codes: &[PairingRecord],
) -> Result<(Details, Option<AgentProfile>), OpError> {
    let codes: Vec<PairingRecord> =
        user_codes.iter().filter(|c| c.agent_key == agent_key).take(CODES_PER_PAIR).cloned().collect();
    let profile = get_profile(ctx, agent_key).await?;
    let inputs = Inputs {
        consumer_user_id,
        agent_key,
        now: ctx.clock.now_ms(),
        bindings: doc.map(|d| d.bindings.as_slice()).unwrap_or_default(),
        codes: &codes,
        profile: profile.as_ref(),
    };
    let username = match bot_identity_of(&inputs) {
        Some(bot) => crate::telegram::bot_record(ctx, &bot).await?.and_then(|r| r.telegram_username),
        None => None,
    };
    Ok((derive(&inputs, username), profile))
}

fn view(consumer_user_id: &str, agent_key: &str, d: Details, can_create_new_agent: bool) -> UserAgentView {
    let active = d.status == UserAgentStatus::Active;
    UserAgentView {
        consumer_user_id: consumer_user_id.to_string(),
        agent_key: agent_key.to_string(),
        display_name: d.display_name,
        telegram_username: d.telegram_username,
        version: d.version,
        status: d.status,
        binding_status: d.binding_status,
        pairing_status: d.pairing_status,
        conversation_id: d.conversation_id,
        can_create_new_agent,
        can_disable: active,
        can_chat: active,
        can_manage_push_jobs: active,
    }
}

/// The agents of a user: those of the bindings, newest first, then those of pending codes.
fn agent_keys(doc: Option<&UserBindings>, codes: &[PairingRecord]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let bound = doc.iter().flat_map(|d| d.bindings.iter()).map(|b| &b.agent_key);
    let pending = codes.iter().filter(|c| c.status == PairingStatus::Pending).map(|c| &c.agent_key);
    for key in bound.chain(pending) {
        if !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    keys
}

/// `getUserAgentsOverview` (spec §3.12.2). An unknown user has no agents.
async fn overview(ctx: &ServiceContext, consumer_user_id: &str) -> Result<UserAgentsOverview, OpError> {
    let doc = bindings::load_user(ctx, consumer_user_id).await?;
    let codes = user_codes(ctx, consumer_user_id).await?;
    let active_agent_key = doc.as_ref().and_then(UserBindings::active).map(|b| b.agent_key.clone());
    let can_create_new_agent = active_agent_key.is_none();
    let mut agents = Vec::new();
    for agent_key in agent_keys(doc.as_ref(), &codes) {
        let (d, _) = details(ctx, consumer_user_id, &agent_key, doc.as_ref(), &codes).await?;
        agents.push(view(consumer_user_id, &agent_key, d, can_create_new_agent));
    }
    Ok(UserAgentsOverview { agents, active_agent_key, can_create_new_agent })
}

/// Whether Telegram delivers the bot's updates here: what it reported at the last webhook
/// set-up or readiness check, for this agent, with the bot's webhook secret stored here (T5).
async fn webhook_ready(ctx: &ServiceContext, bot: Option<&str>, agent_key: &str) -> Result<bool, OpError> {
    let Some(bot) = bot else { return Ok(false) };
    let record = crate::telegram::bot_record(ctx, bot).await?;
    Ok(record.is_some_and(|r| {
        r.webhook_ready && r.webhook_secret_sha256.is_some() && r.agent_key.as_deref() == Some(agent_key)
    }))
}

/// The onboarding step that comes next (spec §3.12.2), over the facts it depends on.
fn next_action(
    token_imported: bool,
    bot_known: bool,
    webhook_ready: bool,
    pairing_status: Option<PairingStatus>,
) -> NextAction {
    if !token_imported || !bot_known {
        NextAction::ImportToken
    } else if !webhook_ready {
        NextAction::ConfigureWebhook
    } else {
        match pairing_status {
            Some(PairingStatus::Pending) => NextAction::CompletePairing,
            Some(PairingStatus::Used) => NextAction::Ready,
            _ => NextAction::CreatePairing,
        }
    }
}

/// `getUserAgentOnboardingState` (spec §3.12.2, T5 fixed).
async fn onboarding(ctx: &ServiceContext, consumer_user_id: &str, agent_key: &str) -> Result<OnboardingState, OpError> {
    let doc = bindings::load_user(ctx, consumer_user_id).await?;
    let codes = user_codes(ctx, consumer_user_id).await?;
    let (d, profile) = details(ctx, consumer_user_id, agent_key, doc.as_ref(), &codes).await?;
    let token_secret_ref = crate::telegram::token_ref(profile.as_ref(), agent_key);
    let token_imported = common::secrets::load(ctx, &token_secret_ref).await?.is_some_and(|s| s.active().is_some());
    let webhook_ready = webhook_ready(ctx, d.bot_identity.as_deref(), agent_key).await?;
    let pairing_code = d.pending_code.filter(|_| d.pairing_status == Some(PairingStatus::Pending));
    let pairing_deep_link = match (&d.telegram_username, &pairing_code) {
        (Some(username), Some(code)) => Some(format!("https://t.me/{username}?start={code}")),
        _ => None,
    };
    Ok(OnboardingState {
        agent_key: agent_key.to_string(),
        next_action: next_action(token_imported, d.bot_identity.is_some(), webhook_ready, d.pairing_status),
        telegram_username: d.telegram_username,
        bot_identity: d.bot_identity,
        token_secret_ref,
        token_imported,
        webhook_ready,
        pairing_code,
        pairing_status: d.pairing_status,
        pairing_deep_link,
    })
}

/// The queue items of a conversation, newest first (at most `limit`, clamped as spec §3.12.2).
async fn queue_items(
    ctx: &ServiceContext,
    conversation_id: &str,
    limit: Option<usize>,
) -> Result<Vec<JobView>, OpError> {
    let args = ConversationArgs {
        conversation_id: ConversationId::parse(conversation_id)?,
        limit: Some(limit.unwrap_or(DEFAULT_ITEMS).clamp(1, MAX_ITEMS)),
    };
    ctx.call_service::<api::ListQueueItemsForConversation>(&args).await
}

/// The latest `at` of the items of `role`.
fn last_at(items: &[HistoryItem], role: HistoryRole) -> Option<Millis> {
    items.iter().filter(|i| i.role == role).map(|i| i.at).max()
}

/// `getConversationViewForUserAgent` (spec §3.12.2): the pair's conversation whether or not the
/// binding is still active; an unknown conversation is empty.
async fn conversation_view(ctx: &ServiceContext, args: ConversationViewArgs) -> Result<ConversationView, OpError> {
    let target = bindings::user_agent_target(ctx, &args.consumer_user_id, &args.agent_key, false).await?;
    let conversation_id = target.conversation_id;
    let history_limit = args.history_limit.unwrap_or(DEFAULT_HISTORY).clamp(1, MAX_HISTORY);
    let context_history = crate::history::newest(ctx, &conversation_id, history_limit).await?;
    let queue_items = queue_items(ctx, &conversation_id, args.limit).await?;
    Ok(ConversationView {
        has_queued_jobs: queue_items.iter().any(|j| matches!(j.status, JobStatus::Queued | JobStatus::Processing)),
        latest_message_id: queue_items.first().map(|j| j.id.clone()),
        last_user_message_at: last_at(&context_history, HistoryRole::User),
        last_assistant_message_at: last_at(&context_history, HistoryRole::Assistant),
        conversation_id,
        context_history,
        pending_tool_calls: Vec::new(),
        queue_items,
    })
}

/// `listQueueItemsForUserAgent` (spec §3.12.2): the statuses filter the newest `limit` items.
async fn list_queue_items(ctx: &ServiceContext, args: ListUserAgentQueueItemsArgs) -> Result<Vec<JobView>, OpError> {
    let target = bindings::user_agent_target(ctx, &args.consumer_user_id, &args.agent_key, false).await?;
    let mut items = queue_items(ctx, &target.conversation_id, args.limit).await?;
    if let Some(statuses) = &args.statuses {
        items.retain(|j| statuses.contains(&j.status));
    }
    Ok(items)
}

/// `sendMessageToUserAgent` (spec §3.12.2): enqueues into the conversation of the user's
/// active binding to the agent, as the user's Telegram identity when the binding has one.
async fn send_message(ctx: &ServiceContext, args: SendMessageToUserAgentArgs) -> Result<MessageId, OpError> {
    let consumer = args.consumer_user_id.as_str();
    if args.content.trim().is_empty() {
        return Err(OpError::invalid("content must not be empty"));
    }
    let target = bindings::user_agent_target(ctx, consumer, &args.agent_key, true).await?;
    let provider_user_id = target
        .telegram_user_id
        .clone()
        .or_else(|| target.telegram_chat_id.clone())
        .unwrap_or_else(|| consumer.to_string());
    let mut metadata: BTreeMap<String, String> = args.metadata.unwrap_or_default();
    metadata.insert("consumerUserId".into(), consumer.to_string());
    metadata.insert("source".into(), "user_agent_api".into());
    if let Some(chat) = &target.telegram_chat_id {
        metadata.insert("telegramChatId".into(), chat.clone());
    }
    if let Some(user) = &target.telegram_user_id {
        metadata.insert("telegramUserId".into(), user.clone());
    }
    let mut payload = Map::new();
    payload.insert("provider".into(), json!(target.provider));
    payload.insert("providerUserId".into(), json!(provider_user_id));
    payload.insert("messageText".into(), json!(args.content));
    payload
        .insert("metadata".into(), Value::Object(metadata.into_iter().map(|(k, v)| (k, Value::String(v))).collect()));
    let enqueue = EnqueueArgs {
        conversation_id: ConversationId::parse(&target.conversation_id)?,
        agent_key: AgentKey::parse(args.agent_key.as_str())?,
        payload,
        priority: None,
        scheduled_for: None,
        max_attempts: None,
        idempotency_key: args.idempotency_key,
        now_ms: api::Ignored,
        provider_config: api::Ignored,
    };
    let message_id = ctx.call_service::<api::EnqueueMessage>(&enqueue).await?;
    tracing::info!(
        consumer_user_id = %consumer,
        agent_key = %args.agent_key,
        conversation_id = %target.conversation_id,
        %message_id,
        "message sent to user agent"
    );
    Ok(message_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bindings::tests::binding;

    fn code(agent: &str, status: PairingStatus, expires_at: Millis) -> PairingRecord {
        PairingRecord {
            code: format!("CODE{agent}"),
            consumer_user_id: "u1".into(),
            agent_key: agent.into(),
            bot_identity: Some("77".into()),
            status,
            created_at: 0,
            expires_at,
            used_at: None,
            telegram_user_id: None,
            telegram_chat_id: None,
        }
    }

    fn profile(enabled: bool) -> AgentProfile {
        AgentProfile {
            agent_key: "a".into(),
            version: "2.0".into(),
            secrets_ref: vec![],
            bot_identity: None,
            company_id: None,
            bridge_config: None,
            enabled,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn derive_with(bindings: &[Binding], codes: &[PairingRecord], profile: Option<&AgentProfile>) -> Details {
        let inputs = Inputs { consumer_user_id: "u1", agent_key: "a", now: 100, bindings, codes, profile };
        derive(&inputs, None)
    }

    #[test]
    fn status_follows_the_latest_binding_then_the_pending_code() {
        let enabled = profile(true);
        let disabled = profile(false);
        let active = [binding("a", BindingStatus::Active, 5)];
        let revoked = [binding("a", BindingStatus::Revoked, 5)];
        let live = [code("a", PairingStatus::Pending, 200)];
        let stale = [code("a", PairingStatus::Pending, 100)];
        let status = |b: &[Binding], c: &[PairingRecord], p| derive_with(b, c, p).status;
        assert_eq!(status(&active, &[], Some(&enabled)), UserAgentStatus::Active);
        assert_eq!(status(&active, &[], Some(&disabled)), UserAgentStatus::Failed);
        assert_eq!(status(&active, &[], None), UserAgentStatus::Failed);
        assert_eq!(status(&revoked, &live, Some(&enabled)), UserAgentStatus::Pairing);
        assert_eq!(status(&revoked, &stale, Some(&enabled)), UserAgentStatus::Disabled);
        assert_eq!(status(&[], &stale, Some(&disabled)), UserAgentStatus::Disabled);
        assert_eq!(status(&[], &stale, Some(&enabled)), UserAgentStatus::Draft);
        assert_eq!(status(&[], &[], Some(&enabled)), UserAgentStatus::Draft);
    }

    #[test]
    fn pairing_status_is_used_pending_expired_or_null() {
        let enabled = profile(true);
        let p = Some(&enabled);
        let pairing = |b: &[Binding], c: &[PairingRecord]| derive_with(b, c, p).pairing_status;
        let active = [binding("a", BindingStatus::Active, 5)];
        assert_eq!(pairing(&active, &[]), Some(PairingStatus::Used));
        assert_eq!(pairing(&[], &[]), None);
        assert_eq!(pairing(&[], &[code("a", PairingStatus::Used, 200)]), None, "only pending codes count");
        assert_eq!(pairing(&[], &[code("a", PairingStatus::Pending, 100)]), Some(PairingStatus::Expired));
        assert_eq!(pairing(&[], &[code("a", PairingStatus::Pending, 101)]), Some(PairingStatus::Pending));
    }

    #[test]
    fn details_read_the_latest_binding_of_the_pair_and_fall_back() {
        let mut newest = binding("a", BindingStatus::Active, 9);
        newest.metadata = Some(BTreeMap::from([
            ("displayName".to_string(), " Ann ".to_string()),
            ("telegramUsername".to_string(), "from_metadata".to_string()),
        ]));
        newest.conversation_id = "custom".into();
        newest.bot_identity = Some(" ".into());
        let bindings = [binding("other", BindingStatus::Active, 20), newest, binding("a", BindingStatus::Revoked, 3)];
        let codes = [code("a", PairingStatus::Used, 0)];
        let enabled = profile(true);
        let d = derive_with(&bindings, &codes, Some(&enabled));
        assert_eq!(d.display_name.as_deref(), Some("Ann"));
        assert_eq!(d.telegram_username.as_deref(), Some("from_metadata"));
        assert_eq!(d.conversation_id, "custom");
        assert_eq!(d.version.as_deref(), Some("2.0"));
        assert_eq!(d.bot_identity.as_deref(), Some("77"), "a blank binding bot falls through to the code's");
        let inputs = Inputs {
            consumer_user_id: "u1",
            agent_key: "a",
            now: 0,
            bindings: &bindings,
            codes: &codes,
            profile: None,
        };
        assert_eq!(derive(&inputs, Some("real_bot".into())).telegram_username.as_deref(), Some("real_bot"));
        let none = derive_with(&[], &[], None);
        assert_eq!(none.conversation_id, "user-agent:a:u1");
        assert_eq!((none.version, none.bot_identity, none.telegram_username), (None, None, None));
    }

    #[test]
    fn agent_keys_are_bound_ones_newest_first_then_pending_codes() {
        let doc = UserBindings {
            consumer_user_id: "u1".into(),
            bindings: vec![
                binding("b", BindingStatus::Active, 3),
                binding("a", BindingStatus::Revoked, 2),
                binding("b", BindingStatus::Revoked, 1),
            ],
        };
        let codes = [
            code("c", PairingStatus::Pending, 0),
            code("a", PairingStatus::Pending, 0),
            code("d", PairingStatus::Expired, 0),
        ];
        assert_eq!(agent_keys(Some(&doc), &codes), vec!["b", "a", "c"]);
        assert!(agent_keys(None, &[]).is_empty());
    }

    #[test]
    fn next_action_reaches_every_state() {
        use NextAction::*;
        assert_eq!(next_action(false, true, true, Some(PairingStatus::Used)), ImportToken);
        assert_eq!(next_action(true, false, true, None), ImportToken);
        assert_eq!(next_action(true, true, false, Some(PairingStatus::Used)), ConfigureWebhook);
        assert_eq!(next_action(true, true, true, None), CreatePairing);
        assert_eq!(next_action(true, true, true, Some(PairingStatus::Expired)), CreatePairing);
        assert_eq!(next_action(true, true, true, Some(PairingStatus::Pending)), CompletePairing);
        assert_eq!(next_action(true, true, true, Some(PairingStatus::Used)), Ready);
    }

    #[test]
    fn last_at_takes_the_latest_of_a_role() {
        let item = |role, at| HistoryItem { role, content: String::new(), at };
        let items = [item(HistoryRole::User, 1), item(HistoryRole::Assistant, 2), item(HistoryRole::User, 3)];
        assert_eq!(last_at(&items, HistoryRole::User), Some(3));
        assert_eq!(last_at(&items, HistoryRole::Assistant), Some(2));
        assert_eq!(last_at(&items, HistoryRole::Tool), None);
    }
}
