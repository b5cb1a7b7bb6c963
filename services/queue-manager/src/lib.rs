//! The conversation queue: enqueue, claim with long polling, leases and heartbeats,
//! complete/fail with the original's retry backoff, dead letters, lease recovery, and worker
//! rows with their lifecycle.
//!
//! Every replica serves `enqueueMessage` (it only validates and publishes to the inbox). The
//! other queue operations are served by the elected leader, whose dispatcher holds the index;
//! standbys take over by replaying JetStream when the leader's lease lapses.

pub mod dispatcher;
pub mod enqueue;
pub mod explain;
pub mod extras;
pub mod model;
pub mod retry;
pub mod workers;

use common::OpError;
use common::api::{self, Ignored, Operation};
use common::auth::{Caller, Role};
use common::ops::{Encoded, OpRegistry};
use common::service::ServiceContext;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dispatcher::{Answer, Command, Dispatcher};
use crate::model::*;

pub const SERVICE: &str = "queue-manager";

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    common::telemetry::register_series(SERVICE);
    // The queue carries most of the stack's traffic; it does not share its connection.
    let ctx = ctx.with_own_connection(SERVICE).await?;
    let enqueuer = enqueue::Enqueuer::start(ctx.clone()).await?;
    let mut ops = OpRegistry::new();
    ops.handle::<api::EnqueueMessage, _, _, _, _>(&enqueuer, |enqueuer, _: Caller, args| async move {
        enqueuer.enqueue(args).await
    });
    register_system_ops(&ctx, &mut ops);
    ops.handle::<api::ExplainConversation, _, _, _, _>(&ctx, |c, _: Caller, args| async move {
        explain::explain(&c, args).await
    });
    // The pid in the holder name lets operators (and the failover test) see which process leads.
    let holder = format!("{}-{}-{}", SERVICE, std::process::id(), uuid::Uuid::new_v4());
    let leader_ctx = ctx.clone();
    let elected = common::leader::run_elected(
        ctx.buckets.leaders.clone(),
        "queue",
        &holder,
        shutdown.clone(),
        move |leadership| lead(leader_ctx.clone(), leadership),
    );
    let health = common::service::serve_health(ctx.clone(), SERVICE, shutdown.clone());
    let serve = ops.serve(ctx, shutdown);
    let ((), health, serve) = tokio::join!(elected, health, serve);
    health.and(serve)
}

fn register_system_ops(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::GetTestClock, _, _, _, _>(ctx, |c, _: Caller, _| async move {
        Ok(common::system::get_test_clock(&c))
    });
    ops.handle::<api::SetTestClock, _, _, _, _>(ctx, |c, _: Caller, args| async move {
        common::system::set_test_clock(&c, args).await
    });
    ops.handle::<api::AdvanceTestClock, _, _, _, _>(ctx, |c, _: Caller, args| async move {
        common::system::advance_test_clock(&c, args).await
    });
    ops.handle::<api::IssueWorkerToken, _, _, _, _>(ctx, |c, _: Caller, args| async move {
        Ok(WorkerToken { token: c.auth.mint_worker_token(&args.worker_id)? })
    });
}

/// The changes the console shows live: queue state, dead letters, workers, and each new message
/// (its subject only: the consumer is headers-only, so no text is read).
async fn console_watches(ctx: ServiceContext) -> anyhow::Result<Vec<BoxStream<'static, anyhow::Result<String>>>> {
    use async_nats::jetstream::consumer::{DeliverPolicy, push};
    use common::console_events::{kv_notices, notice};
    let inbox = ctx
        .js
        .get_stream(common::topology::INBOX_STREAM)
        .await?
        .create_consumer(push::OrderedConfig {
            deliver_subject: ctx.nats.new_inbox(),
            deliver_policy: DeliverPolicy::New,
            headers_only: true,
            ..Default::default()
        })
        .await?
        .messages()
        .await?
        .map(|m| {
            let prefix = format!("{}.", common::topology::INBOX_SUBJECT_PREFIX);
            m.map(|m| notice("queue", m.subject.as_str().strip_prefix(&prefix))).map_err(Into::into)
        })
        .boxed();
    let b = &ctx.buckets;
    Ok(vec![
        kv_notices("queue", true, b.queue_state.raw().watch_all().await?),
        kv_notices("queue", true, b.dead_letters.raw().watch_all().await?),
        kv_notices("workers", true, b.workers.raw().watch_all().await?),
        inbox,
    ])
}

