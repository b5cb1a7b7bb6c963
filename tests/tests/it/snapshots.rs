//! Workspace snapshots (hydration): prepare → upload (HTTP shim or object store) → finalize with
//! server-side verification → restore lookup → download, plus retention, on a manual clock.

use common::ErrorCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::{MANUAL, T0, TestStack, pseudo_random};

pub(crate) fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Pre-assigns `worker` to `conversation` as the scheduler does at spawn.
pub(crate) async fn assign(stack: &TestStack, worker: &str, conversation: &str, agent: &str) {
    stack
        .admin()
        .ok(
            "upsertWorkerState",
            json!({
                "workerId": worker, "provider": "local", "status": "active", "load": 0,
                "assignment": {"conversationId": conversation, "agentKey": agent, "leaseId": format!("spawn:{worker}")},
            }),
        )
        .await;
}

async fn prepare(stack: &TestStack, worker: &str, conversation: &str) -> Value {
    stack
        .worker(worker)
        .ok(
            "prepareDataSnapshotUpload",
            json!({"workerId": worker, "workspaceId": "default", "agentKey": "agent-a",
                   "conversationId": conversation, "reason": "drain"}),
        )
        .await
}

async fn put_http(stack: &TestStack, worker: &str, prepared: &Value, bytes: Vec<u8>) -> reqwest::Response {
    let token = stack.ctx.auth.mint_worker_token(worker).expect("token");
    reqwest::Client::new()
        .put(prepared["uploadUrl"].as_str().expect("upload url"))
        .bearer_auth(token)
        .header("content-type", "application/gzip")
        .body(bytes)
        .send()
        .await
        .expect("upload request")
}

async fn finalize(stack: &TestStack, worker: &str, prepared: &Value, bytes: &[u8]) -> Result<Value, common::OpError> {
    stack
        .worker(worker)
        .call(
            "finalizeDataSnapshotUpload",
            json!({"workerId": worker, "snapshotId": prepared["snapshotId"], "sha256": sha_hex(bytes),
                   "sizeBytes": bytes.len()}),
        )
        .await
}

/// A ready snapshot of `conversation` holding `bytes`, uploaded through the HTTP shim.
async fn ready_snapshot(stack: &TestStack, worker: &str, conversation: &str, bytes: &[u8]) -> String {
    let prepared = prepare(stack, worker, conversation).await;
    assert!(put_http(stack, worker, &prepared, bytes.to_vec()).await.status().is_success());
    assert_eq!(finalize(stack, worker, &prepared, bytes).await.expect("finalize"), true);
    prepared["snapshotId"].as_str().expect("id").to_string()
}

async fn restore_lookup(stack: &TestStack, worker: &str, conversation: &str) -> Value {
    stack
        .worker(worker)
        .ok(
            "getLatestDataSnapshotForRestore",
            json!({"workspaceId": "default", "agentKey": "agent-a", "conversationId": conversation}),
        )
        .await
}

async fn archive_exists(stack: &TestStack, snapshot_id: &str) -> bool {
    stack.ctx.buckets.snapshot_archives.info(snapshot_id).await.is_ok_and(|i| !i.deleted)
}

