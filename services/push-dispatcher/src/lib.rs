//! The push-dispatcher service: message templates ([`templates`]), push templates and jobs on
//! time-zone schedules ([`jobs`], [`schedule`]), their dispatch on time by a leader-elected loop
//! ([`dispatch`]), and broadcasts with crash recovery ([`broadcast`]).

pub mod broadcast;
pub mod dispatch;
pub mod jobs;
pub mod schedule;
pub mod target;
pub mod templates;

use common::ops::OpRegistry;
use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "push-dispatcher";

/// The leader lease of the dispatch loop and broadcast recovery.
pub const LEASE: &str = "push-dispatch";

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::telemetry::register_series(SERVICE);
    let mut ops = OpRegistry::new();
    templates::register(&ctx, &mut ops);
    jobs::register(&ctx, &mut ops);
    dispatch::register(&ctx, &mut ops);
    broadcast::register(&ctx, &mut ops);
    let serve = ops.serve(ctx.clone(), shutdown.clone());
    let health = common::service::serve_health(ctx.clone(), SERVICE, shutdown.clone());
    let dispatcher = async {
        if !ctx.settings.loops.enabled(ctx.settings.loops.push_dispatch) {
            tracing::info!("push dispatch paused by configuration (loops.push_dispatch / loops.manual)");
            return Ok(());
        }
        let holder = format!("{SERVICE}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        common::leader::run_elected(ctx.buckets.leaders.clone(), LEASE, &holder, shutdown.clone(), |lead| {
            let ctx = ctx.clone();
            async move {
                tokio::join!(dispatch::run_loop(ctx.clone(), lead.clone()), broadcast::recover_loop(ctx, lead.clone()));
            }
        })
        .await;
        Ok(())
    };
    tokio::try_join!(serve, health, dispatcher)?;
    Ok(())
}
