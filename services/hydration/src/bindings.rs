//! Identity bindings (spec §1.9, §3.8): which agent a consumer user talks to, and which consumer
//! user a Telegram identity belongs to. Operations `bindUserAgent`, `revokeUserAgentBinding`,
//! `resolveAgentForUser`, `getUserAgentBinding` and `resolveAgentForTelegram`; helpers for other modules:
//! [`user_agent_target`] (spec §3.8.3, used by snapshots and the user-agent queue APIs),
//! [`user_agent_conversation_id`] and [`resolve_telegram`].
//!
//! # Storage (`af_bindings`)
//!
//! * `u.<escaped consumerUserId>`: a [`UserBindings`] document holding every kept binding of
//!   the user, newest first. At most one of them is active (spec §1.9). History is kept but
//!   bounded (spec §6.4 D3): the active binding plus the newest [`MAX_REVOKED_KEPT`] revoked
//!   ones; older revoked bindings are dropped on the next write of the document.
//! * `tgu.<escaped bot>.<escaped telegramUserId>` and `tgc.<escaped bot>.<escaped telegramChatId>`:
//!   Telegram index keys ([`TelegramIndex`]) naming the consumer user that holds (or last held)
//!   the active binding carrying that bot and id. They are never deleted, only re-pointed by the
//!   next bind of the same identity, so there is one per Telegram identity ever bound: they grow
//!   with the number of distinct Telegram users and chats, not with binding churn.
//!
//! # Write order of `bindUserAgent`
//!
//! A bind touches several keys and KV has no multi-key transaction, so the writes are ordered
//! such that a process killed between any two of them leaves a state readers tolerate and that
//! a retry of the same call repairs. Every single write is a compare-and-set retried on conflict
//! (bounded; then `409`).
//!
//! 1. **Claim the index keys** of the given Telegram ids (point them at this consumer). An index
//!    key is only a hint: resolution through it checks that the named consumer's *active*
//!    binding really carries that bot and id, and otherwise treats the identity as unbound. So a
//!    key claimed by a bind that died before step 3 resolves to nothing (the previous holder is
//!    no longer found through it either, which is what the interrupted bind was about to make
//!    true anyway); the retry claims it again and completes.
//! 2. **Revoke the other consumer's binding** that the claim displaced, if its active binding
//!    still carries this bot and id (spec §3.8.2 step 4). Dying here leaves that consumer
//!    unbound and this one not yet bound; the retry finds the key already claimed and goes on.
//! 3. **Write this consumer's document**: revoke every active binding of the user (spec step 3,
//!    T9's one-active-binding-per-user model is kept) and insert the new active one.
//! 4. **Re-check the claimed keys.** Two concurrent binds of the same Telegram identity for two
//!    consumers can interleave so that the later claimer's step 2 runs before the earlier
//!    claimer's step 3. The earlier one then finds the key naming the other consumer and
//!    revokes its own new binding: the later claim wins, and the invariant "per bot at most one
//!    active binding per Telegram id" holds again. (Killed between 3 and 4, two consumers may
//!    both hold an active binding with that id; the index names the later one, so Telegram
//!    resolution is still unambiguous, and any retry re-establishes the invariant.)
//!
//! `revokeUserAgentBinding` writes the user document only; the index keys it leaves behind fail
//! the resolution check and are re-pointed by the next bind.

use std::collections::BTreeMap;

use common::OpError;
use common::api;
use common::api::bindings::{AgentForUser, BindArgs, RevokeResult, TelegramResolution, TelegramResolveArgs};
pub use common::api::bindings::{BindingSource, BindingStatus, BindingView};
use common::auth::Caller;
use common::clock::Millis;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::store::StoreError;
use common::token::escape;
use serde::{Deserialize, Serialize};

use crate::profiles::{get_profile, validate_agent_key};

/// Revoked bindings kept per consumer user besides the active one (spec §6.4 D3: the original
/// kept every binding forever).
pub const MAX_REVOKED_KEPT: usize = 50;
/// Largest consumerUserId, botIdentity, telegramUserId or telegramChatId, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Metadata bounds; with [`MAX_REVOKED_KEPT`] they keep a user document far below the 1 MiB
/// NATS message limit.
pub const MAX_METADATA_ENTRIES: usize = 16;
pub const MAX_METADATA_KEY_BYTES: usize = 64;
pub const MAX_METADATA_VALUE_BYTES: usize = 512;
pub const MAX_METADATA_TOTAL_BYTES: usize = 2048;
/// Attempts of one compare-and-set loop over an index key before answering `409`.
const INDEX_CAS_ATTEMPTS: usize = 32;

