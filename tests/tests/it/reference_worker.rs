//! The reference worker (`services/worker`) run in-process against the whole stack: it serves
//! its conversation (echo engine), replies to Telegram through a fake Bot API, drains when its
//! row says so, snapshots, and the next worker of the conversation restores its files — over
//! NATS and over ingress HTTP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tests::fake_telegram::FakeTelegram;
use tests::{MANUAL, TestStack, seed_profile, wait_until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::{RunOutcome, StopReason, WorkerConfig, WorkerError};
use worker_kit::client::{SnapshotScope, WorkerClient};

use crate::snapshots::assign;

pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// What the fake Bot API recorded: `(method, chat id, text, parse_mode)` per call that reached a
/// user.
fn sent(fake: &FakeTelegram) -> Vec<(String, String, String, Option<String>)> {
    fake.sent().into_iter().map(|s| (s.method, s.chat_id, s.text, s.parse_mode)).collect()
}

pub(crate) enum Via {
    Nats,
    Http,
}

/// The worker's configuration, built through its env contract as a spawned worker gets it.
pub(crate) fn config(stack: &TestStack, worker: &str, via: Via, data: &Path, extra: &[(&str, &str)]) -> WorkerConfig {
    let token = stack.ctx.auth.mint_worker_token(worker).expect("token");
    let mut env: HashMap<String, String> = HashMap::from([
        ("WORKER_ID".to_string(), worker.to_string()),
        ("AF_WORKER_TOKEN".to_string(), token),
        ("OPENCLAW_DATA_DIR".to_string(), data.display().to_string()),
        ("HEARTBEAT_INTERVAL_MS".to_string(), "50".to_string()),
        ("AF_CLAIM_WAIT_MS".to_string(), "5000".to_string()),
    ]);
    match via {
        Via::Nats => env.insert("AF_NATS_URL".to_string(), stack.nats.url().to_string()),
        Via::Http => env.insert("CONVEX_URL".to_string(), stack.http_url("")),
    };
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    WorkerConfig::from_env(&env).expect("valid worker env")
}

pub(crate) fn start(config: WorkerConfig) -> (CancellationToken, JoinHandle<Result<RunOutcome, WorkerError>>) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker::run(config, shutdown.clone()));
    (shutdown, handle)
}

pub(crate) async fn finished(handle: JoinHandle<Result<RunOutcome, WorkerError>>) -> RunOutcome {
    tokio::time::timeout(WAIT, handle).await.expect("the worker stops in time").expect("no panic").expect("clean stop")
}

async fn enqueue(stack: &TestStack, conversation: &str, agent: &str, payload: Value) -> String {
    let args = json!({"conversationId": conversation, "agentKey": agent, "payload": payload});
    stack.app().ok("enqueueMessage", args).await.as_str().expect("message id").to_string()
}

/// The queue view of one message.
pub(crate) async fn item(stack: &TestStack, conversation: &str, message_id: &str) -> Value {
    let items = stack.app().ok("listQueueItemsForConversation", json!({"conversationId": conversation})).await;
    items.as_array().expect("items").iter().find(|i| i["_id"] == message_id).cloned().expect("the message is listed")
}

pub(crate) async fn wait_done(stack: &TestStack, conversation: &str, message_id: &str) {
    wait_until(&format!("message {message_id} is done"), WAIT, || async {
        (item(stack, conversation, message_id).await["status"] == "done").then_some(())
    })
    .await;
}

/// `(role, content)` of a conversation's history, oldest first.
pub(crate) async fn history(stack: &TestStack, conversation: &str) -> Vec<(String, String)> {
    let page = stack.admin().ok("getConversationHistory", json!({"conversationId": conversation})).await;
    let mut items: Vec<(String, String)> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| (i["role"].as_str().unwrap_or("").to_string(), i["content"].as_str().unwrap_or("").to_string()))
        .collect();
    items.reverse();
    items
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
}

/// The worker's dated memory files (name → content).
fn memory_files(data: &Path) -> HashMap<String, String> {
    let dir = data.join("workspace/memory");
    let Ok(entries) = std::fs::read_dir(&dir) else { return HashMap::new() };
    entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap_or_default()))
        .collect()
}

async fn worker_row(stack: &TestStack, worker: &str) -> Value {
    let rows = stack.admin().ok("listWorkersForScheduler", json!({})).await;
    rows.as_array().expect("rows").iter().find(|r| r["workerId"] == worker).cloned().unwrap_or(Value::Null)
}

async fn snapshots(stack: &TestStack, conversation: &str) -> Vec<Value> {
    let listed = stack.admin().ok("listSnapshotsForConversation", json!({"conversationId": conversation})).await;
    listed.as_array().expect("snapshots").clone()
}

