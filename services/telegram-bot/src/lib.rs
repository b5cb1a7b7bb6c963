//! A small Telegram Bot API client over this workspace's reqwest, with the Bot API types of the
//! `frankenstein` crate (re-exported as [`types`], [`methods`], [`updates`]; built without its
//! HTTP client). Used by ingress, the hydration service (bot identity, webhook set-up, the
//! update consumer) and the reference worker (replies).
//!
//! Behaviour every caller gets:
//! * one base URL (`telegram.api_base_url`, default `https://api.telegram.org`): requests go to
//!   `<base>/bot<token>/<method>`, file downloads to `<base>/file/bot<token>/<file_path>`;
//! * a per-request timeout;
//! * `429 Too Many Requests` is retried after the `retry_after` Telegram sends (when it is at most
//!   [`RetryPolicy::max_retry_after`], else the error is returned at once), `5xx` and connection
//!   failures with exponential backoff, up to [`RetryPolicy::attempts`] attempts in all; every
//!   other error is returned at once;
//! * the bot token is part of the URL path, so it never appears in an error: reqwest errors are
//!   stripped of their URL, and [`BotApiError`] carries Telegram's `description` only.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use frankenstein;
pub use frankenstein::{methods, types, updates};

use frankenstein::methods::{SendChatActionParams, SendMessageParams, SetWebhookParams};
use frankenstein::types::{ChatAction, ChatId, File, Message, User};
use frankenstein::updates::WebhookInfo;

/// The public Bot API.
pub const DEFAULT_BASE_URL: &str = "https://api.telegram.org";
/// Telegram's limit on one message's text, in UTF-16 code units.
pub const MAX_MESSAGE_UTF16: usize = 4096;
/// Telegram's limit on a media caption, in UTF-16 code units.
pub const MAX_CAPTION_UTF16: usize = 1024;

/// How a request is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// First backoff after a 5xx or a connection failure; doubles each time.
    pub base_delay: Duration,
    /// A 429 asking to wait longer than this is returned to the caller instead of waited out.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 4, base_delay: Duration::from_millis(200), max_retry_after: Duration::from_secs(30) }
    }
}

/// A failed Bot API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BotApiError {
    /// Telegram answered `ok: false` (or a non-2xx status).
    #[error("{description}")]
    Api {
        method: String,
        status: u16,
        error_code: Option<u64>,
        description: String,
        /// Seconds to wait, from a 429's `parameters.retry_after`.
        retry_after: Option<u64>,
    },
    /// The request did not get an answer (connection refused, timeout).
    #[error("{message}")]
    Transport { method: String, message: String },
    /// The answer was not the Bot API's JSON.
    #[error("{message}")]
    Decode { method: String, message: String },
    /// A downloaded file is larger than the caller allows.
    #[error("file of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
}

impl BotApiError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Telegram's description of an API error, else this error's text.
    pub fn description(&self) -> String {
        self.to_string()
    }

    /// Whether trying again later may succeed: 429, 5xx, no answer.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api { status, .. } => *status == 429 || *status >= 500,
            Self::Transport { .. } => true,
            Self::Decode { .. } | Self::TooLarge { .. } => false,
        }
    }

    /// Telegram refused the message's formatting ("can't parse entities"), so the same text sent
    /// without `parse_mode` would be accepted.
    pub fn is_formatting_error(&self) -> bool {
        matches!(self, Self::Api { status: 400, description, .. }
            if description.to_ascii_lowercase().contains("can't parse entities")
                || description.to_ascii_lowercase().contains("can't find end of the entity"))
    }
}

/// A Bot API client for one base URL; cheap to clone.
#[derive(Clone)]
pub struct BotApi {
    http: reqwest::Client,
    base_url: String,
    policy: RetryPolicy,
}

