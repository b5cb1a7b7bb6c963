//! The `openclaw` engine: a real OpenClaw agent per worker (spec §4.3 steps 7–8, §4.5 step 3).
//!
//! The worker supervises the OpenClaw gateway (`node openclaw.mjs gateway`) as a child process
//! bound to loopback and sends each job to it as one agent turn over the gateway's WebSocket
//! protocol:
//!
//! 1. before the first job (and whenever the agent's model settings change) it writes
//!    `<state>/openclaw.json`: the gateway on `127.0.0.1:<port>` with token auth (a random
//!    token per start), the agent workspace = the restored workspace (whose `skills/` holds the
//!    materialised global skills, where OpenClaw loads workspace skills from), and one
//!    OpenAI-compatible model provider `af` from the bundle's `modelRuntimeConfig` (or the
//!    `OPENAI_*` variables). Secrets are not written: the file names `${AF_MODEL_API_KEY}` and
//!    `${OPENCLAW_GATEWAY_TOKEN}`, which the gateway reads from its environment, so snapshots of
//!    the state directory never hold them;
//! 2. it starts the gateway with `OPENCLAW_STATE_DIR`/`OPENCLAW_CONFIG_PATH` pointing into the
//!    data directory, `HOME` in a run directory that is not snapshotted, channels, Bonjour and
//!    self-respawn off, in a process group of its own; its output goes to
//!    `<data>/.openclaw-run/gateway.log`;
//! 3. readiness is the protocol's own: a WebSocket `connect.challenge`, then `connect` (protocol
//!    4, `gateway-client`/`backend`, role `operator`, the token) answered `hello-ok`; a
//!    retryable `UNAVAILABLE` while sidecars start is retried. A gateway that exits or is not
//!    ready within `OPENCLAW_GATEWAY_READY_TIMEOUT_MS` fails the job with its log's tail;
//! 4. a turn is the `agent` method (`agentId: main`, a fresh session key per turn, an
//!    idempotency key) with a prompt holding the conversation history, the user message and the
//!    attachments' local paths; the final response's `result.payloads[].text` is the reply. A
//!    provider error (`ok: false`) fails the job with OpenClaw's message; a gateway that dies
//!    mid-turn or a turn past `AF_ENGINE_TIMEOUT_MS` fails the job too and the gateway is killed,
//!    so the next job starts a fresh one;
//! 5. at drain ([`crate::Engine::shutdown`]) the gateway gets SIGTERM, then SIGKILL after
//!    [`STOP_GRACE`]; the snapshot that follows archives the workspace and the agent state.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::api::history::ModelRuntimeConfig;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::config::OpenClawConfig;
use crate::engine::{Engine, EngineError, EngineJob, HistoryRole};

/// The gateway's protocol version this client speaks.
pub const PROTOCOL_VERSION: u64 = 4;
/// The provider id the worker gives the agent's model in `openclaw.json`.
pub const PROVIDER_ID: &str = "af";
/// The default base URL when the model settings name a model but no URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// How long a stopping gateway gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of the gateway's log quoted in a startup or crash error.
pub const LOG_TAIL_LINES: usize = 30;
/// The run directory under the data directory: logs, pid file, the gateway's HOME. Snapshots
/// archive only `.clawdbot` and `workspace`, so nothing here travels.
pub const RUN_DIR: &str = ".openclaw-run";

/// Paths the engine works with.
#[derive(Debug, Clone)]
pub struct OpenClawPaths {
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub workspace_dir: PathBuf,
}

impl OpenClawPaths {
    pub fn run_dir(&self) -> PathBuf {
        self.data_dir.join(RUN_DIR)
    }
    /// `<data>/.openclaw-run/gateway.pid`: the running gateway's pid (its process group).
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("gateway.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.run_dir().join("gateway.log")
    }
    pub fn config_file(&self) -> PathBuf {
        self.state_dir.join("openclaw.json")
    }
}