#[tokio::test]
async fn snapshots_round_trip_20_mb_through_the_http_shim() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let archive = pseudo_random(20 * 1024 * 1024, 7);
    let prepared = prepare(&stack, "w1", "c1").await;
    assert_eq!(prepared["expiresAt"], T0 + 604_800_000);
    let upload = put_http(&stack, "w1", &prepared, archive.clone()).await;
    assert_eq!(upload.status(), 200);
    let uploaded: Value = upload.json().await.expect("json");
    assert_eq!(uploaded["sizeBytes"], archive.len());
    assert_eq!(uploaded["sha256"], sha_hex(&archive));
    assert_eq!(finalize(&stack, "w1", &prepared, &archive).await.expect("finalize"), true);

    // A new worker of the same conversation finds it and downloads identical bytes.
    assign(&stack, "w2", "c1", "agent-a").await;
    let target = restore_lookup(&stack, "w2", "c1").await;
    assert_eq!(target["snapshotId"], prepared["snapshotId"]);
    assert_eq!(target["sha256"], sha_hex(&archive));
    assert_eq!(target["sizeBytes"], archive.len());
    let token = stack.ctx.auth.mint_worker_token("w2").expect("token");
    let download = reqwest::Client::new()
        .get(target["downloadUrl"].as_str().expect("url"))
        .bearer_auth(token)
        .send()
        .await
        .expect("download");
    assert_eq!(download.status(), 200);
    assert_eq!(download.headers()["x-af-sha256"], sha_hex(&archive).as_str());
    let bytes = download.bytes().await.expect("body");
    assert_eq!(bytes.len(), archive.len());
    assert_eq!(sha_hex(&bytes), sha_hex(&archive));
    assert!(bytes[..] == archive[..]);

    // The worker row remembers it.
    let rows = stack.admin().ok("listWorkersForScheduler", json!({})).await;
    let w1 = rows.as_array().expect("rows").iter().find(|r| r["workerId"] == "w1").expect("w1").clone();
    assert_eq!(w1["lastSnapshotId"], prepared["snapshotId"]);
}

#[tokio::test]
async fn snapshots_upload_straight_into_the_object_store() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let archive = pseudo_random(3 * 1024 * 1024 + 17, 9);
    let prepared = prepare(&stack, "w1", "c1").await;
    assert_eq!(prepared["objectStore"], common::topology::SNAPSHOT_ARCHIVES);
    let name = prepared["objectName"].as_str().expect("object name");
    stack.ctx.buckets.snapshot_archives.put(name, &mut &archive[..]).await.expect("put");
    assert_eq!(finalize(&stack, "w1", &prepared, &archive).await.expect("finalize"), true);
    assert_eq!(restore_lookup(&stack, "w1", "c1").await["snapshotId"], prepared["snapshotId"]);
}

#[tokio::test]
async fn snapshots_checksum_mismatch_fails_finalize_and_drops_the_archive() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let prepared = prepare(&stack, "w1", "c1").await;
    let id = prepared["snapshotId"].as_str().expect("id").to_string();
    assert!(put_http(&stack, "w1", &prepared, b"the real archive".to_vec()).await.status().is_success());
    let err = finalize(&stack, "w1", &prepared, b"what the worker thinks it sent").await.expect_err("mismatch");
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(err.message.contains("checksum mismatch"), "{}", err.message);
    let listed = stack.admin().ok("listSnapshotsForConversation", json!({"conversationId": "c1"})).await;
    assert_eq!(listed[0]["status"], "failed");
    assert_eq!(listed[0]["downloadUrl"], Value::Null);
    assert!(!archive_exists(&stack, &id).await);
    assert_eq!(restore_lookup(&stack, "w1", "c1").await, Value::Null);
    // A failed snapshot cannot be finalized later.
    let again = finalize(&stack, "w1", &prepared, b"the real archive").await.expect_err("not uploading");
    assert_eq!(again.code, ErrorCode::Conflict);
}

