//! One lifecycle cycle of the worker pool (spec §3.15.3), with the required fixes: `maxWorkers`
//! caps live machines (L5), one failed spawn does not stop the others (L7), a provider 5xx never
//! counts as "gone" and nothing is deleted while a machine may live (L8), teardown waits for the
//! stopped state before destroying (L9), and a drain that does not deliver its snapshot in time
//! is ended anyway (L10).
//!
//! Worker rows belong to queue-manager: the cycle reads them with `listWorkersForScheduler` and
//! changes them only through `upsertWorkerState`, whose lifecycle rules it relies on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::OpError;
use common::api;
use common::api::queue::{AssignmentArgs, UpsertWorkerArgs};
use common::clock::Millis;
use common::ids::WorkerId;
use common::ids::{AgentKey, ConversationId};
use common::model::{ScalingPolicy, WorkerRow, WorkerStatus};
use providers::{Machine, MachineStatus, Provider, ProviderError, ResolvedProvider, SpawnSpec};

use crate::{Demand, Scheduler};

/// A fresh worker missing at the provider is given this long before it counts as gone
/// (spec §2.3).
pub const PROVIDER_GRACE_MS: Millis = 90_000;

/// What a cycle may do and what it serves.
pub struct CycleInput<'a> {
    pub now: Millis,
    pub scaling: &'a ScalingPolicy,
    pub provider: &'a ResolvedProvider,
    pub allow_spawn: bool,
    pub demand: &'a [Demand],
    pub workspace_id: &'a str,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CycleResult {
    pub active_workers: usize,
    pub spawned: usize,
    pub deactivated: usize,
    pub pending: usize,
    pub checked: usize,
    /// Spawn and teardown failures of this cycle; the cycle went on past each.
    pub errors: Vec<String>,
}

fn key(agent_key: &str, conversation_id: &str) -> String {
    format!("{agent_key}::{conversation_id}")
}

