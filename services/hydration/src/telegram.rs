//! Telegram administration (spec §3.10): `importTelegramTokenForAgent`,
//! `configureTelegramWebhook`, `reconcileTelegramBotIdentityForAgent`, `getWebhookReadiness`
//! and `softResetTelegramBindingsMissingBotIdentity`, with the original's error strings.
//!
//! # Storage
//!
//! * the bot token is an ordinary encrypted secret (`telegram.botToken.<agentKey>` unless the
//!   profile names another telegram ref), its ref added to the profile's `secretsRef`;
//! * `af_telegram_bots` `bot.<botIdentity>` ([`BotRecord`]): the agent, the real username from
//!   `getMe` (T6), the webhook URL and whether Telegram reported it at the last check;
//! * the webhook secret (S4): 48 random characters per bot, kept as the encrypted secret
//!   `telegram.webhookSecret.<botIdentity>` and reused by later set-ups; ingress finds the bot
//!   from the presented secret through `wh.<sha256 hex>` ([`WebhookSecretIndex`]).
//!
//! Write order of a webhook set-up: the secret, then its index key, then `setWebhook` — so by
//! the time Telegram sends the secret, ingress can already resolve it. A set-up killed half way
//! is repaired by running it again (every step is idempotent).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::OpError;
use common::api;
use common::api::telegram::{
    BotRecord, ConfigureWebhookArgs, ImportTelegramTokenArgs, ImportedTelegramToken, ReconcileBotIdentityArgs,
    ReconciledBotIdentity, SoftResetArgs, SoftResetReport, WebhookConfigured, WebhookReadiness, WebhookSecretIndex,
    bot_key, webhook_secret_key,
};
use common::auth::Caller;
use common::crypto::SecretCipher;
use common::model::AgentProfile;
use common::ops::OpRegistry;
use common::secrets::{SecretDocument, aad, active_secret};
use common::service::ServiceContext;
use common::token::escape;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use telegram_bot::{BotApi, BotApiError, RetryPolicy};

use crate::bindings::{BindingStatus, UserBindings};
use crate::profiles::get_profile;
use crate::secrets::add_version;

/// The original's default token ref of `configureTelegramWebhook`.
pub const DEFAULT_WEBHOOK_SECRET_REF: &str = "telegram.botToken.default";
/// Prefix of the per-bot webhook secret's ref.
pub const WEBHOOK_SECRET_PREFIX: &str = "telegram.webhookSecret";
/// Characters of a generated webhook secret (`[0-9a-z]`, about 248 bits).
const WEBHOOK_SECRET_LEN: usize = 48;

/// The Bot API client configured by `telegram.*`.
pub fn bot_api(settings: &common::config::Settings) -> BotApi {
    let t = &settings.telegram;
    let policy = RetryPolicy {
        attempts: t.retry_attempts,
        base_delay: Duration::from_millis(t.retry_base_delay_ms),
        max_retry_after: Duration::from_millis(t.max_retry_after_ms),
    };
    BotApi::new(&t.api_base_url, Duration::from_millis(t.http_timeout_ms), policy)
}

/// What every Telegram operation of this service shares.
#[derive(Clone)]
pub struct Telegram {
    pub ctx: ServiceContext,
    pub cipher: Arc<SecretCipher>,
    pub api: BotApi,
}

pub(crate) fn register(telegram: &Telegram, ops: &mut OpRegistry) {
    ops.handle::<api::ImportTelegramTokenForAgent, _, _, _, _>(telegram, |t, _: Caller, args| async move {
        t.import_token(args).await
    });
    ops.handle::<api::ConfigureTelegramWebhook, _, _, _, _>(telegram, |t, _: Caller, args| async move {
        t.configure_webhook(args).await
    });
    ops.handle::<api::ReconcileTelegramBotIdentityForAgent, _, _, _, _>(telegram, |t, _: Caller, args| async move {
        t.reconcile(args).await
    });
    ops.handle::<api::GetWebhookReadiness, _, _, _, _>(telegram, |t, _: Caller, args| async move {
        t.readiness(&args.agent_key).await
    });
    ops.handle::<api::PrepareTelegramAttachmentsForEnqueue, _, _, _, _>(telegram, |t, _: Caller, args| async move {
        crate::telegram_updates::prepare_attachments(&t, args).await
    });
    ops.handle::<api::SoftResetTelegramBindingsMissingBotIdentity, _, _, _, _>(
        telegram,
        |t, _: Caller, args| async move { soft_reset(&t.ctx, args).await },
    );
}

