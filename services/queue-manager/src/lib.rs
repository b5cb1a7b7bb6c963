//! The conversation queue.

use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "queue-manager";

pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::service::serve_health(ctx, SERVICE, shutdown).await
}