impl Scheduler {
    pub(crate) async fn cycle(&self, input: CycleInput<'_>) -> Result<CycleResult, OpError> {
        let CycleInput { now, scaling, provider: resolved, allow_spawn, demand, workspace_id } = input;
        let app = resolved.config.app_name.as_str();
        let provider = resolved.provider.as_ref();
        let stale_cutoff = now - self.ctx.settings.queue.stale_after_ms;
        let mut result = CycleResult::default();
        let scoped = |r: &WorkerRow| r.machine_ref.as_ref().is_none_or(|m| m.app_name == app);

        // A–B: provider-observed state.
        let mut rows = self.workers().await?;
        let mut machines = list_machines(provider, app).await?;
        let mut changed = false;
        for row in
            rows.iter().filter(|r| scoped(r) && matches!(r.status, WorkerStatus::Active | WorkerStatus::Draining))
        {
            let machine_id = row.machine_ref.as_ref().map(|m| m.machine_id.as_str());
            let machine = machine_id.and_then(|id| machines.get(id));
            if let Some(id) = machine_id
                && machine.is_none_or(|m| m.status != MachineStatus::Active)
            {
                let fresh = now - row.heartbeat_at <= PROVIDER_GRACE_MS;
                if fresh && machine.is_none() {
                    continue; // Grace: a machine just created may not be listed yet.
                }
                let next =
                    if row.status == WorkerStatus::Active { WorkerStatus::Draining } else { WorkerStatus::Stopping };
                tracing::info!(worker = %row.worker_id, machine = id, ?next, "machine is not running at the provider");
                self.set_status(row, next, now, |_| {}).await?;
                result.deactivated += usize::from(row.status == WorkerStatus::Active);
                changed = true;
            } else if row.status == WorkerStatus::Active && row.heartbeat_at <= stale_cutoff {
                tracing::info!(worker = %row.worker_id, "stale heartbeat: draining");
                self.set_status(row, WorkerStatus::Draining, now, |_| {}).await?;
                result.deactivated += 1;
                changed = true;
            }
        }
        if changed {
            rows = self.workers().await?;
        }

        // D: idle deadline backfill.
        let idle_ms = scaling.idle_timeout_ms;
        for row in rows.iter().filter(|r| {
            scoped(r) && r.status == WorkerStatus::Active && r.load == 0 && r.scheduled_shutdown_at.is_none()
        }) {
            let deadline = row.last_claim_at.unwrap_or(row.heartbeat_at) + idle_ms;
            self.set_status(row, WorkerStatus::Active, now, |a| a.scheduled_shutdown_at = Some(deadline)).await?;
            changed = true;
        }
        if changed {
            rows = self.workers().await?;
        }

        // E: spawn.
        if allow_spawn && !demand.is_empty() {
            let spawned =
                self.spawn_for_demand(&rows, resolved, scaling, demand, workspace_id, now, &mut result).await?;
            if spawned > 0 {
                rows = self.workers().await?;
                machines = list_machines(provider, app).await?;
            }
        }

        // F: idle drain. A snapshot taken before the drain does not count: the worker may
        // have worked since, so a fresh one is awaited (spec §3.15.3 F).
        let mut idle_drained = 0;
        for row in rows
            .iter()
            .filter(|r| scoped(r) && r.status == WorkerStatus::Active && r.load == 0)
            .filter(|r| idle_deadline(r, idle_ms).is_some_and(|t| t <= now))
        {
            let clear = row.last_claim_at.is_some();
            self.set_status(row, WorkerStatus::Draining, now, |a| a.clear_last_snapshot_id = clear).await?;
            result.deactivated += 1;
            idle_drained += 1;
        }
        if idle_drained > 0 {
            rows = self.workers().await?;
        }

        // G–H: the snapshot gate, with a deadline.
        let mut awaiting = 0;
        let mut gated = false;
        for row in rows.iter().filter(|r| scoped(r) && r.status == WorkerStatus::Draining) {
            let has_snapshot = row.last_claim_at.is_none() || row.last_snapshot_id.is_some();
            let draining_since = row.scheduled_shutdown_at.unwrap_or(row.heartbeat_at).min(now);
            let drain_deadline_ms = scaling.drain_deadline_ms.unwrap_or(self.ctx.settings.scheduler.drain_deadline_ms);
            let overdue = now - draining_since >= drain_deadline_ms;
            if has_snapshot || overdue {
                if !has_snapshot {
                    tracing::warn!(
                        worker = %row.worker_id,
                        draining_ms = now - draining_since,
                        "drain deadline passed without a final snapshot: tearing the worker down anyway"
                    );
                    metrics::counter!(common::telemetry::FORCED_TEARDOWNS).increment(1);
                }
                self.set_status(row, WorkerStatus::Stopping, now, |_| {}).await?;
                gated = true;
            } else {
                awaiting += 1;
            }
        }
        if gated {
            rows = self.workers().await?;
        }
        result.pending += awaiting;

        // I: teardown.
        let mut stopping = 0;
        for row in rows.iter().filter(|r| scoped(r) && r.status == WorkerStatus::Stopping) {
            let torn_down = self.tear_down(resolved, row, &machines).await;
            let kind = resolved.provider.kind();
            let outcome = if torn_down.is_ok() { "ok" } else { "error" };
            metrics::counter!(common::telemetry::WORKER_TEARDOWNS, "provider" => kind, "result" => outcome)
                .increment(1);
            if torn_down.is_err() {
                metrics::counter!(common::telemetry::PROVIDER_ERRORS, "provider" => kind, "call" => "teardown")
                    .increment(1);
            }
            match torn_down {
                Ok(()) => {
                    let clear = |a: &mut UpsertWorkerArgs| (a.clear_machine_ref, a.clear_volume_id) = (true, true);
                    self.set_status(row, WorkerStatus::Stopped, now, clear).await?;
                }
                Err(e) => {
                    // The machine may still run: the row stays `stopping`, the volume stays,
                    // and the next cycle tries again.
                    tracing::warn!(worker = %row.worker_id, error = %e, "teardown deferred");
                    result.pending += 1;
                    stopping += 1;
                    if !matches!(e, ProviderError::Precondition(_) | ProviderError::Unavailable(_)) {
                        result.errors.push(format!("teardown of {}: {e}", row.worker_id));
                    }
                }
            }
        }

        // `rows` is current but for teardown, which only moves rows out of `stopping`.
        result.active_workers = rows
            .iter()
            .filter(|r| scoped(r) && r.status == WorkerStatus::Active && r.heartbeat_at > stale_cutoff)
            .count();
        result.checked = idle_drained + awaiting + stopping;
        Ok(result)
    }

