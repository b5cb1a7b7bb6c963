//! The worker pool (scheduler) against the stateful fake Fly API: the behavioural vectors of
//! spec §3.15.5 and the required fixes, on a manual clock with every loop paused, so each
//! reconcile is called by the test.

use std::time::Duration;

use common::ErrorCode;
use serde_json::{Value, json};
use tests::fake_fly::FakeFly;
use tests::{MANUAL, T0, TestStack, message, seed_profile};

const APP: &str = "af-pool";

struct Pool {
    stack: TestStack,
    fake: FakeFly,
    /// The original's `scalingPolicy` (spec §2.1: no `drainDeadlineMs`, with the unused
    /// `queuePerWorkerTarget`), passed to every `reconcileWorkerPool` as the original's tests did.
    policy: Value,
}

async fn pool(max_workers: u32, spawn_step: u32) -> Pool {
    pool_with(max_workers, spawn_step, MANUAL).await
}

/// A pool whose stack starts with `base` overrides (MANUAL: manual clock, loops paused).
async fn pool_with(max_workers: u32, spawn_step: u32, base: &[(&str, &str)]) -> Pool {
    let fake = FakeFly::start().await;
    fake.add_app(APP);
    let url = fake.base_url();
    let mut overrides: Vec<(&str, &str)> = base.to_vec();
    overrides.extend([
        ("providers.fly_base_url", url.as_str()),
        ("providers.retry_base_delay_ms", "1"),
        ("providers.retry_attempts", "3"),
        ("providers.stop_wait_ms", "2000"),
        ("scheduler.default_provider", "none"),
    ]);
    let stack = TestStack::start_with(&overrides).await;
    seed_profile(&stack.ctx, "agent-a").await;
    let admin = stack.admin();
    admin.ok("importPlaintextSecret", json!({"secretRef": "fly.apiToken", "plaintextValue": fake.token()})).await;
    admin
        .ok(
            "setProviderRuntimeConfig",
            json!({"providerConfig": {"kind": "fly", "appName": APP, "organizationSlug": "org", "image": "af-worker:1",
                   "region": "iad", "volumeName": "openclaw_data", "volumePath": "/data", "volumeSizeGb": 1}}),
        )
        .await;
    let policy = json!({"maxWorkers": max_workers, "queuePerWorkerTarget": 5, "spawnStep": spawn_step,
                        "idleTimeoutMs": 1_800_000, "reconcileIntervalMs": 15_000});
    admin.ok("setScalingRuntimeConfig", json!({ "scalingPolicy": policy })).await;
    stack.wait_queue_ready().await;
    Pool { stack, fake, policy }
}

/// A pool (5 workers, 2 per step) whose reconcile spawned the worker of `conv-a`; returns it
/// with that worker's id.
async fn pool_with_one_worker() -> (Pool, String) {
    let p = pool(5, 2).await;
    p.enqueue("conv-a").await;
    p.reconcile().await;
    (p, format!("afw-{T0}-0"))
}

impl Pool {
    /// `worker` claims its job and completes it.
    async fn work_one(&self, worker: &str) {
        let job = self.stack.worker(worker).ok("claimNextJob", json!({"workerId": worker})).await;
        let done = json!({"workerId": worker, "messageId": job["messageId"], "leaseId": job["leaseId"]});
        self.stack.worker(worker).ok("completeJob", done).await;
    }

    async fn reconcile(&self) -> Value {
        let args = json!({"scalingPolicy": self.policy, "workspaceId": "default", "nowMs": 0});
        self.stack.admin().ok("reconcileWorkerPool", args).await
    }

    async fn idle_check(&self) -> Value {
        self.stack.admin().ok("checkIdleShutdowns", json!({})).await
    }

    async fn enqueue(&self, conversation: &str) {
        self.stack.app().ok("enqueueMessage", message(conversation, "agent-a", "hi")).await;
    }

    async fn advance(&self, ms: i64) {
        self.stack.admin().ok("advanceTestClock", json!({"ms": ms})).await;
    }

