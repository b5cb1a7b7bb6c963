//! A stateful fake of the Telegram Bot API, for tests and the local demo only (never on a
//! production path): an axum server the stack talks to through `telegram.api_base_url`
//! ([`FakeTelegram::base_url`]). The tests use it as `tests::fake_telegram`; the launcher runs it
//! beside the stack with `agent-factory --fake-telegram`.
//!
//! What it fakes, with the Bot API's paths and JSON shapes (`{"ok": true, "result": …}` or
//! `{"ok": false, "error_code", "description", "parameters"?}`):
//! * bots with tokens (`<id>:<secret>`, created by [`FakeTelegram::add_bot`]); an unknown token
//!   gets 401 `Unauthorized`, as Telegram answers;
//! * `getMe`; `setWebhook` (`url`, `secret_token` of 1–256 `A-Za-z0-9_-`), `getWebhookInfo`
//!   (with `pending_update_count` and the last delivery error), `deleteWebhook`;
//! * `getFile` and `GET /file/bot<token>/<file_path>` for files the test registers with
//!   [`FakeTelegram::add_file`] (a `file_id` of another bot is `400 Bad Request: invalid file_id`);
//! * `sendMessage` (a `parse_mode: "HTML"` text with a stray `<` or `&` is refused with
//!   `400 Bad Request: can't parse entities`, as Telegram does), `sendChatAction`, and the
//!   multipart uploads `sendAudio` / `sendDocument` (the file in the `audio` / `document` field,
//!   else `400 Bad Request: there is no <field> in the request`). Every one is **recorded**
//!   ([`FakeTelegram::sent`], [`FakeTelegram::chat`]), so a test reads what a user received, and
//!   [`FakeTelegram::call_times`] tells when each call arrived (how long a client waited);
//! * delivery of updates to the configured webhook with the configured
//!   `X-Telegram-Bot-Api-Secret-Token`: an update is queued per bot and POSTed in order; one not
//!   answered 2xx stays queued (its error shows in `getWebhookInfo`) and is delivered again by
//!   the next [`FakeTelegram::deliver_pending`], as Telegram redelivers.
//!
//! **Delivery is driven by explicit calls, never by timers**, so tests are deterministic:
//! [`FakeTelegram::send_update`] queues and delivers at once, returning the webhook's status.
//! The launcher also turns on [`FakeTelegram::start_auto_delivery`], which retries pending
//! updates every 500 ms.
//!
//! Besides the Bot API it serves a small control API for the demo (JSON in the Bot API's envelope
//! `{"ok": true, "result": …}`; no authentication, so bind it to loopback), which
//! `afctl fake-telegram` calls:
//!
//! | request | answer |
//! |---|---|
//! | `GET /fake/bots` | every bot: `id`, `username`, `token`, `webhookUrl`, `pending` |
//! | `POST /fake/bots` `{"id", "username", "token"?}` | creates a bot: `{"id", "username", "token"}` |
//! | `POST /fake/users/{userId}/send` `{"botId", "text"}` | user `userId` writes `text` to the bot in their private chat; the update is queued and delivered to the bot's webhook at once: `{"updateId", "webhookStatus"}` (`webhookStatus` is 0 when the webhook could not be reached, null when the update was not tried: the bot has no webhook, or an earlier update of the bot is still undelivered; auto delivery retries it) |
//! | `GET /fake/bots/{botId}/chats/{chatId}/messages` | the chat's record, oldest first ([`ChatEntry`]): the user's messages (`from: "user"`) and every call of the bot that reached the chat (`from: "bot"`) |
//! | `GET /fake/sent` | everything every bot sent ([`Sent`]) |
//!
//! Faults: [`FakeTelegram::fail_next`] answers the next calls of a method with a status (429
//! with `retry_after`, 5xx) before they take effect; [`FakeTelegram::fail_after`] lets some
//! calls through first.
//!
//! Not faked: long polling (`getUpdates`), inline mode, payments, editing and deleting
//! messages, groups' member lists, file size limits, real flood limits, certificates.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The header Telegram sends the webhook secret in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// Seconds since the epoch of the fake's first message date (2026-01-01T09:00:00Z).
const DATE_ORIGIN: i64 = 1_767_258_000;

