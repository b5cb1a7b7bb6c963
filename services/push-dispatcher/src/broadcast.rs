//! Broadcasts (spec §3.18.7): one message to every enabled agent of a company (P1), each in its
//! own `broadcast:agent:<agentKey>` conversation, every target enqueued before the call
//! returns; `getBroadcastStatus` shows progress.
//!
//! # Crash safety
//!
//! * The broadcast record `b.<id>` (`af_broadcasts`) is written first, `running`, with its
//!   target list, plus a marker `running.<id>`.
//! * The process running it holds the lease `broadcast-<id>` in `af_leaders` (renewed; it
//!   lapses 3 s after the process dies).
//! * Per target: if the row `b.<id>.<agent>` (`af_push_dispatches`) exists the target is done;
//!   else enqueue with `idempotencyKey = runKey` (`broadcast:<id>:<agentKey>`), then create the
//!   row (create-only). A repeat of a target therefore never queues a second message.
//! * Progress counters are written to the record every [`PROGRESS_EVERY`] targets; at the end
//!   the status (`done`, or `failed` when any target failed), the counts and `completedAt`,
//!   then the marker is deleted.
//! * The dispatch leader looks for `running.*` markers every
//!   `push.broadcast_recovery_interval_ms`; a broadcast whose lease it can take has lost its
//!   runner, and it runs the same steps to the end: no target enqueued twice, none skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use common::OpError;
use common::api;
use common::api::push::{BroadcastArgs, BroadcastResult, BroadcastStatus, BroadcastView, DispatchStatus};
use common::auth::Caller;
use common::clock::Millis;
use common::ids::{BroadcastId, MessageId};
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::store::JsonStore;
use common::token::escape;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::target;

/// Targets between two progress writes.
pub const PROGRESS_EVERY: usize = 250;

/// The stored broadcast: the view plus the target list fixed at the start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BroadcastDoc {
    #[serde(flatten)]
    pub view: BroadcastView,
    pub targets: Vec<String>,
}

/// One target's audit row (spec §1.14 `messagePushBroadcastDispatches`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRow {
    pub broadcast_id: String,
    pub consumer_user_id: String,
    pub agent_key: String,
    pub run_key: String,
    pub enqueued_message_id: Option<MessageId>,
    pub status: DispatchStatus,
    pub error: Option<String>,
    pub created_at: Millis,
}

#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::SendBroadcastToAllActiveAgents, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        start(&ctx, a).await
    });
    ops.handle::<api::GetBroadcastStatus, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        Ok(broadcasts(&ctx).get::<BroadcastDoc>(&doc_key(&a.broadcast_id)).await?.map(|d| d.value.view))
    });
}

fn broadcasts(ctx: &ServiceContext) -> &JsonStore {
    &ctx.buckets.broadcasts
}

fn doc_key(id: &str) -> String {
    format!("b.{id}")
}

fn marker_key(id: &str) -> String {
    format!("running.{id}")
}

fn lease_key(id: &str) -> String {
    format!("broadcast-{id}")
}

fn row_key(id: &str, agent: &str) -> String {
    format!("b.{id}.{}", escape(agent))
}

async fn start(ctx: &ServiceContext, a: BroadcastArgs) -> Result<BroadcastResult, OpError> {
    target::check_actor("requestedBy", &a.requested_by)?;
    // Read from the bucket in one pass rather than through `listAgentProfiles`, whose answer for
    // every agent of every company outgrows a NATS message at a few thousand agents.
    let mut targets: Vec<String> = ctx
        .buckets
        .profiles
        .scan::<common::model::AgentProfile>(">")
        .await?
        .into_iter()
        .map(|(_, p)| p.value)
        .filter(|p| p.enabled && p.company_id.as_deref() == Some(a.company_id.as_str()))
        .map(|p| p.agent_key)
        .collect();
    targets.sort();
    let id = BroadcastId::trusted(crate::target::mint("bc"));
    let now = ctx.clock.now_ms();
    let doc = BroadcastDoc {
        view: BroadcastView {
            id: id.clone(),
            company_id: a.company_id.to_string(),
            title: a.title,
            text: a.text,
            target: "all_active_agents".to_string(),
            requested_by: a.requested_by,
            requested_at: now,
            status: BroadcastStatus::Running,
            total_targets: targets.len() as u64,
            enqueued_count: 0,
            failed_count: 0,
            completed_at: None,
        },
        targets,
    };
    let holder = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    // The lease first, so no recovery can start before this process runs it.
    let lease_rev = ctx.buckets.leaders.create(&lease_key(&id), &Lease { holder: holder.clone() }).await?;
    broadcasts(ctx).create(&marker_key(&id), &serde_json::json!({})).await?;
    broadcasts(ctx).create(&doc_key(&id), &doc).await?;
    let view = run_with_lease(ctx, doc, holder, lease_rev).await?;
    Ok(BroadcastResult {
        broadcast_id: id,
        total_targets: view.total_targets,
        enqueued: view.enqueued_count,
        failed: view.failed_count,
    })
}