    async fn rows(&self) -> Vec<Value> {
        let rows = self.stack.admin().ok("listWorkersForScheduler", json!({})).await;
        rows.as_array().cloned().unwrap_or_default()
    }

    async fn row(&self, worker: &str) -> Value {
        self.rows().await.into_iter().find(|r| r["workerId"] == worker).unwrap_or(Value::Null)
    }

    async fn add_worker(&self, worker: &str, extra: Value) {
        let mut args = json!({"workerId": worker, "provider": "fly", "status": "active", "load": 0});
        if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        self.stack.admin().ok("upsertWorkerState", args).await;
    }
}

/// What a drained worker of `conv-a` does last: prepare, upload (straight into the object
/// store), finalize. Returns finalize's answer.
async fn final_snapshot(ctx: &common::service::ServiceContext, api: &tests::Api, worker: &str) -> Value {
    let prepare = json!({"workerId": worker, "agentKey": "agent-a", "conversationId": "conv-a", "reason": "drain"});
    let prepared = api.ok("prepareDataSnapshotUpload", prepare).await;
    let name = prepared["objectName"].as_str().expect("object name").to_string();
    ctx.buckets.snapshot_archives.put(name.as_str(), &mut &b"final"[..]).await.expect("put");
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"final"));
    let finalize = json!({"workerId": worker, "snapshotId": prepared["snapshotId"], "sha256": sha, "sizeBytes": 5});
    api.ok("finalizeDataSnapshotUpload", finalize).await
}

#[tokio::test]
async fn scheduler_idle_unassigned_workers_cover_demand_without_spawning() {
    let p = pool(5, 2).await;
    p.enqueue("conv-a").await;
    p.enqueue("conv-a").await;
    for w in ["w1", "w2", "w3"] {
        p.add_worker(w, json!({})).await;
    }
    assert_eq!(p.reconcile().await, json!({"activeWorkers": 3, "spawned": 0, "terminated": 0}));
    p.enqueue("conv-b").await;
    assert_eq!(p.reconcile().await, json!({"activeWorkers": 3, "spawned": 0, "terminated": 0}));
    assert_eq!(p.fake.live_machine_count(APP), 0);
}

#[tokio::test]
async fn scheduler_spawns_one_pre_assigned_worker_for_the_uncovered_conversation() {
    let p = pool(5, 2).await;
    p.enqueue("conv-a").await;
    assert_eq!(p.reconcile().await["spawned"], 1);
    let first = format!("afw-{T0}-0");
    let row = p.row(&first).await;
    assert_eq!(row["assignment"]["conversationId"], "conv-a");
    // The worker claims A and is busy; B arrives.
    let job = p.stack.worker(&first).ok("claimNextJob", json!({"workerId": first})).await;
    assert_eq!(job["conversationId"], "conv-a");
    p.advance(1000).await;
    p.enqueue("conv-b").await;
    let result = p.reconcile().await;
    assert_eq!((result["spawned"].as_u64(), result["activeWorkers"].as_u64()), (Some(1), Some(2)));
    let second = format!("afw-{}-0", T0 + 1000);
    let row = p.row(&second).await;
    assert_eq!(
        row["assignment"],
        json!({"conversationId": "conv-b", "agentKey": "agent-a",
                                         "leaseId": format!("spawn:{second}"), "assignedAt": T0 + 1000})
    );
    let machine = p.fake.machines(APP).into_iter().find(|m| m.name == second).expect("machine");
    assert_eq!(machine.env.get("OPENCLAW_CONVERSATION_ID").map(String::as_str), Some("conv-b"));
    assert_eq!(machine.env.get("OPENCLAW_AGENT_KEY").map(String::as_str), Some("agent-a"));
    assert_eq!(machine.env.get("AGENT_FACTORY_WORKER_ID"), Some(&second));
    // The worker token in the env authenticates exactly that worker.
    let token = machine.env.get("AF_WORKER_TOKEN").expect("token");
    let caller = p.stack.ctx.auth.authenticate(Some(&format!("Bearer {token}"))).expect("valid token");
    assert_eq!(caller.worker_id.as_deref(), Some(second.as_str()));
    assert_eq!(machine.mounts[0].path, "/data");
    assert_eq!(row["volumeId"], machine.mounts[0].volume.as_str());
    // Nothing more to do: a second reconcile spawns nothing.
    assert_eq!(p.reconcile().await["spawned"], 0);
}

