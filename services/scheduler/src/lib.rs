//! The scheduler service: the worker pool. One replica at a time leads (leader lease
//! `scheduler`); the leader serves `reconcileWorkerPool` and `checkIdleShutdowns` and runs the
//! reconcile loop, all through one lock, so reconciles never overlap (fix L3).
//!
//! The loop reconciles after enqueues (it listens to the inbox subjects; a burst within
//! `scheduler.debounce_ms` is served by one reconcile) and every `reconcileIntervalMs` of the
//! business clock. Policy, provider configuration and credentials come from stored runtime
//! configuration, so every reconcile — triggered, periodic or called — uses the same ones (L4);
//! values passed explicitly to an operation apply to that call only and are never stored (L6).
//! The providers, and the choice of one from that configuration, are the `providers` library
//! crate's.

pub mod pool;

use std::sync::Arc;

use common::OpError;
use common::api;
use common::api::pool::{IdleArgs, IdleResult, ReconcileArgs, ReconcileResult};
use common::auth::Caller;
use common::clock::Millis;
use common::model::ScalingPolicy;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use futures::StreamExt;
use providers::resolve_provider;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::pool::{CycleInput, CycleResult};

pub const SERVICE: &str = "scheduler";

/// One conversation that needs a worker (queue-manager's `getActiveConversationsForScheduler`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub conversation_id: String,
    pub agent_key: String,
}

/// The leader's state: the context and the lock that makes reconciles single-flight.
#[derive(Clone)]
pub struct Scheduler {
    pub(crate) ctx: ServiceContext,
    run_lock: Arc<Mutex<()>>,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::telemetry::register_series(SERVICE);
    let holder = format!("{SERVICE}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let leader_ctx = ctx.clone();
    let elected =
        common::leader::run_elected(ctx.buckets.leaders.clone(), SERVICE, &holder, shutdown.clone(), |lead| {
            lead_pool(leader_ctx.clone(), lead)
        });
    let health = common::service::serve_health(ctx, SERVICE, shutdown);
    let ((), health) = tokio::join!(elected, health);
    health
}

async fn lead_pool(ctx: ServiceContext, lead: CancellationToken) {
    let scheduler = Scheduler { ctx: ctx.clone(), run_lock: Arc::new(Mutex::new(())) };
    let mut ops = OpRegistry::new();
    ops.handle::<api::ReconcileWorkerPool, _, _, _, _>(&scheduler, |s, _: Caller, args| async move {
        s.reconcile(args).await
    });
    ops.handle::<api::CheckIdleShutdowns, _, _, _, _>(&scheduler, |s, _: Caller, args| async move {
        s.check_idle(args).await
    });
    let serve = ops.serve(ctx.clone(), lead.clone());
    let auto = ctx.settings.loops.enabled(ctx.settings.loops.reconcile);
    let reconcile_loop = async {
        if auto {
            scheduler.reconcile_loop(lead.clone()).await;
        }
    };
    let (served, ()) = tokio::join!(serve, reconcile_loop);
    if let Err(e) = served {
        tracing::error!(error = %e, "serving scheduler operations failed");
    }
}

impl Scheduler {
    async fn reconcile_loop(&self, lead: CancellationToken) {
        let trigger = Arc::new(Notify::new());
        let listener = {
            let (trigger, nats, lead) = (trigger.clone(), self.ctx.nats.clone(), lead.clone());
            tokio::spawn(async move {
                let Ok(mut demand) = nats.subscribe(common::topology::DEMAND_SUBJECT).await else {
                    tracing::error!("cannot listen to demand signals; reconciling on the timer only");
                    return;
                };
                loop {
                    tokio::select! {
                        _ = lead.cancelled() => return,
                        next = demand.next() => match next {
                            Some(_) => trigger.notify_one(),
                            None => return,
                        },
                    }
                }
            })
        };
        let debounce = std::time::Duration::from_millis(self.ctx.settings.scheduler.debounce_ms);
        // The first periodic pass waits one interval: at start-up the queue may not lead yet,
        // and unserved demand triggers a reconcile anyway.
        let mut next_tick: Millis = self.ctx.clock.now_ms() + self.ctx.settings.scheduler.reconcile_interval_ms;
        loop {
            tokio::select! {
                _ = lead.cancelled() => break,
                _ = trigger.notified() => {
                    // Let the burst end: go once `debounce` passes without another signal, or
                    // after ten windows, so a steady stream is still served. Real time:
                    // batching enqueues is about load, not about business time.
                    let until = tokio::time::Instant::now() + debounce * 10;
                    while tokio::time::timeout(debounce, trigger.notified()).await.is_ok()
                        && tokio::time::Instant::now() < until
                    {}
                }
                _ = self.ctx.clock.sleep_until(next_tick) => {}
            }
            let outcome = self.reconcile(ReconcileArgs::default()).await;
            let interval = match self.scaling(None).await {
                Ok(policy) => policy.reconcile_interval_ms,
                Err(_) => self.ctx.settings.scheduler.reconcile_interval_ms,
            };
            next_tick = self.ctx.clock.now_ms() + interval;
            match outcome {
                // More demand than one step could serve: go again at once.
                Ok(r) if r.spawned > 0 => trigger.notify_one(),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reconcile failed; retrying at the next tick"),
            }
        }
        listener.abort();
    }