/// An error of a Bot API call as the original words it: `Telegram <method> failed: <why>`.
/// Transient failures are `503 unavailable`, Telegram's refusals `400 invalid_input`.
pub fn telegram_error(method: &str, err: &BotApiError) -> OpError {
    let message = format!("Telegram {method} failed: {}", err.description());
    if err.is_transient() { OpError::unavailable(message) } else { OpError::invalid(message) }
}

/// The bot token refs of a profile in order: its explicit telegram refs, then
/// `telegram.botToken.<agentKey>`.
pub fn token_refs(profile: Option<&AgentProfile>, agent_key: &str) -> Vec<String> {
    let mut refs = profile.map(|p| crate::secrets::bot_token_refs(&p.secrets_ref)).unwrap_or_default();
    refs.retain(|r| r != "telegram.botToken");
    let default = format!("telegram.botToken.{agent_key}");
    if !refs.contains(&default) {
        refs.push(default);
    }
    refs
}

/// The agent's token ref (spec §3.12.1 `telegramTokenSecretRef`): its first explicit telegram
/// ref, else `telegram.botToken.<agentKey>`.
pub fn token_ref(profile: Option<&AgentProfile>, agent_key: &str) -> String {
    token_refs(profile, agent_key).remove(0)
}

pub fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

pub async fn bot_record(ctx: &ServiceContext, bot_identity: &str) -> Result<Option<BotRecord>, OpError> {
    Ok(ctx.buckets.telegram_bots.get::<BotRecord>(&bot_key(bot_identity)).await?.map(|v| v.value))
}

impl Telegram {
    /// `getMe` → (botIdentity, username), with the original's errors.
    pub async fn identify(&self, token: &str) -> Result<(String, Option<String>), OpError> {
        let me = self.api.get_me(token).await.map_err(|e| telegram_error("getMe", &e))?;
        let bot = me.id.to_string();
        if bot.trim().is_empty() || me.id == 0 {
            return Err(OpError::invalid("Telegram getMe did not return a bot id"));
        }
        let username = me.username.map(|u| u.trim().to_string()).filter(|u| !u.is_empty());
        Ok((bot, username))
    }

    /// The first active token of the agent (its telegram refs, then `telegram.botToken`).
    pub async fn agent_token(
        &self,
        profile: Option<&AgentProfile>,
        agent_key: &str,
    ) -> Result<Option<(String, SecretString)>, OpError> {
        let mut refs = token_refs(profile, agent_key);
        refs.push("telegram.botToken".to_string());
        crate::secrets::first_active_secret(&self.ctx, &self.cipher, &refs).await
    }

    /// The token of a bot, through the agent its record names.
    pub async fn bot_token(&self, bot_identity: &str) -> Result<Option<SecretString>, OpError> {
        let Some(record) = bot_record(&self.ctx, bot_identity).await? else { return Ok(None) };
        if let Some(secret_ref) = &record.token_secret_ref
            && let Some(token) = active_secret(&self.ctx, &self.cipher, secret_ref).await?
        {
            return Ok(Some(token));
        }
        let Some(agent_key) = &record.agent_key else { return Ok(None) };
        let profile = get_profile(&self.ctx, agent_key).await?;
        Ok(self.agent_token(profile.as_ref(), agent_key).await?.map(|(_, token)| token))
    }

