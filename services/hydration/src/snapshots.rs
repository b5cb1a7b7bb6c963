//! Workspace snapshots (spec §1.7, §3.13; fixes D1, D2, S7).
//!
//! A record per snapshot in `af_snapshots`, keyed by its id, which is
//! `<conversation token>.<time-ordered id>` so that a conversation's snapshots are one key-prefix
//! scan. The archive is an object of `af_snapshot_archives` named by the snapshot id; workers on
//! NATS put it there directly, HTTP workers stream it through ingress
//! (`PUT /v1/snapshots/<id>/archive`).
//!
//! - `finalize` reads the archive back and recomputes its sha256 and size; a mismatch fails the
//!   snapshot and deletes the archive (D2). Only an `uploading` snapshot can be finalised.
//! - Restore takes the newest *ready, unexpired* snapshot of the exact workspace + agent +
//!   conversation, so a newer failed or unfinished upload does not hide an older good one (D1).
//! - Archives hold the workspace's credentials, so download links go only to admins and to the
//!   worker that owns the conversation (S7); app callers see the records without links.
//! - Retention deletes expired archives from the store (not only the record's status), and
//!   uploads left `uploading` past `snapshots.upload_timeout_ms` are failed and their partial
//!   archives removed.

use async_nats::jetstream::object_store::{DeleteErrorKind, ObjectStore};
use common::OpError;
use common::api;
use common::api::queue::RecordSnapshotArgs;
use common::api::snapshots::{
    FailSnapshotArgs, FinalizeSnapshotArgs, PrepareSnapshotArgs, PreparedUpload, RestoreArgs, RestoreTarget,
    SnapshotSweep, SnapshotView, UserAgentSnapshotsArgs,
};
pub use common::api::snapshots::{SnapshotReason, SnapshotStatus};
use common::auth::{Caller, Role};
use common::clock::Millis;
use common::ids::{SnapshotId, WorkerId};
use common::model::WorkerRow;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::store::{StoreError, Versioned};
use common::token::escape;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{bindings, fence};

pub const FORMAT_VERSION: u32 = 1;
const DEFAULT_WORKSPACE: &str = "default";
const DEFAULT_LIST: usize = 50;
const MAX_LIST: usize = 200;
const DEFAULT_SWEEP: usize = 100;
const MAX_SWEEP: usize = 1000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    pub snapshot_id: String,
    pub workspace_id: String,
    pub agent_key: String,
    pub worker_id: String,
    pub conversation_id: String,
    pub reason: SnapshotReason,
    pub format_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    pub status: SnapshotStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: Millis,
    pub expires_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Millis>,
}

impl SnapshotRecord {
    fn restorable(&self, now: Millis) -> bool {
        self.status == SnapshotStatus::Ready && self.expires_at > now
    }
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::PrepareDataSnapshotUpload, _, _, _, _>(ctx, |ctx, caller: Caller, a| async move {
        prepare(&ctx, &caller, a).await
    });
    ops.handle::<api::FinalizeDataSnapshotUpload, _, _, _, _>(ctx, |ctx, caller: Caller, a| async move {
        finalize(&ctx, &caller, a).await
    });
    ops.handle::<api::FailDataSnapshotUpload, _, _, _, _>(ctx, |ctx, caller: Caller, a| async move {
        fail(&ctx, &caller, a).await
    });
    ops.handle::<api::GetLatestDataSnapshotForRestore, _, _, _, _>(ctx, |ctx, caller: Caller, a| async move {
        restore_target(&ctx, &caller, a).await
    });
    ops.handle::<api::ListSnapshotsForConversation, _, _, _, _>(ctx, |ctx, caller: Caller, a| async move {
        let conversation_id = required_conversation(a.conversation_id.as_deref())?;
        list_views(&ctx, &caller, &conversation_id, None, a.limit).await
    });
    ops.handle::<api::ListSnapshotsForUserAgent, _, _, _, _>(ctx, |ctx, caller: Caller, a| async move {
        user_agent_views(&ctx, &caller, a).await
    });
    ops.handle::<api::GetLatestSnapshotForUserAgent, _, _, _, _>(ctx, |ctx, caller: Caller, a| async move {
        let mut views = user_agent_views(&ctx, &caller, UserAgentSnapshotsArgs { limit: Some(1), ..a }).await?;
        Ok::<_, OpError>(views.pop())
    });
    ops.handle::<api::ExpireOldDataSnapshots, _, _, _, _>(ctx, |ctx, _caller: Caller, a| async move {
        sweep(&ctx, a.limit.unwrap_or(DEFAULT_SWEEP).clamp(1, MAX_SWEEP)).await
    });
}

