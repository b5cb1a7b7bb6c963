//! Reply engines: what turns a job into reply text. The worker loop does everything around it
//! (claim, hydration, attachments, history, Telegram, memory); an engine only answers.
//!
//! - [`EchoEngine`] (`AF_ENGINE=echo`, the default): `echo: <text>`, for the local stack and tests;
//! - [`CommandEngine`] (`command`): runs a program per job with the job as JSON on stdin and
//!   takes its stdout as the reply; a non-zero exit fails the job;
//! - [`OpenAiEngine`] (`openai`): an OpenAI-compatible `POST <base>/chat/completions`;
//! - [`OpenClawEngine`] (`openclaw`): a real OpenClaw agent behind the gateway the worker
//!   supervises ([`crate::openclaw`]).
//!
//! Whatever the engine, a line of its reply that is `MEDIA: <path>` names a file of the
//! workspace: the worker takes the line out of the text and sends the file to a Telegram chat
//! ([`crate::telegram`]).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::config::{EngineConfig, WorkerConfig};
use crate::openclaw::{OpenClawEngine, OpenClawPaths};

/// The longest piece of a failing program's stderr or an API error body kept in an error.
const ERROR_EXCERPT_CHARS: usize = 600;

/// One history item as the hydration bundle carries it.
pub use common::api::history::{HistoryItem, HistoryRole};

/// What an engine gets for one job. Serialised as is (camelCase) onto the command engine's
/// stdin.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineJob {
    pub message_id: String,
    pub conversation_id: String,
    pub agent_key: String,
    pub workspace_id: String,
    /// The user's text, followed by a `[telegram_media]` block describing downloaded
    /// attachments when there are any (spec §4.5 step 2).
    pub text: String,
    /// Recent conversation history, oldest first (at most 64 items, from the bundle).
    pub history: Vec<HistoryItem>,
    /// The job's payload as hydrated (provider, providerUserId, metadata, attachments, …).
    pub payload: Value,
    /// Downloaded attachments, relative to the workspace.
    pub attachments: Vec<String>,
    /// The workspace directory (the command engine's working directory).
    pub workspace_dir: PathBuf,
    /// The agent's model provider from the bundle (holds its API key: never serialised).
    #[serde(skip)]
    pub model: Option<common::api::history::ModelRuntimeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

/// Produces the reply to one job.
pub trait Engine: Send + Sync {
    /// `echo`, `command`, `openai`.
    fn name(&self) -> &'static str;
    /// The reply text; empty replies are refused by the caller.
    fn reply<'a>(&'a self, job: &'a EngineJob) -> BoxFuture<'a, Result<String, EngineError>>;
    /// Called once when the worker stops, before its final snapshot: release what the engine
    /// runs (the `openclaw` engine stops its gateway). Nothing by default.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The engine the worker's configuration describes.
pub fn build(config: &WorkerConfig) -> Arc<dyn Engine> {
    match &config.engine {
        EngineConfig::OpenClaw(openclaw) => Arc::new(OpenClawEngine::new(
            openclaw.clone(),
            OpenClawPaths {
                data_dir: config.data_dir.clone(),
                state_dir: config.state_dir.clone(),
                workspace_dir: config.workspace_dir.clone(),
            },
        )),
        other => from_config(other),
    }
}

/// The engine `config` describes (the `openclaw` engine needs the data paths: [`build`]).
pub fn from_config(config: &EngineConfig) -> Arc<dyn Engine> {
    match config {
        EngineConfig::OpenClaw(openclaw) => Arc::new(OpenClawEngine::new(
            openclaw.clone(),
            OpenClawPaths {
                data_dir: PathBuf::from(crate::config::DEFAULT_DATA_DIR),
                state_dir: PathBuf::from(crate::config::DEFAULT_DATA_DIR).join(".clawdbot"),
                workspace_dir: PathBuf::from(crate::config::DEFAULT_DATA_DIR).join("workspace"),
            },
        )),
        EngineConfig::Echo => Arc::new(EchoEngine),
        EngineConfig::Command { program, args, timeout } => {
            Arc::new(CommandEngine { program: program.clone(), args: args.clone(), timeout: *timeout })
        }
        EngineConfig::OpenAi { base_url, api_key, model, system_prompt, history_items, timeout } => {
            Arc::new(OpenAiEngine::new(base_url, api_key.clone(), model, system_prompt, *history_items, *timeout))
        }
    }
}

/// Replies `echo: <text>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoEngine;

impl Engine for EchoEngine {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn reply<'a>(&'a self, job: &'a EngineJob) -> BoxFuture<'a, Result<String, EngineError>> {
        Box::pin(async move { Ok(format!("echo: {}", job.text)) })
    }
}

/// Runs `program args…` in the workspace for each job: the [`EngineJob`] as JSON on stdin, the
/// reply on stdout (one trailing newline removed). A non-zero exit, a timeout (the program is
/// killed) or output that is not UTF-8 fails the job. The program runs in the worker's process
/// group, so it also receives the worker's stop signals.
#[derive(Debug, Clone)]
pub struct CommandEngine {
    pub program: String,
    pub args: Vec<String>,
    pub timeout: Duration,
}

impl Engine for CommandEngine {
    fn name(&self) -> &'static str {
        "command"
    }

