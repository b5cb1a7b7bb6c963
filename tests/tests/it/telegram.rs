//! Telegram: the Bot API client against the fake Bot API server; bot identity and webhook
//! set-up; the webhook ingress and its update consumer; pairing in the chat; replies.

use std::time::Duration;

use telegram_bot::{BotApi, FileMethod, RetryPolicy};
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