/// One binding as stored inside its user's document (the consumerUserId is the document's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    pub agent_key: String,
    pub conversation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<String>,
    pub status: BindingStatus,
    pub source: BindingSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_chat_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    pub bound_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Millis>,
}

impl Binding {
    pub fn is_active(&self) -> bool {
        self.status == BindingStatus::Active
    }

    fn revoke(&mut self, now: Millis) {
        self.status = BindingStatus::Revoked;
        self.revoked_at = Some(now);
    }

    /// Whether this binding carries `bot` together with the given user id or chat id.
    fn carries(&self, bot: &str, telegram_user_id: Option<&str>, telegram_chat_id: Option<&str>) -> bool {
        if self.bot_identity.as_deref() != Some(bot) {
            return false;
        }
        let user_matches = telegram_user_id.is_some() && self.telegram_user_id.as_deref() == telegram_user_id;
        let chat_matches = telegram_chat_id.is_some() && self.telegram_chat_id.as_deref() == telegram_chat_id;
        user_matches || chat_matches
    }
}

/// Every kept binding of one consumer user, newest first (key `u.<escaped consumerUserId>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserBindings {
    pub consumer_user_id: String,
    pub bindings: Vec<Binding>,
}

impl UserBindings {
    /// The active binding. Writes keep at most one; the newest wins should a document ever hold
    /// more.
    pub fn active(&self) -> Option<&Binding> {
        self.bindings.iter().find(|b| b.is_active())
    }

    /// Revokes every active binding; returns how many.
    fn revoke_all(&mut self, now: Millis) -> usize {
        let mut count = 0;
        for binding in self.bindings.iter_mut().filter(|b| b.is_active()) {
            binding.revoke(now);
            count += 1;
        }
        count
    }

    /// Drops the oldest revoked bindings beyond [`MAX_REVOKED_KEPT`]; active ones always stay.
    fn bound_history(&mut self) {
        let mut revoked_seen = 0;
        self.bindings.retain(|b| {
            if b.is_active() {
                return true;
            }
            revoked_seen += 1;
            revoked_seen <= MAX_REVOKED_KEPT
        });
    }
}

/// The value of a Telegram index key: who claimed the identity, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelegramIndex {
    pub consumer_user_id: String,
    pub claimed_at: Millis,
}

/// The binding view every operation returns (spec §3.8.2); absent fields are `null`.
pub fn binding_view(consumer_user_id: &str, binding: &Binding) -> BindingView {
    BindingView {
        consumer_user_id: consumer_user_id.to_string(),
        agent_key: binding.agent_key.clone(),
        conversation_id: binding.conversation_id.clone(),
        bot_identity: binding.bot_identity.clone(),
        status: binding.status,
        source: binding.source,
        telegram_user_id: binding.telegram_user_id.clone(),
        telegram_chat_id: binding.telegram_chat_id.clone(),
        metadata: binding.metadata.clone(),
        bound_at: binding.bound_at,
        revoked_at: binding.revoked_at,
    }
}

/// The user-agent target of spec §3.8.3 (latest binding of (consumerUserId, agentKey) by boundAt, active or revoked).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserAgentTarget {
    pub conversation_id: String,
    /// `"telegram"` when the binding carries a chat id, else `"system_push"`.
    pub provider: String,
    pub telegram_chat_id: Option<String>,
    pub telegram_user_id: Option<String>,
    pub binding_active: bool,
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::BindUserAgent, _, _, _, _>(ctx, |ctx, _: Caller, args| async move { bind(&ctx, args).await });
    ops.handle::<api::RevokeUserAgentBinding, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let revoked = revoke(&ctx, &args.consumer_user_id).await?;
        Ok(RevokeResult { revoked })
    });
    ops.handle::<api::ResolveAgentForUser, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let active = active_binding(&ctx, &args.consumer_user_id).await?;
        Ok(AgentForUser {
            agent_key: active.map(|b| b.agent_key),
            consumer_user_id: args.consumer_user_id.into_string(),
        })
    });
    ops.handle::<api::GetUserAgentBinding, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let active = active_binding(&ctx, &args.consumer_user_id).await?;
        Ok(active.map(|b| binding_view(&args.consumer_user_id, &b)))
    });
    ops.handle::<api::ResolveAgentForTelegram, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        resolve_for_telegram(&ctx, args).await
    });
}