#[tokio::test]
async fn snapshots_restore_falls_back_to_an_older_ready_one_and_matches_exactly() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let good = ready_snapshot(&stack, "w1", "c1", b"older but good").await;
    stack.admin().ok("advanceTestClock", json!({"ms": 1000})).await;
    let failed = prepare(&stack, "w1", "c1").await;
    let refused = stack
        .worker("w1")
        .ok("failDataSnapshotUpload", json!({"workerId": "w1", "snapshotId": failed["snapshotId"], "error": "disk"}))
        .await;
    assert_eq!(refused, true);
    stack.admin().ok("advanceTestClock", json!({"ms": 1000})).await;
    prepare(&stack, "w1", "c1").await; // Newest, still uploading.
    assert_eq!(restore_lookup(&stack, "w1", "c1").await["snapshotId"], good.as_str());

    // Only the exact workspace + agent + conversation restores.
    let admin = stack.admin();
    let lookup = |conversation: &str, agent: &str, workspace: &str| json!({"workspaceId": workspace, "agentKey": agent, "conversationId": conversation});
    assert_eq!(admin.ok("getLatestDataSnapshotForRestore", lookup("c2", "agent-a", "default")).await, Value::Null);
    assert_eq!(admin.ok("getLatestDataSnapshotForRestore", lookup("c1", "agent-b", "default")).await, Value::Null);
    assert_eq!(admin.ok("getLatestDataSnapshotForRestore", lookup("c1", "agent-a", "other")).await, Value::Null);
    // A worker of another conversation is refused outright.
    assign(&stack, "w9", "c9", "agent-a").await;
    let err = stack.worker("w9").err("getLatestDataSnapshotForRestore", lookup("c1", "agent-a", "default")).await;
    assert_eq!(err.code, ErrorCode::Forbidden);
}

#[tokio::test]
async fn snapshots_apis_require_a_conversation_id() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let prepare_without = json!({"workerId": "w1", "workspaceId": "default", "agentKey": "agent-a", "reason": "drain"});
    for (op, args) in [
        ("prepareDataSnapshotUpload", prepare_without),
        ("getLatestDataSnapshotForRestore", json!({"workspaceId": "default", "agentKey": "agent-a"})),
        ("listSnapshotsForConversation", json!({})),
    ] {
        let err = stack.admin().err(op, args).await;
        assert_eq!((err.code, err.message.as_str()), (ErrorCode::InvalidInput, "conversationId is required"), "{op}");
    }
    // A blank id is not an id at all: refused, naming the field, before any store is touched.
    let err = stack.admin().err("listSnapshotsForConversation", json!({"conversationId": "  "})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(err.message.contains("conversationId: invalid conversation id"), "{}", err.message);
}

#[tokio::test]
async fn snapshots_belong_to_the_owning_worker_and_admins() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    assign(&stack, "w2", "c2", "agent-a").await;
    // A worker cannot prepare for a conversation it is not assigned to, nor as another worker.
    let args = json!({"workerId": "w2", "agentKey": "agent-a", "conversationId": "c1", "reason": "manual"});
    assert_eq!(stack.worker("w2").err("prepareDataSnapshotUpload", args.clone()).await.code, ErrorCode::Forbidden);
    assert_eq!(stack.worker("w1").err("prepareDataSnapshotUpload", args).await.code, ErrorCode::Forbidden);
    let id = ready_snapshot(&stack, "w1", "c1", b"secret workspace").await;
    let url = stack.http_url(&format!("/v1/snapshots/{id}/archive"));
    let get = |token: String| {
        let url = url.clone();
        async move { reqwest::Client::new().get(url).bearer_auth(token).send().await.expect("get").status() }
    };
    assert_eq!(get(stack.ctx.auth.mint_worker_token("w2").expect("token")).await, 403);
    assert_eq!(get(tests::APP_TOKEN.to_string()).await, 403);
    assert_eq!(get(tests::ADMIN_TOKEN.to_string()).await, 200);
    assert_eq!(reqwest::Client::new().get(&url).send().await.expect("get").status(), 401);
    // Uploading again over a ready snapshot is refused.
    let token = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let put = reqwest::Client::new().put(&url).bearer_auth(token).body("x").send().await.expect("put");
    assert_eq!(put.status(), 409);
}