#[tokio::test]
async fn scheduler_pinned_workers_count_once_and_idle_pins_not_at_all() {
    let p = pool(5, 2).await;
    for w in ["w1", "w2", "w3"] {
        let assignment = json!({"conversationId": "conv-a", "agentKey": "agent-a", "leaseId": "x"});
        p.add_worker(w, json!({"assignment": assignment})).await;
    }
    p.enqueue("conv-a").await;
    p.enqueue("conv-b").await;
    assert_eq!(p.reconcile().await["spawned"], 1, "three workers pinned to A cover A once");

    let p = pool(5, 2).await;
    let idle_pin = json!({"conversationId": "finished", "agentKey": "agent-a", "leaseId": "x"});
    p.add_worker("w1", json!({"assignment": idle_pin})).await;
    p.enqueue("conv-b").await;
    let result = p.reconcile().await;
    assert_eq!((result["spawned"].as_u64(), result["activeWorkers"].as_u64()), (Some(1), Some(2)));
}

#[tokio::test]
async fn scheduler_spawn_failure_cleans_up_and_fails_the_call_after_the_cycle() {
    let p = pool(5, 2).await;
    p.enqueue("conv-a").await;
    p.enqueue("conv-b").await;
    p.fake.fail_create(1);
    let err = p.stack.admin().err("reconcileWorkerPool", json!({})).await;
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(err.message.contains("afw-"), "{}", err.message);
    // The other spawn of the cycle went ahead (L7).
    assert_eq!(p.fake.live_machine_count(APP), 1);
    let failed = p.rows().await.into_iter().find(|r| r["status"] == "stopped").expect("failed row");
    assert!(failed["machineRef"].is_null() && failed["volumeId"].is_null(), "{failed}");
    assert_eq!(p.fake.volumes(APP).len(), 1, "the failed spawn's volume was deleted");
}

#[tokio::test]
async fn scheduler_stopped_machine_without_claims_is_torn_down_in_one_check() {
    let (p, worker) = pool_with_one_worker().await;
    let machine = p.fake.machines(APP)[0].id.clone();
    p.fake.set_machine_state(APP, &machine, "stopped");
    p.advance(60_000).await;
    let result = p.idle_check().await;
    assert_eq!((result["stopped"].as_u64(), result["pending"].as_u64()), (Some(1), Some(0)));
    let row = p.row(&worker).await;
    assert_eq!(row["status"], "stopped");
    assert_eq!(p.fake.live_machine_count(APP), 0);
    assert!(p.fake.volumes(APP).is_empty());
}

#[tokio::test]
async fn scheduler_worker_that_claimed_waits_for_its_snapshot_then_goes() {
    let (p, worker) = pool_with_one_worker().await;
    p.work_one(&worker).await;
    p.advance(1_800_001).await;
    let result = p.idle_check().await;
    assert_eq!((result["stopped"].as_u64(), result["pending"].as_u64()), (Some(1), Some(1)));
    assert_eq!(p.row(&worker).await["status"], "draining");
    assert_eq!(p.fake.count_requests("DELETE", "/apps"), 0, "no teardown before the snapshot");

    // The worker's final snapshot opens the gate: one machine DELETE, one volume DELETE.
    assert_eq!(final_snapshot(&p.stack.ctx, &p.stack.worker(&worker), &worker).await, true);
    assert_eq!(p.row(&worker).await["status"], "stopping");
    let result = p.idle_check().await;
    assert_eq!(result["pending"], 0);
    assert_eq!(p.row(&worker).await["status"], "stopped");
    assert_eq!(p.fake.count_requests("DELETE", &format!("/apps/{APP}/machines")), 1);
    assert_eq!(p.fake.count_requests("DELETE", &format!("/apps/{APP}/volumes")), 1);
}