/// A running gateway.
struct Gateway {
    child: tokio::process::Child,
    pid: Option<u32>,
    port: u16,
    token: String,
    model: ResolvedModel,
}

/// The model settings a gateway was started with.
#[derive(Clone, PartialEq, Eq)]
struct ResolvedModel {
    base_url: String,
    model: String,
    api_key: Option<String>,
    api: String,
}

/// See the module documentation.
pub struct OpenClawEngine {
    config: OpenClawConfig,
    paths: OpenClawPaths,
    gateway: Mutex<Option<Gateway>>,
}

impl OpenClawEngine {
    pub fn new(config: OpenClawConfig, paths: OpenClawPaths) -> Self {
        Self { config, paths, gateway: Mutex::new(None) }
    }

    /// The bundle's model settings, field by field over the environment's.
    fn resolve_model(&self, bundle: Option<&ModelRuntimeConfig>) -> Result<ResolvedModel, EngineError> {
        let fallback = &self.config.fallback_model;
        let pick = |f: fn(&ModelRuntimeConfig) -> &Option<String>| {
            bundle.and_then(|b| f(b).clone()).or_else(|| f(fallback).clone()).filter(|v| !v.trim().is_empty())
        };
        let model = pick(|m| &m.model).ok_or_else(|| {
            EngineError(
                "no model configured for the openclaw engine: set the agent's secret model.name (with model.baseUrl \
                 and model.apiKey) or the worker's OPENAI_MODEL"
                    .to_string(),
            )
        })?;
        let api = pick(|m| &m.api).unwrap_or_else(|| "openai-completions".to_string());
        if !["openai-completions", "openai-responses"].contains(&api.as_str()) {
            return Err(EngineError(format!(
                "model api '{api}' is not supported: use openai-completions or openai-responses"
            )));
        }
        Ok(ResolvedModel {
            base_url: pick(|m| &m.base_url).unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
            model,
            api_key: pick(|m| &m.api_key),
            api,
        })
    }

