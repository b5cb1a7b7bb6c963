//! A stateful fake of an OpenAI-compatible model server, for tests and benchmarks only (never on
//! a production path): an axum server on loopback whose base URL ([`FakeLlm::base_url`],
//! `http://127.0.0.1:<port>/v1`) an agent's provider settings point at.
//!
//! What it fakes, with OpenAI's paths and JSON shapes:
//! * `POST /v1/chat/completions`, streamed (`"stream": true`: `text/event-stream` of
//!   `chat.completion.chunk` objects, a usage chunk when `stream_options.include_usage`, then
//!   `data: [DONE]`) or not (one `chat.completion`). Each request takes the next **scripted
//!   step** ([`FakeLlm::push`]): a text answer, a tool call (`finish_reason: "tool_calls"`, the
//!   arguments streamed in two pieces as OpenAI does), an HTTP error with OpenAI's error body
//!   (`{"error": {"message", "type", "code"}}`: 401 `invalid_api_key`, 429 `rate_limit_exceeded`,
//!   5xx `server_error`), or a request that hangs (never answered while the fake lives). With
//!   no step left it answers the default step ([`FakeLlm::set_default`]), else
//!   [`DEFAULT_ANSWER`];
//!   A rule ([`FakeLlm::respond_when`]) answers requests that mention a text, before the script.
//! * `GET /v1/models`: the one model `fake-model`.
//!
//! Every request is **recorded** ([`FakeLlm::requests`]: path, `Authorization` header, JSON
//! body), so a test asserts what the agent sent (its system prompt, the history it was given,
//! the tool results). [`FakeLlm::wait_for_requests`] waits for a number of them (a condition
//! with a deadline, not a sleep).
//!
//! Not faked: the Responses API, embeddings, images, audio, token counting (usage is a constant).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// The model id the fake lists.
pub const MODEL: &str = "fake-model";
/// The answer when no scripted step is left.
pub const DEFAULT_ANSWER: &str = "ok";

/// What the fake answers one request with.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// An assistant message with this text.
    Text(String),
    /// A call of tool `name` with these arguments (a JSON object).
    ToolCall { name: String, arguments: Value },
    /// An HTTP error with OpenAI's error body.
    Error { status: u16, message: String },
    /// No answer while the fake lives (a stuck provider).
    Hang,
}

impl Step {
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(text.into())
    }
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Self {
        Self::ToolCall { name: name.into(), arguments }
    }
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::Error { status, message: message.into() }
    }
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