#[tokio::test]
async fn scheduler_transient_and_freshly_missing_machines_stay_active() {
    let (p, worker) = pool_with_one_worker().await;
    let machine = p.fake.machines(APP)[0].id.clone();
    p.fake.set_manual_transitions(true);
    p.fake.set_machine_state(APP, &machine, "creating");
    p.idle_check().await;
    assert_eq!(p.row(&worker).await["status"], "active");
    // A worker whose machine is not listed (yet) keeps its grace window.
    p.add_worker("w-fresh", json!({"machineId": "m-unknown", "appName": APP})).await;
    p.advance(15_000).await;
    p.idle_check().await;
    assert_eq!(p.row("w-fresh").await["status"], "active");
    // The idle-deadline backfill of that check refreshed its heartbeat (spec §3.15.3 D).
    p.advance(90_001).await;
    p.idle_check().await;
    assert_ne!(p.row("w-fresh").await["status"], "active", "past the grace window it is no longer trusted");
}

#[tokio::test]
async fn scheduler_500_on_destroy_keeps_the_worker_stopping_and_its_volume() {
    let (p, worker) = pool_with_one_worker().await;
    for status in ["draining", "stopping"] {
        p.stack
            .admin()
            .ok("upsertWorkerState", json!({"workerId": worker, "provider": "fly", "status": status, "load": 0}))
            .await;
    }
    p.fake.fail_next("DELETE", &format!("/apps/{APP}/machines"), 500, 100);
    let result = p.idle_check().await;
    assert_eq!(result["pending"], 1);
    assert_eq!(p.row(&worker).await["status"], "stopping");
    assert_eq!(p.fake.volumes(APP).len(), 1, "no volume deleted while the machine may live (L8)");
    assert_eq!(p.fake.machines(APP).len(), 1);
    p.fake.clear_faults();
    let result = p.idle_check().await;
    assert_eq!(result["pending"], 0);
    assert_eq!(p.row(&worker).await["status"], "stopped");
    assert!(p.fake.volumes(APP).is_empty() && p.fake.machines(APP).is_empty());
}

#[tokio::test]
async fn scheduler_429_with_backoff_converges() {
    let p = pool(5, 2).await;
    p.enqueue("conv-a").await;
    p.fake.fail_next("POST", &format!("/apps/{APP}/machines"), 429, 2);
    assert_eq!(p.reconcile().await["spawned"], 1);
    assert_eq!(p.fake.live_machine_count(APP), 1);
}

#[tokio::test]
async fn scheduler_burst_never_exceeds_max_workers_nor_doubles_a_conversation() {
    let p = pool(20, 20).await;
    // A second scheduler replica competes for leadership; reconciles stay single-flight.
    let replica_ctx =
        common::service::ServiceContext::connect(p.stack.ctx.settings.clone(), p.stack.nats.url(), "replica")
            .await
            .expect("connect");
    let replica_stop = tokio_util::sync::CancellationToken::new();
    let replica = tokio::spawn(scheduler::run(replica_ctx, replica_stop.clone()));
    for i in 0..50 {
        p.enqueue(&format!("conv-{i:02}")).await;
    }
    let admin = p.stack.admin();
    let calls = (0..8).map(|_| admin.call("reconcileWorkerPool", json!({})));
    for r in futures::future::join_all(calls).await {
        r.expect("reconcile");
        assert!(p.fake.live_machine_count(APP) <= 20);
    }
    for _ in 0..3 {
        p.advance(1000).await;
        p.reconcile().await;
    }
    assert_eq!(p.fake.live_machine_count(APP), 20);
    let rows = p.rows().await;
    let mut conversations: Vec<&str> = rows
        .iter()
        .filter(|r| r["status"] != "stopped")
        .filter_map(|r| r["assignment"]["conversationId"].as_str())
        .collect();
    let live = conversations.len();
    conversations.sort_unstable();
    conversations.dedup();
    assert_eq!((live, conversations.len()), (20, 20), "one worker per conversation, 20 in all");
    replica_stop.cancel();
    replica.await.expect("join").expect("replica");
}

