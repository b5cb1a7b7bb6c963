//! Replies to Telegram users through the Bot API's `sendMessage` (spec §4.5 step 7, fixed).
//!
//! - the reply goes to the **chat** (`metadata.telegramChatId`), falling back to
//!   `providerUserId` only when no chat id is known (T10: the user id is only a valid chat id in
//!   private chats);
//! - it is sent as **plain text**, without `parse_mode` (T11: model output is not HTML, and a
//!   stray `<` or `&` made Telegram reject the whole message);
//! - a reply longer than Telegram's 4096-character limit is sent as several messages.
//!
//! The bot token is part of the URL path, so it never appears in errors: reqwest errors are
//! stripped of their URL.

use std::time::Duration;

use serde_json::{Value, json};

/// Telegram's limit on one message's text, in UTF-16 code units.
pub const MAX_MESSAGE_UTF16: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TelegramError(pub String);

/// A Bot API client for one base URL (`TELEGRAM_API_BASE_URL`).
#[derive(Clone)]
pub struct Telegram {
    http: reqwest::Client,
    base_url: String,
}

impl Telegram {
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        common::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder().timeout(timeout).build().unwrap_or_default();
        Self { http, base_url: base_url.trim_end_matches('/').to_string() }
    }

    /// Sends one message: `POST <base>/bot<token>/sendMessage` `{chat_id, text}`.
    pub async fn send_message(&self, token: &str, chat_id: &str, text: &str) -> Result<(), TelegramError> {
        let url = format!("{}/bot{token}/sendMessage", self.base_url);
        let body = send_message_body(chat_id, text);
        let response = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| TelegramError(format!("Telegram sendMessage failed: {}", e.without_url())))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let ok = serde_json::from_str::<Value>(&text).ok().and_then(|v| v.get("ok").and_then(Value::as_bool));
        if !status.is_success() || ok == Some(false) {
            return Err(TelegramError(format!("Telegram sendMessage failed: {status} {}", text.trim())));
        }
        Ok(())
    }
}

/// The `sendMessage` body: plain text, no `parse_mode`. A numeric chat id is sent as a number
/// (the Bot API's type), anything else (`@channel`) as a string.
pub fn send_message_body(chat_id: &str, text: &str) -> Value {
    let chat: Value = chat_id.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::from(chat_id));
    json!({"chat_id": chat, "text": text})
}

/// Where a reply to `payload` goes: `metadata.telegramChatId`, else `providerUserId`.
pub fn reply_chat_id(payload: &Value) -> Option<String> {
    let non_blank = |v: Option<&Value>| match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    non_blank(payload.pointer("/metadata/telegramChatId")).or_else(|| non_blank(payload.get("providerUserId")))
}

/// Splits `text` into messages of at most [`MAX_MESSAGE_UTF16`] UTF-16 units, preferring to
/// break after a newline in the second half of a chunk. An empty text is one empty chunk.
pub fn split_message(text: &str) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut rest = text;
    loop {
        // Byte offset where the limit is reached, if it is.
        let mut units = 0usize;
        let mut cut = None;
        for (i, c) in rest.char_indices() {
            units += c.len_utf16();
            if units > MAX_MESSAGE_UTF16 {
                cut = Some(i);
                break;
            }
        }
        let Some(limit) = cut else {
            chunks.push(rest.to_string());
            return chunks;
        };
        let at = rest[..limit].rfind('\n').filter(|&nl| nl >= limit / 2).map_or(limit, |nl| nl + 1);
        chunks.push(rest[..at].to_string());
        rest = &rest[at..];
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::post;

    use super::*;

    type Seen = Arc<Mutex<Vec<(String, Value)>>>;

    async fn send(
        State(seen): State<Seen>,
        Path(bot): Path<String>,
        Json(body): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        let reject = body["text"].as_str().is_some_and(|t| t.contains("reject"));
        seen.lock().unwrap().push((bot, body));
        if reject {
            (StatusCode::BAD_REQUEST, Json(json!({"ok": false, "description": "Bad Request: chat not found"})))
        } else {
            (StatusCode::OK, Json(json!({"ok": true, "result": {"message_id": 1}})))
        }
    }

    async fn fake_telegram() -> (String, Seen) {
        let seen: Seen = Arc::default();
        let router = axum::Router::new().route("/{bot}/sendMessage", post(send)).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (format!("http://{addr}/"), seen)
    }

    #[test]
    fn replies_go_to_the_chat_and_fall_back_to_the_user() {
        let group = json!({"providerUserId": "42", "metadata": {"telegramChatId": "-100777", "providerUserId": "42"}});
        assert_eq!(reply_chat_id(&group).as_deref(), Some("-100777"));
        let private = json!({"providerUserId": " 42 ", "metadata": {"telegramChatId": " "}});
        assert_eq!(reply_chat_id(&private).as_deref(), Some("42"));
        assert_eq!(reply_chat_id(&json!({"metadata": {"telegramChatId": 5}})).as_deref(), Some("5"));
        assert_eq!(reply_chat_id(&json!({"providerUserId": ""})), None);
    }

    #[test]
    fn long_replies_are_split_within_the_limit() {
        assert_eq!(split_message(""), vec![String::new()]);
        assert_eq!(split_message("short"), vec!["short".to_string()]);
        let long = format!("{}\n{}", "a".repeat(3000), "b".repeat(3000));
        let parts = split_message(&long);
        assert_eq!(parts, vec![format!("{}\n", "a".repeat(3000)), "b".repeat(3000)]);
        let emoji = "😀".repeat(3000); // 2 UTF-16 units each.
        let parts = split_message(&emoji);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= MAX_MESSAGE_UTF16));
        assert_eq!(parts.concat(), emoji);
    }

    #[tokio::test]
    async fn send_message_posts_plain_text_to_the_chat() {
        let (base, seen) = fake_telegram().await;
        let telegram = Telegram::new(&base, Duration::from_secs(10));
        telegram.send_message("123:abc", "-100777", "1 < 2 & <b>not html</b>").await.unwrap();
        telegram.send_message("123:abc", "@channel", "hi").await.unwrap();
        let seen_now = seen.lock().unwrap().clone();
        assert_eq!(seen_now[0].0, "bot123:abc");
        // Exactly chat_id and text: no parse_mode.
        assert_eq!(seen_now[0].1, json!({"chat_id": -100777, "text": "1 < 2 & <b>not html</b>"}));
        assert_eq!(seen_now[1].1, json!({"chat_id": "@channel", "text": "hi"}));

        let err = telegram.send_message("123:abc", "1", "please reject").await.unwrap_err();
        assert!(err.0.starts_with("Telegram sendMessage failed: 400"), "{err}");
        assert!(err.0.contains("chat not found") && !err.0.contains("123:abc"), "{err}");

        // Unreachable API: the error does not carry the URL (and so not the token).
        let down = Telegram::new("http://127.0.0.1:9", Duration::from_secs(5));
        let err = down.send_message("123:secret", "1", "x").await.unwrap_err();
        assert!(!err.0.contains("secret"), "{err}");
    }
}
