//! Billing protection at the provider (spec §3.17, fix L14):
//!
//! - `runFlyCleanup` destroys every machine and volume of the Fly app with bounded concurrency,
//!   verifies by listing again, and reports exactly as the original. With `safe: true` it first
//!   drains the app's live workers and waits (bounded) for their final snapshots.
//! - `deleteFlyVolume` deletes one volume by hand.
//! - `reapOrphans` removes machines and volumes no worker row accounts for, once they have been
//!   seen unaccounted for longer than the grace period (first sightings are kept in
//!   `af_system` under `orphan.<kind>.<app>.<id>`, so the grace survives restarts).

use std::collections::HashSet;
use std::time::Duration;

use common::OpError;
use common::api::{self, queue::UpsertWorkerArgs};
use common::clock::Millis;
use common::ids::WorkerId;
use common::model::{WorkerRow, WorkerStatus};
use common::service::ServiceContext;
use common::token::escape;
use futures::StreamExt;
use providers::fly::FlyProvider;
use providers::{Provider, ProviderError, ResolvedProvider, dedicated_volume_name};

const DEFAULT_MACHINE_CONCURRENCY: usize = 6;
const DEFAULT_VOLUME_CONCURRENCY: usize = 16;
/// How long a safe cleanup waits for drained workers to deliver their snapshots.
const SAFE_DRAIN_WAIT: Duration = Duration::from_secs(120);
/// Orphans are removed after being seen unaccounted for this long (business time).
pub const ORPHAN_GRACE_MS: Millis = 30 * 60 * 1000;

pub use common::api::pool::{CleanupArgs, CleanupReport, DeleteVolumeArgs, DeleteVolumeResult, ReapArgs, ReapReport};

async fn worker_rows(ctx: &ServiceContext) -> Result<Vec<WorkerRow>, OpError> {
    let rows = ctx.call_service::<api::ListWorkersForScheduler>(&Default::default()).await?;
    Ok(rows.into_iter().map(WorkerRow::from).collect())
}

async fn fly_token(ctx: &ServiceContext, given: Option<String>, missing: &str) -> Result<String, OpError> {
    match given.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        Some(t) => Ok(t),
        None => providers::active_secret(ctx, "fly.apiToken")
            .await?
            .filter(|t| !t.is_empty())
            .ok_or_else(|| OpError::invalid(missing.to_string())),
    }
}

fn fly(ctx: &ServiceContext, token: &str) -> FlyProvider {
    let providers = &ctx.settings.providers;
    FlyProvider::new(&providers.fly_base_url, token, providers)
}

fn concurrency(given: Option<f64>, default: usize) -> usize {
    given.filter(|v| v.is_finite() && *v >= 1.0).map(|v| v.floor() as usize).unwrap_or(default)
}