fn required_conversation(conversation_id: Option<&str>) -> Result<String, OpError> {
    match conversation_id.map(str::trim) {
        Some(c) if !c.is_empty() => Ok(c.to_string()),
        _ => Err(OpError::invalid("conversationId is required")),
    }
}

fn required(field: &str, value: &str) -> Result<String, OpError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(OpError::invalid(format!("{field} is required")));
    }
    Ok(v.to_string())
}

pub fn archive_url(ctx: &ServiceContext, snapshot_id: &str) -> String {
    format!("{}/v1/snapshots/{snapshot_id}/archive", ctx.settings.http.public_base_url())
}

fn conversation_of(snapshot_id: &str) -> Option<String> {
    snapshot_id.split_once('.').and_then(|(token, _)| common::token::unescape(token))
}

async fn load(ctx: &ServiceContext, snapshot_id: &str) -> Result<Option<Versioned<SnapshotRecord>>, OpError> {
    // Ids are `<token>.<id>`; anything else cannot name a snapshot (and must not reach a key).
    if conversation_of(snapshot_id).is_none() || snapshot_id.matches('.').count() != 1 {
        return Ok(None);
    }
    ctx.buckets.snapshots.get::<SnapshotRecord>(snapshot_id).await.map_err(OpError::internal)
}

/// Whether `worker_id` owns `conversation_id`: its row is assigned to it (sticky owner or
/// pre-assignment), or it holds the conversation's lease right now (the row is written behind
/// the claim, the lease before it).
async fn worker_owns(ctx: &ServiceContext, worker_id: &str, conversation_id: &str) -> Result<bool, OpError> {
    let row = ctx.buckets.workers.get::<WorkerRow>(&escape(worker_id)).await.map_err(OpError::internal)?;
    if row.and_then(|r| r.value.assignment).is_some_and(|a| a.conversation_id == conversation_id) {
        return Ok(true);
    }
    let state = fence::queue_state(ctx, conversation_id).await?;
    Ok(state.is_some_and(|s| fence::holds_lease(&s, worker_id, ctx.clock.now_ms())))
}

async fn require_owner(ctx: &ServiceContext, caller: &Caller, conversation_id: &str) -> Result<(), OpError> {
    if caller.role != Role::Worker {
        return Ok(());
    }
    let worker_id = caller.worker_id.as_deref().unwrap_or_default();
    if worker_owns(ctx, worker_id, conversation_id).await? {
        Ok(())
    } else {
        Err(OpError::forbidden(format!("worker '{worker_id}' is not assigned to conversation '{conversation_id}'")))
    }
}

async fn prepare(ctx: &ServiceContext, caller: &Caller, args: PrepareSnapshotArgs) -> Result<PreparedUpload, OpError> {
    let worker_id = required("workerId", &args.worker_id)?;
    caller.require_worker(&worker_id)?;
    let conversation_id = required_conversation(args.conversation_id.as_deref())?;
    let agent_key = required("agentKey", &args.agent_key)?;
    require_owner(ctx, caller, &conversation_id).await?;
    let now = ctx.clock.now_ms();
    let snapshot_id = SnapshotId::parse(format!("{}.s{}", escape(&conversation_id), uuid::Uuid::now_v7().simple()))?;
    let record = SnapshotRecord {
        snapshot_id: snapshot_id.to_string(),
        workspace_id: args.workspace_id.filter(|w| !w.trim().is_empty()).unwrap_or_else(|| DEFAULT_WORKSPACE.into()),
        agent_key,
        worker_id,
        conversation_id,
        reason: args.reason,
        format_version: FORMAT_VERSION,
        sha256: None,
        size_bytes: None,
        status: SnapshotStatus::Uploading,
        error: None,
        created_at: now,
        expires_at: now + ctx.settings.snapshots.retention_ms,
        completed_at: None,
    };
    ctx.buckets.snapshots.create(&snapshot_id, &record).await.map_err(OpError::internal)?;
    Ok(PreparedUpload {
        upload_url: archive_url(ctx, &snapshot_id),
        expires_at: record.expires_at,
        object_store: common::topology::SNAPSHOT_ARCHIVES.to_string(),
        object_name: snapshot_id.to_string(),
        chunk_bytes: ctx.settings.snapshots.chunk_bytes,
        max_bytes: ctx.settings.snapshots.max_archive_bytes,
        snapshot_id,
    })
}