    /// `openclaw.json` for a gateway on `port` serving `model`. Secrets are `${VAR}` references.
    fn config_json(&self, port: u16, model: &ResolvedModel) -> Value {
        let mut provider = json!({
            "baseUrl": model.base_url,
            "api": model.api,
            "models": [{
                "id": model.model,
                "name": model.model,
                "reasoning": false,
                "input": ["text"],
                "contextWindow": 128000,
                "maxTokens": 8192,
            }],
        });
        // Keyless local servers get no key at all.
        provider["apiKey"] = json!(if model.api_key.is_some() { "${AF_MODEL_API_KEY}" } else { "none" });
        json!({
            "gateway": {
                "mode": "local",
                "bind": "loopback",
                "port": port,
                "auth": {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"},
            },
            "agents": {"defaults": {
                "workspace": self.paths.workspace_dir,
                "model": {"primary": format!("{PROVIDER_ID}/{}", model.model)},
            }},
            "models": {"mode": "merge", "providers": {PROVIDER_ID: provider}},
            "logging": {"file": self.paths.run_dir().join("openclaw.log")},
        })
    }

    /// A running gateway for `model`: the current one, or a fresh one.
    async fn ensure_gateway<'a>(
        &self,
        slot: &'a mut Option<Gateway>,
        model: &ResolvedModel,
    ) -> Result<&'a mut Gateway, EngineError> {
        if let Some(gateway) = slot.as_mut() {
            let exited = gateway.child.try_wait().ok().flatten();
            if let Some(status) = exited {
                tracing::warn!(%status, "the OpenClaw gateway had exited; starting a new one");
                *slot = None;
            } else if gateway.model != *model {
                tracing::info!("the agent's model settings changed; restarting the OpenClaw gateway");
                if let Some(old) = slot.take() {
                    stop_gateway(old, STOP_GRACE).await;
                }
            }
        }
        if slot.is_none() {
            *slot = Some(self.start_gateway(model).await?);
        }
        Ok(slot.as_mut().expect("just set"))
    }

    async fn start_gateway(&self, model: &ResolvedModel) -> Result<Gateway, EngineError> {
        let started = tokio::time::Instant::now();
        let run_dir = self.paths.run_dir();
        let home = run_dir.join("home");
        for dir in [&run_dir, &home, &self.paths.state_dir, &self.paths.workspace_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| EngineError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let port = match self.config.port {
            0 => free_port().map_err(|e| EngineError(format!("no free loopback port for the gateway: {e}")))?,
            port => port,
        };
        let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let config = serde_json::to_vec_pretty(&self.config_json(port, model)).expect("JSON");
        let config_path = self.paths.config_file();
        let tmp = config_path.with_extension("json.tmp");
        tokio::fs::write(&tmp, &config)
            .await
            .and(tokio::fs::rename(&tmp, &config_path).await)
            .map_err(|e| EngineError(format!("cannot write {}: {e}", config_path.display())))?;

        let log_path = self.paths.log_file();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| EngineError(format!("cannot open {}: {e}", log_path.display())))?;
        let log_err = log.try_clone().map_err(|e| EngineError(format!("cannot open {}: {e}", log_path.display())))?;
        let mut command = tokio::process::Command::new(&self.config.node_bin);
        command
            .arg(&self.config.entry)
            .arg("gateway")
            .env("HOME", &home)
            .env("OPENCLAW_STATE_DIR", &self.paths.state_dir)
            .env("OPENCLAW_CONFIG_PATH", &config_path)
            .env("OPENCLAW_GATEWAY_TOKEN", &token)
            .env("OPENCLAW_SKIP_CHANNELS", "1")
            .env("OPENCLAW_DISABLE_BONJOUR", "1")
            .env("OPENCLAW_NO_RESPAWN", "1")
            .env("NODE_ENV", "production")
            .env_remove("AF_WORKER_TOKEN")
            .current_dir(&self.paths.workspace_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(true);
        match &model.api_key {
            Some(key) => command.env("AF_MODEL_API_KEY", key),
            None => command.env_remove("AF_MODEL_API_KEY"),
        };
        let child = command.spawn().map_err(|e| {
            EngineError(format!(
                "the OpenClaw gateway could not start ({} {}): {e}",
                self.config.node_bin.display(),
                self.config.entry.display()
            ))
        })?;
        let pid = child.id();
        if let Some(pid) = pid {
            let _ = tokio::fs::write(self.paths.pid_file(), format!("{pid}\n")).await;
        }
        let mut gateway = Gateway { child, pid, port, token, model: model.clone() };
        tracing::info!(port, pid = ?pid, "OpenClaw gateway starting");
        match self.wait_ready(&mut gateway).await {
            Ok(()) => {
                tracing::info!(port, elapsed_ms = started.elapsed().as_millis() as u64, "OpenClaw gateway ready");
                Ok(gateway)
            }
            Err(reason) => {
                stop_gateway(gateway, Duration::from_secs(2)).await;
                Err(EngineError(format!(
                    "the OpenClaw gateway did not start: {reason}; last lines of {}:\n{}",
                    log_path.display(),
                    self.log_tail(model)
                )))
            }
        }
    }

    /// Until `hello-ok`, the child's exit, or the ready timeout.
    async fn wait_ready(&self, gateway: &mut Gateway) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.config.ready_timeout;
        let mut last_error = String::from("no answer yet");
        loop {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                return Err(format!("it exited ({status})"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "not ready after {} ms (last: {last_error})",
                    self.config.ready_timeout.as_millis()
                ));
            }
            let attempt = tokio::time::timeout_at(deadline, connect(gateway.port, &gateway.token)).await;
            match attempt {
                Ok(Ok(_socket)) => return Ok(()),
                Ok(Err(ConnectError::Retry(e))) => last_error = e,
                Ok(Err(ConnectError::Fatal(e))) => return Err(e),
                Err(_) => continue,
            }
            // The port is not open yet or sidecars are starting: the child's exit ends the wait
            // early, otherwise try again shortly.
            tokio::select! {
                status = gateway.child.wait() => {
                    return Err(format!("it exited ({})", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
                }
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// The gateway log's last lines, colour codes and the API key removed.
    fn log_tail(&self, model: &ResolvedModel) -> String {
        let text = std::fs::read(self.paths.log_file()).map(|b| String::from_utf8_lossy(&b).into_owned());
        let text = text.unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        scrub(&strip_ansi(&tail), model)
    }

    async fn turn(&self, job: &EngineJob) -> Result<String, EngineError> {
        let model = self.resolve_model(job.model.as_ref())?;
        let mut slot = self.gateway.lock().await;
        let gateway = self.ensure_gateway(&mut slot, &model).await?;
        let outcome = tokio::time::timeout(self.config.turn_timeout, run_turn(gateway, job, &self.config)).await;
        let failure = match outcome {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(TurnError::Agent(message))) => {
                return Err(EngineError(format!("the OpenClaw agent turn failed: {}", scrub(&message, &model))));
            }
            Ok(Err(TurnError::Connection(message))) => {
                // The socket may close a moment before the process is gone.
                let exited =
                    tokio::time::timeout(Duration::from_secs(2), gateway.child.wait()).await.ok().and_then(Result::ok);
                match exited {
                    Some(status) => format!("the OpenClaw gateway crashed during the turn ({status}): {message}"),
                    None => format!("the OpenClaw gateway connection failed during the turn: {message}"),
                }
            }
            Err(_) => format!("the OpenClaw agent turn timed out after {} ms", self.config.turn_timeout.as_millis()),
        };
        // A gateway in an unknown state is replaced for the next job.
        if let Some(gateway) = slot.take() {
            stop_gateway(gateway, Duration::from_secs(2)).await;
        }
        Err(EngineError(format!("{failure}; the gateway is restarted for the next job; last log lines:\n{}", {
            self.log_tail(&model)
        })))
    }
}

impl Engine for OpenClawEngine {
    fn name(&self) -> &'static str {
        "openclaw"
    }

    fn reply<'a>(&'a self, job: &'a EngineJob) -> BoxFuture<'a, Result<String, EngineError>> {
        Box::pin(self.turn(job))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(gateway) = self.gateway.lock().await.take() {
                tracing::info!("stopping the OpenClaw gateway");
                stop_gateway(gateway, STOP_GRACE).await;
            }
            let _ = tokio::fs::remove_file(self.paths.pid_file()).await;
        })
    }
}

