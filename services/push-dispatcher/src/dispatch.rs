//! Dispatch of push jobs (spec §3.18.5): the leader-elected loop that fires each due job at its
//! slot, `dispatchDuePushJobs`, `triggerPushJobNow` (and its per-agent variant), and the audit
//! rows.
//!
//! # One run of a job, idempotent per run key
//!
//! A run is named by its run key (`scheduled:<jobId>:<slot>` or `manual:<jobId>:<now>`) and
//! goes through these steps, each safe to repeat:
//! 1. the audit row `d.<jobId>.<run key>` (`af_push_dispatches`) exists → the run happened:
//!    only step 4 remains;
//! 2. enqueue with `idempotencyKey = run key`: a repeat within `queue.idempotency_window_ms`
//!    returns the first message's id and queues nothing;
//! 3. create the audit row (create-only);
//! 4. advance the job by CAS, only if its `nextRunAt` is still the slot that was fired.
//!
//! A process killed between any two steps leaves the job due at the same slot; whoever runs it
//! next (the new leader, or `dispatchDuePushJobs`) repeats the run under the same key and the
//! queue answers with the message already queued: never two messages.
//!
//! # Catch-up (spec §6.7 P3)
//!
//! A slot fired within `push.catch_up_grace_ms` of its time is on time. A slot older than that
//! was missed (the dispatcher was down): with `catchUp = skip` (default) it is dropped and the
//! job moves to its next slot after now; with `latest` the newest missed slot fires once, under
//! its own run key.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use common::OpError;
use common::api;
use common::api::push::{
    CatchUp, ConversationStats, DispatchStatus, DispatchSummary, DispatchView, PushJobView, PushStats, TriggerResult,
    UsageStats,
};
use common::api::queue::JobStatus;
use common::auth::Caller;
use common::clock::Millis;
use common::ids::{ConversationId, MessageId, PushJobId};
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::store::JsonStore;
use common::token::escape;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::jobs::{self, find_job, next_for, user_jobs};
use crate::target::{self, Target};

pub const NO_ACTIVE_AGENT: &str = "No active agent binding for user";

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::TriggerPushJobNow, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        trigger(&ctx, &a.job_id, None).await
    });
    ops.handle::<api::TriggerPushJobNowForAgent, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        trigger(&ctx, &a.job_id, Some((a.consumer_user_id.as_str(), a.agent_key.as_str()))).await
    });
    ops.handle::<api::DispatchDuePushJobs, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        dispatch_due(&ctx, a.limit.unwrap_or(200).clamp(1, 1000) as usize).await
    });
    ops.handle::<api::ListPushDispatchesByJob, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let limit = a.limit.unwrap_or(50).clamp(1, 200) as usize;
        let mut rows = job_dispatches(&ctx, &a.job_id).await?;
        rows.truncate(limit);
        Ok(rows)
    });
    ops.handle::<api::ListPushDispatchesForAgent, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let limit = a.limit.unwrap_or(50).clamp(1, 200) as usize;
        let mut rows = agent_dispatches(&ctx, &a.consumer_user_id, &a.agent_key).await?;
        rows.truncate(limit);
        Ok(rows)
    });
    ops.handle::<api::GetUserAgentPushStats, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        push_stats(&ctx, &a.consumer_user_id, &a.agent_key).await
    });
    ops.handle::<api::GetUserAgentConversationStats, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        conversation_stats(&ctx, &a.consumer_user_id, &a.agent_key).await
    });
    ops.handle::<api::GetUserAgentUsageStats, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let push = push_stats(&ctx, &a.consumer_user_id, &a.agent_key).await?;
        let conv = conversation_stats(&ctx, &a.consumer_user_id, &a.agent_key).await?;
        Ok(UsageStats {
            total_push_jobs: push.total_push_jobs,
            active_push_jobs: push.active_push_jobs,
            total_dispatches: push.total_dispatches,
            latest_dispatch_at: push.latest_dispatch_at,
            context_messages: conv.context_messages,
            queued_messages: conv.queued_messages,
            failed_messages: conv.failed_messages,
        })
    });
}