    async fn store_secret(
        &self,
        secret_ref: &str,
        plaintext: &str,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<u64, OpError> {
        let now = self.ctx.clock.now_ms();
        let stored = self
            .ctx
            .buckets
            .secrets
            .modify::<SecretDocument, OpError, _>(&escape(secret_ref), |current| {
                add_version(
                    current,
                    secret_ref,
                    |version| self.cipher.seal(plaintext, &aad(secret_ref, version)),
                    metadata.clone(),
                    now,
                )
                .map(Some)
            })
            .await?
            .ok_or_else(|| OpError::internal("secret write returned no document"))?;
        stored
            .value
            .active()
            .map(|v| v.version)
            .ok_or_else(|| OpError::internal("secret written without an active version"))
    }

    /// Spec §3.10 "bot identity uniqueness", then records the identity on the profile (adding
    /// the token ref to its `secretsRef`, T7) and on the bot record.
    async fn sync_bot_identity(
        &self,
        agent_key: &str,
        bot: &str,
        username: Option<&str>,
        secret_ref: &str,
    ) -> Result<(), OpError> {
        let profiles = self.ctx.buckets.profiles.all::<AgentProfile>().await?;
        if let Some((_, other)) = profiles.iter().find(|(_, p)| {
            p.value.agent_key != agent_key && p.value.bot_identity.as_deref().map(str::trim) == Some(bot)
        }) {
            return Err(OpError::conflict(format!(
                "Telegram bot identity '{bot}' is already assigned to agent '{}'",
                other.value.agent_key
            )));
        }
        let now = self.ctx.clock.now_ms();
        let written = self
            .ctx
            .buckets
            .profiles
            .modify::<AgentProfile, OpError, _>(&escape(agent_key), |current| {
                let Some(mut profile) = current else {
                    return Err(OpError::not_found(format!("Agent profile '{agent_key}' not found")));
                };
                let has_ref = profile.secrets_ref.iter().any(|r| r == secret_ref);
                if profile.bot_identity.as_deref() == Some(bot) && has_ref {
                    return Ok(None);
                }
                profile.bot_identity = Some(bot.to_string());
                if !has_ref {
                    profile.secrets_ref.push(secret_ref.to_string());
                }
                profile.updated_at = now;
                Ok(Some(profile))
            })
            .await;
        written?;
        self.ctx
            .buckets
            .telegram_bots
            .modify::<BotRecord, OpError, _>(&bot_key(bot), |current| {
                let mut record = current.unwrap_or_else(|| BotRecord::new(bot, now));
                record.agent_key = Some(agent_key.to_string());
                if username.is_some() {
                    record.telegram_username = username.map(str::to_string);
                }
                record.token_secret_ref = Some(secret_ref.to_string());
                record.updated_at = now;
                Ok(Some(record))
            })
            .await?;
        Ok(())
    }

    async fn import_token(&self, args: ImportTelegramTokenArgs) -> Result<ImportedTelegramToken, OpError> {
        let token = args.plaintext_value.into_secret();
        let token = token.expose_secret().trim().to_string();
        if token.is_empty() {
            return Err(OpError::invalid("Telegram token is required"));
        }
        if token.len() > 256 || token.chars().any(|c| c.is_control() || c.is_whitespace() || c == '/') {
            return Err(OpError::invalid("Telegram getMe failed: Not Found"));
        }
        let (bot, username) = self.identify(&token).await?;
        let agent_key = args.agent_key.as_str();
        let profile = get_profile(&self.ctx, agent_key)
            .await?
            .ok_or_else(|| OpError::not_found(format!("Agent profile '{agent_key}' not found")))?;
        let explicit: Vec<String> = crate::secrets::bot_token_refs(&profile.secrets_ref)
            .into_iter()
            .filter(|r| r.starts_with("telegram.botToken."))
            .collect();
        let secret_ref = explicit.first().cloned().unwrap_or_else(|| format!("telegram.botToken.{agent_key}"));
        // Spec §3.10: the agent must be known for the user — a binding or a pairing of the pair,
        // or a profile that uses the default token ref (true of every profile without an
        // explicit telegram ref since 3.1.2).
        let known = secret_ref == format!("telegram.botToken.{agent_key}")
            || crate::pairing::pair_known(&self.ctx, &args.consumer_user_id, agent_key).await?;
        if !known {
            return Err(OpError::invalid("Agent is not yet associated with the provided consumerUserId"));
        }
        self.sync_bot_identity(agent_key, &bot, username.as_deref(), &secret_ref).await?;
        let mut metadata = args.metadata.unwrap_or_default();
        metadata.insert("telegramBotId".to_string(), bot.clone());
        if let Some(username) = &username {
            metadata.insert("telegramUsername".to_string(), username.clone());
        }
        let version = self.store_secret(&secret_ref, &token, Some(metadata)).await?;
        tracing::info!(%agent_key, bot_identity = %bot, %secret_ref, version, "telegram token imported");
        Ok(ImportedTelegramToken {
            secret_id: aad(&secret_ref, version),
            secret_ref,
            version,
            bot_identity: bot,
            telegram_username: username,
        })
    }

    /// The webhook URL for a base URL (argument or configuration), validated.
    fn webhook_url(&self, given: Option<&str>) -> Result<String, OpError> {
        let settings = &self.ctx.settings;
        let base = given.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).unwrap_or_else(|| {
            let configured = settings.telegram.public_url.trim();
            if configured.is_empty() { settings.http.public_base_url() } else { configured.to_string() }
        });
        let base = base.trim_end_matches('/');
        if base.is_empty() {
            return Err(OpError::invalid("convexSiteUrl is required."));
        }
        if base.len() > 1024 || base.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(OpError::invalid("convexSiteUrl must be a URL without spaces, at most 1024 bytes"));
        }
        let https = base.starts_with("https://");
        let http_host = base.strip_prefix("http://").map(|rest| {
            let authority = rest.split('/').next().unwrap_or_default();
            if let Some(v6) = authority.strip_prefix('[') {
                v6.split(']').next().unwrap_or_default().to_string()
            } else {
                authority.split(':').next().unwrap_or_default().to_string()
            }
        });
        let loopback = http_host.as_deref().is_some_and(|h| h == "localhost" || h == "::1" || h.starts_with("127."));
        if !https && !(http_host.is_some() && (loopback || settings.telegram.allow_insecure_webhook)) {
            return Err(OpError::invalid("convexSiteUrl must start with https://"));
        }
        Ok(format!("{base}{}", settings.telegram.webhook_path()))
    }

    /// The bot's webhook secret: the stored one, or a new random one stored now.
    async fn webhook_secret(&self, bot: &str) -> Result<SecretString, OpError> {
        let secret_ref = format!("{WEBHOOK_SECRET_PREFIX}.{bot}");
        if let Some(secret) = active_secret(&self.ctx, &self.cipher, &secret_ref).await? {
            return Ok(secret);
        }
        let secret = common::crypto::random_base36(WEBHOOK_SECRET_LEN);
        self.store_secret(&secret_ref, &secret, None).await?;
        // Two concurrent set-ups may both have generated one; the stored active one wins.
        Ok(active_secret(&self.ctx, &self.cipher, &secret_ref).await?.unwrap_or_else(|| SecretString::from(secret)))
    }

    async fn configure_webhook(&self, args: ConfigureWebhookArgs) -> Result<WebhookConfigured, OpError> {
        let agent_key = args.agent_key.as_ref().map(|a| a.to_string());
        let profile = match &agent_key {
            Some(agent_key) => get_profile(&self.ctx, agent_key).await?,
            None => None,
        };
        let secret_ref = match (&args.secret_ref, &agent_key) {
            (Some(secret_ref), _) => secret_ref.to_string(),
            (None, Some(agent_key)) => token_ref(profile.as_ref(), agent_key),
            (None, None) => DEFAULT_WEBHOOK_SECRET_REF.to_string(),
        };
        let token = active_secret(&self.ctx, &self.cipher, &secret_ref).await?.ok_or_else(|| {
            OpError::invalid(format!("Missing Telegram token. Import an active '{secret_ref}' secret before pairing."))
        })?;
        let token = token.expose_secret().trim().to_string();
        let webhook_url = self.webhook_url(args.convex_site_url.as_deref())?;
        let (bot, username) = self.identify(&token).await?;
        if let Some(agent_key) = &agent_key {
            if profile.is_none() {
                return Err(OpError::not_found(format!("Agent profile '{agent_key}' not found")));
            }
            self.sync_bot_identity(agent_key, &bot, username.as_deref(), &secret_ref).await?;
        }
        let secret = self.webhook_secret(&bot).await?;
        let digest = sha256_hex(secret.expose_secret());
        let index = WebhookSecretIndex { bot_identity: bot.clone(), secret_sha256: digest.clone() };
        self.ctx
            .buckets
            .telegram_bots
            .modify::<WebhookSecretIndex, OpError, _>(&webhook_secret_key(&digest), |current| {
                Ok((current.as_ref() != Some(&index)).then(|| index.clone()))
            })
            .await?;
        self.api
            .set_webhook(&token, &webhook_url, secret.expose_secret())
            .await
            .map_err(|e| telegram_error("setWebhook", &e))?;
        let info = self.api.get_webhook_info(&token).await.map_err(|e| telegram_error("getWebhookInfo", &e))?;
        let is_ready = info.url == webhook_url;
        self.record_webhook(
            &bot,
            agent_key.as_deref(),
            username.as_deref(),
            Some(&webhook_url),
            is_ready,
            Some(&digest),
        )
        .await?;
        tracing::info!(bot_identity = %bot, %webhook_url, is_ready, "telegram webhook configured");
        Ok(WebhookConfigured {
            ok: true,
            current_url: Some(info.url.clone()).filter(|u| !u.is_empty()),
            webhook_url,
            bot_identity: bot,
            secret_token_configured: true,
            is_ready,
            pending_update_count: u64::from(info.pending_update_count),
            last_error_message: info.last_error_message,
            last_error_date: info.last_error_date.map(|d| d as i64),
            description: "Telegram webhook configured and verified.".to_string(),
        })
    }

    async fn record_webhook(
        &self,
        bot: &str,
        agent_key: Option<&str>,
        username: Option<&str>,
        webhook_url: Option<&str>,
        ready: bool,
        digest: Option<&str>,
    ) -> Result<(), OpError> {
        let now = self.ctx.clock.now_ms();
        self.ctx
            .buckets
            .telegram_bots
            .modify::<BotRecord, OpError, _>(&bot_key(bot), |current| {
                let mut record = current.unwrap_or_else(|| BotRecord::new(bot, now));
                if let Some(agent_key) = agent_key {
                    record.agent_key = Some(agent_key.to_string());
                }
                if let Some(username) = username {
                    record.telegram_username = Some(username.to_string());
                }
                if let Some(url) = webhook_url {
                    record.webhook_url = Some(url.to_string());
                }
                if let Some(digest) = digest {
                    record.webhook_secret_sha256 = Some(digest.to_string());
                }
                record.webhook_ready = ready;
                record.updated_at = now;
                Ok(Some(record))
            })
            .await?;
        Ok(())
    }

    async fn reconcile(&self, args: ReconcileBotIdentityArgs) -> Result<ReconciledBotIdentity, OpError> {
        let agent_key = args.agent_key.trim().to_string();
        let secret_ref =
            args.secret_ref.map(|r| r.to_string()).unwrap_or_else(|| format!("telegram.botToken.{agent_key}"));
        let token = active_secret(&self.ctx, &self.cipher, &secret_ref).await?.ok_or_else(|| {
            OpError::invalid(format!("Missing Telegram token. Import an active '{secret_ref}' secret first."))
        })?;
        let (bot, username) = self.identify(token.expose_secret().trim()).await?;
        self.sync_bot_identity(&agent_key, &bot, username.as_deref(), &secret_ref).await?;
        Ok(ReconciledBotIdentity { agent_key, secret_ref, bot_identity: bot, telegram_username: username })
    }

    async fn readiness(&self, agent_key: &str) -> Result<WebhookReadiness, OpError> {
        let profile = get_profile(&self.ctx, agent_key).await?;
        let Some((secret_ref, token)) = self.agent_token(profile.as_ref(), agent_key).await? else {
            return Ok(WebhookReadiness {
                agent_key: agent_key.to_string(),
                secret_ref: None,
                current_url: None,
                pending_update_count: 0,
                last_error_message: None,
                last_error_date: None,
                webhook_ready: false,
            });
        };
        let info = self
            .api
            .get_webhook_info(token.expose_secret().trim())
            .await
            .map_err(|e| telegram_error("getWebhookInfo", &e))?;
        let bot = profile.as_ref().and_then(|p| p.bot_identity.clone());
        let record = match &bot {
            Some(bot) => bot_record(&self.ctx, bot).await?,
            None => None,
        };
        // Ready: Telegram delivers to this deployment's path, with a secret configured here.
        let ready = info.url.ends_with(&self.ctx.settings.telegram.webhook_path())
            && record.as_ref().is_some_and(|r| r.webhook_secret_sha256.is_some());
        if let Some(bot) = &bot {
            self.record_webhook(bot, None, None, None, ready, None).await?;
        }
        Ok(WebhookReadiness {
            agent_key: agent_key.to_string(),
            secret_ref: Some(secret_ref),
            current_url: Some(info.url).filter(|u| !u.is_empty()),
            pending_update_count: u64::from(info.pending_update_count),
            last_error_message: info.last_error_message,
            last_error_date: info.last_error_date.map(|d| d as i64),
            webhook_ready: ready,
        })
    }
}