/// The sha256 (hex) and size of a stored object, read back in full.
pub async fn digest_object(store: &ObjectStore, name: &str) -> Result<Option<(String, u64)>, OpError> {
    use async_nats::jetstream::object_store::GetErrorKind;
    let mut object = match store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(OpError::internal(e)),
    };
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = object.read(&mut buf).await.map_err(OpError::internal)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Some((hex::encode(hasher.finalize()), size)))
}

async fn delete_archive(ctx: &ServiceContext, snapshot_id: &str) -> Result<bool, OpError> {
    match ctx.buckets.snapshot_archives.delete(snapshot_id).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == DeleteErrorKind::NotFound => Ok(false),
        Err(e) => Err(OpError::internal(e)),
    }
}

/// Writes `record` over the version read, or reports the lost race as a conflict.
async fn save(
    ctx: &ServiceContext,
    current: &Versioned<SnapshotRecord>,
    record: &SnapshotRecord,
) -> Result<(), OpError> {
    match ctx.buckets.snapshots.update(&record.snapshot_id, record, current.revision).await {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict { .. }) => {
            Err(OpError::conflict(format!("snapshot '{}' changed concurrently; retry", record.snapshot_id)))
        }
        Err(e) => Err(OpError::internal(e)),
    }
}

/// The snapshot `snapshot_id` when `worker_id` (which the caller must be) prepared it; `None`
/// for an unknown or another worker's snapshot, which finalize and fail answer with `false`.
async fn own_snapshot(
    ctx: &ServiceContext,
    caller: &Caller,
    worker_id: &str,
    snapshot_id: &str,
) -> Result<Option<Versioned<SnapshotRecord>>, OpError> {
    let worker_id = required("workerId", worker_id)?;
    caller.require_worker(&worker_id)?;
    Ok(load(ctx, snapshot_id.trim()).await?.filter(|current| current.value.worker_id == worker_id))
}

async fn finalize(ctx: &ServiceContext, caller: &Caller, args: FinalizeSnapshotArgs) -> Result<bool, OpError> {
    let Some(current) = own_snapshot(ctx, caller, &args.worker_id, &args.snapshot_id).await? else {
        return Ok(false);
    };
    let mut record = current.value.clone();
    let expected = args.sha256.trim().to_ascii_lowercase();
    match record.status {
        SnapshotStatus::Uploading => {}
        // A retried finalize whose first answer was lost: make sure the worker row heard of it.
        SnapshotStatus::Ready if record.sha256.as_deref() == Some(expected.as_str()) => {
            record_on_worker(ctx, &record).await?;
            return Ok(true);
        }
        status => {
            return Err(OpError::conflict(format!(
                "snapshot '{}' is {} and cannot be finalized",
                record.snapshot_id,
                status.as_str()
            )));
        }
    }
    if args.storage_id.as_deref().is_some_and(|s| !s.is_empty() && s != record.snapshot_id) {
        return Err(OpError::invalid("storageId must be the snapshotId (archives are stored under the snapshot id)"));
    }
    let now = ctx.clock.now_ms();
    let failure = match digest_object(&ctx.buckets.snapshot_archives, &record.snapshot_id).await? {
        None => Some("no archive was uploaded".to_string()),
        Some((sha, size)) if sha != expected || size != args.size_bytes => Some(format!(
            "archive checksum mismatch: reported sha256 {expected} and {} bytes, stored archive has sha256 {sha} and {size} bytes",
            args.size_bytes
        )),
        Some(_) => None,
    };
    if let Some(error) = failure {
        record.status = SnapshotStatus::Failed;
        record.error = Some(error.clone());
        record.completed_at = Some(now);
        save(ctx, &current, &record).await?;
        delete_archive(ctx, &record.snapshot_id).await?;
        return Err(OpError::invalid(error));
    }
    record.status = SnapshotStatus::Ready;
    record.sha256 = Some(expected);
    record.size_bytes = Some(args.size_bytes);
    record.completed_at = Some(now);
    save(ctx, &current, &record).await?;
    record_on_worker(ctx, &record).await?;
    Ok(true)
}

