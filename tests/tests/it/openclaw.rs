//! The reference worker's `openclaw` engine with the real `openclaw` npm package (installed by
//! `ops/scripts/install-openclaw.sh`; `ops/scripts/test.sh` exports `AF_NODE_BIN` and
//! `AF_OPENCLAW_ENTRY`) and the fake OpenAI-compatible model server `fake-llm`: agent turns
//! through the gateway protocol, history as context, a global skill in the agent's prompt, a
//! tool that writes into the workspace, the workspace surviving drain → snapshot → restore,
//! and each failure (gateway that does not start, crashes mid-turn, exceeds the turn timeout;
//! model provider errors) failing the job with a clear error.

use std::path::Path;
use std::time::Duration;

use common::skills::sha256_hex;
use fake_llm::{FakeLlm, Step};
use serde_json::{Value, json};
use tests::fake_telegram::FakeTelegram;
use tests::{MANUAL, TestStack, wait_until};
use worker::StopReason;

use crate::reference_worker::{Via, config, history, item, start};
use crate::snapshots::assign;

/// Generous: the gateway's cold start takes seconds on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(180);
const AGENT: &str = "agent-oc";
const API_KEY: &str = "sk-fake-0123456789abcdef";
const SKILL_MARKER: &str = "FACTORY-SKILL-7731";

/// `AF_NODE_BIN` and `AF_OPENCLAW_ENTRY`, which `ops/scripts/test.sh` exports.
fn openclaw_install() -> (String, String) {
    let get = |name: &str| {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| {
            panic!(
                "{name} is not set: run ops/scripts/install-openclaw.sh and export what it prints \
                 (ops/scripts/test.sh does)"
            )
        })
    };
    let (node, entry) = (get("AF_NODE_BIN"), get("AF_OPENCLAW_ENTRY"));
    assert!(Path::new(&node).is_file(), "AF_NODE_BIN {node} does not exist");
    assert!(Path::new(&entry).is_file(), "AF_OPENCLAW_ENTRY {entry} does not exist");
    (node, entry)
}

/// An agent whose model secrets point at `fake`.
async fn agent_with_model(stack: &TestStack, fake: &FakeLlm, extra_refs: &[&str]) {
    let admin = stack.admin();
    let refs: Vec<&str> = extra_refs.to_vec();
    admin
        .ok("upsertAgentProfile", json!({"agentKey": AGENT, "version": "1.0.0", "enabled": true, "secretsRef": refs}))
        .await;
    for (secret_ref, value) in [
        (format!("model.baseUrl.{AGENT}"), fake.base_url()),
        ("model.name".to_string(), fake_llm::MODEL.to_string()),
        (format!("model.apiKey.{AGENT}"), API_KEY.to_string()),
    ] {
        admin.ok("importPlaintextSecret", json!({"secretRef": secret_ref, "plaintextValue": value})).await;
    }
}

/// A stack whose agent uses the fake model server, and conversation `c1` assigned to `w1`.
async fn stack_with_agent() -> (TestStack, FakeLlm) {
    let stack = TestStack::start_with(MANUAL).await;
    let fake = FakeLlm::start().await;
    agent_with_model(&stack, &fake, &[]).await;
    assign(&stack, "w1", "c1", AGENT).await;
    (stack, fake)
}

fn engine_env<'a>(node: &'a str, entry: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("AF_ENGINE", "openclaw"),
        ("AF_OPENCLAW_NODE", node),
        ("AF_OPENCLAW_ENTRY", entry),
        ("OPENCLAW_CONVERSATION_ID", "c1"),
        ("OPENCLAW_AGENT_KEY", AGENT),
        ("OPENCLAW_GATEWAY_READY_TIMEOUT_MS", "120000"),
    ];
    env.extend_from_slice(extra);
    env
}

async fn enqueue(stack: &TestStack, payload: Value) -> String {
    let args = json!({"conversationId": "c1", "agentKey": AGENT, "payload": payload});
    stack.app().ok("enqueueMessage", args).await.as_str().expect("message id").to_string()
}

fn push_message(text: &str) -> Value {
    json!({"provider": "system_push", "providerUserId": "u1", "messageText": text})
}

async fn wait_done(stack: &TestStack, message_id: &str) {
    wait_until(&format!("message {message_id} is done"), SLOW, || async {
        let view = item(stack, "c1", message_id).await;
        (view["status"] == "done").then_some(())
    })
    .await;
}

