//! Telegram: the Bot API client against the fake Bot API server; bot identity and webhook
//! set-up; the webhook ingress and its update consumer; pairing in the chat; replies.

use std::time::Duration;

use serde_json::{Value, json};
use telegram_bot::{BotApi, FileMethod, RetryPolicy};
use tests::TestStack;
use tests::fake_telegram::FakeTelegram;

fn client(fake: &FakeTelegram) -> BotApi {
    let policy =
        RetryPolicy { attempts: 3, base_delay: Duration::from_millis(1), max_retry_after: Duration::from_secs(2) };
    BotApi::new(&fake.base_url(), Duration::from_secs(10), policy)
}

#[tokio::test]
async fn telegram_client_speaks_to_the_fake_bot_api() {
    let fake = FakeTelegram::start().await;
    let token = fake.add_bot(7001, "support_bot");
    let api = client(&fake);

    let me = api.get_me(&token).await.expect("getMe");
    assert_eq!((me.id, me.username.as_deref()), (7001, Some("support_bot")));
    let err = api.get_me("7001:wrong").await.expect_err("unknown token");
    assert_eq!((err.status(), err.to_string().as_str()), (Some(401), "Unauthorized"));

    assert!(api.set_webhook(&token, "https://example.test/hook", "s3cret_-X").await.expect("setWebhook"));
    let info = api.get_webhook_info(&token).await.expect("getWebhookInfo");
    assert_eq!((info.url.as_str(), info.pending_update_count), ("https://example.test/hook", 0));
    assert_eq!(fake.webhook(7001), Some(("https://example.test/hook".into(), Some("s3cret_-X".into()))));
    let err = api.set_webhook(&token, "https://example.test/hook", "bad secret!").await.expect_err("refused");
    assert!(err.to_string().contains("unallowed characters"), "{err}");

    let file_id = fake.add_file(7001, "photos/file_1.jpg", b"jpeg-bytes".to_vec());
    let file = api.get_file(&token, &file_id).await.expect("getFile");
    let path = file.file_path.expect("file_path");
    let (bytes, content_type) = api.download_file(&token, &path, 1024).await.expect("download");
    assert_eq!((&bytes[..], content_type.as_deref()), (&b"jpeg-bytes"[..], Some("image/jpeg")));
    let err = api.download_file(&token, &path, 4).await.expect_err("too large");
    assert!(matches!(err, telegram_bot::BotApiError::TooLarge { .. }), "{err:?}");

    // Flood control: a 429 with retry_after is waited out, a 5xx retried.
    fake.fail_next("sendMessage", 429, Some(1), 1);
    fake.fail_next("sendChatAction", 502, None, 1);
    api.send_text(&token, "42", &"x".repeat(5000)).await.expect("sent after the 429");
    api.send_chat_action(&token, "42", telegram_bot::types::ChatAction::Typing).await.expect("typing");
    // HTML Telegram cannot parse falls back to plain text.
    api.send_formatted(&token, "42", "1 < 2", telegram_bot::frankenstein::ParseMode::Html).await.expect("fallback");
    api.send_file(&token, FileMethod::Document, "42", "report.pdf", vec![1u8; 10].into(), Some("the report"))
        .await
        .expect("sendDocument");
    let sent = fake.sent();
    let summary: Vec<(&str, usize, Option<&str>)> =
        sent.iter().map(|s| (s.method.as_str(), s.text.len(), s.parse_mode.as_deref())).collect();
    assert_eq!(
        summary,
        vec![
            ("sendMessage", 4096, None),
            ("sendMessage", 904, None),
            ("sendChatAction", 6, None),
            ("sendMessage", 5, None),
            ("sendDocument", 10, None),
        ]
    );
    assert_eq!((sent[4].file_name.as_deref(), sent[4].file_bytes), (Some("report.pdf"), Some(10)));
    let retried = fake.calls().iter().filter(|(_, m)| m == "sendMessage").count();
    assert_eq!(retried, 5, "a 429, two chunks, a refused HTML text and its plain fallback");
}