/// `resolveAgentForTelegram` (spec §3.8.3): `{consumerUserId, agentKey, conversationId}` of the
/// active binding carrying the bot and the Telegram user id (tried first) or chat id; all null
/// when none does. Only within the given bot (T9, S8): a missing bot is refused.
async fn resolve_for_telegram(ctx: &ServiceContext, args: TelegramResolveArgs) -> Result<TelegramResolution, OpError> {
    let bot = args.bot_identity.as_deref().map(str::trim).unwrap_or_default();
    if bot.is_empty() {
        return Err(OpError::invalid(
            "botIdentity: required; a Telegram user or chat is resolved only within its bot (a lookup without \
             one is ambiguous across bots)",
        ));
    }
    let mut ids = [("telegramUserId", args.telegram_user_id), ("telegramChatId", args.telegram_chat_id)]
        .map(|(field, id)| (field, id.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())));
    for (field, id) in &mut ids {
        if let Some(id) = id {
            validate_id(field, id)?;
        }
    }
    let [(_, user), (_, chat)] = ids;
    if user.is_none() && chat.is_none() {
        return Ok(TelegramResolution::default());
    }
    let found = resolve_telegram(ctx, bot, user.as_deref(), chat.as_deref()).await?;
    Ok(found.map_or_else(TelegramResolution::default, |b| TelegramResolution {
        consumer_user_id: Some(b.consumer_user_id),
        agent_key: Some(b.agent_key),
        conversation_id: Some(b.conversation_id),
    }))
}

/// The conversation id of a (user, agent) pair (spec §3.8.1), stable across re-pairing.
pub fn user_agent_conversation_id(agent_key: &str, consumer_user_id: &str) -> String {
    format!("user-agent:{agent_key}:{consumer_user_id}")
}

/// The user-agent target of spec §3.8.3 (latest binding of (consumerUserId, agentKey) by boundAt, active or revoked).
pub async fn user_agent_target(
    ctx: &ServiceContext,
    consumer_user_id: &str,
    agent_key: &str,
    require_active: bool,
) -> Result<UserAgentTarget, OpError> {
    validate_id("consumerUserId", consumer_user_id)?;
    validate_agent_key(agent_key)?;
    let doc = load_user(ctx, consumer_user_id).await?;
    target_from(doc.as_ref(), consumer_user_id, agent_key, require_active)
}

/// The consumer user's active binding that carries `bot_identity` and the Telegram user id
/// (tried first) or chat id, found through the Telegram index keys. Unlike the original there is
/// no lookup without a bot (T9: such lookups are ambiguous across bots), so a blank
/// `bot_identity` is refused.
pub async fn resolve_telegram(
    ctx: &ServiceContext,
    bot_identity: &str,
    telegram_user_id: Option<&str>,
    telegram_chat_id: Option<&str>,
) -> Result<Option<BindingView>, OpError> {
    let bot = bot_identity.trim();
    validate_id("botIdentity", bot)?;
    let user = telegram_user_id.map(str::trim).filter(|s| !s.is_empty());
    let chat = telegram_chat_id.map(str::trim).filter(|s| !s.is_empty());
    let lookups =
        [(user.map(|u| user_index_key(bot, u)), user, None), (chat.map(|c| chat_index_key(bot, c)), None, chat)];
    for (key, user, chat) in lookups {
        let Some(key) = key else { continue };
        let Some(index) = ctx.buckets.bindings.get::<TelegramIndex>(&key).await? else { continue };
        let holder = &index.value.consumer_user_id;
        // The key is a hint (see the module doc): only the holder's active binding decides.
        let doc = load_user(ctx, holder).await?;
        if let Some(active) = doc.as_ref().and_then(UserBindings::active).filter(|b| b.carries(bot, user, chat)) {
            return Ok(Some(binding_view(holder, active)));
        }
    }
    Ok(None)
}

