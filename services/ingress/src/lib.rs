//! The HTTP front door. It authenticates nothing itself and stores nothing: every
//! `POST /v1/ops/<name>` is forwarded over NATS with the caller's Authorization header, and the
//! owning service authenticates and answers.

use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "ingress";

/// Serves HTTP on `listener` until `shutdown` is cancelled.
pub async fn run(
    _ctx: ServiceContext,
    _listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shutdown.cancelled().await;
    Ok(())
}
