//! The hydration service: agent profiles, encrypted secrets and runtime configuration (and, with
//! later issues, hydration bundles, history, snapshots, skills and attachments).

use common::ops::OpRegistry;
use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "hydration";

/// Registers this service's operations.
pub fn register(_ctx: &ServiceContext, _ops: &mut OpRegistry) {}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut ops = OpRegistry::new();
    register(&ctx, &mut ops);
    let health = common::service::serve_health(ctx.clone(), SERVICE, shutdown.clone());
    let serve = ops.serve(ctx, shutdown);
    tokio::try_join!(health, serve)?;
    Ok(())
}