#[tokio::test]
async fn scheduler_explicit_config_is_not_stored_and_bad_config_names_the_field() {
    let p = pool(5, 2).await;
    let err =
        p.stack.admin().err("reconcileWorkerPool", json!({"providerConfig": {"kind": "fly", "appName": APP}})).await;
    assert_eq!(
        err.message,
        "Missing providerConfig.organizationSlug. Pass providerConfig explicitly when starting/reconciling workers."
    );
    let other_app = json!({"kind": "fly", "appName": "elsewhere", "organizationSlug": "o", "image": "i", "region": "r",
                           "volumeName": "v", "volumePath": "/data", "volumeSizeGb": 1});
    p.fake.add_app("elsewhere");
    p.stack.admin().ok("reconcileWorkerPool", json!({"providerConfig": other_app})).await;
    let stored = p.stack.admin().ok("providerRuntimeConfig", json!({})).await;
    assert_eq!(stored["appName"], APP, "an explicit config is never persisted (L6)");
}

#[tokio::test]
async fn scheduler_fly_cleanup_reports_and_the_reaper_waits_for_its_grace() {
    let p = pool(5, 5).await;
    for c in ["conv-a", "conv-b"] {
        p.enqueue(c).await;
    }
    p.reconcile().await;
    let orphan = p.fake.add_volume(APP, "stray_volume", "iad", 1);

    let reaped = p.stack.admin().ok("reapOrphans", json!({})).await;
    assert_eq!((reaped["waiting"].as_u64(), reaped["volumesRemoved"].as_array().map(Vec::len)), (Some(1), Some(0)));
    p.advance(30 * 60 * 1000 - 1).await;
    assert_eq!(p.stack.admin().ok("reapOrphans", json!({})).await["volumesRemoved"], json!([]));
    p.advance(1).await;
    let reaped = p.stack.admin().ok("reapOrphans", json!({})).await;
    assert_eq!(reaped["volumesRemoved"], json!([orphan.id]));
    assert_eq!(p.fake.volumes(APP).len(), 2, "the workers' own volumes are accounted for");
    // A stray that goes away before its grace period leaves no sighting behind.
    let passing = p.fake.add_volume(APP, "passing_volume", "iad", 1);
    assert_eq!(p.stack.admin().ok("reapOrphans", json!({})).await["waiting"], 1);
    let sightings = |ctx: common::service::ServiceContext| async move {
        let keys = ctx.buckets.system.keys().await.expect("keys");
        keys.into_iter().filter(|k| k.starts_with("orphan.")).count()
    };
    assert_eq!(sightings(p.stack.ctx.clone()).await, 1);
    let provider =
        providers::fly::FlyProvider::new(&p.fake.base_url(), p.fake.token(), &p.stack.ctx.settings.providers);
    providers::Provider::delete_volume(&provider, APP, &passing.id).await.expect("delete");
    assert_eq!(p.stack.admin().ok("reapOrphans", json!({})).await["waiting"], 0);
    assert_eq!(sightings(p.stack.ctx.clone()).await, 0);

    let report = p.stack.admin().ok("runFlyCleanup", json!({})).await;
    assert_eq!(report["appName"], APP);
    assert_eq!((report["machinesFound"].as_u64(), report["machinesDeleted"].as_u64()), (Some(2), Some(2)));
    assert_eq!((report["volumesFound"].as_u64(), report["volumesDeleted"].as_u64()), (Some(2), Some(2)));
    assert_eq!((report["machinesRemaining"].as_u64(), report["volumesRemaining"].as_u64()), (Some(0), Some(0)));
    assert_eq!(report["errors"], json!([]));
    assert_eq!(p.fake.live_machine_count(APP), 0);

    // The original's messages, checked in its order: configuration, app, token.
    let bare = TestStack::start_with(MANUAL).await;
    let admin = bare.admin();
    let err = admin.err("runFlyCleanup", json!({"providerConfig": {"kind": "local", "appName": APP}})).await;
    assert_eq!(err.message, "Fly cleanup requires a Fly provider configuration.");
    let err = admin.err("runFlyCleanup", json!({"providerConfig": {"kind": "fly", "appName": " "}})).await;
    assert_eq!(err.message, "Fly cleanup requires a non-empty Fly app name.");
    let err = admin.err("runFlyCleanup", json!({"providerConfig": {"kind": "fly", "appName": APP}})).await;
    assert_eq!(err.message, "Missing active 'fly.apiToken' secret. Import it before running Fly cleanup.");
}