/// SIGTERM to the gateway's process group, SIGKILL after `grace`.
async fn stop_gateway(mut gateway: Gateway, grace: Duration) {
    let Some(pid) = gateway.pid else { return };
    let Ok(pgid) = i32::try_from(pid) else { return };
    // A negative pid signals the process group the gateway leads (spawned with
    // process_group(0)), its helpers included.
    signal_group(pgid, libc::SIGTERM);
    if tokio::time::timeout(grace, gateway.child.wait()).await.is_err() {
        tracing::warn!(pid, "the OpenClaw gateway did not stop in time; killing it");
    }
    // Whatever is left of the group (the gateway's helpers) goes too.
    signal_group(pgid, libc::SIGKILL);
    let _ = gateway.child.wait().await;
}

/// Sends `signal` to the process group `pgid`; a group that is gone already is fine.
#[allow(unsafe_code)]
fn signal_group(pgid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let _ = unsafe { libc::kill(-pgid, signal) };
}

enum ConnectError {
    /// Not listening yet, or `UNAVAILABLE` while starting.
    Retry(String),
    /// Refused for good (a wrong token, an unsupported protocol).
    Fatal(String),
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to the gateway and completes the handshake.
async fn connect(port: u16, token: &str) -> Result<Socket, ConnectError> {
    let url = format!("ws://127.0.0.1:{port}");
    let (mut socket, _) =
        tokio_tungstenite::connect_async(url.as_str()).await.map_err(|e| ConnectError::Retry(e.to_string()))?;
    // The gateway speaks first: connect.challenge.
    loop {
        let frame = next_json(&mut socket).await.map_err(ConnectError::Retry)?;
        if frame["type"] == "event" && frame["event"] == "connect.challenge" {
            break;
        }
    }
    let request = json!({
        "type": "req",
        "id": "connect",
        "method": "connect",
        "params": {
            "minProtocol": PROTOCOL_VERSION,
            "maxProtocol": PROTOCOL_VERSION,
            "client": {"id": "gateway-client", "version": env!("CARGO_PKG_VERSION"), "platform": "linux", "mode": "backend"},
            "role": "operator",
            "scopes": ["operator.admin", "operator.read", "operator.write"],
            "caps": [],
            "auth": {"token": token},
        },
    });
    socket.send(Message::Text(request.to_string().into())).await.map_err(|e| ConnectError::Retry(e.to_string()))?;
    loop {
        let frame = next_json(&mut socket).await.map_err(ConnectError::Retry)?;
        if frame["type"] != "res" || frame["id"] != "connect" {
            continue;
        }
        if frame["ok"] == true && frame["payload"]["type"] == "hello-ok" {
            return Ok(socket);
        }
        let code = frame["error"]["code"].as_str().unwrap_or_default();
        let message = frame["error"]["message"].as_str().unwrap_or("connect refused").to_string();
        return Err(if code == "UNAVAILABLE" {
            ConnectError::Retry(message)
        } else {
            ConnectError::Fatal(format!("connect refused ({code}): {message}"))
        });
    }
}

/// The next JSON text frame; an error when the socket closes.
async fn next_json(socket: &mut Socket) -> Result<Value, String> {
    loop {
        match socket.next().await {
            None => return Err("the gateway closed the connection".to_string()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(Message::Text(text))) => {
                if let Ok(value) = serde_json::from_str::<Value>(text.as_str()) {
                    return Ok(value);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!(
                    "the gateway closed the connection{}",
                    frame.map(|f| format!(" ({} {})", u16::from(f.code), f.reason)).unwrap_or_default()
                ));
            }
            Some(Ok(_)) => {}
        }
    }
}

enum TurnError {
    /// The agent answered with an error (a model provider error, a refused request).
    Agent(String),
    /// The connection broke or the handshake failed.
    Connection(String),
}

/// One agent turn on a fresh connection.
async fn run_turn(gateway: &Gateway, job: &EngineJob, config: &OpenClawConfig) -> Result<String, TurnError> {
    let mut socket = connect(gateway.port, &gateway.token).await.map_err(|e| match e {
        ConnectError::Retry(m) | ConnectError::Fatal(m) => TurnError::Connection(m),
    })?;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let mut params = json!({
        "message": prompt(job),
        "agentId": "main",
        // A session per turn: the conversation's history comes from the control plane, in the
        // prompt, so a moved or restored conversation reads the same context.
        "sessionKey": format!("agent:main:af-{}-{}", safe_key(&job.message_id), &nonce[..8]),
        "idempotencyKey": format!("af-{}-{nonce}", safe_key(&job.message_id)),
        "timeout": config.turn_timeout.as_secs().max(1),
    });
    if let Some(thinking) = &config.thinking {
        params["thinking"] = json!(thinking);
    }
    let request = json!({"type": "req", "id": "agent", "method": "agent", "params": params});
    socket.send(Message::Text(request.to_string().into())).await.map_err(|e| TurnError::Connection(e.to_string()))?;
    // The gateway names the run after the idempotency key; the accepted response confirms it.
    let mut run_id = params["idempotencyKey"].as_str().unwrap_or_default().to_string();
    let session_key = params["sessionKey"].as_str().unwrap_or_default().to_string();
    let mut streamed = String::new();
    loop {
        let frame = next_json(&mut socket).await.map_err(TurnError::Connection)?;
        if frame["type"] == "event" && frame["event"] == "agent" {
            let event = &frame["payload"];
            if event["runId"].as_str() != Some(run_id.as_str()) {
                continue; // Another run (a recovered one, a heartbeat).
            }
            if event["stream"] == "assistant" {
                if let Some(delta) = event["data"]["delta"].as_str() {
                    streamed.push_str(delta);
                }
            } else if let Some(error) = provider_error(event) {
                // A model provider error: the turn fails now and the queue retries the job with
                // its backoff, instead of OpenClaw's own retries holding the lease.
                abort_run(&mut socket, &session_key, &run_id).await;
                return Err(TurnError::Agent(error));
            }
            continue;
        }
        if frame["type"] != "res" || frame["id"] != "agent" {
            continue;
        }
        let payload = &frame["payload"];
        if frame["ok"] == true && payload["status"] == "accepted" {
            if let Some(id) = payload["runId"].as_str() {
                run_id = id.to_string();
            }
            continue;
        }
        if frame["ok"] != true || payload["status"] == "error" || payload["status"] == "timeout" {
            let message = frame["error"]["message"]
                .as_str()
                .or_else(|| payload["summary"].as_str())
                .unwrap_or("the agent run failed without a message");
            return Err(TurnError::Agent(message.to_string()));
        }
        let _ = socket.close(None).await;
        return Ok(reply_text(payload).unwrap_or(streamed));
    }
}

/// A lifecycle event reporting a failed model call: `model provider error (<reason>): <message>`.
pub fn provider_error(event: &Value) -> Option<String> {
    if event["stream"] != "lifecycle" {
        return None;
    }
    let data = &event["data"];
    let message = data["error"].as_str()?;
    let observation = &data["errorObservation"];
    let reason =
        observation["failoverReason"].as_str().or_else(|| observation["providerRuntimeFailureKind"].as_str())?;
    Some(format!("model provider error ({reason}): {message}"))
}

/// Asks the gateway to stop `run_id` (best effort, bounded).
async fn abort_run(socket: &mut Socket, session_key: &str, run_id: &str) {
    let request = json!({"type": "req", "id": "abort", "method": "chat.abort",
                         "params": {"sessionKey": session_key, "runId": run_id, "agentId": "main"}});
    if socket.send(Message::Text(request.to_string().into())).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(frame) = next_json(socket).await {
            if frame["type"] == "res" && frame["id"] == "abort" {
                return;
            }
        }
    })
    .await;
    let _ = socket.close(None).await;
}

