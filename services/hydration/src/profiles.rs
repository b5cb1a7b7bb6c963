//! Agent profiles (spec §3.1): `upsertAgentProfile`, `getAgentProfile` and `listAgentProfiles`,
//! stored one document per agent in `af_profiles` under the escaped agentKey. This module owns
//! the input validation of profiles and the "effective secretsRef" rule; nothing else writes
//! profiles.

use common::OpError;
use common::api;
use common::api::profiles::UpsertAgentProfileArgs;
use common::auth::Caller;
use common::ids::AgentKey;
use common::model::{AgentProfile, BridgeConfig};
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::token::escape;

/// The secret refs every profile carries (spec §2.5): the scheduler needs both to spawn workers.
pub const MANDATORY_SECRET_REFS: [&str; 2] = ["convex.url", "fly.apiToken"];
/// Default prefix of the bridge service key ref; the agentKey is appended.
pub const BRIDGE_SERVICE_KEY_PREFIX: &str = "agent-bridge.serviceKey";
/// Default prefix of the bridge base-URL map ref; the agentKey is appended.
pub const BRIDGE_BASE_URL_MAP_PREFIX: &str = "agent-bridge.baseUrlMapJson";

pub const MAX_AGENT_KEY_BYTES: usize = 128;
pub const MAX_VERSION_BYTES: usize = 64;
pub const MAX_SECRET_REF_BYTES: usize = 256;
pub const MAX_SECRET_REFS: usize = 64;

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::UpsertAgentProfile, _, _, _, _>(
        ctx,
        |ctx, _: Caller, args| async move { upsert(&ctx, args).await },
    );
    ops.handle::<api::GetAgentProfile, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        validate_agent_key(&args.agent_key)?;
        get_profile(&ctx, &args.agent_key).await
    });
    ops.handle::<api::ListAgentProfiles, _, _, _, _>(ctx, |ctx, _: Caller, _| async move { list(&ctx).await });
}

/// Creates or patches the profile and returns its id, which is the agentKey itself: profiles
/// are keyed by agentKey, so no second identifier is needed.
async fn upsert(ctx: &ServiceContext, args: UpsertAgentProfileArgs) -> Result<AgentKey, OpError> {
    validate_agent_key(&args.agent_key)?;
    validate_version(&args.version)?;
    let given: Vec<String> = args.secrets_ref.iter().map(|r| r.to_string()).collect();
    validate_secret_refs(&given)?;
    if let Some(bridge) = &args.bridge_config {
        validate_bridge_config(bridge)?;
    }
    let now = ctx.clock.now_ms();
    let key = escape(&args.agent_key);
    ctx.buckets
        .profiles
        .modify::<AgentProfile, OpError, _>(&key, |current| {
            let mut profile = match current {
                Some(existing) => existing,
                None => AgentProfile {
                    agent_key: args.agent_key.to_string(),
                    version: String::new(),
                    secrets_ref: Vec::new(),
                    bot_identity: None,
                    bridge_config: None,
                    enabled: args.enabled,
                    company_id: None,
                    created_at: now,
                    updated_at: now,
                },
            };
            profile.version = args.version.clone();
            profile.enabled = args.enabled;
            if let Some(bot) = &args.bot_identity {
                profile.bot_identity = Some(bot.clone());
            }
            if let Some(bridge) = &args.bridge_config {
                profile.bridge_config = Some(bridge.clone());
            }
            if let Some(company) = &args.company_id {
                profile.company_id = Some(company.to_string());
            }
            // The refs are derived from the bridge config the profile ends up with, so a patch
            // that omits bridgeConfig keeps the bridge refs of the stored one.
            profile.secrets_ref = effective_secrets_ref(&args.agent_key, &given, profile.bridge_config.as_ref());
            validate_secret_ref_count(&profile.secrets_ref)?;
            profile.updated_at = now;
            Ok(Some(profile))
        })
        .await?;
    tracing::info!(agent_key = %args.agent_key, "agent profile upserted");
    Ok(args.agent_key)
}

pub async fn get_profile(ctx: &ServiceContext, agent_key: &str) -> Result<Option<AgentProfile>, OpError> {
    let stored = ctx.buckets.profiles.get::<AgentProfile>(&escape(agent_key)).await?;
    Ok(stored.map(|v| v.value))
}

async fn list(ctx: &ServiceContext) -> Result<Vec<AgentProfile>, OpError> {
    // One ordered-consumer pass over the bucket, not one get per key (a broadcast lists them all).
    let mut profiles: Vec<AgentProfile> =
        ctx.buckets.profiles.scan::<AgentProfile>(">").await?.into_iter().map(|(_, v)| v.value).collect();
    profiles.sort_by(|a, b| a.agent_key.cmp(&b.agent_key));
    Ok(profiles)
}

/// Spec §3.1 step 1: the de-duplicated union, in order, of the given refs, the mandatory refs,
/// and (only when the bridge is enabled) the bridge service-key and base-URL-map refs.
pub fn effective_secrets_ref(agent_key: &str, given: &[String], bridge: Option<&BridgeConfig>) -> Vec<String> {
    let mut candidates: Vec<String> = given.to_vec();
    candidates.extend(MANDATORY_SECRET_REFS.iter().map(|s| s.to_string()));
    if let Some(bridge) = bridge.filter(|b| b.enabled) {
        candidates.push(
            bridge.service_key_secret_ref.clone().unwrap_or_else(|| format!("{BRIDGE_SERVICE_KEY_PREFIX}.{agent_key}")),
        );
        candidates.push(
            bridge
                .app_base_url_map_json_secret_ref
                .clone()
                .unwrap_or_else(|| format!("{BRIDGE_BASE_URL_MAP_PREFIX}.{agent_key}")),
        );
    }
    let mut out: Vec<String> = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        if !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out
}

