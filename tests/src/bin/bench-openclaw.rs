//! Spawn-to-first-reply benchmark of the `openclaw` engine: starts its own nats-server, the
//! stack and the fake model server, then per run starts a fresh reference worker (in-process,
//! the same `worker::run` the `af-worker` binary runs, over ingress HTTP, with an empty data
//! directory) for a conversation with one queued message, and measures:
//!
//! - **first reply**: from the worker's start to the reply in the conversation's history
//!   (boot, claim, bundle, OpenClaw config, gateway cold start until `hello-ok`, the agent turn,
//!   history append);
//! - **warm turn**: a second message on the running gateway, enqueue to reply in history;
//! - **drain**: from the drain request to the worker's exit (gateway stop, snapshot upload).
//!
//! Needs `AF_NODE_BIN` and `AF_OPENCLAW_ENTRY` (`eval "$(ops/scripts/install-openclaw.sh)"`).
//! Run: `cargo run --release -p tests --bin bench-openclaw -- --help`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use fake_llm::{FakeLlm, Step};
use serde_json::{Value, json};
use tests::TestStack;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
struct Args {
    /// Repetitions (the median is reported, and every run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn history_len(stack: &TestStack, conversation: &str) -> usize {
    let page = stack.admin().ok("getConversationHistory", json!({"conversationId": conversation})).await;
    page["items"].as_array().map_or(0, Vec::len)
}

async fn wait_history(stack: &TestStack, conversation: &str, len: usize) {
    tests::wait_until(&format!("{len} history items in {conversation}"), Duration::from_secs(300), || async {
        (history_len(stack, conversation).await >= len).then_some(())
    })
    .await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.runs > 0, "--runs must be positive");
    let node = std::env::var("AF_NODE_BIN").map_err(|_| anyhow::anyhow!("AF_NODE_BIN is not set"))?;
    let entry = std::env::var("AF_OPENCLAW_ENTRY").map_err(|_| anyhow::anyhow!("AF_OPENCLAW_ENTRY is not set"))?;
    eprintln!("starting nats-server, the stack and the fake model server ...");
    let stack = TestStack::start_with(&[("telemetry.log_filter", "error")]).await;
    let fake = FakeLlm::start().await;
    fake.set_default(Step::text("Hello from the agent."));
    let admin = stack.admin();
    admin
        .ok("upsertAgentProfile", json!({"agentKey": "bench", "version": "1.0.0", "enabled": true, "secretsRef": []}))
        .await;
    for (secret_ref, value) in [
        ("model.baseUrl", fake.base_url()),
        ("model.name", fake_llm::MODEL.to_string()),
        ("model.apiKey", "sk-bench".to_string()),
    ] {
        admin.ok("importPlaintextSecret", json!({"secretRef": secret_ref, "plaintextValue": value})).await;
    }

    let (mut first, mut warm, mut drain) = (vec![], vec![], vec![]);
    for run in 1..=args.runs {
        let (worker, conversation) = (format!("wb{run}"), format!("bench-{run}"));
        let assignment =
            json!({"conversationId": conversation, "agentKey": "bench", "leaseId": format!("spawn:{worker}")});
        admin
            .ok(
                "upsertWorkerState",
                json!({"workerId": worker, "provider": "local", "status": "active", "load": 0, "assignment": assignment}),
            )
            .await;
        let message = |text: &str| {
            json!({"conversationId": conversation, "agentKey": "bench",
                   "payload": {"provider": "system_push", "providerUserId": "u1", "messageText": text}})
        };
        stack.app().ok("enqueueMessage", message("hello")).await;
        let data = tempfile::tempdir()?;
        let env: HashMap<String, String> = [
            ("WORKER_ID", worker.clone()),
            ("AF_WORKER_TOKEN", stack.ctx.auth.mint_worker_token(&worker)?),
            ("AF_API_URL", stack.http_url("")),
            ("OPENCLAW_DATA_DIR", data.path().display().to_string()),
            ("OPENCLAW_CONVERSATION_ID", conversation.clone()),
            ("OPENCLAW_AGENT_KEY", "bench".to_string()),
            ("AF_ENGINE", "openclaw".to_string()),
            ("AF_OPENCLAW_NODE", node.clone()),
            ("AF_OPENCLAW_ENTRY", entry.clone()),
            ("AF_WORKER_LOG", "error".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let config = worker::WorkerConfig::from_env(&env)?;
        let started = Instant::now();
        let handle = tokio::spawn(worker::run(config, CancellationToken::new()));
        wait_history(&stack, &conversation, 2).await;
        first.push(started.elapsed());

        let started = Instant::now();
        stack.app().ok("enqueueMessage", message("again")).await;
        wait_history(&stack, &conversation, 4).await;
        warm.push(started.elapsed());

        let started = Instant::now();
        admin
            .ok("upsertWorkerState", json!({"workerId": worker, "provider": "local", "status": "draining", "load": 0}))
            .await;
        let outcome = handle.await??;
        drain.push(started.elapsed());
        anyhow::ensure!(outcome.snapshot.is_some(), "run {run}: no drain snapshot");
        eprintln!(
            "run {run}/{}: first reply {:.2} s, warm turn {:.2} s, drain {:.2} s",
            args.runs,
            first[run - 1].as_secs_f64(),
            warm[run - 1].as_secs_f64(),
            drain[run - 1].as_secs_f64()
        );
    }
    let requests: Vec<Value> = fake.requests().into_iter().map(|r| r.body).collect();
    println!("| measure | median of {} runs | runs |", args.runs);
    println!("|---|---|---|");
    for (name, values) in
        [("spawn → first reply", &first), ("warm turn", &warm), ("drain (gateway stop + snapshot)", &drain)]
    {
        let all: Vec<String> = values.iter().map(|d| format!("{:.2} s", d.as_secs_f64())).collect();
        println!("| {name} | {:.2} s | {} |", median(values.clone()).as_secs_f64(), all.join(", "));
    }
    println!("model requests: {}", requests.len());
    stack.stop().await;
    Ok(())
}