/// Spec §3.8.3's target rule over a loaded document: the latest binding of the pair by
/// `boundAt` (ties: the one written last, which comes first in the document).
fn target_from(
    doc: Option<&UserBindings>,
    consumer_user_id: &str,
    agent_key: &str,
    require_active: bool,
) -> Result<UserAgentTarget, OpError> {
    let mut latest: Option<&Binding> = None;
    for binding in doc.iter().flat_map(|d| d.bindings.iter()).filter(|b| b.agent_key == agent_key) {
        if latest.is_none_or(|l| binding.bound_at > l.bound_at) {
            latest = Some(binding);
        }
    }
    let active = latest.is_some_and(Binding::is_active);
    if require_active && !active {
        return Err(OpError::not_found("No active binding found for consumerUserId and agentKey"));
    }
    let conversation_id = latest
        .map(|b| b.conversation_id.trim())
        .filter(|c| !c.is_empty())
        .map_or_else(|| user_agent_conversation_id(agent_key, consumer_user_id), str::to_string);
    let chat = latest.and_then(|b| b.telegram_chat_id.clone());
    let (provider, telegram_chat_id, telegram_user_id) = match chat {
        Some(chat) => ("telegram", Some(chat), latest.and_then(|b| b.telegram_user_id.clone())),
        None => ("system_push", None, None),
    };
    Ok(UserAgentTarget {
        conversation_id,
        provider: provider.to_string(),
        telegram_chat_id,
        telegram_user_id,
        binding_active: active,
    })
}

fn user_key(consumer_user_id: &str) -> String {
    format!("u.{}", escape(consumer_user_id))
}

fn user_index_key(bot: &str, telegram_user_id: &str) -> String {
    format!("tgu.{}.{}", escape(bot), escape(telegram_user_id))
}

fn chat_index_key(bot: &str, telegram_chat_id: &str) -> String {
    format!("tgc.{}.{}", escape(bot), escape(telegram_chat_id))
}

pub(crate) async fn load_user(ctx: &ServiceContext, consumer_user_id: &str) -> Result<Option<UserBindings>, OpError> {
    Ok(ctx.buckets.bindings.get::<UserBindings>(&user_key(consumer_user_id)).await?.map(|v| v.value))
}

async fn active_binding(ctx: &ServiceContext, consumer_user_id: &str) -> Result<Option<Binding>, OpError> {
    Ok(load_user(ctx, consumer_user_id).await?.and_then(|d| d.active().cloned()))
}

