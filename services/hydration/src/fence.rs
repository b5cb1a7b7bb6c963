//! Lease fencing for side effects done under a job lease (history append, hydration bundle).
//!
//! The queue leader records every lease in `af_queue_state` *before* it hands the job out, and
//! removes it when the job completes, fails or its lease is recovered. A worker's side effect is
//! accepted only while that record names the worker and has not expired, so a worker whose lease
//! moved on (expired, recovered, reassigned) is refused. Admins act without a lease.

use common::OpError;
use common::auth::{Caller, Role};
use common::clock::Millis;
use common::model::{ConversationRecord, QueueState};
use common::service::ServiceContext;
use common::token::escape;

pub(crate) async fn conversation(
    ctx: &ServiceContext,
    conversation_id: &str,
) -> Result<Option<ConversationRecord>, OpError> {
    let record = ctx.buckets.conversations.get::<ConversationRecord>(&escape(conversation_id)).await;
    Ok(record.map_err(OpError::internal)?.map(|v| v.value))
}

pub(crate) async fn queue_state(ctx: &ServiceContext, conversation_id: &str) -> Result<Option<QueueState>, OpError> {
    let state = ctx.buckets.queue_state.get::<QueueState>(&escape(conversation_id)).await;
    Ok(state.map_err(OpError::internal)?.map(|v| v.value))
}

/// Whether `worker_id` holds an unexpired lease on the conversation's head job at `now`.
pub(crate) fn holds_lease(state: &QueueState, worker_id: &str, now: Millis) -> bool {
    let lease = state.head.as_ref().and_then(|h| h.lease.as_ref());
    lease.is_some_and(|l| l.worker_id == worker_id && l.expires_at > now)
}

/// Checks that a worker caller holds the conversation's lease; other roles that reach here
/// (admins) pass.
pub(crate) async fn require_lease(ctx: &ServiceContext, caller: &Caller, conversation_id: &str) -> Result<(), OpError> {
    if caller.role != Role::Worker {
        return Ok(());
    }
    let worker_id = caller.worker_id.as_deref().unwrap_or_default();
    let state = queue_state(ctx, conversation_id).await?;
    match state {
        Some(s) if holds_lease(&s, worker_id, ctx.clock.now_ms()) => Ok(()),
        _ => Err(not_holder(worker_id, conversation_id)),
    }
}

pub(crate) fn not_holder(worker_id: &str, conversation_id: &str) -> OpError {
    OpError::forbidden(format!(
        "worker '{worker_id}' does not hold the lease of conversation '{conversation_id}' (expired or moved on)"
    ))
}