/// Runs broadcast `doc` to the end while renewing its lease (already held at `revision`).
async fn run_with_lease(
    ctx: &ServiceContext,
    doc: BroadcastDoc,
    holder: String,
    revision: u64,
) -> Result<BroadcastView, OpError> {
    let lost = CancellationToken::new();
    let stop = CancellationToken::new();
    let renewer =
        tokio::spawn(renew(ctx.clone(), lease_key(&doc.view.id), holder, revision, stop.clone(), lost.clone()));
    let result = tokio::select! {
        r = run(ctx, doc) => r,
        _ = lost.cancelled() => Err(OpError::unavailable("lost the broadcast's lease; another replica completes it")),
    };
    stop.cancel();
    if let Ok(Some((key, rev))) = renewer.await {
        let _ = ctx.buckets.leaders.delete(&key, rev).await;
    }
    result
}

async fn renew(
    ctx: ServiceContext,
    key: String,
    holder: String,
    mut revision: u64,
    stop: CancellationToken,
    lost: CancellationToken,
) -> Option<(String, u64)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Some((key, revision)),
            _ = tokio::time::sleep(common::topology::LEADER_TTL / 3) => {}
        }
        match ctx.buckets.leaders.update(&key, &Lease { holder: holder.clone() }, revision).await {
            Ok(rev) => revision = rev,
            Err(e) => {
                tracing::warn!(lease = %key, error = %e, "broadcast lease lost");
                lost.cancel();
                return None;
            }
        }
    }
}

/// Every target of the broadcast, each at most once (module doc), then the final record.
async fn run(ctx: &ServiceContext, doc: BroadcastDoc) -> Result<BroadcastView, OpError> {
    let id = doc.view.id.clone();
    let text = format!("{}\n\n{}", doc.view.title, doc.view.text).trim().to_string();
    let company = doc.view.company_id.clone();
    let mut results = futures::stream::iter(doc.targets.iter().cloned())
        .map(|agent| {
            let (text, company, id) = (&text, &company, &id);
            async move { one_target(ctx, id, &agent, text, company).await }
        })
        .buffer_unordered(ctx.settings.push.concurrency);
    let (mut enqueued, mut failed, mut seen) = (0u64, 0u64, 0usize);
    while let Some(result) = results.next().await {
        match result? {
            DispatchStatus::Enqueued => enqueued += 1,
            _ => failed += 1,
        }
        seen += 1;
        if seen % PROGRESS_EVERY == 0 {
            progress(ctx, &id, enqueued, failed, None).await?;
        }
    }
    let status = if failed > 0 { BroadcastStatus::Failed } else { BroadcastStatus::Done };
    let view = progress(ctx, &id, enqueued, failed, Some(status)).await?;
    if let Some(marker) = broadcasts(ctx).get::<serde_json::Value>(&marker_key(&id)).await? {
        let _ = broadcasts(ctx).delete(&marker_key(&id), marker.revision).await;
    }
    Ok(view)
}

async fn progress(
    ctx: &ServiceContext,
    id: &str,
    enqueued: u64,
    failed: u64,
    finish: Option<BroadcastStatus>,
) -> Result<BroadcastView, OpError> {
    let now = ctx.clock.now_ms();
    let written = broadcasts(ctx)
        .modify::<BroadcastDoc, OpError, _>(&doc_key(id), |current| {
            let Some(mut doc) = current else { return Ok(None) };
            doc.view.enqueued_count = enqueued;
            doc.view.failed_count = failed;
            if let Some(status) = finish {
                doc.view.status = status;
                doc.view.completed_at = Some(now);
            }
            Ok(Some(doc))
        })
        .await?;
    written.map(|d| d.value.view).ok_or_else(|| OpError::not_found("broadcast record vanished"))
}