    fn reply<'a>(&'a self, job: &'a EngineJob) -> BoxFuture<'a, Result<String, EngineError>> {
        Box::pin(self.run(job))
    }
}

impl CommandEngine {
    async fn run(&self, job: &EngineJob) -> Result<String, EngineError> {
        let input = serde_json::to_vec(job).map_err(|e| EngineError(format!("encoding the job: {e}")))?;
        let mut command = tokio::process::Command::new(&self.program);
        command.args(&self.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        if job.workspace_dir.is_dir() {
            command.current_dir(&job.workspace_dir);
        }
        let mut child = command
            .spawn()
            .map_err(|e| EngineError(format!("engine command '{}' could not start: {e}", self.program)))?;
        // Written concurrently with reading the output: a program that answers before reading
        // everything must not deadlock on a full pipe.
        let writer = child.stdin.take().map(|mut stdin| {
            tokio::spawn(async move {
                let result = stdin.write_all(&input).await;
                drop(stdin); // EOF for the program.
                result
            })
        });
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(result) => result.map_err(|e| EngineError(format!("engine command '{}': {e}", self.program)))?,
            // Dropping the child (kill_on_drop) kills it.
            Err(_) => {
                return Err(EngineError(format!(
                    "engine command '{}' timed out after {} ms",
                    self.program,
                    self.timeout.as_millis()
                )));
            }
        };
        if let Some(writer) = writer {
            match writer.await {
                Ok(Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(EngineError(format!("writing the job to engine command '{}': {e}", self.program)));
                }
                // A program may ignore its input and exit early (broken pipe): its reply counts.
                _ => {}
            }
        }
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(EngineError(format!(
                "engine command '{}' failed ({}): {}",
                self.program,
                output.status,
                excerpt(stderr.trim())
            )));
        }
        let stdout = String::from_utf8(output.stdout)
            .map_err(|_| EngineError(format!("engine command '{}' printed a reply that is not UTF-8", self.program)))?;
        let reply = stdout.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s)).unwrap_or(&stdout);
        Ok(reply.to_string())
    }
}

/// An OpenAI-compatible chat-completions client: system prompt, the last history items, the
/// user message; the reply is `choices[0].message.content`.
pub struct OpenAiEngine {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    model: String,
    system_prompt: String,
    history_items: usize,
}

