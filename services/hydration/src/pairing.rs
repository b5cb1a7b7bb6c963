//! Pairing codes (spec §1.10, §3.9): `createPairingCode`, `consumePairingCode`,
//! `getPairingCodeStatus`, `createUserAgentPairing`, `getUserAgentPairingStatus`, with the
//! original's error strings and these fixes:
//!
//! * codes come from the operating system's CSPRNG, 12 characters of `[0-9A-Z]` (62 bits; the
//!   original used `Math.random`, S9);
//! * creation is rate limited per consumer user and per bot, and failed `/start <code>` attempts
//!   per (bot, Telegram user) and per bot (`telegram.pairing_*`, S9), over sliding one-hour
//!   windows kept in KV (so every hydration instance counts the same attempts);
//! * a code found past its expiry is **stored** `expired` (the original's throw rolled that back,
//!   T8), and creating a code expires every pending code of the user, not only those of the
//!   same agent (T8: a user has one binding, so older codes for other agents are stale);
//! * consuming the same code again from the same bot, user and chat (a redelivered `/start`)
//!   succeeds again instead of failing: the binding is written again, idempotently.
//!
//! # Storage (`af_pairing`)
//!
//! * `code.<code>`: a [`PairingRecord`], created once (create-only) and then moved by
//!   compare-and-set: `pending → used` or `pending → expired`;
//! * `user.<escaped consumerUserId>`: a [`UserPairings`] index of the user's newest codes
//!   (at most [`MAX_CODES_PER_USER`]), newest first. It is written after the code, so a crash in
//!   between leaves a code only its holder knows (it still works; status by code still answers);
//! * `rl.<kind>.<…>`: [`Window`]s of recent event times for the rate limits.
//!
//! Consumption marks the code `used` first (compare-and-set, so two concurrent `/start`s of one
//! code cannot both win) and binds second; a crash in between is repaired by the redelivered
//! update, which finds the code used by the same Telegram identity and binds again.

use common::OpError;
use common::api;
use common::api::bindings::{BindArgs, BindingSource};
use common::api::pairing::{
    ConsumePairingArgs, ConsumedPairing, CreatePairingArgs, PairingStatus, PairingView, UserAgentPairing,
};
use common::auth::Caller;
use common::clock::Millis;
use common::error::ErrorCode;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::token::escape;
use serde::{Deserialize, Serialize};

use crate::profiles::get_profile;

/// Default lifetime of a code and its bounds (spec §2.3).
pub const DEFAULT_TTL_MS: i64 = 900_000;
pub const MIN_TTL_MS: i64 = 60_000;
pub const MAX_TTL_MS: i64 = 86_400_000;
/// Characters of a generated code.
pub const CODE_LEN: usize = 12;
const CODE_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const GENERATION_ATTEMPTS: usize = 5;
const HOUR_MS: i64 = 3_600_000;
const CAS_ATTEMPTS: usize = 16;

/// Codes kept in a user's index (spec §3.12.1 looks at the newest 20 of a pair, §3.12.2 at 50
/// pending ones of the user).
pub const MAX_CODES_PER_USER: usize = 50;

/// One pairing code as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairingRecord {
    pub code: String,
    pub consumer_user_id: String,
    pub agent_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<String>,
    pub status: PairingStatus,
    pub created_at: Millis,
    pub expires_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_chat_id: Option<String>,
}

/// One entry of a user's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexedCode {
    pub code: String,
    pub agent_key: String,
    pub created_at: Millis,
}

/// The user's newest codes, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserPairings {
    pub codes: Vec<IndexedCode>,
}

pub fn code_key(code: &str) -> String {
    format!("code.{code}")
}

pub fn user_key(consumer_user_id: &str) -> String {
    format!("user.{}", escape(consumer_user_id))
}

pub async fn user_index(ctx: &ServiceContext, consumer_user_id: &str) -> Result<UserPairings, OpError> {
    Ok(ctx.buckets.pairing.get::<UserPairings>(&user_key(consumer_user_id)).await?.map(|v| v.value).unwrap_or_default())
}

