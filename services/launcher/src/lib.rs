//! Runs every service of the stack in one process: the local default and the test harness.

use common::service::ServiceContext;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The services this process runs, each with a context of its own: its own NATS connection, as
/// its own restricted user when the server has one per service ([`common::nats_access`]).
pub struct ServiceContexts {
    by_service: Vec<(&'static str, ServiceContext)>,
}

/// The services, in start order.
pub const SERVICES: [&str; 6] = [
    ingress::SERVICE,
    queue_manager::SERVICE,
    hydration::SERVICE,
    scheduler::SERVICE,
    push_dispatcher::SERVICE,
    cleanup::SERVICE,
];

impl ServiceContexts {
    /// Connects each service to `url_for(service)`, sharing `base`'s settings and clock.
    pub async fn connect(base: &ServiceContext, url_for: impl Fn(&str) -> String) -> anyhow::Result<Self> {
        let mut by_service = Vec::with_capacity(SERVICES.len());
        for service in SERVICES {
            by_service.push((service, base.with_connection(&url_for(service), service).await?));
        }
        Ok(Self { by_service })
    }

    /// Every service on `ctx` itself: one connection, one user (a server without per-service
    /// users, such as an external one the operator configured).
    pub fn shared(ctx: &ServiceContext) -> Self {
        Self { by_service: SERVICES.iter().map(|s| (*s, ctx.clone())).collect() }
    }

    pub fn get(&self, service: &str) -> ServiceContext {
        let (_, ctx) = self.by_service.iter().find(|(s, _)| *s == service).expect("a service of this stack");
        ctx.clone()
    }
}

/// Spawns every service, each on its own context; ingress serves HTTP on `listener`. Each task
/// ends when `shutdown` is cancelled; an error in one is returned by the set.
pub fn spawn_services(
    contexts: &ServiceContexts,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
) -> JoinSet<(&'static str, anyhow::Result<()>)> {
    let mut set = JoinSet::new();
    let (c, s) = (contexts.get(ingress::SERVICE), shutdown.clone());
    set.spawn(async move { (ingress::SERVICE, ingress::run(c, listener, s).await) });
    let (c, s) = (contexts.get(queue_manager::SERVICE), shutdown.clone());
    set.spawn(async move { (queue_manager::SERVICE, queue_manager::run(c, s).await) });
    let (c, s) = (contexts.get(hydration::SERVICE), shutdown.clone());
    set.spawn(async move { (hydration::SERVICE, hydration::run(c, s).await) });
    let (c, s) = (contexts.get(scheduler::SERVICE), shutdown.clone());
    set.spawn(async move { (scheduler::SERVICE, scheduler::run(c, s).await) });
    let (c, s) = (contexts.get(push_dispatcher::SERVICE), shutdown.clone());
    set.spawn(async move { (push_dispatcher::SERVICE, push_dispatcher::run(c, s).await) });
    let (c, s) = (contexts.get(cleanup::SERVICE), shutdown.clone());
    set.spawn(async move { (cleanup::SERVICE, cleanup::run(c, s).await) });
    set
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_service_has_a_nats_grant() {
        assert_eq!(super::SERVICES.as_slice(), common::nats_access::SERVICES);
    }
}