/// Tells queue-manager (which owns worker rows) about a ready snapshot: it remembers it and lets
/// a draining worker proceed to stopping. Idempotent, so a retried finalize repeats it.
async fn record_on_worker(ctx: &ServiceContext, record: &SnapshotRecord) -> Result<(), OpError> {
    let args = RecordSnapshotArgs {
        worker_id: WorkerId::parse(record.worker_id.as_str())?,
        snapshot_id: SnapshotId::parse(record.snapshot_id.as_str())?,
    };
    ctx.call_service::<api::RecordWorkerSnapshot>(&args).await.map(|_| ())
}

async fn fail(ctx: &ServiceContext, caller: &Caller, args: FailSnapshotArgs) -> Result<bool, OpError> {
    let Some(current) = own_snapshot(ctx, caller, &args.worker_id, &args.snapshot_id).await? else {
        return Ok(false);
    };
    let mut record = current.value.clone();
    if record.status != SnapshotStatus::Uploading {
        return Ok(record.status == SnapshotStatus::Failed);
    }
    record.status = SnapshotStatus::Failed;
    record.error = Some(args.error.chars().take(2000).collect());
    record.completed_at = Some(ctx.clock.now_ms());
    save(ctx, &current, &record).await?;
    delete_archive(ctx, &record.snapshot_id).await?;
    Ok(true)
}

/// A conversation's snapshots, newest first.
async fn for_conversation(ctx: &ServiceContext, conversation_id: &str) -> Result<Vec<SnapshotRecord>, OpError> {
    let found = ctx.buckets.snapshots.scan::<SnapshotRecord>(&format!("{}.*", escape(conversation_id))).await;
    let mut records: Vec<SnapshotRecord> =
        found.map_err(OpError::internal)?.into_iter().map(|(_, v)| v.value).collect();
    records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.snapshot_id.cmp(&a.snapshot_id)));
    Ok(records)
}

async fn restore_target(
    ctx: &ServiceContext,
    caller: &Caller,
    args: RestoreArgs,
) -> Result<Option<RestoreTarget>, OpError> {
    let conversation_id = required_conversation(args.conversation_id.as_deref())?;
    let agent_key = required("agentKey", &args.agent_key)?;
    let workspace_id = args.workspace_id.filter(|w| !w.trim().is_empty()).unwrap_or_else(|| DEFAULT_WORKSPACE.into());
    require_owner(ctx, caller, &conversation_id).await?;
    let now = ctx.clock.now_ms();
    let newest_ready = for_conversation(ctx, &conversation_id)
        .await?
        .into_iter()
        .find(|r| r.workspace_id == workspace_id && r.agent_key == agent_key && r.restorable(now));
    newest_ready
        .map(|r| {
            Ok(RestoreTarget {
                download_url: archive_url(ctx, &r.snapshot_id),
                object_store: common::topology::SNAPSHOT_ARCHIVES.to_string(),
                snapshot_id: SnapshotId::parse(r.snapshot_id.as_str()).map_err(OpError::internal)?,
                object_name: r.snapshot_id,
                sha256: r.sha256,
                size_bytes: r.size_bytes,
                created_at: r.created_at,
            })
        })
        .transpose()
}

async fn list_views(
    ctx: &ServiceContext,
    caller: &Caller,
    conversation_id: &str,
    filter: Option<(&str, &str)>,
    limit: Option<usize>,
) -> Result<Vec<SnapshotView>, OpError> {
    let limit = limit.unwrap_or(DEFAULT_LIST).clamp(1, MAX_LIST);
    let now = ctx.clock.now_ms();
    let links = caller.role == Role::Admin;
    Ok(for_conversation(ctx, conversation_id)
        .await?
        .into_iter()
        .filter(|r| filter.is_none_or(|(workspace, agent)| r.workspace_id == workspace && r.agent_key == agent))
        .take(limit)
        .map(|r| SnapshotView {
            download_url: (links && r.restorable(now)).then(|| archive_url(ctx, &r.snapshot_id)),
            snapshot_id: r.snapshot_id,
            created_at: r.created_at,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            status: r.status,
            conversation_id: r.conversation_id,
            workspace_id: r.workspace_id,
            agent_key: r.agent_key,
            reason: r.reason,
            error: r.error,
        })
        .collect())
}

async fn user_agent_views(
    ctx: &ServiceContext,
    caller: &Caller,
    args: UserAgentSnapshotsArgs,
) -> Result<Vec<SnapshotView>, OpError> {
    let agent_key = args.agent_key.as_str();
    let target = bindings::user_agent_target(ctx, &args.consumer_user_id, agent_key, false).await?;
    list_views(ctx, caller, &target.conversation_id, Some((DEFAULT_WORKSPACE, agent_key)), args.limit).await
}