pub async fn load_code(ctx: &ServiceContext, code: &str) -> Result<Option<PairingRecord>, OpError> {
    Ok(ctx.buckets.pairing.get::<PairingRecord>(&code_key(code)).await?.map(|v| v.value))
}

/// Whether the user has any pairing code for the agent, or a binding to it (spec §3.10 import:
/// "the agent must be known for the user").
pub async fn pair_known(ctx: &ServiceContext, consumer_user_id: &str, agent_key: &str) -> Result<bool, OpError> {
    if user_index(ctx, consumer_user_id).await?.codes.iter().any(|c| c.agent_key == agent_key) {
        return Ok(true);
    }
    let doc = ctx
        .buckets
        .bindings
        .get::<crate::bindings::UserBindings>(&format!("u.{}", escape(consumer_user_id)))
        .await?
        .map(|v| v.value);
    Ok(doc.is_some_and(|d| d.bindings.iter().any(|b| b.agent_key == agent_key)))
}

/// The soft-reset's pairing part: counts pending codes without a bot identity and, when
/// `expire`, marks them expired. Returns (pending found, expired).
pub async fn expire_pairings_missing_bot(ctx: &ServiceContext, expire: bool) -> Result<(u64, u64), OpError> {
    let codes = ctx.buckets.pairing.scan::<PairingRecord>("code.*").await?;
    let (mut pending, mut expired) = (0, 0);
    for (key, record) in codes {
        let r = &record.value;
        if r.status != PairingStatus::Pending || r.bot_identity.as_deref().is_some_and(|b| !b.trim().is_empty()) {
            continue;
        }
        pending += 1;
        if expire {
            let mut next = r.clone();
            next.status = PairingStatus::Expired;
            match ctx.buckets.pairing.update(&key, &next, record.revision).await {
                Ok(_) => expired += 1,
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok((pending, expired))
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::CreatePairingCode, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let record = create(&ctx, args).await?;
        Ok(view(&record, ctx.clock.now_ms()))
    });
    ops.handle::<api::ConsumePairingCode, _, _, _, _>(
        ctx,
        |ctx, _: Caller, args| async move { consume(&ctx, args).await },
    );
    ops.handle::<api::GetPairingCodeStatus, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let now = ctx.clock.now_ms();
        Ok(load_code(&ctx, &args.code).await?.map(|r| view(&r, now)))
    });
    ops.handle::<api::CreateUserAgentPairing, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let record = create(&ctx, args).await?;
        let deep_link = deep_link(&ctx, record.bot_identity.as_deref(), &record.code).await?;
        Ok(UserAgentPairing { pairing: view(&record, ctx.clock.now_ms()), deep_link })
    });
    ops.handle::<api::GetUserAgentPairingStatus, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        let now = ctx.clock.now_ms();
        Ok(latest_for_pair(&ctx, &args.consumer_user_id, &args.agent_key).await?.map(|r| view(&r, now)))
    });
}

/// The view of a code at `now`: a pending code past its expiry shows `expired` (spec §3.9).
pub fn view(record: &PairingRecord, now: Millis) -> PairingView {
    let status = match record.status {
        PairingStatus::Pending if now >= record.expires_at => PairingStatus::Expired,
        status => status,
    };
    PairingView {
        code: record.code.clone(),
        consumer_user_id: record.consumer_user_id.clone(),
        agent_key: record.agent_key.clone(),
        bot_identity: record.bot_identity.clone(),
        status,
        created_at: record.created_at,
        expires_at: record.expires_at,
        used_at: record.used_at,
        telegram_user_id: record.telegram_user_id.clone(),
        telegram_chat_id: record.telegram_chat_id.clone(),
    }
}

/// `https://t.me/<username>?start=<code>` with the bot's real username (T6).
pub async fn deep_link(ctx: &ServiceContext, bot: Option<&str>, code: &str) -> Result<Option<String>, OpError> {
    let Some(bot) = bot else { return Ok(None) };
    let record = crate::telegram::bot_record(ctx, bot).await?;
    Ok(record.and_then(|r| r.telegram_username).map(|username| format!("https://t.me/{username}?start={code}")))
}