#[tokio::test]
async fn reference_worker_serves_its_conversation_drains_and_hands_its_workspace_over() {
    let stack = TestStack::start_with(MANUAL).await;
    let admin = stack.admin();
    admin
        .ok(
            "upsertAgentProfile",
            json!({"agentKey": "agent-a", "version": "1.0.0", "enabled": true,
                   "secretsRef": ["telegram.botToken.agent-a"]}),
        )
        .await;
    let fake = FakeTelegram::start().await;
    let bot_token = fake.add_bot(123456, "agent_a_bot");
    admin
        .ok("importPlaintextSecret", json!({"secretRef": "telegram.botToken.agent-a", "plaintextValue": bot_token}))
        .await;
    let telegram_url = fake.base_url();
    assign(&stack, "w1", "c1", "agent-a").await;

    // A Telegram message from a group chat: the reply must go to the chat, in plain text.
    let text = "hello <b>world</b> & co";
    let first = enqueue(
        &stack,
        "c1",
        "agent-a",
        json!({"provider": "telegram", "providerUserId": "42", "messageText": text,
               "metadata": {"telegramChatId": "-100777"}}),
    )
    .await;
    let data1 = tempfile::tempdir().expect("tmp");
    let env = [
        ("OPENCLAW_CONVERSATION_ID", "c1"),
        ("OPENCLAW_AGENT_KEY", "agent-a"),
        ("TELEGRAM_API_BASE_URL", telegram_url.as_str()),
    ];
    let (_stop1, worker1) = start(config(&stack, "w1", Via::Nats, data1.path(), &env));
    wait_done(&stack, "c1", &first).await;
    assert_eq!(
        sent(&fake),
        vec![("sendMessage".to_string(), "-100777".to_string(), format!("echo: {text}"), None)],
        "plain text (no parse_mode) to the group chat"
    );
    assert_eq!(fake.sent()[0].bot_id, 123456);

    // A job of another provider: no Telegram message.
    let second = enqueue(
        &stack,
        "c1",
        "agent-a",
        json!({"provider": "system_push", "providerUserId": "42", "messageText": "ping"}),
    )
    .await;
    wait_done(&stack, "c1", &second).await;
    assert_eq!(fake.sent().len(), 1);
    let expected_history = pairs(&[
        ("user", text),
        ("assistant", &format!("echo: {text}")),
        ("user", "ping"),
        ("assistant", "echo: ping"),
    ]);
    assert_eq!(history(&stack, "c1").await, expected_history);
    let stats = admin.ok("getQueueStats", json!({})).await;
    assert_eq!((stats["processing"].as_u64(), stats["queuedTotal"].as_u64()), (Some(0), Some(0)));

    // The worker kept memory in its workspace; the skills bootstrap ran (empty manifest).
    let memory = memory_files(data1.path());
    assert_eq!(memory.len(), 1, "{memory:?}");
    let day = memory.values().next().expect("one day");
    assert!(day.contains("**user:** ping") && day.contains("**assistant:** echo: ping"), "{day}");
    let skills_state = std::fs::read_to_string(data1.path().join(".clawdbot/bootstrap/global-skills-state.json"))
        .expect("skills state");
    assert_eq!(serde_json::from_str::<Value>(&skills_state).expect("json")["status"], "ready");
    assert!(data1.path().join("workspace/MEMORY.md").is_file());

    // Drain: the worker notices through its control state, snapshots, and exits.
    admin
        .ok("upsertWorkerState", json!({"workerId": "w1", "provider": "local", "status": "draining", "load": 0}))
        .await;
    let outcome = finished(worker1).await;
    assert_eq!(outcome.reason, StopReason::Drain);
    assert_eq!(outcome.control_reason.as_deref(), Some("status_draining"));
    assert_eq!((outcome.jobs_completed, outcome.jobs_failed), (2, 0));
    let snapshot = outcome.snapshot.expect("a drain snapshot");
    let listed = snapshots(&stack, "c1").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (&listed[0]["snapshotId"], &listed[0]["status"], &listed[0]["reason"]),
        (&json!(snapshot.snapshot_id), &json!("ready"), &json!("drain"))
    );
    // The snapshot moved the draining row on (the scheduler's snapshot gate).
    wait_until("w1 is stopping", WAIT, || async {
        (worker_row(&stack, "w1").await["status"] == "stopping").then_some(())
    })
    .await;

    // The next worker of the conversation (over HTTP) restores the first one's files at boot.
    assign(&stack, "w2", "c1", "agent-a").await;
    let data2 = tempfile::tempdir().expect("tmp");
    let (stop2, worker2) = start(config(&stack, "w2", Via::Http, data2.path(), &env));
    let restored = wait_until("w2 restored the memory files", WAIT, || async {
        let files = memory_files(data2.path());
        files.keys().any(|name| memory.contains_key(name)).then_some(files)
    })
    .await;
    for (name, content) in &memory {
        assert_eq!(restored.get(name), Some(content), "memory/{name} restored as written");
    }
    let third = enqueue(
        &stack,
        "c1",
        "agent-a",
        json!({"provider": "telegram", "providerUserId": "42", "messageText": "again"}), // No chat id: the user's.
    )
    .await;
    wait_done(&stack, "c1", &third).await;
    assert_eq!(sent(&fake)[1], ("sendMessage".to_string(), "42".to_string(), "echo: again".to_string(), None));
    assert_eq!(history(&stack, "c1").await.len(), 6);

    // A stop signal: the worker snapshots with reason `signal` and stops.
    stop2.cancel();
    let outcome = finished(worker2).await;
    assert_eq!((outcome.reason, outcome.jobs_completed), (StopReason::Signal, 1));
    let listed = snapshots(&stack, "c1").await;
    assert_eq!(listed.len(), 2);
    assert_eq!((&listed[0]["status"], &listed[0]["reason"]), (&json!("ready"), &json!("signal")));
}