/// Waits until the job failed `attempts` times; returns its queue view.
async fn wait_failed(stack: &TestStack, message_id: &str, attempts: u64) -> Value {
    wait_until(&format!("message {message_id} failed {attempts} time(s)"), SLOW, || async {
        let view = item(stack, "c1", message_id).await;
        (view["attempts"].as_u64() >= Some(attempts) && view["status"] != "processing").then_some(view)
    })
    .await
}

/// Makes a failed job's retry due (the stack's clock is manual).
async fn retry_now(stack: &TestStack) {
    stack.admin().ok("advanceTestClock", json!({"ms": 10_000})).await;
}

fn gateway_pid(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join(".openclaw-run/gateway.pid")).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test]
async fn openclaw_agent_turns_use_history_and_skills_and_the_workspace_survives_a_move() {
    let (node, entry) = openclaw_install();
    let stack = TestStack::start_with(MANUAL).await;
    let fake = FakeLlm::start().await;
    agent_with_model(&stack, &fake, &["telegram.botToken.agent-oc"]).await;
    let telegram = FakeTelegram::start().await;
    let bot_token = telegram.add_bot(777001, "oc_bot");
    stack
        .admin()
        .ok("importPlaintextSecret", json!({"secretRef": "telegram.botToken.agent-oc", "plaintextValue": bot_token}))
        .await;
    // A globally deployed skill: OpenClaw loads `<workspace>/skills/<name>/SKILL.md`.
    let skill_md = format!(
        "---\nname: factory-greeter\ndescription: Greets customers the factory way ({SKILL_MARKER}).\n---\n\n# Factory \
         greeter\n\nSay hello warmly.\n"
    );
    let files = json!([
        {"path": "SKILL.md", "content": skill_md, "sha256": sha256_hex(&skill_md)},
        {"path": "scripts/index.mjs", "content": "export default 1;\n", "sha256": sha256_hex("export default 1;\n")},
    ]);
    stack.admin().ok("deployGlobalSkill", json!({"slug": "factory-greeter", "version": "1.0.0", "files": files})).await;
    assign(&stack, "w1", "c1", AGENT).await;

    // First message (Telegram): the model calls the write tool, then answers.
    fake.push(Step::tool_call("write", json!({"path": "notes/sky.txt", "content": "the sky is green\n"})));
    fake.push(Step::text("I noted that the sky is green."));
    let first_text = "Please note: the sky is green.";
    let first = enqueue(
        &stack,
        json!({"provider": "telegram", "providerUserId": "4242", "messageText": first_text,
               "metadata": {"telegramChatId": "4242"}}),
    )
    .await;
    let data1 = tempfile::tempdir().expect("tmp");
    let telegram_url = telegram.base_url();
    let env = engine_env(&node, &entry, &[("TELEGRAM_API_BASE_URL", telegram_url.as_str())]);
    let (_stop1, worker1) = start(config(&stack, "w1", Via::Http, data1.path(), &env));
    wait_done(&stack, &first).await;

    assert_eq!(
        history(&stack, "c1").await,
        vec![
            ("user".to_string(), first_text.to_string()),
            ("assistant".to_string(), "I noted that the sky is green.".to_string())
        ]
    );
    let sent = telegram.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].chat_id.as_str(), sent[0].text.as_str()), ("4242", "I noted that the sky is green."));
    // The tool ran in the agent's workspace, which is the worker's.
    assert_eq!(
        std::fs::read_to_string(data1.path().join("workspace/notes/sky.txt")).expect("the tool wrote the file"),
        "the sky is green\n"
    );
    let requests = fake.requests();
    assert!(requests.len() >= 2, "a tool round trip: {}", requests.len());
    let turn1 = &requests[0];
    assert_eq!(turn1.authorization.as_deref(), Some(format!("Bearer {API_KEY}").as_str()));
    assert_eq!(turn1.body["model"], fake_llm::MODEL);
    assert!(turn1.tool_names().contains(&"write".to_string()), "{:?}", turn1.tool_names());
    let system = turn1.system_text();
    assert!(system.contains("factory-greeter") && system.contains(SKILL_MARKER), "the skill is in the system prompt");
    assert!(turn1.all_text().contains(first_text));
    let after_tool = &requests[1];
    assert!(
        after_tool.body["messages"].as_array().expect("messages").iter().any(|m| m["role"] == "tool"),
        "the tool result went back to the model"
    );

    // Second message: its turn gets the first exchange as context.
    fake.push(Step::text("Earlier you told me the sky is green."));
    let count_before = fake.requests().len();
    let second = enqueue(&stack, push_message("What did I tell you?")).await;
    wait_done(&stack, &second).await;
    let turn2 = &fake.requests()[count_before];
    let context = turn2.all_text();
    assert!(context.contains("[ConversationHistory]"), "{context}");
    assert!(context.contains(&format!("USER: {first_text}")), "{context}");
    assert!(context.contains("ASSISTANT: I noted that the sky is green."), "{context}");
    assert!(context.contains("What did I tell you?"));
    assert_eq!(history(&stack, "c1").await.len(), 4);
    assert_eq!(telegram.sent().len(), 1, "a system_push job is not sent to Telegram");

    // Drain: the gateway stops, the workspace and the agent state are snapshotted.
    let pid = gateway_pid(data1.path()).expect("the gateway's pid file");
    assert!(alive(pid), "the gateway runs between jobs");
    stack
        .admin()
        .ok("upsertWorkerState", json!({"workerId": "w1", "provider": "local", "status": "draining", "load": 0}))
        .await;
    let outcome = tokio::time::timeout(SLOW, worker1).await.expect("w1 stops").expect("no panic").expect("clean");
    assert_eq!((outcome.reason, outcome.jobs_completed, outcome.jobs_failed), (StopReason::Drain, 2, 0));
    assert!(outcome.snapshot.is_some(), "a drain snapshot");
    assert!(!alive(pid), "the gateway stopped at drain");
    assert!(data1.path().join(".clawdbot/openclaw.json").is_file(), "the agent's state is under .clawdbot");

    // A new worker restores the workspace (the tool's file included) and serves the next turn.
    assign(&stack, "w2", "c1", AGENT).await;
    let data2 = tempfile::tempdir().expect("tmp");
    fake.push(Step::text("Still green."));
    let third = enqueue(&stack, push_message("Is it still green?")).await;
    let (stop2, worker2) = start(config(&stack, "w2", Via::Http, data2.path(), &env));
    wait_done(&stack, &third).await;
    assert_eq!(
        std::fs::read_to_string(data2.path().join("workspace/notes/sky.txt")).expect("restored"),
        "the sky is green\n"
    );
    assert_eq!(history(&stack, "c1").await[5], ("assistant".to_string(), "Still green.".to_string()));
    // No file of the restored data directory holds the model's API key.
    for path in tests::files_under(data2.path()) {
        if path.starts_with(data2.path().join(".openclaw-run")) {
            continue; // The new gateway's own run directory, never snapshotted.
        }
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(!bytes.windows(API_KEY.len()).any(|w| w == API_KEY.as_bytes()), "{} holds the API key", path.display());
    }
    stop2.cancel();
    let outcome = tokio::time::timeout(SLOW, worker2).await.expect("w2 stops").expect("no panic").expect("clean");
    assert_eq!(outcome.jobs_completed, 1);
}