/// Leads the queue while `leadership` holds: rebuilds the index, then serves the leader-only
/// operations until leadership ends.
async fn lead(ctx: ServiceContext, leadership: CancellationToken) {
    let (ready_tx, mut ready_rx) = watch::channel(false);
    // The dispatcher's inbox tail and lease writes get a connection of their own too.
    let ctx = match ctx.with_own_connection("queue-dispatcher").await {
        Ok(ctx) => ctx,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "could not connect the queue dispatcher");
            return;
        }
    };
    // The console's change notices come from the leader alone: one notice per change.
    tokio::spawn(common::console_events::publish_changes(ctx.clone(), leadership.clone(), console_watches));
    // The dispatcher outlives the serving of operations by the time the requests already taken
    // need to finish (`OpRegistry::serve`); its writes stay fenced by compare-and-set.
    let dispatching = CancellationToken::new();
    let _stop_dispatching = dispatching.clone().drop_guard();
    // Boxed: the rebuild future is large and would otherwise sit on the caller's stack.
    let (dispatcher, handle) =
        match Box::pin(Dispatcher::start(ctx.clone(), leadership.clone(), dispatching.clone(), ready_tx)).await {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "could not start the queue dispatcher");
                // Back off before the lease is given up and perhaps retaken.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                return;
            }
        };
    let caught_up = tokio::select! {
        _ = leadership.cancelled() => false,
        ready = ready_rx.wait_for(|ready| *ready) => ready.is_ok(),
    };
    if caught_up {
        let mut ops = OpRegistry::new();
        register_leader_ops(&mut ops, &dispatcher, &ctx);
        if let Err(e) = ops.serve(ctx, leadership.clone()).await {
            tracing::error!(error = %e, "serving queue operations failed");
        }
    }
    leadership.cancel();
    dispatching.cancel();
    let _ = handle.await;
}