#[tokio::test]
async fn scheduler_self_registered_worker_is_drained_at_its_idle_deadline() {
    let p = pool(5, 2).await;
    p.enqueue("conv-a").await;
    // A worker nobody spawned claims (it registers itself), completes a minute later.
    let job = p.stack.worker("w-self").ok("claimNextJob", json!({"workerId": "w-self"})).await;
    assert_eq!(job["conversationId"], "conv-a");
    p.advance(60_000).await;
    let done = json!({"workerId": "w-self", "messageId": job["messageId"], "leaseId": job["leaseId"]});
    p.stack.worker("w-self").ok("completeJob", done).await;
    p.advance(1_800_000 - 60_000 + 1).await;
    let result = p.idle_check().await;
    assert_eq!(result["stopped"], 1);
    let row = p.row("w-self").await;
    assert_eq!(row["status"], "draining");
    assert_eq!(row["scheduledShutdownAt"], T0 + 1_800_000);
    assert!(row.get("stoppedAt").is_none_or(Value::is_null), "{row}");
    let control = p.stack.worker("w-self").ok("getWorkerControlState", json!({"workerId": "w-self"})).await;
    assert_eq!(control["shouldStop"], true);
    p.enqueue("conv-a").await;
    let claim = p.stack.worker("w-self").ok("claimNextJob", json!({"workerId": "w-self"})).await;
    assert_eq!(claim, Value::Null, "a draining worker gets no new work");
}

#[tokio::test]
async fn scheduler_overdue_worker_whose_machine_is_gone_is_stopped_and_its_volume_deleted() {
    let (p, worker) = pool_with_one_worker().await;
    let machine = p.fake.machines(APP)[0].id.clone();
    // The machine vanishes behind our back (destroyed at the provider).
    p.fake.set_machine_state(APP, &machine, "destroyed");
    p.advance(1_800_001).await;
    p.fake.clear_requests();
    let result = p.idle_check().await;
    assert_eq!(result["pending"], 0);
    assert_eq!(p.row(&worker).await["status"], "stopped");
    assert!(p.fake.volumes(APP).is_empty(), "the volume is deleted by id");
    let detail = format!("/apps/{APP}/machines/{machine}");
    assert_eq!(p.fake.count_requests("GET", &detail), 0, "no machine detail was fetched");
}

#[tokio::test]
async fn scheduler_burst_of_enqueues_is_served_by_a_handful_of_reconciles() {
    // Real clock and the automatic loop on; maxWorkers 0 so nothing is spawned, only counted.
    let p = pool_with(0, 1, &[]).await;
    let app = p.stack.app();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        let calls = chunk.iter().map(|i| app.call("enqueueMessage", message(&format!("c-{i}"), "agent-a", "hi")));
        for r in futures::future::join_all(calls).await {
            r.expect("enqueue");
        }
    }
    let metric = |name: &str| {
        let text = common::telemetry::metrics_handle().render();
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    tests::wait_until("a reconcile saw all 1000 conversations", Duration::from_secs(30), || async {
        (metric(common::telemetry::POOL_DEMAND)? >= 1000.0).then_some(())
    })
    .await;
    let reconciles = metric(common::telemetry::RECONCILES).unwrap_or(0.0);
    assert!((1.0..=50.0).contains(&reconciles), "{reconciles} reconciles for 1000 enqueues");
}