/// A stack whose Bot API is `fake`, with the manual clock and loops.
pub(crate) async fn stack_with(fake: &FakeTelegram) -> TestStack {
    let base = fake.base_url();
    let mut overrides: Vec<(&str, &str)> = tests::MANUAL.to_vec();
    overrides.push(("telegram.api_base_url", base.as_str()));
    overrides.push(("telegram.retry_base_delay_ms", "1"));
    TestStack::start_with(&overrides).await
}

/// Creates agent `agent` with bot `bot_id` (username `<agent>_bot`): profile, token import,
/// webhook. Returns the token.
pub(crate) async fn agent_with_bot(stack: &TestStack, fake: &FakeTelegram, agent: &str, bot_id: u64) -> String {
    let token = fake.add_bot(bot_id, &format!("{agent}_bot"));
    let admin = stack.admin();
    admin.ok("upsertAgentProfile", json!({"agentKey": agent, "version": "1", "secretsRef": [], "enabled": true})).await;
    let imported = admin
        .ok(
            "importTelegramTokenForAgent",
            json!({"consumerUserId": "owner", "agentKey": agent, "plaintextValue": format!(" {token} ")}),
        )
        .await;
    assert_eq!(imported["botIdentity"], json!(bot_id.to_string()));
    let configured = admin.ok("configureTelegramWebhook", json!({"agentKey": agent})).await;
    assert_eq!(configured["isReady"], json!(true), "{configured}");
    token
}