/// One bot of the fake.
#[derive(Debug, Clone)]
struct Bot {
    id: u64,
    username: String,
    token: String,
    webhook_url: String,
    secret_token: Option<String>,
    pending: VecDeque<Value>,
    last_error_date: Option<i64>,
    last_error_message: Option<String>,
    next_update_id: i64,
    next_message_id: i64,
}

/// A file a bot can hand out through `getFile`.
#[derive(Debug, Clone)]
struct FakeFile {
    bot_id: u64,
    path: String,
    bytes: Bytes,
}

/// A call that reached a user: one per sendMessage / sendChatAction / sendAudio / sendDocument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sent {
    pub bot_id: u64,
    pub bot_username: String,
    pub method: String,
    pub chat_id: String,
    /// The text, the caption of a file, or the chat action.
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<usize>,
}

/// One line of a chat's record: a message the user sent to the bot, or a call of the bot that
/// reached the chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatEntry {
    pub bot_id: u64,
    pub chat_id: String,
    /// `user` or `bot`.
    pub from: String,
    /// `message` for the user's messages; the Bot API method for the bot's.
    pub method: String,
    /// The text or caption (the chat action for `sendChatAction`).
    pub text: String,
}

/// A fault injected for the next calls of one method.
#[derive(Debug, Clone)]
struct Fault {
    method: String,
    status: u16,
    retry_after: Option<u64>,
    /// Calls of the method that still go through before this fault starts.
    skip: usize,
    remaining: usize,
}

#[derive(Default)]
struct World {
    bots: Vec<Bot>,
    files: HashMap<String, FakeFile>,
    sent: Vec<Sent>,
    /// Both sides of every chat, in order.
    chats: Vec<ChatEntry>,
    faults: Vec<Fault>,
    /// Every method call: (bot id, method, when it arrived).
    calls: Vec<(u64, String, Instant)>,
    next_file: u64,
}

impl World {
    fn bot_by_token(&mut self, token: &str) -> Option<&mut Bot> {
        self.bots.iter_mut().find(|b| b.token == token)
    }

    /// Queues `update` for `bot_id` and records the user's text or caption in the chat's
    /// record. Returns false for an unknown bot.
    fn push_update(&mut self, bot_id: u64, update: Value) -> bool {
        let Some(bot) = self.bots.iter_mut().find(|b| b.id == bot_id) else { return false };
        let message = update.get("message");
        let chat_id = message.and_then(|m| m.pointer("/chat/id")).and_then(Value::as_i64);
        let text = message.and_then(|m| m.get("text").or_else(|| m.get("caption"))).and_then(Value::as_str);
        let text = text.unwrap_or_default().to_string();
        bot.pending.push_back(update);
        if let Some(chat_id) = chat_id {
            self.chats.push(ChatEntry {
                bot_id,
                chat_id: chat_id.to_string(),
                from: "user".to_string(),
                method: "message".to_string(),
                text,
            });
        }
        true
    }
}

struct Shared {
    world: Mutex<World>,
    http: reqwest::Client,
    /// Serialises deliveries, so updates of one bot arrive in order.
    delivering: tokio::sync::Mutex<()>,
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fake server; stops when dropped.
pub struct FakeTelegram {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: JoinHandle<()>,
    auto: Option<JoinHandle<()>>,
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(auto) = &self.auto {
            auto.abort();
        }
    }
}

/// What one delivery of an update got from the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub update_id: i64,
    /// The webhook's HTTP status, or 0 when it could not be reached.
    pub status: u16,
    pub body: String,
}