async fn push_stats(ctx: &ServiceContext, user: &str, agent: &str) -> Result<PushStats, OpError> {
    let jobs: Vec<PushJobView> =
        user_jobs(ctx, user).await?.into_iter().filter(|j| j.agent_key.as_deref() == Some(agent)).collect();
    let dispatches = agent_dispatches(ctx, user, agent).await?;
    Ok(PushStats {
        total_push_jobs: jobs.len() as u64,
        active_push_jobs: jobs.iter().filter(|j| j.enabled).count() as u64,
        total_dispatches: dispatches.len() as u64,
        latest_dispatch_at: dispatches.iter().map(|d| d.created_at).max(),
    })
}

/// Spec §3.18.6: zeros unless the user's active agent is `agent`; else the history length and
/// the queue counts of the binding's conversation.
async fn conversation_stats(ctx: &ServiceContext, user: &str, agent: &str) -> Result<ConversationStats, OpError> {
    let Some(to) = target::active_target(ctx, user).await?.filter(|t| t.agent_key == agent) else {
        return Ok(ConversationStats::default());
    };
    let conversation = ConversationId::parse(&to.conversation_id)?;
    let mut stats = ConversationStats::default();
    let mut cursor = None;
    loop {
        let args = api::history::HistoryArgs { conversation_id: conversation.clone(), limit: Some(200), cursor };
        let page = ctx.call_service::<api::GetConversationHistory>(&args).await?;
        stats.context_messages += page.items.len() as u64;
        match page.next_cursor {
            Some(next) if !page.items.is_empty() => cursor = Some(next),
            _ => break,
        }
    }
    let args = api::queue::ConversationArgs { conversation_id: conversation, limit: Some(500) };
    for job in ctx.call_service::<api::ListQueueItemsForConversation>(&args).await? {
        match job.status {
            JobStatus::Queued | JobStatus::Processing => stats.queued_messages += 1,
            JobStatus::Failed | JobStatus::DeadLetter => stats.failed_messages += 1,
            JobStatus::Done => {}
        }
    }
    Ok(stats)
}

fn dispatches(ctx: &ServiceContext) -> &JsonStore {
    &ctx.buckets.push_dispatches
}

pub fn dispatch_key(job_id: &str, run_key: &str) -> String {
    format!("d.{job_id}.{}", escape(run_key))
}

/// Every dispatch of a job, newest first (spec §6.7 P5: the original paged in run-key order).
async fn job_dispatches(ctx: &ServiceContext, job_id: &str) -> Result<Vec<DispatchView>, OpError> {
    let mut rows: Vec<DispatchView> = dispatches(ctx)
        .scan::<DispatchView>(&format!("d.{job_id}.*"))
        .await?
        .into_iter()
        .map(|(_, v)| v.value)
        .collect();
    rows.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.run_key.cmp(&a.run_key)));
    Ok(rows)
}

async fn agent_dispatches(ctx: &ServiceContext, user: &str, agent: &str) -> Result<Vec<DispatchView>, OpError> {
    let mut all = Vec::new();
    for job in user_jobs(ctx, user).await?.into_iter().filter(|j| j.agent_key.as_deref() == Some(agent)) {
        all.extend(job_dispatches(ctx, &job.id).await?);
    }
    all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.run_key.cmp(&a.run_key)));
    Ok(all)
}

/// The enqueue of one push run to `to` (spec §3.18.5 payload and metadata).
async fn enqueue_push(
    ctx: &ServiceContext,
    job: &PushJobView,
    to: &Target,
    run_key: &str,
    mode: &str,
) -> Result<MessageId, OpError> {
    let mut metadata = BTreeMap::new();
    metadata.insert("pushJobId".to_string(), job.id.to_string());
    metadata.insert("runKey".to_string(), run_key.to_string());
    metadata.insert("pushMode".to_string(), mode.to_string());
    metadata.insert("conversationTargetSource".to_string(), to.source.to_string());
    if let Some(chat) = &to.telegram_chat_id {
        metadata.insert("telegramChatId".to_string(), chat.clone());
    }
    if let Some(user) = &to.telegram_user_id {
        metadata.insert("telegramUserId".to_string(), user.clone());
    }
    target::enqueue(
        ctx,
        target::Outgoing {
            conversation_id: &to.conversation_id,
            agent_key: &to.agent_key,
            provider: to.provider,
            provider_user_id: &to.provider_user_id,
            text: &job.text,
            metadata,
            idempotency_key: Some(run_key.to_string()),
        },
    )
    .await
}

