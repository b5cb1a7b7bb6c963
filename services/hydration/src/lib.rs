//! The hydration service: agent profiles ([`profiles`]), encrypted versioned secrets
//! ([`secrets`]) and the runtime configuration rows ([`runtime_config`]); later issues add
//! hydration bundles, history, snapshots, skills and attachments. This file only wires the
//! modules together: it builds the secrets cipher from configuration (`common::secrets`) and
//! registers every operation the service serves, including `listAuditLog` (`common::audit`).

pub mod attachments;
pub mod bindings;
pub mod blobs;
pub mod bundle;
mod fence;
pub mod history;
pub mod key_rotation;
pub mod metadata;
pub mod pairing;
pub mod profiles;
pub mod runtime_config;
pub mod secrets;
pub mod skills;
pub mod snapshots;
pub mod telegram;
pub mod telegram_updates;
pub mod user_agents;

use std::sync::Arc;

use common::crypto::SecretCipher;
use common::ops::OpRegistry;
use common::secrets::cipher_from_settings;
use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub use secrets::first_active_secret;

pub const SERVICE: &str = "hydration";

/// Registers this service's operations.
pub fn register(ctx: &ServiceContext, cipher: Arc<SecretCipher>, ops: &mut OpRegistry) {
    profiles::register(ctx, ops);
    secrets::register(ctx, cipher.clone(), ops);
    key_rotation::register(ctx, cipher.clone(), ops);
    runtime_config::register(ctx, ops);
    history::register(ctx, ops);
    bundle::register(ctx, cipher.clone(), ops);
    snapshots::register(ctx, ops);
    blobs::register(ctx, ops);
    attachments::register(ctx, ops);
    metadata::register(ctx, ops);
    bindings::register(ctx, ops);
    skills::register(ctx, ops);
    pairing::register(ctx, ops);
    user_agents::register(ctx, ops);
    let telegram =
        telegram::Telegram { ctx: ctx.clone(), cipher: cipher.clone(), api: telegram::bot_api(&ctx.settings) };
    telegram::register(&telegram, ops);
    // The audit log is written by every service's operation transport; hydration serves reading it.
    ops.handle::<common::api::ListAuditLog, _, _, _, _>(ctx, |ctx, _: common::auth::Caller, args| async move {
        common::audit::list(&ctx.js, &args).await
    });
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::telemetry::register_series(SERVICE);
    let cipher = Arc::new(cipher_from_settings(&ctx.settings)?);
    let mut ops = OpRegistry::new();
    let telegram =
        telegram::Telegram { ctx: ctx.clone(), cipher: cipher.clone(), api: telegram::bot_api(&ctx.settings) };
    register(&ctx, cipher.clone(), &mut ops);
    let reencryption = key_rotation::run_loop(ctx.clone(), cipher, shutdown.clone());
    let reencryption = async {
        reencryption.await;
        Ok::<_, anyhow::Error>(())
    };
    let health = common::service::serve_health(ctx.clone(), SERVICE, shutdown.clone());
    // The Telegram update consumer is part of the message path: it runs with the service.
    let updates = telegram_updates::run(telegram, shutdown.clone());
    // The console shows pairing codes used or expired live; the notices carry no code.
    let pairing_notices = common::console_events::publish_changes(ctx.clone(), shutdown.clone(), |ctx| async move {
        Ok(vec![common::console_events::kv_notices("pairing", false, ctx.buckets.pairing.raw().watch_all().await?)])
    });
    let pairing_notices = async {
        pairing_notices.await;
        Ok::<_, anyhow::Error>(())
    };
    let serve = ops.serve(ctx, shutdown);
    tokio::try_join!(health, serve, updates, reencryption, pairing_notices)?;
    Ok(())
}