    async fn reconcile(&self, args: ReconcileArgs) -> Result<ReconcileResult, OpError> {
        let _guard = self.run_lock.lock().await;
        let Some(resolved) = resolve_provider(&self.ctx, args.provider_config, args.fly_api_token).await? else {
            return Ok(ReconcileResult::default());
        };
        let scaling = self.scaling(args.scaling_policy).await?;
        let demand: Vec<Demand> = self
            .ctx
            .call_service::<api::GetActiveConversationsForScheduler>(&Default::default())
            .await?
            .into_iter()
            .map(|row| Demand { conversation_id: row.conversation_id, agent_key: row.agent_key })
            .collect();
        metrics::counter!(common::telemetry::RECONCILES).increment(1);
        metrics::gauge!(common::telemetry::POOL_DEMAND).set(demand.len() as f64);
        let workspace_id = args.workspace_id.unwrap_or_else(|| "default".to_string());
        let input = CycleInput {
            now: self.ctx.clock.now_ms(),
            scaling: &scaling,
            provider: &resolved,
            allow_spawn: true,
            demand: &demand,
            workspace_id: &workspace_id,
        };
        let result = self.cycle(input).await?;
        report(&result)?;
        Ok(ReconcileResult {
            active_workers: result.active_workers,
            spawned: result.spawned,
            terminated: result.deactivated,
        })
    }

    async fn check_idle(&self, args: IdleArgs) -> Result<IdleResult, OpError> {
        let _guard = self.run_lock.lock().await;
        let Some(resolved) = resolve_provider(&self.ctx, args.provider_config, args.fly_api_token).await? else {
            return Ok(IdleResult::default());
        };
        let scaling = self.scaling(None).await?;
        let input = CycleInput {
            now: self.ctx.clock.now_ms(),
            scaling: &scaling,
            provider: &resolved,
            allow_spawn: false,
            demand: &[],
            workspace_id: "default",
        };
        let result = self.cycle(input).await?;
        report(&result)?;
        Ok(IdleResult {
            checked: result.checked,
            stopped: result.deactivated,
            pending: result.pending,
            next_check_scheduled: result.pending > 0,
        })
    }

    /// The explicit policy, else the stored one, else the configured defaults.
    async fn scaling(&self, explicit: Option<ScalingPolicy>) -> Result<ScalingPolicy, OpError> {
        if let Some(policy) = explicit {
            return Ok(policy);
        }
        if let Some(policy) = common::runtime_config::scaling_policy(&self.ctx).await? {
            return Ok(policy);
        }
        let s = &self.ctx.settings;
        Ok(ScalingPolicy {
            max_workers: s.scheduler.max_workers,
            spawn_step: s.scheduler.spawn_step,
            idle_timeout_ms: s.queue.idle_timeout_ms,
            reconcile_interval_ms: s.scheduler.reconcile_interval_ms,
            drain_deadline_ms: Some(s.scheduler.drain_deadline_ms),
            queue_per_worker_target: None,
        })
    }
}

/// A cycle's failures fail the call after the whole cycle ran (fix L7), with the provider's
/// messages, as the original's callers expect.
fn report(result: &CycleResult) -> Result<(), OpError> {
    if result.errors.is_empty() { Ok(()) } else { Err(OpError::unavailable(result.errors.join("; "))) }
}