    /// Spawns workers for uncovered demand, within `spawnStep` and the live-machine cap.
    #[allow(clippy::too_many_arguments)]
    async fn spawn_for_demand(
        &self,
        rows: &[WorkerRow],
        resolved: &ResolvedProvider,
        scaling: &ScalingPolicy,
        demand: &[Demand],
        workspace_id: &str,
        now: Millis,
        result: &mut CycleResult,
    ) -> Result<usize, OpError> {
        let app = resolved.config.app_name.as_str();
        let stale_cutoff = now - self.ctx.settings.queue.stale_after_ms;
        let scoped: Vec<&WorkerRow> =
            rows.iter().filter(|r| r.machine_ref.as_ref().is_none_or(|m| m.app_name == app)).collect();
        let fresh: Vec<&&WorkerRow> =
            scoped.iter().filter(|r| r.status == WorkerStatus::Active && r.heartbeat_at > stale_cutoff).collect();
        let demand_keys: BTreeSet<String> = demand.iter().map(|d| key(&d.agent_key, &d.conversation_id)).collect();
        let unassigned = fresh.iter().filter(|r| r.assignment.is_none()).count();
        // Several workers pinned to one conversation count once; pins to idle ones not at all.
        let covered: BTreeSet<String> = fresh
            .iter()
            .filter_map(|r| r.assignment.as_ref())
            .map(|a| key(&a.agent_key, &a.conversation_id))
            .filter(|k| demand_keys.contains(k))
            .collect();
        let desired = demand.len().min(scaling.max_workers as usize);
        let available = unassigned + covered.len();
        // Every row not yet stopped may hold a machine: that is what the cap counts (L5).
        let live = scoped.iter().filter(|r| r.status != WorkerStatus::Stopped).count();
        let room = (scaling.max_workers as usize).saturating_sub(live);
        let to_spawn = (scaling.spawn_step as usize).min(desired.saturating_sub(available)).min(room);
        if to_spawn == 0 {
            return Ok(0);
        }
        let bridge_env = self.ctx.call_service::<api::GetWorkerSpawnOpenClawEnv>(&Default::default()).await?.vars();
        let targets: Vec<&Demand> = demand
            .iter()
            .filter(|d| !covered.contains(&key(&d.agent_key, &d.conversation_id)))
            .skip(unassigned)
            .take(to_spawn)
            .collect();
        let mut spawned = 0;
        for (index, target) in targets.into_iter().enumerate() {
            let worker_id = format!("afw-{now}-{index}");
            let outcome = self.spawn_one(resolved, scaling, &worker_id, target, &bridge_env, workspace_id, now).await;
            let kind = resolved.provider.kind();
            let label = if outcome.is_ok() { "ok" } else { "error" };
            metrics::counter!(common::telemetry::WORKER_SPAWNS, "provider" => kind, "result" => label).increment(1);
            match outcome {
                Ok(()) => spawned += 1,
                Err(e) => {
                    tracing::error!(worker = %worker_id, error = %e, "spawn failed");
                    result.errors.push(e);
                }
            }
        }
        result.spawned += spawned;
        Ok(spawned)
    }

    /// Pre-registers the row (so no other cycle spawns for this conversation), creates the
    /// volume and the machine, and records the machine; on failure removes the volume and walks
    /// the row to `stopped`.
    #[allow(clippy::too_many_arguments)]
    async fn spawn_one(
        &self,
        resolved: &ResolvedProvider,
        scaling: &ScalingPolicy,
        worker_id: &str,
        target: &Demand,
        bridge_env: &BTreeMap<String, String>,
        workspace_id: &str,
        now: Millis,
    ) -> Result<(), String> {
        let cfg = &resolved.config;
        let provider = resolved.provider.as_ref();
        let worker = WorkerId::parse(worker_id).map_err(|e| e.message)?;
        let assignment = AssignmentArgs {
            conversation_id: ConversationId::trusted(target.conversation_id.clone()),
            agent_key: AgentKey::trusted(target.agent_key.clone()),
            lease_id: format!("spawn:{worker_id}"),
            assigned_at: Some(now),
        };
        let register = |volume_id: &str, region: &str, machine_id: Option<String>| UpsertWorkerArgs {
            scheduled_shutdown_at: Some(now + scaling.idle_timeout_ms),
            assignment: Some(Some(assignment.clone())),
            app_name: Some(cfg.app_name.clone()),
            region: Some(region.to_string()),
            volume_id: Some(volume_id.to_string()),
            machine_id,
            ..UpsertWorkerArgs::new(worker.clone(), provider.kind(), WorkerStatus::Active, 0)
        };
        let volume = providers::ensure_worker_volume(
            provider,
            &cfg.app_name,
            worker_id,
            &cfg.region,
            &cfg.volume_name,
            cfg.volume_size_gb,
        )
        .await
        .map_err(|e| format!("volume for {worker_id}: {e}"))?;
        self.ctx
            .call_service::<api::UpsertWorkerState>(&register(&volume.id, &cfg.region, None))
            .await
            .map_err(|e| format!("pre-registering {worker_id}: {e}"))?;
        let env = self.worker_env(worker_id, target, bridge_env, workspace_id, scaling);
        let spec = SpawnSpec {
            worker_id: worker_id.to_string(),
            image: cfg.image.clone(),
            region: cfg.region.clone(),
            guest: Default::default(),
            volume_id: volume.id.clone(),
            volume_path: cfg.volume_path.clone(),
            env,
        };
        let spawned = provider.spawn(&cfg.app_name, &spec).await;
        if spawned.is_err() {
            metrics::counter!(common::telemetry::PROVIDER_ERRORS, "provider" => provider.kind(), "call" => "spawn")
                .increment(1);
        }
        match spawned {
            Ok(machine) => {
                let region = machine.region.unwrap_or_else(|| cfg.region.clone());
                self.ctx
                    .call_service::<api::UpsertWorkerState>(&register(&volume.id, &region, Some(machine.machine_id)))
                    .await
                    .map_err(|e| format!("recording the machine of {worker_id}: {e}"))?;
                tracing::info!(worker = worker_id, conversation = %target.conversation_id, "worker spawned");
                Ok(())
            }
            Err(spawn_error) => {
                if let Err(e) = provider.delete_volume(&cfg.app_name, &volume.id).await {
                    tracing::warn!(worker = worker_id, error = %e, "could not delete the volume of a failed spawn");
                }
                for status in [WorkerStatus::Draining, WorkerStatus::Stopping, WorkerStatus::Stopped] {
                    let args = UpsertWorkerArgs {
                        clear_machine_ref: true,
                        clear_volume_id: true,
                        ..UpsertWorkerArgs::new(worker.clone(), provider.kind(), status, 0)
                    };
                    if let Err(e) = self.ctx.call_service::<api::UpsertWorkerState>(&args).await {
                        tracing::warn!(worker = worker_id, error = %e, "could not retire the row of a failed spawn");
                    }
                }
                Err(format!("spawning {worker_id}: {spawn_error}"))
            }
        }
    }

