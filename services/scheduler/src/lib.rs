//! The scheduler service: the worker pool. One replica at a time leads (leader lease
//! `scheduler`); the leader serves `reconcileWorkerPool` and `checkIdleShutdowns` and runs the
//! reconcile loop, all through one lock, so reconciles never overlap (fix L3).
//!
//! The loop reconciles after enqueues (it listens to the inbox subjects; a burst within
//! `scheduler.debounce_ms` is served by one reconcile) and every `reconcileIntervalMs` of the
//! business clock. Policy, provider configuration and credentials come from stored runtime
//! configuration, so every reconcile — triggered, periodic or called — uses the same ones (L4);
//! values passed explicitly to an operation apply to that call only and are never stored (L6).

pub mod pool;
pub mod provider;

use std::sync::Arc;

use common::OpError;
use common::auth::Caller;
use common::clock::Millis;
use common::model::{ProviderConfig, ScalingPolicy};
use common::ops::OpRegistry;
use common::service::ServiceContext;
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::pool::{CycleInput, CycleResult};
use crate::provider::Provider;

pub const SERVICE: &str = "scheduler";

/// One conversation that needs a worker (queue-manager's `getActiveConversationsForScheduler`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Demand {
    pub conversation_id: String,
    pub agent_key: String,
}

/// A provider configuration with every field the scheduler needs (spec §3.3 validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidProviderConfig {
    pub kind: String,
    pub app_name: String,
    pub image: String,
    pub region: String,
    pub volume_name: String,
    pub volume_path: String,
    pub volume_size_gb: u32,
}

