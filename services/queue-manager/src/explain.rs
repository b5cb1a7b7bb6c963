//! `explainConversation`: why a conversation's message is not answered yet, in one answer.
//!
//! Read-only, served by every replica: it asks the leader for the conversation's jobs and the
//! worker rows (the same operations an operator would call), reads the lease from
//! `af_queue_state`, the trace context from the message's inbox headers, and asks hydration for
//! the newest snapshot. It composes; it decides nothing and writes nothing.

use common::OpError;
use common::api::queue::{
    ConversationArgs, ConversationExplanation, ExplainArgs, JobStatus, JobView, NowArgs, Verdict, WorkerView,
};
use common::api::snapshots::ConversationSnapshotsArgs;
use common::api::{self, Ignored};
use common::model::{QueueState, WorkerStatus};
use common::service::ServiceContext;

use crate::model::{DeadLetter, Job};

/// Jobs listed with the explanation.
const JOBS: usize = 20;

pub async fn explain(ctx: &ServiceContext, args: ExplainArgs) -> Result<ConversationExplanation, OpError> {
    let conversation_id = args.conversation_id.to_string();
    let token = common::token::escape(&conversation_id);
    let list = ConversationArgs { conversation_id: args.conversation_id.clone(), limit: Some(JOBS) };
    let mut jobs = ctx.call_service::<api::ListQueueItemsForConversation>(&list).await?;
    for job in &mut jobs {
        job.payload = None;
    }
    let state = ctx
        .buckets
        .queue_state
        .get::<QueueState>(&token)
        .await
        .map_err(|e| OpError::unavailable(format!("reading the queue state: {e}")))?
        .map(|v| v.value)
        .unwrap_or_default();
    let workers = ctx.call_service::<api::ListWorkersForScheduler>(&NowArgs::default()).await?;
    // Hydration being away costs the snapshot line, not the explanation.
    let snapshots = ConversationSnapshotsArgs {
        conversation_id: Some(args.conversation_id.clone()),
        limit: Some(1),
        now_ms: Ignored,
    };
    let last_snapshot = match ctx.call_service::<api::ListSnapshotsForConversation>(&snapshots).await {
        Ok(mut rows) => rows.drain(..).next(),
        Err(e) => {
            tracing::debug!(error = %e.message, "explainConversation: no snapshot list");
            None
        }
    };

    let now = ctx.clock.now_ms();
    let unfinished = |j: &&JobView| matches!(j.status, JobStatus::Queued | JobStatus::Processing);
    let unanswered = jobs.iter().filter(unfinished).count() as u32;
    // Newest first: the oldest unanswered one is the last of them.
    let head = jobs.iter().rev().find(|j| unfinished(j)).cloned();
    let dead = jobs.first().filter(|j| j.status == JobStatus::DeadLetter).cloned();
    let lease = state.head.as_ref().and_then(|h| h.lease.clone());
    let assigned = |w: &&WorkerView| {
        w.status != WorkerStatus::Stopped && w.assignment.as_ref().is_some_and(|a| a.conversation_id == conversation_id)
    };
    let worker = match &lease {
        Some(lease) => workers.iter().find(|w| w.worker_id == lease.worker_id).cloned(),
        None => workers.iter().find(assigned).cloned(),
    };

    let (verdict, reason) = verdict(ctx, now, head.as_ref(), dead.as_ref(), lease.as_ref(), worker.as_ref());
    let message = head.or(dead);
    let trace_id = match &message {
        Some(job) => trace_of(ctx, &token, &state, job).await,
        None => None,
    };
    Ok(ConversationExplanation {
        conversation_id,
        verdict,
        reason,
        message,
        lease,
        worker,
        last_snapshot,
        trace_id,
        unanswered,
        jobs,
        now,
    })
}

fn ago(now: i64, then: i64) -> String {
    format!("{} s ago", (now - then).max(0) / 1000)
}

fn verdict(
    ctx: &ServiceContext,
    now: i64,
    head: Option<&JobView>,
    dead: Option<&JobView>,
    lease: Option<&common::model::Lease>,
    worker: Option<&WorkerView>,
) -> (Verdict, String) {
    let error = |j: &JobView| j.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
    let Some(job) = head else {
        return match dead {
            Some(d) => (
                Verdict::DeadLettered,
                format!(
                    "message {} was dead-lettered after {} attempt(s){}; requeue it from the dead letters",
                    d.id.as_str(),
                    d.attempts,
                    error(d)
                ),
            ),
            None => (Verdict::Idle, "nothing is waiting: every message of this conversation was answered".into()),
        };
    };
    let id = job.id.as_str();
    if let Some(lease) = lease {
        let state = worker.map(|w| format!("{}, heartbeat {}", w.status.as_str(), ago(now, w.heartbeat_at)));
        let state = state.unwrap_or_else(|| "no worker row".into());
        if lease.expires_at <= now {
            return (
                Verdict::LeaseExpired,
                format!(
                    "worker {} ({state}) let its lease on message {id} expire {}; lease recovery puts the message back",
                    lease.worker_id,
                    ago(now, lease.expires_at)
                ),
            );
        }
        return (
            Verdict::Processing,
            format!(
                "worker {} ({state}) is processing message {id}; its lease runs {} s more",
                lease.worker_id,
                (lease.expires_at - now) / 1000
            ),
        );
    }
    if job.scheduled_for > now {
        let wait = (job.scheduled_for - now + 999) / 1000;
        return match job.attempts {
            0 => (Verdict::Scheduled, format!("message {id} is scheduled: due in {wait} s")),
            n => (
                Verdict::RetryBackoff,
                format!("attempt {n} of message {id} failed{}; it is retried in {wait} s", error(job)),
            ),
        };
    }
    let failed = match job.attempts {
        0 => String::new(),
        n => format!(" ({n} failed attempt(s){})", error(job)),
    };
    match worker.filter(|w| w.status == WorkerStatus::Active) {
        Some(w) => (
            Verdict::WaitingForClaim,
            format!(
                "message {id} is due{failed}; worker {} (active, heartbeat {}) serves the conversation and has not claimed it yet",
                w.worker_id,
                ago(now, w.heartbeat_at)
            ),
        ),
        None => {
            let pool = if ctx.settings.loops.reconcile && !ctx.settings.loops.manual {
                "the scheduler spawns one on its next reconcile"
            } else {
                "the reconcile loop is off (loops.reconcile): run reconcileWorkerPool to spawn one"
            };
            (
                Verdict::WaitingForWorker,
                format!("message {id} is due{failed} and no worker serves this conversation; {pool}"),
            )
        }
    }
}

/// The trace id in the `traceparent` header the message was enqueued with.
async fn trace_of(ctx: &ServiceContext, token: &str, state: &QueueState, job: &JobView) -> Option<String> {
    let stream = crate::enqueue::inbox(&ctx.js).await.ok()?;
    let message = if job.status == JobStatus::DeadLetter {
        let dead = ctx.buckets.dead_letters.get::<DeadLetter>(job.id.as_str()).await.ok()??;
        stream.direct_get(dead.value.seq).await.ok()?
    } else {
        match &state.head {
            Some(head) if head.message_id == job.id.as_str() => stream.direct_get(head.seq).await.ok()?,
            _ => {
                let subject = common::topology::inbox_subject(token);
                stream.direct_get_next_for_subject(subject, Some(state.done_seq + 1)).await.ok()?
            }
        }
    };
    let body: Job = serde_json::from_slice(&message.payload).ok()?;
    if body.message_id != job.id.as_str() {
        return None;
    }
    let traceparent = message.headers.get("traceparent")?;
    common::audit::trace_id(traceparent.as_str())
}