#[tokio::test]
async fn telegram_bot_identity_and_webhook_set_up() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    let admin = stack.admin();
    admin
        .ok("upsertAgentProfile", json!({"agentKey": "sales", "version": "1", "secretsRef": [], "enabled": true}))
        .await;

    // Not configured yet: readiness says so without asking Telegram.
    let readiness = admin.ok("getWebhookReadiness", json!({"agentKey": "sales"})).await;
    assert_eq!(readiness["webhookReady"], json!(false));
    assert_eq!(readiness["secretRef"], Value::Null);
    let err = admin.err("configureTelegramWebhook", json!({"agentKey": "sales"})).await;
    assert_eq!(
        err.message,
        "Missing Telegram token. Import an active 'telegram.botToken.sales' secret before pairing."
    );
    let err = admin
        .err("importTelegramTokenForAgent", json!({"consumerUserId": "u", "agentKey": "sales", "plaintextValue": "  "}))
        .await;
    assert_eq!(err.message, "Telegram token is required");
    let err = admin
        .err(
            "importTelegramTokenForAgent",
            json!({"consumerUserId": "u", "agentKey": "sales", "plaintextValue": "1:bad"}),
        )
        .await;
    assert_eq!(err.message, "Telegram getMe failed: Unauthorized");

    let token = fake.add_bot(5551, "sales_real_bot");
    let imported = admin
        .ok("importTelegramTokenForAgent", json!({"consumerUserId": "u", "agentKey": "sales", "plaintextValue": token}))
        .await;
    assert_eq!(imported["botIdentity"], json!("5551"));
    assert_eq!(imported["telegramUsername"], json!("sales_real_bot"));
    assert_eq!(imported["secretRef"], json!("telegram.botToken.sales"));
    let profile = admin.ok("getAgentProfile", json!({"agentKey": "sales"})).await;
    assert_eq!(profile["botIdentity"], json!("5551"));
    assert!(profile["secretsRef"].as_array().unwrap().contains(&json!("telegram.botToken.sales")), "{profile}");

    // The same bot for another agent is refused with the original's message.
    admin
        .ok("upsertAgentProfile", json!({"agentKey": "other", "version": "1", "secretsRef": [], "enabled": true}))
        .await;
    let err = admin
        .err(
            "importTelegramTokenForAgent",
            json!({"consumerUserId": "u", "agentKey": "other", "plaintextValue": token}),
        )
        .await;
    assert_eq!(err.message, "Telegram bot identity '5551' is already assigned to agent 'sales'");

    // An insecure URL is refused unless its host is loopback.
    let err = admin
        .err("configureTelegramWebhook", json!({"agentKey": "sales", "convexSiteUrl": "http://example.com"}))
        .await;
    assert_eq!(err.message, "convexSiteUrl must start with https://");

    let configured = admin.ok("configureTelegramWebhook", json!({"agentKey": "sales"})).await;
    let expected_url = stack.http_url("/agent-factory/telegram/webhook");
    assert_eq!(configured["webhookUrl"], json!(expected_url));
    assert_eq!(configured["isReady"], json!(true));
    assert_eq!(configured["botIdentity"], json!("5551"));
    assert_eq!(configured["description"], json!("Telegram webhook configured and verified."));
    // S4: the secret is random, not af_v1_<botId>, and stays the same across set-ups.
    let (url, secret) = fake.webhook(5551).expect("webhook");
    let secret = secret.expect("secret token");
    assert_eq!(url, expected_url);
    assert!(secret.len() >= 32 && !secret.contains("5551"), "{secret}");
    admin.ok("configureTelegramWebhook", json!({"agentKey": "sales"})).await;
    assert_eq!(fake.webhook(5551).and_then(|w| w.1), Some(secret.clone()));

    let readiness = admin.ok("getWebhookReadiness", json!({"agentKey": "sales"})).await;
    assert_eq!(readiness["webhookReady"], json!(true), "{readiness}");
    assert_eq!(readiness["secretRef"], json!("telegram.botToken.sales"));

    let reconciled = admin.ok("reconcileTelegramBotIdentityForAgent", json!({"agentKey": "sales"})).await;
    assert_eq!(
        reconciled,
        json!({"agentKey": "sales", "secretRef": "telegram.botToken.sales", "botIdentity": "5551", "telegramUsername": "sales_real_bot"})
    );
    let err = admin.err("reconcileTelegramBotIdentityForAgent", json!({"agentKey": "other"})).await;
    assert_eq!(err.message, "Missing Telegram token. Import an active 'telegram.botToken.other' secret first.");

    // Telegram dropping the webhook shows in readiness.
    telegram_bot::BotApi::new(&fake.base_url(), Duration::from_secs(5), RetryPolicy::default())
        .delete_webhook(&token)
        .await
        .expect("deleteWebhook");
    let readiness = admin.ok("getWebhookReadiness", json!({"agentKey": "sales"})).await;
    assert_eq!(readiness["webhookReady"], json!(false));
    stack.stop().await;
}

/// The jobs of a conversation, newest first.
pub(crate) async fn jobs(stack: &TestStack, conversation: &str) -> Vec<Value> {
    let items = stack.admin().ok("listQueueItemsForConversation", json!({"conversationId": conversation})).await;
    items.as_array().cloned().unwrap_or_default()
}

/// Waits until `bot_id` has sent `count` texts to `chat`, and returns them.
pub(crate) async fn wait_texts(fake: &FakeTelegram, bot_id: u64, chat: i64, count: usize) -> Vec<String> {
    tests::wait_until(&format!("bot {bot_id} sent {count} texts to chat {chat}"), Duration::from_secs(10), || async {
        let texts = fake.texts_to(bot_id, chat);
        (texts.len() >= count).then_some(texts)
    })
    .await
}

/// Waits until `conversation` holds `count` jobs, and returns them.
pub(crate) async fn wait_jobs(stack: &TestStack, conversation: &str, count: usize) -> Vec<Value> {
    tests::wait_until(&format!("{conversation} holds {count} jobs"), Duration::from_secs(10), || async {
        let jobs = jobs(stack, conversation).await;
        (jobs.len() >= count).then_some(jobs)
    })
    .await
}

