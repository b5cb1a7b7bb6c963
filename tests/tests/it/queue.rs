//! The conversation queue, black-box through the operation catalogue, on a manual clock with
//! every background loop paused so each step is driven by the test.

use serde_json::{Value, json};
use tests::{MANUAL, T0, TestStack, message, seed_profile};

async fn stack() -> TestStack {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "agent-a").await;
    seed_profile(&stack.ctx, "agent-b").await;
    stack.wait_queue_ready().await;
    stack
}

async fn enqueue(stack: &TestStack, conversation: &str, text: &str) -> String {
    let id = stack.app().ok("enqueueMessage", message(conversation, "agent-a", text)).await;
    id.as_str().expect("message id").to_string()
}

async fn claim(stack: &TestStack, worker: &str) -> Value {
    stack.worker(worker).ok("claimNextJob", json!({ "workerId": worker })).await
}

async fn complete(stack: &TestStack, worker: &str, job: &Value) -> Value {
    stack
        .worker(worker)
        .ok("completeJob", json!({ "workerId": worker, "messageId": job["messageId"], "leaseId": job["leaseId"] }))
        .await
}

async fn advance(stack: &TestStack, ms: i64) {
    stack.admin().ok("advanceTestClock", json!({ "ms": ms })).await;
}

/// Worker `worker` takes and completes one message of `conversation`, becoming its sticky owner.
async fn serve_one(stack: &TestStack, worker: &str, conversation: &str) {
    enqueue(stack, conversation, "first").await;
    let job = claim(stack, worker).await;
    assert_eq!(job["conversationId"], conversation);
    assert_eq!(complete(stack, worker, &job).await, true);
}

async fn worker_row(stack: &TestStack, worker: &str) -> Value {
    let rows = stack.admin().ok("listWorkersForScheduler", json!({})).await;
    rows.as_array().expect("worker rows").iter().find(|r| r["workerId"] == worker).cloned().unwrap_or(Value::Null)
}

#[tokio::test]
async fn enqueue_then_claim_returns_the_job_with_a_lease() {
    let stack = stack().await;
    let id = enqueue(&stack, "c1", "hello").await;
    let job = claim(&stack, "w1").await;
    assert_eq!(job["messageId"], id.as_str());
    assert_eq!(job["conversationId"], "c1");
    assert_eq!(job["agentKey"], "agent-a");
    assert_eq!(job["payload"]["messageText"], "hello");
    assert_eq!(job["payload"]["metadata"]["providerUserId"], "u1");
    assert_eq!(job["leaseExpiresAt"], T0 + 360_000);
    let lease = job["leaseId"].as_str().unwrap();
    let (ms, rand) = lease.split_once('-').unwrap();
    assert_eq!(ms, T0.to_string());
    assert_eq!(rand.len(), 8);
    assert_eq!(claim(&stack, "w1").await["messageId"], id.as_str(), "a lost claim reply is re-delivered");
    assert_eq!(claim(&stack, "w2").await, Value::Null);
    assert_eq!(complete(&stack, "w1", &job).await, true);
    assert_eq!(complete(&stack, "w1", &job).await, true, "a retried complete of the same lease is idempotent");
    let mut other = job.clone();
    other["leaseId"] = json!("0-otherlease");
    assert_eq!(complete(&stack, "w1", &other).await, false, "another lease cannot complete it");
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!((stats["queuedReady"].as_u64(), stats["processing"].as_u64()), (Some(0), Some(0)));
}