/// The newest codes of a (user, agent) pair, newest first (at most `limit`).
pub async fn codes_for_pair(
    ctx: &ServiceContext,
    consumer_user_id: &str,
    agent_key: &str,
    limit: usize,
) -> Result<Vec<PairingRecord>, OpError> {
    let index = user_index(ctx, consumer_user_id).await?;
    let mut out = Vec::new();
    for entry in index.codes.iter().filter(|c| c.agent_key == agent_key).take(limit) {
        if let Some(record) = load_code(ctx, &entry.code).await? {
            out.push(record);
        }
    }
    Ok(out)
}

pub async fn latest_for_pair(
    ctx: &ServiceContext,
    consumer_user_id: &str,
    agent_key: &str,
) -> Result<Option<PairingRecord>, OpError> {
    Ok(codes_for_pair(ctx, consumer_user_id, agent_key, 1).await?.into_iter().next())
}

/// A window of recent event times (rate limits).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Window {
    pub at: Vec<Millis>,
}

/// Records an event in window `key` unless `max` events already happened in the last hour;
/// returns whether it was recorded.
async fn take(ctx: &ServiceContext, key: &str, max: u32, now: Millis) -> Result<bool, OpError> {
    let mut allowed = false;
    ctx.buckets
        .pairing
        .modify::<Window, OpError, _>(key, |current| {
            let mut window = current.unwrap_or_default();
            window.at.retain(|&t| t > now - HOUR_MS && t <= now);
            allowed = window.at.len() < max as usize;
            if allowed {
                window.at.push(now);
            }
            Ok(Some(window))
        })
        .await?;
    Ok(allowed)
}

/// Whether `max` events already happened in window `key` in the last hour (read only).
async fn exhausted(ctx: &ServiceContext, key: &str, max: u32, now: Millis) -> Result<bool, OpError> {
    let window = ctx.buckets.pairing.get::<Window>(key).await?.map(|v| v.value).unwrap_or_default();
    Ok(window.at.iter().filter(|&&t| t > now - HOUR_MS && t <= now).count() >= max as usize)
}

fn rate_limited(message: &str) -> OpError {
    OpError::new(ErrorCode::RateLimited, message)
}

fn new_code() -> String {
    let mut out = String::with_capacity(CODE_LEN);
    while out.len() < CODE_LEN {
        let mut r = common::crypto::random_u64();
        for _ in 0..12 {
            if out.len() == CODE_LEN {
                break;
            }
            out.push(CODE_ALPHABET[(r % 36) as usize] as char);
            r /= 36;
        }
    }
    out
}

/// Clamps the requested lifetime (spec §3.9 step 1); NaN and absent mean the default.
pub fn ttl(requested: Option<f64>) -> i64 {
    match requested {
        Some(ms) if ms.is_finite() => (ms as i64).clamp(MIN_TTL_MS, MAX_TTL_MS),
        _ => DEFAULT_TTL_MS,
    }
}

