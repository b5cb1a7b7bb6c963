//! The one-process launcher as a user runs it (`agent-factory`, embedded nats-server).

use std::time::Duration;

use serde_json::{Value, json};

/// The pid of the embedded nats-server, from the ports file it writes (`<name>_<pid>.ports`).
fn nats_pid(run_dir: &std::path::Path) -> Option<i32> {
    std::fs::read_dir(run_dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        let stem = name.strip_suffix(".ports")?;
        stem.rsplit('_').next()?.parse().ok()
    })
}

/// When the embedded nats-server dies, the launcher does not run on without its state: it stops
/// with a non-zero exit, so a supervisor restarts it on the same data.
#[tokio::test]
async fn launcher_exits_non_zero_when_its_embedded_nats_server_dies() {
    common::telemetry::install_crypto_provider();
    let binary = tests::workspace_binary("launcher", "agent-factory");
    let data = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut child = tokio::process::Command::new(binary)
        // As a user runs it: from the checkout, where it finds .tools/nats.
        .current_dir(tests::project_root())
        .env("AF_DATA_DIR", data.path())
        .env("AF_HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("AF_SCHEDULER__DEFAULT_PROVIDER", "none")
        .env("AF_TELEMETRY__LOG_FILTER", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("agent-factory starts");
    let health = format!("http://127.0.0.1:{port}/healthz");
    tests::wait_until("the launcher answers /healthz", Duration::from_secs(60), || async {
        reqwest::get(&health).await.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    let pid = nats_pid(&data.path().join("run")).expect("the embedded nats-server's ports file");
    // No monitoring endpoints: they have no password, and local workers share the loopback.
    let ports = std::fs::read_dir(data.path().join("run")).expect("run dir").flatten().find_map(|e| {
        e.path().extension().is_some_and(|x| x == "ports").then(|| std::fs::read_to_string(e.path()).expect("ports"))
    });
    assert!(!ports.expect("ports file").contains("monitoring"), "the embedded nats-server serves monitoring");
    common::nats_server::signal(pid as u32, libc::SIGKILL);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the launcher stops once its nats-server is gone")
        .expect("exit status");
    assert!(!status.success(), "exit status {status}");
}

/// A free loopback port (bound, then released for the launcher to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// `afctl` in-process with `args`; returns what it printed.
async fn afctl(args: &[&str]) -> String {
    let mut out = Vec::new();
    let args = args.iter().map(|a| a.to_string()).collect();
    cli::run_with_input(args, &mut &b""[..], &mut out).await.expect("afctl succeeds");
    String::from_utf8(out).expect("utf-8")
}

/// The README's local demo, end to end over HTTP: `agent-factory --fake-telegram` runs the fake
/// Bot API beside the stack; a bot is created in the fake, its token imported and its webhook
/// configured; a simulated user pairs with `/start <code>`, writes "hello", and the echo
/// worker the stack spawns answers in the fake's record of the chat.
#[tokio::test]
async fn launcher_fake_telegram_demo_pairs_a_user_and_the_worker_replies() {
    common::telemetry::install_crypto_provider();
    // The launcher spawns `af-worker` from its own directory.
    tests::workspace_binary("worker", "af-worker");
    let binary = tests::workspace_binary("launcher", "agent-factory");
    let data = tempfile::tempdir().expect("tmp");
    let (port, fake_port) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(binary)
        .args(["--fake-telegram", "--fake-telegram-bind", &format!("127.0.0.1:{fake_port}")])
        .env("AF_DATA_DIR", data.path())
        .env("AF_HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("AF_TELEMETRY__LOG_FILTER", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("agent-factory starts");
    let api = format!("http://127.0.0.1:{port}");
    let fake = format!("http://127.0.0.1:{fake_port}");
    let ready = format!("{api}/readyz");
    tests::wait_until("the launcher is ready", Duration::from_secs(60), || async {
        reqwest::get(&ready).await.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    let token = std::fs::read_to_string(data.path().join("admin.token")).expect("admin token");
    let http = reqwest::Client::new();
    let call = |name: &str, args: Value| {
        let request = http.post(format!("{api}/v1/ops/{name}")).bearer_auth(token.trim()).json(&args);
        let name = name.to_string();
        async move {
            let response = request.send().await.expect("ingress answers");
            let status = response.status();
            let body: Value = response.json().await.expect("json");
            assert!(status.is_success(), "{name}: {status} {body}");
            body
        }
    };
    let send = |user: i64, text: String| {
        let request = http.post(format!("{fake}/fake/users/{user}/send")).json(&json!({"botId": 1001, "text": text}));
        async move {
            let answer: Value = request.send().await.expect("the fake answers").json().await.expect("json");
            assert_eq!(answer["result"]["webhookStatus"], json!(200), "{answer}");
        }
    };
    let record = format!("{fake}/fake/bots/1001/chats/42/messages");
    let bot_said = |text: &'static str| {
        let (http, record) = (http.clone(), record.clone());
        async move {
            let answer: Value = http.get(&record).send().await.ok()?.json().await.ok()?;
            let entries = answer["result"].as_array()?.clone();
            entries
                .iter()
                .any(|e| {
                    e["from"] == "bot"
                        && e["method"] == "sendMessage"
                        && e["text"].as_str().is_some_and(|t| t.contains(text))
                })
                .then_some(entries)
        }
    };

    // The bot in the fake (through afctl), its token imported and its webhook configured.
    let bot_token =
        afctl(&["fake-telegram", "--fake-url", &fake, "add-bot", "--id", "1001", "--username", "demo_bot"]).await;
    call("upsertAgentProfile", json!({"agentKey": "demo", "version": "1.0.0", "secretsRef": [], "enabled": true}))
        .await;
    let imported = call(
        "importTelegramTokenForAgent",
        json!({"consumerUserId": "alice", "agentKey": "demo", "plaintextValue": bot_token.trim()}),
    )
    .await;
    assert_eq!(imported["telegramUsername"], json!("demo_bot"));
    let configured = call("configureTelegramWebhook", json!({"agentKey": "demo"})).await;
    assert_eq!(configured["isReady"], json!(true), "{configured}");
    assert_eq!(configured["webhookUrl"], json!(format!("{api}/agent-factory/telegram/webhook")));

    // The user pairs with /start <code>; the bot confirms in the chat.
    let pairing = call("createUserAgentPairing", json!({"consumerUserId": "alice", "agentKey": "demo"})).await;
    let code = pairing["pairing"]["code"].as_str().expect("code").to_string();
    send(42, format!("/start {code}")).await;
    tests::wait_until("the bot confirms the pairing", Duration::from_secs(30), || bot_said("Paired!")).await;

    // "hello" reaches a spawned echo worker, whose reply lands in the chat.
    send(42, "hello".to_string()).await;
    let entries =
        tests::wait_until("the worker's reply is in the chat", Duration::from_secs(90), || bot_said("echo: hello"))
            .await;
    let lines: Vec<(String, String)> = entries
        .iter()
        .filter(|e| e["method"] != "sendChatAction")
        .map(|e| {
            (e["from"].as_str().unwrap_or_default().to_string(), e["text"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0], ("user".to_string(), format!("/start {code}")));
    assert!(lines[1].1.starts_with("Paired!"), "{lines:?}");
    assert_eq!(lines[2..], [("user".to_string(), "hello".to_string()), ("bot".to_string(), "echo: hello".to_string())]);
    // afctl shows the same record.
    let shown = afctl(&[
        "fake-telegram",
        "--fake-url",
        &fake,
        "messages",
        "--bot",
        "1001",
        "--chat",
        "42",
        "--wait-for",
        "echo: hello",
    ])
    .await;
    assert!(shown.contains("echo: hello") && shown.contains("Paired!"), "{shown}");

    // Ctrl-C stops the workers and the stack.
    common::nats_server::signal(child.id().expect("pid"), libc::SIGINT);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the launcher stops")
        .expect("exit status");
    assert!(status.success(), "exit status {status}");
}