impl OpenAiEngine {
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        model: &str,
        system_prompt: &str,
        history_items: usize,
        timeout: Duration,
    ) -> Self {
        common::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder().timeout(timeout).build().unwrap_or_default();
        Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            model: model.to_string(),
            system_prompt: system_prompt.to_string(),
            history_items,
        }
    }

    /// The request body for `job`. History roles other than user/assistant/system (tool
    /// results need call ids the history does not keep) are left out.
    pub fn request_body(&self, job: &EngineJob) -> Value {
        let mut messages = vec![json!({"role": "system", "content": self.system_prompt})];
        let recent = job.history.len().saturating_sub(self.history_items);
        messages.extend(
            job.history[recent..]
                .iter()
                .filter(|item| matches!(item.role, HistoryRole::User | HistoryRole::Assistant | HistoryRole::System))
                .map(|item| json!({"role": item.role.as_str(), "content": item.content})),
        );
        messages.push(json!({"role": "user", "content": job.text}));
        json!({"model": self.model, "messages": messages})
    }

    async fn complete(&self, job: &EngineJob) -> Result<String, EngineError> {
        let mut request = self.http.post(&self.url).json(&self.request_body(job));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response =
            request.send().await.map_err(|e| EngineError(format!("chat completions request failed: {e}")))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| EngineError(format!("chat completions response could not be read: {e}")))?;
        if !status.is_success() {
            return Err(EngineError(format!("chat completions answered {status}: {}", excerpt(body.trim()))));
        }
        let value: Value = serde_json::from_str(&body)
            .map_err(|e| EngineError(format!("chat completions answered with invalid JSON: {e}")))?;
        match value.pointer("/choices/0/message/content") {
            Some(Value::String(text)) => Ok(text.clone()),
            _ => Err(EngineError(format!(
                "chat completions answered without choices[0].message.content: {}",
                excerpt(&body)
            ))),
        }
    }
}

impl Engine for OpenAiEngine {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn reply<'a>(&'a self, job: &'a EngineJob) -> BoxFuture<'a, Result<String, EngineError>> {
        Box::pin(self.complete(job))
    }
}