/// Enqueues `text` on a fresh conversation and returns the text its worker receives.
async fn delivered_text(stack: &TestStack, text: &str) -> String {
    let conversation = format!("c-{}", common::crypto::random_base36(10));
    stack.app().ok("enqueueMessage", message(&conversation, "agent-a", text)).await;
    let job = stack.worker(&conversation).ok("claimNextJob", json!({ "workerId": conversation })).await;
    job["payload"]["messageText"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn system_prompt_is_appended_and_a_blank_prompt_ignored() {
    let stack = stack().await;
    let store = &stack.ctx.buckets.runtime_config;
    let row = json!({ "config": { "systemPrompt": "Be brief." }, "updatedAt": 0 });
    store.create(common::model::MESSAGE_CONFIG_KEY, &row).await.unwrap();
    // The queue reads runtime config through a watch; wait until the prompt is applied.
    tests::wait_until("the system prompt is applied", std::time::Duration::from_secs(5), || async {
        (delivered_text(&stack, "hi  ").await == "hi\n\nBe brief.").then_some(())
    })
    .await;

    let current = store.get::<Value>(common::model::MESSAGE_CONFIG_KEY).await.unwrap().unwrap();
    let blank = json!({ "config": { "systemPrompt": "   " }, "updatedAt": 1 });
    store.update(common::model::MESSAGE_CONFIG_KEY, &blank, current.revision).await.unwrap();
    tests::wait_until("the blank prompt is ignored", std::time::Duration::from_secs(5), || async {
        (delivered_text(&stack, "plain").await == "plain").then_some(())
    })
    .await;
}

#[tokio::test]
async fn enqueue_validation_uses_the_original_messages() {
    let stack = stack().await;
    let app = stack.app();
    let mut blank = message("c1", "agent-a", "x");
    blank["payload"]["providerUserId"] = json!(" ");
    let err = app.err("enqueueMessage", blank).await;
    assert_eq!(err.message, r#"providerUserId is required but missing in payload.providerUserId=" ""#);
    assert_eq!(err.code, common::ErrorCode::InvalidInput);

    let err = app.err("enqueueMessage", message("c1", "nobody", "x")).await;
    assert_eq!(err.message, "Agent profile 'nobody' not found or disabled");

    app.ok("enqueueMessage", message("c1", "agent-a", "x")).await;
    let err = app.err("enqueueMessage", message("c1", "agent-b", "x")).await;
    assert_eq!(err.message, "Conversation 'c1' is already bound to agent 'agent-a', cannot enqueue for 'agent-b'.");

    let mut bad = message("c2", "agent-a", "x");
    bad["maxAttempts"] = json!(0);
    assert_eq!(app.err("enqueueMessage", bad).await.code, common::ErrorCode::InvalidInput);
    let mut bad = message("c2", "agent-a", "x");
    bad["priority"] = json!("high");
    assert_eq!(app.err("enqueueMessage", bad).await.code, common::ErrorCode::InvalidInput);
    let err = app.err("enqueueMessage", message("c2", "agent-a", "   ")).await;
    assert!(err.message.contains("messageText"), "{}", err.message);
}

#[tokio::test]
async fn the_same_idempotency_key_gives_the_same_message_and_one_job() {
    let stack = stack().await;
    let mut m = message("c1", "agent-a", "once");
    m["idempotencyKey"] = json!("update-42");
    let a = stack.app().ok("enqueueMessage", m.clone()).await;
    let b = stack.app().ok("enqueueMessage", m).await;
    assert_eq!(a, b);
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!(stats["queuedTotal"], 1);
}

#[tokio::test]
async fn idle_shutdown_time_is_set_from_the_last_claim_on_complete() {
    let stack = stack().await;
    enqueue(&stack, "c1", "a").await;
    let job = claim(&stack, "w1").await;
    advance(&stack, 5_000).await;
    complete(&stack, "w1", &job).await;
    let row = worker_row(&stack, "w1").await;
    assert_eq!(row["scheduledShutdownAt"], T0 + 1_800_000);
    assert_eq!(row["load"], 0);
    assert_eq!(row["heartbeatAt"], T0 + 5_000);
}

#[tokio::test]
async fn a_sticky_worker_cannot_claim_another_conversation_after_completing() {
    let stack = stack().await;
    serve_one(&stack, "w1", "c1").await;
    enqueue(&stack, "c2", "b").await;
    assert_eq!(claim(&stack, "w1").await, Value::Null);
    assert_eq!(claim(&stack, "w2").await["conversationId"], "c2");
}

#[tokio::test]
async fn a_pre_assigned_worker_claims_only_its_conversation() {
    let stack = stack().await;
    stack
        .admin()
        .ok(
            "upsertWorkerState",
            json!({ "workerId": "afw-1", "provider": "fly", "status": "active", "load": 0,
                    "assignment": { "conversationId": "c2", "agentKey": "agent-a", "leaseId": "spawn:afw-1" } }),
        )
        .await;
    enqueue(&stack, "c1", "a").await;
    enqueue(&stack, "c2", "b").await;
    assert_eq!(claim(&stack, "afw-1").await["conversationId"], "c2");
    let other = stack.worker("afw-1").ok("claimNextJob", json!({ "workerId": "afw-1", "conversationId": "c1" })).await;
    assert_eq!(other, Value::Null, "a filter for another conversation yields nothing");
    assert_eq!(claim(&stack, "w-free").await["conversationId"], "c1");
}

#[tokio::test]
async fn an_exclusive_owner_blocks_another_worker_and_reclaims() {
    let stack = stack().await;
    serve_one(&stack, "w1", "c1").await;
    enqueue(&stack, "c1", "b").await;
    assert_eq!(claim(&stack, "w2").await, Value::Null);
    assert_eq!(claim(&stack, "w1").await["payload"]["messageText"], "b");
}

#[tokio::test]
async fn a_stale_owner_is_taken_over() {
    let stack = stack().await;
    serve_one(&stack, "w1", "c1").await;
    enqueue(&stack, "c1", "b").await;
    assert_eq!(claim(&stack, "w2").await, Value::Null);
    advance(&stack, 420_001).await;
    assert_eq!(claim(&stack, "w2").await["payload"]["messageText"], "b");
    assert_eq!(claim(&stack, "w1").await, Value::Null, "the old owner no longer gets it");
}

#[tokio::test]
async fn releasing_stuck_jobs_counts_an_attempt_and_clears_the_assignment() {
    let stack = stack().await;
    enqueue(&stack, "c1", "a").await;
    let job = claim(&stack, "w1").await;
    let before = worker_row(&stack, "w1").await;
    let nothing = stack.admin().ok("releaseStuckJobs", json!({})).await;
    assert_eq!(nothing, json!({ "requeued": 0, "unlocked": 0, "deadLettered": 0 }));
    advance(&stack, 360_000).await;
    let released = stack.admin().ok("releaseStuckJobs", json!({})).await;
    assert_eq!(released, json!({ "requeued": 1, "unlocked": 1, "deadLettered": 0 }));
    let row = worker_row(&stack, "w1").await;
    assert_eq!(row["assignment"], Value::Null);
    assert_eq!(row["load"], 0);
    assert_eq!(row["heartbeatAt"], before["heartbeatAt"], "recovery must not refresh the dead worker (Q3)");
    assert_eq!(complete(&stack, "w1", &job).await, false, "the old lease is gone");
    let again = claim(&stack, "w2").await;
    assert_eq!(again["messageId"], job["messageId"]);
    assert_eq!(again["attempts"], 1, "the expiry counted as an attempt (Q2)");
}

#[tokio::test]
async fn a_job_that_keeps_crashing_its_worker_is_dead_lettered() {
    let stack = stack().await;
    let mut m = message("c1", "agent-a", "poison");
    m["maxAttempts"] = json!(2);
    stack.app().ok("enqueueMessage", m).await;
    enqueue(&stack, "c1", "after").await;
    for (round, worker) in ["w1", "w2"].iter().enumerate() {
        let job = claim(&stack, worker).await;
        assert_eq!(job["payload"]["messageText"], "poison", "round {round}");
        advance(&stack, 360_000).await;
        stack.admin().ok("releaseStuckJobs", json!({})).await;
    }
    let dead = stack.admin().ok("listJobsByStatus", json!({ "status": "dead_letter" })).await;
    assert_eq!(dead.as_array().unwrap().len(), 1);
    assert_eq!(dead[0]["lastError"], "Lease expired while processing");
    assert_eq!(claim(&stack, "w3").await["payload"]["messageText"], "after");
}

#[tokio::test]
async fn failures_retry_with_the_spec_backoff_then_dead_letter() {
    let stack = stack().await;
    let id = enqueue(&stack, "c1", "flaky").await;
    let expected = [1053, 2183, 4000, 8096];
    for (i, delay) in expected.iter().enumerate() {
        let job = claim(&stack, "w1").await;
        assert_eq!(job["messageId"], id.as_str());
        // The vector is for failures at exactly T0, so fail there (time may go back).
        stack.admin().ok("setTestClock", json!({ "nowMs": T0 })).await;
        let outcome = stack
            .worker("w1")
            .ok(
                "failJob",
                json!({ "workerId": "w1", "messageId": id, "leaseId": job["leaseId"], "errorMessage": format!("boom {i}") }),
            )
            .await;
        assert_eq!(
            outcome,
            json!({ "requeued": true, "deadLettered": false, "nextScheduledFor": T0 + delay }),
            "attempt {}",
            i + 1
        );
        assert_eq!(claim(&stack, "w1").await, Value::Null, "not before the retry time");
        stack.admin().ok("setTestClock", json!({ "nowMs": T0 + delay })).await;
    }
    let job = claim(&stack, "w1").await;
    let outcome = stack
        .worker("w1")
        .ok(
            "failJob",
            json!({ "workerId": "w1", "messageId": id, "leaseId": job["leaseId"], "errorMessage": "last boom" }),
        )
        .await;
    assert_eq!(outcome, json!({ "requeued": false, "deadLettered": true, "nextScheduledFor": null }));
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!(stats["deadLetter"], 1);
    let dead = stack.admin().ok("listJobsByStatus", json!({ "status": "dead_letter" })).await;
    assert_eq!((dead[0]["attempts"].clone(), dead[0]["lastError"].clone()), (json!(5), json!("last boom")));

    let requeued = stack.admin().ok("requeueDeadLetter", json!({ "messageId": id })).await;
    assert_eq!(requeued, id.as_str());
    let job = claim(&stack, "w1").await;
    assert_eq!(job["attempts"], 0);
    assert_eq!(stack.admin().ok("getQueueStats", json!({})).await["deadLetter"], 0);
    assert_eq!(stack.admin().ok("purgeDeadLetter", json!({ "messageId": id })).await, false);
}

#[tokio::test]
async fn a_message_waiting_for_its_retry_holds_back_the_rest_of_its_conversation() {
    let stack = stack().await;
    enqueue(&stack, "c1", "first").await;
    enqueue(&stack, "c1", "second").await;
    let job = claim(&stack, "w1").await;
    stack
        .worker("w1")
        .ok(
            "failJob",
            json!({ "workerId": "w1", "messageId": job["messageId"], "leaseId": job["leaseId"], "errorMessage": "x" }),
        )
        .await;
    assert_eq!(claim(&stack, "w1").await, Value::Null, "second must not overtake first (Q4)");
    advance(&stack, 2_000).await;
    assert_eq!(claim(&stack, "w1").await["payload"]["messageText"], "first");
}

#[tokio::test]
async fn a_free_worker_finds_a_ready_conversation_behind_many_locked_ones() {
    let stack = stack().await;
    for i in 0..40 {
        enqueue(&stack, &format!("busy-{i}"), "a").await;
        enqueue(&stack, &format!("busy-{i}"), "b").await;
        claim(&stack, &format!("owner-{i}")).await;
    }
    enqueue(&stack, "free", "z").await;
    assert_eq!(claim(&stack, "newcomer").await["conversationId"], "free", "no head-of-line blocking (Q1)");
}

#[tokio::test]
async fn higher_priority_conversations_go_first_and_future_jobs_wait() {
    let stack = stack().await;
    let mut low = message("low", "agent-a", "l");
    low["priority"] = json!(10);
    let mut high = message("high", "agent-a", "h");
    high["priority"] = json!(500);
    let mut later = message("later", "agent-a", "t");
    later["scheduledFor"] = json!(T0 + 60_000);
    later["priority"] = json!(100);
    for m in [low, high, later] {
        stack.app().ok("enqueueMessage", m).await;
    }
    assert_eq!(claim(&stack, "w1").await["conversationId"], "high");
    assert_eq!(claim(&stack, "w2").await["conversationId"], "low");
    assert_eq!(claim(&stack, "w3").await, Value::Null);
    advance(&stack, 60_000).await;
    assert_eq!(claim(&stack, "w3").await["conversationId"], "later");
}

#[tokio::test]
async fn a_long_poll_claim_returns_when_a_message_arrives() {
    let stack = stack().await;
    let worker = stack.worker("w1");
    let waiting =
        tokio::spawn(async move { worker.ok("claimNextJob", json!({ "workerId": "w1", "waitMs": 20_000 })).await });
    // Enqueue only once the claim is parked, so the test shows the wake-up, not a lucky order.
    parked_claims(&stack, 1).await;
    enqueue(&stack, "c1", "ping").await;
    let job = waiting.await.unwrap();
    assert_eq!(job["payload"]["messageText"], "ping");
    let empty = stack.worker("w2").ok("claimNextJob", json!({ "workerId": "w2", "waitMs": 50 })).await;
    assert_eq!(empty, Value::Null, "a long poll with nothing to do ends empty");
}

#[tokio::test]
async fn a_long_poll_for_one_conversation_gets_its_first_message_before_any_free_worker() {
    let stack = stack().await;
    let poll = |id: &'static str, filter: Option<&str>| {
        let worker = stack.worker(id);
        let mut args = json!({ "workerId": id, "waitMs": 20_000 });
        if let Some(c) = filter {
            args["conversationId"] = json!(c);
        }
        tokio::spawn(async move { worker.ok("claimNextJob", args).await })
    };
    // A free worker waits first, then one that asked for "c1" only; both are parked before
    // the message exists, so the order of arrival cannot decide it.
    let free = poll("free", None);
    let mine = poll("mine", Some("c1"));
    parked_claims(&stack, 2).await;
    enqueue(&stack, "c1", "for you").await;
    let job = mine.await.unwrap();
    assert_eq!((job["conversationId"].as_str(), job["payload"]["messageText"].as_str()), (Some("c1"), Some("for you")));
    // The free worker still waits; another conversation's message is its.
    enqueue(&stack, "c2", "anyone").await;
    assert_eq!(free.await.unwrap()["conversationId"], "c2");
}

#[tokio::test]
async fn heartbeats_extend_the_lease_and_foreign_leases_are_refused() {
    let stack = stack().await;
    enqueue(&stack, "c1", "a").await;
    let job = claim(&stack, "w1").await;
    advance(&stack, 300_000).await;
    let beat = json!({ "workerId": "w1", "messageId": job["messageId"], "leaseId": job["leaseId"] });
    assert_eq!(stack.worker("w1").ok("heartbeatJob", beat.clone()).await, true);
    advance(&stack, 300_000).await;
    let released = stack.admin().ok("releaseStuckJobs", json!({})).await;
    assert_eq!(released["requeued"], 0, "the heartbeat moved the expiry");
    let wrong = json!({ "workerId": "w1", "messageId": job["messageId"], "leaseId": "0-nope" });
    assert_eq!(stack.worker("w1").ok("heartbeatJob", wrong.clone()).await, false);
    assert_eq!(stack.worker("w1").ok("completeJob", wrong).await, false);
    let err = stack.worker("w2").err("completeJob", beat.clone()).await;
    assert_eq!(err.code, common::ErrorCode::Forbidden, "a worker token only acts for its own worker");
    let err = stack.worker("w2").err("claimNextJob", json!({ "workerId": "w1" })).await;
    assert_eq!(err.code, common::ErrorCode::Forbidden);
    let err = stack.app().err("claimNextJob", json!({ "workerId": "w1" })).await;
    assert_eq!(err.code, common::ErrorCode::Forbidden);
    assert_eq!(stack.worker("w1").ok("completeJob", beat).await, true);
}

#[tokio::test]
async fn worker_control_state_stops_stopped_unknown_and_overdue_workers() {
    let stack = stack().await;
    let state = |w: &'static str| {
        let api = stack.worker(w);
        async move { api.ok("getWorkerControlState", json!({ "workerId": w })).await }
    };
    assert_eq!(state("ghost").await, json!({ "shouldStop": true, "reason": "missing_worker" }));
    enqueue(&stack, "c1", "a").await;
    let job = claim(&stack, "w1").await;
    assert_eq!(state("w1").await, json!({ "shouldStop": false }));
    complete(&stack, "w1", &job).await;
    advance(&stack, 420_000).await;
    assert_eq!(state("w1").await["reason"], "stale_heartbeat");
    let admin = stack.admin();
    admin.ok("upsertWorkerState", json!({ "workerId": "w2", "provider": "fly", "status": "active", "load": 0, "scheduledShutdownAt": T0 + 420_000 })).await;
    assert_eq!(state("w2").await["reason"], "scheduled_shutdown_due");
    admin.ok("upsertWorkerState", json!({ "workerId": "w3", "provider": "fly", "status": "active", "load": 0 })).await;
    admin
        .ok("upsertWorkerState", json!({ "workerId": "w3", "provider": "fly", "status": "draining", "load": 0 }))
        .await;
    assert_eq!(state("w3").await["reason"], "status_draining");
}

#[tokio::test]
async fn worker_status_only_moves_forward_and_stopping_keeps_the_heartbeat() {
    let stack = stack().await;
    let admin = stack.admin();
    let upsert = |status: &str| json!({ "workerId": "w1", "provider": "fly", "status": status, "load": 0 });
    admin.ok("upsertWorkerState", upsert("active")).await;
    admin.ok("upsertWorkerState", upsert("draining")).await;
    let err = admin.err("upsertWorkerState", upsert("active")).await;
    assert_eq!(err.message, "Worker 'w1' cannot transition from 'draining' to 'active'.");
    admin.ok("upsertWorkerState", upsert("stopping")).await;
    let stopping = worker_row(&stack, "w1").await;
    advance(&stack, 10_000).await;
    let stopped = admin.ok("upsertWorkerState", upsert("stopped")).await;
    assert_eq!(stopped["heartbeatAt"], stopping["heartbeatAt"], "heartbeat preserved when stopped");
    assert_eq!(stopped["stoppedAt"], T0);
    let err = admin.err("upsertWorkerState", upsert("active")).await;
    assert_eq!(err.message, "Worker 'w1' cannot transition from 'stopped' to 'active'.");
    enqueue(&stack, "c1", "a").await;
    assert_eq!(claim(&stack, "w1").await, Value::Null, "a stopped worker gets nothing");
}

#[tokio::test]
async fn read_operations_show_the_queue() {
    let stack = stack().await;
    enqueue(&stack, "c1", "one").await;
    enqueue(&stack, "c1", "two").await;
    let job = claim(&stack, "w1").await;
    let items = stack.app().ok("listQueueItemsForConversation", json!({ "conversationId": "c1" })).await;
    let texts: Vec<&str> =
        items.as_array().unwrap().iter().map(|i| i["payload"]["messageText"].as_str().unwrap()).collect();
    assert_eq!(texts, ["two", "one"], "newest first");
    assert_eq!(items[1]["status"], "processing");
    let has = stack.app().ok("hasQueuedJobsForConversation", json!({ "conversationId": "c1" })).await;
    assert_eq!(has, true);
    complete(&stack, "w1", &job).await;
    let done = stack.admin().ok("listJobsByStatus", json!({ "status": "done" })).await;
    assert_eq!(done[0]["_id"], job["messageId"]);
    let items = stack.app().ok("listQueueItemsForConversation", json!({ "conversationId": "c1" })).await;
    assert_eq!(items[1]["status"], "done");
    let stats = stack.admin().ok("getWorkerStats", json!({})).await;
    assert_eq!(stats["idleCount"], 1);
    let err = stack.worker("w9").err("hasQueuedJobsForConversation", json!({ "conversationId": "c1" })).await;
    assert_eq!(err.code, common::ErrorCode::Forbidden);
}

#[tokio::test]
async fn the_test_clock_is_refused_on_the_system_clock() {
    let stack = TestStack::start().await;
    let err = stack.admin().err("advanceTestClock", json!({ "ms": 1 })).await;
    assert_eq!(err.code, common::ErrorCode::Conflict);
    let view = stack.admin().ok("getTestClock", json!({})).await;
    assert_eq!(view["mode"], "system");
}

#[tokio::test]
async fn the_test_clock_can_go_back_in_time() {
    let stack = stack().await;
    let view = stack.admin().ok("setTestClock", json!({ "nowMs": 1_000 })).await;
    assert_eq!(view, json!({ "mode": "manual", "nowMs": 1_000 }));
    assert_eq!(stack.ctx.clock.now_ms(), 1_000);
}

#[tokio::test]
async fn complete_and_claim_next_hands_over_the_next_job_in_one_call() {
    let stack = stack().await;
    for text in ["one", "two"] {
        enqueue(&stack, "c1", text).await;
    }
    let job = claim(&stack, "w1").await;
    let next = |job: &Value, wait: u64| json!({"workerId": "w1", "messageId": job["messageId"], "leaseId": job["leaseId"], "waitMs": wait});
    let answer = stack.worker("w1").ok("completeAndClaimNext", next(&job, 0)).await;
    assert_eq!(answer["completed"], true);
    let second = answer["next"].clone();
    assert_eq!(second["payload"]["messageText"], "two");
    assert_eq!(second["attempts"], 0);
    assert_ne!(second["leaseId"], job["leaseId"]);
    // The lease of the first job is spent: completing it again is the idempotent `true`, and
    // the hand-over does not happen twice.
    let again = stack.worker("w1").ok("completeAndClaimNext", next(&job, 0)).await;
    assert_eq!(again, json!({"completed": true, "next": null}));
    // Nothing left: the answer carries no job after a zero wait, and the queue is empty.
    let answer = stack.worker("w1").ok("completeAndClaimNext", next(&second, 0)).await;
    assert_eq!(answer, json!({"completed": true, "next": null}));
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!((stats["queuedTotal"].as_u64(), stats["processing"].as_u64()), (Some(0), Some(0)));
    // Another worker's token cannot use w1's lease.
    let err = stack.worker("w2").err("completeAndClaimNext", next(&second, 0)).await;
    assert_eq!(err.code, common::ErrorCode::Forbidden);
}

#[tokio::test]
async fn complete_and_claim_next_waits_for_a_later_job() {
    let stack = stack().await;
    enqueue(&stack, "c1", "one").await;
    let job = claim(&stack, "w1").await;
    let call = complete_and_wait(&stack, "w1", &job).await;
    enqueue(&stack, "c1", "later").await;
    let answer = call.await.expect("join");
    assert_eq!(answer["completed"], true);
    assert_eq!(answer["next"]["payload"]["messageText"], "later");
}

/// The stored queue state of `conversation` (what a new leader would load).
async fn stored_state(stack: &TestStack, conversation: &str) -> Value {
    let key = common::token::escape(conversation);
    stack.ctx.buckets.queue_state.get::<Value>(&key).await.expect("read queue state").expect("queue state").value
}

/// Parks `worker`'s `completeAndClaimNext` for `job` (its completion is held) and returns the
/// call.
async fn complete_and_wait(stack: &TestStack, worker: &str, job: &Value) -> tokio::task::JoinHandle<Value> {
    let args = json!({"workerId": worker, "messageId": job["messageId"], "leaseId": job["leaseId"], "waitMs": 20_000});
    let worker = stack.worker(worker);
    let call = tokio::spawn(async move { worker.ok("completeAndClaimNext", args).await });
    parked_claims(stack, 1).await;
    call
}

#[tokio::test]
async fn a_held_completion_and_the_next_lease_are_stored_in_one_write() {
    // No lazy flush during the test: only the next lease may store the completion.
    let stack = TestStack::start_with(&[MANUAL, &[("queue.lazy_flush_ms", "60000")]].concat()).await;
    seed_profile(&stack.ctx, "agent-a").await;
    enqueue(&stack, "c1", "one").await;
    let job = claim(&stack, "w1").await;
    let leased = stored_state(&stack, "c1").await;
    let call = complete_and_wait(&stack, "w1", &job).await;
    // Held: the index has it (nothing is processing) but the store still shows the lease.
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!(stats["processing"], 0);
    assert_eq!(stored_state(&stack, "c1").await, leased);

    let key = common::token::escape("c1");
    let mut updates = stack.ctx.buckets.queue_state.raw().watch(&key).await.expect("watch");
    enqueue(&stack, "c1", "later").await;
    let answer = call.await.expect("join");
    assert_eq!(answer["completed"], true);
    assert_eq!(answer["next"]["payload"]["messageText"], "later");
    let update = futures::StreamExt::next(&mut updates).await.expect("an update").expect("entry");
    let written: Value = serde_json::from_slice(&update.value).expect("state");
    assert_eq!(written, stored_state(&stack, "c1").await, "one write carried both");
    assert_eq!(written["lastCompleted"]["leaseId"], job["leaseId"]);
    assert_eq!(written["head"]["lease"]["leaseId"], answer["next"]["leaseId"]);
    assert!(written["doneSeq"].as_u64() > leased["doneSeq"].as_u64());
}

#[tokio::test]
async fn a_held_completion_is_stored_before_its_worker_hears_of_it() {
    let stack = TestStack::start_with(&[MANUAL, &[("queue.lazy_flush_ms", "60000")]].concat()).await;
    seed_profile(&stack.ctx, "agent-a").await;
    // The long poll ends without a job (here: the worker is told to drain): the completion
    // is written, then answered.
    enqueue(&stack, "c1", "one").await;
    let job = claim(&stack, "w1").await;
    let call = complete_and_wait(&stack, "w1", &job).await;
    stack
        .admin()
        .ok("upsertWorkerState", json!({ "workerId": "w1", "provider": "fly", "status": "draining", "load": 0 }))
        .await;
    assert_eq!(call.await.expect("join"), json!({"completed": true, "next": null}));
    let stored = stored_state(&stack, "c1").await;
    assert_eq!(stored["lastCompleted"]["leaseId"], job["leaseId"]);
    assert_eq!(stored["head"], Value::Null);

    // A plain `completeJob` retry of a held completion (its first answer lost) is answered
    // `true` only once the completion is stored.
    enqueue(&stack, "c2", "two").await;
    let job = claim(&stack, "w2").await;
    let call = complete_and_wait(&stack, "w2", &job).await;
    assert_eq!(complete(&stack, "w2", &job).await, true);
    assert_eq!(stored_state(&stack, "c2").await["lastCompleted"]["leaseId"], job["leaseId"]);
    call.abort();
}

/// Waits until the queue leader holds `n` parked long polls, so a test's next step shows a
/// wake-up rather than a lucky order.
async fn parked_claims(stack: &TestStack, n: u64) {
    tests::wait_until("the claims are parked", std::time::Duration::from_secs(10), || async {
        let stats = stack.admin().ok("getQueueStats", json!({})).await;
        (stats["parkedClaims"] == n).then_some(())
    })
    .await;
}

/// One long-poll rule for every caller: a long poll's request waits its `waitMs` on top of the
/// ordinary timeout, so a `completeAndClaimNext` that waits longer than `nats.request_timeout_ms`
/// answers (here: no next job) instead of timing out — over NATS and through ingress alike.
#[tokio::test]
async fn queue_long_polls_wait_past_the_ordinary_request_timeout() {
    let mut overrides = MANUAL.to_vec();
    overrides.push(("nats.request_timeout_ms", "1000"));
    let stack = TestStack::start_with(&overrides).await;
    seed_profile(&stack.ctx, "agent-a").await;
    stack.wait_queue_ready().await;
    let worker = stack.worker("w1");
    for transport in ["nats", "http"] {
        stack.app().ok("enqueueMessage", message("c1", "agent-a", "hi")).await;
        let job = worker.ok("claimNextJob", json!({"workerId": "w1", "waitMs": 1000})).await;
        let args = json!({"workerId": "w1", "messageId": job["messageId"], "leaseId": job["leaseId"], "waitMs": 1500});
        let answer = match transport {
            "nats" => worker.ok("completeAndClaimNext", args).await,
            _ => {
                let token = stack.ctx.auth.mint_worker_token("w1").expect("token");
                let response = reqwest::Client::new()
                    .post(stack.http_url("/v1/ops/completeAndClaimNext"))
                    .bearer_auth(token)
                    .json(&args)
                    .send()
                    .await
                    .expect("answer");
                assert_eq!(response.status(), 200, "{transport}");
                response.json().await.expect("json")
            }
        };
        assert_eq!(answer, json!({"completed": true, "next": null}), "{transport}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn listing_dead_letters_of_an_empty_queue_is_an_empty_list() {
    let stack = TestStack::start().await;
    for status in ["dead_letter", "queued", "processing"] {
        let listed = stack.admin().ok("listJobsByStatus", json!({"status": status})).await;
        assert_eq!(listed, json!([]), "{status}");
    }
    stack.stop().await;
}