    /// Cordon, stop, wait for stopped, destroy, then delete the worker's volumes. A machine the
    /// provider no longer lists needs no stopping; its volumes still go.
    async fn tear_down(
        &self,
        resolved: &ResolvedProvider,
        row: &WorkerRow,
        machines: &HashMap<String, Machine>,
    ) -> Result<(), ProviderError> {
        let cfg = &resolved.config;
        let provider = resolved.provider.as_ref();
        let app = cfg.app_name.as_str();
        let machine = row.machine_ref.as_ref().and_then(|m| machines.get(&m.machine_id));
        let mut volumes: BTreeSet<String> = row.volume_id.iter().cloned().collect();
        if let Some(m) = machine {
            volumes.extend(m.volume_ids.iter().cloned());
            let gone = |r: Result<(), ProviderError>| match r {
                Err(e) if e.is_not_found() => Ok(()),
                other => other,
            };
            gone(provider.cordon(app, &m.machine_id).await)?;
            gone(provider.stop(app, &m.machine_id).await)?;
            let wait = Duration::from_millis(self.ctx.settings.providers.stop_wait_ms);
            gone(provider.wait_for_state(app, &m.machine_id, "stopped", wait).await)?;
            provider.destroy(app, &m.machine_id).await?;
        }
        // The name-based pass finds volumes the row lost track of (spec §3.16).
        let name = providers::dedicated_volume_name(&cfg.volume_name, &row.worker_id);
        for v in provider.list_volumes(app).await? {
            if v.name == name {
                volumes.insert(v.id);
            }
        }
        for id in volumes {
            provider.delete_volume(app, &id).await?;
        }
        Ok(())
    }

