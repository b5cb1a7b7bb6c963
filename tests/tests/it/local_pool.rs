//! The whole story on the local provider, with real `af-worker` processes: a message spawns a
//! worker, which replies into the conversation and writes its workspace; idle, it is drained,
//! snapshots, and is torn down (process and volume directory gone); the next message spawns a
//! new worker that restores the workspace and sees the history. Business time is the manual
//! clock; each reconcile is called by the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tests::{MANUAL, TestStack, seed_profile, wait_until};

/// A message that needs no Telegram delivery (the reply is recorded in the history only).
fn message(conversation: &str, text: &str) -> Value {
    json!({"conversationId": conversation, "agentKey": "agent-a",
           "payload": {"provider": "system_push", "providerUserId": "u1", "messageText": text}})
}

/// Kills every worker process the local provider recorded under `root`, whatever the test's
/// outcome, so a failing test leaves no process behind.
struct KillWorkers(PathBuf);

impl Drop for KillWorkers {
    fn drop(&mut self) {
        for record in records(&self.0) {
            let Some(pid) = record["pid"].as_i64().filter(|pid| *pid > 1) else { continue };
            // Only our worker: a recorded pid may have been reused by another process.
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("af-worker"));
            if ours {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

fn records(root: &Path) -> Vec<Value> {
    let dir = root.join("local").join("machines");
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

async fn rows(stack: &TestStack) -> Vec<Value> {
    stack.admin().ok("listWorkersForScheduler", json!({})).await.as_array().cloned().unwrap_or_default()
}

/// Waits until `worker` has finished its jobs (its completion landed: load 0).
async fn idle(stack: &TestStack, worker: &str) {
    wait_until(&format!("{worker} finished its job"), Duration::from_secs(60), || async {
        let row = rows(stack).await.into_iter().find(|r| r["workerId"] == worker)?;
        (row["load"] == 0 && row["lastClaimAt"].is_number()).then_some(())
    })
    .await;
}

async fn history(stack: &TestStack, conversation: &str) -> Vec<String> {
    let page = stack.admin().ok("getConversationHistory", json!({"conversationId": conversation, "limit": 50})).await;
    page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["content"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn find_file(dir: &Path, name_part: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name_part) {
                return Some(found);
            }
        } else if path.to_string_lossy().contains(name_part) {
            return Some(path);
        }
    }
    None
}

#[tokio::test]
async fn local_pool_spawns_replies_drains_snapshots_and_restores() {
    let binary = tests::workspace_binary("worker", "af-worker");
    let root = tempfile::tempdir().expect("tmp");
    let _guard = KillWorkers(root.path().to_path_buf());
    let root_str = root.path().display().to_string();
    let binary_str = binary.display().to_string();
    let mut overrides: Vec<(&str, &str)> = MANUAL.to_vec();
    overrides.extend([
        ("scheduler.default_provider", "local"),
        ("providers.local_dir", root_str.as_str()),
        ("providers.worker_binary", binary_str.as_str()),
    ]);
    let stack = TestStack::start_with(&overrides).await;
    seed_profile(&stack.ctx, "agent-a").await;
    let admin = stack.admin();
    admin
        .ok(
            "setScalingRuntimeConfig",
            json!({"scalingPolicy": {"maxWorkers": 2, "spawnStep": 2, "idleTimeoutMs": 60_000,
                   "reconcileIntervalMs": 15_000, "drainDeadlineMs": 600_000}}),
        )
        .await;
    stack.wait_queue_ready().await;

    // A message spawns a worker process, which claims it and replies (echo engine).
    stack.app().ok("enqueueMessage", message("c1", "remember the blue door")).await;
    assert_eq!(admin.ok("reconcileWorkerPool", json!({})).await["spawned"], 1);
    let first = rows(&stack).await.into_iter().next().expect("row");
    let first_id = first["workerId"].as_str().expect("id").to_string();
    let replied = wait_until("the first worker replied", Duration::from_secs(60), || async {
        let items = history(&stack, "c1").await;
        (items.len() >= 2).then_some(items)
    })
    .await;
    assert!(replied.iter().any(|t| t.contains("remember the blue door")), "{replied:?}");
    let volume_dir = root.path().join("local").join("volumes").join(first["volumeId"].as_str().expect("volume"));
    let memory = wait_until("the worker wrote its memory file", Duration::from_secs(30), || async {
        find_file(&volume_dir.join("workspace").join("memory"), ".md")
    })
    .await;
    let pid = records(root.path()).first().and_then(|r| r["pid"].as_i64()).expect("pid");
    assert!(pid_alive(pid));

    // Idle past its deadline: drained, it snapshots (its row becomes stopping), then is torn down.
    idle(&stack, &first_id).await;
    admin.ok("advanceTestClock", json!({"ms": 60_001})).await;
    let check = admin.ok("checkIdleShutdowns", json!({})).await;
    assert_eq!(check["stopped"], 1);
    wait_until("the drained worker delivered its snapshot", Duration::from_secs(60), || async {
        let row = rows(&stack).await.into_iter().find(|r| r["workerId"] == first_id.as_str())?;
        (row["status"] == "stopping").then_some(())
    })
    .await;
    let snapshots = admin.ok("listSnapshotsForConversation", json!({"conversationId": "c1"})).await;
    assert_eq!((snapshots[0]["status"].as_str(), snapshots[0]["reason"].as_str()), (Some("ready"), Some("drain")));
    admin.ok("checkIdleShutdowns", json!({})).await;
    let row = rows(&stack).await.into_iter().find(|r| r["workerId"] == first_id.as_str()).expect("row");
    assert_eq!(row["status"], "stopped");
    assert!(!pid_alive(pid), "the worker process is gone");
    assert!(!volume_dir.exists(), "the volume directory is gone");

    // The next message spawns a new worker, which restores the workspace and sees the history.
    admin.ok("advanceTestClock", json!({"ms": 1000})).await;
    stack.app().ok("enqueueMessage", message("c1", "what door?")).await;
    assert_eq!(admin.ok("reconcileWorkerPool", json!({})).await["spawned"], 1);
    let second = rows(&stack).await.into_iter().find(|r| r["status"] == "active").expect("second worker");
    assert_ne!(second["workerId"], first_id.as_str());
    let items = wait_until("the second worker replied", Duration::from_secs(60), || async {
        let items = history(&stack, "c1").await;
        (items.len() >= 4).then_some(items)
    })
    .await;
    assert!(items[0].contains("what door?") || items[1].contains("what door?"), "{items:?}");
    let second_volume = root.path().join("local").join("volumes").join(second["volumeId"].as_str().expect("volume"));
    let restored = second_volume.join("workspace").join("memory").join(memory.file_name().expect("name"));
    let text = std::fs::read_to_string(&restored).expect("the restored memory file");
    assert!(text.contains("remember the blue door"), "{text}");

    // Tear the second worker down too, through the same protocol.
    idle(&stack, second["workerId"].as_str().expect("id")).await;
    let drain = json!({"workerId": second["workerId"], "provider": "local", "status": "draining", "load": 0});
    admin.ok("upsertWorkerState", drain).await;
    wait_until("the second worker delivered its snapshot", Duration::from_secs(60), || async {
        let row = rows(&stack).await.into_iter().find(|r| r["workerId"] == second["workerId"])?;
        (row["status"] == "stopping").then_some(())
    })
    .await;
    admin.ok("checkIdleShutdowns", json!({})).await;
    assert!(records(root.path()).is_empty(), "every machine record removed");
}