fn register_leader_ops(ops: &mut OpRegistry, d: &Dispatcher, ctx: &ServiceContext) {
    let js = &ctx.js;
    /// Serves `$op` from the leader's dispatcher; the dispatcher answers JSON it encoded
    /// itself as the contract's result.
    macro_rules! route {
        ($op:ident, |$caller:pat_param, $a:pat_param, $d:ident, $js:pat_param| $body:expr) => {
            ops.handle::<api::$op, _, _, _, _>(&(d.clone(), js.clone()), |($d, $js), $caller, $a| async move {
                let answer: Answer = $body?;
                Ok(Encoded::<<api::$op as Operation>::Output>::trusting(answer))
            });
        };
    }
    route!(ClaimNextJob, |caller, args, d, js| {
        caller.require_worker(&args.worker_id)?;
        // A long poll is woken by the enqueue itself; an immediate claim must first see
        // every enqueue acknowledged before it.
        if args.wait_ms.unwrap_or(0) == 0 {
            d.barrier(&js).await?;
        }
        d.ask(|reply| Command::Claim { args, reply }).await
    });
    route!(HeartbeatJob, |caller, args, d, _js| {
        caller.require_worker(&args.worker_id)?;
        d.ask(|reply| Command::Heartbeat { args, reply }).await
    });
    route!(CompleteJob, |caller, args, d, _js| {
        caller.require_worker(&args.worker_id)?;
        d.ask(|reply| Command::Complete { args, reply }).await
    });
    route!(CompleteAndClaimNext, |caller, args, d, _js| {
        caller.require_worker(&args.worker_id)?;
        let claim = ClaimArgs {
            worker_id: args.worker_id.clone(),
            conversation_id: None,
            wait_ms: args.wait_ms,
            now_ms: Ignored,
        };
        let lease = LeaseArgs {
            worker_id: args.worker_id,
            message_id: args.message_id,
            lease_id: args.lease_id,
            now_ms: Ignored,
            provider_config: Ignored,
        };
        d.ask(|reply| Command::CompleteAndClaim { args: lease, claim, reply }).await
    });
    route!(FailJob, |caller, args, d, _js| {
        caller.require_worker(&args.worker_id)?;
        d.ask(|reply| Command::Fail { args, reply }).await
    });
    route!(ReleaseStuckJobs, |_caller, args, d, _js| {
        let limit = args.limit.unwrap_or(100);
        d.ask(|reply| Command::Release { limit, reply: Some(reply) }).await
    });
    route!(GetQueueStats, |_caller, _args, d, js| {
        d.barrier(&js).await?;
        d.ask(|reply| Command::Stats { reply }).await
    });
    route!(ListJobsByStatus, |_caller, args, d, js| {
        d.barrier(&js).await?;
        d.ask(|reply| Command::ListJobs { args, reply }).await
    });
    ops.handle::<api::ListQueueItemsForConversation, _, _, _, _>(
        &(d.clone(), ctx.clone()),
        |(d, ctx), _: Caller, args| async move {
            let conversation_id = args.conversation_id.clone();
            d.barrier(&ctx.js).await?;
            let answer: Answer = d.ask(|reply| Command::ListConversation { args, reply }).await?;
            let answer = extras::apply_to_queue_items(&ctx, &conversation_id, answer).await?;
            Ok(Encoded::<<api::ListQueueItemsForConversation as Operation>::Output>::trusting(answer))
        },
    );
    route!(HasQueuedJobsForConversation, |caller, args, d, js| {
        if caller.role == Role::Worker {
            let worker_id = caller.worker_id.clone().unwrap_or_default();
            let (tx, rx) = tokio::sync::oneshot::channel();
            d.send(Command::WorkerOf { worker_id, reply: tx }).await?;
            let row = rx.await.map_err(|_| OpError::unavailable("the queue leader stepped down; retry"))?;
            let own = row.and_then(|r| r.assignment).is_some_and(|a| a.conversation_id == args.conversation_id);
            if !own {
                return Err(OpError::forbidden("a worker may only inspect the conversation assigned to it"));
            }
        }
        let conversation_id = args.conversation_id.into_string();
        d.barrier(&js).await?;
        d.ask(|reply| Command::HasQueued { conversation_id, reply }).await
    });
    route!(GetWorkerControlState, |caller, args, d, _js| {
        caller.require_worker(&args.worker_id)?;
        let worker_id = args.worker_id.into_string();
        d.ask(|reply| Command::ControlState { worker_id, reply }).await
    });
    route!(GetWorkerStats, |_caller, _args, d, _js| d.ask(|reply| Command::WorkerStats { reply }).await);
    route!(ListWorkersForScheduler, |_caller, _args, d, _js| d.ask(|reply| Command::ListWorkers { reply }).await);
    route!(UpsertWorkerState, |_caller, args, d, _js| {
        d.ask(|reply| Command::UpsertWorker { args: Box::new(args), reply }).await
    });
    route!(RecordWorkerSnapshot, |_caller, args, d, _js| {
        let (worker_id, snapshot_id) = (args.worker_id.into_string(), args.snapshot_id.into_string());
        d.ask(|reply| Command::RecordSnapshot { worker_id, snapshot_id, reply }).await
    });
    route!(RequeueDeadLetter, |_caller, args, d, _js| {
        let message_id = args.message_id.into_string();
        d.ask(|reply| Command::RequeueDeadLetter { message_id, reply }).await
    });
    route!(PurgeDeadLetter, |_caller, args, d, _js| {
        let message_id = args.message_id.into_string();
        d.ask(|reply| Command::PurgeDeadLetter { message_id, reply }).await
    });
    ops.handle::<api::GetActiveConversationsForScheduler, _, _, _, _>(
        &(d.clone(), js.clone()),
        |(d, js), _: Caller, args| async move {
            let mut rows = d.demand(&js).await?;
            rows.truncate(args.limit.unwrap_or(usize::MAX));
            Ok(rows)
        },
    );
    ops.handle::<api::GetActiveConversationCountForScheduler, _, _, _, _>(
        &(d.clone(), js.clone()),
        |(d, js), _: Caller, _| async move { Ok(d.demand(&js).await?.len() as u64) },
    );
    ops.handle::<api::GetReadyConversationCountForScheduler, _, _, _, _>(
        &(d.clone(), js.clone()),
        |(d, js), _: Caller, _| async move { Ok(d.demand(&js).await?.iter().filter(|r| r.ready).count() as u64) },
    );
}