    /// Moves a row to `status` through `upsertWorkerState`, keeping its other fields except
    /// what `change` sets.
    async fn set_status(
        &self,
        row: &WorkerRow,
        status: WorkerStatus,
        now: Millis,
        change: impl FnOnce(&mut UpsertWorkerArgs),
    ) -> Result<(), OpError> {
        let mut args = UpsertWorkerArgs {
            scheduled_shutdown_at: Some(row.scheduled_shutdown_at.unwrap_or(now)),
            ..UpsertWorkerArgs::new(WorkerId::trusted(row.worker_id.clone()), row.provider.clone(), status, row.load)
        };
        change(&mut args);
        self.ctx.call_service::<api::UpsertWorkerState>(&args).await.map(|_| ())
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, OpError> {
        let rows = self.ctx.call_service::<api::ListWorkersForScheduler>(&Default::default()).await?;
        Ok(rows.into_iter().map(WorkerRow::from).collect())
    }

    /// The environment of a spawned worker (spec §2.4, later keys win): the runtime defaults,
    /// the forwarded bridge variables, then this worker's own.
    fn worker_env(
        &self,
        worker_id: &str,
        target: &Demand,
        bridge_env: &BTreeMap<String, String>,
        workspace_id: &str,
        scaling: &ScalingPolicy,
    ) -> BTreeMap<String, String> {
        let settings = &self.ctx.settings;
        let mut env: BTreeMap<String, String> =
            DEFAULT_WORKER_RUNTIME_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.extend(bridge_env.clone());
        let token = self.ctx.auth.mint_worker_token(worker_id).unwrap_or_default();
        let own = [
            // Every worker, local ones too, reaches the control plane through ingress only: NATS
            // carries other conversations' messages and the services' credentials.
            ("AF_API_URL", settings.http.public_base_url()),
            ("AF_WORKER_TOKEN", token),
            ("WORKSPACE_ID", workspace_id.to_string()),
            ("WORKER_ID", worker_id.to_string()),
            ("WORKER_IDLE_TIMEOUT_MS", scaling.idle_timeout_ms.to_string()),
            ("OPENCLAW_AGENT_KEY", target.agent_key.clone()),
            ("OPENCLAW_CONVERSATION_ID", target.conversation_id.clone()),
            // Replies go through the Bot API the control plane uses (the fake one in the demo).
            ("TELEGRAM_API_BASE_URL", settings.telegram.api_base_url.clone()),
            // The worker exports its spans where the control plane does (each job continues
            // its message's trace); empty (dropped below) when traces are off.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", settings.telemetry.otlp_endpoint.clone().unwrap_or_default()),
        ];
        env.extend(own.into_iter().map(|(k, v)| (k.to_string(), v)));
        env.retain(|_, v| !v.trim().is_empty());
        env
    }
}

/// `DEFAULT_WORKER_RUNTIME_ENV` of spec §2.4.
pub const DEFAULT_WORKER_RUNTIME_ENV: [(&str, &str); 19] = [
    ("NODE_ENV", "production"),
    ("OPENCLAW_GATEWAY_HOST", "127.0.0.1"),
    ("OPENCLAW_GATEWAY_PORT", "18789"),
    ("OPENCLAW_GATEWAY_URL", "http://127.0.0.1:18789"),
    ("OPENCLAW_STATE_DIR", "/data/.clawdbot"),
    ("OPENCLAW_WORKSPACE_DIR", "/data/workspace"),
    ("OPENCLAW_CONFIG_PATH", "/data/.clawdbot/openclaw.json"),
    ("OPENCLAW_REQUIRE_DATA_MOUNT", "true"),
    ("OPENCLAW_RUN_SETUP", "false"),
    ("OPENCLAW_SETUP_TIMEOUT_MS", "90000"),
    ("OPENCLAW_GATEWAY_COMMAND", "node /app/openclaw.mjs gateway"),
    ("OPENCLAW_GATEWAY_READY_TIMEOUT_MS", "60000"),
    ("OPENCLAW_GATEWAY_READY_POLL_MS", "500"),
    ("OPENCLAW_GATEWAY_READY_REQUIRED", "true"),
    ("SKILLS_BOOTSTRAP_MODE", "db_manifest"),
    ("SKILLS_BOOTSTRAP_REQUIRED", "false"),
    ("SKILLS_BOOTSTRAP_TIMEOUT_MS", "15000"),
    ("SKILLS_RELEASE_CHANNEL", "stable"),
    ("OPENCLAW_SKILLS_DIR", "/data/workspace/skills"),
];

/// When an idle worker is due to drain: its row's deadline (set by queue-manager from
/// `queue.idle_timeout_ms`), or earlier when the stored policy's idle timeout counted from its
/// last claim says so — the policy is the operator's runtime setting and wins.
fn idle_deadline(row: &WorkerRow, idle_timeout_ms: Millis) -> Option<Millis> {
    let deadline = row.scheduled_shutdown_at?;
    Some(row.last_claim_at.map_or(deadline, |claimed| deadline.min(claimed + idle_timeout_ms)))
}

async fn list_machines(provider: &dyn Provider, app: &str) -> Result<HashMap<String, Machine>, OpError> {
    let machines = provider
        .list_machines(app)
        .await
        .inspect_err(|_| {
            metrics::counter!(common::telemetry::PROVIDER_ERRORS, "provider" => provider.kind(), "call" => "list_machines")
                .increment(1);
        })
        .map_err(|e| OpError::unavailable(format!("listing the machines of '{app}': {e}")))?;
    Ok(machines.into_iter().map(|m| (m.machine_id.clone(), m)).collect())
}
