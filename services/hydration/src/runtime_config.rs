//! Runtime configuration (spec §3.3): the provider row (`providerRuntimeConfig`,
//! `setProviderRuntimeConfig`) and the message row (`messageRuntimeConfig`,
//! `setMessageRuntimeConfig`) in `af_runtime_config`, each stored as a
//! [`RuntimeConfigRow`] under [`PROVIDER_CONFIG_KEY`] / [`MESSAGE_CONFIG_KEY`]. The queue-manager
//! reads the message row at enqueue (system prompt), so its format is shared through
//! `common::model`; the readers of the rows are in `common::runtime_config`. This module owns the
//! writes and the message-config normalisation rule.

use common::OpError;
use common::api;
use common::auth::Caller;
use common::clock::Millis;
use common::model::{
    MESSAGE_CONFIG_KEY, MessageConfig, PROVIDER_CONFIG_KEY, ProviderConfig, RuntimeConfigRow, SCALING_CONFIG_KEY,
    ScalingPolicy,
};
use common::ops::OpRegistry;
use common::runtime_config::{message_config, provider_config, scaling_policy};
use common::service::ServiceContext;
use common::store::JsonStore;
use serde::de::DeserializeOwned;

pub use common::api::profiles::MessageConfigInput;

/// The largest retention accepted, in ms (JavaScript's `Number.MAX_SAFE_INTEGER`, so every
/// accepted value is an exact integer on both sides of the JSON API).
pub const MAX_RETENTION_MS: f64 = 9_007_199_254_740_991.0;

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::ProviderRuntimeConfig, _, _, _, _>(ctx, |ctx, _: Caller, _| async move {
        provider_config(&ctx).await
    });
    ops.handle::<api::SetProviderRuntimeConfig, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        validate_provider_numbers(&args.provider_config)?;
        let now = ctx.clock.now_ms();
        write(&ctx.buckets.runtime_config, PROVIDER_CONFIG_KEY, args.provider_config, now).await
    });
    ops.handle::<api::ScalingRuntimeConfig, _, _, _, _>(
        ctx,
        |ctx, _: Caller, _| async move { scaling_policy(&ctx).await },
    );
    ops.handle::<api::SetScalingRuntimeConfig, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        validate_scaling(&args.scaling_policy)?;
        let now = ctx.clock.now_ms();
        write(&ctx.buckets.runtime_config, SCALING_CONFIG_KEY, args.scaling_policy, now).await
    });
    ops.handle::<api::MessageRuntimeConfig, _, _, _, _>(
        ctx,
        |ctx, _: Caller, _| async move { message_config(&ctx).await },
    );
    ops.handle::<api::SetMessageRuntimeConfig, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        set_message_config(&ctx, args.message_config).await
    });
}

/// The one number of a provider configuration, when given, must be a usable volume size. The
/// original stored anything (`volumeSizeGb: -1`) and failed only at spawn time.
fn validate_provider_numbers(config: &ProviderConfig) -> Result<(), OpError> {
    match config.volume_size_gb {
        Some(gb) if !(gb.is_finite() && (1.0..=MAX_VOLUME_SIZE_GB).contains(&gb)) => {
            Err(OpError::invalid(format!("providerConfig.volumeSizeGb must be between 1 and {MAX_VOLUME_SIZE_GB}")))
        }
        _ => Ok(()),
    }
}

/// Fly's largest volume.
const MAX_VOLUME_SIZE_GB: f64 = 500.0;

/// Bounds that keep a scaling policy meaningful; the error names the field.
pub fn validate_scaling(p: &ScalingPolicy) -> Result<(), OpError> {
    let fail = |field: &str, why: &str| Err(OpError::invalid(format!("scalingPolicy.{field}: {why}")));
    if p.max_workers > 100_000 {
        return fail("maxWorkers", "at most 100000");
    }
    if p.spawn_step == 0 || p.spawn_step > 1000 {
        return fail("spawnStep", "between 1 and 1000");
    }
    if p.idle_timeout_ms < 1000 {
        return fail("idleTimeoutMs", "at least 1000");
    }
    if p.reconcile_interval_ms < 100 {
        return fail("reconcileIntervalMs", "at least 100");
    }
    // Absent means the configured `scheduler.drain_deadline_ms`, validated with the settings.
    if p.drain_deadline_ms.is_some_and(|ms| ms < 1000) {
        return fail("drainDeadlineMs", "at least 1000");
    }
    Ok(())
}

async fn set_message_config(ctx: &ServiceContext, input: MessageConfigInput) -> Result<(), OpError> {
    let store = &ctx.buckets.runtime_config;
    match normalise_message_config(&input)? {
        Some(config) => {
            write(store, MESSAGE_CONFIG_KEY, config, ctx.clock.now_ms()).await?;
        }
        None => {
            delete(store, MESSAGE_CONFIG_KEY).await?;
            tracing::info!("message runtime config cleared");
        }
    }
    Ok(())
}