/// The first [`ERROR_EXCERPT_CHARS`] characters of `text`.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(ERROR_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::Json;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    use super::*;

    fn job(text: &str) -> EngineJob {
        EngineJob {
            message_id: "m1".to_string(),
            conversation_id: "c1".to_string(),
            agent_key: "agent-a".to_string(),
            workspace_id: "default".to_string(),
            text: text.to_string(),
            history: vec![
                HistoryItem { role: HistoryRole::User, content: "first".to_string(), at: 1 },
                HistoryItem { role: HistoryRole::Tool, content: "x".to_string(), at: 2 },
                HistoryItem { role: HistoryRole::Assistant, content: "second".to_string(), at: 3 },
                HistoryItem { role: HistoryRole::User, content: "third".to_string(), at: 4 },
            ],
            payload: json!({"provider": "telegram", "providerUserId": "u1", "messageText": text}),
            attachments: vec![],
            workspace_dir: std::env::temp_dir(),
            model: None,
        }
    }

    fn command(args: &[&str]) -> CommandEngine {
        CommandEngine {
            program: "/bin/sh".to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn echo_engine_echoes_the_text() {
        let engine = from_config(&EngineConfig::Echo);
        assert_eq!(engine.name(), "echo");
        assert_eq!(engine.reply(&job("hello")).await.unwrap(), "echo: hello");
    }

    #[tokio::test]
    async fn command_engine_reads_the_job_on_stdin_and_replies_with_stdout() {
        // The whole job JSON comes back (cat), minus nothing: it parses as the job.
        let reply = command(&["-c", "cat"]).reply(&job("hello")).await.unwrap();
        let echoed: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(echoed["text"], "hello");
        assert_eq!(echoed["messageId"], "m1");
        assert_eq!(echoed["conversationId"], "c1");
        assert_eq!(echoed["history"][2]["content"], "second");
        assert_eq!(echoed["payload"]["providerUserId"], "u1");

        // One trailing newline is dropped; a program that ignores stdin still answers.
        let reply = command(&["-c", "echo 'line one'; echo 'line two'"]).reply(&job("x")).await.unwrap();
        assert_eq!(reply, "line one\nline two");
        let big = "y".repeat(1_000_000); // More than a pipe buffer in both directions.
        let reply = command(&["-c", "cat >/dev/null; echo ok"]).reply(&job(&big)).await.unwrap();
        assert_eq!(reply, "ok");
    }

    #[tokio::test]
    async fn command_engine_failures_are_errors() {
        let err = command(&["-c", "echo 'model overloaded' >&2; exit 3"]).reply(&job("x")).await.unwrap_err();
        assert!(err.0.contains("failed (exit status: 3): model overloaded"), "{err}");
        let slow = CommandEngine { timeout: Duration::from_millis(100), ..command(&["-c", "exec tail -f /dev/null"]) };
        let err = slow.reply(&job("x")).await.unwrap_err();
        assert!(err.0.contains("timed out after 100 ms"), "{err}");
        let missing = CommandEngine { program: "/nonexistent/engine".to_string(), ..command(&[]) };
        let err = missing.reply(&job("x")).await.unwrap_err();
        assert!(err.0.contains("could not start"), "{err}");
    }

    /// Each request's authorization header and body.
    type Requests = Arc<Mutex<Vec<(Option<String>, Value)>>>;

    #[derive(Clone, Default)]
    struct Seen {
        requests: Requests,
    }

    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}/v1")
    }

    async fn completions(
        State(seen): State<Seen>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("");
        let answer = match text {
            "fail" => (StatusCode::TOO_MANY_REQUESTS, Json(json!({"error": {"message": "rate limited"}}))),
            "empty" => (StatusCode::OK, Json(json!({"choices": []}))),
            other => (
                StatusCode::OK,
                Json(json!({"choices": [{"message": {"role": "assistant", "content": format!("re: {other}")}}]})),
            ),
        };
        seen.requests.lock().unwrap().push((auth, body));
        answer
    }

    #[tokio::test]
    async fn openai_engine_posts_a_chat_completion_and_reads_the_first_choice() {
        let seen = Seen::default();
        let base =
            serve(axum::Router::new().route("/v1/chat/completions", post(completions)).with_state(seen.clone())).await;
        let config = EngineConfig::OpenAi {
            base_url: base.clone(),
            api_key: Some("sk-test".to_string()),
            model: "test-model".to_string(),
            system_prompt: "be brief".to_string(),
            history_items: 3,
            timeout: Duration::from_secs(10),
        };
        let engine = from_config(&config);
        assert_eq!(engine.name(), "openai");
        assert_eq!(engine.reply(&job("hello")).await.unwrap(), "re: hello");
        {
            let requests = seen.requests.lock().unwrap();
            let (auth, body) = &requests[0];
            assert_eq!(auth.as_deref(), Some("Bearer sk-test"));
            // The last 3 history items, tool results left out, then the user message.
            assert_eq!(
                body,
                &json!({"model": "test-model", "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "assistant", "content": "second"},
                    {"role": "user", "content": "third"},
                    {"role": "user", "content": "hello"},
                ]})
            );
        }
        let err = engine.reply(&job("fail")).await.unwrap_err();
        assert!(err.0.contains("429") && err.0.contains("rate limited"), "{err}");
        let err = engine.reply(&job("empty")).await.unwrap_err();
        assert!(err.0.contains("without choices[0].message.content"), "{err}");

        // No key: no authorization header (local OpenAI-compatible servers).
        let keyless = OpenAiEngine::new(&base, None, "m", "p", 64, Duration::from_secs(10));
        keyless.reply(&job("hi")).await.unwrap();
        assert_eq!(seen.requests.lock().unwrap().last().unwrap().0, None);
    }
}