/// What ingress may do with a snapshot archive for `caller`.
pub(crate) async fn authorize(
    ctx: &ServiceContext,
    caller: &Caller,
    snapshot_id: &str,
    write: bool,
) -> Result<SnapshotRecord, OpError> {
    let record =
        load(ctx, snapshot_id).await?.ok_or_else(|| OpError::not_found(format!("no snapshot '{snapshot_id}'")))?.value;
    match caller.role {
        Role::Admin => {}
        Role::Worker if write => caller.require_worker(&record.worker_id)?,
        Role::Worker => require_owner(ctx, caller, &record.conversation_id).await?,
        _ => return Err(OpError::forbidden("snapshot archives are for admins and the owning worker only")),
    }
    if write && record.status != SnapshotStatus::Uploading {
        return Err(OpError::conflict(format!("snapshot '{snapshot_id}' is no longer accepting an upload")));
    }
    if !write && !record.restorable(ctx.clock.now_ms()) {
        return Err(OpError::not_found(format!("snapshot '{snapshot_id}' is not ready or has expired")));
    }
    Ok(record)
}

async fn sweep(ctx: &ServiceContext, limit: usize) -> Result<SnapshotSweep, OpError> {
    let now = ctx.clock.now_ms();
    let abandoned_before = now - ctx.settings.snapshots.upload_timeout_ms;
    let records = ctx.buckets.snapshots.scan::<SnapshotRecord>(">").await.map_err(OpError::internal)?;
    let mut result = SnapshotSweep::default();
    let mut live = std::collections::HashSet::new();
    for (_, current) in &records {
        let r = &current.value;
        let next = match r.status {
            SnapshotStatus::Ready if r.expires_at <= now => (SnapshotStatus::Expired, None),
            SnapshotStatus::Uploading if r.created_at <= abandoned_before => {
                (SnapshotStatus::Failed, Some("upload abandoned: not finalized in time".to_string()))
            }
            SnapshotStatus::Uploading | SnapshotStatus::Ready => {
                live.insert(r.snapshot_id.clone());
                continue;
            }
            // Ended snapshots are kept as history for one more retention period, then purged.
            SnapshotStatus::Expired | SnapshotStatus::Failed => {
                let ended = r.completed_at.unwrap_or(r.created_at);
                if ended + ctx.settings.snapshots.retention_ms <= now && result.purged < limit {
                    match ctx.buckets.snapshots.delete(&r.snapshot_id, current.revision).await {
                        Ok(()) => result.purged += 1,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(OpError::internal(e)),
                    }
                }
                continue;
            }
        };
        if result.expired + result.abandoned >= limit {
            live.insert(r.snapshot_id.clone()); // Not handled this pass: leave its archive.
            continue;
        }
        // Record first: a reader must never be handed a link to an archive being deleted.
        let mut record = r.clone();
        record.status = next.0;
        record.error = next.1.or(record.error);
        record.completed_at = record.completed_at.or(Some(now));
        match save(ctx, current, &record).await {
            Ok(()) if next.0 == SnapshotStatus::Expired => result.expired += 1,
            Ok(()) => result.abandoned += 1,
            Err(e) if e.code == common::ErrorCode::Conflict => {
                live.insert(r.snapshot_id.clone());
            }
            Err(e) => return Err(e),
        }
    }
    // Every archive without a live record goes: the ones just ended, and any a crashed sweep
    // or fail() left behind between its record write and its delete.
    let mut objects = ctx.buckets.snapshot_archives.list().await.map_err(OpError::internal)?;
    let mut doomed = Vec::new();
    while let Some(info) = futures::StreamExt::next(&mut objects).await {
        let info = info.map_err(OpError::internal)?;
        if !info.deleted && !live.contains(&info.name) {
            doomed.push(info.name);
        }
    }
    for name in doomed {
        // An upload prepared after the scan is live although the scan did not see it.
        if load(ctx, &name)
            .await?
            .is_some_and(|v| matches!(v.value.status, SnapshotStatus::Uploading | SnapshotStatus::Ready))
        {
            continue;
        }
        if delete_archive(ctx, &name).await? {
            result.archives_deleted += 1;
        }
    }
    Ok(result)
}