/// The validated inputs of one bind.
#[derive(Debug)]
struct BindRequest {
    consumer_user_id: String,
    agent_key: String,
    bot_identity: Option<String>,
    source: BindingSource,
    telegram_user_id: Option<String>,
    telegram_chat_id: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

/// Checks the arguments that do not need the profile. Telegram ids and a given botIdentity are
/// trimmed (they become index keys, so they must be canonical); a blank botIdentity counts as
/// absent (spec step 2), a blank Telegram id is refused.
fn validate_bind(args: BindArgs) -> Result<BindRequest, OpError> {
    validate_agent_key(&args.agent_key)?;
    let bot_identity = args.bot_identity.map(|b| b.trim().to_string()).filter(|b| !b.is_empty());
    if let Some(bot) = &bot_identity {
        validate_id("botIdentity", bot)?;
    }
    let telegram_user_id = args.telegram_user_id.map(|s| s.trim().to_string());
    if let Some(id) = &telegram_user_id {
        validate_id("telegramUserId", id)?;
    }
    let telegram_chat_id = args.telegram_chat_id.map(|s| s.trim().to_string());
    if let Some(id) = &telegram_chat_id {
        validate_id("telegramChatId", id)?;
    }
    if let Some(metadata) = &args.metadata {
        validate_metadata(metadata)?;
    }
    Ok(BindRequest {
        consumer_user_id: args.consumer_user_id.into_string(),
        agent_key: args.agent_key.into_string(),
        bot_identity,
        source: args.source.unwrap_or_default(),
        telegram_user_id,
        telegram_chat_id,
        metadata: args.metadata,
    })
}

/// An id is non-empty after trimming, at most [`MAX_ID_BYTES`] and free of control characters.
fn validate_id(field: &str, id: &str) -> Result<(), OpError> {
    if id.trim().is_empty() {
        return Err(OpError::invalid(format!("{field}: must not be empty")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(OpError::invalid(format!("{field}: must be at most {MAX_ID_BYTES} bytes, got {}", id.len())));
    }
    if id.chars().any(char::is_control) {
        return Err(OpError::invalid(format!("{field}: must not contain control characters")));
    }
    Ok(())
}

fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), OpError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(OpError::invalid(format!(
            "metadata: at most {MAX_METADATA_ENTRIES} entries are allowed, got {}",
            metadata.len()
        )));
    }
    let mut total = 0;
    for (key, value) in metadata {
        if key.trim().is_empty() || key.len() > MAX_METADATA_KEY_BYTES || key.chars().any(char::is_control) {
            return Err(OpError::invalid(format!(
                "metadata: keys must be non-empty, at most {MAX_METADATA_KEY_BYTES} bytes and free of \
                 control characters (key '{}')",
                key.escape_debug()
            )));
        }
        if value.len() > MAX_METADATA_VALUE_BYTES {
            return Err(OpError::invalid(format!(
                "metadata.{key}: must be at most {MAX_METADATA_VALUE_BYTES} bytes, got {}",
                value.len()
            )));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_TOTAL_BYTES {
        return Err(OpError::invalid(format!(
            "metadata: keys and values must total at most {MAX_METADATA_TOTAL_BYTES} bytes, got {total}"
        )));
    }
    Ok(())
}

/// `bindUserAgent` (spec §3.8.2); the write order is explained in the module doc.
pub(crate) async fn bind(ctx: &ServiceContext, args: BindArgs) -> Result<BindingView, OpError> {
    let req = validate_bind(args)?;
    let profile = get_profile(ctx, &req.agent_key)
        .await?
        .ok_or_else(|| OpError::not_found(format!("Agent profile '{}' not found", req.agent_key)))?;
    let bot_identity = req
        .bot_identity
        .clone()
        .or_else(|| profile.bot_identity.as_deref().map(str::trim).filter(|b| !b.is_empty()).map(str::to_string));
    let telegram_ids = req.telegram_user_id.is_some() || req.telegram_chat_id.is_some();
    let bot = match (&bot_identity, telegram_ids) {
        (None, true) => return Err(OpError::invalid(format!("Agent '{}' is missing botIdentity", req.agent_key))),
        (Some(bot), true) => Some(bot.as_str()),
        (_, false) => None,
    };
    let now = ctx.clock.now_ms();
    let me = req.consumer_user_id.as_str();

    // Steps 1 and 2: claim the index keys, then revoke the bindings they were taken from.
    let mut claimed: Vec<String> = Vec::new();
    if let Some(bot) = bot {
        let keys = [
            req.telegram_user_id.as_deref().map(|u| user_index_key(bot, u)),
            req.telegram_chat_id.as_deref().map(|c| chat_index_key(bot, c)),
        ];
        let mut displaced: Vec<String> = Vec::new();
        for key in keys.into_iter().flatten() {
            if let Some(previous) = claim_index(ctx, &key, me, now).await?
                && !displaced.contains(&previous)
            {
                displaced.push(previous);
            }
            claimed.push(key);
        }
        for other in &displaced {
            revoke_displaced(ctx, other, bot, req.telegram_user_id.as_deref(), req.telegram_chat_id.as_deref(), now)
                .await?;
        }
    }

    // Step 3: this consumer's document.
    let binding = Binding {
        agent_key: req.agent_key.clone(),
        conversation_id: user_agent_conversation_id(&req.agent_key, me),
        bot_identity: bot_identity.clone(),
        status: BindingStatus::Active,
        source: req.source,
        telegram_user_id: req.telegram_user_id.clone(),
        telegram_chat_id: req.telegram_chat_id.clone(),
        metadata: req.metadata.clone(),
        bound_at: now,
        revoked_at: None,
    };
    ctx.buckets
        .bindings
        .modify::<UserBindings, OpError, _>(&user_key(me), |current| {
            let mut doc =
                current.unwrap_or_else(|| UserBindings { consumer_user_id: me.to_string(), bindings: vec![] });
            doc.revoke_all(now);
            doc.bindings.insert(0, binding.clone());
            doc.bound_history();
            Ok(Some(doc))
        })
        .await?;

    // Step 4: a concurrent bind of the same Telegram identity that claimed a key after us wins.
    let mut view = binding_view(me, &binding);
    for key in &claimed {
        let holder = ctx.buckets.bindings.get::<TelegramIndex>(key).await?;
        if holder.is_some_and(|h| h.value.consumer_user_id != me) {
            if let Some(revoked_at) = revoke_exact(ctx, me, &binding, now).await? {
                view.status = BindingStatus::Revoked;
                view.revoked_at = Some(revoked_at);
            }
            tracing::info!(consumer_user_id = %me, %key, "a concurrent bind took the Telegram identity");
            break;
        }
    }
    tracing::info!(
        consumer_user_id = %me,
        agent_key = %req.agent_key,
        source = ?req.source,
        telegram = telegram_ids,
        "user bound to agent"
    );
    Ok(view)
}

/// Points index `key` at `me` (create or compare-and-set) and returns the consumer it named
/// before when that was someone else. A key already naming `me` is left as it is.
async fn claim_index(ctx: &ServiceContext, key: &str, me: &str, now: Millis) -> Result<Option<String>, OpError> {
    let store = &ctx.buckets.bindings;
    let entry = TelegramIndex { consumer_user_id: me.to_string(), claimed_at: now };
    for _ in 0..INDEX_CAS_ATTEMPTS {
        let current = store.get::<TelegramIndex>(key).await?;
        let result = match &current {
            None => store.create(key, &entry).await,
            Some(c) if c.value.consumer_user_id == me => return Ok(None),
            Some(c) => store.update(key, &entry, c.revision).await,
        };
        match result {
            Ok(_) => return Ok(current.map(|c| c.value.consumer_user_id)),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict { key: key.to_string() }.into())
}

/// Spec §3.8.2 step 4 for the consumer an index claim displaced: revokes its active binding if
/// it still carries the bot with one of the ids (if not, the index key was stale).
async fn revoke_displaced(
    ctx: &ServiceContext,
    other: &str,
    bot: &str,
    telegram_user_id: Option<&str>,
    telegram_chat_id: Option<&str>,
    now: Millis,
) -> Result<(), OpError> {
    ctx.buckets
        .bindings
        .modify::<UserBindings, OpError, _>(&user_key(other), |current| {
            let Some(mut doc) = current else { return Ok(None) };
            let mut changed = false;
            for binding in doc.bindings.iter_mut() {
                if binding.is_active() && binding.carries(bot, telegram_user_id, telegram_chat_id) {
                    binding.revoke(now);
                    changed = true;
                }
            }
            doc.bound_history();
            Ok(changed.then_some(doc))
        })
        .await?;
    Ok(())
}

/// Revokes `written` in `me`'s document if it is still there and active; returns the
/// revocation time when it did.
async fn revoke_exact(
    ctx: &ServiceContext,
    me: &str,
    written: &Binding,
    now: Millis,
) -> Result<Option<Millis>, OpError> {
    let mut revoked = false;
    ctx.buckets
        .bindings
        .modify::<UserBindings, OpError, _>(&user_key(me), |current| {
            revoked = false;
            let Some(mut doc) = current else { return Ok(None) };
            let Some(binding) = doc.bindings.iter_mut().find(|b| *b == written) else { return Ok(None) };
            binding.revoke(now);
            revoked = true;
            Ok(Some(doc))
        })
        .await?;
    Ok(revoked.then_some(now))
}

/// `revokeUserAgentBinding` (spec §3.8.3): revokes every active binding of the user.
async fn revoke(ctx: &ServiceContext, consumer_user_id: &str) -> Result<usize, OpError> {
    let now = ctx.clock.now_ms();
    let mut count = 0;
    ctx.buckets
        .bindings
        .modify::<UserBindings, OpError, _>(&user_key(consumer_user_id), |current| {
            count = 0;
            let Some(mut doc) = current else { return Ok(None) };
            count = doc.revoke_all(now);
            if count == 0 {
                return Ok(None);
            }
            doc.bound_history();
            Ok(Some(doc))
        })
        .await?;
    if count > 0 {
        tracing::info!(%consumer_user_id, count, "user agent bindings revoked");
    }
    Ok(count)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A binding of user `u1` to `agent` (also the user-agent views' tests' fixture).
    pub(crate) fn binding(agent: &str, status: BindingStatus, bound_at: Millis) -> Binding {
        Binding {
            agent_key: agent.to_string(),
            conversation_id: user_agent_conversation_id(agent, "u1"),
            bot_identity: None,
            status,
            source: BindingSource::Api,
            telegram_user_id: None,
            telegram_chat_id: None,
            metadata: None,
            bound_at,
            revoked_at: (status == BindingStatus::Revoked).then_some(bound_at + 1),
        }
    }

    fn doc(bindings: Vec<Binding>) -> UserBindings {
        UserBindings { consumer_user_id: "u1".to_string(), bindings }
    }

    #[test]
    fn the_view_has_every_field_with_nulls_for_absent_ones() {
        let view = binding_view("u1", &binding("sales", BindingStatus::Active, 5));
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            json!({
                "consumerUserId": "u1",
                "agentKey": "sales",
                "conversationId": "user-agent:sales:u1",
                "botIdentity": null,
                "status": "active",
                "source": "api",
                "telegramUserId": null,
                "telegramChatId": null,
                "metadata": null,
                "boundAt": 5,
                "revokedAt": null
            })
        );
        let mut b = binding("sales", BindingStatus::Revoked, 5);
        b.source = BindingSource::TelegramPairing;
        b.bot_identity = Some("42".into());
        b.telegram_chat_id = Some("7".into());
        b.metadata = Some(BTreeMap::from([("displayName".to_string(), "Ann".to_string())]));
        let value = serde_json::to_value(binding_view("u1", &b)).unwrap();
        assert_eq!(value["status"], json!("revoked"));
        assert_eq!(value["source"], json!("telegram_pairing"));
        assert_eq!(value["revokedAt"], json!(6));
        assert_eq!(value["telegramChatId"], json!("7"));
        assert_eq!(value["metadata"], json!({"displayName": "Ann"}));
    }

    #[test]
    fn history_keeps_the_active_binding_and_the_newest_revoked_ones() {
        // Newest first, with the active binding in the middle so position does not protect it.
        let mut bindings: Vec<Binding> =
            (0..70).rev().map(|i| binding(&format!("a{i}"), BindingStatus::Revoked, i)).collect();
        bindings.insert(10, binding("live", BindingStatus::Active, 100));
        let mut d = doc(bindings);
        d.bound_history();
        assert_eq!(d.bindings.len(), MAX_REVOKED_KEPT + 1);
        assert_eq!(d.active().map(|b| b.agent_key.as_str()), Some("live"));
        let revoked: Vec<Millis> = d.bindings.iter().filter(|b| !b.is_active()).map(|b| b.bound_at).collect();
        let expected: Vec<Millis> = (20..70).rev().collect();
        assert_eq!(revoked, expected, "the oldest revoked bindings are dropped");
        let mut small = doc(vec![binding("a", BindingStatus::Revoked, 1)]);
        small.bound_history();
        assert_eq!(small.bindings.len(), 1);
    }

    #[test]
    fn revoke_all_counts_and_stamps() {
        let mut d = doc(vec![binding("a", BindingStatus::Active, 2), binding("b", BindingStatus::Revoked, 1)]);
        assert_eq!(d.revoke_all(9), 1);
        assert!(d.active().is_none());
        assert_eq!(d.bindings[0].revoked_at, Some(9));
        assert_eq!(d.bindings[1].revoked_at, Some(2), "already revoked bindings keep their time");
        assert_eq!(d.revoke_all(10), 0);
    }

    #[test]
    fn carries_needs_the_bot_and_one_matching_id() {
        let mut b = binding("a", BindingStatus::Active, 1);
        b.bot_identity = Some("bot".into());
        b.telegram_user_id = Some("u".into());
        b.telegram_chat_id = Some("c".into());
        assert!(b.carries("bot", Some("u"), None));
        assert!(b.carries("bot", None, Some("c")));
        assert!(b.carries("bot", Some("x"), Some("c")));
        assert!(!b.carries("other", Some("u"), Some("c")));
        assert!(!b.carries("bot", Some("x"), Some("y")));
        assert!(!b.carries("bot", None, None));
        b.telegram_chat_id = None;
        assert!(!b.carries("bot", None, Some("c")), "an absent id never matches");
    }

    #[test]
    fn target_uses_the_latest_binding_of_the_pair() {
        let mut old = binding("sales", BindingStatus::Revoked, 1);
        old.telegram_chat_id = Some("c".into());
        old.telegram_user_id = Some("u".into());
        let newer = binding("sales", BindingStatus::Active, 3);
        let other = binding("support", BindingStatus::Active, 9);
        let d = doc(vec![other, old.clone(), newer]);
        let t = target_from(Some(&d), "u1", "sales", true).unwrap();
        assert_eq!(t.conversation_id, "user-agent:sales:u1");
        assert_eq!(t.provider, "system_push");
        assert_eq!((t.telegram_chat_id, t.telegram_user_id), (None, None));
        assert!(t.binding_active);

        let d = doc(vec![old]);
        let err = target_from(Some(&d), "u1", "sales", true).unwrap_err();
        assert_eq!(err.message, "No active binding found for consumerUserId and agentKey");
        let t = target_from(Some(&d), "u1", "sales", false).unwrap();
        assert_eq!(t.provider, "telegram");
        assert_eq!(t.telegram_chat_id.as_deref(), Some("c"));
        assert_eq!(t.telegram_user_id.as_deref(), Some("u"));
        assert!(!t.binding_active);
    }

    #[test]
    fn target_without_any_binding_falls_back_to_the_user_agent_id() {
        let t = target_from(None, "u1", "sales", false).unwrap();
        assert_eq!(
            t,
            UserAgentTarget {
                conversation_id: "user-agent:sales:u1".into(),
                provider: "system_push".into(),
                telegram_chat_id: None,
                telegram_user_id: None,
                binding_active: false,
            }
        );
        assert!(target_from(None, "u1", "sales", true).is_err());
        let mut blank = binding("sales", BindingStatus::Active, 1);
        blank.conversation_id = "  ".into();
        let t = target_from(Some(&doc(vec![blank])), "u1", "sales", true).unwrap();
        assert_eq!(t.conversation_id, "user-agent:sales:u1", "a blank stored id falls back");
    }

    #[test]
    fn target_ties_on_bound_at_go_to_the_binding_written_last() {
        let first = binding("sales", BindingStatus::Revoked, 5);
        let mut last = binding("sales", BindingStatus::Active, 5);
        last.conversation_id = "written-last".into();
        let t = target_from(Some(&doc(vec![last, first])), "u1", "sales", true).unwrap();
        assert_eq!(t.conversation_id, "written-last");
    }

    #[test]
    fn bind_arguments_are_validated_and_trimmed() {
        let args = |v: serde_json::Value| serde_json::from_value::<BindArgs>(v).unwrap();
        let req = validate_bind(args(json!({
            "consumerUserId": "u1", "agentKey": "a", "botIdentity": "  ",
            "telegramUserId": " 42 ", "source": "manual"
        })))
        .unwrap();
        assert_eq!(req.bot_identity, None, "a blank botIdentity counts as absent");
        assert_eq!(req.telegram_user_id.as_deref(), Some("42"));
        assert_eq!(req.source, BindingSource::Manual);
        let default = validate_bind(args(json!({"consumerUserId": "u1", "agentKey": "a"}))).unwrap();
        assert_eq!(default.source, BindingSource::Api);

        let fails = |v: serde_json::Value, field: &str| {
            let err = validate_bind(args(v)).unwrap_err();
            assert!(err.message.contains(field), "{} should name {field}", err.message);
        };
        // Ids are refused while the arguments are read, before any store is touched.
        let refused = |v: serde_json::Value, kind: &str| {
            let err = serde_json::from_value::<BindArgs>(v).expect_err("refused");
            assert!(err.to_string().contains(kind), "{err} should name {kind}");
        };
        refused(json!({"consumerUserId": " ", "agentKey": "a"}), "consumer user id");
        refused(json!({"consumerUserId": "u".repeat(5000), "agentKey": "a"}), "consumer user id");
        refused(json!({"consumerUserId": "u\n1", "agentKey": "a"}), "consumer user id");
        refused(json!({"consumerUserId": "u", "agentKey": ""}), "agent key");
        fails(json!({"consumerUserId": "u", "agentKey": "k".repeat(129)}), "agentKey");
        fails(json!({"consumerUserId": "u", "agentKey": "a", "telegramChatId": " "}), "telegramChatId");
        fails(json!({"consumerUserId": "u", "agentKey": "a", "botIdentity": "b".repeat(300)}), "botIdentity");
        let many: BTreeMap<String, String> = (0..17).map(|i| (format!("k{i}"), "v".to_string())).collect();
        fails(json!({"consumerUserId": "u", "agentKey": "a", "metadata": many}), "metadata");
        fails(json!({"consumerUserId": "u", "agentKey": "a", "metadata": {"k": "v".repeat(513)}}), "metadata.k");
        fails(json!({"consumerUserId": "u", "agentKey": "a", "metadata": {"": "v"}}), "metadata");
        let big: BTreeMap<String, String> = (0..5).map(|i| (format!("k{i}"), "v".repeat(500))).collect();
        fails(json!({"consumerUserId": "u", "agentKey": "a", "metadata": big}), "total");
        assert!(
            serde_json::from_value::<BindArgs>(json!({"consumerUserId": "u", "agentKey": "a", "source": "x"})).is_err()
        );
        // The original's nowMs is accepted and ignored (spec §6.1 S6); unknown arguments are not.
        assert!(
            serde_json::from_value::<BindArgs>(json!({"consumerUserId": "u", "agentKey": "a", "nowMs": 1})).is_ok()
        );
        assert!(serde_json::from_value::<BindArgs>(json!({"consumerUserId": "u", "agentKey": "a", "now": 1})).is_err());
    }

    #[test]
    fn keys_are_single_tokens_per_id() {
        assert_eq!(user_key("a.b"), "u.a=2Eb");
        assert_eq!(user_index_key("1:2", "3"), "tgu.1=3A2.3");
        assert_eq!(chat_index_key("b", "-100"), "tgc.b.-100");
    }
}
