//! Message templates (spec §1.13, §3.7): reusable texts with a globally unique key, usage
//! counting, and sending to a user's agent conversation.
//!
//! # Storage (`af_message_templates`)
//!
//! * `t.<templateId>`: the template ([`MessageTemplateView`]).
//! * `k.<templateKey>`: the key's claim ([`KeyClaim`]), create-only. A key is taken by creating
//!   its claim; the template document is written second. A claim whose template does not
//!   exist or carries another key (a create or rename that died between the two writes) is
//!   stale and may be taken over by CAS once [`STALE_CLAIM_MS`] old, so a crash never blocks a
//!   key for good and an in-flight create is never robbed.
//!
//! Usage counts are incremented by compare-and-set after the enqueue, so concurrent sends each
//! count exactly once.

use std::collections::BTreeMap;

use common::OpError;
use common::api;
use common::api::templates::{
    CreateMessageTemplateArgs, ListMessageTemplatesArgs, MessageTemplateView, SendMessageTemplateArgs,
    SendMessageTemplateResult, UpdateMessageTemplateArgs,
};
use common::auth::Caller;
use common::clock::Millis;
use common::ids::MessageTemplateId;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::store::{JsonStore, StoreError};
use serde::{Deserialize, Serialize};

use crate::target;

/// A claim younger than this is never taken over (its create may still be in flight).
pub const STALE_CLAIM_MS: Millis = 30_000;
/// Longest generated key; longer titles are cut (keys are KV key tokens).
pub const MAX_KEY_BYTES: usize = 120;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyClaim {
    template_id: String,
    claimed_at: Millis,
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::CreateMessageTemplate, _, _, _, _>(ctx, |ctx, _: Caller, a| async move { create(&ctx, a).await });
    ops.handle::<api::UpdateMessageTemplate, _, _, _, _>(ctx, |ctx, _: Caller, a| async move { update(&ctx, a).await });
    ops.handle::<api::DeleteMessageTemplate, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        delete(&ctx, &a.template_id).await
    });
    ops.handle::<api::ListMessageTemplatesByCompany, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        list(&ctx, a).await
    });
    ops.handle::<api::SendMessageTemplateToUserAgent, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        send(&ctx, a).await
    });
}

fn store(ctx: &ServiceContext) -> &JsonStore {
    &ctx.buckets.message_templates
}

fn doc_key(id: &str) -> String {
    format!("t.{id}")
}

fn claim_key(key: &str) -> String {
    format!("k.{key}")
}

pub fn normalise_title(title: &str) -> Result<String, OpError> {
    let t = title.trim();
    if t.is_empty() {
        return Err(OpError::invalid("Template title is required"));
    }
    Ok(t.to_string())
}

pub fn normalise_text(text: &str) -> Result<String, OpError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(OpError::invalid("Template text is required"));
    }
    Ok(t.to_string())
}

/// Trimmed, lower-cased, blanks dropped, de-duplicated, sorted (spec §3.7).
pub fn normalise_tags(tags: &[String]) -> Vec<String> {
    let set: std::collections::BTreeSet<String> =
        tags.iter().map(|t| t.trim().to_lowercase()).filter(|t| !t.is_empty()).collect();
    set.into_iter().collect()
}

/// The key base of a title (spec §3.7): lower-case, runs outside `[a-z0-9]` become `-`, no
/// leading or trailing `-`; empty → `message-template`.
pub fn key_base(title: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in title.to_lowercase().chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
    }
    out.truncate(MAX_KEY_BYTES);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() { "message-template".to_string() } else { out }
}