#[tokio::test]
async fn openclaw_gateway_crash_and_turn_timeout_fail_the_job_and_the_next_attempt_gets_a_new_gateway() {
    let (node, entry) = openclaw_install();
    let (stack, fake) = stack_with_agent().await;
    let data = tempfile::tempdir().expect("tmp");
    let env = engine_env(&node, &entry, &[("AF_ENGINE_TIMEOUT_MS", "20000")]);
    let (stop, worker) = start(config(&stack, "w1", Via::Http, data.path(), &env));

    // A turn that exceeds the turn timeout: the model never answers.
    fake.respond_when("take your time", Step::Hang);
    let slow = enqueue(&stack, push_message("take your time")).await;
    let failed = wait_failed(&stack, &slow, 1).await;
    let error = failed["lastError"].as_str().expect("lastError");
    assert!(error.contains("the OpenClaw agent turn timed out after 20000 ms"), "{error}");
    assert!(error.contains("the gateway is restarted for the next job"), "{error}");
    let first_pid = gateway_pid(data.path()).expect("pid file");
    assert!(!alive(first_pid), "the stuck gateway was stopped");
    // The retry gets a fresh gateway and succeeds. (The new gateway also resumes the
    // interrupted turn in the background, OpenClaw's restart recovery: it gets the same answer.)
    fake.clear_rules();
    fake.set_default(Step::text("done at last"));
    retry_now(&stack).await;
    wait_done(&stack, &slow).await;
    let second_pid = gateway_pid(data.path()).expect("pid file");
    assert_ne!(first_pid, second_pid);

    // A gateway that dies mid-turn.
    fake.respond_when("this turn crashes", Step::Hang);
    let crash = enqueue(&stack, push_message("this turn crashes")).await;
    wait_until("the crashing turn reached the model", SLOW, || async {
        fake.requests().iter().any(|r| r.all_text().contains("[UserMessage]\nthis turn crashes")).then_some(())
    })
    .await;
    let pid = gateway_pid(data.path()).expect("pid file");
    assert!(alive(pid));
    // SIGKILL through the kill(1) command: the test needs no unsafe code.
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
    assert!(status.success());
    let failed = wait_failed(&stack, &crash, 1).await;
    let error = failed["lastError"].as_str().expect("lastError");
    assert!(error.contains("the OpenClaw gateway crashed during the turn"), "{error}");
    fake.clear_rules();
    fake.set_default(Step::text("recovered"));
    retry_now(&stack).await;
    wait_done(&stack, &crash).await;
    assert_ne!(gateway_pid(data.path()), Some(pid), "a new gateway served the retry");
    let last = history(&stack, "c1").await;
    assert_eq!(last.last(), Some(&("assistant".to_string(), "recovered".to_string())));

    stop.cancel();
    let outcome = tokio::time::timeout(SLOW, worker).await.expect("stops").expect("no panic").expect("clean");
    assert_eq!((outcome.jobs_completed, outcome.jobs_failed), (2, 2));
}