pub struct ResolvedProvider {
    pub config: ValidProviderConfig,
    pub provider: Box<dyn Provider>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReconcileArgs {
    workspace_id: Option<String>,
    scaling_policy: Option<ScalingPolicy>,
    provider_config: Option<ProviderConfig>,
    fly_api_token: Option<String>,
    /// Accepted for the original's signature; workers reach the API at `http.public_url`.
    convex_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IdleArgs {
    provider_config: Option<ProviderConfig>,
    fly_api_token: Option<String>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileResult {
    pub active_workers: usize,
    pub spawned: usize,
    pub terminated: usize,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdleResult {
    pub checked: usize,
    pub stopped: usize,
    pub pending: usize,
    pub next_check_scheduled: bool,
}

/// The leader's state: the context and the lock that makes reconciles single-flight.
#[derive(Clone)]
pub struct Scheduler {
    pub(crate) ctx: ServiceContext,
    run_lock: Arc<Mutex<()>>,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    ops.register_with(&scheduler, "reconcileWorkerPool", |s, _: Caller, args: ReconcileArgs| async move {
        s.reconcile(args).await
    });
    ops.register_with(&scheduler, "checkIdleShutdowns", |s, _: Caller, args: IdleArgs| async move {
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
        let _ = args.convex_url;
        let _guard = self.run_lock.lock().await;
        let Some(resolved) = resolve_provider(&self.ctx, args.provider_config, args.fly_api_token).await? else {
            return Ok(ReconcileResult::default());
        };
        let scaling = self.scaling(args.scaling_policy).await?;
        let demand: Vec<Demand> = self.ctx.call_service("getActiveConversationsForScheduler", &json!({})).await?;
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
            drain_deadline_ms: s.scheduler.drain_deadline_ms,
        })
    }
}

/// The provider to use (spec §3.15.1): the explicit config (validated, used for this call
/// only), else the stored one (a stored one missing fields means "not configured": nothing
/// to do), else the configured default. `None` = nothing to do.
pub async fn resolve_provider(
    ctx: &ServiceContext,
    explicit: Option<ProviderConfig>,
    fly_api_token: Option<String>,
) -> Result<Option<ResolvedProvider>, OpError> {
    let config = match explicit {
        Some(config) => validate_provider_config(&config)?,
        None => match common::runtime_config::provider_config(ctx).await? {
            Some(stored) => match validate_provider_config(&stored) {
                Ok(config) => config,
                Err(e) => {
                    tracing::warn!(error = %e, "stored provider config is incomplete; nothing to reconcile");
                    return Ok(None);
                }
            },
            None if ctx.settings.scheduler.default_provider == "local" => local_default(),
            None => return Ok(None),
        },
    };
    let settings = &ctx.settings;
    let provider: Box<dyn Provider> = match config.kind.as_str() {
        "fly" => {
            let token = match fly_api_token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
                Some(token) => token,
                None => active_secret(ctx, "fly.apiToken").await?.ok_or_else(|| {
                    OpError::invalid(
                        "Missing Fly API token. Import an active 'fly.apiToken' secret or pass flyApiToken explicitly.",
                    )
                })?,
            };
            Box::new(provider::fly::FlyProvider::new(&settings.providers.fly_base_url, &token, &settings.providers))
        }
        "local" => Box::new(local_provider(settings)),
        other => return Err(OpError::invalid(format!("Unsupported provider '{other}'"))),
    };
    Ok(Some(ResolvedProvider { config, provider }))
}

pub async fn active_secret(ctx: &ServiceContext, secret_ref: &str) -> Result<Option<String>, OpError> {
    let cipher = common::secrets::cipher_from_settings(&ctx.settings).map_err(OpError::internal)?;
    let value = common::secrets::active_secret(ctx, &cipher, secret_ref).await?;
    Ok(value.map(|v| v.expose_secret().trim().to_string()))
}

/// A cycle's failures fail the call after the whole cycle ran (fix L7), with the provider's
/// messages, as the original's callers expect.
fn report(result: &CycleResult) -> Result<(), OpError> {
    if result.errors.is_empty() { Ok(()) } else { Err(OpError::unavailable(result.errors.join("; "))) }
}

/// The app name of the local provider's default configuration.
pub const LOCAL_APP: &str = "local";

/// The provider config of the one-machine stack: workers as child processes.
fn local_default() -> ValidProviderConfig {
    ValidProviderConfig {
        kind: "local".to_string(),
        app_name: LOCAL_APP.to_string(),
        image: "af-worker".to_string(),
        region: "local".to_string(),
        volume_name: "openclaw_data".to_string(),
        volume_path: "/data".to_string(),
        volume_size_gb: 1,
    }
}

/// The local provider as configured: volumes under `providers.local_dir` (default
/// `<data_dir>/workers`), running `providers.worker_binary`.
pub fn local_provider(settings: &common::config::Settings) -> provider::local::LocalProvider {
    let root = match settings.providers.local_dir.trim() {
        "" => settings.data_dir.join("workers"),
        dir => dir.into(),
    };
    provider::local::LocalProvider::new(root, worker_binary(&settings.providers.worker_binary))
}

/// `providers.worker_binary`, or `af-worker` next to the running executable.
fn worker_binary(configured: &str) -> std::path::PathBuf {
    if !configured.trim().is_empty() {
        return configured.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("af-worker")))
        .unwrap_or_else(|| "af-worker".into())
}

/// Spec §3.3 `ensureProviderConfig`, with its messages.
pub fn validate_provider_config(config: &ProviderConfig) -> Result<ValidProviderConfig, OpError> {
    let missing = |field: &str| {
        OpError::invalid(format!(
            "Missing providerConfig.{field}. Pass providerConfig explicitly when starting/reconciling workers."
        ))
    };
    let text = |value: &Option<String>, field: &str| {
        value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_string).ok_or_else(|| missing(field))
    };
    let kind = config.kind.clone().unwrap_or_else(|| "fly".to_string());
    let app_name = text(&config.app_name, "appName")?;
    // The organization slug is required by the original although unused (spec §6.3 L15).
    text(&config.organization_slug, "organizationSlug")?;
    let image = text(&config.image, "image")?;
    let region = text(&config.region, "region")?;
    let volume_name = text(&config.volume_name, "volumeName")?;
    let volume_path = text(&config.volume_path, "volumePath")?;
    let size = config.volume_size_gb.filter(|s| s.is_finite() && *s > 0.0).ok_or_else(|| missing("volumeSizeGb"))?;
    Ok(ValidProviderConfig {
        kind,
        app_name,
        image,
        region,
        volume_name,
        volume_path,
        volume_size_gb: size.ceil() as u32,
    })
}