/// Sends `/start <code>` from `user` to `bot_id` and returns the bot's answer.
pub(crate) async fn start(fake: &FakeTelegram, bot_id: u64, user: i64, code: &str) -> String {
    let before = fake.texts_to(bot_id, user).len();
    let delivery = fake.send_update(bot_id, fake.text_update(bot_id, user, &format!("/start {code}"))).await;
    assert_eq!(delivery.status, 200, "{delivery:?}");
    wait_texts(fake, bot_id, user, before + 1).await.remove(before)
}

#[tokio::test]
async fn telegram_webhook_secret_and_bad_bodies_store_nothing() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    let secret = fake.webhook(1001).and_then(|w| w.1).expect("secret");
    let update = json!({"update_id": 5, "message": {"message_id": 1, "date": 0, "chat": {"id": 1, "type": "private"}, "text": "x"}});
    for wrong in [None, Some(""), Some("af_v1_1001"), Some("nope"), Some("bad secret"), Some(&secret[1..])] {
        let delivery = fake.post_raw(1001, update.to_string(), wrong).await;
        assert_eq!(delivery.status, 403, "{wrong:?}: {delivery:?}");
        assert_eq!(delivery.body, r#"{"ok":false,"error":"missing or invalid telegram webhook secret token"}"#);
    }
    for bad in ["not json", "[1,2]", r#"{"update_id": "7"}"#, r#"{"message": {}}"#, r#"{"update_id": -1}"#] {
        let delivery = fake.post_raw(1001, bad.to_string(), Some(&secret)).await;
        assert_eq!(delivery.status, 400, "{bad}: {delivery:?}");
    }
    let stream = stack.ctx.js.get_stream(common::topology::TELEGRAM_UPDATES_STREAM).await.expect("stream");
    assert_eq!(stream.get_info().await.expect("info").state.messages, 0, "nothing stored");
    let delivery = fake.post_raw(1001, update.to_string(), Some(&secret)).await;
    assert_eq!((delivery.status, delivery.body.as_str()), (200, r#"{"ok":true}"#));
    stack.stop().await;
}

#[tokio::test]
async fn telegram_pairing_routes_each_bot_to_its_own_agent() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    let app = stack.app();
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    agent_with_bot(&stack, &fake, "support", 1002).await;

    // An unbound user gets told how to pair, and no job.
    let delivery = fake.send_update(1001, fake.text_update(1001, 42, "hello")).await;
    assert_eq!(delivery.status, 200);
    let texts = wait_texts(&fake, 1001, 42, 1).await;
    assert!(texts[0].contains("/start <code>"), "{texts:?}");

    // Pairing: bad code, missing code, then the real one; every answer lands in the chat.
    let pairing = app.ok("createUserAgentPairing", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    let code = pairing["pairing"]["code"].as_str().expect("code").to_string();
    assert_eq!(pairing["deepLink"], json!(format!("https://t.me/sales_bot?start={code}")));
    assert_eq!(pairing["pairing"]["botIdentity"], json!("1001"));
    assert_eq!(start(&fake, 1001, 42, "NOSUCHCODE").await, "Pairing failed: Pairing code not found");
    assert!(start(&fake, 1001, 42, "").await.contains("send /start followed by the pairing code"));
    // The code of bot 1001 sent to bot 1002 is refused.
    assert_eq!(start(&fake, 1002, 42, &code).await, "Pairing failed: Pairing code belongs to a different Telegram bot");
    assert!(start(&fake, 1001, 42, &code).await.starts_with("Paired!"));
    let status = app.ok("getUserAgentPairingStatus", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert_eq!((status["status"].clone(), status["telegramUserId"].clone()), (json!("used"), json!("42")));
    let binding = app.ok("getUserAgentBinding", json!({"consumerUserId": "alice"})).await;
    assert_eq!(binding["botIdentity"], json!("1001"));
    assert_eq!(binding["source"], json!("telegram_pairing"));
    // A repeated /start of the same identity is idempotent; another user cannot reuse the code.
    assert!(start(&fake, 1001, 42, &code).await.starts_with("Paired!"));
    assert_eq!(start(&fake, 1001, 43, &code).await, "Pairing failed: Pairing code already used or expired");

    // The 3.1.0 collision: the same Telegram user id pairs with another bot for another user.
    let code2 = app.ok("createPairingCode", json!({"consumerUserId": "bob", "agentKey": "support"})).await["code"]
        .as_str()
        .expect("code")
        .to_string();
    assert!(start(&fake, 1002, 42, &code2).await.starts_with("Paired!"));
    fake.send_update(1001, fake.text_update(1001, 42, "hi sales")).await;
    fake.send_update(1002, fake.text_update(1002, 42, "hi support")).await;
    let sales = wait_jobs(&stack, "user-agent:sales:alice", 1).await;
    let support = wait_jobs(&stack, "user-agent:support:bob", 1).await;
    let payload = |job: &Value| job["payload"].clone();
    assert_eq!(payload(&sales[0])["messageText"], json!("hi sales"));
    assert_eq!(payload(&support[0])["messageText"], json!("hi support"));
    assert_eq!(sales[0]["agentKey"], json!("sales"));
    assert_eq!(support[0]["agentKey"], json!("support"));
    let metadata = &payload(&sales[0])["metadata"];
    assert_eq!(
        (metadata["telegramBotIdentity"].clone(), metadata["telegramChatId"].clone()),
        (json!("1001"), json!("42"))
    );
    assert!(
        fake.sent().iter().any(|s| s.bot_id == 1001 && s.method == "sendChatAction" && s.text == "typing"),
        "typing was sent"
    );

    // The same update delivered three times is one job (T1).
    let mut update = fake.text_update(1001, 42, "once");
    update["update_id"] = json!(777_000);
    for _ in 0..3 {
        assert_eq!(fake.send_update(1001, update.clone()).await.status, 200);
    }
    // A later message proves the consumer went past the duplicates.
    fake.send_update(1001, fake.text_update(1001, 42, "after")).await;
    let sales = wait_jobs(&stack, "user-agent:sales:alice", 3).await;
    let texts: Vec<Value> = sales.iter().map(|j| payload(j)["messageText"].clone()).collect();
    assert_eq!(texts, vec![json!("after"), json!("once"), json!("hi sales")]);

    // Revoked: the user is unbound again and gets the pairing hint.
    app.ok("revokeUserAgentBinding", json!({"consumerUserId": "alice"})).await;
    let before = fake.texts_to(1001, 42).len();
    fake.send_update(1001, fake.text_update(1001, 42, "still there?")).await;
    let texts = wait_texts(&fake, 1001, 42, before + 1).await;
    assert!(texts[before].contains("/start <code>"));
    assert_eq!(jobs(&stack, "user-agent:sales:alice").await.len(), 3);
    stack.stop().await;
}

#[tokio::test]
async fn telegram_pairing_expiry_is_persisted_and_explained() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    let app = stack.app();
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    let created =
        app.ok("createPairingCode", json!({"consumerUserId": "carol", "agentKey": "sales", "ttlMs": 1})).await;
    let code = created["code"].as_str().expect("code").to_string();
    assert_eq!(created["expiresAt"].as_i64().unwrap() - created["createdAt"].as_i64().unwrap(), 60_000, "clamped");
    assert_eq!(code.len(), 12);
    stack.admin().ok("advanceTestClock", json!({"ms": 60_000})).await;
    let status = app.ok("getPairingCodeStatus", json!({"code": code})).await;
    assert_eq!(status["status"], json!("expired"), "reported");
    assert_eq!(start(&fake, 1001, 77, &code).await, "Pairing failed: Pairing code expired");
    let stored = stack.ctx.buckets.pairing.get::<Value>(&format!("code.{code}")).await.expect("read").expect("code");
    assert_eq!(stored.value["status"], json!("expired"), "T8: persisted");
    assert_eq!(start(&fake, 1001, 77, &code).await, "Pairing failed: Pairing code already used or expired");
    assert!(app.ok("getUserAgentBinding", json!({"consumerUserId": "carol"})).await.is_null());

    // Creating a code supersedes the user's pending ones; a profile without a bot cannot pair.
    let first = app.ok("createPairingCode", json!({"consumerUserId": "dan", "agentKey": "sales"})).await;
    let second = app.ok("createPairingCode", json!({"consumerUserId": "dan", "agentKey": "sales"})).await;
    let first = app.ok("getPairingCodeStatus", json!({"code": first["code"]})).await;
    assert_eq!((first["status"].clone(), second["status"].clone()), (json!("expired"), json!("pending")));
    stack
        .admin()
        .ok("upsertAgentProfile", json!({"agentKey": "nobot", "version": "1", "secretsRef": [], "enabled": true}))
        .await;
    let err = app.err("createPairingCode", json!({"consumerUserId": "dan", "agentKey": "nobot"})).await;
    assert_eq!(err.message, "Agent 'nobot' is missing botIdentity. Import and verify the Telegram token first.");
    let err = app.err("createPairingCode", json!({"consumerUserId": "dan", "agentKey": "ghost"})).await;
    assert_eq!(err.message, "Agent profile 'ghost' not found or disabled");
    // S9: at most 10 codes per user per hour.
    for _ in 0..8 {
        app.ok("createPairingCode", json!({"consumerUserId": "dan", "agentKey": "sales"})).await;
    }
    let err = app.err("createPairingCode", json!({"consumerUserId": "dan", "agentKey": "sales"})).await;
    assert_eq!(err.code, common::ErrorCode::RateLimited);
    // S9: guessing codes is cut off after 10 failures per hour.
    for i in 0..10 {
        assert_eq!(start(&fake, 1001, 99, &format!("GUESS{i:04}")).await, "Pairing failed: Pairing code not found");
    }
    assert_eq!(start(&fake, 1001, 99, "GUESSMORE").await, "Pairing failed: Too many pairing attempts; try again later");
    stack.stop().await;
}

/// The fake's control API (what `afctl fake-telegram` and the local demo use): a simulated
/// user's message is delivered to the webhook at once, and the chat's record holds both sides.
#[tokio::test]
async fn telegram_fake_control_api_delivers_user_messages_and_records_the_chat() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    let http = reqwest::Client::new();
    let base = fake.base_url();
    let send = |user: i64, body: Value| {
        let request = http.post(format!("{base}/fake/users/{user}/send")).json(&body);
        async move {
            let response = request.send().await.expect("the fake answers");
            (response.status().as_u16(), response.json::<Value>().await.expect("json"))
        }
    };

    let (status, answer) = send(42, json!({"botId": 1001, "text": "hello"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["webhookStatus"], json!(200), "{answer}");
    assert!(answer["result"]["updateId"].is_i64(), "{answer}");
    wait_texts(&fake, 1001, 42, 1).await;
    let record = fake.chat(1001, 42);
    let sides: Vec<(&str, &str)> = record.iter().map(|e| (e.from.as_str(), e.method.as_str())).collect();
    assert_eq!(sides, vec![("user", "message"), ("bot", "sendMessage")], "an unbound user gets the pairing hint");
    assert_eq!(record[0].text, "hello");
    assert!(record[1].text.contains("/start <code>"), "{record:?}");
    let over_http: Value = http
        .get(format!("{base}/fake/bots/1001/chats/42/messages"))
        .send()
        .await
        .expect("the fake answers")
        .json()
        .await
        .expect("json");
    assert_eq!(over_http, json!({"ok": true, "result": record}));

    // A bot without a webhook keeps the update pending; bad requests are refused.
    fake.add_bot(1002, "idle_bot");
    let (_, answer) = send(42, json!({"botId": 1002, "text": "anyone?"})).await;
    assert_eq!(answer["result"]["webhookStatus"], Value::Null, "{answer}");
    assert_eq!(fake.pending(1002), 1);
    assert_eq!(send(42, json!({"botId": 9, "text": "x"})).await.0, 404);
    assert_eq!(send(42, json!({"bot": "sales_bot"})).await.0, 400);
    stack.stop().await;
}