pub async fn run_fly_cleanup(ctx: &ServiceContext, args: CleanupArgs) -> Result<CleanupReport, OpError> {
    let config = match args.provider_config {
        Some(c) => Some(c),
        None => common::runtime_config::provider_config(ctx).await?,
    }
    .unwrap_or_default();
    if config.kind.as_deref().unwrap_or("fly") != "fly" {
        return Err(OpError::invalid("Fly cleanup requires a Fly provider configuration."));
    }
    let app = config.app_name.as_deref().map(str::trim).unwrap_or_default().to_string();
    if app.is_empty() {
        return Err(OpError::invalid("Fly cleanup requires a non-empty Fly app name."));
    }
    let token = fly_token(
        ctx,
        args.fly_api_token,
        "Missing active 'fly.apiToken' secret. Import it before running Fly cleanup.",
    )
    .await?;
    let provider = fly(ctx, &token);
    let (machine_n, volume_n) = (
        concurrency(args.machine_concurrency, DEFAULT_MACHINE_CONCURRENCY),
        concurrency(args.volume_concurrency, DEFAULT_VOLUME_CONCURRENCY),
    );
    provider.check_app(&app).await.map_err(|e| OpError::unavailable(e.to_string()))?;
    let mut report = CleanupReport { app_name: app.clone(), ..Default::default() };
    if args.safe {
        let (drained, complete) = drain_first(ctx, &app).await?;
        report.drained_workers = Some(drained);
        report.drain_complete = Some(complete);
        if !complete {
            report.warnings.push("some drained workers did not deliver a snapshot in time".to_string());
        }
    }

    let machines = provider.list_machines(&app).await.map_err(|e| OpError::unavailable(e.to_string()))?;
    report.machines_found = machines.len();
    let provider_ref = &provider;
    let app_ref = app.as_str();
    let wait = Duration::from_millis(ctx.settings.providers.stop_wait_ms);
    let outcomes: Vec<(String, Vec<String>, Option<String>)> = futures::stream::iter(machines)
        .map(|m| async move {
            let id = m.machine_id;
            let mut warnings = Vec::new();
            // A machine already gone at any step counts as deleted, not as a warning.
            let warn = |r: Result<(), ProviderError>, step: &str| match r {
                Err(e) if !e.is_not_found() => Some(format!("Machine {id}: {step} warning ({e})")),
                _ => None,
            };
            warnings.extend(warn(provider_ref.cordon(app_ref, &id).await, "cordon"));
            let stop = provider_ref.stop(app_ref, &id).await;
            let gone = matches!(&stop, Err(e) if e.is_not_found());
            warnings.extend(warn(stop, "stop"));
            if !gone {
                let _ = provider_ref.wait_for_state(app_ref, &id, "stopped", wait).await;
            }
            let error = match provider_ref.destroy(app_ref, &id).await {
                Ok(()) => None,
                Err(e) if e.is_not_found() => None,
                Err(e) => Some(format!("Machine {id}: destroy failed ({e})")),
            };
            (id, warnings, error)
        })
        .buffer_unordered(machine_n)
        .collect()
        .await;
    for (id, warnings, error) in outcomes {
        report.warnings.extend(warnings);
        match error {
            None => report.machine_ids_deleted.push(id),
            Some(e) => report.errors.push(e),
        }
    }
    let left = provider.list_machines(&app).await.map_err(|e| OpError::unavailable(e.to_string()))?;
    report.machine_ids_remaining = left.into_iter().map(|m| m.machine_id).collect();
    if !report.machine_ids_remaining.is_empty() {
        report.warnings.push(format!(
            "Fly cleanup left {} machine(s) after verification: {}",
            report.machine_ids_remaining.len(),
            report.machine_ids_remaining.join(", ")
        ));
    }

    let volumes = provider.list_volumes(&app).await.map_err(|e| OpError::unavailable(e.to_string()))?;
    report.volumes_found = volumes.len();
    let outcomes: Vec<(String, Option<String>)> = futures::stream::iter(volumes)
        .map(|v| async move {
            match provider_ref.delete_volume(app_ref, &v.id).await {
                Ok(()) => (v.id, None),
                Err(e) if e.is_not_found() => (v.id, None),
                Err(e) => (v.id.clone(), Some(format!("Volume {}: destroy failed ({e})", v.id))),
            }
        })
        .buffer_unordered(volume_n)
        .collect()
        .await;
    for (id, error) in outcomes {
        match error {
            None => report.volume_ids_deleted.push(id),
            Some(e) => report.errors.push(e),
        }
    }
    let left = provider.list_volumes(&app).await.map_err(|e| OpError::unavailable(e.to_string()))?;
    report.volume_ids_remaining = left.into_iter().map(|v| v.id).collect();
    if !report.volume_ids_remaining.is_empty() {
        report.warnings.push(format!(
            "Fly cleanup left {} volume(s) after verification: {}",
            report.volume_ids_remaining.len(),
            report.volume_ids_remaining.join(", ")
        ));
    }
    report.machine_ids_deleted.sort();
    report.volume_ids_deleted.sort();
    report.machines_deleted = report.machine_ids_deleted.len();
    report.machines_remaining = report.machine_ids_remaining.len();
    report.volumes_deleted = report.volume_ids_deleted.len();
    report.volumes_remaining = report.volume_ids_remaining.len();
    Ok(report)
}