#[tokio::test]
async fn scheduler_idle_worker_that_keeps_polling_lives_until_its_idle_timeout_not_the_stale_cutoff() {
    let p = pool(5, 2).await;
    p.enqueue("conv-a").await;
    let job = p.stack.worker("w-idle").ok("claimNextJob", json!({"workerId": "w-idle"})).await;
    let done = json!({"workerId": "w-idle", "messageId": job["messageId"], "leaseId": job["leaseId"]});
    p.stack.worker("w-idle").ok("completeJob", done).await;
    // 25 minutes of idle polling, one claim every 5 minutes: well past the 7-minute stale cutoff.
    for _ in 0..5 {
        p.advance(5 * 60_000).await;
        let claim = p.stack.worker("w-idle").ok("claimNextJob", json!({"workerId": "w-idle"})).await;
        assert_eq!(claim, Value::Null);
        p.idle_check().await;
        assert_eq!(p.row("w-idle").await["status"], "active", "presence keeps an idle poller alive (L1)");
    }
    p.advance(5 * 60_000 + 1).await;
    p.idle_check().await;
    assert_eq!(p.row("w-idle").await["status"], "draining", "the idle timeout (30 min) drains it");
}

#[tokio::test]
async fn scheduler_safe_fly_cleanup_waits_for_the_drained_workers_snapshots() {
    let (p, worker) = pool_with_one_worker().await;
    p.work_one(&worker).await;
    // The worker's part of the protocol: once drained, snapshot.
    let (stack_worker, row_worker) = (p.stack.worker(&worker), worker.clone());
    let ctx = p.stack.ctx.clone();
    let admin = p.stack.admin();
    let snapshotter = tokio::spawn(async move {
        tests::wait_until("the worker is drained", Duration::from_secs(30), || async {
            let rows = admin.ok("listWorkersForScheduler", json!({})).await;
            rows.as_array()?
                .iter()
                .any(|r| r["workerId"] == row_worker.as_str() && r["status"] == "draining")
                .then_some(())
        })
        .await;
        final_snapshot(&ctx, &stack_worker, &row_worker).await
    });
    let report = p.stack.admin().ok("runFlyCleanup", json!({"safe": true})).await;
    assert_eq!(snapshotter.await.expect("join"), true);
    assert_eq!((report["drainedWorkers"].as_u64(), report["drainComplete"].as_bool()), (Some(1), Some(true)));
    assert_eq!(report["machinesDeleted"], 1);
    assert_eq!(p.row(&worker).await["status"], "stopping", "the snapshot arrived before anything was destroyed");
}

#[tokio::test]
async fn scheduler_worker_rows_have_every_field_of_the_original_null_when_unset() {
    let p = pool(5, 2).await;
    let upserted = p
        .stack
        .admin()
        .ok("upsertWorkerState", json!({"workerId": "w1", "provider": "fly", "status": "active", "load": 0}))
        .await;
    // Spec §1.4, field by field: every field present, null when the original leaves it unset.
    let fresh = json!({
        "workerId": "w1", "provider": "fly", "volumeId": null, "machineRef": null, "status": "active", "load": 0,
        "heartbeatAt": T0, "lastClaimAt": null, "scheduledShutdownAt": null, "stoppedAt": null,
        "lastSnapshotId": null, "assignment": null, "capabilities": [],
    });
    assert_eq!(upserted, fresh);
    assert_eq!(p.row("w1").await, fresh);

    p.enqueue("conv-a").await;
    let job = p.stack.worker("w1").ok("claimNextJob", json!({"workerId": "w1"})).await;
    let row = p.row("w1").await;
    assert_eq!(row["lastClaimAt"], T0);
    assert_eq!(row["load"], 1);
    assert_eq!(
        row["assignment"],
        json!({"conversationId": "conv-a", "agentKey": "agent-a", "leaseId": job["leaseId"], "assignedAt": T0})
    );
    assert!(row["stoppedAt"].is_null() && row["scheduledShutdownAt"].is_null(), "{row}");
}
