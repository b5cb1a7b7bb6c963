//! Runs every service of the stack in one process: the local default and the test harness.

use common::service::ServiceContext;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Spawns every service on `ctx`; ingress serves HTTP on `listener`. Each task ends when
/// `shutdown` is cancelled; an error in one is returned by the set.
pub fn spawn_services(
    ctx: &ServiceContext,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
) -> JoinSet<(&'static str, anyhow::Result<()>)> {
    let mut set = JoinSet::new();
    let (c, s) = (ctx.clone(), shutdown.clone());
    set.spawn(async move { (ingress::SERVICE, ingress::run(c, listener, s).await) });
    let (c, s) = (ctx.clone(), shutdown.clone());
    set.spawn(async move { (queue_manager::SERVICE, queue_manager::run(c, s).await) });
    let (c, s) = (ctx.clone(), shutdown.clone());
    set.spawn(async move { (hydration::SERVICE, hydration::run(c, s).await) });
    let (c, s) = (ctx.clone(), shutdown.clone());
    set.spawn(async move { (scheduler::SERVICE, scheduler::run(c, s).await) });
    let (c, s) = (ctx.clone(), shutdown.clone());
    set.spawn(async move { (push_dispatcher::SERVICE, push_dispatcher::run(c, s).await) });
    let (c, s) = (ctx.clone(), shutdown.clone());
    set.spawn(async move { (cleanup::SERVICE, cleanup::run(c, s).await) });
    set
}