/// `createPairingCode` (spec §3.9).
async fn create(ctx: &ServiceContext, args: CreatePairingArgs) -> Result<PairingRecord, OpError> {
    let ttl = ttl(args.ttl_ms);
    let (consumer, agent_key) = (args.consumer_user_id.as_str(), args.agent_key.as_str());
    let profile = get_profile(ctx, agent_key)
        .await?
        .filter(|p| p.enabled)
        .ok_or_else(|| OpError::not_found(format!("Agent profile '{agent_key}' not found or disabled")))?;
    let bot = profile.bot_identity.as_deref().map(str::trim).filter(|b| !b.is_empty()).map(str::to_string).ok_or_else(
        || {
            OpError::invalid(format!(
                "Agent '{agent_key}' is missing botIdentity. Import and verify the Telegram token first."
            ))
        },
    )?;
    let now = ctx.clock.now_ms();
    let t = &ctx.settings.telegram;
    if !take(ctx, &format!("rl.u.{}", escape(consumer)), t.pairing_max_per_user_per_hour, now).await? {
        return Err(rate_limited("Too many pairing codes for this user; try again later"));
    }
    if !take(ctx, &format!("rl.b.{bot}"), t.pairing_max_per_bot_per_hour, now).await? {
        return Err(rate_limited("Too many pairing codes for this bot; try again later"));
    }
    // T8: every pending code of the user is superseded.
    for entry in user_index(ctx, consumer).await?.codes {
        expire_if_pending(ctx, &entry.code).await?;
    }
    let mut created = None;
    for _ in 0..GENERATION_ATTEMPTS {
        let record = PairingRecord {
            code: new_code(),
            consumer_user_id: consumer.to_string(),
            agent_key: agent_key.to_string(),
            bot_identity: Some(bot.clone()),
            status: PairingStatus::Pending,
            created_at: now,
            expires_at: now + ttl,
            used_at: None,
            telegram_user_id: None,
            telegram_chat_id: None,
        };
        match ctx.buckets.pairing.create(&code_key(&record.code), &record).await {
            Ok(_) => {
                created = Some(record);
                break;
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let record = created.ok_or_else(|| OpError::internal("Failed to generate unique pairing code"))?;
    let entry = IndexedCode { code: record.code.clone(), agent_key: agent_key.to_string(), created_at: now };
    ctx.buckets
        .pairing
        .modify::<UserPairings, OpError, _>(&user_key(consumer), |current| {
            let mut index = current.unwrap_or_default();
            index.codes.retain(|c| c.code != entry.code);
            index.codes.insert(0, entry.clone());
            index.codes.truncate(MAX_CODES_PER_USER);
            Ok(Some(index))
        })
        .await?;
    tracing::info!(consumer_user_id = %consumer, %agent_key, bot_identity = %bot, "pairing code created");
    Ok(record)
}

/// Moves a pending code to `expired` (compare-and-set); anything else is left alone.
async fn expire_if_pending(ctx: &ServiceContext, code: &str) -> Result<(), OpError> {
    ctx.buckets
        .pairing
        .modify::<PairingRecord, OpError, _>(&code_key(code), |current| {
            Ok(current.filter(|r| r.status == PairingStatus::Pending).map(|mut r| {
                r.status = PairingStatus::Expired;
                r
            }))
        })
        .await?;
    Ok(())
}

/// `consumePairingCode` (spec §3.9), as the webhook's `/start <code>` runs it.
pub async fn consume(ctx: &ServiceContext, args: ConsumePairingArgs) -> Result<ConsumedPairing, OpError> {
    let code = args.code.as_str();
    let bot = args.bot_identity.as_ref().map(|b| b.to_string());
    let (tg_user, tg_chat) = (args.telegram_user_id.to_string(), args.telegram_chat_id.to_string());
    let now = ctx.clock.now_ms();
    // Failed attempts are counted per Telegram user of a bot and per bot (all its users, so
    // many accounts cannot share the guessing); either window full refuses before the lookup.
    let bot_key = escape(bot.as_deref().unwrap_or("none"));
    let failures = format!("rl.f.{bot_key}.{}", escape(&tg_user));
    let bot_failures = format!("rl.fb.{bot_key}");
    let t = &ctx.settings.telegram;
    if exhausted(ctx, &failures, t.pairing_max_failures_per_hour, now).await?
        || exhausted(ctx, &bot_failures, t.pairing_max_failures_per_bot_per_hour, now).await?
    {
        metrics::counter!(common::telemetry::RATE_LIMITED, "route" => "pairing").increment(1);
        return Err(rate_limited("Too many pairing attempts; try again later"));
    }
    let result = mark_used(ctx, code, bot.as_deref(), &tg_user, &tg_chat, now).await;
    let record = match result {
        Ok(record) => record,
        Err(e) => {
            take(ctx, &failures, u32::MAX, now).await?;
            take(ctx, &bot_failures, u32::MAX, now).await?;
            return Err(e);
        }
    };
    let binding = crate::bindings::bind(
        ctx,
        BindArgs {
            consumer_user_id: common::ids::ConsumerUserId::trusted(record.consumer_user_id.clone()),
            agent_key: common::ids::AgentKey::trusted(record.agent_key.clone()),
            bot_identity: record.bot_identity.clone(),
            source: Some(BindingSource::TelegramPairing),
            telegram_user_id: Some(tg_user.clone()),
            telegram_chat_id: Some(tg_chat.clone()),
            metadata: None,
            now_ms: api::Ignored,
        },
    )
    .await?;
    tracing::info!(consumer_user_id = %record.consumer_user_id, agent_key = %record.agent_key, "pairing code consumed");
    Ok(ConsumedPairing { pairing: view(&record, now), binding })
}

/// The checks of spec §3.9 in order, then `pending → used` by compare-and-set. A code already
/// used by this very bot, user and chat is returned as it is (a redelivered `/start`).
async fn mark_used(
    ctx: &ServiceContext,
    code: &str,
    bot: Option<&str>,
    tg_user: &str,
    tg_chat: &str,
    now: Millis,
) -> Result<PairingRecord, OpError> {
    let key = code_key(code);
    for _ in 0..CAS_ATTEMPTS {
        let Some(stored) = ctx.buckets.pairing.get::<PairingRecord>(&key).await? else {
            return Err(OpError::not_found("Pairing code not found"));
        };
        let mut record = stored.value;
        let same_identity = record.bot_identity.as_deref() == bot
            && record.telegram_user_id.as_deref() == Some(tg_user)
            && record.telegram_chat_id.as_deref() == Some(tg_chat);
        match record.status {
            PairingStatus::Used if same_identity => return Ok(record),
            PairingStatus::Pending => {}
            _ => return Err(OpError::conflict("Pairing code already used or expired")),
        }
        if now >= record.expires_at {
            // T8: stored, unlike the original whose throw rolled it back.
            record.status = PairingStatus::Expired;
            match ctx.buckets.pairing.update(&key, &record, stored.revision).await {
                Ok(_) => return Err(OpError::invalid("Pairing code expired")),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let Some(bot) = bot.map(str::trim).filter(|b| !b.is_empty()) else {
            return Err(OpError::invalid("Missing bot identity for Telegram pairing"));
        };
        if record.bot_identity.as_deref().is_some_and(|b| b != bot) {
            return Err(OpError::invalid("Pairing code belongs to a different Telegram bot"));
        }
        record.status = PairingStatus::Used;
        record.used_at = Some(now);
        record.bot_identity = Some(bot.to_string());
        record.telegram_user_id = Some(tg_user.to_string());
        record.telegram_chat_id = Some(tg_chat.to_string());
        match ctx.buckets.pairing.update(&key, &record, stored.revision).await {
            Ok(_) => return Ok(record),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(OpError::conflict(format!("concurrent update of '{key}'; retry the request")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_twelve_characters_of_digits_and_capitals() {
        let codes: std::collections::HashSet<String> = (0..1000).map(|_| new_code()).collect();
        assert_eq!(codes.len(), 1000);
        for code in &codes {
            assert_eq!(code.len(), CODE_LEN);
            assert!(code.bytes().all(|b| CODE_ALPHABET.contains(&b)), "{code}");
            assert!(common::ids::PairingCode::parse(code.as_str()).is_ok());
        }
    }

    #[test]
    fn ttl_is_clamped() {
        assert_eq!(ttl(None), DEFAULT_TTL_MS);
        assert_eq!(ttl(Some(f64::NAN)), DEFAULT_TTL_MS);
        assert_eq!(ttl(Some(1.0)), MIN_TTL_MS);
        assert_eq!(ttl(Some(1e12)), MAX_TTL_MS);
        assert_eq!(ttl(Some(120_000.0)), 120_000);
    }

    #[test]
    fn a_pending_code_past_expiry_shows_expired() {
        let record = PairingRecord {
            code: "ABCD".into(),
            consumer_user_id: "u".into(),
            agent_key: "a".into(),
            bot_identity: Some("1".into()),
            status: PairingStatus::Pending,
            created_at: 0,
            expires_at: 10,
            used_at: None,
            telegram_user_id: None,
            telegram_chat_id: None,
        };
        assert_eq!(view(&record, 9).status, PairingStatus::Pending);
        assert_eq!(view(&record, 10).status, PairingStatus::Expired);
    }
}