impl Recorded {
    /// Every message's text content joined (string contents and `text` parts), to search in.
    pub fn all_text(&self) -> String {
        self.body["messages"]
            .as_array()
            .map(|m| m.iter().map(content_text).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// The system messages' text.
    pub fn system_text(&self) -> String {
        self.body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter(|m| m["role"] == "system" || m["role"] == "developer")
                    .map(content_text)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// The names of the tools offered.
    pub fn tool_names(&self) -> Vec<String> {
        self.body["tools"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["function"]["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

/// A message's content as text: a string, or the `text` of its parts.
pub fn content_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Step>,
    /// The answer once the script is exhausted; [`DEFAULT_ANSWER`] when unset.
    default: Option<Step>,
    /// `(needle, step)`: a request whose user messages contain `needle` gets `step`, before
    /// the script is consulted.
    rules: Vec<(String, Step)>,
    requests: Vec<Recorded>,
    next_id: u64,
}

#[derive(Clone, Default)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running fake; it stops when dropped.
pub struct FakeLlm {
    base_url: String,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeLlm {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> Self {
        let shared = Shared::default();
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake model server");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { base_url: format!("http://{address}/v1"), shared, server }
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Appends a step to the script.
    pub fn push(&self, step: Step) {
        self.shared.lock().script.push_back(step);
    }

    /// The answer to every request once the script is exhausted (a provider that keeps
    /// failing, whatever its client retries).
    pub fn set_default(&self, step: Step) {
        self.shared.lock().default = Some(step);
    }

    /// Answers every request whose user messages contain `needle` with `step`, whatever the
    /// script holds, until [`FakeLlm::clear_rules`].
    pub fn respond_when(&self, needle: impl Into<String>, step: Step) {
        self.shared.lock().rules.push((needle.into(), step));
    }

    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// The steps not taken yet.
    pub fn pending_steps(&self) -> usize {
        self.shared.lock().script.len()
    }

    /// Every chat-completions request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Waits until at least `count` requests arrived (then returns them), or panics after
    /// `timeout`.
    pub async fn wait_for_requests(&self, count: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            let requests = self.requests();
            if requests.len() >= count {
                return requests;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("the fake model server got {} requests, not {count}, within {timeout:?}", requests.len());
            }
        }
    }
}

async fn models() -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]}))
        .into_response()
}

async fn chat_completions(State(shared): State<Shared>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error_response(400, "the body is not JSON");
    };
    let (step, id) = {
        let mut inner = shared.lock();
        inner.requests.push(Recorded {
            path: "/v1/chat/completions".to_string(),
            authorization: headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string),
            body: body.clone(),
        });
        inner.next_id += 1;
        let users: String = body["messages"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["role"] == "user").map(content_text).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        let ruled = inner.rules.iter().find(|(needle, _)| users.contains(needle.as_str())).map(|(_, s)| s.clone());
        let step = ruled.or_else(|| inner.script.pop_front()).or_else(|| inner.default.clone());
        (step.unwrap_or_else(|| Step::text(DEFAULT_ANSWER)), inner.next_id)
    };
    shared.changed.notify_waiters();
    let model = body["model"].as_str().unwrap_or(MODEL).to_string();
    let id = format!("chatcmpl-fake-{id}");
    let stream = body["stream"] == true;
    let usage = body["stream_options"]["include_usage"] == true;
    match step {
        Step::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Step::Error { status, message } => error_response(status, &message),
        Step::Text(text) if stream => {
            let mut chunks = vec![
                chunk(&id, &model, json!({"role": "assistant", "content": ""}), None),
                chunk(&id, &model, json!({"content": text}), None),
                chunk(&id, &model, json!({}), Some("stop")),
            ];
            if usage {
                chunks.push(usage_chunk(&id, &model));
            }
            sse(chunks)
        }
        Step::Text(text) => axum::Json(json!({
            "id": id, "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }))
        .into_response(),
        Step::ToolCall { name, arguments } => {
            let call_id = format!("call_{id}");
            let arguments = arguments.to_string();
            if stream {
                let (a, b) = arguments.split_at(arguments.len() / 2);
                let mut chunks = vec![
                    chunk(
                        &id,
                        &model,
                        json!({"role": "assistant", "content": null, "tool_calls": [
                            {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": a}}
                        ]}),
                        None,
                    ),
                    chunk(&id, &model, json!({"tool_calls": [{"index": 0, "function": {"arguments": b}}]}), None),
                    chunk(&id, &model, json!({}), Some("tool_calls")),
                ];
                if usage {
                    chunks.push(usage_chunk(&id, &model));
                }
                sse(chunks)
            } else {
                axum::Json(json!({
                    "id": id, "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                        "role": "assistant", "content": null,
                        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
                    }}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }))
                .into_response()
            }
        }
    }
}

fn chunk(id: &str, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn usage_chunk(id: &str, model: &str) -> Value {
    json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
}

fn sse(chunks: Vec<Value>) -> Response {
    let mut text = String::new();
    for c in chunks {
        text.push_str(&format!("data: {c}\n\n"));
    }
    text.push_str("data: [DONE]\n\n");
    // The whole event stream in one body: clients parse it incrementally all the same.
    let body = Body::from(text);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .expect("response")
}

/// OpenAI's error body with `status`.
fn error_response(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", "invalid_api_key"),
        429 => ("requests", "rate_limit_exceeded"),
        400..=499 => ("invalid_request_error", "invalid_request"),
        _ => ("server_error", "server_error"),
    };
    let mut response =
        (status, axum::Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}})))
            .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(header::RETRY_AFTER, "1".parse().expect("header"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scripted_steps_are_answered_in_order_and_recorded() {
        let fake = FakeLlm::start().await;
        fake.push(Step::tool_call("write", json!({"path": "a.txt", "content": "x"})));
        fake.push(Step::error(429, "slow down"));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let url = format!("{}/chat/completions", fake.base_url());
        let post = |body: Value| {
            let request = http.post(&url).json(&body);
            async move {
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            }
        };
        let body = json!({"model": "m", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]});
        let (status, first) = post(body.clone()).await;
        assert_eq!(status, 200);
        let first: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(first["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "write");
        let (status, second) = post(body.clone()).await;
        assert_eq!(status, 429);
        assert!(second.contains("rate_limit_exceeded"));
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (status, third) = post(streamed).await;
        assert_eq!(status, 200);
        assert!(third.contains("\"content\":\"ok\"") && third.ends_with("data: [DONE]\n\n"), "{third}");
        let requests = fake.wait_for_requests(3, Duration::from_secs(5)).await;
        assert_eq!(requests[0].system_text(), "sys");
        assert!(requests[0].all_text().contains("hi"));
    }
}