impl BotApi {
    /// `base_url` without the `/bot<token>` part (`https://api.telegram.org`); `timeout` bounds
    /// each request.
    pub fn new(base_url: &str, timeout: Duration, policy: RetryPolicy) -> Self {
        common::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder().timeout(timeout).build().unwrap_or_default();
        Self { http, base_url: base_url.trim().trim_end_matches('/').to_string(), policy }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn method_url(&self, token: &str, method: &str) -> String {
        format!("{}/bot{token}/{method}", self.base_url)
    }

    /// Calls `method` with a JSON body and decodes `result`, retrying as the policy says.
    pub async fn call<P: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        token: &str,
        method: &str,
        params: &P,
    ) -> Result<R, BotApiError> {
        let url = self.method_url(token, method);
        let body = serde_json::to_vec(params)
            .map_err(|e| BotApiError::Decode { method: method.to_string(), message: e.to_string() })?;
        self.with_retries(method, || {
            self.http.post(&url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone()).send()
        })
        .await
    }

    async fn with_retries<R, F, Fut>(&self, method: &str, mut send: F) -> Result<R, BotApiError>
    where
        R: DeserializeOwned,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::Response, reqwest::Error>>,
    {
        let attempts = self.policy.attempts.max(1);
        let mut backoff = self.policy.base_delay;
        let mut attempt = 1;
        loop {
            let result = match send().await {
                Ok(response) => decode::<R>(method, response).await,
                Err(e) => {
                    Err(BotApiError::Transport { method: method.to_string(), message: e.without_url().to_string() })
                }
            };
            let err = match result {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            if attempt >= attempts || !err.is_transient() {
                return Err(err);
            }
            let wait = match &err {
                BotApiError::Api { status: 429, retry_after, .. } => {
                    let wait = Duration::from_secs(retry_after.unwrap_or(1));
                    if wait > self.policy.max_retry_after {
                        return Err(err);
                    }
                    wait
                }
                _ => {
                    let wait = backoff;
                    backoff = backoff.saturating_mul(2);
                    wait
                }
            };
            tracing::debug!(method, attempt, wait_ms = wait.as_millis() as u64, error = %err, "telegram call retried");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// `getMe`: the bot behind `token`.
    pub async fn get_me(&self, token: &str) -> Result<User, BotApiError> {
        self.call(token, "getMe", &serde_json::json!({})).await
    }

    /// `setWebhook` with `url` and `secret_token`.
    pub async fn set_webhook(&self, token: &str, url: &str, secret_token: &str) -> Result<bool, BotApiError> {
        let params = SetWebhookParams::builder().url(url).secret_token(secret_token).build();
        self.call(token, "setWebhook", &params).await
    }

    /// `getWebhookInfo`.
    pub async fn get_webhook_info(&self, token: &str) -> Result<WebhookInfo, BotApiError> {
        self.call(token, "getWebhookInfo", &serde_json::json!({})).await
    }

    /// `deleteWebhook`.
    pub async fn delete_webhook(&self, token: &str) -> Result<bool, BotApiError> {
        self.call(token, "deleteWebhook", &serde_json::json!({})).await
    }

    /// `getFile`: the path to download `file_id` from.
    pub async fn get_file(&self, token: &str, file_id: &str) -> Result<File, BotApiError> {
        self.call(token, "getFile", &serde_json::json!({ "file_id": file_id })).await
    }

    /// Downloads `<base>/file/bot<token>/<file_path>`, refusing more than `max_bytes`. Returns
    /// the bytes and the response's `Content-Type`.
    pub async fn download_file(
        &self,
        token: &str,
        file_path: &str,
        max_bytes: u64,
    ) -> Result<(Bytes, Option<String>), BotApiError> {
        use futures::StreamExt;
        let method = "file download";
        let url = format!("{}/file/bot{token}/{}", self.base_url, file_path.trim_start_matches('/'));
        let transport =
            |e: reqwest::Error| BotApiError::Transport { method: method.into(), message: e.without_url().to_string() };
        let response = self.http.get(&url).send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(BotApiError::Api {
                method: method.into(),
                status: status.as_u16(),
                error_code: None,
                description: format!("Telegram file download failed with status {}", status.as_u16()),
                retry_after: None,
            });
        }
        if let Some(len) = response.content_length()
            && len > max_bytes
        {
            return Err(BotApiError::TooLarge { size: len, limit: max_bytes });
        }
        let content_type =
            response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(transport)?;
            if (body.len() + chunk.len()) as u64 > max_bytes {
                return Err(BotApiError::TooLarge { size: (body.len() + chunk.len()) as u64, limit: max_bytes });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((Bytes::from(body), content_type))
    }

    /// `sendMessage` with the given parameters.
    pub async fn send_message(&self, token: &str, params: &SendMessageParams) -> Result<Message, BotApiError> {
        self.call(token, "sendMessage", params).await
    }

    /// Sends `text` to `chat_id` as plain text, split into as many messages as Telegram's limit
    /// needs ([`split_message`]).
    pub async fn send_text(&self, token: &str, chat_id: &str, text: &str) -> Result<(), BotApiError> {
        for chunk in split_message(text, MAX_MESSAGE_UTF16) {
            self.send_one(token, chat_id, &chunk, None).await?;
        }
        Ok(())
    }

    /// Sends `text` formatted with `parse_mode`, split at Telegram's limit; a chunk Telegram
    /// refuses for its formatting is sent again as plain text (spec §6.5 T11).
    pub async fn send_formatted(
        &self,
        token: &str,
        chat_id: &str,
        text: &str,
        parse_mode: frankenstein::ParseMode,
    ) -> Result<(), BotApiError> {
        for chunk in split_message(text, MAX_MESSAGE_UTF16) {
            self.send_one(token, chat_id, &chunk, Some(parse_mode)).await?;
        }
        Ok(())
    }

    /// Sends one message of at most [`MAX_MESSAGE_UTF16`] units (callers split longer texts with
    /// [`split_message`]): formatted with `parse_mode` when given, and sent again as plain text
    /// when Telegram refuses that formatting ([`BotApiError::is_formatting_error`]).
    pub async fn send_one(
        &self,
        token: &str,
        chat_id: &str,
        text: &str,
        parse_mode: Option<frankenstein::ParseMode>,
    ) -> Result<Message, BotApiError> {
        let plain = SendMessageParams::builder().chat_id(chat_id_of(chat_id)).text(text).build();
        let Some(parse_mode) = parse_mode else {
            return self.send_message(token, &plain).await;
        };
        let formatted =
            SendMessageParams::builder().chat_id(chat_id_of(chat_id)).text(text).parse_mode(parse_mode).build();
        match self.send_message(token, &formatted).await {
            Err(e) if e.is_formatting_error() => {
                tracing::debug!(error = %e, "formatted message refused; sending it as plain text");
                self.send_message(token, &plain).await
            }
            other => other,
        }
    }

    /// `sendChatAction` (`typing` lasts at most 5 s or until the bot's next message).
    pub async fn send_chat_action(&self, token: &str, chat_id: &str, action: ChatAction) -> Result<bool, BotApiError> {
        let params = SendChatActionParams::builder().chat_id(chat_id_of(chat_id)).action(action).build();
        self.call(token, "sendChatAction", &params).await
    }

    /// `sendAudio` or `sendDocument` (by `method`) as a multipart upload of `bytes` named
    /// `file_name`, with an optional plain-text caption (cut to Telegram's caption limit).
    pub async fn send_file(
        &self,
        token: &str,
        method: FileMethod,
        chat_id: &str,
        file_name: &str,
        bytes: Bytes,
        caption: Option<&str>,
    ) -> Result<Message, BotApiError> {
        let url = self.method_url(token, method.name());
        let caption = caption.map(|c| truncate_utf16(c, MAX_CAPTION_UTF16));
        self.with_retries(method.name(), || {
            let part = reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(file_name.to_string());
            let mut form =
                reqwest::multipart::Form::new().text("chat_id", chat_id.to_string()).part(method.field(), part);
            if let Some(caption) = &caption {
                form = form.text("caption", caption.clone());
            }
            self.http.post(&url).multipart(form).send()
        })
        .await
    }
}

/// The upload methods [`BotApi::send_file`] supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMethod {
    Audio,
    Document,
}

impl FileMethod {
    /// `sendAudio` for a file whose extension names an audio format (mp3, m4a, ogg, oga, opus,
    /// wav, aac, flac), else `sendDocument`.
    pub fn for_file_name(name: &str) -> Self {
        const AUDIO: &[&str] = &["mp3", "m4a", "ogg", "oga", "opus", "wav", "aac", "flac"];
        let extension = std::path::Path::new(name).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match extension {
            Some(ext) if AUDIO.contains(&ext.as_str()) => Self::Audio,
            _ => Self::Document,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Audio => "sendAudio",
            Self::Document => "sendDocument",
        }
    }
    fn field(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Document => "document",
        }
    }
}

/// Reads a Bot API answer: `{"ok": true, "result": …}` or `{"ok": false, "description", …}`.
async fn decode<R: DeserializeOwned>(method: &str, response: reqwest::Response) -> Result<R, BotApiError> {
    let status = response.status().as_u16();
    let retry_after_header =
        response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let body = response
        .bytes()
        .await
        .map_err(|e| BotApiError::Transport { method: method.to_string(), message: e.without_url().to_string() })?;
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) if status >= 400 => {
            return Err(BotApiError::Api {
                method: method.to_string(),
                status,
                error_code: None,
                description: format!("HTTP {status}"),
                retry_after: retry_after_header,
            });
        }
        Err(e) => {
            return Err(BotApiError::Decode { method: method.to_string(), message: format!("not JSON: {e}") });
        }
    };
    if value.get("ok").and_then(Value::as_bool) == Some(true) && (200..300).contains(&status) {
        let result = value.get("result").cloned().unwrap_or(Value::Null);
        return serde_json::from_value(result).map_err(|e| BotApiError::Decode {
            method: method.to_string(),
            message: format!("unexpected result: {e}"),
        });
    }
    Err(BotApiError::Api {
        method: method.to_string(),
        status: if status < 400 { 400 } else { status },
        error_code: value.get("error_code").and_then(Value::as_u64),
        description: value
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{method} failed")),
        retry_after: value.pointer("/parameters/retry_after").and_then(Value::as_u64).or(retry_after_header),
    })
}

