//! The cleanup service: expiries and reapers. Today it runs the retention sweep — snapshots past
//! retention and attachments past theirs are deleted from the object stores, abandoned uploads
//! are failed and their partial archives removed — once per `loops.retention_interval_ms` of the
//! business clock, on one replica at a time (leader lease `cleanup-retention`).
//!
//! It also owns billing protection at the provider ([`provider_cleanup`]): `runFlyCleanup`,
//! `deleteFlyVolume`, and the orphan reaper, which the same loop runs.
//!
//! The sweep itself is hydration's (`expireOldDataSnapshots`, `expireOldTelegramAttachments`):
//! the data and its rules live there, and an operator can run the same steps by hand when
//! `loops.manual` pauses this loop.

pub mod provider_cleanup;

use common::api;
use common::auth::Caller;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "cleanup";

/// Items one sweep step handles at most; the loop comes back for the rest.
const SWEEP_BATCH: usize = 500;

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::telemetry::register_series(SERVICE);
    let mut ops = OpRegistry::new();
    ops.handle::<api::RunFlyCleanup, _, _, _, _>(&ctx, |ctx, _: Caller, args| async move {
        provider_cleanup::run_fly_cleanup(&ctx, args).await
    });
    ops.handle::<api::DeleteFlyVolume, _, _, _, _>(&ctx, |ctx, _: Caller, args| async move {
        provider_cleanup::delete_fly_volume(&ctx, args).await
    });
    ops.handle::<api::ReapOrphans, _, _, _, _>(&ctx, |ctx, _: Caller, args| async move {
        provider_cleanup::reap_orphans(&ctx, args).await
    });
    let serve = ops.serve(ctx.clone(), shutdown.clone());
    let health = common::service::serve_health(ctx.clone(), SERVICE, shutdown.clone());
    let retention = async {
        if !ctx.settings.loops.enabled(ctx.settings.loops.retention) {
            tracing::info!("retention sweep paused by configuration (loops.retention / loops.manual)");
            return Ok(());
        }
        let holder = format!("{SERVICE}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let leaders = ctx.buckets.leaders.clone();
        common::leader::run_elected(leaders, "cleanup-retention", &holder, shutdown.clone(), |lead| {
            retention_loop(ctx.clone(), lead)
        })
        .await;
        Ok(())
    };
    tokio::try_join!(serve, health, retention)?;
    Ok(())
}

async fn retention_loop(ctx: ServiceContext, lead: CancellationToken) {
    let interval = ctx.settings.loops.retention_interval_ms as i64;
    loop {
        sweep_once(&ctx).await;
        let next = ctx.clock.now_ms() + interval;
        tokio::select! {
            _ = lead.cancelled() => return,
            _ = ctx.clock.sleep_until(next) => {}
        }
    }
}

/// One pass of every retention step. Failures are logged and retried on the next pass.
pub async fn sweep_once(ctx: &ServiceContext) {
    let sweep = api::snapshots::SnapshotSweepArgs { limit: Some(SWEEP_BATCH), ..Default::default() };
    match ctx.call_service::<api::ExpireOldDataSnapshots>(&sweep).await {
        Ok(result) => tracing::debug!(?result, "snapshot retention done"),
        Err(e) => tracing::warn!(error = %e, "snapshot retention failed; retrying next pass"),
    }
    let sweep = api::attachments::AttachmentSweepArgs { limit: Some(SWEEP_BATCH), ..Default::default() };
    match ctx.call_service::<api::ExpireOldTelegramAttachments>(&sweep).await {
        Ok(result) => tracing::debug!(?result, "attachment retention done"),
        Err(e) => tracing::warn!(error = %e, "attachment retention failed; retrying next pass"),
    }
    match provider_cleanup::reap_orphans(ctx, Default::default()).await {
        Ok(report) => tracing::debug!(?report, "orphan reaper done"),
        Err(e) => tracing::warn!(error = %e, "orphan reaper failed; retrying next pass"),
    }
}