/// Safe mode: asks every live worker of `app` to drain (it snapshots, then its row becomes
/// `stopping`), and waits until none is left draining or the wait runs out.
async fn drain_first(ctx: &ServiceContext, app: &str) -> Result<(usize, bool), OpError> {
    // Watch the worker rows before asking anyone to drain, so no change is missed.
    let mut changes = ctx.buckets.workers.raw().watch_all().await.map_err(OpError::internal)?;
    let rows = worker_rows(ctx).await?;
    let ours = |r: &WorkerRow| r.machine_ref.as_ref().is_some_and(|m| m.app_name == app);
    let live: Vec<&WorkerRow> = rows.iter().filter(|r| ours(r) && r.status == WorkerStatus::Active).collect();
    for row in &live {
        let worker_id = WorkerId::trusted(row.worker_id.clone());
        let args = UpsertWorkerArgs::new(worker_id, row.provider.clone(), WorkerStatus::Draining, row.load);
        ctx.call_service::<api::UpsertWorkerState>(&args).await?;
    }
    let deadline = tokio::time::Instant::now() + SAFE_DRAIN_WAIT;
    loop {
        let rows = worker_rows(ctx).await?;
        if !rows.iter().any(|r| ours(r) && r.status == WorkerStatus::Draining) {
            return Ok((live.len(), true));
        }
        // A delivered snapshot moves its worker to stopping, which is a row change: wait for
        // the next one, up to the deadline.
        match tokio::time::timeout_at(deadline, changes.next()).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return Ok((live.len(), false)),
        }
    }
}

pub async fn delete_fly_volume(ctx: &ServiceContext, args: DeleteVolumeArgs) -> Result<DeleteVolumeResult, OpError> {
    let (app, volume) = (args.app_name.trim(), args.volume_id.trim());
    if app.is_empty() || volume.is_empty() {
        return Err(OpError::invalid("appName e volumeId sono obbligatori."));
    }
    let token = fly_token(ctx, args.fly_api_token, "flyApiToken mancante: passalo come argomento.").await?;
    match fly(ctx, &token).delete_volume(app, volume).await {
        Ok(()) => Ok(DeleteVolumeResult { ok: true, status: 200, message: "Volume eliminato.".to_string() }),
        Err(e) => Err(OpError::unavailable(format!("Delete volume fallita: {e}"))),
    }
}

/// The provider the pool uses now (stored config or the configured default).
async fn current_provider(ctx: &ServiceContext) -> Result<Option<ResolvedProvider>, OpError> {
    providers::resolve_provider(ctx, None, None).await
}