/// `softResetTelegramBindingsMissingBotIdentity` (spec §3.10): full scans of the bindings, the
/// pairing codes and the profiles. Each user document is rewritten by compare-and-set, so the
/// migration may be re-run (already annotated bindings are counted again but not changed twice).
async fn soft_reset(ctx: &ServiceContext, args: SoftResetArgs) -> Result<SoftResetReport, OpError> {
    let revoke_active = args.revoke_active_bindings.unwrap_or(true);
    let expire_pending = args.expire_pending_pairings.unwrap_or(true);
    let now = ctx.clock.now_ms();
    let mut report = SoftResetReport::default();
    let users = ctx.buckets.bindings.scan::<UserBindings>("u.*").await?;
    for (key, _) in users {
        let mut counted = SoftResetReport::default();
        ctx.buckets
            .bindings
            .modify::<UserBindings, OpError, _>(&key, |current| {
                counted = SoftResetReport::default();
                let Some(mut doc) = current else { return Ok(None) };
                let mut changed = false;
                for binding in doc.bindings.iter_mut().filter(|b| {
                    b.source == common::api::bindings::BindingSource::TelegramPairing
                        && b.bot_identity.as_deref().is_none_or(|s| s.trim().is_empty())
                }) {
                    counted.legacy_bindings_missing_bot_identity += 1;
                    let metadata = binding.metadata.get_or_insert_with(BTreeMap::new);
                    if metadata.get("softResetReason").map(String::as_str) != Some("missing_bot_identity") {
                        metadata.insert("softResetReason".into(), "missing_bot_identity".into());
                        metadata.insert("softResetAt".into(), now.to_string());
                        metadata.insert("softResetMode".into(), "telegram_bot_identity_v1".into());
                        changed = true;
                    }
                    if binding.status == BindingStatus::Active && revoke_active {
                        binding.status = BindingStatus::Revoked;
                        binding.revoked_at = Some(now);
                        counted.revoked_bindings += 1;
                        changed = true;
                    } else {
                        counted.annotated_bindings += 1;
                    }
                }
                Ok(changed.then_some(doc))
            })
            .await?;
        report.legacy_bindings_missing_bot_identity += counted.legacy_bindings_missing_bot_identity;
        report.revoked_bindings += counted.revoked_bindings;
        report.annotated_bindings += counted.annotated_bindings;
    }
    let (pending, expired) = crate::pairing::expire_pairings_missing_bot(ctx, expire_pending).await?;
    report.pending_pairings_missing_bot_identity = pending;
    report.expired_pairings = expired;
    let profiles = ctx.buckets.profiles.all::<AgentProfile>().await?;
    report.profiles_missing_bot_identity =
        profiles.iter().filter(|(_, p)| p.value.bot_identity.as_deref().is_none_or(|b| b.trim().is_empty())).count()
            as u64;
    tracing::info!(?report, "telegram soft reset");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_refs_put_explicit_refs_first() {
        let profile = |refs: &[&str]| AgentProfile {
            agent_key: "a".into(),
            version: "1".into(),
            secrets_ref: refs.iter().map(|s| s.to_string()).collect(),
            bot_identity: None,
            company_id: None,
            bridge_config: None,
            enabled: true,
            created_at: 0,
            updated_at: 0,
        };
        assert_eq!(token_refs(None, "a"), vec!["telegram.botToken.a"]);
        let p = profile(&["convex.url", "telegram.botToken.custom", "telegram.botToken"]);
        assert_eq!(token_refs(Some(&p), "a"), vec!["telegram.botToken.custom", "telegram.botToken.a"]);
        assert_eq!(token_ref(Some(&p), "a"), "telegram.botToken.custom");
    }
}