/// Takes the first free key of `base`, `base-2`, `base-3`, … for template `id` (a key the
/// template already holds counts as free).
async fn claim(ctx: &ServiceContext, base: &str, id: &str) -> Result<String, OpError> {
    let now = ctx.clock.now_ms();
    let mut n = 1u64;
    let mut attempts = 0;
    loop {
        attempts += 1;
        if attempts > 10_000 {
            return Err(OpError::conflict("could not find a free template key; retry"));
        }
        let key = if n == 1 { base.to_string() } else { format!("{base}-{n}") };
        let ck = claim_key(&key);
        let mine = KeyClaim { template_id: id.to_string(), claimed_at: now };
        match store(ctx).create(&ck, &mine).await {
            Ok(_) => return Ok(key),
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e.into()),
        }
        let Some(current) = store(ctx).get::<KeyClaim>(&ck).await? else { continue };
        if current.value.template_id == id {
            return Ok(key);
        }
        let holder = store(ctx).get::<MessageTemplateView>(&doc_key(&current.value.template_id)).await?;
        let live = holder.is_some_and(|h| h.value.template_key == key);
        if !live && now - current.value.claimed_at >= STALE_CLAIM_MS {
            match store(ctx).update(&ck, &mine, current.revision).await {
                Ok(_) => return Ok(key),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        n += 1;
    }
}

/// Drops `key`'s claim if `id` holds it.
async fn release(ctx: &ServiceContext, key: &str, id: &str) -> Result<(), OpError> {
    let ck = claim_key(key);
    if let Some(current) = store(ctx).get::<KeyClaim>(&ck).await?
        && current.value.template_id == id
    {
        match store(ctx).delete(&ck, current.revision).await {
            Ok(()) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn create(ctx: &ServiceContext, args: CreateMessageTemplateArgs) -> Result<MessageTemplateId, OpError> {
    let title = normalise_title(&args.title)?;
    let text = normalise_text(&args.text)?;
    target::check_actor("actorUserId", &args.actor_user_id)?;
    let id = MessageTemplateId::trusted(target::mint("mt"));
    let key = claim(ctx, &key_base(&title), &id).await?;
    let now = ctx.clock.now_ms();
    let doc = MessageTemplateView {
        id: id.clone(),
        template_key: key,
        title,
        text,
        tags: normalise_tags(&args.tags),
        usage_count: 0,
        enabled: args.enabled.unwrap_or(true),
        company_id: args.company_id.map(|c| c.into_string()),
        created_by: args.actor_user_id.clone(),
        updated_by: args.actor_user_id,
        created_at: now,
        updated_at: now,
    };
    store(ctx).create(&doc_key(&id), &doc).await?;
    Ok(id)
}

async fn update(ctx: &ServiceContext, args: UpdateMessageTemplateArgs) -> Result<bool, OpError> {
    target::check_actor("actorUserId", &args.actor_user_id)?;
    let title = args.title.as_deref().map(normalise_title).transpose()?;
    let text = args.text.as_deref().map(normalise_text).transpose()?;
    let key = doc_key(&args.template_id);
    for _ in 0..64 {
        let Some(current) = store(ctx).get::<MessageTemplateView>(&key).await? else { return Ok(false) };
        let old = current.value;
        let mut next = old.clone();
        if let Some(title) = &title
            && *title != old.title
        {
            next.title = title.clone();
            next.template_key = claim(ctx, &key_base(title), &args.template_id).await?;
        }
        if let Some(text) = &text {
            next.text = text.clone();
        }
        if let Some(tags) = &args.tags {
            next.tags = normalise_tags(tags);
        }
        if let Some(enabled) = args.enabled {
            next.enabled = enabled;
        }
        next.updated_by = args.actor_user_id.clone();
        next.updated_at = ctx.clock.now_ms();
        match store(ctx).update(&key, &next, current.revision).await {
            Ok(_) => {
                if next.template_key != old.template_key {
                    release(ctx, &old.template_key, &args.template_id).await?;
                }
                return Ok(true);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict { key }.into())
}

async fn delete(ctx: &ServiceContext, id: &MessageTemplateId) -> Result<bool, OpError> {
    let key = doc_key(id);
    loop {
        let Some(current) = store(ctx).get::<MessageTemplateView>(&key).await? else { return Ok(false) };
        match store(ctx).delete(&key, current.revision).await {
            Ok(()) => {
                release(ctx, &current.value.template_key, id).await?;
                return Ok(true);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Spec §3.7, sorted over every matching template before the limit applies (the original
/// fetched `limit` rows first, so the most used could be missing).
async fn list(ctx: &ServiceContext, args: ListMessageTemplatesArgs) -> Result<Vec<MessageTemplateView>, OpError> {
    let include_disabled = args.include_disabled.unwrap_or(false);
    let limit = args.limit.unwrap_or(100).clamp(1, 200) as usize;
    let mut rows: Vec<MessageTemplateView> = store(ctx)
        .scan::<MessageTemplateView>("t.*")
        .await?
        .into_iter()
        .map(|(_, v)| v.value)
        .filter(|t| include_disabled || t.enabled)
        .filter(|t| args.company_id.as_ref().is_none_or(|c| t.company_id.as_deref() == Some(c.as_str())))
        .collect();
    rows.sort_by(|a, b| b.usage_count.cmp(&a.usage_count).then(b.updated_at.cmp(&a.updated_at)));
    rows.truncate(limit);
    Ok(rows)
}

async fn send(ctx: &ServiceContext, args: SendMessageTemplateArgs) -> Result<SendMessageTemplateResult, OpError> {
    let key = doc_key(&args.template_id);
    let template = store(ctx)
        .get::<MessageTemplateView>(&key)
        .await?
        .map(|v| v.value)
        .filter(|t| t.enabled)
        .ok_or_else(|| OpError::not_found("Message template not found"))?;
    // Spec §3.8.3 with an active binding required: the latest binding of the pair must be
    // active, and a user has at most one active binding, so it is the user's active one.
    let binding = target::active_binding(ctx, &args.consumer_user_id)
        .await?
        .filter(|b| b.agent_key == args.agent_key.as_str())
        .ok_or_else(|| OpError::not_found("No active binding found for consumerUserId and agentKey"))?;
    let to = target::target_of(&binding, &args.consumer_user_id);
    let mut metadata: BTreeMap<String, String> = args.metadata.unwrap_or_default();
    metadata.insert("consumerUserId".into(), args.consumer_user_id.to_string());
    metadata.insert("source".into(), "message_template".into());
    metadata.insert("templateId".into(), template.id.to_string());
    metadata.insert("templateKey".into(), template.template_key.clone());
    if let Some(chat) = &to.telegram_chat_id {
        metadata.insert("telegramChatId".into(), chat.clone());
    }
    if let Some(user) = &to.telegram_user_id {
        metadata.insert("telegramUserId".into(), user.clone());
    }
    let message_id = target::enqueue(
        ctx,
        target::Outgoing {
            conversation_id: &to.conversation_id,
            agent_key: &to.agent_key,
            provider: to.provider,
            provider_user_id: &to.provider_user_id,
            text: &template.text,
            metadata,
            idempotency_key: None,
        },
    )
    .await?;
    let counted = store(ctx)
        .modify::<MessageTemplateView, OpError, _>(&key, |current| {
            Ok(current.map(|mut t| {
                t.usage_count += 1;
                t
            }))
        })
        .await?;
    let usage_count = counted.map_or(template.usage_count + 1, |v| v.value.usage_count);
    Ok(SendMessageTemplateResult { message_id, usage_count })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_tags_normalise_as_the_original() {
        assert_eq!(key_base(&normalise_title("  Status Update ").expect("title")), "status-update");
        assert_eq!(key_base("Daily check-in"), "daily-check-in");
        assert_eq!(key_base("--Ünïcode!! 42 "), "n-code-42");
        assert_eq!(key_base("!!!"), "message-template");
        let tags: Vec<String> = [" Urgent ", "follow-up", "urgent", " Team ", "  "].map(String::from).into();
        assert_eq!(normalise_tags(&tags), ["follow-up", "team", "urgent"]);
        assert_eq!(normalise_title(" ").expect_err("blank").message, "Template title is required");
        assert_eq!(normalise_text("").expect_err("blank").message, "Template text is required");
    }
}