async fn one_target(
    ctx: &ServiceContext,
    id: &str,
    agent: &str,
    text: &str,
    company: &str,
) -> Result<DispatchStatus, OpError> {
    let key = row_key(id, agent);
    if let Some(row) = ctx.buckets.push_dispatches.get::<TargetRow>(&key).await? {
        return Ok(row.value.status);
    }
    let run_key = format!("broadcast:{id}:{agent}");
    let user = format!("agent:{agent}");
    let mut metadata = BTreeMap::new();
    metadata.insert("broadcastId".to_string(), id.to_string());
    metadata.insert("runKey".to_string(), run_key.clone());
    metadata.insert("adminInitiated".to_string(), "true".to_string());
    metadata.insert("companyId".to_string(), company.to_string());
    let conversation = format!("broadcast:agent:{agent}");
    let outcome = target::enqueue(
        ctx,
        target::Outgoing {
            conversation_id: &conversation,
            agent_key: agent,
            provider: "system_push",
            provider_user_id: &user,
            text,
            metadata,
            idempotency_key: Some(run_key.clone()),
        },
    )
    .await;
    if let Err(e) = &outcome
        && matches!(e.code, common::error::ErrorCode::Unavailable | common::error::ErrorCode::Internal)
    {
        // Not a verdict on this target: the broadcast stays running and is completed later.
        return Err(e.clone());
    }
    let row = TargetRow {
        broadcast_id: id.to_string(),
        consumer_user_id: user,
        agent_key: agent.to_string(),
        run_key,
        status: if outcome.is_ok() { DispatchStatus::Enqueued } else { DispatchStatus::Failed },
        enqueued_message_id: outcome.as_ref().ok().cloned(),
        error: outcome.err().map(|e| e.message),
        created_at: ctx.clock.now_ms(),
    };
    match ctx.buckets.push_dispatches.create(&key, &row).await {
        Ok(_) => Ok(row.status),
        Err(e) if e.is_conflict() => {
            let stored = ctx.buckets.push_dispatches.get::<TargetRow>(&key).await?;
            Ok(stored.map_or(row.status, |r| r.value.status))
        }
        Err(e) => Err(e.into()),
    }
}

/// The dispatch leader's recovery: completes every running broadcast whose runner is gone.
pub async fn recover_loop(ctx: ServiceContext, lead: CancellationToken) {
    let every = Duration::from_millis(ctx.settings.push.broadcast_recovery_interval_ms);
    let holder = format!("recovery-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    loop {
        if let Err(e) = recover_once(&ctx, &holder, &lead).await {
            tracing::warn!(error = %e, "broadcast recovery pass failed; retrying");
        }
        tokio::select! {
            _ = lead.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn recover_once(ctx: &ServiceContext, holder: &str, lead: &CancellationToken) -> Result<(), OpError> {
    for (key, _) in broadcasts(ctx).scan::<serde_json::Value>("running.*").await? {
        if lead.is_cancelled() {
            return Ok(());
        }
        let id = key.trim_start_matches("running.").to_string();
        let Ok(revision) = ctx.buckets.leaders.create(&lease_key(&id), &Lease { holder: holder.to_string() }).await
        else {
            continue; // Its runner is alive.
        };
        let Some(doc) = broadcasts(ctx).get::<BroadcastDoc>(&doc_key(&id)).await? else {
            // The record was never written (the start died first): nothing was sent.
            if let Some(marker) = broadcasts(ctx).get::<serde_json::Value>(&key).await? {
                let _ = broadcasts(ctx).delete(&key, marker.revision).await;
            }
            if let Some(lease) = ctx.buckets.leaders.get::<serde_json::Value>(&lease_key(&id)).await? {
                let _ = ctx.buckets.leaders.delete(&lease_key(&id), lease.revision).await;
            }
            continue;
        };
        tracing::warn!(broadcast = %id, "completing an interrupted broadcast");
        let view = run_with_lease(ctx, doc.value, holder.to_string(), revision).await?;
        tracing::info!(broadcast = %id, enqueued = view.enqueued_count, failed = view.failed_count, "broadcast recovered");
    }
    Ok(())
}