#[tokio::test]
async fn reference_worker_restores_before_its_first_job_and_needs_a_bot_token_only_for_telegram() {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "agent-web").await; // No bot token.
    stack.wait_queue_ready().await;

    // An earlier worker of c3 left a snapshot with a file in its workspace.
    assign(&stack, "w0", "c3", "agent-web").await;
    let old = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(old.path().join("workspace")).expect("mkdir");
    std::fs::write(old.path().join("workspace/notes.md"), "from the previous worker\n").expect("write");
    let token = stack.ctx.auth.mint_worker_token("w0").expect("token");
    let scope = SnapshotScope {
        workspace_id: "default".to_string(),
        agent_key: "agent-web".to_string(),
        conversation_id: "c3".to_string(),
    };
    WorkerClient::over_http(&stack.http_url(""), "w0", &token)
        .upload_snapshot(old.path(), &scope, "drain")
        .await
        .expect("upload");
    stack
        .admin()
        .ok("upsertWorkerState", json!({"workerId": "w0", "provider": "local", "status": "draining", "load": 0}))
        .await;

    // The new worker is not told its conversation (no OPENCLAW_CONVERSATION_ID): it learns it
    // from its first claim, and restores the snapshot before processing it (D4).
    assign(&stack, "w3", "c3", "agent-web").await;
    let web = enqueue(
        &stack,
        "c3",
        "agent-web",
        json!({"provider": "system_push", "providerUserId": "u9", "messageText": "web hello"}),
    )
    .await;
    let tg = enqueue(
        &stack,
        "c3",
        "agent-web",
        json!({"provider": "telegram", "providerUserId": "u9", "messageText": "tg hello"}),
    )
    .await;
    let data = tempfile::tempdir().expect("tmp");
    let engine = [("AF_ENGINE", "command"), ("AF_ENGINE_COMMAND", r#"["/bin/sh", "-c", "cat notes.md"]"#)];
    let (stop, handle) = start(config(&stack, "w3", Via::Nats, data.path(), &engine));
    wait_done(&stack, "c3", &web).await;
    // The command engine runs in the workspace and read the restored file.
    assert_eq!(history(&stack, "c3").await, pairs(&[("user", "web hello"), ("assistant", "from the previous worker")]));

    // R2: a Telegram job of an agent without a bot token fails before any side effect.
    let failed = wait_until("the telegram job failed once", WAIT, || async {
        let view = item(&stack, "c3", &tg).await;
        (view["attempts"] == 1).then_some(view)
    })
    .await;
    assert_eq!(failed["status"], "queued");
    assert_eq!(failed["lastError"], "Bot not paired: missing telegram token in hydration bundle");
    assert_eq!(history(&stack, "c3").await.len(), 2, "no history for the failed job");

    stop.cancel();
    let outcome = finished(handle).await;
    assert_eq!((outcome.reason, outcome.jobs_completed, outcome.jobs_failed), (StopReason::Signal, 1, 1));
    assert_eq!(outcome.conversation_id.as_deref(), Some("c3"));
    let newest = &snapshots(&stack, "c3").await[0];
    assert_eq!((&newest["status"], &newest["reason"]), (&json!("ready"), &json!("signal")));
    assert!(PathBuf::from(data.path()).join("workspace/notes.md").is_file());
}