/// Writes the audit row of a run; an existing row (a repeat) is kept as it is.
async fn record(
    ctx: &ServiceContext,
    job_id: &PushJobId,
    run_key: &str,
    scheduled_for: Millis,
    outcome: &Result<MessageId, OpError>,
) -> Result<bool, OpError> {
    let key = dispatch_key(job_id, run_key);
    let row = DispatchView {
        id: key.clone(),
        job_id: job_id.clone(),
        run_key: run_key.to_string(),
        status: if outcome.is_ok() { DispatchStatus::Enqueued } else { DispatchStatus::Failed },
        scheduled_for,
        enqueued_message_id: outcome.as_ref().ok().cloned(),
        created_at: ctx.clock.now_ms(),
        error: outcome.as_ref().err().map(|e| e.message.clone()),
    };
    match dispatches(ctx).create(&key, &row).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_conflict() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Advances the job after a run (spec: lastRunAt, lastRunKey, nextRunAt from now), only if it is
/// still at `expected_next` (for scheduled runs; `None` = unconditionally, manual runs).
async fn advance(
    ctx: &ServiceContext,
    key: &str,
    expected_next: Option<Millis>,
    run_key: Option<&str>,
    agent_key: Option<&str>,
) -> Result<(), OpError> {
    let now = ctx.clock.now_ms();
    jobs::jobs(ctx)
        .modify::<PushJobView, OpError, _>(key, |current| {
            let Some(mut job) = current else { return Ok(None) };
            if expected_next.is_some() && job.next_run_at != expected_next {
                return Ok(None);
            }
            if let Some(run_key) = run_key {
                job.last_run_at = Some(now);
                job.last_run_key = Some(run_key.to_string());
            }
            if let Some(agent) = agent_key {
                job.agent_key = Some(agent.to_string());
            }
            job.next_run_at = next_for(&job, now)?;
            job.updated_at = now;
            Ok(Some(job))
        })
        .await?;
    Ok(())
}

/// `triggerPushJobNow` (spec §3.18.5) and `triggerPushJobNowForAgent` (§3.18.6, `owner`).
async fn trigger(
    ctx: &ServiceContext,
    job_id: &PushJobId,
    owner: Option<(&str, &str)>,
) -> Result<TriggerResult, OpError> {
    let found = find_job(ctx, job_id).await?;
    let (key, job) = match (found, owner) {
        (Some((key, job)), Some((user, agent)))
            if job.value.consumer_user_id == user && job.value.agent_key.as_deref() == Some(agent) =>
        {
            (key, job.value)
        }
        (_, Some(_)) => return Err(OpError::not_found("Push job not found for agent")),
        (Some((key, job)), None) => (key, job.value),
        (None, None) => return Err(OpError::not_found("Push job not found")),
    };
    // P4: no push without an active binding, and never into another agent's conversation.
    let to = target::active_target(ctx, &job.consumer_user_id)
        .await?
        .filter(|t| owner.is_none_or(|(_, agent)| t.agent_key == agent))
        .ok_or_else(|| OpError::not_found(NO_ACTIVE_AGENT))?;
    let now = ctx.clock.now_ms();
    let run_key = format!("manual:{}:{now}", job.id);
    let message_id = enqueue_push(ctx, &job, &to, &run_key, "manual").await?;
    record(ctx, &job.id, &run_key, now, &Ok(message_id.clone())).await?;
    advance(ctx, &key, None, Some(&run_key), Some(&to.agent_key)).await?;
    Ok(TriggerResult { enqueued_message_id: message_id, run_key })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    NotDue,
    Enqueued,
    Skipped,
    Failed,
}

/// Fires job `key` if it is due now: one run, idempotent per run key (module doc).
pub async fn dispatch_job(ctx: &ServiceContext, key: &str) -> Result<Outcome, OpError> {
    let Some(current) = jobs::jobs(ctx).get::<PushJobView>(key).await? else { return Ok(Outcome::NotDue) };
    let job = current.value;
    let now = ctx.clock.now_ms();
    let Some(slot) = job.next_run_at.filter(|at| job.enabled && *at <= now) else { return Ok(Outcome::NotDue) };
    let fire = if now - slot <= ctx.settings.push.catch_up_grace_ms {
        Some(slot)
    } else {
        match job.catch_up {
            CatchUp::Skip => None,
            CatchUp::Latest => Some(latest_missed(&job, slot, now)?),
        }
    };
    let Some(fire) = fire else {
        tracing::info!(job = %job.id, slot, "missed slot skipped (catch-up policy skip)");
        advance(ctx, key, Some(slot), None, None).await?;
        return Ok(Outcome::Skipped);
    };
    let run_key = format!("scheduled:{}:{fire}", job.id);
    if dispatches(ctx).get::<serde_json::Value>(&dispatch_key(&job.id, &run_key)).await?.is_some() {
        advance(ctx, key, Some(slot), Some(&run_key), None).await?;
        return Ok(Outcome::Skipped);
    }
    let to = target::active_target(ctx, &job.consumer_user_id).await?;
    let (outcome, agent) = match &to {
        // P4: a user without an active binding gets a failed dispatch, never a push into a
        // `user-agent:default:` conversation of another agent.
        None => (Err(OpError::not_found(NO_ACTIVE_AGENT)), None),
        Some(to) => match enqueue_push(ctx, &job, to, &run_key, "scheduled").await {
            Err(e)
                if e.code == common::error::ErrorCode::Unavailable || e.code == common::error::ErrorCode::Internal =>
            {
                // Not a verdict on this run: leave the job due and let the loop retry.
                return Err(e);
            }
            outcome => (outcome, Some(to.agent_key.as_str())),
        },
    };
    let wrote = record(ctx, &job.id, &run_key, fire, &outcome).await?;
    advance(ctx, key, Some(slot), Some(&run_key), agent.filter(|_| outcome.is_ok())).await?;
    Ok(match (wrote, outcome.is_ok()) {
        (false, _) => Outcome::Skipped,
        (true, true) => Outcome::Enqueued,
        (true, false) => Outcome::Failed,
    })
}

/// The newest slot at or before `now`, starting from the missed `slot`.
fn latest_missed(job: &PushJobView, slot: Millis, now: Millis) -> Result<Millis, OpError> {
    let mut latest = slot;
    for _ in 0..100_000 {
        match next_for(job, latest)? {
            Some(next) if next <= now => latest = next,
            _ => break,
        }
    }
    Ok(latest)
}

fn count(summary: &mut DispatchSummary, outcome: Outcome) {
    match outcome {
        Outcome::NotDue => {}
        Outcome::Enqueued => summary.enqueued += 1,
        Outcome::Skipped => summary.skipped += 1,
        Outcome::Failed => summary.failed += 1,
    }
}

/// `dispatchDuePushJobs`: one pass over the due jobs, oldest slot first, at most `limit`.
/// Only enabled jobs with a `nextRunAt` are candidates, so manual jobs never fill the window
/// (spec §6.7 P2).
pub async fn dispatch_due(ctx: &ServiceContext, limit: usize) -> Result<DispatchSummary, OpError> {
    let now = ctx.clock.now_ms();
    let mut due: Vec<(Millis, String)> = jobs::jobs(ctx)
        .scan::<PushJobView>("j.>")
        .await?
        .into_iter()
        .filter_map(|(key, v)| v.value.next_run_at.filter(|at| v.value.enabled && *at <= now).map(|at| (at, key)))
        .collect();
    due.sort();
    due.truncate(limit);
    let mut summary = DispatchSummary { scanned: due.len() as u64, ..Default::default() };
    let results: Vec<Result<Outcome, OpError>> = futures::stream::iter(due)
        .map(|(_, key)| async move { dispatch_job(ctx, &key).await })
        .buffer_unordered(ctx.settings.push.concurrency)
        .collect()
        .await;
    for result in results {
        match result {
            Ok(outcome) => count(&mut summary, outcome),
            Err(e) => {
                tracing::warn!(error = %e, "push dispatch failed; the job stays due");
                summary.failed += 1;
            }
        }
    }
    Ok(summary)
}

/// The dispatch leader's loop: an index of every enabled job's `nextRunAt`, kept by a watch
/// of `af_push_jobs` (rebuilt from JetStream whenever leadership starts), and a timer on the
/// business clock at the earliest slot. Due jobs are taken from the front of the index and
/// fired at once, `push.concurrency` at a time; a fired job comes back into the index when its
/// advanced document arrives through the watch. A run that failed for a transient reason (a
/// service or the store unavailable) is retried after a short real-time pause.
pub async fn run_loop(ctx: ServiceContext, lead: CancellationToken) {
    let mut watch = match jobs::jobs(&ctx).raw().watch_with_history("j.>").await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch push jobs; stepping down");
            return;
        }
    };
    let concurrency = ctx.settings.push.concurrency;
    let mut due: BTreeSet<(Millis, String)> = BTreeSet::new();
    let mut at: HashMap<String, Millis> = HashMap::new();
    let mut running: HashSet<String> = HashSet::new();
    let mut retry: Vec<(tokio::time::Instant, Millis, String)> = Vec::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Millis, bool)>();
    loop {
        let now = ctx.clock.now_ms();
        while running.len() < concurrency {
            let Some((slot, key)) = due.first().cloned().filter(|(t, _)| *t <= now) else { break };
            due.remove(&(slot, key.clone()));
            if !running.insert(key.clone()) {
                // Already being fired: that run advances the job, and the watch re-indexes it.
                continue;
            }
            let (ctx, tx) = (ctx.clone(), done_tx.clone());
            tokio::spawn(async move {
                let ok = match dispatch_job(&ctx, &key).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(job = %key, error = %e, "push dispatch failed; retrying");
                        false
                    }
                };
                let _ = tx.send((key, slot, ok));
            });
        }
        let next_due = due.first().map(|(t, _)| *t).filter(|_| running.len() < concurrency);
        let next_retry = retry.iter().map(|(i, _, _)| *i).min();
        tokio::select! {
            _ = lead.cancelled() => return,
            entry = watch.next() => {
                let Some(Ok(entry)) = entry else {
                    tracing::warn!("push job watch ended; stepping down to rebuild");
                    return;
                };
                let key = entry.key.clone();
                if let Some(old) = at.remove(&key) {
                    due.remove(&(old, key.clone()));
                }
                if entry.operation == async_nats::jetstream::kv::Operation::Put
                    && let Ok(job) = serde_json::from_slice::<IndexedJob>(&entry.value)
                    && let Some(next) = job.next_run_at.filter(|_| job.enabled)
                {
                    at.insert(key.clone(), next);
                    due.insert((next, key));
                }
            }
            Some((key, slot, ok)) = done_rx.recv() => {
                running.remove(&key);
                if !ok && at.get(&key) == Some(&slot) {
                    retry.push((tokio::time::Instant::now() + RETRY_PAUSE, slot, key));
                }
            }
            _ = async {
                match next_retry {
                    Some(when) => tokio::time::sleep_until(when).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = tokio::time::Instant::now();
                let (ready, waiting): (Vec<_>, Vec<_>) = retry.drain(..).partition(|(when, _, _)| *when <= now);
                retry = waiting;
                for (_, slot, key) in ready {
                    if at.get(&key) == Some(&slot) {
                        due.insert((slot, key));
                    }
                }
            }
            _ = sleep_until(&ctx, next_due) => {}
        }
    }
}

/// Pause before a run that failed transiently is tried again.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// The fields of a job document the loop's index needs.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexedJob {
    enabled: bool,
    next_run_at: Option<Millis>,
}

async fn sleep_until(ctx: &ServiceContext, at: Option<Millis>) {
    match at {
        Some(at) => ctx.clock.sleep_until(at).await,
        None => std::future::pending().await,
    }
}