impl FakeTelegram {
    /// Starts on `127.0.0.1:<random port>`.
    pub async fn start() -> FakeTelegram {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on `bind`; panics when it cannot bind.
    pub async fn start_on(bind: &str) -> FakeTelegram {
        Self::try_start_on(bind).await.expect("bind the fake Telegram API")
    }

    /// Starts on `bind` (the launcher's `--fake-telegram-bind`).
    pub async fn try_start_on(bind: &str) -> std::io::Result<FakeTelegram> {
        common::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default();
        let shared =
            Arc::new(Shared { world: Mutex::new(World::default()), http, delivering: tokio::sync::Mutex::new(()) });
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let router = router(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("fake Telegram API stopped: {e}");
            }
        });
        Ok(FakeTelegram { shared, addr, server, auto: None })
    }

    /// The Bot API base URL (`telegram.api_base_url`), `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a bot; returns its token (`<id>:<random>`).
    pub fn add_bot(&self, id: u64, username: &str) -> String {
        let token = format!("{id}:fake-{}", common::crypto::random_base36(24));
        self.shared.world().bots.push(Bot {
            id,
            username: username.to_string(),
            token: token.clone(),
            webhook_url: String::new(),
            secret_token: None,
            pending: VecDeque::new(),
            last_error_date: None,
            last_error_message: None,
            next_update_id: 100_000 + (id as i64 % 1000) * 1000,
            next_message_id: 1,
        });
        token
    }

    /// Registers a file `bot_id` can hand out; returns its `file_id`.
    pub fn add_file(&self, bot_id: u64, path: &str, bytes: impl Into<Bytes>) -> String {
        let mut world = self.shared.world();
        world.next_file += 1;
        let file_id = format!("AgAC{}{}", world.next_file, common::crypto::random_base36(12));
        world.files.insert(file_id.clone(), FakeFile { bot_id, path: path.to_string(), bytes: bytes.into() });
        file_id
    }

    /// The next `count` calls of `method` (any bot) answer `status` without taking effect; a
    /// 429 carries `retry_after`.
    pub fn fail_next(&self, method: &str, status: u16, retry_after: Option<u64>, count: usize) {
        self.fail_after(method, 0, status, retry_after, count);
    }

    /// As [`FakeTelegram::fail_next`], after `skip` more calls of `method` went through.
    pub fn fail_after(&self, method: &str, skip: usize, status: u16, retry_after: Option<u64>, count: usize) {
        let fault = Fault { method: method.to_string(), status, retry_after, skip, remaining: count };
        self.shared.world().faults.push(fault);
    }

    /// Everything sent to users, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.shared.world().sent.clone()
    }

    /// The messages (sendMessage texts) `bot_id` sent to `chat_id`.
    pub fn texts_to(&self, bot_id: u64, chat_id: i64) -> Vec<String> {
        let chat = chat_id.to_string();
        self.sent()
            .into_iter()
            .filter(|s| s.bot_id == bot_id && s.chat_id == chat && s.method == "sendMessage")
            .map(|s| s.text)
            .collect()
    }

    /// The record of chat `chat_id` with `bot_id`: the user's messages and the bot's calls, in
    /// order.
    pub fn chat(&self, bot_id: u64, chat_id: i64) -> Vec<ChatEntry> {
        chat_record(&self.shared.world(), bot_id, &chat_id.to_string())
    }

    /// Every Bot API call `(bot id, method)` so far.
    pub fn calls(&self) -> Vec<(u64, String)> {
        self.shared.world().calls.iter().map(|(bot, method, _)| (*bot, method.clone())).collect()
    }

    /// When each call of `method` (any bot) arrived, in order, refused ones included: a test
    /// reads from them how long a client waited before trying again.
    pub fn call_times(&self, method: &str) -> Vec<Instant> {
        self.shared.world().calls.iter().filter(|(_, m, _)| m == method).map(|(_, _, at)| *at).collect()
    }

    /// The bot's webhook: `(url, secret_token)`.
    pub fn webhook(&self, bot_id: u64) -> Option<(String, Option<String>)> {
        let world = self.shared.world();
        world.bots.iter().find(|b| b.id == bot_id).map(|b| (b.webhook_url.clone(), b.secret_token.clone()))
    }

    /// Updates of `bot_id` not yet answered 2xx.
    pub fn pending(&self, bot_id: u64) -> usize {
        self.shared.world().bots.iter().find(|b| b.id == bot_id).map_or(0, |b| b.pending.len())
    }

    /// A private-chat text message from user `user_id`, as an update body (without
    /// `update_id`, which [`FakeTelegram::send_update`] assigns).
    pub fn text_update(&self, bot_id: u64, user_id: i64, text: &str) -> Value {
        let mut message = self.message_base(bot_id, user_id, user_id);
        message["text"] = json!(text);
        json!({ "message": message })
    }

    /// A private-chat photo (sizes `file_ids`, smallest first) with a caption.
    pub fn photo_update(&self, bot_id: u64, user_id: i64, file_ids: &[&str], caption: &str) -> Value {
        let mut message = self.message_base(bot_id, user_id, user_id);
        let sizes: Vec<Value> = file_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let side = 90 * (i as i64 + 1);
                json!({"file_id": id, "file_unique_id": format!("u{id}"), "width": side, "height": side, "file_size": 1000 * (i + 1)})
            })
            .collect();
        message["photo"] = json!(sizes);
        message["caption"] = json!(caption);
        json!({ "message": message })
    }

    /// A message skeleton from `user_id` in chat `chat_id` (private when equal, else a group).
    pub fn message_base(&self, bot_id: u64, user_id: i64, chat_id: i64) -> Value {
        let mut world = self.shared.world();
        let message_id = world.bots.iter_mut().find(|b| b.id == bot_id).map_or(1, |b| {
            b.next_message_id += 1;
            b.next_message_id
        });
        let chat = if chat_id == user_id {
            json!({"id": chat_id, "type": "private", "first_name": format!("User{user_id}")})
        } else {
            json!({"id": chat_id, "type": "group", "title": "Group"})
        };
        json!({
            "message_id": message_id,
            "from": {"id": user_id, "is_bot": false, "first_name": format!("User{user_id}"), "username": format!("user{user_id}")},
            "chat": chat,
            "date": DATE_ORIGIN + message_id,
        })
    }

    /// Queues `update` for `bot_id` (assigning the next `update_id` unless it has one) and
    /// delivers every pending update of the bot in order. Returns the delivery of `update`
    /// (status 0 if an earlier pending update failed first and it was not tried).
    pub async fn send_update(&self, bot_id: u64, mut update: Value) -> Delivery {
        let update_id = {
            let mut world = self.shared.world();
            let bot = world.bots.iter_mut().find(|b| b.id == bot_id).expect("known bot");
            let id = match update.get("update_id").and_then(Value::as_i64) {
                Some(id) => id,
                None => {
                    bot.next_update_id += 1;
                    bot.next_update_id
                }
            };
            update["update_id"] = json!(id);
            world.push_update(bot_id, update);
            id
        };
        let deliveries = deliver_pending(&self.shared, bot_id).await;
        deliveries.into_iter().rev().find(|d| d.update_id == update_id).unwrap_or(Delivery {
            update_id,
            status: 0,
            body: String::new(),
        })
    }

    /// Delivers the pending updates of `bot_id` again (Telegram's redelivery), in order,
    /// stopping at the first one not answered 2xx.
    pub async fn deliver_pending(&self, bot_id: u64) -> Vec<Delivery> {
        deliver_pending(&self.shared, bot_id).await
    }

    /// POSTs `body` to the bot's webhook once with `secret` (not queued, not retried): for
    /// tests of hostile deliveries.
    pub async fn post_raw(&self, bot_id: u64, body: impl Into<reqwest::Body>, secret: Option<&str>) -> Delivery {
        let url = self.webhook(bot_id).map(|w| w.0).unwrap_or_default();
        let mut request = self.shared.http.post(url).header(header::CONTENT_TYPE, "application/json").body(body);
        if let Some(secret) = secret {
            request = request.header(SECRET_HEADER, secret);
        }
        match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                Delivery { update_id: 0, status, body: r.text().await.unwrap_or_default() }
            }
            Err(e) => Delivery { update_id: 0, status: 0, body: e.to_string() },
        }
    }

    /// Retries every bot's pending updates every 500 ms (the demo; tests drive delivery).
    pub fn start_auto_delivery(&mut self) {
        let shared = self.shared.clone();
        self.auto = Some(tokio::spawn(async move {
            loop {
                let ids: Vec<u64> =
                    shared.world().bots.iter().filter(|b| !b.pending.is_empty()).map(|b| b.id).collect();
                for id in ids {
                    deliver_pending(&shared, id).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
}

async fn deliver_pending(shared: &Arc<Shared>, bot_id: u64) -> Vec<Delivery> {
    let _order = shared.delivering.lock().await;
    let mut out = Vec::new();
    loop {
        let (url, secret, update) = {
            let world = shared.world();
            let Some(bot) = world.bots.iter().find(|b| b.id == bot_id) else { return out };
            let Some(update) = bot.pending.front().cloned() else { return out };
            if bot.webhook_url.is_empty() {
                return out;
            }
            (bot.webhook_url.clone(), bot.secret_token.clone(), update)
        };
        let update_id = update.get("update_id").and_then(Value::as_i64).unwrap_or_default();
        let mut request = shared.http.post(&url).json(&update);
        if let Some(secret) = &secret {
            request = request.header(SECRET_HEADER, secret);
        }
        let (status, body) = match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.without_url().to_string()),
        };
        let ok = (200..300).contains(&status);
        {
            let mut world = shared.world();
            if let Some(bot) = world.bots.iter_mut().find(|b| b.id == bot_id) {
                if ok {
                    bot.pending.pop_front();
                } else {
                    bot.last_error_date = Some(DATE_ORIGIN);
                    bot.last_error_message = Some(if status == 0 {
                        "Connection refused".to_string()
                    } else {
                        format!("Wrong response from the webhook: {status}")
                    });
                }
            }
        }
        out.push(Delivery { update_id, status, body });
        if !ok {
            return out;
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{bot}/{method}", post(call).get(call))
        .route("/file/{bot}/{*path}", get(download))
        .route("/fake/sent", get(control_sent))
        .route("/fake/bots", get(control_bots).post(control_add_bot))
        .route("/fake/bots/{bot_id}/chats/{chat_id}/messages", get(control_chat))
        .route("/fake/users/{user_id}/send", post(control_user_send))
        .with_state(shared)
}

fn ok(result: Value) -> Response {
    (StatusCode::OK, axum::Json(json!({"ok": true, "result": result}))).into_response()
}

fn error(status: u16, description: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (code, axum::Json(json!({"ok": false, "error_code": status, "description": description}))).into_response()
}

fn token_of(segment: &str) -> Option<&str> {
    segment.strip_prefix("bot")
}

/// An uploaded file of a multipart call: (form field, file name, size).
type Upload = (String, String, usize);

/// Reads a method's parameters: JSON body, form, multipart, or query string, as Telegram does.
async fn params(request: Request) -> (BTreeMap<String, Value>, Option<Upload>) {
    let content_type =
        request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let query: BTreeMap<String, Value> = request
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), Value::from(v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    if content_type.starts_with("multipart/form-data") {
        let mut out = query;
        let mut file = None;
        if let Ok(mut multipart) = Multipart::from_request(request, &()).await {
            while let Ok(Some(field)) = multipart.next_field().await {
                let name = field.name().unwrap_or_default().to_string();
                let file_name = field.file_name().map(str::to_string);
                let Ok(bytes) = field.bytes().await else { break };
                match file_name {
                    Some(file_name) => file = Some((name, file_name, bytes.len())),
                    None => {
                        out.insert(name, Value::from(String::from_utf8_lossy(&bytes).into_owned()));
                    }
                }
            }
        }
        return (out, file);
    }
    let body = Bytes::from_request(request, &()).await.unwrap_or_default();
    let mut out = query;
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&body) {
        out.extend(map);
    }
    (out, None)
}

fn text_param(params: &BTreeMap<String, Value>, name: &str) -> Option<String> {
    match params.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Telegram's HTML parse mode refuses a `<` that opens no supported tag and a `&` that starts
/// no entity.
fn html_is_valid(text: &str) -> bool {
    const TAGS: &[&str] = &["b", "/b", "i", "/i", "u", "/u", "s", "/s", "code", "/code", "pre", "/pre", "/a"];
    let mut rest = text;
    while let Some(at) = rest.find(['<', '&']) {
        let tail = &rest[at..];
        if tail.starts_with('&') {
            if !["&lt;", "&gt;", "&amp;", "&quot;"].iter().any(|e| tail.starts_with(e)) {
                return false;
            }
        } else {
            let Some(end) = tail.find('>') else { return false };
            let tag = &tail[1..end];
            if !TAGS.contains(&tag) && !tag.starts_with("a href=") {
                return false;
            }
        }
        rest = &tail[1..];
    }
    true
}

async fn call(
    State(shared): State<Arc<Shared>>,
    Path((bot, method)): Path<(String, String)>,
    request: Request,
) -> Response {
    let Some(token) = token_of(&bot).map(str::to_string) else { return error(404, "Not Found") };
    let (params, file) = params(request).await;
    let mut world = shared.world();
    let Some(bot) = world.bot_by_token(&token).cloned() else { return error(401, "Unauthorized") };
    world.calls.push((bot.id, method.clone(), Instant::now()));
    let fault = world.faults.iter_mut().find(|f| f.method == method && f.remaining > 0).and_then(|fault| {
        if fault.skip > 0 {
            fault.skip -= 1;
            None
        } else {
            Some(fault)
        }
    });
    if let Some(fault) = fault {
        fault.remaining -= 1;
        let (status, retry_after) = (fault.status, fault.retry_after);
        let description = match status {
            429 => format!("Too Many Requests: retry after {}", retry_after.unwrap_or(1)),
            500 => "Internal Server Error".to_string(),
            502 => "Bad Gateway".to_string(),
            _ => format!("Error {status}"),
        };
        let mut body = json!({"ok": false, "error_code": status, "description": description});
        if let Some(seconds) = retry_after {
            body["parameters"] = json!({"retry_after": seconds});
        }
        return (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), axum::Json(body)).into_response();
    }
    let record = |world: &mut World, method: &str, chat_id: String, text: String, parse_mode: Option<String>| {
        world.chats.push(ChatEntry {
            bot_id: bot.id,
            chat_id: chat_id.clone(),
            from: "bot".to_string(),
            method: method.to_string(),
            text: text.clone(),
        });
        world.sent.push(Sent {
            bot_id: bot.id,
            bot_username: bot.username.clone(),
            method: method.to_string(),
            chat_id,
            text,
            parse_mode,
            file_name: file.as_ref().map(|f| f.1.clone()),
            file_bytes: file.as_ref().map(|f| f.2),
        });
    };
    match method.as_str() {
        "getMe" => ok(json!({
            "id": bot.id, "is_bot": true, "first_name": bot.username, "username": bot.username,
            "can_join_groups": true, "can_read_all_group_messages": false, "supports_inline_queries": false
        })),
        "setWebhook" => {
            let url = text_param(&params, "url").unwrap_or_default();
            let secret = text_param(&params, "secret_token");
            if let Some(secret) = &secret
                && (secret.is_empty()
                    || secret.len() > 256
                    || !secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
            {
                return error(400, "Bad Request: secret token contains unallowed characters");
            }
            if !url.is_empty() && !url.starts_with("https://") && !url.starts_with("http://") {
                return error(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook");
            }
            if let Some(b) = world.bot_by_token(&token) {
                b.webhook_url = url.clone();
                b.secret_token = secret;
                b.last_error_date = None;
                b.last_error_message = None;
            }
            let description = if url.is_empty() { "Webhook was deleted" } else { "Webhook was set" };
            (StatusCode::OK, axum::Json(json!({"ok": true, "result": true, "description": description})))
                .into_response()
        }
        "deleteWebhook" => {
            if let Some(b) = world.bot_by_token(&token) {
                b.webhook_url.clear();
                b.secret_token = None;
            }
            ok(json!(true))
        }
        "getWebhookInfo" => {
            let mut info = json!({
                "url": bot.webhook_url, "has_custom_certificate": false,
                "pending_update_count": bot.pending.len(), "max_connections": 40
            });
            if let Some(date) = bot.last_error_date {
                info["last_error_date"] = json!(date);
                info["last_error_message"] = json!(bot.last_error_message);
            }
            ok(info)
        }
        "getFile" => {
            let file_id = text_param(&params, "file_id").unwrap_or_default();
            match world.files.get(&file_id) {
                Some(f) if f.bot_id == bot.id => ok(json!({
                    "file_id": file_id, "file_unique_id": format!("u{file_id}"),
                    "file_size": f.bytes.len(), "file_path": f.path
                })),
                _ => error(400, "Bad Request: invalid file_id"),
            }
        }
        "sendMessage" => {
            let Some(chat_id) = text_param(&params, "chat_id") else {
                return error(400, "Bad Request: chat_id is empty");
            };
            let text = text_param(&params, "text").unwrap_or_default();
            if text.is_empty() {
                return error(400, "Bad Request: message text is empty");
            }
            if text.encode_utf16().count() > 4096 {
                return error(400, "Bad Request: message is too long");
            }
            let parse_mode = text_param(&params, "parse_mode");
            if parse_mode.as_deref() == Some("HTML") && !html_is_valid(&text) {
                return error(400, "Bad Request: can't parse entities: Unsupported start tag");
            }
            record(&mut world, "sendMessage", chat_id.clone(), text.clone(), parse_mode);
            let message_id = world.sent.len();
            ok(json!({
                "message_id": message_id, "date": DATE_ORIGIN,
                "from": {"id": bot.id, "is_bot": true, "first_name": bot.username, "username": bot.username},
                "chat": {"id": chat_id.parse::<i64>().unwrap_or_default(), "type": "private"},
                "text": text
            }))
        }
        "sendChatAction" => {
            let chat_id = text_param(&params, "chat_id").unwrap_or_default();
            let action = text_param(&params, "action").unwrap_or_default();
            record(&mut world, "sendChatAction", chat_id, action, None);
            ok(json!(true))
        }
        "sendAudio" | "sendDocument" => {
            let chat_id = text_param(&params, "chat_id").unwrap_or_default();
            // The file goes in the field the method names (`audio`, `document`).
            let field = if method == "sendAudio" { "audio" } else { "document" };
            if file.as_ref().is_none_or(|f| f.0 != field) {
                return error(400, &format!("Bad Request: there is no {field} in the request"));
            }
            let caption = text_param(&params, "caption").unwrap_or_default();
            record(&mut world, &method, chat_id.clone(), caption, text_param(&params, "parse_mode"));
            let message_id = world.sent.len();
            ok(json!({
                "message_id": message_id, "date": DATE_ORIGIN,
                "chat": {"id": chat_id.parse::<i64>().unwrap_or_default(), "type": "private"}
            }))
        }
        _ => error(404, "Not Found: method not found"),
    }
}

async fn download(State(shared): State<Arc<Shared>>, Path((bot, path)): Path<(String, String)>) -> Response {
    let Some(token) = token_of(&bot) else { return error(404, "Not Found") };
    let mut world = shared.world();
    let Some(bot_id) = world.bot_by_token(token).map(|b| b.id) else { return error(401, "Unauthorized") };
    let Some(file) = world.files.values().find(|f| f.bot_id == bot_id && f.path == path) else {
        return error(404, "Not Found");
    };
    let content_type = if path.ends_with(".jpg") || path.ends_with(".jpeg") {
        "image/jpeg"
    } else if path.ends_with(".ogg") || path.ends_with(".oga") {
        "audio/ogg"
    } else {
        "application/octet-stream"
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], file.bytes.clone()).into_response()
}

async fn control_sent(State(shared): State<Arc<Shared>>) -> Response {
    ok(json!(shared.world().sent))
}

async fn control_bots(State(shared): State<Arc<Shared>>) -> Response {
    let bots: Vec<Value> = shared
        .world()
        .bots
        .iter()
        .map(|b| json!({"id": b.id, "username": b.username, "token": b.token, "webhookUrl": b.webhook_url, "pending": b.pending.len()}))
        .collect();
    ok(json!(bots))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddBot {
    id: u64,
    username: String,
    #[serde(default)]
    token: Option<String>,
}

async fn control_add_bot(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(add) = serde_json::from_slice::<AddBot>(&body) else {
        return error(400, "expected {\"id\": <number>, \"username\": <string>, \"token\"?: <string>}");
    };
    let token = add.token.unwrap_or_else(|| format!("{}:fake-{}", add.id, common::crypto::random_base36(24)));
    let mut world = shared.world();
    if world.bots.iter().any(|b| b.id == add.id) {
        return error(409, "bot exists");
    }
    world.bots.push(Bot {
        id: add.id,
        username: add.username.clone(),
        token: token.clone(),
        webhook_url: String::new(),
        secret_token: None,
        pending: VecDeque::new(),
        last_error_date: None,
        last_error_message: None,
        next_update_id: 100_000,
        next_message_id: 1,
    });
    ok(json!({"id": add.id, "username": add.username, "token": token}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserSend {
    bot_id: u64,
    text: String,
}

/// A simulated user writes to a bot: the update is queued and delivered at once.
async fn control_user_send(State(shared): State<Arc<Shared>>, Path(user_id): Path<i64>, body: Bytes) -> Response {
    let Ok(send) = serde_json::from_slice::<UserSend>(&body) else {
        return error(400, "expected {\"botId\": <number>, \"text\": <string>}");
    };
    let (update_id, has_webhook) = {
        let mut world = shared.world();
        let Some(bot) = world.bots.iter_mut().find(|b| b.id == send.bot_id) else {
            return error(404, "no such bot");
        };
        bot.next_update_id += 1;
        bot.next_message_id += 1;
        let (update_id, message_id) = (bot.next_update_id, bot.next_message_id);
        let has_webhook = !bot.webhook_url.is_empty();
        let user = json!({"id": user_id, "is_bot": false, "first_name": format!("User{user_id}"), "username": format!("user{user_id}")});
        let update = json!({
            "update_id": update_id,
            "message": {
                "message_id": message_id,
                "from": user,
                "chat": {"id": user_id, "type": "private", "first_name": format!("User{user_id}")},
                "date": DATE_ORIGIN + message_id,
                "text": send.text,
            }
        });
        world.push_update(send.bot_id, update);
        (update_id, has_webhook)
    };
    let status = match has_webhook {
        true => {
            deliver_pending(&shared, send.bot_id).await.into_iter().find(|d| d.update_id == update_id).map(|d| d.status)
        }
        false => None,
    };
    ok(json!({"updateId": update_id, "webhookStatus": status}))
}

fn chat_record(world: &World, bot_id: u64, chat_id: &str) -> Vec<ChatEntry> {
    world.chats.iter().filter(|c| c.bot_id == bot_id && c.chat_id == chat_id).cloned().collect()
}

async fn control_chat(State(shared): State<Arc<Shared>>, Path((bot_id, chat_id)): Path<(u64, String)>) -> Response {
    let world = shared.world();
    if !world.bots.iter().any(|b| b.id == bot_id) {
        return error(404, "no such bot");
    }
    ok(json!(chat_record(&world, bot_id, &chat_id)))
}

#[cfg(test)]
mod tests {
    use super::html_is_valid;

    #[test]
    fn html_check_refuses_stray_markup() {
        assert!(html_is_valid("plain"));
        assert!(html_is_valid("<b>bold</b> &amp; <a href=\"x\">y</a>"));
        assert!(!html_is_valid("1 < 2"));
        assert!(!html_is_valid("a & b"));
        assert!(!html_is_valid("<script>"));
    }
}