/// A chat id as the Bot API types it: a number when it is one, else a string (`@channel`).
pub fn chat_id_of(chat_id: &str) -> ChatId {
    chat_id.trim().parse::<i64>().map(ChatId::Integer).unwrap_or_else(|_| ChatId::String(chat_id.trim().to_string()))
}

/// Cuts `text` to at most `max` UTF-16 units.
pub fn truncate_utf16(text: &str, max: usize) -> String {
    let mut units = 0;
    let mut out = String::new();
    for c in text.chars() {
        units += c.len_utf16();
        if units > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Splits `text` into messages of at most `max` UTF-16 units, preferring to break after a
/// newline in the second half of a chunk. An empty text is one empty chunk.
pub fn split_message(text: &str, max: usize) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut rest = text;
    loop {
        let mut units = 0usize;
        let mut cut = None;
        for (i, c) in rest.char_indices() {
            units += c.len_utf16();
            if units > max {
                cut = Some(i);
                break;
            }
        }
        let Some(limit) = cut else {
            chunks.push(rest.to_string());
            return chunks;
        };
        let at = rest[..limit].rfind('\n').filter(|&nl| nl >= limit / 2).map_or(limit, |nl| nl + 1);
        let at = if at == 0 { limit.max(rest.chars().next().map_or(1, char::len_utf8)) } else { at };
        chunks.push(rest[..at].to_string());
        rest = &rest[at..];
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::post;
    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct Script {
        calls: AtomicUsize,
        answers: Mutex<Vec<(u16, Value)>>,
        seen: Mutex<Vec<(String, Value)>>,
    }

    async fn answer(
        State(script): State<Arc<Script>>,
        Path((bot, method)): Path<(String, String)>,
        Json(body): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        script.calls.fetch_add(1, Ordering::SeqCst);
        script.seen.lock().unwrap().push((format!("{bot}/{method}"), body));
        let next = {
            let mut answers = script.answers.lock().unwrap();
            if answers.is_empty() { None } else { Some(answers.remove(0)) }
        };
        let (status, body) = next.unwrap_or((200, json!({"ok": true, "result": true})));
        (StatusCode::from_u16(status).unwrap(), Json(body))
    }

    async fn server(answers: Vec<(u16, Value)>) -> (String, Arc<Script>) {
        let script = Arc::new(Script { answers: Mutex::new(answers), ..Default::default() });
        let router = axum::Router::new().route("/{bot}/{method}", post(answer)).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (format!("http://{addr}/"), script)
    }

    fn fast() -> RetryPolicy {
        RetryPolicy { attempts: 3, base_delay: Duration::from_millis(1), max_retry_after: Duration::from_secs(1) }
    }

    #[tokio::test]
    async fn retries_429_after_retry_after_and_5xx_with_backoff() {
        let too_many = json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 0",
            "parameters": {"retry_after": 0}});
        let (base, script) =
            server(vec![(429, too_many), (502, json!({"ok": false, "description": "Bad Gateway"}))]).await;
        let api = BotApi::new(&base, Duration::from_secs(5), fast());
        assert!(api.delete_webhook("1:abc").await.unwrap());
        assert_eq!(script.calls.load(Ordering::SeqCst), 3);
        assert_eq!(script.seen.lock().unwrap()[0].0, "bot1:abc/deleteWebhook");
    }

    #[tokio::test]
    async fn a_long_retry_after_and_client_errors_are_returned_at_once() {
        let slow = json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 60",
            "parameters": {"retry_after": 60}});
        let (base, script) = server(vec![(429, slow)]).await;
        let api = BotApi::new(&base, Duration::from_secs(5), fast());
        let err = api.delete_webhook("1:abc").await.unwrap_err();
        assert_eq!(err.status(), Some(429));
        assert!(matches!(err, BotApiError::Api { retry_after: Some(60), .. }));
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);

        let bad = json!({"ok": false, "error_code": 400, "description": "Bad Request: can't parse entities: x"});
        let (base, script) = server(vec![(400, bad)]).await;
        let api = BotApi::new(&base, Duration::from_secs(5), fast());
        let err = api.delete_webhook("1:abc").await.unwrap_err();
        assert!(err.is_formatting_error() && !err.is_transient(), "{err:?}");
        assert_eq!(err.to_string(), "Bad Request: can't parse entities: x");
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn formatted_text_falls_back_to_plain_and_long_text_is_split() {
        let refuse = json!({"ok": false, "error_code": 400, "description": "Bad Request: can't parse entities"});
        let sent = json!({"ok": true, "result": {"message_id": 1, "date": 0, "chat": {"id": 5, "type": "private"}}});
        let answers = vec![(400, refuse), (200, sent.clone()), (200, sent.clone()), (200, sent)];
        let (base, script) = server(answers).await;
        let api = BotApi::new(&base, Duration::from_secs(5), fast());
        let text = format!("<b>{}", "x".repeat(5000));
        api.send_formatted("1:abc", "5", &text, frankenstein::ParseMode::Html).await.unwrap();
        let seen = script.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].1["parse_mode"], json!("HTML"));
        assert!(seen[1].1.get("parse_mode").is_none(), "the fallback is plain text");
        assert_eq!(seen[1].1["chat_id"], json!(5));
        assert_eq!(seen[0].1["text"], seen[1].1["text"]);
        assert_eq!(seen[2].1["text"].as_str().unwrap().len(), 5003 - 4096);
    }

    #[tokio::test]
    async fn errors_never_carry_the_token() {
        let api = BotApi::new("http://127.0.0.1:9", Duration::from_secs(2), fast());
        let err = api.get_me("123:secret").await.unwrap_err();
        assert!(err.is_transient());
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn splitting_respects_the_limit_and_prefers_newlines() {
        assert_eq!(split_message("", 4096), vec![String::new()]);
        let long = format!("{}\n{}", "a".repeat(3000), "b".repeat(3000));
        assert_eq!(split_message(&long, 4096), vec![format!("{}\n", "a".repeat(3000)), "b".repeat(3000)]);
        let emoji = "😀".repeat(3000);
        let parts = split_message(&emoji, 4096);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= 4096));
        assert_eq!(parts.concat(), emoji);
        assert_eq!(truncate_utf16("😀😀", 3), "😀");
        assert_eq!(chat_id_of(" -100 "), ChatId::Integer(-100));
        assert_eq!(chat_id_of("@chan"), ChatId::String("@chan".into()));
    }

    #[test]
    fn audio_files_go_to_send_audio_and_the_rest_to_send_document() {
        for name in ["a.mp3", "dir/b.M4A", "voice.ogg", "x.flac"] {
            assert_eq!(FileMethod::for_file_name(name), FileMethod::Audio, "{name}");
        }
        for name in ["report.pdf", "mp3", "noext", "a.mp3.txt", ""] {
            assert_eq!(FileMethod::for_file_name(name), FileMethod::Document, "{name}");
        }
    }
}