/// Spec §3.3: `systemPrompt` is trimmed and dropped when blank; the retention is floored and
/// dropped when not finite or not positive after flooring. `None` means both were dropped, so
/// the row must be deleted. A retention above [`MAX_RETENTION_MS`] is refused.
pub fn normalise_message_config(input: &MessageConfigInput) -> Result<Option<MessageConfig>, OpError> {
    let system_prompt = input.system_prompt.as_deref().map(str::trim).filter(|p| !p.is_empty()).map(str::to_string);
    let retention = match input.telegram_attachment_retention_ms.map(f64::floor) {
        Some(ms) if ms.is_finite() && ms > MAX_RETENTION_MS => {
            return Err(OpError::invalid(format!(
                "messageConfig.telegramAttachmentRetentionMs: must be at most \
                 {MAX_RETENTION_MS} ms"
            )));
        }
        // In range of i64 by the check above, and integral after floor.
        Some(ms) if ms.is_finite() && ms > 0.0 => Some(ms as i64),
        _ => None,
    };
    if system_prompt.is_none() && retention.is_none() {
        return Ok(None);
    }
    Ok(Some(MessageConfig { system_prompt, telegram_attachment_retention_ms: retention }))
}

/// Replaces the row at `key` by compare-and-set (create when absent).
async fn write<T>(store: &JsonStore, key: &str, config: T, now: Millis) -> Result<(), OpError>
where
    T: serde::Serialize + DeserializeOwned + Clone,
{
    store
        .modify::<RuntimeConfigRow<T>, OpError, _>(key, |_| {
            Ok(Some(RuntimeConfigRow { config: config.clone(), updated_at: now }))
        })
        .await?;
    tracing::info!(row = key, "runtime config stored");
    Ok(())
}

/// Deletes the row at `key` at the revision just read, retrying when a concurrent write wins.
async fn delete(store: &JsonStore, key: &str) -> Result<(), OpError> {
    const ATTEMPTS: usize = 64;
    for _ in 0..ATTEMPTS {
        let Some(current) = store.get::<serde_json::Value>(key).await? else {
            return Ok(());
        };
        match store.delete(key, current.revision).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(OpError::conflict(format!("concurrent update of '{key}'; retry the request")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(prompt: Option<&str>, retention: Option<f64>) -> MessageConfigInput {
        MessageConfigInput { system_prompt: prompt.map(str::to_string), telegram_attachment_retention_ms: retention }
    }

    #[test]
    fn prompt_is_trimmed_and_retention_floored() {
        let out = normalise_message_config(&input(Some("  Be brief.\n"), Some(1500.9))).expect("valid").expect("kept");
        assert_eq!(out.system_prompt.as_deref(), Some("Be brief."));
        assert_eq!(out.telegram_attachment_retention_ms, Some(1500));
    }

    #[test]
    fn blank_prompt_and_bad_retention_are_dropped() {
        let out = normalise_message_config(&input(Some("   "), Some(60_000.0))).expect("valid").expect("kept");
        assert_eq!(out.system_prompt, None);
        assert_eq!(out.telegram_attachment_retention_ms, Some(60_000));
        for bad in [0.0, -5.0, 0.5, f64::NAN, f64::INFINITY] {
            let out = normalise_message_config(&input(Some("p"), Some(bad))).expect("valid").expect("kept");
            assert_eq!(out.telegram_attachment_retention_ms, None, "{bad}");
        }
    }

    #[test]
    fn nothing_left_means_delete() {
        assert_eq!(normalise_message_config(&input(Some(" \t "), None)), Ok(None));
        assert_eq!(normalise_message_config(&input(None, Some(-1.0))), Ok(None));
        assert_eq!(normalise_message_config(&input(None, None)), Ok(None));
    }

    #[test]
    fn absurd_retention_is_refused() {
        let err = normalise_message_config(&input(None, Some(1e300))).expect_err("must fail");
        assert!(err.message.contains("telegramAttachmentRetentionMs"));
        assert!(normalise_message_config(&input(None, Some(MAX_RETENTION_MS))).is_ok());
    }

    #[test]
    fn drain_deadline_is_checked_only_when_given() {
        let mut policy = ScalingPolicy {
            max_workers: 2,
            spawn_step: 1,
            idle_timeout_ms: 60_000,
            reconcile_interval_ms: 15_000,
            drain_deadline_ms: None,
            queue_per_worker_target: Some(3.0),
        };
        assert!(validate_scaling(&policy).is_ok(), "absent: the configured default applies");
        policy.drain_deadline_ms = Some(999);
        let err = validate_scaling(&policy).expect_err("too short");
        assert_eq!(err.message, "scalingPolicy.drainDeadlineMs: at least 1000");
        policy.drain_deadline_ms = Some(1000);
        assert!(validate_scaling(&policy).is_ok());
    }

    #[test]
    fn the_originals_now_ms_is_accepted_and_unknown_arguments_refused() {
        use common::api::profiles::{SetMessageConfigArgs, SetProviderConfigArgs};
        let ok = serde_json::json!({"messageConfig": {"systemPrompt": "p"}, "nowMs": 5});
        assert!(serde_json::from_value::<SetMessageConfigArgs>(ok).is_ok());
        let ok = serde_json::json!({"providerConfig": {"appName": "a"}, "nowMs": 5});
        assert!(serde_json::from_value::<SetProviderConfigArgs>(ok).is_ok());
        let bad = serde_json::json!({"messageConfig": {}, "clock": 5});
        assert!(serde_json::from_value::<SetMessageConfigArgs>(bad).is_err());
    }
}