#[tokio::test]
async fn snapshots_listed_per_user_agent_stay_isolated_per_conversation() {
    let stack = TestStack::start_with(MANUAL).await;
    tests::seed_profile(&stack.ctx, "agent-a").await;
    for user in ["u1", "u2"] {
        stack.app().ok("bindUserAgent", json!({"consumerUserId": user, "agentKey": "agent-a"})).await;
    }
    assign(&stack, "w1", "user-agent:agent-a:u1", "agent-a").await;
    assign(&stack, "w2", "user-agent:agent-a:u2", "agent-a").await;
    let mine = ready_snapshot(&stack, "w1", "user-agent:agent-a:u1", b"u1 workspace").await;
    let theirs = ready_snapshot(&stack, "w2", "user-agent:agent-a:u2", b"u2 workspace").await;
    let u1 = json!({"consumerUserId": "u1", "agentKey": "agent-a"});
    let listed = stack.app().ok("listSnapshotsForUserAgent", u1.clone()).await;
    let ids: Vec<&str> =
        listed.as_array().expect("list").iter().map(|s| s["snapshotId"].as_str().expect("id")).collect();
    assert_eq!(ids, vec![mine.as_str()]);
    assert!(!ids.contains(&theirs.as_str()));
    // Apps see no download links (archives carry credentials, S7); admins do.
    assert_eq!(listed[0]["downloadUrl"], Value::Null);
    let latest = stack.admin().ok("getLatestSnapshotForUserAgent", u1).await;
    assert_eq!(latest["snapshotId"], mine.as_str());
    assert!(latest["downloadUrl"].as_str().is_some_and(|u| u.ends_with(&format!("/v1/snapshots/{mine}/archive"))));
    let nobody = json!({"consumerUserId": "u3", "agentKey": "agent-a"});
    assert_eq!(stack.app().ok("getLatestSnapshotForUserAgent", nobody).await, Value::Null);
}

#[tokio::test]
async fn snapshots_finalize_moves_a_draining_worker_to_stopping() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let draining = json!({"workerId": "w1", "provider": "local", "status": "draining", "load": 0});
    stack.admin().ok("upsertWorkerState", draining).await;
    ready_snapshot(&stack, "w1", "c1", b"final").await;
    let rows = stack.admin().ok("listWorkersForScheduler", json!({})).await;
    let w1 = rows.as_array().expect("rows").iter().find(|r| r["workerId"] == "w1").expect("w1").clone();
    assert_eq!(w1["status"], "stopping");
    assert_eq!(w1["stoppedAt"], T0);
}

#[tokio::test]
async fn snapshots_expired_and_abandoned_ones_leave_the_store() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let id = ready_snapshot(&stack, "w1", "c1", b"soon expired").await;
    let abandoned = prepare(&stack, "w1", "c1").await;
    let abandoned_id = abandoned["snapshotId"].as_str().expect("id").to_string();
    assert!(put_http(&stack, "w1", &abandoned, b"half an upload".to_vec()).await.status().is_success());
    assert!(archive_exists(&stack, &id).await && archive_exists(&stack, &abandoned_id).await);

    let admin = stack.admin();
    // Before the deadlines nothing goes.
    let swept = admin.ok("expireOldDataSnapshots", json!({})).await;
    assert_eq!((swept["expired"].as_u64(), swept["abandoned"].as_u64()), (Some(0), Some(0)));
    admin.ok("advanceTestClock", json!({"ms": 3_600_000})).await;
    let swept = admin.ok("expireOldDataSnapshots", json!({})).await;
    assert_eq!((swept["expired"].as_u64(), swept["abandoned"].as_u64()), (Some(0), Some(1)));
    assert!(!archive_exists(&stack, &abandoned_id).await);
    assert!(archive_exists(&stack, &id).await);

    admin.ok("advanceTestClock", json!({"ms": 604_800_000})).await;
    let swept = admin.ok("expireOldDataSnapshots", json!({})).await;
    assert_eq!(swept["expired"], 1);
    assert!(!archive_exists(&stack, &id).await, "the expired archive is deleted, not just marked");
    let listed = admin.ok("listSnapshotsForConversation", json!({"conversationId": "c1"})).await;
    assert!(listed.as_array().expect("list").iter().all(|s| s["downloadUrl"].is_null()));
    assert_eq!(restore_lookup(&stack, "w1", "c1").await, Value::Null);
}