#[tokio::test]
async fn openclaw_model_provider_errors_fail_the_job_without_the_key() {
    let (node, entry) = openclaw_install();
    let (stack, fake) = stack_with_agent().await;
    let data = tempfile::tempdir().expect("tmp");
    let env = engine_env(&node, &entry, &[]);
    let (stop, worker) = start(config(&stack, "w1", Via::Http, data.path(), &env));
    // 5xx and 429 first: a 401 puts the key in OpenClaw's auth cooldown for a while.
    for (status, expected) in [(500, "HTTP 500"), (429, "(rate_limit)"), (401, "HTTP 401")] {
        fake.set_default(Step::error(status, format!("upstream says no (key {API_KEY})")));
        let message = enqueue(&stack, push_message(&format!("provoke {status}"))).await;
        let failed = wait_failed(&stack, &message, 1).await;
        assert_eq!(failed["status"], "queued", "retried by the queue's policy");
        let error = failed["lastError"].as_str().unwrap_or_else(|| panic!("lastError in {failed}"));
        assert!(error.starts_with("the OpenClaw agent turn failed: model provider error"), "{error}");
        assert!(error.contains(expected), "{status}: {error}");
        assert!(!error.contains(API_KEY), "the key leaked: {error}");
        if status != 401 {
            // The provider recovers: the queue's retry succeeds on the same gateway.
            fake.set_default(Step::text("fine now"));
            retry_now(&stack).await;
            wait_done(&stack, &message).await;
        }
    }
    let requests = fake.requests();
    assert!(requests.iter().all(|r| r.authorization.as_deref() == Some(&format!("Bearer {API_KEY}") as &str)));
    stop.cancel();
    let outcome = tokio::time::timeout(SLOW, worker).await.expect("stops").expect("no panic").expect("clean");
    assert_eq!((outcome.jobs_completed, outcome.jobs_failed), (2, 3));
}

#[tokio::test]
async fn openclaw_gateway_that_does_not_start_fails_the_job_with_its_log() {
    let (stack, fake) = stack_with_agent().await;
    // A "gateway" that reports a bad configuration and exits 78, as OpenClaw does.
    let bin = tempfile::tempdir().expect("tmp");
    let script = bin.path().join("gateway.sh");
    std::fs::write(&script, "echo \"Invalid config: gateway.port must be a number\" >&2\nexit 78\n").expect("write");
    let data = tempfile::tempdir().expect("tmp");
    let script_path = script.display().to_string();
    let env = engine_env("/bin/sh", &script_path, &[]);
    let (stop, worker) = start(config(&stack, "w1", Via::Http, data.path(), &env));

    let message = enqueue(&stack, push_message("hello")).await;
    let failed = wait_failed(&stack, &message, 1).await;
    let error = failed["lastError"].as_str().expect("lastError");
    assert!(error.contains("the OpenClaw gateway did not start: it exited (exit status: 78)"), "{error}");
    assert!(error.contains("Invalid config: gateway.port must be a number"), "the log's tail: {error}");
    // The retry tries a new gateway (and fails the same way).
    retry_now(&stack).await;
    let failed = wait_failed(&stack, &message, 2).await;
    assert!(failed["lastError"].as_str().expect("lastError").contains("did not start"));
    assert!(fake.requests().is_empty());
    stop.cancel();
    let outcome = tokio::time::timeout(SLOW, worker).await.expect("stops").expect("no panic").expect("clean");
    assert_eq!(outcome.jobs_failed, 2);
}