pub async fn reap_orphans(ctx: &ServiceContext, args: ReapArgs) -> Result<ReapReport, OpError> {
    let grace = args.grace_ms.unwrap_or(ORPHAN_GRACE_MS).max(0);
    let Some(resolved) = current_provider(ctx).await? else { return Ok(ReapReport::default()) };
    let app = resolved.config.app_name.clone();
    let provider = resolved.provider.as_ref();
    let now = ctx.clock.now_ms();
    // Everything some row not yet stopped may own, by machine id, worker name and volume.
    let rows = worker_rows(ctx).await?;
    let live: Vec<&WorkerRow> = rows.iter().filter(|r| r.status != WorkerStatus::Stopped).collect();
    let owned_machines: HashSet<String> = live
        .iter()
        .flat_map(|r| [Some(r.worker_id.clone()), r.machine_ref.as_ref().map(|m| m.machine_id.clone())])
        .flatten()
        .collect();
    let owned_volumes: HashSet<String> = live
        .iter()
        .flat_map(|r| [r.volume_id.clone(), Some(dedicated_volume_name(&resolved.config.volume_name, &r.worker_id))])
        .flatten()
        .collect();
    let provider_error = |call: &'static str| {
        metrics::counter!(common::telemetry::PROVIDER_ERRORS, "provider" => provider.kind(), "call" => call)
            .increment(1);
    };
    let machines = provider.list_machines(&app).await.inspect_err(|_| provider_error("list_machines"));
    let machines = machines.map_err(|e| OpError::unavailable(e.to_string()))?;
    let volumes = provider.list_volumes(&app).await.inspect_err(|_| provider_error("list_volumes"));
    let volumes = volumes.map_err(|e| OpError::unavailable(e.to_string()))?;
    let mut report = ReapReport::default();
    let orphan_machines: Vec<_> = machines
        .into_iter()
        .filter(|m| !owned_machines.contains(&m.machine_id) && !owned_machines.contains(&m.worker_id))
        .collect();
    let attached: HashSet<String> = orphan_machines.iter().flat_map(|m| m.volume_ids.clone()).collect();
    let unowned_volumes: HashSet<String> = volumes
        .iter()
        .filter(|v| !owned_volumes.contains(&v.id) && !owned_volumes.contains(&v.name))
        .map(|v| sighting_key("volume", &app, &v.id))
        .collect();
    let unowned: HashSet<String> =
        orphan_machines.iter().map(|m| sighting_key("machine", &app, &m.machine_id)).chain(unowned_volumes).collect();
    // Found without a worker (in their grace period or about to go): what the orphan alert
    // watches; it stays up while they cannot be removed.
    metrics::gauge!(common::telemetry::ORPHAN_RESOURCES).set(unowned.len() as f64);
    forget_accounted(ctx, &app, &unowned).await?;
    for m in &orphan_machines {
        if !past_grace(ctx, "machine", &app, &m.machine_id, now, grace).await? {
            report.waiting += 1;
            continue;
        }
        let _ = provider.stop(&app, &m.machine_id).await;
        let wait = Duration::from_millis(ctx.settings.providers.stop_wait_ms);
        let _ = provider.wait_for_state(&app, &m.machine_id, "stopped", wait).await;
        match provider.destroy(&app, &m.machine_id).await {
            Ok(()) => {
                forget(ctx, "machine", &app, &m.machine_id).await;
                report.machines_removed.push(m.machine_id.clone());
            }
            Err(e) => {
                provider_error("destroy");
                report.errors.push(format!("machine {}: {e}", m.machine_id))
            }
        }
    }
    for v in volumes {
        let owned = owned_volumes.contains(&v.id) || owned_volumes.contains(&v.name);
        // A volume still attached to a live machine waits for that machine's fate.
        let busy =
            v.attached_machine_id.as_ref().is_some_and(|m| owned_machines.contains(m)) || attached.contains(&v.id);
        if owned || (busy && !report.machines_removed.iter().any(|m| Some(m) == v.attached_machine_id.as_ref())) {
            continue;
        }
        if !past_grace(ctx, "volume", &app, &v.id, now, grace).await? {
            report.waiting += 1;
            continue;
        }
        match provider.delete_volume(&app, &v.id).await {
            Ok(()) => {
                forget(ctx, "volume", &app, &v.id).await;
                report.volumes_removed.push(v.id);
            }
            Err(e) => {
                provider_error("delete_volume");
                report.errors.push(format!("volume {}: {e}", v.id))
            }
        }
    }
    Ok(report)
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sighting {
    first_seen_at: Millis,
}

fn sighting_key(kind: &str, app: &str, id: &str) -> String {
    format!("orphan.{kind}.{}.{}", escape(app), escape(id))
}

/// Records the first sighting (create-only) and says whether the grace period has passed.
async fn past_grace(
    ctx: &ServiceContext,
    kind: &str,
    app: &str,
    id: &str,
    now: Millis,
    grace: Millis,
) -> Result<bool, OpError> {
    let key = sighting_key(kind, app, id);
    let store = &ctx.buckets.system;
    if let Some(seen) = store.get::<Sighting>(&key).await.map_err(OpError::internal)? {
        return Ok(now - seen.value.first_seen_at >= grace);
    }
    match store.create(&key, &Sighting { first_seen_at: now }).await {
        Ok(_) => Ok(grace == 0),
        Err(e) if e.is_conflict() => Ok(false), // Another sweeper recorded it just now.
        Err(e) => Err(OpError::internal(e)),
    }
}

/// Drops the sightings of this app's resources that are no longer unaccounted for (a row took
/// them over, or they are gone), so a later orphaning starts a fresh grace period.
async fn forget_accounted(ctx: &ServiceContext, app: &str, unowned: &HashSet<String>) -> Result<(), OpError> {
    let sightings = ctx.buckets.system.scan::<Sighting>(&format!("orphan.*.{}.*", escape(app))).await;
    for (key, seen) in sightings.map_err(OpError::internal)? {
        if !unowned.contains(&key) {
            // A lost race means someone recorded it again just now: leave that record.
            let _ = ctx.buckets.system.delete(&key, seen.revision).await;
        }
    }
    Ok(())
}

async fn forget(ctx: &ServiceContext, kind: &str, app: &str, id: &str) {
    let key = sighting_key(kind, app, id);
    if let Ok(Some(v)) = ctx.buckets.system.get::<serde_json::Value>(&key).await {
        let _ = ctx.buckets.system.delete(&key, v.revision).await;
    }
}
