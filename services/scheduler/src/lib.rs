//! The scheduler service. In this release it provisions the topology, joins NATS and answers health
//! pings; its loops arrive with later issues.

pub mod provider;

use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "scheduler";

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::service::serve_health(ctx, SERVICE, shutdown).await
}