/// The final response's text: every payload's text, and a `MEDIA:` line per local media file.
pub fn reply_text(payload: &Value) -> Option<String> {
    let payloads = payload["result"]["payloads"].as_array()?;
    let mut parts = Vec::new();
    for item in payloads {
        if let Some(text) = item["text"].as_str().filter(|t| !t.trim().is_empty()) {
            parts.push(text.to_string());
        }
        if let Some(media) = item["mediaUrl"].as_str().filter(|m| m.starts_with('/')) {
            parts.push(format!("MEDIA: {media}"));
        }
    }
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// The turn's message (spec §4.5 step 3, with every history item the bundle ships: R6).
pub fn prompt(job: &EngineJob) -> String {
    let mut out = String::from(
        "You are serving one user of a multi-tenant agent runtime in one conversation. Inspect local files the \
         message refers to; treat attached documents as primary sources. Your workspace persists between \
         messages.\n",
    );
    let history: Vec<_> = job
        .history
        .iter()
        .filter(|item| matches!(item.role, HistoryRole::User | HistoryRole::Assistant | HistoryRole::System))
        .collect();
    if !history.is_empty() {
        out.push_str("\n[ConversationHistory]\n");
        for item in history {
            let _ = writeln!(out, "{}: {}", item.role.as_str().to_uppercase(), item.content);
        }
    }
    out.push_str("\n[UserMessage]\n");
    out.push_str(&job.text);
    out.push('\n');
    if !job.attachments.is_empty() {
        out.push_str("\n[Attachments]\n");
        for file in &job.attachments {
            let _ = writeln!(out, "{}", job.workspace_dir.join(file).display());
        }
    }
    out.push_str("\nReply with the message for the user only.");
    out
}

fn safe_key(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(64).collect()
}

/// `text` without the model's API key.
fn scrub(text: &str, model: &ResolvedModel) -> String {
    match model.api_key.as_deref().filter(|k| k.len() >= 4) {
        Some(key) => text.replace(key, "<redacted>"),
        None => text.to_string(),
    }
}

/// `text` without ANSI escape sequences (the gateway colours its log).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A loopback port nothing listens on right now.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::HistoryItem;

    #[test]
    fn the_prompt_carries_history_message_and_attachments() {
        let job = EngineJob {
            message_id: "m1".to_string(),
            conversation_id: "c1".to_string(),
            agent_key: "a".to_string(),
            workspace_id: "default".to_string(),
            text: "and now?".to_string(),
            history: vec![
                HistoryItem { role: HistoryRole::User, content: "hi".to_string(), at: 1 },
                HistoryItem { role: HistoryRole::Tool, content: "x".to_string(), at: 2 },
                HistoryItem { role: HistoryRole::Assistant, content: "hello".to_string(), at: 3 },
            ],
            payload: json!({}),
            attachments: vec![".telegram-attachments/m1/a.pdf".to_string()],
            workspace_dir: PathBuf::from("/data/workspace"),
            model: None,
        };
        let p = prompt(&job);
        assert!(p.contains("[ConversationHistory]\nUSER: hi\nASSISTANT: hello\n"), "{p}");
        assert!(p.contains("[UserMessage]\nand now?\n"), "{p}");
        assert!(p.contains("[Attachments]\n/data/workspace/.telegram-attachments/m1/a.pdf\n"), "{p}");
        assert!(!p.contains("TOOL"), "{p}");
    }

    #[test]
    fn reply_text_joins_payloads_and_names_media() {
        let payload = json!({"status": "ok", "result": {"payloads": [
            {"text": "one", "mediaUrl": null}, {"text": "two", "mediaUrl": "/data/workspace/a.mp3"}
        ]}});
        assert_eq!(reply_text(&payload).unwrap(), "one\n\ntwo\n\nMEDIA: /data/workspace/a.mp3");
        assert_eq!(reply_text(&json!({"result": {"payloads": []}})), None);
    }

    #[test]
    fn provider_errors_come_from_lifecycle_events() {
        let event = json!({"runId": "r", "stream": "lifecycle", "data": {"phase": "finishing",
            "error": "⚠️ API rate limit reached.", "errorObservation": {"failoverReason": "rate_limit"}}});
        assert_eq!(provider_error(&event).unwrap(), "model provider error (rate_limit): ⚠️ API rate limit reached.");
        assert_eq!(provider_error(&json!({"stream": "lifecycle", "data": {"phase": "start"}})), None);
    }

    #[test]
    fn logs_lose_colours_and_keys() {
        let model = ResolvedModel {
            base_url: "u".to_string(),
            model: "m".to_string(),
            api_key: Some("sk-secret-1".to_string()),
            api: "openai-completions".to_string(),
        };
        assert_eq!(
            scrub(&strip_ansi("\u{1b}[36m[gateway]\u{1b}[39m key sk-secret-1"), &model),
            "[gateway] key <redacted>"
        );
    }
}