pub fn validate_agent_key(agent_key: &str) -> Result<(), OpError> {
    if agent_key.trim().is_empty() {
        return Err(OpError::invalid("agentKey: must not be empty"));
    }
    if agent_key.len() > MAX_AGENT_KEY_BYTES {
        return Err(OpError::invalid(format!(
            "agentKey: must be at most {MAX_AGENT_KEY_BYTES} bytes, got {}",
            agent_key.len()
        )));
    }
    if agent_key.chars().any(char::is_control) {
        return Err(OpError::invalid("agentKey: must not contain control characters"));
    }
    Ok(())
}

fn validate_version(version: &str) -> Result<(), OpError> {
    if version.trim().is_empty() {
        return Err(OpError::invalid("version: must not be empty"));
    }
    if version.len() > MAX_VERSION_BYTES {
        return Err(OpError::invalid(format!(
            "version: must be at most {MAX_VERSION_BYTES} bytes, got {}",
            version.len()
        )));
    }
    Ok(())
}

/// A secret ref is non-empty, at most 256 bytes and free of whitespace. `field` names it in the
/// error message.
pub fn validate_secret_ref(field: &str, secret_ref: &str) -> Result<(), OpError> {
    if secret_ref.is_empty() {
        return Err(OpError::invalid(format!("{field}: must not be empty")));
    }
    if secret_ref.len() > MAX_SECRET_REF_BYTES {
        return Err(OpError::invalid(format!(
            "{field}: must be at most {MAX_SECRET_REF_BYTES} bytes, got {}",
            secret_ref.len()
        )));
    }
    if secret_ref.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(OpError::invalid(format!("{field}: must not contain whitespace or control characters")));
    }
    Ok(())
}

fn validate_secret_refs(refs: &[String]) -> Result<(), OpError> {
    validate_secret_ref_count(refs)?;
    for (i, secret_ref) in refs.iter().enumerate() {
        validate_secret_ref(&format!("secretsRef[{i}]"), secret_ref)?;
    }
    Ok(())
}

fn validate_secret_ref_count(refs: &[String]) -> Result<(), OpError> {
    if refs.len() > MAX_SECRET_REFS {
        return Err(OpError::invalid(format!(
            "secretsRef: at most {MAX_SECRET_REFS} refs are allowed (including the ones added \
             automatically), got {}",
            refs.len()
        )));
    }
    Ok(())
}

fn validate_bridge_config(bridge: &BridgeConfig) -> Result<(), OpError> {
    if let Some(r) = &bridge.service_key_secret_ref {
        validate_secret_ref("bridgeConfig.serviceKeySecretRef", r)?;
    }
    if let Some(r) = &bridge.app_base_url_map_json_secret_ref {
        validate_secret_ref("bridgeConfig.appBaseUrlMapJsonSecretRef", r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn bridge(enabled: bool) -> BridgeConfig {
        BridgeConfig {
            enabled,
            base_url: None,
            service_id: None,
            app_key: None,
            service_key_secret_ref: None,
            app_base_url_map_json_secret_ref: None,
        }
    }

    #[test]
    fn mandatory_refs_follow_the_given_ones_without_duplicates() {
        let out = effective_secrets_ref("a", &refs(&["telegram.botToken", "fly.apiToken"]), None);
        assert_eq!(out, refs(&["telegram.botToken", "fly.apiToken", "convex.url"]));
        assert_eq!(effective_secrets_ref("a", &[], None), refs(&["convex.url", "fly.apiToken"]));
    }

    #[test]
    fn enabled_bridge_adds_default_refs_scoped_to_the_agent() {
        let out = effective_secrets_ref("bot-1", &refs(&["x"]), Some(&bridge(true)));
        assert_eq!(
            out,
            refs(&[
                "x",
                "convex.url",
                "fly.apiToken",
                "agent-bridge.serviceKey.bot-1",
                "agent-bridge.baseUrlMapJson.bot-1",
            ])
        );
    }

    #[test]
    fn explicit_bridge_refs_win_and_disabled_bridge_adds_nothing() {
        let mut b = bridge(true);
        b.service_key_secret_ref = Some("my.key".into());
        b.app_base_url_map_json_secret_ref = Some("x".into());
        let out = effective_secrets_ref("a", &refs(&["x"]), Some(&b));
        assert_eq!(out, refs(&["x", "convex.url", "fly.apiToken", "my.key"]));
        let out = effective_secrets_ref("a", &[], Some(&bridge(false)));
        assert_eq!(out, refs(&["convex.url", "fly.apiToken"]));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(validate_agent_key("  ").expect_err("must fail").message.contains("agentKey"));
        assert!(validate_agent_key("a\nb").is_err());
        assert!(validate_agent_key(&"k".repeat(129)).is_err());
        assert!(validate_agent_key(&"k".repeat(128)).is_ok());
        assert!(validate_agent_key("telegram:123 ünï").is_ok());
        assert!(validate_version("").expect_err("must fail").message.contains("version"));
        assert!(validate_version(&"v".repeat(65)).is_err());
        let err = validate_secret_refs(&refs(&["ok", "has space"])).expect_err("must fail");
        assert!(err.message.contains("secretsRef[1]"), "{}", err.message);
        assert!(validate_secret_refs(&refs(&[""])).is_err());
        assert!(validate_secret_refs(&vec!["r".to_string(); 65]).is_err());
        assert!(validate_secret_ref("f", &"r".repeat(257)).is_err());
        let mut b = bridge(true);
        b.service_key_secret_ref = Some(String::new());
        let err = validate_bridge_config(&b).expect_err("must fail");
        assert!(err.message.contains("bridgeConfig.serviceKeySecretRef"));
    }
}
