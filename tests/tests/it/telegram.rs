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
