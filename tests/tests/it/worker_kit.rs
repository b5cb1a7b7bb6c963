//! The worker-side library against the running services: a workspace archived, uploaded and
//! finalized by one worker, then restored by the next worker of the conversation into an empty
//! directory, over both transports; and a job's attachments downloaded into the workspace.

use common::api;
use common::api::history::BundleArgs;
use common::api::queue::ClaimArgs;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tests::{MANUAL, TestStack, message, seed_profile};
use worker_kit::client::{SnapshotScope, WorkerClient};

use crate::snapshots::assign;
use tests::pseudo_random;

/// Every regular file under `root` with its contents, by relative path.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("relative").display().to_string();
                out.insert(rel, std::fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

fn scope(conversation: &str) -> SnapshotScope {
    SnapshotScope {
        workspace_id: "default".to_string(),
        agent_key: "agent-a".to_string(),
        conversation_id: conversation.to_string(),
    }
}

#[tokio::test]
async fn worker_kit_snapshot_round_trip_restores_every_file() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let data = tempfile::tempdir().expect("tmp");
    write(data.path(), ".clawdbot/openclaw.json", br#"{"gateway":{"auth":{"token":"t"}}}"#);
    write(data.path(), ".clawdbot/agents/main/sessions/sessions.json", b"{}");
    write(data.path(), "workspace/MEMORY.md", b"# memory\n- likes tea\n");
    write(data.path(), "workspace/memory/2026-01-01.md", "d\u{e9}j\u{e0} vu\n".as_bytes());
    write(data.path(), "workspace/blob.bin", &pseudo_random(2 * 1024 * 1024, 3));
    write(data.path(), "not-snapshotted.txt", b"outside the two snapshot entries");

    let token = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let uploader = WorkerClient::over_http(&stack.http_url(""), "w1", &token);
    let uploaded = uploader.upload_snapshot(data.path(), &scope("c1"), "drain").await.expect("upload");
    assert_eq!(uploaded.sha256.len(), 64);

    // The next worker of the conversation restores it, over NATS, into an empty directory.
    assign(&stack, "w2", "c1", "agent-a").await;
    let token = stack.ctx.auth.mint_worker_token("w2").expect("token");
    let restorer = WorkerClient::over_nats(stack.ctx.nats.clone(), "w2", &token, Duration::from_secs(10));
    let restored_dir = tempfile::tempdir().expect("tmp");
    let (target, _) =
        restorer.restore_snapshot(&scope("c1"), restored_dir.path()).await.expect("restore").expect("found");
    assert_eq!(target.snapshot_id, uploaded.snapshot_id);
    let mut expected = tree(data.path());
    expected.remove("not-snapshotted.txt");
    assert_eq!(tree(restored_dir.path()), expected, "every file identical");

    // Over HTTP too, and a conversation without snapshots restores nothing.
    let over_http = WorkerClient::over_http(&stack.http_url(""), "w2", &token);
    let again = tempfile::tempdir().expect("tmp");
    over_http.restore_snapshot(&scope("c1"), again.path()).await.expect("restore").expect("found");
    assert_eq!(tree(again.path()), expected);
    assign(&stack, "w3", "c3", "agent-a").await;
    let token = stack.ctx.auth.mint_worker_token("w3").expect("token");
    let fresh = WorkerClient::over_http(&stack.http_url(""), "w3", &token);
    assert!(fresh.restore_snapshot(&scope("c3"), again.path()).await.expect("lookup").is_none());
}

#[tokio::test]
async fn worker_kit_failed_upload_is_reported_and_never_left_uploading() {
    let stack = TestStack::start_with(MANUAL).await;
    assign(&stack, "w1", "c1", "agent-a").await;
    let data = tempfile::tempdir().expect("tmp");
    write(data.path(), "workspace/big.bin", &pseudo_random(64 * 1024, 5));
    let token = stack.ctx.auth.mint_worker_token("w1").expect("token");
    // An ingress URL nobody listens on: prepare works (NATS), the HTTP upload cannot.
    let client = WorkerClient::over_http(&stack.http_url(""), "w1", &token);
    stack
        .admin()
        .ok("upsertWorkerState", json!({"workerId": "w1", "provider": "local", "status": "active", "load": 0}))
        .await;
    let broken = tests::TestStack::start_with(MANUAL).await; // A second stack: unknown worker there.
    let elsewhere = WorkerClient::over_http(&broken.http_url(""), "w1", &token);
    assert!(elsewhere.upload_snapshot(data.path(), &scope("c1"), "manual").await.is_err());
    // On the real stack a good upload still works and the listing shows no stuck upload.
    client.upload_snapshot(data.path(), &scope("c1"), "manual").await.expect("upload");
    let listed = stack.admin().ok("listSnapshotsForConversation", json!({"conversationId": "c1"})).await;
    assert!(listed.as_array().expect("list").iter().all(|s| s["status"] == "ready"));
}

#[tokio::test]
async fn worker_kit_downloads_a_jobs_attachments_into_the_workspace() {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "agent-a").await;
    stack.wait_queue_ready().await;
    let upload = reqwest::Client::new()
        .post(stack.http_url("/v1/media"))
        .bearer_auth(tests::APP_TOKEN)
        .header("content-type", "image/jpeg")
        .body(b"jpeg bytes".to_vec())
        .send()
        .await
        .expect("upload");
    let storage_id = upload.json::<serde_json::Value>().await.expect("json")["storageId"].clone();
    let message_id = stack.app().ok("enqueueMessage", message("c1", "agent-a", "photo")).await;
    stack
        .app()
        .ok(
            "attachMessageMedia",
            json!({"messageId": message_id, "conversationId": "c1",
                   "attachments": [{"kind": "photo", "storageId": storage_id, "mimeType": "image/jpeg"}]}),
        )
        .await;
    let token = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let client = WorkerClient::over_http(&stack.http_url(""), "w1", &token);
    let claim: ClaimArgs = serde_json::from_value(json!({"workerId": "w1"})).expect("args");
    let job = client.call::<api::ClaimNextJob>(&claim).await.expect("claim").expect("a job");
    let args: BundleArgs =
        serde_json::from_value(json!({"messageId": job.message_id, "workspaceId": "default", "conversationId": "c1"}))
            .expect("args");
    let bundle = client.call::<api::GetHydrationBundleForClaimedJob>(&args).await.expect("bundle").expect("bundle");
    let attachments: Vec<worker_kit::attachments::BundleAttachment> =
        serde_json::from_value(bundle.payload["attachments"].clone()).expect("attachments");
    let workspace = tempfile::tempdir().expect("tmp");
    let message_id = job.message_id.as_str();
    let results = worker_kit::attachments::download_all(
        client.http(),
        &token,
        message_id,
        &attachments,
        workspace.path(),
        1 << 20,
    )
    .await;
    assert_eq!(results.len(), 1);
    let file = results.into_iter().next().expect("one").expect("downloaded");
    assert_eq!(std::fs::read(&file.path).expect("read"), b"jpeg bytes");
    assert!(file.path.starts_with(workspace.path().join(".telegram-attachments")));
    assert_eq!(file.path.extension().and_then(|e| e.to_str()), Some("jpg"));
}
